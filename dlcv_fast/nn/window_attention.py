"""Swin's (shifted-)window attention and transformer block on the fused window-attention op, with timm's
parameter names (a timm ``WindowAttention`` / ``SwinTransformerBlock`` state_dict loads as is)."""
from __future__ import annotations

import torch
from torch import nn

from dlcv_fast.nn.block import DropPath, fused_add_norm
from dlcv_fast.nn.mlp import Mlp
from dlcv_fast.nn.norm import LayerNorm
from dlcv_fast.ops.window_attention import window_attention


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias, on a whole ``(B, H, W, dim)`` map.

    Keys ``qkv``, ``relative_position_bias_table``, ``proj`` as in timm's ``WindowAttention``. timm's module
    takes already partitioned windows and a mask, its block doing the shift, padding and partition around
    it; this one takes the map and does all of it inside :func:`dlcv_fast.window_attention` (``shift_size``
    0 for W-MSA, window // 2 for SW-MSA). Padding tokens carry the qkv Linear's bias, as in timm.
    Attention dropout is not supported (Swin's checkpoints are trained and used without it).
    """

    def __init__(self, dim, num_heads, head_dim=None, window_size=7, shift_size=0, qkv_bias=True, attn_drop=0.0,
                 proj_drop=0.0):
        super().__init__()
        if attn_drop:
            raise NotImplementedError(f"attn_drop={attn_drop}: the fused window attention has no attention "
                                      f"dropout; use attn_drop=0")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _pair(window_size)
        self.shift_size = _pair(shift_size)
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        win_h, win_w = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * win_h - 1) * (2 * win_w - 1), num_heads))
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x):
        """x ``(B, H, W, dim)`` -> ``(B, H, W, dim)``."""
        out = window_attention(self.qkv(x), num_heads=self.num_heads, window_size=self.window_size,
                               shift_size=self.shift_size, rel_pos_bias_table=self.relative_position_bias_table,
                               qkv_bias=self.qkv.bias, scale=self.scale)
        return self.proj_drop(self.proj(out))

    def extra_repr(self):
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, " \
               f"shift_size={self.shift_size}"


class SwinTransformerBlock(nn.Module):
    """Swin block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` on ``(B, H, W, dim)`` maps.

    Keys ``norm1``, ``attn.qkv``, ``attn.relative_position_bias_table``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``: those of timm's ``SwinTransformerBlock``. The window and shift follow timm: unless
    ``always_partition``, an axis of ``input_resolution`` no larger than the window shrinks the window to it
    and turns its shift off (``window_size``/``shift_size`` attributes hold the result). The shifted-window
    mask is computed from coordinates in the kernel, so any map size works at run time (timm's
    ``dynamic_mask`` behaviour, without a mask tensor); a map larger than ``input_resolution`` keeps the
    window and shift chosen at construction, as in timm.
    """

    def __init__(self, dim, input_resolution, num_heads=4, head_dim=None, window_size=7, shift_size=0,
                 always_partition=False, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, act="gelu",
                 norm_layer=LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = _pair(input_resolution)
        self.window_size, self.shift_size = swin_window_and_shift(self.input_resolution, window_size, shift_size,
                                                                  always_partition)
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads, head_dim=head_dim, window_size=self.window_size,
                                    shift_size=self.shift_size, qkv_bias=qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        """x ``(B, H, W, dim)`` -> ``(B, H, W, dim)``."""
        x, branch = self.forward_residual(x, None)
        return x + branch

    def forward_residual(self, x, branch=None):
        """As :meth:`dlcv_fast.nn.Block.forward_residual`: the block on ``x + branch``, returning the stream after
        the attention half and the MLP half's output, whose add the next norm takes."""
        y, x = fused_add_norm(self.norm1, x, branch)
        y, x = fused_add_norm(self.norm2, x, self.drop_path1(self.attn(y)))
        return x, self.drop_path2(self.mlp(y))


def swin_window_and_shift(input_resolution, window_size, shift_size, always_partition=False):
    """timm's ``SwinTransformerBlock._calc_window_shift``: ``(window, shift)`` pairs for a feature map of
    ``input_resolution``. Unless ``always_partition``, an axis no larger than the window gets the map's size
    as window and no shift."""
    window, shift = _pair(window_size), _pair(shift_size)
    if always_partition:
        return window, shift
    window = tuple(r if r <= w else w for r, w in zip(input_resolution, window))
    shift = tuple(0 if r <= w else s for r, w, s in zip(input_resolution, window, shift))
    return window, shift
