"""Rotary position embedding benchmarks (issue 5): the standalone kernel on q and k (memory bound: judged as a
fraction of the copy bandwidth measured in the same run) and RoPE fused into attention (judged against the same
attention without RoPE).

Standalone providers rotate q and k, each ``(B, H, N, D)``, by half-split pairs with ``(N, D/2)`` float32
tables: ours (``dlcv_fast.apply_rope``; "dlcv_fast.cuda" on the CUDA kernel of csrc/), the eager torch formula (``dlcv_fast.reference.apply_rope``), the same
under torch.compile, and Liger's ``liger_rotary_pos_emb`` when installed (it takes full-width ``(1, N, D)``
tables, built once). Bytes: q and k read and written (twice that with the backward) plus the tables.
Secondary (``--quick`` times them last): the CUDA backend's providers and, inside attention, the unfused
pairs (apply_rope then attention; eager RoPE then SDPA); issue 5's fused target is rope= against no RoPE.
"""
from __future__ import annotations

import torch

from benchmarks.registry import (Benchmark, Provider, Unavailable, cuda_backend, missing, register, torch_providers,
                                 with_backward)


def tables(N, D, device, theta=10000.0):
    angles = torch.arange(N, device=device, dtype=torch.float32)[:, None] * theta ** (
        -torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    return angles.cos(), angles.sin()


def label(c):
    return f"B={c['B']} H={c['H']} N={c['N']} D={c['D']}"


def available():
    return missing("dlcv_fast", "apply_rope")


def _on_cpu_use_reference(fn, device):
    """Our op on the CPU runs its reference backend (never Triton's interpreter, even with TRITON_INTERPRET=1)."""
    if device.type != "cpu":
        return fn
    import dlcv_fast

    def on_cpu(x):
        with dlcv_fast.use_backend("torch"):
            return fn(x)
    return on_cpu


# ----------------------------------------------------------------------------------------------------------
# Standalone RoPE on q and k
# ----------------------------------------------------------------------------------------------------------

def make_pair(backward):
    def make(c, device, dtype):
        shape = (c["B"], c["H"], c["N"], c["D"])
        x = {n: torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for n in ("q", "k")}
        x["cos"], x["sin"] = tables(c["N"], c["D"], device)
        if backward:
            x["do"] = (torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
        return x
    return make


def pair_bytes(backward):
    return lambda c, elsize: (elsize * 4 * c["B"] * c["H"] * c["N"] * c["D"] * (2 if backward else 1)
                              + 4 * c["N"] * c["D"] * (2 if backward else 1))


def ours_pair(c, x0, ctx):
    import dlcv_fast

    return _on_cpu_use_reference(lambda x: (dlcv_fast.apply_rope(x["q"], x["cos"], x["sin"]),
                                            dlcv_fast.apply_rope(x["k"], x["cos"], x["sin"])), x0["q"].device)


def _eager_pair(q, k, cos, sin):
    from dlcv_fast import reference as R

    return R.apply_rope(q, cos, sin), R.apply_rope(k, cos, sin)


def liger_pair(c, x0, ctx):
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as e:
        raise Unavailable("liger_kernel is not installed") from e
    cos, sin = (torch.cat((t, t), dim=-1)[None].to(x0["q"].dtype) for t in (x0["cos"], x0["sin"]))
    return lambda x: liger_rotary_pos_emb(x["q"], x["k"], cos, sin)


PAIR_PROVIDERS = [
    Provider("dlcv_fast", ours_pair, devices=("cuda", "cpu")),
    Provider("dlcv_fast.cuda", cuda_backend(ours_pair), secondary=True),
    *torch_providers(_eager_pair, "q", "k", "cos", "sin"),
    Provider("liger", liger_pair),
]


def pair_reference(backward):
    def ref(c, x, ctx):
        from dlcv_fast import reference as R

        golden_dtype = torch.float64 if x["q"].device.type == "cpu" else torch.float32
        results = []
        for dtype in (golden_dtype, x["q"].dtype):
            q, k = (x[n][:1, :2].detach().to(dtype).requires_grad_(backward) for n in "qk")
            outs = (R.apply_rope(q, x["cos"], x["sin"]), R.apply_rope(k, x["cos"], x["sin"]))
            grads = torch.autograd.grad(outs, (q, k), [d[:1, :2].to(dtype) for d in x["do"]]) if backward else ()
            results.append([o.detach() for o in outs] + list(grads))
        return [(g, l, 2.0 if i < 2 else 3.0) for i, (g, l) in enumerate(zip(*results))]
    return ref


def flat_view(c, out):
    return [t[:1, :2] for t in out]


for backward in (False, True):
    case = {"B": 64, "H": 16, "N": 4096, "D": 128}
    register(Benchmark(
        name="rope_fwd_bwd" if backward else "rope_fwd", suite="kernels", issue=5,
        title="standalone RoPE on q and k" + (", forward + backward" if backward else ", forward"),
        cases=[case], quick=[case], cpu_cases=[{"B": 2, "H": 4, "N": 197, "D": 64}],
        providers=[with_backward(p, "q", "k") if backward else p for p in PAIR_PROVIDERS],
        make_inputs=make_pair(backward), reference=pair_reference(backward), view=flat_view, label=label,
        bytes=pair_bytes(backward), available=available))


# ----------------------------------------------------------------------------------------------------------
# RoPE inside attention
# ----------------------------------------------------------------------------------------------------------

def attn_case(N, D):
    return {"B": 256 if N < 1024 else 8, "H": 768 // D, "N": N, "D": D}


ATTN_CASES = [attn_case(N, D) for D in (64, 128) for N in (197, 4096)]


def make_attn(c, device, dtype):
    x = {n: torch.randn(c["B"], c["H"], c["N"], c["D"], device=device, dtype=dtype) for n in "qkv"}
    x["cos"], x["sin"] = tables(c["N"], c["D"], device)
    return x


def attn_with_rope(c, x0, ctx):
    import dlcv_fast

    return lambda x: dlcv_fast.attention(x["q"], x["k"], x["v"], rope=(x["cos"], x["sin"]))


def attn_without_rope(c, x0, ctx):
    import dlcv_fast

    return lambda x: dlcv_fast.attention(x["q"], x["k"], x["v"])


def attn_with_rope_in_kernel(mode):
    """rope= rotated inside the forward kernel (kernels/attention.py ROPE_IN_KERNEL = ``mode``: True, q and k; "q",
    q alone and k by its pass; off by default), the flag set around each call and restored."""
    def build(c, x0, ctx):
        import dlcv_fast
        from dlcv_fast.kernels import attention as kern

        def call(x):
            saved, kern.ROPE_IN_KERNEL = kern.ROPE_IN_KERNEL, mode
            try:
                return dlcv_fast.attention(x["q"], x["k"], x["v"], rope=(x["cos"], x["sin"]))
            finally:
                kern.ROPE_IN_KERNEL = saved
        return call
    return build


def rope_then_attn(c, x0, ctx):
    import dlcv_fast

    return lambda x: dlcv_fast.attention(dlcv_fast.apply_rope(x["q"], x["cos"], x["sin"]),
                                         dlcv_fast.apply_rope(x["k"], x["cos"], x["sin"]), x["v"])


def eager_rope_then_sdpa(c, x0, ctx):
    from dlcv_fast import reference as R

    return lambda x: torch.nn.functional.scaled_dot_product_attention(
        R.apply_rope(x["q"], x["cos"], x["sin"]), R.apply_rope(x["k"], x["cos"], x["sin"]), x["v"])


def attn_reference(c, x, ctx):
    from dlcv_fast import reference as R

    q, k, v = (x[n][:1, :2] for n in "qkv")
    golden = R.attention(q.float(), k.float(), v.float(), rope=(x["cos"], x["sin"]))
    return [(golden, R.attention(q, k, v, rope=(x["cos"], x["sin"])), 2.0)]


register(Benchmark(
    name="attn_rope_fwd", suite="kernels", issue=5, title="attention forward with RoPE applied inside (rope=)",
    cases=ATTN_CASES, quick=ATTN_CASES,
    providers=[Provider("dlcv_fast.rope", attn_with_rope),
               Provider("dlcv_fast.no_rope", attn_without_rope, parity=False),
               Provider("dlcv_fast.rope_in_kernel", attn_with_rope_in_kernel(True), devices=("cuda",)),
               Provider("dlcv_fast.rope_q_in_kernel", attn_with_rope_in_kernel("q"), devices=("cuda",)),
               # the CUDA forward rotates q and k in shared memory (no passes): the same pair on backend "cuda"
               Provider("dlcv_fast.cuda.rope", cuda_backend(attn_with_rope), secondary=True),
               Provider("dlcv_fast.cuda.no_rope", cuda_backend(attn_without_rope), parity=False, secondary=True),
               Provider("dlcv_fast.apply_rope+attention", rope_then_attn, secondary=True),
               Provider("eager_rope+sdpa", eager_rope_then_sdpa, secondary=True)],
    make_inputs=make_attn, reference=attn_reference, view=lambda c, out: [out[:1, :2]],
    label=label, flops=lambda c: 4 * c["B"] * c["H"] * c["N"] ** 2 * c["D"], available=available))
