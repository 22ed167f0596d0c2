"""SimMIM masked reconstruction (Xie et al. 2022), the reference objective.

    L_simmim = sum_{b,i,j,c} W_bij |x_hat_bijc - x_bijc| / (sum_{b,i,j} W_bij) / C

L1 between reconstructed and true (normalised) pixels over the pixels that count
(W = 1 where the pixel's token was masked and the pixel holds data:
`common.loss_weights`), divided by the channel count C so modalities with many
bands do not dominate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ringmoe.objectives.common import masked_mean


def masked_l1(reconstruction: jax.Array, pixels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean |x - x_hat| over pixels with weight 1, per channel.

    reconstruction, pixels (B, H, W, C); weights (B, H, W) in {0, 1} (from
    `common.loss_weights`, optionally times a per-row weight). 0 if no pixel counts;
    a NaN/Inf under a zero weight does not leak in (`masked_mean`).
    """
    return masked_mean(jnp.abs(reconstruction.astype(jnp.float32) - pixels.astype(jnp.float32)), weights)
