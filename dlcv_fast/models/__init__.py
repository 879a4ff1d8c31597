"""Weight-compatible models on dlcv_fast kernels: ViT/DeiT, Swin, CLIP, the BLIP-2 Q-Former and the
latent-diffusion U-Net.

``create_model(name, **kw)`` builds a registered model (``list_models()``) with random weights;
``from_timm(m)``, ``from_open_clip(m)``, ``from_transformers(m)`` and ``from_diffusers(m)`` build ours from a
reference model, weights included. ViT/DeiT and Swin use timm's state_dict keys, the Q-Former transformers' and
the U-Net diffusers', so their checkpoints load directly.
"""
from dlcv_fast.models.clip import CLIP, TextTransformer, clip_from_open_clip, clip_from_transformers
from dlcv_fast.models.plotting import save_attention_overlay
from dlcv_fast.models.qformer import QFormer, qformer_from_transformers
from dlcv_fast.models.registry import create_model, list_models, register_model
from dlcv_fast.models.swin import SwinTransformer, swin_from_timm
from dlcv_fast.models.unet import UNet2DConditionModel, unet_from_diffusers
from dlcv_fast.models.vit import VisionTransformer, vit_from_timm


def from_timm(m):
    """Our model with the configuration and weights of a timm ``VisionTransformer`` (incl. DeiT's
    ``VisionTransformerDistilled``) or ``SwinTransformer``."""
    name = type(m).__name__
    if name in ("VisionTransformer", "VisionTransformerDistilled"):
        return vit_from_timm(m)
    if name == "SwinTransformer":
        return swin_from_timm(m)
    raise NotImplementedError(f"from_timm: {name} is not supported (VisionTransformer, "
                              f"VisionTransformerDistilled, SwinTransformer)")


def from_open_clip(m):
    """Our :class:`CLIP` with the configuration and weights of an open_clip ``CLIP`` (ViT towers)."""
    return clip_from_open_clip(m)


def from_transformers(m):
    """Our model with the configuration and weights of a Hugging Face ``CLIPModel`` (:class:`CLIP`) or
    ``Blip2QFormerModel`` (:class:`QFormer`)."""
    name = type(m).__name__
    if name == "CLIPModel":
        return clip_from_transformers(m)
    if name == "Blip2QFormerModel":
        return qformer_from_transformers(m)
    hint = "; for BLIP-2 pass the model's .qformer" if hasattr(m, "qformer") else ""
    raise NotImplementedError(f"from_transformers: {name} is not supported (CLIPModel, Blip2QFormerModel){hint}")


def from_diffusers(m):
    """Our :class:`UNet2DConditionModel` with the configuration and weights of a diffusers
    ``UNet2DConditionModel`` (the latent-diffusion U-Net)."""
    name = type(m).__name__
    if name != "UNet2DConditionModel":
        raise NotImplementedError(f"from_diffusers: {name} is not supported (UNet2DConditionModel)")
    return unet_from_diffusers(m)


__all__ = ["CLIP", "QFormer", "SwinTransformer", "TextTransformer", "UNet2DConditionModel", "VisionTransformer",
           "create_model", "from_diffusers", "from_open_clip", "from_timm", "from_transformers", "list_models",
           "register_model", "save_attention_overlay"]
