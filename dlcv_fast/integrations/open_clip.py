"""Patch rules for ``torch.nn.MultiheadAttention`` (open_clip's towers) and open_clip's own ``Attention``.

Patched (class swap, only modules whose type is exactly the library's class):

* ``torch.nn.MultiheadAttention`` -> :class:`PatchedMultiheadAttention`. open_clip's ``ResidualAttentionBlock``
  (vision and text towers) and ``AttentionalPooler`` use it, as do ``nn.Transformer`` layers and many models.
  The in-projection is ``F.linear`` on slices of the packed weight (one GEMM for self-attention, two when key is
  value), whose output is split into heads by strided views, no copy; the attention runs in
  :func:`dlcv_fast.attention`; the output projection uses ``out_proj``'s weights, as torch does.
* ``open_clip.transformer.Attention`` (``CustomResidualAttentionBlock``: qk-norm, head scaling, inner norm) ->
  ``PatchedAttention``, when open_clip is imported.

Masks, in torch's meanings: a bool ``attn_mask`` or ``key_padding_mask`` marks with True what is *masked out*
(the opposite of dlcv_fast's ``key_padding_mask``), a float one is added to the scores. A bool key padding mask
goes to the kernel's padding path, other masks in as an additive bias, except a 2-D mask that is exactly the
top-left causal mask (float 0 / -inf, or bool True above the diagonal, e.g. open_clip's text mask), which runs
as ``causal=True`` (the kernel skips the masked blocks). That check reads the mask once per tensor: the answer is
cached on the tensor's identity, view geometry and version counter, and is made only in plain eager mode (not under
torch.compile, jit.trace or CUDA-graph capture, where such a mask simply goes in as a bias).
``is_causal=True`` keeps ``F.multi_head_attention_forward``'s meaning: a hint that ``attn_mask`` is the causal
mask, so without a key padding mask the mask is not read and the kernel's causal mask is used; with one the hint
is dropped and the mask is used as given.

Falls back to the library's own forward, for that call only, when: attention weights are asked for
(``need_weights=True``, MultiheadAttention's default), attention dropout is active (training with p > 0),
``add_bias_kv`` or ``add_zero_attn`` is set, the input is unbatched, nested or a tensor subclass, dtypes are not
fp16/bf16/fp32 or do not match (outside autocast), devices differ or are neither CPU nor CUDA, the head dim is
over 256, a sequence or the batch is empty, a mask has a shape, dtype or device torch would reject or warn about,
or, for open_clip's Attention, scaled cosine attention is on. So whatever torch would raise or warn, it still does.
A fully masked query row gives zeros, as torch's SDPA does on CPU.
"""
from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast
from dlcv_fast.integrations._swap import swap_classes
from dlcv_fast.nn.hooks import plain_eager
from dlcv_fast.ops.attention import MAX_HEAD_DIM, SUPPORTED_DTYPES



# ------------------------------------------------------------------------------------------------
# Shared checks
# ------------------------------------------------------------------------------------------------

def _compute_dtype(tensors) -> torch.dtype | None:
    """The dtype the projections will produce for these inputs and weights, or None when the fused path cannot
    take them (unsupported or mixed dtypes, mixed or unusual devices, tensor subclasses)."""
    first = tensors[0]
    if torch.overrides.has_torch_function(tensors) or any(t.is_nested for t in tensors):
        return None
    if first.device.type not in ("cpu", "cuda") or any(t.device != first.device for t in tensors):
        return None
    if torch.is_autocast_enabled(first.device.type):
        dtype = torch.get_autocast_dtype(first.device.type)
        return dtype if dtype in SUPPORTED_DTYPES and all(t.dtype in SUPPORTED_DTYPES for t in tensors) else None
    return first.dtype if first.dtype in SUPPORTED_DTYPES and all(t.dtype == first.dtype for t in tensors) else None


def _mask_ok(mask, device, dtype, shapes) -> bool:
    """Whether a mask is None or a bool / float tensor on ``device`` with one of ``shapes`` whose float dtype is
    ``dtype`` (any of ours under autocast, which casts it for torch's SDPA)."""
    if mask is None:
        return True
    if not isinstance(mask, torch.Tensor) or mask.device != device or tuple(mask.shape) not in shapes:
        return False
    if mask.dtype == torch.bool:
        return True
    if torch.is_autocast_enabled(device.type):
        return mask.dtype in SUPPORTED_DTYPES
    return mask.dtype == dtype


_CAUSAL_CACHE: dict[int, tuple] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    if _CAUSAL_CACHE.get(key, (None,))[0] is ref:
        del _CAUSAL_CACHE[key]


def is_causal_mask(mask: torch.Tensor) -> bool:
    """Whether the 2-D ``(L, S)`` mask is exactly the top-left causal mask in torch's MHA meaning: float 0 on and
    below the diagonal and -inf above it, or bool True (= masked out) exactly above it.

    The answer is cached per tensor: its root tensor's identity (a weak reference, so a freed tensor whose address
    is reused is not mistaken for it), its view geometry and its version counter (an in-place change invalidates
    it); computing it reads the mask (a host sync, once per tensor). Only in plain eager mode: under torch.compile,
    jit.trace, vmap, dispatch modes or CUDA-graph capture, where an answer would be baked into a graph that may
    later see other mask values, and for masks that need gradients or inference-mode tensors (no version counter),
    it says False.
    """
    if mask.dim() != 2 or mask.requires_grad or not plain_eager(mask) or mask.is_inference():
        return False
    root = mask if mask._base is None else mask._base
    key = id(root)
    geometry = (mask.storage_offset(), tuple(mask.shape), mask.stride(), mask.dtype, mask.device)
    version = mask._version
    entry = _CAUSAL_CACHE.get(key)
    if entry is not None and entry[0]() is root and entry[1:3] == (geometry, version):
        return entry[3]
    above = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu_(1)
    expected = above if mask.dtype == torch.bool else torch.zeros_like(mask).masked_fill_(above, float("-inf"))
    answer = torch.equal(mask, expected)
    ref = weakref.ref(root, lambda r, k=key: _forget(k, r))
    _CAUSAL_CACHE[key] = (ref, geometry, version, answer)
    return answer


def _bias_and_causal(mask, dtype):
    """``(attn_bias, causal)`` for a torch-style bool (True = masked out) or float attention mask."""
    if mask is None:
        return None, False
    if is_causal_mask(mask):
        return None, True
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf")), False
    return mask, False


def _split_heads(x, n, heads, batch_first):
    """``n`` views ``(N, heads, L, D)`` of a projection ``x`` of ``n`` packed parts, ``(N, L, n*E)`` when
    ``batch_first`` else ``(L, N, n*E)``."""
    parts = x.unflatten(-1, (n, heads, -1))
    return parts.permute(2, 0, 3, 1, 4).unbind(0) if batch_first else parts.permute(2, 1, 3, 0, 4).unbind(0)


# ------------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ------------------------------------------------------------------------------------------------

def _mha_fusable(m, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> bool:
    """Whether this call of MultiheadAttention ``m`` can run on the fused path (see the module docstring)."""
    if need_weights or (m.training and m.dropout > 0) or m.bias_k is not None or m.bias_v is not None:
        return False
    if m.add_zero_attn or (is_causal and attn_mask is None):  # the latter: torch raises
        return False
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (query, key, value)):
        return False
    weights = (m.in_proj_weight,) if m._qkv_same_embed_dim else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    others = (m.in_proj_bias, m.out_proj.weight, m.out_proj.bias)
    dtype = _compute_dtype((query, key, value) + weights + tuple(t for t in others if t is not None))
    if dtype is None:
        return False
    E, H = m.embed_dim, m.num_heads
    if not 1 <= E // H <= MAX_HEAD_DIM:
        return False
    if m.batch_first:
        (N, L), (Nk, S) = query.shape[:2], key.shape[:2]
    else:
        (L, N), (S, Nk) = query.shape[:2], key.shape[:2]
    if (query.shape[-1], key.shape[-1], value.shape[-1]) != (E, m.kdim, m.vdim) or key.shape[:2] != value.shape[:2]:
        return False
    if Nk != N or not (N and L and S):
        return False
    if attn_mask is not None and key_padding_mask is not None and attn_mask.dtype != key_padding_mask.dtype:
        return False  # torch warns that mixed mask types are deprecated
    return (_mask_ok(key_padding_mask, query.device, dtype, {(N, S)})
            and _mask_ok(attn_mask, query.device, dtype, {(L, S), (N * H, L, S)}))


def _mha_in_projection(m, query, key, value):
    """q ``(N, H, L, D)`` and k, v ``(N, H, S, D)``: strided views of as few ``F.linear`` outputs as the
    identities of query, key and value allow."""
    E, H, bf = m.embed_dim, m.num_heads, m.batch_first
    b = m.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
    if not m._qkv_same_embed_dim:
        return tuple(_split_heads(F.linear(x, w, bias), 1, H, bf)[0] for x, w, bias in
                     ((query, m.q_proj_weight, bq), (key, m.k_proj_weight, bk), (value, m.v_proj_weight, bv)))
    w = m.in_proj_weight
    if query is key and key is value:
        return _split_heads(F.linear(query, w, b), 3, H, bf)
    q = _split_heads(F.linear(query, w[:E], bq), 1, H, bf)[0]
    if key is value:
        k, v = _split_heads(F.linear(key, w[E:], None if b is None else b[E:]), 2, H, bf)
    else:
        k = _split_heads(F.linear(key, w[E:2 * E], bk), 1, H, bf)[0]
        v = _split_heads(F.linear(value, w[2 * E:], bv), 1, H, bf)[0]
    return q, k, v


def _mha_fused(m, query, key, value, key_padding_mask, attn_mask, is_causal):
    q, k, v = _mha_in_projection(m, query, key, value)
    N, H, L, D = q.shape
    S = k.shape[2]
    padding = bias = None
    if is_causal and key_padding_mask is None:
        causal = True  # torch's hint: attn_mask is the causal mask and is not read
    else:
        bias, causal = _bias_and_causal(attn_mask, q.dtype)
        if bias is not None and bias.dim() == 3:
            bias = bias.view(N, H, L, S)
        if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
            padding = ~key_padding_mask
        elif key_padding_mask is not None:
            per_key = key_padding_mask.view(N, 1, 1, S)
            bias = per_key if bias is None else bias + per_key
    out = dlcv_fast.attention(q, k, v, causal=causal, key_padding_mask=padding, attn_bias=bias)
    # out is a (N, L, H, D) buffer seen as (N, H, L, D): merging heads batch-first is free.
    out = out.transpose(1, 2).reshape(N, L, H * D) if m.batch_first else out.permute(2, 0, 1, 3).reshape(L, N, H * D)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)


class PatchedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose eligible calls run on :func:`dlcv_fast.attention` (see the module
    docstring for when it falls back to torch's own forward). Same parameters, buffers and state_dict."""

    _dlcv_patched = True

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not _mha_fusable(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return _mha_fused(self, query, key, value, key_padding_mask, attn_mask, is_causal), None


# ------------------------------------------------------------------------------------------------
# open_clip.transformer.Attention (only when open_clip is imported)
# ------------------------------------------------------------------------------------------------

def _attention_fusable(m, x, attn_mask) -> bool:
    if m.logit_scale is not None or (m.training and m.attn_drop.p > 0):
        return False
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not 1 <= m.head_dim <= MAX_HEAD_DIM:
        return False
    params = tuple(t for t in (m.in_proj_weight, m.in_proj_bias) if t is not None)
    if _compute_dtype((x,) + params) is None:
        return False
    N, L, C = x.shape
    if C != m.num_heads * m.head_dim or not (N and L):
        return False
    if attn_mask is None:
        return True
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != x.device:
        return False
    if not (attn_mask.dtype == torch.bool or attn_mask.dtype in SUPPORTED_DTYPES):
        return False
    if attn_mask.dim() == 2:
        return tuple(attn_mask.shape) == (L, L)
    if attn_mask.dim() == 3:  # open_clip reshapes it to (N, H, L, L)
        return attn_mask.numel() == N * m.num_heads * L * L
    try:
        return attn_mask.dim() == 4 and torch.broadcast_shapes(attn_mask.shape, (N, m.num_heads, L, L)) == (
            N, m.num_heads, L, L)
    except RuntimeError:
        return False


def _attention_fused(m, x, attn_mask):
    N, L, C = x.shape
    q, k, v = _split_heads(F.linear(x, m.in_proj_weight, m.in_proj_bias), 3, m.num_heads, True)
    q, k = m.ln_q(q), m.ln_k(k)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.reshape(N, m.num_heads, L, L)
    bias, causal = _bias_and_causal(attn_mask, q.dtype)
    if bias is not None:
        bias = bias.to(q.dtype)  # open_clip casts a float mask to the scores' dtype
    out = dlcv_fast.attention(q, k, v, causal=causal, attn_bias=bias)
    if m.head_scale is not None:
        out = out * m.head_scale
    out = m.ln_inner(out.transpose(1, 2).reshape(N, L, C))
    return m.out_drop(m.out_proj(out))


_PATCHED_ATTENTION: list[type] = []


def _patched_attention_class():
    """``PatchedAttention``, the patched ``open_clip.transformer.Attention``; made on first use (open_clip is
    never imported here) and kept as this module's attribute, so pickle finds it."""
    if not _PATCHED_ATTENTION:
        from open_clip.transformer import Attention

        class PatchedAttention(Attention):
            """open_clip's ``Attention`` with its attention step on :func:`dlcv_fast.attention`; falls back to
            open_clip's forward for scaled cosine attention, attention dropout and unusual inputs."""

            _dlcv_patched = True

            def forward(self, x, attn_mask=None):
                if not _attention_fusable(self, x, attn_mask):
                    return super().forward(x, attn_mask=attn_mask)
                return _attention_fused(self, x, attn_mask)

        PatchedAttention.__module__, PatchedAttention.__qualname__ = __name__, "PatchedAttention"
        _PATCHED_ATTENTION.append(PatchedAttention)
    return _PATCHED_ATTENTION[0]


def __getattr__(name):
    if name == "PatchedAttention":
        return _patched_attention_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# patch / unpatch
# ------------------------------------------------------------------------------------------------

def _swaps():
    """(original class, patched class) pairs for the libraries loaded."""
    pairs = [(nn.MultiheadAttention, PatchedMultiheadAttention)]
    transformer = sys.modules.get("open_clip.transformer")
    if transformer is not None and hasattr(transformer, "Attention"):
        pairs.append((transformer.Attention, _patched_attention_class()))
    return pairs


def patch(model: nn.Module) -> int:
    """Swap the class of every module of ``model`` whose type is exactly ``nn.MultiheadAttention`` (or open_clip's
    ``Attention``) for its patched subclass; returns how many were swapped (already patched ones are not)."""
    return swap_classes(model, dict(_swaps()))


def unpatch(model: nn.Module) -> int:
    """Give every patched module of ``model`` its original class back; returns how many were restored."""
    return swap_classes(model, {patched: original for original, patched in _swaps()})
