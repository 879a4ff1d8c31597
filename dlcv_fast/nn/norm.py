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
    the norm itself), under autocast (whose LayerNorm runs in float32), and for shapes the kernel does not
    take (a normalised shape of more than one dim, rows longer than 8192).
    """

    def _fused(self, x):
        return (len(self.normalized_shape) == 1 and x.dtype in _ln_ops.SUPPORTED_DTYPES
                and x.shape[-1] <= _ln_ops.MAX_N and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(x.device.type)
                and _backend.get_backend() in ("auto", "triton")
                and (x.device.type == "cuda" or _backend.interpreting()))

    def forward(self, x, residual=None):
        if self._fused(x):
            return _ln_ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)
        if residual is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        s = x + residual
        return F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps), s
