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
