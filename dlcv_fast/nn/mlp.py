"""Feed-forward pieces of the transformer blocks, with timm's parameter names."""
from __future__ import annotations

import torch
from torch import nn

from dlcv_fast import backend as _backend
from dlcv_fast.nn.hooks import has_forward_hooks
from dlcv_fast.ops import linear_act as _linear_act_ops

# Inference with fc1 and its activation in one Triton GEMM (dlcv_fast.ops.linear_act): off by default. On an H200
# (2026-11-29) it beat cuBLAS + the separate GELU at Swin-T stage 1's fc1 (0.675 vs 0.706 ms) but not at
# ViT-B's (0.568 vs 0.539 ms); the model benchmark's dlcv_fast+fused_mlp provider turns it on.
FUSED_LINEAR_ACT = False


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
        self.act_name = act
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def _fused(self, x):
        """Whether fc1 + act run as one GEMM: with FUSED_LINEAR_ACT on, where the Triton kernels run, in fp16/bf16
        (fp32 stays on cuBLAS), outside torch.compile and autocast, when autograd does not record (the fused
        op keeps no pre-activation for a backward), and when fc1 and act are the plain modules built here with no
        forward hooks (a LoRA-wrapped or quantised fc1, a swapped activation or a hook must not be bypassed)."""
        if not FUSED_LINEAR_ACT or type(self.fc1) is not nn.Linear or type(self.act) is not ACTIVATIONS[self.act_name]:
            return False
        if has_forward_hooks(self.fc1) or has_forward_hooks(self.act):
            return False
        if not (x.device.type == "cuda" or x.device.type == "cpu" and _backend.interpreting()):
            return False  # meta tensors, other devices: eager
        w = self.fc1.weight
        return (x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
                and _backend.get_backend() in ("auto", "triton"))

    def forward(self, x):
        if self._fused(x):
            return self.fc2(_linear_act_ops.linear_act(x, self.fc1.weight, self.fc1.bias, self.act_name))
        return self.fc2(self.act(self.fc1(x)))
