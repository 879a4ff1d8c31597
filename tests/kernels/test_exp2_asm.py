"""The forward's exp2 split between MUFU and the FP32 pipes (kernels/exp2.py; kernels/attention.py's ``EXP_EMU``).

Triton's interpreter runs no inline PTX, so the instructions ``exp2_asm`` emits are replayed here by a small
PTX interpreter in numpy (float32 and uint32 arithmetic, as the GPU does it), over every kind of argument the
softmax gives: 0, small and large negative values, the -125 cut, -inf (masked scores), NaN (NaN inputs) and
values a rounding step above 0. On a GPU, tests/kernels/test_attention.py's gpu tests run the kernel with it.
"""
import re

import numpy as np
import pytest

from dlcv_fast.kernels import attention as A
from dlcv_fast.kernels import exp2 as E

F32 = np.float32


def _imm(tok):
    """A PTX float immediate (0fXXXXXXXX) as float32."""
    return np.array([int(tok[2:], 16)], dtype=np.uint32).view(F32)[0]


def run_ptx(asm, inputs):
    """Execute ``asm`` (the text ``exp2_asm`` gives, ``$k`` operands) on float32 arrays ``inputs`` (one per
    input operand, all the same shape); returns the output operands."""
    n_out = len(inputs)
    regs = {f"${n_out + i}": np.asarray(x, dtype=F32) for i, x in enumerate(inputs)}

    def val(tok):
        return _imm(tok) if tok.startswith("0f") else regs[tok]

    body = [line.strip().rstrip(";") for line in asm.strip("{}\n").splitlines()]
    for line in body:
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        if op == "ex2.approx.ftz.f32":
            r = np.exp2(val(a[1]).astype(np.float64)).astype(F32)
            regs[a[0]] = np.where(np.abs(r) < np.finfo(F32).tiny, F32(0), r)  # ftz
        elif op == "setp.lt.f32":
            regs[a[0]] = val(a[1]) < val(a[2])
        elif op == "setp.nan.f32":
            regs[a[0]] = np.isnan(val(a[1])) | np.isnan(val(a[2]))
        elif op == "max.f32":  # PTX max.f32 returns the non-NaN operand
            x, y = val(a[1]), val(a[2])
            regs[a[0]] = np.where(np.isnan(x), y, np.where(np.isnan(y), x, np.maximum(x, y))).astype(F32)
        elif op == "add.rn.f32":
            regs[a[0]] = (val(a[1]) + val(a[2])).astype(F32)
        elif op == "sub.rn.f32":
            regs[a[0]] = (val(a[1]) - val(a[2])).astype(F32)
        elif op == "fma.rn.f32":  # one rounding: computed in float64, then rounded
            x, y, z = (np.asarray(val(t), dtype=np.float64) for t in a[1:])
            regs[a[0]] = (x * y + z).astype(F32)
        elif op == "mov.f32":
            regs[a[0]] = np.asarray(val(a[1]), dtype=F32)
        elif op == "mov.b32":
            src = val(a[1])
            regs[a[0]] = src.view(np.uint32) if src.dtype == F32 else src.view(F32)
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << np.uint32(int(a[2]))).astype(np.uint32)
        elif op == "add.s32":
            regs[a[0]] = (val(a[1]) + val(a[2])).astype(np.uint32)
        elif op == "selp.f32":
            regs[a[0]] = np.where(val(a[3]), val(a[1]), val(a[2])).astype(F32)
        else:
            raise AssertionError(f"instruction {op!r} not replayed here: extend run_ptx")
    return [regs[f"${i}"] for i in range(n_out)]


ARGS = np.concatenate([
    -np.random.default_rng(0).random(20000) * 130, np.linspace(-1.0, 0.0, 2001),
    [0.0, -0.5, 0.5, -0.49999997, 1e-7, 2e-7, -124.99, -125.0, -125.01, -126.5, -1e30, -np.inf, np.nan],
]).astype(F32)


@pytest.mark.parametrize("pack", [2, 4, 8])
@pytest.mark.parametrize("degree,max_rel", [(3, 1.1e-4), (4, 3.5e-6)])
def test_replayed_exp2(pack, degree, max_rel):
    asm, constraints = E.exp2_asm(pack, degree)
    assert constraints.split(",") == ["=f"] * pack + ["f"] * pack
    assert re.findall(r"\$(\d+)", asm) and max(int(i) for i in re.findall(r"\$(\d+)", asm)) == 2 * pack - 1
    x = ARGS[: len(ARGS) // pack * pack].reshape(-1, pack)
    x[-1] = ARGS[-pack:]  # the special values in every lane, the polynomial's lane included
    outs = run_ptx(asm, [x[:, i] for i in range(pack)])
    assert sum(line.startswith("ex2.approx") for line in asm.splitlines()) == pack - 1
    poly_x, poly = x[:, -1], outs[-1]
    exact = np.exp2(poly_x.astype(np.float64))
    kept = poly_x >= E.EXP2_MIN
    rel = np.abs(poly[kept] - exact[kept]) / exact[kept]
    assert rel.max() <= max_rel, rel.max()
    assert np.all(poly[(poly_x < E.EXP2_MIN) & ~np.isnan(poly_x)] == 0)  # -inf (masked) and the far tail: 0
    assert np.isnan(poly[np.isnan(poly_x)]).all()
    assert np.all(np.isfinite(poly[~np.isnan(poly_x)])) and np.all(poly[kept] > 0)
    for i in range(pack - 1):  # the MUFU lanes
        ref = np.exp2(x[:, i].astype(np.float64))
        ok = ~np.isnan(x[:, i]) & (x[:, i] >= -126)
        np.testing.assert_allclose(outs[i][ok], ref[ok], rtol=1e-6)


def test_the_polynomial_lane_alone_is_checked():
    """The replay fails on a wrong coefficient (the test above can fail)."""
    asm, _ = E.exp2_asm(2, 3)
    wrong = asm.replace(E._ptx_f32(E.EXP2_POLY[3][0]), E._ptx_f32(0.70))
    out = run_ptx(wrong, [np.zeros(3, F32), np.array([-0.25, -0.3, -10.2], F32)])[1]
    assert np.abs(out / np.exp2(np.array([-0.25, -0.3, -10.2])) - 1).max() > 1e-3


def test_exp_emu_is_refused_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="exp_emu"):
        A._exp_emu(4, None)
    with pytest.raises(ValueError, match="exp_emu must be"):
        A._exp_emu(3, None)
    assert A._exp_emu(None, None) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("exp_emu,dtype,Lq,Lk,D,kind", [
    (4, "bfloat16", 197, 197, 64, "none"), (8, "float16", 77, 77, 64, "causal+padding"),
    (4, "bfloat16", 1025, 1025, 128, "causal+padding")])
def test_gpu_forward_with_exp_emu(exp_emu, dtype, Lq, Lk, D, kind, monkeypatch):
    """The forward with the split exp2 passes the same parity rule as without it (masked scores included);
    with causal + padding also: fully masked rows give zeros and a NaN in q stays in its row."""
    import torch

    import dlcv_fast
    from tests.kernels.test_attention import check_parity, make_inputs, make_mask_args

    monkeypatch.setattr(A, "EXP_EMU", exp_emu)
    dt = getattr(torch, dtype)
    q, k, v = make_inputs(2, 4, 4, Lq, Lk, D, dt, "cuda")
    check_parity(q, k, v, make_mask_args(kind, 2, 4, Lq, Lk, dt, "cuda"), backward=False)
    if kind != "causal+padding":
        return
    kpm = torch.ones(2, Lk, dtype=torch.bool, device="cuda")
    kpm[1] = False
    q[0, 0, 3, 0] = float("nan")
    out = dlcv_fast.attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert (out[1] == 0).all()
    assert out[0, 0, 3].isnan().all() and not out[0, 1:].isnan().any()
