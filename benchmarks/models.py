"""Model benchmarks (issue 6): inference images/s (or texts/s) of our models against the reference library's
on the same weights, eager and under torch.compile, and a Swin-T training step (forward + backward).

Reference libraries: timm for ViT/DeiT/Swin; open_clip for CLIP when installed, else transformers' CLIPModel
(ViT-B/32 is its default config); transformers for BLIP-2's Q-Former and diffusers for the SD 1.5 U-Net (both
in the full suite only). Ours is converted from the reference model (``dlcv_fast.models.from_timm``,
``from_open_clip``, ``from_transformers``, ``from_diffusers``), so both carry the same random weights. On a GPU everything runs in
bfloat16 at batch 256; without one, in float32 at batch 2 with ours on its reference backend. Parity: the first
images' outputs against the reference model in float32 (float64 on the CPU).
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from benchmarks.registry import Benchmark, Provider, Unavailable, cuda_backend, missing, register

CLIP_TOWERS = ("clip_vit_b32_image", "clip_vit_b32_text")
PARITY_ITEMS = 4


def _case(model, batch, train=False):
    return {"model": model, "batch": batch, "train": train}


INFER = [_case(m, 256) for m in ("vit_base_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224",
                                 *CLIP_TOWERS)]
# BLIP-2's Q-Former (32 queries over EVA-CLIP-g's 257 image states) and one SD 1.5 U-Net step at 512 px (64 x 64
# latents, 77 text states): the models behind issue 2's Q-Former and U-Net attention shapes. Full suite only.
VLM_DIFFUSION = [_case("blip2_qformer", 256), _case("unet_sd15", 8)]
INFER_CPU = [_case(m, 2) for m in ("vit_tiny_patch16_224", "deit_tiny_patch16_224", *CLIP_TOWERS)]
TRAIN = [_case("swin_tiny_patch4_window7_224", 256, train=True)]


def clip_library() -> str:
    try:
        import open_clip  # noqa: F401
        return "open_clip"
    except ImportError:
        return "transformers"


def library(c) -> str:
    if c["model"] in CLIP_TOWERS:
        return clip_library()
    return {"blip2_qformer": "transformers", "unet_sd15": "diffusers"}.get(c["model"], "timm")


def label(c):
    return f"{c['model']} ({library(c)}) B={c['batch']}"


def available():
    return missing("dlcv_fast.models", "from_timm", "from_open_clip", "from_transformers") or missing("timm")


def make_inputs(c, device, dtype):
    """``x`` (images, token ids, queries or latents) and, for the Q-Former and the U-Net, ``t`` (timesteps) and
    ``ctx`` (image or text states); ``do`` for a training step."""
    B = c["batch"]
    if c["model"] == "blip2_qformer":
        return {"x": torch.randn(B, 32, 768, device=device, dtype=dtype),
                "ctx": torch.randn(B, 257, 1408, device=device, dtype=dtype)}
    if c["model"] == "unet_sd15":
        return {"x": torch.randn(B, 4, 64, 64, device=device, dtype=dtype),
                "t": torch.randint(0, 1000, (B,), device=device),
                "ctx": torch.randn(B, 77, 768, device=device, dtype=dtype)}
    if c["model"].endswith("_text"):
        # Token ids as a tokenizer gives them: random words, the end-of-text token (the largest id) at a random
        # position, zeros after it.
        tokens = torch.randint(1, 49407, (B, 77), device=device)
        eot = torch.randint(5, 77, (B,), device=device)
        pos = torch.arange(77, device=device)[None]
        tokens = torch.where(pos == eot[:, None], 49407, torch.where(pos > eot[:, None], 0, tokens))
        return {"x": tokens}
    x = {"x": torch.randn(B, 3, 224, 224, device=device, dtype=dtype)}
    if c["train"]:
        x["do"] = torch.randn(B, 1000, device=device, dtype=dtype)
    return x


def reference_model(c, device):
    """The reference library's model in float32, eval mode, seeded random weights."""
    torch.manual_seed(0)
    lib = library(c)
    if lib == "timm":
        import timm

        # No stochastic depth (timm's Swin default is 0.1): a training step is then deterministic, so its
        # output can be checked against the eval-mode reference, and ours (which carries the rate over) and
        # timm's do the same work.
        m = timm.create_model(c["model"], pretrained=False, drop_path_rate=0.0)
    elif lib == "open_clip":
        import open_clip

        m = open_clip.create_model("ViT-B-32", pretrained=None)
    elif c["model"] == "blip2_qformer":
        import transformers

        m = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig())
    elif c["model"] == "unet_sd15":
        import diffusers

        m = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's configuration
    else:
        import transformers

        m = transformers.CLIPModel(transformers.CLIPConfig())
    return m.to(device).eval()


def args(x) -> list:
    """The model's positional inputs from an input set (``do`` is the training step's output gradient)."""
    return [x[k] for k in ("x", "t", "ctx") if k in x]


def forward(c, model, ours: bool):
    """``fn(*args) -> tensor`` running the model the way its library is used for this case."""
    if c["model"] == "blip2_qformer" and not ours:
        return lambda q, image: model(query_embeds=q, encoder_hidden_states=image).last_hidden_state
    if c["model"] == "unet_sd15" and not ours:
        return lambda latents, t, text: model(latents, t, text).sample
    tower = c["model"][len("clip_vit_b32_"):] if c["model"] in CLIP_TOWERS else None
    if tower is None:
        return model
    if ours or library(c) == "open_clip":
        return model.encode_image if tower == "image" else model.encode_text
    if tower == "image":
        return lambda x: _tensor(model.get_image_features(pixel_values=x))
    return lambda x: _tensor(model.get_text_features(input_ids=x))


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _shared(c, x0, ctx):
    """The reference model (float32) built once per case, shared by every provider."""
    if "ref" not in ctx:
        ctx["ref"] = reference_model(c, x0["x"].device)
    return ctx["ref"]


def _step(c, model, ours, dtype, device):
    """The timed callable: inference under no_grad, or a training step's forward + backward for the train case."""
    run = forward(c, model, ours)
    if c["train"]:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def train_step(x):
            out = run(*args(x))
            torch.autograd.grad(out, params, x["do"])
            return out
        return train_step
    model.eval()

    def infer(x):
        with torch.no_grad():
            return run(*(a.to(dtype) if a.is_floating_point() else a for a in args(x)))
    if ours and device.type == "cpu":
        import dlcv_fast

        def infer_on_reference_backend(x):
            with dlcv_fast.use_backend("torch"):
                return infer(x)
        return infer_on_reference_backend
    return infer


def provider(ours: bool, compiled: bool, patched: bool = False):
    """Ours (converted from the reference model) or the reference model itself, which ``patched`` runs through
    ``dlcv_fast.patch`` (the reference library's own modules, their attention on our kernels)."""
    def build(c, x0, ctx):
        ref = _shared(c, x0, ctx)
        device = x0["x"].device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if ours:
            import dlcv_fast.models as M

            convert = {"timm": M.from_timm, "open_clip": M.from_open_clip, "transformers": M.from_transformers,
                       "diffusers": M.from_diffusers}
            model = convert[library(c)](copy.deepcopy(ref)).to(dtype)
        else:
            model = copy.deepcopy(ref).to(dtype)
            if patched:
                import dlcv_fast

                dlcv_fast.patch(model)
        if compiled:
            if device.type != "cuda":
                raise Unavailable("torch.compile is timed on a GPU only")
            model = torch.compile(model)
        return _step(c, model, ours, dtype, device)
    return build


def with_fused_mlp(p: Provider) -> Provider:
    """Ours with each MLP's fc1 and activation in one GEMM (``dlcv_fast.nn.mlp.FUSED_LINEAR_ACT``, off by
    default), the flag set around every call and restored."""
    build = p.build

    def build_fused(c, x0, ctx):
        from dlcv_fast.nn import mlp

        fn = build(c, x0, ctx)

        def call(x):
            saved, mlp.FUSED_LINEAR_ACT = mlp.FUSED_LINEAR_ACT, True
            try:
                return fn(x)
            finally:
                mlp.FUSED_LINEAR_ACT = saved
        return call
    return replace(p, name=p.name + "+fused_mlp", build=build_fused, devices=("cuda",), secondary=True)


OURS_EAGER = Provider("dlcv_fast", provider(True, False), devices=("cuda", "cpu"))
# Headline: ours and the reference library, eager and compiled (issue 6's targets). Secondary (--quick times them
# last): the patched reference model, the CUDA backend and the fused-MLP variant.
PROVIDERS = [
    OURS_EAGER,
    Provider("dlcv_fast.compile", provider(True, True), compiled=True),
    Provider("ref.eager", provider(False, False), devices=("cuda", "cpu")),
    Provider("dlcv_fast.patch", provider(False, False, patched=True), devices=("cuda", "cpu"), secondary=True),
    Provider("dlcv_fast.cuda", cuda_backend(provider(True, False)), secondary=True),  # csrc/ kernels where they exist
    with_fused_mlp(OURS_EAGER),
    Provider("ref.compile", provider(False, True), compiled=True),
]


def reference(c, x, ctx):
    ref = _shared(c, x, ctx)
    inputs = [a[:PARITY_ITEMS] for a in args(x)]
    golden_dtype = torch.float64 if inputs[0].device.type == "cpu" else torch.float32
    lp_dtype = torch.bfloat16 if inputs[0].device.type == "cuda" else torch.float32
    outs = []
    for dtype in (golden_dtype, lp_dtype):
        model = copy.deepcopy(ref).to(dtype)
        with torch.no_grad():
            outs.append(forward(c, model, ours=False)(*(a.to(dtype) if a.is_floating_point() else a for a in inputs)))
        del model
    return [(outs[0], outs[1], 2.0)]


def view(c, out):
    return [out[:PARITY_ITEMS]]


register(Benchmark(
    name="model_infer", suite="models", issue=6, title="inference throughput, ours vs the reference library",
    cases=INFER + VLM_DIFFUSION, quick=INFER, cpu_cases=INFER_CPU, providers=PROVIDERS, make_inputs=make_inputs,
    reference=reference, view=view, label=label, items=lambda c: c["batch"], available=available, profile=True))
register(Benchmark(
    name="model_train", suite="models", issue=6, title="training step (forward + backward), ours vs timm eager",
    cases=TRAIN, quick=TRAIN, providers=[p for p in PROVIDERS if not p.compiled and "fused_mlp" not in p.name],
    make_inputs=make_inputs,
    reference=reference, view=view, label=label, items=lambda c: c["batch"], available=available, profile=True))
