"""Rotary position embedding as torch custom ops: input checks, backend dispatch, autograd.

``dlcv_fast::rope(x, cos, sin, interleaved, conjugate, backend)`` returns the rotated copy of x and is
differentiable in x, cos and sin; ``dlcv_fast::rope_`` rotates x in place (no autograd: in-place RoPE is for
inference). ``conjugate`` rotates by the negated angle. Both have fake (meta) implementations so
``torch.compile`` traces through them. The backward in x is the same op with ``conjugate`` flipped (one
Triton kernel for both directions); the gradient of the tables, needed only for learnable frequencies
(RoPE-Mixed), is a short eager reduction over the dims the tables broadcast over.
The Triton kernel lives in ``dlcv_fast.kernels.rope``, the CUDA one (backend "cuda") in ``csrc/rope.cu``; the
"torch" backend runs ``dlcv_fast.reference``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dlcv_fast import backend as _backend
from dlcv_fast.ops import _eager

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------
# Input checks: every problem is a TypeError/ValueError that names the argument and what is allowed.
# ------------------------------------------------------------------------------------------------

def check_rope_inputs(x, cos, sin):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"x.dtype must be one of {names}, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, N, D), got shape {tuple(x.shape)}")
    B, H, N, D = x.shape
    if x.stride(-1) != 1 and D > 1:
        raise ValueError(f"x must have a unit stride in its last (head) dim, got strides {x.stride()}; "
                         f"call .contiguous() first")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name}.dtype must be float32 or x's dtype ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"cos and sin must have the same dtype, got {cos.dtype} and {sin.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() not in (2, 3, 4):
        raise ValueError(f"cos/sin must be (N, R), (B, N, R) or (B, H, N, R) (B and H may be 1), got shape "
                         f"{tuple(cos.shape)}")
    if cos.shape[-2] != N:
        raise ValueError(f"cos/sin have {cos.shape[-2]} positions (dim -2) but x has N={N}; they must be equal")
    R = cos.shape[-1]
    if R < 1 or 2 * R > D:
        raise ValueError(f"cos/sin hold R={R} angles per position, so the rotary dim is 2R={2 * R}; it must be "
                         f"between 2 and x's head dim D={D}")
    if cos.dim() >= 3 and cos.shape[0] not in (1, B):
        raise ValueError(f"cos/sin batch size {cos.shape[0]} must be 1 or x's batch size B={B}")
    if cos.dim() == 4 and cos.shape[1] not in (1, H):
        raise ValueError(f"cos/sin head count {cos.shape[1]} must be 1 or x's head count H={H}")


def _check_inplace(x, cos, sin):
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        raise RuntimeError("apply_rope(inplace=True) does not record autograd; use inplace=False when gradients "
                           "are needed, or run under torch.no_grad()")
    if any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape)):
        raise ValueError(f"x has overlapping elements (strides {x.stride()}, shape {tuple(x.shape)}); it cannot "
                         f"be rotated in place")


# ------------------------------------------------------------------------------------------------
# Implementations per backend
# ------------------------------------------------------------------------------------------------

def _rope_torch(x, cos, sin, interleaved, conjugate):
    """The reference, extended to per-head (B|1, H|1, N, R) tables by folding heads into the batch."""
    from dlcv_fast import reference

    if conjugate:
        sin = -sin
    if cos.dim() < 4:
        return reference.apply_rope(x, cos, sin, interleaved=interleaved)
    B, H, N, D = x.shape
    R = cos.shape[-1]
    cos, sin = (t.expand(B, H, N, R).reshape(B * H, N, R) for t in (cos, sin))
    out = reference.apply_rope(x.reshape(B * H, 1, N, D), cos, sin, interleaved=interleaved)
    return out.reshape(B, H, N, D)


def _launch(x, cos, sin, interleaved, conjugate, backend, out):
    """Rotate x into ``out`` (a fresh tensor, or x itself for in place) on the backend in force."""
    name = _backend.resolve(x.device, backend, "rope")
    if name == "torch":
        return out.copy_(_rope_torch(x, cos, sin, interleaved, conjugate))
    if name == "cuda":
        _backend.cuda_op("rope")(x, cos, sin, out, interleaved, -1.0 if conjugate else 1.0)
        return out
    from dlcv_fast.kernels import rope as kernels

    return kernels.apply(x, cos, sin, interleaved=interleaved, sin_sign=-1.0 if conjugate else 1.0, out=out)


def _rope_impl(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, conjugate: bool, backend: str) -> Tensor:
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    return _launch(x, cos, sin, interleaved, conjugate, backend, out)


rope = torch.library.custom_op("dlcv_fast::rope", _rope_impl, mutates_args=())


@rope.register_fake
def _(x, cos, sin, interleaved, conjugate, backend):
    return torch.empty_like(x)


@torch.library.custom_op("dlcv_fast::rope_", mutates_args=("x",))
def rope_(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, conjugate: bool, backend: str) -> None:
    if x.numel():
        _launch(x, cos, sin, interleaved, conjugate, backend, x)


@rope_.register_fake
def _(x, cos, sin, interleaved, conjugate, backend):
    return None


def _pairs(t: Tensor, R: int, interleaved: bool):
    """The two members ``(a, b)`` of each rotated pair of ``t`` (..., D), each (..., R)."""
    if interleaved:
        return t[..., 0:2 * R:2], t[..., 1:2 * R:2]
    return t[..., :R], t[..., R:2 * R]


def _sum_to(t: Tensor, shape) -> Tensor:
    """Sum a (B, H, N, R) gradient over the dims that a table of ``shape`` broadcasts over."""
    shape4 = {2: (1, 1, *shape), 3: (shape[0], 1, *shape[1:]), 4: tuple(shape)}[len(shape)]
    dims = tuple(i for i in range(4) if shape4[i] == 1 and t.shape[i] != 1)
    return (t.sum(dim=dims, keepdim=True) if dims else t).reshape(shape)


def table_grads(x: Tensor, grad: Tensor, cos: Tensor, interleaved: bool, conjugate: bool):
    """Gradients of ``rope`` w.r.t. cos and sin, shaped and typed like the tables.

    For a pair (a, b) rotated to (a c - b s, b c + a s): dL/dc = ga a + gb b and dL/ds = gb a - ga b,
    summed over the batch/head dims the table broadcasts over (fp32 accumulation).
    """
    R = cos.shape[-1]
    a, b = (t.float() for t in _pairs(x, R, interleaved))
    ga, gb = (t.float() for t in _pairs(grad, R, interleaved))
    dcos = ga * a + gb * b
    dsin = gb * a - ga * b
    if conjugate:
        dsin = -dsin
    return _sum_to(dcos, tuple(cos.shape)).to(cos.dtype), _sum_to(dsin, tuple(cos.shape)).to(cos.dtype)


def _setup_context(ctx, inputs, output):
    x, cos, sin, interleaved, conjugate, backend = inputs
    tables_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(x if tables_grad else None, cos, sin)
    ctx.interleaved, ctx.conjugate, ctx.backend = interleaved, conjugate, backend


def _grads(ctx, grad, rotate):
    """The gradients of rope's inputs; ``rotate`` is the registered op, or its implementation on the eager route."""
    x, cos, sin = ctx.saved_tensors
    dx = dcos = dsin = None
    if grad.stride(-1) != 1:  # e.g. the all-zero-stride gradient of out.sum()
        grad = grad.contiguous()
    if ctx.needs_input_grad[0]:
        dx = rotate(grad, cos, sin, ctx.interleaved, not ctx.conjugate, ctx.backend)
    if x is not None:
        dcos, dsin = table_grads(x, grad, cos, ctx.interleaved, ctx.conjugate)
    return dx, dcos, dsin, None, None, None


rope.register_autograd(lambda ctx, grad: _grads(ctx, grad, rope), setup_context=_setup_context)
# rotate(x, cos, sin, interleaved, conjugate, backend): the rope op on its fastest route, the eager one when
# plain eager autograd is all that watches, else the registered op (inputs already checked).
rotate = _eager.routed(rope, _eager.autograd_function("EagerRope", _rope_impl, _setup_context,
                                                      lambda ctx, grad: _grads(ctx, grad, _rope_impl)))


# ------------------------------------------------------------------------------------------------
# Python entry point (the public dlcv_fast.apply_rope calls this)
# ------------------------------------------------------------------------------------------------

def apply_rope(x, cos, sin, *, interleaved=False, inplace=False, backend=None):
    """Checked RoPE; see :func:`dlcv_fast.apply_rope`."""
    check_rope_inputs(x, cos, sin)
    if backend is not None:
        _backend.resolve(x.device, backend, "rope")  # validate early, with a clear message
    backend = backend if backend is not None else _backend.get_backend()
    if inplace:
        _check_inplace(x, cos, sin)
        rope_(x, cos, sin, bool(interleaved), False, backend)
        return x
    return rotate(x, cos, sin, bool(interleaved), False, backend)
