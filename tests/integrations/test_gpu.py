"""bf16 on a GPU: reference-library models patched with dlcv_fast.patch, held to issue 6's model rule
(``max|patched_bf16 - theirs_fp32| <= 2 * max|theirs_bf16 - theirs_fp32| + 1e-2``), full size. The GPU machine has
timm and transformers (no open_clip, no diffusers)."""
import copy

import pytest
import torch

import dlcv_fast
from tests.models.test_gpu import bf16_check, hf_clip_b32_case

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_patched_bf16(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    patched = dlcv_fast.patch(copy.deepcopy(ref))
    bf16_check(patched, ref, torch.randn(8, 3, 224, 224), name=name)


def test_transformers_clip_patched_bf16():
    ref, inputs = hf_clip_b32_case()

    def logits(m, image, text, attention_mask):
        return m(input_ids=text, pixel_values=image, attention_mask=attention_mask).logits_per_image

    bf16_check(dlcv_fast.patch(copy.deepcopy(ref)), ref, *inputs, call=logits, name="logits_per_image")


def test_transformers_blip2_qformer_patched_bf16():
    """BLIP-2's Q-Former at full size: 32 queries over 257 image tokens (issue 2's Q-Former shape), hidden 768."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig()).eval()
    patched = dlcv_fast.patch(copy.deepcopy(ref))

    def features(m, queries, image):
        return m(query_embeds=queries, encoder_hidden_states=image).last_hidden_state

    bf16_check(patched, ref, torch.randn(8, 32, 768), torch.randn(8, 257, 1408), call=features, name="Q-Former")
