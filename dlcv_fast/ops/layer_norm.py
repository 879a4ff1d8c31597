"""LayerNorm with a fused residual add, as torch custom ops: input checks, backend dispatch, autograd.

``dlcv_fast::layer_norm_fwd(x, residual, weight, bias, eps, backend)`` returns ``(y, s, mean, rstd)``: ``s = x +
residual`` (an empty tensor without a residual), ``y = LayerNorm(s)`` over the last dim, and the fp32 row
statistics the backward reads. ``dlcv_fast::layer_norm_bwd`` is its backward; ``register_autograd`` connects
them, and both have fake implementations so ``torch.compile`` traces through them. The Triton kernels live in
``dlcv_fast.kernels.layer_norm``; the "torch" backend runs ``dlcv_fast.reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlcv_fast import backend as _backend
from dlcv_fast.ops import _eager

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 8192  # kernels.layer_norm.MAX_N (the fast path must not import the kernels to check it)


def _dtype_names():
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def check_layer_norm_inputs(x, weight, bias, eps, residual, backend):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x.dtype must be one of {_dtype_names()}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last (normalised) dim of at least 1 element, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"residual.dtype must be one of {_dtype_names()}, got {residual.dtype}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype must be one of {_dtype_names()}, got {t.dtype}")
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) (x's last dim), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if N > MAX_N and _backend.resolve(x.device, backend, "layer_norm") == "triton":
        raise ValueError(f"x's last dim is {N}; the Triton LayerNorm normalises rows of at most {MAX_N} "
                         f"elements (use backend='torch')")


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

def _sum_dtype(x, residual):
    return torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype


def _empty(like):
    return like.new_empty((0,))


def _fake_fwd(x, residual):
    dtype = _sum_dtype(x, residual)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32).reshape(-1)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape, dtype=dtype) if residual is not None
            else _empty(x), stats, torch.empty_like(stats))


def _layer_norm_fwd_impl(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if x.numel() == 0:
        return _fake_fwd(x, residual)
    if _backend.resolve(x.device, backend, "layer_norm") == "torch":
        from dlcv_fast import reference

        out = reference.layer_norm(x, weight, bias, eps, residual=residual)
        y, s = out if residual is not None else (out, None)
        var, mean = torch.var_mean((x if s is None else s).float().reshape(-1, x.shape[-1]), dim=-1,
                                   unbiased=False)
        return (y.contiguous(), s.contiguous() if s is not None else _empty(x), mean,
                torch.rsqrt(var + eps))
    from dlcv_fast.kernels import layer_norm as kernels

    y, s, mean, rstd = kernels.forward(x, residual, weight, bias, eps)
    return y, s if s is not None else _empty(x), mean, rstd


layer_norm_fwd = torch.library.custom_op("dlcv_fast::layer_norm_fwd", _layer_norm_fwd_impl, mutates_args=())


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, backend):
    return _fake_fwd(x, residual)


def _layer_norm_bwd_impl(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Optional[Tensor], mean: Tensor,
                         rstd: Tensor, eps: float, weight_grad: bool, bias_grad: bool,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``: dx in s's dtype; dweight / dbias fp32 ``(N,)``, empty when not asked for."""
    if s.numel() == 0:
        zeros = s.new_zeros((s.shape[-1],), dtype=torch.float32)
        return (torch.zeros_like(s, memory_format=torch.contiguous_format), zeros if weight_grad else _empty(s),
                zeros.clone() if bias_grad else _empty(s))
    if _backend.resolve(s.device, backend, "layer_norm") == "torch":
        from dlcv_fast import reference

        dx, dw, db = reference.layer_norm_backward(dy, s, weight, eps, ds=ds)
        dx = dx.contiguous()
    else:
        from dlcv_fast.kernels import layer_norm as kernels

        dx, dw, db = kernels.backward(dy, ds, s, weight, mean, rstd, weight_grad, bias_grad)
    return dx, dw if weight_grad else _empty(s), db if bias_grad else _empty(s)


layer_norm_bwd = torch.library.custom_op("dlcv_fast::layer_norm_bwd", _layer_norm_bwd_impl, mutates_args=())


@layer_norm_bwd.register_fake
def _(dy, ds, s, weight, mean, rstd, eps, weight_grad, bias_grad, backend):
    vec = s.new_empty((s.shape[-1],), dtype=torch.float32)
    return (torch.empty_like(s, memory_format=torch.contiguous_format), vec if weight_grad else _empty(s),
            torch.empty_like(vec) if bias_grad else _empty(s))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, backend = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.eps, ctx.backend = eps, backend
    ctx.has_residual = residual is not None
    ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None,
                  weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
    ctx.weight_grad = weight is not None and ctx.needs_input_grad[2]
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]


def _grads(ctx, dy, ds, bwd):
    """The gradients of layer_norm_fwd's inputs, computed with ``bwd`` (the registered backward op, or its
    implementation on the eager route). ``ds`` reaches the sum output; x and the residual both get dx."""
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    ds = ds if ctx.has_residual else None
    dx, dw, db = bwd(dy, ds, s, weight, mean, rstd, ctx.eps, ctx.weight_grad, ctx.bias_grad, ctx.backend)
    x_dtype, r_dtype, w_dtype, b_dtype = ctx.dtypes
    return (dx.to(x_dtype) if ctx.needs_input_grad[0] else None,
            dx.to(r_dtype) if ctx.has_residual and ctx.needs_input_grad[1] else None,
            dw.to(w_dtype) if ctx.weight_grad else None, db.to(b_dtype) if ctx.bias_grad else None, None, None)


layer_norm_fwd.register_autograd(lambda ctx, dy, ds, dmean, drstd: _grads(ctx, dy, ds, layer_norm_bwd),
                                 setup_context=_setup_context)
_layer_norm = _eager.routed(layer_norm_fwd, _eager.autograd_function(
    "EagerLayerNorm", _layer_norm_fwd_impl, _setup_context,
    lambda ctx, dy, ds, dmean, drstd: _grads(ctx, dy, ds, _layer_norm_bwd_impl), non_differentiable=(2, 3)))


# ------------------------------------------------------------------------------------------------
# Python entry point (the public dlcv_fast.layer_norm calls this)
# ------------------------------------------------------------------------------------------------

def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None):
    """Checked LayerNorm with an optional fused residual add; see :func:`dlcv_fast.layer_norm`."""
    check_layer_norm_inputs(x, weight, bias, eps, residual, backend)
    backend = backend if backend is not None else _backend.get_backend()
    y, s, _, _ = _layer_norm(x, residual, weight, bias, float(eps), backend)
    return (y, s) if residual is not None else y


def layer_norm_unchecked(x, residual, weight, bias, eps):
    """:func:`layer_norm` on the backend in force without the input checks, for callers that made them
    (:class:`dlcv_fast.nn.LayerNorm`: its parameters match x's last dim, the residual x's shape, dtype, device)."""
    y, s, _, _ = _layer_norm(x, residual, weight, bias, float(eps), _backend.get_backend())
    return (y, s) if residual is not None else y
