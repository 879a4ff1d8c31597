"""PNG overlays of attention maps on the input image (needs matplotlib)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _image_01(image, mean, std):
    """A ``(3, H, W)`` tensor, optionally un-normalised by ``mean``/``std``, as an ``(H, W, 3)`` array in [0, 1]."""
    image = image.detach().float().cpu()
    if mean is not None:
        image = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def save_attention_overlay(image, attn_maps, path, *, mean=None, std=None, alpha=0.6, cmap="inferno", cols=4):
    """Write a PNG grid: the image, then each head's attention map and the heads' mean overlaid on it.

    Args:
        image: ``(3, H, W)`` tensor, the model input of one image. With ``mean``/``std`` (the normalisation
            it went through, e.g. ImageNet's) it is un-normalised; otherwise it is min-max scaled.
        attn_maps: ``(heads, gh, gw)`` maps of that image, e.g. ``model.forward_attention_maps(x)[i]``.
            Each is upsampled (bilinear) to the image size and scaled to [0, 1] before colouring.
        path: the PNG file to write.
        alpha: opacity of the maps; cmap: a matplotlib colormap name; cols: panels per row.
    Returns ``path``.
    """
    from matplotlib.figure import Figure

    img = _image_01(image, mean, std)
    H, W = img.shape[:2]
    maps = attn_maps.detach().float().cpu()
    maps = torch.cat([maps, maps.mean(dim=0, keepdim=True)])
    maps = F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).numpy()

    titles = ["image"] + [f"head {h}" for h in range(len(maps) - 1)] + ["mean"]
    rows = math.ceil(len(titles) / cols)
    fig = Figure(figsize=(3 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= len(titles):
            continue
        ax.imshow(img)
        if i > 0:
            ax.imshow(maps[i - 1], cmap=cmap, alpha=alpha)
        ax.set_title(titles[i])
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
