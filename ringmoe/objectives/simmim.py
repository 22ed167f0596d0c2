"""SimMIM masked reconstruction (Xie et al. 2022), the reference objective.

    L_simmim = sum_{b,i,j,c} M_bij |x_hat_bijc - x_bijc| / (sum_{b,i,j} M_bij) / C

L1 between reconstructed and true (normalised) pixels over masked pixels only
(M = 1 where the pixel's token was masked), divided by the channel count C so
modalities with many bands do not dominate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def upsample_mask(mask: jax.Array, patch_size: int) -> jax.Array:
    """Patch-level mask (B, h, w) -> pixel-level (B, h*p, w*p, 1) float."""
    pixel_mask = jnp.repeat(jnp.repeat(mask, patch_size, axis=1), patch_size, axis=2)
    return pixel_mask[..., None].astype(jnp.float32)


def masked_l1(reconstruction: jax.Array, pixels: jax.Array, mask: jax.Array, patch_size: int,
              row_weights: jax.Array | None = None) -> jax.Array:
    """Mean |x - x_hat| over masked pixels, per channel.

    `row_weights` (B,) in {0, 1} optionally keeps only some rows (the cross-modal
    term uses it for rows that have a partner); the mean is then over the masked
    pixels of the kept rows, and 0 if there are none.
    """
    pixel_mask = upsample_mask(mask, patch_size)
    if row_weights is not None:
        pixel_mask = pixel_mask * row_weights.astype(jnp.float32)[:, None, None, None]
    error = jnp.abs(reconstruction.astype(jnp.float32) - pixels.astype(jnp.float32)) * pixel_mask
    return jnp.sum(error) / (jnp.sum(pixel_mask) + 1e-5) / pixels.shape[-1]


def simmim_loss(reconstruction: jax.Array, pixels: jax.Array, mask: jax.Array, patch_size: int) -> jax.Array:
    """The reference SimMIM term of one modality: `masked_l1` in normalised pixel units.

    reconstruction, pixels (B, H, W, C) normalised per band; mask (B, H/p, W/p) bool,
    True = masked.
    """
    return masked_l1(reconstruction, pixels, mask, patch_size)
