"""The hierarchical Mixture-of-Experts FFN of every RingMoE block.

    y = modal_experts[m](x) + collaborative_experts(x) + shared_expert(x)

* modal-specialised experts: each modality m has its own router over its own
  experts, so a token of m can only ever reach m's experts;
* collaborative experts: one router shared by all modalities;
* shared expert: a dense FFN that every token passes through.

A group with zero experts is left out (the modal-only and collaborative-only
ablations); with MoE disabled the block uses a plain `FeedForward` instead.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.model.experts import RoutedExperts
from ringmoe.model.ffn import FeedForward


class HierarchicalMoE(nnx.Module):
    """Call: (x (B, H, W, D), modality) -> (y (B, H, W, D), router statistics).

    The statistics dict has one entry per routed group present ('modal',
    'collaborative'), each the `route` statistics of that router for this call.
    Each image is one routing group.
    """

    def __init__(self, dim: int, hidden: int, modalities: Sequence[str], moe_config, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        def routed(n):
            return RoutedExperts(n, dim, hidden, moe_config, dtype=dtype, rngs=rngs)

        n_modal, n_collab = moe_config.num_modal_experts, moe_config.num_collaborative_experts
        self.modal_experts = nnx.Dict({m: routed(n_modal) for m in modalities}) if n_modal else None
        self.collaborative_experts = routed(n_collab) if n_collab else None
        self.shared_expert = (FeedForward(dim, hidden, dtype=dtype, rngs=rngs)
                              if moe_config.shared_expert else None)
        if not (n_modal or n_collab or moe_config.shared_expert):
            raise ValueError("MoE layer with no experts: set modal, collaborative or shared experts")

    def __call__(self, x: jax.Array, modality: str) -> tuple[jax.Array, dict]:
        batch, height, width, dim = x.shape
        tokens = x.reshape(batch, height * width, dim)
        y = jnp.zeros_like(tokens)
        stats = {}
        if self.modal_experts is not None:
            out, stats["modal"] = self.modal_experts[modality](tokens)
            y = y + out
        if self.collaborative_experts is not None:
            out, stats["collaborative"] = self.collaborative_experts(tokens)
            y = y + out
        if self.shared_expert is not None:
            y = y + self.shared_expert(tokens)
        return y.reshape(x.shape), stats


class DenseFFN(nnx.Module):
    """The dense SwinV2 FFN with the MoE layer's call signature (no statistics)."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.ffn = FeedForward(dim, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, modality: str) -> tuple[jax.Array, dict]:
        return self.ffn(x), {}


def router_loss(stats_per_layer: Sequence[dict], moe_config) -> dict[str, jax.Array]:
    """Weighted router losses of one modality's forward pass, averaged over layers.

    Returns {'load_balance', 'z_loss', 'total'} where total applies the configured
    weights. (The trainer averages the modal terms over modalities, as in the
    reference, by averaging these per-modality results.)
    """
    terms = {"load_balance": [], "z_loss": []}
    for layer in stats_per_layer:
        for group in layer.values():
            for name in terms:
                terms[name].append(group[name])
    out = {name: (jnp.mean(jnp.stack(v)) if v else jnp.zeros((), jnp.float32)) for name, v in terms.items()}
    out["total"] = (moe_config.load_balance_weight * out["load_balance"]
                    + moe_config.z_loss_weight * out["z_loss"])
    return out
