"""Swin window attention as torch custom ops: input checks, backend dispatch, autograd.

``dlcv_fast::window_attention_fwd`` returns the ``(B, H, W, C)`` output and the ``(B, H, W, heads)`` fp32
log-sum-exp the backward uses; ``dlcv_fast::window_attention_bwd`` returns ``(dqkv, dtable, dqkv_bias)``
(empty tensors for the gradients not asked for). Both have fake implementations for ``torch.compile``, and
``register_autograd`` connects them. The Triton kernels live in ``dlcv_fast.kernels.window_attention``; backend
"cuda" runs the forward and backward of ``csrc/window_attention.cu``; the "torch" backend runs
``window_attention_with_lse`` and ``window_attention_backward`` of ``dlcv_fast.reference``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dlcv_fast import backend as _backend
from dlcv_fast.ops import _eager

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------
# Input checks: every problem is a TypeError/ValueError that names the argument and what is allowed.
# ------------------------------------------------------------------------------------------------

def _int_pair(name, value, *, minimum):
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dims, got {value!r}")
    return tuple(pair)


def _dtype_names():
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def check_window_inputs(qkv, num_heads, window_size, shift_size, rel_pos_bias_table, qkv_bias, scale):
    """Validate the arguments of :func:`window_attention`; returns ``(window, shift)`` as pairs."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"qkv.dtype must be one of {_dtype_names()}, got {qkv.dtype}")
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be 4-D (B, H, W, 3*C) channels-last, got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1 and qkv.shape[-1] > 1:
        raise ValueError(f"qkv must have a unit stride in its last (channel) dim, got strides {qkv.stride()}; "
                         f"call .contiguous() first")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    C3 = qkv.shape[-1]
    if C3 == 0 or C3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv's channel count {C3} must be a positive multiple of 3 * num_heads = "
                         f"{3 * num_heads} (channels laid out as (3, num_heads, head_dim))")
    window = _int_pair("window_size", window_size, minimum=1)
    shift = _int_pair("shift_size", shift_size, minimum=0)
    if shift[0] >= window[0] or shift[1] >= window[1]:
        raise ValueError(f"shift_size {shift} must be smaller than window_size {window} in both dims "
                         f"(Swin uses 0 or window // 2)")
    table_rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    if rel_pos_bias_table is not None:
        t = rel_pos_bias_table
        if not isinstance(t, Tensor) or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"rel_pos_bias_table must be a tensor of dtype {_dtype_names()}, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (table_rows, num_heads):
            raise ValueError(f"rel_pos_bias_table must have shape ((2*Wh-1)*(2*Ww-1), num_heads) = "
                             f"{(table_rows, num_heads)} for window {window}, got {tuple(t.shape)}")
        if t.device != qkv.device:
            raise ValueError(f"rel_pos_bias_table is on {t.device} but qkv is on {qkv.device}")
    if qkv_bias is not None:
        b = qkv_bias
        if not isinstance(b, Tensor) or b.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"qkv_bias must be a tensor of dtype {_dtype_names()}, got "
                            f"{getattr(b, 'dtype', type(b).__name__)}")
        if tuple(b.shape) != (C3,):
            raise ValueError(f"qkv_bias must have shape (3*C,) = {(C3,)} (the qkv Linear's bias), got "
                             f"{tuple(b.shape)}")
        if b.device != qkv.device:
            raise ValueError(f"qkv_bias is on {b.device} but qkv is on {qkv.device}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return window, shift


# The scope of the CUDA kernels (csrc/window_attention.cu), forward and backward.
CUDA_MAX_TOKENS = 64
CUDA_MAX_HEAD_DIM = 64


def _cuda_problems(qkv, num_heads, window):
    """What of this call the CUDA kernels do not cover (an empty list: all of it)."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    problems = _backend.tensor_core_problems(qkv)
    if window[0] * window[1] > CUDA_MAX_TOKENS:
        problems.append(f"window {window} of {window[0] * window[1]} tokens (at most {CUDA_MAX_TOKENS})")
    if head_dim > CUDA_MAX_HEAD_DIM:
        problems.append(f"head dim {head_dim} (at most {CUDA_MAX_HEAD_DIM})")
    return problems


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

def _ref(qkv, table, qkv_bias, num_heads, window, shift, scale):
    from dlcv_fast import reference

    return reference.window_attention_with_lse(qkv, num_heads=num_heads, window_size=window, shift_size=shift,
                                               rel_pos_bias_table=table, qkv_bias=qkv_bias, scale=scale)


def _empty_outputs(qkv, num_heads):
    B, H, W, C3 = qkv.shape
    return (qkv.new_empty((B, H, W, C3 // 3)),
            qkv.new_empty((B, H, W, num_heads), dtype=torch.float32))


def _window_attention_fwd_impl(qkv: Tensor, table: Optional[Tensor], qkv_bias: Optional[Tensor], num_heads: int,
                               window_h: int, window_w: int, shift_h: int, shift_w: int, scale: float,
                               backend: str) -> tuple[Tensor, Tensor]:
    window, shift = (window_h, window_w), (shift_h, shift_w)
    if qkv.numel() == 0:
        return _empty_outputs(qkv, num_heads)
    name = _backend.resolve_in_scope(qkv.device, backend, "window_attention",
                                     lambda: _cuda_problems(qkv, num_heads, window))
    if name == "torch":
        out, lse = _ref(qkv, table, qkv_bias, num_heads, window, shift, scale)
        return out.contiguous(), lse.float().contiguous()
    if name == "cuda":
        return _backend.cuda_op("window_attention_fwd")(qkv, table, qkv_bias, num_heads, *window, *shift, scale)
    from dlcv_fast.kernels import window_attention as kernels

    return kernels.forward(qkv, table, qkv_bias, num_heads, window, shift, scale)


window_attention_fwd = torch.library.custom_op("dlcv_fast::window_attention_fwd", _window_attention_fwd_impl,
                                               mutates_args=())


@window_attention_fwd.register_fake
def _(qkv, table, qkv_bias, num_heads, window_h, window_w, shift_h, shift_w, scale, backend):
    return _empty_outputs(qkv, num_heads)


def _empty(like):
    return like.new_empty((0,))


def _window_attention_bwd_impl(dout: Tensor, qkv: Tensor, table: Optional[Tensor], qkv_bias: Optional[Tensor],
                               lse: Tensor, num_heads: int, window_h: int, window_w: int, shift_h: int,
                               shift_w: int, scale: float, table_grad: bool, bias_grad: bool,
                               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    window, shift = (window_h, window_w), (shift_h, shift_w)
    table_grad = table_grad and table is not None
    bias_grad = bias_grad and qkv_bias is not None
    if qkv.numel() == 0:
        return (torch.zeros_like(qkv, memory_format=torch.contiguous_format),
                torch.zeros_like(table) if table_grad else _empty(qkv),
                torch.zeros_like(qkv_bias) if bias_grad else _empty(qkv))
    name = _backend.resolve_in_scope(qkv.device, backend, "window_attention",
                                     lambda: _cuda_problems(qkv, num_heads, window))
    if name == "torch":
        from dlcv_fast import reference

        dqkv, dtable, dbias = reference.window_attention_backward(
            dout, qkv, num_heads=num_heads, window_size=window, shift_size=shift, rel_pos_bias_table=table,
            qkv_bias=qkv_bias, scale=scale)
    elif name == "cuda":
        from dlcv_fast.kernels import window_attention as kernels  # its finish_backward reduces the partial sums

        H, W, C = qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
        pad_bias_grad = bias_grad and (H % window[0] != 0 or W % window[1] != 0)
        dqkv, dtab, dbias = _backend.cuda_op("window_attention_bwd")(
            dout if dout.stride(-1) == 1 else dout.contiguous(), qkv, table, qkv_bias, lse, num_heads, *window,
            *shift, scale, table_grad, pad_bias_grad)
        dqkv, dtable, dbias = kernels.finish_backward(
            dqkv, dtab if table_grad else None, dbias if pad_bias_grad else None, table, qkv_bias, window, C,
            dict(device=qkv.device, dtype=torch.float32), table_grad, bias_grad, pad_bias_grad)
    else:
        from dlcv_fast.kernels import window_attention as kernels

        dqkv, dtable, dbias = kernels.backward(dout, qkv, table, qkv_bias, lse, num_heads, window, shift, scale,
                                               table_grad, bias_grad)
    return dqkv, dtable if table_grad else _empty(qkv), dbias if bias_grad else _empty(qkv)


window_attention_bwd = torch.library.custom_op("dlcv_fast::window_attention_bwd", _window_attention_bwd_impl,
                                               mutates_args=())


@window_attention_bwd.register_fake
def _fake_bwd_outputs(dout, qkv, table, qkv_bias, lse, num_heads, window_h, window_w, shift_h, shift_w, scale,
                      table_grad, bias_grad, backend):
    """Every output contiguous, as both backends return them (inductor asserts the strides)."""
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format),
            torch.empty_like(table, memory_format=torch.contiguous_format) if table_grad and table is not None
            else _empty(qkv),
            torch.empty_like(qkv_bias, memory_format=torch.contiguous_format) if bias_grad and qkv_bias is not None
            else _empty(qkv))


def _setup_context(ctx, inputs, output):
    qkv, table, qkv_bias, num_heads, window_h, window_w, shift_h, shift_w, scale, backend = inputs
    # Not the output: the kernels' backward does not read it (see kernels/window_attention.py).
    ctx.save_for_backward(qkv, table, qkv_bias, output[1])
    ctx.args = (num_heads, window_h, window_w, shift_h, shift_w, scale)
    ctx.backend = backend
    ctx.table_grad = table is not None and ctx.needs_input_grad[1]
    ctx.bias_grad = qkv_bias is not None and ctx.needs_input_grad[2]


def _grads(ctx, dout, bwd):
    """The gradients of window_attention_fwd's inputs, computed with ``bwd`` (the registered backward op, or its
    implementation on the eager route)."""
    qkv, table, qkv_bias, lse = ctx.saved_tensors
    dqkv, dtable, dbias = bwd(dout, qkv, table, qkv_bias, lse, *ctx.args, ctx.table_grad, ctx.bias_grad,
                              ctx.backend)
    return (dqkv, dtable if ctx.table_grad else None, dbias if ctx.bias_grad else None,
            None, None, None, None, None, None, None)


window_attention_fwd.register_autograd(lambda ctx, dout, dlse: _grads(ctx, dout, window_attention_bwd),
                                       setup_context=_setup_context)
_window_attention = _eager.routed(window_attention_fwd, _eager.autograd_function(
    "EagerWindowAttention", _window_attention_fwd_impl, _setup_context,
    lambda ctx, dout, dlse: _grads(ctx, dout, _window_attention_bwd_impl), non_differentiable=(1,)))


# ------------------------------------------------------------------------------------------------
# Public function (exported as dlcv_fast.window_attention)
# ------------------------------------------------------------------------------------------------

def window_attention(qkv, *, num_heads, window_size, shift_size=0, rel_pos_bias_table=None, qkv_bias=None,
                     scale=None, backend=None):
    """Swin (shifted-)window attention, from the qkv Linear's output to the proj Linear's input, fused.

    Equals timm's ``SwinTransformerBlock._attn`` between its qkv and proj Linears: cyclic shift by
    ``-shift_size``, padding up to a multiple of the window, window partition, attention with the relative
    position bias and (for shifted windows) the -100 region mask, merge, crop, reverse shift. All of it is
    index arithmetic in the kernel: no rolled, padded or partitioned copy, no bias or mask tensor.

    Args:
        qkv: ``(B, H, W, 3*C)`` channels-last, channels ordered ``(3, num_heads, head_dim)`` as timm's
            ``reshape(..., 3, num_heads, -1)``; fp16, bf16 or fp32; any strides with a unit channel stride.
            head_dim = C // num_heads, at most 64 for the Triton kernels (any, with backend="torch").
        num_heads: number of heads.
        window_size: int or ``(Wh, Ww)``. A window larger than the map is allowed and means what timm's
            ``always_partition=True`` means (the map is padded up to one window); timm's default of shrinking
            the window to the map is the module's job (:class:`dlcv_fast.nn.SwinTransformerBlock` does it as
            timm does).
        shift_size: int or ``(sh, sw)`` with ``0 <= shift < window`` per dim; 0 for W-MSA, window // 2 for SW-MSA.
        rel_pos_bias_table: ``((2*Wh-1)*(2*Ww-1), num_heads)`` (timm's ``relative_position_bias_table``),
            any supported float dtype, differentiable; None for no bias.
        qkv_bias: ``(3*C,)``, the qkv Linear's bias. timm pads x with zeros *before* that Linear, so padding
            tokens carry q/k/v equal to this bias and padding keys take part in the softmax; pass it to
            match timm exactly (None means zeros, right for a Linear without bias). Differentiable: it
            receives the gradient flowing into the padding tokens' k and v.
        scale: score scale, default ``head_dim ** -0.5``.
        backend: "auto" (default), "triton", "cuda" or "torch"; see :func:`dlcv_fast.use_backend`. "cuda" runs
            the kernels of csrc/window_attention.cu, forward and backward (fp16/bf16, windows of at most 64
            tokens, head dims up to 64, sm_80+; NotImplementedError otherwise).

    Returns ``(B, H, W, C)`` contiguous, in qkv's dtype. The backward gives dqkv, d(table) and d(qkv_bias)
    deterministically (bitwise equal across runs; no atomics).
    """
    window, shift = check_window_inputs(qkv, num_heads, window_size, shift_size, rel_pos_bias_table, qkv_bias,
                                        scale)
    if backend is not None:  # validate early, with a clear message
        _backend.resolve_in_scope(qkv.device, backend, "window_attention",
                                  lambda: _cuda_problems(qkv, num_heads, window))
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    return _window_attention(qkv, rel_pos_bias_table, qkv_bias, num_heads, *window, *shift, scale,
                             backend if backend is not None else _backend.get_backend())[0]
