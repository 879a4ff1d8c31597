"""The attention op layer: input checks, backends, SDPA drop-in, custom-op registration, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import dlcv_fast
from dlcv_fast import reference
from dlcv_fast.ops import attention as ops


def qkv(B=2, Hq=2, Hkv=2, Lq=7, Lk=7, D=32, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, Lq, D, generator=g).to(device, dtype),
            torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype),
            torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype))


# ------------------------------------------------------------------------------------------------
# Bad inputs: each raises TypeError/ValueError naming the argument and what is allowed
# ------------------------------------------------------------------------------------------------

def bad_cases():
    q, k, v = qkv()
    cases = {
        "wrong dtype": (TypeError, r"q\.dtype must be one of float16, bfloat16, float32", (q.long(), k, v), {}),
        "float64": (TypeError, r"k\.dtype must be one of", (q, k.double(), v), {}),
        "mixed dtypes": (TypeError, r"v\.dtype \(torch\.float16\) must equal q\.dtype", (q, k, v.half()), {}),
        "not a tensor": (TypeError, r"k must be a torch\.Tensor", (q, k.tolist(), v), {}),
        "wrong rank": (ValueError, r"q must be 4-D \(B, Hq, Lq, D\)", (q[0], k, v), {}),
        "mismatched B": (ValueError, r"batch size 1 must equal q's batch size 2", (q, k[:1], v[:1]), {}),
        "mismatched D": (ValueError, r"head dim 16 must equal q's head dim 32", (q, k[..., :16], v[..., :16]), {}),
        "k/v shapes differ": (ValueError, r"k and v must have the same shape", (q, k, v[:, :, :3]), {}),
        "Hq not multiple of Hkv": (ValueError, r"Hq=3 must be a multiple of .* Hkv=2",
                                   (torch.randn(2, 3, 7, 32), k, v), {}),
        "head dim too large": (ValueError, r"head dim D=512 is not supported: allowed 1 <= D <= 256",
                               (torch.randn(1, 1, 4, 512),) * 3, {}),
        "head dim zero": (ValueError, r"head dim D=0 is not supported", (torch.randn(1, 1, 4, 0),) * 3, {}),
        "non-unit last stride": (ValueError, r"q must have a unit stride in its last \(head\) dim",
                                 (torch.randn(2, 2, 32, 7).transpose(-1, -2), k, v), {}),
        "mask wrong dtype": (TypeError, r"key_padding_mask must be a bool tensor", (q, k, v),
                             {"key_padding_mask": torch.ones(2, 7)}),
        "mask wrong shape": (ValueError, r"key_padding_mask must have shape \(B, Lk\) = \(2, 7\)", (q, k, v),
                             {"key_padding_mask": torch.ones(2, 8, dtype=torch.bool)}),
        "bias wrong dtype": (TypeError, r"attn_bias must be a floating-point tensor", (q, k, v),
                             {"attn_bias": torch.ones(7, 7, dtype=torch.bool)}),
        "bias wrong shape": (ValueError, r"attn_bias of shape \(3, 7\) does not broadcast", (q, k, v),
                             {"attn_bias": torch.zeros(3, 7)}),
        "negative prefix": (ValueError, r"prefix_len must be a non-negative int", (q, k, v), {"prefix_len": -1}),
        "bad backend": (ValueError, r"backend must be one of", (q, k, v), {"backend": "tpu"}),
    }
    return cases


@pytest.mark.parametrize("case", list(bad_cases()))
def test_bad_inputs_raise_clearly(case):
    exc, msg, args, kw = bad_cases()[case]
    with pytest.raises(exc, match=msg):
        dlcv_fast.attention(*args, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed devices need a CUDA device")
def test_mixed_devices_raise():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k is on cuda:0 but q is on cpu"):
        dlcv_fast.attention(q, k.cuda(), v)


def test_mixed_devices_raise_meta():
    """The same check without a GPU: a 'meta' tensor is another device."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v is on meta but q is on cpu"):
        dlcv_fast.attention(q, k, v.to("meta"))


def test_no_keys_gives_zeros():
    # No keys (Lk = 0): every row is fully masked, so the documented result is zeros with zero gradients.
    q = torch.randn(2, 2, 5, 32, requires_grad=True)
    k = torch.randn(2, 2, 0, 32, requires_grad=True)
    out = dlcv_fast.attention(q, k, k)
    assert out.shape == (2, 2, 5, 32) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_empty_batch_and_queries():
    for B, Lq in [(0, 7), (2, 0)]:
        q = torch.randn(B, 2, Lq, 32, requires_grad=True)
        k = torch.randn(B, 2, 7, 32)
        out = dlcv_fast.attention(q, k, k)
        assert out.shape == (B, 2, Lq, 32)
        out.sum().backward()
        assert q.grad.shape == q.shape


def test_nan_propagates_like_torch():
    q, k, v = qkv()
    q[0, 0, 3, 0] = float("nan")
    out = dlcv_fast.attention(q, k, v)
    assert out[0, 0, 3].isnan().all()
    out[0, 0, 3] = 0
    assert not out.isnan().any()


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------

def test_use_backend_torch_runs_the_reference(monkeypatch):
    q, k, v = qkv()
    calls = []
    real = reference.attention_with_lse
    monkeypatch.setattr(reference, "attention_with_lse", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with dlcv_fast.use_backend("torch"):
        assert dlcv_fast.get_backend() == "torch"
        out = dlcv_fast.attention(q, k, v)
    assert calls and dlcv_fast.get_backend() == "auto"
    torch.testing.assert_close(out, real(q, k, v)[0])
    calls.clear()
    dlcv_fast.attention(q, k, v, backend="torch")
    assert calls


def test_backend_errors(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        with dlcv_fast.use_backend("fast"):
            pass
    with pytest.raises(RuntimeError, match="backend 'cuda' needs CUDA tensors"):
        dlcv_fast.attention(q, k, v, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
        dlcv_fast.attention(q, k, v, backend="triton")
    # "auto" on CPU tensors without the interpreter is the reference.
    torch.testing.assert_close(dlcv_fast.attention(q, k, v), reference.attention(q, k, v))


def test_compiled_graph_follows_the_backend(monkeypatch):
    """torch.compile traces the backend choice without a graph break and recompiles when it changes (a stale
    graph would keep running the backend it was traced with)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    f = torch.compile(lambda q, k, v: dlcv_fast.attention(q, k, v) * 2, fullgraph=True, backend="eager")
    with dlcv_fast.use_backend("torch"):
        torch.testing.assert_close(f(q, k, v), 2 * reference.attention(q, k, v))
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
        with dlcv_fast.use_backend("triton"):
            f(q, k, v)
    assert dlcv_fast.get_backend() == "auto"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree(backend):
    q, k, v = qkv(Lq=49, Lk=49, D=40)
    kpm = torch.rand(2, 49, generator=torch.Generator().manual_seed(3)) > 0.2
    out = dlcv_fast.attention(q, k, v, causal=True, key_padding_mask=kpm, backend=backend)
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=True, key_padding_mask=kpm),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The reference itself
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"prefix_len": 2}, {"bias": True}, {"gqa": True}])
def test_reference_gradcheck(kw):
    kw = dict(kw)
    q, k, v = qkv(B=1, Hq=2, Hkv=1 if kw.pop("gqa", False) else 2, Lq=4, Lk=5, D=3, dtype=torch.float64)
    inputs = [q, k, v]
    if kw.pop("bias", False):
        inputs.append(torch.randn(1, 2, 4, 5, dtype=torch.float64))
    inputs = [t.requires_grad_() for t in inputs]
    kpm = torch.tensor([[True, False, True, True, True]])

    def f(*ts):
        return reference.attention(*ts[:3], attn_bias=ts[3] if len(ts) > 3 else None, key_padding_mask=kpm, **kw)

    assert torch.autograd.gradcheck(f, inputs)


def test_reference_prefix_mask_is_blip2():
    m = reference.attention_mask(5, 5, prefix_len=2)[0, 0]
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(m, expected)


# ------------------------------------------------------------------------------------------------
# SDPA drop-in
# ------------------------------------------------------------------------------------------------

def sdpa_cases():
    g = torch.Generator().manual_seed(5)
    B, H, L, S = 2, 4, 33, 41
    return {
        "plain": ({}, {}),
        "causal": ({"is_causal": True}, {}),
        "scale": ({"scale": 0.2}, {}),
        "bool 4-D": ({"attn_mask": torch.rand(B, H, L, S, generator=g) > 0.2}, {}),
        "bool key mask": ({"attn_mask": (torch.rand(B, 1, 1, S, generator=g) > 0.3)}, {}),
        "bool 2-D": ({"attn_mask": torch.rand(L, S, generator=g) > 0.2}, {}),
        "float": ({"attn_mask": torch.randn(1, H, L, S, generator=g)}, {}),
        "gqa": ({"enable_gqa": True}, {"Hkv": 2}),
        "3-D": ({}, {"three_d": True}),
        # 3-D inputs broadcast a mask against (N, L, S): its first dim is the batch (found by fuzzing: it was
        # taken as the head dim)
        "3-D, bool (N, L, S)": ({"attn_mask": torch.rand(B, L, S, generator=g) > 0.2}, {"three_d": True}),
        "3-D, float (N, 1, S)": ({"attn_mask": torch.randn(B, 1, S, generator=g)}, {"three_d": True}),
        "3-D, bool (1, 1, L, S)": ({"attn_mask": torch.rand(1, 1, L, S, generator=g) > 0.2}, {"three_d": True}),
    }


@pytest.mark.parametrize("case", list(sdpa_cases()))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sdpa_matches_torch(case, backend):
    kw, shape = sdpa_cases()[case]
    Hkv = shape.get("Hkv", 4)
    q, k, v = qkv(B=2, Hq=4, Hkv=Hkv, Lq=33, Lk=41, D=32)
    if shape.get("three_d"):
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    with dlcv_fast.use_backend(backend):
        out = dlcv_fast.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_sdpa_rejections():
    q, k, v = qkv(Hq=4, Hkv=2)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        dlcv_fast.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        dlcv_fast.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="cannot both be set"):
        dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.bool),
                                               is_causal=True, enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be bool or floating point"):
        dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.int32),
                                               enable_gqa=True)
    with pytest.raises(ValueError, match="must broadcast to"):
        dlcv_fast.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], attn_mask=torch.zeros(2, 1, 7, 7))


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    q, k, v = (t.requires_grad_() for t in qkv(Lq=9, Lk=11, D=16))
    bias = torch.randn(1, 2, 9, 11, requires_grad=True) if with_bias else None
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[1, 7:] = False
    torch.library.opcheck(ops.attention_fwd, (q, k, v, bias, kpm, True, 0, 0.25, None, None, "torch"))
    torch.library.opcheck(ops.attention_fwd, (q, k, v, bias, None, False, 0, 0.25, None, None, "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_fused_rope():
    q, k, v = (t.requires_grad_() for t in qkv(Lq=9, Lk=9, D=16))
    angles = torch.randn(9, 6)
    for backend in ("torch", "triton"):
        torch.library.opcheck(ops.attention_fwd,
                              (q, k, v, None, None, True, 0, 0.25, angles.cos(), angles.sin(), backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in qkv(Lq=17, Lk=17, D=32))
    bias = torch.randn(1, 2, 17, 17, requires_grad=True)

    def f(q, k, v, bias):
        return dlcv_fast.attention(q * 2, k, v, causal=True, attn_bias=bias).sum(dim=-1)

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = compiled(q, k, v, bias)
    expected = f(q, k, v, bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(out.sum(), (q, k, v, bias))
    g2 = torch.autograd.grad(expected.sum(), (q, k, v, bias))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"causal": True, "bias": True}, {"prefix_len": 3, "gqa": True}])
def test_reference_backward_matches_autograd(kw):
    kw = dict(kw)
    q, k, v = qkv(B=2, Hq=4, Hkv=2 if kw.pop("gqa", False) else 4, Lq=6, Lk=9, D=8, dtype=torch.float64)
    bias = torch.randn(2, 1, 6, 9, dtype=torch.float64, requires_grad=True) if kw.pop("bias", False) else None
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, :] = False  # batch 1 fully masked
    ins = [t.requires_grad_() for t in (q, k, v)]
    out = reference.attention(*ins, attn_bias=bias, key_padding_mask=kpm, **kw)
    do = torch.randn_like(out)
    wrt = ins + ([bias] if bias is not None else [])
    expected = torch.autograd.grad(out, wrt, do)
    dq, dk, dv, ds = reference.attention_backward(do, q, k, v, attn_bias=bias, key_padding_mask=kpm, **kw)
    for a, b in zip((dq, dk, dv, ds.sum(1, keepdim=True)), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_q_k_v_like_sdpa(backend):
    """Under autocast q, k and v run in the autocast dtype, as in torch's SDPA (an autocast lower-precision op):
    timm's qk_norm under CUDA autocast hands over float32 q, k and a half-precision v. fp16 (bf16 is garbage in the
    interpreter); outside autocast the same mixed dtypes are rejected."""
    q, k = torch.randn(2, 2, 7, 16), torch.randn(2, 2, 9, 16)
    v = torch.randn(2, 2, 9, 16).half()
    with torch.autocast("cpu", dtype=torch.float16):
        out = dlcv_fast.attention(q, k, v, backend=backend)
        sdpa = dlcv_fast.scaled_dot_product_attention(q, k, v)
        expected = F.scaled_dot_product_attention(q, k, v.float())
    assert out.dtype == sdpa.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(out, dlcv_fast.attention(q.half(), k.half(), v, backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-3, atol=2e-3)
    with pytest.raises(TypeError, match="mixed dtypes"):
        dlcv_fast.attention(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_finfo_min_bias_masks_keys(backend):
    """A bias written with finfo(float32).min (Hugging Face's masks) masks its keys in every backend: rows with
    some kept keys equal torch's SDPA, a row whose every key has it is fully masked (zeros). The reference used to
    lose the row's log(n) there and return n times the mean of v."""
    q, k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    bias = torch.zeros(2, 1, 5, 6)
    bias[0, :, :, 4:] = torch.finfo(torch.float32).min  # batch 0: the last two keys masked for every query
    bias[1, :, 2] = torch.finfo(torch.float32).min  # batch 1: query 2 sees no key
    out = dlcv_fast.attention(q, k, v, attn_bias=bias, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :, [0, 1, 3, 4]], expected[1, :, [0, 1, 3, 4]], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_and_negative_scales(scale, backend):
    """scale = 0 (uniform attention) and a negative scale match the reference, forward and backward (the kernels
    fold only a positive scale into the exponent; these go through q). They used to give NaN."""
    q, k, v = (torch.randn(1, 2, 7, 16, requires_grad=True) for _ in range(3))
    out = dlcv_fast.attention(q, k, v, scale=scale, causal=True, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    golden = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference.attention(*golden, scale=scale, causal=True)
    expected_grads = torch.autograd.grad(expected.sum(), golden)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        dlcv_fast.attention(q, k, v, scale=float("nan"))


@pytest.mark.parametrize("shape", [(), (1, 2, 1, 1), (2, 1, 9, 1), (9, 1)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_constant_along_the_keys_has_zero_gradient(shape, backend):
    """A bias constant along the keys shifts whole rows, which softmax ignores: its gradient is exactly zero (the
    kernel's sum of dS over the keys gave rounding noise above the reference's error; found by fuzzing)."""
    q, k, v = (torch.randn(2, 2, 9, 16).half().requires_grad_() for _ in range(3))
    bias = torch.randn(shape).half().requires_grad_()
    out = dlcv_fast.attention(q, k, v, attn_bias=bias, backend=backend)
    dq, dbias = torch.autograd.grad(out, (q, bias), torch.randn_like(out))
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype and not dbias.any()
    assert dq.abs().sum() > 0
