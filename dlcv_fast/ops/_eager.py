"""The eager fast path of the custom ops: the same implementations and backward, without the dispatcher.

Each op is a ``torch.library.custom_op`` with ``register_autograd``, which is what torch.compile, export,
FakeTensor and opcheck see. Calling such an op from plain eager code costs extra Python per forward +
backward on top of the kernels (argument normalisation, alias checks, the generic autograd wrapper): this
route saves about 160 us of an attention fwd+bwd's 350-480 us of host time on the 2-core CI machine (kernels
stubbed out). That is the GPU time of a small attention call, so the public functions take
a shorter route when nothing but plain eager autograd is watching: an ``autograd.Function`` that runs the
op's own implementation and the op's own backward. Anything else (compiling, a dispatch or torch-function
mode such as FakeTensorMode or export's tracers, functorch transforms, torch.jit.trace, tensor subclasses, meta
tensors) goes through the registered op, so both routes give bitwise-equal results (tested).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_DEVICES = ("cpu", "cuda")


def direct_call_ok(*tensors) -> bool:
    """Whether a call on these tensors (None allowed) can skip the custom-op dispatcher."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state() is not None:
        return False  # functorch transforms; torch.jit.trace (which records the registered op, not a kernel)
    return all(t is None or (type(t) in _PLAIN_TYPES and t.device.type in _DEVICES) for t in tensors)


def autograd_function(name: str, impl: Callable, setup_context: Callable, backward: Callable,
                      non_differentiable: Sequence[int] = ()) -> type:
    """An ``autograd.Function`` whose forward is ``impl(*args)`` followed by ``setup_context(ctx, args, out)`` and
    whose backward is ``backward(ctx, *grads)``: the pieces a custom op registers with ``register_autograd``.
    Outputs at the ``non_differentiable`` positions get no gradient. Double backward raises (once_differentiable),
    as it does through the registered op."""

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        if non_differentiable:
            ctx.mark_non_differentiable(*(out[i] for i in non_differentiable))
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(once_differentiable(bwd)),
        "impl": staticmethod(impl),
        "__doc__": f"Eager route of {name}: the custom op's implementation and backward without the dispatcher.",
    })


def routed(op, function: type) -> Callable:
    """A callable taking ``op``'s arguments: when :func:`direct_call_ok` holds for its tensor arguments,
    ``function.apply`` (an :func:`autograd_function` of the op's pieces), or the bare implementation when no
    gradient can flow (grad mode off, or no input requires grad: inference skips the autograd.Function's own
    overhead); else the registered ``op``."""

    def call(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if direct_call_ok(*tensors):
            if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
                return function.apply(*args)
            return function.impl(*args)
        return op(*args)
    return call
