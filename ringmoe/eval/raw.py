"""The raw-input baseline: what a probe gets from the bands themselves, without any encoder.

The first question a remote-sensing scientist asks of a foundation model is
whether its features beat the pixels: for scene classification a linear probe on
each record's per-band means and standard deviations, for segmentation a
per-pixel linear head on the bands. Both run through the same probes (same
split, standardisation, head and optimisation) as the encoder's features, so the
comparison is fair. Single-look complex SAR (sar_l1: Re/Im pairs) is reduced to
log10 power per polarisation first: its Re/Im average to zero whatever the
backscatter, and the scene lives in the power, which a remote-sensing baseline
(and any speckle statistic) works with in log form.
"""
from __future__ import annotations

import numpy as np

from ringmoe.data.hardness import log_power

COMPLEX_MODALITIES = ("sar_l1",)   # Re/Im channel pairs: the baseline works on log10 power


def raw_bands(pixels: np.ndarray, modality: str) -> np.ndarray:
    """(N, H, W, C) pixels in their physical units -> the baseline's per-pixel bands (N, H, W, C').

    C' = C, or C / 2 log10 powers for a complex modality."""
    pixels = np.asarray(pixels)
    if modality in COMPLEX_MODALITIES:
        return log_power(pixels).astype(np.float32)
    return pixels.astype(np.float32)


def band_statistics(pixels: np.ndarray, modality: str) -> np.ndarray:
    """(N, H, W, C) pixels -> (N, 2 C') per-band spatial means, then standard deviations, of `raw_bands`."""
    bands = raw_bands(pixels, modality).astype(np.float64)
    return np.concatenate([bands.mean((1, 2)), bands.std((1, 2))], -1).astype(np.float32)
