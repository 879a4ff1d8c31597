"""The latent-diffusion U-Net (Stable Diffusion 1.x / 2.x) on dlcv_fast attention, with diffusers' state_dict keys.

``UNet2DConditionModel(...).load_state_dict(diffusers_unet.state_dict())`` works directly for the configurations
built here; :func:`unet_from_diffusers` reads the configuration off a diffusers ``UNet2DConditionModel`` and copies
its weights. ``forward(sample, timestep, encoder_hidden_states, encoder_attention_mask=None)`` returns the
predicted tensor (diffusers returns an output object holding it).

Scope: the SD 1.x / 2.x family. Down blocks "CrossAttnDownBlock2D" / "DownBlock2D", mid block
"UNetMidBlock2DCrossAttn", up blocks "CrossAttnUpBlock2D" / "UpBlock2D"; ResnetBlock2D with the time embedding
added between its convolutions ("default" time scale-shift); Transformer2DModel of BasicTransformerBlocks
(self-attention, cross-attention over the text, GEGLU feed-forward) with 1x1-conv (SD1) or linear (SD2)
projections; the sinusoidal timestep projection and its MLP. Anything else in a diffusers config raises
NotImplementedError in :func:`unet_from_diffusers` (class / addition embeddings, timestep conditioning,
scale-shift time norm, dual or gated attention, only-cross-attention, dropout, ...), and so do FreeU and
gradient checkpointing switched on. Not done: gradient checkpointing, diffusers' self-attention
``attention_mask``, ControlNet / T2I-Adapter residuals; LoRA / IP-Adapter weights loaded into the diffusers model
add state_dict keys, which the strict load refuses (fuse LoRA into the weights first).

Heads: diffusers' ``attention_head_dim`` of a UNet2DConditionModel config is, for historical reasons, the number
of heads per block (SD1.5's ``8`` is 8 heads of 320 / 8 = 40 channels at the first level; SD2's ``[5, 10, 20, 20]``
are 64-channel heads), unless ``num_attention_heads`` is set. Ours takes the head count as ``num_attention_heads``
and the converter resolves it as diffusers does; the head dim is ``channels // heads``.

Attention: self-attention computes q, k and v in one GEMM (the three weights concatenated at call time, so the
state_dict keeps diffusers' ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``), cross-attention q from the image tokens
and k, v from the text in one GEMM; q, k, v are strided views of those outputs fed to :func:`dlcv_fast.attention`
without copies, and its ``(B, L, H, D)``-laid-out output feeds ``to_out.0`` without a copy (a projection that is not
a plain Linear, e.g. a LoRA wrapper put on ours, is called as it is instead). The kernel
accumulates the softmax in fp32 whatever the input dtype, so ``upcast_attention`` (SD2.1's fp16 fix) needs no
separate path. ``encoder_attention_mask`` ``(B, Lk)`` (1/True = keep) becomes the kernel's key-padding mask;
diffusers adds a -10000 bias instead, which for a prompt whose tokens are all masked averages over all of them: a
fully masked row here takes every key too, so both agree.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast
from dlcv_fast.models.registry import load_reference, register_model
from dlcv_fast.nn.norm import LayerNorm

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)


def timestep_embedding(timesteps, dim, *, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """Sinusoidal embedding ``(N, dim)`` float32 of ``timesteps`` ``(N,)`` (DDPM's; diffusers' ``Timesteps``).

    Frequencies ``exp(-ln(max_period) * i / (dim / 2 - freq_shift))``, i < dim / 2; the halves are ``[sin, cos]``,
    or ``[cos, sin]`` with ``flip_sin_to_cos``; an odd ``dim`` gets a zero last column. Computed in float32 with
    diffusers' operations, so the result is bitwise the same."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    return F.pad(torch.cat(parts, dim=-1), (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(t_emb)))``: ``(N, in_dim)`` -> ``(N, dim)``."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """``(x' + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))) / output_scale_factor``,
    with ``x'`` = x, or ``conv_shortcut(x)`` (1x1) when the channel count changes. ``x`` ``(B, in_ch, H, W)``,
    ``temb`` ``(B, temb_ch)`` -> ``(B, out_ch, H, W)``."""

    def __init__(self, in_ch, out_ch, temb_ch, *, groups=32, eps=1e-6, output_scale_factor=1.0):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2; ``padding=0`` pads one row and column at the bottom/right instead."""

    def __init__(self, ch, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling, x2 or to ``size`` (the skip connection's, for odd sizes), then a 3x3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def _project_heads(x, layers, heads, head_dim):
    """``x`` ``(B, N, C)`` through each of ``layers`` -> one ``(B, heads, N, head_dim)`` view per layer, all of one
    ``(B, N, len(layers), heads, head_dim)`` GEMM output on the concatenated weights (plain bias-free Linears; a
    wrapped layer, e.g. LoRA, is called as it is and the outputs concatenated)."""
    B, N, _ = x.shape
    if all(type(layer) is nn.Linear and layer.bias is None for layer in layers):
        y = F.linear(x, torch.cat([layer.weight for layer in layers]))
    else:
        y = torch.cat([layer(x) for layer in layers], dim=-1)
    return y.view(B, N, len(layers), heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


class Attention(nn.Module):
    """Multi-head attention with diffusers' keys ``to_q``, ``to_k``, ``to_v`` (no biases), ``to_out.0``.

    ``x`` ``(B, N, dim)`` and, for cross-attention (``context_dim`` set), ``context`` ``(B, L, context_dim)`` ->
    ``(B, N, dim)``. ``key_padding_mask`` ``(B, L)`` bool, True = the context token takes part. Scale
    ``head_dim ** -0.5``. Self-attention: q, k, v from one GEMM; cross-attention: q from one, k and v from another.
    """

    def __init__(self, dim, heads, head_dim, context_dim=None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' to_out.1 is a parameter-free Dropout

    def forward(self, x, context=None, key_padding_mask=None):
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        if context is None:
            q, k, v = _project_heads(x, (self.to_q, self.to_k, self.to_v), H, D)
        else:
            (q,) = _project_heads(x, (self.to_q,), H, D)
            k, v = _project_heads(context, (self.to_k, self.to_v), H, D)
        o = dlcv_fast.attention(q, k, v, key_padding_mask=key_padding_mask, scale=D ** -0.5)
        return self.to_out[0](o.transpose(1, 2).reshape(B, N, H * D))  # o is a (B, N, H, D) buffer: no copy


class GEGLU(nn.Module):
    """``a * gelu(b)`` with ``a, b`` the two halves of ``proj(x)``."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.2(net.0(x))``: GEGLU to ``4 * dim``, then back to ``dim`` (``net.1`` is diffusers' Dropout)."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm block on tokens ``(B, N, dim)``: self-attention (``norm1``, ``attn1``), cross-attention over the
    context (``norm2``, ``attn2``), GEGLU feed-forward (``norm3``, ``ff``). LayerNorm eps 1e-5; each residual
    add shares a kernel with the norm after it (:class:`~dlcv_fast.nn.LayerNorm`'s ``residual=``)."""

    def __init__(self, dim, heads, head_dim, context_dim):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, key_padding_mask=None):
        y, x = self.norm2(self.attn1(self.norm1(x)), residual=x)
        y, x = self.norm3(self.attn2(y, context, key_padding_mask), residual=x)
        return x + self.ff(y)


class Transformer2DModel(nn.Module):
    """Image ``(B, C, H, W)`` -> ``x + proj_out(blocks(proj_in(norm(x))))`` over the ``H * W`` tokens.

    ``norm``: GroupNorm (eps 1e-6). ``proj_in`` / ``proj_out``: Linear on the tokens (``use_linear_projection``,
    SD2) or 1x1 Conv2d (SD1; run here as the same Linear on the tokens, its weight viewed ``(out, in)``).
    """

    def __init__(self, channels, heads, head_dim, context_dim, *, num_layers=1, groups=32, use_linear_projection=False):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(channels, inner), nn.Linear(inner, channels)
        else:
            self.proj_in, self.proj_out = nn.Conv2d(channels, inner, 1), nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(num_layers)])

    @staticmethod
    def _tokens_linear(layer, x):
        """``layer`` (Linear or 1x1 Conv2d) applied to tokens ``(B, N, in)``."""
        return F.linear(x, layer.weight.flatten(1), layer.bias)

    def forward(self, x, context, key_padding_mask=None):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        h = self._tokens_linear(self.proj_in, h)
        for blk in self.transformer_blocks:
            h = blk(h, context, key_padding_mask)
        h = self._tokens_linear(self.proj_out, h)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


def _transformer(ch, heads, context_dim, layers, groups, linear):
    return Transformer2DModel(ch, heads, ch // heads, context_dim, num_layers=layers, groups=groups,
                              use_linear_projection=linear)


class DownBlock2D(nn.Module):
    """``num_layers`` x (ResnetBlock2D [+ Transformer2DModel when ``cross_attention``]) [+ Downsample2D].
    diffusers' CrossAttnDownBlock2D (``attentions`` present) and DownBlock2D. Returns the output and the outputs of
    every layer and of the downsampler (the skip connections)."""

    def __init__(self, in_ch, out_ch, temb_ch, *, num_layers, cross_attention, heads=None, context_dim=None,
                 transformer_layers=1, groups=32, eps=1e-5, linear=False, add_downsample=True, downsample_padding=1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups=groups, eps=eps)
            for i in range(num_layers)])
        self.attentions = nn.ModuleList([
            _transformer(out_ch, heads, context_dim, transformer_layers, groups, linear)
            for _ in range(num_layers)]) if cross_attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, downsample_padding)]) if add_downsample else None

    def forward(self, x, temb, context, key_padding_mask=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, key_padding_mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """``resnets.0``, then (``attentions.i``, ``resnets.i+1``) pairs; channels unchanged."""

    def __init__(self, ch, temb_ch, *, heads, context_dim, transformer_layers=1, groups=32, eps=1e-5, linear=False,
                 output_scale_factor=1.0):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(ch, ch, temb_ch, groups=groups, eps=eps, output_scale_factor=output_scale_factor)
            for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(ch, heads, context_dim, transformer_layers, groups, linear)])

    def forward(self, x, temb, context, key_padding_mask=None):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context, key_padding_mask), temb)
        return x


class UpBlock2D(nn.Module):
    """``num_layers`` x (concat a skip connection, ResnetBlock2D [+ Transformer2DModel]) [+ Upsample2D]. diffusers'
    CrossAttnUpBlock2D (``attentions`` present) and UpBlock2D. Layer i takes ``prev_ch`` (i = 0) or ``out_ch``
    channels plus the skip's: ``skip_ch`` for the last layer, ``out_ch`` for the others."""

    def __init__(self, prev_ch, skip_ch, out_ch, temb_ch, *, num_layers, cross_attention, heads=None,
                 context_dim=None, transformer_layers=1, groups=32, eps=1e-5, linear=False, add_upsample=True):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + (skip_ch if i == num_layers - 1 else out_ch), out_ch,
                          temb_ch, groups=groups, eps=eps)
            for i in range(num_layers)])
        self.attentions = nn.ModuleList([
            _transformer(out_ch, heads, context_dim, transformer_layers, groups, linear)
            for _ in range(num_layers)]) if cross_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x, skips, temb, context, key_padding_mask=None, upsample_size=None):
        """``skips``: this block's skip connections, the last one first consumed."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, key_padding_mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def _per_block(value, n, name):
    """``value`` as a list of ``n`` (an int repeated, or a list / tuple of n)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} blocks")
        return list(value)
    return [value] * n


class UNet2DConditionModel(nn.Module):
    """The Stable Diffusion 1.x / 2.x U-Net with diffusers' parameter names; defaults are SD1.5's.

    Args mirror diffusers' config where they mean the same; ``num_attention_heads`` is the head count per block
    (diffusers' ``attention_head_dim`` in SD configs, see the module docstring), an int or one per down block, as
    are ``layers_per_block``, ``transformer_layers_per_block`` and ``cross_attention_dim``. ``upcast_attention`` is
    kept for the record: the kernel accumulates in fp32 anyway. ``mid_block_scale_factor`` divides the mid block's
    resnet outputs. No gradient checkpointing.
    """

    def __init__(self, sample_size=None, in_channels=4, out_channels=4, center_input_sample=False,
                 flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 mid_block_type="UNetMidBlock2DCrossAttn",
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
                 mid_block_scale_factor=1.0, norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768,
                 transformer_layers_per_block=1, num_attention_heads=8, use_linear_projection=False,
                 upcast_attention=False, time_embedding_dim=None, conv_in_kernel=3, conv_out_kernel=3):
        super().__init__()
        n = len(block_out_channels)
        for kind, types, allowed in (("down", down_block_types, DOWN_BLOCKS), ("up", up_block_types, UP_BLOCKS)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise NotImplementedError(f"{kind} block types {bad} are not supported (only {', '.join(allowed)})")
            if len(types) != n:
                raise ValueError(f"{len(types)} {kind} block types for {n} block_out_channels")
        if mid_block_type not in MID_BLOCKS:
            raise NotImplementedError(f"mid_block_type {mid_block_type!r} is not supported (only {MID_BLOCKS[0]})")
        for k in (conv_in_kernel, conv_out_kernel):
            if k % 2 != 1:
                raise ValueError(f"conv_in_kernel / conv_out_kernel must be odd, got {k}")
        self.sample_size = sample_size
        self.center_input_sample = center_input_sample
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift
        self.upcast_attention = upcast_attention
        heads = _per_block(num_attention_heads, n, "num_attention_heads")
        layers = _per_block(layers_per_block, n, "layers_per_block")
        t_layers = _per_block(transformer_layers_per_block, n, "transformer_layers_per_block")
        ctx = _per_block(cross_attention_dim, n, "cross_attention_dim")
        ch = list(block_out_channels)
        temb_ch = time_embedding_dim or 4 * ch[0]
        common = dict(groups=norm_num_groups, eps=norm_eps, linear=use_linear_projection)

        self.conv_in = nn.Conv2d(in_channels, ch[0], conv_in_kernel, padding=conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        self.down_blocks = nn.ModuleList([
            DownBlock2D(ch[max(i - 1, 0)], ch[i], temb_ch, num_layers=layers[i],
                        cross_attention=t == "CrossAttnDownBlock2D", heads=heads[i], context_dim=ctx[i],
                        transformer_layers=t_layers[i], add_downsample=i < n - 1,
                        downsample_padding=downsample_padding, **common)
            for i, t in enumerate(down_block_types)])
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb_ch, heads=heads[-1], context_dim=ctx[-1],
                                                 transformer_layers=t_layers[-1],
                                                 output_scale_factor=mid_block_scale_factor, **common)
        # Up block i mirrors down block n - 1 - i, with one layer more (for the skip of the level's downsampler, or
        # of conv_in at the top).
        rch, rlayers, rheads, rt_layers, rctx = (xs[::-1] for xs in (ch, layers, heads, t_layers, ctx))
        self.up_blocks = nn.ModuleList([
            UpBlock2D(rch[max(i - 1, 0)], rch[min(i + 1, n - 1)], rch[i], temb_ch, num_layers=rlayers[i] + 1,
                      cross_attention=t == "CrossAttnUpBlock2D", heads=rheads[i], context_dim=rctx[i],
                      transformer_layers=rt_layers[i], add_upsample=i < n - 1, **common)
            for i, t in enumerate(up_block_types)])
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, ch[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(ch[0], out_channels, conv_out_kernel, padding=conv_out_kernel // 2)

    def time_embed(self, timestep, sample):
        """``(B, temb_ch)`` embedding of ``timestep`` (a number, a 0-d tensor, or ``(B,)`` / ``(1,)``), in the
        sample's dtype (the sinusoid itself in float32, as diffusers)."""
        B = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float64 if isinstance(timestep, float) else torch.int64)
        t = timestep.to(sample.device).reshape(-1).expand(B)
        t_emb = timestep_embedding(t, self.time_embedding.linear_1.in_features, flip_sin_to_cos=self.flip_sin_to_cos,
                                   freq_shift=self.freq_shift)
        return self.time_embedding(t_emb.to(sample.dtype))

    @staticmethod
    def key_padding_mask(encoder_attention_mask, batch, length):
        """diffusers' ``encoder_attention_mask`` ``(B, Lk)`` or ``(B, 1, Lk)`` (1/True = keep) as the kernel's bool
        mask; a prompt with nothing kept keeps everything (diffusers' -10000 bias on every key is no mask at all).
        diffusers turns a mask m into a ``(1 - m) * -10000`` bias, so only 0/1 masks mean anything: a float value
        above 0.5 keeps its token (0.5 would already be a -5000 bias there)."""
        if encoder_attention_mask is None:
            return None
        m = encoder_attention_mask
        if m.dim() == 3 and m.shape[1] == 1:
            m = m[:, 0]
        if tuple(m.shape) != (batch, length):
            raise ValueError(f"encoder_attention_mask must have shape (B, Lk) = {(batch, length)} or (B, 1, Lk), got "
                             f"{tuple(encoder_attention_mask.shape)}")
        keep = m if m.dtype == torch.bool else m > 0.5
        return keep | ~keep.any(dim=-1, keepdim=True)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None):
        """``sample`` ``(B, in_channels, H, W)`` noisy latents, ``timestep`` a number or ``(B,)`` tensor,
        ``encoder_hidden_states`` ``(B, Lk, cross_attention_dim)`` text features, ``encoder_attention_mask``
        ``(B, Lk)`` (1/True = keep) or None -> ``(B, out_channels, H, W)``. H and W need not be multiples of
        ``2 ** (levels - 1)``: the upsamplers then match the skip connections' sizes."""
        B = sample.shape[0]
        context = encoder_hidden_states
        mask = self.key_padding_mask(encoder_attention_mask, B, context.shape[1])
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.time_embed(timestep, sample)
        factor = 2 ** (len(self.up_blocks) - 1)
        odd_size = any(s % factor for s in sample.shape[-2:])

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, mask)
            skips += block_skips
        x = self.mid_block(x, temb, context, mask)
        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            size = skips[-1].shape[2:] if odd_size and block.upsamplers is not None else None
            x = block(x, block_skips, temb, context, mask, upsample_size=size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------------

# Config values with no effect in a model built here, compared with their defaults: anything else raises.
_REFUSED_UNLESS = {
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None, "time_cond_proj_dim": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None, "class_embeddings_concat": False,
    "resnet_time_scale_shift": "default", "dual_cross_attention": False, "attention_type": "default",
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "reverse_transformer_layers_per_block": None, "dropout": 0.0,
}


def _strip_res(name):
    """diffusers reads "UNetRes<Block>" as "<Block>"."""
    return name[7:] if name.startswith("UNetRes") else name


def unet_config_from_diffusers(config):
    """Our constructor's arguments from a diffusers ``UNet2DConditionModel`` config (a dict or FrozenDict);
    NotImplementedError naming every value outside the supported family.

    ``resnet_skip_time_act``, ``resnet_out_scale_factor``, ``cross_attention_norm`` and
    ``addition_embed_type_num_heads`` are accepted whatever their values: diffusers reads them only for other
    block types (Simple*, ResnetDownsample*, K*) or embeddings refused here, so they change nothing in these blocks.
    ``sample_size`` is kept as an attribute (it sizes nothing)."""
    c = dict(config)
    bad = [f"{k}={c.get(k)!r}" for k, ok in _REFUSED_UNLESS.items() if c.get(k, ok) != ok]
    if any(_per_block(c.get("only_cross_attention", False), len(c["down_block_types"]), "only_cross_attention")) \
            or c.get("mid_block_only_cross_attention"):
        bad.append("only_cross_attention=True")
    if c.get("act_fn", "silu") not in ("silu", "swish"):
        bad.append(f"act_fn={c['act_fn']!r}")
    if c.get("norm_num_groups", 32) is None:
        bad.append("norm_num_groups=None")
    if any(isinstance(v, (list, tuple)) for v in _per_block(c.get("transformer_layers_per_block", 1),
                                                           len(c["down_block_types"]), "transformer_layers_per_block")):
        bad.append("transformer_layers_per_block with per-layer lists")
    down = [_strip_res(t) for t in c["down_block_types"]]
    up = [_strip_res(t) for t in c["up_block_types"]]
    bad += [f"down block {t!r}" for t in down if t not in DOWN_BLOCKS]
    bad += [f"up block {t!r}" for t in up if t not in UP_BLOCKS]
    if c.get("mid_block_type", MID_BLOCKS[0]) not in MID_BLOCKS:
        bad.append(f"mid_block_type={c['mid_block_type']!r}")
    if bad:
        raise NotImplementedError(f"diffusers UNet2DConditionModel config outside dlcv_fast's SD 1.x/2.x family: "
                                  f"{', '.join(bad)}")
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)  # diffusers' naming quirk
    return dict(
        sample_size=c.get("sample_size"), in_channels=c["in_channels"], out_channels=c["out_channels"],
        center_input_sample=c.get("center_input_sample", False), flip_sin_to_cos=c.get("flip_sin_to_cos", True),
        freq_shift=c.get("freq_shift", 0), down_block_types=tuple(down), mid_block_type=MID_BLOCKS[0],
        up_block_types=tuple(up), block_out_channels=tuple(c["block_out_channels"]),
        layers_per_block=c.get("layers_per_block", 2), downsample_padding=c.get("downsample_padding", 1),
        mid_block_scale_factor=c.get("mid_block_scale_factor", 1.0), norm_num_groups=c.get("norm_num_groups", 32),
        norm_eps=c.get("norm_eps", 1e-5), cross_attention_dim=c.get("cross_attention_dim", 1280),
        transformer_layers_per_block=c.get("transformer_layers_per_block", 1), num_attention_heads=heads,
        use_linear_projection=c.get("use_linear_projection", False), upcast_attention=c.get("upcast_attention", False),
        time_embedding_dim=c.get("time_embedding_dim"), conv_in_kernel=c.get("conv_in_kernel", 3),
        conv_out_kernel=c.get("conv_out_kernel", 3))


def unet_from_diffusers(m):
    """A :class:`UNet2DConditionModel` with the configuration and weights of diffusers' ``UNet2DConditionModel``
    ``m`` (on m's device and dtype, in m's train/eval mode). NotImplementedError for a config outside the SD
    1.x / 2.x family, for FreeU switched on, fused q/k/v projections and gradient checkpointing (switch them off
    first)."""
    if any(getattr(b, name, None) for b in m.up_blocks for name in ("s1", "s2", "b1", "b2")):
        raise NotImplementedError("FreeU is enabled on the diffusers U-Net (m.disable_freeu() first): not supported")
    if any(getattr(a, "fused_projections", False) for a in m.modules()):
        raise NotImplementedError("the diffusers U-Net has fused q/k/v projections (to_qkv / to_kv): call "
                                  "m.unfuse_qkv_projections() before converting")
    if getattr(m, "is_gradient_checkpointing", False):
        raise NotImplementedError("gradient checkpointing is not supported by dlcv_fast's U-Net; call "
                                  "m.disable_gradient_checkpointing() before converting")
    model = UNet2DConditionModel(**unet_config_from_diffusers(m.config))
    return load_reference(model, m)


@register_model
def unet_sd15(**kwargs):
    """Stable Diffusion 1.x's U-Net (860M parameters: 320/640/1280/1280 channels, 8 heads, CLIP-L text width 768);
    these are the class defaults. Load weights with ``load_state_dict`` or :func:`unet_from_diffusers`."""
    return UNet2DConditionModel(**kwargs)


@register_model
def unet_sd21(**kwargs):
    """Stable Diffusion 2.x's U-Net: 64-channel heads (5/10/20/20 per block), linear projections, OpenCLIP-H text
    width 1024."""
    cfg = dict(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
               upcast_attention=True)
    return UNet2DConditionModel(**{**cfg, **kwargs})
