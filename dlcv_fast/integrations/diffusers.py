"""diffusers: run ``Attention`` modules on dlcv_fast's kernels through an attention processor.

diffusers' ``Attention`` (``diffusers.models.attention_processor.Attention``, the attention of the U-Nets' transformer
blocks and of the VAEs' mid blocks) hands every call to its processor object (``attn.processor``). :func:`patch` gives
each ``Attention`` whose processor is exactly one of the two standard ones, ``AttnProcessor2_0`` (torch's SDPA, the
default) or ``AttnProcessor`` (the eager baddbmm/softmax/bmm one, set by ``set_default_attn_processor`` or
``scale_qk=False``), a :class:`DlcvAttnProcessor` that wraps it, and marks the module with an instance attribute
``_dlcv_patched = True``; :func:`unpatch` puts the very same processor object back. No parameter, buffer or module
changes. Other processors (xformers, sliced, fused, LoRA, IP-Adapter, added-KV, ...) are left alone, and so are
subclasses of ``Attention`` (they may do their own thing around the processor).

:class:`DlcvAttnProcessor` computes what the processor it wraps computes (spatial norm, 4-D image input, group norm,
cross-attention norm, q/k/v projections, per-head q/k norms where ``AttnProcessor2_0`` applies them, output
projection and dropout, residual connection, output rescale) and runs the attention step itself through
:func:`dlcv_fast.attention` / :func:`dlcv_fast.scaled_dot_product_attention`, with the scale the wrapped processor
uses (the default ``head_dim ** -0.5`` for ``AttnProcessor2_0``, ``attn.scale`` for ``AttnProcessor``). Masks go
through ``attn.prepare_attention_mask`` exactly as before; a bool mask that is certainly one row of keys per batch
element (``(B, Lk)`` or ``(B, 1, Lk)``, True = attend) becomes the kernel's ``key_padding_mask``, any other mask
(the U-Nets' float ``encoder_attention_mask`` bias included) an additive bias. Neither standard processor has
attention-probability dropout (``attn.dropout`` only drops the projected output, ``attn.to_out[1]``, which runs
here as before), so training runs the kernel too.

Falls back, exactly:
- the whole call to the wrapped processor for extra positional or keyword arguments (the deprecated ``scale``),
  an ``Attention`` with added key/value projections, without its own key/value/output projections, or with fused
  projections;
- the attention step alone to the wrapped processor's own operations (torch SDPA for ``AttnProcessor2_0``,
  ``attn.get_attention_scores`` + ``bmm`` for ``AttnProcessor``, on the same q/k/v and mask) when the kernel cannot
  take the tensors: a dtype other than fp16/bf16/fp32 or mixed dtypes, a head dim over 256 or a value head dim
  different from the query's, a float mask whose dtype the original op would treat differently, a mask of a shape
  ``AttnProcessor`` broadcasts in its own way.
Differences beyond rounding: a query row whose keys are all masked out gives zeros (torch's SDPA gives NaN; the -1e4
bias the U-Nets use gives a mean over the masked keys in both). A patched U-Net's ``set_default_attn_processor``
refuses the unknown processor class: unpatch first (other processor setters simply replace the patch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast
from dlcv_fast.ops.attention import MAX_HEAD_DIM, SUPPORTED_DTYPES



def _standard_processors():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor, AttnProcessor2_0


def _attention_class():
    from diffusers.models.attention_processor import Attention

    return Attention


def _understood(attn) -> bool:
    """Whether the module is a plain ``Attention`` whose options the processors' common path covers."""
    return (type(attn) is _attention_class() and attn.added_kv_proj_dim is None and not attn.fused_projections
            and attn.to_k is not None and attn.to_v is not None and attn.to_out is not None)


def _kernel_takes(q, k, v) -> bool:
    """Whether (B, H, L, D) q, k, v suit dlcv_fast's kernel as they are."""
    return (q.dtype in SUPPORTED_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and 1 <= q.shape[-1] <= MAX_HEAD_DIM and k.shape[-1] == q.shape[-1] and v.shape[-1] == q.shape[-1]
            and k.shape[:2] == q.shape[:2] and v.shape[:3] == k.shape[:3]
            and k.device == q.device and v.device == q.device
            and all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (q, k, v)))


class DlcvAttnProcessor:
    """A diffusers attention processor computing what ``original`` (an ``AttnProcessor2_0`` or ``AttnProcessor``)
    computes, with the attention step on dlcv_fast's kernels; see the module docstring for what falls back.

    ``original`` stays on the instance: :func:`unpatch` puts it back, and calls this processor cannot do go to it.
    """

    def __init__(self, original):
        AttnProcessor, AttnProcessor2_0 = _standard_processors()
        if type(original) not in (AttnProcessor, AttnProcessor2_0):
            raise TypeError(f"DlcvAttnProcessor wraps AttnProcessor2_0 or AttnProcessor, got {type(original).__name__}")
        self.original = original
        self.sdpa = type(original) is AttnProcessor2_0  # else AttnProcessor's baddbmm/softmax/bmm semantics

    # Attention.forward passes on only the keyword arguments this signature names: keep it the wrapped processors'.
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if args or kwargs or not _understood(attn):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.ndim == 4
        if image:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, kv_len, _ = context.shape

        mask, key_padding = self._mask(attn, attention_mask, kv_len, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        if self.sdpa:  # heads split as AttnProcessor2_0 splits them (head dim from the key), q/k norms per head
            head_dim = key.shape[-1] // attn.heads
            q, k, v = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            out = self._attend_sdpa(q, k, v, mask, key_padding)
            out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(q.dtype)
        else:  # AttnProcessor: heads split per tensor, no q/k norms, attn.scale
            q, k, v = (attn.head_to_batch_dim(t, out_dim=4) for t in (query, key, value))
            out = self._attend_eager(attn, q, k, v, mask)
            out = out.transpose(1, 2).flatten(2)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if image:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _mask(self, attn, attention_mask, kv_len, batch_size):
        """The mask as the wrapped processor prepares it, and ``(B, Lk)`` key padding where that is certain."""
        if attention_mask is None:
            return None, None
        if not self.sdpa:
            return attn.prepare_attention_mask(attention_mask, kv_len, batch_size), None
        mask = attn.prepare_attention_mask(attention_mask, kv_len, batch_size)
        mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        m = attention_mask
        # A bool (B, Lk) or (B, 1, Lk) mask is repeated over the heads and broadcast over the queries, unpadded.
        per_key = (m.dtype == torch.bool and m.shape[0] == batch_size and m.shape[-1] == kv_len
                   and (m.ndim == 2 or (m.ndim == 3 and m.shape[1] == 1)))
        return mask, (m.reshape(batch_size, kv_len) if per_key else None)

    @staticmethod
    def _attend_sdpa(q, k, v, mask, key_padding):
        # A float mask of another dtype than the query's goes to torch's SDPA, which accepts or rejects it itself.
        if not _kernel_takes(q, k, v) or (mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        if mask is None or key_padding is not None:
            return dlcv_fast.attention(q, k, v, key_padding_mask=key_padding)
        return dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    @staticmethod
    def _attend_eager(attn, q, k, v, mask):
        B, H, Lq, _ = q.shape
        score_dtype = torch.float32 if attn.upcast_attention else q.dtype
        # baddbmm adds a (B*H, 1 or Lq, Lk) mask of the score dtype; other masks it broadcasts its own way or rejects.
        bias_ok = mask is None or (mask.dtype == score_dtype == q.dtype and mask.ndim == 3 and mask.shape[0] == B * H
                                   and mask.shape[1] in (1, Lq) and mask.shape[2] == k.shape[2])
        if _kernel_takes(q, k, v) and bias_ok:
            bias = None if mask is None else mask.reshape(B, H, mask.shape[1], mask.shape[2])
            return dlcv_fast.attention(q, k, v, attn_bias=bias, scale=float(attn.scale))
        q3, k3, v3 = (t.reshape(B * H, t.shape[2], t.shape[3]) for t in (q, k, v))
        out = torch.bmm(attn.get_attention_scores(q3, k3, mask), v3)
        return out.view(B, H, Lq, out.shape[-1])


def patch(model: nn.Module) -> int:
    """Give every plain ``Attention`` of ``model`` whose processor is exactly ``AttnProcessor2_0`` or
    ``AttnProcessor`` a :class:`DlcvAttnProcessor` wrapping it; returns how many modules changed."""
    standard = _standard_processors()
    Attention = _attention_class()
    changed = 0
    for module in model.modules():
        if type(module) is not Attention:
            continue
        processor = getattr(module, "processor", None)
        if isinstance(processor, DlcvAttnProcessor):
            continue
        if type(processor) in standard:
            module.set_processor(DlcvAttnProcessor(processor))
            module._dlcv_patched = True
            changed += 1
        elif "_dlcv_patched" in module.__dict__:  # our processor was replaced since (set_attn_processor, ...)
            del module._dlcv_patched
    return changed


def unpatch(model: nn.Module) -> int:
    """Put back the processor each patched ``Attention`` had before :func:`patch`; returns how many."""
    Attention = _attention_class()
    restored = 0
    for module in model.modules():
        if type(module) is not Attention or "_dlcv_patched" not in module.__dict__:
            continue
        processor = getattr(module, "processor", None)
        if isinstance(processor, DlcvAttnProcessor):
            module.set_processor(processor.original)
            restored += 1
        del module._dlcv_patched
    return restored
