"""Self- and cross-attention layers on :func:`dlcv_fast.attention`, with timm's parameter names.

Both layers can also return the attention probabilities of one query row (the class token's map over
the patches, as in the ViT and DINO visualisations) without materialising the ``N x N`` matrix: the
fused kernel already returns the row's logsumexp, so the row is ``exp(scale * q_i k^T + bias_i - lse_i)``,
one ``(Lk, D)`` product per head (:func:`attention_row`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast
from dlcv_fast.ops.attention import attention_with_lse


def attention_row(q, k, lse, index=0, *, scale=None, causal=False, key_padding_mask=None, attn_bias=None):
    """Row ``index`` of ``softmax(scale * q k^T + attn_bias)`` (masked keys at zero) from the kernel's logsumexp.

    q ``(B, H, Lq, D)``, k ``(B, Hkv, Lk, D)`` and ``lse`` ``(B, H, Lq)`` as returned by
    :func:`dlcv_fast.ops.attention.attention_with_lse` for the same inputs and masks (``causal`` top-left
    aligned, ``key_padding_mask`` ``(B, Lk)`` bool True = key takes part, ``attn_bias`` broadcastable to
    ``(B, H, Lq, Lk)``). Returns ``(B, H, Lk)`` float32 probabilities; a fully masked row gives zeros.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    index = index % Lq
    scale = D ** -0.5 if scale is None else scale
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    s = torch.einsum("bhd,bhkd->bhk", q[:, :, index].float(), k.float()) * scale
    if attn_bias is not None:
        s = s + attn_bias.float().expand(B, H, Lq, Lk)[:, :, index]
    lse_row = lse[:, :, index, None]
    keep = torch.isfinite(lse_row).expand(B, H, Lk)
    if causal:
        keep = keep & (torch.arange(Lk, device=q.device) <= index)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, :]
    return torch.where(keep, torch.exp(s - lse_row), torch.zeros_like(s))


def _apply_rope(q, k, rope):
    cos, sin = rope
    return dlcv_fast.apply_rope(q, cos, sin), dlcv_fast.apply_rope(k, cos, sin)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; keys match timm's ``Attention``.

    Parameters: ``qkv`` (Linear dim -> 3 * heads * head_dim), ``q_norm`` / ``k_norm`` (``norm_layer(head_dim)``
    when ``qk_norm``, applied per head before the dot product), ``proj``. ``x`` ``(B, N, dim)`` -> ``(B, N, dim)``.
    The keyword arguments of :meth:`forward` go to :func:`dlcv_fast.attention`: ``causal``,
    ``key_padding_mask`` ``(B, N)`` bool (True = key takes part), ``attn_bias`` broadcastable to
    ``(B, heads, N, N)``, ``rope`` = ``(cos, sin)`` rotary tables applied to q and k.
    The qkv output is read in place: q, k, v are strided views, and the kernel's ``(B, N, H, D)`` output
    feeds ``proj`` without a copy.
    """

    def __init__(self, dim, num_heads=8, *, qkv_bias=False, qk_norm=False, proj_bias=True, head_dim=None,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim ** -0.5
        attn_dim = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(attn_dim, dim, bias=proj_bias)

    def _qkv(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _out(self, o):
        B, H, N, D = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, H * D))

    def forward(self, x, *, causal=False, key_padding_mask=None, attn_bias=None, rope=None):
        q, k, v = self._qkv(x)
        o = dlcv_fast.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                                scale=self.scale, rope=rope)
        return self._out(o)

    def forward_rows(self, x, select, *, key_padding_mask=None):
        """:meth:`forward`'s output at the rows ``select`` picks (a function ``(B, N, C) -> (B, n, C)``, e.g. the
        class token), computing queries and the projection for those rows only; keys and values come from every
        row, so the result is the same (up to rounding). ``key_padding_mask`` ``(B, N)`` as in :meth:`forward`;
        a causal mask is the caller's to express through it (the selected rows' positions are its to know).
        A model that reads out a few tokens (ViT's class token, CLIP's end-of-text token) saves five sixths of
        its last block's matmul work this way (:func:`dlcv_fast.nn.block.run_blocks`' ``readout``)."""
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        if type(self.qkv) is nn.Linear:  # the query rows and the key/value rows, each from its part of the weight
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(select(x), w[:H * D], None if b is None else b[:H * D])
            kv = F.linear(x, w[H * D:], None if b is None else b[H * D:])
        else:  # a wrapped or quantised qkv (LoRA, int8, ...): called whole, as forward() calls it
            qkv = self.qkv(x)
            q, kv = select(qkv[..., :H * D]), qkv[..., H * D:]
        n = q.shape[1]
        q = q.reshape(B, n, H, D).transpose(1, 2)
        k, v = kv.reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = dlcv_fast.attention(self.q_norm(q), self.k_norm(k), v, key_padding_mask=key_padding_mask,
                                scale=self.scale)
        return self._out(o)

    def forward_with_attn_map(self, x, query_index=0, *, causal=False, key_padding_mask=None, attn_bias=None,
                              rope=None):
        """:meth:`forward` plus the attention probabilities of query ``query_index``, ``(B, heads, N)`` float32."""
        q, k, v = self._qkv(x)
        if rope is not None:
            q, k = _apply_rope(q, k, rope)
        masks = dict(causal=causal, key_padding_mask=key_padding_mask, attn_bias=attn_bias)
        o, lse = attention_with_lse(q, k, v, scale=self.scale, **masks)
        return self._out(o), attention_row(q, k, lse, query_index, scale=self.scale, **masks)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over a context; keys match timm's latent attention pooling.

    Parameters: ``q`` (Linear dim -> heads * head_dim), ``kv`` (Linear context_dim -> 2 * heads * head_dim),
    ``q_norm`` / ``k_norm`` (when ``qk_norm``), ``proj``. ``x`` ``(B, Lq, dim)``, ``context`` ``(B, Lk, context_dim)``
    -> ``(B, Lq, dim)``; ``key_padding_mask`` ``(B, Lk)`` bool (True = context token takes part) and
    ``attn_bias`` (broadcastable to ``(B, heads, Lq, Lk)``) go to :func:`dlcv_fast.attention`.
    """

    def __init__(self, dim, num_heads=8, *, context_dim=None, qkv_bias=False, qk_norm=False, proj_bias=True,
                 head_dim=None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim ** -0.5
        attn_dim = num_heads * self.head_dim
        self.q = nn.Linear(dim, attn_dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * attn_dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(attn_dim, dim, bias=proj_bias)

    def _qkv(self, x, context):
        B, Lq, _ = x.shape
        Lk = context.shape[1]
        q = self.q(x).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).view(B, Lk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _out(self, o):
        B, H, L, D = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, L, H * D))

    def forward(self, x, context, *, key_padding_mask=None, attn_bias=None):
        q, k, v = self._qkv(x, context)
        o = dlcv_fast.attention(q, k, v, key_padding_mask=key_padding_mask, attn_bias=attn_bias, scale=self.scale)
        return self._out(o)

    def forward_with_attn_map(self, x, context, query_index=0, *, key_padding_mask=None, attn_bias=None):
        """:meth:`forward` plus query ``query_index``'s attention over the context, ``(B, heads, Lk)`` float32."""
        q, k, v = self._qkv(x, context)
        masks = dict(key_padding_mask=key_padding_mask, attn_bias=attn_bias)
        o, lse = attention_with_lse(q, k, v, scale=self.scale, **masks)
        return self._out(o), attention_row(q, k, lse, query_index, scale=self.scale, **masks)
