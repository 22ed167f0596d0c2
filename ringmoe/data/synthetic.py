"""Synthetic, physically grounded multi-modal scenes: something real to pretrain on.

Every record is one place: a land-cover map (warped Voronoi fields, so classes
form contiguous patches with irregular borders) seen by four co-registered
sensors that all derive from the same per-pixel physical state:

* multispectral: Sentinel-2 L2A surface reflectance at the 12 L2A bands, from
  per-class spectra (water dark with NIR ~0.01, vegetation with a red edge,
  urban flat and bright, soil rising with wavelength), varied per patch (brightness,
  soil fraction under vegetation, water turbidity) and per pixel (texture, noise);
  20 m / 60 m bands are block-averaged to their native GSD, as in a resampled product;
* cropland and grassland, the pair land-cover maps confuse most, are the same
  green herbaceous canopy over the same soil with the same cover fraction
  distribution, so no per-band statistic (mean, std, histogram) tells them
  apart: only the arrangement does. Cropland is parallel strips of crop and
  bare soil (period 40-80 m at a random orientation, as strip fields look at
  10 m); grassland is the same cover in isotropic clumps of the same period, as
  patterned vegetation looks (`canopy_cover`).
  Every sensor sees the same cover map (reflectance and backscatter mix by it);
* optical: true colour B4, B3, B2 with a linear stretch (x3), clipped to [0, 1];
* sar_l2: Sentinel-1 VV / VH sigma0 in dB, per-class backscatter varied per
  patch, times multiplicative Gamma(L, 1/L) speckle in linear power (L looks);
* sar_l1: single-look complex quad-pol (HH, HV, VH, VV as Re/Im) drawn as
  circular-Gaussian Pauli components (surface, double bounce, volume) whose
  expected powers give E|S_VV|^2 = E|S_HH|^2 = sigma0_VV and E|S_HV|^2 = sigma0_VH,
  so E[span] = 2 (sigma0_VV + sigma0_VH); S_VH = S_HV (reciprocity).

Everything comes from `np.random.default_rng([seed, index])`, so record i is the
same whatever the number of records, and a data set is reproducible from its seed.
Paired records carry all four modalities; an unpaired record carries one, chosen
from the same generator. Class ids start at 1 (0 = unlabelled) and follow CLASSES.
DESIGN.md section 4 gives the sensor physics.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ringmoe.data import sensors
from ringmoe.data.schema import MODALITIES, ModalityImage, Record

CLASSES = ("water", "forest", "cropland", "grassland", "shrubland", "wetland", "urban", "bare_soil")
# Surface reflectance at the Sentinel-2 L2A bands
#            B1     B2     B3     B4     B5     B6     B7     B8     B8A    B9     B11    B12
SPECTRA = np.array([
    [0.050, 0.048, 0.040, 0.025, 0.020, 0.015, 0.012, 0.010, 0.009, 0.008, 0.005, 0.004],  # water
    [0.020, 0.025, 0.050, 0.025, 0.070, 0.220, 0.280, 0.300, 0.310, 0.280, 0.140, 0.060],  # forest
    [0.030, 0.040, 0.080, 0.045, 0.120, 0.300, 0.370, 0.390, 0.400, 0.360, 0.210, 0.100],  # cropland canopy
    [0.030, 0.040, 0.080, 0.045, 0.120, 0.300, 0.370, 0.390, 0.400, 0.360, 0.210, 0.100],  # grassland canopy
    [0.050, 0.060, 0.090, 0.100, 0.140, 0.190, 0.220, 0.240, 0.250, 0.230, 0.300, 0.200],  # shrubland
    [0.035, 0.040, 0.060, 0.040, 0.070, 0.140, 0.170, 0.180, 0.180, 0.160, 0.090, 0.045],  # wetland
    [0.120, 0.130, 0.140, 0.150, 0.160, 0.170, 0.180, 0.190, 0.190, 0.180, 0.220, 0.200],  # urban
    [0.100, 0.120, 0.160, 0.210, 0.240, 0.260, 0.280, 0.290, 0.300, 0.300, 0.360, 0.320],  # bare soil
], dtype=np.float64)
LABEL_NAMES = ("unlabelled",) + CLASSES  # label_names[i] names class id i
VEGETATED = np.array([False, True, True, True, True, True, False, False])
# Herbaceous classes: canopy over soil by a per-pixel cover map; spectra and backscatter identical.
CROPLAND, GRASSLAND, BARE_SOIL = (CLASSES.index(c) for c in ("cropland", "grassland", "bare_soil"))
COVER_FRACTION = (0.35, 0.85)   # canopy cover of a herbaceous patch, uniform in this range
PATCH_PERIOD_PX = (4.0, 8.0)    # spatial period of strips and clumps (canopy + soil), 40-80 m at 10 m
# Native ground sampling distance (m) of each L2A band; coarser bands are block-averaged.
BAND_GSD_M = (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 20, 20)
# Sentinel-1 C-band sigma0 (dB) per class: VV, VH.
SIGMA0_DB = np.array([
    [-22.0, -28.0],  # water: specular, very dark
    [-8.0, -14.0],   # forest: volume scattering, high VH
    [-10.5, -17.0],  # cropland canopy (mixed with bare soil by the cover map)
    [-10.5, -17.0],  # grassland canopy
    [-10.0, -16.5],  # shrubland
    [-9.0, -18.0],   # wetland: double bounce off flooded stems
    [-4.0, -11.0],   # urban: double bounce, bright
    [-14.0, -23.0],  # bare soil: rough-surface scattering
])
# Share of the co-polarised power in the Pauli double-bounce component |S_HH - S_VV|^2 / 2.
DOUBLE_BOUNCE = np.array([0.05, 0.25, 0.12, 0.12, 0.15, 0.45, 0.65, 0.10])
CLASS_PRIOR = np.array([0.12, 0.18, 0.18, 0.14, 0.10, 0.06, 0.12, 0.10])
DEFAULT_LOOKS = 4.4        # equivalent number of looks of Sentinel-1 IW GRD
RGB_GAIN = 3.0             # true-colour stretch: reflectance 0.33 -> 1.0
BAND_ORDER = {"rgb": (3, 2, 1)}  # B4, B3, B2 in SPECTRA columns


def smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A zero-mean, unit-std Gaussian random field (size, size) with correlation length `scale` px."""
    noise = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    kernel = np.exp(-2.0 * (np.pi * scale) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    field = np.fft.ifft2(np.fft.fft2(noise) * kernel).real
    return (field - field.mean()) / (field.std() + 1e-12)


def block_average(image: np.ndarray, block: int) -> np.ndarray:
    """Averages (H, W) over block x block cells and repeats back: a coarse band on a 10 m grid."""
    if block <= 1:
        return image
    h, w = image.shape
    ph, pw = -h % block, -w % block
    padded = np.pad(image, ((0, ph), (0, pw)), mode="edge")
    cells = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block).mean(axis=(1, 3))
    return np.repeat(np.repeat(cells, block, 0), block, 1)[:h, :w]


def land_cover(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (segment id per pixel (size, size), class index 0..K-1 per segment).

    Segments are Voronoi cells of random seeds under a smooth random warp; each
    scene draws its own class proportions from a Dirichlet around CLASS_PRIOR, so
    most scenes have a dominant class (a meaningful scene label)."""
    n = max(6, int(round((size / 32) ** 2 * rng.uniform(0.8, 2.0))))
    seeds = rng.uniform(0, size, (n, 2))
    proportions = rng.dirichlet(1.5 * len(CLASSES) * CLASS_PRIOR * rng.uniform(0.1, 0.4))
    seed_class = rng.choice(len(CLASSES), size=n, p=proportions)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    amp = size / 10
    yy += amp * smooth_field(rng, size, size / 8)
    xx += amp * smooth_field(rng, size, size / 8)
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return np.argmin(d, axis=-1).astype(np.int32), seed_class


def ring_field(rng: np.random.Generator, size: int, period: float, width: float = 0.15) -> np.ndarray:
    """A zero-mean Gaussian random field (size, size) whose power lies on a ring |f| = 1 / period
    (relative width `width`): isotropic, with one dominant spatial period, like patterned vegetation."""
    noise = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    radius = np.hypot(f[:, None], f[None, :])
    kernel = np.exp(-0.5 * ((radius * period - 1.0) / width) ** 2)
    return np.fft.ifft2(np.fft.fft2(noise) * kernel).real


def canopy_cover(rng: np.random.Generator, segments: np.ndarray, seed_class: np.ndarray) -> np.ndarray:
    """Green canopy cover (H, W) in {0, 1}: 1 outside herbaceous patches.

    A herbaceous patch draws its cover fraction f from COVER_FRACTION and its
    period from PATCH_PERIOD_PX. Cropland is strips: the pixel's phase along a
    random direction, in units of the period, is canopy where its fractional part
    is below f. Grassland is clumps: a `ring_field` of the same period, mapped
    through its ranks to uniform [0, 1), is canopy below f. Both are canopy with
    probability f at the same spatial period, so they share every per-band moment
    at every band's resolution; only the orientation of the pattern differs."""
    n, size = len(seed_class), segments.shape[0]
    fraction = rng.uniform(*COVER_FRACTION, n)
    period = rng.uniform(*PATCH_PERIOD_PX, n)
    theta = rng.uniform(0.0, np.pi, n)
    phase = rng.uniform(0.0, 1.0, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cover = np.ones((size, size))
    for k in range(n):
        inside = segments == k
        if seed_class[k] == CROPLAND:
            along = (xx * np.cos(theta[k]) + yy * np.sin(theta[k])) / period[k] + phase[k]
            cover[inside] = (along[inside] % 1.0) < fraction[k]
        elif seed_class[k] == GRASSLAND:
            field = ring_field(rng, size, period[k])[inside]
            cover[inside] = np.argsort(np.argsort(field)) < fraction[k] * field.size
    return cover


def reflectance(rng: np.random.Generator, segments: np.ndarray, seed_class: np.ndarray,
                cover: np.ndarray) -> np.ndarray:
    """Surface reflectance (H, W, 12) at the L2A bands; see the module docstring."""
    n, size = len(seed_class), segments.shape[0]
    brightness = rng.lognormal(0.0, 0.08, n)
    herbaceous = (seed_class == CROPLAND) | (seed_class == GRASSLAND)
    soil_frac = np.where(VEGETATED[seed_class] & ~herbaceous, rng.uniform(0.0, 0.3, n), 0.0)
    turbidity = np.where(seed_class == 0, rng.uniform(0.0, 1.0, n), 0.0)
    spectra = (1 - soil_frac[:, None]) * SPECTRA[seed_class] + soil_frac[:, None] * SPECTRA[BARE_SOIL]
    sediment = np.array([0.01, 0.015, 0.03, 0.03, 0.02, 0.005, 0, 0, 0, 0, 0, 0])
    spectra = brightness[:, None] * spectra + turbidity[:, None] * sediment
    soil = brightness[:, None] * SPECTRA[BARE_SOIL]
    refl = cover[..., None] * spectra[segments] + (1.0 - cover[..., None]) * soil[segments]   # (H, W, 12)
    refl *= (1.0 + 0.05 * smooth_field(rng, size, 2.0))[..., None]  # sub-patch texture
    refl += rng.normal(0.0, 0.003, refl.shape)                     # sensor noise
    for b, gsd in enumerate(BAND_GSD_M):
        refl[..., b] = block_average(refl[..., b], gsd // 10)
    return np.clip(refl, 1e-4, 1.0).astype(np.float32)


def rgb_from_reflectance(refl: np.ndarray) -> np.ndarray:
    """True colour (B4, B3, B2) with a linear stretch, in [0, 1]."""
    return np.clip(refl[..., BAND_ORDER["rgb"]] * RGB_GAIN, 0.0, 1.0).astype(np.float32)


def sigma0(rng: np.random.Generator, segments: np.ndarray, seed_class: np.ndarray,
           cover: np.ndarray) -> np.ndarray:
    """Speckle-free backscatter (H, W, 2) = VV, VH in linear power, per class plus patch and texture terms.

    Herbaceous pixels mix canopy and bare-soil power by the cover map (a sum of
    linear powers, not of dB)."""
    n, size = len(seed_class), segments.shape[0]
    patch_db = rng.normal(0.0, 1.5, n)                 # moisture / roughness / wind per patch
    vh_extra = rng.normal(0.0, 0.5, n)
    offset = np.stack([patch_db, patch_db + vh_extra], -1)
    canopy = 10.0 ** ((SIGMA0_DB[seed_class] + offset) / 10.0)
    soil = 10.0 ** ((SIGMA0_DB[BARE_SOIL] + offset) / 10.0)
    power = cover[..., None] * canopy[segments] + (1.0 - cover[..., None]) * soil[segments]
    return power * 10.0 ** (0.08 * smooth_field(rng, size, 3.0)[..., None])


def speckle(rng: np.random.Generator, power: np.ndarray, looks: float) -> np.ndarray:
    """Multiplicative Gamma(L, 1/L) speckle (mean 1, variance 1/L) on linear power."""
    return power * rng.gamma(looks, 1.0 / looks, power.shape)


def to_db(power: np.ndarray) -> np.ndarray:
    return (10.0 * np.log10(np.maximum(power, 1e-10))).astype(np.float32)


def quadpol(rng: np.random.Generator, power: np.ndarray, double_bounce: np.ndarray) -> np.ndarray:
    """Single-look complex scattering matrix (H, W, 8): Re/Im of HH, HV, VH, VV.

    power: (H, W, 2) speckle-free sigma0 VV, VH (linear); double_bounce: (H, W) share
    of the co-pol power in the Pauli k2 = (HH - VV)/sqrt(2) term. The Pauli
    components k1 (surface), k2 (double bounce), k3 = sqrt(2) HV (volume) are
    independent circular Gaussians with powers 2 VV (1 - f), 2 VV f and 2 VH."""
    vv, vh = power[..., 0], power[..., 1]
    def cgauss(p):  # E|z|^2 = p
        return np.sqrt(p / 2.0) * (rng.standard_normal(p.shape) + 1j * rng.standard_normal(p.shape))
    k1 = cgauss(2.0 * vv * (1.0 - double_bounce))
    k2 = cgauss(2.0 * vv * double_bounce)
    k3 = cgauss(2.0 * vh)
    hh, vvc, hv = (k1 + k2) / np.sqrt(2.0), (k1 - k2) / np.sqrt(2.0), k3 / np.sqrt(2.0)
    s = np.stack([hh, hv, hv, vvc], -1)
    return np.stack([s.real, s.imag], -1).reshape(*s.shape[:-1], 8).astype(np.float32)


def span(slc: np.ndarray) -> np.ndarray:
    """Total polarimetric power sum |S_pq|^2 of an (..., 8) Re/Im quad-pol array."""
    return np.sum(slc.astype(np.float64) ** 2, axis=-1)


def make_record(seed: int, index: int, size: int, *, paired_fraction: float = 1.0,
                labeled: bool = True, looks: float = DEFAULT_LOOKS, captions: int = 0) -> Record:
    """Record `index` of the data set drawn from `seed` (independent of the set's length). With
    `captions` > 0 (and labels) it also carries that many grounded captions and the visual
    questions of its label map (`grounding.annotate`, drawn from their own generator: the
    scene is the same with or without text)."""
    rng = np.random.default_rng([seed, index])
    paired = rng.uniform() < paired_fraction
    only = MODALITIES[rng.integers(len(MODALITIES))]
    wanted = MODALITIES if paired else (only,)
    segments, seed_class = land_cover(rng, size)
    classes = seed_class[segments]
    # Draw every field in a fixed order so the scene does not depend on which modalities are kept.
    cover = canopy_cover(rng, segments, seed_class)
    refl = reflectance(rng, segments, seed_class, cover)
    power = sigma0(rng, segments, seed_class, cover)
    l2 = to_db(speckle(rng, power, looks))
    l1 = quadpol(rng, power, DOUBLE_BOUNCE[classes])
    pixels = {"optical": rgb_from_reflectance(refl), "multispectral": refl, "sar_l2": l2, "sar_l1": l1}
    modalities = {m: _image(m, pixels[m]) for m in wanted}
    label_map = scene_label = None
    if labeled:
        label_map = (classes + 1).astype(np.int32)
        scene_label = int(np.bincount(label_map.ravel(), minlength=len(CLASSES) + 1)[1:].argmax() + 1)
    record = Record(sample_id=f"synthetic-{seed}-{index:08d}", modalities=modalities,
                    label_map=label_map, scene_label=scene_label, source="synthetic")
    if captions and labeled:
        from ringmoe.data import grounding
        record = grounding.annotate(record, LABEL_NAMES, np.random.default_rng([seed, index, 1]), captions)
    return record


def generate(num_examples: int, size: int, seed: int, **kwargs) -> Iterator[Record]:
    """Records 0..num_examples-1 of the data set drawn from `seed` (kwargs: see make_record)."""
    for i in range(num_examples):
        yield make_record(seed, i, size, **kwargs)


def write(out_dir: str, num_examples: int, size: int, seed: int, *, shard_size: int = 1024, **kwargs) -> dict:
    """Generates and shards a data set; returns the manifest from shards.write_shards."""
    from ringmoe.data import shards
    return shards.write_shards(generate(num_examples, size, seed, **kwargs), out_dir, shard_size=shard_size,
                               source=f"synthetic(seed={seed})",
                               label_names=LABEL_NAMES if kwargs.get("labeled", True) else ())


_PRESET = {"optical": "rgb", "multispectral": "sentinel2_l2a", "sar_l2": "sentinel1_db", "sar_l1": "sar_l1_quadpol"}


def _image(modality: str, pixels: np.ndarray) -> ModalityImage:
    """Wraps pixels with the band metadata of the sensor preset they simulate; all on a 10 m grid."""
    preset = sensors.get_preset(_PRESET[modality])
    assert preset.modality == modality and len(preset.bands) == pixels.shape[-1]
    return ModalityImage(modality=modality, pixels=pixels, bands=preset.bands, sensor=preset.name, gsd_m=10.0)
