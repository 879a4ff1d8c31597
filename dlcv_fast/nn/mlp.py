"""Feed-forward pieces of the transformer blocks, with timm's parameter names."""
from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation of OpenAI's CLIP weights."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def make_act(name):
    """The activation module named ``name``: "gelu" (exact, erf) or "quick_gelu"."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; keys ``fc1``, ``fc2`` as in timm's ``Mlp``."""

    def __init__(self, in_features, hidden_features, out_features=None, *, act="gelu", bias=True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
