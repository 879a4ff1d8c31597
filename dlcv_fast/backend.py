"""Backend selection: which implementation runs an op.

``"auto"`` (the default) runs the Triton kernels on CUDA tensors and the eager reference on CPU
tensors, except that with ``TRITON_INTERPRET=1`` CPU tensors also go through the Triton kernels
(run by Triton's interpreter; that is how the test suite exercises them without a GPU).
``"triton"`` forces the Triton kernels, ``"torch"`` forces the eager reference, and ``"cuda"``
asks for the hand-written CUDA kernels of ``csrc/`` (the extension ``dlcv_fast._C``): ops listed in
:data:`CUDA_OPS` run them, on CUDA tensors, where the extension was built, and raise for an input outside a
kernel's scope; ops with no CUDA kernel at all (layer_norm, linear_act) run as under "auto", so that a whole
model can run under ``use_backend("cuda")``. "auto" takes an op's CUDA kernel only where :data:`AUTO_CUDA` says
so (and the call is in the kernel's scope, else Triton); no entry is on until a GPU benchmark run times the CUDA
kernels against the Triton ones (benchmarks/, issue 3).
"""
from __future__ import annotations

import contextlib
import os

BACKENDS = ("auto", "triton", "cuda", "torch")
# Ops with a hand-written CUDA kernel (csrc/), and what of each it covers. Under backend "cuda" a call outside that
# raises NotImplementedError (resolve_in_scope); ops not listed here run as under "auto".
CUDA_OPS = {
    "attention": "forward and backward for fp16/bf16, head dims that are multiples of 8 up to 128, 16-byte aligned "
                 "layouts, sm_80 or later, with every mask and bias (csrc/attention.cu, attention_bwd.cu)",
    "rope": "every input apply_rope takes (csrc/rope.cu)",
    "window_attention": "forward and backward for fp16/bf16, windows of at most 64 tokens, head dims up to 64, "
                        "sm_80 or later (csrc/window_attention.cu)",
}


# The backend in force, process-wide (like torch.backends' flags). A module global on purpose: torch.compile
# guards on it, so a compiled model recompiles when the backend changes. A ContextVar cannot be traced by
# dynamo in torch 2.11 (a graph break on every op), and a thread-local attribute is read without a guard
# there (a compiled model would keep the backend it was traced with).
_current = "auto"


# Ops for which "auto" runs the CUDA kernel instead of the Triton one, on CUDA tensors, where dlcv_fast._C is built and
# the call is in the kernel's scope (otherwise Triton, silently: both are exact implementations of the op). All off
# until a GPU run times the CUDA kernels: flip an op's entry where its benchmark rows show "dlcv_fast.cuda" faster
# than "dlcv_fast" (the GPU check's `python -m benchmarks --quick` times both on the same inputs).
AUTO_CUDA = {"attention": False, "window_attention": False, "rope": False}


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend name in force ("auto" unless changed by :func:`use_backend`)."""
    return _current


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager choosing the backend for every dlcv_fast op called inside it.

    >>> with dlcv_fast.use_backend("torch"):
    ...     out = dlcv_fast.attention(q, k, v)
    """
    global _current
    previous, _current = _current, _check(name)
    try:
        yield
    finally:
        _current = previous


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_extension():
    """The compiled csrc/ extension module, or None when it was not built."""
    try:
        from dlcv_fast import _C  # noqa: F401
    except ImportError:
        return None
    return _C


def cuda_op(name: str):
    """The CUDA kernel ``torch.ops.dlcv_fast_cuda.<name>`` (importing dlcv_fast._C registers them). Callers
    have passed :func:`resolve` with backend "cuda" first, so the extension is there."""
    import torch

    cuda_extension()
    return getattr(torch.ops.dlcv_fast_cuda, name)


def tensor_core_problems(t) -> list:
    """What every CUDA kernel of csrc/ needs of a tensor and its GPU, as :func:`resolve_in_scope`'s problems: fp16
    or bf16 data, sm_80 or later (bf16 tensor cores)."""
    import torch

    problems = []
    if t.dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"dtype {t.dtype} (it takes float16 and bfloat16)")
    if t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 8:
        problems.append("a GPU before sm_80")
    return problems


def resolve_in_scope(device, backend: str | None, op: str, problems) -> str:
    """:func:`resolve`, then for "cuda" the kernel's scope: ``problems()`` lists what of the call the CUDA kernel
    does not cover. Asked for explicitly ("cuda"), a call outside the scope raises NotImplementedError naming it;
    reached through "auto" (:data:`AUTO_CUDA`), it runs the Triton kernels instead."""
    name = resolve(device, backend, op)
    if name != "cuda":
        return name
    found = problems()
    if not found:
        return "cuda"
    if (backend if backend is not None else _current) == "auto":
        return "triton"
    raise NotImplementedError(f"backend 'cuda': the CUDA {op.replace('_', ' ')} kernel does not cover "
                              + "; ".join(found) + ". Use backend 'triton' or 'auto'")


def resolve(device, backend: str | None = None, op: str | None = None) -> str:
    """Pick the concrete backend ("triton", "cuda" or "torch") for tensors on ``device``.

    ``backend`` (the per-call ``backend=`` keyword) overrides the context's choice. ``op`` names the op asking
    (a key of :data:`CUDA_OPS`), for backend "cuda".
    """
    name = _check(backend) if backend is not None else _current
    is_cuda = getattr(device, "type", device) == "cuda"
    if name == "auto":
        if is_cuda and AUTO_CUDA.get(op, False) and cuda_extension() is not None:
            return "cuda"
        return "triton" if (is_cuda or interpreting()) else "torch"
    if name == "triton" and not (is_cuda or interpreting()):
        raise RuntimeError(
            "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
            "through Triton's interpreter); use backend 'auto' or 'torch' for CPU tensors"
        )
    if name == "cuda":
        if not is_cuda:
            raise RuntimeError("backend 'cuda' needs CUDA tensors")
        if op is None:
            raise NotImplementedError(
                f"backend 'cuda': no hand-written CUDA kernel for this op; CUDA kernels exist for "
                f"{', '.join(sorted(CUDA_OPS))}. Use 'triton' or 'auto'"
            )
        if op not in CUDA_OPS:
            return resolve(device, "auto")  # no CUDA kernel for this op: its default implementation
        if cuda_extension() is None:
            raise RuntimeError(
                "backend 'cuda': dlcv_fast was installed without its CUDA extension (dlcv_fast._C); reinstall "
                "with nvcc and a CUDA build of torch present (DLCV_FAST_REQUIRE_CUDA=1 makes a failed build an "
                "error), or use 'triton' or 'auto'"
            )
    return name
