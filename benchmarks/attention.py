"""Dense attention benchmarks (issue 2): forward and forward+backward, long-sequence sweep and the short shapes
of ViT, CLIP text, Q-Former and the U-Net.

Providers: ours (``dlcv_fast.attention`` with the Triton and CUDA backends; on the CPU the reference
backend), torch SDPA pinned to each of its backends (flash, cuDNN, memory-efficient, math), FlexAttention
(compiled, masks as a BlockMask), and flash-attn 2 / 3 when installed. Every provider gets the same
``(B, H, L, D)`` tensors; a key padding mask is a ``(B, Lk)`` bool for us and FlexAttention, and a boolean
``attn_mask`` built once (not timed) for SDPA, which cannot take ``is_causal`` and a mask together.
Headline (issue 2's targets): ours on Triton, SDPA flash and cuDNN, flash-attn, FlexAttention; secondary
(``--quick`` times them last): our CUDA backend and flag variants (+tma, +ws, +keymajor), SDPA efficient and math.

FLOPs count the matmuls of the visible (query, key) pairs under the causal mask (4 * pairs * D per head
forward, 2.5x that backward, as flash-attn counts); key padding is counted as dense. Bytes are the
compulsory traffic: q, k, v read and o written (forward), plus q, k, v, o, dO read and dQ, dK, dV written
(backward).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from benchmarks.registry import Benchmark, Provider, Unavailable, register, with_backward

TOKENS = 16 * 1024  # batch x seqlen of the long-sequence sweep
HIDDEN = 2048  # heads x head dim of the sweep (flash-attn's benchmark setting)
SEQLENS = (1024, 2048, 4096, 8192, 16384)


def _case(B, H, Lq, Lk, D, *, causal=False, padding=False, name=""):
    return {"name": name, "B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "causal": causal, "padding": padding}


SWEEP = [_case(TOKENS // n, HIDDEN // d, n, n, d, causal=c) for d in (64, 128) for c in (False, True) for n in SEQLENS]
SWEEP_QUICK = [c for c in SWEEP if c["Lq"] == 4096]
SHORT = [
    _case(256, 12, 197, 197, 64, name="vit_b16"),
    _case(256, 8, 77, 77, 64, causal=True, padding=True, name="clip_text"),
    _case(256, 12, 32, 257, 64, name="qformer_cross"),
    _case(8, 8, 4096, 4096, 40, name="unet_self"),
    _case(8, 8, 4096, 77, 40, name="unet_cross"),
]
CPU = [_case(2, 4, 197, 197, 64, name="vit_tiny_cpu"), _case(2, 4, 77, 77, 64, causal=True, padding=True,
                                                            name="clip_text_cpu")]


def label(c: dict) -> str:
    L = f"L={c['Lq']}" if c["Lq"] == c["Lk"] else f"Lq={c['Lq']} Lk={c['Lk']}"
    masks = "".join((" causal" if c["causal"] else "", " pad" if c["padding"] else ""))
    return f"{c['name'] + ' ' if c['name'] else ''}B={c['B']} H={c['H']} {L} D={c['D']}{masks}"


def visible_pairs(c: dict) -> int:
    Lq, Lk = c["Lq"], c["Lk"]
    if not c["causal"]:
        return Lq * Lk
    n = min(Lq, Lk)  # rows i < Lk see i + 1 keys, rows past Lk see all Lk
    return n * (n + 1) // 2 + max(0, Lq - Lk) * Lk


def flops(backward: bool):
    return lambda c: 4 * c["B"] * c["H"] * visible_pairs(c) * c["D"] * (3.5 if backward else 1.0)


def nbytes(backward: bool):
    def count(c, elsize):
        q, kv = c["B"] * c["H"] * c["Lq"] * c["D"], c["B"] * c["H"] * c["Lk"] * c["D"]
        fwd = 2 * q + 2 * kv
        return elsize * (fwd + (4 * q + 4 * kv if backward else 0))
    return count


def make_inputs(backward: bool):
    def make(c, device, dtype):
        B, H, Lq, Lk, D = c["B"], c["H"], c["Lq"], c["Lk"], c["D"]
        x = {n: torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=backward)
             for n, L in (("q", Lq), ("k", Lk), ("v", Lk))}
        if backward:
            x["do"] = torch.randn(B, H, Lq, D, device=device, dtype=dtype)
        if c["padding"]:
            # The same lengths in every set (a fixed generator): at least Lk // 8 keys per row, never empty.
            lengths = torch.randint(max(1, Lk // 8), Lk + 1, (B,), generator=torch.Generator().manual_seed(B * Lk))
            x["kpm"] = (torch.arange(Lk)[None, :] < lengths[:, None]).to(device)
        return x
    return make


# ----------------------------------------------------------------------------------------------------------
# Providers (forward functions; registry.with_backward adds the backward where the benchmark asks for it)
# ----------------------------------------------------------------------------------------------------------

def ours(backend):
    def build(c, x0, ctx):
        import dlcv_fast

        causal = c["causal"]
        return lambda x: dlcv_fast.attention(x["q"], x["k"], x["v"], causal=causal, key_padding_mask=x.get("kpm"),
                                             backend=backend)
    return build


def bool_mask(c, kpm):
    """SDPA's boolean attn_mask (True = takes part) for padding (B, 1, 1, Lk), with causal (B, 1, Lq, Lk)."""
    if kpm is None:
        return None
    mask = kpm[:, None, None, :]
    if c["causal"]:
        i = torch.arange(c["Lq"], device=kpm.device)[:, None]
        j = torch.arange(c["Lk"], device=kpm.device)[None, :]
        mask = mask & (j <= i)
    return mask


def sdpa(kernel: str):
    def build(c, x0, ctx):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not hasattr(SDPBackend, kernel):
            raise Unavailable(f"this torch has no SDPBackend.{kernel}")
        backend = getattr(SDPBackend, kernel)
        mask = bool_mask(c, x0.get("kpm"))
        causal = c["causal"] and mask is None

        def fn(x):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=mask, is_causal=causal)
        return fn
    return build


FLEX_COMPILE = True  # off in the CPU test of the provider's masks (flex_attention's eager path)


def flex(c, x0, ctx):
    from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

    mods = []
    if c["causal"]:
        mods.append(lambda b, h, q, k: k <= q)
    if c["padding"]:
        kpm = x0["kpm"]
        mods.append(lambda b, h, q, k: kpm[b, k])
    block_mask = None
    if mods:
        block_mask = create_block_mask(and_masks(*mods), c["B"] if c["padding"] else None, None, c["Lq"], c["Lk"],
                                       device=x0["q"].device)
    attend = torch.compile(flex_attention, dynamic=False) if FLEX_COMPILE else flex_attention
    return lambda x: attend(x["q"], x["k"], x["v"], block_mask=block_mask)


def flash_attn(module: str):
    def build(c, x0, ctx):
        try:
            fa = __import__(module)
        except ImportError as e:
            raise Unavailable(f"{module} is not installed") from e
        if c["padding"]:
            raise Unavailable("key padding needs flash-attn's varlen interface (not wired here)")
        if c["causal"] and c["Lq"] != c["Lk"]:
            raise Unavailable("flash-attn's causal mask is bottom-right aligned when Lq != Lk")
        causal = c["causal"]

        def fn(x):
            out = fa.flash_attn_func(*(x[n].transpose(1, 2) for n in "qkv"), causal=causal)
            return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
        return fn
    return build


PROVIDERS = [
    Provider("dlcv_fast.triton", ours("triton")),
    Provider("dlcv_fast.cuda", ours("cuda"), secondary=True),
    Provider("dlcv_fast.ref", ours("torch"), devices=("cpu",)),
    Provider("sdpa.flash", sdpa("FLASH_ATTENTION"), devices=("cuda", "cpu")),
    Provider("sdpa.cudnn", sdpa("CUDNN_ATTENTION")),
    Provider("sdpa.efficient", sdpa("EFFICIENT_ATTENTION"), secondary=True),
    Provider("sdpa.math", sdpa("MATH"), devices=("cuda", "cpu"), secondary=True),
    Provider("flex", flex, compiled=True),
    Provider("flash_attn2", flash_attn("flash_attn")),
    Provider("flash_attn3", flash_attn("flash_attn_interface")),
]


# ----------------------------------------------------------------------------------------------------------
# Parity: dlcv_fast.reference on the first batch element and two heads, in float32/64 and in the input dtype
# ----------------------------------------------------------------------------------------------------------

def parity_view(c, out):
    return [t[:1, :2] for t in (out if isinstance(out, tuple) else (out,))]


def reference(backward: bool):
    def ref(c, x, ctx):
        from dlcv_fast import reference as R

        kpm = x["kpm"][:1] if "kpm" in x else None
        golden_dtype = torch.float64 if x["q"].device.type == "cpu" else torch.float32
        results = []
        for dtype in (golden_dtype, x["q"].dtype):
            q, k, v = (x[n][:1, :2].detach().to(dtype).requires_grad_(backward) for n in "qkv")
            out = R.attention(q, k, v, causal=c["causal"], key_padding_mask=kpm)
            grads = torch.autograd.grad(out, (q, k, v), x["do"][:1, :2].to(dtype)) if backward else ()
            results.append([out.detach(), *grads])
        golden, lp = results
        return [(g, l, 2.0 if i == 0 else 3.0) for i, (g, l) in enumerate(zip(golden, lp))]
    return ref


def with_flags(provider: Provider, suffix: str, min_arch: int = 0, **flags) -> Provider:
    """``provider`` (ours) run with module flags of dlcv_fast.kernels.attention set (variants that are off by
    default until a GPU run shows they are faster: this provider is that measurement, side by side with the
    default), named with ``suffix``. The flags are set around the whole call, backward included, and restored."""
    build = provider.build

    def build_flagged(case, inputs, ctx):
        from dlcv_fast.kernels import attention as A

        if A.table_arch() < min_arch:
            raise Unavailable(f"{suffix.lstrip('+')} needs sm_{min_arch} or later")
        fn = build(case, inputs, ctx)

        def run(x):
            saved = {name: getattr(A, name) for name in flags}
            for name, value in flags.items():
                setattr(A, name, value)
            try:
                return fn(x)
            finally:
                for name, value in saved.items():
                    setattr(A, name, value)
        return run
    return replace(provider, name=provider.name + suffix, build=build_flagged, secondary=True)


def with_tma(provider: Provider) -> Provider:
    """Ours with TMA descriptor loads (KV_TMA, BWD_TMA; sm_90+)."""
    return with_flags(provider, "+tma", 90, KV_TMA=True, BWD_TMA=True)


def with_warp_spec(provider: Provider) -> Provider:
    """Ours with the forward's key loop warp-specialized where it applies (FWD_WARP_SPEC; sm_90+, no key padding
    or bias, keys a multiple of 128; elsewhere the same as ours)."""
    return with_flags(provider, "+ws", 90, FWD_WARP_SPEC=True)


def with_key_major(provider: Provider) -> Provider:
    """Ours with the dK/dV kernel's key-major tiles (BWD_KEY_MAJOR)."""
    return with_flags(provider, "+keymajor", BWD_KEY_MAJOR=True)


def _attention_bench(name, title, cases, quick, cpu_cases, backward, x=None, group=(), warp_spec=False):
    providers = [with_backward(p, "q", "k", "v") if backward else p for p in PROVIDERS]
    providers.insert(1, with_tma(providers[0]))  # right after dlcv_fast.triton
    if warp_spec:
        providers.insert(2, with_warp_spec(providers[0]))
    if backward:
        providers.insert(2, with_key_major(providers[0]))
    return register(Benchmark(
        name=name, suite="kernels", issue=2, title=title, cases=cases, quick=quick, cpu_cases=cpu_cases,
        providers=providers, make_inputs=make_inputs(backward), reference=reference(backward), view=parity_view,
        label=label, flops=flops(backward), bytes=nbytes(backward), x=x, group=group))


_attention_bench("attn_fwd", "dense attention forward, batch x seqlen = 16k tokens", SWEEP, SWEEP_QUICK, CPU,
                 backward=False, x="Lq", group=("D", "causal"), warp_spec=True)
_attention_bench("attn_fwd_bwd", "dense attention forward + backward, batch x seqlen = 16k tokens", SWEEP,
                 SWEEP_QUICK, CPU[:1], backward=True, x="Lq", group=("D", "causal"), warp_spec=True)
_attention_bench("attn_short_fwd", "short-sequence attention forward (ViT, CLIP text, Q-Former, U-Net)", SHORT,
                 SHORT, [], backward=False)
_attention_bench("attn_short_fwd_bwd", "short-sequence attention forward + backward", SHORT, SHORT, [],
                 backward=True)
