"""Cross-modal masked prediction for paired (co-registered) records.

Design. Every image of a batch is encoded on its own (attention stays inside an
image, routing groups are images; RingMoE.encode_all), so nothing in the plain
SimMIM loss ties the representation of an optical image to that of the SAR image
of the same place.
For a paired record, with images of modality A and modality B over the same
ground, this term decodes A's pixels from B's encoded features with A's own
SimMIM decoder,
    x_hat_A<-B = decoders[A](features_B),
and takes the SimMIM L1 over the pixels masked in A (those A's own pass could
not see) that hold data in both A and B, divided by A's channel count. The decoder is a per-position linear
map, so the only way to lower the term is for B's stride-32 features to carry
A-decodable content at the same position: a shared, co-registered
representation. That is what the collaborative experts (one router for all
modalities) are there to learn; the modal experts keep what is specific.
The term is averaged over the ordered pairs (A, B), A != B, that have at least
one paired row in the step.

Pairing. Rows i of A and j of B are one place when their `record_index` is
equal and valid (>= 0). The packer puts a paired record's images at the same
row index where it can (packing.py), but "where it can" is not "always", so
the match is computed from the full (B_A, B_B) equality matrix and B's features
are gathered onto A's rows with it (a matmul: fixed shapes, jit-friendly, and
its cost is B_A x B_B x h x w x D at the stride-32 grid, negligible). A row of
A with no partner in B gets weight 0; a record seen twice in B (possible only
with tiny data sets) contributes the mean of its partners' features.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ringmoe.objectives.common import loss_weights
from ringmoe.objectives.simmim import masked_l1


def match_matrix(index_a: jax.Array, index_b: jax.Array) -> jax.Array:
    """(B_A, B_B) float32: 1 where record_index_a[i] == record_index_b[j] >= 0."""
    index_a = jnp.asarray(index_a)[:, None]
    index_b = jnp.asarray(index_b)[None, :]
    return ((index_a == index_b) & (index_a >= 0)).astype(jnp.float32)


def gather_partner_features(features_b: jax.Array, match: jax.Array) -> tuple[jax.Array, jax.Array]:
    """B's rows (B_B, ...) moved onto A's rows -> ((B_A, ...) mean over partners, has_partner (B_A,) float)."""
    count = jnp.sum(match, axis=1)
    selection = match / jnp.maximum(count, 1.0)[:, None]
    gathered = jnp.einsum("ij,j...->i...", selection, features_b.astype(jnp.float32))
    return gathered, (count > 0).astype(jnp.float32)


def pair_loss(decoder, features_b: jax.Array, pixels_a: jax.Array, weights_a: jax.Array,
              index_a: jax.Array, index_b: jax.Array, valid_b: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """(L1 of A's pixels decoded from B's features, whether any row was paired).

    weights_a (B_A, H, W): A's loss weights (masked and valid); valid_b (B_B, H, W) optional:
    a pixel counts only where the partner holds data too (B's features carry nothing else)."""
    match = match_matrix(index_a, index_b)
    features, has_partner = gather_partner_features(features_b, match)
    weights = weights_a * has_partner[:, None, None]
    if valid_b is not None:
        weights = weights * (gather_partner_features(valid_b, match)[0] > 1.0 - 1e-6)
    loss = masked_l1(decoder(features), pixels_a, weights)
    return loss, (jnp.sum(has_partner) > 0).astype(jnp.float32)


def cross_modal_loss(model, outputs: Mapping, batch: Mapping, patch_size: int | None = None) -> jax.Array:
    """Mean over ordered modality pairs (A, B) with paired rows of `pair_loss`; 0 if there are none.

    outputs: RingMoE.__call__ output (uses outputs[B]['encoded'].features);
    batch[m]: 'pixels' (normalised), 'mask' (token mask, True = masked), 'record_index',
    optional 'valid' (pixel holds data).
    """
    patch_size = patch_size or model.patch_size
    modalities = [m for m in outputs if "record_index" in batch[m]]
    total = jnp.zeros((), jnp.float32)
    present = jnp.zeros((), jnp.float32)
    for a in modalities:
        for b in modalities:
            if a == b:
                continue
            loss, has_pair = pair_loss(model.decoders[a], outputs[b]["encoded"].features,
                                       batch[a]["pixels"], loss_weights(batch[a], patch_size),
                                       batch[a]["record_index"], batch[b]["record_index"], batch[b].get("valid"))
            total = total + loss * has_pair
            present = present + has_pair
    return total / jnp.maximum(present, 1.0)
