"""BLIP-2's querying transformer (Q-Former) on dlcv_fast attention, weight-compatible with transformers'
``Blip2QFormerModel``.

What it computes, as ``Blip2Model`` / ``Blip2ForConditionalGeneration`` use it: the learned queries
``query_embeds`` ``(B, Nq, hidden)`` go through LayerNorm + dropout, then ``num_layers`` BERT-style post-LN
layers. Each layer: self-attention over the queries, ``LayerNorm(dense(attn) + x)``; in layers
``i % cross_attention_frequency == 0`` cross-attention from the queries to the image encoder's states (key
and value Linears from ``encoder_hidden_size``), ``LayerNorm(dense(attn) + x)``; the query feed-forward
``LayerNorm(output_query(act(intermediate_query(x))) + x)``. The result is ``last_hidden_state``.

Scope. transformers' layer also has a text branch: with ``query_length < L`` (text tokens after the queries,
used by ``Blip2ForImageTextRetrieval``, ``Blip2TextModelWithProjection`` and InstructBLIP) the text rows skip
cross-attention and go through a second feed-forward (``intermediate`` / ``output``), which exists only with
``use_qformer_text_input=True``. Blip2Model and Blip2ForConditionalGeneration pass ``query_embeds`` only
(``query_length = Nq``), so that branch never runs there; it is left out, and :func:`qformer_from_transformers`
refuses ``use_qformer_text_input=True`` rather than drop its weights. transformers' feed-forward chunking
(``chunk_size_feed_forward``) splits rows that are computed independently, so it does not change the result.

Kernels. Every attention is one :func:`dlcv_fast.attention` call on strided views; masks go to the kernel as
``key_padding_mask`` ``(B, Lk)`` bool, never as an ``Lq x Lk`` tensor (Blip2Model's all-ones image mask goes to
the kernel as it is: testing it for all ones would wait on the device). transformers has separate ``query`` /
``key`` / ``value`` Linears, kept here as three GEMMs: the Q-Former runs on few rows (32 queries per image,
256 rows at batch 8), so each projection is bound by reading its weight, and concatenating the weights at
call time would copy them (one more read and write of each weight) to save two launches; a cached
concatenation would go stale when the weights are trained or reloaded. Each GEMM's ``(B, L, H * D)`` output,
viewed ``(B, H, L, D)``, is what the kernel reads; its output, stored ``(B, L, H, D)``, feeds ``dense``
without a copy. The post-LN steps ``LayerNorm(dense(x) + residual)`` run on :class:`dlcv_fast.nn.LayerNorm`
with ``residual=`` (the add fused into the norm where its kernel runs).

Dropout. Hidden dropout (after the embedding norm and each ``dense``) is kept as ``nn.Dropout`` modules in
transformers' places. The attention kernel has no dropout: a forward in training mode with
``attention_dropout > 0`` raises NotImplementedError (call ``model.eval()``, or set ``attention_dropout = 0``
to fine-tune without it). ``Blip2QFormerConfig``'s defaults (blip2-opt-2.7b style) have
``attention_probs_dropout_prob=0.1`` and are run in eval mode, so the converter does not refuse them.

Dtype, as transformers: ``query_embeds`` and ``encoder_hidden_states`` are cast to the parameters' dtype (the
Q-Former is kept in fp32 inside BLIP-2), and the output has that dtype. A query row whose keys are all masked
gets a zero attention output (the kernel's rule), as with transformers' default "sdpa" attention (its
"eager" attention averages over all the masked keys instead).
"""
from __future__ import annotations

import torch
from torch import nn

import dlcv_fast
from dlcv_fast.models.registry import load_reference, register_model
from dlcv_fast.nn.mlp import ACTIVATIONS, make_act
from dlcv_fast.nn.norm import LayerNorm


class _Projections(nn.Module):
    """The ``query`` / ``key`` / ``value`` Linears (transformers' ``Blip2QFormerMultiHeadAttention``)."""

    def __init__(self, dim, kv_dim):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)


class _DenseNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``, the post-LN residual step (BERT's ``*Output`` modules)."""

    def __init__(self, in_dim, dim, eps, dropout):
        super().__init__()
        self.dense = nn.Linear(in_dim, dim)
        self.LayerNorm = LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)), residual=residual)[0]


class _Intermediate(nn.Module):
    """``act(dense(x))``, the first half of the feed-forward."""

    def __init__(self, dim, hidden, act):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.dense(x))


class QFormerAttention(nn.Module):
    """Multi-head attention plus its post-LN output step: ``LayerNorm(dense(attention(x, context)) + x)``.

    Self-attention when ``context`` is None, else cross-attention to ``context`` ``(B, Lk, kv_dim)``.
    ``key_padding_mask`` ``(B, Lk)`` bool, True = the key takes part. Keys ``attention.{query,key,value}``,
    ``output.{dense,LayerNorm}`` as transformers' ``Blip2QFormerAttention``.
    """

    def __init__(self, dim, num_heads, *, kv_dim=None, eps=1e-12, dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attention = _Projections(dim, kv_dim or dim)
        self.output = _DenseNorm(dim, dim, eps, dropout)

    def forward(self, x, context=None, *, key_padding_mask=None):
        p, H, D = self.attention, self.num_heads, self.head_dim
        kv = x if context is None else context
        B, Lq, Lk = x.shape[0], x.shape[1], kv.shape[1]
        q = p.query(x).view(B, Lq, H, D).transpose(1, 2)
        k = p.key(kv).view(B, Lk, H, D).transpose(1, 2)
        v = p.value(kv).view(B, Lk, H, D).transpose(1, 2)
        o = dlcv_fast.attention(q, k, v, key_padding_mask=key_padding_mask, scale=D ** -0.5)
        return self.output(o.transpose(1, 2).reshape(B, Lq, H * D), x)


class QFormerLayer(nn.Module):
    """Self-attention, cross-attention to the image states (when ``has_cross_attention``), query feed-forward."""

    def __init__(self, dim, num_heads, intermediate_size, encoder_hidden_size, *, has_cross_attention, act="gelu",
                 eps=1e-12, dropout=0.0):
        super().__init__()
        self.has_cross_attention = has_cross_attention
        self.attention = QFormerAttention(dim, num_heads, eps=eps, dropout=dropout)
        if has_cross_attention:
            self.crossattention = QFormerAttention(dim, num_heads, kv_dim=encoder_hidden_size, eps=eps,
                                                   dropout=dropout)
        self.intermediate_query = _Intermediate(dim, intermediate_size, act)
        self.output_query = _DenseNorm(intermediate_size, dim, eps, dropout)

    def forward(self, x, encoder_hidden_states, *, self_mask=None, cross_mask=None):
        x = self.attention(x, key_padding_mask=self_mask)
        if self.has_cross_attention:
            x = self.crossattention(x, encoder_hidden_states, key_padding_mask=cross_mask)
        return self.output_query(self.intermediate_query(x), x)


def _keep_mask(mask, B, L, name):
    """A transformers-style padding mask ``(B, L)`` (non-zero / True = keep) as the kernel's bool mask."""
    if mask is None:
        return None
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"{name} must have shape (batch, length) = {(B, L)} (1 = keep), got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


class QFormer(nn.Module):
    """BLIP-2's Q-Former: transformers' ``Blip2QFormerModel`` for query embeddings (see the module docstring).

    ``forward(query_embeds, encoder_hidden_states, encoder_attention_mask=None, attention_mask=None)``:
    queries ``(B, Nq, hidden_size)``, image states ``(B, Lk, encoder_hidden_size)``, masks in transformers'
    convention (``(B, Lk)`` / ``(B, Nq)``, 1 = keep) -> ``last_hidden_state`` ``(B, Nq, hidden_size)``.
    Layer ``i`` cross-attends when ``i % cross_attention_frequency == 0``. ``act``: "gelu" (exact) or
    "quick_gelu". The state_dict keys are transformers', so its checkpoints load as they are.
    """

    def __init__(self, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, encoder_hidden_size=1408,
                 cross_attention_frequency=2, act="gelu", layer_norm_eps=1e-12, hidden_dropout=0.0,
                 attention_dropout=0.0):
        super().__init__()
        if cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {cross_attention_frequency}")
        self.encoder_hidden_size = encoder_hidden_size
        self.attention_dropout = attention_dropout
        self.layernorm = LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([
            QFormerLayer(hidden_size, num_heads, intermediate_size, encoder_hidden_size,
                         has_cross_attention=i % cross_attention_frequency == 0, act=act, eps=layer_norm_eps,
                         dropout=hidden_dropout)
            for i in range(num_layers)])})

    def forward(self, query_embeds, encoder_hidden_states, encoder_attention_mask=None, attention_mask=None):
        if self.training and self.attention_dropout > 0:
            raise NotImplementedError(
                f"attention dropout ({self.attention_dropout}) in training mode: dlcv_fast's attention kernel has "
                f"no dropout. Call model.eval(), or set model.attention_dropout = 0.0 to train without it")
        if query_embeds.dim() != 3 or encoder_hidden_states.dim() != 3:
            raise ValueError("query_embeds must be (B, Nq, hidden_size) and encoder_hidden_states "
                             "(B, Lk, encoder_hidden_size)")
        (B, Nq, _), (Be, Lk, _) = query_embeds.shape, encoder_hidden_states.shape
        if Be != B:
            raise ValueError(f"encoder_hidden_states has batch {Be}, query_embeds {B}")
        self_mask = _keep_mask(attention_mask, B, Nq, "attention_mask")
        cross_mask = _keep_mask(encoder_attention_mask, B, Lk, "encoder_attention_mask")
        dtype = self.layernorm.weight.dtype
        x = self.dropout(self.layernorm(query_embeds.to(dtype)))
        context = encoder_hidden_states.to(dtype)
        for layer in self.encoder["layer"]:
            x = layer(x, context, self_mask=self_mask, cross_mask=cross_mask)
        return x


def qformer_from_transformers(m):
    """A :class:`QFormer` with the configuration and weights of transformers' ``Blip2QFormerModel`` ``m`` (e.g. a
    ``Blip2Model``'s ``.qformer``); on m's device and dtype, in m's train/eval mode.

    Raises NotImplementedError for what it does not compute: ``use_qformer_text_input`` (the text
    feed-forward), relative position embeddings (older configs' ``position_embedding_type``), activations other
    than gelu / quick_gelu."""
    if type(m).__name__ != "Blip2QFormerModel":
        hint = " (pass its .qformer)" if hasattr(m, "qformer") else ""
        raise NotImplementedError(f"qformer_from_transformers: {type(m).__name__} is not a Blip2QFormerModel{hint}")
    c = m.config
    position = getattr(c, "position_embedding_type", "absolute")
    unsupported = [name for name, bad in (
        ("use_qformer_text_input (the text tokens' feed-forward)", getattr(c, "use_qformer_text_input", False)),
        (f"position_embedding_type {position!r}", position != "absolute"),
        (f"hidden_act {c.hidden_act!r} (gelu or quick_gelu)", c.hidden_act not in ACTIVATIONS),
    ) if bad]
    if unsupported:
        raise NotImplementedError(f"Blip2QFormerModel features not supported by dlcv_fast: {', '.join(unsupported)}")
    cfg = dict(hidden_size=c.hidden_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
               intermediate_size=c.intermediate_size, encoder_hidden_size=c.encoder_hidden_size,
               cross_attention_frequency=c.cross_attention_frequency, act=c.hidden_act,
               layer_norm_eps=c.layer_norm_eps, hidden_dropout=c.hidden_dropout_prob,
               attention_dropout=c.attention_probs_dropout_prob)
    return load_reference(QFormer(**cfg), m)


@register_model
def blip2_qformer(**kwargs):
    """BLIP-2's Q-Former (blip2-opt / blip2-flan-t5: hidden 768, 12 layers, cross-attention every second layer to
    EVA-CLIP-g's 1408-wide image states); these are the class defaults."""
    return QFormer(**kwargs)
