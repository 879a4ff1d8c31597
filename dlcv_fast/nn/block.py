"""The pre-norm transformer block of ViT, DeiT and CLIP, with timm's parameter names."""
from __future__ import annotations

from functools import partial

from torch import nn

from dlcv_fast.nn.attention import Attention
from dlcv_fast.nn.mlp import Mlp


class DropPath(nn.Module):
    """Stochastic depth: in training, zero each sample's residual branch with probability ``p`` (rescaling the rest)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; keys ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2`` as in timm's ``vision_transformer.Block``.

    ``x`` ``(B, N, dim)``; the keyword arguments of :meth:`forward` (``causal``, ``key_padding_mask``, ``attn_bias``,
    ``rope``) go to :meth:`Attention.forward`.
    """

    def __init__(self, dim, num_heads, mlp_hidden_dim, *, qkv_bias=True, qk_norm=False, act="gelu", norm_eps=1e-6,
                 drop_path=0.0):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=norm_layer)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden_dim, act=act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, **attn_kwargs):
        x = x + self.drop_path(self.attn(self.norm1(x), **attn_kwargs))
        return x + self.drop_path(self.mlp(self.norm2(x)))
