"""Collaborative pruning: keep the most-used collaborative experts of every layer.

In each block the collaborative experts are ranked by the tokens they processed
on the modality's calibration data (`statistics`); the top `kept` survive, in
their original order. The router keeps only the survivors' columns, so its
softmax is renormalised over them; with top-1 routing and one survivor the
expert becomes always-on with gate 1.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ringmoe.compress.extraction import Path, build
from ringmoe.compress.statistics import shares
from ringmoe.model.ringmoe import RingMoE

GROUP = "collaborative_experts"


def block_prefixes(params: Mapping[Path, np.ndarray]) -> list[Path]:
    """('stages', i, 'blocks', j) of every block, in model (and router statistics) order."""
    return sorted({path[:4] for path in params if path[0] == "stages" and path[2] == "blocks"})


def kept_indices(statistics: dict, modality: str, kept: int) -> list[list[int]]:
    """Per block, the `kept` collaborative experts that processed most of `modality`'s
    tokens (ties: the lower index), in increasing index order."""
    routed = shares(statistics, modality, "collaborative", "routed")       # (layers, E)
    if kept > routed.shape[1]:
        raise ValueError(f"cannot keep {kept} of {routed.shape[1]} collaborative experts")
    return [sorted(np.argsort(-row, kind="stable")[:kept].tolist()) for row in routed]


def prune_collaborative(params: Mapping[Path, np.ndarray], pruned_config, statistics: dict,
                        modality: str) -> tuple[RingMoE, list[list[int]]]:
    """The model of `pruned_config` with each block's collaborative experts cut to the
    most-used ones. Returns (model, kept expert indices per block)."""
    kept = kept_indices(statistics, modality, pruned_config.model.moe.num_collaborative_experts)
    blocks = block_prefixes(params)
    if len(blocks) != len(kept):
        raise ValueError(f"statistics cover {len(kept)} blocks, the model has {len(blocks)}")
    out = dict(params)
    for prefix, index in zip(blocks, kept):
        group = prefix + ("ffn", GROUP)
        out[group + ("router", "kernel")] = params[group + ("router", "kernel")][:, index]
        if group + ("router", "bias") in params:   # a loss_free_bias router's selection bias
            out[group + ("router", "bias")] = params[group + ("router", "bias")][index]
        for name in ("w_in", "b_in", "w_out", "b_out"):
            out[group + ("experts", name)] = params[group + ("experts", name)][index]
    return build(pruned_config, out), kept
