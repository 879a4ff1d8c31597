"""csrc/'s CUDA kernels, their own source, run on the CPU under the emulation of tests/csrc/emu/cuda_emu.h.

No GPU is needed: build.py rewrites the .cu files into C++ against an emulation of the CUDA features they use
(threads as fibers, barriers, shuffles, cp.async, ldmatrix, mma.sync, WMMA) and registers the ops as
torch.ops.dlcv_fast_emu.* for CPU tensors. Here backend "cuda" is routed to those ops on CPU tensors, and the
public functions (dlcv_fast.attention, window_attention, apply_rope) are checked forward and backward with
tests/parity.py's rule against float64 references, through the same Python code a GPU run takes (scope checks,
custom ops, the window backward's reduction). Shapes are smaller than the GPU tests' (the emulation runs about a
million times slower than the hardware) but cover every path: all masks and biases, GQA/MQA, each head-dim
instance, tails of every size, the vector and scalar load paths.

On top of the results, the emulation checks what a GPU would only show as wrong numbers or a crash, if at all:
deadlocks and divergent barriers, data read from a cp.async before its wait, misaligned ldmatrix / cp.async /
WMMA addresses, shared memory used before it is written, dynamic shared memory over the launch's size or the
opt-in. Thread interleavings are shuffled by a seed; the seed tests require bitwise equal results under
different interleavings (a missing barrier would break that). test_emulator_catches_* show each check firing on
a deliberately broken kernel (tests/csrc/emu/selftest.cu).
"""
import os

import pytest
import torch

import dlcv_fast
from tests.csrc import test_cuda_kernels as gpu_tests
from tests.csrc.emu import build as emu_build
from tests.csrc.emu import fuzz
from tests.kernels import test_attention as attn_tests
from tests.kernels import test_window_attention as win_tests

pytestmark = [
    pytest.mark.skipif(emu_build.cuda_include_dir() is None,
                       reason="needs the CUDA toolkit's headers (cuda_fp16.h) to build the emulation"),
    pytest.mark.xdist_group("cuda_emulation"),  # one pytest-xdist worker builds and runs it
]

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu_ops():
    return emu_build.load()


@pytest.fixture
def cuda_on_cpu(emu_ops, monkeypatch):
    """Backend "cuda" on CPU tensors runs the emulated kernels (ops without a CUDA kernel: their default)."""
    fuzz.route_cuda_to_emulation(emu_ops, monkeypatch.setattr)
    monkeypatch.setenv("DLCV_FAST_EMU_SEED", "0")
    return emu_ops


# ------------------------------------------------------------------------------------------------
# Attention forward and backward (attention.cu, attention_bwd.cu)
# ------------------------------------------------------------------------------------------------

ATTENTION_CASES = [  # (Hq, Hkv, Lq, Lk, D, mask kind); B = 2
    (2, 2, 197, 197, 64, "none"),  # ViT: 3 whole key blocks and a 5-key tail
    (2, 2, 77, 77, 64, "causal+padding"),  # CLIP text
    (2, 2, 32, 257, 64, "none"),  # Q-Former cross-attention
    (2, 2, 1, 77, 40, "none"),  # one query; head dim 40 in the 64 instance
    (2, 2, 130, 130, 128, "causal"),
    (2, 2, 100, 100, 72, "prefix"),  # the 96 instance
    (2, 2, 97, 97, 80, "bias"),
    (2, 2, 130, 200, 96, "causal+bias_b"),
    (4, 2, 129, 129, 128, "holes"),  # GQA, a removed key block
    (2, 1, 97, 49, 32, "leftpad+bias_full"),  # MQA, the 32 instance
    (2, 2, 150, 20, 8, "none"),  # head dim 8, Lq > Lk
    (2, 2, 70, 70, 24, "prefix+padding"),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,kind", ATTENTION_CASES, ids=str)
def test_emulated_attention_parity(cuda_on_cpu, Hq, Hkv, Lq, Lk, D, kind, dtype):
    B = 2
    q, k, v = attn_tests.make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, "cpu")
    kw = attn_tests.make_mask_args(kind, B, Hq, Lq, Lk, dtype, "cpu")
    with dlcv_fast.use_backend("cuda"):
        attn_tests.check_parity(q, k, v, kw)


@pytest.mark.parametrize("Lk,D,seed", [(2, 72, 0), (5, 32, 1), (17, 128, 2), (64, 96, 3)])
def test_emulated_attention_bias_gradient_of_short_key_ranges(cuda_on_cpu, Lk, D, seed):
    """Two queries, a full bias: when one key block holds every key of a query block, the dQ kernel takes delta
    from the tile (rowsum(P dP) / rowsum(P)) instead of rowsum(dO * O) with O rounded to fp16, whose error
    (|dO| x that rounding, summed over the head dim) is larger than PyTorch's own for a few keys: the random-shape
    sweep (tests/csrc/emu/fuzz.py) found dbias up to 3.3x PyTorch's error there before (1.0x after)."""
    q, k, v = attn_tests.make_inputs(2, 2, 2, 2, Lk, D, torch.float16, "cpu", seed=seed)
    kw = attn_tests.make_mask_args("bias_full", 2, 2, 2, Lk, torch.float16, "cpu", seed=seed)
    torch.manual_seed(seed)
    with dlcv_fast.use_backend("cuda"):
        attn_tests.check_parity(q, k, v, kw)


def test_emulated_attention_empty_rows_and_layouts(cuda_on_cpu):
    """Rows with no visible key give zeros and lse -inf (and zero gradients); a packed (B, N, 3, H, D) qkv view
    and RoPE through the CUDA route equal the reference."""
    from dlcv_fast.ops import attention as ops

    B, H, L, D = 2, 2, 70, 64
    q, k, v = attn_tests.make_inputs(B, H, H, L, L, D, torch.float16, "cpu")
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1] = False  # batch 1: no key at all
    bias = torch.zeros(1, 1, L, L)
    bias[..., 5, :] = float("-inf")  # row 5 removed by the bias
    out, lse = ops.attention_fwd(q, k, v, bias, kpm, False, 0, D ** -0.5, None, None, "cuda")
    assert not out.isnan().any() and (out[1] == 0).all() and (out[0, :, 5] == 0).all()
    assert (lse[1] == float("-inf")).all() and (lse[0, :, 5] == float("-inf")).all()
    ref, ref_lse = ops.attention_fwd(q.float(), k.float(), v.float(), bias, kpm, False, 0, D ** -0.5, None, None,
                                     "torch")
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-3)
    finite = lse.isfinite()
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-4)
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    grads = torch.autograd.grad(dlcv_fast.attention(qr, kr, vr, key_padding_mask=kpm, backend="cuda"), (qr, kr, vr),
                                torch.randn(B, H, L, D, dtype=torch.float16))
    assert all(not g.isnan().any() for g in grads) and (grads[0][1] == 0).all() and (grads[1][1] == 0).all()

    qkv = torch.randn(B, 77, 3, H, D, dtype=torch.float16)
    qv, kv, vv = qkv.permute(2, 0, 3, 1, 4)  # strided views, no copy
    cos, sin = dlcv_fast.rope_2d(2, 38, D, num_prefix_tokens=1)
    got = dlcv_fast.attention(qv, kv, vv, rope=(cos, sin), backend="cuda")
    want = dlcv_fast.attention(qv.float(), kv.float(), vv.float(), rope=(cos, sin), backend="torch")
    torch.testing.assert_close(got.float(), want, rtol=0, atol=3e-3)


def test_emulated_attention_is_race_free_and_deterministic(cuda_on_cpu, monkeypatch):
    """Forward and backward bitwise equal under different thread interleavings (DLCV_FAST_EMU_SEED): a missing
    __syncthreads / __syncwarp or cp.async wait would let some interleaving read stale shared memory."""
    B, Hq, Hkv, L, D = 1, 4, 2, 140, 64
    q, k, v = attn_tests.make_inputs(B, Hq, Hkv, L, L, D, torch.float16, "cpu")
    kw = attn_tests.make_mask_args("causal+padding+bias", B, Hq, L, L, torch.float16, "cpu")
    do = torch.randn(B, Hq, L, D, dtype=torch.float16)
    runs = []
    for seed in ("1", "2", "3"):
        monkeypatch.setenv("DLCV_FAST_EMU_SEED", seed)
        qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
        bias = kw["attn_bias"].detach().requires_grad_()
        out = dlcv_fast.attention(qr, kr, vr, backend="cuda", **{**kw, "attn_bias": bias})
        runs.append((out, *torch.autograd.grad(out, (qr, kr, vr, bias), do)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_emulated_random_shapes(cuda_on_cpu, monkeypatch):
    """A fixed-seed slice of the random-shape sweep (tests/csrc/emu/fuzz.py: attention and window attention
    problems anywhere in the kernels' scope, RoPE inside the forward, thread-schedule seeds); longer sweeps run
    with ``python -m tests.csrc.emu.fuzz --minutes M --seed S``."""
    monkeypatch.setenv("DLCV_FAST_EMU_SMS", "132")  # restored after the test (the sweep sets it per case)
    failed = fuzz.sweep(seed=2026, trials=40)
    assert not failed, "\n".join(f"{c}: {e}" for c, e in failed)


def _bad_op_calls():
    """(what, call(ops), message) for calls of the CUDA ops themselves (torch.ops.dlcv_fast_cuda.*, as a user of
    the raw ops would make them) that their host code must refuse with a RuntimeError naming the problem."""
    h = torch.float16
    q = torch.randn(1, 2, 10, 64, dtype=h)
    cos = torch.rand(10, 32)
    qkv = torch.randn(1, 7, 7, 3 * 64, dtype=h)
    lse = torch.zeros(1, 2, 10)
    yield "fp32 q", lambda o: o.attention_fwd(q.float(), q.float(), q.float(), None, None, False, 0, 0.1), \
        "must all be float16 or all bfloat16"
    yield "head dim 36", lambda o: o.attention_fwd(q[..., :36], q[..., :36], q[..., :36], None, None, False, 0, 0.1), \
        "multiples of 8 up to 128"
    odd = torch.randn(2 * 10 * 64 + 1, dtype=h)[1:].view(1, 2, 10, 64)  # data 2 bytes past 16-byte alignment
    yield "misaligned", lambda o: o.attention_fwd(odd, q, q, None, None, False, 0, 0.1), "16-byte aligned"
    yield "rope cos only", lambda o: o.attention_fwd(q, q, q, None, None, False, 0, 0.1, cos, None), "go together"
    yield "rope length", lambda o: o.attention_fwd(q, q, q, None, None, False, 0, 0.1, cos[:9], cos[:9]), \
        "9 positions"
    yield "rope width", lambda o: o.attention_fwd(q, q, q, None, None, False, 0, 0.1, torch.rand(10, 40),
                                                  torch.rand(10, 40)), "rotary dim 2R=80"
    yield "bwd lse shape", lambda o: o.attention_bwd(q, q, q, q, q, lse[..., :9], None, None, False, 0, 0.1,
                                                     False), "lse must be the forward's"
    yield "bwd dout dtype", lambda o: o.attention_bwd(q.float(), q, q, q, q, lse, None, None, False, 0, 0.1, False), \
        "dout must match q's shape, dtype and device"
    yield "rope 3-D x", lambda o: o.rope(q[0], cos, cos, q[0].clone(), False, 1.0), "x must be 4-D"
    yield "rope tables", lambda o: o.rope(q, cos[:, :8], cos, q.clone(), False, 1.0), "same shape and dtype"
    yield "window heads", lambda o: o.window_attention_fwd(qkv, None, None, 5, 7, 7, 0, 0, 0.1), "qkv's 192"
    yield "window size", lambda o: o.window_attention_fwd(qkv, None, None, 2, 9, 9, 0, 0, 0.1), \
        "windows of at most 64 tokens, got 9x9"
    yield "window shift", lambda o: o.window_attention_fwd(qkv, None, None, 2, 7, 7, 7, 0, 0.1), \
        r"shift must be in \[0, window\)"
    yield "window table", lambda o: o.window_attention_fwd(qkv, torch.zeros(10, 2), None, 2, 7, 7, 0, 0, 0.1), \
        "rel_pos_bias_table"


@pytest.mark.parametrize("what,call,match", list(_bad_op_calls()), ids=[c[0] for c in _bad_op_calls()])
def test_emulated_ops_refuse_bad_inputs(emu_ops, what, call, match):
    with pytest.raises(RuntimeError, match=match):
        call(emu_ops)


# ------------------------------------------------------------------------------------------------
# Window attention (window_attention.cu)
# ------------------------------------------------------------------------------------------------

WINDOW_CASES = [  # (B, H, W, heads, D, window, shift)
    (1, 14, 14, 2, 32, 7, 3),  # Swin-T shapes, 4 windows
    (1, 7, 7, 2, 32, 7, 3),  # window equal to the map
    (1, 10, 13, 2, 64, 8, 4),  # padding both ways, head dim 64
    (2, 9, 11, 2, 24, 4, 2),  # head dim 24: the scalar-load path
    (1, 10, 13, 2, 16, (4, 6), (2, 3)),  # non-square window, head dim 16
    (1, 4, 32, 1, 40, (2, 32), (1, 16)),  # 64-token non-square window, head dim 40
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("B,H,W,heads,D,window,shift", WINDOW_CASES, ids=win_tests._id)
def test_emulated_window_attention_parity(cuda_on_cpu, B, H, W, heads, D, window, shift, dtype):
    inputs = win_tests.make_inputs(B, H, W, heads, D, window, dtype, "cpu")
    with dlcv_fast.use_backend("cuda"):
        win_tests.check_parity(inputs, dict(num_heads=heads, window_size=window, shift_size=shift))


@pytest.mark.parametrize("table,qkv_bias", [(False, False), (True, False), (False, True)])
def test_emulated_window_attention_without_table_or_bias(cuda_on_cpu, table, qkv_bias):
    inputs = win_tests.make_inputs(1, 10, 13, 2, 32, 7, torch.float16, "cpu", table=table, qkv_bias=qkv_bias)
    with dlcv_fast.use_backend("cuda"):
        win_tests.check_parity(inputs, dict(num_heads=2, window_size=7, shift_size=3))


def test_emulated_window_backward_loops_over_windows(cuda_on_cpu, monkeypatch):
    """With few SMs the backward's CTAs each take several windows (the partial sums of the table and padding-bias
    gradients then cover more than one window): same parity, and bitwise equal under another interleaving."""
    monkeypatch.setenv("DLCV_FAST_EMU_SMS", "1")
    inputs = win_tests.make_inputs(2, 10, 13, 2, 32, 7, torch.float16, "cpu")
    kw = dict(num_heads=2, window_size=7, shift_size=3)
    with dlcv_fast.use_backend("cuda"):
        win_tests.check_parity(inputs, kw)
        runs = []
        for seed in ("1", "2"):
            monkeypatch.setenv("DLCV_FAST_EMU_SEED", seed)
            out = dlcv_fast.window_attention(inputs[0], rel_pos_bias_table=inputs[1], qkv_bias=inputs[2], **kw)
            runs.append((out, *torch.autograd.grad(out, inputs, win_tests.seeded_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# RoPE (rope.cu)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D,R,kind,interleaved", gpu_tests.ROPE_CASES, ids=str)
def test_emulated_rope_parity(cuda_on_cpu, D, R, kind, interleaved, dtype):
    gpu_tests.check_rope_parity(D, R, kind, interleaved, dtype, "cpu", N=37)


@pytest.mark.parametrize("interleaved", [False, True])
def test_emulated_rope_views_inplace_and_backward(cuda_on_cpu, interleaved):
    gpu_tests.check_rope_views_inplace_and_backward(interleaved, "cpu", N=37)


# ------------------------------------------------------------------------------------------------
# The emulation's own checks fire (tests/csrc/emu/selftest.cu: a correct and a broken kernel per check)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selftest():
    return emu_build.load_selftest()


def test_emulator_catches_reads_before_cp_async_wait(selftest, monkeypatch):
    """Without the race check (test_emulator_race_check has it), a cp.async destination holds NaN until its wait."""
    monkeypatch.setenv("DLCV_FAST_EMU_SEED", "0")
    good = selftest.run(0)
    assert torch.equal(good, torch.arange(512, dtype=torch.float32).view(128, 4).roll(-1, 0).flatten())
    monkeypatch.setenv("DLCV_FAST_EMU_RACECHECK", "0")
    assert selftest.run(1).isnan().all()  # no wait_group: the tile is still in flight


def test_emulator_catches_a_missing_barrier(selftest, monkeypatch):
    """Without the __syncthreads (and without the race check, which reports it under every schedule), warp 0
    reads what warp 1 has not written yet under some schedules."""
    want = torch.arange(32, 64, dtype=torch.float32)
    monkeypatch.setenv("DLCV_FAST_EMU_RACECHECK", "0")
    broken = []
    for seed in range(8):
        monkeypatch.setenv("DLCV_FAST_EMU_SEED", str(seed))
        assert torch.equal(selftest.run(2)[:32], want)
        broken.append(not torch.equal(selftest.run(3)[:32], want))
    assert any(broken) and not all(broken)


# build.py's AddressSanitizer build (DLCV_FAST_EMU_ASAN=1) has no race check: its instrumentation is ThreadSanitizer's
needs_race_check = pytest.mark.skipif(os.environ.get("DLCV_FAST_EMU_ASAN") == "1",
                                      reason="the AddressSanitizer build of the emulation has no race check")


@pytest.mark.parametrize("broken,fixed,match", [
    # neighbours read a cp.async tile that was never waited for
    (1, 0, r"race \(read of a cp.async in flight\).*has not waited for"),
    # warp 0 reads what warp 1 writes, no __syncthreads between
    (3, 2, r"race \((read after write|write after read)\) on static shared memory byte \d+: thread \d+ .* with no "
           r"barrier between"),
    # lanes of one warp exchange values through shared memory without __syncwarp
    (10, 11, r"race \((write after read|read after write)\) on static shared memory byte \d+: thread \d+ \w+ what "
             r"was \w+ by thread \d+ with no barrier between"),
    # two blocks write the same output
    (12, 13, r"race \(write after write\) on global memory at 0x[0-9a-f]+: .* another block of the launch"),
    # a double buffer refilled by cp.async while another warp still reads it
    (14, 15, r"race \((write after read|read after write)\) on static shared memory"),
])
@needs_race_check
def test_emulator_race_check(selftest, monkeypatch, broken, fixed, match):
    """The race check judges the order the barriers guarantee, not the order a schedule ran: each broken kernel is
    reported under every seed (as a read after write or a write after read, whichever access the schedule ran
    first), its fixed twin never."""
    want = {0: torch.arange(512).view(128, 4).roll(-1, 0).flatten(), 2: torch.arange(32, 64),
            11: torch.arange(1, 33) % 32, 13: torch.arange(32).repeat(4), 15: torch.zeros(32)}[fixed].float()
    for seed in range(4):
        monkeypatch.setenv("DLCV_FAST_EMU_SEED", str(seed))
        with pytest.raises(RuntimeError, match=match):
            selftest.run(broken)
        assert torch.equal(selftest.run(fixed)[:want.numel()], want)


@pytest.mark.parametrize("which,match", [
    (4, "deadlock"),
    (5, "different barriers"),
    (7, "ldmatrix row address not 16-byte aligned"),
    (8, "65536 bytes of dynamic shared memory; allowed 49152"),
    # ldmatrix rows 128 bytes apart: all eight in one bank group (selftest 17, padded rows, is fine)
    (16, r"ldmatrix bank conflict: the rows of lanes 0 and 1 are in the same 16-byte bank group \(shared-memory "
         r"offsets 0 and 128\)"),
])
def test_emulator_reports_broken_kernels(selftest, which, match):
    with pytest.raises(RuntimeError, match=match):
        selftest.run(which)
    selftest.run(6)  # the aligned ldmatrix is fine, and the emulator is usable after an error
    assert selftest.run(17)[4].item() == 72.0  # lane 4 holds row 1 (element 72 of the padded tile), column 0
    assert torch.equal(selftest.run(0)[:4], torch.arange(4, 8, dtype=torch.float32))


def test_emulator_faults_past_the_dynamic_shared_memory(selftest):
    """A write past the launch's dynamic shared memory hits the guard page (checked in a child process)."""
    import subprocess
    import sys

    code = ("from tests.csrc.emu import build; import sys; ops = build.load_selftest(); ops.run(9); "
            "print('no fault'); sys.exit(0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=emu_build.ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(emu_build.ROOT)})
    assert r.returncode != 0 and "no fault" not in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("table,R,kind", [("n", 32, "none"), ("bn", 16, "causal+padding"), ("1n", 8, "bias")])
def test_emulated_attention_rotates_q_and_k_inside_the_kernel(cuda_on_cpu, table, R, kind):
    """attention(rope=) on the CUDA route rotates q and k in shared memory inside the forward kernel: the same as
    rotating them with apply_rope first (partial rotary, batch tables, masks), and its gradients match too."""
    B, H, L, D = 2, 2, 150, 64
    q, k, v = attn_tests.make_inputs(B, H, H, L, L, D, torch.float16, "cpu")
    kw = attn_tests.make_mask_args(kind, B, H, L, L, torch.float16, "cpu")
    shape = {"n": (L, R), "bn": (B, L, R), "1n": (1, L, R)}[table]
    ang = torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 6
    cos, sin = ang.cos(), ang.sin()
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    fused = dlcv_fast.attention(qr, kr, vr, rope=(cos, sin), backend="cuda", **kw)
    q2, k2 = (dlcv_fast.apply_rope(t, cos, sin, backend="cuda") for t in (qr, kr))
    unfused = dlcv_fast.attention(q2, k2, vr, backend="cuda", **kw)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=2e-3)
    do = torch.randn_like(fused)
    wrt = (qr, kr, vr)
    for a, b in zip(torch.autograd.grad(fused, wrt, do), torch.autograd.grad(unfused, wrt, do)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    with torch.no_grad():
        want = dlcv_fast.attention(q.float(), k.float(), v.float(), rope=(cos, sin), backend="torch", **kw)
    assert (fused.float() - want).abs().max().item() < 1e-2
