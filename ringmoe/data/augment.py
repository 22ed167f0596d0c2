"""Geometric augmentation shared by co-registered modalities: random resized crop and flips.

One crop box and one pair of flips are drawn per record and applied to every
modality and to the label map, so pixel (i, j) of every output array sees the
same place on the ground: that is what makes cross-modal objectives and dense
labels line up. The crop is expressed as source coordinates for each output row
and column; flips just reverse those coordinates, so they cost nothing. Pixels
are resampled bilinearly (linear in the physical unit: reflectance, dB, or the
Re/Im parts of complex SAR), labels by nearest neighbour.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Crop:
    """Source coordinates (float, pixel centres) of each output row (ys) and column (xs)."""
    ys: np.ndarray
    xs: np.ndarray


def sample_crop(rng: np.random.Generator, height: int, width: int, out_size: int, *,
                scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                flip: bool = True) -> Crop:
    """Draws a random resized crop (area fraction in `scale`, aspect ratio in `ratio`,
    as in Inception / SimMIM) plus independent horizontal and vertical flips."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            break
    else:  # fall back to the largest centred square-ish box within the scale range
        side = max(1, int(round(math.sqrt(area * scale[1]))))
        h, w = min(side, height), min(side, width)
    y0 = int(rng.integers(0, height - h + 1))
    x0 = int(rng.integers(0, width - w + 1))
    step_y, step_x = h / out_size, w / out_size
    ys = y0 + (np.arange(out_size) + 0.5) * step_y - 0.5
    xs = x0 + (np.arange(out_size) + 0.5) * step_x - 0.5
    if flip and rng.uniform() < 0.5:
        xs = xs[::-1]
    if flip and rng.uniform() < 0.5:
        ys = ys[::-1]
    return Crop(ys=np.clip(ys, 0, height - 1), xs=np.clip(xs, 0, width - 1))


def identity_crop(height: int, width: int, out_size: int) -> Crop:
    """The whole image resized to out_size (no randomness): for evaluation."""
    ys = (np.arange(out_size) + 0.5) * height / out_size - 0.5
    xs = (np.arange(out_size) + 0.5) * width / out_size - 0.5
    return Crop(ys=np.clip(ys, 0, height - 1), xs=np.clip(xs, 0, width - 1))


def _weights(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (coords - lo).astype(np.float32)


def resample(image: np.ndarray, crop: Crop) -> np.ndarray:
    """Bilinear resampling of (H, W, C) float pixels at the crop's coordinates
    (separable: rows, then columns; `take` plus in-place updates keep it to a few passes)."""
    y0, y1, wy = _weights(crop.ys, image.shape[0])
    x0, x1, wx = _weights(crop.xs, image.shape[1])
    image = np.asarray(image, np.float32)
    rows, rows_hi = image.take(y0, 0), image.take(y1, 0)
    rows_hi -= rows
    rows_hi *= wy[:, None, None]
    rows += rows_hi
    out, out_hi = rows.take(x0, 1), rows.take(x1, 1)
    out_hi -= out
    out_hi *= wx[None, :, None]
    out += out_hi
    return out


def resample_nearest(image: np.ndarray, crop: Crop) -> np.ndarray:
    """Nearest-neighbour resampling of a (H, W) map (labels) at the crop's coordinates."""
    ys = np.rint(crop.ys).astype(np.int64)
    xs = np.rint(crop.xs).astype(np.int64)
    return image[ys][:, xs]
