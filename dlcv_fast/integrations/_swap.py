"""The class swap that the timm and open_clip rules use to patch modules in place."""
from __future__ import annotations

from torch import nn


def swap_classes(model: nn.Module, table: dict) -> int:
    """Give every module of ``model`` whose type is exactly a key of ``table`` the class it maps to (parameters,
    buffers and hooks stay on the instance); returns how many modules changed. Patching passes ``{library class:
    patched subclass}``, unpatching the inverse."""
    changed = 0
    for module in model.modules():
        new = table.get(type(module))
        if new is not None:
            module.__class__ = new
            changed += 1
    return changed
