"""Loss-free load balancing: moving each `loss_free_bias` router's selection bias.

After every applied update the trainer calls `balance_routers` with the step's router
statistics: each expert's bias moves by `rate` towards balance, up when the expert was
chosen less than its router's mean and down when more (`router.update_bias`; Wang et
al. 2024, DeepSeek-V3 uses rate 1e-3). The bias only decides which experts a token
goes to, never the gates, and gets no gradient: balance is kept without an auxiliary
loss pulling on the routers' weights.

The load a router is balanced on is the one it saw this step: a modal router's own
modality's images; the collaborative router's every image, the per-modality loads
weighted by image counts (as `moe.router_loss` weighs them).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from ringmoe.model.moe import HierarchicalMoE
from ringmoe.model.router import update_bias


def balance_routers(model, router_stats: Mapping[str, Sequence[dict]], images: Mapping[str, int],
                    rate: float) -> None:
    """Updates, in place, the selection bias of every router of `model` that has one.

    router_stats[m]: Encoded.router_stats of m's images (per block, in model order);
    images[m]: how many images of m the step had.
    """
    first = 0
    for stage in model.stages:
        blocks = range(first, first + stage.depth)
        first += stage.depth
        ffn = stage.blocks.ffn if stage.scanned else stage.blocks[0].ffn
        if not isinstance(ffn, HierarchicalMoE):
            continue

        def load(group: str, modalities: Sequence[str]) -> jnp.ndarray | None:
            """(depth, E) load of `group` per block, image-weighted over `modalities`."""
            present = [m for m in modalities if m in router_stats]
            if not present:
                return None
            total = sum(images[m] for m in present)
            return sum(jnp.stack([router_stats[m][k][group]["load"] for k in blocks]) * (images[m] / total)
                       for m in present)

        def update(routers, block_load):
            if block_load is None or routers[0].bias is None:
                return
            if stage.scanned:        # one router, its bias stacked (depth, E)
                routers[0].bias[...] = update_bias(routers[0].bias[...], block_load, rate)
            else:
                for router, row in zip(routers, block_load):
                    router.bias[...] = update_bias(router.bias[...], row, rate)

        ffns = [stage.blocks.ffn] if stage.scanned else [block.ffn for block in stage.blocks]
        if ffn.modal_experts is not None:
            for m in ffn.modal_experts:
                update([f.modal_experts[m].router for f in ffns], load("modal", [m]))
        if ffn.collaborative_experts is not None:
            update([f.collaborative_experts.router for f in ffns], load("collaborative", list(router_stats)))
