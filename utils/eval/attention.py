"""Attention maps of DINO ViTs: the CLS token's last-block attention over the patches, masks, and figures.

Shapes: ``B`` images, ``heads`` attention heads, ``T = num_prefix_tokens + N`` tokens (CLS first, then any register
tokens, then the ``N = h * w`` patch tokens row-major), ``(h, w)`` the patch grid, ``(H, W)`` the image in pixels.

Everything here is a pure function of tensors, except :func:`backbone_cls_attention` and
:func:`attention_grid_for_tensorboard` which run the backbone (eval mode, no gradients, the mode restored after).
Figures are built with matplotlib's object API on the Agg canvas (no ``pyplot``, no display needed, nothing kept
in a global figure registry).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from utils.data.augment.per_image import IMAGENET_MEAN, IMAGENET_STD

#: Colormap of every heat map (figures and per-head PNGs).
HEATMAP_CMAP = "inferno"

#: Mask outline on the heat maps (cyan: visible on every shade of inferno).
HEAD_PANEL_OUTLINE = (0.0, 0.9, 1.0)

MASK_MODES = ("mass", "value")


# --------------------------------------------------------------------------------------------------------------------
# Maps and masks (pure tensor functions)
# --------------------------------------------------------------------------------------------------------------------


def cls_attention_maps(attn: torch.Tensor, grid_hw: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """The CLS token's attention over the patch tokens, on the patch grid.

    ``attn``: softmax attention ``[B, heads, T, T]`` (e.g. ``get_last_selfattention``), ``T = num_prefix_tokens +
    h * w``; ``grid_hw``: ``(h, w)``. Returns ``[B, heads, h, w]``: row 0 (the CLS query) at the patch keys.

    The maps are *not* renormalised: each sums to 1 minus the attention the CLS token pays to the prefix tokens
    (itself and any registers), so heads stay comparable with each other. The mass masks below only use ratios
    to each map's own total, so they do not need it either.
    """
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention [B, heads, T, T], got {tuple(attn.shape)}")
    h, w = (int(v) for v in grid_hw)
    patches = attn.shape[-1] - num_prefix_tokens
    if patches != h * w:
        raise ValueError(
            f"{attn.shape[-1]} tokens - {num_prefix_tokens} prefix tokens = {patches} patches, "
            f"not a {h}x{w} grid ({h * w} patches)"
        )
    return attn[:, :, 0, num_prefix_tokens:].reshape(attn.shape[0], attn.shape[1], h, w)


def upsample_maps(maps: torch.Tensor, image_hw: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """Patch-grid maps ``[B, heads, h, w]`` → image-size maps ``[B, heads, H, W]``.

    ``mode="nearest"`` repeats each patch's value over its pixels (blocky, honest: one value per patch when ``H, W``
    are multiples of ``h, w``); ``mode="bilinear"`` is the smooth variant (``align_corners=False``; values stay within
    the map's range, so non-negative maps stay non-negative). Boolean masks are upsampled with ``nearest`` only.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"upsampling mode must be 'nearest' or 'bilinear', got {mode!r}")
    size = tuple(int(v) for v in image_hw)
    if maps.dtype == torch.bool:
        if mode != "nearest":
            raise ValueError("boolean masks can only be upsampled with mode='nearest'")
        return F.interpolate(maps.float(), size=size, mode="nearest").bool()
    if mode == "nearest":
        return F.interpolate(maps, size=size, mode="nearest")
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _flatten_patches(attn: torch.Tensor, patch_dims: int) -> torch.Tensor:
    if patch_dims not in (1, 2):
        raise ValueError(f"patch_dims must be 1 ([..., N]) or 2 ([..., h, w]), got {patch_dims}")
    if attn.ndim < patch_dims:
        raise ValueError(f"a tensor of shape {tuple(attn.shape)} has no {patch_dims} patch dimension(s)")
    return attn.flatten(-2) if patch_dims == 2 else attn


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


def attention_to_mask(attn: torch.Tensor, threshold: float, patch_dims: int = 2) -> torch.Tensor:
    """Per map, the smallest set of patches holding at least ``threshold`` of the map's attention mass.

    ``attn``: non-negative maps, ``[..., h, w]`` with ``patch_dims=2`` (the default, what
    :func:`cls_attention_maps` returns) or ``[..., N]`` with ``patch_dims=1``; each map is one set of patches
    (e.g. one head of one image). Returns a boolean mask of the same shape.

    Rule (DINO's "keep ``threshold`` of the mass"), stated exactly: sort a map's values in descending order; a patch
    is kept iff the mass of the patches strictly before it in that order is ``< threshold * total``. The kept set is
    then the top-``k`` patches with the smallest ``k`` such that their mass is ``>= threshold * total`` — no set of
    fewer patches reaches that mass, since the top ``k - 1`` are the heaviest ``k - 1`` and fall short. Hence
    ``threshold=0`` keeps nothing; ``threshold=1`` keeps every patch (by definition, also zero-attention ones, which
    the rule alone would drop). Among equal values the sort decides which tied patch is kept; a map with zero total
    keeps nothing (for ``threshold < 1``). Vectorised: one sort, one cumulative sum, one scatter.
    """
    threshold = _check_threshold(threshold)
    flat = _flatten_patches(attn, patch_dims)
    if threshold >= 1.0:
        return torch.ones_like(attn, dtype=torch.bool)
    values, order = flat.sort(dim=-1, descending=True)
    cumulative = values.cumsum(dim=-1)
    total = cumulative[..., -1:]  # the same additions as the cumulative sum: no rounding mismatch at the end
    mass_before = F.pad(cumulative[..., :-1], (1, 0))  # exclusive cumulative sum: exactly 0 for the top patch
    keep_sorted = mass_before < threshold * total
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(attn.shape)


def attention_value_mask(attn: torch.Tensor, threshold: float, patch_dims: int = 2) -> torch.Tensor:
    """The simple value rule: patches whose attention is ``>= threshold * max`` of their map.

    Same shapes as :func:`attention_to_mask`. ``threshold=0`` keeps every patch, ``threshold=1`` keeps the
    maximum(s) only; it does not look at the mass, so a peaky head gives a small mask and a flat head a large one.
    """
    threshold = _check_threshold(threshold)
    flat = _flatten_patches(attn, patch_dims)
    peak = flat.amax(dim=-1, keepdim=True)
    return (flat >= threshold * peak).reshape(attn.shape)


def attention_mask(attn: torch.Tensor, threshold: float, mode: str = "mass", patch_dims: int = 2) -> torch.Tensor:
    """:func:`attention_to_mask` (``mode="mass"``) or :func:`attention_value_mask` (``mode="value"``)."""
    if mode == "mass":
        return attention_to_mask(attn, threshold, patch_dims)
    if mode == "value":
        return attention_value_mask(attn, threshold, patch_dims)
    raise ValueError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {mode!r}")


def mask_description(mode: str, threshold: float) -> str:
    """A short human label of a mask rule, for figure titles: ``"60% of attention mass"``, ``"≥ 0.6 × max"``."""
    if mode == "mass":
        return f"{threshold:.0%} of attention mass"
    return f"attention ≥ {threshold:g} × max"


# --------------------------------------------------------------------------------------------------------------------
# Running a backbone
# --------------------------------------------------------------------------------------------------------------------


def unwrap_backbone(model: nn.Module) -> nn.Module:
    """The ViT with ``get_last_selfattention`` in ``model``: itself, a DDP ``.module``, a wrapper's ``.backbone``."""
    seen = 0
    while not hasattr(model, "get_last_selfattention") and seen < 4:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "backbone", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    if not hasattr(model, "get_last_selfattention"):
        raise TypeError(f"{type(model).__name__} has no get_last_selfattention (not a DINO ViT backbone)")
    return model


def crop_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Centre-crop ``[..., H, W]`` to the largest multiple of ``patch_size`` in each of ``H`` and ``W``."""
    height, width = images.shape[-2:]
    new_h, new_w = height - height % patch_size, width - width % patch_size
    if new_h == 0 or new_w == 0:
        raise ValueError(f"a {height}x{width} image is smaller than one {patch_size}x{patch_size} patch")
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return images[..., top : top + new_h, left : left + new_w]


def backbone_cls_attention(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS attention maps ``[B, heads, h, w]`` (float32, on the images' device) of normalised images ``[B, 3, H, W]``.

    ``H`` and ``W`` must be multiples of the patch size (see :func:`crop_to_patch_multiple`). Runs the backbone's
    last-block attention in eval mode without gradients and restores the module's train/eval mode afterwards.
    """
    vit = unwrap_backbone(backbone)
    patch = vit.patch_size
    height, width = images.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    was_training = vit.training
    vit.eval()
    try:
        with torch.no_grad():
            device = next(vit.parameters()).device
            attn = vit.get_last_selfattention(images.to(device))
    finally:
        vit.train(was_training)
    maps = cls_attention_maps(attn.float(), (height // patch, width // patch), vit.num_prefix_tokens)
    return maps.to(images.device)


def denormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Undo the ImageNet normalisation: ``[..., 3, H, W]`` → values in [0, 1] (clamped)."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)


# --------------------------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------------------------


def _image_hwc(image) -> np.ndarray:
    """PIL image, ``[3, H, W]`` tensor in [0, 1] or ``[H, W, 3]`` array (uint8 or [0, 1]) → float ``[H, W, 3]``."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor [3, H, W], got {tuple(image.shape)}")
        array = image.detach().float().cpu().expand(3, -1, -1).permute(1, 2, 0).numpy()
        return np.clip(array, 0.0, 1.0)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an image array [H, W, 3], got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _upsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour ``[h, w]`` bool → ``[H, W]`` bool."""
    rows = (np.arange(height) * mask.shape[0]) // height
    cols = (np.arange(width) * mask.shape[1]) // width
    return mask[rows[:, None], cols[None, :]]


def heatmap_image(attention_map, image_hw: Sequence[int] | None = None, mode: str = "nearest") -> np.ndarray:
    """One map ``[h, w]`` → an RGB uint8 picture ``[H, W, 3]`` in :data:`HEATMAP_CMAP`, scaled from its min to max.

    ``image_hw`` upsamples first (``mode`` as in :func:`upsample_maps`); by default the map's own size.
    """
    values = torch.as_tensor(_as_numpy(attention_map), dtype=torch.float32)
    if image_hw is not None:
        values = upsample_maps(values[None, None], image_hw, mode)[0, 0]
    values = values.numpy()
    low, high = _display_range(values)
    scaled = (values - low) / (high - low)
    rgba = colormaps[HEATMAP_CMAP](np.clip(scaled, 0.0, 1.0))
    return (rgba[..., :3] * 255.0 + 0.5).astype(np.uint8)


def mask_image(mask, image_hw: Sequence[int] | None = None) -> np.ndarray:
    """One boolean mask ``[h, w]`` → a grayscale uint8 picture ``[H, W]`` (255 kept, 0 dropped), nearest upsampling."""
    array = _as_numpy(mask).astype(bool)
    if image_hw is not None:
        array = _upsample_mask(array, int(image_hw[0]), int(image_hw[1]))
    return array.astype(np.uint8) * 255


def _display_range(values: np.ndarray) -> tuple[float, float]:
    """Colour scale of one heat map: its own min to max (a flat map gets a non-empty range)."""
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low, low + 1e-12)


def head_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinct RGB colours, one per head, for mask outlines: tab10; past 10 heads tab20's strong shades first,
    then its pale ones (then cycling)."""
    if n <= 10:
        return [to_rgb(colormaps["tab10"](i)) for i in range(n)]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return [to_rgb(colormaps["tab20"](order[i % 20])) for i in range(n)]


def _clean_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def attention_grid_figure(
    image,
    maps,
    mask=None,
    *,
    title: str | None = None,
    mask_label: str = "mask",
    smooth_overlay: bool = True,
    panel_inches: float = 2.4,
    dpi: int = 100,
    max_columns: int = 6,
) -> Figure:
    """A figure of one image's attention: the image, the mean over heads, each head, and the masks on the image.

    ``image``: a ``[3, H, W]`` tensor in [0, 1], an ``[H, W, 3]`` array or a PIL image; ``maps``: ``[heads, h, w]``
    attention on the patch grid (or already at ``[heads, H, W]``); ``mask``: optional boolean ``[heads, h, w]`` (one
    outline per head, in the head's colour) or ``[h, w]`` (one mask), at grid or image resolution.

    Top row: the image; the mean over heads; the mean laid over the image (``smooth_overlay``: bilinear, else
    patch blocks); the masks outlined over the image, one colour per head (``mask_label`` names the rule). Below:
    one panel per head, titled in the head's colour, its mask outlined in cyan, ``max_columns`` panels a row. Heat
    maps use :data:`HEATMAP_CMAP`, each panel scaled from its own min to its max (the max is printed in its title),
    with one shared colour bar. Returns a matplotlib ``Figure`` on an Agg canvas (save with ``fig.savefig``, convert
    with :func:`figure_to_tensor`).
    """
    picture = _image_hwc(image)
    height, width = picture.shape[:2]
    maps_np = _as_numpy(maps).astype(np.float32)
    if maps_np.ndim == 2:
        maps_np = maps_np[None]
    if maps_np.ndim != 3:
        raise ValueError(f"expected maps [heads, h, w], got {maps_np.shape}")
    heads = maps_np.shape[0]
    masks_np = None
    if mask is not None:
        masks_np = _as_numpy(mask).astype(bool)
        if masks_np.ndim == 2:
            masks_np = masks_np[None]
        if masks_np.ndim != 3 or masks_np.shape[0] not in (1, heads):
            raise ValueError(f"expected a mask [heads, h, w] or [h, w] for {heads} heads, got {masks_np.shape}")
        masks_np = np.stack([_upsample_mask(m, height, width) for m in masks_np])
    mean_map = maps_np.mean(axis=0)
    colors = head_colors(heads) if masks_np is not None and masks_np.shape[0] == heads else [(0.0, 1.0, 1.0)]
    cmap = colormaps[HEATMAP_CMAP]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the image's own pixel extent: maps of any size line up

    columns = max(4, min(heads, max_columns))
    head_rows = -(-heads // columns)
    aspect = height / width
    panel_h = panel_inches * aspect + 0.38  # room for a two-line title
    top_h, bottom_h = panel_h, head_rows * panel_h + 0.55  # + the colour bar
    title_h = 0.35 if title else 0.0
    fig = Figure(figsize=(columns * panel_inches, top_h + bottom_h + title_h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=11, fontweight="bold")
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])

    def heat(ax, values, label, note="", alpha=1.0, interpolation="nearest"):
        low, high = _display_range(values)
        ax.imshow(values, cmap=cmap, vmin=low, vmax=high, alpha=alpha, extent=extent, interpolation=interpolation)
        if label:
            ax.set_title(f"{label}\nmax {float(values.max()):.3g}{note}", fontsize=9)
        _clean_axes(ax)

    def outline(ax, region, color, fill_alpha):
        if region.all() or not region.any():
            return  # nothing to draw (a constant mask has no contour)
        if fill_alpha:
            layer = np.zeros((height, width, 4), dtype=np.float32)
            layer[region] = (*color, fill_alpha)
            ax.imshow(layer, extent=extent, interpolation="nearest")
        ax.contour(
            region.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.4, extent=extent, origin="upper"
        )

    overview = top.subplots(1, 4, squeeze=True)
    overview[0].imshow(picture, extent=extent)
    overview[0].set_title(f"image\n{height}×{width} px", fontsize=9)
    _clean_axes(overview[0])
    heat(overview[1], mean_map, "mean over heads")
    overview[2].imshow(picture, extent=extent)
    heat(overview[2], mean_map, "", alpha=0.6, interpolation="bilinear" if smooth_overlay else "nearest")
    overview[2].set_title("mean on image", fontsize=9)
    overview[3].imshow(picture, extent=extent)
    if masks_np is not None:
        for region, color in zip(masks_np, colors):
            outline(overview[3], region, color, fill_alpha=0.0 if len(masks_np) > 1 else 0.35)
        overview[3].set_title(f"masks: {mask_label}", fontsize=9)
    else:
        overview[3].set_title("(no mask)", fontsize=9)
    _clean_axes(overview[3])

    axes = np.atleast_1d(bottom.subplots(head_rows, columns, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= heads:
            ax.set_visible(False)
            continue
        per_head_mask = masks_np is not None and masks_np.shape[0] == heads
        heat(ax, maps_np[i], f"head {i}", f" · mask {masks_np[i].mean():.0%}" if per_head_mask else "")
        if per_head_mask:
            outline(ax, masks_np[i], HEAD_PANEL_OUTLINE, fill_alpha=0.0)
            ax.title.set_color(colors[i])  # ties the panel to the head's outline on the image
    colorbar = bottom.colorbar(
        ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap),
        ax=list(axes[:heads]),
        orientation="horizontal",
        fraction=0.05,
        shrink=0.6,
        aspect=40,
        pad=0.02,
    )
    colorbar.set_ticks([0.0, 1.0], labels=["min", "max"])
    colorbar.set_label("CLS-token attention, each panel scaled from its own min to its max", fontsize=8)
    colorbar.ax.tick_params(labelsize=8)
    return fig


def figure_to_tensor(fig: Figure) -> torch.Tensor:
    """Render a figure (Agg) → uint8 ``[3, H, W]`` RGB, e.g. for TensorBoard's ``add_image``."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1).contiguous()


def attention_grid_for_tensorboard(
    backbone: nn.Module,
    images_normalised: torch.Tensor,
    threshold: float = 0.6,
    mask_mode: str = "mass",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    panel_inches: float = 2.0,
    dpi: int = 80,
) -> list[torch.Tensor]:
    """One attention grid per image, as uint8 ``[3, H, W]`` tensors for ``SummaryWriter.add_image``.

    ``backbone``: a DINO ViT (or a wrapper holding one in ``.module`` / ``.backbone``, e.g. the teacher);
    ``images_normalised``: ``[B, 3, S, S]`` (or one ``[3, S, S]``) normalised with ``mean``/``std`` (denormalised for
    display), centre-cropped to a multiple of the patch size if needed. The forward pass runs in eval mode under
    ``no_grad``; the backbone's train/eval mode is restored afterwards. Masks: ``mask_mode`` at ``threshold`` (see
    :func:`attention_mask`). Call on the main process only; it is cheap (one forward of ``B`` images, ``B`` figures).
    """
    _check_threshold(threshold)
    if images_normalised.ndim == 3:
        images_normalised = images_normalised[None]
    vit = unwrap_backbone(backbone)
    images = crop_to_patch_multiple(images_normalised, vit.patch_size)
    maps = backbone_cls_attention(vit, images).cpu()
    masks = attention_mask(maps, threshold, mask_mode)
    pictures = denormalize(images.detach().float().cpu(), mean, std)
    grids = []
    for picture, image_maps, image_masks in zip(pictures, maps, masks):
        fig = attention_grid_figure(
            picture,
            image_maps,
            image_masks,
            mask_label=mask_description(mask_mode, threshold),
            panel_inches=panel_inches,
            dpi=dpi,
        )
        grids.append(figure_to_tensor(fig))
    return grids
