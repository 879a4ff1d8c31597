"""LayerNorm in Triton, with the residual add of a pre-norm transformer block fused in front of it.

``y = LayerNorm(x + residual) * weight + bias`` and ``s = x + residual`` from one read of x and residual:
eager code spends two passes on it (the add reads two tensors and writes one, the norm reads that one
again and writes one; 5 tensor passes, 4 fused). The sum is rounded to its dtype before it is normalised,
as eager does, and the backward recomputes the normalised values from that stored sum, so forward and
backward see the same numbers. Without a residual it is a plain LayerNorm. Statistics in fp32, ``mean``
and ``rstd`` saved per row (``(M,)`` fp32 each) for the backward.

The inputs are viewed as ``(M, N)`` rows with a unit last stride. Each program normalises a tile of
``BLOCK_M`` whole rows (``BLOCK_N`` = N padded to a power of two, masked): several rows per program when
rows are short (Swin stage 1: N = 96, 32 rows a program) so programs move kilobytes, not a few hundred
bytes.

Backward (``_ln_bwd``): ``dx = rstd * (w*dy - xhat * mean(xhat*w*dy) - mean(w*dy)) + ds`` per row, ``ds``
being the gradient that reaches the sum output through the residual stream (x and residual both receive
dx). The weight and bias gradients are column sums over all rows: each program walks a contiguous range of
rows, keeps its partial sums in fp32 registers and stores them to its own row of a ``(programs, N)`` buffer,
which torch then sums: deterministic (no atomics), bitwise equal across runs on one GPU.

Memory bound, so plain heuristics choose the tiles (:func:`config`), no autotuning.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Elements of one program's tile: forward 4096 (32 fp32 values a thread at 4 warps; 8 KiB per bf16 tensor
# read), backward 2048 (it keeps about five tile-sized values live: 16 a thread). Rows longer than a tile
# take one row per program and more warps (up to 32).
TILE_ELEMENTS = {"fwd": 4096, "bwd": 2048}
VALUES_PER_THREAD = {"fwd": 32, "bwd": 16}
MAX_N = 8192  # longest row held in one tile (16384 spilled 1.2 KB in the backward)
# Backward programs per SM (each walks its rows keeping two (BLOCK_N,) fp32 partial sums); at most as many
# as fit on an SM at once by registers, so the grid is one wave.
BWD_PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config(N: int, kind: str = "fwd"):
    """``(BLOCK_M, BLOCK_N, num_warps)`` of the forward or the backward (``kind``) for rows of ``N`` elements."""
    if N > MAX_N:
        raise ValueError(f"rows of {N} elements: the Triton LayerNorm holds at most {MAX_N} per row")
    block_n = max(16, triton.next_power_of_2(N))
    block_m = max(1, min(32, TILE_ELEMENTS[kind] // block_n))
    warps = max(4, min(32, block_m * block_n // (32 * VALUES_PER_THREAD[kind])))
    return block_m, block_n, warps


_SM_COUNT = {}


def _sm_count(device):
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@triton.jit
def _ln_fwd(X, RES, W, B, Y, SUM, MEAN, RSTD, M, N, s_x, s_r, s_y, s_s, eps,
            HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    r = rows.to(tl.int64)[:, None]
    x = tl.load(X + r * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(RES + r * s_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = x.to(SUM.dtype.element_ty)
        tl.store(SUM + r * s_s + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)  # normalise the stored (rounded) sum: what eager does and the backward reads
    mean = tl.sum(x, 1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r * s_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd(S, DY, DS, W, DX, DW, DB, MEAN, RSTD, M, N, s_s, s_dy, s_ds, s_dx, rows_per_program,
            HAS_DS: tl.constexpr, HAS_W: tl.constexpr, W_GRAD: tl.constexpr, B_GRAD: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [pid * rows_per_program, ...) of the backward; DW / DB (programs, N) fp32 get this program's
    column sums of dy * xhat and dy."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, M)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        r = rows.to(tl.int64)[:, None]
        x = tl.load(S + r * s_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy
        if HAS_W:
            wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, 1) / N
        c2 = tl.sum(wdy, 1) / N
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + r * s_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * s_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if W_GRAD:
            dw += tl.sum(dy * xhat, 0)
        if B_GRAD:
            db += tl.sum(dy, 0)
    if W_GRAD:
        tl.store(DW + pid * N + cols, dw, mask=col_ok)
    if B_GRAD:
        tl.store(DB + pid * N + cols, db, mask=col_ok)


# ------------------------------------------------------------------------------------------------
# Launchers (inputs checked by dlcv_fast.ops.layer_norm)
# ------------------------------------------------------------------------------------------------

def rows(t, N):
    """``t`` (..., N) as an (M, N) tensor with a unit last stride (a view when its layout allows)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, N)


def forward(x, residual, weight, bias, eps: float):
    """``(y, s, mean, rstd)``: y = LayerNorm(s) with ``s = x + residual`` (None when ``residual`` is None),
    both contiguous in the sum's dtype (x's when no residual); mean and rstd ``(M,)`` fp32 with ``M`` = rows."""
    N = x.shape[-1]
    x2 = rows(x, N)
    M = x2.shape[0]
    dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty(x.shape, device=x.device, dtype=dtype)
    s = torch.empty(x.shape, device=x.device, dtype=dtype) if residual is not None else None
    mean = torch.empty((M,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    r2 = rows(residual, N) if residual is not None else x2
    block_m, block_n, warps = config(N)
    _ln_fwd[(triton.cdiv(M, block_m),)](
        x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
        y, s if s is not None else y, mean, rstd, M, N,
        x2.stride(0), r2.stride(0), N, N, float(eps),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y, s, mean, rstd


def backward_programs(M: int, block_m: int, device) -> int:
    """Programs of the backward: about BWD_PROGRAMS_PER_SM per SM, each on a whole number of BLOCK_M rows."""
    target = INTERPRETER_PROGRAMS if _interpreting() else BWD_PROGRAMS_PER_SM * _sm_count(device)
    return max(1, min(triton.cdiv(M, block_m), target))


def backward(dy, ds, s, weight, mean, rstd, weight_grad: bool, bias_grad: bool, programs=None):
    """``(dx, dweight, dbias)`` of :func:`forward` at its stored sum ``s`` (x when there was no residual):
    dx contiguous in s's dtype (also the residual's gradient); ``ds`` the gradient of the sum output or None;
    dweight / dbias ``(N,)`` fp32 when asked for, else None."""
    N = s.shape[-1]
    s2, dy2 = rows(s, N), rows(dy, N)
    ds2 = rows(ds, N) if ds is not None else None
    M = s2.shape[0]
    dx = torch.empty(s.shape, device=s.device, dtype=s.dtype)
    block_m, block_n, warps = config(N, "bwd")
    programs = programs or backward_programs(M, block_m, s.device)
    per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = triton.cdiv(M, per_program)
    f32 = dict(device=s.device, dtype=torch.float32)
    dw = torch.empty((programs, N), **f32) if weight_grad else None
    db = torch.empty((programs, N), **f32) if bias_grad else None
    _ln_bwd[(programs,)](
        s2, dy2, ds2 if ds2 is not None else dy2, weight if weight is not None else s2, dx,
        dw if dw is not None else dx, db if db is not None else dx, mean, rstd, M, N,
        s2.stride(0), dy2.stride(0), ds2.stride(0) if ds2 is not None else 0, N, per_program,
        HAS_DS=ds is not None, HAS_W=weight is not None, W_GRAD=weight_grad, B_GRAD=bias_grad,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return dx, dw.sum(0) if weight_grad else None, db.sum(0) if bias_grad else None


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (dlcv_fast/aot.py, tests/kernels/test_aot_compile.py)
# ------------------------------------------------------------------------------------------------

def aot_specs():
    """The kernels at the row lengths of the models (Swin stages 96-768 and its patch-merging norms 384-3072,
    ViT-S/B/L 384/768/1024, CLIP text 512, Swin-L 1536) and the longest supported row, with every feature on: residual, weight, bias, the sum's
    gradient and both parameter gradients. bf16 and fp16 activations with weights of the same dtype (a model
    cast with .to()), and fp32. Pointers and row strides are multiples of 16 (contiguous torch tensors)."""
    from dlcv_fast.aot import AotSpec, signature_of

    cases = [("bf16", n) for n in (96, 192, 384, 512, 768, 1024, 1536, 3072, MAX_N)] + [("fp16", 768), ("fp32", 768)]
    specs = []
    for dtype, n in cases:
        types = {name: "*" + dtype for name in ("X", "RES", "W", "B", "Y", "SUM", "S", "DY", "DS", "DX")}
        types.update(MEAN="*fp32", RSTD="*fp32", DW="*fp32", DB="*fp32", eps="fp32")
        for fn, kind, extra in ((_ln_fwd, "fwd", dict(HAS_RES=True, HAS_W=True, HAS_B=True)),
                                (_ln_bwd, "bwd", dict(HAS_DS=True, HAS_W=True, W_GRAD=True, B_GRAD=True))):
            block_m, block_n, warps = config(n, kind)
            constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, **extra)
            sig = signature_of(fn, constexprs, types)
            divisible = [a for a, t in sig.items() if t.startswith("*")]
            divisible += [a for a in ("s_x", "s_r", "s_y", "s_s", "s_dy", "s_ds", "s_dx") if a in sig]
            if n % 16 == 0:
                divisible.append("N")
            specs.append(AotSpec(fn.__name__, f"{dtype} N{n}", fn, sig, constexprs, warps, 1, tuple(divisible)))
    return specs
