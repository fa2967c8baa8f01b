"""Heatmap overlays and the pointing game.

`clf(image, candidate_labels=..., return_heatmap=True)` gives each label a `"heatmap"` (`explain_llava_radz.py`):
`[H, W]` in [0, 1] over the model's input, the image resized and centre-cropped as CLIP-style processors do.
`overlay` draws one on the image it came from; `pointing_game` scores heatmaps against ground-truth regions (the
phantom generator's region masks), as in Zhang et al., "Top-down neural attention by excitation backprop" (2016).
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy.ndimage import distance_transform_edt

from radiograph_llava_radz import load_radiograph

DEFAULT_COLORMAP = "inferno"


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """`(left, top, right, bottom)` of the centred square a heatmap covers: the crop of a processor that resizes the
    shortest edge and centre-crops a square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def overlay(image, heatmap, path: str | os.PathLike | None = None, alpha: float = 0.45,
            colormap: str = DEFAULT_COLORMAP) -> Image.Image:
    """The image (PIL, numpy, or a PNG/JPEG/DICOM path) in gray with `heatmap` (`[h, w]`, values in [0, 1]) blended
    over the centred square it covers, in `colormap`, at opacity `alpha` × the heatmap value. Written as a PNG to
    `path` when given; returns the RGB image."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be a 2-D array [h, w], got shape {heatmap.shape}")
    if not np.isfinite(heatmap).all() or heatmap.min() < 0 or heatmap.max() > 1:
        raise ValueError("heatmap values must be finite and in [0, 1] (the pipeline's heatmaps are)")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = load_radiograph(image, name="overlay image").convert("RGB")
    box = crop_box(*base.size)
    side = box[2] - box[0]
    values = np.asarray(Image.fromarray(heatmap).resize((side, side), Image.BILINEAR)).clip(0.0, 1.0)
    colors = colormaps[colormap](values)[..., :3].astype(np.float32) * 255
    pixels = np.asarray(base, dtype=np.float32).copy()
    region = pixels[box[1] : box[3], box[0] : box[2]]
    weight = (alpha * values)[..., None]
    pixels[box[1] : box[3], box[0] : box[2]] = region * (1 - weight) + colors * weight
    result = Image.fromarray(pixels.round().astype(np.uint8))
    if path is not None:
        result.save(path, format="PNG")
    return result


def heatmap_peak(heatmap: np.ndarray, shape: tuple[int, int]) -> tuple[int, int]:
    """`(row, column)` in an image of `shape` of the heatmap's maximum; where the maximum is a plateau (an upsampled
    border token), its centroid, so that ties do not all fall on the first pixel."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    rows, columns = np.nonzero(heatmap >= heatmap.max() - 1e-6)
    row, column = rows.mean(), columns.mean()
    scale_rows, scale_columns = shape[0] / heatmap.shape[0], shape[1] / heatmap.shape[1]
    return (min(int((row + 0.5) * scale_rows), shape[0] - 1),
            min(int((column + 0.5) * scale_columns), shape[1] - 1))


def pointing_game(heatmaps, masks, tolerance: float = 0.0) -> dict:
    """Hit rates of `heatmaps` (one per finding instance) against their region `masks` (bool, image-sized): how
    often the heatmap's maximum falls inside the region, or within `tolerance` pixels of it (Zhang et al. allow 15
    px at 224 px); with the two reference points, a uniformly random pixel (its expected hit rate: the area of the
    region so widened) and the image centre. Empty masks are skipped and counted. Returns `{"n", "hit_rate",
    "random", "centre", "empty"}`."""
    hits, areas, centre, empty = [], [], [], 0
    for heatmap, mask in zip(heatmaps, masks, strict=True):
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            empty += 1
            continue
        if tolerance > 0:
            mask = distance_transform_edt(~mask) <= tolerance
        hits.append(bool(mask[heatmap_peak(heatmap, mask.shape)]))
        areas.append(float(mask.mean()))
        centre.append(bool(mask[mask.shape[0] // 2, mask.shape[1] // 2]))
    n = len(hits)
    rate = (lambda values: float(np.mean(values))) if n else (lambda values: float("nan"))
    return {"n": n, "hit_rate": rate(hits), "random": rate(areas), "centre": rate(centre), "empty": empty}
