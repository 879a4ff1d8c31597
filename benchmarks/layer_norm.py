"""The residual add + LayerNorm of a pre-norm block (issue 6: the models' non-attention time).

``s = x + residual; y = LayerNorm(s)`` at the models' row lengths: ours in one kernel
(``dlcv_fast.layer_norm(..., residual=)``), eager torch (the add, then ``F.layer_norm``: what timm and
open_clip run), the same under torch.compile, and eager add + Liger's LayerNorm when installed. Memory bound:
bytes are the fused kernel's (x and residual read, s and y written; with the backward also s, dy and ds read
and dx written), so the eager providers' GB/s are "effective" figures and the copy fraction says how close
each is to the card's copy bandwidth measured in the same run.
"""
from __future__ import annotations

import torch

from benchmarks.registry import Benchmark, Provider, Unavailable, missing, register, torch_providers, with_backward

EPS = 1e-6


def label(c):
    return f"{c['name']} M={c['M']} N={c['N']}"


def available():
    return missing("dlcv_fast", "layer_norm")


def make_inputs(backward):
    def make(c, device, dtype):
        shape = (c["M"], c["N"])
        x = {n: torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for n in ("x", "r")}
        x["w"] = (1 + 0.1 * torch.randn(c["N"], device=device, dtype=dtype)).requires_grad_(backward)
        x["b"] = (0.1 * torch.randn(c["N"], device=device, dtype=dtype)).requires_grad_(backward)
        if backward:
            x["do"] = (torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
        return x
    return make


def _eager(x, r, w, b):
    s = x + r
    return torch.nn.functional.layer_norm(s, s.shape[-1:], w, b, EPS), s


def ours(c, x0, ctx):
    import dlcv_fast

    backend = "torch" if x0["x"].device.type == "cpu" else None  # the CPU mode times the reference backend
    return lambda x: dlcv_fast.layer_norm(x["x"], x["w"], x["b"], EPS, residual=x["r"], backend=backend)


def liger(c, x0, ctx):
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError as e:
        raise Unavailable("liger_kernel is not installed") from e

    def fn(x):
        s = x["x"] + x["r"]
        return LigerLayerNormFunction.apply(s, x["w"], x["b"], EPS), s
    return fn


PROVIDERS = [Provider("dlcv_fast", ours, devices=("cuda", "cpu")), *torch_providers(_eager, "x", "r", "w", "b"),
             Provider("liger", liger)]


def reference(backward):
    def ref(c, x, ctx):
        from dlcv_fast import reference as R

        golden_dtype = torch.float64 if x["x"].device.type == "cpu" else torch.float32
        results = []
        for dtype in (golden_dtype, None):
            t = {n: x[n][:64].detach() if n in "xr" else x[n].detach() for n in "xrwb"}
            t = {n: v.to(dtype or v.dtype).requires_grad_(backward) for n, v in t.items()}
            y, s = R.layer_norm(t["x"], t["w"], t["b"], EPS, residual=t["r"])
            grads = torch.autograd.grad((y, s), (t["x"], t["r"]), [d[:64].to(dtype or d.dtype) for d in x["do"]]) \
                if backward else ()
            results.append([y.detach(), s.detach(), *grads])
        return [(g, l, 2.0 if i < 2 else 3.0) for i, (g, l) in enumerate(zip(*results))]
    return ref


def view(c, out):
    """The first 64 rows of y, s and, with the backward, dx and dresidual (the weight and bias gradients,
    timed too, sum over all rows: tests/kernels/test_layer_norm.py checks them)."""
    return [t[:64] for t in out[:4]]


def moved_bytes(backward):
    return lambda c, elsize: elsize * c["M"] * c["N"] * (8 if backward else 4)


VIT_B = {"name": "vit_b16 B=256", "M": 256 * 197, "N": 768}
SWIN_T1 = {"name": "swin_t stage 1 B=128", "M": 128 * 56 * 56, "N": 96}
CPU_CASE = {"name": "cpu", "M": 2 * 197, "N": 192}

for backward in (False, True):
    register(Benchmark(
        name="add_layer_norm_fwd_bwd" if backward else "add_layer_norm_fwd", suite="kernels", issue=6,
        title="residual add + LayerNorm" + (", forward + backward" if backward else ", forward"),
        cases=[VIT_B, SWIN_T1], quick=[VIT_B, SWIN_T1] if not backward else [VIT_B], cpu_cases=[CPU_CASE],
        providers=[with_backward(p, "x", "r", "w", "b") if backward else p for p in PROVIDERS],
        make_inputs=make_inputs(backward), reference=reference(backward), view=view, label=label,
        bytes=moved_bytes(backward), available=available))
