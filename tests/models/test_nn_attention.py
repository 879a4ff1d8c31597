"""dlcv_fast.nn.Attention / CrossAttention: timm key and output parity, and the one-row attention maps.

"triton" runs our kernels (through Triton's interpreter on a CPU-only machine, so the shapes are small);
"torch" runs the reference backend.
"""
import pytest
import torch
from timm.layers import Attention as TimmAttention

import dlcv_fast
from dlcv_fast.nn import Attention, CrossAttention
from tests.parity import assert_parity

BACKENDS = ["torch", "triton"]


def _on(backend, device):
    return "cpu" if backend == "torch" else device


def explicit_probs(q, k, scale, *, causal=False, key_padding_mask=None, attn_bias=None):
    """softmax(scale * q k^T + bias) with masked keys at -inf, the N x N matrix, in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.double()
    Lq, Lk = s.shape[-2:]
    if causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return s.softmax(dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_matches_timm(backend, qk_norm, device):
    dev = _on(backend, device)
    torch.manual_seed(0)
    ref = TimmAttention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).to(dev)
    ours = Attention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm).to(dev)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 49, 64, device=dev)
    with dlcv_fast.use_backend(backend):
        out = ours(x)
    ref64 = TimmAttention(64, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).double()
    ref64.load_state_dict(ref.state_dict())
    assert_parity(out.detach().cpu(), ref64(x.double().cpu()).detach(), ref(x).detach().cpu(), atol=1e-7)


MAP_CASES = ["plain", "causal", "padding", "bias"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MAP_CASES)
def test_attention_map_is_the_softmax_row(backend, case, device):
    """forward_with_attn_map's row (from the kernel's lse) equals row i of the explicit softmax(QK^T * scale)."""
    dev = _on(backend, device)
    torch.manual_seed(1)
    B, N, dim, H = 2, 23, 64, 4
    attn = Attention(dim, num_heads=H, qkv_bias=True).to(dev)
    x = torch.randn(B, N, dim, device=dev)
    kw = {}
    if case == "causal":
        kw["causal"] = True
    if case == "padding":
        kw["key_padding_mask"] = torch.arange(N, device=dev)[None] < torch.tensor([[N], [N - 9]], device=dev)
    if case == "bias":
        kw["attn_bias"] = torch.randn(1, H, N, N, device=dev)
    q, k, _ = attn._qkv(x)
    probs = explicit_probs(q, k, attn.scale, **kw)
    with dlcv_fast.use_backend(backend), torch.no_grad():
        out, row = attn.forward_with_attn_map(x, query_index=5, **kw)
        torch.testing.assert_close(out, attn(x, **kw))
    assert row.shape == (B, H, N)
    torch.testing.assert_close(row.double(), probs[:, :, 5], atol=1e-6, rtol=1e-5)


def test_attention_map_with_rope():
    torch.manual_seed(2)
    B, N, dim, H = 2, 17, 64, 4
    attn = Attention(dim, num_heads=H, qkv_bias=True)
    x = torch.randn(B, N, dim)
    cos, sin = dlcv_fast.rope_2d(4, 4, dim // H, num_prefix_tokens=1)
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        out, row = attn.forward_with_attn_map(x, rope=(cos, sin))
        torch.testing.assert_close(out, attn(x, rope=(cos, sin)))
        q, k, _ = attn._qkv(x)
        q, k = dlcv_fast.apply_rope(q, cos, sin), dlcv_fast.apply_rope(k, cos, sin)
    torch.testing.assert_close(row.double(), explicit_probs(q, k, attn.scale)[:, :, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention(backend, device):
    dev = _on(backend, device)
    torch.manual_seed(3)
    B, Lq, Lk, dim, cdim, H = 2, 5, 19, 64, 48, 4
    ca = CrossAttention(dim, num_heads=H, context_dim=cdim, qkv_bias=True, qk_norm=True).to(dev)
    x, ctx = torch.randn(B, Lq, dim, device=dev), torch.randn(B, Lk, cdim, device=dev)
    kpm = torch.arange(Lk, device=dev)[None] < torch.tensor([[Lk], [11]], device=dev)
    with dlcv_fast.use_backend(backend), torch.no_grad():
        out, row = ca.forward_with_attn_map(x, ctx, query_index=-1, key_padding_mask=kpm)
        q, k, v = ca._qkv(x, ctx)
    probs = explicit_probs(q, k, ca.scale, key_padding_mask=kpm)
    expected = ca.proj((probs @ v.double()).float().transpose(1, 2).reshape(B, Lq, dim))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row.double(), probs[:, :, -1], atol=1e-6, rtol=1e-5)
    assert set(ca.state_dict()) == {"q.weight", "q.bias", "kv.weight", "kv.bias", "q_norm.weight", "q_norm.bias",
                                    "k_norm.weight", "k_norm.bias", "proj.weight", "proj.bias"}
