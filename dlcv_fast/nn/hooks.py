"""What a shortcut must check first: forward hooks it would skip, and whether the call is plain eager PyTorch."""
from __future__ import annotations

import torch

from dlcv_fast.ops._eager import direct_call_ok


def has_forward_hooks(module) -> bool:
    """Whether calling ``module`` would run forward hooks (its own or global ones)."""
    from torch.nn.modules import module as m

    return bool(module._forward_hooks or module._forward_pre_hooks or m._global_forward_hooks
                or m._global_forward_pre_hooks)


def plain_eager(*tensors) -> bool:
    """Whether this call runs in plain eager mode on real CPU/CUDA tensors (None allowed), so that it may read
    tensor values on the host to choose shapes: not under torch.compile, torch.jit.trace, a functorch transform
    (vmap, grad), a fake or meta tensor mode or a dispatch mode, nor during CUDA-graph capture."""
    if not direct_call_ok(*tensors):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
