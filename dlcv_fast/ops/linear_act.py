"""``act(x @ weight.T + bias)`` as a torch custom op: input checks, backend dispatch, autograd.

``dlcv_fast::linear_act(x, weight, bias, act, backend)``: the Linear and its activation in one Triton GEMM
(``dlcv_fast.kernels.linear_act``), with a fake implementation for ``torch.compile``. Made for inference:
the forward keeps no pre-activation, so the backward recomputes it with one more GEMM and then takes the
activation's derivative in eager PyTorch (correct, but slower than eager's Linear + activation, which is
what :class:`dlcv_fast.nn.Mlp` runs when autograd records). The "torch" backend runs ``dlcv_fast.reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlcv_fast import backend as _backend
from dlcv_fast.ops import _eager

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = ("none", "gelu", "quick_gelu")


def check_linear_act_inputs(x, weight, bias, act):
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
            raise TypeError(f"{name}.dtype must be one of {names}, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}.dtype {t.dtype} differs from x's {x.dtype}; they must be equal")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (the input features)")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (out_features, in_features) with in_features = x's last dim "
                         f"{x.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _fake(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_act_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, backend: str) -> Tensor:
    if x.numel() == 0 or weight.shape[0] == 0:
        return _fake(x, weight)
    if x.shape[-1] == 0 or _backend.resolve(x.device, backend, "linear_act") == "torch":
        from dlcv_fast import reference

        return reference.linear_act(x, weight, bias, act).contiguous()
    from dlcv_fast.kernels import linear_act as kernels

    return kernels.forward(x, weight, bias, act)


linear_act_op = torch.library.custom_op("dlcv_fast::linear_act", _linear_act_impl, mutates_args=())


@linear_act_op.register_fake
def _(x, weight, bias, act, backend):
    return _fake(x, weight)


def _act_grad(dy, h, act):
    """d act(h) / dh times dy, in fp32."""
    h, dy = h.float(), dy.float()
    if act == "gelu":
        return torch.ops.aten.gelu_backward(dy, h)
    if act == "quick_gelu":
        s = torch.sigmoid(1.702 * h)
        return dy * (s + 1.702 * h * s * (1 - s))
    return dy


def _setup_context(ctx, inputs, output):
    x, weight, bias, act, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.act = act


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    h = torch.nn.functional.linear(x, weight, bias)  # the pre-activation, recomputed
    dh = _act_grad(dy, h, ctx.act).to(x.dtype)
    dx = dh @ weight if ctx.needs_input_grad[0] else None
    dh2 = dh.reshape(-1, dh.shape[-1])
    dw = dh2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    db = dh2.float().sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return dx, dw, db, None, None


linear_act_op.register_autograd(_backward, setup_context=_setup_context)
_linear_act = _eager.routed(linear_act_op, _eager.autograd_function("EagerLinearAct", _linear_act_impl,
                                                                   _setup_context, _backward))


def linear_act(x, weight, bias=None, act="gelu", *, backend=None):
    """``act(x @ weight.T + bias)`` with the activation in the GEMM's epilogue (one write of the output instead
    of three passes). x ``(..., in_features)``, weight ``(out_features, in_features)``, bias ``(out_features,)``
    or None, all of one dtype (fp16, bf16; fp32 runs IEEE fp32 dots unless TF32 is allowed); act "gelu" (exact,
    erf), "quick_gelu" or "none". Returns ``(..., out_features)`` contiguous in x's dtype. Differentiable, but
    made for inference: the backward recomputes the pre-activation (one more GEMM)."""
    check_linear_act_inputs(x, weight, bias, act)
    if backend is not None:
        _backend.resolve(x.device, backend, "linear_act")  # validate early, with a clear message
    return _linear_act(x, weight, bias, act, backend if backend is not None else _backend.get_backend())
