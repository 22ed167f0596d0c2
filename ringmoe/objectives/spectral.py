"""Multispectral physics objectives (DESIGN.md section 4), on physical reflectance.

* Spectral angle between the reconstructed spectrum x and the true spectrum y
  of a pixel,
      SAM = arccos(<x, y> / (|x| |y|)),
  averaged over masked pixels (radians). It measures the shape of the spectrum
  (material), not its brightness, so it is scale invariant: SAM(a x, y) =
  SAM(x, y) for a > 0. arccos has an infinite derivative at 1 (a perfect
  reconstruction), so it is evaluated with Kahan's equivalent form
      SAM = 2 atan2(|u - v|, |u + v|),  u = x / |x|, v = y / |y|,
  which is exact (0 at x = a y), and |.| is a norm with a zero gradient at 0
  (no NaN). The unit vectors use sqrt(|x|^2 + eps^2), so an all-zero spectrum
  (no data, collapsed reconstruction) gives a finite angle (pi/2) and gradient.

* Spectral-index consistency: normalised differences of band pairs,
      NDVI = (B8 - B4) / (B8 + B4),  NDWI = (B3 - B8) / (B3 + B8),
      NDBI = (B11 - B8) / (B11 + B8),  MNDWI = (B3 - B11) / (B3 + B11),
  the L1 error between the index of the reconstruction and of the target,
  averaged over masked pixels and over the indices computed, with
      N_eps(a, b) = (a - b) / (|a| + |b| + eps).
  |a| + |b| keeps N_eps in [-1, 1] for the negative values a reconstruction
  (or an offset product over dark water) can hold. eps is a reflectance-scale
  floor (config `objectives.index_eps`, 0.05), not a mere guard against 0: the
  true index has |dN/da| = 2|b| / (a + b)^2 ~ 1 / (a + b), 41 per unit
  reflectance over water (NIR 0.01, red 0.025) against 0.8 for vegetation
  (NIR 0.3, red 0.05) and unbounded towards 0, so the term's gradient would
  come from dark pixels, whose index is mostly noise. With the floor
      |dN_eps/da| = (2|b| + eps) / (|a| + |b| + eps)^2 <= 1 / eps
  (largest at a = b = 0; the same for b), so no pixel pulls harder than
  1/eps = 20 per unit reflectance, whatever the reconstruction (14 for that
  water pixel, 0.9 for the vegetation). A reflectance error sigma per band
  moves N_eps by at most sqrt(2) sigma / eps: 0.28 for sigma = 0.01, an
  assumed order of magnitude of surface-reflectance error over dark targets
  (not measured here); eps = 0.01 would allow 1.4, i.e. pure noise.
  N_eps = N (|a| + |b|) / (|a| + |b| + eps) is the true index shrunk towards 0
  where the pixel is dark (vegetation NDVI 0.71 -> 0.63, water -0.43 -> -0.18):
  the floor is the same for reconstruction and target, so the loss is still 0
  exactly when the reconstruction matches, and the shrinkage acts as a
  brightness weight. The alternative, the true index with the error weighted by
  the TARGET's (|a| + |b|) / (|a| + |b| + eps), keeps true index values but
  bounds the gradient only near the target: a dark reconstruction under a bright
  target still gets ~1 / (a + b) (1e6 at 0 with the old eps = 1e-6), and
  weighting by the reconstruction's brightness would reward a darker
  reconstruction. Hence the floor. With eps > 0 an index is no longer exactly
  scale invariant (N_eps(k a, k b) != N_eps(a, b)); eps = 0 gives the plain index.

Bands are found BY WAVELENGTH, not by position: for each Sentinel-2 central
wavelength an index needs (B3 559.8, B4 664.6, B8 832.8, B11 1613.7 nm), the
modality band with the nearest central wavelength is used if it lies within a
tolerance (default 35 nm: Landsat OLI's NIR at 865 nm stands in for B8, the
red edge B5 at 704 nm does not stand in for B4). An index whose bands are absent
is skipped. The band order of the model config may be anything, and a band
subset (wavelength-aware embedding) works the same way.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ringmoe.data.sensors import S2_BANDS
from ringmoe.objectives.common import masked_mean, safe_norm

# Central wavelengths (nm) of the Sentinel-2 bands the indices use (`sensors.S2_BANDS`).
S2_WAVELENGTH_NM = {band: S2_BANDS[band][0] for band in ("B3", "B4", "B8", "B11")}
# index name -> (a, b) of (a - b) / (a + b).
INDICES = {
    "ndvi": ("B8", "B4"),
    "ndwi": ("B3", "B8"),
    "ndbi": ("B11", "B8"),
    "mndwi": ("B3", "B11"),
}


def spectral_angle(x: jax.Array, y: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-pixel angle (radians, in [0, pi]) between spectra x and y (..., C)."""
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    u = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)
    v = y / jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True) + eps * eps)
    return 2.0 * jnp.arctan2(safe_norm(u - v), safe_norm(u + v))


def sam_loss(reconstruction: jax.Array, target: jax.Array, weights: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean spectral angle (radians) over masked pixels; reconstruction/target physical reflectance."""
    return masked_mean(spectral_angle(reconstruction, target, eps), weights)


def find_band(wavelengths: Sequence[float] | np.ndarray, target_nm: float, tolerance_nm: float) -> int | None:
    """Index of the band whose central wavelength is nearest `target_nm`, or None if none lies
    within `tolerance_nm` (or there are no bands). `wavelengths` must be concrete (static)."""
    wl = np.asarray(wavelengths, np.float64).reshape(-1)
    if wl.size == 0:
        return None
    distance = np.abs(wl - target_nm)
    i = int(np.argmin(distance))
    return i if distance[i] <= tolerance_nm else None


def index_bands(wavelengths, names: Sequence[str] = ("ndvi", "ndwi", "ndbi"),
                tolerance_nm: float = 35.0) -> dict[str, tuple[int, int]]:
    """{index name: (channel a, channel b)} for the indices whose two bands are present."""
    out = {}
    for name in names:
        if name not in INDICES:
            raise ValueError(f"unknown spectral index {name!r}; known: {sorted(INDICES)}")
        a, b = (find_band(wavelengths, S2_WAVELENGTH_NM[band], tolerance_nm) for band in INDICES[name])
        if a is not None and b is not None and a != b:
            out[name] = (a, b)
    return out


def normalized_difference(a: jax.Array, b: jax.Array, eps: float = 0.05) -> jax.Array:
    """(a - b) / (|a| + |b| + eps), bounded in [-1, 1], gradient <= 1/eps; eps = 0: the usual index
    for a, b >= 0 (a reflectance-scale eps shrinks dark pixels' index towards 0, see above)."""
    return (a - b) / (jnp.abs(a) + jnp.abs(b) + eps)


def index_loss(reconstruction: jax.Array, target: jax.Array, weights: jax.Array,
               bands: dict[str, tuple[int, int]], eps: float = 0.05) -> jax.Array | None:
    """Masked L1 between reconstructed and true indices, averaged over `bands`
    (from `index_bands`); None when no index is available."""
    if not bands:
        return None
    errors = []
    for a, b in bands.values():
        rec = normalized_difference(reconstruction[..., a], reconstruction[..., b], eps)
        true = normalized_difference(target[..., a], target[..., b], eps)
        errors.append(jnp.abs(rec - true))
    return masked_mean(jnp.stack(errors, axis=-1), weights)
