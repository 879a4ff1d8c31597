"""Barrier mutation sweep: is every barrier in csrc/ needed, and do the emulated tests notice when one is missing?

    python -m tests.csrc.emu.barriers [--files attention.cu ...] [--values-only] [--out FILE.md]

For each ``__syncthreads()`` / ``__syncwarp()`` statement of the kernel sources, a copy of csrc/ with that one
barrier removed is built under the emulation (one build directory for all variants, so ninja recompiles only the
changed file) and the emulated tests of its op run on it (tests/csrc/test_cuda_emulated.py, stopping at the first
failure). Each barrier is reported as caught by the race check (the message names the byte and the two threads),
caught by the results (a parity or determinism test failed, or a deadlock), or not caught: then either the barrier
is not needed or no test reaches the code it protects, and the report says which file and line to look at.
``--values-only`` runs with the race check off (``DLCV_FAST_EMU_RACECHECK=0``), to see what the results alone
catch. Takes about a minute per barrier on one core.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.csrc.emu import build

TESTS = "tests/csrc/test_cuda_emulated.py"
# the emulated tests that run a file's kernels
SELECTION = {
    "window_attention.cu": "window or random",
    "rope.cu": "rope",
}
DEFAULT_SELECTION = "(attention or random) and not window and not refuse"
BARRIER = re.compile(r"__syncthreads\(\)|__syncwarp\([^)]*\)")


def barriers(files):
    """(file name, 1-based line, the line) of every barrier statement outside comments."""
    found = []
    for name in files:
        for i, line in enumerate((build.CSRC / name).read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if BARRIER.search(code):
                found.append((name, i, line.strip()))
    return found


def verdict(output: str, rc: int) -> str:
    """What stopped the tests: the race check's or the emulation's message, a failed test, or nothing."""
    if rc == 0:
        return "not caught"
    m = re.search(r"RuntimeError: dlcv_fast emu: (race \([^)]*\)[^\n]*?)(?: \(block|\n)", output)
    if m:
        return "race check: " + m.group(1)
    m = re.search(r"RuntimeError: dlcv_fast emu: ([^\n]*)", output)
    if m:
        return "emulation: " + m.group(1)[:160]
    m = re.search(r"^FAILED (\S+)", output, re.M)
    if m:
        return "results: " + m.group(1).split("::", 1)[-1]
    return f"exit status {rc}: " + output.strip().splitlines()[-1][:160] if output.strip() else f"exit status {rc}"


def run_variant(csrc: Path, out: Path, selection: str, race_check: bool, timeout: float) -> tuple[str, float]:
    env = dict(os.environ, DLCV_FAST_EMU_CSRC=str(csrc), DLCV_FAST_EMU_OUT=str(out),
               DLCV_FAST_EMU_RACECHECK="1" if race_check else "0", PYTHONPATH=str(build.ROOT))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                            TESTS, "-k", selection], cwd=build.ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        return verdict(r.stdout + r.stderr, r.returncode), time.time() - t0
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s", time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", default=None, help="csrc file names (default: every .cu / .cuh)")
    ap.add_argument("--values-only", action="store_true", help="race check off: what the results alone catch")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    files = args.files or sorted(p.name for p in build.CSRC.iterdir() if p.suffix in (".cu", ".cuh"))
    work = Path(tempfile.mkdtemp(prefix="dlcv_fast_barriers_"))
    csrc, out = work / "csrc", work / "build"
    shutil.copytree(build.CSRC, csrc)
    rows = []
    try:
        print("warming the build directory with the unchanged sources ...", flush=True)
        base, secs = run_variant(csrc, out, "emulator_reports", not args.values_only, args.timeout)
        if base != "not caught":
            print(f"the unchanged sources fail: {base}")
            return 2
        todo = barriers(files)
        for n, (name, line, text) in enumerate(todo, 1):
            original = (csrc / name).read_text()
            lines = original.splitlines(keepends=True)
            lines[line - 1] = BARRIER.sub("((void)0)", lines[line - 1], count=1)
            (csrc / name).write_text("".join(lines))
            # the op's tests, or the attention ones for the shared headers
            selection = SELECTION.get(name, DEFAULT_SELECTION)
            result, secs = run_variant(csrc, out, selection, not args.values_only, args.timeout)
            (csrc / name).write_text(original)
            rows.append((f"{name}:{line}", text, result))
            print(f"[{n}/{len(todo)}] {name}:{line} ({secs:.0f} s): {result}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = ["| barrier | statement | without it |", "|---|---|---|"]
    table += [f"| {w} | `{t}` | {r} |" for w, t, r in rows]
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
