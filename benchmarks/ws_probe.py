"""A measuring probe, not a shipped kernel: does Triton's automatic warp specialization pay on Hopper?

FlashAttention-3 gets its Hopper forward speed from warp specialization (producer warps issuing TMA loads,
consumer warpgroups doing the MMAs and the softmax). Triton can do it by itself for a loop marked
``tl.range(..., warp_specialize=True)``: compiled for sm_90 with triton 3.6 and 3.8 (2026-11-30, no GPU),
a plain attention loop over 4-D TMA descriptors gets three partitions (12 warps for ``num_warps=4``,
``setmaxnreg`` register rebalancing) at 64-row query tiles; 128-row tiles are rejected (4 warps) or left
unspecialized (8 warps). Our forward (``kernels/attention.py``) got through the pass only with Q read by TMA
too (a pointer load feeding the loop's dots: "unsupported load type for producer commit") and its masked
second loop compiled out (the pass takes one loop): its ``FWD_WARP_SPEC`` path. This file is the smallest
forward that specializes: no masks, Lq = Lk a multiple of both tile sides, head dim 64 or 128 exactly,
fp16/bf16, (B, H, L, D) tensors with TMA-addressable strides. ``benchmarks.tune --only wsfwd`` times it with
and without the flag, and our forward with FWD_WARP_SPEC, beside the shipped forward on the suite's long
shapes (rows: ``ws_applied`` = the compiled PTX has ``setmaxnreg``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize) per head dim: the specialized tiles the sm_90
# compile accepted within 227 KiB of shared memory (no spill; 168 registers, 12 warps, triton 3.6 and 3.8),
# then the same loop unspecialized (the probe's own baseline) at those and the shipped forward's tile shapes.
CANDIDATES = {
    64: [(64, 128, 4, 2, True), (64, 128, 4, 3, True), (64, 64, 4, 2, True),
         (64, 128, 4, 2, False), (128, 64, 8, 3, False), (128, 128, 8, 2, False)],
    128: [(64, 128, 4, 2, True), (64, 64, 4, 2, True), (64, 64, 4, 3, True),
          (64, 128, 4, 2, False), (128, 64, 8, 3, False), (128, 128, 8, 2, False)],
}


@triton.jit
def _ws_attn_fwd(desc_q, desc_k, desc_v, desc_o, H, L, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Softmax(q k^T * scale) v for query block program_id(0) of head program_id(1); every block in bounds."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in tl.range(0, L, BLOCK_N, warp_specialize=WARP_SPEC):
        k = desc_k.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([b, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = (acc / l_i[:, None]).to(desc_o.dtype)
    desc_o.store([b, h, start_m, 0], out.reshape(1, 1, BLOCK_M, BLOCK_D))


def usable(q, k, v, block_m: int, block_n: int) -> str | None:
    """Why the probe cannot take these inputs at this tile (None: it can)."""
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        return "q, k, v must be (B, H, L, D) of one shape"
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return "fp16 or bf16 only"
    L, D = q.shape[2], q.shape[3]
    if D not in (64, 128):
        return f"head dim {D} (64 or 128 only)"
    if L % block_m or L % block_n:
        return f"L={L} is not a multiple of the tile ({block_m} x {block_n}): the probe has no masks"
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return "every tensor needs a unit last stride, 16-byte aligned base and strides (TMA)"
    return None


def forward(q, k, v, scale=None, config=CANDIDATES[64][0]):
    """``softmax(q k^T * scale) v`` by the probe kernel; returns ``(out, compiled kernel)`` (its ``asm`` tells
    whether the specialization happened). Raises ValueError where :func:`usable` says no."""
    block_m, block_n, warps, stages, ws = config
    why = usable(q, k, v, block_m, block_n)
    if why:
        raise ValueError(f"ws_probe.forward: {why}")
    B, H, L, D = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, D])
             for t, rows in ((q, block_m), (k, block_n), (v, block_n), (o, block_m))]
    scale = D ** -0.5 if scale is None else scale
    compiled = _ws_attn_fwd[(L // block_m, B * H)](*descs, H, L, scale * LOG2E, BLOCK_M=block_m, BLOCK_N=block_n,
                                                  BLOCK_D=D, WARP_SPEC=ws, num_warps=warps, num_stages=stages)
    return o, compiled


def specialized(compiled) -> bool | None:
    """Whether a compiled launch of the probe was warp-specialized (None where there is no PTX to read: the
    interpreter)."""
    from dlcv_fast.aot import warp_specialized

    asm = getattr(compiled, "asm", None)
    if not asm or "ptx" not in asm:
        return None
    return warp_specialized(asm["ptx"])
