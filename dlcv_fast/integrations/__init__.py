"""Patch a model built with timm, open_clip, transformers or diffusers so its attention runs on dlcv_fast.

:func:`patch` walks a model and swaps, in place, the attention of the modules it knows (each library's file
here says which); :func:`unpatch` undoes it. Parameters, buffers, state_dict keys, module names and
``isinstance`` answers stay as they were: a patched module keeps its own weights and only its attention
step changes. A patched module whose call asks for something the fused kernels do not do (attention dropout
while training, returned attention weights, ...) runs its library's own code for that call, so a patch never
changes what a model computes beyond rounding (one documented exception: a query row whose keys are all masked out
gives zeros, where torch's SDPA on a GPU gives NaN).

Each library's rules live in their own file with two functions, ``patch(model) -> int`` and
``unpatch(model) -> int`` (the number of modules changed). A library that was never imported cannot have
built any module of the model, so it is not imported here either.
"""
from __future__ import annotations

import importlib
import sys

from torch import nn

# (file here, the top-level package whose modules it patches)
_LIBRARIES = (("timm", "timm"), ("open_clip", "torch"), ("transformers", "transformers"),
              ("diffusers", "diffusers"))


def _rules():
    for name, package in _LIBRARIES:
        if package in sys.modules:
            yield importlib.import_module(f"dlcv_fast.integrations.{name}")


def patch(model: nn.Module) -> nn.Module:
    """Run ``model``'s attention on dlcv_fast's kernels, in place; returns ``model``.

    Patched: timm's ``Attention`` / ``AttentionRope`` (ViT, DeiT, EVA, ...) and ``SwinTransformerBlock`` (its whole
    shifted-window attention step through :func:`dlcv_fast.window_attention`); ``torch.nn.MultiheadAttention``
    (open_clip's towers, ``nn.Transformer`` layers) and open_clip's own ``Attention``; transformers models, switched
    to a registered ``"dlcv_fast"`` attention implementation; diffusers' ``Attention`` through an attention
    processor. Patching twice is a no-op. Raises ValueError when the model holds none of these.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    changed = sum(rules.patch(model) for rules in _rules())
    if not changed and not is_patched(model):
        raise ValueError(
            f"dlcv_fast.patch found nothing to patch in {type(model).__name__}: it knows timm's Attention, "
            f"AttentionRope and SwinTransformerBlock, torch.nn.MultiheadAttention and open_clip's Attention, "
            f"transformers models that use its attention interface and diffusers' Attention (exact classes, "
            f"not subclasses)")
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on ``model`` (in place); returns ``model``. A model never patched is left as is."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for rules in _rules():
        rules.unpatch(model)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs patched attention."""
    return any(getattr(m, "_dlcv_patched", False) for m in model.modules())
