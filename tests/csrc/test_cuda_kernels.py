"""Tests of the hand-written CUDA kernels (csrc/) behind backend "cuda": the build, the dispatch, and parity.

Without a GPU this file checks the build and the dispatch rules (the extension must build and import wherever
nvcc and a CUDA build of torch are present, as on the CI machine); test_cuda_emulated.py runs the kernels'
source on the CPU under an emulation of CUDA. Parity runs on a GPU (``pytest -m gpu``),
with tests/parity.py's rule against float64 references, and against the Triton kernels the same inputs give.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlcv_fast
from dlcv_fast import backend as _backend
from tests.kernels import test_attention as attn_tests
from tests.kernels import test_rope as rope_tests
from tests.kernels import test_window_attention as win_tests
from tests.parity import assert_parity

ROOT = Path(__file__).resolve().parents[2]
TOOLCHAIN = (torch.version.cuda is not None and shutil.which("nvcc") is not None
             and os.environ.get("DLCV_FAST_SKIP_CUDA", "0") != "1")


# ------------------------------------------------------------------------------------------------
# Build and dispatch (CPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not TOOLCHAIN, reason="needs nvcc and a CUDA build of torch (the extension is not built "
                                          "without them)")
def test_extension_is_built_and_registers_the_ops():
    """Where the toolchain is, the install built dlcv_fast._C: a csrc/ change that does not compile fails CI
    here, not silently at install time (setup.py tolerates a failed build so a GPU check still installs)."""
    assert _backend.cuda_extension() is not None, "dlcv_fast._C was not built; see pip's output for csrc/ errors"
    for name in ("rope", "window_attention_fwd"):
        assert hasattr(torch.ops.dlcv_fast_cuda, name)


def _nvcc_flags():
    import glob
    import torch.utils.cpp_extension as ce

    try:
        includes = ce.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6 spelled it include_paths(cuda=True)
        includes = ce.include_paths(cuda=True)
    import nvidia

    for root in nvidia.__path__:
        includes += glob.glob(os.path.join(root, "cu*", "include"))
    return ["-O3", "--use_fast_math", "-std=c++20", *ce.COMMON_NVCC_FLAGS, *(f"-I{d}" for d in includes),
            f"-I{ROOT / 'csrc'}"]


@pytest.mark.skipif(not TOOLCHAIN, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_compile_without_spills(arch, tmp_path):
    """ptxas's resource report for every kernel of csrc/ (the AOT check of the Triton kernels, for CUDA): no
    register spill; static shared memory within 48 KB (the compile fails otherwise)."""
    flags = _nvcc_flags()
    procs = {cu.name: subprocess.Popen(["nvcc", "-cubin", f"-arch={arch}", *flags, "-Xptxas", "-v", str(cu), "-o",
                                        str(tmp_path / (cu.stem + ".cubin"))],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cu in sorted((ROOT / "csrc").glob("*.cu"))}
    kernels = 0
    for name, proc in procs.items():
        log = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, f"{name}: nvcc failed\n{log[-3000:]}"
        entry = None
        for line in log.splitlines():
            if "Compiling entry function" in line:
                entry = line.split("'")[1]
                kernels += 1
            elif "spill stores" in line:
                stores = int(line.split("bytes spill stores")[0].split(",")[-1])
                assert stores == 0, f"{name}: {entry} spills on {arch}: {line.strip()}"
    # attention: 2 dtypes x 4 head dims, forward, dK/dV (plain and RoPE) and dQ, plus 2 delta kernels; rope:
    # 5 dtype pairs x 2 widths x 2 layouts; window attention: 12 forward + 12 backward
    assert kernels == 4 * 8 + 2 + 20 + 2 * 12


def test_cuda_backend_needs_cuda_tensors():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = torch.ones(5, 4), torch.zeros(5, 4)
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        dlcv_fast.apply_rope(x, cos, sin, backend="cuda")
    qkv = torch.randn(1, 7, 7, 3 * 16)
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        dlcv_fast.window_attention(qkv, num_heads=1, window_size=7, backend="cuda")


def test_ops_without_a_cuda_kernel_run_their_default(monkeypatch):
    """Under backend "cuda" an op with no CUDA kernel at all runs as under "auto" (a whole model can run under
    use_backend("cuda")); the ops with one take it."""
    monkeypatch.setattr(_backend, "cuda_extension", lambda: object())
    assert _backend.resolve(torch.device("cuda"), "cuda", "layer_norm") == "triton"
    assert _backend.resolve(torch.device("cuda"), "cuda", "linear_act") == "triton"
    for op in ("attention", "rope", "window_attention"):
        assert _backend.resolve(torch.device("cuda"), "cuda", op) == "cuda"
    with pytest.raises(NotImplementedError, match="CUDA kernels exist for attention, rope, window_attention"):
        _backend.resolve(torch.device("cuda"), "cuda")


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "cuda_extension", lambda: None)
    with pytest.raises(RuntimeError, match=r"installed without its CUDA extension \(dlcv_fast._C\)"):
        _backend.resolve(torch.device("cuda"), "cuda", "rope")


def test_auto_never_picks_cuda_yet():
    """Until a GPU run times the CUDA kernels against the Triton ones, "auto" keeps the Triton kernels."""
    assert not any(_backend.AUTO_CUDA.values())
    assert _backend.resolve(torch.device("cuda"), "auto", "rope") == "triton"


@pytest.mark.parametrize("change,match", [
    (dict(dtype=torch.float32), r"dtype torch.float32 \(it takes float16 and bfloat16\)"),
    (dict(window=12), r"window \(12, 12\) of 144 tokens \(at most 64\)"),
    (dict(D=80), r"head dim 80 \(at most 64\)"),
])
def test_window_attention_cuda_scope(change, match):
    from dlcv_fast.ops import window_attention as ops

    args = dict(dtype=torch.float16, window=7, D=32) | change
    qkv = torch.empty(1, 14, 14, 3 * 2 * args["D"], dtype=args["dtype"])
    problems = ops._cuda_problems(qkv, 2, (args["window"],) * 2)
    assert len(problems) == 1 and re.search(match, problems[0])
    assert ops._cuda_problems(torch.empty(1, 14, 14, 3 * 2 * 32, dtype=torch.bfloat16), 2, (7, 7)) == []


@pytest.mark.skipif(not TOOLCHAIN, reason="needs nvcc")
def test_failed_cuda_build_still_installs(tmp_path):
    """A csrc/ that does not compile leaves an installable package without dlcv_fast._C (so a GPU check's
    install goes on), unless DLCV_FAST_REQUIRE_CUDA=1."""
    work = tmp_path / "pkg"
    (work / "csrc").mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", work / "setup.py")
    (work / "dlcv_fast").mkdir()
    (work / "dlcv_fast" / "__init__.py").write_text("")
    (work / "kernels").mkdir()
    (work / "kernels" / "__init__.py").write_text("")
    (work / "csrc" / "broken.cu").write_text("this is not C++;\n")
    env = dict(os.environ, DLCV_FAST_CUDA_ARCHS="80")
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "installing without the CUDA kernels" in run.stdout
    assert not list((work / "dlcv_fast").glob("_C*.so"))
    env["DLCV_FAST_REQUIRE_CUDA"] = "1"
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0


# ------------------------------------------------------------------------------------------------
# RoPE parity (GPU)
# ------------------------------------------------------------------------------------------------

ROPE_CASES = [  # (D, R, table shape kind, interleaved): vector path (R, rest multiples of 8) and scalar path
    (64, 32, "n", False), (64, 32, "n", True), (128, 64, "bn", False), (80, 40, "n", True),
    (64, 16, "n", False), (18, 7, "n", True), (18, 7, "bhn", False), (64, 32, "1hn", True),
]


def _tables(kind, B, H, N, R, device, dtype):
    shape = {"n": (N, R), "bn": (B, N, R), "bhn": (B, H, N, R), "1hn": (1, H, N, R)}[kind]
    return rope_tests.tables(rope_tests.make_angles(shape), device, dtype)


def check_rope_parity(D, R, kind, interleaved, dtype, device, N):
    """backend "cuda" against float64 (tests/parity.py's rule); the pass-through channels copied exactly."""
    B, H = 2, 3
    x = rope_tests.make_x(B, H, N, D, dtype, device)
    cos, sin = _tables(kind, B, H, N, R, device, torch.float32)
    out = dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved, backend="cuda")
    gold = rope_tests.ref_rope(x.double(), cos.double(), sin.double(), interleaved)
    lp = rope_tests.ref_rope(x, cos, sin, interleaved)
    assert_parity(out, gold, lp)
    assert torch.equal(out[..., 2 * R:], x[..., 2 * R:])  # pass-through channels copied exactly
    return x, cos, sin, out


def check_rope_views_inplace_and_backward(interleaved, device, N):
    """A strided q view of a packed qkv, tables in x's dtype: parity, in place equal to out of place, and the
    backward (the inverse rotation) against float64. Returns (q, cos, sin, out)."""
    B, H, D = 2, 4, 64
    qkv = torch.randn(B, N, 3, H, D, device=device, dtype=torch.float16)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # strided view, no copy
    cos, sin = _tables("n", B, H, N, D // 2, device, torch.float16)
    out = dlcv_fast.apply_rope(q, cos, sin, interleaved=interleaved, backend="cuda")
    assert_parity(out, rope_tests.ref_rope(q.double(), cos.double(), sin.double(), interleaved),
                  rope_tests.ref_rope(q, cos, sin, interleaved))
    q2 = q.clone()
    dlcv_fast.apply_rope(q2, cos, sin, interleaved=interleaved, inplace=True, backend="cuda")
    assert torch.equal(q2, out)
    x = q.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved, backend="cuda"), x, g)
    gold = torch.autograd.grad(rope_tests.ref_rope(x.double(), cos.double(), sin.double(), interleaved), x, g.double())
    lp = torch.autograd.grad(rope_tests.ref_rope(x, cos, sin, interleaved), x, g)
    assert_parity(dx, gold[0], lp[0], factor=3.0, name="dx")
    return q, cos, sin, out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("D,R,kind,interleaved", ROPE_CASES, ids=str)
def test_gpu_rope_parity(D, R, kind, interleaved, dtype):
    x, cos, sin, out = check_rope_parity(D, R, kind, interleaved, dtype, "cuda", N=197)
    triton_out = dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved, backend="triton")
    torch.testing.assert_close(out, triton_out, rtol=0, atol=2 * torch.finfo(dtype).eps)


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_rope_views_inplace_tables_and_backward(interleaved):
    q, cos, sin, out = check_rope_views_inplace_and_backward(interleaved, "cuda", N=77)
    torch.testing.assert_close(out, dlcv_fast.apply_rope(q, cos, sin, interleaved=interleaved, backend="triton"),
                               rtol=0, atol=2e-3)


# ------------------------------------------------------------------------------------------------
# Window attention parity (GPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,W,heads,D,window,shift", [
    (4, 56, 56, 3, 32, 7, 3),  # Swin-T stage 1
    (3, 14, 14, 12, 32, 7, 0),  # Swin-T stage 3
    (1, 7, 7, 2, 32, 7, 3),  # window equal to the map
    (2, 30, 45, 2, 64, 8, 4),  # padding both ways, head dim 64
    (3, 9, 11, 2, 24, 4, 2),  # head dim 24: the scalar-load path
    (2, 10, 13, 2, 16, (4, 6), (2, 3)),  # non-square window, head dim 16
    (1, 16, 16, 1, 40, (2, 32), (1, 16)),  # 64-token non-square window, head dim 40
], ids=win_tests._id)
def test_gpu_window_attention_parity(B, H, W, heads, D, window, shift, dtype):
    inputs = win_tests.make_inputs(B, H, W, heads, D, window, dtype, "cuda")
    kw = dict(num_heads=heads, window_size=window, shift_size=shift)
    with dlcv_fast.use_backend("cuda"):
        win_tests.check_parity(inputs, kw)  # forward and backward on the CUDA kernels


@pytest.mark.gpu
@pytest.mark.parametrize("table,qkv_bias", [(False, False), (True, False), (False, True)])
def test_gpu_window_attention_without_table_or_bias(table, qkv_bias):
    inputs = win_tests.make_inputs(2, 30, 45, 2, 32, 7, torch.float16, "cuda", table=table, qkv_bias=qkv_bias)
    with dlcv_fast.use_backend("cuda"):
        win_tests.check_parity(inputs, dict(num_heads=2, window_size=7, shift_size=3))


@pytest.mark.gpu
def test_gpu_window_attention_backward_is_deterministic():
    qkv, table, bias = win_tests.make_inputs(8, 30, 45, 3, 32, 7, torch.bfloat16, "cuda", param_dtype=torch.float32)
    runs = []
    for _ in range(2):
        out = dlcv_fast.window_attention(qkv, num_heads=3, window_size=7, shift_size=3, rel_pos_bias_table=table,
                                         qkv_bias=bias, backend="cuda")
        runs.append([out, *torch.autograd.grad(out, (qkv, table, bias), torch.ones_like(out))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("shift", [0, 3])
def test_gpu_window_attention_matches_triton(shift):
    qkv, table, bias = win_tests.make_inputs(2, 30, 45, 3, 32, 7, torch.float16, "cuda", param_dtype=torch.float32)
    from dlcv_fast.ops import window_attention as ops

    args = (qkv, table, bias, 3, 7, 7, shift, shift, 32 ** -0.5)
    out_c, lse_c = ops.window_attention_fwd(*args, "cuda")
    out_t, lse_t = ops.window_attention_fwd(*args, "triton")
    torch.testing.assert_close(out_c, out_t, rtol=0, atol=2e-3)
    torch.testing.assert_close(lse_c, lse_t, rtol=1e-5, atol=1e-4)
    # The CUDA backward gives the Triton backward's gradients (both fp32-accumulated; not bitwise).
    dout = torch.randn_like(out_c)
    grads = [torch.autograd.grad(dlcv_fast.window_attention(qkv, num_heads=3, window_size=7, shift_size=shift,
                                                            rel_pos_bias_table=table, qkv_bias=bias, backend=b),
                                 (qkv, table, bias), dout) for b in ("cuda", "triton")]
    for gc, gt in zip(*grads):
        torch.testing.assert_close(gc.float(), gt.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_window_attention_strided_and_unaligned_qkv():
    """A qkv slice of a wider buffer (16-byte loads off) and an odd batch stride give the same result."""
    base = torch.randn(2, 14, 14, 3 * 64 + 1, device="cuda", dtype=torch.float16)
    qkv = base[..., 1:]  # unit channel stride, pointer off 16-byte alignment
    table = torch.randn(169, 2, device="cuda")
    kw = dict(num_heads=2, window_size=7, shift_size=3, rel_pos_bias_table=table)
    out = dlcv_fast.window_attention(qkv, backend="cuda", **kw)
    ref = dlcv_fast.window_attention(qkv.contiguous(), backend="triton", **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("change,match", [
    (dict(dtype=torch.float32), r"dtype torch.float32 \(it takes float16 and bfloat16\)"),
    (dict(D=36), r"head dim 36 \(multiples of 8 up to 128\)"),
    (dict(D=160), r"head dim 160"),
    (dict(offset=1), r"q's layout \(16-byte aligned data"),
])
def test_attention_cuda_scope(change, match):
    from dlcv_fast.ops import attention as ops

    args = dict(dtype=torch.float16, D=64, offset=0) | change
    buf = torch.empty(2 * 4 * 16 * args["D"] + 8, dtype=args["dtype"])
    q = buf[args["offset"]:args["offset"] + 2 * 4 * 16 * args["D"]].view(2, 4, 16, args["D"])
    k = v = torch.empty(2, 4, 16, args["D"], dtype=args["dtype"])
    problems = ops._cuda_problems(q, k, v)
    assert any(re.search(match, p) for p in problems), problems
    good = torch.empty(2, 4, 16, 64, dtype=torch.float16)
    assert ops._cuda_problems(good, good, good) == []


def test_scope_raises_when_asked_and_falls_back_under_auto(monkeypatch):
    """Outside a CUDA kernel's scope: backend "cuda" raises NotImplementedError naming what is not covered; "auto"
    with the op's AUTO_CUDA entry on runs the Triton kernels instead; in scope, both take the CUDA kernel."""
    monkeypatch.setattr(_backend, "cuda_extension", lambda: object())
    monkeypatch.setitem(_backend.AUTO_CUDA, "attention", True)
    dev = torch.device("cuda")
    with pytest.raises(NotImplementedError, match="the CUDA attention kernel does not cover head dim 160; too big"):
        _backend.resolve_in_scope(dev, "cuda", "attention", lambda: ["head dim 160", "too big"])
    assert _backend.resolve_in_scope(dev, "auto", "attention", lambda: ["head dim 160"]) == "triton"
    assert _backend.resolve_in_scope(dev, "auto", "attention", lambda: []) == "cuda"
    assert _backend.resolve_in_scope(dev, "cuda", "attention", lambda: []) == "cuda"
    with _backend.use_backend("auto"):  # the context's choice counts as asked-for too
        assert _backend.resolve_in_scope(dev, None, "attention", lambda: ["x"]) == "triton"
    with _backend.use_backend("cuda"), pytest.raises(NotImplementedError):
        _backend.resolve_in_scope(dev, None, "attention", lambda: ["x"])


def test_auto_takes_cuda_only_where_switched_on_and_built(monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.setattr(_backend, "cuda_extension", lambda: object())
    assert _backend.resolve(dev, "auto", "window_attention") == "triton"  # off by default
    monkeypatch.setitem(_backend.AUTO_CUDA, "window_attention", True)
    assert _backend.resolve(dev, "auto", "window_attention") == "cuda"
    cpu = torch.device("cpu")  # CPU tensors: as before (the reference, or the interpreter under TRITON_INTERPRET=1)
    assert _backend.resolve(cpu, "auto", "window_attention") == _backend.resolve(cpu, "auto", "layer_norm")
    assert _backend.resolve(dev, "auto", "layer_norm") == "triton"  # no CUDA kernel
    monkeypatch.setattr(_backend, "cuda_extension", lambda: None)  # not built
    assert _backend.resolve(dev, "auto", "window_attention") == "triton"


# ------------------------------------------------------------------------------------------------
# Attention parity (GPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,kind", [
    (4, 4, 197, 197, 64, "none"),  # ViT-B
    (4, 4, 77, 77, 64, "causal+padding"),  # CLIP text
    (4, 4, 32, 257, 64, "none"),  # Q-Former cross-attention
    (4, 4, 1, 77, 40, "none"),
    (4, 4, 1025, 1025, 128, "causal"),
    (4, 4, 300, 300, 72, "prefix"),
    (4, 4, 197, 197, 80, "bias"),
    (4, 4, 130, 200, 96, "causal+bias_b"),
    (8, 2, 257, 257, 128, "holes"),  # GQA, a removed key block
    (4, 1, 97, 49, 32, "leftpad+bias_full"),  # MQA
    (2, 2, 4096, 77, 64, "none"),  # U-Net cross-attention
])
def test_gpu_attention_parity(Hq, Hkv, Lq, Lk, D, kind, dtype):
    """The CUDA forward and backward against float64, every mask kind (bias gradients included)."""
    B = 2
    q, k, v = attn_tests.make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, "cuda")
    kw = attn_tests.make_mask_args(kind, B, Hq, Lq, Lk, dtype, "cuda")
    with dlcv_fast.use_backend("cuda"):
        attn_tests.check_parity(q, k, v, kw)


@pytest.mark.gpu
def test_gpu_attention_matches_triton_and_masks_rows():
    B, H, L, D = 2, 3, 197, 64
    q, k, v = attn_tests.make_inputs(B, H, H, L, L, D, torch.float16, "cuda")
    kpm = torch.ones(B, L, dtype=torch.bool, device="cuda")
    kpm[1] = False  # batch 1: no key at all
    bias = torch.zeros(1, 1, L, L, device="cuda")
    bias[..., 5, :] = float("-inf")  # row 5 removed by the bias
    from dlcv_fast.ops import attention as ops

    args = (q, k, v, bias, kpm, False, 0, D ** -0.5, None, None)
    out_c, lse_c = ops.attention_fwd(*args, "cuda")
    out_t, lse_t = ops.attention_fwd(*args, "triton")
    assert (out_c[1] == 0).all() and (out_c[0, :, 5] == 0).all() and not out_c.isnan().any()
    assert (lse_c[1] == float("-inf")).all() and (lse_c[0, :, 5] == float("-inf")).all()
    torch.testing.assert_close(out_c, out_t, rtol=0, atol=2e-3)
    torch.testing.assert_close(lse_c, lse_t, rtol=1e-5, atol=1e-4)
    assert out_c.transpose(1, 2).is_contiguous()  # the (B, L, H, D) buffer the Triton forward returns too


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["causal+padding", "bias_b", "prefix"])
def test_gpu_attention_backward_matches_triton_and_is_deterministic(kind):
    B, Hq, Hkv, L, D = 2, 8, 2, 333, 64
    q, k, v = (t.requires_grad_() for t in attn_tests.make_inputs(B, Hq, Hkv, L, L, D, torch.bfloat16, "cuda"))
    kw = attn_tests.make_mask_args(kind, B, Hq, L, L, torch.bfloat16, "cuda")
    wrt = [q, k, v] + ([kw["attn_bias"]] if "attn_bias" in kw else [])
    do = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(dlcv_fast.attention(q, k, v, backend=b, **kw), wrt, do)
            for b in ("cuda", "cuda", "triton")]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)  # bitwise: no atomics
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), runs[0], runs[2]):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 2e-2 * b.float().abs().max().item() + 1e-3, f"{name}: {err}"


@pytest.mark.gpu
def test_gpu_attention_backward_of_odd_output_gradients():
    """dO with all-zero strides (out.sum()), a transposed dO and one at an odd offset reach the kernels re-laid out."""
    q, k, v = (t.requires_grad_() for t in attn_tests.make_inputs(2, 4, 4, 77, 77, 64, torch.float16, "cuda"))
    base = torch.randn(2 * 4 * 77 * 64 + 3, device="cuda", dtype=torch.float16)
    odd = base[3:].view(2, 4, 77, 64)
    dos = [None, torch.randn(2, 4, 64, 77, device="cuda", dtype=torch.float16).transpose(2, 3), odd]
    for do in dos:
        grads = []
        for backend in ("cuda", "triton"):
            out = dlcv_fast.attention(q, k, v, causal=True, backend=backend)
            grads.append(torch.autograd.grad(out.sum() if do is None else out, (q, k, v), do))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-2)


@pytest.mark.gpu
def test_gpu_attention_fused_qkv_view_and_rope():
    B, N, H, D = 2, 197, 6, 64
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    cos, sin = dlcv_fast.rope_2d(14, 14, D, num_prefix_tokens=1, device="cuda")
    out = dlcv_fast.attention(q, k, v, rope=(cos, sin), backend="cuda")
    ref = dlcv_fast.attention(q, k, v, rope=(cos, sin), backend="triton")
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)


# ------------------------------------------------------------------------------------------------
# Whole models under use_backend("cuda") (GPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "swin_tiny_patch4_window7_224"])
def test_gpu_model_under_cuda_backend(name):
    """A model runs under use_backend("cuda") (attention / window attention on csrc/, LayerNorm and MLP on their
    default kernels), forward and backward, and agrees with the Triton route in bf16."""
    from dlcv_fast.models import create_model

    torch.manual_seed(0)
    model = create_model(name).cuda().to(torch.bfloat16)
    x = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    outs = []
    for backend in ("cuda", "triton"):
        model.zero_grad()
        with dlcv_fast.use_backend(backend):
            out = model(x)
            out.float().square().mean().backward()
        outs.append((out.float(), next(p for p in model.parameters() if p.grad is not None).grad.float().clone()))
    (out_c, g_c), (out_t, g_t) = outs
    assert torch.isfinite(out_c).all() and torch.isfinite(g_c).all()
    scale = out_t.abs().max().item()
    assert (out_c - out_t).abs().max().item() <= 5e-2 * scale  # bf16 through 12 blocks; kernel parity is above
    assert (g_c - g_t).abs().max().item() <= 1e-1 * g_t.abs().max().item()
