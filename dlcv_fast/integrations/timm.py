"""timm: ``Attention``, ``AttentionRope`` and ``EvaAttention`` (ViT, DeiT, EVA-02, ...) and Swin's
``SwinTransformerBlock``.

The patched classes are subclasses of timm's, swapped in with ``module.__class__`` (parameters, buffers,
names and ``isinstance`` unchanged; only modules of exactly timm's class are swapped, a user's subclass is left
alone). What each one does differently:

- ``Attention`` / ``AttentionRope`` / ``EvaAttention``: the attention step (timm's
  ``F.scaled_dot_product_attention`` call or its eager softmax) runs through
  :func:`dlcv_fast.scaled_dot_product_attention`, with timm's ``attn_mask`` and ``is_causal`` as they are; the qkv
  split, q/k norms, RoPE (timm's own rotation), gate, output norm and projection are timm's (EVA's q / v biases
  with its zero k bias included). Grouped-query ``AttentionRope`` passes its k/v heads unrepeated.
- ``SwinTransformerBlock``: its whole attention step (cyclic shift, padding, window partition, attention with
  the relative position bias and the shifted-window mask, merge, reverse shift) runs as one
  :func:`dlcv_fast.window_attention` between the block's ``attn.qkv`` and ``attn.proj``; no partitioned copy,
  no bias or mask tensor. Padding tokens carry the qkv bias, as in timm.

A call falls back to timm's own code when the kernels cannot reproduce it: attention dropout active in
training, a head dim out of the kernels' range, torch.fx symbolic tracing (timm's feature extraction traces
timm's code), a forward hook on a module the fused step would not call as timm does (the Swin block's ``attn``
or anything inside it, whose qkv / proj would see whole maps instead of windows; the ``attn_drop`` of a module
set to timm's unfused path, ``fused_attn = False``, the usual way to read attention maps), a qkv layer that is
not a plain ``nn.Linear`` (Swin's padding tokens need its bias), or an attention module of another type inside
the Swin block.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast
from dlcv_fast.integrations._swap import swap_classes
from dlcv_fast.kernels.window_attention import MAX_HEAD_DIM as MAX_WINDOW_HEAD_DIM
from dlcv_fast.nn.hooks import has_forward_hooks
from dlcv_fast.ops.attention import MAX_HEAD_DIM


def _dropout_active(module):
    return module.training and module.attn_drop.p > 0


def _attend(module, q, k, v, attn_mask, is_causal):
    """The attention step of timm's Attention / AttentionRope on (B, H, N, D) tensors -> (B, N, H * D)."""
    B, H, N, D = q.shape
    x = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               scale=module.scale, enable_gqa=k.shape[1] != H)
    return x.transpose(1, 2).reshape(B, N, H * D)


def _rope_attend(module, q, k, v, rope, attn_mask, is_causal, gate):
    """AttentionRope's and EvaAttention's common tail: q/k norms, timm's rotation (prefix tokens unrotated), the
    attention step, output norm, gate and projection."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    q, k = module.q_norm(q), module.k_norm(k)
    if rope is not None:
        p, half = module.num_prefix_tokens, getattr(module, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], rope, half=half)], dim=2).type_as(v)
                for t in (q, k))
    return _finish(module, _attend(module, q, k, v, attn_mask, is_causal), gate)


def _finish(module, x, gate):
    x = module.norm(x)
    if gate is not None:
        x = x * gate
    return module.proj_drop(module.proj(x))


def _tracing() -> bool:
    """Under torch.fx symbolic tracing (timm's feature extraction), where timm's own code traces and ours would not."""
    return torch.fx._symbolic_trace.is_fx_tracing()


def _hooked(module) -> bool:
    """Whether a forward hook sits on ``module`` or any module inside it."""
    return any(has_forward_hooks(m) for m in module.modules())


def _falls_back(module) -> bool:
    """timm's forward runs instead: dropout active, a head dim the kernel does not take, FX tracing, or timm's
    unfused path (``fused_attn = False``, e.g. for attention maps) with a hook on the ``attn_drop`` it would call."""
    return (_dropout_active(module) or not 1 <= module.head_dim <= MAX_HEAD_DIM or _tracing()
            or (not module.fused_attn and _hooked(module.attn_drop)))


class _RopeForward:
    """The patched forward of ``AttentionRope`` and ``EvaAttention``: the class's own q/k/v projection
    (``_qkv``), then :func:`_rope_attend`; timm's forward (next in the MRO) for what falls back."""

    _dlcv_patched = True

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        if _falls_back(self):
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        return _rope_attend(self, q, k, v, rope, attn_mask, is_causal, gate)


def _attention_classes():
    from timm.layers import attention

    return attention.Attention, attention.AttentionRope


def _eva_attention_class():
    from timm.models import eva

    return eva.EvaAttention


def _swin_classes():
    from timm.models import swin_transformer

    return swin_transformer.SwinTransformerBlock, swin_transformer.WindowAttention


def _make_patched():
    """The patched subclasses (timm imported here, not when dlcv_fast is)."""
    timm_attention, timm_attention_rope = _attention_classes()
    timm_swin_block, timm_window_attention = _swin_classes()
    timm_eva_attention = _eva_attention_class()

    class PatchedAttention(timm_attention):
        _dlcv_patched = True

        def forward(self, x, attn_mask=None, is_causal=False):
            if _falls_back(self):
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            x = _attend(self, self.q_norm(q), self.k_norm(k), v, attn_mask, is_causal)
            return _finish(self, x, gate)

    class PatchedAttentionRope(_RopeForward, timm_attention_rope):
        def _qkv(self, x):
            B, N, _ = x.shape
            if self.qkv is not None:
                return self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
            return (self.q_proj(x).view(B, N, H, D).transpose(1, 2), self.k_proj(x).view(B, N, Hkv, D).transpose(1, 2),
                    self.v_proj(x).view(B, N, Hkv, D).transpose(1, 2))

    class PatchedEvaAttention(_RopeForward, timm_eva_attention):
        def _qkv(self, x):
            B, N, _ = x.shape
            H, D = self.num_heads, self.head_dim
            if self.qkv is None:
                return tuple(p(x).view(B, N, H, D).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            if self.q_bias is None:
                qkv = self.qkv(x)
            elif self.qkv_bias_separate:
                qkv = self.qkv(x) + torch.cat((self.q_bias, self.k_bias, self.v_bias))
            else:
                qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
            return qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)

    class PatchedSwinTransformerBlock(timm_swin_block):
        _dlcv_patched = True

        def _attn(self, x):
            attn = self.attn
            head_dim = attn.qkv.out_features // (3 * attn.num_heads) if type(attn.qkv) is nn.Linear else 0
            if (type(attn) is not timm_window_attention or not 1 <= head_dim <= MAX_WINDOW_HEAD_DIM
                    or _dropout_active(attn) or _hooked(attn) or _tracing()):
                return super()._attn(x)
            out = dlcv_fast.window_attention(attn.qkv(x), num_heads=attn.num_heads,
                                             window_size=tuple(self.window_size), shift_size=tuple(self.shift_size),
                                             rel_pos_bias_table=attn.relative_position_bias_table,
                                             qkv_bias=attn.qkv.bias, scale=attn.scale)
            return attn.proj_drop(attn.proj(out))

    table = {timm_attention: PatchedAttention, timm_attention_rope: PatchedAttentionRope,
             timm_eva_attention: PatchedEvaAttention, timm_swin_block: PatchedSwinTransformerBlock}
    for cls in table.values():  # importable as dlcv_fast.integrations.timm.<name> (module __getattr__), so
        cls.__qualname__, cls.__module__ = cls.__name__, __name__  # a patched model pickles
    return table


_PATCHED = None


def patched_classes():
    """``{timm class: its patched subclass}``."""
    global _PATCHED
    if _PATCHED is None:
        _PATCHED = _make_patched()
    return _PATCHED


def __getattr__(name):
    if name in ("PatchedAttention", "PatchedAttentionRope", "PatchedEvaAttention", "PatchedSwinTransformerBlock"):
        return next(cls for cls in patched_classes().values() if cls.__name__ == name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch(model: nn.Module) -> int:
    return swap_classes(model, patched_classes()) if "timm" in sys.modules else 0


def unpatch(model: nn.Module) -> int:
    if "timm" not in sys.modules:
        return 0
    return swap_classes(model, {new: old for old, new in patched_classes().items()})
