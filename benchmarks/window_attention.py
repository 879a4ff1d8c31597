"""Swin window attention benchmarks (issue 4): the whole attention step of a Swin block, from the qkv Linear's
output ``(B, H, W, 3C)`` to the proj Linear's input ``(B, H, W, C)``, forward and forward+backward.

Providers: ours (``dlcv_fast.window_attention``; "dlcv_fast.cuda": the same op on the CUDA kernels of
csrc/); timm's eager step and timm's fused step (torch SDPA with the relative position bias and the
shifted-window mask added into one float mask), both written out here as timm runs them (roll, partition, bias
gather, attention, merge, reverse roll; the index and region mask are precomputed buffers in timm too);
FlexAttention with the bias as score_mod and the region mask as mask_mod. All are issue 4's targets (headline)
but "dlcv_fast.cuda" (secondary: ``--quick`` times it last).
Gradients are taken for qkv and the bias table. FLOPs: 4 * tokens * window tokens * C forward, 3.5x that
forward+backward; bytes: qkv read and the output written (plus dO read and dqkv written backward).
"""
from __future__ import annotations

import torch

from benchmarks.registry import Benchmark, Provider, cuda_backend, missing, register, with_backward


def _case(name, B, H, W, C, heads, window, shift):
    return {"name": name, "B": B, "H": H, "W": W, "C": C, "heads": heads, "window": window, "shift": shift}


CASES = [_case(f"swin_t_stage{s}", 128, n, n, c, h, 7, shift)
         for s, n, c, h in ((1, 56, 96, 3), (3, 14, 384, 12)) for shift in (0, 3)]
CPU = [_case("swin_cpu", 2, 14, 14, 96, 3, 7, 3)]


def label(c):
    return (f"{c['name']} B={c['B']} {c['H']}x{c['W']} C={c['C']} heads={c['heads']} win={c['window']} "
            f"shift={c['shift']}")


def flops(backward):
    return lambda c: 4 * c["B"] * c["H"] * c["W"] * c["window"] ** 2 * c["C"] * (3.5 if backward else 1.0)


def nbytes(backward):
    return lambda c, elsize: elsize * c["B"] * c["H"] * c["W"] * c["C"] * (4 + (7 if backward else 0))


def make_inputs(backward):
    def make(c, device, dtype):
        x = {"qkv": torch.randn(c["B"], c["H"], c["W"], 3 * c["C"], device=device, dtype=dtype,
                                requires_grad=backward),
             "table": (0.02 * torch.randn((2 * c["window"] - 1) ** 2, c["heads"], device=device, dtype=dtype)
                       ).requires_grad_(backward)}
        if backward:
            x["do"] = torch.randn(c["B"], c["H"], c["W"], c["C"], device=device, dtype=dtype)
        return x
    return make


def available():
    return missing("dlcv_fast", "window_attention") or missing("dlcv_fast.reference", "window_attention")


# ----------------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------------

def ours(c, x0, ctx):
    import dlcv_fast

    kw = dict(num_heads=c["heads"], window_size=c["window"], shift_size=c["shift"])
    if x0["qkv"].device.type == "cpu":
        def on_cpu(x):
            with dlcv_fast.use_backend("torch"):
                return dlcv_fast.window_attention(x["qkv"], rel_pos_bias_table=x["table"], **kw)
        return on_cpu
    return lambda x: dlcv_fast.window_attention(x["qkv"], rel_pos_bias_table=x["table"], **kw)


def _buffers(c, device):
    """timm's precomputed buffers: the relative position index (N, N) and the shift mask (nW, N, N) or None."""
    from dlcv_fast import reference as R

    ws = c["window"]
    index = R.window_relative_position_index(ws, ws, device=device)
    if not c["shift"]:
        return index, None, None
    regions = R.window_region_ids(c["H"], c["W"], ws, c["shift"], device)
    regions = R.window_partition(regions[None, :, :, None], (ws, ws))[..., 0]  # (nW, N)
    same = regions[:, :, None] == regions[:, None, :]
    return index, same, torch.where(same, 0.0, -100.0)


def timm_step(attend):
    """Build a provider running timm's step around ``attend(q, k, v, bias, mask, c) -> (B*nW, heads, N, hd)``."""
    def build(c, x0, ctx):
        from dlcv_fast import reference as R

        index, _, mask = _buffers(c, x0["qkv"].device)
        mask = mask.to(x0["qkv"].dtype) if mask is not None else None
        ws, sh, heads = c["window"], c["shift"], c["heads"]
        if c["H"] % ws or c["W"] % ws:
            raise NotImplementedError("the timm-style baselines here take maps divisible by the window")

        def fn(x):
            qkv = x["qkv"]
            B, H, W, C3 = qkv.shape
            if sh:
                qkv = torch.roll(qkv, (-sh, -sh), (1, 2))
            N, hd = ws * ws, C3 // 3 // heads
            q, k, v = R.window_partition(qkv, (ws, ws)).view(-1, N, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            bias = x["table"][index].permute(2, 0, 1)  # (heads, N, N)
            out = attend(q, k, v, bias, mask)
            out = R.window_merge(out.transpose(1, 2).reshape(-1, N, C3 // 3), (ws, ws), B, H, W)
            return torch.roll(out, (sh, sh), (1, 2)) if sh else out
        return fn
    return build


def _eager(q, k, v, bias, mask):
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    if mask is not None:
        nW, N = mask.shape[0], mask.shape[1]
        attn = (attn.view(-1, nW, attn.shape[1], N, N) + mask[None, :, None]).view(-1, attn.shape[1], N, N)
    return attn.softmax(dim=-1) @ v


def _fused(q, k, v, bias, mask):
    heads, N = bias.shape[0], bias.shape[1]
    attn_mask = bias[None]
    if mask is not None:
        nW = mask.shape[0]
        attn_mask = (mask.view(1, nW, 1, N, N).expand(q.shape[0] // nW, -1, heads, -1, -1).reshape(-1, heads, N, N)
                     + bias)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


FLEX_COMPILE = True  # off in the CPU test of the provider's masks (flex_attention's eager path)


def flex(c, x0, ctx):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _, same, _ = _buffers(c, x0["qkv"].device)
    block_mask = None
    if same is not None:
        nW, N = same.shape[0], same.shape[1]
        block_mask = create_block_mask(lambda b, h, qi, ki: same[b % nW, qi, ki], c["B"] * nW, None, N, N,
                                       device=x0["qkv"].device)

    def attend(q, k, v, bias, mask):
        def score_mod(score, b, h, qi, ki):
            return score + bias[h, qi, ki]
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return timm_step(torch.compile(attend, dynamic=False) if FLEX_COMPILE else attend)(c, x0, ctx)


PROVIDERS = [
    Provider("dlcv_fast", ours, devices=("cuda", "cpu")),
    Provider("dlcv_fast.cuda", cuda_backend(ours), secondary=True),
    Provider("timm.eager", timm_step(_eager), devices=("cuda", "cpu")),
    Provider("timm.sdpa", timm_step(_fused), devices=("cuda", "cpu")),
    Provider("flex", flex, compiled=True),
]


def reference(backward):
    def ref(c, x, ctx):
        from dlcv_fast import reference as R

        golden_dtype = torch.float64 if x["qkv"].device.type == "cpu" else torch.float32
        results = []
        for dtype in (golden_dtype, x["qkv"].dtype):
            qkv, table = (x[n][:2].detach() if n == "qkv" else x[n].detach() for n in ("qkv", "table"))
            qkv, table = qkv.to(dtype).requires_grad_(backward), table.to(dtype).requires_grad_(backward)
            out = R.window_attention(qkv, num_heads=c["heads"], window_size=c["window"], shift_size=c["shift"],
                                     rel_pos_bias_table=table)
            grads = torch.autograd.grad(out, (qkv,), x["do"][:2].to(dtype)) if backward else ()
            results.append([out.detach(), *grads])
        return [(g, l, 2.0 if i == 0 else 3.0) for i, (g, l) in enumerate(zip(*results))]
    return ref


def view(c, out):
    """The first two images of the output (and of dqkv). The table gradient sums over the whole batch, so it is
    not compared here; the kernel tests check it."""
    out = out if isinstance(out, tuple) else (out,)
    return [t[:2] for t in out[:2]]


for backward in (False, True):
    register(Benchmark(
        name="window_attn_fwd_bwd" if backward else "window_attn_fwd", suite="kernels", issue=4,
        title="Swin-T window attention step" + (" forward + backward" if backward else " forward"),
        cases=CASES, quick=CASES, cpu_cases=CPU if not backward else [],
        providers=[with_backward(p, "qkv", "table") if backward else p for p in PROVIDERS],
        make_inputs=make_inputs(backward), reference=reference(backward), view=view, label=label,
        flops=flops(backward), bytes=nbytes(backward), available=available))
