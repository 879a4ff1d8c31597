"""An MLP's first Linear with its activation (issue 6: the models' non-attention time), inference.

``gelu(x @ W.T + b)`` at the models' fc1 shapes: ours with the GELU in the GEMM's epilogue
(``dlcv_fast.ops.linear_act``), eager torch (cuBLAS Linear, then ``F.gelu``: what timm runs), the same under
torch.compile, and cuBLASLt's own fused epilogue through ``torch._addmm_activation`` (a timing baseline only:
its GELU is the tanh approximation, a different function). FLOPs are the GEMM's 2MNK.
"""
from __future__ import annotations

import torch

from benchmarks.registry import Benchmark, Provider, missing, register, torch_providers


def label(c):
    return f"{c['name']} M={c['M']} K={c['K']} N={c['N']}"


def available():
    return missing("dlcv_fast.ops.linear_act", "linear_act")


def make_inputs(c, device, dtype):
    return {"x": torch.randn(c["M"], c["K"], device=device, dtype=dtype),
            "w": torch.randn(c["N"], c["K"], device=device, dtype=dtype) * c["K"] ** -0.5,
            "b": torch.randn(c["N"], device=device, dtype=dtype) * 0.1}


def ours(c, x0, ctx):
    from dlcv_fast.ops.linear_act import linear_act

    backend = "torch" if x0["x"].device.type == "cpu" else None  # the CPU mode times the reference backend
    return lambda x: linear_act(x["x"], x["w"], x["b"], "gelu", backend=backend)


def _eager(x, w, b):
    return torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))


def cublaslt_tanh(c, x0, ctx):
    return lambda x: torch._addmm_activation(x["b"], x["x"], x["w"].t(), use_gelu=True)


def reference(c, x, ctx):
    from dlcv_fast import reference as R

    golden_dtype = torch.float64 if x["x"].device.type == "cpu" else torch.float32
    t = {n: x[n][:256] if n == "x" else x[n] for n in "xwb"}
    return [(R.linear_act(*(t[n].to(golden_dtype) for n in "xwb"), "gelu"), R.linear_act(t["x"], t["w"], t["b"]),
             2.0)]


CASES = [{"name": "vit_b16 fc1 B=256", "M": 256 * 197, "K": 768, "N": 3072},
         {"name": "swin_t stage 1 fc1 B=128", "M": 128 * 3136, "K": 96, "N": 384},
         {"name": "swin_t stage 3 fc1 B=128", "M": 128 * 196, "K": 384, "N": 1536}]

register(Benchmark(
    name="linear_act_fwd", suite="kernels", issue=6, title="Linear + GELU (an MLP's fc1), inference",
    cases=CASES, quick=CASES[:2], cpu_cases=[{"name": "cpu", "M": 2 * 197, "K": 192, "N": 768}],
    providers=[Provider("dlcv_fast", ours, devices=("cuda", "cpu")), *torch_providers(_eager, "x", "w", "b"),
               Provider("cublaslt.gelu_tanh", cublaslt_tanh, parity=False)],
    make_inputs=make_inputs, reference=reference, view=lambda c, out: [out[:256]], label=label,
    flops=lambda c: 2 * c["M"] * c["N"] * c["K"],
    bytes=lambda c, elsize: elsize * (c["M"] * c["K"] + c["N"] * c["K"] + c["M"] * c["N"]), available=available))
