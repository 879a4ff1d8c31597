"""The latent-diffusion U-Net against diffusers' UNet2DConditionModel on the same random weights.

Rule of tests/models/common.py: ours in fp32 vs diffusers in fp64 (golden) and fp32, factor 4 (outputs and
gradients). Tiny SD1-like (1x1-conv projections, one head count) and SD2-like (linear projections, per-block head
counts, layer counts and transformer depths) configs; the reference backend ("torch") and our Triton kernels
(through Triton's interpreter on a CPU-only machine).
"""
import copy

import pytest
import torch
from torch import nn

import dlcv_fast
from dlcv_fast.models import from_diffusers
from dlcv_fast.models.unet import Attention, UNet2DConditionModel, unet_config_from_diffusers
from dlcv_fast.ops import attention as attention_ops
from tests.models.common import check_model, fp64_copy

diffusers = pytest.importorskip("diffusers")

SD1_TINY = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=8)
# Linear projections; 2 heads of 16 at 32 channels, 4 of 16 at 64 (SD2's attention_head_dim list); per-block layer
# counts and transformer depths (the mid block gets 2); a text width unlike the channels; the other sinusoid order.
SD2_TINY = dict(SD1_TINY, use_linear_projection=True, attention_head_dim=(2, 4), layers_per_block=(1, 2),
                transformer_layers_per_block=(1, 2), cross_attention_dim=24, flip_sin_to_cos=False, freq_shift=1,
                upcast_attention=True)
# The other supported options, off their defaults (reference backend only): diffusers' "UNetRes" block-name prefix,
# padding-free downsampling, a mid-block scale factor, centred input, other time-embedding width, kernel sizes and
# eps; resnet_out_scale_factor, which diffusers does not read for these blocks (nor do we).
VARIANTS_TINY = dict(SD1_TINY, down_block_types=("UNetResCrossAttnDownBlock2D", "DownBlock2D"), downsample_padding=0,
                     mid_block_scale_factor=1.5, center_input_sample=True, time_embedding_dim=48, conv_in_kernel=1,
                     conv_out_kernel=5, norm_eps=1e-6, resnet_out_scale_factor=2.0)
CONFIGS = {"sd1": SD1_TINY, "sd2": SD2_TINY, "variants": VARIANTS_TINY}


def tiny_unet(name, seed=0):
    """diffusers' U-Net with its default random init, plus noise on every bias and norm weight (all zeros and
    ones otherwise, which would hide a swapped or unused one)."""
    torch.manual_seed(seed)
    m = diffusers.UNet2DConditionModel(**CONFIGS[name]).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def make_inputs(name, *, batch=2, size=(8, 8), seq=6, mask=None):
    """Latents, text features and ``encoder_attention_mask``: None, "pad" (the last prompt keeps its first half)
    or "empty" (the last prompt keeps nothing)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, *size, generator=g)
    ctx = torch.randn(batch, seq, CONFIGS[name]["cross_attention_dim"], generator=g)
    keep = None
    if mask is not None:
        keep = torch.ones(batch, seq, dtype=torch.long)
        keep[-1, seq // 2 if mask == "pad" else 0:] = 0
    return x, ctx, keep


TIMESTEPS = {"int": 999, "tensor": torch.tensor([3, 640])}


def run_parity(name, mask, timestep, backend, size=(8, 8)):
    ref = tiny_unet(name)
    ours = from_diffusers(ref)
    x, ctx, keep = make_inputs(name, size=size, mask=mask)
    t = TIMESTEPS[timestep]
    with torch.no_grad():
        golden = fp64_copy(ref)(x.double(), t, ctx.double(), encoder_attention_mask=keep).sample
        theirs = ref(x, t, ctx, encoder_attention_mask=keep).sample
        with dlcv_fast.use_backend(backend):
            out = ours(x, t, ctx, keep)
    assert out.shape == theirs.shape == (2, 4, *size)
    check_model(out, theirs, golden)


@pytest.mark.parametrize("name", ["sd1", "sd2", "variants"])
def test_state_dict_matches_diffusers(name):
    ref = tiny_unet(name)
    ours = UNet2DConditionModel(**unet_config_from_diffusers(ref.config))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict())  # strict, directly


@pytest.mark.parametrize("name, mask, timestep, size", [
    ("sd1", None, "int", (8, 8)),
    ("sd1", "pad", "tensor", (8, 8)),
    ("sd1", "empty", "int", (8, 8)),  # a prompt with every token masked: diffusers' -1e4 bias masks nothing
    ("sd2", None, "tensor", (8, 8)),
    ("sd2", "pad", "int", (8, 8)),
    ("sd1", "pad", "tensor", (7, 10)),  # odd height: the upsampler matches the skip connection's size
    ("variants", "pad", "tensor", (8, 8)),
])
def test_parity_reference_backend(name, mask, timestep, size):
    run_parity(name, mask, timestep, "torch", size)


@pytest.mark.parametrize("name, mask, timestep", [("sd1", "pad", "int"), ("sd2", None, "tensor")])
def test_parity_triton_kernels(name, mask, timestep):
    run_parity(name, mask, timestep, "triton")


def test_gradients_triton_kernels():
    """loss.backward() through the kernels (forward and backward): the gradients of the latents, the text
    features and a few weights (self- and cross-attention projections, feed-forward, conv_in, time MLP)."""
    ref = tiny_unet("sd1")
    ref64 = fp64_copy(ref)
    ours = from_diffusers(ref)
    x, ctx, keep = make_inputs("sd1", mask="pad")
    w = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 420])
    blk = "down_blocks.0.attentions.0.transformer_blocks.0."
    params = [blk + "attn1.to_q.weight", blk + "attn1.to_v.weight", blk + "attn2.to_k.weight",
              "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight",
              "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", blk + "norm2.weight",
              "conv_in.weight", "time_embedding.linear_1.weight"]

    def grads(model, dtype, run):
        xi, ci = (t.to(dtype, copy=True).requires_grad_() for t in (x, ctx))  # fresh leaves: no shared .grad
        model.zero_grad()
        (run(model, xi, ci) * w.to(dtype)).sum().backward()
        named = dict(model.named_parameters())
        return [xi.grad, ci.grad] + [named[p].grad for p in params]

    def theirs(m, xi, ci):
        return m(xi, t, ci, encoder_attention_mask=keep).sample

    golden, fp32 = grads(ref64, torch.float64, theirs), grads(ref, torch.float32, theirs)
    with dlcv_fast.use_backend("triton"):
        out = grads(ours, torch.float32, lambda m, xi, ci: m(xi, t, ci, keep))
    for name, o, r, g in zip(["sample", "encoder_hidden_states"] + params, out, fp32, golden):
        check_model(o, r, g, name=f"grad {name}")


def test_attention_runs_on_dlcv_fast(monkeypatch):
    """Every attention call goes through dlcv_fast's op: two per transformer block (4 blocks in the tiny SD1
    config); self-attention q, k, v are views of one GEMM output, cross-attention k, v of another, the padding
    mask reaches the cross-attention only."""
    calls = []
    real = attention_ops.attention_with_lse

    def spy(q, k, v, **kw):
        calls.append((q, k, v, kw.get("key_padding_mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention_ops, "attention_with_lse", spy)
    ours = from_diffusers(tiny_unet("sd1"))
    x, ctx, keep = make_inputs("sd1", mask="pad")
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        ours(x, 10, ctx, keep)
    assert len(calls) == 8
    self_calls, cross_calls = calls[0::2], calls[1::2]
    for q, k, v, mask in self_calls:
        assert q.shape[2] == k.shape[2] and mask is None
        assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    for q, k, v, mask in cross_calls:
        assert k.shape[2] == ctx.shape[1]
        assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
        assert torch.equal(mask, keep.bool())
    assert [q.shape[1:] for q, *_ in self_calls] == [(8, 64, 4), (8, 16, 8), (8, 64, 4), (8, 64, 4)]


class LoraLinear(nn.Linear):
    """A LoRA-style projection: the base weight plus a rank-r update, applied in forward (not in .weight)."""

    def __init__(self, base, rank=2):
        super().__init__(base.in_features, base.out_features, bias=False)
        self.weight.data.copy_(base.weight)
        self.A = nn.Parameter(0.3 * torch.randn(rank, base.in_features))
        self.B = nn.Parameter(0.3 * torch.randn(base.out_features, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.A.t() @ self.B.t()


def test_wrapped_projections_are_called():
    """A projection that is not a plain Linear is called as it is, not bypassed through its ``.weight`` by the
    fused GEMM: the same output as with its update merged into the weight."""
    ours = from_diffusers(tiny_unet("sd1"))
    merged = copy.deepcopy(ours)
    for mod, merged_mod in zip(ours.modules(), merged.modules()):
        if isinstance(mod, Attention):
            for name in ("to_q", "to_v"):  # self-attention's fused q/k/v, cross-attention's q and k/v GEMMs
                lora = LoraLinear(getattr(mod, name))
                setattr(mod, name, lora)
                getattr(merged_mod, name).weight.data += lora.B.data @ lora.A.data
    x, ctx, _ = make_inputs("sd1")
    with torch.no_grad(), dlcv_fast.use_backend("torch"):
        out, expected = ours(x, 10, ctx), merged(x, 10, ctx)
        assert (out - from_diffusers(tiny_unet("sd1"))(x, 10, ctx)).abs().max() > 1e-2  # the updates matter
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(num_class_embeds=10), "num_class_embeds"),
    (dict(addition_embed_type="text"), "addition_embed_type"),
    (dict(time_cond_proj_dim=8), "time_cond_proj_dim"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(dual_cross_attention=True), "dual_cross_attention"),
    (dict(attention_type="gated"), "attention_type"),
    (dict(only_cross_attention=True), "only_cross_attention"),
    (dict(dropout=0.1), "dropout"),
    (dict(encoder_hid_dim=16), "encoder_hid_dim"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(timestep_post_act="silu"), "timestep_post_act"),
    (dict(time_embedding_act_fn="silu"), "time_embedding_act_fn"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(mid_block_type=None), "mid_block_type"),
    (dict(down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D")),
     "AttnDownBlock2D"),
])
def test_unsupported_configs_raise(kw, match):
    m = diffusers.UNet2DConditionModel(**{**SD1_TINY, **kw})
    with pytest.raises(NotImplementedError, match=match):
        from_diffusers(m)


def test_freeu_gradient_checkpointing_and_bad_blocks_raise():
    m = tiny_unet("sd1")
    m.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(NotImplementedError, match="FreeU"):
        from_diffusers(m)
    m.disable_freeu()
    m.enable_gradient_checkpointing()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        from_diffusers(m)
    with pytest.raises(NotImplementedError, match="SimpleCrossAttnDownBlock2D"):
        UNet2DConditionModel(down_block_types=("SimpleCrossAttnDownBlock2D",) * 4)


def test_from_diffusers_keeps_dtype_and_mode():
    ours = from_diffusers(tiny_unet("sd1").double().train())
    assert ours.training and next(ours.parameters()).dtype == torch.float64
    ours = from_diffusers(tiny_unet("sd1"))
    assert not ours.training and next(ours.parameters()).dtype == torch.float32


@pytest.mark.gpu
def test_sd15_widths_bf16_gpu():
    """SD1.5's widths, heads (8 x 40 at 320 channels), text width and block types, one layer per block, at 64x64
    latents, batch 2, a padded prompt: ours in bf16 vs diffusers in bf16, both against diffusers in fp32
    (tests/models/test_gpu.py's rule: ours' error <= 2x theirs + 1e-2)."""
    from tests.models.test_gpu import bf16_check

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                                         layers_per_block=1, cross_attention_dim=768, attention_head_dim=8).eval()
    ours = from_diffusers(ref)
    x, ctx = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    keep = torch.ones(2, 77, dtype=torch.long)
    keep[1, 20:] = 0
    t = torch.tensor([50, 800])

    def call(m, sample, timestep, context, mask):
        if isinstance(m, UNet2DConditionModel):
            return m(sample, timestep, context, mask)
        return m(sample, timestep, context, encoder_attention_mask=mask).sample

    bf16_check(ours, ref, x, t, ctx, keep, call=call, name="sd15 unet")


@pytest.mark.parametrize("name, config", [
    ("unet_sd15", dict(cross_attention_dim=768, attention_head_dim=8)),
    ("unet_sd21", dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                       upcast_attention=True)),
])
def test_registered_names_are_the_stable_diffusion_unets(name, config):
    """create_model's U-Nets have the parameter names and shapes of diffusers' SD 1.5 / SD 2.1 U-Nets (built on
    the meta device: no memory, no time), so those checkpoints load into them."""
    from dlcv_fast.models import create_model

    with torch.device("meta"):
        ours = create_model(name)
        theirs = diffusers.UNet2DConditionModel(sample_size=64, **config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    heads = [(name, m.heads) for name, m in theirs.named_modules() if name.endswith(("attn1", "attn2"))]
    assert heads and [(name, ours.get_submodule(name).heads) for name, _ in heads] == heads


def test_mask_forms_diffusers_accepts():
    """A (B, 1, Lk) mask and a float mask run as in diffusers (which turns m into a (1 - m) * -10000 bias: 0/1
    values; 0.25 is already a -7500 bias, i.e. masked)."""
    ref = tiny_unet("sd1")
    ours = from_diffusers(ref)
    x, ctx, keep = make_inputs("sd1", mask="pad")
    soft = keep.float() * 0.75 + 0.25 * (keep == 1).float()  # 1.0 where kept ...
    soft[-1, -1] = 0.25  # ... and a masked token written as 0.25
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        for mask in (keep[:, None, :], soft):
            golden = fp64_copy(ref)(x.double(), 999, ctx.double(), encoder_attention_mask=mask.double()).sample
            check_model(ours(x, 999, ctx, mask), ref(x, 999, ctx, encoder_attention_mask=mask).sample, golden)


def test_fused_projections_refused_clearly():
    ref = tiny_unet("sd1")
    ref.fuse_qkv_projections()
    with pytest.raises(NotImplementedError, match="unfuse_qkv_projections"):
        from_diffusers(ref)
