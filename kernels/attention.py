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

Blocks that a mask removes entirely are skipped: causal/prefix limits bound the loops, and a key block
whose padding mask is all False is not computed.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ------------------------------------------------------------------------------------------------
# Configs as data: (BLOCK_M, BLOCK_N, num_warps, num_stages), in order of preference, filtered per padded
# head dim by keep(). The launcher takes the first kept config, or the first with BLOCK_M = 64 when the
# grid would not fill the GPU twice over (short sequences). Under the interpreter one small config is used
# so tests are quick and still cross several blocks. benchmarks/ can sweep every kept config.
# ------------------------------------------------------------------------------------------------

FWD_CANDIDATES = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3),
                  (64, 64, 4, 3), (64, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)]
BWD_CANDIDATES = [(64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1),
                  (32, 64, 4, 1)]
INTERPRETER_CONFIG = (32, 32, 4, 1)
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)


def _fwd_keep(cfg, block_d):
    bm, bn, warps, stages = cfg
    if block_d <= 64:
        return warps == 4 or bn == 128
    if block_d == 128:
        return warps == 8 and bn <= 64
    return bm == 64 and warps == 4 and stages == 2  # 256: the tile must fit registers and shared memory


def _bwd_keep(cfg, block_d):
    bm, bn, warps, stages = cfg
    if block_d <= 64:
        return stages == 2 and bm == 64 and (warps == 4 or bn == 128)
    if block_d == 128:
        return stages == 2 and bn == 64 and (warps == 8 or bm == 32)
    return stages == 1 and bm == 32


def fwd_configs(block_d: int):
    if _interpreting():
        return [INTERPRETER_CONFIG]
    return [c for c in FWD_CANDIDATES if _fwd_keep(c, block_d)]


def bwd_configs(block_d: int):
    if _interpreting():
        return [INTERPRETER_CONFIG]
    return [c for c in BWD_CANDIDATES if _bwd_keep(c, block_d)]


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _pick(configs, Lq, BH):
    """First config, or the first BLOCK_M = 64 one when BLOCK_M = 128 gives under ~2 waves of programs."""
    bm = configs[0][0]
    if bm > 64 and triton.cdiv(Lq, bm) * BH < 2 * _sm_count():
        return next((c for c in configs if c[0] == 64), configs[0])
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
def _visible(offs_m, offs_n, Lk, prefix_len, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True where query offs_m may see key offs_n by index (bounds + causal/prefix)."""
    keep = offs_n[None, :] < Lk
    if CAUSAL:
        keep = keep & ((offs_n[None, :] <= offs_m[:, None]) | (offs_n[None, :] < prefix_len))
    return keep


@triton.jit
def _scores(q, k, bias_ptrs, offs_m, offs_n, Lq, Lk, prefix_len, kp, qk_scale,
            HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Scores of one tile in log2 units, masked keys at -inf. ``MASKED`` False skips the index masks
    (caller guarantees the tile is fully visible and in bounds)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        bmask = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
        s += tl.load(bias_ptrs, mask=bmask, other=0.0).to(tl.float32) * 1.4426950408889634
    if MASKED:
        s = tl.where(_visible(offs_m, offs_n, Lk, prefix_len, CAUSAL), s, float("-inf"))
    if HAS_KPM:
        s = tl.where(kp[None, :], s, float("-inf"))
    return s


@triton.jit
def _causal_hi(start_m, Lk, prefix_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the key range that query block start_m can see."""
    if CAUSAL:
        return tl.minimum(Lk, tl.maximum(start_m + BLOCK_M, prefix_len))
    else:
        return Lk


@triton.jit
def _rotate(x, ptrs, cs_rows, COS, SIN, offs_d, row_mask, R):
    """RoPE of a loaded (rows, BLOCK_D) tile ``x`` whose element pointers are ``ptrs``: channel c < R pairs
    with c + R (half-split) and becomes ``x[c] cos - x[c+R] sin``, channel R <= c < 2R becomes
    ``x[c] cos + x[c-R] sin``; channels past 2R pass through. ``cs_rows`` (rows, 1) are the offsets of
    each row's angles in the (.., N, R) cos/sin tables. The partner channels are a second load of the
    same rows (an L1 hit), so the rotation costs no extra pass over memory."""
    first = offs_d < R
    m = row_mask & (offs_d < 2 * R)[None, :]
    partner = tl.load(ptrs + tl.where(first, R, -R)[None, :], mask=m, other=0.0).to(tl.float32)
    ci = tl.where(first, offs_d, offs_d - R)[None, :]
    c = tl.load(COS + cs_rows + ci, mask=m, other=1.0).to(tl.float32)
    sn = tl.load(SIN + cs_rows + ci, mask=m, other=0.0).to(tl.float32)
    sn = tl.where(first[None, :], -sn, sn)
    return (x.to(tl.float32) * c + partner * sn).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, kpm_ptr, offs_m, offs_n, start_n,
              Lq, Lk, prefix_len, qk_scale, mask_d, COS, SIN, cs_b, scn, R, offs_d,
              HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, ROPE: tl.constexpr):
    cols = start_n + offs_n
    kp = cols < Lk
    if HAS_KPM:
        kp = kp & (tl.load(kpm_ptr + cols, mask=cols < Lk, other=0) != 0)
        if tl.max(kp.to(tl.int32), 0) > 0:  # a key block the padding mask removes entirely is skipped
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, kp, offs_m, cols,
                                       Lq, Lk, prefix_len, qk_scale, mask_d, COS, SIN, cs_b, scn, R, offs_d,
                                       HAS_BIAS, HAS_KPM, CAUSAL, MASKED, DOT_PRECISION, EVEN_D, ROPE)
    else:
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, kp, offs_m, cols,
                                   Lq, Lk, prefix_len, qk_scale, mask_d, COS, SIN, cs_b, scn, R, offs_d,
                                   HAS_BIAS, HAS_KPM, CAUSAL, MASKED, DOT_PRECISION, EVEN_D, ROPE)
    return acc, m_i, l_i


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, kp, offs_m, cols,
               Lq, Lk, prefix_len, qk_scale, mask_d, COS, SIN, cs_b, scn, R, offs_d,
               HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, ROPE: tl.constexpr):
    """One key block of the online softmax: load K/V (rotating K for RoPE), score, rescale, accumulate."""
    if MASKED:
        kv_mask = (cols[:, None] < Lk) & mask_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    if ROPE:
        k = _rotate(k, k_ptrs, cs_b + cols.to(tl.int64)[:, None] * scn, COS, SIN, offs_d, cols[:, None] < Lk, R)
    s = _scores(q, k, bias_ptrs, offs_m, cols, Lq, Lk, prefix_len, kp, qk_scale,
                HAS_BIAS, HAS_KPM, CAUSAL, MASKED, DOT_PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; exponentiate against 0 there so no inf - inf.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, BIAS, KPM, COS, SIN,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
              sbb, sbh, sbm, sbn, skpb, scb, scn,
              H, GROUP, Lq, Lk, prefix_len, R, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, ROPE: tl.constexpr,
              DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    rows = offs_m.to(tl.int64)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & mask_d[None, :], other=0.0)
    cs_b = b * scb
    if ROPE:
        q = _rotate(q, q_ptrs, cs_b + rows[:, None] * scn, COS, SIN, offs_d, offs_m[:, None] < Lq, R)
    k_ptrs = K + b * skb + hk * skh + offs_n.to(tl.int64)[:, None] * skn + offs_d[None, :]
    v_ptrs = V + b * svb + hk * svh + offs_n.to(tl.int64)[:, None] * svn + offs_d[None, :]
    bias_ptrs = BIAS
    if HAS_BIAS:
        bias_ptrs = BIAS + b * sbb + h * sbh + rows[:, None] * sbm + offs_n.to(tl.int64)[None, :] * sbn
    kpm_ptr = KPM
    if HAS_KPM:
        kpm_ptr = KPM + b * skpb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = _causal_hi(start_m, Lk, prefix_len, BLOCK_M, CAUSAL)
    # Key blocks below full_hi are in bounds and fully visible to every row of this block: no index mask.
    full_hi = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(full_hi, tl.maximum(((start_m + 1) // BLOCK_N) * BLOCK_N,
                                                 (prefix_len // BLOCK_N) * BLOCK_N))
    for start_n in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs + start_n * skn, v_ptrs + start_n * svn,
                                  bias_ptrs + start_n * sbn, kpm_ptr, offs_m, offs_n, start_n,
                                  Lq, Lk, prefix_len, qk_scale, mask_d, COS, SIN, cs_b, scn, R, offs_d,
                                  HAS_BIAS, HAS_KPM, CAUSAL, False, DOT_PRECISION, EVEN_D, ROPE)
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_ptrs + start_n * skn, v_ptrs + start_n * svn,
                                  bias_ptrs + start_n * sbn, kpm_ptr, offs_m, offs_n, start_n,
                                  Lq, Lk, prefix_len, qk_scale, mask_d, COS, SIN, cs_b, scn, R, offs_d,
                                  HAS_BIAS, HAS_KPM, CAUSAL, True, DOT_PRECISION, EVEN_D, ROPE)

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
def _bwd_probs(q, k, bias_ptrs, offs_m, cols, Lq, Lk, prefix_len, kp, qk_scale, lse2,
               HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Recompute the probabilities P of one tile from the saved log-sum-exp (log2 units)."""
    s = _scores(q, k, bias_ptrs, offs_m, cols, Lq, Lk, prefix_len, kp, qk_scale,
                HAS_BIAS, HAS_KPM, CAUSAL, True, DOT_PRECISION)
    return tl.math.exp2(s - lse2[:, None])


@triton.jit
def _load_lse2(LSE, offs_m, Lq):
    """Saved lse in log2 units; +inf for fully masked or out-of-range rows, so their P is exactly 0."""
    lse = tl.load(LSE + offs_m, mask=offs_m < Lq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, BIAS, KPM, DK, DV, DS,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                   sbb, sbh, sbm, sbn, skpb,
                   HKV, GROUP, Lq, Lk, prefix_len, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, WRITE_DS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    if tl.max(kp.to(tl.int32), 0) > 0:
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bh = b * (HKV * GROUP) + h
            for start_m in range(lo, Lq, BLOCK_M):
                offs_m = start_m + offs_m0
                rows = offs_m.to(tl.int64)
                qd_mask = (offs_m[:, None] < Lq) & mask_d
                q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=qd_mask, other=0.0)
                do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=qd_mask,
                             other=0.0)
                lse2 = _load_lse2(LSE + bh * Lq, offs_m, Lq)
                delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
                bias_ptrs = BIAS
                if HAS_BIAS:
                    bias_ptrs = BIAS + b * sbb + h * sbh + rows[:, None] * sbm + ccols[None, :] * sbn
                p = _bwd_probs(q, k, bias_ptrs, offs_m, cols, Lq, Lk, prefix_len, kp, qk_scale, lse2,
                               HAS_BIAS, HAS_KPM, CAUSAL, DOT_PRECISION)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
                ds = p * (dp - delta[:, None])
                if WRITE_DS:
                    ds_ptrs = DS + bh * Lq * Lk + rows[:, None] * Lk + ccols[None, :]
                    tl.store(ds_ptrs, ds, mask=(offs_m[:, None] < Lq) & (cols[None, :] < Lk))
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + ccols[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + b * sdvb + hk * sdvh + ccols[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, BIAS, KPM, DQ,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
                 sbb, sbh, sbm, sbn, skpb,
                 H, GROUP, Lq, Lk, prefix_len, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr,
                 DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
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
    hi = _causal_hi(start_m, Lk, prefix_len, BLOCK_M, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        ccols = cols.to(tl.int64)
        kp = cols < Lk
        if HAS_KPM:
            kp = kp & (tl.load(KPM + b * skpb + cols, mask=cols < Lk, other=0) != 0)
        if tl.max(kp.to(tl.int32), 0) > 0:
            kv_mask = (cols[:, None] < Lk) & mask_d
            k = tl.load(K + b * skb + hk * skh + ccols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + b * svb + hk * svh + ccols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            bias_ptrs = BIAS
            if HAS_BIAS:
                bias_ptrs = BIAS + b * sbb + h * sbh + rows[:, None] * sbm + ccols[None, :] * sbn
            p = _bwd_probs(q, k, bias_ptrs, offs_m, cols, Lq, Lk, prefix_len, kp, qk_scale, lse2,
                           HAS_BIAS, HAS_KPM, CAUSAL, DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
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


def _rope_args(rope):
    """(cos, sin, batch stride, position stride, R) of (N, R) or (B, N, R) tables; Nones when no rope."""
    if rope is None:
        return None, None, 0, 0, 0
    cos, sin = (t.contiguous() for t in rope)
    return cos, sin, cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2), cos.shape[-1]


def forward(q, k, v, bias, kpm, causal: bool, prefix_len: int, scale: float, rope=None, config=None):
    """Launch the forward kernel. Returns ``(out, lse)``: out ``(B, Hq, Lq, D)`` in q's dtype, stored as a
    ``(B, Lq, Hq, D)`` buffer so ``out.transpose(1, 2).reshape(B, Lq, Hq * D)`` is free; lse fp32 (B, Hq, Lq).
    ``rope=(cos, sin)``, tables ``(N, R)`` or ``(B, N, R)`` with N = Lq = Lk, rotates q and k (half-split
    pairs) as their tiles are loaded."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    BLOCK_D = padded_head_dim(D)
    o = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    bias_t, sb = _bias_args(bias, B, H, Lq, Lk)
    kpm_t, skp = _kpm_args(kpm)
    cos, sin, scb, scn, R = _rope_args(rope)
    bm, bn, warps, stages = config or _pick(fwd_configs(BLOCK_D), Lq, B * H)
    grid = (triton.cdiv(Lq, bm), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse, bias_t if bias_t is not None else q, kpm_t if kpm_t is not None else q,
        cos if cos is not None else q, sin if sin is not None else q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        *sb, skp, scb, scn,
        H, H // Hkv, Lq, Lk, prefix_len, R, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=causal, HAS_BIAS=bias_t is not None, HAS_KPM=kpm_t is not None,
        ROPE=cos is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )
    return o, lse


def backward(do, q, k, v, o, lse, bias, kpm, causal: bool, prefix_len: int, scale: float, bias_grad: bool,
             config=None):
    """Launch the backward kernels. Returns ``(dq, dk, dv, ds)`` where ds is the (B, Hq, Lq, Lk) fp32
    gradient of the scores when ``bias_grad`` (else None)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    BLOCK_D = padded_head_dim(D)
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq = torch.empty((B, Lq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    dk = torch.empty((B, Lk, Hkv, D), device=k.device, dtype=k.dtype).transpose(1, 2)
    dv = torch.empty((B, Lk, Hkv, D), device=v.device, dtype=v.dtype).transpose(1, 2)
    delta = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    ds = torch.zeros((B, H, Lq, Lk), device=q.device, dtype=torch.float32) if bias_grad else None
    bias_t, sb = _bias_args(bias, B, H, Lq, Lk)
    kpm_t, skp = _kpm_args(kpm)
    bm, bn, warps, stages = config or bwd_configs(BLOCK_D)[0]
    pre_m = 64 if not _interpreting() else 32
    _bwd_preprocess[(triton.cdiv(Lq, pre_m), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, Lq,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=pre_m)
    dummy = q
    common = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, CAUSAL=causal, HAS_BIAS=bias_t is not None,
                  HAS_KPM=kpm_t is not None, DOT_PRECISION=_dot_precision(q.dtype),
                  BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    _attn_bwd_dkdv[(triton.cdiv(Lk, bn), B * Hkv)](
        q, k, v, do, lse, delta, bias_t if bias_t is not None else dummy, kpm_t if kpm_t is not None else dummy,
        dk, dv, ds if ds is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *sb, skp,
        Hkv, H // Hkv, Lq, Lk, prefix_len, scale * LOG2E, scale,
        WRITE_DS=ds is not None, **common)
    _attn_bwd_dq[(triton.cdiv(Lq, bm), B * H)](
        q, k, v, do, lse, delta, bias_t if bias_t is not None else dummy, kpm_t if kpm_t is not None else dummy, dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *sb, skp,
        H, H // Hkv, Lq, Lk, prefix_len, scale * LOG2E, scale, **common)
    return dq, dk, dv, ds


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (dlcv_fast/aot.py, tests/kernels/test_aot_compile.py)
# ------------------------------------------------------------------------------------------------

def aot_specs():
    """Every shipped instance of this file's kernels, for the compile check without a GPU.

    Per head-dim bucket and dtype, each config of ``fwd_configs``/``bwd_configs`` as a GPU launch sees them.
    Variants: every feature flag the kernel has on (causal, bias, key padding mask, rope, dS written: the
    most registers); for the forward also all but the key padding mask (whose block skip stops software
    pipelining, so this is the variant with the most shared memory) and the plain forward (the hot path,
    which must use wgmma on Hopper in fp16/bf16; sm_90 only, to save time: the others bound it).
    fp16 takes the power-of-two head dim of each bucket and bf16 a padded one where models have it
    (40 -> 64, 80 -> 128, 160 -> 256), so both the even and the masked head-dim paths compile (bf16 at 16
    and 32 compiled to the same registers as fp16, so it is left out to save time); fp32 (IEEE dots) is
    checked for the 64 bucket with the first config of each kernel, all flags on. Pointers are 16-byte aligned and, when the head dim is a
    multiple of 16, the q/k/v/o strides too, as for contiguous torch tensors; the bias is fp32 (what the
    SDPA bool-mask path passes) with unaligned strides.
    """
    import re

    from dlcv_fast.aot import AotSpec, arg_names, shipped_configs, signature_of

    features = dict(CAUSAL="causal", HAS_BIAS="bias", HAS_KPM="kpm", ROPE="rope", WRITE_DS="ds")
    cases = [("fp16", d) for d in (16, 32, 64, 128, 256)] + [("bf16", d) for d in (40, 80, 160)] + [("fp32", 64)]
    specs = []
    for dtype, d in cases:
        block_d = padded_head_dim(d)
        types = {name: "*" + dtype for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        types.update(LSE="*fp32", DELTA="*fp32", DS="*fp32", BIAS="*fp32", KPM="*u8", COS="*fp32",
                     SIN="*fp32", qk_scale="fp32", sm_scale="fp32")

        def add(fn, cfg=(None, None, 4, 3), off=(), wgmma=False, archs=None, **constexprs):
            """``fn`` with every feature flag it has on except those in ``off`` ("all": the plain kernel)."""
            bm, bn, warps, stages = cfg
            if bm is not None:
                constexprs.update(BLOCK_M=bm, BLOCK_N=bn)
            flags = {k: off != "all" and k not in off for k in features if k in arg_names(fn)}
            constexprs.update(flags, HEAD_DIM=d, BLOCK_D=block_d)
            sig = signature_of(fn, constexprs, types)
            divisible = [a for a, t in sig.items() if t.startswith("*")]
            if d % 16 == 0:
                divisible += [a for a in sig if re.fullmatch(r"s(q|k|v|o|do|dq|dk|dv)[bhmn]", a)]
            variant = "+".join(features[k] for k, on in flags.items() if on) or ("plain" if flags else "")
            specs.append(AotSpec(fn.__name__, f"{dtype} d{d} {variant}".strip(), fn, sig, constexprs, warps,
                                 stages, tuple(divisible), expect_wgmma=wgmma, archs=archs))

        prec = "ieee" if dtype == "fp32" else "tf32"
        fwd_variants = [((), None), (("HAS_KPM",), None), ("all", (90,))]
        fwd_cfgs, bwd_cfgs = shipped_configs(fwd_configs, block_d), shipped_configs(bwd_configs, block_d)
        if dtype == "fp32":  # the first (default) configs, all flags on: fp32 is the rare path
            fwd_variants, fwd_cfgs, bwd_cfgs = fwd_variants[:1], fwd_cfgs[:1], bwd_cfgs[:1]
        for off, archs in fwd_variants:
            for cfg in fwd_cfgs:
                add(_attn_fwd, cfg, off, wgmma=dtype != "fp32", archs=archs, DOT_PRECISION=prec)
        for cfg in bwd_cfgs:
            add(_attn_bwd_dkdv, cfg, DOT_PRECISION=prec)
            add(_attn_bwd_dq, cfg, DOT_PRECISION=prec)
        add(_bwd_preprocess, BLOCK_M=64)  # backward() launches it with BLOCK_M = 64 and default warps/stages
    return specs
