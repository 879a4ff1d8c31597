"""LayerNorm that can take the residual add of a pre-norm block with it (one kernel instead of two passes)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dlcv_fast import backend as _backend
from dlcv_fast.ops import layer_norm as _ln_ops


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same arguments, parameters and state_dict keys) whose forward also takes a residual.

    ``norm(x)`` is the plain LayerNorm; ``norm(x, residual=r)`` returns ``(LayerNorm(x + r), x + r)``. Where
    the Triton kernels run (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``) both come from one
    kernel (:func:`dlcv_fast.layer_norm`). Elsewhere it is eager PyTorch: CPU tensors, the "torch" and "cuda"
    backends (there is no hand-written CUDA LayerNorm), under ``torch.compile`` (inductor fuses the add and
    the norm itself), under autocast (whose LayerNorm runs in float32), for inputs the kernel does not take
    (a normalised shape of more than one dim, rows longer than 8192, a residual that broadcasts, dtypes
    other than fp16/bf16/fp32), and for CUDA tensors of fewer than ``FUSED_MIN_ELEMENTS`` elements: there a
    forward is bound by the host's launch time, not by memory traffic, and the eager ops cost less Python.
    """

    FUSED_MIN_ELEMENTS = 1 << 20  # e.g. ViT-B's 197 x 768 tokens per image: fused from batch 7 on

    def _fused(self, x, residual):
        if len(self.normalized_shape) != 1 or x.shape[-1] != self.normalized_shape[0]:
            return False
        if x.device.type == "cuda":
            if x.numel() < self.FUSED_MIN_ELEMENTS:
                return False
        elif x.device.type != "cpu" or not _backend.interpreting():  # e.g. meta tensors: eager
            return False
        ok = _ln_ops.SUPPORTED_DTYPES
        return (x.dtype in ok and x.shape[-1] <= _ln_ops.MAX_N
                and (residual is None or (residual.shape == x.shape and residual.dtype in ok
                                          and residual.device == x.device))
                and (self.weight is None or self.weight.dtype in ok and self.weight.device == x.device)
                and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(x.device.type)
                and _backend.get_backend() in ("auto", "triton"))

    def forward(self, x, residual=None):
        if self._fused(x, residual):
            return _ln_ops.layer_norm_unchecked(x, residual, self.weight, self.bias, self.eps)
        if residual is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        s = x + residual
        return F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps), s
