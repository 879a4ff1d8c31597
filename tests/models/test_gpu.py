"""bf16 on a GPU: our models vs the reference library, both against the reference in fp32 (same weights).

Rule (issue 6): ``max|ours_bf16 - theirs_fp32| <= 2 * max|theirs_bf16 - theirs_fp32| + 1e-2``. Full-size models.
The GPU machine has timm and transformers but not open_clip, so CLIP is checked against Hugging Face's CLIPModel
in the ViT-B/32 configuration.
"""
import copy

import pytest
import torch

import dlcv_fast
from dlcv_fast.models import from_timm, from_transformers
from tests.parity import assert_parity

pytestmark = pytest.mark.gpu


def bf16_check(ours, ref, *inputs, call=lambda m, *a: m(*a), name="output"):
    ref32 = ref.cuda().float().eval()
    ref16 = copy.deepcopy(ref32).bfloat16()
    ours16 = ours.cuda().bfloat16().eval()
    inputs = [t.cuda() for t in inputs]
    lp_inputs = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        golden = call(ref32, *inputs).float()
        theirs = call(ref16, *lp_inputs).float()
        with dlcv_fast.use_backend("triton"):
            out = call(ours16, *lp_inputs).float()
    assert_parity(out, golden, theirs, factor=2.0, atol=1e-2, name=name)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "swin_tiny_patch4_window7_224"])
def test_timm_bf16(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    bf16_check(from_timm(ref), ref, torch.randn(8, 3, 224, 224), name=name)


def hf_clip_b32_case():
    """A Hugging Face CLIPModel in the ViT-B/32 configuration (openai/clip-vit-base-patch32) with random weights,
    and its inputs: 4 images, 8 texts of 21 tokens padded to 77 with their attention mask."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(vision_config=dict(patch_size=32))).eval()
    ids = torch.randint(1, 49406, (8, 77))
    ids[:, 0], ids[:, 20] = 49406, 49407
    mask = torch.ones(8, 77, dtype=torch.long)
    mask[:, 21:] = 0
    return ref, (torch.randn(4, 3, 224, 224), ids, mask)


def test_clip_b32_bf16():
    import transformers

    ref, inputs = hf_clip_b32_case()

    def logits(m, image, text, attention_mask):
        if isinstance(m, transformers.CLIPModel):
            return m(input_ids=text, pixel_values=image, attention_mask=attention_mask).logits_per_image
        return m(image, text, attention_mask)[0]

    bf16_check(from_transformers(ref), ref, *inputs, call=logits, name="logits_per_image")


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_bf16_fused_mlp(name, monkeypatch):
    """The same rule with each MLP's fc1 and GELU in one GEMM (dlcv_fast.nn.mlp.FUSED_LINEAR_ACT, off by
    default): ViT-B's 3072-wide hidden layer (128x256 tiles) and Swin's 384- to 3072-wide ones."""
    timm = pytest.importorskip("timm")
    from dlcv_fast.nn import mlp

    monkeypatch.setattr(mlp, "FUSED_LINEAR_ACT", True)
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    bf16_check(from_timm(ref), ref, torch.randn(8, 3, 224, 224), name=name)
