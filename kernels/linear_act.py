"""``act(x @ weight.T + bias)`` in one Triton GEMM: the MLP's first Linear with its activation in the epilogue.

Eager code writes the Linear's output and reads it back for the activation, which writes it again: for
ViT-B/16 at batch 256 the fc1 output is 50k x 3072 bf16 (310 MB), so the GELU alone moves 620 MB per block,
more than the GEMM's own reads and writes (about 390 MB). Here the activation is applied to the fp32
accumulator before the one store. Activations: "gelu" (exact, erf: nn.GELU's default and timm's), "quick_gelu" (x * sigmoid(1.702
x), OpenAI CLIP) and "none".

The kernel is the textbook tiled GEMM: one program per ``BLOCK_M x BLOCK_N`` output tile, programs grouped
by ``GROUP_M`` row tiles so that consecutive programs share weight tiles in L2, an fp32 accumulator over
``BLOCK_K`` steps. ``x`` ``(M, K)`` and ``weight`` ``(N, K)`` (nn.Linear's layout, so the dot takes the weight
tile transposed) are read through TMA tensor descriptors on Hopper (out-of-bounds rows and columns arrive
as zeros, so no masks; sm_90, fp16/bf16, 16-byte aligned rows), else through pointers with masks.
Forward only: the op's backward (``dlcv_fast.ops.linear_act``) recomputes the pre-activation with torch, and
the MLP module runs eager PyTorch when autograd records.
Configs as data per arch (``CONFIGS``), checked ahead of time for spills and wgmma; the sm_90 ones timed on
an H200 (``python -m benchmarks.tune --only linear``; ``python -m benchmarks --only linear_act`` and the model
benchmark's ``dlcv_fast+fused_mlp`` provider compare with cuBLAS).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from dlcv_fast.kernels.attention import table_arch

ACTIVATIONS = {"none": 0, "gelu": 1, "quick_gelu": 2}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per arch (90: Hopper and later; 80: below) and by whether
# N is a multiple of 256. sm_90, timed on an H200 (benchmarks/results/2026-11-29T2207_nvidia-h200_tune.jsonl,
# bf16, GELU, with the persistent kernel below): N % 256 == 0 (ViT-B fc1, 50432 x 768 -> 3072) 128 x 256 x 64,
# 8 warps (two warpgroups, wgmma m64n256 each), 3 TMA stages: 0.568 ms (4 stages 0.566; cuBLAS + GELU
# 0.539 ms); otherwise (Swin-T stage 1 fc1, 401408 x 96 -> 384) 256 x 128 x 64, 8 warps, 3 stages: 0.675 ms
# against 0.694 for 128 x 128 (cuBLAS + GELU 0.706 ms). sm_80 (untimed): 128 x 128 x 32, four cp.async stages.
CONFIGS = {
    90: {True: (128, 256, 64, 8, 3), False: (256, 128, 64, 8, 3)},
    80: {True: (128, 128, 32, 8, 4), False: (128, 128, 32, 8, 4)},
}
INTERPRETER_CONFIG = (32, 32, 32, 4, 1)
GROUP_M = 8
# sm_90 with TMA: one program per SM looping over tiles (_linear_act_persistent) instead of one per tile. On
# the H200 it was faster at every tile of both shapes that ran with 8 warps (0.568 vs 0.590 ms ViT-B, 0.675
# vs 0.713 ms Swin stage 1 at the tiles above; 0.694 vs 0.852 at 128 x 128).
PERSISTENT = True
INTERPRETER_PROGRAMS = 3


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config(N: int, arch: int | None = None):
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for ``N`` output columns on ``arch``."""
    if _interpreting() and arch is None:
        return INTERPRETER_CONFIG
    return CONFIGS[table_arch(arch)][N % 256 == 0]


@triton.jit
def _activation(y, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:  # QuickGELU: x * sigmoid(1.702 x)
        y = y / (1.0 + tl.exp(-1.702 * y))
    return y


@triton.jit
def _tile(t, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first row, first column) of output tile ``t`` in grouped order: GROUP_M row tiles sweep the column tiles
    together, so consecutive tiles share weight tiles in L2."""
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (t // per_group) * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % rows_in_group
    pid_n = (t % per_group) // rows_in_group
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _finish(acc, BIAS, Y, start_m, start_n, M, N, s_ym, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr):
    """Bias, activation and store of one output tile, in two column halves with SPLIT_EPILOGUE (fewer values
    live through the erf)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if SPLIT_EPILOGUE:
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))
        _epilogue(a0, BIAS, Y, offs_m, start_n + tl.arange(0, BLOCK_N // 2), M, N, s_ym, ACT, HAS_BIAS)
        _epilogue(a1, BIAS, Y, offs_m, start_n + BLOCK_N // 2 + tl.arange(0, BLOCK_N // 2), M, N, s_ym, ACT,
                  HAS_BIAS)
    else:
        _epilogue(acc, BIAS, Y, offs_m, start_n + tl.arange(0, BLOCK_N), M, N, s_ym, ACT, HAS_BIAS)


@triton.jit
def _linear_act_kernel(X, W, BIAS, Y, M, N, K, s_xm, s_wn, s_ym,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       SPLIT_EPILOGUE: tl.constexpr):
    """One program per output tile."""
    start_m, start_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if not TMA:
        x_ptrs = X + offs_m.to(tl.int64)[:, None] * s_xm + offs_k[None, :]
        w_ptrs = W + offs_n.to(tl.int64)[:, None] * s_wn + offs_k[None, :]
    for k in range(0, K, BLOCK_K):
        if TMA:
            a = X.load([start_m, k])
            b = W.load([start_n, k])
        else:
            k_ok = (k + offs_k) < K
            a = tl.load(x_ptrs, mask=(offs_m < M)[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=(offs_n < N)[:, None] & k_ok[None, :], other=0.0)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    _finish(acc, BIAS, Y, start_m, start_n, M, N, s_ym, ACT, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_EPILOGUE)


@triton.jit
def _linear_act_persistent(X, W, BIAS, Y, M, N, K, s_ym, num_programs,
                           ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, SPLIT_EPILOGUE: tl.constexpr):
    """One program per SM walking output tiles ``pid, pid + num_programs, ...`` (TMA descriptors only). The
    tile and k loops are flattened into one software-pipelined loop, so the next tile's loads are in flight
    during a tile's epilogue instead of each tile refilling the pipeline (K = 768 is only 12 k-steps)."""
    n_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for t in tl.range(tl.program_id(0), n_tiles, num_programs, flatten=True):
        start_m, start_n = _tile(t, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kk in range(k_steps):
            a = X.load([start_m, kk * BLOCK_K])
            b = W.load([start_n, kk * BLOCK_K])
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        _finish(acc, BIAS, Y, start_m, start_n, M, N, s_ym, ACT, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_EPILOGUE)


@triton.jit
def _epilogue(acc, BIAS, Y, offs_m, offs_n, M, N, s_ym, ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Bias, activation and the store of output columns ``offs_n`` of the tile."""
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = _activation(acc, ACT)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * s_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def split_epilogue(bm: int, bn: int, warps: int) -> bool:
    """Whether the epilogue goes in two halves: when the fp32 tile holds more than 64 values a thread (the
    128 x 256 tile at 8 warps spilled 88 B through the erf in one piece)."""
    return bm * bn // (32 * warps) > 64


def _tma_ready(t) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and t.stride(0) * size % 16 == 0 and t.stride(-1) == 1


def use_tma(x2, weight, arch=None) -> bool:
    """TMA descriptors for x and the weight: fp16/bf16 on sm_90 or later (or the interpreter), 16-byte aligned
    bases and row strides."""
    if x2.dtype not in (torch.float16, torch.bfloat16) or not (_tma_ready(x2) and _tma_ready(weight)):
        return False
    return _interpreting() or table_arch(arch) >= 90


_SM_COUNT = {}


def _programs(n_tiles: int, device) -> int:
    if _interpreting():
        return min(n_tiles, INTERPRETER_PROGRAMS)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return min(n_tiles, _SM_COUNT[idx])


def forward(x, weight, bias, act: str, cfg=None, tma=None, persistent=None):
    """``act(x @ weight.T + bias)``: x ``(..., K)`` (unit last stride; rows are viewed without a copy when the
    layout allows), weight ``(N, K)``, bias ``(N,)`` or None. Returns ``(..., N)`` contiguous in x's dtype.
    ``cfg`` overrides :func:`config`; ``tma`` forces the descriptor path on or off (checked by the caller);
    ``persistent`` (default :data:`PERSISTENT`) runs the one-program-per-SM kernel where TMA is used."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K) if x.stride(-1) == 1 else x.contiguous().reshape(-1, K)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M = x2.shape[0]
    y = torch.empty((*x.shape[:-1], N), device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = cfg or config(N)
    tma = use_tma(x2, weight) if tma is None else tma
    if tma:
        xs = TensorDescriptor(x2, [M, K], [x2.stride(0), 1], [bm, bk])
        ws = TensorDescriptor(weight, [N, K], [weight.stride(0), 1], [bn, bk])
    else:
        xs, ws = x2, weight
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    n_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if tma and (PERSISTENT if persistent is None else persistent):
        programs = _programs(n_tiles, x.device)
        _linear_act_persistent[(programs,)](
            xs, ws, bias if bias is not None else weight, y, M, N, K, N, programs,
            ACT=ACTIVATIONS[act], HAS_BIAS=bias is not None, DOT_PRECISION=precision,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, SPLIT_EPILOGUE=split_epilogue(bm, bn, warps),
            num_warps=warps, num_stages=stages,
        )
        return y
    _linear_act_kernel[(n_tiles,)](
        xs, ws, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0), N,
        ACT=ACTIVATIONS[act], HAS_BIAS=bias is not None, TMA=tma, DOT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, SPLIT_EPILOGUE=split_epilogue(bm, bn, warps),
        num_warps=warps, num_stages=stages,
    )
    return y


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (dlcv_fast/aot.py, tests/kernels/test_aot_compile.py)
# ------------------------------------------------------------------------------------------------

def aot_specs():
    """Each shipped config with exact GELU (the heaviest epilogue) and a bias, bf16 and fp16: on sm_90 through
    TMA descriptors (must use wgmma), on sm_80 through pointers; plus QuickGELU on the sm_90 wide tile, and the
    persistent kernel (the sm_90 default) at both sm_90 tiles."""
    from dlcv_fast.aot import AotSpec, signature_of

    specs = []
    for arch, by_width in CONFIGS.items():
        for wide, (bm, bn, bk, warps, stages) in by_width.items():
            cases = [(_linear_act_kernel, "bf16", "gelu"), (_linear_act_kernel, "fp16", "gelu")]
            if arch == 90:
                cases.append((_linear_act_persistent, "bf16", "gelu"))
                if wide:
                    cases.append((_linear_act_kernel, "bf16", "quick_gelu"))
            for fn, dtype, act in cases:
                tma = arch == 90
                constexprs = dict(ACT=ACTIVATIONS[act], HAS_BIAS=True, DOT_PRECISION="tf32", BLOCK_M=bm,
                                  BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, SPLIT_EPILOGUE=split_epilogue(bm, bn, warps))
                if fn is _linear_act_kernel:
                    constexprs["TMA"] = tma
                types = dict(X=f"tensordesc<{dtype}[{bm}, {bk}]>" if tma else f"*{dtype}",
                             W=f"tensordesc<{dtype}[{bn}, {bk}]>" if tma else f"*{dtype}",
                             BIAS=f"*{dtype}", Y=f"*{dtype}")
                sig = signature_of(fn, constexprs, types)
                divisible = [a for a, t in sig.items() if t.startswith("*")]
                divisible += [a for a in ("K", "N", "s_xm", "s_wn", "s_ym") if a in sig]
                variant = f"{dtype} {act} {'N%256' if wide else 'N%128'} sm{arch} k{bk}"
                specs.append(AotSpec(fn.__name__, variant, fn, sig, constexprs, warps, stages, tuple(divisible),
                                     expect_wgmma=arch == 90, archs=(arch,)))
    return specs
