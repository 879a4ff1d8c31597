"""Vision Transformer and DeiT on dlcv_fast attention, with timm's state_dict layout.

``VisionTransformer(...).load_state_dict(timm_model.state_dict())`` works directly for the configurations
built here (class token or global average pool, DeiT's distillation token, CLIP's pre-norm image tower);
:func:`vit_from_timm` reads the configuration off a timm model and copies its weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlcv_fast.models.registry import load_reference, register_model, timm_regularisers
from dlcv_fast.nn.block import Block, run_blocks
from dlcv_fast.nn.norm import LayerNorm
from dlcv_fast.nn.patch_embed import PatchEmbed
from dlcv_fast.nn.rotary import RotaryEmbedding2D


def resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix_tokens):
    """Bicubic (antialiased) resize of the patch part of ``pos_embed`` ``(1, P + gh * gw, C)`` to ``new_grid``,
    as timm's ``resample_abs_pos_embed``; returns ``pos_embed`` itself when the grid is unchanged."""
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = grid.shape[-1]
    grid = grid.float().reshape(1, *old_grid, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, C).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)



def init_linears(module: nn.Module, std: float = 0.02):
    """timm's default Linear initialisation: truncated normal weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

class VisionTransformer(nn.Module):
    """ViT / DeiT image classifier (and CLIP image tower) with timm's parameter names.

    Args:
        img_size: the size the position embeddings are made for; other sizes work, with the embeddings
            resampled (bicubic) to the input's patch grid on each forward.
        global_pool: "token" (class token), "avg" (mean of the patch tokens; the final norm then moves after
            the pooling as ``fc_norm``, as in timm) or "" (no pooling: the head sees every token).
        class_token: prepend a learned class token; ``distilled`` adds DeiT's distillation token and
            ``head_dist``: in training :meth:`forward` returns ``(head logits, head_dist logits)``, in eval
            their mean.
        pre_norm: LayerNorm ``norm_pre`` before the blocks and no patch-embedding bias (CLIP).
        head_bias: bias of the classifier ``head`` (CLIP's projection has none).
        act: "gelu" or "quick_gelu"; norm_eps: LayerNorm epsilon (timm ViT 1e-6, CLIP 1e-5).
        drop_path_rate: stochastic depth, rising linearly over the blocks to this rate.
        rope: 2-D rotary position embedding of q and k in every block (RoPE-ViT): "axial" (fixed
            frequencies, base ``rope_theta``, default 100) or "mixed" (learnable per-head, per-block
            frequencies ``rope.freqs``, default base 10); the prefix tokens are not rotated. Channel pairs
            are half-split (those of ``dlcv_fast.attention(rope=...)``). ``pos_embed=False`` drops the
            absolute position embeddings (RoPE-ViT's variants without them).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_norm=False,
                 class_token=True, distilled=False, pre_norm=False, fc_norm=None, head_bias=True, act="gelu",
                 norm_eps=1e-6, drop_path_rate=0.0, rope=None, rope_theta=None, pos_embed=True):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if distilled and not (class_token and global_pool == "token"):
            raise ValueError("distilled=True reads the class and distillation tokens: needs class_token=True "
                             "and global_pool='token'")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = int(class_token) + int(distilled)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        num_pos = self.patch_embed.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim)) if pos_embed else None
        if rope not in (None, "axial", "mixed"):
            raise ValueError(f"rope must be None, 'axial' or 'mixed', got {rope!r}")
        mixed = rope == "mixed"
        self.rope = RotaryEmbedding2D(embed_dim // num_heads, mode=rope, num_heads=num_heads if mixed else None,
                                      depth=depth if mixed else None, theta=rope_theta,
                                      num_prefix_tokens=self.num_prefix_tokens) if rope else None
        self.norm_pre = LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, int(embed_dim * mlp_ratio), qkv_bias=qkv_bias, qk_norm=qk_norm, act=act,
                  norm_eps=norm_eps, drop_path=dpr[i])
            for i in range(depth)])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes, bias=head_bias) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        """timm's default initialisation: truncated normal (std 0.02) Linear weights, zero biases."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        init_linears(self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token", "rope.freqs"}

    def _embed(self, x):
        """Patch tokens with prefix tokens and position embeddings: ``(B, P + gh * gw, C)`` and the grid."""
        x = self.patch_embed(x)
        B, gh, gw, C = x.shape
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        x = torch.cat(prefix + [x.reshape(B, gh * gw, C)], dim=1)
        if self.pos_embed is not None:
            x = x + resample_pos_embed(self.pos_embed, (gh, gw), self.patch_embed.grid_size, self.num_prefix_tokens)
        return self.norm_pre(x), (gh, gw)

    def _rope_tables(self, grid, device):
        """The ``rope=`` argument of each block: None, shared axial tables, or each block's mixed tables."""
        if self.rope is None:
            return [None] * len(self.blocks)
        cos, sin = self.rope(*grid, device=device)
        return list(zip(cos, sin)) if self.rope.mode == "mixed" else [(cos, sin)] * len(self.blocks)

    def forward_features(self, x):
        """Images ``(B, C, H, W)`` -> normed tokens ``(B, P + N, embed_dim)`` (P prefix tokens first)."""
        x, grid = self._embed(x)
        ropes = self._rope_tables(grid, x.device)
        return run_blocks(self.blocks, x, self.norm, [dict(rope=rope) for rope in ropes])

    def forward_head(self, x, pre_logits=False):
        if self.dist_token is not None:
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            return (x, x_dist) if self.training else (x + x_dist) / 2
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        """Images -> logits, ``forward_head(forward_features(x))``. With class-token pooling (no RoPE) the last
        block computes only the prefix tokens' rows, the only ones the head reads, after its keys and values
        (:func:`~dlcv_fast.nn.block.run_blocks`' ``readout``): the same logits up to rounding, for about 7%
        less matmul work in ViT-B/16 (five sixths of one block of twelve)."""
        if (self.global_pool != "token" or self.rope is not None
                or type(self).forward_features is not VisionTransformer.forward_features):  # a subclass's own
            return self.forward_head(self.forward_features(x))
        x, _ = self._embed(x)
        P = self.num_prefix_tokens
        return self.forward_head(run_blocks(self.blocks, x, self.norm, readout=lambda t: t[:, :P]))

    def forward_attention_maps(self, x, layer=-1):
        """The class token's attention over the patches in block ``layer``: ``(B, heads, gh, gw)`` float32.

        Runs the blocks before ``layer`` and that block's attention through the fused kernel, then turns the
        kernel's logsumexp of the class-token row into probabilities with one ``q_cls . K^T`` product per
        head (no ``N x N`` matrix). The values are softmax probabilities over all tokens, restricted to the
        patches (the prefix tokens' share is left out, so a map sums to at most 1).
        """
        if self.cls_token is None:
            raise ValueError("forward_attention_maps needs a class token (class_token=True)")
        x, (gh, gw) = self._embed(x)
        layer = layer % len(self.blocks)
        ropes = self._rope_tables((gh, gw), x.device)
        for blk, rope in zip(self.blocks[:layer], ropes):
            x = blk(x, rope=rope)
        blk = self.blocks[layer]
        _, attn = blk.attn.forward_with_attn_map(blk.norm1(x), query_index=0, rope=ropes[layer])
        return attn[:, :, self.num_prefix_tokens:].reshape(x.shape[0], -1, gh, gw)


_VIT_SIZES = {  # embed_dim, depth, num_heads
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def _vit(size, patch_size, **kwargs):
    embed_dim, depth, num_heads = _VIT_SIZES[size]
    cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    return VisionTransformer(**{**cfg, **kwargs})


@register_model
def vit_tiny_patch16_224(**kwargs):
    return _vit("tiny", 16, **kwargs)


@register_model
def vit_small_patch16_224(**kwargs):
    return _vit("small", 16, **kwargs)


@register_model
def vit_base_patch16_224(**kwargs):
    return _vit("base", 16, **kwargs)


@register_model
def vit_large_patch16_224(**kwargs):
    return _vit("large", 16, **kwargs)


@register_model
def vit_tiny_patch32_224(**kwargs):
    return _vit("tiny", 32, **kwargs)


@register_model
def vit_small_patch32_224(**kwargs):
    return _vit("small", 32, **kwargs)


@register_model
def vit_base_patch32_224(**kwargs):
    return _vit("base", 32, **kwargs)


@register_model
def vit_large_patch32_224(**kwargs):
    return _vit("large", 32, **kwargs)


@register_model
def deit_tiny_patch16_224(**kwargs):
    return _vit("tiny", 16, **kwargs)


@register_model
def deit_small_patch16_224(**kwargs):
    return _vit("small", 16, **kwargs)


@register_model
def deit_base_patch16_224(**kwargs):
    return _vit("base", 16, **kwargs)


@register_model
def deit_tiny_distilled_patch16_224(**kwargs):
    return _vit("tiny", 16, distilled=True, **kwargs)


@register_model
def deit_small_distilled_patch16_224(**kwargs):
    return _vit("small", 16, distilled=True, **kwargs)


@register_model
def deit_base_distilled_patch16_224(**kwargs):
    return _vit("base", 16, distilled=True, **kwargs)


def act_name(module):
    """The :func:`dlcv_fast.nn.mlp.make_act` name of a reference library's activation module."""
    name = type(module).__name__
    if name == "GELU" and getattr(module, "approximate", "none") == "none":
        return "gelu"
    if name == "QuickGELU":
        return "quick_gelu"
    raise NotImplementedError(f"activation {module!r} is not supported (gelu or quick_gelu)")


def vit_from_timm(m):
    """A :class:`VisionTransformer` with the configuration and weights of timm's ``VisionTransformer`` /
    ``VisionTransformerDistilled`` ``m`` (on m's device and dtype, in m's train/eval mode)."""
    unsupported = [name for name, bad in (
        ("register tokens", getattr(m, "reg_token", None) is not None),
        ("no_embed_class", getattr(m, "no_embed_class", False)),
        ("attention pooling", getattr(m, "attn_pool", None) is not None),
        ("pool_include_prefix", getattr(m, "pool_include_prefix", False)),
        ("dynamic_img_pad", getattr(m.patch_embed, "dynamic_img_pad", False)),
        ("patch-embedding norm", not isinstance(m.patch_embed.norm, nn.Identity)),
        ("layer scale", not isinstance(m.blocks[0].ls1, nn.Identity)),
        ("patch dropout", getattr(getattr(m, "patch_drop", None), "prob", 0.0) > 0),
        ("global_pool " + repr(m.global_pool), m.global_pool not in ("token", "avg", "")),
    ) if bad]
    if unsupported:
        raise NotImplementedError(f"timm ViT features not supported by dlcv_fast: {', '.join(unsupported)}")
    blk = m.blocks[0]
    distilled = getattr(m, "dist_token", None) is not None
    cfg = dict(
        img_size=m.patch_embed.img_size, patch_size=m.patch_embed.patch_size,
        in_chans=m.patch_embed.proj.in_channels, num_classes=m.num_classes, global_pool=m.global_pool,
        embed_dim=m.embed_dim, depth=len(m.blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / m.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        qk_norm=not isinstance(blk.attn.q_norm, nn.Identity), class_token=m.cls_token is not None,
        distilled=distilled, pre_norm=not isinstance(m.norm_pre, nn.Identity),
        fc_norm=not isinstance(m.fc_norm, nn.Identity), head_bias=getattr(m.head, "bias", None) is not None,
        act=act_name(blk.mlp.act), norm_eps=blk.norm1.eps, pos_embed=m.pos_embed is not None)
    model = load_reference(VisionTransformer(**cfg), m)
    return timm_regularisers(model, m, model.blocks, m.blocks)
