"""What the command and the pytest-benchmark tests share: inputs of a case, parity check, timing, roofline.

Timing on a GPU is ``triton.testing.do_bench`` (median of CUDA-event-timed runs, L2 flushed before each),
which launches from the host as a user's eager code does: a call whose Python and launch overhead exceeds its
GPU time is timed at host speed. Calls under ``CUDAGRAPH_BELOW_MS`` are timed again with ``do_bench_cudagraph``
(the launches, backward included, captured in a CUDA graph, so host overhead does not count) where capture
works; that is the row's ``ms``, and ``ms_launch`` keeps the host-launched time beside it. Each case keeps
several fresh random input sets, together at least twice the L2 cache, and every timed call takes the next set
in turn, so no provider is timed on inputs left in cache by its previous call. On the CPU a plain wall clock is
used (CPU work is synchronous).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import math
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from benchmarks.registry import Benchmark, Provider, Unavailable

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
CUDAGRAPH_BELOW_MS = 10.0  # host overhead of a few hundred microseconds can hide GPU time up to here
MAX_SETS = 64
MAX_SET_MEMORY = 8 << 30


def pick_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return name


def allow_many_recompiles():
    """Each case compiles its own static-shape graphs; keep torch.compile from falling back to eager after 8."""
    import torch._dynamo

    for name in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def _nbytes(inputs: dict) -> int:
    tensors = [t for v in inputs.values() for t in (v if isinstance(v, tuple) else (v,))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


@dataclass
class Trial:
    """One provider on one case after its first (parity-checked) call. ``fn`` is set when the provider ran and gave
    an output of the right shape (a parity-fail row is still timed, and flagged)."""

    provider: Provider
    status: str  # "ok", "parity-fail", "n/a" (cannot run here), "failed" (raised)
    note: str = ""
    fn: Optional[Callable] = None
    parity_err: Optional[float] = None
    parity_tol: Optional[float] = None


class CaseRun:
    """The inputs, shared context and parity reference of one (benchmark, case) on one device."""

    def __init__(self, bench: Benchmark, case: dict, device: str, n_sets=None):
        """``n_sets``: how many input sets to make (default: enough to rotate through twice the L2 cache)."""
        self.bench, self.case, self.device = bench, case, device
        self.dtype = getattr(torch, bench.dtype) if device == "cuda" else torch.float32
        torch.manual_seed(0)
        first = bench.make_inputs(case, device, self.dtype)
        n_sets = self._n_sets(first) if n_sets is None else n_sets
        self.sets = [first] + [bench.make_inputs(case, device, self.dtype) for _ in range(n_sets - 1)]
        self.ctx: dict = {}
        self._reference = None

    def _n_sets(self, first: dict) -> int:
        if self.device != "cuda":
            return 2
        size = max(_nbytes(first), 1)
        l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
        return max(2, min(MAX_SETS, math.ceil(2 * l2 / size), MAX_SET_MEMORY // size))

    def reference(self) -> list:
        if self._reference is None:
            self._reference = self.bench.reference(self.case, self.sets[0], self.ctx)
        return self._reference

    def trial(self, provider: Provider) -> Trial:
        """Build the provider, call it once on the first input set and check its output against the reference."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn = provider.build(self.case, self.sets[0], self.ctx)
                out = fn(self.sets[0])
                if self.device == "cuda":
                    torch.cuda.synchronize()
            except (Unavailable, ImportError, NotImplementedError) as e:
                return Trial(provider, "n/a", short_error(e))
            except torch.cuda.OutOfMemoryError:
                return Trial(provider, "failed", "out of memory")
            except Exception as e:
                reasons = "; ".join(str(w.message).splitlines()[0][:120] for w in caught[:2])
                return Trial(provider, "failed", short_error(e) + (f" [{reasons}]" if reasons else ""))
        if not provider.parity:
            return Trial(provider, "ok", "timing baseline, no parity check", fn)
        try:
            reference = self.reference()
        except Exception as e:  # e.g. the float32 reference does not fit: time the provider, say it is unchecked
            return Trial(provider, "ok", f"parity not checked: reference failed ({short_error(e)})", fn)
        worst, err, tol = -1.0, 0.0, 0.0
        for o, (golden, lp, factor) in zip(self.bench.view(self.case, out), reference):
            if o.shape != golden.shape:
                return Trial(provider, "parity-fail", f"output shape {tuple(o.shape)} != {tuple(golden.shape)}")
            e = _max_err(o, golden)
            t = factor * _max_err(lp, golden) + ATOL.get(lp.dtype, 1e-5)
            ratio = e / t if e == e else math.inf  # NaN error fails
            if ratio > worst:
                worst, err, tol = ratio, e, t
        status = "ok" if worst <= 1.0 else "parity-fail"
        note = "" if status == "ok" else f"max error {err:.2e} > tolerance {tol:.2e}"
        return Trial(provider, status, note, fn, err, tol)

    def caller(self, fn: Callable) -> Callable[[], object]:
        """A no-argument function calling ``fn`` on the next input set in turn."""
        sets = itertools.cycle(self.sets)
        return lambda: fn(next(sets))


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def time_call(call: Callable[[], object], device: str, quick: bool) -> tuple[float, str, Optional[float], str]:
    """``(ms, timer, ms_launch, note)``: the median milliseconds per call, the timer that gave them ("do_bench",
    "cudagraph" or "wallclock"), on a GPU the host-launched ``do_bench`` median (None on the CPU), and why a
    short call could not be timed in a CUDA graph ("" otherwise): its time then includes host overhead, so
    it is not comparable with a CUDA-graph time, and the reason is worth fixing."""
    if device != "cuda":
        return _time_cpu(call, quick), "wallclock", None, ""
    from triton.testing import do_bench, do_bench_cudagraph

    with gc_paused():
        # --quick: shorter runs (still tens of calls for a sub-millisecond case), so the compiled providers fit too
        rep = 25 if quick else 300
        ms = do_bench(call, warmup=5 if quick else 50, rep=rep, return_mode="median")
        if ms * MIN_SAMPLES > rep:  # do_bench takes rep / (its estimate) samples: a median of at least MIN_SAMPLES
            ms = do_bench(call, warmup=0, rep=ms * (MIN_SAMPLES + 1), return_mode="median")
    if ms < CUDAGRAPH_BELOW_MS:
        try:
            return do_bench_cudagraph(call, rep=10 if quick else 100, return_mode="median"), "cudagraph", ms, ""
        except Exception as e:  # not capturable (host sync, unsupported op): keep the event timing, say why
            torch.cuda.synchronize()
            return ms, "do_bench", ms, f"no CUDA graph (host overhead included): {short_error(e)}"
    return ms, "do_bench", ms, ""


# Calls are timed with Python's garbage collector paused (as timeit does): a full collection of this process's
# heap (torch and the reference libraries loaded) can take tens of ms and would land in whichever call it
# interrupts. And at least this many timed calls per median: with --quick's 25 ms budget a 65 ms training step
# got one (the 2026-11-29 Swin-T row of ours: 65.8 ms for 42.9 ms of traced GPU work).
MIN_SAMPLES = 5


@contextlib.contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def peak_memory_mib(call: Callable[[], object], device: str) -> Optional[float]:
    """MiB allocated at the peak of one call above what was allocated before it (its outputs, gradients and
    temporaries; the inputs excluded): the extra memory a provider needs. None off CUDA."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


PROFILE_ITERS = 3
PROFILE_TOP = 15
# Kinds of work a model's kernels (or, on the CPU, aten ops) do, by name, first match wins: matmuls (cuBLAS's
# xmma / nvjet / cutlass kernels, our fused Linear + GELU), convolutions, attention (ours, SDPA's flash / cuDNN /
# efficient), normalisation, then elementwise and copies.
KERNEL_KINDS = (
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|_linear_act|aten::(addmm|mm|bmm|linear|matmul|"
                        r"_addmm_activation)$", re.I)),
    ("conv", re.compile(r"conv|fprop|dgrad|wgrad|nchw|nhwc", re.I)),  # the patch embedding (cuDNN)
    ("attention", re.compile(r"attn|attention|fmha|flash|cudnn|flex", re.I)),
    ("norm", re.compile(r"layer_?norm|_ln_(fwd|bwd)", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|gelu|sigmoid|add|mul|copy|memcpy|memset|"
                               r"cat|fill|reduce|softmax|exp|rope|aten::", re.I)),
)


def kernel_kind(name: str) -> str:
    """The kind of work a kernel or aten op named ``name`` does (``KERNEL_KINDS``), or "other"."""
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def kernel_breakdown(call: Callable[[], object], device: str, iters: int = PROFILE_ITERS,
                     top: int = PROFILE_TOP) -> dict:
    """Where one call's time goes, from a torch.profiler trace of ``iters`` calls (after one untraced call): on a
    GPU the kernels, memcpys and memsets (device time), on the CPU the aten ops (self CPU time), heaviest first.
    Returns ``{"total_ms": ..., "kinds": {kind: ms}, "kernels": [{"name", "calls", "ms", "share"}, ...]}`` per
    call: the time by kind of work (:func:`kernel_kind`, over every kernel), and the ``top`` heaviest kernels
    followed by one ``"(other)"`` entry for the rest. Also ``host_ms``, the median time the host spends in one
    call (it returns once the work is queued), and ``wall_ms``, the median of one call until the device is
    done, both untraced: ``host_ms`` close to ``wall_ms`` and above ``total_ms`` means the device waited for
    the host (launch-bound); ``wall_ms`` well above both means something else stalls it (a sync, the
    allocator)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call()
    sync()
    host, wall = [], []
    with gc_paused():
        for _ in range(iters):
            t0 = time.perf_counter()
            call()
            host.append(time.perf_counter() - t0)
            sync()
            wall.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            call()
        sync()
    spent = []
    for evt in prof.key_averages():
        if device == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None)
            us = evt.self_cuda_time_total if us is None else us
        elif evt.key.startswith("aten::"):
            us = evt.self_cpu_time_total
        else:
            continue
        if us > 0:
            spent.append((us / iters / 1e3, evt.count / iters, evt.key))
    spent.sort(reverse=True)
    total = sum(ms for ms, _, _ in spent)
    kinds = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for ms, _, name in spent:
        kinds[kernel_kind(name)] += ms
    entries = [{"name": name[:120], "calls": round(calls, 2), "ms": ms} for ms, calls, name in spent[:top]]
    if len(spent) > top:
        entries.append({"name": "(other)", "calls": round(sum(c for _, c, _ in spent[top:]), 2),
                        "ms": sum(ms for ms, _, _ in spent[top:])})
    for e in entries:
        e["share"] = e["ms"] / total if total else 0.0
    return {"total_ms": total, "host_ms": statistics.median(host) * 1e3, "wall_ms": statistics.median(wall) * 1e3,
            "kinds": kinds, "kernels": entries}


def _time_cpu(call, quick: bool) -> float:
    call()
    times, stop = [], time.perf_counter() + (0.2 if quick else 1.0)
    with gc_paused():
        while len(times) < (2 if quick else 5) or (time.perf_counter() < stop and len(times) < 100):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


COPY_CONFIGS = ((4096, 4), (8192, 8), (16384, 8))  # Triton streaming copy: elements per program, warps


def _triton_copy(src: torch.Tensor, dst: torch.Tensor, block: int, warps: int):
    import triton

    n = src.numel()
    _stream_copy_kernel()[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, num_warps=warps)


@functools.lru_cache(maxsize=None)
def _stream_copy_kernel():
    """A plain vectorised copy, one BLOCK-element slice per program (compiled on first use, GPU only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def stream_copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask, eviction_policy="evict_first"), mask=mask)
    return stream_copy


def compile_copy_kernels(device: str):
    """Compile the roofline's Triton copies (one tiny launch per config) into Triton's on-disk cache: a warm-up
    worker does it while the main process waits, so :func:`roofline` finds them compiled."""
    if device != "cuda":
        return
    src = torch.zeros(16, device=device)
    for block, warps in COPY_CONFIGS:
        _triton_copy(src, torch.empty_like(src), block, warps)
    torch.cuda.synchronize()


def roofline(device: str, quick: bool = False) -> dict:
    """The card's ceilings measured now: a large matmul (TFLOP/s) and a large copy (GB/s, read + write), timed
    as the rows are (``quick``: --quick's shorter runs; always so on the CPU).

    The copy ceiling is the best of torch's ``copy_`` and a Triton streaming copy at a few tile sizes: on an H200
    ``copy_`` of 1 GiB reached 2770 GB/s while our RoPE kernel moved 3756 GB/s, so ``copy_`` alone understated
    the card. Each candidate's GB/s is kept in ``copy_candidates``."""
    if device == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, copy_bytes = 1024, torch.float32, 64 << 20
    quick = quick or device != "cuda"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    mm_ms = time_call(lambda: a @ b, device, quick=quick)[0]
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copies = {"torch copy_": lambda: dst.copy_(src)}
    if device == "cuda":
        for block, warps in COPY_CONFIGS:
            copies[f"triton {block}/{warps}w"] = functools.partial(_triton_copy, src, dst, block, warps)
    candidates = {}
    for name, fn in copies.items():
        try:
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
                ok = torch.equal(dst, src)
                dst.zero_()
            else:
                ok = True
            if ok:
                candidates[name] = 2 * copy_bytes / time_call(fn, device, quick=quick)[0] / 1e6
        except Exception as e:  # e.g. the Triton copy does not compile here: keep the others
            warnings.warn(f"roofline copy candidate {name!r} failed: {short_error(e)}")
    best = max(candidates, key=candidates.get)
    return {"matmul_tflops": 2 * n ** 3 / mm_ms / 1e9, "copy_gbps": candidates[best],
            "matmul": f"{str(dtype).replace('torch.', '')} {n}x{n}x{n}",
            "copy": f"{copy_bytes >> 20} MiB device copy ({best}"
                    + (f", the best of {len(candidates)}" if len(candidates) > 1 else "") + "), bytes read + written",
            "copy_candidates": {k: round(v, 1) for k, v in candidates.items()}}


def metrics(bench: Benchmark, case: dict, dtype: torch.dtype, ms: float, roof: dict) -> dict:
    """Throughputs of one timed call and their fractions of the measured ceilings."""
    tflops = bench.flops(case) / ms / 1e9 if bench.flops else None
    gbps = bench.bytes(case, dtype.itemsize) / ms / 1e6 if bench.bytes else None
    return {
        "tflops": tflops,
        "gbps": gbps,
        "items_per_s": bench.items(case) / ms * 1e3 if bench.items else None,
        "matmul_frac": tflops / roof["matmul_tflops"] if tflops is not None else None,
        "copy_frac": gbps / roof["copy_gbps"] if gbps is not None else None,
    }
