"""SimMIM masked reconstruction (Xie et al. 2022), the reference objective.

L1 between reconstructed and true pixels over masked pixels only, divided by
the channel count so modalities with many bands do not dominate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def upsample_mask(mask: jax.Array, patch_size: int) -> jax.Array:
    """Patch-level mask (B, h, w) -> pixel-level (B, h*p, w*p, 1) float."""
    pixel_mask = jnp.repeat(jnp.repeat(mask, patch_size, axis=1), patch_size, axis=2)
    return pixel_mask[..., None].astype(jnp.float32)


def masked_l1(reconstruction: jax.Array, pixels: jax.Array, mask: jax.Array, patch_size: int) -> jax.Array:
    """Mean |x - x_hat| over masked pixels, per channel."""
    pixel_mask = upsample_mask(mask, patch_size)
    error = jnp.abs(reconstruction.astype(jnp.float32) - pixels.astype(jnp.float32)) * pixel_mask
    return jnp.sum(error) / (jnp.sum(pixel_mask) + 1e-5) / pixels.shape[-1]
