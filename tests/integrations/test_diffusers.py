"""dlcv_fast.integrations.diffusers: diffusers' Attention through DlcvAttnProcessor.

Each model or module is built with random weights; the original is run in float64 (golden) and float32 (lp), a
patched float32 copy must satisfy ``max|patched - golden| <= 4 * max|lp - golden| + 1e-7``. A spy on
``dlcv_fast.ops.attention.attention_with_lse`` (under both public attention functions) counts the kernel calls and
records the mask each one got.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

import dlcv_fast  # noqa: E402
import dlcv_fast.ops.attention as attn_ops  # noqa: E402
from dlcv_fast.integrations import diffusers as dd  # noqa: E402
from dlcv_fast.integrations import is_patched  # noqa: E402
from tests.models.common import check_model, fp64_copy, to64  # noqa: E402
from tests.parity import assert_parity  # noqa: E402


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call of the attention kernel: its q/k shapes and masks."""
    calls = []
    real = attn_ops.attention_with_lse

    def spy(q, k, v, **kwargs):
        calls.append(dict(kwargs, q_shape=tuple(q.shape), k_shape=tuple(k.shape)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(attn_ops, "attention_with_lse", spy)
    return calls


def tiny_unet():
    # attention_head_dim is the head count in UNet2DConditionModel: 8 heads of 4 and 8 channels.
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def attention_modules(model):
    return [m for m in model.modules() if type(m) is Attention]


def run_three(module, *args, **kwargs):
    """(golden float64, lp float32, patched float32) outputs of ``module`` (left unpatched) on the inputs."""
    patched = copy.deepcopy(module)
    assert dd.patch(patched) == len(attention_modules(module)) > 0
    with torch.no_grad():
        golden = fp64_copy(module)(*map(to64, args), **{k: to64(v) for k, v in kwargs.items()})
        lp = module(*args, **kwargs)
        out = patched(*args, **kwargs)
    return golden, lp, out


def test_unet_cross_attention_with_padding_mask(kernel_calls):
    unet = tiny_unet()
    sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 7, 32)
    keep = torch.ones(2, 7)
    keep[1, 4:] = 0  # the second prompt is 4 tokens long
    golden, lp, out = run_three(unet, sample, t, text, encoder_attention_mask=keep)
    check_model(out.sample, lp.sample, golden.sample)
    # 4 transformer blocks: a self- and a cross-attention each; the U-Net's -1e4 mask bias reaches the cross ones.
    assert len(kernel_calls) == 8
    cross = [c for c in kernel_calls if c["k_shape"][2] == 7]
    self_ = [c for c in kernel_calls if c["k_shape"][2] != 7]
    assert len(cross) == 4 and all(c["q_shape"][2] in (64, 16) for c in cross)
    assert all(c["attn_bias"] is not None and c["attn_bias"].shape[-2:] == (1, 7) for c in cross)
    assert all(c["attn_bias"] is None and c["key_padding_mask"] is None for c in self_)
    with torch.no_grad():  # the mask matters: the same prompts unmasked are far off
        unmasked = unet(sample, t, text).sample
    assert (unmasked - golden.sample).abs().max() > 100 * (lp.sample - golden.sample).abs().max()


def test_vae_mid_block_attention(kernel_calls):
    # Image (B, C, H, W) input, group norm, residual connection: one head of 32 channels over 8 x 8 positions.
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4, sample_size=8).eval()
    image = torch.randn(2, 3, 8, 8)
    golden, lp, out = run_three(vae, image, sample_posterior=False)
    check_model(out.sample, lp.sample, golden.sample)
    assert [c["q_shape"] for c in kernel_calls] == [(2, 1, 64, 32)] * 2


def bool_padding(b, lk):
    keep = torch.ones(b, 1, lk, dtype=torch.bool)
    keep[1, :, lk - 5:] = False
    return keep


CROSS = dict(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
# (name, processor, Attention options, input shape, key/value input shape, mask, what the kernel gets)
BARE_CASES = [
    ("sdpa-self-image", AttnProcessor2_0, dict(query_dim=32, heads=2, dim_head=16, bias=True, norm_num_groups=8,
                                               residual_connection=True, rescale_output_factor=2.0),
     (2, 32, 5, 5), None, None, "none"),
    ("sdpa-cross-bool-padding", AttnProcessor2_0, dict(CROSS, cross_attention_norm="layer_norm", qk_norm="layer_norm"),
     (2, 9, 32), (2, 13, 24), lambda: bool_padding(2, 13), "key_padding_mask"),
    ("sdpa-cross-float-mask", AttnProcessor2_0, CROSS, (2, 9, 32), (2, 13, 24), lambda: torch.randn(2, 9, 13),
     "attn_bias"),
    # AttnProcessor ignores qk_norm and uses attn.scale (1 with scale_qk=False): the patch must too.
    ("eager-self", AttnProcessor, dict(query_dim=32, heads=2, dim_head=16, qk_norm="layer_norm", scale_qk=False),
     (2, 11, 32), None, None, "none"),
    ("eager-cross-mask", AttnProcessor, dict(CROSS, cross_attention_norm="group_norm",
                                             cross_attention_norm_num_groups=4),
     (2, 9, 32), (2, 13, 24), lambda: (~bool_padding(2, 13)).float() * -1e4, "attn_bias"),
]


def make_attention(processor, options):
    attn = Attention(**options)
    attn.set_processor(processor())
    for p in attn.parameters():  # LayerNorm/GroupNorm start at 1/0: give every weight a random value
        torch.nn.init.normal_(p, std=0.3)
    return attn.eval()


@pytest.mark.parametrize("name,processor,options,x_shape,ctx_shape,mask,route", BARE_CASES,
                         ids=[c[0] for c in BARE_CASES])
def test_bare_attention(kernel_calls, name, processor, options, x_shape, ctx_shape, mask, route):
    attn = make_attention(processor, options)
    x = torch.randn(x_shape)
    kwargs = {}
    if ctx_shape is not None:
        kwargs["encoder_hidden_states"] = torch.randn(ctx_shape)
    if mask is not None:
        kwargs["attention_mask"] = mask()
    golden, lp, out = run_three(attn, x, **kwargs)
    check_model(out, lp, golden)
    assert len(kernel_calls) == 1
    call = kernel_calls[0]
    masks = {"key_padding_mask": call["key_padding_mask"], "attn_bias": call["attn_bias"]}
    assert {k for k, m in masks.items() if m is not None} == (set() if route == "none" else {route})
    if processor is AttnProcessor:
        assert call["scale"] == attn.scale


def test_training_with_output_dropout_runs_the_kernel(kernel_calls):
    """Neither standard processor drops attention probabilities; the output dropout runs as before."""
    attn = make_attention(AttnProcessor2_0, dict(CROSS, dropout=0.5)).train()
    patched = copy.deepcopy(attn)
    dd.patch(patched)
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 13, 24)
    torch.manual_seed(1)
    ref = attn(x, ctx)
    torch.manual_seed(1)
    out = patched(x, ctx)
    assert len(kernel_calls) == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # same dropout mask, same values
    assert (ref == 0).float().mean() > 0.3  # dropout was active


FALLBACK_CASES = [  # (name, processor, Attention options, input shape, dtype)
    ("added-kv-projection", AttnProcessor2_0, dict(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=8),
     (2, 9, 32), torch.float32),
    ("float64-sdpa", AttnProcessor2_0, dict(query_dim=32, heads=2, dim_head=16), (2, 9, 32), torch.float64),
    ("float64-eager", AttnProcessor, dict(query_dim=32, heads=2, dim_head=16), (2, 9, 32), torch.float64),
    ("head-dim-288", AttnProcessor2_0, dict(query_dim=288, heads=1, dim_head=288), (1, 5, 288), torch.float32),
    ("head-dim-288-eager", AttnProcessor, dict(query_dim=288, heads=1, dim_head=288), (1, 5, 288), torch.float32),
]


@pytest.mark.parametrize("name,processor,options,x_shape,dtype", FALLBACK_CASES, ids=[c[0] for c in FALLBACK_CASES])
def test_fallback_gives_the_original_result(kernel_calls, name, processor, options, x_shape, dtype):
    attn = make_attention(processor, options).to(dtype)
    patched = copy.deepcopy(attn)
    assert dd.patch(patched) == 1 and isinstance(patched.processor, dd.DlcvAttnProcessor)
    x = torch.randn(x_shape, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(patched(x), attn(x))
    assert kernel_calls == []


def test_patch_twice_unpatch_and_module_names():
    unet = tiny_unet()
    shared = AttnProcessor()  # set_attn_processor with one processor gives every module that same object
    unet.set_attn_processor(shared)
    keys, names = list(unet.state_dict()), [n for n, _ in unet.named_modules()]
    custom = type("MyProcessor", (AttnProcessor2_0,), {})()  # a subclass: not a processor the patch reproduces
    mods = attention_modules(unet)
    mods[0].set_processor(custom)
    assert dd.patch(unet) == len(mods) - 1 == 7
    assert dd.patch(unet) == 0 and is_patched(unet)
    assert mods[0].processor is custom and not hasattr(mods[0], "_dlcv_patched")
    assert all(m._dlcv_patched is True and type(m.processor) is dd.DlcvAttnProcessor for m in mods[1:])
    assert list(unet.state_dict()) == keys and [n for n, _ in unet.named_modules()] == names
    assert all(type(m) is Attention for m in mods)
    # A processor set over the patch leaves a stale mark: the next patch clears it (or wraps a standard one).
    mods[1].set_processor(custom)
    mods[2].set_processor(AttnProcessor2_0())
    assert dd.patch(unet) == 1 and not hasattr(mods[1], "_dlcv_patched") and mods[2]._dlcv_patched
    assert dd.unpatch(unet) == 6 and not is_patched(unet)
    assert [m.processor is shared for m in mods] == [False, False, False] + [True] * 5
    assert type(mods[2].processor) is AttnProcessor2_0
    assert dd.unpatch(unet) == 0


def test_unpatch_restores_the_original(kernel_calls):
    attn = make_attention(AttnProcessor2_0, CROSS)
    original = attn.processor
    patched = copy.deepcopy(attn)
    dd.patch(patched)
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 13, 24)
    with torch.no_grad():
        patched(x, ctx)
        assert len(kernel_calls) == 1
        assert dd.unpatch(patched) == 1 and type(patched.processor) is AttnProcessor2_0
        assert torch.equal(patched(x, ctx), attn(x, ctx)) and len(kernel_calls) == 1
    assert dd.patch(attn) == 1 and dd.unpatch(attn) == 1 and attn.processor is original
    assert "_dlcv_patched" not in attn.__dict__


def test_dlcv_fast_patch_dispatches_to_diffusers(kernel_calls):
    for name in ("timm", "open_clip", "transformers"):  # the dispatcher imports the rules of loaded libraries
        pytest.importorskip(f"dlcv_fast.integrations.{name}")
    attn = make_attention(AttnProcessor, CROSS)
    assert dlcv_fast.patch(attn) is attn and is_patched(attn)
    with torch.no_grad():
        attn(torch.randn(2, 9, 32), torch.randn(2, 13, 24))
    assert len(kernel_calls) == 1
    assert dlcv_fast.unpatch(attn) is attn and not is_patched(attn)


def test_backward(kernel_calls):
    """Gradients of inputs and weights through a masked cross-attention, within 3x PyTorch's own float32 error."""
    attn = make_attention(AttnProcessor2_0, dict(CROSS, residual_connection=False))
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 13, 24)
    mask = bool_padding(2, 13)
    gout = torch.randn(2, 9, 32)

    def grads(module, dtype):
        xs = [t.to(dtype).requires_grad_() for t in (x, ctx)]
        module(xs[0], xs[1], attention_mask=mask).backward(gout.to(dtype))
        return [t.grad for t in xs] + [module.to_q.weight.grad, module.to_k.weight.grad, module.to_v.weight.grad]

    patched = copy.deepcopy(attn)
    dd.patch(patched)
    golden, lp, out = grads(fp64_copy(attn), torch.float64), grads(attn, torch.float32), grads(patched, torch.float32)
    assert len(kernel_calls) == 1 and kernel_calls[0]["key_padding_mask"] is not None
    for name, o, g, r in zip(("x", "context", "to_q", "to_k", "to_v"), out, golden, lp):
        assert_parity(o, g, r, factor=3.0, atol=1e-7, name=f"grad {name}")
