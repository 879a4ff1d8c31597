"""Rotary tables ``(cos, sin)`` for the patch grid of a vision transformer (2-D RoPE).

Tokens are numbered as a ViT flattens its patch grid, after ``num_prefix_tokens`` prefix tokens (class,
register or distillation tokens): token ``P + i * grid_w + j`` is the patch in row ``i`` (its y) and
column ``j`` (its x). Prefix tokens get ``cos = 1, sin = 0``, i.e. they are left unrotated.

A table holds one angle per rotated channel pair, ``R = dim / 2`` of them; which channels form a pair is
chosen when the tables are applied (:func:`dlcv_fast.apply_rope`, ``interleaved``), not here.

Two modes, following Heo et al., "Rotary Position Embedding for Vision Transformer" (ECCV 2024, RoPE-ViT):

* ``"axial"``: ``dim / 4`` frequencies ``f_k = theta ** (-4k / dim)`` per axis; half of the pairs turn with
  x (angle ``x f_k``) and half with y (angle ``y f_k``), the two halves concatenated. ``grid_indexing="xy"``
  puts the x half first (RoPE-ViT's axial layout); ``"ij"`` puts y first, which is EVA-02's layout (and
  timm's default ``grid_indexing``). RoPE-ViT uses ``theta = 100``, EVA-02 ``theta = 10000``; both apply the
  tables to interleaved pairs.
* ``"mixed"``: learnable frequencies per head, ``freqs`` of shape ``(2, H, dim / 2)`` holding ``(f_x, f_y)``;
  pair ``c`` of head ``h`` turns by ``x f_x[h, c] + y f_y[h, c]``, so one pair can mix both axes (diagonal
  directions). :func:`init_mixed_freqs` gives RoPE-ViT's initialisation. The tables are differentiable in
  ``freqs`` and have a head dim: ``(1, H, N, dim / 2)``, which :func:`dlcv_fast.apply_rope` broadcasts over
  the batch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MODES = ("axial", "mixed")
GRID_INDEXINGS = ("xy", "ij")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_rope_dim(dim):
    """The rotary dim of a 2-D table: two axes of channel pairs, so a positive multiple of 4."""
    _check_int("dim", dim, 1)
    if dim % 4:
        raise ValueError(f"dim (the rotary dim per head) must be a multiple of 4 for 2-D RoPE (x and y pairs), "
                         f"got {dim}")


def axial_bands(dim: int, theta: float, *, dtype=torch.float64, device=None) -> Tensor:
    """The ``dim / 4`` axial frequencies ``theta ** (-4k / dim)``, k = 0 .. dim/4 - 1."""
    return theta ** -(torch.arange(0, dim, 4, dtype=dtype, device=device) / dim)


def grid_positions(grid_h: int, grid_w: int, *, ref_grid=None, dtype=torch.float64, device=None):
    """``(x, y)`` of every patch in row-major order, each ``(grid_h * grid_w,)``. With
    ``ref_grid = (ref_h, ref_w)`` positions are rescaled to that grid (``x * ref_w / grid_w``,
    ``y * ref_h / grid_h``), EVA-02's way of reusing tables trained at another resolution."""
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=dtype, device=device),
                          torch.arange(grid_w, dtype=dtype, device=device), indexing="ij")
    x, y = x.flatten(), y.flatten()
    if ref_grid is not None:
        x, y = x * (ref_grid[1] / grid_w), y * (ref_grid[0] / grid_h)
    return x, y


def init_mixed_freqs(dim: int, num_heads: int, *, depth=None, theta: float = 10.0, rotate: bool = True,
                     generator=None, device=None, dtype=torch.float32) -> Tensor:
    """RoPE-Mixed's initial frequencies: ``(2, num_heads, dim / 2)``, or ``(2, depth, num_heads, dim / 2)``
    when ``depth`` is given (one set per block, as timm's ``RotaryEmbeddingMixed.freqs``).

    Each head draws a direction ``phi`` uniformly in [0, 2 pi) (``rotate=False``: 0). Its first ``dim / 4``
    pairs turn along ``phi``, the rest along ``phi + pi / 2``, with magnitudes ``theta ** (-4k / dim)``:
    ``f_x = m cos(direction)``, ``f_y = m sin(direction)``. Index 0 of the first dim is ``f_x``, 1 is ``f_y``.
    """
    check_rope_dim(dim)
    _check_int("num_heads", num_heads, 1)
    lead = () if depth is None else (depth,)
    if depth is not None:
        _check_int("depth", depth, 1)
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    if rotate:
        phi = torch.rand(*lead, num_heads, 1, generator=generator, dtype=dtype, device=device) * (2 * math.pi)
    else:
        phi = torch.zeros(*lead, num_heads, 1, dtype=dtype, device=device)
    quarter = dim // 4
    offset = torch.cat((torch.zeros(quarter, dtype=dtype, device=device),
                        torch.full((quarter,), math.pi / 2, dtype=dtype, device=device)))
    direction = phi + offset  # (*lead, H, dim / 2)
    mag = axial_bands(dim, theta, dtype=dtype, device=device).repeat(2)
    return torch.stack((mag * torch.cos(direction), mag * torch.sin(direction)))


def _with_prefix(cos: Tensor, sin: Tensor, num_prefix_tokens: int):
    """Prepend ``num_prefix_tokens`` identity rows (cos 1, sin 0) along the position dim (-2)."""
    if not num_prefix_tokens:
        return cos, sin
    shape = (*cos.shape[:-2], num_prefix_tokens, cos.shape[-1])
    return (torch.cat((cos.new_ones(shape), cos), dim=-2), torch.cat((sin.new_zeros(shape), sin), dim=-2))


def rope_2d(grid_h: int, grid_w: int, dim: int, *, theta: float = 100.0, mode: str = "axial",
            num_prefix_tokens: int = 0, freqs: Tensor | None = None, grid_indexing: str = "xy",
            ref_grid=None, dtype=torch.float32, device=None):
    """``(cos, sin)`` tables for 2-D rotary position embedding of a ``grid_h x grid_w`` patch grid.

    Args:
        grid_h, grid_w: patch rows and columns; N = grid_h * grid_w patch tokens in row-major order.
        dim: rotary dim per head (the head dim for full rotary), a multiple of 4. R = dim / 2.
        theta: frequency base of ``"axial"`` (RoPE-ViT: 100, EVA-02: 10000). Unused by ``"mixed"``, whose
            frequencies are ``freqs`` (see :func:`init_mixed_freqs` for their theta).
        mode: ``"axial"`` or ``"mixed"``; see the module docstring for the exact angles.
        num_prefix_tokens: P unrotated tokens (class/register tokens) ahead of the patches.
        freqs: ``"mixed"`` only: ``(2, H, R)`` learnable ``(f_x, f_y)``, or ``(2, *lead, H, R)``
            (e.g. ``lead = (depth,)``, one set per block). Gradients flow back into it.
        grid_indexing: ``"xy"`` (x pairs first: RoPE-ViT) or ``"ij"`` (y pairs first: EVA-02, timm's default).
        ref_grid: ``(ref_h, ref_w)``: rescale positions to this grid (EVA-02's ``pt_seq_len``, timm's
            ``ref_feat_shape``); None keeps integer positions.
        dtype, device: of the tables (angles are computed in float64 for axial, float32 or freqs' dtype if
            wider for mixed).

    Returns:
        ``(cos, sin)``: ``(P + N, R)`` for ``"axial"``; ``(*lead, 1, H, P + N, R)`` for ``"mixed"`` (the 1 is
        the batch dim that :func:`dlcv_fast.apply_rope` broadcasts). Rows ``0..P-1`` are cos 1, sin 0.
    """
    _check_int("grid_h", grid_h, 1)
    _check_int("grid_w", grid_w, 1)
    check_rope_dim(dim)
    _check_int("num_prefix_tokens", num_prefix_tokens, 0)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if grid_indexing not in GRID_INDEXINGS:
        raise ValueError(f"grid_indexing must be one of {GRID_INDEXINGS}, got {grid_indexing!r}")
    if ref_grid is not None and (len(ref_grid) != 2 or min(ref_grid) <= 0):
        raise ValueError(f"ref_grid must be (ref_h, ref_w) with positive sizes or None, got {ref_grid!r}")
    if mode == "axial":
        if freqs is not None:
            raise ValueError("freqs is used by mode='mixed' only; axial frequencies come from theta")
        if not theta > 0:
            raise ValueError(f"theta must be positive, got {theta!r}")
        x, y = grid_positions(grid_h, grid_w, ref_grid=ref_grid, device=device)
        first, second = (x, y) if grid_indexing == "xy" else (y, x)
        bands = axial_bands(dim, theta, device=device)
        angles = torch.cat((first[:, None] * bands, second[:, None] * bands), dim=-1)
    else:
        R = dim // 2
        if not isinstance(freqs, Tensor) or not freqs.dtype.is_floating_point:
            raise TypeError(f"mode='mixed' needs freqs, a float tensor (2, H, {R}) (see init_mixed_freqs or "
                            f"dlcv_fast.nn.RotaryEmbedding2D), got {type(freqs).__name__}")
        if freqs.dim() < 3 or freqs.shape[0] != 2 or freqs.shape[-1] != R:
            raise ValueError(f"freqs must be (2, H, dim/2) = (2, H, {R}) or (2, ..., H, {R}), got "
                             f"{tuple(freqs.shape)}")
        device = freqs.device if device is None else device
        compute = torch.promote_types(freqs.dtype, torch.float32)
        x, y = grid_positions(grid_h, grid_w, ref_grid=ref_grid, dtype=compute, device=freqs.device)
        f = freqs.to(compute)
        angles = x[:, None] * f[0][..., None, :] + y[:, None] * f[1][..., None, :]  # (*lead, H, N, R)
        angles = angles.unsqueeze(-4)
    cos, sin = (t.to(dtype=dtype, device=device) for t in (torch.cos(angles), torch.sin(angles)))
    return _with_prefix(cos, sin, num_prefix_tokens)
