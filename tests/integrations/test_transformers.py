"""dlcv_fast.patch on Hugging Face transformers models: the "dlcv_fast" attention implementation.

Tiny random models (no network). Parity: the unpatched model in float64 is the golden reference, the unpatched
fp32 model the low-precision one, and the patched fp32 copy must satisfy the model rule of tests/models/common.py.
A spy on dlcv_fast.ops.attention.attention_with_lse counts the calls that reach dlcv_fast's attention op.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dlcv_fast
import dlcv_fast.ops.attention as attn_ops
from dlcv_fast.integrations import is_patched
from tests.models.common import check_model

transformers = pytest.importorskip("transformers")
from dlcv_fast.integrations import transformers as hf_rules  # noqa: E402  (after the importorskip)


@pytest.fixture
def spy(monkeypatch):
    """The keyword arguments of every call reaching dlcv_fast's attention op."""
    calls, original = [], attn_ops.attention_with_lse

    def counting(q, k, v, **kwargs):
        calls.append(dict(kwargs, q=q, k=k))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(attn_ops, "attention_with_lse", counting)
    return calls


def tiny_clip(attn="sdpa", layers=2, dropout=0.0):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=layers, max_position_embeddings=16, attention_dropout=dropout,
                         bos_token_id=0, pad_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_hidden_layers=layers,
                           image_size=32, patch_size=16, attention_dropout=dropout),
        projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def clip_text(device="cpu"):
    """Right-padded ids (EOS = 2 at each text's end) and their padding mask; row 0 without padding."""
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[0, 8], ids[1, 5], ids[1, 6:], mask[1, 6:] = 2, 2, 1, 0
    return ids.to(device), mask.to(device)


def tiny_llama(attn="eager", layers=2, dropout=0.0):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attention_dropout=dropout, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


def pretrained_models(model):
    return [m for m in model.modules() if isinstance(m, transformers.PreTrainedModel)]


def implementations(model):
    return [m.config._attn_implementation for m in pretrained_models(model)]


def test_clip_parity_with_padding(spy, device):
    torch.manual_seed(0)
    lp = tiny_clip("sdpa").to(device)
    golden, patched = copy.deepcopy(lp).double(), copy.deepcopy(lp)
    assert hf_rules.patch(patched) == 3  # CLIPModel, its text_model and vision_model
    assert implementations(patched) == ["dlcv_fast"] * 3 and implementations(lp) == ["sdpa"] * 3
    ids, mask = clip_text(device)
    pixels = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        outs = [m.get_text_features(input_ids=ids, attention_mask=mask) for m in (patched, lp, golden)]
        assert len(spy) == 2  # one per text layer
        assert all(c["attn_bias"] is not None and not c["causal"] for c in spy)  # causal & padding: a 4-D mask
        for name in ("pooler_output", "last_hidden_state"):
            check_model(*(o[name] for o in outs), name=f"text {name}")
        outs = [m.get_image_features(pixel_values=x) for m, x in ((patched, pixels), (lp, pixels),
                                                                   (golden, pixels.double()))]
        assert len(spy) == 4
        for name in ("pooler_output", "last_hidden_state"):
            check_model(*(o[name] for o in outs), name=f"image {name}")


def test_decoder_gqa_causal_and_padding(spy, device):
    torch.manual_seed(0)
    lp = tiny_llama("sdpa").to(device)  # (transformers' eager Llama in float64 gives NaN rows with left padding)
    golden, patched = copy.deepcopy(lp).double(), copy.deepcopy(lp)
    assert hf_rules.patch(patched) == 2  # LlamaForCausalLM and the LlamaModel sharing its config
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(2)).to(device)
    right, left = (torch.ones(2, 11, dtype=torch.long, device=device) for _ in range(2))
    right[1, 7:], left[1, :4] = 0, 0
    with torch.no_grad():
        for name, mask in (("right padding", right), ("left padding", left), ("no mask", None)):
            spy.clear()
            logits = [m(input_ids=ids, attention_mask=mask).logits for m in (patched, lp, golden)]
            check_model(*logits, name=f"logits, {name}")
            assert len(spy) == 2
            # grouped-query heads read in place (4 query heads, 2 key/value heads)
            assert all(c["q"].shape[1] == 4 and c["k"].shape[1] == 2 for c in spy)
            if mask is None:  # no padding: transformers gives no mask, the kernel's causal mask runs
                assert all(c["causal"] and c["attn_bias"] is None for c in spy)
            else:
                assert all(not c["causal"] and c["attn_bias"] is not None for c in spy)


def test_blip2_qformer_self_and_cross_attention(spy):
    """BLIP-2's Q-Former: learned queries attend to themselves and, every layer here, to the image tokens
    (Lq = 8 queries over Lk = 17 image tokens; the full-size shape is 32 over 257)."""
    torch.manual_seed(0)
    cfg = transformers.Blip2QFormerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=128, encoder_hidden_size=48, cross_attention_frequency=1)
    lp = transformers.Blip2QFormerModel(cfg).eval()
    golden, patched = copy.deepcopy(lp).double(), dlcv_fast.patch(copy.deepcopy(lp))
    queries, image = torch.randn(2, 8, 64), torch.randn(2, 17, 48)
    image_mask = torch.ones(2, 17, dtype=torch.long)
    image_mask[1, 12:] = 0
    with torch.no_grad():
        for mask in (None, image_mask):
            spy.clear()
            outs = [m(query_embeds=queries.to(dtype), encoder_hidden_states=image.to(dtype),
                      encoder_attention_mask=mask).last_hidden_state
                    for m, dtype in ((patched, torch.float32), (lp, torch.float32), (golden, torch.float64))]
            check_model(*outs, name="Q-Former output" + (", padded image tokens" if mask is not None else ""))
            assert sorted(c["k"].shape[2] for c in spy) == [8, 8, 17, 17]  # two self- and two cross-attentions


def test_gradients(spy):
    torch.manual_seed(0)
    lp = tiny_llama("sdpa", layers=1).model  # a LlamaModel on its own
    golden, patched = copy.deepcopy(lp).double(), copy.deepcopy(lp)
    assert hf_rules.patch(patched) == 1
    x = torch.randn(2, 9, 64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    w = torch.randn(2, 9, 64)
    grads = []
    for m, dtype in ((patched, torch.float32), (lp, torch.float32), (golden, torch.float64)):
        xi = x.to(dtype).detach().requires_grad_()
        (m(inputs_embeds=xi, attention_mask=mask).last_hidden_state * w.to(dtype)).sum().backward()
        grads.append({"inputs": xi.grad, **{n: p.grad for n, p in m.named_parameters()}})
    assert len(spy) == 1
    assert grads[0].keys() == grads[2].keys()
    for name in grads[0]:
        if grads[2][name] is None:  # the unused token embedding
            assert grads[0][name] is None
            continue
        check_model(*(g[name] for g in grads), name=f"grad {name}", factor=3.0)


def test_output_attentions_falls_back_to_eager(spy):
    torch.manual_seed(0)
    model = tiny_clip("sdpa")
    eager, patched = copy.deepcopy(model), copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    hf_rules.patch(patched)
    ids, mask = clip_text()
    with torch.no_grad():
        out = patched.text_model(input_ids=ids, attention_mask=mask, output_attentions=True)
        ref = eager.text_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert not spy
    assert len(out.attentions) == 2 and all(a is not None and a.shape == (2, 2, 9, 9) for a in out.attentions)
    for a, r in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("previous", ["sdpa", "eager"])
@pytest.mark.parametrize("which", ["clip_text_padded", "llama_causal"])
def test_training_with_dropout_falls_back(spy, previous, which):
    """Attention dropout while training runs the previous implementation: the same result, RNG draws included
    (for "eager", with the mask eager would have built: additive, the causal mask never left out)."""
    torch.manual_seed(0)
    if which == "clip_text_padded":
        model = tiny_clip(previous, dropout=0.5).text_model
        ids, mask = clip_text()
    else:
        model = tiny_llama(previous, dropout=0.5)
        ids, mask = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2)), None
    patched = copy.deepcopy(model)
    hf_rules.patch(patched)
    outs = []
    for m in (model.train(), patched.train()):
        torch.manual_seed(1)
        out = m(input_ids=ids, attention_mask=mask)
        outs.append(out.logits if which == "llama_causal" else out.last_hidden_state)
    assert not spy
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    with torch.no_grad():  # dropout was active: eval mode (no dropout) gives another answer
        out = model.eval()(input_ids=ids, attention_mask=mask)
        assert not torch.allclose(out.logits if which == "llama_causal" else out.last_hidden_state, outs[0])


def test_patch_twice_and_unpatch(spy):
    torch.manual_seed(0)
    model = tiny_clip("eager", layers=1)
    keys = list(model.state_dict())
    assert dlcv_fast.patch(model) is model and is_patched(model)
    assert hf_rules.patch(model) == 0  # already patched: a no-op
    assert list(model.state_dict()) == keys
    assert all(m.__dict__.get("_dlcv_patched") for m in pretrained_models(model))
    assert isinstance(model.vision_model, transformers.CLIPVisionModel)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.vision_model(pixel_values=pixels)
        assert len(spy) == 1
        other = nn.Linear(2, 2)  # a module another integration marked
        other._dlcv_patched = True
        assert hf_rules.unpatch(nn.ModuleList([model, other])) == 3 and hf_rules.unpatch(model) == 0
        assert other._dlcv_patched
        assert implementations(model) == ["eager"] * 3  # the previous implementation is back
        assert not is_patched(model) and not any("_dlcv_patched" in m.__dict__ for m in model.modules())
        assert not any("_dlcv_previous_attn_implementation" in m.__dict__ for m in model.modules())
        model.vision_model(pixel_values=pixels)
        assert len(spy) == 1  # no longer routed
    assert list(model.state_dict()) == keys


def test_registered_name_routes(spy):
    """The name is registered with both interfaces (twice: no change); a model built with it routes."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf_rules.patch(nn.Linear(2, 2))
    hf_rules.patch(nn.Linear(2, 2))
    assert ALL_ATTENTION_FUNCTIONS["dlcv_fast"] is hf_rules._attention_forward
    # without a mask function of its own, transformers would build no (padding) mask at all for the name
    assert ALL_MASK_ATTENTION_FUNCTIONS["dlcv_fast"] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_hidden_layers=1, image_size=32, patch_size=16,
                                        attn_implementation="dlcv_fast")
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert len(spy) == 1


def test_old_style_model_left_alone(spy):
    """BLOOM's attention does not use the attention interface: nothing to patch."""
    cfg = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=2)
    model = transformers.BloomModel(cfg).eval()
    assert hf_rules.patch(model) == 0 and model.config._attn_implementation != "dlcv_fast"
    with pytest.raises(ValueError, match="nothing to patch"):
        dlcv_fast.patch(model)
    assert not is_patched(model)


def test_models_naming_sdpa_left_alone():
    """Code that branches on the literal "sdpa" is left alone (DeepSeek-V3.2 folds its sparse key selection into
    the mask only for "eager" and "sdpa")."""
    import transformers.models.clip.modeling_clip as clip

    deepseek = pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")
    assert hf_rules._source_unsuitable(deepseek.__name__) and not hf_rules._source_unsuitable(clip.__name__)


def test_models_with_their_own_eager_function_left_alone():
    """A modeling file whose attention layers default to another eager function than eager_attention_forward
    (Llama 4's vision tower: vision_eager_attention_forward, called with scaling=None) is left alone: the eager
    fallback would call the wrong one."""
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    assert hf_rules._source_unsuitable(llama4.__name__)
    import transformers.models.blip_2.modeling_blip_2 as blip2

    assert not hf_rules._source_unsuitable(blip2.__name__)


def test_patched_model_runs_after_unpickling_in_a_new_process(tmp_path):
    """torch.save of a patched model, torch.load in a fresh interpreter (spawned workers, checkpoints of whole
    models): the model carries "dlcv_fast" in its config, and unpickling it registers the name again."""
    import subprocess
    import sys

    model = tiny_clip("sdpa")
    hf_rules.patch(model)
    ids, mask = clip_text()
    with torch.no_grad():
        expected = model.get_text_features(input_ids=ids, attention_mask=mask)
    torch.save({"model": model, "ids": ids, "mask": mask, "expected": expected}, tmp_path / "m.pt")
    script = (f"import torch; d = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False); m = d['model']\n"
              "assert m.config._attn_implementation == 'dlcv_fast'\n"
              "with torch.no_grad(): out = m.get_text_features(input_ids=d['ids'], attention_mask=d['mask'])\n"
              "out = out if isinstance(out, torch.Tensor) else out.pooler_output\n"
              "exp = d['expected'] if isinstance(d['expected'], torch.Tensor) else d['expected'].pooler_output\n"
              "torch.testing.assert_close(out, exp)\nprint('ran')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ran" in proc.stdout, proc.stderr[-3000:]


class Plain(nn.Module):
    """An attention module of no modeling file (no eager function of its own, no config): falls back to sdpa."""
    is_causal = False


def qkv(D=16, Dv=None, dtype=torch.float32, Hkv=2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 5, D, generator=g, dtype=dtype), torch.randn(2, Hkv, 7, D, generator=g, dtype=dtype),
            torch.randn(2, Hkv, 7, Dv or D, generator=g, dtype=dtype))


def outcome(fn, *args, **kwargs):
    """fn's result, or the type and message of what it raised."""
    torch.manual_seed(0)
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (compared, not swallowed)
        return type(e), str(e)


@pytest.mark.parametrize("case", ["dropout", "softcap", "s_aux", "sinks", "position_bias", "head_dim_288",
                                  "value_dim", "float64", "output_attentions", "heads_not_multiple"])
def test_unsupported_calls_fall_back_to_sdpa(spy, case):
    """What the kernel cannot do runs transformers' sdpa function: the same result (dropout draws included) or
    the same exception (softcap in transformers >= 5.2x, key/value heads that do not divide the query heads)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv(D=288 if case == "head_dim_288" else 16, Dv=24 if case == "value_dim" else None,
                  dtype=torch.float64 if case == "float64" else torch.float32,
                  Hkv=3 if case == "heads_not_multiple" else 2)
    module = Plain()
    module.num_key_value_groups = 2
    extra = {"softcap": 30.0, "s_aux": torch.zeros(4), "sinks": torch.zeros(4),
             "position_bias": torch.randn(1, 4, 5, 7), "output_attentions": True}
    kwargs = dict(dropout=0.5 if case == "dropout" else 0.0, scaling=0.3,
                  **({case: extra[case]} if case in extra else {}))
    out = outcome(hf_rules._attention_forward, module, q, k, v, None, **kwargs)
    ref = outcome(sdpa_attention_forward, module, q, k, v, None, **kwargs)
    assert not spy
    assert len(out) == len(ref) == 2
    if isinstance(ref[0], type):
        assert out == ref
    else:
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
        assert out[1] is None and ref[1] is None


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "expanded_key_padding", "float"])
def test_direct_call_matches_sdpa(spy, mask_kind):
    """The function itself against transformers' sdpa function: GQA, an explicit scale, each mask form."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv()
    module = Plain()
    module.num_key_value_groups = 2
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    mask = {"none": None, "key_padding": keep[:, None, None, :],
            "expanded_key_padding": keep[:, None, None, :].expand(2, 1, 5, 7),
            "float": torch.randn(2, 1, 5, 7)}[mask_kind]
    out, weights = hf_rules._attention_forward(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (2, 5, 4, 16) and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert len(spy) == 1
    if mask_kind.endswith("key_padding"):  # a per-key bool mask reaches the kernel's key-padding path
        assert spy[0]["key_padding_mask"] is not None and spy[0]["attn_bias"] is None
