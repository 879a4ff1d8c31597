"""dlcv_fast.integrations.open_clip: torch.nn.MultiheadAttention and open_clip's towers on dlcv_fast's kernels.

Each parity test runs the unpatched module in float64 (golden) and float32 (lp), a patched float32 copy, and
applies the model rule (tests/models/common.py). A spy on ``attention_with_lse`` proves the fused path ran, with
the masks it was meant to get. open_clip tests are skipped where open_clip is not installed (the GPU machine).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import dlcv_fast
from dlcv_fast import integrations
from dlcv_fast.integrations import open_clip as rules
from dlcv_fast.ops import attention as attn_ops
from tests.models.common import FACTOR, check_model, fp64_copy, to64

E, H, N, L, S = 64, 2, 2, 7, 5
NEG = float("-inf")


@pytest.fixture
def spy(monkeypatch):
    """The keyword arguments of every call of dlcv_fast's attention op (plus q's shape)."""
    calls = []
    real = attn_ops.attention_with_lse

    def wrapper(q, k, v, **kwargs):
        calls.append(dict(kwargs, shape=tuple(q.shape)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attn_ops, "attention_with_lse", wrapper)
    return calls


def _mha(batch_first=True, **kwargs):
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, **kwargs)
    for p in (m.in_proj_bias, m.out_proj.bias):
        if p is not None:
            nn.init.normal_(p, std=0.5)
    return m.eval()


def _seq(n, *, batch_first, dim=E):
    return torch.randn(N, n, dim) if batch_first else torch.randn(n, N, dim)


def _causal(rows, cols, dtype=torch.float32):
    above = torch.ones(rows, cols, dtype=torch.bool).triu_(1)
    return above if dtype == torch.bool else torch.zeros(rows, cols, dtype=dtype).masked_fill_(above, NEG)


def _padding(n):
    """(N, n) bool, True = padding (ignored) in torch's meaning; every row keeps its first key."""
    mask = torch.rand(N, n) < 0.4
    mask[:, 0] = False
    return mask


def _parity(module, *inputs, **kwargs):
    """Patched fp32 copy vs the fp64 golden (model rule); returns the patched output."""
    golden = fp64_copy(module)(*map(to64, inputs), **{k: to64(v) for k, v in kwargs.items()})[0]
    lp = module(*inputs, **kwargs)[0]
    patched = copy.deepcopy(module)
    assert rules.patch(patched) == 1
    out = patched(*inputs, **kwargs)[0]
    check_model(out, lp, golden)
    return out


# ------------------------------------------------------------------------------------------------
# nn.MultiheadAttention: the fused path, every mask kind, self- and cross-attention
# ------------------------------------------------------------------------------------------------

def _case(name):
    """(module, args, kwargs, what the kernel must be given) for one call shape."""
    bf = name not in ("seq_first", "float_mask_3d", "kpm_bool", "cross_separate", "bool_causal_detected")
    m = _mha(bf, **(dict(kdim=48, vdim=40, bias=False) if name == "cross_separate" else {}))
    x = _seq(L, batch_first=bf)
    kw = dict(need_weights=False)
    expect = dict(causal=False, bias=None, padding=None)
    if name == "bool_mask_2d":
        kw["attn_mask"] = (torch.rand(L, L) < 0.4).fill_diagonal_(False)
        expect["bias"] = (L, L)
    elif name == "float_mask_3d":
        kw["attn_mask"] = torch.randn(N * H, L, L)
        expect["bias"] = (N, H, L, L)
    elif name == "kpm_bool":
        kw["key_padding_mask"] = _padding(L)
        expect["padding"] = ~kw["key_padding_mask"]
    elif name == "kpm_float_and_mask_float":
        kw["key_padding_mask"] = torch.where(_padding(L), NEG, 0.0) + torch.randn(N, L)
        kw["attn_mask"] = torch.randn(L, L)
        expect["bias"] = (N, 1, L, L)
    elif name == "is_causal_hint":
        kw.update(attn_mask=_causal(L, L), is_causal=True)
        expect["causal"] = True
    elif name == "wrong_hint_with_padding":  # with a padding mask torch drops the hint and uses the mask itself
        kw.update(attn_mask=(torch.rand(L, L) < 0.3).fill_diagonal_(False), is_causal=True,
                  key_padding_mask=_padding(L))
        expect.update(bias=(L, L), padding=~kw["key_padding_mask"])
    elif name == "float_causal_detected":
        kw["attn_mask"] = _causal(L, L)
        expect["causal"] = True
    elif name == "bool_causal_detected":
        kw["attn_mask"] = _causal(L, L, torch.bool)
        expect["causal"] = True
    elif name == "almost_causal":
        kw["attn_mask"] = _causal(L, L).index_put_((torch.tensor(3), torch.tensor(1)), torch.tensor(-1.0))
        expect["bias"] = (L, L)
    if name.startswith("cross"):
        kv = _seq(S, batch_first=bf)
        if name == "cross_kv_same":
            args = (x, kv, kv)
            kw["key_padding_mask"] = _padding(S)
            expect["padding"] = ~kw["key_padding_mask"]
        elif name == "cross_qkv_distinct":
            args = (x, kv, _seq(S, batch_first=bf))
            kw["attn_mask"] = torch.randn(L, S)
            expect["bias"] = (L, S)
        else:  # separate projection weights, kdim != vdim != embed_dim
            args = (x, _seq(S, batch_first=bf, dim=48), _seq(S, batch_first=bf, dim=40))
            kw["attn_mask"] = (torch.rand(L, S) < 0.3)
            kw["attn_mask"][:, 0] = False
            expect["bias"] = (L, S)
    else:
        args = (x, x, x)
    return m, args, kw, expect


CASES = ["self_batch_first", "seq_first", "bool_mask_2d", "float_mask_3d", "kpm_bool", "kpm_float_and_mask_float",
         "is_causal_hint", "wrong_hint_with_padding", "float_causal_detected", "bool_causal_detected",
         "almost_causal", "cross_kv_same", "cross_qkv_distinct", "cross_separate"]


def _moved(device, *values):
    """values with their tensors on ``device``; one tensor passed twice stays one tensor (self-attention)."""
    memo = {}
    return [memo.setdefault(id(v), v.to(device)) if isinstance(v, torch.Tensor) else v for v in values]


@pytest.mark.parametrize("name", CASES)
def test_mha_parity(name, spy, device):
    m, args, kw, expect = _case(name)
    m.to(device)
    args = _moved(device, *args)
    kw = dict(zip(kw, _moved(device, *kw.values())))
    _parity(m, *args, **kw)
    assert len(spy) == 1, "the patched module did not run dlcv_fast's attention"
    call = spy[0]
    assert call["shape"] == (N, H, L, E // H) and bool(call["causal"]) == expect["causal"]
    bias = call["attn_bias"]
    assert (None if bias is None else tuple(bias.shape)) == expect["bias"]
    if expect["padding"] is None:
        assert call["key_padding_mask"] is None
    else:
        assert torch.equal(call["key_padding_mask"].cpu(), expect["padding"])


def test_mha_inplace_mask_change_is_seen(spy):
    """The causal check is cached per tensor: an in-place change of the mask must invalidate it."""
    m = _mha()
    x = _seq(L, batch_first=True)
    mask = _causal(L, L)
    patched = copy.deepcopy(m)
    rules.patch(patched)
    patched(x, x, x, need_weights=False, attn_mask=mask)
    assert spy[-1]["causal"] and spy[-1]["attn_bias"] is None
    mask[1, 4] = 0.0  # query 1 now sees key 4
    _parity(m, x, x, x, need_weights=False, attn_mask=mask)
    assert not spy[-1]["causal"] and spy[-1]["attn_bias"] is mask


def test_is_causal_mask_cache():
    mask = _causal(6, 9)
    assert rules.is_causal_mask(mask) and rules.is_causal_mask(_causal(9, 6, torch.bool))
    assert rules.is_causal_mask(mask[:4, :5]), "a top-left block of a causal mask is causal"
    assert not rules.is_causal_mask(mask[1:, 1:].T) and not rules.is_causal_mask(torch.zeros(6, 9))
    assert not rules.is_causal_mask(mask.clone().requires_grad_()), "a learnable mask must stay a bias"
    key = id(mask)
    assert key in rules._CAUSAL_CACHE
    mask.fill_(0.0)
    assert not rules.is_causal_mask(mask)
    del mask
    assert key not in rules._CAUSAL_CACHE, "a freed mask must leave the cache"

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    fresh = _causal(5, 5)
    with Passthrough():  # not plain eager: the mask is not read, it goes in as a bias
        assert not rules.is_causal_mask(fresh)
    assert rules.is_causal_mask(fresh)
    with Passthrough():
        assert not rules.is_causal_mask(fresh), "nor is a cached answer used there (it could be baked into a graph)"


def test_mha_autocast(spy, device):
    """Under autocast (fp16; bf16 is garbage in Triton's interpreter) fp32 weights, input and mask are fine: the
    projections come out in fp16 and so does the output, as torch's own."""
    m = _mha().to(device)
    x, mask = _moved(device, _seq(L, batch_first=True), torch.randn(L, L))
    golden = fp64_copy(m)(x.double(), x.double(), x.double(), need_weights=False, attn_mask=mask.double())[0]
    patched = copy.deepcopy(m)
    rules.patch(patched)
    with torch.autocast(device, dtype=torch.float16):
        lp = m(x, x, x, need_weights=False, attn_mask=mask)[0]
        out = patched(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert out.dtype == lp.dtype == torch.float16 and len(spy) == 1
    check_model(out, lp, golden)


def test_mha_compiles_in_one_graph(spy):
    """torch.compile traces the patched forward without a graph break (the causal check is skipped there: the
    mask goes in as a bias) and the dlcv_fast op lands in the graph."""
    m = _mha()
    patched = copy.deepcopy(m)
    rules.patch(patched)
    x, mask = _seq(L, batch_first=True), _causal(L, L)
    compiled = torch.compile(lambda t: patched(t, t, t, need_weights=False, attn_mask=mask)[0], fullgraph=True,
                             dynamic=False)
    torch.testing.assert_close(compiled(x), m(x, x, x, need_weights=False, attn_mask=mask)[0])
    assert spy and spy[0]["attn_bias"] is not None and not spy[0]["causal"]


# ------------------------------------------------------------------------------------------------
# nn.MultiheadAttention: what falls back, and falls back exactly
# ------------------------------------------------------------------------------------------------

def _fallback_case(name):
    kw = dict(need_weights=False)
    if name == "need_weights":
        m, kw = _mha(), {}
    elif name == "need_weights_per_head":
        m, kw = _mha(), dict(need_weights=True, average_attn_weights=False)
    elif name == "train_dropout":
        m = _mha(dropout=0.5).train()
    elif name == "bias_kv":
        m = _mha(add_bias_kv=True)
    elif name == "zero_attn":
        m = _mha(add_zero_attn=True)
    elif name == "float64":
        m = _mha().double()
    else:
        m = _mha()
    dtype = torch.float64 if name == "float64" else torch.float32
    x = torch.randn(L, E, dtype=dtype) if name == "unbatched" else _seq(L, batch_first=True).to(dtype)
    return m, x, kw


@pytest.mark.parametrize("name", ["need_weights", "need_weights_per_head", "train_dropout", "bias_kv", "zero_attn",
                                  "float64", "unbatched"])
def test_mha_fallback_is_exact(name, spy):
    m, x, kw = _fallback_case(name)
    patched = copy.deepcopy(m)
    rules.patch(patched)
    torch.manual_seed(1)
    ref = m(x, x, x, **kw)
    torch.manual_seed(1)
    out = patched(x, x, x, **kw)
    assert not spy, "this call must run torch's own forward"
    for a, b in zip(ref, out):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(attn_mask=torch.zeros(L, L + 1)),
                                    dict(key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))],
                         ids=["is_causal_without_mask", "mask_shape", "padding_shape"])
def test_mha_errors_unchanged(kwargs, spy):
    """A call torch rejects is rejected the same way (it runs torch's forward)."""
    m = _mha()
    patched = copy.deepcopy(m)
    rules.patch(patched)
    x = _seq(L, batch_first=True)
    with pytest.raises(Exception) as expected:
        m(x, x, x, need_weights=False, **kwargs)
    with pytest.raises(type(expected.value)) as got:
        patched(x, x, x, need_weights=False, **kwargs)
    assert str(got.value) == str(expected.value) and not spy


def test_mha_mixed_mask_types_warn_as_torch_does(spy):
    m = _mha()
    rules.patch(m)
    x = _seq(L, batch_first=True)
    with pytest.warns(UserWarning, match="deprecated"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(L, L), key_padding_mask=_padding(L))
    assert not spy


def test_mha_training_without_dropout_gradients(spy, device):
    """Training with dropout 0 runs the fused path; input, weight and mask gradients follow the rule (3x)."""
    m = _mha().train().to(device)
    x, mask = _moved(device, _seq(L, batch_first=True), torch.randn(L, L))
    patched = copy.deepcopy(m)
    rules.patch(patched)
    grads = {}
    for tag, mod in (("golden", fp64_copy(m)), ("lp", m), ("patched", patched)):
        xi, mi = (t.double() if tag == "golden" else t.clone() for t in (x, mask))
        xi.requires_grad_(), mi.requires_grad_()
        mod(xi, xi, xi, need_weights=False, attn_mask=mi)[0].square().sum().backward()
        grads[tag] = [xi.grad, mi.grad] + [p.grad for p in mod.parameters()]
    assert len(spy) == 1
    for i, (out, lp, golden) in enumerate(zip(grads["patched"], grads["lp"], grads["golden"])):
        check_model(out, lp, golden, name=f"grad {i}", factor=3 * FACTOR)


# ------------------------------------------------------------------------------------------------
# Patch mechanics
# ------------------------------------------------------------------------------------------------

class _OwnMHA(nn.MultiheadAttention):
    pass


def test_patch_unpatch_mechanics(spy):
    model = nn.Sequential(_mha(), nn.Linear(E, E), _OwnMHA(E, H, batch_first=True))
    keys = list(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    assert rules.patch(model) == 1, "only modules whose type is exactly nn.MultiheadAttention are patched"
    assert type(model[0]) is rules.PatchedMultiheadAttention and type(model[2]) is _OwnMHA
    assert isinstance(model[0], nn.MultiheadAttention) and integrations.is_patched(model)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == names
    assert rules.patch(model) == 0, "patching twice is a no-op"
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone[0]) is rules.PatchedMultiheadAttention
    x = _seq(L, batch_first=True)
    torch.testing.assert_close(clone[0](x, x, x, need_weights=False)[0], model[0](x, x, x, need_weights=False)[0])
    assert len(spy) == 2
    assert rules.unpatch(model) == 1 and rules.unpatch(model) == 0
    assert type(model[0]) is nn.MultiheadAttention and not integrations.is_patched(model)
    model[0](x, x, x, need_weights=False)
    assert len(spy) == 2, "an unpatched module must not call dlcv_fast"


def test_dispatcher_patches_mha(spy):
    model = nn.Sequential(_mha())
    assert dlcv_fast.integrations.patch(model) is model and type(model[0]) is rules.PatchedMultiheadAttention
    dlcv_fast.integrations.unpatch(model)
    assert type(model[0]) is nn.MultiheadAttention


# ------------------------------------------------------------------------------------------------
# open_clip models
# ------------------------------------------------------------------------------------------------

def _clip(vision=None, text=None):
    open_clip = pytest.importorskip("open_clip")
    vision_cfg = dict(layers=1, width=64, patch_size=16, image_size=32, head_width=32, **(vision or {}))
    text_cfg = dict(context_length=16, vocab_size=100, width=64, heads=2, layers=1, **(text or {}))
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    with torch.no_grad():  # open_clip starts biases at zero, which would hide a wrong path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _tokens():
    text = torch.randint(3, 100, (N, 16))
    text[0, 9:] = 0  # a padded text; its end-of-text token (the argmax) at 8
    text[0, 8] = 99
    return text


def _encode_parity(model, patched_count):
    images, text = torch.randn(N, 3, 32, 32), _tokens()
    golden = fp64_copy(model)
    patched = copy.deepcopy(model)
    assert integrations.patch(patched) is patched
    assert sum(type(m).__name__.startswith("Patched") for m in patched.modules()) == patched_count
    with torch.no_grad():
        check_model(patched.encode_image(images), model.encode_image(images), golden.encode_image(images.double()),
                    name="encode_image")
        check_model(patched.encode_text(text), model.encode_text(text), golden.encode_text(text), name="encode_text")
    return patched


def test_clip_parity(spy):
    patched = _encode_parity(_clip(), patched_count=2)
    assert len(spy) == 2
    image_call, text_call = spy
    assert image_call["shape"] == (N, 2, 5, 32) and not image_call["causal"] and image_call["attn_bias"] is None
    assert text_call["shape"] == (N, 2, 16, 32)
    assert text_call["causal"] and text_call["attn_bias"] is None, "open_clip's causal text mask runs as causal"
    assert type(pickle.loads(pickle.dumps(patched)).transformer.resblocks[0].attn) is rules.PatchedMultiheadAttention
    assert integrations.unpatch(patched) is patched and not integrations.is_patched(patched)


def _randomised(module):
    with torch.no_grad():  # open_clip leaves some weights empty or at zero, which would hide a wrong path
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    return module.eval()


def test_text_tower_cls_token_mask(spy):
    """embed_cls (CoCa's text tower): open_clip builds a (N*H, L, L) causal + padding float mask: a bias."""
    open_clip = pytest.importorskip("open_clip")
    tower = _randomised(open_clip.transformer.TextTransformer(context_length=16, vocab_size=100, width=64, heads=2,
                                                              layers=1, output_dim=32, embed_cls=True))
    text = _tokens()
    golden = fp64_copy(tower)(text)
    patched = copy.deepcopy(tower)
    assert rules.patch(patched) == 1
    check_model(patched(text), tower(text), golden)
    assert len(spy) == 1 and tuple(spy[0]["attn_bias"].shape) == (N, 2, 17, 17) and not spy[0]["causal"]


def test_multimodal_decoder(spy):
    """CoCa's decoder: self-attention under a slice of the causal buffer (a view: detected once, then cached) and
    cross-attention to image tokens (Lq != Lk; key and value are separate tensors)."""
    open_clip = pytest.importorskip("open_clip")
    decoder = _randomised(open_clip.transformer.MultimodalTransformer(width=64, layers=1, heads=2, context_length=16,
                                                                      output_dim=32))
    images, text = torch.randn(N, 5, 64), torch.randn(N, 12, 64)
    golden = fp64_copy(decoder)(images.double(), text.double())
    patched = copy.deepcopy(decoder)
    assert rules.patch(patched) == 2
    check_model(patched(images, text), decoder(images, text), golden)
    self_call, cross_call = spy
    assert self_call["causal"] and self_call["attn_bias"] is None and self_call["shape"] == (N, 2, 12, 32)
    assert not cross_call["causal"] and cross_call["attn_bias"] is None and cross_call["shape"] == (N, 2, 12, 32)
    cached = len(rules._CAUSAL_CACHE)
    patched(images, text)
    assert spy[2]["causal"] and len(rules._CAUSAL_CACHE) == cached


def test_clip_custom_attention(spy):
    """open_clip's own Attention (CustomResidualAttentionBlock): qk-norm, head scale and inner norm run fused, the
    text tower's causal mask as causal."""
    model = _clip(vision=dict(scale_heads=True), text=dict(qk_norm=True, scale_heads=True, scale_attn_inner=True))
    with torch.no_grad():
        for attn in (model.visual.transformer.resblocks[0].attn, model.transformer.resblocks[0].attn):
            attn.head_scale.uniform_(0.5, 1.5)
    patched = _encode_parity(model, patched_count=2)
    assert len(spy) == 2 and not spy[0]["causal"] and spy[1]["causal"] and spy[1]["attn_bias"] is None
    attn = patched.transformer.resblocks[0].attn
    assert type(attn) is rules.PatchedAttention and type(attn).__module__ == rules.__name__
    assert type(pickle.loads(pickle.dumps(attn))) is rules.PatchedAttention
    assert integrations.unpatch(patched) is patched
    assert type(attn) is type(model.transformer.resblocks[0].attn) and not integrations.is_patched(patched)


@pytest.mark.parametrize("mode", ["dropout", "scaled_cosine"])
def test_custom_attention_fallback_is_exact(mode, spy):
    """Attention dropout in training, and scaled cosine attention, run open_clip's own code (which, for scaled
    cosine attention, open_clip 3.3 itself cannot run on batched heads: the same error either way)."""
    open_clip = pytest.importorskip("open_clip")
    attn = open_clip.transformer.Attention(64, 2, scaled_cosine=mode == "scaled_cosine", attn_drop=0.5).train(
        mode == "dropout")
    patched = copy.deepcopy(attn)
    assert rules.patch(patched) == 1
    x, mask = torch.randn(N, L, 64), _causal(L, L)
    outputs = []
    for module in (attn, patched):
        torch.manual_seed(1)
        try:
            outputs.append(module(x, attn_mask=mask))
        except Exception as error:  # noqa: BLE001
            outputs.append(repr(error))
    assert not spy
    assert outputs[0] == outputs[1] if isinstance(outputs[0], str) else torch.equal(*outputs)


def test_clip_gradients(spy):
    """Training mode (no dropout in CLIP): the patched model's parameter gradients follow the rule (3x)."""
    model = _clip().train()
    images, text = torch.randn(N, 3, 32, 32), _tokens()
    grads = {}
    for tag, mod in (("golden", fp64_copy(model)), ("lp", model), ("patched", copy.deepcopy(model))):
        if tag == "patched":
            integrations.patch(mod)
        img = images.double() if tag == "golden" else images
        loss = (mod.encode_image(img) * mod.encode_text(text)).sum()
        loss.backward()
        grads[tag] = {n: p.grad for n, p in mod.named_parameters() if p.grad is not None}
    assert len(spy) == 2 and set(grads["patched"]) == set(grads["lp"])
    for name, golden in grads["golden"].items():
        check_model(grads["patched"][name], grads["lp"][name], golden, name=f"grad {name}", factor=3 * FACTOR)
