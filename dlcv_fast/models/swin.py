"""Swin Transformer on dlcv_fast window attention, with timm's state_dict layout.

Each block's attention step (cyclic shift, padding, window partition, relative position bias, shifted-window
mask, merge) is one :func:`dlcv_fast.window_attention` call inside the block of
:mod:`dlcv_fast.nn.window_attention`; this module adds the patch embedding, patch merging, the stages and
the head. ``SwinTransformer(...).load_state_dict(timm_model.state_dict())`` works directly.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dlcv_fast.models.registry import load_reference, register_model, timm_regularisers
from dlcv_fast.models.vit import init_linears
from dlcv_fast.nn.block import has_forward_hooks, run_blocks
from dlcv_fast.nn.norm import LayerNorm
from dlcv_fast.nn.patch_embed import PatchEmbed, to_2tuple
from dlcv_fast.nn.window_attention import SwinTransformerBlock


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated, normed and projected: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), out)``.
    Keys ``norm``, ``reduction`` as in timm (odd sizes are zero-padded first)."""

    def __init__(self, dim, out_dim=None, norm_eps=1e-5):
        super().__init__()
        self.norm = LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        H, W = x.shape[1:3]
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional :class:`PatchMerging` (``downsample``) then ``depth`` blocks alternating plain and shifted
    (by half the window) windows; the blocks shrink the window to a smaller ``resolution`` as timm does.
    ``drop_path``: the stochastic-depth rate of each block."""

    def __init__(self, dim, out_dim, resolution, depth, num_heads, window_size, *, downsample, mlp_ratio=4.0,
                 drop_path, qkv_bias=True, always_partition=False, norm_eps=1e-5):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, norm_eps) if downsample else nn.Identity()
        shift = tuple(w // 2 for w in window_size)
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, resolution, num_heads, window_size=window_size,
                                 shift_size=(0, 0) if i % 2 == 0 else shift, always_partition=always_partition,
                                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path[i],
                                 norm_layer=partial(LayerNorm, eps=norm_eps))
            for i in range(depth)])

    def forward(self, x):
        x = self.downsample(x)
        return self.blocks(x) if has_forward_hooks(self.blocks) else run_blocks(self.blocks, x)


def _stage_windows(window_size, num_stages):
    """One (h, w) window per stage from an int, an (h, w) pair (always one window, as in timm) or a per-stage list."""
    if isinstance(window_size, int) or (len(window_size) == 2 and isinstance(window_size[0], int)):
        return [to_2tuple(window_size)] * num_stages
    if len(window_size) != num_stages:
        raise ValueError(f"window_size needs one entry per stage ({num_stages}), got {window_size!r}")
    return [to_2tuple(w) for w in window_size]


class _PoolHead(nn.Module):
    """Global average pool over (H, W) then ``fc`` (timm's ``ClassifierHead`` keys)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x, pre_logits=False):
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """Swin Transformer image classifier with timm's parameter names.

    Args:
        img_size: the input size the stage windows are set for (a window larger than a stage's map shrinks
            to it, as in timm, unless ``always_partition``); other sizes run with those windows, padded in
            the kernel, as timm does with ``dynamic_img_size``.
        window_size: one int / (h, w) for all stages, or one per stage.
        embed_dim: channels of the first stage, doubled by each patch merging.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this rate (timm's default is 0.1;
            it only matters in training).
    Input ``(B, 3, H, W)``; :meth:`forward_features` gives the normed ``(B, H/32, W/32, C_last)`` map.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, always_partition=False,
                 norm_eps=1e-5, drop_path_rate=0.0):
        super().__init__()
        self.num_classes = num_classes
        n = len(depths)
        windows = _stage_windows(window_size, n)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_eps=norm_eps)
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        resolution, stages = self.patch_embed.grid_size, []
        for i in range(n):
            if i > 0:
                resolution = tuple((r + 1) // 2 for r in resolution)
            stages.append(SwinStage(dims[max(i - 1, 0)], dims[i], resolution, depths[i], num_heads[i], windows[i],
                                    downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                    always_partition=always_partition, norm_eps=norm_eps,
                                    drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])]))
        self.layers = nn.Sequential(*stages)
        self.norm = LayerNorm(self.num_features, eps=norm_eps)
        self.head = _PoolHead(self.num_features, num_classes)
        self.init_weights()

    def init_weights(self):
        """timm's default initialisation: truncated normal (std 0.02) Linear weights, zero biases (the relative
        position bias tables are initialised by their blocks)."""
        init_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    def forward_features(self, x):
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x, pre_logits=False):
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _swin(embed_dim, depths, num_heads, window_size, img_size, **kwargs):
    cfg = dict(embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_size=window_size, img_size=img_size)
    return SwinTransformer(**{**cfg, **kwargs})


@register_model
def swin_tiny_patch4_window7_224(**kwargs):
    return _swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224, **kwargs)


@register_model
def swin_small_patch4_window7_224(**kwargs):
    return _swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224, **kwargs)


@register_model
def swin_base_patch4_window7_224(**kwargs):
    return _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224, **kwargs)


@register_model
def swin_base_patch4_window12_384(**kwargs):
    return _swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384, **kwargs)


@register_model
def swin_large_patch4_window7_224(**kwargs):
    return _swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224, **kwargs)


@register_model
def swin_large_patch4_window12_384(**kwargs):
    return _swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384, **kwargs)


def swin_from_timm(m):
    """A :class:`SwinTransformer` with the configuration and weights of timm's ``SwinTransformer`` ``m`` (on m's
    device and dtype, in m's train/eval mode)."""
    first = m.layers[0].blocks[0]
    if m.global_pool != "avg":
        raise NotImplementedError(f"timm Swin global_pool {m.global_pool!r} is not supported ('avg')")
    cfg = dict(
        img_size=m.patch_embed.img_size, patch_size=m.patch_embed.patch_size, in_chans=m.patch_embed.proj.in_channels,
        num_classes=m.num_classes, embed_dim=m.embed_dim, depths=tuple(len(s.blocks) for s in m.layers),
        num_heads=tuple(s.blocks[0].attn.num_heads for s in m.layers),
        window_size=[tuple(s.blocks[0].window_size) for s in m.layers], always_partition=first.always_partition,
        mlp_ratio=first.mlp.fc1.out_features / m.embed_dim, qkv_bias=first.attn.qkv.bias is not None,
        norm_eps=first.norm1.eps)
    model = load_reference(SwinTransformer(**cfg), m)
    return timm_regularisers(model, m, (b for stage in model.layers for b in stage.blocks),
                             (b for stage in m.layers for b in stage.blocks))
