"""2-D rotary position embedding as a module: produces the ``(cos, sin)`` tables for a patch grid.

Usage in a ViT block (the tables are built once per forward and shared by all blocks)::

    rope = RotaryEmbedding2D(head_dim, num_prefix_tokens=1)            # axial, RoPE-ViT
    cos, sin = rope(grid_h, grid_w, device=x.device)                     # (1 + N, head_dim / 2) each
    out = dlcv_fast.attention(q, k, v, rope=(cos, sin))                  # or dlcv_fast.apply_rope(q, cos, sin)

    rope = RotaryEmbedding2D(head_dim, mode="mixed", num_heads=H, depth=L, num_prefix_tokens=1)
    cos, sin = rope(grid_h, grid_w)                                      # (L, 1, H, 1 + N, head_dim / 2)
    block i: dlcv_fast.attention(q, k, v, rope=(cos[i], sin[i]))         # (1, H, 1 + N, R): per-head tables
"""
from __future__ import annotations

import torch
from torch import nn

from dlcv_fast.rope_tables import check_rope_dim, init_mixed_freqs, rope_2d

DEFAULT_THETA = {"axial": 100.0, "mixed": 10.0}  # RoPE-ViT's values


class RotaryEmbedding2D(nn.Module):
    """Tables for 2-D RoPE (:func:`dlcv_fast.rope_2d`), with the learnable frequencies of RoPE-Mixed.

    Args:
        dim: rotary dim per head (the head dim for full rotary), a multiple of 4.
        mode: ``"axial"`` (fixed frequencies, no parameters) or ``"mixed"`` (learnable per-head frequencies).
        num_heads: heads of the attention the tables are for; required for ``"mixed"``.
        depth: ``"mixed"`` only: keep one frequency set per block (``freqs`` ``(2, depth, H, dim / 2)``, the
            layout and state_dict key of timm's ``RotaryEmbeddingMixed``) instead of one (``(2, H, dim / 2)``).
        theta: frequency base; default 100 for axial and 10 for mixed (RoPE-ViT). EVA-02 uses 10000.
        num_prefix_tokens: class/register tokens ahead of the patches, left unrotated.
        grid_indexing: ``"xy"`` (RoPE-ViT) or ``"ij"`` (EVA-02, timm's default); see :func:`dlcv_fast.rope_2d`.
        ref_grid: ``(ref_h, ref_w)`` to rescale positions to (EVA-02 fine-tuning at another resolution).

    Parameters: ``freqs`` in mixed mode (RoPE-ViT's per-block ``freqs`` reshaped to ``(2, depth, H, dim / 2)``
    load into it directly); none in axial mode.

    :meth:`forward` ``(grid_h, grid_w)`` returns ``(cos, sin)``: ``(P + N, dim / 2)`` in axial mode;
    ``(1, H, P + N, dim / 2)`` in mixed mode, or ``(depth, 1, H, P + N, dim / 2)`` with ``depth`` (index
    ``[i]`` for block i). Float32, ready for :func:`dlcv_fast.apply_rope` / ``attention(rope=...)``.
    """

    def __init__(self, dim, *, mode="axial", num_heads=None, depth=None, theta=None, num_prefix_tokens=0,
                 grid_indexing="xy", ref_grid=None, device=None, dtype=None):
        super().__init__()
        check_rope_dim(dim)
        if mode not in DEFAULT_THETA:
            raise ValueError(f"mode must be 'axial' or 'mixed', got {mode!r}")
        if mode == "axial" and (num_heads is not None or depth is not None):
            raise ValueError("num_heads and depth are for mode='mixed' (axial tables are shared by all heads)")
        if mode == "mixed" and num_heads is None:
            raise ValueError("mode='mixed' needs num_heads (the frequencies are per head)")
        if grid_indexing not in ("xy", "ij"):
            raise ValueError(f"grid_indexing must be 'xy' or 'ij', got {grid_indexing!r}")
        self.dim, self.mode, self.num_heads, self.depth = dim, mode, num_heads, depth
        self.theta = DEFAULT_THETA[mode] if theta is None else float(theta)
        self.num_prefix_tokens, self.grid_indexing, self.ref_grid = num_prefix_tokens, grid_indexing, ref_grid
        if mode == "mixed":
            self.freqs = nn.Parameter(init_mixed_freqs(dim, num_heads, depth=depth, theta=self.theta, device=device,
                                                       dtype=dtype if dtype is not None else torch.float32))
        else:
            self.register_parameter("freqs", None)

    def reset_parameters(self):
        """Draw new random directions for the mixed-mode frequencies (RoPE-ViT's initialisation)."""
        if self.freqs is not None:
            with torch.no_grad():
                self.freqs.copy_(init_mixed_freqs(self.dim, self.num_heads, depth=self.depth, theta=self.theta,
                                                  device=self.freqs.device, dtype=self.freqs.dtype))

    def forward(self, grid_h, grid_w, *, device=None):
        """``(cos, sin)`` for a ``grid_h x grid_w`` patch grid (shapes in the class docstring). ``device``:
        where to build axial tables (default CPU; pass the activations' device); mixed tables follow
        ``freqs``."""
        return rope_2d(grid_h, grid_w, self.dim, theta=self.theta, mode=self.mode,
                       num_prefix_tokens=self.num_prefix_tokens, freqs=self.freqs,
                       grid_indexing=self.grid_indexing, ref_grid=self.ref_grid, device=device)

    def extra_repr(self):
        s = f"dim={self.dim}, mode={self.mode!r}, theta={self.theta}"
        if self.mode == "mixed":
            s += f", num_heads={self.num_heads}" + (f", depth={self.depth}" if self.depth is not None else "")
        if self.num_prefix_tokens:
            s += f", num_prefix_tokens={self.num_prefix_tokens}"
        return s + f", grid_indexing={self.grid_indexing!r}" + (f", ref_grid={self.ref_grid}" if self.ref_grid else "")
