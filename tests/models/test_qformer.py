"""BLIP-2's Q-Former against transformers' Blip2QFormerModel on the same random weights.

Tiny configs (hidden 64, 2 layers, 2 heads, image states of width 48) with seeded random weights: the query and
key weights are drawn with std 0.3 (transformers' 0.02 leaves attention nearly uniform, hiding mask errors) and
the biases and LayerNorm parameters are random (so a swapped or misplaced norm shows). fp32 ours vs transformers
in fp64, rule in tests/models/common.py; the full-size model in bf16 on a GPU, rule in tests/models/test_gpu.py.
"""
import pytest
import torch

import dlcv_fast
import dlcv_fast.ops.attention as attn_ops
from dlcv_fast.models import from_transformers
from dlcv_fast.models.qformer import QFormer, qformer_from_transformers
from tests.models.common import FACTOR, check_model, fp64_copy

transformers = pytest.importorskip("transformers")

B, NQ, LK, ENC = 2, 5, 9, 48


def small_config(freq=2, **kw):
    kw = dict(dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   encoder_hidden_size=ENC, cross_attention_frequency=freq, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0), **kw)
    return transformers.Blip2QFormerConfig(**kw)


def small_hf(freq=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = transformers.Blip2QFormerModel(small_config(freq, **kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.normal_(std=0.3)
            elif name.endswith("LayerNorm.weight") or name == "layernorm.weight":
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
    return m


def inputs(masked):
    """Queries, image states, and (masked) an image mask padding tokens of sample 1 and a query mask dropping one
    query of sample 0 as a key (transformers' convention, 1 = keep)."""
    g = torch.Generator().manual_seed(1)
    q, e = torch.randn(B, NQ, 64, generator=g), torch.randn(B, LK, ENC, generator=g)
    if not masked:
        return q, e, None, None
    enc_mask = torch.ones(B, LK, dtype=torch.long)
    enc_mask[1, 4:] = 0
    q_mask = torch.ones(B, NQ, dtype=torch.long)
    q_mask[0, 2] = 0
    return q, e, enc_mask, q_mask


def hf_out(m, q, e, enc_mask=None, q_mask=None):
    return m(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=enc_mask,
             attention_mask=q_mask).last_hidden_state


@pytest.mark.parametrize("freq", [1, 2])
def test_state_dict_keys_and_cross_layers(freq):
    ref = small_hf(freq)
    c = ref.config
    ours = QFormer(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, encoder_hidden_size=ENC,
                   cross_attention_frequency=freq)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())  # strict
    assert [lay.has_cross_attention for lay in ours.encoder["layer"]] == \
        [lay.has_cross_attention for lay in ref.encoder.layer] == [i % freq == 0 for i in range(c.num_hidden_layers)]


def test_converter_keeps_device_dtype_mode():
    ref = small_hf().double().train()
    ours = from_transformers(ref)
    assert isinstance(ours, QFormer) and ours.training and ours.layernorm.weight.dtype == torch.float64
    assert torch.equal(ours.encoder["layer"][0].crossattention.attention.key.weight,
                       ref.encoder.layer[0].crossattention.attention.key.weight)


def test_inputs_cast_to_model_dtype():
    """As transformers (the Q-Former is kept in fp32 inside BLIP-2): inputs of another dtype are cast to the
    parameters' dtype, and so is the output."""
    ref = small_hf()
    ours = from_transformers(ref)
    q, e, enc_mask, _ = inputs(masked=True)
    with torch.no_grad(), dlcv_fast.use_backend("torch"):
        for dtype in (torch.float16, torch.float64):
            out = ours(q.to(dtype), e.to(dtype), enc_mask)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, hf_out(ref, q.to(dtype), e.to(dtype), enc_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "masked"])
@pytest.mark.parametrize("freq", [1, 2])
def test_parity(freq, masked, backend):
    ref = small_hf(freq)
    ours, ref64 = from_transformers(ref), fp64_copy(ref)
    q, e, enc_mask, q_mask = inputs(masked)
    with torch.no_grad():
        golden = hf_out(ref64, q.double(), e.double(), enc_mask, q_mask)
        theirs = hf_out(ref, q, e, enc_mask, q_mask)
        with dlcv_fast.use_backend(backend):
            out = ours(q, e, enc_mask, q_mask)
    check_model(out, theirs, golden, name="last_hidden_state")
    if masked:  # the masks change the result here, so a dropped mask cannot pass
        assert (golden - hf_out(ref64, q.double(), e.double())).abs().max() > 1e-2


def test_gradients():
    """Gradients of the inputs and of parameters in each kind of step, on the kernels, with both masks."""
    ref = small_hf(2)
    ours, ref64 = from_transformers(ref), fp64_copy(ref)
    q, e, enc_mask, q_mask = inputs(masked=True)
    cot = torch.randn(B, NQ, 64, generator=torch.Generator().manual_seed(2))
    names = ["layernorm.weight", "encoder.layer.0.attention.attention.query.weight",
             "encoder.layer.0.crossattention.attention.key.weight",
             "encoder.layer.0.crossattention.attention.value.bias",
             "encoder.layer.1.attention.output.LayerNorm.weight", "encoder.layer.1.output_query.dense.weight"]

    def grads(model, dtype, run):
        xs = [x.to(dtype).clone().requires_grad_() for x in (q, e)]  # fresh leaves: no shared .grad
        (run(model, *xs) * cot.to(dtype)).sum().backward()
        params = dict(model.named_parameters())
        return [x.grad for x in xs] + [params[n].grad for n in names]

    hf_run = lambda m, a, b: hf_out(m, a, b, enc_mask, q_mask)  # noqa: E731
    golden, theirs = grads(ref64, torch.float64, hf_run), grads(ref, torch.float32, hf_run)
    with dlcv_fast.use_backend("triton"):
        out = grads(ours, torch.float32, lambda m, a, b: m(a, b, enc_mask, q_mask))
    for name, o, t, g in zip(["query_embeds", "encoder_hidden_states"] + names, out, theirs, golden):
        check_model(o, t, g, name=f"grad {name}", factor=FACTOR)


@pytest.mark.parametrize("freq,n_cross", [(1, 2), (2, 1)])
def test_routing(freq, n_cross, monkeypatch):
    """Every attention runs on the attention op with strided q/k/v and the (B, Lk) bool mask, never a bias
    tensor: one self-attention per layer (Lk = Nq) and one cross-attention per cross layer (Lk = image tokens)."""
    calls = []
    real = attn_ops.attention_with_lse

    def spy(q, k, v, **kw):
        calls.append(dict(kw, lq=q.shape[2], lk=k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attn_ops, "attention_with_lse", spy)
    ours = from_transformers(small_hf(freq))
    q, e, enc_mask, q_mask = inputs(masked=True)
    with torch.no_grad(), dlcv_fast.use_backend("torch"):
        ours(q, e, enc_mask)
        ours(q, e, enc_mask, q_mask)
    self_calls = [c for c in calls if c["lk"] == NQ]
    cross_calls = [c for c in calls if c["lk"] == LK]
    assert (len(self_calls), len(cross_calls), len(calls)) == (2 * 2, 2 * n_cross, 2 * (2 + n_cross))
    assert all(c["lq"] == NQ and c["attn_bias"] is None for c in calls)
    for c in cross_calls:
        assert c["key_padding_mask"].dtype == torch.bool and torch.equal(c["key_padding_mask"], enc_mask.bool())
    assert [c["key_padding_mask"] is None for c in self_calls] == [True, True, False, False]
    assert torch.equal(self_calls[-1]["key_padding_mask"], q_mask.bool())


def test_unsupported_and_bad_inputs():
    for kw, match in [(dict(use_qformer_text_input=True), "use_qformer_text_input"),
                      (dict(hidden_act="relu"), "hidden_act"),
                      (dict(position_embedding_type="relative_key"), "position_embedding_type")]:
        with pytest.raises(NotImplementedError, match=match):
            qformer_from_transformers(transformers.Blip2QFormerModel(small_config(**kw)))
    with pytest.raises(NotImplementedError, match="not a Blip2QFormerModel"):
        qformer_from_transformers(torch.nn.Linear(2, 2))
    ours = from_transformers(small_hf(attention_probs_dropout_prob=0.1)).train()
    q, e, enc_mask, _ = inputs(masked=True)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        ours(q, e)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        ours.eval()(q, e, enc_mask[:, :-1])
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        QFormer(cross_attention_frequency=0)


def test_hidden_dropout_is_kept():
    """Hidden dropout is carried over, not dropped silently: the same dropout modules as transformers' (names and
    rates), applied in the same order, so in training mode the same seed draws the same masks and gives
    transformers' output; eval mode draws none."""
    ref = small_hf(hidden_dropout_prob=0.5).train()
    ours = from_transformers(ref)
    rates = lambda m: {n: d.p for n, d in m.named_modules() if isinstance(d, torch.nn.Dropout)}  # noqa: E731
    assert rates(ours) == rates(ref) and len(rates(ours)) == 1 + 2 * 2 + 1
    q, e, _, _ = inputs(masked=False)
    with torch.no_grad(), dlcv_fast.use_backend("torch"):
        torch.manual_seed(5)
        theirs = hf_out(ref, q, e)
        torch.manual_seed(5)
        out = ours(q, e)
        torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-5)
        ours.eval()
        torch.testing.assert_close(ours(q, e), ours(q, e))
        assert not torch.allclose(ours(q, e), out)


@pytest.mark.gpu
def test_qformer_full_size_bf16():
    """Blip2QFormerConfig() (hidden 768, 12 layers, image states 1408 wide): 32 queries over 257 image tokens,
    batch 8, some image tokens padded; rule of tests/models/test_gpu.py."""
    from tests.models.test_gpu import bf16_check

    torch.manual_seed(0)
    ref = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig()).eval()
    with torch.no_grad():  # less uniform attention than the 0.02 init (logits of order 1)
        for name, p in ref.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.normal_(std=0.05)
    q, e = torch.randn(8, 32, 768), torch.randn(8, 257, 1408)
    mask = torch.ones(8, 257, dtype=torch.long)
    mask[1, 200:], mask[5, 17:] = 0, 0

    def run(m, q, e, mask):
        if isinstance(m, QFormer):
            return m(q, e, mask)
        return hf_out(m, q, e, mask)

    bf16_check(from_transformers(ref), ref, q, e, mask, call=run, name="last_hidden_state")


def test_registered_name_is_blip2s_qformer():
    """create_model("blip2_qformer") has the parameter names and shapes of transformers' default
    Blip2QFormerConfig (BLIP-2's), built on the meta device."""
    from dlcv_fast.models import create_model

    with torch.device("meta"):
        ours = create_model("blip2_qformer")
        theirs = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_whole_blip2_model_points_to_its_qformer():
    class Blip2Model(torch.nn.Module):  # stands for transformers' Blip2Model: a model holding a .qformer
        qformer = None

    with pytest.raises(NotImplementedError, match="pass the model's .qformer"):
        from_transformers(Blip2Model())
