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

from collections.abc import Mapping, Sequence

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


ROUTED_GROUPS = ("modal", "collaborative")


def router_loss(stats_by_modality: Mapping[str, Sequence[dict]], moe_config,
                images: Mapping[str, int] | None = None) -> dict[str, jax.Array]:
    """The router losses of one step, from every modality's forward pass (DESIGN.md s.2).

    stats_by_modality[m]: per layer, the statistics dict of `HierarchicalMoE` in m's pass
    ({'modal'|'collaborative': route() statistics}, {} for a dense layer); images[m]: the
    images (routing groups) of m's pass, default equal.

    The reference adds the modal Switch loss, averaged over modalities, to the
    collaborative one, each with weight `load_balance_weight` (1e-3). Here:

    * each pass's value of a group is its mean over the layers that have the group;
    * modal: the mean over the modalities (each modality has its own router);
    * collaborative: one router sees the whole mixed batch, but each modality runs
      through the backbone in its own pass, so its statistics exist per pass. Routing
      groups are images and `route` averages the Switch loss over groups, so the
      reference's loss over the mixed batch is the mean over all its images: the
      per-pass values averaged with the passes' image counts as weights (equal
      batches: the plain mean over the modalities that reached it);
    * z-loss (`z_loss_weight`) the same way, per group.

        total = load_balance_weight * (modal_load_balance + collaborative_load_balance)
              + z_loss_weight * (modal_z_loss + collaborative_z_loss)

    so each group carries the full weight whether the model has one group (the
    modal-only / collaborative-only ablations) or both.

    Returns '{group}_load_balance' and '{group}_z_loss' (unweighted) for each group the
    model has, and 'total' (weighted; 0 for a dense model).
    """
    images = images or {}
    total = jnp.zeros((), jnp.float32)
    out: dict[str, jax.Array] = {}
    for group in ROUTED_GROUPS:
        per_pass = {}   # modality -> {loss name: mean over layers}
        for m, layers in stats_by_modality.items():
            found = [layer[group] for layer in layers if group in layer]
            if found:
                per_pass[m] = {k: jnp.mean(jnp.stack([s[k] for s in found])) for k in ("load_balance", "z_loss")}
        if not per_pass:
            continue
        if group == "modal":
            share = {m: 1.0 / len(per_pass) for m in per_pass}
        else:
            count = {m: float(images.get(m, 1)) for m in per_pass}
            share = {m: c / sum(count.values()) for m, c in count.items()}
        for name, w in (("load_balance", moe_config.load_balance_weight), ("z_loss", moe_config.z_loss_weight)):
            value = sum(share[m] * v[name] for m, v in per_pass.items())
            out[f"{group}_{name}"] = value
            total = total + w * value
    out["total"] = total
    return out
