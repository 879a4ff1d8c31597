"""Whether a module's forward hooks would run: fused fast paths that skip a module's own call step aside then."""
from __future__ import annotations


def has_forward_hooks(module) -> bool:
    """Whether calling ``module`` would run forward hooks (its own or global ones)."""
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks)
