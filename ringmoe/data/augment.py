"""Geometric augmentation shared by co-registered modalities: random resized crop and flips.

One crop box and one pair of flips are drawn per record and applied to every
modality, to its validity mask and to the label map, so pixel (i, j) of every
output array sees the same place on the ground: that is what makes cross-modal
objectives and dense labels line up. The crop is expressed as source coordinates
for each output row and column (the box's corner is a whole pixel); flips just
reverse those coordinates, so they cost nothing.

How pixels are resampled depends on the physical unit (`schema.UNITS`), because
an interpolation is a weighted sum z' = sum_k w_k z_k (w_k >= 0, sum w_k = 1),
and what such a sum does to the signal differs:

* reflectance: linear in radiance, so a weighted sum is the reflectance of the
  blended footprint. Bilinear.
* dB (detected SAR): a weighted sum of dB values is a weighted GEOMETRIC mean of
  intensities, below the arithmetic one (about -0.3 dB for 4.4-look speckle) and
  with fewer effective looks than averaging power would give. Bilinear in linear
  power, I' = sum_k w_k I_k, then back to dB: the mean intensity is preserved.
* complex (single-look SAR, Re/Im channels): for independent speckle
  z_k ~ CN(0, sigma^2) the coherent sum has E|z'|^2 = sigma^2 sum_k w_k^2, i.e.
  [(1-w_y)^2 + w_y^2][(1-w_x)^2 + w_x^2] sigma^2 for bilinear weights: 1 on the
  pixel grid, 1/4 (-6 dB) halfway, 4/9 (-3.5 dB) on average over random
  positions, a grid-shaped power pattern that the span/Pauli targets would learn.
  Resampling the power instead would lose the phase the Re/Im channels carry.
  Nearest neighbour (each output pixel IS a source pixel: power, phase and
  single-look statistics exactly preserved; the crop box already starts on a
  whole pixel, so only the resize repeats or skips pixels) is the one choice that
  keeps the complex signal physical, at the price of up to half a pixel of
  misregistration against the other modalities of a resized crop.

A resampled pixel is valid when every source pixel with a positive weight is
valid; labels are resampled by nearest neighbour.
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


def _bilinear(image: np.ndarray, crop: Crop) -> np.ndarray:
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


def _nearest_index(crop: Crop) -> tuple[np.ndarray, np.ndarray]:
    return np.rint(crop.ys).astype(np.int64), np.rint(crop.xs).astype(np.int64)


def _bilinear_valid(valid: np.ndarray, crop: Crop) -> np.ndarray:
    """Valid where every source pixel with a positive bilinear weight is valid."""
    return _bilinear(valid[..., None].astype(np.float32), crop)[..., 0] > 1.0 - 1e-4


def linear_resample(image: np.ndarray, valid: np.ndarray, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (linear unit): bilinear."""
    return _bilinear(image, crop), _bilinear_valid(valid, crop)


def power_resample(image: np.ndarray, valid: np.ndarray, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
    """dB: bilinear in linear power I = 10^(dB/10), then back to dB (mean intensity preserved)."""
    power = np.power(np.float32(10.0), np.asarray(image, np.float32) / np.float32(10.0))
    out = _bilinear(power, crop)
    np.log10(np.maximum(out, np.finfo(np.float32).tiny), out=out)
    out *= np.float32(10.0)
    return out, _bilinear_valid(valid, crop)


def nearest_resample(image: np.ndarray, valid: np.ndarray, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
    """Complex (Re/Im): nearest neighbour, every output pixel a source pixel."""
    ys, xs = _nearest_index(crop)
    return np.asarray(image, np.float32)[ys][:, xs], valid[ys][:, xs]


# Physical unit (schema.UNITS) -> resampling; see the module docstring for why.
RESAMPLERS = {"reflectance": linear_resample, "db": power_resample, "complex": nearest_resample}


def resample(image: np.ndarray, valid: np.ndarray, crop: Crop, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) pixels in `unit` and their (H, W) validity -> the crop's (S, S, C) pixels and (S, S) validity."""
    if unit not in RESAMPLERS:
        raise ValueError(f"no resampling for unit {unit!r}; known: {sorted(RESAMPLERS)}")
    return RESAMPLERS[unit](image, valid, crop)


def resample_nearest(image: np.ndarray, crop: Crop) -> np.ndarray:
    """Nearest-neighbour resampling of a (H, W) map (labels) at the crop's coordinates."""
    ys, xs = _nearest_index(crop)
    return image[ys][:, xs]
