"""Dense attention as torch custom ops: input checks, backend dispatch, autograd.

``dlcv_fast::attention_fwd`` returns ``(out, lse)``; ``dlcv_fast::attention_bwd`` returns
``(dq, dk, dv, ds)``. Both have fake (meta) implementations, so ``torch.compile`` traces through them
without graph breaks, and ``register_autograd`` connects them. The Triton kernels live in
``dlcv_fast.kernels.attention``; backend "cuda" runs ``csrc/attention.cu`` (forward) and
``csrc/attention_bwd.cu`` (backward); the "torch" backend runs ``dlcv_fast.reference``.
"""
from __future__ import annotations

import math

from typing import Optional

import torch
from torch import Tensor

from dlcv_fast import backend as _backend
from dlcv_fast.ops import _eager

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------------
# Input checks: every problem is a TypeError/ValueError that names the argument and what is allowed.
# ------------------------------------------------------------------------------------------------

def _dtype_names():
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def check_attention_inputs(q, k, v, *, key_padding_mask=None, attn_bias=None, prefix_len=None, scale=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype must be one of {_dtype_names()}, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D ({'B, Hq, Lq, D' if name == 'q' else 'B, Hkv, Lk, D'}), "
                             f"got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype ({t.dtype}) must equal q.dtype ({q.dtype}); mixed dtypes are not allowed")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Hkv, Lk, D), got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k/v batch size {k.shape[0]} must equal q's batch size {B}")
    if k.shape[3] != D:
        raise ValueError(f"k/v head dim {k.shape[3]} must equal q's head dim {D}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is not supported: allowed 1 <= D <= {MAX_HEAD_DIM}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count Hq={Hq} must be a multiple of k/v's head count Hkv={Hkv} (MHA, GQA, MQA)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a unit stride in its last (head) dim, got strides {t.stride()}; "
                             f"call .contiguous() first")
    Lk = k.shape[2]
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = key takes part), got "
                            f"{getattr(m, 'dtype', type(m).__name__)}")
        if tuple(m.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = {(B, Lk)}, got {tuple(m.shape)}")
        if m.device != q.device:
            raise ValueError(f"key_padding_mask is on {m.device} but q is on {q.device}")
    if attn_bias is not None:
        b = attn_bias
        if not isinstance(b, Tensor) or not b.dtype.is_floating_point:
            raise TypeError(f"attn_bias must be a floating-point tensor (additive bias), got "
                            f"{getattr(b, 'dtype', type(b).__name__)}")
        try:
            ok = b.dim() <= 4 and torch.broadcast_shapes(tuple(b.shape), (B, Hq, Lq, Lk)) == (B, Hq, Lq, Lk)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_bias of shape {tuple(b.shape)} does not broadcast to (B, Hq, Lq, Lk) = "
                             f"{(B, Hq, Lq, Lk)}")
        if b.device != q.device:
            raise ValueError(f"attn_bias is on {b.device} but q is on {q.device}")
    if prefix_len is not None and (isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0):
        raise ValueError(f"prefix_len must be a non-negative int or None, got {prefix_len!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")


# The scope of the CUDA kernels (csrc/attention.cu, csrc/attention_bwd.cu).
CUDA_MAX_HEAD_DIM = 128
CUDA_BWD_SMEM_D128 = (2 * 64 + 4 * 64) * 136 * 2  # the dQ kernel's shared memory at padded head dim 128 (bytes)


def _smem_optin(device):
    """Shared memory a block may opt into (bytes); unknown (no such property): no limit here, the kernel's launch
    checks it."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 1 << 30)


def _cuda_problems(q, k, v):
    """What of this call the CUDA kernels do not cover (an empty list: all of it)."""
    D = q.shape[-1]
    problems = _backend.tensor_core_problems(q)
    if D % 8 or D > CUDA_MAX_HEAD_DIM:
        problems.append(f"head dim {D} (multiples of 8 up to {CUDA_MAX_HEAD_DIM})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:3]):
            problems.append(f"{name}'s layout (16-byte aligned data and strides that are multiples of 8 elements; "
                            f"got strides {t.stride()})")
    if q.shape[0] * q.shape[1] > 65535:
        problems.append(f"B * Hq = {q.shape[0] * q.shape[1]} (at most 65535)")
    smem = _smem_optin(q.device) if q.is_cuda and D > 96 else None
    if smem is not None and smem < CUDA_BWD_SMEM_D128:
        problems.append(f"head dim {D} on a GPU with {smem} bytes of shared memory per block (the backward's dQ "
                        f"kernel needs {CUDA_BWD_SMEM_D128} above head dim 96: sm_80 / sm_90 class)")
    return problems


# ------------------------------------------------------------------------------------------------
# Implementations per backend
# ------------------------------------------------------------------------------------------------

def _like_kernel(t):
    """An uninitialised tensor of t's (B, H, L, D) shape in the layout every backend and the fake return:
    a (B, L, H, D) buffer viewed as (B, H, L, D), so merging heads afterwards is free."""
    B, H, L, D = t.shape
    return torch.empty((B, L, H, D), dtype=t.dtype, device=t.device).transpose(1, 2)


def _ref_kwargs(attn_bias, key_padding_mask, causal, prefix_len, scale):
    return dict(attn_bias=attn_bias, key_padding_mask=key_padding_mask, scale=scale,
                causal=causal, prefix_len=prefix_len if (causal and prefix_len > 0) else None)


def _fwd_torch(q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale, rope):
    from dlcv_fast import reference

    out, lse = reference.attention_with_lse(q, k, v, rope=rope, **_ref_kwargs(attn_bias, key_padding_mask, causal,
                                                                               prefix_len, scale))
    return _like_kernel(q).copy_(out), lse.contiguous()


def _bwd_torch(do, q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale, bias_grad):
    from dlcv_fast import reference

    grads = reference.attention_backward(do, q, k, v, **_ref_kwargs(attn_bias, key_padding_mask, causal,
                                                                     prefix_len, scale))
    dq, dk, dv = (_like_kernel(t).copy_(g) for t, g in zip((q, k, v), grads[:3]))
    return dq, dk, dv, grads[3].float() if bias_grad else None


def _empty_ds(q):
    return q.new_empty((0,), dtype=torch.float32)


def _attention_fwd_impl(q: Tensor, k: Tensor, v: Tensor, attn_bias: Optional[Tensor],
                        key_padding_mask: Optional[Tensor], causal: bool, prefix_len: int, scale: float,
                        cos: Optional[Tensor], sin: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if B * H * Lq == 0 or Lk == 0:
        # Nothing to attend to: every row is fully masked, so out = 0 and lse = -inf (documented).
        return _like_kernel(q).zero_(), torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    name = _backend.resolve_in_scope(q.device, backend, "attention", lambda: _cuda_problems(q, k, v))
    rope = None if cos is None else (cos, sin)
    if name == "torch":
        return _fwd_torch(q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale, rope)
    if name == "cuda":  # rope: q and k rotated inside the kernel, as their tiles reach shared memory
        return _backend.cuda_op("attention_fwd")(q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale,
                                                 cos, sin)
    from dlcv_fast.kernels import attention as kernels

    return kernels.forward(q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale, rope=rope)


attention_fwd = torch.library.custom_op("dlcv_fast::attention_fwd", _attention_fwd_impl, mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale, cos, sin, backend):
    return _like_kernel(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_bwd_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                        attn_bias: Optional[Tensor], key_padding_mask: Optional[Tensor], causal: bool, prefix_len: int,
                        scale: float, bias_grad: bool, cos: Optional[Tensor], sin: Optional[Tensor],
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients (dq, dk, dv, dS or an empty tensor). With RoPE tables (``cos``, ``sin``: the forward's fused
    rope), q and k are the unrotated inputs and dq, dk the gradients w.r.t. them: the CUDA kernels rotate inside;
    the other routes rotate q and k first (one pass each) and the gradients back by the inverse rotation."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if B * H * Lq == 0 or Lk == 0:
        ds = q.new_zeros((B, H, Lq, Lk), dtype=torch.float32) if bias_grad else _empty_ds(q)
        return _like_kernel(q).zero_(), _like_kernel(k).zero_(), _like_kernel(v).zero_(), ds
    name = _backend.resolve_in_scope(q.device, backend, "attention", lambda: _cuda_problems(q, k, v))
    if cos is not None and name != "cuda":
        from dlcv_fast.ops.rope import _rope_impl  # the plain kernels: this runs inside the backward op

        q, k = (_rope_impl(t, cos, sin, False, False, name) for t in (q, k))
        dq, dk, dv, ds = _attention_bwd_impl(do, q, k, v, o, lse, attn_bias, key_padding_mask, causal, prefix_len,
                                             scale, bias_grad, None, None, name)
        dq, dk = (_rope_impl(t, cos, sin, False, True, name) for t in (dq, dk))
        return dq, dk, dv, ds
    if name == "torch":
        dq, dk, dv, ds = _bwd_torch(do, q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale, bias_grad)
    elif name == "cuda":
        dq, dk, dv, ds = _backend.cuda_op("attention_bwd")(do, q, k, v, o, lse, attn_bias, key_padding_mask, causal,
                                                            prefix_len, scale, bias_grad, cos, sin)
    else:
        from dlcv_fast.kernels import attention as kernels

        dq, dk, dv, ds = kernels.backward(do, q, k, v, o, lse, attn_bias, key_padding_mask, causal, prefix_len,
                                          scale, bias_grad)
    return dq, dk, dv, ds if ds is not None else _empty_ds(q)


attention_bwd = torch.library.custom_op("dlcv_fast::attention_bwd", _attention_bwd_impl, mutates_args=())


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, attn_bias, key_padding_mask, causal, prefix_len, scale, bias_grad, cos, sin, backend):
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    ds = q.new_empty((B, H, Lq, Lk), dtype=torch.float32) if bias_grad else _empty_ds(q)
    return _like_kernel(q), _like_kernel(k), _like_kernel(v), ds


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, key_padding_mask, causal, prefix_len, scale, cos, sin, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, attn_bias, key_padding_mask, cos, sin)
    ctx.causal, ctx.prefix_len, ctx.scale, ctx.backend = causal, prefix_len, scale, backend
    ctx.bias_shape = None if attn_bias is None else tuple(attn_bias.shape)
    # A bias constant along the keys (last dim 1, or a scalar) shifts every score of a row alike, which softmax
    # ignores: its gradient is exactly zero. The kernel's sum of dS over the keys would give rounding noise
    # instead (dS uses delta = rowsum(dO * O) with O rounded to the input dtype), so it is not computed.
    ctx.bias_zero_grad = attn_bias is not None and ctx.needs_input_grad[3] and (attn_bias.dim() == 0
                                                                               or attn_bias.shape[-1] == 1)
    ctx.bias_grad = attn_bias is not None and ctx.needs_input_grad[3] and not ctx.bias_zero_grad


def reduce_to_shape(grad: Tensor, shape: tuple) -> Tensor:
    """Sum a (B, H, Lq, Lk) gradient over the dims that ``shape`` broadcast, giving a tensor of ``shape``."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if dims:
        grad = grad.sum(dim=dims, keepdim=True)
    return grad


def _grads(ctx, do, bwd):
    """The gradients of attention_fwd's inputs, computed with ``bwd`` (the registered backward op, or its
    implementation on the eager route)."""
    q, k, v, o, lse, attn_bias, key_padding_mask, cos, sin = ctx.saved_tensors
    dq, dk, dv, ds = bwd(do, q, k, v, o, lse, attn_bias, key_padding_mask, ctx.causal, ctx.prefix_len, ctx.scale,
                         ctx.bias_grad, cos, sin, ctx.backend)  # fused RoPE: gradients w.r.t. the unrotated q, k
    dbias = reduce_to_shape(ds, ctx.bias_shape).to(attn_bias.dtype) if ctx.bias_grad else None
    if ctx.bias_zero_grad:
        dbias = torch.zeros_like(attn_bias)
    return dq, dk, dv, dbias, None, None, None, None, None, None, None


attention_fwd.register_autograd(lambda ctx, do, dlse: _grads(ctx, do, attention_bwd), setup_context=_setup_context)
_attention = _eager.routed(attention_fwd, _eager.autograd_function(
    "EagerAttention", _attention_fwd_impl, _setup_context, lambda ctx, do, dlse: _grads(ctx, do, _attention_bwd_impl),
    non_differentiable=(1,)))


# ------------------------------------------------------------------------------------------------
# Python entry points (the public functions in dlcv_fast/__init__.py call these)
# ------------------------------------------------------------------------------------------------

def fusable_rope(q, k, rope) -> bool:
    """Whether ``rope=(cos, sin)`` can be handled inside the attention op (the Triton route: rotation passes
    before its kernels, forward and backward; the CUDA route: rotation inside its kernels): tables shared by
    all heads ((N, R) or (B, N, R)), constant (no learnable frequencies), and Lq = Lk = N. Otherwise the caller
    rotates q and k with the standalone RoPE op first."""
    cos, sin = rope
    return (cos.dim() in (2, 3) and not (cos.requires_grad or sin.requires_grad)
            and q.shape[2] == k.shape[2] == cos.shape[-2])


def _autocast(*tensors):
    """torch SDPA's autocast rule (it is a lower-precision op): floating tensors cast to the autocast dtype."""
    device = getattr(tensors[0], "device", None)
    if device is None or device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def attention_with_lse(q, k, v, *, causal=False, key_padding_mask=None, attn_bias=None, prefix_len=None,
                       scale=None, rope=None, backend=None):
    """Checked attention returning ``(out, lse)``; see :func:`dlcv_fast.attention`.

    ``rope`` here must be fusable (see :func:`fusable_rope`) and already checked (dlcv_fast.attention does both).
    Under autocast for the tensors' device, q, k and v run in the autocast dtype, as torch's SDPA does (a qk norm
    in float32 under CUDA autocast otherwise leaves q and k float32 and v bfloat16)."""
    q, k, v = _autocast(q, k, v)
    check_attention_inputs(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias, prefix_len=prefix_len,
                           scale=scale)
    if backend is not None and not torch.compiler.is_compiling():  # dynamo cannot read data pointers; the op checks
        _backend.resolve_in_scope(q.device, backend, "attention", lambda: _cuda_problems(q, k, v))  # fail early
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if scale <= 0:
        # The kernels take the row max of the unscaled scores and fold a positive scale into the exponent; a zero
        # or negative scale (uniform or reversed attention) is applied to q instead.
        q, scale = q * scale, 1.0
    masked = bool(causal) or prefix_len is not None
    cos, sin = rope if rope is not None else (None, None)
    return _attention(q, k, v, attn_bias, key_padding_mask, masked, int(prefix_len or 0), scale, cos, sin,
                      backend if backend is not None else _backend.get_backend())


def sdpa(query, key, value, *, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch SDPA semantics on top of :func:`attention_with_lse` (see dlcv_fast.scaled_dot_product_attention)."""
    if dropout_p:
        raise NotImplementedError(f"dropout_p={dropout_p}: dlcv_fast's kernels have no dropout yet; use "
                                  f"dropout_p=0.0 (e.g. in eval mode) or torch's SDPA")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be 3-D (N, L, E) or 4-D (N, H, L, E), got shape {tuple(t.shape)}")
    if not query.dim() == key.dim() == value.dim():
        raise ValueError("query, key and value must have the same number of dims")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"value head dim {value.shape[-1]} differs from query's {query.shape[-1]}; "
                                  f"dlcv_fast needs equal head dims")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query[:, None], key[:, None], value[:, None]
        if isinstance(attn_mask, Tensor):  # (N, L, S) broadcasting, as torch: a head dim goes in after N
            while attn_mask.dim() > 3 and attn_mask.shape[0] == 1:  # leading size-1 dims broadcast away
                attn_mask = attn_mask[0]
            if attn_mask.dim() > 3:
                raise ValueError(f"attn_mask for 3-D query/key/value must broadcast to (N, L, S), got shape "
                                 f"{tuple(attn_mask.shape)}")
            attn_mask = attn_mask.reshape((1,) * (3 - attn_mask.dim()) + tuple(attn_mask.shape)).unsqueeze(1)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads but key/value have {key.shape[1]}; pass "
                         f"enable_gqa=True for grouped-query attention")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch SDPA)")
    bias = kpm = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        B, H, L = query.shape[:3]
        S = key.shape[2]
        shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask must broadcast to (N, H, L, S) = {(B, H, L, S)}, got {tuple(attn_mask.shape)}")
        if attn_mask.dtype == torch.bool:
            if shape[1] == 1 and shape[2] == 1 and shape[3] == S:
                # A per-key mask: handled by the kernel's key-padding path, nothing materialised.
                kpm = attn_mask.reshape(shape[0], S).expand(B, S)
            else:
                bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device).masked_fill_(
                    ~attn_mask, float("-inf"))
        elif attn_mask.dtype.is_floating_point:
            bias = attn_mask
        else:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
    out = attention_with_lse(query, key, value, causal=is_causal, key_padding_mask=kpm, attn_bias=bias,
                             scale=scale)[0]
    return out[:, 0] if squeeze else out
