"""The pre-norm transformer block of ViT, DeiT and CLIP, with timm's parameter names."""
from __future__ import annotations

from functools import partial

from torch import nn

from dlcv_fast.nn.attention import Attention
from dlcv_fast.nn.hooks import has_forward_hooks
from dlcv_fast.nn.mlp import Mlp
from dlcv_fast.nn.norm import LayerNorm


class DropPath(nn.Module):
    """Stochastic depth: in training, zero each sample's residual branch with probability ``p`` (rescaling the rest)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; keys ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2`` as in timm's ``vision_transformer.Block``.

    ``x`` ``(B, N, dim)``; the keyword arguments of :meth:`forward` (``causal``, ``key_padding_mask``, ``attn_bias``,
    ``rope``) go to :meth:`Attention.forward`. The norms are :class:`~dlcv_fast.nn.LayerNorm`: each residual add
    is fused into the norm that follows it (:meth:`forward_residual`, :func:`run_blocks`).
    """

    def __init__(self, dim, num_heads, mlp_hidden_dim, *, qkv_bias=True, qk_norm=False, act="gelu", norm_eps=1e-6,
                 drop_path=0.0):
        super().__init__()
        norm_layer = partial(LayerNorm, eps=norm_eps)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=norm_layer)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden_dim, act=act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, **attn_kwargs):
        x, branch = self.forward_residual(x, None, **attn_kwargs)
        return x + branch

    def forward_residual(self, x, branch=None, **attn_kwargs):
        """The block on the residual stream ``x`` plus the previous block's pending ``branch`` (None: nothing
        pending). Returns ``(x', branch')``: the stream after the attention half and the MLP half's output, whose
        add is left to the next norm (the next block's ``norm1`` or the model's final norm), so every add shares
        a kernel with a LayerNorm. ``x' + branch'`` is :meth:`forward`'s result."""
        y, x = fused_add_norm(self.norm1, x, branch)
        y, x = fused_add_norm(self.norm2, x, self.drop_path(self.attn(y, **attn_kwargs)))
        return x, self.drop_path(self.mlp(y))

    def forward_readout(self, x, branch, select, **attn_kwargs):
        """:meth:`forward_residual` restricted to the rows ``select`` picks (``(B, N, C) -> (B, n, C)``): keys and
        values from every row, queries, the projection, the second norm and the MLP for the selected rows only.
        ``attn_kwargs`` go to :meth:`Attention.forward_rows` (``key_padding_mask``). Returns ``(x', branch')``
        for those rows."""
        y, x = fused_add_norm(self.norm1, x, branch)
        branch = self.drop_path(self.attn.forward_rows(y, select, **attn_kwargs))
        y, x = fused_add_norm(self.norm2, select(x), branch)
        return x, self.drop_path(self.mlp(y))


def fused_add_norm(norm, x, branch):
    """``(norm(x + branch), x + branch)`` with the add inside the norm's kernel where ``norm`` is a
    :class:`~dlcv_fast.nn.LayerNorm`; ``branch`` None adds nothing."""
    if branch is None:
        return norm(x), x
    if isinstance(norm, LayerNorm):
        return norm(branch, residual=x)
    x = x + branch
    return norm(x), x


def _reads_out(blk) -> bool:
    """Whether :meth:`Block.forward_readout` computes what calling ``blk`` would: exactly our Block and Attention."""
    return type(blk) is Block and type(blk.attn) is Attention


def run_blocks(blocks, x, final_norm=None, kwargs_per_block=None, readout=None, readout_kwargs=None):
    """``final_norm(blocks[-1](...blocks[0](x)))`` (no norm when None), each block run with
    :meth:`forward_residual` so that its last residual add is fused into the next norm; ``kwargs_per_block``:
    one dict of keyword arguments per block, or None. When a block has forward hooks (feature extraction,
    activation statistics), or one of them has no ``forward_residual`` (a block replaced by the user, or wrapped
    for activation checkpointing), the blocks are called one by one instead, so hooks and replacements see each
    block's output. Blocks: :class:`Block`, or any module with its ``forward_residual`` (Swin's block).

    ``readout``: a function picking the rows the caller will use, ``(B, N, C) -> (B, n, C)`` (a classifier's
    class token, CLIP's end-of-text token); the result is then ``readout`` of the above, and the last block
    computes only those rows after its keys and values (:meth:`Block.forward_readout`, with ``readout_kwargs``
    as its attention's keyword arguments instead of ``kwargs_per_block[-1]``): for ViT-B at 197 tokens that
    leaves out five sixths of the last block's matmul work. Only when the last block is a :class:`Block` with an
    :class:`Attention` (not subclasses, whose own forward would be bypassed, nor replacements), and not where
    that block or one of its modules, or the final norm, has forward hooks: they would see other shapes."""
    kwargs_per_block = kwargs_per_block or [{}] * len(blocks)
    if any(has_forward_hooks(blk) or not hasattr(blk, "forward_residual") for blk in blocks):  # hooked / replaced
        for blk, kw in zip(blocks, kwargs_per_block):
            x = blk(x, **kw)
        x = final_norm(x) if final_norm is not None else x
        return readout(x) if readout is not None else x
    if readout is not None and (not len(blocks) or not _reads_out(blocks[-1])
                                or any(has_forward_hooks(m) for m in blocks[-1].modules())
                                or final_norm is not None and has_forward_hooks(final_norm)):
        return readout(run_blocks(blocks, x, final_norm, kwargs_per_block))
    branch = None
    for i, blk in enumerate(blocks):
        if readout is not None and i == len(blocks) - 1:
            x, branch = blk.forward_readout(x, branch, readout, **(readout_kwargs or {}))
        else:
            x, branch = blk.forward_residual(x, branch, **kwargs_per_block[i])
    if final_norm is None:
        return x if branch is None else x + branch
    return fused_add_norm(final_norm, x, branch)[0]
