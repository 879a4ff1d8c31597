"""CLIP against open_clip and Hugging Face transformers on the same random weights.

Small configs (the full ViT-B towers are too slow for the CPU suite; their key layouts are checked on the
meta device). fp32 ours vs fp64 reference, rule in tests/models/common.py.
"""
import pytest
import torch

import dlcv_fast
from dlcv_fast.models import CLIP, create_model, from_open_clip, from_transformers
from dlcv_fast.models.clip import open_clip_state_dict
from tests.models.common import check_model, fp64_copy

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")


def small_open_clip(quick_gelu):
    vision = open_clip.CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=16, image_size=64)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=500, width=48, heads=4, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()


def open_clip_text(B, vocab=500, L=77, eot=499):
    """open_clip-style tokens: start token, words, the end-of-text token (the largest id), zero padding."""
    g = torch.Generator().manual_seed(0)
    text = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(1, L - 1, (1,), generator=g))
        text[b, : n] = torch.randint(1, eot, (n,), generator=g)
        text[b, n] = eot
    return text


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_open_clip_parity(quick_gelu):
    torch.manual_seed(0)
    ref = small_open_clip(quick_gelu)
    ours = from_open_clip(ref)
    ref64 = fp64_copy(ref)
    image, text = torch.randn(2, 3, 64, 64), open_clip_text(3)
    with torch.no_grad(), dlcv_fast.use_backend("torch"):
        check_model(ours.encode_image(image), ref.encode_image(image), ref64.encode_image(image.double()), name="image")
        check_model(ours.encode_text(text), ref.encode_text(text), ref64.encode_text(text), name="text")
        logits, logits_t = ours(image, text)
        f_img, f_txt, scale = ref(image, text)
        f_img64, f_txt64, scale64 = ref64(image.double(), text)
        check_model(logits, scale * f_img @ f_txt.t(), scale64 * f_img64 @ f_txt64.t(), name="logits")
        torch.testing.assert_close(logits_t, logits.t())


@pytest.mark.parametrize("name,oc_name", [("clip_vit_b32", "ViT-B-32"), ("clip_vit_b16", "ViT-B-16")])
def test_open_clip_full_size_layout(name, oc_name):
    """The converted state_dict of open_clip's full ViT-B model has exactly our model's keys and shapes."""
    with torch.device("meta"):
        ours, ref = create_model(name), open_clip.create_model(oc_name, pretrained=None, device="meta")
    converted = {k: v.shape for k, v in open_clip_state_dict(ref.state_dict()).items()}
    assert converted == {k: v.shape for k, v in ours.state_dict().items()}


def small_hf_clip(layers=2, eos_token_id=99):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=layers, max_position_embeddings=20, eos_token_id=eos_token_id,
                         bos_token_id=98, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=layers,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return transformers.CLIPModel(cfg).eval()


def hf_batch(eos=99):
    """Right-padded ids with the padding mask (one row without padding), EOS not the largest id in row 2."""
    ids = torch.randint(1, 98, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.long)
    for b, n in enumerate([12, 7, 9]):
        ids[b, n - 1] = eos
        ids[b, n:], mask[b, n:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("eos_token_id", [99, 2], ids=["eos_first_occurrence", "legacy_argmax"])
def test_transformers_parity(eos_token_id):
    torch.manual_seed(1)
    ref = small_hf_clip(eos_token_id=eos_token_id)
    ours = from_transformers(ref)
    ref64 = fp64_copy(ref)
    image = torch.randn(2, 3, 32, 32)
    ids, mask = hf_batch(eos=99 if eos_token_id == 99 else 97)
    with torch.no_grad(), dlcv_fast.use_backend("torch"):
        out, out64 = ref(input_ids=ids, pixel_values=image, attention_mask=mask), \
            ref64(input_ids=ids, pixel_values=image.double(), attention_mask=mask)
        logits, logits_t = ours(image, ids, mask)
    check_model(logits, out.logits_per_image, out64.logits_per_image, name="logits_per_image")
    check_model(logits_t, out.logits_per_text, out64.logits_per_text, name="logits_per_text")
    with torch.no_grad(), dlcv_fast.use_backend("torch"):
        check_model(ours.encode_text(ids, mask, normalize=True), out.text_embeds, out64.text_embeds, name="text")


def test_transformers_parity_triton_kernels(device):
    """Both towers on our kernels: the text tower's causal + key-padding masks in the kernel, no mask tensor."""
    torch.manual_seed(2)
    ref = small_hf_clip(layers=1)
    ours = from_transformers(ref).to(device)
    ref64 = fp64_copy(ref)
    image = torch.randn(2, 3, 32, 32)
    ids, mask = hf_batch()
    with torch.no_grad(), dlcv_fast.use_backend("triton"):
        logits, _ = ours(image.to(device), ids.to(device), mask.to(device))
    with torch.no_grad():
        check_model(logits, ref(input_ids=ids, pixel_values=image, attention_mask=mask).logits_per_image,
                    ref64(input_ids=ids, pixel_values=image.double(), attention_mask=mask).logits_per_image)


def test_clip_attention_maps_and_text_length():
    model = CLIP(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                 context_length=8, vocab_size=50, text_width=32, text_heads=2, text_layers=1)
    with dlcv_fast.use_backend("torch"), torch.no_grad():
        assert model.forward_attention_maps(torch.randn(1, 3, 32, 32)).shape == (1, 2, 4, 4)
        with pytest.raises(ValueError, match="context_length"):
            model.encode_text(torch.zeros(1, 9, dtype=torch.long))
