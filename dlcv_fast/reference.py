"""Readable eager PyTorch definitions of every dlcv_fast op: the source of truth for correctness.

Tests compare the kernels against these functions (run in float64 for a "golden" answer and in the
input dtype for PyTorch's own low-precision error), and the "torch" backend runs them on CPU tensors.
The fast path never imports this module.
"""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------------
# Dense attention
# --------------------------------------------------------------------------------------------------


def attention_mask(Lq: int, Lk: int, *, causal=False, prefix_len=None, key_padding_mask=None, device=None):
    """The boolean "may attend" mask (True = key takes part) implied by the index-based masks.

    Returns None when nothing is masked, else a tensor broadcastable to (B, 1, Lq, Lk).
    ``causal``: key j visible to query i iff j <= i (SDPA's top-left ``is_causal``).
    ``prefix_len`` P: queries i < P see keys j < P; later queries see keys j <= i (prefix-LM, BLIP-2).
    Both together equal the prefix-LM mask, since it is causal past the prefix.
    ``key_padding_mask`` (B, Lk) bool: True = key takes part.
    """
    mask = None
    if causal or prefix_len is not None:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        mask = j <= i
        if prefix_len is not None:
            mask = mask | (j < prefix_len)
        mask = mask[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = kpm if mask is None else (mask & kpm)
    return mask


def apply_rope(x, cos, sin, *, interleaved=False):
    """Rotary position embedding of the first ``2 * cos.shape[-1]`` channels of ``x``.

    x ``(B, H, N, D)``; cos/sin ``(N, R)`` or ``(B, N, R)`` with ``2R <= D``; channels past 2R pass
    through. Half-split ("NeoX") pairs channel c with c + R; ``interleaved`` ("GPT-J") pairs 2c with 2c+1.
    Rotation of pair (a, b) by angle t: (a cos t - b sin t, b cos t + a sin t). Computed in x's dtype.
    """
    R = cos.shape[-1]
    if cos.dim() == 2:
        cos, sin = cos[None, None], sin[None, None]
    else:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., : 2 * R], x[..., 2 * R :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :R], rot[..., R:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def attention_with_lse(q, k, v, *, causal=False, key_padding_mask=None, attn_bias=None, prefix_len=None,
                       scale=None, rope=None):
    """Eager attention returning ``(out, lse)``.

    q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D)`` with Hq % Hkv == 0 (GQA/MQA repeat each kv head).
    Scores ``s = scale * q k^T + attn_bias`` (scale defaults to D**-0.5) with masked keys at -inf;
    ``lse`` (B, Hq, Lq) float32 is the natural log-sum-exp of each row of s (-inf for a fully masked
    row); out = softmax(s) v, and a fully masked row gives zeros. The matmuls run in the input dtype
    and the softmax in float32 (as torch does), so running this in fp16 gives PyTorch's own error.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if rope is not None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if attn_bias is not None:
        s = s + attn_bias.float()
    mask = attention_mask(Lq, Lk, causal=causal, prefix_len=prefix_len, key_padding_mask=key_padding_mask,
                          device=q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)[..., None]
    p = torch.exp(s - torch.where(finite, lse[..., None], torch.zeros_like(lse[..., None])))
    p = torch.where(finite, p, torch.zeros_like(p))
    out = torch.matmul(p.to(v.dtype), v)
    return out, lse.expand(B, Hq, Lq)


def attention(q, k, v, *, causal=False, key_padding_mask=None, attn_bias=None, prefix_len=None, scale=None,
              rope=None):
    """Eager attention; see :func:`attention_with_lse` for the exact definition."""
    return attention_with_lse(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                              prefix_len=prefix_len, scale=scale, rope=rope)[0]
