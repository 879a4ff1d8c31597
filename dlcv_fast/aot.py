"""Ahead-of-time compile of the Triton kernels for a GPU target, on a machine without a GPU.

Each kernel module in ``dlcv_fast.kernels`` may define ``aot_specs()``: a list of :class:`AotSpec`, one per
shipped (kernel, variant, config). :func:`compile_spec` compiles one for ``sm_<arch>`` with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads from the result the
registers (``cuobjdump --dump-resource-usage``) and spills (local loads/stores in the SASS) from the cubin, so
Triton cache hits work too, the shared memory Triton allocates, and whether the PTX uses Hopper's ``wgmma``.

Compiling needs ``TRITON_INTERPRET`` off when the kernel modules are *imported* (under the interpreter
``@triton.jit`` gives InterpretedFunctions, which cannot be compiled). The test suite turns the interpreter
on where there is no GPU, so :func:`compile_all` always compiles in fresh Python processes started with
``TRITON_INTERPRET=0`` (``python -m dlcv_fast.aot --work FILE``), ``jobs`` of them at once.

Used by ``tests/kernels/test_aot_compile.py`` and ``python -m benchmarks.compile_report``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

# Dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DEFAULT_ARCHS = (90, 80)
KERNELS_PACKAGE = "dlcv_fast.kernels"


@dataclass(frozen=True)
class AotSpec:
    """One kernel instance to compile: what a launch would pass to ``triton.compile``.

    ``signature`` maps every argument name to a Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ...;
    ``"constexpr"`` for the ones given in ``constexprs``). ``divisible`` names the arguments a typical launch
    has as multiples of 16 (pointers from torch allocations, strides of contiguous tensors), which Triton
    specialises on. ``expect_wgmma``: on sm_90 this instance must use wgmma (checked by the tests);
    ``expect_ws``: on sm_90 Triton must have warp-specialized it (``setmaxnreg`` in the PTX).
    """
    name: str  # the kernel, e.g. "_attn_fwd"
    variant: str  # e.g. "fp16 d80 causal+bias+kpm"
    fn: Any  # the @triton.jit function
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    divisible: tuple = ()
    expect_wgmma: bool = False
    expect_ws: bool = False
    archs: tuple | None = None  # compile for these archs only (default: every arch asked for)

    @property
    def config(self) -> str:
        blocks = "x".join(str(self.constexprs[k]) for k in ("BLOCK_M", "BLOCK_N") if k in self.constexprs)
        return f"{blocks} w{self.num_warps} s{self.num_stages}".strip()

    @property
    def id(self) -> str:
        return f"{self.name}[{self.variant}][{self.config}]"


@dataclass
class AotResult:
    id: str
    kernel: str
    variant: str
    config: str
    arch: int
    regs: int = -1
    spill_bytes: int = -1  # spill stores + spill loads, as ptxas -v counts them
    stack_bytes: int = -1
    smem: int = -1  # bytes of dynamic shared memory Triton allocates
    wgmma: bool = False
    warp_specialized: bool = False  # setmaxnreg in the PTX: Triton split the kernel into warp partitions
    seconds: float = 0.0  # wall time of the compile
    cpu_seconds: float = 0.0  # CPU time of the compile, ptxas included (what CI's budget depends on)
    error: str | None = None


def signature_of(fn, constexprs: dict, types: dict, default: str = "i32") -> dict:
    """Signature dict for ``fn``: each argument's type from ``types`` (names ``fn`` lacks are ignored, so
    one dict can serve several kernels; others get ``default``), ``"constexpr"`` for those in ``constexprs``.
    Raises if a ``tl.constexpr`` argument has no value."""
    params = inspect.signature(_python_fn(fn)).parameters
    sig = {}
    for name, p in params.items():
        if "constexpr" in str(p.annotation) and name not in constexprs:
            raise ValueError(f"{fn.__name__}: constexpr argument {name} needs a value in constexprs")
        sig[name] = "constexpr" if name in constexprs else types.get(name, default)
    unknown = set(constexprs) - set(params)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    return sig


def arg_names(fn) -> list[str]:
    """Argument names of a @triton.jit function (a JITFunction or an InterpretedFunction)."""
    return list(inspect.signature(_python_fn(fn)).parameters)


def shipped_configs(config_fn, *args):
    """``config_fn(*args)`` as a GPU launch sees it, i.e. with ``TRITON_INTERPRET`` off (kernel modules give
    one small config under the interpreter)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        return config_fn(*args)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def kernel_modules(names=None) -> list[str]:
    """Modules of dlcv_fast.kernels that define ``aot_specs`` (all, or those whose short name is in names)."""
    pkg = importlib.import_module(KERNELS_PACKAGE)
    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if names and info.name not in names:
            continue
        full = f"{KERNELS_PACKAGE}.{info.name}"
        if hasattr(importlib.import_module(full), "aot_specs"):
            found.append(full)
    missing = set(names or ()) - {m.rsplit(".", 1)[1] for m in found}
    if missing:
        raise ValueError(f"no kernel module with aot_specs(): {sorted(missing)}")
    return found


def collect_specs(modules) -> list[AotSpec]:
    specs = [s for m in modules for s in importlib.import_module(m).aot_specs()]
    ids = [s.id for s in specs]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"duplicate AOT spec ids: {sorted(dupes)}")
    return specs


# ------------------------------------------------------------------------------------------------
# Compiling one spec (in a process whose kernel modules were imported with the interpreter off)
# ------------------------------------------------------------------------------------------------

def _python_fn(fn):
    """The plain Python function under a JITFunction / InterpretedFunction."""
    return getattr(fn, "fn", fn)


def _tool(name):
    """A CUDA binary shipped with Triton (same CUDA as its ptxas), else the one on PATH."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _cuobjdump(cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in a cubin, from ``cuobjdump --dump-resource-usage``."""
    out = _cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump resource usage:\n{out}")
    return int(m.group(1)), int(m.group(2))


def spill_bytes(cubin: bytes) -> int:
    """Bytes of register spills in a cubin, the sum of ptxas -v's "spill stores" and "spill loads": the
    sizes of the local-memory stores and loads (STL/LDL) in its SASS, which Triton kernels only have for
    spilling. Read from the cubin, so it works on Triton cache hits, where ptxas does not run."""
    sizes = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
    total = 0
    for modifiers in re.findall(r"\b(?:STL|LDL)((?:\.[A-Z0-9]+)*)", _cuobjdump(cubin, "-sass")):  # LDL.LU.64
        total += max([sizes.get(m, 4) for m in modifiers.split(".")[1:]], default=4)
    return total


def compile_spec(spec: AotSpec, arch: int) -> AotResult:
    """Compile ``spec`` for ``sm_<arch>`` and measure it. Compile errors are returned in ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    res = AotResult(spec.id, spec.name, spec.variant, spec.config, arch)
    t0, cpu0 = time.perf_counter(), _cpu_time()
    try:
        if not isinstance(spec.fn, JITFunction):
            raise TypeError(f"{spec.name} is a {type(spec.fn).__name__}, not a JITFunction: its module was "
                            "imported with TRITON_INTERPRET=1; compile through compile_all()")
        names = list(spec.signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible}
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        res.regs, res.stack_bytes = resource_usage(kernel.asm["cubin"])
        # spills live in the stack frame, so a kernel with none needs no (slow, ~1 s) disassembly
        res.spill_bytes = spill_bytes(kernel.asm["cubin"]) if res.stack_bytes else 0
        res.smem = kernel.metadata.shared
        res.wgmma = "wgmma" in kernel.asm["ptx"]
        res.warp_specialized = warp_specialized(kernel.asm["ptx"])
    except Exception as e:  # report it; one bad spec must not hide the others
        res.error = f"{type(e).__name__}: {e}"[:4000]
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = _cpu_time() - cpu0
    return res


def warp_specialized(ptx: str) -> bool:
    """Whether Triton split a kernel into warp partitions: its PTX rebalances registers (``setmaxnreg``)."""
    return "setmaxnreg" in ptx


def _cpu_time():
    """CPU seconds of this process and its finished children (ptxas, cuobjdump)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ------------------------------------------------------------------------------------------------
# Compiling many, in fresh processes with the interpreter off
# ------------------------------------------------------------------------------------------------

def work_list(specs, archs, only=None) -> list[tuple[AotSpec, int]]:
    """The (spec, arch) pairs to compile: each spec for each of ``archs`` it allows, in spec order, then
    arch order; restricted to the ``(spec id, arch)`` pairs in ``only`` when given."""
    pairs = [(s, a) for s in specs for a in archs if s.archs is None or a in s.archs]
    if only is not None:
        only = set(only)
        pairs = [(s, a) for s, a in pairs if (s.id, a) in only]
    return pairs


def compile_all(modules, archs=DEFAULT_ARCHS, jobs: int = 2, only=None, timeout: float = 1800) -> list[AotResult]:
    """Compile the :func:`work_list` of ``modules``' specs in ``jobs`` fresh processes started with
    ``TRITON_INTERPRET=0``. Returns one result per pair, in work-list order; a pair left uncompiled (a worker
    crashed or the ``timeout`` in seconds ran out) comes back with ``error`` set."""
    work = work_list(collect_specs(modules), archs, only)
    env = dict(os.environ, TRITON_INTERPRET="0")
    by_arch = sorted(work, key=lambda pair: list(archs).index(pair[1]))
    deadline = time.monotonic() + timeout
    done, failures = {}, []
    with tempfile.TemporaryDirectory(prefix="dlcv_aot_") as tmp:
        procs = []
        for i in range(jobs):
            # every jobs-th pair, arch-major, so each process gets its share of the slower sm_90 compiles
            share = [[s.id, a] for s, a in by_arch[i::jobs]]
            if not share:
                continue
            paths = [os.path.join(tmp, f"{i}.{ext}") for ext in ("work", "out", "err")]
            with open(paths[0], "w") as f:
                json.dump(share, f)
            with open(paths[1], "w") as out, open(paths[2], "w") as err:  # files, not pipes: nothing blocks
                procs.append((subprocess.Popen([sys.executable, "-m", "dlcv_fast.aot", "--modules", *modules,
                                                "--work", paths[0]], env=env, stdout=out, stderr=err), paths))
        try:
            for p, paths in procs:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    failures.append(f"timed out after {timeout:.0f} s")
                    continue
                if p.returncode != 0:
                    with open(paths[2]) as f:
                        failures.append(f"worker exit {p.returncode}: {f.read().strip()[-2000:]}")
        finally:
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for _, paths in procs:
            with open(paths[1]) as f:
                for line in f:
                    if line.startswith("{"):
                        r = AotResult(**json.loads(line))
                        done[(r.id, r.arch)] = r
    why = "not compiled: " + ("\n".join(failures) or "the worker gave no result")
    return [done.get((s.id, a)) or AotResult(s.id, s.name, s.variant, s.config, a, error=why) for s, a in work]


def _worker(argv=None):
    ap = argparse.ArgumentParser(description="Compile (spec id, arch) pairs; print one JSON result a line.")
    ap.add_argument("--modules", nargs="+", required=True)
    ap.add_argument("--work", required=True, help="JSON file: a list of [spec id, arch] pairs")
    args = ap.parse_args(argv)
    specs = {s.id: s for s in collect_specs(args.modules)}
    with open(args.work) as f:
        work = json.load(f)
    for spec_id, arch in work:
        print(json.dumps(dataclasses.asdict(compile_spec(specs[spec_id], arch))), flush=True)


if __name__ == "__main__":
    from dlcv_fast import aot  # the module the kernel modules import, not this __main__ copy of it

    aot._worker()
