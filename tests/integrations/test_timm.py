"""dlcv_fast.patch on timm models: ViT / DeiT attention, AttentionRope, Swin blocks.

Each parity test runs timm's model in float64 (golden) and float32 (timm's own error), patches a float32 copy and
holds it to the model rule of tests/models/common.py. Spies count the calls that reach dlcv_fast's ops, so a patch
that silently did nothing fails.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import dlcv_fast
from dlcv_fast.integrations import is_patched
from dlcv_fast.ops import attention as attention_ops
from tests.models.common import check_model

timm = pytest.importorskip("timm")
from timm.layers.attention import Attention, AttentionRope  # noqa: E402
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


@pytest.fixture
def spy(monkeypatch):
    """Counts of the calls that reach dlcv_fast's attention and window-attention ops."""
    calls = {"attention": 0, "window": 0}
    attention, window = attention_ops.attention_with_lse, dlcv_fast.window_attention

    def counting_attention(*args, **kwargs):
        calls["attention"] += 1
        return attention(*args, **kwargs)

    def counting_window(*args, **kwargs):
        calls["window"] += 1
        return window(*args, **kwargs)

    monkeypatch.setattr(attention_ops, "attention_with_lse", counting_attention)
    monkeypatch.setattr(dlcv_fast, "window_attention", counting_window)
    return calls


def _sharpen(model):
    """timm initialises its Linears with std 0.02, which leaves attention almost uniform (a wrong mask or rotation
    would then hardly show): give the q/k/v projections and biases weights that make the softmax peaked."""
    for name, p in model.named_parameters():
        if any(part in name for part in ("qkv", "q_proj", "k_proj", "q_bias", "v_bias", "relative_position_bias")):
            p.data.normal_(0.0, 0.5)
    return model


def _vit(sharpen=True, **kw):
    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    model = VisionTransformer(**{**cfg, **kw}).eval()
    return _sharpen(model) if sharpen else model


def _swin(img_size=(28, 42), sharpen=True, **kw):
    torch.manual_seed(0)
    cfg = dict(img_size=img_size, patch_size=2, embed_dim=32, depths=(2,), num_heads=(1,), window_size=7,
               num_classes=5)
    model = SwinTransformer(**{**cfg, **kw}).eval()
    return _sharpen(model) if sharpen else model


def _parity(model, *inputs, grad=False):
    """Patched float32 copy against timm in float64 (golden) and float32; with ``grad``, also the gradients of
    the inputs and of every parameter."""
    def run(m, dtype):
        xs = [x.to(dtype).requires_grad_(grad) if x.is_floating_point() else x for x in inputs]
        out = m(*xs)
        if not grad:
            return out, []
        out.sum().backward()
        return out, [x.grad for x in xs if x.is_floating_point()] + [p.grad for p in m.parameters()]

    golden, golden_g = run(copy.deepcopy(model).double(), torch.float64)
    lp, lp_g = run(copy.deepcopy(model), torch.float32)
    patched = dlcv_fast.patch(copy.deepcopy(model))
    out, out_g = run(patched, torch.float32)
    check_model(out, lp, golden)
    for i, (o, l, g) in enumerate(zip(out_g, lp_g, golden_g)):
        if g is not None:
            check_model(o, l, g, name=f"gradient {i}")
    return patched


def test_vit_parity_routes_through_dlcv_fast(spy):
    model = _vit(qkv_bias=True, qk_norm=True)
    patched = _parity(model, torch.randn(2, 3, 32, 32))
    assert spy["attention"] == 1
    assert type(patched.blocks[0].attn).__name__ == "PatchedAttention"
    assert isinstance(patched.blocks[0].attn, Attention)
    assert patched.state_dict().keys() == model.state_dict().keys()


def test_vit_gradients(spy):
    _parity(_vit(depth=1, class_token=False, global_pool="avg"), torch.randn(2, 3, 32, 32), grad=True)
    assert spy["attention"] >= 1


@pytest.mark.parametrize("mask", ["bool_padding", "float", "causal"])
def test_attention_masks(spy, mask):
    torch.manual_seed(1)
    attn = Attention(64, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 9, 64)
    kwargs = {}
    if mask == "bool_padding":
        keep = torch.ones(2, 9, dtype=torch.bool)
        keep[1, 6:] = False
        kwargs["attn_mask"] = keep[:, None, None, :]
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 9, 9)
    else:
        kwargs["is_causal"] = True
    golden = copy.deepcopy(attn).double()(x.double(), **{k: v.double() if torch.is_tensor(v) and v.is_floating_point()
                                                          else v for k, v in kwargs.items()})
    lp = attn(x, **kwargs)
    out = dlcv_fast.patch(copy.deepcopy(attn))(x, **kwargs)
    check_model(out, lp, golden)
    assert spy["attention"] == 1


def test_attention_rope_gqa(spy):
    torch.manual_seed(2)
    attn = AttentionRope(64, num_heads=4, num_kv_heads=2, qkv_fused=False, num_prefix_tokens=1,
                         rotate_half=True).eval()
    x = torch.randn(2, 10, 64)
    rope = torch.randn(9, 32)  # (tokens after the prefix, 2 * head_dim): sin then cos, as timm lays them out
    golden = copy.deepcopy(attn).double()(x.double(), rope=rope.double())
    lp = attn(x, rope=rope)
    out = dlcv_fast.patch(copy.deepcopy(attn))(x, rope=rope)
    check_model(out, lp, golden)
    assert spy["attention"] == 1


@pytest.mark.parametrize("img_size, window", [((28, 42), 7), ((30, 18), 4)])
def test_swin_parity(spy, img_size, window):
    """Shifted and unshifted blocks; (30, 18) / patch 2 = 15 x 9 tokens is not a multiple of the window 4, so
    the map is padded (padding tokens carry the qkv bias)."""
    model = _swin(img_size, window_size=window)
    patched = _parity(model, torch.randn(1, 3, *img_size))
    blocks = patched.layers[0].blocks
    assert [tuple(b.shift_size) for b in blocks] == [(0, 0), (window // 2,) * 2]
    assert all(isinstance(b, SwinTransformerBlock) and type(b).__name__ == "PatchedSwinTransformerBlock"
               for b in blocks)
    assert spy["window"] == 2 and spy["attention"] == 0


def test_swin_training_gradients(spy):
    """One training-mode step (stochastic depth off): loss and every gradient, incl. the bias tables."""
    model = _swin((28, 28), window_size=7, drop_path_rate=0.0).train()
    _parity(model, torch.randn(2, 3, 28, 28), grad=True)
    assert spy["window"] >= 2


def test_dropout_in_training_falls_back(spy):
    model = _vit(attn_drop_rate=0.5).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    expected = model(x)
    patched = dlcv_fast.patch(copy.deepcopy(model))
    torch.manual_seed(5)
    torch.testing.assert_close(patched(x), expected, rtol=0, atol=0)
    assert spy["attention"] == 0
    patched.eval()
    patched(x)
    assert spy["attention"] == 1  # eval turns dropout off: fused again


def test_swin_hook_on_attn_falls_back(spy):
    model = dlcv_fast.patch(_swin((14, 14)))
    seen = []
    model.layers[0].blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randn(1, 3, 14, 14))
    assert len(seen) == 1 and spy["window"] == 1  # the hooked block ran timm's code, the other one ours


def test_unpatch_patch_twice_and_pickle():
    model = _vit()
    classes = [type(m) for m in model.modules()]
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    dlcv_fast.patch(model)
    from dlcv_fast.integrations import timm as timm_rules

    assert timm_rules.patch(model) == 0  # already patched
    assert is_patched(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.blocks[0].attn) is type(model.blocks[0].attn)
    assert type(pickle.loads(pickle.dumps(model.blocks[0].attn))).__name__ == "PatchedAttention"
    assert dlcv_fast.unpatch(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert not is_patched(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_subclasses_are_left_alone():
    class MyAttention(Attention):
        pass

    model = nn.Sequential(MyAttention(64, num_heads=2))
    with pytest.raises(ValueError, match="nothing to patch"):
        dlcv_fast.patch(model)
    assert type(model[0]) is MyAttention


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dlcv_fast.patch(lambda x: x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dlcv_fast.unpatch("model")


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_torch_compile_fullgraph(arch, spy):
    """A patched timm model traces whole under torch.compile (the swapped classes call registered custom ops),
    and its compiled step equals its eager step."""
    from tests.models.test_training import check_compiled_step

    # timm's own initialisation (the sharpened weights' rounding differences exceed the compiled-vs-eager tolerance)
    model = _vit(False, num_classes=5) if arch == "vit" else _swin((28, 28), False, drop_path_rate=0.0)
    x = torch.randn(2, 3, *((32, 32) if arch == "vit" else (28, 28)))
    check_compiled_step(dlcv_fast.patch(model.train()), x, torch.tensor([1, 3]), "torch")
    assert spy["attention" if arch == "vit" else "window"] > 0


@pytest.mark.parametrize("fused_qkv", [True, False])
def test_eva02_with_rope(spy, fused_qkv):
    """An EVA-02-style model (EvaAttention: q / v biases and a zero k bias, timm's 2D RoPE, SwiGLU): the whole
    model against timm in float64 / float32, with the fused qkv Linear and with separate projections."""
    from timm.models.eva import Eva

    torch.manual_seed(3)
    model = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=5, qkv_fused=fused_qkv,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), swiglu_mlp=True, scale_mlp=True).eval()
    patched = _parity(_sharpen(model), torch.randn(2, 3, 32, 32))
    assert type(patched.blocks[0].attn).__name__ == "PatchedEvaAttention" and spy["attention"] == 1


def test_unfused_attention_with_a_hook_on_attn_drop_falls_back(spy):
    """The attention-map recipe (fused_attn = False and a hook on attn_drop, which then sees the probabilities):
    the hooked module runs timm's code; without the hook the unfused setting alone keeps our kernel."""
    model = dlcv_fast.patch(_vit(depth=2))
    x = torch.randn(1, 3, 32, 32)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    model(x)
    assert spy["attention"] == 2
    maps = []
    model.blocks[1].attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o))
    out = model(x)
    assert spy["attention"] == 3 and len(maps) == 1 and maps[0].shape == (1, 2, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 2, 17))
    unpatched = dlcv_fast.unpatch(copy.deepcopy(model))
    check_model(out, unpatched(x), copy.deepcopy(unpatched).double()(x.double()))


def test_swin_hook_inside_attn_falls_back(spy):
    """A hook on a module inside the Swin block's attention (here timm's softmax): timm's windowed code runs, so
    the hook sees the (windows, heads, N, N) probabilities it expects."""
    model = dlcv_fast.patch(_swin((14, 14)))
    seen = []
    model.layers[0].blocks[0].attn.softmax.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randn(1, 3, 14, 14))
    assert seen == [(1, 1, 49, 49)] and spy["window"] == 1  # a 7 x 7 map: one window


def test_fx_feature_extraction(spy):
    """timm's FX feature extractor traces a patched model (timm's own code is traced) and gives its features."""
    from timm.models import create_feature_extractor

    model = _vit(depth=2)
    x = torch.randn(1, 3, 32, 32)
    expected = create_feature_extractor(copy.deepcopy(model), ["blocks.1"])(x)["blocks.1"]
    extractor = create_feature_extractor(dlcv_fast.patch(model), ["blocks.1"])
    torch.testing.assert_close(extractor(x)["blocks.1"], expected)
    assert spy["attention"] == 0
