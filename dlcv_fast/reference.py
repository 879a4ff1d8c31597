"""Readable eager PyTorch definitions of every dlcv_fast op: the source of truth for correctness.

Tests compare the kernels against these functions (run in float64 for a "golden" answer and in the
input dtype for PyTorch's own low-precision error), and the "torch" backend runs them on CPU tensors.
The fast path never imports this module.
"""
from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------------
# Dense attention
# --------------------------------------------------------------------------------------------------

# The kernels run the softmax in base 2 (scores times log2(e)) in float32, where a score below float32's lowest
# value / log2(e) overflows to -inf: a key scored that low (a mask written with finfo(float32).min, as Hugging Face
# models write theirs) counts as masked out. Its softmax weight underflows to zero anyway unless every key of the
# row is that low, and then the row is fully masked: zeros, in every backend.
MASKED_SCORE = -torch.finfo(torch.float32).max / 1.4426950408889634


def _masked_scores(s, mask):
    s = s.masked_fill(s <= MASKED_SCORE, float("-inf"))
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _softmax_with_lse(s):
    """``(p, lse)`` of scores ``s``: the softmax over the last dim with the row max subtracted first (so rows of
    huge negative scores keep their log(n) term), zeros for a fully masked row; lse -inf there."""
    m = s.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(m)
    e = torch.exp(s - torch.where(finite, m, 0))
    total = e.sum(dim=-1, keepdim=True)
    p = torch.where(finite, e / total, 0)
    lse = torch.where(finite, m + torch.log(total), float("-inf")).squeeze(-1)
    return p, lse


def attention_mask(Lq: int, Lk: int, *, causal=False, prefix_len=None, key_padding_mask=None, device=None):
    """The boolean "may attend" mask (True = key takes part) implied by the index-based masks.

    Returns None when nothing is masked, else a tensor broadcastable to (B, 1, Lq, Lk).
    ``causal``: key j visible to query i iff j <= i (SDPA's top-left ``is_causal``).
    ``prefix_len`` P: queries i < P see keys j < P; later queries see keys j <= i (prefix-LM, BLIP-2).
    Both together equal the prefix-LM mask, since it is causal past the prefix.
    ``key_padding_mask`` (B, Lk) bool: True = key takes part.
    """
    mask = None
    if causal or prefix_len is not None:
        i = torch.arange(Lq, device=device)[:, None]
        j = torch.arange(Lk, device=device)[None, :]
        mask = j <= i
        if prefix_len is not None:
            mask = mask | (j < prefix_len)
        mask = mask[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = kpm if mask is None else (mask & kpm)
    return mask


def apply_rope(x, cos, sin, *, interleaved=False):
    """Rotary position embedding of the first ``2 * cos.shape[-1]`` channels of ``x``.

    x ``(B, H, N, D)``; cos/sin ``(N, R)`` or ``(B, N, R)`` with ``2R <= D``; channels past 2R pass
    through. Half-split ("NeoX") pairs channel c with c + R; ``interleaved`` ("GPT-J") pairs 2c with 2c+1.
    Rotation of pair (a, b) by angle t: (a cos t - b sin t, b cos t + a sin t). Computed in x's dtype.
    """
    R = cos.shape[-1]
    if cos.dim() == 2:
        cos, sin = cos[None, None], sin[None, None]
    else:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., : 2 * R], x[..., 2 * R :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = rot[..., :R], rot[..., R:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out, rest), dim=-1)


def attention_with_lse(q, k, v, *, causal=False, key_padding_mask=None, attn_bias=None, prefix_len=None,
                       scale=None, rope=None):
    """Eager attention returning ``(out, lse)``.

    q ``(B, Hq, Lq, D)``, k/v ``(B, Hkv, Lk, D)`` with Hq % Hkv == 0 (GQA/MQA repeat each kv head).
    Scores ``s = scale * q k^T + attn_bias`` (scale defaults to D**-0.5) with masked keys at -inf (also keys
    scored at or below ``MASKED_SCORE``, as the kernels' base-2 softmax sees them);
    ``lse`` (B, Hq, Lq), float32 (float64 for float64 inputs), is the natural log-sum-exp of each row of s
    (-inf for a fully masked row); out = softmax(s) v, and a fully masked row gives zeros. The matmuls run in
    the input dtype and the softmax in float32 (float64 for float64 inputs), as torch does, so running this
    in fp16 gives PyTorch's own error.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if rope is not None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for a golden run
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(acc)
    mask = attention_mask(Lq, Lk, causal=causal, prefix_len=prefix_len, key_padding_mask=key_padding_mask,
                          device=q.device)
    p, lse = _softmax_with_lse(_masked_scores(s, mask))
    out = torch.matmul(p.to(v.dtype), v)
    return out, lse.expand(B, Hq, Lq)


def attention_backward(do, q, k, v, *, causal=False, key_padding_mask=None, attn_bias=None, prefix_len=None,
                       scale=None):
    """Explicit gradients of :func:`attention` (no autograd): returns ``(dq, dk, dv, ds)``.

    With P = softmax(s): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = scale dS K,
    dK = scale dS^T Q (summed over the query heads of a GQA group). ``ds`` (B, Hq, Lq, Lk) is the
    gradient of the scores, i.e. of ``attn_bias`` before reduction over its broadcast dims.
    """
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    out = attention_with_lse(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                             prefix_len=prefix_len, scale=scale)[0]
    kr = k.repeat_interleave(group, dim=1).to(acc)
    vr = v.repeat_interleave(group, dim=1).to(acc)
    s = torch.matmul(q.to(acc), kr.transpose(-1, -2)) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(acc)
    mask = attention_mask(q.shape[2], k.shape[2], causal=causal, prefix_len=prefix_len,
                          key_padding_mask=key_padding_mask, device=q.device)
    p = _softmax_with_lse(_masked_scores(s, mask))[0]
    do = do.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, vr.transpose(-1, -2))
    ds = p * (dp - (do * out.to(acc)).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    if group > 1:
        dk = dk.unflatten(1, (Hkv, group)).sum(2)
        dv = dv.unflatten(1, (Hkv, group)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds


def attention(q, k, v, *, causal=False, key_padding_mask=None, attn_bias=None, prefix_len=None, scale=None,
              rope=None):
    """Eager attention; see :func:`attention_with_lse` for the exact definition."""
    return attention_with_lse(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                              prefix_len=prefix_len, scale=scale, rope=rope)[0]


# --------------------------------------------------------------------------------------------------
# Swin window attention
# --------------------------------------------------------------------------------------------------


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def window_relative_position_index(win_h: int, win_w: int, device=None):
    """``(N, N)`` long, N = win_h * win_w: the row of the relative position bias table for each
    (query, key) pair of a window (timm's ``get_relative_position_index``)."""
    ty = torch.arange(win_h * win_w, device=device) // win_w
    tx = torch.arange(win_h * win_w, device=device) % win_w
    return (ty[:, None] - ty[None, :] + win_h - 1) * (2 * win_w - 1) + (tx[:, None] - tx[None, :] + win_w - 1)


def window_region_ids(pad_h: int, pad_w: int, window_size, shift_size, device=None):
    """``(pad_h, pad_w)`` region ids of the shifted, padded map (timm's ``img_mask``): per axis, the band
    before ``-window``, the band from ``-window`` to ``-shift`` and the last ``shift`` rows; a single band
    on an axis without shift. Tokens of one window attend across regions only through the -100 mask."""
    (wh, ww), (sh, sw) = _pair(window_size), _pair(shift_size)

    def bands(n, w, s):
        i = torch.arange(n, device=device)
        return ((i >= n - w).long() + (i >= n - s).long()) if s else torch.zeros_like(i)

    return bands(pad_h, wh, sh)[:, None] * 3 + bands(pad_w, ww, sw)[None, :]


def window_partition(x, window_size):
    """``(B, Hp, Wp, C)`` -> ``(B * nW, Wh * Ww, C)``, windows in row-major order per image."""
    B, Hp, Wp, C = x.shape
    wh, ww = window_size
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (Hp // wh) * (Wp // ww), wh * ww, C)


def window_merge(windows, window_size, B, Hp, Wp):
    """Inverse of :func:`window_partition`: ``(B * nW, Wh * Ww, C)`` -> ``(B, Hp, Wp, C)``."""
    wh, ww = window_size
    C = windows.shape[-1]
    x = windows.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, C)


def _to_windows(x, window, shift, fill):
    """``(B, H, W, ch)`` map -> ``(B * nW, N, ch)`` windows of the map rolled by ``-shift`` and padded at the
    bottom/right with ``fill`` (``(ch,)``) up to a multiple of the window. Returns (windows, Hp, Wp)."""
    B, H, W, ch = x.shape
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2)) if (sh or sw) else x
    padded = fill.expand(B, Hp, Wp, ch).clone()
    padded[:, :H, :W] = x
    return window_partition(padded, window), Hp, Wp


def _from_windows(t, window, shift, B, H, W):
    """Inverse of :func:`_to_windows` (padding cropped): ``(B * nW, N, ch)`` -> ``(B, H, W, ch)``."""
    (wh, ww), (sh, sw) = window, shift
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    t = window_merge(t, window, B, Hp, Wp)[:, :H, :W]
    return torch.roll(t, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else t.contiguous()


def _window_qkv_scores(qkv, num_heads, window, shift, table, qkv_bias, scale, acc):
    """Windows of q, k, v ``(B * nW, heads, N, D)`` and the scores ``scale * q k^T + bias + mask`` in ``acc``."""
    B, H, W, C3 = qkv.shape
    N = window[0] * window[1]
    fill = qkv_bias.to(qkv.dtype) if qkv_bias is not None else qkv.new_zeros(C3)
    windows, Hp, Wp = _to_windows(qkv, window, shift, fill)
    q, k, v = windows.view(-1, N, 3, num_heads, C3 // 3 // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    s = ((q * scale) @ k.transpose(-1, -2)).to(acc)
    s = s.view(B, -1, num_heads, N, N)
    if table is not None:
        index = window_relative_position_index(*window, device=qkv.device)
        s = s + table[index].permute(2, 0, 1).to(acc)
    if any(shift):
        regions = window_partition(window_region_ids(Hp, Wp, window, shift, qkv.device)[None, ..., None],
                                   window)[..., 0]  # (nW, N)
        s = s + torch.where(regions[:, :, None] == regions[:, None, :], 0.0, -100.0).to(acc)[None, :, None]
    return q, k, v, s.view(-1, num_heads, N, N)


def window_attention_with_lse(qkv, *, num_heads, window_size, shift_size=0, rel_pos_bias_table=None,
                              qkv_bias=None, scale=None):
    """timm's Swin block attention step (``SwinTransformerBlock._attn`` between the qkv and proj Linears),
    returning ``(out, lse)``.

    qkv ``(B, H, W, 3C)`` channels-last, channels ordered ``(3, num_heads, D)``. Steps: cyclic shift by
    ``-shift``; pad at the bottom/right up to a multiple of the window, padding tokens carrying
    ``qkv_bias`` (timm pads x with zeros *before* the qkv Linear, so they carry its bias; zeros when None);
    partition; per window ``softmax(scale * q k^T + bias + mask) v`` with ``bias[h, n, m] =
    table[relative_position_index[n, m], h]`` and ``mask = -100`` between tokens of different regions
    (shifted windows only); merge, crop, reverse shift. ``out`` is ``(B, H, W, C)``; ``lse`` ``(B, H, W,
    num_heads)`` is the natural log-sum-exp of each token's scores. The matmuls run in the input dtype and
    the softmax in float32 (float64 for float64 inputs), as timm's eager path does.
    """
    B, H, W, C3 = qkv.shape
    window, shift = _pair(window_size), _pair(shift_size)
    scale = (C3 // 3 // num_heads) ** -0.5 if scale is None else scale
    acc = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v, s = _window_qkv_scores(qkv, num_heads, window, shift, rel_pos_bias_table, qkv_bias, scale, acc)
    p = torch.softmax(s, dim=-1).to(qkv.dtype)
    out = (p @ v).transpose(1, 2).flatten(2)  # (B * nW, N, C)
    lse = torch.logsumexp(s, dim=-1).transpose(1, 2)  # (B * nW, N, heads)
    return _from_windows(out, window, shift, B, H, W), _from_windows(lse, window, shift, B, H, W)


def window_attention(qkv, *, num_heads, window_size, shift_size=0, rel_pos_bias_table=None, qkv_bias=None,
                     scale=None):
    """The output of :func:`window_attention_with_lse`: ``(B, H, W, C)``."""
    return window_attention_with_lse(qkv, num_heads=num_heads, window_size=window_size, shift_size=shift_size,
                                     rel_pos_bias_table=rel_pos_bias_table, qkv_bias=qkv_bias, scale=scale)[0]


def window_attention_backward(dout, qkv, *, num_heads, window_size, shift_size=0, rel_pos_bias_table=None,
                              qkv_bias=None, scale=None):
    """Explicit gradients of :func:`window_attention` (no autograd): ``(dqkv, dtable, dqkv_bias)``, the last
    two None when the table / bias is None.

    Per window, with P = softmax(s): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)),
    dQ = scale dS K, dK = scale dS^T Q. dtable[t, h] sums dS[h, n, m] over every window and image and every
    pair (n, m) with relative_position_index t; dqkv_bias sums the gradients of the padding tokens' q/k/v
    (dO of a padding token is 0, as it is cropped). Computed in float32 (float64 for float64 inputs).
    """
    B, H, W, C3 = qkv.shape
    window, shift = _pair(window_size), _pair(shift_size)
    N = window[0] * window[1]
    scale = (C3 // 3 // num_heads) ** -0.5 if scale is None else scale
    acc = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v, s = _window_qkv_scores(qkv.to(acc), num_heads, window, shift, rel_pos_bias_table, qkv_bias, scale,
                                    acc)
    p = torch.softmax(s, dim=-1)
    do = _to_windows(dout.to(acc), window, shift, dout.new_zeros(C3 // 3, dtype=acc))[0]
    do = do.view(-1, N, num_heads, C3 // 3 // num_heads).transpose(1, 2)
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = ds @ k * scale
    dk = ds.transpose(-1, -2) @ q * scale
    dwin = torch.stack((dq, dk, dv), dim=2).permute(0, 3, 2, 1, 4).reshape(-1, N, C3)  # (B * nW, N, 3C)
    dqkv = _from_windows(dwin, window, shift, B, H, W).to(qkv.dtype)
    dtable = dbias = None
    if rel_pos_bias_table is not None:
        index = window_relative_position_index(*window, device=qkv.device).flatten()
        per_pair = ds.view(B, -1, num_heads, N * N).sum((0, 1)).t()  # (N * N, heads)
        bins = torch.nn.functional.one_hot(index, rel_pos_bias_table.shape[0]).t().to(acc)  # (T, N * N)
        dtable = (bins @ per_pair).to(rel_pos_bias_table.dtype)
    if qkv_bias is not None:
        Hp, Wp = -(-H // window[0]) * window[0], -(-W // window[1]) * window[1]
        padded_map = window_merge(dwin, window, B, Hp, Wp)
        is_pad = torch.ones(Hp, Wp, dtype=torch.bool, device=qkv.device)
        is_pad[:H, :W] = False
        dbias = padded_map[:, is_pad].sum((0, 1)).to(qkv_bias.dtype)
    return dqkv, dtable, dbias


# --------------------------------------------------------------------------------------------------
# LayerNorm with the residual add in front (pre-norm blocks)
# --------------------------------------------------------------------------------------------------


def layer_norm(x, weight=None, bias=None, eps=1e-5, *, residual=None):
    """``LayerNorm(x + residual)`` over the last dim, and the sum itself when ``residual`` is given.

    Returns y, or ``(y, s)`` with ``s = x + residual`` in torch's promoted dtype; y is in s's dtype. The
    statistics are taken in float32 (float64 for float64 inputs) of the rounded sum, as eager code computes
    ``F.layer_norm(x + residual)``."""
    s = x if residual is None else x + residual
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.layer_norm(s.to(acc), s.shape[-1:], None if weight is None else weight.to(acc),
                                       None if bias is None else bias.to(acc), eps).to(s.dtype)
    return y if residual is None else (y, s)


def layer_norm_backward(dy, s, weight, eps, ds=None):
    """Gradients ``(ds_total, dweight, dbias)`` of :func:`layer_norm` at the sum ``s`` (x without a residual):
    ``ds_total`` is the gradient of x (and of the residual), including ``ds``, the gradient that reaches the
    sum output itself; dweight / dbias are float32 (None for a missing weight)."""
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s_, dy_ = s.to(acc), dy.to(acc)
    var, mean = torch.var_mean(s_, dim=-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (s_ - mean) * rstd
    wdy = dy_ if weight is None else dy_ * weight.to(acc)
    dx = rstd * (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True) - wdy.mean(-1, keepdim=True))
    if ds is not None:
        dx = dx + ds.to(acc)
    dims = tuple(range(s.dim() - 1))
    dweight = (dy_ * xhat).sum(dims).float() if weight is not None else None
    return dx.to(s.dtype), dweight, dy_.sum(dims).float()


# --------------------------------------------------------------------------------------------------
# Linear + activation (an MLP's first layer)
# --------------------------------------------------------------------------------------------------


def linear_act(x, weight, bias=None, act="gelu"):
    """``act(x @ weight.T + bias)`` as eager code runs it: the Linear in x's dtype, then the activation ("gelu":
    exact, erf; "quick_gelu": ``h * sigmoid(1.702 h)``; "none")."""
    h = torch.nn.functional.linear(x, weight, bias)
    if act == "gelu":
        return torch.nn.functional.gelu(h)
    if act == "quick_gelu":
        return h * torch.sigmoid(1.702 * h)
    return h
