"""Shared pieces of the physics objectives: units and masked averages.

The pipeline hands every modality normalised per band with the data set's
manifest statistics, z = (x - mean) / std. Physical quantities (reflectance,
dB backscatter, complex scattering amplitudes) are recovered with
x = z * std + mean, for the reconstruction and the target alike, before any
physics formula is applied; `norm_stats[m] = {"mean": (C,), "std": (C,)}`
(optionally "bands": the C band names, which the SAR terms use to find their
polarisation channels).

All masked averages run over pixels whose SimMIM token is masked (the model
sees the others, so reconstructing them teaches nothing; Xie et al. 2022) and
that hold data (the batch's "valid"; a no-data pixel has no target: a SAR-L1
0 + 0j fill would make a span target 30 dB below the mean). `loss_weights`
makes that weight map; every term averages with it.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def denormalize(z: jax.Array, stats: Mapping) -> jax.Array:
    """Normalised pixels (..., C) -> physical units: x = z * std + mean (per band, float32)."""
    mean = jnp.asarray(stats["mean"], jnp.float32)
    std = jnp.asarray(stats["std"], jnp.float32)
    if mean.shape != (z.shape[-1],) or std.shape != (z.shape[-1],):
        raise ValueError(f"norm stats have mean {mean.shape} / std {std.shape} but the pixels have "
                         f"{z.shape[-1]} channels")
    return z.astype(jnp.float32) * std + mean


def pixel_mask(mask: jax.Array, patch_size: int) -> jax.Array:
    """Token mask (B, h, w) bool, True = masked -> pixel weights (B, h*p, w*p) float32."""
    return jnp.repeat(jnp.repeat(mask, patch_size, axis=1), patch_size, axis=2).astype(jnp.float32)


def loss_weights(inputs: Mapping, patch_size: int) -> jax.Array:
    """(B, H, W) float32 weights of one modality's loss terms: 1 where the pixel's token is
    masked and the pixel holds data (inputs 'mask' (B, h, w), optional 'valid' (B, H, W))."""
    weights = pixel_mask(inputs["mask"], patch_size)
    if inputs.get("valid") is not None:
        weights = weights * inputs["valid"].astype(jnp.float32)
    return weights


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of `values` over pixels with weight 1.

    values (B, H, W) or (B, H, W, K) (then also averaged over K); weights (B, H, W)
    in {0, 1}. An all-zero mask gives 0, not NaN (the 1e-5 in the denominator).
    """
    values = values.astype(jnp.float32)
    k = 1
    if values.ndim == weights.ndim + 1:
        k = values.shape[-1]
        values = jnp.sum(values, axis=-1)
    # where(), not a product: an inf/NaN on an unmasked pixel must not leak in.
    total = jnp.sum(jnp.where(weights > 0, values * weights, 0.0))
    return total / (jnp.sum(weights) + 1e-5) / k


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """Euclidean norm with a zero (not NaN) gradient at x = 0 (the double-where trick)."""
    sq = jnp.sum(x * x, axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
