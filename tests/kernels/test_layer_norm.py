"""Tests of the LayerNorm with a fused residual add: the Triton kernels, the custom ops, the module.

Parity follows tests/parity.py against ``reference.layer_norm`` (``F.layer_norm(x + residual)``) in float64
(golden) and in the input dtype (what eager PyTorch gives), forward and backward. Without CUDA the kernels
run in Triton's interpreter (fp16/fp32); bf16 and model-sized shapes are marked ``gpu``.
"""
import pytest
import torch
from torch import nn

import dlcv_fast
from dlcv_fast import reference
from dlcv_fast.kernels import layer_norm as ln_kernels
from dlcv_fast.nn import LayerNorm
from dlcv_fast.ops import layer_norm as ln_ops
from tests.parity import assert_parity

NAMES = ("y", "s", "dx", "dresidual", "dweight", "dbias")


def make(shape, dtype, device, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).mul_(2).add_(0.5).to(device=device, dtype=dtype).requires_grad_(
        requires_grad)


def run(fn, x, residual, weight, bias, dy, ds):
    """Outputs and gradients of ``fn(x, residual, weight, bias) -> (y, s)`` (s None without a residual)."""
    y, s = fn(x, residual, weight, bias)
    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    outs, grads = (y, s) if s is not None else (y,), (dy, ds) if s is not None else (dy,)
    got = torch.autograd.grad(outs, leaves, grads)
    it = iter(got)
    return [y, s] + [next(it) if t is not None else None for t in (x, residual, weight, bias)]


def ours(eps, backend="triton"):
    def fn(x, residual, weight, bias):
        out = dlcv_fast.layer_norm(x, weight, bias, eps, residual=residual, backend=backend)
        return out if residual is not None else (out, None)
    return fn


def run_ref(eps, dtype, x, residual, weight, bias, dy, ds, device="cpu"):
    """:func:`run` of the reference on copies of the inputs in ``dtype`` (None: each keeps its own, as eager
    code runs) on ``device``."""
    def cast(t):
        return t.detach().to(device=device, dtype=dtype or t.dtype) if t is not None else None

    def fn(x, residual, weight, bias):
        out = reference.layer_norm(x, weight, bias, eps, residual=residual)
        return out if residual is not None else (out, None)
    leaves = [cast(t).requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    return run(fn, *leaves, cast(dy), cast(ds))


def check(x, residual, weight, bias, eps=1e-5, seed=9):
    dy = make(x.shape, x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype), x.device,
              seed, requires_grad=False)
    ds = make(dy.shape, dy.dtype, x.device, seed + 1, requires_grad=False) if residual is not None else None
    got = run(ours(eps), x, residual, weight, bias, dy, ds)
    golden = run_ref(eps, torch.float64, x, residual, weight, bias, dy, ds)
    lp = run_ref(eps, None, x, residual, weight, bias, dy, ds)
    for i, (name, o, g, l) in enumerate(zip(NAMES, got, golden, lp)):
        if o is None:
            continue
        assert o.dtype == (l.dtype if i < 2 else {2: x, 3: residual, 4: weight, 5: bias}[i].dtype), name
        assert_parity(o.cpu(), g, l, factor=2.0 if i < 2 else 3.0, name=name)
    return got


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N", [(1, 7), (49, 96), (37, 197), (6, 768), (3, 1536)])
def test_parity_with_residual(device, dtype, M, N):
    x, r = make((M, N), dtype, device, 0), make((M, N), dtype, device, 1)
    w, b = make((N,), dtype, device, 2), make((N,), dtype, device, 3)
    check(x, r, w, b)


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("residual", [False, True])
def test_parity_options(device, affine, residual):
    """Without residual (a plain LayerNorm), without bias, without weight and bias; 3-D input."""
    x = make((2, 29, 80), torch.float16, device, 0)
    r = make((2, 29, 80), torch.float16, device, 1) if residual else None
    w = make((80,), torch.float16, device, 2) if affine != "none" else None
    b = make((80,), torch.float16, device, 3) if affine == "both" else None
    check(x, r, w, b, eps=1e-6)


def test_mixed_dtypes(device):
    """fp16 activations with an fp32 residual stream and fp32 parameters: the sum and y are fp32 (torch's
    promotion), each gradient comes back in its input's dtype."""
    x = make((17, 64), torch.float16, device, 0)
    r = make((17, 64), torch.float32, device, 1)
    w, b = make((64,), torch.float32, device, 2), make((64,), torch.float32, device, 3)
    y, s = check(x, r, w, b)[:2]
    assert y.dtype == s.dtype == torch.float32


def test_sum_is_rounded_before_norm(device):
    """y normalises the stored fp16 sum (as F.layer_norm(x + r) does), not the fp32 sum before rounding: with
    x = 1024 (fp16 spacing 1 there) and r in [0, 1), the fp16 sum is 1024 or 1025, so the two differ
    completely."""
    x = torch.full((8, 48), 1024.0, dtype=torch.float16, device=device)
    r = torch.rand(8, 48, device=device).to(torch.float16)
    y, s = dlcv_fast.layer_norm(x, None, None, 1e-5, residual=r, backend="triton")
    torch.testing.assert_close(s.cpu(), (x + r).cpu(), rtol=0, atol=0)
    want = torch.nn.functional.layer_norm(s.cpu().float(), (48,), eps=1e-5)
    torch.testing.assert_close(y.cpu().float(), want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("programs", [1, 2, 5, 40])
def test_backward_partial_sums(device, programs):
    """The weight/bias gradients summed from 1, 2, 5 or more programs than rows' blocks, M not a multiple
    of the block."""
    M, N = 45, 96
    x, w = make((M, N), torch.float32, device, 0), make((N,), torch.float32, device, 2)
    y, s, mean, rstd = ln_ops.layer_norm_fwd(x.detach(), None, w.detach(), None, 1e-5, "triton")
    dy = make((M, N), torch.float32, device, 7, requires_grad=False)
    dx, dw, db = ln_kernels.backward(dy, None, x.detach(), w.detach(), mean, rstd, True, True, programs=programs)
    gx, gw, gb = reference.layer_norm_backward(dy.cpu().double(), x.detach().cpu().double(),
                                               w.detach().cpu().double(), 1e-5)
    torch.testing.assert_close(dx.cpu().double(), gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.cpu().double(), gw.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db.cpu().double(), gb.double(), rtol=1e-5, atol=1e-4)


def test_deterministic(device):
    x, r = make((70, 96), torch.float16, device, 0), make((70, 96), torch.float16, device, 1)
    w, b = make((96,), torch.float16, device, 2), make((96,), torch.float16, device, 3)
    dy, ds = make((70, 96), torch.float16, device, 4, False), make((70, 96), torch.float16, device, 5, False)
    a = run(ours(1e-5), x, r, w, b, dy, ds)
    c = run(ours(1e-5), x, r, w, b, dy, ds)
    for name, u, v in zip(NAMES, a, c):
        assert torch.equal(u, v), name


def test_no_out_of_bounds_reads(device):
    """Rows that are views into NaN-filled buffers (row stride > N): only the N elements of each row are read."""
    M, N, pad = 21, 40, 13
    bufs = [torch.full((M, N + pad), float("nan"), dtype=torch.float16, device=device) for _ in range(4)]
    views = []
    for i, buf in enumerate(bufs):
        buf[:, :N] = make((M, N), torch.float16, device, i, requires_grad=False)
        views.append(buf[:, :N])
    x, r, dy, ds = views
    w = make((N,), torch.float16, device, 8)
    x.requires_grad_(), r.requires_grad_()
    got = run(ours(1e-5), x, r, w, None, dy, ds)
    want = run(ours(1e-5), x.detach().contiguous().requires_grad_(), r.detach().contiguous().requires_grad_(), w,
               None, dy.contiguous(), ds.contiguous())
    for name, u, v in zip(NAMES, got, want):
        if u is not None:
            assert not torch.isnan(u).any(), name
            torch.testing.assert_close(u, v, rtol=0, atol=0, msg=name)


def test_non_unit_last_stride(device):
    """A transposed input is copied to rows first; the result is the same."""
    x = make((32, 24), torch.float32, device, 0, requires_grad=False).t()
    w = make((32,), torch.float32, device, 1, requires_grad=False)
    out = dlcv_fast.layer_norm(x, w, None, backend="triton")
    torch.testing.assert_close(out, reference.layer_norm(x, w, None), rtol=1e-5, atol=1e-5)


def test_empty(device):
    x = torch.zeros(0, 5, 64, device=device, requires_grad=True)
    w = torch.ones(64, device=device, requires_grad=True)
    y, s = dlcv_fast.layer_norm(x, w, None, residual=torch.zeros_like(x), backend="triton")
    assert y.shape == s.shape == x.shape
    dx, dw = torch.autograd.grad(y.sum() + s.sum(), (x, w))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------


BAD = {
    "x int": (lambda d: dict(x=torch.ones(2, 8, dtype=torch.int32, device=d)), TypeError, "x.dtype"),
    "x float64": (lambda d: dict(x=torch.ones(2, 8, dtype=torch.float64, device=d)), TypeError, "x.dtype"),
    "x scalar": (lambda d: dict(x=torch.ones((), device=d)), ValueError, "last"),
    "x not a tensor": (lambda d: dict(x=[1.0, 2.0]), TypeError, "x must be"),
    "residual shape": (lambda d: dict(residual=torch.ones(2, 7, device=d)), ValueError, "residual must have"),
    "residual dtype": (lambda d: dict(residual=torch.ones(2, 8, dtype=torch.int64, device=d)), TypeError,
                       "residual.dtype"),
    "weight shape": (lambda d: dict(weight=torch.ones(7, device=d)), ValueError, "weight must have shape"),
    "bias shape": (lambda d: dict(bias=torch.ones(2, 8, device=d)), ValueError, "bias must have shape"),
    "bias dtype": (lambda d: dict(bias=torch.ones(8, dtype=torch.float64, device=d)), TypeError, "bias.dtype"),
    "eps negative": (lambda d: dict(eps=-1.0), ValueError, "eps"),
    "row too long": (lambda d: dict(x=torch.ones(1, ln_ops.MAX_N + 1, device=d)), ValueError, "at most"),
    "backend name": (lambda d: dict(backend="nope"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, case):
    make_args, err, match = BAD[case]
    args = dict(x=torch.ones(2, 8, device=device), weight=None, bias=None, eps=1e-5, residual=None,
                backend="triton")
    args.update(make_args(device))
    with pytest.raises(err, match=match):
        dlcv_fast.layer_norm(args.pop("x"), **args)


def test_mixed_devices():
    x = torch.ones(2, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on cpu but x is on meta"):
        dlcv_fast.layer_norm(x, torch.ones(8), backend="torch")


def test_long_rows_on_the_torch_backend():
    x = torch.randn(2, ln_ops.MAX_N + 3)
    torch.testing.assert_close(dlcv_fast.layer_norm(x, backend="torch"), reference.layer_norm(x))


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.compile / fake tensors) and the module
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(device, residual):
    x = make((3, 5, 16), torch.float32, device, 0)
    r = make((3, 5, 16), torch.float32, device, 1) if residual else None
    w, b = make((16,), torch.float32, device, 2), make((16,), torch.float32, device, 3)
    torch.library.opcheck(ln_ops.layer_norm_fwd, (x, r, w, b, 1e-5, "auto"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiles(device):
    def f(x, r, w, b):
        y, s = dlcv_fast.layer_norm(x, w, b, residual=r)
        return y * 2 + s

    x, r = make((4, 32), torch.float32, device, 0), make((4, 32), torch.float32, device, 1)
    w, b = make((32,), torch.float32, device, 2), make((32,), torch.float32, device, 3)
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x, r, w, b)
    torch.testing.assert_close(got, f(x, r, w, b), rtol=1e-5, atol=1e-5)
    g1 = torch.autograd.grad(got.sum(), (x, r, w, b))
    g2 = torch.autograd.grad(f(x, r, w, b).sum(), (x, r, w, b))
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_module_is_nn_layernorm(device):
    """Same state_dict as nn.LayerNorm (timm checkpoints load), same result, and the residual form."""
    theirs = nn.LayerNorm(48, eps=1e-6).to(device)
    nn.init.normal_(theirs.weight), nn.init.normal_(theirs.bias)
    ours_m = LayerNorm(48, eps=1e-6).to(device)
    ours_m.load_state_dict(theirs.state_dict())
    assert isinstance(ours_m, nn.LayerNorm) and ours_m.state_dict().keys() == theirs.state_dict().keys()
    x, r = make((3, 11, 48), torch.float32, device, 0, False), make((3, 11, 48), torch.float32, device, 1, False)
    torch.testing.assert_close(ours_m(x), theirs(x), rtol=1e-5, atol=1e-5)
    y, s = ours_m(x, residual=r)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, theirs(x + r), rtol=1e-5, atol=1e-5)


def test_module_routes(device, monkeypatch):
    """The kernel runs where Triton runs; the torch backend, autocast and torch.compile take eager PyTorch."""
    calls = []
    real = ln_ops._layer_norm
    monkeypatch.setattr(ln_ops, "_layer_norm", lambda *a: calls.append(1) or real(*a))
    m = LayerNorm(16).to(device)
    x = torch.randn(2, 16, device=device)
    m(x)
    assert calls == [1]
    with dlcv_fast.use_backend("torch"):
        m(x)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        m(x)
    assert calls == [1]


def test_module_keeps_nn_semantics_outside_the_kernel(device):
    """Inputs the kernel does not take run eagerly with nn.LayerNorm's meaning: a residual that broadcasts, and
    a last dim that does not match normalized_shape (torch's own error)."""
    m = LayerNorm(16).to(device)
    x = torch.randn(2, 3, 16, device=device)
    r = torch.randn(1, 3, 16, device=device)
    y, s = m(x, residual=r)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, nn.functional.layer_norm(x + r, (16,), m.weight, m.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        m(torch.randn(2, 8, device=device))


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_blocks_fuse_adds_into_norms(device, drop_path):
    """run_blocks (every residual add inside the next norm's kernel) equals the blocks run one by one, in
    training mode with stochastic depth too (same random draws)."""
    from dlcv_fast.nn import Block, run_blocks

    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(32, 2, 64, drop_path=drop_path) for _ in range(3)]).to(device).train()
    final = LayerNorm(32).to(device)
    x = torch.randn(2, 9, 32, device=device, requires_grad=True)
    torch.manual_seed(1)
    got = run_blocks(blocks, x, final)
    torch.manual_seed(1)
    want = x
    for blk in blocks:
        want = blk(want)
    want = final(want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g1, = torch.autograd.grad(got.square().sum(), x)
    g2, = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_block_hooks_still_fire(device):
    """A forward hook on a block (feature extraction) sees that block's output: with a hooked block the model
    calls its blocks one by one, and the result is the same as without hooks."""
    from dlcv_fast.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=4).to(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        plain = model(x)
        seen = []
        handle = model.blocks[1].register_forward_hook(lambda m, args, out: seen.append(out))
        hooked = model(x)
        handle.remove()
        tokens = model.blocks[1](model.blocks[0](model._embed(x)[0]))
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
    assert len(seen) == 1 and torch.allclose(seen[0], tokens, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU only: bf16 (garbage in the interpreter), model-sized rows, int64 offsets
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("M,N", [(256 * 197, 768), (128 * 3136, 96), (64 * 77, 512), (4096, 8192)])
def test_bf16_model_shapes(M, N):
    x, r = make((M, N), torch.bfloat16, "cuda", 0), make((M, N), torch.bfloat16, "cuda", 1)
    w, b = make((N,), torch.bfloat16, "cuda", 2), make((N,), torch.bfloat16, "cuda", 3)
    dy = make((M, N), torch.bfloat16, "cuda", 4, False)
    ds = make((M, N), torch.bfloat16, "cuda", 5, False)
    got = run(ours(1e-6), x, r, w, b, dy, ds)
    gold = run_ref(1e-6, torch.float64, x, r, w, b, dy, ds, device="cuda")
    lp = run_ref(1e-6, None, x, r, w, b, dy, ds, device="cuda")
    for i, (name, o, g, l) in enumerate(zip(NAMES, got, gold, lp)):
        assert_parity(o, g, l, factor=2.0 if i < 2 else 3.0, name=name)


@pytest.mark.gpu
def test_int64_offsets():
    """More than 2^31 elements: the last rows are normalised correctly."""
    N = 768
    M = (2 ** 31) // N + 64
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    y = dlcv_fast.layer_norm(x, w, None)
    tail = x[-100:]
    assert_parity(y[-100:], reference.layer_norm(tail.double(), w.double()), reference.layer_norm(tail, w))
