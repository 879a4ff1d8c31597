"""Registers, spills and shared memory of every shipped Triton kernel config, compiled ahead of time.

    python -m benchmarks.compile_report [--arch 90 80] [--kernel attention] [--jobs 2]

No GPU needed: each kernel module's ``aot_specs()`` is compiled for ``sm_<arch>`` with ``triton.compile``
(see dlcv_fast/aot.py). Rows that spill, exceed the arch's shared memory, or (on sm_90) lack an expected
wgmma are flagged in the last column; the exit status is 1 when any row is flagged or fails to compile
(tests/kernels/aot_known_problems.txt lists the flagged rows that are accepted, and why).
"""
from __future__ import annotations

import argparse
import sys
import time

from dlcv_fast import aot


def problems(r: aot.AotResult, expect_wgmma: bool, expect_ws: bool = False) -> list[str]:
    """Why this result breaks the rules the AOT test checks (empty when it is fine)."""
    if r.error:
        return ["compile error"]
    out = []
    if r.spill_bytes:
        out.append("SPILLS")
    limit = aot.SMEM_LIMIT.get(r.arch)
    if limit is not None and r.smem > limit:
        out.append(f"SMEM>{limit // 1024}KiB")
    if expect_wgmma and r.arch >= 90 and not r.wgmma:
        out.append("NO WGMMA")
    if expect_ws and r.arch >= 90 and not r.warp_specialized:
        out.append("NOT WARP-SPECIALIZED")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", type=int, default=list(aot.DEFAULT_ARCHS), help="compute capabilities")
    ap.add_argument("--kernel", nargs="+", default=None,
                    help="kernel modules by short name (default: every module in dlcv_fast.kernels with aot_specs)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    args = ap.parse_args(argv)

    modules = aot.kernel_modules(args.kernel)
    specs = {s.id: s for s in aot.collect_specs(modules)}
    t0 = time.perf_counter()
    results = aot.compile_all(modules, args.arch, jobs=args.jobs)
    elapsed = time.perf_counter() - t0

    head = ("kernel", "variant", "config", "arch", "regs", "spills(B)", "smem(KiB)", "wgmma", "cpu(s)", "problems")
    rows = [(r.kernel, r.variant, r.config, f"sm_{r.arch}", str(r.regs), str(r.spill_bytes),
             f"{r.smem / 1024:.1f}", "yes" if r.wgmma else "no", f"{r.cpu_seconds:.1f}",
             " ".join(problems(r, specs[r.id].expect_wgmma, specs[r.id].expect_ws)))
            for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in (head, *rows):
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    bad = [r for r in results if problems(r, specs[r.id].expect_wgmma, specs[r.id].expect_ws)]
    for r in bad:
        if r.error:
            print(f"\n{r.id} sm_{r.arch}: {r.error}", file=sys.stderr)
    cpu = sum(r.cpu_seconds for r in results)
    print(f"\n{len(results)} compiles in {elapsed:.0f} s ({cpu:.0f} CPU-s), {len(bad)} with problems",
          file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
