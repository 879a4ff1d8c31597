"""ViT / DeiT against timm on the same random weights (fp32 ours vs fp64 timm, rule in tests/models/common.py).

Full-size models run on the reference backend ("torch"); our Triton kernels run on tiny configs (through
Triton's interpreter on a CPU-only machine).
"""
import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer as TimmViT

import dlcv_fast
from dlcv_fast.models import VisionTransformer, create_model, from_timm, list_models, save_attention_overlay
from tests.models.common import check_model, fp64_copy
from tests.models.test_nn_attention import explicit_probs


def timm_tiny(distilled=False, **kw):
    cfg = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=2, **kw)
    return (VisionTransformerDistilled if distilled else TimmViT)(**cfg).eval()


def run_parity(ref, x, backend, *, dev="cpu"):
    ours = from_timm(ref).to(dev)
    with torch.no_grad():
        with dlcv_fast.use_backend(backend):
            out = ours(x.to(dev))
        check_model(out, ref(x), fp64_copy(ref)(x.double()))
    return ours


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_full_size_parity_reference_backend(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    run_parity(ref, torch.randn(1, 3, 224, 224), "torch")


def test_other_image_size_interpolates_pos_embed():
    """A 224 model on a 160 x 256 input: position embeddings resampled as timm's dynamic_img_size does."""
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    run_parity(ref, torch.randn(1, 3, 160, 256), "torch")


@pytest.mark.parametrize("kind", ["distilled", "avg_pool"])
def test_tiny_parity_triton_kernels(kind, device):
    torch.manual_seed(2)
    ref = timm_tiny(distilled=True) if kind == "distilled" else timm_tiny(global_pool="avg", class_token=False)
    run_parity(ref, torch.randn(2, 3, 32, 32), "triton", dev=device)


def test_deit_distilled_heads():
    """Training returns (head, head_dist) logits; eval returns their mean (DeiT)."""
    torch.manual_seed(3)
    model = create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        cls_logits, dist_logits = model.train()(x)
        torch.testing.assert_close(model.eval()(x), (cls_logits + dist_logits) / 2)


TIMM_VITS = [n for n in list_models("vit_*") + list_models("deit_*") if n != "vit_tiny_patch32_224"]  # not in timm


@pytest.mark.parametrize("name", TIMM_VITS)
def test_registry_matches_timm_layout(name):
    """Every registered ViT/DeiT has exactly timm's state_dict keys and shapes (built on the meta device)."""
    with torch.device("meta"):
        ours, ref = create_model(name), timm.create_model(name, pretrained=False, num_classes=1000)
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs


def test_from_timm_keeps_dtype_and_mode():
    ref = timm_tiny().double().train()
    ours = from_timm(ref)
    assert ours.training and next(ours.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_nonexistent")


def test_from_timm_carries_stochastic_depth_and_refuses_dropout():
    ref = timm_tiny(drop_path_rate=0.2)
    ours = from_timm(ref)
    assert not ours.training and not ours.blocks[1].drop_path.training
    ref_rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in ref.blocks]
    assert [getattr(b.drop_path, "p", 0.0) for b in ours.blocks] == ref_rates
    assert ref_rates == pytest.approx([0.0, 0.2])
    for kw, match in ((dict(drop_rate=0.1), "dropout > 0"), (dict(attn_drop_rate=0.1), "dropout > 0"),
                      (dict(patch_drop_rate=0.1), "patch dropout")):
        with pytest.raises(NotImplementedError, match=match):
            from_timm(timm_tiny(**kw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layer", [0, -1])
def test_attention_maps_are_the_class_row(backend, layer, device):
    """forward_attention_maps == the class row of the explicit softmax(QK^T * scale), over the patches."""
    dev = "cpu" if backend == "torch" else device
    torch.manual_seed(4)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, distilled=True).to(dev)
    x = torch.randn(2, 3, 32, 40, device=dev)  # a 4 x 5 grid: the embeddings are resampled too
    with dlcv_fast.use_backend(backend), torch.no_grad():
        maps = model.forward_attention_maps(x, layer=layer)
        tokens, _ = model._embed(x)
        blocks = list(model.blocks)
        for blk in blocks[:layer % len(blocks)]:
            tokens = blk(tokens)
        blk = blocks[layer]
        q, k, _ = blk.attn._qkv(blk.norm1(tokens))
    expected = explicit_probs(q, k, blk.attn.scale)[:, :, 0, 2:].reshape(2, 2, 4, 5)
    assert maps.shape == (2, 2, 4, 5)
    torch.testing.assert_close(maps.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rope", ["axial", "mixed"])
def test_rope_vit(rope, device):
    """RoPE-ViT variant: kernels (rotary applied in attention) == reference; maps use the rotated q and k."""
    torch.manual_seed(6)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=3,
                              rope=rope, pos_embed=False)
    x = torch.randn(2, 3, 32, 32)
    with dlcv_fast.use_backend("torch"):
        out = model(x)
        maps = model.forward_attention_maps(x, layer=1)
    out.sum().backward()
    if rope == "mixed":
        assert model.rope.freqs.grad is not None and model.rope.freqs.grad.abs().sum() > 0
    with dlcv_fast.use_backend("triton"), torch.no_grad():
        kernel_model = model.to(device)
        torch.testing.assert_close(kernel_model(x.to(device)).cpu(), out.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kernel_model.forward_attention_maps(x.to(device), layer=1).cpu(), maps.detach(),
                                   atol=1e-6, rtol=1e-5)


def test_attention_overlay_png(tmp_path):
    torch.manual_seed(5)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    x = torch.randn(1, 3, 32, 32)
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        maps = model.forward_attention_maps(x)
    path = save_attention_overlay(x[0], maps[0], tmp_path / "attn.png", mean=(0.485, 0.456, 0.406),
                                  std=(0.229, 0.224, 0.225))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
