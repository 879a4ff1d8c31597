"""Image to patch tokens, with timm's parameter names."""
from __future__ import annotations

from torch import nn

from dlcv_fast.nn.norm import LayerNorm


def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> ``embed_dim`` channels, channels-last output.

    Keys ``proj`` (the strided Conv2d) and ``norm`` (a LayerNorm when ``norm_eps`` is given, Swin) as in timm.
    ``x`` ``(B, C, H, W)`` -> ``(B, H // p, W // p, embed_dim)``; any image size (a remainder is dropped).
    ``img_size`` only sets :attr:`grid_size`, the grid the position embeddings of a model were made for.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, *, bias=True, norm_eps=None):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = LayerNorm(embed_dim, eps=norm_eps) if norm_eps is not None else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))
