"""Rotary position embedding (RoPE) in Triton: one memory-bound kernel for forward, backward and in-place.

``x`` ``(B, H, N, D)`` with any strides and a unit last stride. The tables ``cos``/``sin`` hold one angle per
rotated channel pair: ``(N, R)``, ``(B, N, R)`` or ``(B|1, H|1, N, R)``; the launcher views every form as
``(B, H, N, R)`` with zero strides on broadcast dims. The first ``2R`` channels are rotated, channels
``2R..D`` pass through (partial rotary). Pair layouts: half-split ("NeoX", channel ``c`` with ``c + R``) and
interleaved ("GPT-J", ``2c`` with ``2c + 1``); the interleaved tile is loaded contiguously and split in
registers, so both layouts read and write whole rows.

The rotation of pair ``(a, b)`` is ``(a cos - b sin, b cos + a sin)``, computed in fp32. Its inverse, the
rotation by the negated angle, is also its backward (the map is orthogonal), so the backward is this same
kernel with ``sin_sign = -1``. ``OUT`` may be ``X`` itself (in place): each program reads its tile before
writing it and tiles are disjoint.

Launch: a 1-D grid over (batch, head group, block of positions). Each program loads its ``(BLOCK_N, R)``
table tile once and loops over ``heads_per_program`` heads (when the table is shared by all heads), so
table reads shrink by that factor; heads are grouped only as far as the grid still has enough programs to
fill the GPU. Offsets are int64. Being memory bound, it uses heuristics, not autotuning.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Elements of x (rotated part) one program moves per head; 4096 = 8 KiB of fp16 in and 8 KiB out.
TILE_ELEMENTS = 4096
# Head grouping stops while the grid has fewer than this many programs per SM.
PROGRAMS_PER_SM = 8
NUM_STAGES = 3


@triton.jit
def _rope_kernel(X, OUT, COS, SIN,
                 N, n_blocks, n_head_groups, heads_per_program, sin_sign,
                 sxb, sxh, sxn, sob, soh, son, scb, sch, scn,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, REST: tl.constexpr, BLOCK_REST: tl.constexpr,
                 INTERLEAVED: tl.constexpr, TABLE_PER_HEAD: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = pid % n_blocks
    pid_bg = pid // n_blocks
    b = (pid_bg // n_head_groups).to(tl.int64)
    h0 = (pid_bg % n_head_groups).to(tl.int64) * heads_per_program

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = rows.to(tl.int64)
    pairs = tl.arange(0, BLOCK_R)
    mask = row_mask[:, None] & (pairs[None, :] < HALF)
    tab_offs = b * scb + rows[:, None] * scn + pairs[None, :]
    if not TABLE_PER_HEAD:
        cos = tl.load(COS + tab_offs, mask=mask, other=1.0).to(tl.float32)
        sin = tl.load(SIN + tab_offs, mask=mask, other=0.0).to(tl.float32) * sin_sign
    for i in range(heads_per_program):
        h = h0 + i
        if TABLE_PER_HEAD:
            cos = tl.load(COS + tab_offs + h * sch, mask=mask, other=1.0).to(tl.float32)
            sin = tl.load(SIN + tab_offs + h * sch, mask=mask, other=0.0).to(tl.float32) * sin_sign
        x_row = X + b * sxb + h * sxh + rows[:, None] * sxn
        o_row = OUT + b * sob + h * soh + rows[:, None] * son
        if INTERLEAVED:
            cols = tl.arange(0, 2 * BLOCK_R)
            cmask = row_mask[:, None] & (cols[None, :] < 2 * HALF)
            xx = tl.load(x_row + cols[None, :], mask=cmask, other=0.0).to(tl.float32)
            a, bb = tl.split(tl.reshape(xx, (BLOCK_N, BLOCK_R, 2)))
            y = tl.join(a * cos - bb * sin, bb * cos + a * sin)
            tl.store(o_row + cols[None, :], tl.reshape(y, (BLOCK_N, 2 * BLOCK_R)).to(OUT.dtype.element_ty),
                     mask=cmask)
        else:
            a = tl.load(x_row + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
            bb = tl.load(x_row + HALF + pairs[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + pairs[None, :], (a * cos - bb * sin).to(OUT.dtype.element_ty), mask=mask)
            tl.store(o_row + HALF + pairs[None, :], (bb * cos + a * sin).to(OUT.dtype.element_ty), mask=mask)
        if REST > 0:
            rest = 2 * HALF + tl.arange(0, BLOCK_REST)
            rmask = row_mask[:, None] & (rest[None, :] < 2 * HALF + REST)
            tl.store(o_row + rest[None, :], tl.load(x_row + rest[None, :], mask=rmask), mask=rmask)


# ------------------------------------------------------------------------------------------------
# Heuristics
# ------------------------------------------------------------------------------------------------

def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_SM_COUNT = {}


def _sm_count(device):
    if _interpreting() or device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def config_for(N: int, half: int, rest: int):
    """``(BLOCK_N, num_warps)`` for ``N`` positions, ``half`` = R pairs and ``rest`` pass-through channels."""
    block_r = triton.next_power_of_2(half)
    block_n = min(triton.next_power_of_2(N), max(1, TILE_ELEMENTS // (2 * block_r)))
    width = 2 * block_r + (triton.next_power_of_2(rest) if rest else 0)
    return block_n, 4 if block_n * width >= 2048 else 2


def heads_per_program(B: int, H: int, n_blocks: int, sm_count: int, table_per_head: bool) -> int:
    """The largest divisor of ``H`` that keeps ``PROGRAMS_PER_SM`` programs per SM (1 for per-head tables,
    which gain nothing from grouping)."""
    if table_per_head:
        return 1
    target = PROGRAMS_PER_SM * sm_count
    best = 1
    for g in range(1, H + 1):
        if H % g == 0 and B * n_blocks * (H // g) >= target:
            best = g
    return best


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------

def table_view(t, B, H, N):
    """A ``(B, H, N, R)`` view of a ``(N, R)``, ``(B|1, N, R)`` or ``(B|1, H|1, N, R)`` table (zero strides on
    broadcast dims) with a unit last stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[:, None]
    return t.expand(B, H, N, t.shape[-1])


def apply(x, cos, sin, *, interleaved: bool, sin_sign: float = 1.0, out=None, config=None):
    """Rotate ``x`` by the tables and write the result to ``out`` (a new tensor like x when None; ``x`` itself
    for in place). ``sin_sign = -1`` rotates by the negated angle (the backward). ``config`` =
    ``(BLOCK_N, heads_per_program, num_warps)`` overrides the heuristics (benchmarks, tests).
    Inputs are checked by ``dlcv_fast.ops.rope``. Returns ``out``."""
    B, H, N, D = x.shape
    half = cos.shape[-1]
    if out is None:
        out = torch.empty_like(x)
    rest = 0 if out is x else D - 2 * half
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    table_per_head = cos.dim() == 4 and cos.shape[1] > 1
    cos_v, sin_v = table_view(cos, B, H, N), table_view(sin, B, H, N)
    if config is None:
        block_n, warps = config_for(N, half, rest)
        hpp = heads_per_program(B, H, triton.cdiv(N, block_n), _sm_count(x.device), table_per_head)
    else:
        block_n, hpp, warps = config
        if H % hpp or (table_per_head and hpp != 1):
            raise ValueError(f"heads_per_program={hpp} must divide H={H} (and be 1 for per-head tables)")
    n_blocks = triton.cdiv(N, block_n)
    grid = (B * (H // hpp) * n_blocks,)
    _rope_kernel[grid](
        x, out, cos_v, sin_v,
        N, n_blocks, H // hpp, hpp, float(sin_sign),
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos_v.stride(0), cos_v.stride(1), cos_v.stride(2),
        HALF=half, BLOCK_R=triton.next_power_of_2(half), REST=rest,
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 1,
        INTERLEAVED=interleaved, TABLE_PER_HEAD=table_per_head, BLOCK_N=block_n,
        num_warps=warps, num_stages=NUM_STAGES,
    )
    return out


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (dlcv_fast/aot.py, tests/kernels/test_aot_compile.py)
# ------------------------------------------------------------------------------------------------

def aot_specs():
    """Every shipped instance of the RoPE kernel, for the compile check without a GPU.

    fp16 and bf16 x with fp32 tables (what :func:`dlcv_fast.rope_2d` gives), head dims 64 and 128 with full
    rotary in both layouts (the ViT/EVA cases), plus partial rotary (d64, R=16: a masked pass-through copy),
    an odd pair count (d80), per-head tables (RoPE-Mixed) and fp32 x. Config = the heuristics' for N = 4096.
    Pointers and the strides of x and out are multiples of 16, as for contiguous torch tensors (the table's
    too when R is).
    """
    from dlcv_fast.aot import AotSpec, signature_of

    cases = [(dtype, d, d // 2, inter, False) for dtype in ("fp16", "bf16") for d in (64, 128)
             for inter in (False, True)]
    cases += [("bf16", 64, 16, False, False), ("bf16", 80, 40, True, False), ("bf16", 64, 32, True, True),
              ("fp32", 64, 32, False, False)]
    specs = []
    for dtype, d, half, interleaved, per_head in cases:
        rest = d - 2 * half
        block_n, warps = config_for(4096, half, rest)
        constexprs = dict(HALF=half, BLOCK_R=triton.next_power_of_2(half), REST=rest,
                          BLOCK_REST=triton.next_power_of_2(rest) if rest else 1, INTERLEAVED=interleaved,
                          TABLE_PER_HEAD=per_head, BLOCK_N=block_n)
        types = dict(X="*" + dtype, OUT="*" + dtype, COS="*fp32", SIN="*fp32", sin_sign="fp32")
        sig = signature_of(_rope_kernel, constexprs, types)
        divisible = ("X", "OUT", "COS", "SIN", "sxb", "sxh", "sxn", "sob", "soh", "son")
        divisible += ("scb", "sch", "scn") if half % 16 == 0 else ()
        variant = (f"{dtype} d{d} R{half} {'interleaved' if interleaved else 'half-split'}"
                   f"{' per-head' if per_head else ''}")
        specs.append(AotSpec(_rope_kernel.__name__, variant, _rope_kernel, sig, constexprs, warps, NUM_STAGES,
                             divisible))
    return specs
