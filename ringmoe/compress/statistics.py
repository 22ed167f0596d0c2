"""Expert statistics over calibration data: how much each expert is used, per layer and modality.

For every block and routed group ('modal', 'collaborative') of a modality's
forward passes, two sums from the routers (`router.route`):

    routed     tokens each expert actually processed (after capacity)
    gate_mass  the sum of the gates of those tokens

Divided by the tokens of the layer, `routed` is the expert's share of the
traffic and `gate_mass` its mean gate per token: the weight with which it adds
into the layer's output on average. Pruning ranks collaborative experts by the
first; the SVD merge weights experts by the second.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe import visualize
from ringmoe.eval.features import image_batches

SUMS = ("routed", "gate_mass")


@functools.partial(nnx.jit, static_argnames=("modality",))
def _router_sums(model, pixels, modality: str):
    stats = model.encode(pixels, modality).router_stats
    return [{group: {k: s[k] for k in SUMS} for group, s in block.items()} for block in stats]


def expert_statistics(model, config, data_dir: str, modalities, *, max_images: int,
                      batch_size: int = 32) -> dict:
    """Routing sums of `model` over up to `max_images` images per modality of `data_dir`.

    Returns a JSON-ready dict: {"modalities": {m: {"images": n, "layers": [per block
    {"tokens": T, group: {"routed": [E], "gate_mass": [E]}}]}}}, blocks in model order.
    """
    out = {}
    for modality in modalities:
        images, totals = 0, None
        for pixels, n, _ in image_batches(config, data_dir, modality, batch_size, pad=False):
            n = min(n, max_images - images)
            sums = jax.device_get(_router_sums(model, jnp.asarray(pixels[:n]), modality))
            totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
            images += n
            if images >= max_images:
                break
        layers = []
        for block, sums in zip(_block_resolutions(model), totals):
            tokens = images * block
            layers.append({"tokens": int(tokens),
                           **{g: {k: np.asarray(v, np.float64).tolist() for k, v in s.items()}
                              for g, s in sums.items()}})
        out[modality] = {"images": images, "layers": layers}
    return {"modalities": out}


def _block_resolutions(model) -> list[int]:
    """Tokens per image of every block, in model order."""
    return [stage.resolution ** 2 for stage in model.stages for _ in range(stage.depth)]


def shares(statistics: dict, modality: str, group: str, key: str) -> np.ndarray:
    """(layers, experts): `key` per expert divided by the layer's tokens (routed share or
    mean gate per token) of one modality's `group` ('modal' | 'collaborative')."""
    layers = statistics["modalities"][modality]["layers"]
    return np.asarray([np.asarray(layer[group][key]) / max(layer["tokens"], 1) for layer in layers])


def save(statistics: dict, directory: str, name: str) -> dict[str, str]:
    """Writes `<name>.json` and `<name>.png` under `directory`; returns their paths. The PNG
    has, per modality and group, two layers x experts panels: 'routed' (share of the
    layer's tokens each expert processed) and 'gate' (its mean gate per token)."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, f"{name}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(statistics, f, indent=1)
    panels = {}
    for modality, entry in statistics["modalities"].items():
        for group in ("modal", "collaborative"):
            if entry["layers"] and group in entry["layers"][0]:
                panels[f"{modality}/{group} routed"] = shares(statistics, modality, group, "routed")
                panels[f"{modality}/{group} gate"] = shares(statistics, modality, group, "gate_mass")
    png_path = visualize.save_expert_load_heatmap(os.path.join(directory, f"{name}.png"), panels)
    return {"json": json_path, "png": png_path}
