"""Run Hugging Face transformers models on dlcv_fast's attention through transformers' attention interface.

transformers picks each attention layer's function by name from ``AttentionInterface`` (the name is
``config._attn_implementation``: "eager", "sdpa", "flash_attention_2", ...). :func:`patch` registers one more,
``"dlcv_fast"``, with transformers' own SDPA mask builder under the same name (so the 4-D masks it hands the
function are exactly the ones "sdpa" gets), and switches every ``PreTrainedModel`` in the model (the top one and
sub-models with their own config, e.g. ``CLIPModel.text_model`` / ``vision_model``) to it. Each switched model
keeps its previous implementation in ``_dlcv_previous_attn_implementation`` and carries ``_dlcv_patched = True``
(instance attributes); :func:`unpatch` restores the previous name and removes both. No module, parameter or
buffer changes. Once patched (or after :func:`patch` ran once in the process), ``from_pretrained(...,
attn_implementation="dlcv_fast")`` works too.

Left alone (not counted): models whose attention classes do not use the attention interface (older-style ones,
e.g. BLOOM; transformers' own ``_can_set_attn_implementation`` test), models that say they cannot run on SDPA
(``_supports_sdpa = False``: logit soft-capping, attention sinks, ...), and models whose code branches on the
literal name "sdpa" (they would take another code path under a new name).

The registered function computes what transformers' "sdpa" function computes, on
:func:`dlcv_fast.scaled_dot_product_attention`: the same causal rule (causal only without a mask and with more
than one query; top-left aligned, so a longer key cache needs no crop), the mask as given (a bool per-key mask goes
to the kernel's key-padding path; a mask repeated over the query rows by a zero stride is read as one row),
grouped-query key/value heads read in place (no repeat), returns ``(B, L, H, D)`` and no weights.

It falls back for one call when dropout > 0 is asked for, attention weights are asked for
(``output_attentions=True``), the tensors are not 4-D fp16/bf16/fp32 on one device, the head dim is outside
1..256 or the value head dim differs from the query's, the query heads are not a multiple of the key/value heads,
query and key batches differ, the scale is not a number, or the call carries ``softcap``, ``s_aux``, ``sinks`` or
``position_bias``. The fallback is the model's own eager function (the one its attention layer would use under
"eager") when weights are asked for or the model ran "eager" before the patch, given the mask eager would have
got (additive float, causal mask never left out); otherwise transformers' "sdpa" function (also for a model that
ran flash or flex attention before: their masks have other formats). A deep copy of a patched model no longer
knows it ran "eager" and falls back to "sdpa" (same maths).
"""
from __future__ import annotations

import functools
import inspect
import numbers
import re
import sys
import weakref

import torch
from torch import nn

import dlcv_fast
from dlcv_fast.ops.attention import MAX_HEAD_DIM, SUPPORTED_DTYPES

NAME = "dlcv_fast"
# Call options that change the maths in ways the kernel does not do (transformers' "sdpa" raises on softcap and
# folds position_bias into the mask; sinks / s_aux are extra softmax terms).
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
# A model's code that compares its implementation name with "sdpa" behaves differently under another name.
_NAMES_SDPA = re.compile(r"_attn_implementation\b[^\n]*[\"']sdpa[\"']")
# The eager function a modeling file's attention layers fall back to (the fallback here assumes the standard one).
_EAGER_DEFAULTS = re.compile(r"get_interface\(\s*[^,()]*_attn_implementation\s*,\s*(\w+)\s*\)")

# id(config) -> (weak reference to the config, its implementation before the patch), for the fallback.
_previous: dict[int, tuple[weakref.ref, str | None]] = {}


def _ran_eager(module: nn.Module) -> bool:
    """Whether the model owning this attention module (by its config) ran "eager" before the patch."""
    config = getattr(module, "config", None)
    entry = _previous.get(id(config))
    return entry is not None and entry[0]() is config and entry[1] == "eager"


def _own_eager(module: nn.Module):
    """The eager attention function of the module's modeling file (the default its forward passes to
    ``ALL_ATTENTION_FUNCTIONS.get_interface``), or None."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else None


def _eager_mask(module, query, key, attention_mask, kwargs):
    """The mask "eager" would have got for this call, from the "sdpa" one: eager's masks are additive floats
    (0 / the dtype's minimum) and its causal mask is never left out."""
    if attention_mask is None:
        if not (query.shape[2] > 1 and _is_causal(module, kwargs)):
            return None
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask.dtype != torch.bool:
        return attention_mask
    return torch.where(attention_mask, torch.zeros((), dtype=query.dtype, device=query.device),
                       torch.finfo(query.dtype).min)


def _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """The call run by the model's own eager function (asked for attention weights, or the model ran "eager"
    before the patch) or by transformers' "sdpa" function, whose masks the "dlcv_fast" name gets."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    eager = _own_eager(module)
    if eager is not None and (kwargs.get("output_attentions") or _ran_eager(module)):
        mask = _eager_mask(module, query, key, attention_mask, kwargs)
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _is_causal(module, kwargs) -> bool:
    """transformers' rule: the call's ``is_causal`` when given, else the module's (True when it has none)."""
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def _kernel_runs(query, key, value, attention_mask, dropout, scaling, kwargs) -> bool:
    """Whether dlcv_fast computes this call exactly as transformers' "sdpa" function would."""
    if dropout or kwargs.get("output_attentions") or any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS):
        return False
    if scaling is not None and not isinstance(scaling, numbers.Real):
        return False
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.dtype == query.dtype and t.device == query.device
               for t in tensors) or query.dtype not in SUPPORTED_DTYPES:
        return False
    mask = attention_mask
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() <= 4 and mask.device == query.device
                                 and (mask.dtype == torch.bool or mask.is_floating_point())):
        return False
    (B, Hq, _, D), (Bk, Hkv, _, Dk) = query.shape, key.shape
    return (1 <= D <= MAX_HEAD_DIM and Dk == D and value.shape[-1] == D and B == Bk and Hkv > 0 and Hq % Hkv == 0)


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function "dlcv_fast": query ``(B, Hq, L, D)``, key/value ``(B, Hkv, S, D)``,
    ``attention_mask`` None or a 4-D bool (True = takes part) / additive float mask; returns ``((B, L, Hq, D),
    None)``, or the fallback's answer (see the module docstring)."""
    if not _kernel_runs(query, key, value, attention_mask, dropout, scaling, kwargs):
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    causal = query.shape[2] > 1 and attention_mask is None and _is_causal(module, kwargs)
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[2] > 1 and mask.stride(2) == 0:
        mask = mask[:, :, :1]  # the same row for every query (an expanded padding mask): read it once
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    out = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 scale=None if scaling is None else float(scaling),
                                                 enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, D): the kernel's own buffer layout, no copy


def _register() -> None:
    """Register "dlcv_fast" with transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, _attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@functools.lru_cache(maxsize=None)
def _source_unsuitable(module_name: str) -> bool:
    """Whether a modeling file branches on the name "sdpa" or gives its attention layers another eager default
    than ``eager_attention_forward`` (e.g. a vision tower's own): the name "dlcv_fast" or the eager fallback would
    then not do what the file does."""
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return True  # source unknown: cannot tell, leave the model alone
    return bool(_NAMES_SDPA.search(source)) or any(name != "eager_attention_forward"
                                                   for name in _EAGER_DEFAULTS.findall(source))


def _patchable(model) -> bool:
    cls = type(model)
    uses_interface = getattr(cls, "_can_set_attn_implementation", None)  # transformers' own test
    return (uses_interface is not None and uses_interface() and bool(getattr(model, "_supports_sdpa", False))
            and not _source_unsuitable(cls.__module__))


class _Registered:
    """The ``_dlcv_patched`` mark of a switched model: true, and when a patched model is unpickled (another process,
    ``torch.load``, ``mp.spawn``) it registers "dlcv_fast" with transformers again before the model can run."""

    def __bool__(self):
        return True

    def __reduce__(self):
        return _registered_mark, ()


def _registered_mark() -> _Registered:
    _register()
    return _Registered()


def patch(model: nn.Module) -> int:
    """Switch every patchable transformers ``PreTrainedModel`` in ``model`` to the "dlcv_fast" attention
    implementation; returns how many were switched (already patched ones are not counted)."""
    from transformers import PreTrainedModel

    _register()
    switched: dict[int, str | None] = {}  # configs switched by this call (sub-models may share their parent's)
    count = 0
    for m in model.modules():
        if not isinstance(m, PreTrainedModel) or m.__dict__.get("_dlcv_patched") or not _patchable(m):
            continue
        config = m.config
        previous = switched.get(id(config), config._attn_implementation)
        if previous == NAME:
            continue  # set to "dlcv_fast" by the user or an earlier patch of a model sharing this config
        key = id(config)
        switched[key] = previous
        _previous[key] = (weakref.ref(config, lambda _, key=key: _previous.pop(key, None)), previous)
        config._attn_implementation_internal = NAME  # this config only (the property's setter recurses)
        m._dlcv_previous_attn_implementation = previous
        m._dlcv_patched = _Registered()
        count += 1
    return count


def unpatch(model: nn.Module) -> int:
    """Give every ``PreTrainedModel`` :func:`patch` switched in ``model`` its previous attention implementation
    back; returns how many were restored."""
    count = 0
    for m in model.modules():
        if not (m.__dict__.get("_dlcv_patched") and "_dlcv_previous_attn_implementation" in m.__dict__):
            continue  # not patched here (other integrations mark their modules too)
        previous = m.__dict__.pop("_dlcv_previous_attn_implementation")
        config = m.config
        if config._attn_implementation == NAME:  # not changed by the user since
            config._attn_implementation_internal = previous
        entry = _previous.get(id(config))
        if entry is not None and entry[0]() is config:
            del _previous[id(config)]
        del m._dlcv_patched
        count += 1
    return count
