"""The public functions' eager route (dlcv_fast/ops/_eager.py) against the registered custom ops.

In plain eager code the public functions skip the custom-op dispatcher (an autograd.Function running the op's
own implementation and backward); under compile, dispatch or torch-function modes, functorch transforms,
tensor subclasses or meta tensors they call the registered op. Both routes must give bitwise-equal outputs
and gradients, and the right route must be taken."""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dlcv_fast
from dlcv_fast.ops import _eager


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class Subclass(torch.Tensor):
    pass


def test_direct_call_only_in_plain_eager():
    x = torch.randn(2, 3)
    assert _eager.direct_call_ok(x, None, torch.nn.Parameter(torch.randn(2)))
    assert not _eager.direct_call_ok(x, torch.randn(2).as_subclass(Subclass))
    assert not _eager.direct_call_ok(x, torch.randn(2, device="meta"))
    with OpLog():
        assert not _eager.direct_call_ok(x)
    with TorchFunctionMode():
        assert not _eager.direct_call_ok(x)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        assert not _eager.direct_call_ok(mode.from_tensor(x))
    seen = []
    torch.func.grad(lambda t: (seen.append(_eager.direct_call_ok(t)), t.sum())[1])(x)
    assert seen == [False]
    assert torch.compile(lambda t: t + _eager.direct_call_ok(t), fullgraph=True, backend="eager")(x).eq(x).all()


@pytest.mark.filterwarnings("ignore")  # jit.trace's deprecation and shape-check TracerWarnings
def test_jit_trace_records_the_registered_op():
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    traced = torch.jit.trace(lambda q, k, v: dlcv_fast.attention(q, k, v, causal=True), (q, k, v))
    assert "dlcv_fast::attention_fwd" in str(traced.graph)
    assert torch.equal(traced(q, k, v), dlcv_fast.attention(q, k, v, causal=True))


def _attention(q, k, v, bias, cos, sin):
    return dlcv_fast.attention(q, k, v, causal=True, attn_bias=bias) + dlcv_fast.attention(q, k, v, rope=(cos, sin))


def _window(qkv, table, qkv_bias):
    return dlcv_fast.window_attention(qkv, num_heads=2, window_size=4, shift_size=2, rel_pos_bias_table=table,
                                      qkv_bias=qkv_bias)


def _rope(x, cos, sin):
    return dlcv_fast.apply_rope(x, cos, sin, interleaved=True)


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    angles = r(9, 8)
    yield "attention", _attention, (r(2, 4, 9, 16), r(2, 2, 9, 16), r(2, 2, 9, 16), r(1, 4, 9, 9),
                                    angles.cos(), angles.sin()), (0, 1, 2, 3), "dlcv_fast.attention_fwd"
    yield "window_attention", _window, (r(2, 6, 7, 48), 0.1 * r(49, 2), r(48)), (0, 1, 2), \
        "dlcv_fast.window_attention_fwd"
    yield "rope", _rope, (r(2, 3, 9, 16), angles[:, :6].cos(), angles[:, :6].sin()), (0, 1, 2), "dlcv_fast.rope"


@pytest.mark.parametrize("name,fn,inputs,wrt,op", list(_cases()), ids=[c[0] for c in _cases()])
def test_routes_agree_bitwise(monkeypatch, name, fn, inputs, wrt, op):
    calls = []
    real = _eager.direct_call_ok
    monkeypatch.setattr(_eager, "direct_call_ok", lambda *t: calls.append(real(*t)) or calls[-1])

    def run(mode=None):
        xs = [t.clone().requires_grad_(i in wrt) for i, t in enumerate(inputs)]
        with mode if mode is not None else contextlib.nullcontext():
            out = fn(*xs)
            return out, torch.autograd.grad(out, [xs[i] for i in wrt], torch.ones_like(out))

    out_e, grads_e = run()
    assert calls and all(calls), "the eager route was not taken in plain eager code"
    calls.clear()
    log = OpLog()
    out_o, grads_o = run(log)
    assert calls and not any(calls) and any(n.startswith(op) for n in log.names), \
        "under a dispatch mode the registered op must run"
    assert torch.equal(out_e, out_o)
    for a, b in zip(grads_e, grads_o):
        assert torch.equal(a, b)


def test_double_backward_raises_on_the_eager_route():
    q, k, v = (torch.randn(1, 2, 5, 16, requires_grad=True) for _ in range(3))
    out = dlcv_fast.attention(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(dq.sum(), q)
