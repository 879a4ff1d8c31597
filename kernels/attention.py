"""Flash attention in Triton: forward and backward, with masks computed from indices.

One kernel family serves every dense attention of the models: self- and cross-attention, MHA/GQA/MQA,
``causal`` (top-left aligned), ``prefix_len`` (prefix-LM), a boolean ``key_padding_mask (B, Lk)`` and an
additive ``attn_bias`` broadcastable to ``(B, H, Lq, Lk)`` (zero strides honoured, never expanded in memory).

Layout: q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D)``, any strides with a unit last stride. The head dim is
padded to a power of two *inside* the kernel with masked loads, so D = 40, 72, 80, 160 need no copy.

Numerics: scores are scaled by ``scale * log2(e)`` so the online softmax runs on ``exp2``; the running
max, the sum and the output accumulator are fp32. The log-sum-exp is saved in natural-log units, ``-inf``
for a fully masked row (whose output and gradients are zero). fp16/bf16 inputs use tensor-core dots with
fp32 accumulation; fp32 inputs use full-precision IEEE fp32 dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set, in which case they use TF32 like torch's own matmuls.

Backward (FA2 split): one small kernel computes ``delta = rowsum(dO * O)``; a dK/dV kernel walks the query
blocks for one key block (summing over the query heads of a GQA group itself, so no atomics); a dQ kernel
walks the key blocks for one query block. Everything is deterministic: no atomics anywhere. When the bias
needs a gradient, the dK/dV kernel also writes dS, the gradient of the scores, into a (B, Hq, Lq, Lk) fp32
buffer that the op layer reduces to the bias's own shape.

Blocks that a mask removes entirely are skipped: causal/prefix limits bound the loops, and a key padding
mask bounds them to the span of kept keys (read once per program; no branch inside the loop, which would
stop software pipelining). ``rope=`` rotates q and k with the standalone RoPE kernel (one pass each) before
the launch: on an H200 that was faster than rotating q in the kernel's prologue (benchmarks.tune). With
``ROPE_IN_KERNEL`` (off by default, untimed) the forward rotates them itself, q once per program and each key
block as it is loaded, as half-width tiles whose scores are two chained dots (:func:`_rope_halves`).

TMA (``KV_TMA`` forward, ``BWD_TMA`` backward; on by default for long sequences, where an H200 ran them
faster: :func:`_tma_by_default`): the blocks a kernel loops over (K/V
in the forward and the dQ kernel, Q/dO in the dK/dV kernel) can come through 4-D (B, H, L, D) tensor
descriptors instead of pointer tiles, out-of-bounds rows and head-dim columns zero-filled by the copy engine.
Results are bitwise equal to the pointer path's; the backward's dK/dV tiles spill far less with them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from dlcv_fast.kernels import rope as rope_kernels
from dlcv_fast.kernels.exp2 import _exp2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------------------------
# Configs as data: (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim and feature "kind", chosen
# with the AOT compile check (python -m benchmarks.compile_report): every entry compiles for its arch within
# its shared memory and, except the backward tiles measured fastest on a GPU (see below; each listed in
# tests/kernels/aot_known_problems.txt), with no register spill. Kinds: "plain" (any of causal / prefix /
# key padding), "bias" (an additive bias too; its tile is one more (BLOCK_M, BLOCK_N) fp32 operand in the
# loop, so it gets smaller tiles). fp32 inputs use IEEE fp32 dots, several times the registers of a
# tensor-core dot, hence their own small tiles. Each forward entry is
# (long, short[, few keys]): the short one (BLOCK_M = 64) is taken when the long one would give under two
# waves of programs, the few-keys one (where there is one) instead of the long one for FEW_KEYS keys. Hopper
# (sm_90) and Ampere (sm_80, also used for other pre-Hopper GPUs) differ where a tile spills on one of them. Under the interpreter one small config is used so tests are quick and cross several blocks.
# ------------------------------------------------------------------------------------------------

_W8 = (128, 64, 8, 3)
_FWD_SMALL = dict.fromkeys(("plain", "bias"), (_W8, (64, 64, 4, 3)))  # head dims 16, 32, 64
_FWD_SMALL_80 = dict(_FWD_SMALL, plain=((128, 64, 4, 3), (64, 64, 4, 3)))
# sm_90, head dim 64, no bias: a third, "few keys" tile (FEW_KEYS). At ViT-B/16's 197 keys (B=256, 12 heads,
# bf16) 128 x 32 with 4 warps took 0.182 ms against 0.194 for the long tile (H200, 2026-11-29T2207 tune);
# at the U-Net's 77 keys it was 1% slower, at 4096 keys 29% slower, so it is kept to 129-256 keys.
_FWD_64_90 = dict(_FWD_SMALL, plain=(_W8, (64, 64, 4, 3), (128, 32, 4, 3)))
FEW_KEYS = (129, 256)
FWD_TABLE = {
    90: {16: _FWD_SMALL, 32: _FWD_SMALL, 64: _FWD_64_90,
         128: dict(plain=(_W8, (64, 64, 4, 2)), bias=((64, 32, 8, 2),) * 2),
         256: dict(plain=((64, 64, 8, 2),) * 2, bias=((32, 32, 8, 2),) * 2)},
    80: {16: _FWD_SMALL_80, 32: _FWD_SMALL_80, 64: _FWD_SMALL,
         128: dict(plain=((64, 64, 8, 2),) * 2, bias=((64, 32, 8, 2),) * 2),
         256: dict(plain=((64, 32, 8, 2),) * 2, bias=((32, 32, 8, 2),) * 2)},
}
# Head dims below their padded bucket (40, 80, 160: masked head-dim loads) where the bucket's entry spills:
# 160 on both archs; 80 on sm_90, whose short tile 64x64 w4 spills 24 B with causal + key padding once the
# softmax scale is folded into the exponent's FMA (8 warps: none).
_UNEVEN_256 = {256: dict(plain=((32, 64, 8, 2),) * 2)}
FWD_UNEVEN = {90: {**_UNEVEN_256, 128: dict(plain=(_W8, (64, 64, 8, 2)))}, 80: _UNEVEN_256}
FWD_FP32 = (32, 32, 8, 1)
# Backward: (dK/dV kernel config, dQ kernel config) per arch, padded head dim and kind ("plain" or "bias":
# the dK/dV kernel then also writes dS). sm_90 from python -m benchmarks.tune on an H200 (triton 3.6;
# benchmarks/results/2026-11-27T2115_nvidia-h200_tune.jsonl): 4 warps and 64x64 tiles for both kernels were
# the fastest candidates at head dims 64 and 128 (backward 4.5 / 3.6 ms against 11.3 / 9.6 ms with the
# previous dK/dV tiles 64x32 w8 / 32x64 w8), though the dK/dV one spills up to 784 B (listed, with the reason,
# in tests/kernels/aot_known_problems.txt).
# Several tiles with BLOCK_M < BLOCK_N (dK/dV 32x64 w8, 32x128, 16x64) returned wrong gradients on the GPU
# although the interpreter and the AOT compile accept them: no shipped dK/dV tile has that shape. The bias
# kind's dK/dV tile (one more score-sized operand, and the dS store) is 64x32 w8, which passed the same
# parity sweep and spills less than 64x64 w4 with the bias. sm_80 (no GPU measurement yet) takes 64x32 w8
# for both kernels: the tile shape that passed everywhere on the H200, with the fewest spills in the sm_80
# AOT compile.
_BWD_90 = dict(plain=((64, 64, 4, 2), (64, 64, 4, 3)), bias=((64, 32, 8, 2), (64, 64, 4, 3)))  # head dims <= 64
_BWD_90_128 = dict(plain=((64, 64, 4, 2), (64, 64, 4, 2)), bias=((64, 32, 8, 2), (64, 64, 4, 2)))
_BWD_80 = dict.fromkeys(("plain", "bias"), ((64, 32, 8, 2), (64, 32, 8, 2)))
_BWD_256 = dict(plain=((32, 32, 8, 1), (32, 32, 4, 1)), bias=((32, 32, 8, 1), (32, 32, 4, 1)))
BWD_TABLE = {
    90: {16: _BWD_90, 32: _BWD_90, 64: _BWD_90, 128: _BWD_90_128, 256: _BWD_256},
    80: {16: _BWD_80, 32: _BWD_80, 64: _BWD_80, 128: _BWD_80, 256: _BWD_256},
}
# The dK/dV kernel's tiles for its key-major orientation (BWD_KEY_MAJOR, off by default; the dQ kernel keeps
# BWD_TABLE's). Its transposed tiles feed the dV and dK dots from registers, with no shared-memory transpose,
# and their accumulators sit in a different layout, so other tiles fit: on sm_90 64x128 w8 (64 queries x 128
# keys, FlashAttention-3's head-dim-64 shape) compiles with no spill at head dim 64, 32x128 w8 at 128, where
# every query-major tile that was timed spills (104-784 B). Chosen by the AOT compile alone (fewest spills,
# wgmma on sm_90; the query-split variants' spills are listed in tests/kernels/aot_known_problems.txt): no GPU
# has timed them yet (benchmarks.tune rows "dkdv key-major"). Head dim 256 keeps BWD_TABLE's tiles.
_BWD_KM_90 = dict(plain=(64, 128, 8, 2), bias=(32, 128, 8, 2))
_BWD_KM_80 = dict(plain=(32, 128, 8, 2), bias=(32, 32, 4, 2))
BWD_KM_TABLE = {
    90: {16: _BWD_KM_90, 32: _BWD_KM_90, 64: _BWD_KM_90, 128: dict(plain=(32, 128, 8, 2), bias=(32, 64, 8, 2))},
    80: {16: _BWD_KM_80, 32: _BWD_KM_80, 64: _BWD_KM_80, 128: dict(plain=(32, 64, 8, 2), bias=(32, 32, 8, 2))},
}
BWD_FP32 = ((16, 32, 4, 1), (16, 32, 4, 1))
BWD_FP32_KM = (16, 16, 4, 1)  # fp32 key-major dK/dV: 16x32 spilled 8-40 B on sm_80
# With dQ (and delta) written by the key-major dK/dV kernel (all keys in one key block), the fp32 dQ tile comes
# on top of the dK and dV accumulators. At the table's query rows the sm_90 plain tiles up to head dim 64 (CLIP
# text, U-Net cross-attention at 40: 64x128 w8) compile with no spill; the others spilled 12-200 B where
# checked (sm_80 plain 32x128: 72-132 B; bias tiles, which also write dS; larger head dims), so they step this
# many query rows.
FUSED_DQ_BLOCK_M = 16
INTERPRETER_CONFIG = (32, 32, 4, 1)
TAIL_N = 16  # the forward's last key block when only a few keys are left (key_tail)
EXP_EMU = 0  # the forward's exp2 split between MUFU and the FP32 pipes (see _exp2); off: slower on an H200 (2026-11-29)
# TMA descriptor loads: True / False force them on (where usable) / off; None (default) = where they were
# measured faster (:func:`_tma_by_default`).
KV_TMA = None  # the forward's K/V through TMA tensor descriptors (sm_90+, fp16/bf16)
BWD_TMA = None  # the backward's Q/dO (dK/dV kernel) and K/V (dQ kernel) by TMA descriptors
# The automatic choice (None above): on an H200 (benchmarks/results/2026-11-29T2207_nvidia-h200_tune.jsonl and
# the 2026-11-29T2205 benchmarks, bf16, triton 3.6), TMA loads were faster at 4096 x 4096, forward 1.32 vs 1.39
# ms (head dim 64) and 1.12 vs 1.24 ms (128), backward 4.25 vs 4.37 and 3.45 vs 3.77 ms, causal or not (the
# causal forward at 64 within 1.5%); slower where the pointer path takes its 16-key tail block (ViT's 197
# keys, the Q-Former's 257, the U-Net's 77: up to 7%). So: no bias, padded head dim 64 or 128, both sides at
# least this long, and no tail block.
TMA_MIN_LEN = 1024
BWD_KEY_MAJOR = False  # the dK/dV kernel's tiles computed transposed everywhere: 6.02 vs 5.66 ms at 4096 tokens (H200)
# RoPE inside the forward (``rope=``; :func:`_rope_halves`) instead of a rotation pass over q and one over k before
# it. The passes move q and k through memory twice more, which is what rope= cost at ViT's 197 tokens on an H200
# (+44% at head dim 64, 2026-11-29T2230). In the kernel, q is rotated once per program and each K block as it is
# loaded, once per query block that visits it: little extra work where a query block holds most or all of a
# head's queries (short sequences: ROPE_TILE's 256 rows hold ViT's 197 at head dim 64), Lq / BLOCK_M times the
# passes' rotations at long ones; there "q" rotates q alone in the kernel (once per program, then the plain loop,
# TMA loads included) and k by its pass, halving the passes' traffic. ROPE_IN_KERNEL: True = q and k in the
# kernel wherever it can (see rope_in_kernel_problem), "q" = q in the kernel and k by a pass, None = True up to
# ROPE_KERNEL_MAX_LEN queries and "q" beyond, False = never (the two passes). False until a GPU has timed it
# (benchmarks.tune groups rope64 / rope128, the attn_rope_fwd benchmark's dlcv_fast.rope_in_kernel provider).
ROPE_IN_KERNEL = False
ROPE_KERNEL_MAX_LEN = 256
# The in-kernel RoPE forward's (BLOCK_M, BLOCK_N, num_warps, num_stages) per arch and head dim, from the AOT
# compile check (no spill with or without causal + key padding and the tail block; wgmma on sm_90): 256 query
# rows at head dims 32 and 64; at 128 the 256-row tiles spill (16 warps: up to 436 B) and 128 x 32 w8 spills
# on sm_80 (52 B), hence 128 and 64 rows there.
ROPE_TILE = {90: {32: (256, 32, 8, 3), 64: (256, 32, 8, 3), 128: (128, 32, 8, 3)},
             80: {32: (256, 32, 8, 3), 64: (256, 32, 8, 3), 128: (64, 32, 4, 2)}}
# ROPE_IN_KERNEL "q" takes the plain forward's tiles, except where q's rotation made one spill (AOT): on sm_80 at
# head dim 32 the long tile 128 x 64 w4 spilled 16 B with the tail block, so the short tile serves every length.
ROPE_Q_TILE = {80: {32: (64, 64, 4, 3)}}
# Triton's warp specialization of the forward's key loop (``tl.range(..., warp_specialize=True)``: producer warps
# issue the TMA loads, FlashAttention-3's structure, left to the compiler). The pass takes one loop whose dots
# are fed by TMA loads only, so this path reads Q by TMA too, takes no key padding, bias or tail block, needs a
# key count that is a multiple of BLOCK_N, and with causal masks every block of its one loop (not only the
# diagonal ones); on sm_90 it compiles only at 64-row tiles (12 warps).
# FWD_WARP_SPEC True = wherever it can; False (default) = never: untimed on a GPU (benchmarks.tune --only
# wsfwd times it beside the shipped forward and benchmarks/ws_probe.py's minimal loop).
FWD_WARP_SPEC = False
FWD_WS_TABLE = {64: (64, 128, 4, 2), 128: (64, 128, 4, 2)}  # sm_90, AOT: no spill, setmaxnreg, 90 / 164 KB
TMA_MAX_HEAD_DIM = 128  # TMA paths at larger head dims (160, 256 buckets) are not compile-checked: pointer loads
DQ_TAIL_MAX_BLOCK_D = 64  # the dQ kernel's sm_90 64x64 w4 tile spilled 16-64 B with a tail block at 128
ARCHS = (90, 80)


def table_arch(arch=None) -> int:
    """The config table for a compute capability ``major * 10 + minor`` (the current device's by default):
    90 for Hopper and later, 80 below."""
    if arch is None:
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        arch = major * 10 + minor
    return 90 if arch >= 90 else 80


def fwd_configs(block_d: int, dtype=torch.float16, kind: str = "plain", arch=None, uneven: bool = False):
    """Configs the forward launcher may use: ``[long, short]`` or ``[long, short, few keys]`` (fewer when they
    coincide; :func:`_pick` chooses). ``uneven``: the head dim is below ``block_d``."""
    if _interpreting():
        return [INTERPRETER_CONFIG]
    if dtype == torch.float32:
        return [FWD_FP32]
    arch = table_arch(arch)
    entry = FWD_TABLE[arch][block_d][kind]
    if uneven:
        entry = FWD_UNEVEN[arch].get(block_d, {}).get(kind, entry)
    return list(dict.fromkeys(entry))


def bwd_configs(block_d: int, dtype=torch.float16, kind: str = "plain", arch=None, uneven: bool = False,
                key_major: bool = False):
    """``(dK/dV config, dQ config)`` of the backward launcher; ``key_major``: the dK/dV kernel's key-major tile
    from :data:`BWD_KM_TABLE` where it has one. ``uneven`` (the head dim is below ``block_d``) is accepted for
    symmetry with :func:`fwd_configs`; no backward entry needs an override for it."""
    if _interpreting():
        return (INTERPRETER_CONFIG, INTERPRETER_CONFIG)
    if dtype == torch.float32:
        return (BWD_FP32_KM, BWD_FP32[1]) if key_major else BWD_FP32
    arch = table_arch(arch)
    kv_cfg, q_cfg = BWD_TABLE[arch][block_d][kind]
    if key_major:
        kv_cfg = BWD_KM_TABLE[arch].get(block_d, {}).get(kind, kv_cfg)
    return kv_cfg, q_cfg


def rope_in_kernel_problem(head_dim: int, half: int, has_bias: bool):
    """Why the forward kernel cannot rotate q and k itself (None: it can): it takes full rotary (``half`` pairs
    = head_dim / 2) at head dims 32, 64 and 128 (:data:`ROPE_TILE`'s, compile-checked; two half-width dots of at
    least 16), and no bias."""
    if 2 * half != head_dim:
        return f"partial rotary ({2 * half} of {head_dim} channels; the kernel rotates all of them)"
    if head_dim not in ROPE_TILE[90]:
        return f"head dim {head_dim} (32, 64 or 128)"
    if has_bias:
        return "an additive attn_bias (the kernel's RoPE path has none)"
    return None


def rope_config(block_d: int, dtype, arch=None):
    """The forward's tile with RoPE in the kernel (:data:`ROPE_TILE`; fp32 and the interpreter as the plain
    forward: :func:`fwd_configs`)."""
    if _interpreting() or dtype == torch.float32 or block_d not in ROPE_TILE[table_arch(arch)]:
        return fwd_configs(block_d, dtype, "plain", arch)[0]
    return ROPE_TILE[table_arch(arch)][block_d]


def rope_q_configs(block_d: int, dtype, arch=None):
    """The tiles the forward picks from (:func:`_pick`) with ROPE_IN_KERNEL "q": the plain forward's
    (:func:`fwd_configs`), or the one :data:`ROPE_Q_TILE` puts in their place."""
    override = ROPE_Q_TILE.get(table_arch(arch), {}).get(block_d)
    if override is None or _interpreting() or dtype == torch.float32:
        return fwd_configs(block_d, dtype, "plain", arch)
    return [override]


def _rope_mode(requested, Lq: int):
    """What of rope= the kernel rotates (before :func:`rope_in_kernel_problem`'s check): "qk", "q" or None (the
    two passes), from ``requested``, else :data:`ROPE_IN_KERNEL` (whose None picks by Lq)."""
    flag = ROPE_IN_KERNEL if requested is None else requested
    if flag is None:
        return "qk" if Lq <= ROPE_KERNEL_MAX_LEN else "q"
    if flag is True:
        return "qk"
    if flag is False:
        return None
    if flag == "q":
        return "q"
    raise ValueError(f"rope_in_kernel must be True, False, 'q' or None, got {flag!r}")


def fused_dq_config(kv_cfg, block_d: int, kind: str, arch=None):
    """The key-major dK/dV config ``kv_cfg`` (padded head dim ``block_d``, ``kind`` "plain" or "bias", for
    :func:`table_arch` ``arch``) as launched when it also writes dQ: unchanged for sm_90's plain tiles up to
    head dim 64, else the same key block, warps and stages at most :data:`FUSED_DQ_BLOCK_M` query rows a step
    (fp32 keeps its 16x16 tile)."""
    if table_arch(arch) == 90 and kind == "plain" and block_d <= 64:
        return tuple(kv_cfg)
    bm, bn, warps, stages = kv_cfg
    return (min(bm, FUSED_DQ_BLOCK_M), bn, warps, stages)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _pick(configs, Lq, BH, Lk=None):
    """The long config, or the short one when the long one's BLOCK_M gives under ~2 waves of programs, or when
    every query fits the short one's rows (the Q-Former's 32 queries: a 128-row tile would run the same number
    of programs with twice the warps, the extra ones computing padding rows only; on an H200 the short tile was
    the fastest of those timed there). In place of the long one, the few-keys config (a third entry) for
    ``Lk`` in :data:`FEW_KEYS`."""
    if len(configs) > 1 and (Lq <= configs[1][0] or triton.cdiv(Lq, configs[0][0]) * BH < 2 * _sm_count()):
        return configs[1]
    if len(configs) > 2 and Lk is not None and FEW_KEYS[0] <= Lk <= FEW_KEYS[1]:
        return configs[2]
    return configs[0]


_SM_COUNT = {}


def _sm_count():
    if _interpreting() or not torch.cuda.is_available():
        return 1
    dev = torch.cuda.current_device()
    if dev not in _SM_COUNT:
        _SM_COUNT[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SM_COUNT[dev]


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------

@triton.jit
def _align8(s_b, s_h, s_n, ALIGN8: tl.constexpr):
    """A tensor's batch, head and row strides, known to the compiler as multiples of 8 elements when the
    launcher checked that they are (``ALIGN8``). Triton only learns divisibility by 16 from the launch, so a
    head stride of 40 or 80 would otherwise leave every row's alignment unknown and its loads unvectorised."""
    if ALIGN8:
        s_b, s_h, s_n = (s_b // 8) * 8, (s_h // 8) * 8, (s_n // 8) * 8
    return s_b, s_h, s_n


@triton.jit
def _tma_rows(desc, b, h, start, N: tl.constexpr, D: tl.constexpr):
    """Rows [start, start + N) of head (b, h) of a (B, H, L, D) tensor descriptor with [1, 1, N, D] blocks, as an
    (N, D) tile (a TMA load on sm_90): rows past L and columns past the head dim arrive as zeros."""
    return desc.load([b, h, start, 0]).reshape(N, D)


@triton.jit
def _kv_sources(K, V, b, hk, skb, skh, skn, svb, svh, svn, offs_n, offs_d, TMA: tl.constexpr):
    """(k_src, v_src, kv_b, kv_h) of a key loop: pointer tiles of key rows offs_n of head (b, hk), or with
    ``TMA`` the descriptors themselves, with the int32 (batch, head) coordinates to read them at."""
    if TMA:
        k_src, v_src = K, V
    else:
        k_src = K + b * skb + hk * skh + offs_n.to(tl.int64)[:, None] * skn + offs_d[None, :]
        v_src = V + b * svb + hk * svh + offs_n.to(tl.int64)[:, None] * svn + offs_d[None, :]
    return k_src, v_src, b.to(tl.int32), hk.to(tl.int32)


@triton.jit
def _query_block(H, GROUP, BLOCK_M: tl.constexpr):
    """This program's (pid_bh, b, h, kv head, first query, query offsets): query block program_id(0) of the
    (batch, head) pair program_id(1)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start_m = tl.program_id(0) * BLOCK_M
    return pid_bh, b, h, h // GROUP, start_m, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _visible(qi, kj, Lk, prefix_len, CAUSAL: tl.constexpr):
    """True where query qi may see key kj by index (bounds + causal/prefix); qi and kj are broadcastable
    2-D index tensors ((BLOCK_M, 1) and (1, BLOCK_N), or transposed for a key-major tile)."""
    keep = kj < Lk
    if CAUSAL:
        keep = keep & ((kj <= qi) | (kj < prefix_len))
    return keep


@triton.jit
def _tile_index(rows, cols, KEY_MAJOR: tl.constexpr):
    """A 1-D per-query vector ``rows`` and per-key vector ``cols`` as broadcastable 2-D operands of a score
    tile: (BLOCK_M, 1) and (1, BLOCK_N), or with ``KEY_MAJOR`` (keys along the tile's rows) (1, BLOCK_M) and
    (BLOCK_N, 1)."""
    if KEY_MAJOR:
        r, c = rows[None, :], cols[:, None]
    else:
        r, c = rows[:, None], cols[None, :]
    return r, c


@triton.jit
def _scores(q, k, bias_blk, sbm, sbn, offs_m, offs_n, Lq, Lk, prefix_len, kp, qk_scale,
            HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
            DOT_PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr = False, q2=None, k2=None):
    """Scores of one tile in log2 units, masked keys at -inf: (BLOCK_M, BLOCK_N) = q k^T, or with
    ``KEY_MAJOR`` its transpose (BLOCK_N, BLOCK_M) = k q^T. ``MASKED`` False skips the index masks
    (caller guarantees the tile is fully visible and in bounds). ``bias_blk`` points at the bias element of
    the tile's first (query, key); the tile's offsets from it are int32 (a tile spans < 2^31 elements), so
    no 64-bit pointer tile is kept live across the loop. ``q2``/``k2`` (query-major only): the head dim comes
    in two halves, q = [q | q2] and k = [k | k2] (the RoPE forward's rotated halves), two chained dots."""
    if KEY_MAJOR:
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    elif q2 is not None:
        s = tl.dot(q2, tl.trans(k2), tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION),
                   input_precision=DOT_PRECISION) * qk_scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        # Out-of-range rows/columns read the last valid one instead of being masked (their scores are
        # discarded or set to -inf below): an unpredicated load, lighter on registers.
        lm = tl.arange(0, offs_m.shape[0])
        ln = tl.arange(0, offs_n.shape[0])
        rl = tl.minimum(offs_m, Lq - 1) - (offs_m - lm)
        cl = ln
        if MASKED:
            cl = tl.minimum(offs_n, Lk - 1) - (offs_n - ln)
        rl, cl = _tile_index(rl, cl, KEY_MAJOR)
        s += tl.load(bias_blk + rl * sbm + cl * sbn).to(tl.float32) * 1.4426950408889634
    if MASKED:
        qi, kj = _tile_index(offs_m, offs_n, KEY_MAJOR)
        s = tl.where(_visible(qi, kj, Lk, prefix_len, CAUSAL), s, float("-inf"))
    if HAS_KPM:
        s = tl.where(_tile_index(offs_m, kp, KEY_MAJOR)[1], s, float("-inf"))
    return s


@triton.jit
def _scale_split(qk_scale, SCALE_SCORES: tl.constexpr):
    """(score scale, exponent scale): the softmax scale applied to the scores themselves (needed before a bias
    is added to them), or left for the exponent's argument, where it folds into an FMA."""
    if SCALE_SCORES:
        return qk_scale, 1.0
    return 1.0, qk_scale


@triton.jit
def _tail_start(lo, hi, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr):
    """Where the key loop over [lo, hi) (lo a multiple of BLOCK_N) hands over to one TAIL_N-key block: the
    start of the last BLOCK_N block when at most TAIL_N keys are left in it, else hi (no tail block)."""
    if TAIL_N == 0:
        return hi
    last = tl.maximum(lo, ((hi - 1) // BLOCK_N) * BLOCK_N)
    return tl.where((hi > lo) & (hi - last <= TAIL_N), last, hi)


@triton.jit
def _causal_hi(start_m, Lk, prefix_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the key range that query block start_m can see."""
    if CAUSAL:
        return tl.minimum(Lk, tl.maximum(start_m + BLOCK_M, prefix_len))
    else:
        return Lk


@triton.jit
def _key_range(start_m, Lk, prefix_len, kpm_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """[lo, hi): the keys query block start_m has to visit, lo a multiple of BLOCK_N. Causal/prefix
    limits bound hi; a padding mask bounds both ends to the span of kept keys (whole padded blocks before
    and after it are never loaded; padded keys inside it are masked)."""
    lo = 0
    hi = _causal_hi(start_m, Lk, prefix_len, BLOCK_M, CAUSAL)
    if HAS_KPM:
        first, last = _kpm_range(kpm_row, Lk, 1024)
        lo = (first // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, last)
    return lo, hi


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _kpm_range(kpm_row, Lk, BLOCK: tl.constexpr):
    """(first, last + 1) of the keys a padding-mask row keeps; (Lk, 0) when it keeps none. Read once per
    program, ``BLOCK`` bytes at a time, so the key loop can be bounded to the kept span instead of testing
    every block inside the loop (a branch there stops software pipelining)."""
    offs = tl.arange(0, BLOCK)
    first = Lk
    last = 0
    for start in range(0, Lk, BLOCK):
        c = start + offs
        keep = tl.load(kpm_row + c, mask=c < Lk, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(keep, c, Lk), 0))
        last = tl.maximum(last, tl.max(tl.where(keep, c + 1, 0), 0))
    return first, last


@triton.jit
def _rope_halves(x_ptrs, tab_off, cos_b, sin_b, mask, HALF: tl.constexpr):
    """RoPE in the kernel, for the forward: the two halves (x1, x2) of a tile of rows whose first half is at the
    pointer tile ``x_ptrs`` ((rows, HALF); the second half HALF elements on), rotated in half-split pairs by the
    angles at ``tab_off`` in this batch's tables ``cos_b``/``sin_b``: (x1 cos - x2 sin, x2 cos + x1 sin), in
    fp32 rounded to x's dtype as the standalone RoPE kernel rounds, so the scores are those of apply_rope then
    the attention. Rows where ``mask`` is False are zeros."""
    x1 = tl.load(x_ptrs, mask=mask, other=0.0)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0)
    c = tl.load(cos_b + tab_off, mask=mask, other=1.0).to(tl.float32)
    sn = tl.load(sin_b + tab_off, mask=mask, other=0.0).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    return (a * c - b * sn).to(x1.dtype), (b * c + a * sn).to(x1.dtype)


@triton.jit
def _fwd_block(acc, m_i, l_i, q, q2, k_src, v_src, skn, svn, bias_blk, sbm, sbn, kpm_ptr, offs_m, cols,
               Lq, Lk, prefix_len, qk_scale, mask_d, kv_b, kv_h, start_n, cos_b, sin_b, scn,
               HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, EXP_EMU: tl.constexpr, KV_TMA: tl.constexpr,
               ROPE: tl.constexpr, HALF: tl.constexpr):
    """One key block of the online softmax: load K/V, score, rescale, accumulate. ``k_src``/``v_src``: the
    block's pointer tiles, or with ``KV_TMA`` the (B, Hkv, Lk, D) tensor descriptors, read at (kv_b, kv_h,
    start_n). ``ROPE`` (pointer tiles only): ``k_src`` is the (BLOCK_N, HALF) tile of the keys' first halves,
    rotated as they are loaded (:func:`_rope_halves`), and q, q2 are the rotated query halves."""
    k2 = None
    if KV_TMA:  # keys past Lk arrive as zeros (finite: they get p = 0)
        k = _tma_rows(k_src, kv_b, kv_h, start_n, cols.shape[0], mask_d.shape[0])
        v = _tma_rows(v_src, kv_b, kv_h, start_n, cols.shape[0], mask_d.shape[0])
    elif ROPE:  # full rotary, HEAD_DIM = BLOCK_D = 2 * HALF: no head-dim mask; keys past Lk read the last one
        clamp = tl.minimum(cols, Lk - 1)
        k, k2 = _rope_halves(k_src + (clamp - cols)[:, None] * skn,
                             clamp.to(tl.int64)[:, None] * scn + tl.arange(0, HALF)[None, :], cos_b, sin_b,
                             cols[:, None] >= 0, HALF)
        v = tl.load(v_src + (clamp - cols)[:, None] * svn)
    else:
        k_ptrs, v_ptrs = k_src, v_src
        if MASKED:
            # Keys past Lk read the last key instead (finite: they get p = 0), so only the head dim is masked.
            clamp = (tl.minimum(cols, Lk - 1) - cols)[:, None]
            k_ptrs += clamp * skn
            v_ptrs += clamp * svn
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    kp = cols < Lk
    if HAS_KPM:
        kp = kp & (tl.load(kpm_ptr + cols, mask=cols < Lk, other=0) != 0)
    # Without a bias the scores stay raw (masked at -inf): the row max is scaled once per row and the scale
    # folds into the exponent's argument (one FMA per score instead of a multiply and a subtract; qk_scale > 0).
    score_scale, exp_scale = _scale_split(qk_scale, HAS_BIAS)
    if ROPE:
        s = _scores(q, k, bias_blk, sbm, sbn, offs_m, cols, Lq, Lk, prefix_len, kp, score_scale,
                    HAS_BIAS, HAS_KPM, CAUSAL, MASKED, DOT_PRECISION, False, q2, k2)
    else:
        s = _scores(q, k, bias_blk, sbm, sbn, offs_m, cols, Lq, Lk, prefix_len, kp, score_scale,
                    HAS_BIAS, HAS_KPM, CAUSAL, MASKED, DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1) * exp_scale)
    # A row with nothing visible yet keeps m = -inf; exponentiate against 0 there so no inf - inf.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp2(s * exp_scale - m_use[:, None], EXP_EMU, v.dtype == tl.bfloat16)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_loop(acc, m_i, l_i, q, q2, k_src, v_src, skn, svn, bias_row, sbm, sbn, kpm_ptr, offs_m, offs_n,
              start, end, Lq, Lk, prefix_len, qk_scale, mask_d, kv_b, kv_h, cos_b, sin_b, scn,
              HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, EXP_EMU: tl.constexpr,
              KV_TMA: tl.constexpr, ROPE: tl.constexpr, HALF: tl.constexpr, WARP_SPEC: tl.constexpr = False):
    """The key blocks in [start, end), all with or all without the index masks (``MASKED``). ``k_src``/
    ``v_src``: pointer tiles at key 0, or the tensor descriptors (``KV_TMA``). ``WARP_SPEC``: the loop is
    marked for Triton's warp specialization (producer warps issuing the TMA loads)."""
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WARP_SPEC):
        n64 = tl.cast(start_n, tl.int64)
        if KV_TMA:
            k_blk, v_blk = k_src, v_src
        else:
            k_blk, v_blk = k_src + n64 * skn, v_src + n64 * svn
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, q2, k_blk, v_blk, skn, svn,
                                   bias_row + n64 * sbn, sbm, sbn, kpm_ptr, offs_m, start_n + offs_n,
                                   Lq, Lk, prefix_len, qk_scale, mask_d, kv_b, kv_h, start_n, cos_b, sin_b, scn,
                                   HAS_BIAS, HAS_KPM, CAUSAL, MASKED, DOT_PRECISION, EVEN_D, EXP_EMU, KV_TMA,
                                   ROPE, HALF)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, BIAS, KPM, COS, SIN,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
              sbb, sbh, sbm, sbn, skpb, scb, scn,
              H, GROUP, Lq, Lk, prefix_len, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
              DOT_PRECISION: tl.constexpr, ALIGN8: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, EXP_EMU: tl.constexpr,
              KV_TMA: tl.constexpr, ROPE: tl.constexpr, ROPE_Q: tl.constexpr, HALF: tl.constexpr,
              WARP_SPEC: tl.constexpr):
    """The forward: one program per (query block, batch x head). With ``KV_TMA``, K and V are
    ``(B, Hkv, Lk, D)`` tensor descriptors with ``[1, 1, BLOCK_N, BLOCK_D]`` blocks (TMA loads on sm_90;
    no TAIL_N block) instead of pointers. ``ROPE``: q and k rotated in the kernel by the (B, N, HALF) tables
    COS/SIN (batch stride scb, 0 for shared tables; row stride scn), q once, each K block as it is loaded,
    both kept as their two halves so the rotation is elementwise and q k^T two chained half-width dots.
    ``ROPE_Q``: q alone rotated (its halves put back together once), K already rotated by the caller."""
    tl.static_assert(not (KV_TMA and TAIL_N > 0), "KV_TMA takes no tail block")
    tl.static_assert(not (KV_TMA and ROPE), "ROPE rotates pointer-loaded K tiles only")
    tl.static_assert(not (ROPE or ROPE_Q) or (2 * HALF == HEAD_DIM and HEAD_DIM == BLOCK_D and not HAS_BIAS),
                     "ROPE / ROPE_Q: full rotary of a power-of-two head dim, no bias")
    tl.static_assert(not (ROPE and ROPE_Q), "ROPE rotates q already")
    tl.static_assert(not WARP_SPEC or (KV_TMA and TAIL_N == 0 and not (HAS_KPM or HAS_BIAS or ROPE or ROPE_Q)),
                     "WARP_SPEC: Q/K/V by TMA, no key padding, bias, RoPE or tail block")
    sqb, sqh, sqm = _align8(sqb, sqh, sqm, ALIGN8)
    skb, skh, skn = _align8(skb, skh, skn, ALIGN8)
    svb, svh, svn = _align8(svb, svh, svn, ALIGN8)
    sob, soh, som = _align8(sob, soh, som, ALIGN8)
    pid_bh, b, h, hk, start_m, offs_m = _query_block(H, GROUP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    rows = offs_m.to(tl.int64)
    cos_b, sin_b = COS, SIN
    if ROPE:  # q as its two rotated halves (q, q2); K's first-half pointer tiles
        cos_b, sin_b = COS + b * scb, SIN + b * scb
        offs_k = tl.arange(0, HALF)
        q, q2 = _rope_halves(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_k[None, :],
                             rows[:, None] * scn + offs_k[None, :], cos_b, sin_b, offs_m[:, None] < Lq, HALF)
    elif ROPE_Q:  # q's rotated halves joined back into one tile: the loop is the plain one
        cos_b, sin_b = COS + b * scb, SIN + b * scb
        offs_k = offs_d
        offs_h = tl.arange(0, HALF)
        q1, q2 = _rope_halves(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_h[None, :],
                              rows[:, None] * scn + offs_h[None, :], cos_b, sin_b, offs_m[:, None] < Lq, HALF)
        q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (BLOCK_M, BLOCK_D))
        q2 = q
    elif WARP_SPEC:  # Q by TMA too: the warp-specialization pass refuses a pointer load feeding the loop's dots
        offs_k = offs_d
        q = _tma_rows(Q, b.to(tl.int32), h.to(tl.int32), start_m, BLOCK_M, BLOCK_D)
        q2 = q
    else:
        offs_k = offs_d
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :],
                    mask=(offs_m[:, None] < Lq) & mask_d[None, :], other=0.0)
        q2 = q
    k_src, v_src, kv_b, kv_h = _kv_sources(K, V, b, hk, skb, skh, skn, svb, svh, svn, offs_n, offs_d, KV_TMA)
    if ROPE:
        k_src = K + b * skb + hk * skh + offs_n.to(tl.int64)[:, None] * skn + offs_k[None, :]
    bias_row = BIAS
    if HAS_BIAS:
        bias_row = BIAS + b * sbb + h * sbh + tl.cast(start_m, tl.int64) * sbm
    kpm_ptr = KPM
    if HAS_KPM:
        kpm_ptr = KPM + b * skpb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, hi = _key_range(start_m, Lk, prefix_len, kpm_ptr, BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM)
    # Key blocks in [lo, full_hi) are in bounds and fully visible to every row of this block: no index mask.
    full_hi = tl.maximum(lo, (hi // BLOCK_N) * BLOCK_N)
    if CAUSAL:
        full_hi = tl.maximum(lo, tl.minimum(full_hi, tl.maximum(((start_m + 1) // BLOCK_N) * BLOCK_N,
                                                                (prefix_len // BLOCK_N) * BLOCK_N)))
    if WARP_SPEC:  # one loop (the pass takes one): Lk % BLOCK_N == 0 (launcher), causal masks on every block
        full_hi = hi
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, q2, k_src, v_src, skn, svn, bias_row, sbm, sbn, kpm_ptr, offs_m,
                              offs_n, lo, full_hi, Lq, Lk, prefix_len, qk_scale, mask_d, kv_b, kv_h, cos_b, sin_b,
                              scn, HAS_BIAS, HAS_KPM, CAUSAL, WARP_SPEC and CAUSAL, DOT_PRECISION, EVEN_D, BLOCK_N,
                              EXP_EMU, KV_TMA, ROPE, HALF, WARP_SPEC)
    # Short sequences end in a mostly empty key block (197 keys = 3 x 64 + 5): when the keys after the last
    # whole block fit in TAIL_N, they take one TAIL_N-key block instead of a BLOCK_N one.
    mid = _tail_start(full_hi, hi, BLOCK_N, TAIL_N)
    if not WARP_SPEC:
        acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, q2, k_src, v_src, skn, svn, bias_row, sbm, sbn, kpm_ptr,
                                  offs_m, offs_n, full_hi, mid, Lq, Lk, prefix_len, qk_scale, mask_d, kv_b, kv_h,
                                  cos_b, sin_b, scn, HAS_BIAS, HAS_KPM, CAUSAL, True, DOT_PRECISION, EVEN_D, BLOCK_N,
                                  EXP_EMU, KV_TMA, ROPE, HALF)
    if TAIL_N > 0:  # at most one TAIL_N block, [mid, hi)
        offs_t = tl.arange(0, TAIL_N)
        acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, q2,
                                  K + b * skb + hk * skh + offs_t.to(tl.int64)[:, None] * skn + offs_k[None, :],
                                  V + b * svb + hk * svh + offs_t.to(tl.int64)[:, None] * svn + offs_d[None, :],
                                  skn, svn, bias_row, sbm, sbn, kpm_ptr, offs_m, offs_t, mid, hi, Lq, Lk, prefix_len,
                                  qk_scale, mask_d, kv_b, kv_h, cos_b, sin_b, scn, HAS_BIAS, HAS_KPM, CAUSAL, True,
                                  DOT_PRECISION, EVEN_D, TAIL_N, EXP_EMU, False, ROPE, HALF)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & mask_d[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_preprocess(O, DO, DELTA, sob, soh, som, sdob, sdoh, sdom, H, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _delta(pdp, p_sum):
    """delta = rowsum(dO * O) of the backward's dS = P * (dP - delta), computed as rowsum(P * dP) / rowsum(P)
    (pdp, p_sum) where a program holds every key of its query rows: equal, as O = P V, but without the
    rounding of the stored output, and with no pass over O and dO before. The division by P's row sums (1 up
    to the rounding of the saved lse) matters too: that rounding would otherwise scale delta, and as delta
    cancels against dP, leave dS several times less accurate. Rows with no visible key are 0: divided by 1."""
    return pdp / tl.where(p_sum > 0.0, p_sum, 1.0)


@triton.jit
def _bwd_probs(q, k, bias_blk, sbm, sbn, offs_m, cols, Lq, Lk, prefix_len, kp, qk_scale, lse2,
               HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr, KEY_MAJOR: tl.constexpr = False):
    """Recompute the probabilities P of one tile from the saved log-sum-exp (log2 units). ``FOLD_SCALE``
    (no bias) applies the scale to the masked raw scores inside the exponent's argument: one FMA, where the
    mask select between a multiply and the subtraction keeps them apart. The dQ kernel folds (sm_90 SASS at
    head dim 64: 32 fewer instructions, and two sm_80/sm_90 spills gone); the dK/dV kernel does not (no fewer
    instructions there, and its head-dim-128 tile spilled 16-80 B more)."""
    score_scale, exp_scale = _scale_split(qk_scale, HAS_BIAS or not FOLD_SCALE)
    s = _scores(q, k, bias_blk, sbm, sbn, offs_m, cols, Lq, Lk, prefix_len, kp, score_scale,
                HAS_BIAS, HAS_KPM, CAUSAL, True, DOT_PRECISION, KEY_MAJOR)
    return tl.math.exp2(s * exp_scale - _tile_index(lse2, cols, KEY_MAJOR)[0])


@triton.jit
def _load_lse2(LSE, offs_m, Lq):
    """Saved lse in log2 units; +inf for fully masked or out-of-range rows, so their P is exactly 0."""
    lse = tl.load(LSE + offs_m, mask=offs_m < Lq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, BIAS, KPM, DK, DV, DS,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                   sbb, sbh, sbm, sbn, skpb, split_stride, split_rows,
                   HKV, GROUP, Lq, Lk, prefix_len, qk_scale, sm_scale, DQ, sdqb, sdqh, sdqm,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, WRITE_DS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, ALIGN8: tl.constexpr, QUERY_SPLIT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, KEY_MAJOR: tl.constexpr,
                   WRITE_DQ: tl.constexpr):
    """dK and dV of one key block (and the dS tile when WRITE_DS). With ``TMA``, Q and DO are (B, Hq, Lq, D)
    tensor descriptors with [1, 1, BLOCK_M, BLOCK_D] blocks instead of pointers. ``KEY_MAJOR`` computes the
    transposed tiles P^T = exp(K Q^T - lse) and dS^T = P^T (V dO^T - delta) (keys along rows), which are then
    already the left operands of dV += P^T dO and dK += dS^T Q: no transpose of a register tile through
    shared memory, which the query-major tiles need for both. ``WRITE_DQ`` (the launcher's promise that this
    is the only key block, Lk <= BLOCK_N) also writes each visited query block's dQ = dS K, complete with all
    keys in hand, so the dQ kernel, which would recompute S and dP, is not launched; delta then comes from the
    tile too (:func:`_delta`; DELTA is not read), so neither is the preprocess pass over O and dO."""
    sqb, sqh, sqm = _align8(sqb, sqh, sqm, ALIGN8)
    skb, skh, skn = _align8(skb, skh, skn, ALIGN8)
    svb, svh, svn = _align8(svb, svh, svn, ALIGN8)
    sdob, sdoh, sdom = _align8(sdob, sdoh, sdom, ALIGN8)
    sdkb, sdkh, sdkn = _align8(sdkb, sdkh, sdkn, ALIGN8)
    sdvb, sdvh, sdvn = _align8(sdvb, sdvh, sdvn, ALIGN8)
    sdqb, sdqh, sdqm = _align8(sdqb, sdqh, sdqm, ALIGN8)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    ccols = cols.to(tl.int64)
    kv_mask = (cols[:, None] < Lk) & mask_d
    k = tl.load(K + b * skb + hk * skh + ccols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + ccols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    kp = cols < Lk
    if HAS_KPM:
        kp = kp & (tl.load(KPM + b * skpb + cols, mask=cols < Lk, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Queries that can see this key block: all of them for an unmasked op or a block inside the
    # prefix, else those at or after the block's first key (causal).
    lo = 0
    if CAUSAL:
        lo = tl.where(start_n < prefix_len, 0, (start_n // BLOCK_M) * BLOCK_M)
    hi = Lq
    s64 = 0
    if QUERY_SPLIT:  # this program's share of the queries, [split * split_rows, + split_rows); a multiple
        split = tl.program_id(2)  # of BLOCK_M, so lo keeps its block alignment. Off, the kernel is as timed.
        lo = tl.maximum(lo, split * split_rows)
        hi = tl.minimum(Lq, (split + 1) * split_rows)
        s64 = split.to(tl.int64) * split_stride
    # a block of padded keys only is skipped, unless its program owes dQ rows (they are zeros then)
    if (tl.max(kp.to(tl.int32), 0) > 0) | WRITE_DQ:
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bh = b * (HKV * GROUP) + h
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_m0
                rows = offs_m.to(tl.int64)
                if TMA:  # queries past Lq arrive as zeros (their lse is +inf: P = 0)
                    q = _tma_rows(Q, b.to(tl.int32), h.to(tl.int32), start_m, BLOCK_M, BLOCK_D)
                    do = _tma_rows(DO, b.to(tl.int32), h.to(tl.int32), start_m, BLOCK_M, BLOCK_D)
                else:
                    qd_mask = (offs_m[:, None] < Lq) & mask_d
                    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=qd_mask,
                                other=0.0)
                    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=qd_mask,
                                 other=0.0)
                lse2 = _load_lse2(LSE + bh * Lq, offs_m, Lq)
                if not WRITE_DQ:
                    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
                bias_blk = BIAS
                if HAS_BIAS:
                    bias_blk = (BIAS + b * sbb + h * sbh + tl.cast(start_m, tl.int64) * sbm
                                + tl.cast(start_n, tl.int64) * sbn)
                p = _bwd_probs(q, k, bias_blk, sbm, sbn, offs_m, cols, Lq, Lk, prefix_len, kp, qk_scale, lse2,
                               HAS_BIAS, HAS_KPM, CAUSAL, DOT_PRECISION, False, KEY_MAJOR)
                if KEY_MAJOR:  # p, dp, ds are (BLOCK_N, BLOCK_M)
                    dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
                    dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                else:
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                if WRITE_DQ:  # every key of these queries is in this tile: delta from it (no preprocess pass)
                    delta = _delta(tl.sum(p * dp, 0 if KEY_MAJOR else 1), tl.sum(p, 0 if KEY_MAJOR else 1))
                ds = p * (dp - _tile_index(delta, cols, KEY_MAJOR)[0])
                if WRITE_DS:
                    ds_rows, ds_cols = _tile_index(rows, ccols, KEY_MAJOR)
                    ds_in = _tile_index(offs_m < Lq, cols < Lk, KEY_MAJOR)
                    tl.store(DS + bh * Lq * Lk + ds_rows * Lk + ds_cols, ds, mask=ds_in[0] & ds_in[1])
                if KEY_MAJOR:
                    dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)
                else:
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
                if WRITE_DQ:
                    if KEY_MAJOR:
                        dq = tl.dot(tl.trans(ds.to(k.dtype)), k, input_precision=DOT_PRECISION)
                    else:
                        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
                    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + offs_d[None, :],
                             (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lq) & mask_d)
    dk = dk * sm_scale
    tl.store(DK + s64 + b * sdkb + hk * sdkh + ccols[:, None] * sdkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + s64 + b * sdvb + hk * sdvh + ccols[:, None] * sdvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, k_src, v_src, skn, svn, bias_row, sbm, sbn, kpm_row, offs_m, offs_n,
             start, end, Lq, Lk, prefix_len, qk_scale, mask_d, kv_b, kv_h,
             HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """dQ's key blocks in [start, end) (``k_src`` / ``v_src``: pointer tiles of BLOCK_N rows from key 0, or
    with ``TMA`` the tensor descriptors, read at (kv_b, kv_h))."""
    for start_n in range(start, end, BLOCK_N):
        n64 = tl.cast(start_n, tl.int64)
        cols = start_n + offs_n
        kp = cols < Lk
        if HAS_KPM:
            kp = kp & (tl.load(kpm_row + cols, mask=cols < Lk, other=0) != 0)
        if TMA:
            k = _tma_rows(k_src, kv_b, kv_h, start_n, BLOCK_N, mask_d.shape[1])
            v = _tma_rows(v_src, kv_b, kv_h, start_n, BLOCK_N, mask_d.shape[1])
        else:
            kv_mask = (cols[:, None] < Lk) & mask_d
            k = tl.load(k_src + n64 * skn, mask=kv_mask, other=0.0)
            v = tl.load(v_src + n64 * svn, mask=kv_mask, other=0.0)
        p = _bwd_probs(q, k, bias_row + n64 * sbn, sbm, sbn, offs_m, cols, Lq, Lk, prefix_len,
                       kp, qk_scale, lse2, HAS_BIAS, HAS_KPM, CAUSAL, DOT_PRECISION, True)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, BIAS, KPM, DQ,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                 sbb, sbh, sbm, sbn, skpb,
                 H, GROUP, Lq, Lk, prefix_len, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, ALIGN8: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, TMA: tl.constexpr):
    """dQ of one query block. With ``TMA``, K and V are (B, Hkv, Lk, D) tensor descriptors with
    [1, 1, BLOCK_N, BLOCK_D] blocks (no TAIL_N block)."""
    tl.static_assert(not (TMA and TAIL_N > 0), "TMA takes no tail block")
    sqb, sqh, sqm = _align8(sqb, sqh, sqm, ALIGN8)
    skb, skh, skn = _align8(skb, skh, skn, ALIGN8)
    svb, svh, svn = _align8(svb, svh, svn, ALIGN8)
    sdob, sdoh, sdom = _align8(sdob, sdoh, sdom, ALIGN8)
    sdqb, sdqh, sdqm = _align8(sdqb, sdqh, sdqm, ALIGN8)
    pid_bh, b, h, hk, start_m, offs_m = _query_block(H, GROUP, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < HEAD_DIM
    rows = offs_m.to(tl.int64)
    qd_mask = (offs_m[:, None] < Lq) & mask_d
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=qd_mask, other=0.0)
    lse2 = _load_lse2(LSE + pid_bh.to(tl.int64) * Lq, offs_m, Lq)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kpm_row = KPM + b * skpb
    lo, hi = _key_range(start_m, Lk, prefix_len, kpm_row, BLOCK_M, BLOCK_N, CAUSAL, HAS_KPM)
    k_src, v_src, kv_b, kv_h = _kv_sources(K, V, b, hk, skb, skh, skn, svb, svh, svn, offs_n, offs_d, TMA)
    bias_row = BIAS
    if HAS_BIAS:
        bias_row = BIAS + b * sbb + h * sbh + tl.cast(start_m, tl.int64) * sbm
    mid = _tail_start(lo, hi, BLOCK_N, TAIL_N)  # the last few keys in one TAIL_N block, as in the forward
    dq = _dq_loop(dq, q, do, lse2, delta, k_src, v_src, skn, svn, bias_row, sbm, sbn, kpm_row, offs_m, offs_n,
                  lo, mid, Lq, Lk, prefix_len, qk_scale, mask_d, kv_b, kv_h, HAS_BIAS, HAS_KPM, CAUSAL,
                  DOT_PRECISION, BLOCK_N, TMA)
    if TAIL_N > 0:
        offs_t = tl.arange(0, TAIL_N)
        dq = _dq_loop(dq, q, do, lse2, delta,
                      K + b * skb + hk * skh + offs_t.to(tl.int64)[:, None] * skn + offs_d[None, :],
                      V + b * svb + hk * svh + offs_t.to(tl.int64)[:, None] * svn + offs_d[None, :],
                      skn, svn, bias_row, sbm, sbn, kpm_row, offs_m, offs_t, mid, hi, Lq, Lk, prefix_len, qk_scale,
                      mask_d, kv_b, kv_h, HAS_BIAS, HAS_KPM, CAUSAL, DOT_PRECISION, TAIL_N, False)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=qd_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _strides_align8(*tensors) -> bool:
    """Whether every stride but the last of every tensor is a multiple of 8 elements (the kernels' ALIGN8)."""
    return all(st % 8 == 0 for t in tensors for st in t.stride()[:-1])


def _bias_args(bias, B, H, Lq, Lk):
    if bias is None:
        return None, (0, 0, 0, 0)
    bias = bias.expand(B, H, Lq, Lk)  # a view: zero strides for broadcast dims, nothing copied
    return bias, tuple(bias.stride())


def _kpm_args(kpm):
    if kpm is None:
        return None, 0
    kpm = kpm.view(torch.uint8) if kpm.dtype == torch.bool else kpm
    if kpm.stride(-1) != 1:
        kpm = kpm.contiguous()
    return kpm, kpm.stride(0)


def key_tail(Lk: int, block_n: int, block_d: int, max_block_d: int = 128) -> int:
    """The forward's (and the dQ kernel's) ``TAIL_N``: 16 when the keys after the last whole ``block_n`` block
    are 1 to 16 (and ``block_n`` is larger), so they take one 16-key block; else 0 (no tail block). ViT's
    197 keys, CLIP's and the U-Net cross-attention's 77 and the Q-Former's 257 all end so with 64-key blocks.
    Padded head dims 32 to ``max_block_d`` only: the tail block made some tiles spill at 16 and 256 in the
    forward, and at 128 in the dQ kernel (which passes ``DQ_TAIL_MAX_BLOCK_D``)."""
    return TAIL_N if tail_possible(block_n, block_d, max_block_d) and 0 < Lk % block_n <= TAIL_N else 0


def tail_possible(block_n: int, block_d: int, max_block_d: int = 128) -> bool:
    """Whether a tile with ``block_n`` keys per block at padded head dim ``block_d`` ever takes the tail block."""
    return block_n > TAIL_N and 32 <= block_d <= max_block_d


def forward(q, k, v, bias, kpm, causal: bool, prefix_len: int, scale: float, rope=None, config=None, tail=None,
            exp_emu=None, kv_tma=None, rope_in_kernel=None, warp_spec=None):
    """Launch the forward kernel. Returns ``(out, lse)``: out ``(B, Hq, Lq, D)`` in q's dtype, stored as a
    ``(B, Lq, Hq, D)`` buffer so ``out.transpose(1, 2).reshape(B, Lq, Hq * D)`` is free; lse fp32 (B, Hq, Lq).
    ``rope=(cos, sin)``, tables ``(N, R)`` or ``(B, N, R)`` with N = Lq = Lk: q and k are rotated (half-split
    pairs) by the standalone RoPE kernel, one pass each, before the launch. ``tail``: the kernel's TAIL_N
    (default :func:`key_tail`). ``exp_emu``: the kernel's EXP_EMU (default :data:`EXP_EMU`; 0 in fp32 and
    under the interpreter, which runs no inline PTX). ``kv_tma``: K and V through TMA tensor descriptors
    (default: :func:`_tma_by_default`; see :func:`_use_tma`). ``rope_in_kernel`` (default
    :data:`ROPE_IN_KERNEL`): True, the kernel rotates q and k itself (:func:`_rope_halves`; pointer K/V loads,
    at :func:`rope_config`'s tile unless ``config``) instead of the two passes; "q", it rotates q (once per
    program) and k takes its pass; where it can (:func:`rope_in_kernel_problem`: full rotary, head dim 32 / 64
    / 128, no bias); asked for where it cannot, a ValueError says why. ``warp_spec`` (default
    :data:`FWD_WARP_SPEC`): the warp-specialized key loop (Q, K and V by TMA, at :data:`FWD_WS_TABLE`'s tile
    unless ``config``) where :func:`warp_spec_problem` finds nothing against it; asked for (True) where it
    cannot, a ValueError."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    BLOCK_D = padded_head_dim(D)
    o = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    bias_t, sb = _bias_args(bias, B, H, Lq, Lk)
    kpm_t, skp = _kpm_args(kpm)
    kind = "bias" if bias_t is not None else "plain"
    mode = _rope_mode(rope_in_kernel, Lq) if rope is not None else None
    if mode:
        why = rope_in_kernel_problem(D, rope[0].shape[-1], bias_t is not None)
        if why and rope_in_kernel:
            raise ValueError(f"rope_in_kernel={rope_in_kernel!r}: {why}")
        mode = None if why else mode
    in_kernel = mode == "qk"  # q and k rotated in the kernel (ROPE); "q": q alone (ROPE_Q), k by a pass
    cos_t = sin_t = None
    scb = scn = half = 0
    if mode:
        cos_t, sin_t = (rope_kernels.table_view(t, B, 1, Lq)[:, 0] for t in rope)
        if cos_t.stride() != sin_t.stride():
            cos_t, sin_t = cos_t.contiguous(), sin_t.contiguous()
        scb, scn, half = cos_t.stride(0), cos_t.stride(1), cos_t.shape[-1]
    if in_kernel:
        if kv_tma:
            raise ValueError("kv_tma=True with rope_in_kernel: the kernel rotates pointer-loaded K tiles only")
        kv_tma = False
        config = config or rope_config(BLOCK_D, q.dtype)
    elif mode == "q":
        k = rope_kernels.apply(k, *rope, interleaved=False)
    elif rope is not None:
        # One rotation pass over q and one over k, then the plain kernel. Measured on an H200 (benchmarks.tune,
        # 2026-11-27), this beat rotating q in the kernel's prologue at every tile tried: 0.99 vs 1.01 ms at
        # head dim 128, 1.10 vs 1.15 ms at 64 (rotating k in the key loop is redone per query block).
        q, k = (rope_kernels.apply(t, *rope, interleaved=False) for t in (q, k))
    ws = FWD_WARP_SPEC if warp_spec is None else bool(warp_spec)
    if ws:
        ws_cfg = config or FWD_WS_TABLE.get(BLOCK_D, (64, 128, 4, 2))
        why = warp_spec_problem(q, k, v, kind, causal, kpm_t is not None, mode, ws_cfg, kv_tma, tail)
        if why and warp_spec:
            raise ValueError(f"warp_spec=True: {why}")
        ws = why is None
        if ws:
            config, kv_tma, tail = ws_cfg, True, 0
    configs = (rope_q_configs(BLOCK_D, q.dtype) if mode == "q"
               else fwd_configs(BLOCK_D, q.dtype, kind, uneven=D < BLOCK_D))
    bm, bn, warps, stages = config or _pick(configs, Lq, B * H, Lk)
    use_tma = _use_tma("kv_tma", kv_tma, _fwd_tma_default(kind, BLOCK_D, Lq, Lk, bn, tail), k, v)
    q_arg = _descriptors(bm, BLOCK_D, q)[0] if ws else q
    if use_tma:
        k_arg, v_arg = _descriptors(bn, BLOCK_D, k, v)
        if tail:
            raise ValueError(f"tail={tail}: the TMA forward (kv_tma) takes no tail block")
        tail = 0
    else:
        k_arg, v_arg = k, v
        tail = key_tail(Lk, bn, BLOCK_D) if tail is None else tail
    grid = (triton.cdiv(Lq, bm), B * H)
    _attn_fwd[grid](
        q_arg, k_arg, v_arg, o, lse, bias_t if bias_t is not None else q, kpm_t if kpm_t is not None else q,
        cos_t if mode else q, sin_t if mode else q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        *sb, skp, scb, scn,
        H, H // Hkv, Lq, Lk, prefix_len, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=causal, HAS_BIAS=bias_t is not None, HAS_KPM=kpm_t is not None,
        DOT_PRECISION=_dot_precision(q.dtype), ALIGN8=_strides_align8(q, k, v, o),
        BLOCK_M=bm, BLOCK_N=bn, TAIL_N=tail, EXP_EMU=_exp_emu(exp_emu, q.dtype), KV_TMA=use_tma,
        ROPE=in_kernel, ROPE_Q=mode == "q", HALF=half, WARP_SPEC=ws, num_warps=warps, num_stages=stages,
    )
    return o, lse


def warp_spec_problem(q, k, v, kind: str, causal: bool, has_kpm: bool, rope_mode, config, kv_tma=None,
                      tail=None):
    """Why the warp-specialized forward cannot take this call (None: it can): it runs attention with no key
    padding, bias or in-kernel RoPE (causal and prefix_len are fine), Q/K/V by TMA (fp16/bf16, sm_90+,
    TMA-addressable, head dim 64 or 128 exactly), and a key count that is a multiple of the tile's BLOCK_N."""
    D, Lk = q.shape[-1], k.shape[2]
    if kind != "plain" or has_kpm:
        return "a key padding mask or a bias (the warp-specialized loop takes neither)"
    if rope_mode:
        return "RoPE rotated in the kernel (it reads Q by pointers)"
    if D not in FWD_WS_TABLE:
        return f"head dim {D} (64 or 128)"
    if Lk % config[1]:
        return f"{Lk} keys, not a multiple of the tile's {config[1]} (no masked block in the loop)"
    if kv_tma is False or tail:
        return "kv_tma=False or a tail block (it reads K/V by TMA, with no tail)"
    return _tma_problem(q, k, v)


def _tma_ready(t) -> bool:
    """Whether a TMA descriptor can address ``t`` directly: a 16-byte aligned base and 16-byte multiples for
    every stride but the last (which is 1)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in t.stride()[:-1]) and t.stride(-1) == 1


def _tma_by_default(flag, kind: str, block_d: int, Lq: int, Lk: int, tail: int) -> bool:
    """The TMA default of a launch: ``flag`` (:data:`KV_TMA` / :data:`BWD_TMA`) when set, else whether the
    launch is of the kind measured faster with TMA (see :data:`TMA_MIN_LEN`): no bias, padded head dim 64 or
    128, ``Lq`` and ``Lk`` at least TMA_MIN_LEN, and no tail block (``tail``: the pointer path's TAIL_N)."""
    if flag is not None:
        return bool(flag)
    return kind == "plain" and block_d in (64, 128) and min(Lq, Lk) >= TMA_MIN_LEN and not tail


def _fwd_tma_default(kind: str, block_d: int, Lq: int, Lk: int, block_n: int, tail=None) -> bool:
    """The forward's TMA default (before :func:`_use_tma`'s checks) for key blocks of ``block_n`` and TAIL_N
    ``tail`` (None: :func:`key_tail`'s)."""
    return _tma_by_default(KV_TMA, kind, block_d, Lq, Lk, key_tail(Lk, block_n, block_d) if tail is None else tail)


def _bwd_tma_default(kind: str, block_d: int, Lq: int, Lk: int, q_cfg, key_major: bool) -> bool:
    """The backward's TMA default (before :func:`_use_tma`'s checks) with dQ config ``q_cfg``: the automatic
    choice only with the query-major dK/dV tiles, the ones it was measured with."""
    flag = BWD_TMA if BWD_TMA is not None or not key_major else False
    return _tma_by_default(flag, kind, block_d, Lq, Lk, key_tail(Lk, q_cfg[1], block_d, DQ_TAIL_MAX_BLOCK_D))


def _use_tma(name, requested, default, *tensors) -> bool:
    """Whether a kernel reads ``tensors`` through TMA descriptors: asked for (``requested``, else ``default``),
    fp16/bf16, Hopper or later (or the interpreter), every tensor TMA-addressable. The default falls back to
    pointer loads where it cannot be used; asking for it explicitly (argument ``name``) raises there."""
    want = default if requested is None else requested
    if not want:
        return False
    why = _tma_problem(*tensors)
    if why is not None and requested:
        raise ValueError(f"{name}=True: {why}")
    return why is None


def _tma_problem(*tensors):
    """Why ``tensors`` cannot be read through TMA descriptors (None: they can): fp16/bf16, Hopper or later (or
    the interpreter), head dim up to TMA_MAX_HEAD_DIM, every tensor TMA-addressable."""
    why = None
    if tensors[0].dtype not in (torch.float16, torch.bfloat16):
        why = f"dtype {tensors[0].dtype} (fp16 and bf16 only)"
    elif not _interpreting() and table_arch() < 90:
        why = "a pre-Hopper GPU (TMA needs sm_90 or later)"
    elif tensors[0].shape[-1] > TMA_MAX_HEAD_DIM:
        why = f"head dim {tensors[0].shape[-1]} (up to {TMA_MAX_HEAD_DIM}: the tiles compile-checked with TMA)"
    elif not all(_tma_ready(t) for t in tensors):
        why = "a base or strides that are not multiples of 16 bytes"
    return None if why is None else f"cannot use TMA descriptors with {why}"


def _descriptors(block_rows, block_d, *tensors):
    """(B, H, L, D) tensor descriptors with [1, 1, block_rows, block_d] blocks (zero fill out of bounds)."""
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_rows, block_d]) for t in tensors]


def _exp_emu(requested, dtype) -> int:
    n = EXP_EMU if requested is None else requested
    if n not in (0, 2, 4, 8):
        raise ValueError(f"exp_emu must be 0, 2, 4 or 8, got {n!r}")
    if n and _interpreting():
        if requested:
            raise ValueError("exp_emu > 0 needs a GPU: Triton's interpreter runs no inline PTX")
        return 0
    return 0 if dtype == torch.float32 else n


def _query_splits(n_key_blocks, BH_kv, Lq, block_m):
    """How many programs share one key block's queries in the dK/dV kernel. One per key block is FA2's
    layout; with few key blocks (short Lk: U-Net cross-attention has Lk = 77, two blocks) and few heads it
    leaves most of the GPU idle while each program walks every query serially. Then the queries are split
    so the grid fills about one wave (one program per SM), each split keeping at least 4 query blocks; the
    partial dK/dV (fp32) are summed in a fixed order afterwards, so the result stays deterministic. One wave,
    not two: U-Net cross-attention's backward (B=8, 8 heads, 4096 x 77) took 0.152 ms with 2 splits (256
    programs on 132 SMs) against 0.169 ms with the 3 that a two-wave target gave, 0.154 with 4 and 0.178
    unsplit (head dim 128: 0.253 / 0.278 / 0.259 / 0.270 ms; H200, 2026-11-29T2207 tune)."""
    programs = n_key_blocks * BH_kv
    target = _sm_count()
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(Lq, block_m) // 4))


def _bias_grad_in_one_block(bias_grad: bool, dtype, block_d: int, kind: str, uneven: bool, Lk: int) -> bool:
    """Whether the backward takes the key-major dK/dV tiles by default (with :data:`BWD_KEY_MAJOR` off): for a
    bias gradient in fp16/bf16 when one key-major key block holds every key, so that the kernel writes dQ and
    takes delta from its tile (rowsum(P dP) / rowsum(P)) instead of rowsum(dO * O) with O rounded to 16 bits.
    With a few keys that rounding, summed into the bias gradient, exceeded 3x PyTorch's own fp16 error
    (3.1e-3 against 2.4e-3 allowed: two queries, two keys, head dim 72, the random-shape sweep's case); from the
    tile it is within it. Untimed on a GPU for the bias kind; the plain tiles were within 7% of the query-major
    ones at CLIP's and the U-Net's short key sides (2026-11-29T2207 tune)."""
    if not bias_grad or dtype == torch.float32:
        return False
    return Lk <= bwd_configs(block_d, dtype, kind, uneven=uneven, key_major=True)[0][1]


def backward(do, q, k, v, o, lse, bias, kpm, causal: bool, prefix_len: int, scale: float, bias_grad: bool,
             config=None, splits=None, tma=None, key_major=None, fused_dq=None):
    """Launch the backward kernels. Returns ``(dq, dk, dv, ds)`` where ds is the (B, Hq, Lq, Lk) fp32
    gradient of the scores when ``bias_grad`` (else None). ``splits``: query splits of the dK/dV kernel
    (default: :func:`_query_splits`). ``tma``: Q/dO (dK/dV kernel) and K/V (dQ kernel) through TMA
    descriptors (default: :func:`_tma_by_default`; see :func:`_use_tma`). ``key_major``: the dK/dV kernel's
    transposed tiles (default :data:`BWD_KEY_MAJOR`, or on for a bias gradient whose keys fit one block:
    :func:`_bias_grad_in_one_block`), with their own config (:data:`BWD_KM_TABLE`) unless ``config``.
    ``fused_dq`` (key-major only; default: ``key_major``): when every key fits in one dK/dV key block, that
    kernel writes dQ too (at :func:`fused_dq_config`'s tile unless ``config``) and takes delta from its tile:
    neither the dQ kernel nor the preprocess pass over O and dO is launched."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    BLOCK_D = padded_head_dim(D)
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty((B, Lk, Hkv, D), device=k.device, dtype=k.dtype).transpose(1, 2)
    dv = torch.empty((B, Lk, Hkv, D), device=v.device, dtype=v.dtype).transpose(1, 2)
    ds = torch.zeros((B, H, Lq, Lk), device=q.device, dtype=torch.float32) if bias_grad else None
    bias_t, sb = _bias_args(bias, B, H, Lq, Lk)
    kpm_t, skp = _kpm_args(kpm)
    kind = "bias" if bias_t is not None else "plain"
    if key_major is None:
        key_major = BWD_KEY_MAJOR or (config is None and _bias_grad_in_one_block(bias_grad, q.dtype, BLOCK_D, kind,
                                                                                 D < BLOCK_D, Lk))
    key_major = bool(key_major)
    if fused_dq and not key_major:
        raise ValueError("fused_dq=True needs key_major=True: dQ is written by the key-major dK/dV tiles only "
                         "(the ones the AOT check compiles with it)")
    kv_cfg, q_cfg = config or bwd_configs(BLOCK_D, q.dtype, kind, uneven=D < BLOCK_D, key_major=key_major)
    n_kb = triton.cdiv(Lk, kv_cfg[1])
    # dQ (and delta) in the dK/dV kernel when its one key block holds every key
    write_dq = key_major and (fused_dq is None or bool(fused_dq)) and n_kb == 1
    if write_dq and config is None:
        kv_cfg = fused_dq_config(kv_cfg, BLOCK_D, kind)
    delta = lse  # not read when write_dq (an fp32 pointer of the kernels' signature)
    if not write_dq:
        delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
        pre_m = 64 if not _interpreting() else 32
        _bwd_preprocess[(triton.cdiv(Lq, pre_m), B * H)](
            o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, Lq,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_m)
    dummy = q
    use_tma = _use_tma("tma", tma, _bwd_tma_default(kind, BLOCK_D, Lq, Lk, q_cfg, key_major), q, k, v, do)
    common = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=causal, HAS_BIAS=bias_t is not None,
                  HAS_KPM=kpm_t is not None, DOT_PRECISION=_dot_precision(q.dtype),
                  ALIGN8=_strides_align8(q, k, v, do, dq, dk, dv), TMA=use_tma)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    splits = splits or _query_splits(n_kb, B * Hkv, Lq, kv_cfg[0])
    split_rows = max(1, triton.cdiv(triton.cdiv(Lq, kv_cfg[0]), splits)) * kv_cfg[0]
    splits = max(1, triton.cdiv(Lq, split_rows))  # no empty split
    # one split writes dk/dv directly; several write fp32 partials (splits, B, Lk, Hkv, D), summed below
    # (each split's slice has dk's strides, so the ALIGN8 hint above holds for it)
    dk_out, dv_out = dk, dv
    if splits > 1:
        dk_out, dv_out = (torch.empty((splits, B, Lk, Hkv, D), device=q.device, dtype=torch.float32)
                          .transpose(2, 3) for _ in range(2))
    q_arg, do_arg = _descriptors(kv_cfg[0], BLOCK_D, q, do) if use_tma else (q, do)
    _attn_bwd_dkdv[(n_kb, B * Hkv, splits)](
        q_arg, k, v, do_arg, lse, delta, bias_t if bias_t is not None else dummy, kpm_t if kpm_t is not None else dummy,
        dk_out, dv_out, ds if ds is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        *dk_out.stride()[-4:-1], *dv_out.stride()[-4:-1],
        *sb, skp, dk_out.stride(0) if splits > 1 else 0, split_rows,
        Hkv, H // Hkv, Lq, Lk, prefix_len, scale * LOG2E, scale, dq, dq.stride(0), dq.stride(1), dq.stride(2),
        WRITE_DS=ds is not None, QUERY_SPLIT=splits > 1, **common, **launch(kv_cfg),
        KEY_MAJOR=key_major, WRITE_DQ=write_dq)
    if splits > 1:  # a reduction in a fixed order: deterministic
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))
    if write_dq:
        return dq, dk, dv, ds
    k_arg, v_arg = _descriptors(q_cfg[1], BLOCK_D, k, v) if use_tma else (k, v)
    _attn_bwd_dq[(triton.cdiv(Lq, q_cfg[0]), B * H)](
        q, k_arg, v_arg, do, lse, delta, bias_t if bias_t is not None else dummy, kpm_t if kpm_t is not None else dummy, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *sb, skp,
        H, H // Hkv, Lq, Lk, prefix_len, scale * LOG2E, scale, **common, **launch(q_cfg),
        TAIL_N=0 if use_tma else key_tail(Lk, q_cfg[1], BLOCK_D, DQ_TAIL_MAX_BLOCK_D))
    return dq, dk, dv, ds


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (dlcv_fast/aot.py, tests/kernels/test_aot_compile.py)
# ------------------------------------------------------------------------------------------------

def aot_specs():
    """Every config the launchers can pick, for the compile check without a GPU.

    For each arch's table, head-dim bucket and kind, each config is compiled with every feature flag its
    kind allows on (the most registers): "plain" as causal + key padding, "bias" adding the bias too; the
    backward's dK/dV kernel also writes dS for "bias", and is compiled a second time with ``QUERY_SPLIT``
    (short key sides: fp32 partial dK/dV per query split, summed afterwards); the forward and the dQ kernel
    are compiled with and without their 16-key tail block (``TAIL_N``, taken when a few keys follow the last
    whole block); the dK/dV kernel in both orientations, query-major with BWD_TABLE's tile and key-major with
    BWD_KM_TABLE's (which must use wgmma on sm_90 where it has 64 keys or more), the latter also with dQ
    written in it (``WRITE_DQ``: all keys in one block). The plain forward with no flag
    is compiled too, on sm_90 only, where it must use wgmma in
    fp16/bf16 (the hot path) when its tile has 64 rows or more (a warpgroup MMA is 64 rows; head dim 160
    takes 32-row tiles, which do not spill); so is the hot fp16 d64 / bf16 d128 one with the exp2 split
    (EXP_EMU 4 and 8, inline PTX; off by default). fp16 takes the
    power-of-two head dim of each bucket and bf16 a padded one where models have it (40 -> 64, 80 -> 128,
    160 -> 256), so both the even and the masked head-dim paths compile; fp32 (IEEE dots) is checked for the
    64 bucket. Pointers are 16-byte aligned, the batch and row strides of q/k/v/o multiples of 16 (as for
    (B, L, H, D) buffers with H * D a multiple of 16, true of the models) and the head strides too when the
    head dim is; the bias is fp32 (what the SDPA bool-mask path passes) with a unit
    key stride (which Triton specialises on, as a launch with a contiguous bias does) and unaligned others.
    ``ALIGN8`` is on, as the launchers set it whenever every q/k/v/o stride is a multiple of 8 elements
    (contiguous and fused-qkv layouts of all the models); the fallback for other strides is not checked.
    """
    import re

    from dlcv_fast.aot import AotSpec, arg_names, shipped_configs, signature_of

    kind_flags = dict(plain=("CAUSAL", "HAS_KPM"), bias=("CAUSAL", "HAS_KPM", "HAS_BIAS", "WRITE_DS"))
    short = dict(CAUSAL="causal", HAS_BIAS="bias", HAS_KPM="kpm", WRITE_DS="ds")
    torch_dtype = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)
    cases = [("fp16", d) for d in (16, 32, 64, 128, 256)] + [("bf16", d) for d in (40, 80, 160)] + [("fp32", 64)]
    wanted = {}  # (kernel, dtype, d, flags, cfg) -> archs

    def want(fn, dtype, d, flags, cfg, arch, wgmma=False, split=False, tail=0, emu=EXP_EMU, tma=None,
             key_major=None, fused_dq=False, rope=False, ws=False, rope_q=False):
        flags = tuple(f for f in short if f in flags and f in arg_names(fn))
        tma = bool(KV_TMA if fn is _attn_fwd else BWD_TMA) if tma is None else tma
        tma = tma and any(n in arg_names(fn) for n in ("KV_TMA", "TMA")) and not rope
        key_major = (BWD_KEY_MAJOR if key_major is None else key_major) and "KEY_MAJOR" in arg_names(fn)
        key = (fn, dtype, d, flags, cfg, wgmma, split, 0 if tma else tail, emu, tma, key_major, fused_dq, rope, ws,
               rope_q)
        wanted.setdefault(key, []).append(arch)

    for dtype, d in cases:
        block_d = padded_head_dim(d)
        kinds = ("bias",) if dtype == "fp32" else ("plain", "bias")
        for arch in ARCHS:
            for kind in kinds:
                fwd = shipped_configs(fwd_configs, block_d, torch_dtype[dtype], kind, arch, d < block_d)
                for cfg in fwd:
                    for tail in (0, TAIL_N) if tail_possible(cfg[1], block_d) else (0,):
                        want(_attn_fwd, dtype, d, kind_flags[kind], cfg, arch, tail=tail)
                        if kind == "plain" and arch == 90:
                            want(_attn_fwd, dtype, d, (), cfg, arch, wgmma=True, tail=tail)
                kv_cfg, q_cfg = shipped_configs(bwd_configs, block_d, torch_dtype[dtype], kind, arch, d < block_d)
                # the dK/dV kernel in both orientations (BWD_KEY_MAJOR picks one), each with its own tile;
                # key-major ones use wgmma on sm_90 where they have 64 keys or more
                km_cfg = shipped_configs(bwd_configs, block_d, torch_dtype[dtype], kind, arch, d < block_d, True)[0]
                for split in (False, True):
                    want(_attn_bwd_dkdv, dtype, d, kind_flags[kind], kv_cfg, arch, split=split, key_major=False)
                    want(_attn_bwd_dkdv, dtype, d, kind_flags[kind], km_cfg, arch, wgmma=True, split=split,
                         key_major=True)
                    # with dQ written by it when all keys fit one block (its own tile; wgmma on the key dots)
                    dq_cfg = fused_dq_config(km_cfg, block_d, kind, arch)
                    want(_attn_bwd_dkdv, dtype, d, kind_flags[kind], dq_cfg, arch, wgmma=True, split=split,
                         key_major=True, fused_dq=True)
                for tail in (0, TAIL_N) if tail_possible(q_cfg[1], block_d, DQ_TAIL_MAX_BLOCK_D) else (0,):
                    want(_attn_bwd_dq, dtype, d, kind_flags[kind], q_cfg, arch, tail=tail)
            want(_bwd_preprocess, dtype, d, (), (64, None, 4, 3), arch)  # as backward() launches it
    # The split exp2 (EXP_EMU, off by default; benchmarks.tune times it): its inline PTX compiles into the hot
    # Hopper forward without spills.
    for dtype, d in (("fp16", 64), ("bf16", 128)):
        cfg = shipped_configs(fwd_configs, d, torch_dtype[dtype], "plain", 90)[0]
        for emu in (4, 8):
            if emu != EXP_EMU:
                want(_attn_fwd, dtype, d, (), cfg, 90, wgmma=True, emu=emu)
    # TMA descriptors (KV_TMA, BWD_TMA; by default on for long plain attention, _tma_by_default): the Hopper
    # forward's long and short tiles and the backward's tiles at head dims 40-128, plain and with every mask of
    # each kind.
    for dtype, d in (("fp16", 64), ("bf16", 40), ("bf16", 80), ("fp16", 128)):  # as the pointer specs above
        block_d = padded_head_dim(d)
        for kind in ("plain", "bias"):
            if not KV_TMA:
                for cfg in shipped_configs(fwd_configs, block_d, torch_dtype[dtype], kind, 90, d < block_d):
                    for flags in ((), kind_flags[kind]) if kind == "plain" else (kind_flags[kind],):
                        want(_attn_fwd, dtype, d, flags, cfg, 90, wgmma=not flags, tma=True)
            if not BWD_TMA:
                kv_cfg, q_cfg = shipped_configs(bwd_configs, block_d, torch_dtype[dtype], kind, 90, d < block_d)
                want(_attn_bwd_dkdv, dtype, d, kind_flags[kind], kv_cfg, 90, tma=True)
                want(_attn_bwd_dkdv, dtype, d, kind_flags[kind], kv_cfg, 90, split=True, tma=True)
                want(_attn_bwd_dq, dtype, d, kind_flags[kind], q_cfg, 90, tma=True)
    # RoPE in the forward (ROPE_IN_KERNEL; rope_config): its tiles, with and without the masks and the tail block.
    for dtype, d in (("fp16", 32), ("fp16", 64), ("bf16", 128)):
        for arch in ARCHS:
            cfg = shipped_configs(rope_config, d, torch_dtype[dtype], arch)
            for tail in (0, TAIL_N) if tail_possible(cfg[1], d) else (0,):
                want(_attn_fwd, dtype, d, kind_flags["plain"], cfg, arch, tail=tail, rope=True)
                want(_attn_fwd, dtype, d, (), cfg, arch, wgmma=cfg[0] >= 64, tail=tail, rope=True)
    # q alone rotated in the forward (ROPE_IN_KERNEL "q"): the plain forward's tiles, pointer and TMA K/V loads.
    for dtype, d in (("fp16", 32), ("fp16", 64), ("bf16", 128)):
        for arch in ARCHS:
            for cfg in shipped_configs(rope_q_configs, d, torch_dtype[dtype], arch):
                for tail in (0, TAIL_N) if tail_possible(cfg[1], d) else (0,):
                    want(_attn_fwd, dtype, d, kind_flags["plain"], cfg, arch, tail=tail, rope_q=True, tma=False)
                    want(_attn_fwd, dtype, d, (), cfg, arch, wgmma=cfg[0] >= 64, tail=tail, rope_q=True, tma=False)
                if arch == 90 and d in (64, 128):
                    want(_attn_fwd, dtype, d, kind_flags["plain"], cfg, arch, rope_q=True, tma=True)
                    want(_attn_fwd, dtype, d, (), cfg, arch, wgmma=cfg[0] >= 64, rope_q=True, tma=True)
    # The warp-specialized forward (FWD_WARP_SPEC; sm_90, Q/K/V by TMA): its tiles, causal or not.
    for dtype, d in (("fp16", 64), ("bf16", 128)):
        for flags in ((), ("CAUSAL",)):
            want(_attn_fwd, dtype, d, flags, FWD_WS_TABLE[d], 90, wgmma=True, tma=True, ws=True)

    specs = []
    for (fn, dtype, d, flags, (bm, bn, warps, stages), wgmma, split, tail, emu, tma, km, fused_dq, rope, ws, rope_q), \
            archs in wanted.items():
        types = {name: "*" + dtype for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        if tma:  # the dK/dV kernel's Q/dO blocks are BLOCK_M rows, the others' K/V blocks BLOCK_N
            rows, names = (bm, ("Q", "DO")) if fn is _attn_bwd_dkdv else (bn, ("K", "V"))
            types.update(dict.fromkeys(names, f"tensordesc<{dtype}[1, 1, {rows}, {padded_head_dim(d)}]>"))
            if ws:  # the warp-specialized forward reads Q by TMA too
                types["Q"] = f"tensordesc<{dtype}[1, 1, {bm}, {padded_head_dim(d)}]>"
        if split:
            types.update(DK="*fp32", DV="*fp32")  # the split's partial sums
        types.update(LSE="*fp32", DELTA="*fp32", DS="*fp32", BIAS="*fp32", KPM="*u8", qk_scale="fp32",
                     sm_scale="fp32", COS="*fp32", SIN="*fp32")
        constexprs = {f: f in flags for f in short if f in arg_names(fn)}
        constexprs.update(HEAD_DIM=d, BLOCK_D=padded_head_dim(d), BLOCK_M=bm)
        if bn is not None:
            constexprs.update(BLOCK_N=bn, sbn=1, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", ALIGN8=True)
        if "QUERY_SPLIT" in arg_names(fn):
            constexprs["QUERY_SPLIT"] = split
        if "TAIL_N" in arg_names(fn):
            constexprs["TAIL_N"] = tail
        if "EXP_EMU" in arg_names(fn):
            constexprs["EXP_EMU"] = emu
        for name in ("KV_TMA", "TMA"):
            if name in arg_names(fn):
                constexprs[name] = tma
        if "KEY_MAJOR" in arg_names(fn):
            constexprs.update(KEY_MAJOR=km, WRITE_DQ=fused_dq)
        if "ROPE" in arg_names(fn):
            constexprs.update(ROPE=rope, ROPE_Q=rope_q, HALF=d // 2 if rope or rope_q else 0)
        if "WARP_SPEC" in arg_names(fn):
            constexprs["WARP_SPEC"] = ws
        sig = signature_of(fn, constexprs, types)
        divisible = [a for a, t in sig.items() if t.startswith("*")]
        # batch and row strides (multiples of H * D for (B, L, H, D) buffers) are multiples of 16 for the
        # models' head counts; the head stride D only when D is
        divisible += [a for a in sig if re.fullmatch(r"s(q|k|v|o|do|dq|dk|dv)[bmn]", a)]
        if d % 16 == 0:
            divisible += [a for a in sig if re.fullmatch(r"s(q|k|v|o|do|dq|dk|dv)h", a)]
        tags = [short[f] for f in flags] + (["split"] if split else []) + ([f"tail{tail}"] if tail else [])
        tags += [f"exp{emu}"] if emu and "EXP_EMU" in arg_names(fn) else []
        tags += ["tma"] if tma else []
        tags += ["keymajor"] if km else []
        tags += ["dq"] if fused_dq else []
        tags += ["rope"] if rope else []
        tags += ["ropeq"] if rope_q else []
        tags += ["ws"] if ws else []
        variant = "+".join(tags) or ("plain" if bn is not None else "")
        mma_rows = bn if km else bm  # a warpgroup MMA needs 64 rows: the tile's keys when key-major
        specs.append(AotSpec(fn.__name__, f"{dtype} d{d} {variant}".strip(), fn, sig, constexprs, warps, stages,
                             tuple(divisible), expect_wgmma=wgmma and dtype != "fp32" and mma_rows >= 64
                             and 90 in archs, expect_ws=ws, archs=tuple(archs)))
    return specs

