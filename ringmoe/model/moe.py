"""The hierarchical Mixture-of-Experts FFN of every RingMoE block.

    y = modal_experts[m](x) + collaborative_experts(x) + shared_expert(x)

* modal-specialised experts: each modality m has its own router over its own
  experts, so a token of m can only ever reach m's experts (in a batch of several
  modalities, m's images are routed by m's router alone);
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

from ringmoe.model.experts import RoutedExperts, route_by_modality
from ringmoe.model.ffn import FeedForward


class HierarchicalMoE(nnx.Module):
    """Call: (x (B, H, W, D), modalities) -> (y (B, H, W, D), router statistics).

    x holds the images of every modality of one backbone pass, interleaved image by
    image: image b of `modalities[i]` is x[b * len(modalities) + i] (`RingMoE.encode_all`).
    Each image is one routing group. A token of modality m only ever reaches m's modal
    experts: each modality's images go through their own router and experts (vmapped or
    looped over the modality axis, `route_by_modality`, so no expert runs on another
    modality's tokens and no buffer is padded for them); the collaborative and shared
    experts take the whole batch.

    The statistics are per modality, {m: {'modal'|'collaborative': route() statistics
    of m's images}}, one entry per routed group present.
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
        self.modal_experts_loop = bool(moe_config.modal_experts_loop)
        if not (n_modal or n_collab or moe_config.shared_expert):
            raise ValueError("MoE layer with no experts: set modal, collaborative or shared experts")

    def __call__(self, x: jax.Array, modalities: Sequence[str]) -> tuple[jax.Array, dict]:
        if isinstance(modalities, str):
            raise TypeError(f"HierarchicalMoE takes a tuple of modalities, got the string {modalities!r}")
        batch, height, width, dim = x.shape
        count = len(modalities)
        tokens = x.reshape(batch, height * width, dim)
        y = jnp.zeros_like(tokens)
        stats = {m: {} for m in modalities}
        if self.modal_experts is not None:
            out, per_modality = route_by_modality([self.modal_experts[m] for m in modalities], tokens,
                                                  loop=self.modal_experts_loop)
            for m, s in zip(modalities, per_modality):
                stats[m]["modal"] = s
            y = y + out
        if self.collaborative_experts is not None:
            out, per_modality = self.collaborative_experts(tokens, segments=count)
            for m, s in zip(modalities, per_modality):
                stats[m]["collaborative"] = s
            y = y + out
        if self.shared_expert is not None:
            y = y + self.shared_expert(tokens)
        return y.reshape(x.shape), stats


class DenseFFN(nnx.Module):
    """The dense SwinV2 FFN with the MoE layer's call signature (no statistics)."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.ffn = FeedForward(dim, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, modalities: Sequence[str]) -> tuple[jax.Array, dict]:
        return self.ffn(x), {m: {} for m in modalities}


ROUTED_GROUPS = ("modal", "collaborative")


def router_loss(stats_by_modality: Mapping[str, Sequence[dict]], moe_config,
                images: Mapping[str, int] | None = None) -> dict[str, jax.Array]:
    """The router losses of one step, from every modality's statistics (DESIGN.md s.2).

    stats_by_modality[m]: per layer, the statistics of m's images (`HierarchicalMoE`:
    {'modal'|'collaborative': route() statistics}, {} for a dense layer); images[m]: the
    number of m's images (routing groups), default equal.

    The reference adds the modal Switch loss, averaged over modalities, to the
    collaborative one, each with weight `load_balance_weight` (1e-3). Here:

    * a modality's value of a group is its mean over the layers that have the group;
    * modal: the mean over the modalities (each modality has its own router);
    * collaborative: one router sees the whole mixed batch, and its statistics are
      kept per modality. Routing groups are images and `route` averages the Switch
      loss over groups, so the reference's loss over the mixed batch is the mean over
      all its images: the per-modality values averaged with their image counts as
      weights (equal batches: the plain mean over the modalities that reached it);
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
        per_modality = {}   # modality -> {loss name: mean over layers}
        for m, layers in stats_by_modality.items():
            found = [layer[group] for layer in layers if group in layer]
            if found:
                per_modality[m] = {k: jnp.mean(jnp.stack([s[k] for s in found])) for k in ("load_balance", "z_loss")}
        if not per_modality:
            continue
        if group == "modal":
            share = {m: 1.0 / len(per_modality) for m in per_modality}
        else:
            count = {m: float(images.get(m, 1)) for m in per_modality}
            share = {m: c / sum(count.values()) for m, c in count.items()}
        for name, w in (("load_balance", moe_config.load_balance_weight), ("z_loss", moe_config.z_loss_weight)):
            value = sum(share[m] * v[name] for m, v in per_modality.items())
            out[f"{group}_{name}"] = value
            total = total + w * value
    out["total"] = total
    return out
