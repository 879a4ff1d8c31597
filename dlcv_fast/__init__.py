"""dlcv_fast: fast attention kernels for vision transformers and vision-language models.

Public functions (shapes in each docstring): :func:`attention`, :func:`scaled_dot_product_attention`,
:func:`apply_rope`, :func:`rope_2d`, :func:`window_attention`, :func:`layer_norm`, and the backend controls :func:`use_backend` / :func:`get_backend`.
"""
from __future__ import annotations

import torch

from dlcv_fast.backend import get_backend, use_backend
from dlcv_fast.ops import attention as _attn_ops
from dlcv_fast.ops import layer_norm as _ln_ops
from dlcv_fast.ops import rope as _rope_ops
from dlcv_fast.rope_tables import rope_2d
from dlcv_fast.ops.window_attention import window_attention

__version__ = "0.1.0"


def attention(q, k, v, *, causal=False, key_padding_mask=None, attn_bias=None, prefix_len=None, scale=None,
              rope=None, backend=None):
    """Flash attention with masks computed in the kernel.

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hkv, Lk, D)`` with ``Hq % Hkv == 0`` (MHA, GQA, MQA). fp16, bf16
            or fp32, one device, any strides with a unit last-dim stride (``qkv.permute(2, 0, 3, 1, 4)``
            views of a fused qkv Linear need no copy). 1 <= D <= 256.
        causal: SDPA's ``is_causal``: query i sees keys j <= i (top-left aligned when Lq != Lk).
        key_padding_mask: ``(B, Lk)`` bool, True = the key takes part.
        attn_bias: additive float bias broadcastable to ``(B, Hq, Lq, Lk)`` (broadcast dims are read with
            zero strides, never expanded); differentiable.
        prefix_len: P, the prefix-LM mask (BLIP-2 text generation): queries i < P see keys j < P, later
            queries see keys j <= i. Implies the causal mask past the prefix.
        scale: score scale, default ``D ** -0.5``.
        rope: ``(cos, sin)`` rotary tables applied to q and k before the scores, half-split pairs (see
            :func:`apply_rope`). Tables shared by all heads, ``(N, R)`` or ``(B, N, R)`` with Lq = Lk = N, are
            handled inside the attention op: one RoPE pass over q and one over k, then the attention kernel
            (on an H200 faster than rotating q in the kernel's prologue), and the backward recomputes the
            rotation instead of keeping rotated copies; per-head ``(B, H, N, R)`` or learnable tables go
            through the differentiable standalone op first.
        backend: "auto" (default), "triton", "cuda" or "torch"; see :func:`use_backend`.

    Returns ``(B, Hq, Lq, D)`` in q's dtype (a view of a ``(B, Lq, Hq, D)`` buffer, so
    ``out.transpose(1, 2).reshape(B, Lq, Hq * D)`` needs no copy). A fully masked query row (or Lk = 0)
    gives zeros and zero gradients, never NaN; a key scored below float32's lowest / log2(e) with its bias (a
    ``finfo(float32).min`` mask) counts as masked. NaN in the inputs propagates as in torch. Under autocast
    q, k and v run in the autocast dtype, as with torch's SDPA.
    fp32 inputs use IEEE fp32 dot products unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
    """
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise TypeError(f"rope must be a pair (cos, sin) of tables, got {type(rope).__name__}")
        for x in (q, k):
            if isinstance(x, torch.Tensor):
                _rope_ops.check_rope_inputs(x, *rope)
        if not _attn_ops.fusable_rope(q, k, rope):
            # Per-head or learnable tables: rotate q and k with the standalone kernel, then attend.
            q, k = (_rope_ops.apply_rope(x, *rope, backend=backend) for x in (q, k))
            rope = None
    return _attn_ops.attention_with_lse(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                        attn_bias=attn_bias, prefix_len=prefix_len, scale=scale, rope=rope,
                                        backend=backend)[0]


def apply_rope(x, cos, sin, *, interleaved=False, inplace=False, backend=None):
    """Rotary position embedding of the first ``2R`` channels of each head (R = ``cos.shape[-1]``).

    Args:
        x: ``(B, H, N, D)``, fp16, bf16 or fp32, any strides with a unit last-dim stride (the q/k views of a
            fused qkv Linear need no copy).
        cos, sin: one angle per rotated channel pair and position: ``(N, R)``, ``(B, N, R)``, or
            ``(B, H, N, R)`` with B and/or H allowed to be 1 (per-head tables, e.g. RoPE-Mixed from
            :func:`rope_2d`). float32 or x's dtype, the same for both; ``2R <= D``. Channels ``2R..D`` pass
            through unchanged (partial rotary).
        interleaved: pair channels ``(2c, 2c + 1)`` ("GPT-J", RoPE-ViT, EVA-02) instead of ``(c, c + R)``
            (half-split, "NeoX", the default).
        inplace: rotate x in place and return it (no copy; inference only: raises when autograd would have
            to record it, or when x has overlapping elements).
        backend: "auto" (default), "triton", "cuda" or "torch"; see :func:`use_backend`.

    Pair ``(a, b)`` at position n becomes ``(a cos - b sin, b cos + a sin)``, computed in fp32 and returned
    in x's dtype with x's shape (a new tensor unless ``inplace``). Differentiable in x and, for learnable
    frequencies, in cos and sin; the backward in x is the same kernel with sin negated.
    """
    return _rope_ops.apply_rope(x, cos, sin, interleaved=interleaved, inplace=inplace, backend=backend)


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None, backend=None):
    """LayerNorm over the last dim, with the residual add of a pre-norm block fused in front of it.

    Args:
        x: ``(..., N)``, fp16, bf16 or fp32 (a non-unit last stride is copied first); N up to 8192 for the
            Triton kernel (any with backend="torch").
        weight, bias: ``(N,)`` or None, any of those dtypes (the statistics and the affine map are computed in
            fp32 either way), differentiable.
        eps: added to the variance.
        residual: None, or a tensor of x's shape (its dtype may differ: the sum takes torch's promoted dtype).
        backend: "auto" (default), "triton" or "torch"; see :func:`use_backend`.

    Returns ``y = LayerNorm(x)``, or with a residual ``(y, s)``: ``s = x + residual`` (the block's new
    residual stream) and ``y = LayerNorm(s)``, from one read of x and residual, where eager code reads the sum
    back again. y is in s's dtype (x's without a residual), both contiguous. The sum is rounded to its dtype
    before it is normalised, as ``F.layer_norm(x + residual)`` does. The backward gives x and the residual the
    same gradient (including the one that reaches s) and the weight and bias gradients, deterministically
    (per-program partial sums added in a fixed order, no atomics).
    """
    return _ln_ops.layer_norm(x, weight, bias, eps, residual=residual, backend=backend)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` running on dlcv_fast kernels.

    Same signature and semantics: query ``(N, ..., L, E)``, key/value ``(N, ..., S, E)`` (3-D or 4-D),
    ``attn_mask`` bool (True = takes part) or additive float, broadcastable to ``(N, H, L, S)``;
    ``is_causal`` top-left aligned; ``enable_gqa`` allows fewer key/value heads. Differences from torch:
    a fully masked query row gives zeros (torch gives NaN), and ``dropout_p > 0`` raises
    NotImplementedError (no dropout in the kernel yet), as does a value head dim different from the query's.
    """
    return _attn_ops.sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)


from dlcv_fast import models  # noqa: E402  (last: the models are built on the functions above)
from dlcv_fast.integrations import patch, unpatch  # noqa: E402

__all__ = ["attention", "scaled_dot_product_attention", "apply_rope", "rope_2d", "window_attention", "layer_norm",
           "use_backend", "get_backend", "models", "patch", "unpatch"]
