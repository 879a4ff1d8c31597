"""Swin (shifted-)window attention in Triton: the whole attention step of a Swin block, fused.

Input ``qkv (B, H, W, 3C)`` channels-last (the block's qkv Linear output, channels ``(3, heads, D)`` as in
timm), output ``(B, H, W, C)``. What timm does with copies (cyclic shift by ``-shift``, zero padding of x up
to a multiple of the window *before* the qkv Linear, window partition, relative position bias gathered from
the ``((2Wh-1)(2Ww-1), heads)`` table, the shifted-window region mask of ``-100``, window merge, crop,
reverse shift) is done here in address and mask arithmetic:

- a program works on one window of one image: window-local token ``n`` sits at ``(r, c)`` of the shifted,
  padded map; it is a padding token when ``r >= H or c >= W`` (its q/k/v are then the qkv Linear's bias,
  ``qkv_bias``, which is what timm's padded zeros become), else it is read from, and written back to,
  ``((r + shift_h) % H, (c + shift_w) % W)`` of the unshifted map;
- the bias of the pair ``(n, m)`` is ``table[f(n) - f(m) + (Wh-1)(2Ww-1) + Ww-1, head]`` with
  ``f = row * (2Ww-1) + col`` of the token in its window, gathered straight from the table;
- the region id of a token (shifted windows only) follows from its padded coordinates: per axis 0 below
  ``Hp - Wh``, 1 below ``Hp - shift``, 2 from there (one region on an axis without shift).

The kernels follow FlashAttention-2, with the window's tokens as the sequence: scores in log2 units for
``exp2``, fp32 accumulation, tiles of at most 64 tokens (a 7x7 or 8x8 window is one query tile, a 12x12
window three), head dims up to 64 (any, padded to a power of two with masked loads). The forward saves the
log-sum-exp per (token, head), ``(B, H, W, heads)`` fp32.

Backward, deterministic (no atomics anywhere). In fp16/bf16, windows that fit one tile (7x7, 8x8: at most
64 tokens) take one kernel, ``_window_attn_bwd_fused`` (one program per group of windows and head): a
window's scores are computed once, dq, dk and dv all follow from them; the table gradient is summed in
registers over the program's windows. Larger windows, fp32, and padded maps whose qkv bias needs a gradient
take two kernels:
- ``_window_attn_bwd_dq`` (one program per window, head and query block) computes dq and
  ``delta = rowsum(dO * O)``, which it saves per (token, head) for the second kernel;
- ``_window_attn_bwd_dkdv`` (one program per group of windows, head and key block; keys on the MMA's M
  side, queries in chunks) computes dk and dv, and the table gradient: dS summed over the program's
  windows (in registers when one query chunk covers the window, as a 64-query chunk does a 7x7 or 8x8
  window; else added chunk by chunk in memory) into its own ``(N, N)`` slice of a ``(groups, heads, N, N)``
  fp32 buffer, which torch then sums
  over groups and bins by relative offset with a gather. That buffer costs ``groups * heads * N^2 * 4``
  bytes, independent of batch and resolution: ``groups * heads * key blocks`` is about
  ``PROGRAMS_PER_SM`` programs per SM, so on a 132-SM H100 it is 5 MB for 7x7 windows (N = 49), 8.6 MB for
  8x8 and 14.6 MB for 12x12 (3 key blocks). The qkv bias receives the dk/dv of padding tokens, summed per
  program into a ``(groups * key blocks, 2, C)`` buffer the same way.
Neither path reads the forward's output: ``delta = rowsum(dO * O)`` is computed as ``rowsum(P * dP) /
rowsum(P)`` (``_delta``), free of the output's fp16/bf16 rounding, which left dk up to 3x the fp16
reference's error (about 1.5x this way).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from dlcv_fast.kernels.attention import _delta, table_arch

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 64

# ------------------------------------------------------------------------------------------------
# Configs as data, by BLOCK_D (the head dim padded to a power of two; at most 64). A window of N tokens is
# cut into tiles of at most TILE = min(64, next_pow2(N)) tokens (>= 16): a 7x7 or 8x8 window is one query
# tile. Forward and dq: BLOCK_M = TILE (fp32: at most 32) queries per program, key blocks of at most
# BLOCK_N. dk/dv: key blocks of at most BLOCK_N on the MMA's M side, query chunks of BLOCK_M. Picked so that
# no shipped instance spills registers on sm_80 or sm_90 (aot_specs lists them; ptxas trades a few spills
# for occupancy near its register thresholds, so small changes here need that check). The interpreter
# runs the same configs, so the tests cover the shipped code paths (with few window groups).
# ------------------------------------------------------------------------------------------------

MAX_TILE = 64
FWD_CONFIGS = {16: (32, 4), 32: (32, 4), 64: (64, 8)}  # fp16/bf16: BLOCK_N, num_warps
FWD_CONFIGS_FP32 = {16: (32, 32, 4), 32: (32, 32, 4), 64: (32, 32, 8)}  # IEEE fp32: BLOCK_M, BLOCK_N, num_warps
# dq kernel num_warps (per BLOCK_D) for windows of one tile, whose keys it takes in one block (dq_config);
# no spill on sm_90 or sm_80 with triton 3.6 or 3.8 (96-168 registers at head dims 16-32). Untimed on a GPU.
DQ_ONE_BLOCK_WARPS = {16: 4, 32: 4, 64: 8}  # all dtypes
# dk/dv (BLOCK_M, BLOCK_N, num_warps) per arch (as kernels/attention.py's table_arch: 90 for Hopper and
# later, 80 below). Head dim 32 (Swin's): sm_90 takes 64-query chunks, so a 7x7 or 8x8 window is one chunk
# and the table gradient is summed in registers (no per-chunk load-add-store and barrier; 255 registers, no
# spill, the same one 8-warp block per SM as the 32-query tile's 174 registers); on sm_80 that tile spills
# (324 B), so it keeps 32-query chunks. Neither is timed on a GPU yet (benchmarks.tune --only window). Since
# the one-kernel backward (FUSED_CONFIGS), 7x7 and 8x8 windows reach this kernel on sm_90 only for padded maps
# whose qkv bias needs a gradient.
_DKDV_80 = {16: (32, 64, 4), 32: (32, 64, 8), 64: (16, 64, 8)}
DKDV_CONFIGS = {90: {**_DKDV_80, 32: (64, 64, 8)}, 80: _DKDV_80}
DKDV_CONFIGS_FP32 = {16: (32, 64, 4), 32: (32, 64, 4), 64: (32, 32, 4)}  # IEEE fp32, both archs
# The fp16/bf16 forward of windows that fit one tile (N <= MAX_TILE), looping over a group of windows per
# program: (num_warps, num_stages) per arch and BLOCK_D; a BLOCK_D missing here, and fp32 (its IEEE dots
# spilled 48-944 B), take the per-window forward. 128-251 registers, no spill; 2 stages (the next window's
# q/k/v loads in flight). Untimed on a GPU (benchmarks.tune --only window).
FWD_GROUPED_CONFIGS = {90: {16: (4, 2), 32: (4, 2), 64: (4, 2)}, 80: {16: (4, 2), 32: (4, 2), 64: (4, 2)}}
# The one-kernel backward of windows that fit one tile (N <= MAX_TILE): (num_warps, num_stages) per arch
# and BLOCK_D; a BLOCK_D missing here takes the dq + dk/dv kernels. sm_90 at head dims up to 32 (Swin's): 4
# warps, 1 stage, timed on an H200 (benchmarks/results/2026-11-29T2207_nvidia-h200_tune.jsonl, bf16): 0.556 ms
# at Swin-T stage 1 (B=128, 56x56, 3 heads) and 0.221 ms at stage 3, against 1.181 / 0.334 ms for the 8-warp,
# 2-stage tile that compiled without spills (1.00 / 0.289 ms with 1 stage; the two-kernel path 0.85-2.0 ms).
# With triton 3.8 it compiles without spills (249-255 registers, 20 KiB of shared memory, wgmma).
# At 64 the 8-warp tile compiled clean with triton 3.8 but spilled 56-192 B with 3.6; on sm_80 it spilled at
# 32 and 64 (24-304 B, either warp count), and fp32 (IEEE dots) on sm_90 (364 B at 32): those keep the two
# kernels (untimed).
FUSED_CONFIGS = {90: {16: (4, 1), 32: (4, 1)}, 80: {16: (4, 1)}}
PROGRAMS_PER_SM = 4
# The grouped forward's programs are lighter (4 warps, 128-251 registers: 2-3 resident per SM): 12 per SM
# are whole waves of 2, 3 or 4 resident programs, each still looping over several windows at Swin sizes.
FWD_PROGRAMS_PER_SM = 12
INTERPRETER_GROUPS = 3


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_sizes(window, head_dim):
    """(TILE, BLOCK_D): the token tile and the head dim padded to a power of two (at least 16, for tl.dot)."""
    n = window[0] * window[1]
    return min(MAX_TILE, max(16, triton.next_power_of_2(n))), max(16, triton.next_power_of_2(head_dim))


def fwd_config(window, head_dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the per-window forward (and the start of dq_config)."""
    tile, block_d = block_sizes(window, head_dim)
    if dtype == torch.float32:
        bm, bn, warps = FWD_CONFIGS_FP32[block_d]
        return min(tile, bm), min(tile, bn), warps, 1
    bn, warps = FWD_CONFIGS[block_d]
    return tile, min(tile, bn), warps, 1


def dq_config(window, head_dim, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dq kernel: the forward's, except that a window of at
    most MAX_TILE tokens is one key block (warps from DQ_ONE_BLOCK_WARPS), so its delta comes from that
    block instead of a first pass over the keys."""
    bm, bn, warps, stages = fwd_config(window, head_dim, dtype)
    tile, block_d = block_sizes(window, head_dim)
    if window[0] * window[1] <= MAX_TILE and bn < tile:
        bn, warps = tile, DQ_ONE_BLOCK_WARPS[block_d]
    return bm, bn, warps, stages


def dkdv_config(window, head_dim, dtype, arch=None):
    """(BLOCK_M: query chunk, BLOCK_N: key block, num_warps, num_stages) of the dk/dv kernel on ``arch``
    (compute capability ``major * 10 + minor``; the current device's by default)."""
    tile, block_d = block_sizes(window, head_dim)
    table = DKDV_CONFIGS_FP32 if dtype == torch.float32 else DKDV_CONFIGS[table_arch(arch)]
    bm, bn, warps = table[block_d]
    return min(tile, bm), min(tile, bn), warps, 1


def _one_tile_config(configs, window, head_dim, dtype, arch):
    """(TILE, num_warps, num_stages) from ``configs[arch][BLOCK_D]`` for a kernel that loops over one-tile
    windows, or None: windows larger than one tile, fp32, no entry."""
    if window[0] * window[1] > MAX_TILE or dtype == torch.float32:
        return None
    tile, block_d = block_sizes(window, head_dim)
    table = configs[table_arch(arch)]
    return (tile, *table[block_d]) if block_d in table else None


def fwd_grouped_config(window, head_dim, dtype, arch=None):
    """(TILE, num_warps, num_stages) of the forward that loops over a group of windows per program on
    ``arch`` (as :func:`dkdv_config`), or None where the per-window forward runs (windows larger than one
    tile, fp32, no entry)."""
    return _one_tile_config(FWD_GROUPED_CONFIGS, window, head_dim, dtype, arch)


def fused_config(window, head_dim, dtype, arch=None):
    """(TILE, num_warps, num_stages) of the one-kernel backward on ``arch`` (as :func:`dkdv_config`), or None
    where the dq and dk/dv kernels run instead: windows larger than one tile, fp32, head dims without an
    entry."""
    return _one_tile_config(FUSED_CONFIGS, window, head_dim, dtype, arch)


_SM_COUNT = {}


def _num_groups(num_windows: int, programs_per_group: int, per_sm: int = PROGRAMS_PER_SM) -> int:
    """Window groups of a kernel that loops over windows: about ``per_sm`` programs per SM in all, never more
    groups than windows."""
    if _interpreting() or not torch.cuda.is_available():
        return max(1, min(num_windows, INTERPRETER_GROUPS))
    dev = torch.cuda.current_device()
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return max(1, min(num_windows, triton.cdiv(per_sm * _SM_COUNT[dev], programs_per_group)))


def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ------------------------------------------------------------------------------------------------
# Index arithmetic shared by the kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _tokens(offs, win, H, W, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1,
            WIN_H: tl.constexpr, WIN_W: tl.constexpr):
    """Window-local token indices ``offs`` of window ``win``.

    Returns (valid: offs < N; inside: a real token, not padding; y, x: where the token lives in the
    unshifted map; f: ty * (2Ww-1) + tx, its window coordinates folded for the bias table; region: its
    shifted-window region id). The region id per axis counts the cuts (``cut_*0 = Hp - Wh``,
    ``cut_*1 = Hp - shift``; both Hp on an axis without shift) at or below the token's padded coordinate.
    """
    ty = offs // WIN_W
    tx = offs % WIN_W
    r = (win // n_win_w) * WIN_H + ty  # coordinates in the shifted, padded map
    c = (win % n_win_w) * WIN_W + tx
    valid = offs < WIN_H * WIN_W
    inside = valid & (r < H) & (c < W)
    y = (r + roll_h) % H
    x = (c + roll_w) % W
    region = (((r >= cut_h0).to(tl.int32) + (r >= cut_h1).to(tl.int32)) * 3
              + (c >= cut_w0).to(tl.int32) + (c >= cut_w1).to(tl.int32))
    return valid, inside, y, x, ty * (2 * WIN_W - 1) + tx, region


@triton.jit
def _rows(y, x, s_h, s_w):
    """Offsets of the tokens' channel vectors within one image of a (B, H, W, channels) tensor. int32: the
    launcher checks that one image spans less than 2^31 elements (image offsets are int64)."""
    return y * s_h + x * s_w


@triton.jit
def _load_part(X, FILL, row, inside, offs_d, mask_d, HAS_FILL: tl.constexpr):
    """One head of q, k or v for a window's tokens (``X``: the image's first channel of it); padding tokens
    get ``FILL`` (the same channels of the qkv bias) when ``HAS_FILL``, else zeros."""
    x = tl.load(X + row[:, None] + offs_d[None, :], mask=inside[:, None] & mask_d[None, :], other=0.0)
    if HAS_FILL:
        fill = tl.load(FILL + offs_d, mask=mask_d, other=0.0).to(x.dtype)
        x = tl.where(inside[:, None], x, fill[None, :])
    return x


@triton.jit
def _bias_and_mask(s, TABLE, t_rows, t_cols, reg_rows, reg_cols, ok_rows, ok_cols, keys_ok,
                   HAS_TABLE: tl.constexpr, SHIFTED: tl.constexpr):
    """Add the relative position bias and the region mask to a score tile (log2 units), keys past the
    window at -inf. ``TABLE`` points at one head's column; the table offset of entry (i, j) is
    ``t_rows[i] + t_cols[j]``. ``keys_ok`` is ok_rows or ok_cols broadcast to 2-D: the key side."""
    if HAS_TABLE:
        bias = tl.load(TABLE + (t_rows[:, None] + t_cols[None, :]), mask=ok_rows[:, None] & ok_cols[None, :],
                       other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if SHIFTED:
        s = tl.where(reg_rows[:, None] == reg_cols[None, :], s, s + (-100.0 * 1.4426950408889634))
    return tl.where(keys_ok, s, float("-inf"))


@triton.jit
def _window_bias(table_h, s_t, offs, TILE: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                 HAS_TABLE: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """The relative position bias of a window that fits one tile, in log2 units, -inf at keys past the
    window: a (query, key) tile, or (key, query) with ``KEYS_FIRST``. The same for every window, so the
    kernels that loop over windows gather it once (its 64-bit address tile is otherwise the largest
    register cost in their loop, and its gather the most load instructions)."""
    T0: tl.constexpr = (WIN_H - 1) * (2 * WIN_W - 1) + WIN_W - 1
    ok = offs < WIN_H * WIN_W
    f = (offs // WIN_W) * (2 * WIN_W - 1) + offs % WIN_W
    zero = tl.zeros([TILE, TILE], tl.float32)
    if KEYS_FIRST:
        return _bias_and_mask(zero, table_h, -f * s_t, (f + T0) * s_t, f, f, ok, ok, ok[:, None], HAS_TABLE, False)
    return _bias_and_mask(zero, table_h, (f + T0) * s_t, -f * s_t, f, f, ok, ok, ok[None, :], HAS_TABLE, False)


@triton.jit
def _window_qkv(QKV, QKV_BIAS, pid_w, col, s_b, s_h, s_w, offs, offs_d, mask_d, H, W, n_win, n_win_w, roll_h,
                roll_w, cut_h0, cut_h1, cut_w0, cut_w1, C, WIN_H: tl.constexpr, WIN_W: tl.constexpr,
                HAS_QKV_BIAS: tl.constexpr):
    """(b, inside, y, x, region, q, k, v) of window ``pid_w`` (image-major) when it fits one tile: every
    token both a query and a key. Padding tokens get the qkv bias."""
    b = (pid_w // n_win).to(tl.int64)
    img = QKV + b * s_b + col
    ok, inside, y, x, f, reg = _tokens(offs, pid_w % n_win, H, W, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0,
                                       cut_w1, WIN_H, WIN_W)
    row = _rows(y, x, s_h, s_w)
    q = _load_part(img, QKV_BIAS + col, row, inside, offs_d, mask_d, HAS_QKV_BIAS)
    k = _load_part(img + C, QKV_BIAS + C + col, row, inside, offs_d, mask_d, HAS_QKV_BIAS)
    v = _load_part(img + 2 * C, QKV_BIAS + 2 * C + col, row, inside, offs_d, mask_d, HAS_QKV_BIAS)
    return b, inside, y, x, reg, q, k, v


@triton.jit
def _group_program(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr):
    """(window group, head, token offsets, head-dim offsets and mask, head column) of a program of a kernel
    that loops over a group of one-tile windows: group program_id(0), head program_id(1)."""
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    return tl.program_id(0), h, tl.arange(0, TILE), offs_d, offs_d < HEAD_DIM, h * HEAD_DIM


@triton.jit
def _region_mask(s, reg, SHIFTED: tl.constexpr):
    """The shifted-window mask (-100, in log2 units) on a tile whose queries and keys are the same tokens."""
    if SHIFTED:
        s = tl.where(reg[:, None] == reg[None, :], s, s + (-100.0 * 1.4426950408889634))
    return s


# ------------------------------------------------------------------------------------------------
# Forward: one program per (image * window, head, query block)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _key_block(q, q_f, q_reg, q_ok, start_n, win, img, QKV_BIAS, col, C, table_h, H, W, n_win_w,
               roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, s_h, s_w, s_t, offs_d, mask_d, qk_scale,
               WIN_H: tl.constexpr, WIN_W: tl.constexpr, BLOCK_N: tl.constexpr, HAS_TABLE: tl.constexpr,
               HAS_QKV_BIAS: tl.constexpr, SHIFTED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """K and V of key block ``start_n`` of window ``win`` and the query block's scores against it, in log2
    units with the relative position bias and the shifted-window region mask applied."""
    T0: tl.constexpr = (WIN_H - 1) * (2 * WIN_W - 1) + WIN_W - 1  # table row of the offset (0, 0)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_ok, k_in, k_y, k_x, k_f, k_reg = _tokens(offs_n, win, H, W, n_win_w, roll_h, roll_w, cut_h0, cut_h1,
                                               cut_w0, cut_w1, WIN_H, WIN_W)
    k_row = _rows(k_y, k_x, s_h, s_w)
    k = _load_part(img + C, QKV_BIAS + C + col, k_row, k_in, offs_d, mask_d, HAS_QKV_BIAS)
    v = _load_part(img + 2 * C, QKV_BIAS + 2 * C + col, k_row, k_in, offs_d, mask_d, HAS_QKV_BIAS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = _bias_and_mask(s, table_h, (q_f + T0) * s_t, -k_f * s_t, q_reg, k_reg, q_ok, k_ok, k_ok[None, :],
                       HAS_TABLE, SHIFTED)
    return k, v, s


@triton.jit
def _query_block(QKV, TABLE, s_b, s_th, n_win, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """This program's (b, head, window, query offsets in the window, offs_d, mask_d, head column, image base,
    head's table column): window program_id(0) (image-major), head program_id(1), query block program_id(2)."""
    pid_w = tl.program_id(0)
    h = tl.program_id(1)
    b = (pid_w // n_win).to(tl.int64)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col = h * HEAD_DIM
    return b, h, pid_w % n_win, offs_m, offs_d, offs_d < HEAD_DIM, col, QKV + b * s_b + col, TABLE + h * s_th


@triton.jit
def _window_attn_fwd(QKV, TABLE, QKV_BIAS, OUT, LSE,
                     s_b, s_h, s_w, o_b, o_h, o_w, l_b, l_h, l_w, s_t, s_th,
                     H, W, n_win, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, C, qk_scale,
                     WIN_H: tl.constexpr, WIN_W: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LSE: (B, H, W, heads) fp32, natural log, strides l_*."""
    N: tl.constexpr = WIN_H * WIN_W
    b, h, win, offs_m, offs_d, mask_d, col, img, table_h = _query_block(QKV, TABLE, s_b, s_th, n_win, HEAD_DIM,
                                                                       BLOCK_M, BLOCK_D)
    q_ok, q_in, q_y, q_x, q_f, q_reg = _tokens(offs_m, win, H, W, n_win_w, roll_h, roll_w, cut_h0, cut_h1,
                                               cut_w0, cut_w1, WIN_H, WIN_W)
    q = _load_part(img, QKV_BIAS + col, _rows(q_y, q_x, s_h, s_w), q_in, offs_d, mask_d, HAS_QKV_BIAS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        k, v, s = _key_block(q, q_f, q_reg, q_ok, start_n, win, img, QKV_BIAS, col, C, table_h, H, W, n_win_w,
                             roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, s_h, s_w, s_t, offs_d, mask_d,
                             qk_scale, WIN_H, WIN_W, BLOCK_N, HAS_TABLE, HAS_QKV_BIAS, SHIFTED, DOT_PRECISION)
        # The first key block holds token 0, which every query sees: m_new is finite from the start.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = OUT + b * o_b + col + _rows(q_y, q_x, o_h, o_w)[:, None] + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=q_in[:, None] & mask_d[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b * l_b + _rows(q_y, q_x, l_h, l_w) + h, lse, mask=q_in)


@triton.jit
def _window_attn_fwd_grouped(QKV, TABLE, QKV_BIAS, OUT, LSE,
                             s_b, s_h, s_w, o_b, o_h, o_w, l_b, l_h, l_w, s_t, s_th,
                             H, W, n_win, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, C,
                             total_windows, num_groups, qk_scale,
                             WIN_H: tl.constexpr, WIN_W: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
                             SHIFTED: tl.constexpr, DOT_PRECISION: tl.constexpr, TILE: tl.constexpr):
    """The forward of windows that fit one TILE-token tile, for windows grp, grp + num_groups, ... of one
    head: the bias tile is gathered once per program instead of once per window, and the softmax of a
    window's scores is a plain one (all keys in the tile). LSE as in :func:`_window_attn_fwd`."""
    grp, h, offs, offs_d, mask_d, col = _group_program(HEAD_DIM, BLOCK_D, TILE)
    bias = _window_bias(TABLE + h * s_th, s_t, offs, TILE, WIN_H, WIN_W, HAS_TABLE, False)
    for pid_w in range(grp, total_windows, num_groups):
        b, inside, y, x, reg, q, k, v = _window_qkv(QKV, QKV_BIAS, pid_w, col, s_b, s_h, s_w, offs, offs_d, mask_d,
                                                    H, W, n_win, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0,
                                                    cut_w1, C, WIN_H, WIN_W, HAS_QKV_BIAS)
        s = _region_mask(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias, reg, SHIFTED)
        m = tl.max(s, 1)  # finite: token 0 is a key every query sees
        p = tl.math.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION) / l[:, None]
        tl.store(OUT + b * o_b + col + _rows(y, x, o_h, o_w)[:, None] + offs_d[None, :], o.to(OUT.dtype.element_ty),
                 mask=inside[:, None] & mask_d[None, :])
        tl.store(LSE + b * l_b + _rows(y, x, l_h, l_w) + h, (m + tl.math.log2(l)) * 0.6931471805599453, mask=inside)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _window_attn_bwd_dq(QKV, TABLE, QKV_BIAS, DOUT, LSE, DELTA, DQKV,
                        s_b, s_h, s_w, d_b, d_h, d_w, l_b, l_h, l_w, g_b, g_h, g_w, s_t, s_th,
                        H, W, n_win, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, C, qk_scale,
                        sm_scale,
                        WIN_H: tl.constexpr, WIN_W: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq, and delta = rowsum(dO * O) saved per (token, head) for the dk/dv kernel. Strides: s_* qkv,
    d_* dout, l_* the lse/delta buffers, g_* dqkv. Padding queries (cropped: dO = 0) are skipped.

    delta is taken as rowsum(P * dP) (see _delta), not from the stored output, whose rounding to
    fp16/bf16 would leave dS and so dq/dk up to twice as far off: from the one key block when the window fits
    it, else in a first pass over the key blocks (two more dots per block, for windows over 64 tokens)."""
    N: tl.constexpr = WIN_H * WIN_W
    b, h, win, offs_m, offs_d, mask_d, col, img, table_h = _query_block(QKV, TABLE, s_b, s_th, n_win, HEAD_DIM,
                                                                       BLOCK_M, BLOCK_D)
    q_ok, q_in, q_y, q_x, q_f, q_reg = _tokens(offs_m, win, H, W, n_win_w, roll_h, roll_w, cut_h0, cut_h1,
                                               cut_w0, cut_w1, WIN_H, WIN_W)
    qd_mask = q_in[:, None] & mask_d[None, :]
    q = _load_part(img, QKV_BIAS + col, _rows(q_y, q_x, s_h, s_w), q_in, offs_d, mask_d, HAS_QKV_BIAS)
    do = tl.load(DOUT + b * d_b + col + _rows(q_y, q_x, d_h, d_w)[:, None] + offs_d[None, :], mask=qd_mask,
                 other=0.0)
    stat_off = b * l_b + _rows(q_y, q_x, l_h, l_w) + h
    # lse in log2 units; +inf for padding queries so their P is exactly 0.
    lse2 = tl.load(LSE + stat_off, mask=q_in, other=float("inf")) * 1.4426950408889634

    if N <= BLOCK_N:
        k, v, s = _key_block(q, q_f, q_reg, q_ok, 0, win, img, QKV_BIAS, col, C, table_h, H, W, n_win_w,
                             roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, s_h, s_w, s_t, offs_d, mask_d,
                             qk_scale, WIN_H, WIN_W, BLOCK_N, HAS_TABLE, HAS_QKV_BIAS, SHIFTED, DOT_PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        delta = _delta(tl.sum(p * dp, 1), tl.sum(p, 1))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    else:
        pdp = tl.zeros([BLOCK_M], tl.float32)
        p_sum = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            k, v, s = _key_block(q, q_f, q_reg, q_ok, start_n, win, img, QKV_BIAS, col, C, table_h, H, W,
                                 n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, s_h, s_w, s_t, offs_d,
                                 mask_d, qk_scale, WIN_H, WIN_W, BLOCK_N, HAS_TABLE, HAS_QKV_BIAS, SHIFTED,
                                 DOT_PRECISION)
            p = tl.math.exp2(s - lse2[:, None])
            pdp += tl.sum(p * tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION), 1)
            p_sum += tl.sum(p, 1)
        delta = _delta(pdp, p_sum)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            k, v, s = _key_block(q, q_f, q_reg, q_ok, start_n, win, img, QKV_BIAS, col, C, table_h, H, W,
                                 n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, s_h, s_w, s_t, offs_d,
                                 mask_d, qk_scale, WIN_H, WIN_W, BLOCK_N, HAS_TABLE, HAS_QKV_BIAS, SHIFTED,
                                 DOT_PRECISION)
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DELTA + stat_off, delta, mask=q_in)
    dq_ptrs = DQKV + b * g_b + col + _rows(q_y, q_x, g_h, g_w)[:, None] + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=qd_mask)


@triton.jit
def _window_attn_bwd_dkdv(QKV, TABLE, QKV_BIAS, DOUT, LSE, DELTA, DQKV, DTAB, DBIAS,
                          s_b, s_h, s_w, d_b, d_h, d_w, l_b, l_h, l_w, g_b, g_h, g_w, s_t, s_th,
                          H, W, n_win, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, C,
                          num_heads, total_windows, num_groups, qk_scale, sm_scale,
                          WIN_H: tl.constexpr, WIN_W: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
                          TABLE_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv (and the table / qkv-bias partial sums) for one key block, over windows grp, grp + num_groups...

    Tiles are transposed (keys x queries): the window's k and v are the MMA's left operands for all query
    chunks. DTAB (groups, heads, N, N) fp32, zeroed: this program adds the dS of its windows into
    DTAB[grp, h, :, key block]. DBIAS (groups * key blocks, 2, C) fp32: the padding keys' dk and dv sums."""
    N: tl.constexpr = WIN_H * WIN_W
    T0: tl.constexpr = (WIN_H - 1) * (2 * WIN_W - 1) + WIN_W - 1
    grp = tl.program_id(0)
    h = tl.program_id(1)
    kb = tl.program_id(2)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    col = h * HEAD_DIM
    table_h = TABLE + h * s_th
    dtab_base = DTAB + (grp * num_heads + h).to(tl.int64) * (N * N)

    dbias_k = tl.zeros([BLOCK_D], tl.float32)
    dbias_v = tl.zeros([BLOCK_D], tl.float32)
    # When one query chunk holds the whole window (7x7 and 8x8 windows with 64-token chunks), the program's
    # table-gradient slice is summed in registers over its windows and stored once at the end; otherwise each
    # chunk adds into the slice in memory.
    ONE_CHUNK: tl.constexpr = BLOCK_M >= N
    ds_sum = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for pid_w in range(grp, total_windows, num_groups):
        b = (pid_w // n_win).to(tl.int64)
        win = pid_w % n_win
        img = QKV + b * s_b + col
        k_ok, k_in, k_y, k_x, k_f, k_reg = _tokens(offs_n, win, H, W, n_win_w, roll_h, roll_w, cut_h0, cut_h1,
                                                   cut_w0, cut_w1, WIN_H, WIN_W)
        k_row = _rows(k_y, k_x, s_h, s_w)
        k = _load_part(img + C, QKV_BIAS + C + col, k_row, k_in, offs_d, mask_d, HAS_QKV_BIAS)
        v = _load_part(img + 2 * C, QKV_BIAS + 2 * C + col, k_row, k_in, offs_d, mask_d, HAS_QKV_BIAS)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ok, q_in, q_y, q_x, q_f, q_reg = _tokens(offs_m, win, H, W, n_win_w, roll_h, roll_w, cut_h0,
                                                       cut_h1, cut_w0, cut_w1, WIN_H, WIN_W)
            # Padding queries are cropped: their P is 0 (lse = +inf) and dO is 0, so they add nothing; their
            # q may be read as zeros.
            qd_mask = q_in[:, None] & mask_d[None, :]
            q = tl.load(img + _rows(q_y, q_x, s_h, s_w)[:, None] + offs_d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DOUT + b * d_b + col + _rows(q_y, q_x, d_h, d_w)[:, None] + offs_d[None, :],
                         mask=qd_mask, other=0.0)
            stat_off = b * l_b + _rows(q_y, q_x, l_h, l_w) + h
            lse2 = tl.load(LSE + stat_off, mask=q_in, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + stat_off, mask=q_in, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            st = _bias_and_mask(st, table_h, -k_f * s_t, (q_f + T0) * s_t, k_reg, q_reg, k_ok, q_ok,
                                k_ok[:, None], HAS_TABLE, SHIFTED)
            pt = tl.math.exp2(st - lse2[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
            if TABLE_GRAD:
                if ONE_CHUNK:  # dst is 0 outside the window (p = 0 there)
                    ds_sum += dst
                else:
                    # This program's own slice: load-add-store through one pointer tensor, then a barrier
                    # before the next window touches the same elements.
                    t_ptrs = dtab_base + offs_m[None, :] * N + offs_n[:, None]
                    t_mask = k_ok[:, None] & q_ok[None, :]
                    tl.store(t_ptrs, tl.load(t_ptrs, mask=t_mask, other=0.0) + dst, mask=t_mask)
                    tl.debug_barrier()
        dk = dk * sm_scale
        kv_ptrs = DQKV + b * g_b + C + col + _rows(k_y, k_x, g_h, g_w)[:, None] + offs_d[None, :]
        kv_mask = k_in[:, None] & mask_d[None, :]
        tl.store(kv_ptrs, dk.to(DQKV.dtype.element_ty), mask=kv_mask)
        tl.store(kv_ptrs + C, dv.to(DQKV.dtype.element_ty), mask=kv_mask)
        if BIAS_GRAD:
            pad = (k_ok & ~k_in)[:, None]
            dbias_k += tl.sum(tl.where(pad, dk, 0.0), 0)
            dbias_v += tl.sum(tl.where(pad, dv, 0.0), 0)
    if TABLE_GRAD and ONE_CHUNK:
        offs_q = tl.arange(0, BLOCK_M)
        tl.store(dtab_base + offs_q[None, :] * N + offs_n[:, None], ds_sum,
                 mask=(offs_n < N)[:, None] & (offs_q < N)[None, :])
    if BIAS_GRAD:
        dbias_ptrs = DBIAS + (grp * tl.num_programs(2) + kb).to(tl.int64) * (2 * C) + col + offs_d
        tl.store(dbias_ptrs, dbias_k, mask=mask_d)
        tl.store(dbias_ptrs + C, dbias_v, mask=mask_d)


@triton.jit
def _window_attn_bwd_fused(QKV, TABLE, QKV_BIAS, DOUT, LSE, DQKV, DTAB,
                           s_b, s_h, s_w, d_b, d_h, d_w, l_b, l_h, l_w, g_b, g_h, g_w, s_t, s_th,
                           H, W, n_win, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0, cut_w1, C,
                           num_heads, total_windows, num_groups, qk_scale, sm_scale,
                           WIN_H: tl.constexpr, WIN_W: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           HAS_TABLE: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, SHIFTED: tl.constexpr,
                           TABLE_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           TILE: tl.constexpr):
    """The whole backward of windows that fit one TILE-token tile (7x7, 8x8): dq, dk, dv and the table
    gradient's partial sum, for windows grp, grp + num_groups, ... of one head. (Not the qkv bias gradient of
    padding tokens: padded maps whose qkv bias needs a gradient take the two-kernel path.)

    With every query and key of a window in one tile, the scores are computed once (the two-kernel path
    computes them twice), and delta comes from the tile itself (``_delta``). DTAB (groups, heads, N, N)
    fp32: this program's dS summed over its windows, (query, key) order, every element stored."""
    N: tl.constexpr = WIN_H * WIN_W
    grp, h, offs, offs_d, mask_d, col = _group_program(HEAD_DIM, BLOCK_D, TILE)
    table_h = TABLE + h * s_th
    ds_sum = tl.zeros([TILE, TILE], tl.float32)
    # Tiles are transposed (keys x queries), as in the dk/dv kernel: P^T and dS^T are the left operands of dv
    # and dk in registers; only dq takes a transposed operand.
    bias_t = _window_bias(table_h, s_t, offs, TILE, WIN_H, WIN_W, HAS_TABLE, True)
    for pid_w in range(grp, total_windows, num_groups):
        b, inside, y, x, reg, q, k, v = _window_qkv(QKV, QKV_BIAS, pid_w, col, s_b, s_h, s_w, offs, offs_d, mask_d,
                                                    H, W, n_win, n_win_w, roll_h, roll_w, cut_h0, cut_h1, cut_w0,
                                                    cut_w1, C, WIN_H, WIN_W, HAS_QKV_BIAS)
        # Padding queries are cropped: dO = 0 and lse = +inf (P = 0), so they add nothing.
        inside_d = inside[:, None] & mask_d[None, :]
        do = tl.load(DOUT + b * d_b + col + _rows(y, x, d_h, d_w)[:, None] + offs_d[None, :], mask=inside_d,
                     other=0.0)
        lse2 = tl.load(LSE + b * l_b + _rows(y, x, l_h, l_w) + h, mask=inside, other=float("inf"))
        st = _region_mask(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale + bias_t, reg, SHIFTED)
        pt = tl.math.exp2(st - lse2[None, :] * 1.4426950408889634)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta = _delta(tl.sum(pt * dpt, 0), tl.sum(pt, 0))
        dst = pt * (dpt - delta[None, :])
        if TABLE_GRAD:
            ds_sum += dst  # 0 outside the window (P = 0 there)
        # Each gradient is stored as soon as it is computed (fewer tiles live at once).
        g_ptrs = DQKV + b * g_b + col + _rows(y, x, g_h, g_w)[:, None] + offs_d[None, :]
        dv = tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        tl.store(g_ptrs + 2 * C, dv.to(DQKV.dtype.element_ty), mask=inside_d)
        dk = tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION) * sm_scale
        tl.store(g_ptrs + C, dk.to(DQKV.dtype.element_ty), mask=inside_d)
        dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
        tl.store(g_ptrs, dq.to(DQKV.dtype.element_ty), mask=inside_d)
    if TABLE_GRAD:
        dtab_base = DTAB + (grp * num_heads + h).to(tl.int64) * (N * N)
        tl.store(dtab_base + offs[None, :] * N + offs[:, None], ds_sum, mask=(offs < N)[:, None] & (offs < N)[None, :])


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _geometry(qkv, num_heads, window, shift, table):
    """Shapes and the runtime scalars shared by the kernels: map size, window grid, roll, region cuts."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    (wh, ww), (sh, sw) = window, shift
    n_h, n_w = triton.cdiv(H, wh), triton.cdiv(W, ww)
    pad_h, pad_w = n_h * wh, n_w * ww
    scalars = dict(H=H, W=W, n_win=n_h * n_w, n_win_w=n_w, roll_h=sh % H, roll_w=sw % W,
                   cut_h0=pad_h - wh if sh else pad_h, cut_h1=pad_h - sh, cut_w0=pad_w - ww if sw else pad_w,
                   cut_w1=pad_w - sw, C=C)
    table_strides = table.stride() if table is not None else (0, 0)
    return B, H, W, C, C // num_heads, n_h * n_w, scalars, table_strides


def _check_limits(head_dim, *tensors):
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim}: the Triton window kernels support head dims up to {MAX_HEAD_DIM}; "
                         f"use backend='torch'")
    for t in tensors:
        if (t.shape[1] - 1) * t.stride(1) + (t.shape[2] - 1) * t.stride(2) + t.shape[3] >= 2 ** 31:
            raise ValueError(f"one image of a {tuple(t.shape)} tensor spans 2^31 elements or more, which the "
                             f"kernels' int32 in-image offsets do not cover")


def _flags(qkv, table, qkv_bias, window, shift, head_dim):
    block_d = block_sizes(window, head_dim)[1]
    return dict(WIN_H=window[0], WIN_W=window[1], HEAD_DIM=head_dim, BLOCK_D=block_d,
                HAS_TABLE=table is not None, HAS_QKV_BIAS=qkv_bias is not None, SHIFTED=any(shift),
                DOT_PRECISION=_dot_precision(qkv.dtype))


def forward(qkv, table, qkv_bias, num_heads: int, window, shift, scale: float, config=None, grouped_cfg=None,
            groups=None):
    """Launch the forward. Returns ``(out, lse)``: out contiguous ``(B, H, W, C)`` in qkv's dtype, lse
    ``(B, H, W, heads)`` fp32 (natural log-sum-exp of each token's scores, for the backward).

    Windows that fit one tile take ``_window_attn_fwd_grouped`` (config :func:`fwd_grouped_config` or
    ``grouped_cfg``; ``groups`` window groups, default about FWD_PROGRAMS_PER_SM programs per SM); others, or
    any call given ``config`` (the per-window kernel's), the per-window ``_window_attn_fwd``."""
    B, H, W, C, D, n_win, scalars, (s_t, s_th) = _geometry(qkv, num_heads, window, shift, table)
    out = torch.empty((B, H, W, C), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, W, num_heads), device=qkv.device, dtype=torch.float32)
    _check_limits(D, qkv, out)
    qkv_bias = qkv_bias.contiguous() if qkv_bias is not None else None
    if grouped_cfg is None and config is None:
        grouped_cfg = fwd_grouped_config(window, D, qkv.dtype)
    if grouped_cfg is not None:
        tile, warps, stages = grouped_cfg
        groups = groups or _num_groups(B * n_win, num_heads, FWD_PROGRAMS_PER_SM)
        _window_attn_fwd_grouped[(groups, num_heads)](
            qkv, table if table is not None else qkv, qkv_bias if qkv_bias is not None else qkv, out, lse,
            *qkv.stride()[:3], *out.stride()[:3], *lse.stride()[:3], s_t, s_th,
            **scalars, total_windows=B * n_win, num_groups=groups, qk_scale=scale * LOG2E,
            **_flags(qkv, table, qkv_bias, window, shift, D), TILE=tile, num_warps=warps, num_stages=stages,
        )
        return out, lse
    bm, bn, warps, stages = config or fwd_config(window, D, qkv.dtype)
    grid = (B * n_win, num_heads, triton.cdiv(window[0] * window[1], bm))
    _window_attn_fwd[grid](
        qkv, table if table is not None else qkv, qkv_bias if qkv_bias is not None else qkv, out, lse,
        *qkv.stride()[:3], *out.stride()[:3], *lse.stride()[:3], s_t, s_th,
        **scalars, qk_scale=scale * LOG2E, **_flags(qkv, table, qkv_bias, window, shift, D),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return out, lse


def backward(dout, qkv, table, qkv_bias, lse, num_heads: int, window, shift, scale: float,
             table_grad: bool, bias_grad: bool, dq_cfg=None, dkdv_cfg=None, groups=None, fused_cfg=None):
    """Launch the backward. Returns ``(dqkv, dtable, dqkv_bias)``: dqkv contiguous ``(B, H, W, 3C)`` in
    qkv's dtype; dtable ``(T, heads)`` in the table's dtype when ``table_grad`` else None; dqkv_bias
    ``(3C,)`` in the bias's dtype when ``bias_grad`` else None (its q third is zero, as padding queries are
    cropped; all of it is zero when nothing is padded).

    One kernel (``_window_attn_bwd_fused``, config :func:`fused_config` or ``fused_cfg``) where
    :func:`fused_config` has an entry (fp16/bf16 windows of at most 64 tokens) and no padded map needs a
    qkv bias gradient, else the dq and dk/dv kernels; giving ``dq_cfg`` or ``dkdv_cfg`` (their configs)
    asks for the latter. ``groups``: window groups of the fused or dk/dv kernel (default: about PROGRAMS_PER_SM
    programs per SM)."""
    B, H, W, C, D, n_win, scalars, (s_t, s_th) = _geometry(qkv, num_heads, window, shift, table)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dqkv = torch.empty((B, H, W, 3 * C), device=qkv.device, dtype=qkv.dtype)
    _check_limits(D, qkv, dout, dqkv)
    N = window[0] * window[1]
    table_grad = table_grad and table is not None
    bias_grad = bias_grad and qkv_bias is not None
    pad_bias_grad = bias_grad and (H % window[0] != 0 or W % window[1] != 0)
    qkv_bias_c = qkv_bias.contiguous() if qkv_bias is not None else None
    flags = _flags(qkv, table, qkv_bias, window, shift, D)

    f32 = dict(device=qkv.device, dtype=torch.float32)
    if fused_cfg is not None and pad_bias_grad:
        raise ValueError("fused_cfg: the one-kernel backward does not compute the qkv bias gradient of padded maps")
    if fused_cfg is None and dq_cfg is None and dkdv_cfg is None and not pad_bias_grad:
        fused_cfg = fused_config(window, D, qkv.dtype)
    if fused_cfg is not None:
        tile, warps, stages = fused_cfg
        groups = groups or _num_groups(B * n_win, num_heads)
        dtab = torch.empty((groups, num_heads, N, N), **f32) if table_grad else None
        _window_attn_bwd_fused[(groups, num_heads)](
            qkv, table if table is not None else qkv, qkv_bias_c if qkv_bias_c is not None else qkv, dout, lse,
            dqkv, dtab if dtab is not None else dqkv,
            *qkv.stride()[:3], *dout.stride()[:3], *lse.stride()[:3], *dqkv.stride()[:3], s_t, s_th,
            **scalars, num_heads=num_heads, total_windows=B * n_win, num_groups=groups, qk_scale=scale * LOG2E,
            sm_scale=scale, **flags, TABLE_GRAD=table_grad, TILE=tile, num_warps=warps, num_stages=stages,
        )
        return finish_backward(dqkv, dtab, None, table, qkv_bias, window, C, f32, table_grad, bias_grad, False)

    delta = torch.empty_like(lse)
    bm, bn, warps, stages = dq_cfg or dq_config(window, D, qkv.dtype)
    _window_attn_bwd_dq[(B * n_win, num_heads, triton.cdiv(N, bm))](
        qkv, table if table is not None else qkv, qkv_bias_c if qkv_bias_c is not None else qkv, dout, lse, delta,
        dqkv, *qkv.stride()[:3], *dout.stride()[:3], *lse.stride()[:3], *dqkv.stride()[:3],
        s_t, s_th, **scalars, qk_scale=scale * LOG2E, sm_scale=scale, **flags,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )

    bm, bn, warps, stages = dkdv_cfg or dkdv_config(window, D, qkv.dtype)
    n_kb = triton.cdiv(N, bn)
    groups = groups or _num_groups(B * n_win, num_heads * n_kb)
    # With one query chunk per window the kernel stores every element of its slice once (no zeroing needed).
    dtab = (torch.empty if bm >= N else torch.zeros)((groups, num_heads, N, N), **f32) if table_grad else None
    dbias = torch.empty((groups * n_kb, 2, C), **f32) if pad_bias_grad else None
    _window_attn_bwd_dkdv[(groups, num_heads, n_kb)](
        qkv, table if table is not None else qkv, qkv_bias_c if qkv_bias_c is not None else qkv, dout, lse, delta,
        dqkv, dtab if dtab is not None else dqkv, dbias if dbias is not None else dqkv,
        *qkv.stride()[:3], *dout.stride()[:3], *lse.stride()[:3], *dqkv.stride()[:3], s_t, s_th,
        **scalars, num_heads=num_heads, total_windows=B * n_win, num_groups=groups, qk_scale=scale * LOG2E,
        sm_scale=scale, **flags,
        TABLE_GRAD=table_grad, BIAS_GRAD=pad_bias_grad,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return finish_backward(dqkv, dtab, dbias, table, qkv_bias, window, C, f32, table_grad, bias_grad,
                            pad_bias_grad)


def finish_backward(dqkv, dtab, dbias, table, qkv_bias, window, C, f32, table_grad, bias_grad, pad_bias_grad):
    """Reduce the kernels' per-program partial sums: the table gradient binned by relative offset, the qkv
    bias's (its q third zero). Also finishes the CUDA backward (csrc/window_attention.cu), whose partial sums
    have the same layout: dtab ``(groups, heads, N, N)``, dbias ``(groups, 2, C)``."""
    dtable = _bin_by_offset(dtab.sum(0), window).to(table.dtype) if table_grad else None
    dqkv_bias = None
    if bias_grad:
        kv = dbias.sum(0).flatten() if pad_bias_grad else torch.zeros(2 * C, **f32)
        dqkv_bias = torch.cat((kv.new_zeros(C), kv)).to(qkv_bias.dtype)
    return dqkv, dtable, dqkv_bias


@functools.lru_cache(maxsize=None)
def _offset_bins(win_h: int, win_w: int, device: torch.device):
    """``(T, N)`` indices into a flattened ``(N, N)`` tile with one zero slot appended at N*N: row t lists
    the pairs (n, m) whose relative offset has table row t (timm's relative_position_index), padded with N*N."""
    N = win_h * win_w
    f = (torch.arange(N) // win_w) * (2 * win_w - 1) + torch.arange(N) % win_w
    index = (f[:, None] - f[None, :] + (win_h - 1) * (2 * win_w - 1) + win_w - 1).flatten()
    T = (2 * win_h - 1) * (2 * win_w - 1)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=T)
    starts = torch.cumsum(counts, 0) - counts
    sorted_t = index[order]
    bins = torch.full((T, N), N * N, dtype=torch.long)
    bins[sorted_t, torch.arange(N * N) - starts[sorted_t]] = order
    return bins.to(device)


def _bin_by_offset(ds_sum, window):
    """(heads, N, N) summed dS -> contiguous (T, heads) table gradient, by a gather and a sum (deterministic)."""
    heads = ds_sum.shape[0]
    flat = torch.cat((ds_sum.reshape(heads, -1), ds_sum.new_zeros(heads, 1)), dim=1)
    return flat[:, _offset_bins(window[0], window[1], ds_sum.device)].sum(-1).t().contiguous()


def aot_specs():
    """Every shipped config of this file's kernels, for the compile check without a GPU.

    Per tiling (windows 7 and 8: one 64-token tile; 8x12 and 12x12: several) and head-dim bucket (32, Swin's;
    64), each kernel a GPU launch may take there, per arch, with every feature on (table, qkv bias,
    shifted-window mask, table and bias gradients): the grouped forward and the one-kernel backward where
    they have a config, the per-window forward where not, and the dq + dk/dv kernels always (padded maps
    with a qkv bias gradient take them at any window); bf16 for Swin's windows 7 and 12 at head dim 32 (and
    a masked head dim, 48), fp32 (IEEE dots) for each head-dim bucket, and small windows (4x4: 16-token
    tiles; head dim 16). Pointers are 16-byte aligned, and so are the strides and the channel count when the
    channels are multiples of 16 (contiguous torch tensors). The fp16/bf16 forwards with a 64-token tile must
    use wgmma.
    """
    from dlcv_fast.aot import AotSpec, shipped_configs, signature_of

    cases = [("fp16", w, d) for w in ((7, 7), (8, 8), (8, 12), (12, 12)) for d in (32, 64)]
    cases += [("bf16", (7, 7), 32), ("bf16", (12, 12), 32), ("bf16", (7, 7), 48), ("fp32", (7, 7), 32),
              ("fp32", (12, 12), 64), ("fp32", (8, 8), 64), ("fp16", (4, 4), 32), ("fp16", (7, 7), 16)]
    aligned = ("C", "s_b", "s_h", "s_w", "o_b", "o_h", "o_w", "d_b", "d_h", "d_w", "g_b", "g_h", "g_w")
    specs = []
    for dtype, window, d in cases:
        torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        types = {name: "*" + dtype for name in ("QKV", "OUT", "DOUT", "DQKV")}
        types.update(TABLE="*fp32", QKV_BIAS="*fp32", LSE="*fp32", DELTA="*fp32", DTAB="*fp32", DBIAS="*fp32",
                     qk_scale="fp32", sm_scale="fp32")
        feats = dict(WIN_H=window[0], WIN_W=window[1], HEAD_DIM=d, BLOCK_D=block_sizes(window, d)[1],
                     HAS_TABLE=True, HAS_QKV_BIAS=True, SHIFTED=True,
                     DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        grads = dict(TABLE_GRAD=True, BIAS_GRAD=True)
        launches = []
        grouped = {arch: shipped_configs(fwd_grouped_config, window, d, torch_dtype, arch) for arch in (90, 80)}
        for cfg in dict.fromkeys(c for c in grouped.values() if c is not None):
            tile, warps, stages = cfg
            launches.append((_window_attn_fwd_grouped, (None, None, warps, stages), dict(TILE=tile),
                             tuple(a for a, c in grouped.items() if c == cfg)))
        if None in grouped.values():
            launches.append((_window_attn_fwd, shipped_configs(fwd_config, window, d, torch_dtype), {},
                             tuple(a for a, c in grouped.items() if c is None)))
        fused = {arch: shipped_configs(fused_config, window, d, torch_dtype, arch) for arch in (90, 80)}
        for cfg in dict.fromkeys(c for c in fused.values() if c is not None):
            tile, warps, stages = cfg
            launches.append((_window_attn_bwd_fused, (None, None, warps, stages), dict(TABLE_GRAD=True, TILE=tile),
                             tuple(a for a, c in fused.items() if c == cfg)))
        # the dq + dk/dv kernels: where no fused config is shipped, and for padded maps whose qkv bias needs
        # a gradient (any window)
        launches.append((_window_attn_bwd_dq, shipped_configs(dq_config, window, d, torch_dtype), {}, None))
        per_arch = {arch: shipped_configs(dkdv_config, window, d, torch_dtype, arch) for arch in (90, 80)}
        for cfg in dict.fromkeys(per_arch.values()):
            archs = tuple(a for a, c in per_arch.items() if c == cfg)
            launches.append((_window_attn_bwd_dkdv, cfg, grads, archs))
        for fn, (bm, bn, warps, stages), extra, archs in launches:
            constexprs = dict(feats, **extra)
            if bm is not None:
                constexprs.update(BLOCK_M=bm, BLOCK_N=bn)
            sig = signature_of(fn, constexprs, types)
            divisible = [a for a, t in sig.items() if t.startswith("*")]
            if d % 16 == 0:
                divisible += [a for a in sig if a in aligned]
            variant = f"{dtype} win{window[0]}x{window[1]} d{d}"
            wgmma = dtype != "fp32" and (fn is _window_attn_fwd_grouped and constexprs["TILE"] == 64
                                         or fn is _window_attn_fwd and bm == 64)
            specs.append(AotSpec(fn.__name__, variant, fn, sig, constexprs, warps, stages, tuple(divisible),
                                 expect_wgmma=wgmma, archs=None if archs is None or len(archs) == 2 else archs))
    return specs
