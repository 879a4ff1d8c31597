"""exp2 on two pipes, for the attention forward's softmax (kernels/attention.py, its ``EXP_EMU``).

At head dims up to 64 the forward's softmax needs about as many exponentials per clock as the tensor cores give
score elements, and MUFU.EX2 runs at 16 per clock per SM. With ``EXP_EMU = n`` one element in n is computed on
the FP32 and integer pipes instead (as FlashAttention-4 does on Blackwell): ``2^x = 2^j * p(f)`` with
``j = round(x)`` (a magic-number add, no conversion instruction), ``f = x - j`` in [-0.5, 0.5], ``p`` a
minimax polynomial (degree 3 for bf16 P, relative error 1.0e-4; degree 4 otherwise, 2.9e-6: both below the
rounding of P to the MMA's input type), and ``j`` added into the exponent bits. ``x < -125`` gives 0 (as
MUFU's flush-to-zero does below -126) and NaN stays NaN.

Triton's interpreter runs no inline PTX: tests/kernels/test_exp2_asm.py replays the instructions in numpy, and
its ``gpu`` tests run the kernel with them. benchmarks.tune times n = 4 and 8.
"""
from __future__ import annotations

import struct

import triton
import triton.language as tl

EXP2_POLY = {3: (0.6932829022407532, 0.2422092854976654, 0.05500788241624832),
             4: (0.6931242346763611, 0.24024099111557007, 0.05590623617172241, 0.009582738392055035)}
EXP2_MAGIC = 12582912.0  # 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
EXP2_MIN = -125.0


def _ptx_f32(x: float) -> str:
    """A float32 PTX immediate."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", x))[0]


def exp2_asm(pack: int, degree: int) -> tuple[str, str]:
    """(PTX, constraints) of ``tl.inline_asm_elementwise`` computing 2^x for ``pack`` elements at a time: the
    first ``pack - 1`` with ex2.approx, the last with the polynomial."""
    n = pack
    lines = [f"ex2.approx.ftz.f32 ${i}, ${n + i};" for i in range(n - 1)]
    x, out = f"${2 * n - 1}", f"${n - 1}"
    lo, magic = _ptx_f32(EXP2_MIN), _ptx_f32(EXP2_MAGIC)
    coef = EXP2_POLY[degree]
    lines += [
        f"setp.lt.f32 %e2lo, {x}, {lo};",
        f"setp.nan.f32 %e2isnan, {x}, {x};",
        f"max.f32 %e2xc, {x}, {lo};",
        f"add.rn.f32 %e2t, %e2xc, {magic};",
        f"sub.rn.f32 %e2j, %e2t, {magic};",
        "sub.rn.f32 %e2f, %e2xc, %e2j;",
        f"mov.f32 %e2p, {_ptx_f32(coef[-1])};",
    ]
    lines += [f"fma.rn.f32 %e2p, %e2p, %e2f, {_ptx_f32(c)};" for c in reversed((1.0,) + coef[:-1])]
    lines += [
        "mov.b32 %e2tb, %e2t;",
        "shl.b32 %e2tb, %e2tb, 23;",  # j (two's complement, in t's low bits) moved into the exponent field
        "mov.b32 %e2pb, %e2p;",
        "add.s32 %e2pb, %e2pb, %e2tb;",
        "mov.b32 %e2p, %e2pb;",
        "selp.f32 %e2p, 0f00000000, %e2p, %e2lo;",
        f"selp.f32 {out}, {x}, %e2p, %e2isnan;",
    ]
    body = "\n".join(lines)
    regs = ".reg .pred %e2lo, %e2isnan;\n.reg .f32 %e2xc, %e2t, %e2j, %e2f, %e2p;\n.reg .b32 %e2tb, %e2pb;"
    asm = "{\n" + regs + "\n" + body + "\n}"
    constraints = ",".join(["=f"] * n + ["f"] * n)
    return asm, constraints


_EXP2_ASM = {(n, d): exp2_asm(n, d) for n in (2, 4, 8) for d in (3, 4)}
EXP2_4_BF16: tl.constexpr = tl.constexpr(_EXP2_ASM[4, 3][0])
EXP2_4: tl.constexpr = tl.constexpr(_EXP2_ASM[4, 4][0])
EXP2_8_BF16: tl.constexpr = tl.constexpr(_EXP2_ASM[8, 3][0])
EXP2_8: tl.constexpr = tl.constexpr(_EXP2_ASM[8, 4][0])
EXP2_2_BF16: tl.constexpr = tl.constexpr(_EXP2_ASM[2, 3][0])
EXP2_2: tl.constexpr = tl.constexpr(_EXP2_ASM[2, 4][0])
EXP2_CONSTRAINTS_2: tl.constexpr = tl.constexpr(_EXP2_ASM[2, 3][1])
EXP2_CONSTRAINTS_4: tl.constexpr = tl.constexpr(_EXP2_ASM[4, 3][1])
EXP2_CONSTRAINTS_8: tl.constexpr = tl.constexpr(_EXP2_ASM[8, 3][1])


@triton.jit
def _exp2(x, EXP_EMU: tl.constexpr, BF16: tl.constexpr):
    """2^x of the forward's probabilities: ``exp2`` (MUFU) when EXP_EMU is 0, else one element in EXP_EMU
    (2, 4 or 8) by the polynomial above."""
    if EXP_EMU == 0:
        return tl.math.exp2(x)
    elif EXP_EMU == 2:
        return tl.inline_asm_elementwise(EXP2_2_BF16 if BF16 else EXP2_2, EXP2_CONSTRAINTS_2, [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    elif EXP_EMU == 4:
        return tl.inline_asm_elementwise(EXP2_4_BF16 if BF16 else EXP2_4, EXP2_CONSTRAINTS_4, [x],
                                         dtype=tl.float32, is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(EXP2_8_BF16 if BF16 else EXP2_8, EXP2_CONSTRAINTS_8, [x],
                                         dtype=tl.float32, is_pure=True, pack=8)
