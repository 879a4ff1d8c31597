"""Tests of rotary position embedding: the Triton kernel, its custom op, the 2-D tables and the module.

Parity follows tests/parity.py against two independent definitions: ``reference.apply_rope`` (real
arithmetic on channel pairs) and a complex-number formulation written here as RoPE-ViT writes it (pairs
viewed as complex numbers, multiplied by ``polar(1, angle)``). Without CUDA the kernel runs in Triton's
interpreter (fp16/fp32); bf16 and large shapes are marked ``gpu``.
"""
import pytest
import torch

import dlcv_fast
from dlcv_fast import reference
from dlcv_fast.kernels import rope as rope_kernels
from dlcv_fast.nn import RotaryEmbedding2D
from dlcv_fast.ops import rope as rope_ops
from dlcv_fast.rope_tables import init_mixed_freqs
from tests.parity import assert_parity

# ------------------------------------------------------------------------------------------------
# Helpers: inputs and the two independent definitions
# ------------------------------------------------------------------------------------------------


def make_x(B, H, N, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype)


def make_angles(shape, seed=1):
    """Random angles in float64 (CPU); cos/sin tables are taken from them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * 50.0


def tables(angles, device, dtype=torch.float32):
    return torch.cos(angles).to(device=device, dtype=dtype), torch.sin(angles).to(device=device, dtype=dtype)


def as_4d(t):
    """(N, R) / (B, N, R) / (B, H, N, R) -> broadcastable (B|1, H|1, N, R)."""
    return {2: lambda: t[None, None], 3: lambda: t[:, None], 4: lambda: t}[t.dim()]()


def ref_rope(x, cos, sin, interleaved):
    """reference.apply_rope, with per-head 4-D tables applied by folding heads into the batch."""
    if cos.dim() < 4:
        return reference.apply_rope(x, cos, sin, interleaved=interleaved)
    B, H, N, D = x.shape
    R = cos.shape[-1]
    c, s = (t.expand(B, H, N, R).reshape(B * H, N, R) for t in (cos, sin))
    return reference.apply_rope(x.reshape(B * H, 1, N, D), c, s, interleaved=interleaved).reshape(B, H, N, D)


def complex_rope(x, angles, interleaved):
    """Second formulation: each rotated pair as a complex number times ``polar(1, angle)`` (float64)."""
    x = x.double().cpu()
    R = angles.shape[-1]
    rot, rest = x[..., : 2 * R], x[..., 2 * R:]
    if interleaved:
        z = torch.view_as_complex(rot.reshape(*rot.shape[:-1], R, 2).contiguous())
    else:
        z = torch.complex(rot[..., :R], rot[..., R:])
    z = z * as_4d(torch.polar(torch.ones_like(angles), angles))
    out = torch.view_as_real(z).flatten(-2) if interleaved else torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((out, rest), dim=-1)


def check_forward(x, angles, interleaved, cos=None, sin=None):
    """Run the kernel and check it against the reference and the complex formulation."""
    if cos is None:
        cos, sin = tables(angles, x.device)
    out = dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved, backend="triton")
    golden = ref_rope(x.cpu().double(), cos.cpu().double(), sin.cpu().double(), interleaved)
    lp = ref_rope(x.cpu(), cos.cpu(), sin.cpu(), interleaved)
    assert_parity(out.cpu(), golden, lp, name="out vs reference")
    assert_parity(out.cpu(), complex_rope(x, angles, interleaved), lp, name="out vs complex formulation")
    return out


LAYOUTS = [pytest.param(False, id="half-split"), pytest.param(True, id="interleaved")]

# ------------------------------------------------------------------------------------------------
# Forward parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("D,N", [(32, 197), (64, 257), (80, 197), (128, 257)])
def test_forward_parity(device, D, N, interleaved):
    x = make_x(2, 2, N, D, torch.float16, device)
    check_forward(x, make_angles((N, D // 2)), interleaved)


@pytest.mark.parametrize("interleaved", LAYOUTS)
def test_forward_parity_fp32(device, interleaved):
    x = make_x(1, 3, 97, 64, torch.float32, device)
    check_forward(x, make_angles((97, 32)), interleaved)


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("D,R", [(64, 8), (64, 20), (80, 16)])
def test_partial_rotary(device, D, R, interleaved):
    x = make_x(2, 2, 49, D, torch.float16, device)
    out = check_forward(x, make_angles((49, R)), interleaved)
    assert torch.equal(out[..., 2 * R:], x[..., 2 * R:]), "channels past the rotary dim must pass through"


@pytest.mark.parametrize("shape", [(49, 16), (1, 49, 16), (2, 49, 16), (1, 3, 49, 16), (2, 1, 49, 16),
                                   (2, 3, 49, 16)], ids=lambda s: "x".join(map(str, s)))
def test_table_shapes(device, shape):
    x = make_x(2, 3, 49, 40, torch.float16, device)
    check_forward(x, make_angles(shape), interleaved=len(shape) % 2 == 1)


def test_fp16_tables(device):
    """Tables may be in x's dtype instead of float32."""
    x = make_x(1, 2, 49, 32, torch.float16, device)
    angles = make_angles((49, 16))
    cos, sin = tables(angles, device, torch.float16)
    out = dlcv_fast.apply_rope(x, cos, sin, backend="triton")
    golden = reference.apply_rope(x.cpu().double(), cos.cpu().double(), sin.cpu().double())
    assert_parity(out.cpu(), golden, reference.apply_rope(x.cpu(), cos.cpu(), sin.cpu()))


@pytest.mark.parametrize("config", [(16, 1, 4), (16, 3, 2), (64, 3, 4), (8, 1, 1)])
def test_kernel_configs(device, config):
    """Every (BLOCK_N, heads_per_program, num_warps) gives the same result as the heuristic choice."""
    x = make_x(2, 3, 37, 48, torch.float32, device)
    cos, sin = tables(make_angles((37, 20)), device)
    expected = rope_kernels.apply(x, cos, sin, interleaved=True)
    assert torch.equal(rope_kernels.apply(x, cos, sin, interleaved=True, config=config), expected)


def test_sequence_edge_lengths(device):
    for N in (1, 7):
        x = make_x(3, 1, N, 32, torch.float16, device)
        check_forward(x, make_angles((3, 1, N, 16)), interleaved=False)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


def golden_grads(x, cos, sin, grad, interleaved, wrt_tables):
    """Gradients of the reference by autograd, in float64 (golden) and in x's dtype (lp)."""
    results = []
    for dt in (torch.float64, x.dtype):
        xx = x.detach().cpu().to(dt).requires_grad_()
        tab_dt = torch.float64 if dt == torch.float64 else cos.dtype
        cc, ss = (t.detach().cpu().to(tab_dt).requires_grad_(wrt_tables) for t in (cos, sin))
        out = ref_rope(xx, cc, ss, interleaved)
        wrt = (xx, cc, ss) if wrt_tables else (xx,)
        results.append(torch.autograd.grad(out, wrt, grad.cpu().to(dt)))
    return results


@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("dtype,D,R", [(torch.float16, 64, 32), (torch.float16, 80, 24), (torch.float32, 128, 64)])
def test_backward(device, dtype, D, R, interleaved):
    N = 197
    x = make_x(2, 2, N, D, dtype, device).requires_grad_()
    cos, sin = tables(make_angles((N, R)), device)
    grad = make_x(2, 2, N, D, dtype, device, seed=5)
    out = dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved, backend="triton")
    (dx,) = torch.autograd.grad(out, x, grad)
    (golden,), (lp,) = golden_grads(x, cos, sin, grad, interleaved, wrt_tables=False)
    assert_parity(dx.cpu(), golden, lp, factor=3.0, name="dx")


def test_backward_is_inverse_rotation(device):
    """The backward kernel (sin negated) undoes the forward: rotations are orthogonal."""
    x = make_x(2, 2, 77, 64, torch.float32, device)
    cos, sin = tables(make_angles((77, 24)), device)
    for interleaved in (False, True):
        y = rope_kernels.apply(x, cos, sin, interleaved=interleaved)
        back = rope_kernels.apply(y, cos, sin, interleaved=interleaved, sin_sign=-1.0)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-5)


def test_backward_of_reduction(device):
    """out.sum() hands the backward an expanded (all zero-stride) gradient."""
    x = make_x(1, 2, 33, 32, torch.float32, device).requires_grad_()
    cos, sin = tables(make_angles((33, 16)), device)
    dlcv_fast.apply_rope(x, cos, sin, backend="triton").sum().backward()
    (golden,), (lp,) = golden_grads(x, cos, sin, torch.ones_like(x), False, wrt_tables=False)
    assert_parity(x.grad.cpu(), golden, lp, factor=3.0)


@pytest.mark.parametrize("shape", [(33, 12), (2, 33, 12), (1, 3, 33, 12)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("interleaved", LAYOUTS)
def test_table_grads(device, shape, interleaved):
    """Gradients reach cos and sin (learnable RoPE-Mixed frequencies), summed over broadcast dims."""
    x = make_x(2, 3, 33, 32, torch.float32, device).requires_grad_()
    cos, sin = (t.requires_grad_() for t in tables(make_angles(shape), device))
    grad = make_x(2, 3, 33, 32, torch.float32, device, seed=5)
    out = dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved, backend="triton")
    got = torch.autograd.grad(out, (x, cos, sin), grad)
    golden, lp = golden_grads(x, cos, sin, grad, interleaved, wrt_tables=True)
    for name, g, gg, gl in zip(("dx", "dcos", "dsin"), got, golden, lp):
        assert g.shape == gg.shape and g.dtype == (x.dtype if name == "dx" else cos.dtype)
        assert_parity(g.cpu(), gg, gl, factor=3.0, name=name)


# ------------------------------------------------------------------------------------------------
# In place, strided views
# ------------------------------------------------------------------------------------------------


def qkv_views(B, N, H, D, dtype, device):
    """q, k, v as the strided (B, H, N, D) views of a fused qkv Linear output (B, N, 3 * H * D)."""
    qkv = make_x(1, B, N, 3 * H * D, dtype, device)[0]
    return qkv, qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("interleaved", LAYOUTS)
def test_strided_views(device, interleaved):
    B, N, H, D, R = 2, 50, 3, 32, 12
    _, (q, _, _) = qkv_views(B, N, H, D, torch.float16, device)
    bnhd = make_x(B, N, H, D, torch.float16, device).transpose(1, 2)
    cos, sin = tables(make_angles((N, R)), device)
    for x in (q, bnhd):
        assert not x.is_contiguous()
        out = dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved, backend="triton")
        expected = dlcv_fast.apply_rope(x.contiguous(), cos, sin, interleaved=interleaved, backend="triton")
        assert torch.equal(out, expected)


@pytest.mark.parametrize("interleaved", LAYOUTS)
def test_inplace(device, interleaved):
    B, N, H, D, R = 2, 50, 2, 32, 12
    qkv, (q, k, v) = qkv_views(B, N, H, D, torch.float16, device)
    before = qkv.clone()
    cos, sin = tables(make_angles((N, R)), device)
    expected = dlcv_fast.apply_rope(q, cos, sin, interleaved=interleaved, backend="triton")
    out = dlcv_fast.apply_rope(q, cos, sin, interleaved=interleaved, inplace=True, backend="triton")
    assert out is q
    assert torch.equal(q, expected)
    untouched = before.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    assert torch.equal(k, untouched[1]) and torch.equal(v, untouched[2])
    assert torch.equal(q[..., 2 * R:], untouched[0][..., 2 * R:])


def test_inplace_rules(device):
    x = make_x(1, 2, 9, 16, torch.float32, device)
    cos, sin = tables(make_angles((9, 8)), device)
    with pytest.raises(RuntimeError, match="does not record autograd"):
        dlcv_fast.apply_rope(x.clone().requires_grad_(), cos, sin, inplace=True)
    with torch.no_grad():
        leaf = x.clone().requires_grad_()
        dlcv_fast.apply_rope(leaf, cos, sin, inplace=True, backend="triton")
        torch.testing.assert_close(leaf, reference.apply_rope(x, cos, sin))
    with pytest.raises(ValueError, match="overlapping"):
        dlcv_fast.apply_rope(x[:, :1].expand(1, 2, 9, 16), cos, sin, inplace=True)


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument
# ------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 3, 10, 16)
    cos = torch.randn(10, 8)
    return [
        ("odd rotary dim", lambda: dlcv_fast.rope_2d(4, 4, 30), ValueError, "multiple of 4"),
        ("odd rotary dim (module)", lambda: RotaryEmbedding2D(18), ValueError, "multiple of 4"),
        ("wrong length", lambda: dlcv_fast.apply_rope(x, torch.randn(11, 8), torch.randn(11, 8)), ValueError,
         "11 positions"),
        ("table float64", lambda: dlcv_fast.apply_rope(x, cos.double(), cos.double()), TypeError,
         "cos.dtype must be float32"),
        ("table int", lambda: dlcv_fast.apply_rope(x, cos.int(), cos.int()), TypeError, "cos.dtype"),
        ("cos/sin dtypes differ", lambda: dlcv_fast.apply_rope(x.half(), cos.half(), cos), TypeError,
         "same dtype"),
        ("x float64", lambda: dlcv_fast.apply_rope(x.double(), cos, cos), TypeError, "x.dtype"),
        ("rotary dim > D", lambda: dlcv_fast.apply_rope(x, torch.randn(10, 9), torch.randn(10, 9)), ValueError,
         "2R=18"),
        ("non-unit last stride", lambda: dlcv_fast.apply_rope(torch.randn(2, 3, 10, 32)[..., ::2], cos, cos),
         ValueError, "unit stride"),
        ("cos/sin shapes differ", lambda: dlcv_fast.apply_rope(x, cos, cos[None]), ValueError, "same shape"),
        ("batch mismatch", lambda: dlcv_fast.apply_rope(x, torch.randn(3, 10, 8), torch.randn(3, 10, 8)),
         ValueError, "batch size 3"),
        ("head mismatch", lambda: dlcv_fast.apply_rope(x, torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)),
         ValueError, "head count 2"),
        ("x not 4-D", lambda: dlcv_fast.apply_rope(x[0], cos, cos), ValueError, "4-D"),
        ("rope not a pair", lambda: dlcv_fast.attention(x, x, x, rope=(cos,)), TypeError, "pair"),
        ("mixed without freqs", lambda: dlcv_fast.rope_2d(4, 4, 16, mode="mixed"), TypeError, "needs freqs"),
        ("mixed freqs shape", lambda: dlcv_fast.rope_2d(4, 4, 16, mode="mixed", freqs=torch.randn(2, 3, 6)),
         ValueError, "freqs must be"),
        ("unknown mode", lambda: dlcv_fast.rope_2d(4, 4, 16, mode="spiral"), ValueError, "mode"),
        ("mixed module without heads", lambda: RotaryEmbedding2D(16, mode="mixed"), ValueError, "num_heads"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------------------------------
# attention(rope=...)
# ------------------------------------------------------------------------------------------------


def test_attention_with_rope(device):
    """attention(q, k, v, rope=(cos, sin)) equals apply_rope on q and k followed by attention, and the
    reference, forward and backward."""
    B, H, N, D = 1, 2, 50, 32
    dtype = torch.float16
    q, k, v = (make_x(B, H, N, D, dtype, device, seed=s).requires_grad_() for s in (0, 1, 2))
    cos, sin = dlcv_fast.rope_2d(7, 7, D, num_prefix_tokens=1, device=device)
    out = dlcv_fast.attention(q, k, v, rope=(cos, sin))
    unfused = dlcv_fast.attention(dlcv_fast.apply_rope(q, cos, sin), dlcv_fast.apply_rope(k, cos, sin), v)
    assert torch.equal(out, unfused)
    grad = make_x(B, H, N, D, dtype, device, seed=3)
    got = torch.autograd.grad(out, (q, k, v), grad)
    results = []
    for dt in (torch.float64, dtype):
        ins = [t.detach().cpu().to(dt).requires_grad_() for t in (q, k, v)]
        ref_out = reference.attention(*ins, rope=(cos.cpu(), sin.cpu()))
        results.append((ref_out, torch.autograd.grad(ref_out, ins, grad.cpu().to(dt))))
    (golden, golden_g), (lp, lp_g) = results
    assert_parity(out.cpu(), golden, lp, name="out")
    for name, g, gg, gl in zip(("dq", "dk", "dv"), got, golden_g, lp_g):
        assert_parity(g.cpu(), gg, gl, factor=3.0, name=name)


# ------------------------------------------------------------------------------------------------
# 2-D tables
# ------------------------------------------------------------------------------------------------


def ropevit_axial_cis(dim, grid_h, grid_w, theta):
    """RoPE-ViT's axial table as complex numbers: tokens row-major, x = t % W first, then y = t // W."""
    t = torch.arange(grid_h * grid_w, dtype=torch.float64)
    tx, ty = t % grid_w, torch.div(t, grid_w, rounding_mode="floor")
    f = 1.0 / theta ** (torch.arange(0, dim, 4, dtype=torch.float64)[: dim // 4] / dim)
    cis = [torch.polar(torch.ones(len(t), len(f), dtype=torch.float64), torch.outer(p, f)) for p in (tx, ty)]
    return torch.cat(cis, dim=-1)


def ropevit_apply(x, cis):
    """RoPE-ViT's application: adjacent channel pairs as complex numbers times the table."""
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(z * cis).flatten(-2)


def test_rope_2d_axial_matches_ropevit():
    grid_h, grid_w, dim = 5, 7, 32
    cos, sin = dlcv_fast.rope_2d(grid_h, grid_w, dim, num_prefix_tokens=2)
    assert cos.shape == sin.shape == (2 + grid_h * grid_w, dim // 2) and cos.dtype == torch.float32
    assert torch.equal(cos[:2], torch.ones(2, dim // 2)) and torch.equal(sin[:2], torch.zeros(2, dim // 2))
    cis = ropevit_axial_cis(dim, grid_h, grid_w, 100.0)
    torch.testing.assert_close(cos[2:].double(), cis.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[2:].double(), cis.imag, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["axial", "mixed"])
def test_prefix_tokens_unrotated(device, mode):
    """A ViT with a class token: token 0 passes through unchanged, the patches rotate as RoPE-ViT does on
    ``q[:, :, 1:]`` (interleaved pairs)."""
    grid_h, grid_w, H, D = 4, 6, 2, 32
    x = make_x(2, H, 1 + grid_h * grid_w, D, torch.float32, device)
    if mode == "axial":
        cos, sin = dlcv_fast.rope_2d(grid_h, grid_w, D, num_prefix_tokens=1, device=device)
        cis = ropevit_axial_cis(D, grid_h, grid_w, 100.0)
    else:
        freqs = init_mixed_freqs(D, H, generator=torch.Generator().manual_seed(0))
        cos, sin = dlcv_fast.rope_2d(grid_h, grid_w, D, mode="mixed", freqs=freqs.to(device), num_prefix_tokens=1)
        assert cos.shape == (1, H, 1 + grid_h * grid_w, D // 2)
        t = torch.arange(grid_h * grid_w, dtype=torch.float64)
        tx, ty = t % grid_w, torch.div(t, grid_w, rounding_mode="floor")
        angle = tx[:, None] * freqs[0].double()[:, None, :] + ty[:, None] * freqs[1].double()[:, None, :]
        cis = torch.polar(torch.ones_like(angle), angle)  # (H, N, R)
    out = dlcv_fast.apply_rope(x, cos, sin, interleaved=True, backend="triton").cpu()
    assert torch.equal(out[:, :, 0], x[:, :, 0].cpu())
    torch.testing.assert_close(out[:, :, 1:].double(), ropevit_apply(x[:, :, 1:].cpu(), cis), rtol=0, atol=1e-4)


@pytest.mark.parametrize("grid_indexing,ref_grid", [("xy", None), ("ij", None), ("ij", (16, 16))])
def test_rope_2d_axial_matches_timm(grid_indexing, ref_grid):
    """RoPE-ViT ("xy") and EVA-02 ("ij", ref_feat_shape rescaling) tables equal timm's."""
    sincos = pytest.importorskip("timm.layers.pos_embed_sincos")
    grid_h, grid_w, dim, theta = 6, 9, 64, 10000.0
    cos, sin = dlcv_fast.rope_2d(grid_h, grid_w, dim, theta=theta, grid_indexing=grid_indexing, ref_grid=ref_grid)
    t_sin, t_cos = sincos.build_rotary_pos_embed([grid_h, grid_w], dim=dim, temperature=theta, in_pixels=False,
                                                 grid_indexing=grid_indexing, ref_feat_shape=ref_grid)
    torch.testing.assert_close(cos.repeat_interleave(2, -1), t_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.repeat_interleave(2, -1), t_sin, rtol=0, atol=1e-5)


def test_mixed_freqs_match_timm():
    """init_mixed_freqs draws the same frequencies as timm's RoPE-Mixed, whose tables equal ours."""
    sincos = pytest.importorskip("timm.layers.pos_embed_sincos")
    dim, H, depth, grid_h, grid_w = 32, 3, 2, 5, 4
    ours = init_mixed_freqs(dim, H, depth=depth, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # timm draws from the global generator
    theirs = sincos.init_random_2d_freqs(dim, depth, H, temperature=10.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    cos, sin = dlcv_fast.rope_2d(grid_h, grid_w, dim, mode="mixed", freqs=ours)
    assert cos.shape == (depth, 1, H, grid_h * grid_w, dim // 2)
    t_x, t_y = sincos.get_mixed_grid([grid_h, grid_w], grid_indexing="xy")
    embed = sincos.get_mixed_freqs(ours, t_x, t_y)  # (depth, H, N, 4R): [sin, cos], each interleave-repeated
    t_sin, t_cos = embed.chunk(2, dim=-1)
    torch.testing.assert_close(cos[:, 0].repeat_interleave(2, -1), t_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[:, 0].repeat_interleave(2, -1), t_sin, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# RotaryEmbedding2D
# ------------------------------------------------------------------------------------------------


def test_module_axial():
    m = RotaryEmbedding2D(32, num_prefix_tokens=1)
    assert list(m.state_dict()) == []
    for got, want in zip(m(3, 5), dlcv_fast.rope_2d(3, 5, 32, num_prefix_tokens=1)):
        assert torch.equal(got, want)


def test_module_mixed_state_dict_matches_timm():
    sincos = pytest.importorskip("timm.layers.pos_embed_sincos")
    H, head_dim, depth = 3, 16, 2
    theirs = sincos.RotaryEmbeddingMixed(H * head_dim, depth=depth, num_heads=H)
    m = RotaryEmbedding2D(head_dim, mode="mixed", num_heads=H, depth=depth)
    m.load_state_dict(theirs.state_dict())
    cos, sin = m(4, 5)
    t_sin, t_cos = theirs.get_embed([4, 5]).chunk(2, dim=-1)
    torch.testing.assert_close(cos[:, 0].repeat_interleave(2, -1), t_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[:, 0].repeat_interleave(2, -1), t_sin, rtol=0, atol=1e-5)


def test_module_mixed_learns_freqs(device):
    """Gradients flow from apply_rope through the tables into the learnable frequencies."""
    H, D = 2, 16
    m = RotaryEmbedding2D(D, mode="mixed", num_heads=H, num_prefix_tokens=1).to(device)
    x = make_x(2, H, 1 + 3 * 4, D, torch.float32, device)
    grad = make_x(2, H, 1 + 3 * 4, D, torch.float32, device, seed=5)
    cos, sin = m(3, 4)
    (got,) = torch.autograd.grad(dlcv_fast.apply_rope(x, cos, sin, backend="triton"), m.freqs, grad)
    freqs = m.freqs.detach().cpu().double().requires_grad_()
    c, s = dlcv_fast.rope_2d(3, 4, D, mode="mixed", freqs=freqs, num_prefix_tokens=1, dtype=torch.float64)
    (want,) = torch.autograd.grad(ref_rope(x.cpu().double(), c, s, False), freqs, grad.cpu().double())
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Custom-op registration (torch.compile / fake tensors)
# ------------------------------------------------------------------------------------------------


def test_opcheck(device):
    x = make_x(1, 2, 5, 8, torch.float32, device)
    cos, sin = tables(make_angles((5, 3)), device)
    torch.library.opcheck(rope_ops.rope, (x.requires_grad_(), cos, sin, True, False, "auto"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(rope_ops.rope_, (x.detach().clone(), cos, sin, False, False, "auto"),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# GPU only: bf16 (garbage in the interpreter) and int64 offsets
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", LAYOUTS)
@pytest.mark.parametrize("D,R,N", [(64, 32, 197), (80, 40, 257), (128, 64, 4096), (128, 32, 1025)])
def test_bf16(D, R, N, interleaved):
    x = make_x(4, 6, N, D, torch.bfloat16, "cuda").requires_grad_()
    angles = make_angles((N, R))
    out = check_forward(x, angles, interleaved)
    grad = make_x(4, 6, N, D, torch.bfloat16, "cuda", seed=5)
    cos, sin = tables(angles, "cuda")
    out = dlcv_fast.apply_rope(x, cos, sin, interleaved=interleaved)
    (dx,) = torch.autograd.grad(out, x, grad)
    (golden,), (lp,) = golden_grads(x, cos, sin, grad, interleaved, wrt_tables=False)
    assert_parity(dx.cpu(), golden, lp, factor=3.0, name="dx")


@pytest.mark.gpu
def test_int64_offsets():
    """Element offsets past 2**31 (x has 2.15e9 elements): the last batch rotates correctly."""
    B, H, N, D = 1024, 16, 1025, 128
    x = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = tables(make_angles((N, 64)), "cuda")
    out = dlcv_fast.apply_rope(x, cos, sin)
    want = reference.apply_rope(x[-1:].double(), cos.double(), sin.double())
    assert_parity(out[-1:], want, reference.apply_rope(x[-1:], cos, sin))
