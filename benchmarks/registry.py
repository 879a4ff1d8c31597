"""The one definition of every benchmark: what it runs, on which shapes, against whom, and how it is counted.

A :class:`Benchmark` is a workload (e.g. attention forward) with its shapes ("cases", each a dict of
parameters), its :class:`Provider` s (ours and every peer, each turning a case into a callable), an input
builder, a parity reference and the analytic FLOP / byte / item counts that turn a time into TFLOP/s,
GB/s or images/s. Modules register their benchmarks with :func:`register`; :func:`benchmarks` returns them.

Adding a kernel's benchmarks = one new module listed in ``MODULES`` that calls ``register(Benchmark(...))``.
Providers are listed ours (names starting with "dlcv_fast") first; speedups are over the fastest other one.
Each provider is a headline one (ours by default and the peers the issues' speed targets name) or
``secondary`` (variants of ours and slow or redundant baselines): ``--quick`` times every benchmark's headline
providers before any secondary one (see benchmarks/__main__.py).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

SUITES = ("kernels", "models")
MODULES = ("benchmarks.attention", "benchmarks.window_attention", "benchmarks.rope", "benchmarks.models",
           "benchmarks.layer_norm", "benchmarks.linear_act")


class Unavailable(Exception):
    """Raised by a provider's ``build`` (or first call) when it cannot run here: library missing, shape unsupported."""


@dataclass(frozen=True)
class Provider:
    """One implementation of a benchmark's workload.

    ``build(case, inputs, ctx)`` returns ``fn(inputs) -> output(s)``; it may raise :class:`Unavailable`.
    ``inputs`` is one input set (a dict); ``fn`` is later called on every rotating input set, so it must
    read tensors from its argument, not from the set it was built with (masks and other constants that are
    equal across sets may be taken from the build set). ``ctx`` is a dict shared by the providers of one
    case (e.g. a model built once). ``compiled`` marks providers that pay a torch.compile warm-up;
    ``parity=False`` marks a timing baseline computing something else (e.g. attention without RoPE).
    ``secondary=True`` marks a provider outside the benchmark's headline comparison: a variant of ours (another
    backend, an off-by-default flag) or a peer no speed target is set against (e.g. SDPA's math backend). The
    headline providers are our default one and the peers the issues compare it with; ``--quick`` times those
    for every benchmark first and the secondary ones last, with whatever time the cap leaves.
    """

    name: str
    build: Callable[[dict, dict, dict], Callable]
    devices: tuple = ("cuda",)
    compiled: bool = False
    parity: bool = True
    secondary: bool = False


@dataclass
class Benchmark:
    """A workload, its shapes and providers, and its counting formulas.

    name / suite / issue / title: identity ("attn_fwd", "kernels", 2, "dense attention forward").
    cases: full sweep on a GPU; quick: the headline cases (``--quick``); cpu_cases: tiny shapes for the
        no-GPU mode (empty = not run on the CPU; ``--quick`` takes the first).
    make_inputs(case, device, dtype) -> dict of tensors, fresh random (called once per rotating set).
    reference(case, inputs, ctx) -> list of ``(golden, low_precision, factor)``: the parity targets on a
        slice of the problem; ``view(case, outputs)`` cuts the provider's outputs to the same slice, and
        each output passes when ``|out - golden| <= factor * |low_precision - golden| + atol`` (max norms).
    flops(case), bytes(case, element_size), items(case) -> float: analytic counts per call (None: not
        reported); items are e.g. images, for images/s.
    available() -> None, or why the benchmark cannot run (e.g. our op has not landed yet).
    label(case) -> short text naming the case in tables; x / group: plot TFLOP/s (or GB/s, items/s) against
        case[x], one panel per value of the ``group`` keys (x=None: bar chart per case).
    dtype: the element type on a GPU (the CPU mode always uses float32).
    profile: also trace each non-compiled provider with torch.profiler and keep where its time goes (the GPU
        kernels; on the CPU the aten ops) in the results' ``profiles``: for workloads made of many kernels.
    """

    name: str
    suite: str
    issue: int
    title: str
    cases: list
    quick: list
    providers: list
    make_inputs: Callable[[dict, Any, Any], dict]
    reference: Callable[[dict, dict, dict], list]
    view: Callable[[dict, Any], list]
    label: Callable[[dict], str]
    cpu_cases: list = field(default_factory=list)
    flops: Optional[Callable[[dict], float]] = None
    bytes: Optional[Callable[[dict, int], float]] = None
    items: Optional[Callable[[dict], float]] = None
    available: Callable[[], Optional[str]] = lambda: None
    x: Optional[str] = None
    group: tuple = ()
    dtype: str = "bfloat16"
    profile: bool = False

    def cases_for(self, device: str, quick: bool) -> list:
        if device != "cuda":
            return self.cpu_cases[:1] if quick else self.cpu_cases
        return self.quick if quick else self.cases

    def providers_for(self, device: str) -> list:
        return [p for p in self.providers if device in p.devices]


def cuda_backend(build):
    """``build`` with our ops forced onto the hand-written CUDA kernels (backend "cuda"), for the provider
    "dlcv_fast.cuda"; Unavailable where dlcv_fast._C was not built."""
    def make(c, x0, ctx):
        import dlcv_fast
        from dlcv_fast import backend

        if backend.cuda_extension() is None:
            raise Unavailable("dlcv_fast was installed without its CUDA extension (dlcv_fast._C)")
        fn = build(c, x0, ctx)

        def run(x):
            with dlcv_fast.use_backend("cuda"):
                return fn(x)
        return run
    return make


def with_backward(provider: Provider, *wrt: str) -> Provider:
    """The same provider timing forward + backward: its fn returns ``(*outputs, *grads)``, the gradients of the
    inputs named ``wrt`` for the output gradient(s) ``inputs["do"]`` (a tensor, or a tuple for tuple outputs)."""
    build = provider.build

    def build_fwd_bwd(case, inputs, ctx):
        forward = build(case, inputs, ctx)

        def fn(x):
            out = forward(x)
            outs = out if isinstance(out, tuple) else (out,)
            dos = x["do"] if isinstance(x["do"], tuple) else (x["do"],)
            return (*outs, *torch.autograd.grad(outs, [x[n] for n in wrt], dos))
        return fn
    return replace(provider, build=build_fwd_bwd)


def torch_providers(fn: Callable, *names: str) -> list:
    """The "torch.eager" and "torch.compile" providers of a workload written as plain torch code:
    ``fn(*(inputs[n] for n in names))``, as is and through ``torch.compile`` (static shapes)."""
    def eager(case, x0, ctx):
        return lambda x: fn(*(x[n] for n in names))

    def compiled(case, x0, ctx):
        compiled_fn = torch.compile(fn, dynamic=False)
        return lambda x: compiled_fn(*(x[n] for n in names))
    return [Provider("torch.eager", eager, devices=("cuda", "cpu")),
            Provider("torch.compile", compiled, compiled=True)]


_REGISTRY: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    if bench.suite not in SUITES:
        raise ValueError(f"{bench.name}: suite must be one of {SUITES}, got {bench.suite!r}")
    if bench.name in _REGISTRY:
        raise ValueError(f"benchmark {bench.name!r} registered twice")
    if not all(c in bench.cases for c in bench.quick):
        raise ValueError(f"{bench.name}: every quick case must also be in cases")
    for device in ("cuda", "cpu"):
        first = bench.providers_for(device)[:1]
        if first and first[0].secondary:
            raise ValueError(f"{bench.name}: the first provider on {device} ({first[0].name}) is what the others "
                             "are compared with; it cannot be secondary")
    _REGISTRY[bench.name] = bench
    return bench


def benchmarks(suite: str = "all", only: Optional[list] = None) -> list:
    """Registered benchmarks of ``suite`` ("kernels", "models" or "all"), optionally only names containing
    one of the ``only`` substrings, in registration order."""
    for module in MODULES:
        importlib.import_module(module)
    out = [b for b in _REGISTRY.values() if suite == "all" or b.suite == suite]
    if only:
        out = [b for b in out if any(s in b.name for s in only)]
    return out


def missing(module: str, *attrs: str) -> Optional[str]:
    """None when ``module`` imports and has every attribute in ``attrs``; else why not (for ``available``)."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # a module being written may fail in any way; report it, do not crash the run
        return f"{module} does not import ({type(e).__name__}: {e})"
    absent = [a for a in attrs if not hasattr(mod, a)]
    return f"{module}.{absent[0]} does not exist yet" if absent else None
