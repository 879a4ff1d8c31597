"""CLIP (image tower, text tower, projections, logit scale) on dlcv_fast attention.

The image tower is a :class:`~dlcv_fast.models.vit.VisionTransformer` (pre-norm, class-token pooling, a
bias-free projection as ``head``; timm's CLIP layout), the text tower a causal transformer of the same
blocks. :func:`clip_from_open_clip` and :func:`clip_from_transformers` convert open_clip ``CLIP`` and
Hugging Face ``CLIPModel`` models, weights included.

Masks, matching each reference exactly: the text tower always runs the kernel's causal mask (open_clip's
only mask); ``attention_mask`` (Hugging Face's padding mask, 1 = real token) adds the kernel's
key-padding mask. Neither is materialised. Pooling is at the end-of-text token: the argmax of the token
ids (open_clip, and Hugging Face configs with the legacy ``eos_token_id == 2``) or, with ``eos_token_id``
set, its first occurrence (Hugging Face).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlcv_fast.models.registry import load_reference, register_model
from dlcv_fast.models.vit import VisionTransformer, act_name
from dlcv_fast.nn.block import Block, run_blocks
from dlcv_fast.nn.hooks import plain_eager
from dlcv_fast.nn.norm import LayerNorm


class TextTransformer(nn.Module):
    """CLIP's text tower: token + position embeddings, causal blocks, final norm, pooled at the end-of-text
    token, projected by ``head`` (no bias). ``text`` ``(B, L)`` int ids with ``L <= context_length``."""

    def __init__(self, context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                 output_dim=512, act="gelu", norm_eps=1e-5, eos_token_id=None):
        super().__init__()
        self.context_length = context_length
        self.eos_token_id = eos_token_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList([
            Block(width, heads, int(width * mlp_ratio), qkv_bias=True, act=act, norm_eps=norm_eps)
            for _ in range(layers)])
        self.norm = LayerNorm(width, eps=norm_eps)
        self.head = nn.Linear(width, output_dim, bias=False)
        self.init_weights()

    def init_weights(self):
        """open_clip's initialisation (normal, std scaled by width and depth)."""
        width, layers = self.norm.normalized_shape[0], len(self.blocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=width ** -0.5)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.head.weight, std=width ** -0.5)

    def eot_index(self, text):
        """Position of each sequence's end-of-text token ``(B,)``."""
        if self.eos_token_id is None:
            return text.argmax(dim=-1)
        return (text == self.eos_token_id).int().argmax(dim=-1)

    def _check_length(self, text):
        if text.shape[1] > self.context_length:
            raise ValueError(f"text has {text.shape[1]} tokens, more than context_length={self.context_length}")

    def _embed(self, text):
        self._check_length(text)
        return self.token_embedding(text) + self.pos_embed[:, :text.shape[1]]

    def _block_kwargs(self, attention_mask):
        """The key padding mask (None without ``attention_mask``) and every block's attention arguments."""
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        return key_padding_mask, [dict(causal=True, key_padding_mask=key_padding_mask)] * len(self.blocks)

    def forward_features(self, text, attention_mask=None):
        """Normed token features ``(B, L, width)``; ``attention_mask`` ``(B, L)`` (1/True = real token) or None."""
        return run_blocks(self.blocks, self._embed(text), self.norm, self._block_kwargs(attention_mask)[1])

    def forward(self, text, attention_mask=None):
        """Token ids ``(B, L)`` -> the end-of-text token's projected features ``(B, output_dim)``.

        Two shortcuts, both exact up to rounding. The mask is causal, so no token after the last end-of-text
        token of the batch can reach a pooled output: in eager mode the batch is cut there first (tokenizers
        such as open_clip's pad every text to 77 tokens; a caption of 20 then costs a quarter), which reads that
        position on the host; only in plain eager mode (not under torch.compile, torch.jit.trace, vmap, fake or
        meta tensors, CUDA-graph capture: their shapes must not depend on the data). And the last block computes
        only the end-of-text rows (after every token's keys and values; their causal mask becomes a key padding
        mask: keys up to that token, and real tokens only when ``attention_mask`` is given), about 7% less matmul
        work (:func:`~dlcv_fast.nn.block.run_blocks`' ``readout``)."""
        self._check_length(text)  # before the cut, which could hide a text that is too long
        eot = self.eot_index(text)
        if type(self).forward_features is not TextTransformer.forward_features:  # a subclass's own features
            x = self.forward_features(text, attention_mask)
            return self.head(x[torch.arange(x.shape[0], device=x.device), eot])
        if text.shape[0] and plain_eager(text, attention_mask):
            keep = int(eot.max()) + 1
            text = text[:, :keep]
            attention_mask = attention_mask[:, :keep] if attention_mask is not None else None
        B, L = text.shape
        x = self._embed(text)
        rows = torch.arange(B, device=text.device)
        key_padding_mask, kwargs = self._block_kwargs(attention_mask)
        last_keys = torch.arange(L, device=text.device)[None, :] <= eot[:, None]  # what the eot query sees
        if key_padding_mask is not None:
            last_keys = last_keys & key_padding_mask
        x = run_blocks(self.blocks, x, self.norm, kwargs, readout=lambda t: t[rows, eot][:, None],
                       readout_kwargs=dict(key_padding_mask=last_keys))
        return self.head(x[:, 0])


class CLIP(nn.Module):
    """CLIP: ``visual`` (:class:`VisionTransformer`) and ``text`` (:class:`TextTransformer`) towers projected to
    ``embed_dim``, and the learned ``logit_scale`` (log of the inverse temperature).

    ``forward(image, text, attention_mask=None)`` returns ``(logits_per_image, logits_per_text)``,
    ``(B_img, B_txt)`` and its transpose: scaled cosine similarities of the normalised embeddings.
    ``act`` is "quick_gelu" for OpenAI's weights, "gelu" for most LAION-trained ones.
    """

    def __init__(self, embed_dim=512, *, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                 vision_heads=12, vision_mlp_ratio=4.0, context_length=77, vocab_size=49408, text_width=512,
                 text_heads=8, text_layers=12, text_mlp_ratio=4.0, act="gelu", norm_eps=1e-5, eos_token_id=None,
                 init_logit_scale=math.log(1 / 0.07)):
        super().__init__()
        self.visual = VisionTransformer(
            img_size=image_size, patch_size=patch_size, num_classes=embed_dim, embed_dim=vision_width,
            depth=vision_layers, num_heads=vision_heads, mlp_ratio=vision_mlp_ratio, pre_norm=True,
            head_bias=False, act=act, norm_eps=norm_eps)
        self.text = TextTransformer(
            context_length=context_length, vocab_size=vocab_size, width=text_width, heads=text_heads,
            layers=text_layers, mlp_ratio=text_mlp_ratio, output_dim=embed_dim, act=act, norm_eps=norm_eps,
            eos_token_id=eos_token_id)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, image, normalize=False):
        """Images ``(B, 3, H, W)`` -> embeddings ``(B, embed_dim)``."""
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, attention_mask=None, normalize=False):
        """Token ids ``(B, L)`` (and optionally the padding mask, 1 = real token) -> embeddings ``(B, embed_dim)``."""
        x = self.text(text, attention_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def forward_attention_maps(self, image, layer=-1):
        """The image tower's class-token attention maps, ``(B, heads, gh, gw)``; see
        :meth:`VisionTransformer.forward_attention_maps`."""
        return self.visual.forward_attention_maps(image, layer)

    def forward(self, image, text, attention_mask=None):
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, attention_mask, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


_CLIP_CONFIGS = {
    "clip_vit_b32": dict(patch_size=32),
    "clip_vit_b16": dict(patch_size=16),
}


@register_model
def clip_vit_b32(**kwargs):
    """CLIP ViT-B/32 (open_clip "ViT-B-32"); pass ``act="quick_gelu"`` for OpenAI's weights."""
    return CLIP(**{**_CLIP_CONFIGS["clip_vit_b32"], **kwargs})


@register_model
def clip_vit_b16(**kwargs):
    """CLIP ViT-B/16 (open_clip "ViT-B-16"); pass ``act="quick_gelu"`` for OpenAI's weights."""
    return CLIP(**{**_CLIP_CONFIGS["clip_vit_b16"], **kwargs})


# --------------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------------

def _rename_blocks(sd, src, dst, names):
    """Move ``src{i}.{a}`` keys to ``dst.{i}.{b}`` for each (a, b) in ``names``, dropping those with b None."""
    out = {}
    for key, value in sd.items():
        if not key.startswith(src):
            continue
        index, rest = key[len(src):].split(".", 1)
        for a, b in names:
            if rest.startswith(a):
                if b is not None:
                    out[f"{dst}.{index}.{b}{rest[len(a):]}"] = value
                break
        else:
            raise KeyError(f"unexpected key {key}")
    return out


_OPEN_CLIP_BLOCK = [("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.in_proj_", "attn.qkv."),
                    ("attn.out_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]


def open_clip_state_dict(sd):
    """Rename an open_clip ``CLIP`` state_dict to :class:`CLIP`'s keys."""
    out = {
        "visual.patch_embed.proj.weight": sd["visual.conv1.weight"],
        "visual.cls_token": sd["visual.class_embedding"].reshape(1, 1, -1),
        "visual.pos_embed": sd["visual.positional_embedding"][None],
        "visual.head.weight": sd["visual.proj"].t(),
        "text.token_embedding.weight": sd["token_embedding.weight"],
        "text.pos_embed": sd["positional_embedding"][None],
        "text.head.weight": sd["text_projection"].t(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    for src, dst in (("visual.ln_pre", "visual.norm_pre"), ("visual.ln_post", "visual.norm"),
                     ("ln_final", "text.norm")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    out.update(_rename_blocks(sd, "visual.transformer.resblocks.", "visual.blocks", _OPEN_CLIP_BLOCK))
    out.update(_rename_blocks(sd, "transformer.resblocks.", "text.blocks", _OPEN_CLIP_BLOCK))
    return out


def clip_from_open_clip(m):
    """A :class:`CLIP` with the configuration and weights of open_clip's ``CLIP`` model ``m`` (ViT image tower,
    default text tower); on m's device and dtype, in m's train/eval mode."""
    if type(m).__name__ != "CLIP":
        raise NotImplementedError(f"from_open_clip: {type(m).__name__} is not supported (open_clip's CLIP class)")
    v, t = m.visual, m.transformer
    unsupported = [name for name, bad in (
        ("non-ViT image tower", not hasattr(v, "conv1")),
        ("attention pooling", getattr(v, "attn_pool", None) is not None),
        ("image pool_type " + repr(getattr(v, "pool_type", None)), getattr(v, "pool_type", None) != "tok"),
        ("final_ln_after_pool", getattr(v, "final_ln_after_pool", False)),
        ("custom blocks (layer scale, qk norm, ...)",
         any(type(b).__name__ != "ResidualAttentionBlock" or not isinstance(b.ls_1, nn.Identity)
             for b in list(v.transformer.resblocks) + list(t.resblocks))),
        ("no ln_pre", isinstance(v.ln_pre, nn.Identity)),
        ("text without causal mask", m.attn_mask is None),
        ("text pool_type " + repr(m.text_pool_type), m.text_pool_type not in ("argmax", "eos")),
        ("text projection with bias", isinstance(m.text_projection, nn.Linear)),
        ("logit_bias (SigLIP)", getattr(m, "logit_bias", None) is not None),
    ) if bad]
    if unsupported:
        raise NotImplementedError(f"open_clip features not supported by dlcv_fast: {', '.join(unsupported)}")
    vb, tb = v.transformer.resblocks[0], t.resblocks[0]
    vision_width, text_width = v.conv1.out_channels, m.token_embedding.embedding_dim
    cfg = dict(
        embed_dim=v.proj.shape[1], image_size=tuple(v.image_size), patch_size=tuple(v.patch_size),
        vision_width=vision_width, vision_layers=len(v.transformer.resblocks), vision_heads=vb.attn.num_heads,
        vision_mlp_ratio=vb.mlp.c_fc.out_features / vision_width, context_length=m.positional_embedding.shape[0],
        vocab_size=m.token_embedding.num_embeddings, text_width=text_width, text_heads=tb.attn.num_heads,
        text_layers=len(t.resblocks), text_mlp_ratio=tb.mlp.c_fc.out_features / text_width,
        act=act_name(vb.mlp.gelu), norm_eps=vb.ln_1.eps,
        eos_token_id=m.text_eos_id if m.text_pool_type == "eos" else None)
    return load_reference(CLIP(**cfg), m, open_clip_state_dict(m.state_dict()))


_HF_BLOCK = [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
             ("self_attn.q_proj", None), ("self_attn.k_proj", None), ("self_attn.v_proj", None)]  # see _hf_fuse_qkv


def _hf_fuse_qkv(sd, src, dst):
    """Concatenate Hugging Face's separate q/k/v projections into the fused ``qkv`` Linear."""
    out, i = {}, 0
    while f"{src}{i}.self_attn.q_proj.weight" in sd:
        for kind in ("weight", "bias"):
            out[f"{dst}.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[f"{src}{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
        i += 1
    return out


def transformers_state_dict(sd):
    """Rename a Hugging Face ``CLIPModel`` state_dict to :class:`CLIP`'s keys."""
    vis, txt = "vision_model.", "text_model."
    out = {
        "visual.patch_embed.proj.weight": sd[vis + "embeddings.patch_embedding.weight"],
        "visual.cls_token": sd[vis + "embeddings.class_embedding"].reshape(1, 1, -1),
        "visual.pos_embed": sd[vis + "embeddings.position_embedding.weight"][None],
        "visual.head.weight": sd["visual_projection.weight"],
        "text.token_embedding.weight": sd[txt + "embeddings.token_embedding.weight"],
        "text.pos_embed": sd[txt + "embeddings.position_embedding.weight"][None],
        "text.head.weight": sd["text_projection.weight"],
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    for src, dst in ((vis + "pre_layrnorm", "visual.norm_pre"), (vis + "post_layernorm", "visual.norm"),
                     (txt + "final_layer_norm", "text.norm")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
    for src, dst in ((vis + "encoder.layers.", "visual.blocks"), (txt + "encoder.layers.", "text.blocks")):
        out.update(_rename_blocks(sd, src, dst, _HF_BLOCK))
        out.update(_hf_fuse_qkv(sd, src, dst))
    return out


def clip_from_transformers(m):
    """A :class:`CLIP` with the configuration and weights of Hugging Face's ``CLIPModel`` ``m``; on m's device
    and dtype, in m's train/eval mode."""
    vc, tc = m.config.vision_config, m.config.text_config
    for c in (vc, tc):
        if c.hidden_act not in ("gelu", "quick_gelu"):
            raise NotImplementedError(f"hidden_act {c.hidden_act!r} is not supported (gelu or quick_gelu)")
    if vc.hidden_act != tc.hidden_act or vc.layer_norm_eps != tc.layer_norm_eps:
        raise NotImplementedError("different activations or LayerNorm eps in the two towers are not supported")
    cfg = dict(
        embed_dim=m.config.projection_dim, image_size=vc.image_size, patch_size=vc.patch_size,
        vision_width=vc.hidden_size, vision_layers=vc.num_hidden_layers, vision_heads=vc.num_attention_heads,
        vision_mlp_ratio=vc.intermediate_size / vc.hidden_size, context_length=tc.max_position_embeddings,
        vocab_size=tc.vocab_size, text_width=tc.hidden_size, text_heads=tc.num_attention_heads,
        text_layers=tc.num_hidden_layers, text_mlp_ratio=tc.intermediate_size / tc.hidden_size,
        act=vc.hidden_act, norm_eps=vc.layer_norm_eps,
        eos_token_id=None if tc.eos_token_id == 2 else tc.eos_token_id)
    return load_reference(CLIP(**cfg), m, transformers_state_dict(m.state_dict()))
