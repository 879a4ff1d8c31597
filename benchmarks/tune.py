"""Config sweep for the attention kernels on a GPU: parity and time of each candidate tile.

    python -m benchmarks.tune --out sweep.jsonl [--only table,bwd128,bwd64,fwd,split,rope64,rope128,window,linear,wsfwd]
    python -m benchmarks.tune --summarize sweep.jsonl   # default vs fastest per comparison, no GPU needed

With several groups, each is first run once in its own process with ``--compile-only`` (``--warm-jobs``), so
their candidates compile side by side before anything is timed (a fresh machine's sweep is mostly compiling).

For each group (the backward tables' own entries, backward candidates at head dim 128 / 64, forward tiles at
the suite's long and short shapes, the dK/dV query split and the key-major backward (dQ in the dK/dV kernel or
not) at short key sides, forward with ``rope=`` at 64 / 128 (two passes, or rotated in the kernel), the
window-attention forward and backward: one program per window or per group of windows, one backward kernel or
two, their tiles, window-group counts; the Linear + GELU GEMM's tiles; ``wsfwd``, the warp-specialized forward
and the probe of benchmarks/ws_probe.py beside the shipped forward) every candidate config is launched through
the kernels' own launchers, its outputs are compared with a float32 reference (torch's SDPA math backend,
non-causal and causal at a length that leaves a one-row last block; dlcv_fast.reference for window
attention), and it is timed with ``triton.testing.do_bench`` on the headline shape. One JSON line per
candidate is appended to ``--out`` as soon as it is measured, so a run cut short keeps what it measured. The
entries of the kernels' config tables come from these lines (benchmarks/results/ keeps them); a candidate
that fails parity is never chosen.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.warm import gpu_takes_several_processes, workers_stopped_on_exit

# (dK/dV candidates, dQ candidates); the other kernel keeps the table's entry while one is swept.
BWD_CANDIDATES = {
    64: ([(64, 32, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 128, 8, 2), (32, 128, 4, 3),
          (64, 128, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
         [(64, 64, 8, 2), (128, 32, 8, 2), (128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3),
          (128, 64, 4, 2)]),
    128: ([(32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2), (16, 64, 4, 2),
           (64, 32, 4, 2), (64, 64, 4, 2)],
          [(64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 2)]),
}
# dK/dV tiles for the key-major orientation (keys along the tile's rows, BWD_KEY_MAJOR; off by default): key
# blocks of 64 and 128 rows (a warpgroup MMA's 64 rows per warpgroup), the sm_90 compiles with the fewest
# spills (head dim 64: none at 64x64 w4/w8 and 64x128 w8; 128: 120-556 B against 416-2136 B query-major).
KM_CANDIDATES = {64: [(64, 128, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 4, 2)],
                 128: [(64, 64, 8, 2), (64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 2)]}
# Forward with rope= at these tiles. Until 2026-11-27 rope= rotated q in the kernel's prologue; that version
# ("fwd ROPE_Q" rows of benchmarks/results/2026-11-27T2115_nvidia-h200_tune.jsonl) lost to one RoPE pass over
# q and k plus the plain kernel at every tile, which is what forward(rope=) does now.
# Two tiles each since 2026-11-30 (the two passes at other tiles lost before; the rows that matter now are the
# in-kernel modes below, and GPU minutes are few).
ROPE_CANDIDATES = {
    64: [(128, 64, 8, 3), (128, 32, 8, 3)],
    128: [(128, 64, 8, 2), (64, 64, 4, 2)],
}
# Headline shapes (B, H, L) per head dim, as in benchmarks/attention.py; parity at (1, 4, 1025).
TIME_SHAPE = {64: (4, 32, 4096), 128: (4, 16, 4096)}
# rope= is timed at the attn_rope_fwd benchmark's shapes: ViT's 197 tokens and 4096.
ROPE_SHAPES = {64: [(8, 12, 4096), (256, 12, 197)], 128: [(8, 6, 4096), (256, 6, 197)]}
# RoPE inside the forward kernel (kernels/attention.py ROPE_IN_KERNEL; off by default): None = its ROPE_TILE,
# then other tiles that compile without spills with the rotation (AOT, sm_90).
ROPE_KERNEL_CANDIDATES = {64: [None, (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
                          128: [None, (128, 64, 8, 3), (128, 64, 8, 2)]}
CHECK = (1, 4, 1025)
DEVICE = "cuda"


def _inputs(B, H, L, D, seed=0):
    return _rect_inputs(B, H, L, L, D, seed)  # q k v do


def _rect_inputs(B, H, Lq, Lk, D, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, do = (torch.randn(B, H, Lq, D, device=DEVICE, dtype=torch.float16, generator=g) for _ in range(2))
    k, v = (torch.randn(B, H, Lk, D, device=DEVICE, dtype=torch.float16, generator=g) for _ in range(2))
    return q, k, v, do


def _ref_grads(q, k, v, do, causal):
    ins = [t.float().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*ins, is_causal=causal)
    return torch.autograd.grad(out, ins, do.float())  # dq, dk, dv


def _rel_err(a, b):
    return ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _measure(row, check, timed):
    """``row`` with ``rel_err`` / ``ok`` from ``check()`` (a relative error against the group's reference) and
    ``ms`` from ``timed()``, or ``error`` when either raises (a candidate that fails is a row, not a crash)."""
    try:
        err = check()
        row.update(rel_err=err, ok=err < 2e-2, ms=timed())
    except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def _bwd(kern, q, k, v, do, causal, config, tma=None, key_major=None):
    scale = q.shape[-1] ** -0.5
    o, lse = kern.forward(q, k, v, None, None, causal, 0, scale)
    return kern.backward(do, q, k, v, o, lse, None, None, causal, 0, scale, False, config=config, tma=tma,
                         key_major=key_major)[:3]


def sweep_bwd(D, emit, table_only=False):
    from dlcv_fast.kernels import attention as kern
    from triton.testing import do_bench

    table = kern.bwd_configs(D, torch.float16, "plain")
    check_ins = _inputs(*CHECK, D, seed=1)
    checks = {causal: _ref_grads(*check_ins, causal) for causal in (False, True)}
    B, H, L = TIME_SHAPE[D]
    q, k, v, do = _inputs(B, H, L, D)
    o, lse = kern.forward(q, k, v, None, None, False, 0, D ** -0.5)
    kv_cands, q_cands = BWD_CANDIDATES[D] if not table_only else ([], [])
    # each job: (kernel, config, tma, key_major); first the table's tiles as they are (TMA loads where the
    # launcher defaults to them), key-major, and with the other kind of loads (sm_90+), then the key-major dK/dV
    # tiles (the candidates a run cut short should still reach)
    km_table = tuple(kern.bwd_configs(D, torch.float16, "plain", key_major=True))
    jobs = [("table", tuple(table), None, None), ("table (key-major)", km_table, None, True)]
    if kern._interpreting() or kern.table_arch() >= 90:
        jobs.append(("table (pointer loads)", tuple(table), False, None)
                    if kern._bwd_tma_default("plain", D, L, L, table[1], False) else
                    ("table (TMA)", tuple(table), True, None))
    jobs += [("dkdv key-major", (c, table[1]), None, True) for c in (KM_CANDIDATES[D] if not table_only else [])]
    jobs += [("dkdv", (c, table[1]), None, False) for c in kv_cands]
    jobs += [("dq", (table[0], c), None, None) for c in q_cands]
    for which, config, tma, key_major in jobs:
        row = dict(group=f"bwd{D}", kernel=which, config=config, table=list(table), shape=[B, H, L, D],
                   default=which == "table")
        try:
            errs = {}
            for causal, ref in checks.items():
                got = _bwd(kern, *check_ins, causal, config, tma, key_major)
                errs["causal" if causal else "full"] = [_rel_err(a, b) for a, b in zip(got, ref)]

            def fn():
                kern.backward(do, q, k, v, o, lse, None, None, False, 0, D ** -0.5, False, config=config, tma=tma,
                              key_major=key_major)
            row.update(ms=do_bench(fn, warmup=10, rep=40), rel_err=errs,
                       ok=all(e < 2e-2 for es in errs.values() for e in es))
        except Exception as e:  # a tile that does not fit (shared memory, registers): recorded, not fatal
            row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
        emit(row)


def sweep_rope(D, emit):
    """attention with rope= at each ROPE_SHAPES shape: the same attention without RoPE (the reference row), the
    two rotation passes + the plain kernel (the default), forward(rope=) at other plain tiles, and RoPE rotated
    inside the kernel (ROPE_KERNEL_CANDIDATES)."""
    from dlcv_fast.kernels import attention as kern
    from dlcv_fast.kernels import rope as rope_kernels
    from triton.testing import do_bench

    for B, H, L in ROPE_SHAPES[D]:
        q, k, v, _ = _inputs(B, H, L, D)
        pos = torch.arange(L, device=DEVICE, dtype=torch.float32)
        inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D)
        ang = pos[:, None] * inv[None]
        cos, sin = ang.cos(), ang.sin()
        scale = D ** -0.5
        qr, kr = (rope_kernels.apply(t, cos, sin, interleaved=False) for t in (q, k))
        ref = kern.forward(qr, kr, v, None, None, False, 0, scale)[0]
        base = dict(group=f"rope{D}", case=f"L={L}", shape=[B, H, L, D])
        emit(dict(base, kernel="plain (no rope)", reference=True,
                  ms=do_bench(lambda: kern.forward(q, k, v, None, None, False, 0, scale), warmup=10, rep=40)))
        emit(dict(base, kernel="apply_rope(q,k)+plain", default=True, ms=do_bench(
            lambda: kern.forward(rope_kernels.apply(q, cos, sin, interleaved=False),
                                 rope_kernels.apply(k, cos, sin, interleaved=False), v, None, None, False, 0, scale),
            warmup=10, rep=40)))
        jobs = [("forward(rope=)", c, False) for c in ROPE_CANDIDATES[D]]
        jobs += [("forward(rope=), q in kernel", None, "q")]  # the plain tile, k by its pass
        jobs += [("forward(rope=), in kernel", c, True) for c in ROPE_KERNEL_CANDIDATES[D]]
        for kernel, config, in_kernel in jobs:
            kw = dict(rope=(cos, sin), config=config, rope_in_kernel=in_kernel)
            shown = config if config is not None or in_kernel is not True else kern.rope_config(D, q.dtype)
            run = lambda: kern.forward(q, k, v, None, None, False, 0, scale, **kw)[0]  # noqa: E731
            emit(_measure(dict(base, kernel=kernel, config=shown), lambda: _rel_err(run(), ref.float()),
                          lambda: do_bench(run, warmup=10, rep=40)))


# Window attention backward (Swin-T stage 1 and 3, window 7 shift 3): the one-kernel backward (default in
# fp16/bf16 for windows of at most 64 tokens) against the dq + dk/dv kernels, the latter's dK/dV tiles
# (BLOCK_M, BLOCK_N, warps, stages), and window-group counts (a multiple of the default, which aims at
# PROGRAMS_PER_SM programs per SM).
WINDOW_SHAPES = {"stage1": (128, 56, 56, 3), "stage3": (128, 14, 14, 12)}  # B, H, W, heads (head dim 32)
# Each job is backward()'s keyword arguments. None as a dK/dV tile = the table's entry (sm_90: 64x64 w8, one
# query chunk per 7x7 window); 32x64 w8 is the sm_80 entry.
WINDOW_FUSED = [None, (64, 8, 2), (64, 8, 1)]  # None: fused_config's entry (sm_90: 64-token tile, 4 warps, 1 stage)
WINDOW_DKDV = [None, (32, 64, 8, 1), (32, 64, 4, 1), (64, 64, 4, 1), (64, 32, 4, 1), (64, 32, 8, 1)]
WINDOW_GROUP_SCALE = [0.5, 2.0, 4.0]
WINDOW_CHECK_B = 2
# The forward: windows looped over per program (default for one-tile windows in fp16/bf16) against one program
# per window (None: each path's default config).
WINDOW_FWD_GROUPED = [None, (64, 8, 2), (64, 4, 1), (64, 4, 3)]


def window_fwd_jobs(kern, window, head_dim, dtype, default_groups):
    """forward() keyword arguments of each window-forward candidate, labelled."""
    grouped_default = kern.fwd_grouped_config(window, head_dim, dtype)
    jobs = [("grouped", dict(grouped_cfg=cfg or grouped_default)) for cfg in WINDOW_FWD_GROUPED
            if cfg or grouped_default]
    jobs.append(("per window", dict(config=kern.fwd_config(window, head_dim, dtype))))
    if grouped_default:
        jobs += [("grouped", dict(grouped_cfg=grouped_default, groups=max(1, int(default_groups * f))))
                 for f in WINDOW_GROUP_SCALE]
    return jobs


def window_jobs(kern, window, head_dim, dtype, default_groups):
    """backward() keyword arguments of each window-sweep candidate, labelled."""
    fused_default = kern.fused_config(window, head_dim, dtype)
    two = dict(dq_cfg=kern.dq_config(window, head_dim, dtype))
    jobs = [("fused", dict(fused_cfg=cfg or fused_default)) for cfg in WINDOW_FUSED if cfg or fused_default]
    jobs += [("two kernels", dict(two, dkdv_cfg=cfg)) for cfg in WINDOW_DKDV]
    for f in WINDOW_GROUP_SCALE:
        groups = max(1, int(default_groups * f))
        if fused_default:
            jobs.append(("fused", dict(fused_cfg=fused_default, groups=groups)))
        jobs.append(("two kernels", dict(two, groups=groups)))
    return jobs


def sweep_window(emit):
    from dlcv_fast import reference
    from dlcv_fast.kernels import window_attention as kern
    from triton.testing import do_bench

    window, shift = (7, 7), (3, 3)
    for stage, (B, H, W, heads) in WINDOW_SHAPES.items():
        C = 32 * heads
        g = torch.Generator(device=DEVICE).manual_seed(0)
        qkv = torch.randn(B, H, W, 3 * C, device=DEVICE, dtype=torch.float16, generator=g)
        table = torch.randn(13 * 13, heads, device=DEVICE, generator=g)
        bias = torch.randn(3 * C, device=DEVICE, generator=g)
        dout = torch.randn(B, H, W, C, device=DEVICE, dtype=torch.float16, generator=g)
        scale = 32 ** -0.5
        b = WINDOW_CHECK_B
        kw_ref = dict(num_heads=heads, window_size=window, shift_size=shift, rel_pos_bias_table=table, qkv_bias=bias,
                      scale=scale)
        ref_out = reference.window_attention(qkv[:b].float(), **kw_ref)
        n_windows = B * (H // 7) * (W // 7)

        def window_row(direction, path, kw, default_kw, default_groups):
            config = next((kw[k] for k in ("fused_cfg", "dkdv_cfg", "grouped_cfg", "config") if kw.get(k)), None)
            return dict(group=f"window_{stage}", kernel=f"window {direction}, {path}", config=config,
                        groups=kw.get("groups"), default_groups=default_groups, shape=[B, H, W, heads, 32],
                        default=kw == default_kw)

        default_groups = kern._num_groups(n_windows, heads, kern.FWD_PROGRAMS_PER_SM)
        default_kw = dict(grouped_cfg=kern.fwd_grouped_config(window, 32, qkv.dtype))
        for path, kw in window_fwd_jobs(kern, window, 32, qkv.dtype, default_groups):
            row = window_row("forward", path, kw, default_kw, default_groups)
            try:
                err = _rel_err(kern.forward(qkv[:b], table, bias, heads, window, shift, scale, **kw)[0], ref_out)
                row.update(ms=_time(lambda: kern.forward(qkv, table, bias, heads, window, shift, scale, **kw)),
                           rel_err=err, ok=err < 2e-2)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            emit(row)
        ref = reference.window_attention_backward(dout[:b].float(), qkv[:b].float(), num_heads=heads,
                                                  window_size=window, shift_size=shift, rel_pos_bias_table=table,
                                                  qkv_bias=bias, scale=scale)
        lse = kern.forward(qkv, table, bias, heads, window, shift, scale)[1]
        lse_c = kern.forward(qkv[:b], table, bias, heads, window, shift, scale)[1]
        default_groups = kern._num_groups(n_windows, heads)
        default_kw = dict(fused_cfg=kern.fused_config(window, 32, qkv.dtype))
        for path, kw in window_jobs(kern, window, 32, qkv.dtype, default_groups):
            row = window_row("backward", path, kw, default_kw, default_groups)
            try:
                got = kern.backward(dout[:b], qkv[:b], table, bias, lse_c, heads, window, shift, scale,
                                    True, True, **kw)
                errs = [_rel_err(x, r) for x, r in zip(got, ref)]

                def fn():
                    kern.backward(dout, qkv, table, bias, lse, heads, window, shift, scale, True, True, **kw)
                row.update(ms=do_bench(fn, warmup=10, rep=40), rel_err=errs, ok=all(e < 2e-2 for e in errs))
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            emit(row)


# Forward tiles at the suite's long and short shapes (issue 2: >= the best SDPA backend, 1.3x on short ones).
# The forward table was picked with the AOT compile check only; these lines are its first GPU measurement.
FWD_CANDIDATES = {
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4),
         (64, 128, 4, 3), (128, 64, 8, 4),
         # 32-row tiles (mma.sync, no wgmma; no spill on sm_90): the Q-Former's 32 queries fill one exactly,
         # where a 64-row tile computes 32 padding rows
         (32, 64, 4, 3), (32, 128, 4, 3),
         # 256-row tiles (ROPE_TILE's shape): ViT's 197 queries in one program per head, K/V read once per head
         (256, 32, 8, 3), (256, 64, 8, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
          (64, 128, 8, 2), (64, 64, 8, 2)],
}
FWD_EXP_EMU = [4, 8]  # one exponential in 4 / in 8 by the FP32-pipe polynomial (kernels/attention.py _exp2)
FWD_SHAPES = {"long_d64": (4, 32, 4096, 4096, 64), "long_d128": (4, 16, 4096, 4096, 128),
              "vit_b16": (256, 12, 197, 197, 64), "qformer_cross": (256, 12, 32, 257, 64),
              "unet_self": (8, 8, 4096, 4096, 40), "unet_cross": (8, 8, 4096, 77, 40)}
# The dK/dV query split (short key sides): split counts and dK/dV tiles at U-Net cross-attention shapes.
SPLIT_SHAPES = {"unet_cross_d40": (8, 8, 4096, 77, 40), "cross_d128": (8, 8, 4096, 77, 128),
                "clip_text_d64": (256, 8, 77, 77, 64)}
SPLIT_COUNTS = [1, 2, 4, 8, None]  # None: the launcher's own choice (_query_splits)
SPLIT_TILES = [None, (64, 32, 8, 2), (64, 32, 8, 1)]  # None: the table's dK/dV tile


def _time(fn):
    """The suite's timer for short calls: launches captured in a CUDA graph (host overhead excluded)."""
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep_fwd(emit):
    from dlcv_fast.kernels import attention as kern

    checked = {}  # (D, config) -> (rel errors, ok)
    for name, (B, H, Lq, Lk, D) in FWD_SHAPES.items():
        q, k, v, _ = _rect_inputs(B, H, Lq, Lk, D)
        block_d = kern.padded_head_dim(D)
        table = kern._pick(kern.fwd_configs(block_d, torch.float16, "plain", uneven=D < block_d), Lq, B * H, Lk)
        # the table's tile, with the exp2 split over two pipes, with the other kind of K/V loads than the
        # launcher's default (TMA or pointers) and with TMA and the split, without the 16-key tail block, then
        # other tiles (in that order, so a run cut short still has the first ones of every shape it reached);
        # each job: (config, tail, exp_emu, kv_tma), None = default
        def auto_tma(cfg, tail):  # as forward() decides for that tile
            return kern._use_tma("kv_tma", None, kern._fwd_tma_default("plain", block_d, Lq, Lk, cfg[1], tail), k, v)

        jobs = [(None,) * 4] + [(None, None, n, None) for n in FWD_EXP_EMU]
        if kern._interpreting() or kern.table_arch() >= 90:  # TMA: sm_90 and later; the table's tile the other way
            jobs += [(None, None, None, not auto_tma(table, None))] + [(None, None, n, True) for n in FWD_EXP_EMU[:1]]
        if kern.key_tail(Lk, table[1], block_d):
            jobs.append((None, 0, None, None))
        jobs += [(c, None, None, None) for c in FWD_CANDIDATES[64 if block_d <= 64 else 128]]
        for config, job_tail, job_emu, job_tma in jobs:
            cfg = tuple(config or table)
            tma = auto_tma(cfg, job_tail) if job_tma is None else kern._use_tma("kv_tma", job_tma, False, k, v)
            tail = 0 if tma else kern.key_tail(Lk, cfg[1], block_d) if job_tail is None else job_tail
            emu = kern.EXP_EMU if job_emu is None else job_emu
            row = dict(group="fwd", kernel="forward" if config else "forward (table)", config=cfg, tail=tail,
                       exp_emu=emu, kv_tma=tma, case=name, shape=[B, H, Lq, Lk, D],
                       default=(config, job_tail, job_emu, job_tma) == (None,) * 4)
            kw = dict(config=cfg, tail=tail, exp_emu=emu, kv_tma=tma)
            try:
                key = (D, cfg, tail, emu, tma)
                if key not in checked:  # parity at a length ending in a one-key block
                    errs = {}
                    for causal in (False, True):
                        cq, ck, cv, _ = _inputs(*CHECK, D, seed=1)
                        ref = F.scaled_dot_product_attention(cq.float(), ck.float(), cv.float(), is_causal=causal)
                        got = kern.forward(cq, ck, cv, None, None, causal, 0, D ** -0.5, **kw)[0]
                        errs["causal" if causal else "full"] = _rel_err(got, ref)
                    checked[key] = (errs, all(e < 2e-2 for e in errs.values()))
                errs, ok = checked[key]
                row.update(ms=_time(lambda: kern.forward(q, k, v, None, None, False, 0, D ** -0.5, **kw)),
                           rel_err=errs, ok=ok)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            emit(row)


def sweep_split(emit):
    from dlcv_fast.kernels import attention as kern

    for name, (B, H, Lq, Lk, D) in SPLIT_SHAPES.items():
        q, k, v, do = _rect_inputs(B, H, Lq, Lk, D)
        scale = D ** -0.5
        o, lse = kern.forward(q, k, v, None, None, False, 0, scale)
        cq, ck, cv, cdo = _rect_inputs(*CHECK, Lk, D, seed=1)
        ref = _ref_grads(cq, ck, cv, cdo, False)
        co, clse = kern.forward(cq, ck, cv, None, None, False, 0, scale)
        block_d = kern.padded_head_dim(D)
        table = kern.bwd_configs(block_d, torch.float16, "plain", uneven=D < block_d)
        km_table = tuple(kern.bwd_configs(block_d, torch.float16, "plain", uneven=D < block_d, key_major=True))
        # each job: (kernel, config, split count, key-major options, whether it is the shipped default)
        jobs = [("backward", (tuple(tile), table[1]) if tile else tuple(table), splits, {},
                 tile is None and splits is None) for tile in SPLIT_TILES for splits in SPLIT_COUNTS]
        # then the key-major backward at the launcher's split count: in one kernel (dQ and delta written by the
        # dK/dV kernel, all 77 keys in one block) at fused_dq_config's tile (on sm_90 the table's rows for these
        # plain tiles up to head dim 64) and at FUSED_DQ_BLOCK_M rows, and with the preprocess and dQ kernels
        km = km_table[0]
        jobs += [(kernel, (tile, km_table[1]), None, dict(key_major=True, fused_dq=fused), False)
                 for kernel, tile, fused in (
                     ("backward key-major", kern.fused_dq_config(km, block_d, "plain"), True),
                     ("backward key-major, 16 rows", (min(km[0], kern.FUSED_DQ_BLOCK_M), *km[1:]), True),
                     ("backward key-major, dQ kernel", km, False))]
        for kernel, config, splits, opts, default in jobs:
            n_kb = -(-Lk // config[0][1])
            row = dict(group="split", kernel=kernel, config=config, splits=splits, case=name,
                       default_splits=kern._query_splits(n_kb, B * H, Lq, config[0][0]), shape=[B, H, Lq, Lk, D],
                       default=default)
            try:
                got = kern.backward(cdo, cq, ck, cv, co, clse, None, None, False, 0, scale, False, config=config,
                                    splits=splits, **opts)[:3]
                errs = [_rel_err(a, b) for a, b in zip(got, ref)]
                row.update(ms=_time(lambda: kern.backward(do, q, k, v, o, lse, None, None, False, 0, scale, False,
                                                          config=config, splits=splits, **opts)),
                           rel_err=errs, ok=all(e < 2e-2 for e in errs))
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
            emit(row)


# Linear + GELU (an MLP's fc1, dlcv_fast.kernels.linear_act): candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps,
# stages) at ViT-B's and Swin-T stage 1's fc1, against cuBLAS + F.gelu (the reference row).
LINEAR_CANDIDATES = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                     (256, 128, 64, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4)]
LINEAR_SHAPES = {"vit_b16 fc1": (256 * 197, 768, 3072), "swin_t stage1 fc1": (256 * 3136, 96, 384)}
LINEAR_DTYPE = torch.bfloat16


def sweep_linear(emit):
    from dlcv_fast.kernels import linear_act as kern
    from triton.testing import do_bench

    for case, (M, K, N) in LINEAR_SHAPES.items():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = torch.randn(M, K, device=DEVICE, generator=g).to(LINEAR_DTYPE)
        w = (torch.randn(N, K, device=DEVICE, generator=g) * K ** -0.5).to(LINEAR_DTYPE)
        b = (torch.randn(N, device=DEVICE, generator=g) * 0.1).to(LINEAR_DTYPE)
        ref = F.gelu(F.linear(x[:4096].float(), w.float(), b.float()))
        base = dict(group="linear", case=case, shape=[M, K, N])
        emit(dict(base, kernel="cublas+gelu", reference=True,
                  ms=do_bench(lambda: F.gelu(F.linear(x, w, b)), warmup=10, rep=40)))
        default = kern.config(N)
        # the plain GEMM (no activation) against cuBLAS's Linear: how far the tile itself is from cuBLAS
        plain = dict(base, group="linear_plain")
        emit(dict(plain, kernel="cublas linear", reference=True,
                  ms=do_bench(lambda: F.linear(x, w, b), warmup=10, rep=40)))
        emit(dict(plain, kernel="linear_act none", config=default, default=True,
                  ms=do_bench(lambda: kern.forward(x, w, b, "none", cfg=default), warmup=10, rep=40)))
        # each tile per-tile and persistent (one program per SM; TMA only, so where TMA is used)
        modes = [False, True] if kern.use_tma(x, w) else [False]
        default_persistent = kern.PERSISTENT and kern.use_tma(x, w)  # as forward() decides
        for config in dict.fromkeys([default, *LINEAR_CANDIDATES]):
            for persistent in modes:
                row = dict(base, kernel="linear_act" + (" persistent" if persistent else ""), config=config,
                           default=config == default and persistent == default_persistent)
                try:
                    out = kern.forward(x, w, b, "gelu", cfg=config, persistent=persistent)
                    err = _rel_err(out[:4096], ref)
                    row.update(ms=do_bench(lambda: kern.forward(x, w, b, "gelu", cfg=config, persistent=persistent),
                                           warmup=10, rep=40), rel_err=err, ok=err < 2e-2)
                except Exception as e:
                    row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                emit(row)


WS_SHAPES = ("long_d64", "long_d128")  # FWD_SHAPES the warp-specialization probe is timed on
WS_CHECK = (1, 4, 1024)  # its parity shape (B, H, L): the probe has no masks, so L is a multiple of every tile
# The shipped forward with FWD_WARP_SPEC at these tiles (None: its FWD_WS_TABLE entry); 64-row tiles, the ones the
# pass takes on sm_90.
WS_KERNEL_CANDIDATES = {64: [None, (64, 64, 4, 2), (64, 128, 4, 3)], 128: [None, (64, 64, 4, 2)]}


def sweep_wsfwd(emit):
    """Warp specialization on the long forward shapes, beside the shipped forward (the group's default row): our
    forward with FWD_WARP_SPEC at WS_KERNEL_CANDIDATES' tiles, then the probe (benchmarks/ws_probe.py) at each
    of its tiles with and without ``warp_specialize``."""
    from benchmarks import ws_probe
    from dlcv_fast.kernels import attention as kern

    for name in WS_SHAPES:
        B, H, Lq, Lk, D = FWD_SHAPES[name]
        timed_in = _rect_inputs(B, H, Lq, Lk, D)[:3]
        parity_in = _inputs(*WS_CHECK, D, seed=1)[:3]
        ref = F.scaled_dot_product_attention(*(t.float() for t in parity_in))
        base = dict(group="wsfwd", case=name, shape=[B, H, Lq, Lk, D])

        def ours(x, **kw):  # the shipped forward on inputs x = (q, k, v)
            return kern.forward(*x, None, None, False, 0, D ** -0.5, **kw)[0]

        emit(_measure(dict(base, kernel="forward (table)", default=True), lambda: _rel_err(ours(parity_in), ref),
                      lambda: _time(lambda: ours(timed_in))))
        for cfg in WS_KERNEL_CANDIDATES[D]:  # our forward with its key loop warp-specialized (FWD_WARP_SPEC)
            kw = dict(config=cfg, warp_spec=True)
            emit(_measure(dict(base, kernel="forward, warp-specialized", config=cfg or kern.FWD_WS_TABLE[D],
                               warp_spec=True, default=False),
                          lambda: _rel_err(ours(parity_in, **kw), ref), lambda: _time(lambda: ours(timed_in, **kw))))
        for cfg in ws_probe.CANDIDATES[D]:
            row = dict(base, kernel="ws probe", config=cfg[:4], warp_spec=cfg[4], default=False)

            def probe_check():
                got, compiled = ws_probe.forward(*parity_in, config=cfg)
                row["ws_applied"] = ws_probe.specialized(compiled)
                return _rel_err(got, ref)

            emit(_measure(row, probe_check, lambda: _time(lambda: ws_probe.forward(*timed_in, config=cfg))))


GROUPS = {"bwd128": lambda emit: sweep_bwd(128, emit), "bwd64": lambda emit: sweep_bwd(64, emit),
          "fwd": sweep_fwd, "split": sweep_split, "window": sweep_window,
          "table": lambda emit: [sweep_bwd(d, emit, table_only=True) for d in (64, 128)],
          "rope64": lambda emit: sweep_rope(64, emit), "rope128": lambda emit: sweep_rope(128, emit),
          "linear": sweep_linear, "wsfwd": sweep_wsfwd}


def summarize(rows):
    """One line per measured comparison: the shipped default's time against the fastest candidate that passed
    parity, in the same group, case and kernel (window forward and backward apart), and a reference row's
    time where the group has one (RoPE: the same attention without rope). Rows without a ``default`` flag
    (files from before it) only give their fastest."""
    sets = {}
    for r in rows:
        if "group" not in r or r.get("ms") is None:
            continue
        family = r["kernel"].split(",")[0] if r["group"].startswith("window") else ""
        key = (r["group"], r.get("case") or json.dumps(r.get("shape")), family)
        sets.setdefault(key, []).append(r)
    lines = []
    for (group, case, family), rs in sets.items():
        refs = [r for r in rs if r.get("reference") or r["kernel"] == "plain (no rope)"]
        ok = [r for r in rs if r.get("ok", True) and r not in refs]
        base = next((r for r in rs if r.get("default")), None)
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        what = " ".join(x for x in (group, case, family) if x)
        if best is None:
            lines.append(f"{what}: no candidate passed parity")
            continue
        detail = {k: best[k] for k in ("kernel", "config", "tail", "exp_emu", "kv_tma", "warp_spec", "splits",
                                        "groups")
                  if best.get(k) is not None}
        line = f"{what}: fastest {best['ms']:.4f} ms {detail}"
        if base is not None:
            flag = "" if base.get("ok", True) else " (default FAILED parity)"
            line = (f"{what}: default {base['ms']:.4f} ms{flag}, fastest {best['ms']:.4f} ms "
                    f"({base['ms'] / best['ms']:.2f}x) {detail}")
        if refs:
            line += f"; reference ({refs[0]['kernel']}) {refs[0]['ms']:.4f} ms"
        lines.append(line)
    return lines


def _call_once(fn, *args, **kwargs):
    """do_bench's stand-in under ``--compile-only``: one call (compiling what it launches), no timing."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return float("nan")


def compile_only():
    """Make every sweep launch its candidates once instead of timing them (the sweeps import the timers from
    triton.testing when they run)."""
    import triton.testing

    triton.testing.do_bench = triton.testing.do_bench_cudagraph = _call_once


def default_warm_jobs(groups, cpus=None, shared=None) -> int:
    """Warm-up processes when ``--warm-jobs`` is not given: up to half the cores, one per group; none when that
    is under two (one process compiling ahead of the sweep overlaps nothing) or when the GPU's compute mode lets
    only one process use it."""
    cpus = cpus or os.cpu_count() or 1
    jobs = min(8, cpus // 2, len(groups))
    if jobs < 2 or not (gpu_takes_several_processes() if shared is None else shared):
        return 0
    return jobs


def warm_groups(groups, jobs: int, budget_s: float) -> list[str]:
    """Compile ahead in parallel: each group's sweep runs once in its own process with ``--compile-only`` (at most
    ``jobs`` at a time, all stopped after ``budget_s``), so Triton's on-disk cache holds every candidate's kernels
    when the timed sweep starts here and timing waits for no compiler. Returns the groups that finished."""
    t0, pending, running, done = time.monotonic(), list(groups), {}, []
    with workers_stopped_on_exit() as procs:
        while pending or running:
            while pending and len(running) < jobs:
                g = pending.pop(0)
                running[g] = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.tune", "--only", g, "--compile-only", "--warm-jobs", "0",
                     "--out", os.devnull], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                procs.append(running[g])
            for g, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[g]
                    if proc.returncode == 0:
                        done.append(g)
            if time.monotonic() - t0 > budget_s:
                break  # the context stops what still runs
            time.sleep(0.2)
    print(f"# warm-up: {len(done)} of {len(groups)} groups compiled ahead by {jobs} processes in "
          f"{time.monotonic() - t0:.0f} s ({', '.join(done) or 'none'})", flush=True)
    return done


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON-lines file the rows are appended to")
    ap.add_argument("--only", default=",".join(GROUPS))
    ap.add_argument("--warm-jobs", type=int, default=None, metavar="N",
                    help="compile the groups' candidates ahead in N processes, one group each, before timing "
                         "(default: min(8, cores / 2, groups) when more than one group is asked for)")
    ap.add_argument("--warm-budget", type=float, default=300, metavar="S", help="seconds the warm-up may take")
    ap.add_argument("--compile-only", action="store_true", help="launch each candidate once, time nothing (what "
                    "the warm-up's processes run)")
    ap.add_argument("--summarize", metavar="FILE", help="print the default-vs-fastest summary of a sweep file "
                    "(no GPU needed) and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            print("\n".join(summarize([json.loads(line) for line in f if line.strip()])))
        return
    if not args.out:
        ap.error("--out is required to run a sweep")
    groups = args.only.split(",")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {', '.join(unknown)}; groups: {', '.join(GROUPS)}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.tune needs a CUDA GPU")
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if args.compile_only:
        compile_only()
    jobs = default_warm_jobs(groups) if args.warm_jobs is None else args.warm_jobs
    if jobs > 0 and not args.compile_only:
        warm_groups(groups, jobs, args.warm_budget)
    with open(args.out, "a") as f:
        def emit(row):
            row = {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
            line = json.dumps(row)
            print(line, flush=True)
            f.write(line + "\n")
            f.flush()
        emit(header)
        for name in groups:
            t0 = time.time()
            GROUPS[name](emit)
            print(f"# {name}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
