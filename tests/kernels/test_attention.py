"""Parity, masking, layout and robustness tests of the Triton flash-attention kernels.

On a machine without CUDA these run through Triton's interpreter (fp32 and fp16); bf16 and large
shapes are marked ``gpu``. Every parity check uses the rule in tests/parity.py: kernel error at most
2x (3x for gradients) the error of the same reference computed in the input dtype, against float64.
"""
import pytest
import torch

import dlcv_fast
from dlcv_fast import reference
from tests.kernels.launch_spy import LaunchSpy
from tests.parity import assert_parity

FP = [torch.float32, torch.float16]


def make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def make_mask_args(kind, B, Hq, Lq, Lk, dtype, device, seed=1):
    """Keyword arguments of attention() for a named mask kind."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if "causal" in kind:
        kw["causal"] = True
    if "padding" in kind:
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        lengths[0] = Lk
        kw["key_padding_mask"] = (torch.arange(Lk)[None, :] < lengths[:, None]).to(device)
    if "leftpad" in kind:  # padding in front (left-padded batches): whole leading key blocks are skipped
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        lengths[0], lengths[1] = Lk, min(Lk, 9)
        kw["key_padding_mask"] = (torch.arange(Lk)[None, :] >= (Lk - lengths)[:, None]).to(device)
    if "holes" in kind:  # an arbitrary (non-suffix) key mask, with one key block fully removed
        m = torch.rand(B, Lk, generator=g) > 0.3
        m[:, 32:64] = False
        m[:, 0] = True
        kw["key_padding_mask"] = m.to(device)
    if "prefix" in kind:
        kw["prefix_len"] = max(1, Lk // 3)
    if "bias" in kind:
        shape = {"bias": (1, Hq, Lq, Lk), "bias_b": (B, 1, 1, Lk), "bias_full": (B, Hq, Lq, Lk)}[kind.split("+")[-1]]
        kw["attn_bias"] = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    return kw


def kernel_args(q, k, v, kw, D):
    """The positional arguments of the kernel launchers (forward(), and backward() after do, o, lse) for
    make_mask_args' keywords."""
    return (q, k, v, kw.get("attn_bias"), kw.get("key_padding_mask"), kw.get("causal", False),
            kw.get("prefix_len", 0), D ** -0.5)


def kernel_backward_case(q, k, v, kw, D):
    """``(args, o, lse, do, bias_grad)``: the launchers' arguments, the kernel forward's output and lse, and a
    dO drawn from its own seeded generator, for tests that compare backward() variants."""
    from dlcv_fast.kernels import attention as A

    args = kernel_args(q, k, v, kw, D)
    o, lse = A.forward(*args)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(o.device, o.dtype)
    return args, o, lse, do, kw.get("attn_bias") is not None


def golden_and_lp(q, k, v, kw, do):
    """Outputs and gradients of the reference in float64 (golden) and in the input dtype (lp)."""
    results = []
    for dt in (torch.float64, q.dtype):
        ins = [t.detach().cpu().to(dt).requires_grad_() for t in (q, k, v)]
        kw_dt = dict(kw)
        bias = kw.get("attn_bias")
        if bias is not None:
            kw_dt["attn_bias"] = bias.detach().cpu().to(dt).requires_grad_()
        if kw.get("key_padding_mask") is not None:
            kw_dt["key_padding_mask"] = kw["key_padding_mask"].cpu()
        out = reference.attention(*ins, **kw_dt)
        wrt = ins + ([kw_dt["attn_bias"]] if bias is not None else [])
        grads = torch.autograd.grad(out, wrt, do.cpu().to(dt))
        results.append((out, grads))
    return results


def check_parity(q, k, v, kw, *, backward=True):
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = dlcv_fast.attention(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    do = torch.randn_like(out)
    (g_out, g_grads), (lp_out, lp_grads) = golden_and_lp(q, k, v, kw, do)
    assert_parity(out.cpu(), g_out, lp_out, name="out")
    if not backward:
        return
    bias = kw.get("attn_bias")
    wrt = [q, k, v] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out, wrt, do)
    for name, gr, gg, gl in zip(["dq", "dk", "dv", "dbias"], grads, g_grads, lp_grads):
        assert gr.shape == gg.shape, name
        assert_parity(gr.cpu(), gg, gl, factor=3.0, name=name)


# Every seqlen and head dim of the matrix appears; each row is (Lq, Lk, D).
SHAPES = [(1, 1, 32), (7, 7, 40), (49, 49, 64), (77, 77, 72), (97, 97, 80), (197, 197, 128), (257, 257, 160),
          (1, 77, 64), (32, 257, 64), (257, 32, 40), (97, 49, 32), (49, 97, 128)]


@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("Lq,Lk,D", SHAPES)
def test_parity_shapes(Lq, Lk, D, dtype, device):
    q, k, v = make_inputs(2, 3, 3, Lq, Lk, D, dtype, device)  # B*H = 6: not a multiple of any block
    check_parity(q, k, v, {})


MASKS = ["causal", "padding", "leftpad", "holes", "prefix", "bias", "bias_b", "bias_full", "causal+padding",
         "prefix+padding", "causal+padding+bias", "causal+leftpad"]


@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("Lq,Lk", [(77, 77), (49, 97), (97, 49)])
def test_parity_masks(kind, Lq, Lk, dtype, device):
    B, H, D = 3, 2, 64
    q, k, v = make_inputs(B, H, H, Lq, Lk, D, dtype, device)
    check_parity(q, k, v, make_mask_args(kind, B, H, Lq, Lk, dtype, device))


@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("kind", ["none", "causal+padding"])
def test_parity_gqa(Hq, Hkv, kind, dtype, device):
    B, L, D = 2, 97, 40
    q, k, v = make_inputs(B, Hq, Hkv, L, L, D, dtype, device)
    check_parity(q, k, v, make_mask_args(kind, B, Hq, L, L, dtype, device))


@pytest.mark.parametrize("dtype", FP, ids=str)
def test_fused_qkv_view_needs_no_copy(dtype, device):
    """A (B, N, 3, H, D) qkv Linear output permuted to (B, H, N, D) views is used as is."""
    B, N, H, D = 2, 77, 3, 40
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype, device=device)
    q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous() and q.stride(-1) == 1
    check_parity(q, k, v, {"causal": True})
    out = dlcv_fast.attention(q, k, v)
    merged = out.transpose(1, 2).reshape(B, N, H * D)  # free: out is a view of a (B, N, H, D) buffer
    assert merged.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("dtype", FP, ids=str)
def test_strides_not_multiple_of_8(dtype, device):
    """Rows 43 elements apart (no 16-byte alignment): the launcher must not promise aligned strides
    (ALIGN8), and the kernel still reads the right elements, forward and backward."""
    from dlcv_fast.kernels.attention import _strides_align8

    B, H, L, D = 2, 2, 50, 40
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, L, 43, generator=g).to(device=device, dtype=dtype)[..., :D] for _ in range(3))
    assert not _strides_align8(q, k, v)
    check_parity(q, k, v, {"causal": True})


def test_custom_scale(device):
    q, k, v = make_inputs(1, 2, 2, 49, 49, 32, torch.float32, device)
    ref = reference.attention(q.double(), k.double(), v.double(), scale=0.3)
    torch.testing.assert_close(dlcv_fast.attention(q, k, v, scale=0.3).double(), ref, atol=1e-5, rtol=1e-5)


def test_out_of_bounds_reads_are_masked(device):
    """Inputs inside larger NaN-filled buffers (every neighbour of every row and column is NaN)."""
    B, H, Lq, Lk, D = 2, 2, 49, 77, 40

    def nan_framed(L):
        buf = torch.full((B, H, L + 9, 64), float("nan"), device=device)
        t = buf[:, :, 4:4 + L, 8:8 + D]
        t.copy_(torch.randn(B, H, L, D))
        return t

    q, k, v = nan_framed(Lq), nan_framed(Lk), nan_framed(Lk)
    kw = make_mask_args("causal+padding+bias", B, H, Lq, Lk, torch.float32, device)
    check_parity(q, k, v, kw)


def test_fully_masked_rows_give_zeros_and_zero_grads(device):
    B, H, L, D = 2, 2, 49, 32
    q, k, v = (t.requires_grad_() for t in make_inputs(B, H, H, L, L, D, torch.float32, device))
    kpm = torch.ones(B, L, dtype=torch.bool, device=device)
    kpm[1] = False  # batch 1: every key removed
    bias = torch.zeros(1, 1, L, L, device=device)
    bias[..., 5, :] = float("-inf")  # row 5 of every batch removed by the bias
    out = dlcv_fast.attention(q, k, v, key_padding_mask=kpm, attn_bias=bias)
    assert not out.isnan().any()
    assert (out[1] == 0).all() and (out[0, :, 5] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert (q.grad[0, :, 5] == 0).all()
    # The rows that are not masked are still right.
    ref = reference.attention(q.double(), k.double(), v.double(), key_padding_mask=kpm, attn_bias=bias.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Lk,D,seed", [(2, 72, 0), (5, 32, 1), (17, 128, 2), (40, 64, 4)])
def test_bias_gradient_of_short_key_ranges(Lk, D, seed, device, monkeypatch):
    """Two queries, a full fp16 bias that needs its gradient: when every key fits one key-major key block the
    backward takes the key-major tiles, whose dQ and delta come from the tile (rowsum(P dP) / rowsum(P)), not
    from rowsum(dO * O) with O rounded to fp16. With the query-major tiles the first case's bias gradient was
    3.1e-3 off against 2.4e-3 allowed (3x PyTorch's own error); the random-shape sweep found it."""
    from dlcv_fast.kernels import attention as A

    chosen = []
    policy = A._bias_grad_in_one_block
    monkeypatch.setattr(A, "_bias_grad_in_one_block", lambda *a: chosen.append(policy(*a)) or chosen[-1])
    dq_kernel = LaunchSpy(A._attn_bwd_dq)
    monkeypatch.setattr(A, "_attn_bwd_dq", dq_kernel)
    q, k, v = make_inputs(2, 2, 2, 2, Lk, D, torch.float16, device, seed=seed)
    kw = make_mask_args("bias_full", 2, 2, 2, Lk, torch.float16, device, seed=seed)
    torch.manual_seed(seed)
    check_parity(q, k, v, kw)
    one_block = Lk <= A.bwd_configs(A.padded_head_dim(D), torch.float16, "bias", key_major=True)[0][1]
    assert chosen == [one_block]
    assert dq_kernel.launches == (0 if one_block else 1)  # one block: dQ written by the key-major dK/dV kernel
    assert not A._bias_grad_in_one_block(False, torch.float16, 64, "bias", False, 2)  # no bias gradient
    assert not A._bias_grad_in_one_block(True, torch.float32, 64, "bias", False, 2)  # fp32: O is not rounded


@pytest.mark.parametrize("kind", ["none", "causal+padding", "prefix", "bias"])
def test_backward_query_splits(kind, device, monkeypatch):
    """With few key blocks (a short key side: U-Net cross-attention's Lk = 77) the dK/dV kernel splits each
    key block's queries over several programs and sums their fp32 partials: same gradients (GQA too)."""
    from dlcv_fast.kernels import attention as A

    used = []
    real = A._query_splits
    monkeypatch.setattr(A, "_query_splits", lambda *a: used.append(real(*a)) or 3)
    q, k, v = make_inputs(2, 4, 2, 161, 40, 32, torch.float32, device)
    check_parity(q, k, v, make_mask_args(kind, 2, 4, 161, 40, torch.float32, device))
    assert used, "the backward launcher did not run"


def test_query_split_choice(monkeypatch):
    from dlcv_fast.kernels import attention as A

    monkeypatch.setattr(A, "_sm_count", lambda: 132)
    assert A._query_splits(2, 64, 4096, 64) == 2  # U-Net cross: 128 programs -> 2 splits (one wave, 256)
    assert A._query_splits(2, 8, 4096, 64) == 9  # 16 programs -> 9 splits (144)
    assert A._query_splits(2, 8, 1024, 64) == 4  # capped at 4 query blocks per split
    assert A._query_splits(64, 64, 4096, 64) == 1  # enough programs already
    assert A._query_splits(2, 8, 100, 64) == 1  # too few query blocks to split


@pytest.mark.parametrize("kind", ["none", "causal+padding+bias", "leftpad", "prefix"])
@pytest.mark.parametrize("Lq,Lk", [(40, 7), (77, 77), (33, 197)])
def test_key_tail_block(kind, Lq, Lk, device, monkeypatch):
    """The 16-key tail block of the forward and the dQ kernel (TAIL_N: taken when a few keys follow the last
    whole key block, as at ViT's 197 and CLIP's 77) and the ordinary masked last block both match the
    reference, outputs and gradients."""
    from dlcv_fast.kernels import attention as A

    q, k, v = make_inputs(2, 2, 2, Lq, Lk, 64, torch.float32, device)
    kw = make_mask_args(kind, 2, 2, Lq, Lk, torch.float32, device)
    for tail in (0, A.TAIL_N):
        monkeypatch.setattr(A, "key_tail", lambda *a, t=tail: t)
        check_parity(q, k, v, kw)


@pytest.mark.parametrize("kind", ["none", "causal+padding+bias_b", "leftpad", "prefix", "holes"])
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D", [(2, 2, 77, 77, 40), (4, 2, 50, 97, 72), (2, 1, 1, 70, 128),
                                            (2, 2, 65, 64, 64)], ids=str)
def test_kv_tma_forward_equals_pointer_loads(kind, Hq, Hkv, Lq, Lk, D, device):
    """K/V through TMA tensor descriptors (kv_tma; by default for long plain attention): rows past Lk and
    head-dim columns past D arrive as zeros instead of clamped or masked loads, which masked keys never use, so
    outputs and lse equal the pointer path's (no tail block) bit for bit: every mask, GQA, Lq = 1, head dims
    40/72/128."""
    from dlcv_fast.kernels import attention as A

    q, k, v = make_inputs(2, Hq, Hkv, Lq, Lk, D, torch.float16, device)
    kw = make_mask_args(kind, 2, Hq, Lq, Lk, torch.float16, device) if kind != "none" else {}
    args = kernel_args(q, k, v, kw, D)
    o_ptr, lse_ptr = A.forward(*args, tail=0, kv_tma=False)
    o_tma, lse_tma = A.forward(*args, kv_tma=True)
    assert torch.equal(o_ptr, o_tma) and torch.equal(lse_ptr, lse_tma)


def test_kv_tma_on_strided_views_and_its_limits(device, monkeypatch):
    """A fused qkv view (B, N, 3, H, D) permuted to (B, H, N, D) takes TMA descriptors without a copy; tensors
    whose strides are not multiples of 16 bytes, or fp32, fall back to pointer loads when TMA is on by default
    and raise when it is asked for explicitly."""
    from dlcv_fast.kernels import attention as A

    qkv = torch.randn(2, 49, 3, 2, 40, generator=torch.Generator().manual_seed(3)).half().to(device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert A._tma_ready(k) and A._use_tma("kv_tma", True, False, k, v)
    o_ptr = A.forward(q, k, v, None, None, True, 0, 0.2, tail=0)[0]
    assert torch.equal(o_ptr, A.forward(q, k, v, None, None, True, 0, 0.2, kv_tma=True)[0])
    odd = torch.randn(1, 2, 9, 44, device=device).half()[..., :36]  # rows 88 bytes apart
    assert not A._tma_ready(odd)
    assert not A._use_tma("kv_tma", None, True, odd, odd) and not A._use_tma("kv_tma", False, True, k, v)
    monkeypatch.setattr(A, "KV_TMA", True)
    assert torch.equal(A.forward(odd, odd, odd, None, None, False, 0, 0.2)[0],
                       A.forward(odd, odd, odd, None, None, False, 0, 0.2, kv_tma=False)[0])
    with pytest.raises(ValueError, match="kv_tma=True.*16 bytes"):
        A.forward(odd, odd, odd, None, None, False, 0, 0.2, kv_tma=True)
    wide = torch.randn(1, 1, 8, 160, device=device).half()
    assert not A._use_tma("kv_tma", None, True, wide, wide)
    with pytest.raises(ValueError, match="kv_tma=True.*head dim 160"):
        A.forward(wide, wide, wide, None, None, False, 0, 0.2, kv_tma=True)
    with pytest.raises(ValueError, match="tma=True.*fp16 and bf16"):
        A.backward(q.float(), q.float(), k.float(), v.float(), o_ptr.float(), None, None, None, False, 0, 0.2,
                   False, tma=True)
    with pytest.raises(ValueError, match="no tail block"):
        A.forward(q, k, v, None, None, False, 0, 0.2, kv_tma=True, tail=16)


def test_tma_default_policy(device, monkeypatch):
    """With KV_TMA / BWD_TMA left at None the launchers default to TMA loads only where an H200 ran them
    faster: no bias, padded head dim 64 or 128, both lengths at least TMA_MIN_LEN, no tail block; True /
    False force them. The forward and backward pass that default on to _use_tma."""
    from dlcv_fast.kernels import attention as A

    assert A.KV_TMA is None and A.BWD_TMA is None
    pick = A._tma_by_default
    assert pick(None, "plain", 64, 4096, 4096, 0) and pick(None, "plain", 128, A.TMA_MIN_LEN, A.TMA_MIN_LEN, 0)
    assert not pick(None, "bias", 64, 4096, 4096, 0)
    assert not pick(None, "plain", 64, 4096, 4096, A.TAIL_N)
    assert not pick(None, "plain", 32, 4096, 4096, 0) and not pick(None, "plain", 256, 4096, 4096, 0)
    assert not pick(None, "plain", 64, 197, 197, 0) and not pick(None, "plain", 64, 4096, 77, 0)
    assert pick(True, "bias", 32, 1, 1, A.TAIL_N) and not pick(False, "plain", 64, 4096, 4096, 0)

    class Stop(Exception):
        pass

    seen = []

    def spy(name, requested, default, *tensors):
        seen.append((name, default))
        raise Stop

    monkeypatch.setattr(A, "_use_tma", spy)
    for L, D, expect in ((1024, 64, True), (1024, 40, True), (1024, 32, False), (1000, 64, False)):
        q = torch.randn(1, 2, L, D, device=device).half()
        for call in (lambda: A.forward(q, q, q, None, None, True, 0, 0.1),
                     lambda: A.backward(q, q, q, q, q, torch.zeros(1, 2, L, device=device), None, None, True, 0,
                                        0.1, False)):
            with pytest.raises(Stop):
                call()
            assert seen.pop()[1] is expect, (L, D)
        with pytest.raises(Stop):
            A.forward(q, q, q, torch.zeros(L, L, device=device).half(), None, False, 0, 0.1)
        assert seen.pop()[1] is False


@pytest.mark.parametrize("kind", ["none", "causal+padding+bias", "leftpad", "prefix"])
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D", [(2, 2, 77, 77, 40), (4, 2, 50, 97, 72), (2, 1, 1, 70, 128)], ids=str)
def test_tma_backward_equals_pointer_loads(kind, Hq, Hkv, Lq, Lk, D, device, monkeypatch):
    """The backward with Q/dO (dK/dV kernel) and K/V (dQ kernel) through TMA descriptors (tma; by default for long
    plain attention)
    gives the pointer path's gradients (no tail block) bit for bit: zeros out of bounds where the pointer
    loads were masked."""
    from dlcv_fast.kernels import attention as A

    q, k, v = make_inputs(2, Hq, Hkv, Lq, Lk, D, torch.float16, device)
    kw = make_mask_args(kind, 2, Hq, Lq, Lk, torch.float16, device) if kind != "none" else {}
    args, o, lse, do, bias_grad = kernel_backward_case(q, k, v, kw, D)
    ptr = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, tma=False)
    for splits in (None, 2):  # the dK/dV kernel's query split too
        with monkeypatch.context() as m:  # the pointer path's dQ kernel without its tail block, as with TMA
            m.setattr(A, "key_tail", lambda *a: 0)
            ref = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, tma=False, splits=splits)
        got = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, tma=True, splits=splits)
        for name, a, b in zip(("dq", "dk", "dv", "ds"), got, ref):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    for a, b in zip(ptr[:3], got[:3]):  # and with the tail block: equal up to rounding
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_key_tail_choice():
    from dlcv_fast.kernels import attention as A

    assert [A.key_tail(L, 64, 64) for L in (197, 77, 257, 7)] == [16] * 4  # ViT, CLIP / U-Net cross, Q-Former
    assert [A.key_tail(L, 64, 64) for L in (4096, 49, 96, 64)] == [0] * 4  # whole blocks, or a long tail
    assert A.key_tail(197, 64, 256) == 0 and A.key_tail(197, 64, 16) == 0 and A.key_tail(197, 16, 64) == 0
    assert A.key_tail(197, 64, 128) == 16 and A.key_tail(197, 64, 128, A.DQ_TAIL_MAX_BLOCK_D) == 0


def test_forward_tile_choice(monkeypatch):
    """The long forward tile, the short one for under two waves of programs or when all queries fit it, and on
    sm_90 at head dim 64 without a bias the few-keys one for 129-256 keys (ViT's 197)."""
    from dlcv_fast.kernels import attention as A

    monkeypatch.setattr(A, "_sm_count", lambda: 132)
    monkeypatch.setattr(A, "_interpreting", lambda: False)
    few = A.fwd_configs(64, torch.float16, "plain", 90)
    assert len(few) == 3 and few[2] == (128, 32, 4, 3)
    assert A._pick(few, 197, 256 * 12, 197) == few[2] and A._pick(few, 4096, 256, 256) == few[2]
    assert A._pick(few, 197, 256 * 12, 128) == few[0] and A._pick(few, 4096, 32, 4096) == few[0]  # 77, 4096 keys
    assert A._pick(few, 32, 256 * 12, 257) == few[1] and A._pick(few, 197, 8, 197) == few[1]  # short tile first
    assert A._pick(few, 197, 256 * 12) == few[0]  # no key count given
    assert len(A.fwd_configs(64, torch.float16, "bias", 90)) == 2 and len(A.fwd_configs(64, torch.float16,
                                                                                         "plain", 80)) == 2
    for arch in A.ARCHS:
        long, short = A.fwd_configs(64, torch.float16, "plain", arch)[:2]
        assert short[0] < long[0]
        assert A._pick([long, short], 197, 256 * 12) == long  # ViT-B at batch 256: 6144 programs
        assert A._pick([long, short], 197, 8) == short  # 16 programs
        assert A._pick([long, short], 32, 256 * 12) == short  # the Q-Former's queries fit 64 rows
        assert A._pick([long, short], 65, 256 * 12) == long
        assert A._pick([long], 32, 1) == long


def test_deterministic(device):
    B, H, L, D = 2, 4, 97, 64
    q, k, v = make_inputs(B, H, 2, L, L, D, torch.float16, device)
    kw = make_mask_args("causal+padding+bias", B, H, L, L, torch.float16, device)
    runs = []
    for _ in range(2):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v, kw["attn_bias"])]
        out = dlcv_fast.attention(*ins[:3], causal=True, key_padding_mask=kw["key_padding_mask"], attn_bias=ins[3])
        out.backward(torch.ones_like(out))
        runs.append([out] + [t.grad for t in ins])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_lse_matches_reference(device):
    from dlcv_fast.ops.attention import attention_with_lse

    q, k, v = make_inputs(2, 2, 2, 77, 49, 64, torch.float32, device)
    kw = make_mask_args("causal+padding+bias", 2, 2, 77, 49, torch.float32, device)
    out, lse = attention_with_lse(q, k, v, **kw)
    kw_ref = dict(kw, attn_bias=kw["attn_bias"].detach().double())
    _, lse_ref = reference.attention_with_lse(q.double(), k.double(), v.double(), **kw_ref)
    assert lse.shape == (2, 2, 77) and lse.dtype == torch.float32
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    torch.testing.assert_close(lse.cpu().double()[finite], lse_ref[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["none", "causal+padding+bias", "leftpad", "prefix", "holes"])
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,dtype", [(2, 2, 77, 77, 40, torch.float16), (4, 2, 50, 97, 72, torch.float16),
                                                  (2, 1, 1, 70, 128, torch.float16),
                                                  (2, 2, 65, 33, 64, torch.float32)], ids=str)
def test_key_major_backward(kind, Hq, Hkv, Lq, Lk, D, dtype, device, monkeypatch):
    """The dK/dV kernel's key-major tiles (P^T, dS^T with keys along rows; off by default) give the
    query-major gradients up to the rounding of the dots' different summation order, with every mask, GQA,
    Lq = 1, the query split and the dS output; and pass the parity rule through the public op."""
    from dlcv_fast.kernels import attention as A

    q, k, v = make_inputs(2, Hq, Hkv, Lq, Lk, D, dtype, device)
    kw = make_mask_args(kind, 2, Hq, Lq, Lk, dtype, device) if kind != "none" else {}
    args, o, lse, do, bias_grad = kernel_backward_case(q, k, v, kw, D)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    for splits in (None, 2):
        ref = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, splits=splits, key_major=False)
        got = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, splits=splits, key_major=True, fused_dq=False)
        assert torch.equal(got[0], ref[0])  # the dQ kernel is the same
        for name, a, b in zip(("dk", "dv", "ds"), got[1:], ref[1:]):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, **tol, msg=name)
                assert not a.isnan().any(), name
    monkeypatch.setattr(A, "BWD_KEY_MAJOR", True)
    check_parity(q, k, v, kw)


@pytest.mark.parametrize("kind", ["none", "causal+padding+bias", "prefix", "dead_row"])
@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,splits", [(2, 2, 77, 77, 64, None), (4, 2, 50, 97, 40, 2),
                                                   (2, 1, 1, 70, 128, None), (2, 2, 130, 20, 72, 3)], ids=str)
@pytest.mark.parametrize("bm", [32, 16])
def test_fused_dq_backward(kind, Hq, Hkv, Lq, Lk, D, splits, bm, device):
    """With every key in one key-major dK/dV key block (here 128 keys wide), that kernel writes dQ itself
    (fused_dq, the key-major path's default) and takes delta = rowsum(P dP) / rowsum(P) from its tile instead
    of the preprocess pass's rowsum(dO O): dQ, dK and dS equal the two-pass path's up to rounding, dV (no
    delta in it) bit for bit, across masks, GQA, Lq = 1 and query splits, at 32 query rows a step and at
    16 (there also with TMA loads, bit for bit); a batch whose keys are all padded gets zero
    dQ (its program no longer skips the work)."""
    from dlcv_fast.kernels import attention as A

    q, k, v = make_inputs(2, Hq, Hkv, Lq, Lk, D, torch.float16, device)
    if kind == "dead_row":
        kw = {"key_padding_mask": torch.tensor([[True] * Lk, [False] * Lk], device=device)}
    else:
        kw = make_mask_args(kind, 2, Hq, Lq, Lk, torch.float16, device) if kind != "none" else {}
    args, o, lse, do, bias_grad = kernel_backward_case(q, k, v, kw, D)
    config = ((bm, 128, 4, 1), A.INTERPRETER_CONFIG)
    ref = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, config=config, splits=splits, key_major=True,
                     fused_dq=False)
    got = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, config=config, splits=splits, key_major=True,
                     fused_dq=True)
    for name, a, b in zip(("dq", "dk", "ds"), got[:2] + got[3:], ref[:2] + ref[3:]):
        assert (a is None) == (b is None), name
        if a is not None:
            # the two deltas differ by the stored fp16 O's rounding; accuracy: test_fused_dq_parity
            torch.testing.assert_close(a, b, atol=2e-3 * max(1.0, b.abs().max().item()), rtol=2e-3, msg=name)
            assert not a.isnan().any(), name
    assert torch.equal(got[2], ref[2])
    if kind == "dead_row":
        assert torch.equal(got[0][1], torch.zeros_like(got[0][1]))
    if bm == 16:  # with Q/dO through TMA descriptors (BWD_TMA): the same gradients bit for bit
        tma = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, config=config, splits=splits, key_major=True,
                         fused_dq=True, tma=True)
        for name, a, b in zip(("dq", "dk", "dv", "ds"), tma, got):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


@pytest.mark.parametrize("kind", ["none", "causal+padding", "bias", "prefix"])
@pytest.mark.parametrize("Lq,Lk,D", [(32, 32, 64), (7, 20, 40), (49, 30, 72)], ids=str)
@pytest.mark.parametrize("dtype", FP, ids=str)
def test_fused_dq_parity(kind, Lq, Lk, D, dtype, device, monkeypatch):
    """Through the public op with key-major on: keys that fit the interpreter's 32-key block take the
    one-kernel backward (dQ and delta in the dK/dV kernel; a launch spy checks that neither the preprocess nor
    the dQ kernel runs), which passes the parity rule against the fp64 golden (Q-Former-like 32x32 included)."""
    from dlcv_fast.kernels import attention as A

    monkeypatch.setattr(A, "BWD_KEY_MAJOR", True)
    spies = {name: LaunchSpy(getattr(A, name)) for name in ("_bwd_preprocess", "_attn_bwd_dq", "_attn_bwd_dkdv")}
    for name, spy in spies.items():
        monkeypatch.setattr(A, name, spy)
    q, k, v = make_inputs(2, 4, 2, Lq, Lk, D, dtype, device)
    check_parity(q, k, v, make_mask_args(kind, 2, 4, Lq, Lk, dtype, device) if kind != "none" else {})
    launches = {name: spy.launches for name, spy in spies.items()}
    assert launches["_attn_bwd_dkdv"] > 0 and launches["_bwd_preprocess"] == launches["_attn_bwd_dq"] == 0, launches


def test_fused_dq_needs_key_major(device):
    """dQ in the dK/dV kernel exists for the key-major tiles only (those the AOT check compiles with it): asking
    for it with query-major tiles raises instead of launching an unchecked variant (the default, fused_dq=None,
    follows key_major: test_fused_dq_parity); fused_dq_config keeps the key block, and the query rows only of
    sm_90's plain tiles up to head dim 64."""
    from dlcv_fast.kernels import attention as A

    q, k, v = make_inputs(1, 2, 2, 20, 20, 32, torch.float16, device)
    o, lse = A.forward(q, k, v, None, None, False, 0, 32 ** -0.5)
    with pytest.raises(ValueError, match="fused_dq=True needs key_major=True"):
        A.backward(torch.ones_like(o), q, k, v, o, lse, None, None, False, 0, 32 ** -0.5, False, key_major=False,
                   fused_dq=True)
    assert A.fused_dq_config((64, 128, 8, 2), 64, "plain", 90) == (64, 128, 8, 2)
    assert A.fused_dq_config((32, 128, 8, 2), 64, "plain", 80) == (A.FUSED_DQ_BLOCK_M, 128, 8, 2)
    assert A.fused_dq_config((32, 128, 8, 2), 64, "bias", 90) == (A.FUSED_DQ_BLOCK_M, 128, 8, 2)
    assert A.fused_dq_config((32, 128, 8, 2), 128, "plain", 90) == (A.FUSED_DQ_BLOCK_M, 128, 8, 2)
    assert A.fused_dq_config((16, 16, 4, 1), 64, "bias", 90) == (16, 16, 4, 1)


def test_key_major_backward_is_deterministic(device):
    """Two key-major backward runs give bitwise-equal gradients (no atomics; fixed split reduction order)."""
    from dlcv_fast.kernels import attention as A

    q, k, v = make_inputs(1, 2, 2, 70, 70, 64, torch.float16, device)
    o, lse = A.forward(q, k, v, None, None, True, 0, 0.125)
    do = torch.randn_like(o)
    runs = [A.backward(do, q, k, v, o, lse, None, None, True, 0, 0.125, False, splits=2, key_major=True)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][:3], runs[1][:3]))


# ------------------------------------------------------------------------------------------------
# GPU-only: bf16 and large shapes (run by `pytest -m gpu`)
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq,Lk,D,kind", [(197, 197, 64, "none"), (77, 77, 64, "causal+padding"),
                                          (32, 257, 64, "none"), (4096, 4096, 40, "none"),
                                          (1025, 1025, 128, "causal"), (2048, 2048, 64, "prefix"),
                                          (257, 257, 256, "bias"), (49, 49, 160, "bias_b"),
                                          (197, 197, 64, "bias"), (300, 300, 128, "causal+bias")])
def test_gpu_parity(Lq, Lk, D, kind, dtype):
    B, H = 2, 4
    q, k, v = make_inputs(B, H, H, Lq, Lk, D, dtype, "cuda")
    check_parity(q, k, v, make_mask_args(kind, B, H, Lq, Lk, dtype, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("Lq,Lk,D,kind", [(1025, 1025, 64, "causal+padding"), (197, 197, 40, "none"),
                                          (300, 257, 128, "bias")], ids=str)
def test_gpu_tma_loads(Lq, Lk, D, kind, monkeypatch):
    """TMA descriptor loads on the hardware (sm_90+; by default for long plain attention), forward (KV_TMA) and
    backward (BWD_TMA):
    the same output and gradients as the pointer path, and bf16 parity with the reference."""
    from dlcv_fast.kernels import attention as A

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need sm_90 or later")
    B, H = 2, 4
    q, k, v = make_inputs(B, H, H, Lq, Lk, D, torch.bfloat16, "cuda")
    kw = make_mask_args(kind, B, H, Lq, Lk, torch.bfloat16, "cuda")
    args = (q, k, v, kw.get("attn_bias"), kw.get("key_padding_mask"), kw.get("causal", False), 0, D ** -0.5)
    o, lse = A.forward(*args, kv_tma=False, tail=0)
    torch.testing.assert_close(A.forward(*args, kv_tma=True)[0], o, atol=0, rtol=0)
    do = torch.randn_like(o)
    bias_grad = kw.get("attn_bias") is not None
    got = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, tma=True)
    with monkeypatch.context() as m:  # the pointer path's dQ kernel without its tail block, as with TMA
        m.setattr(A, "key_tail", lambda *a: 0)
        ref = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, tma=False)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    monkeypatch.setattr(A, "KV_TMA", True)
    monkeypatch.setattr(A, "BWD_TMA", True)
    check_parity(q, k, v, kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq,Lk,D,kind", [(1025, 1025, 64, "causal+padding"), (197, 197, 40, "none"),
                                          (300, 257, 128, "bias"), (77, 77, 64, "causal+padding"),
                                          (4096, 77, 40, "none"), (513, 513, 80, "prefix"),
                                          (32, 77, 64, "bias")], ids=str)
def test_gpu_key_major_backward(Lq, Lk, D, kind, dtype, monkeypatch):
    """The dK/dV kernel's key-major tiles (BWD_KEY_MAJOR, off by default; BWD_KM_TABLE's tiles, which have
    fewer queries than keys) on the hardware: the query-major gradients up to rounding, and parity with the
    reference, at the launchers' own tiles (the query split included: Lk = 77 under 4096 queries; with 77 keys
    the dK/dV kernel also writes dQ, fused_dq_config's tile; with a bias gradient and 77 keys that is the
    default path, _bias_grad_in_one_block)."""
    from dlcv_fast.kernels import attention as A

    B, H = 2, 4
    q, k, v = make_inputs(B, H, H, Lq, Lk, D, dtype, "cuda")
    kw = make_mask_args(kind, B, H, Lq, Lk, dtype, "cuda")
    args = kernel_args(q, k, v, kw, D)
    o, lse = A.forward(*args)
    do = torch.randn_like(o)
    bias_grad = kw.get("attn_bias") is not None
    ref = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, key_major=False)
    got = A.backward(do, q, k, v, o, lse, *args[3:], bias_grad, key_major=True)
    for name, a, b in zip(("dq", "dk", "dv", "ds"), got, ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=name)
    monkeypatch.setattr(A, "BWD_KEY_MAJOR", True)
    check_parity(q, k, v, kw)


@pytest.mark.gpu
@pytest.mark.parametrize("Lq,Lk,kind", [(197, 197, "none"), (77, 77, "causal+padding"), (300, 257, "bias"),
                                        (4096, 77, "none")], ids=str)
def test_gpu_cuda_graph_capture(Lq, Lk, kind):
    """Forward + backward of dlcv_fast.attention capture into a CUDA graph (what torch.compile's reduce-overhead
    mode does, and how the benchmark suite times short calls) and replay to the eager results bit for bit:
    masks, a bias, and the dK/dV query split's partial sums (Lk = 77 under 4096 queries)."""
    B, H, D = 2, 4, 64
    q, k, v = (t.requires_grad_() for t in make_inputs(B, H, H, Lq, Lk, D, torch.bfloat16, "cuda"))
    kw = make_mask_args(kind, B, H, Lq, Lk, torch.bfloat16, "cuda")
    do = torch.randn(B, H, Lq, D, device="cuda", dtype=torch.bfloat16)

    def step():
        out = dlcv_fast.attention(q, k, v, **kw)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compiles) off the capture, as torch.cuda.graph asks
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("out", "dq", "dk", "dv"), captured, eager):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """A batch stride past 2^31 elements: offsets must be computed in 64-bit."""
    L, D = 64, 64
    big = torch.empty(2 ** 31 + 2 * L * D, dtype=torch.float16, device="cuda")
    base = torch.randn(2, 1, L, D, dtype=torch.float16, device="cuda")
    q = big.as_strided((2, 1, L, D), (2 ** 31, L * D, D, 1))
    q.copy_(base)
    out = dlcv_fast.attention(q, base, base)
    ref = dlcv_fast.attention(base, base, base)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("kind", ["none", "causal+padding", "prefix"])
def test_backward_saves_no_score_sized_tensor(kind, device):
    """Extra memory O(B*H*L): what the forward keeps for the backward is q, k, v, the output, the logsumexp and
    the masks; nothing of Lq x Lk (here 96 x 112 = 10752 per head, against 96 x 16 for q)."""
    B, H, Lq, Lk, D = 2, 2, 96, 112, 16
    q, k, v = make_inputs(B, H, H, Lq, Lk, D, torch.float16, device)
    kw = make_mask_args(kind, B, H, Lq, Lk, torch.float16, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = dlcv_fast.attention(*(t.requires_grad_() for t in (q, k, v)), **kw)
    assert saved and max(saved) <= B * H * max(Lq, Lk) * D < B * H * Lq * Lk
    out.float().sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.gpu
def test_gpu_extra_memory_is_linear_in_length():
    """Forward + backward at 8192 tokens allocate a few input-sized tensors (outputs, gradients, the fp32 dQ
    accumulator, the logsumexp), not a score-sized buffer: that would be 2 GiB here, the inputs are 8 MiB each."""
    B, H, L, D = 1, 8, 8192, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    for causal in (False, True):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        dlcv_fast.attention(q, k, v, causal=causal).backward(do)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        assert extra < 16 * q.numel() * q.element_size(), f"{extra / 2**20:.0f} MiB at causal={causal}"
        q.grad = k.grad = v.grad = None


# ------------------------------------------------------------------------------------------------
# RoPE fused into the kernel
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,L,D,R,batched,kind", [
    (2, 2, 2, 49, 64, 32, False, "none"),      # full rotary
    (2, 4, 2, 77, 80, 16, True, "causal"),     # partial rotary, per-batch tables, GQA
    (1, 3, 3, 97, 40, 20, False, "padding"),   # head dim not a power of two
])
def test_fused_rope_parity(B, Hq, Hkv, L, D, R, batched, kind, dtype, device, monkeypatch):
    from dlcv_fast.ops import rope as rope_ops

    q, k, v = make_inputs(B, Hq, Hkv, L, L, D, dtype, device)
    g = torch.Generator().manual_seed(7)
    angles = torch.rand((B, L, R) if batched else (L, R), generator=g, dtype=torch.float64) * 6
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    kw = make_mask_args(kind, B, Hq, L, L, dtype, device)
    called = []
    real = rope_ops.apply_rope
    monkeypatch.setattr(rope_ops, "apply_rope", lambda *a, **k: called.append(1) or real(*a, **k))
    check_parity(q, k, v, dict(kw, rope=(cos, sin)))
    assert not called, "constant shared tables must take the fused path, not the standalone kernel"


@pytest.mark.parametrize("mode", [True, "q"], ids=["qk", "q"])
@pytest.mark.parametrize("dtype", FP, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,L,D,batched,kind", [
    (2, 2, 2, 49, 64, False, "none"),
    (2, 4, 2, 77, 32, True, "causal+padding"),  # per-batch tables, GQA
    (1, 2, 2, 37, 128, False, "prefix+padding"),
])
def test_rope_in_kernel_parity(B, Hq, Hkv, L, D, batched, kind, dtype, mode, device, monkeypatch):
    """RoPE rotated inside the forward kernel (ROPE_IN_KERNEL True: q and k; "q": q, and k by its pass): no
    rotation pass in the forward (one, over k, for "q"), outputs and gradients within the parity rule, and the
    output equal to that of the two passes up to the split dot's summation order (one rounding of the output's
    dtype)."""
    from dlcv_fast.kernels import attention as A
    from dlcv_fast.kernels import rope as rope_kernels

    q, k, v = make_inputs(B, Hq, Hkv, L, L, D, dtype, device)
    g = torch.Generator().manual_seed(7)
    angles = torch.rand((B, L, D // 2) if batched else (L, D // 2), generator=g, dtype=torch.float64) * 6
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    kw = dict(make_mask_args(kind, B, Hq, L, L, dtype, device), rope=(cos, sin))
    passes = dlcv_fast.attention(q, k, v, **kw)
    monkeypatch.setattr(A, "ROPE_IN_KERNEL", mode)
    spy = LaunchSpy(rope_kernels._rope_kernel)
    monkeypatch.setattr(rope_kernels, "_rope_kernel", spy)
    with torch.no_grad():
        fused = dlcv_fast.attention(q, k, v, **kw)
    assert spy.launches == (0 if mode is True else 1), "the forward must rotate q (and k) itself"
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(fused, passes, atol=tol, rtol=0)
    check_parity(q, k, v, kw)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [True, "q"], ids=["qk", "q"])
@pytest.mark.parametrize("L,D,kind", [(197, 64, "none"), (197, 128, "causal"), (77, 32, "causal+padding"),
                                      (4096, 64, "none")], ids=str)
def test_gpu_rope_in_kernel(L, D, kind, mode, monkeypatch):  # bf16 (fp16 and fp32 run on the CPU)
    """RoPE rotated in the forward kernel on the hardware (ROPE_TILE's wgmma tiles, sm_90): parity with the
    reference, forward and backward, and the two passes' output up to one rounding of the dtype."""
    from dlcv_fast.kernels import attention as A

    B, H, dtype = 4, 768 // D, torch.bfloat16
    q, k, v = make_inputs(B, H, H, L, L, D, dtype, "cuda")
    angles = torch.rand(L, D // 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 6
    kw = dict(make_mask_args(kind, B, H, L, L, dtype, "cuda"), rope=(angles.cos().float().cuda(),
                                                                    angles.sin().float().cuda()))
    passes = dlcv_fast.attention(q, k, v, **kw)
    monkeypatch.setattr(A, "ROPE_IN_KERNEL", mode)
    fused = dlcv_fast.attention(q, k, v, **kw)
    torch.testing.assert_close(fused.float(), passes.float(), atol=2e-2, rtol=0)
    check_parity(q, k, v, kw)


@pytest.mark.parametrize("D", [64, 128])
def test_warp_specialized_forward(D, device, monkeypatch):
    """The warp-specialized forward (FWD_WARP_SPEC: one loop, Q/K/V by TMA): the plain forward's output and
    log-sum-exp where it applies (no key padding or bias, keys a multiple of its tile; causal and prefix-LM
    masks on every block); asked for (warp_spec=True) where it cannot apply, a ValueError naming the reason;
    with the flag on there, the plain path, still right."""
    from dlcv_fast.kernels import attention as A

    B, H, Lq, Lk = 1, 2, 80, 256
    q, k, v = make_inputs(B, H, H, Lq, Lk, D, torch.float16, device)
    for causal, prefix in ((False, 0), (True, 0), (True, 30)):
        ref, ref_lse = A.forward(q, k, v, None, None, causal, prefix, D ** -0.5)
        out, lse = A.forward(q, k, v, None, None, causal, prefix, D ** -0.5, warp_spec=True)
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=0)
    q40, k40, v40 = make_inputs(B, H, H, Lq, Lk, 40, torch.float16, device)
    kpm = torch.ones(B, Lk, dtype=torch.bool, device=device)
    cases = [((q, k, v, None, kpm, False, 0), "key padding"),
             ((q, k, v, torch.zeros(Lq, Lk, device=device), None, False, 0), "bias"),
             ((q, k[:, :, :200], v[:, :, :200], None, None, False, 0), "not a multiple"),
             ((q40, k40, v40, None, None, False, 0), "head dim 40"),
             ((q.float(), k.float(), v.float(), None, None, False, 0), "dtype")]
    monkeypatch.setattr(A, "FWD_WARP_SPEC", True)
    for args, why in cases:
        with pytest.raises(ValueError, match=why):
            A.forward(*args, 0.125, warp_spec=True)
        got = A.forward(*args, 0.125)[0]  # the flag: the plain path
        monkeypatch.setattr(A, "FWD_WARP_SPEC", False)
        torch.testing.assert_close(got, A.forward(*args, 0.125)[0], atol=0, rtol=0)
        monkeypatch.setattr(A, "FWD_WARP_SPEC", True)


@pytest.mark.gpu
@pytest.mark.parametrize("Lq,Lk,D,causal", [(1000, 2048, 128, False), (4096, 4096, 64, True)], ids=str)
def test_gpu_warp_specialized_forward(Lq, Lk, D, causal, monkeypatch):
    """The warp-specialized forward on the hardware (sm_90): parity with the reference and the plain path's
    output up to one rounding of the dtype (its row tail past Lq is a TMA zero fill)."""
    from dlcv_fast.kernels import attention as A

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA and warp specialization need sm_90")
    q, k, v = make_inputs(2, 4, 4, Lq, Lk, D, torch.bfloat16, "cuda")
    plain = dlcv_fast.attention(q, k, v, causal=causal)
    monkeypatch.setattr(A, "FWD_WARP_SPEC", True)
    ws = dlcv_fast.attention(q, k, v, causal=causal)
    torch.testing.assert_close(ws.float(), plain.float(), atol=2e-2, rtol=0)
    check_parity(q, k, v, {"causal": causal}, backward=False)


def test_rope_in_kernel_policy(device, monkeypatch):
    """Where rope= is rotated in the kernel: ROPE_IN_KERNEL None = q and k for short sequences, q alone beyond,
    False = never, True = q and k, "q" = q alone, wherever the kernel can (full rotary, head dim 32 / 64 / 128,
    no bias; elsewhere the passes, still right); rope_in_kernel=True where it cannot is a ValueError saying why,
    and so is a value that is not a mode."""
    from dlcv_fast.kernels import attention as A
    from dlcv_fast.kernels import rope as rope_kernels

    for flag, Lq, expect in ((None, A.ROPE_KERNEL_MAX_LEN, "qk"), (None, A.ROPE_KERNEL_MAX_LEN + 1, "q"),
                             (False, 7, None), (True, 4096, "qk"), ("q", 7, "q")):
        monkeypatch.setattr(A, "ROPE_IN_KERNEL", flag)
        assert A._rope_mode(None, Lq) == expect
    assert A._rope_mode(False, 7) is None and A._rope_mode(True, 4096) == "qk"
    with pytest.raises(ValueError, match="rope_in_kernel must be"):
        A._rope_mode("k", 7)
    monkeypatch.setattr(A, "ROPE_IN_KERNEL", True)
    B, H, L = 1, 2, 20
    cases = [(40, 20, None, "head dim 40"), (64, 16, None, "partial rotary"),
             (64, 32, torch.zeros(L, L), "attn_bias")]
    for D, R, bias, why in cases:
        q, k, v = make_inputs(B, H, H, L, L, D, torch.float32, device)
        cos, sin = (t.to(device) for t in (torch.ones(L, R), torch.zeros(L, R)))  # the identity rotation
        bias = bias.to(device) if bias is not None else None
        with pytest.raises(ValueError, match=why):
            A.forward(q, k, v, bias, None, False, 0, D ** -0.5, rope=(cos, sin), rope_in_kernel=True)
        spy = LaunchSpy(rope_kernels._rope_kernel)
        monkeypatch.setattr(rope_kernels, "_rope_kernel", spy)
        out = A.forward(q, k, v, bias, None, False, 0, D ** -0.5, rope=(cos, sin))[0]  # the flag: passes
        assert spy.launches == 2, why
        torch.testing.assert_close(out, A.forward(q, k, v, bias, None, False, 0, D ** -0.5)[0])

