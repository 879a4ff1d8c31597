"""Tests of the Linear + activation GEMM (an MLP's fc1 with its GELU in the epilogue): kernel, custom op, Mlp.

Parity follows tests/parity.py against ``reference.linear_act`` (``act(F.linear(x, w, b))``) in float64 and in
the input dtype. Without CUDA the kernel runs in Triton's interpreter (fp16/fp32, the TMA descriptor path
too); bf16 and model-sized shapes are marked ``gpu``.
"""
import pytest
import torch
from torch import nn

from dlcv_fast import reference
from dlcv_fast.kernels import linear_act as kernels
from dlcv_fast.nn import mlp as mlp_mod
from dlcv_fast.ops import linear_act as ops
from tests.parity import assert_parity

ACTS = ["gelu", "quick_gelu", "none"]


def make(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def inputs(M, K, N, dtype, device, bias=True):
    x = make((M, K), dtype, device, 0)
    w = make((N, K), dtype, device, 1, scale=K ** -0.5)
    b = make((N,), dtype, device, 2) if bias else None
    return x, w, b


def check(x, w, b, act, **kw):
    out = kernels.forward(x, w, b, act, **kw) if kw else ops.linear_act(x, w, b, act, backend="triton")
    c = [t.cpu() if t is not None else None for t in (x, w, b)]
    golden = reference.linear_act(*(t.double() if t is not None else None for t in c), act)
    lp = reference.linear_act(*c, act)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[0])
    assert_parity(out.cpu(), golden, lp)
    return out


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N", [(1, 32, 16), (49, 96, 40), (77, 64, 96), (197, 40, 24)])
def test_parity(device, dtype, act, M, K, N):
    check(*inputs(M, K, N, dtype, device), act)


@pytest.mark.parametrize("tma", [False, True])
def test_tma_and_pointer_paths(device, tma):
    """Both load paths (TMA descriptors with zero fill, masked pointer loads) on tails in M, N and K."""
    x, w, b = inputs(45, 72, 56, torch.float16, device)
    if tma and not kernels.use_tma(x, w):
        pytest.skip("no TMA on this GPU")
    check(x, w, b, "gelu", tma=tma)


@pytest.mark.parametrize("act", ["gelu", "none"])
def test_persistent_kernel(device, act):
    """The one-program-per-SM kernel (TMA only): programs walk several tiles each (3 programs under the
    interpreter), tails in M, N and K included; the same results as the per-tile kernel."""
    x, w, b = inputs(150, 72, 80, torch.float16, device)
    if not kernels.use_tma(x, w):
        pytest.skip("no TMA on this GPU")
    got = check(x, w, b, act, tma=True, persistent=True)
    torch.testing.assert_close(got, kernels.forward(x, w, b, act, tma=True, persistent=False), rtol=0, atol=0)


def test_no_bias_and_3d_input(device):
    x = make((2, 9, 48), torch.float16, device, 0)
    w = make((64, 48), torch.float16, device, 1, scale=0.2)
    out = check(x, w, None, "gelu")
    assert out.shape == (2, 9, 64)


def test_strided_rows_in_nan_buffer(device):
    """x's rows are a view into a NaN-filled buffer (row stride > K): only the K columns of each row are read."""
    buf = torch.full((30, 48 + 16), float("nan"), dtype=torch.float16, device=device)
    buf[:, :48] = make((30, 48), torch.float16, device, 0)
    x = buf[:, :48]
    w, b = make((40, 48), torch.float16, device, 1, scale=0.2), make((40,), torch.float16, device, 2)
    out = check(x, w, b, "gelu")
    assert not out.isnan().any()


def test_configs_and_grouping(device):
    """More row tiles than GROUP_M, a partial last group, and a wide config: same results as the default."""
    x, w, b = inputs(150, 64, 80, torch.float32, device)
    want = kernels.forward(x, w, b, "gelu")
    got = kernels.forward(x, w, b, "gelu", cfg=(16, 32, 32, 4, 1))  # 10 x 3 tiles: groups of 8 rows + 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backward_recomputes(device):
    x, w, b = (t.requires_grad_() for t in inputs(13, 24, 20, torch.float32, device))
    dy = make((13, 20), torch.float32, device, 5)
    got = torch.autograd.grad(ops.linear_act(x, w, b, "quick_gelu", backend="triton"), (x, w, b), dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(reference.linear_act(xd, wd, bd, "quick_gelu"), (xd, wd, bd), dy.double())
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_empty(device):
    x = torch.zeros(0, 16, device=device)
    out = ops.linear_act(x, torch.ones(8, 16, device=device), None, "gelu", backend="triton")
    assert out.shape == (0, 8)


BAD = {
    "act": (dict(act="relu"), ValueError, "act must be one of"),
    "x dtype": (dict(x=torch.ones(2, 8, dtype=torch.int32)), TypeError, "x.dtype"),
    "weight dtype": (dict(weight=torch.ones(4, 8, dtype=torch.float16)), TypeError, "weight.dtype"),
    "weight shape": (dict(weight=torch.ones(4, 7)), ValueError, "weight must be"),
    "bias shape": (dict(bias=torch.ones(5)), ValueError, "bias must have shape"),
    "bias device": (dict(bias=torch.ones(4, device="meta")), ValueError, "bias is on meta"),
    "x type": (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    change, err, match = BAD[case]
    args = dict(x=torch.ones(2, 8), weight=torch.ones(4, 8), bias=torch.ones(4), act="gelu")
    args.update(change)
    with pytest.raises(err, match=match):
        ops.linear_act(args["x"], args["weight"], args["bias"], args["act"])


def test_opcheck(device):
    x, w, b = (t.requires_grad_() for t in inputs(6, 16, 8, torch.float32, device))
    torch.library.opcheck(ops.linear_act_op, (x, w, b, "gelu", "auto"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_mlp_flag(device, monkeypatch, act):
    """With FUSED_LINEAR_ACT on, Mlp runs fc1 + act through the fused op in fp16 inference only, and gives the
    eager result; training (autograd recording) and fp32 keep the eager path."""
    m = mlp_mod.Mlp(32, 64, act=act).to(device).half()
    x = make((3, 5, 32), torch.float16, device, 0)
    calls = []
    real = ops._linear_act
    monkeypatch.setattr(ops, "_linear_act", lambda *a: calls.append(a[3]) or real(*a))
    with torch.no_grad():
        eager = m(x)
        monkeypatch.setattr(mlp_mod, "FUSED_LINEAR_ACT", True)
        fused = m(x)
    assert calls == [act]
    torch.testing.assert_close(fused.float(), eager.float(), rtol=2e-3, atol=2e-3)
    m(x)  # grad mode, parameters require grad: eager
    m.float()(x.float())  # fp32: eager
    assert calls == [act]


def test_mlp_flag_leaves_wrapped_modules_and_hooks_alone(device, monkeypatch):
    """The fused path reads fc1's weight directly, so it must not run when that would skip something: a fc1 that
    is not a plain nn.Linear (a LoRA-style subclass adding a delta), a swapped activation, a forward hook."""

    class Delta(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    x = make((3, 5, 32), torch.float16, device, 0)
    monkeypatch.setattr(mlp_mod, "FUSED_LINEAR_ACT", True)
    calls = []
    real = ops._linear_act
    monkeypatch.setattr(ops, "_linear_act", lambda *a: calls.append(a[3]) or real(*a))
    m = mlp_mod.Mlp(32, 64).to(device).half()
    with torch.no_grad():
        m(x)
        assert calls == ["gelu"]  # the plain module: fused
        wrapped = mlp_mod.Mlp(32, 64).to(device).half()
        wrapped.fc1 = Delta(32, 64).to(device).half()
        wrapped.fc1.load_state_dict(m.fc1.state_dict())
        wrapped.fc2.load_state_dict(m.fc2.state_dict())
        torch.testing.assert_close(wrapped(x), m.fc2(m.act(m.fc1(x) + 1.0)))
        swapped = mlp_mod.Mlp(32, 64).to(device).half()
        swapped.act = nn.ReLU()
        swapped(x)
        seen = []
        handle = m.fc1.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        m(x)
        handle.remove()
    assert calls == ["gelu"] and seen == [torch.Size([3, 5, 64])]


def test_vit_with_fused_mlp_matches(device, monkeypatch):
    """A tiny ViT in fp16 inference gives the same logits with the fused MLP as without (within fp16 noise)."""
    from dlcv_fast.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10).to(device).half().eval()
    x = torch.randn(2, 3, 32, 32, device=device).half()
    with torch.no_grad():
        eager = model(x)
        monkeypatch.setattr(mlp_mod, "FUSED_LINEAR_ACT", True)
        fused = model(x)
    torch.testing.assert_close(fused.float(), eager.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("M,K,N", [(256 * 197, 768, 3072), (64 * 3136, 96, 384), (256 * 77, 512, 2048),
                                   (1000, 200, 136)])
def test_bf16_model_shapes(M, K, N, act):
    x, w, b = inputs(M, K, N, torch.bfloat16, "cuda")
    out = kernels.forward(x, w, b, act)
    rows = slice(M - 512, M)  # the last rows: row tiles, grouping and the M tail
    golden = reference.linear_act(x[rows].double(), w.double(), b.double(), act)
    lp = reference.linear_act(x[rows], w, b, act)
    assert_parity(out[rows], golden, lp)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(256 * 197, 768, 3072), (64 * 3136, 96, 384)])
def test_bf16_persistent(M, K, N):
    """The persistent kernel (the sm_90 default) at the ViT-B and Swin-T stage 1 fc1 shapes."""
    x, w, b = inputs(M, K, N, torch.bfloat16, "cuda")
    out = kernels.forward(x, w, b, "gelu", persistent=True)
    rows = slice(M - 512, M)
    golden = reference.linear_act(x[rows].double(), w.double(), b.double(), "gelu")
    assert_parity(out[rows], golden, reference.linear_act(x[rows], w, b, "gelu"))
