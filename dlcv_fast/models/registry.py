"""timm-style model registry: ``@register_model`` on a constructor makes it reachable by name."""
from __future__ import annotations

import fnmatch

_MODELS = {}


def register_model(fn):
    """Register ``fn`` (a constructor taking keyword overrides) under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern="*"):
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name, **kwargs):
    """Build the registered model ``name`` with randomly initialised weights; ``kwargs`` override its config
    (e.g. ``num_classes=10``, ``img_size=384``, ``drop_path_rate=0.1``).

    There are no downloadable weights: load them from the reference library, e.g.
    ``from_timm(timm.create_model(name, pretrained=True))``.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def load_reference(model, m, state_dict=None):
    """Load ``m``'s weights (``state_dict``, default ``m.state_dict()``; strict) into ``model``, then give it m's
    device, dtype and train/eval mode. The converters' last step."""
    ref = next(m.parameters())
    model.load_state_dict(m.state_dict() if state_dict is None else state_dict)
    return model.to(device=ref.device, dtype=ref.dtype).train(m.training)


def timm_regularisers(model, m, our_blocks, ref_blocks):
    """Carry timm's stochastic depth over, block by block, and refuse dropout (which our models do not have).

    Each timm block's ``drop_path1`` / ``drop_path2`` rate (its DropPath's ``drop_prob``) becomes our block's
    rate, so fine-tuning the converted model regularises like the original. Any ``nn.Dropout`` with p > 0
    (timm's ``drop_rate``, ``proj_drop_rate``, ``attn_drop_rate``) raises NotImplementedError instead of being
    dropped silently. Returns ``model``."""
    from torch import nn

    from dlcv_fast.nn.block import DropPath

    live = [name for name, x in m.named_modules() if isinstance(x, nn.Dropout) and x.p > 0]
    if live:
        raise NotImplementedError(
            f"the timm model has dropout > 0 ({', '.join(live[:3])}{', ...' if len(live) > 3 else ''}); "
            f"dlcv_fast's models have none: create it with drop_rate=0, proj_drop_rate=0 and attn_drop_rate=0 "
            f"(stochastic depth, drop_path_rate, is carried over)")
    our_blocks, ref_blocks = list(our_blocks), list(ref_blocks)
    if len(our_blocks) != len(ref_blocks):
        raise ValueError(f"{len(our_blocks)} blocks here, {len(ref_blocks)} in the timm model")
    for ours, ref in zip(our_blocks, ref_blocks):
        rates = [float(getattr(getattr(ref, name, None), "drop_prob", 0.0)) for name in ("drop_path1", "drop_path2")]
        targets = ["drop_path1", "drop_path2"] if hasattr(ours, "drop_path1") else ["drop_path"]
        if len(targets) == 1 and rates[0] != rates[1]:
            raise NotImplementedError(f"timm block with different drop-path rates {rates} on its two branches")
        for name, rate in zip(targets, rates):
            setattr(ours, name, DropPath(rate) if rate > 0 else nn.Identity())
    return model.train(m.training)  # the new modules take the model's mode
