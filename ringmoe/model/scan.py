"""Scanned blocks: a stage's SwinV2 blocks stored as one block whose parameters carry a
leading `layers` axis, and run as one `jax.lax.scan` over pairs of blocks.

Unrolled, every block of every stage is traced and compiled on its own, so compile
time grows with depth (the 14.7B model's 18-block stage dominates its compile).
Scanned, a stage is a loop over its blocks: MaxText and big_vision scan their layers
for the same reason.

SwinV2 alternates plain and shifted windows, so the loop body is a pair: a plain
block, then a shifted one (two blocks traced per stage, whatever the depth; an odd
depth's last block, a plain one, runs after the loop). The alternative, one block per step with
the shift passed as data, traces half as much but pays a select between rolled and
plain activations and masks in every block, and a loop even where the stage has two
blocks: measured on this 2-core CPU (tools.bench step, tiny config), it made the
train step 1.5x slower and compiled no faster, where a pair loop of one step is the
unrolled program.

Stacked parameters keep their per-block logical axis names behind a leading
`LAYERS` axis, which no sharding rule maps to a mesh axis: every device holds every
layer of its shard, exactly as it held every unrolled block.

Outside the model (compression, export, parameter accounting) parameters are read in
the unrolled layout, ('stages', i, 'blocks', j, ...), whichever layout the model
uses: `unrolled_params` and `stacked_param` convert.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import spmd

LAYERS = "layers"   # logical axis of stacked block parameters; unsharded (no rule in LOGICAL_RULES)
_AXIS = {nnx.PARTITION_NAME: LAYERS}


def stack(blocks: Sequence[nnx.Module]) -> nnx.Module:
    """One module of `blocks[0]`'s type holding every block's parameters on a leading axis.

    The blocks are built one by one first, so a scanned model is initialised with the
    same values as the unrolled one (the same keys, in the same order).
    """
    graphdefs, states = zip(*(nnx.split(block) for block in blocks))
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *states)
    return nnx.merge(graphdefs[0], spmd.add_axis(stacked, 0, _AXIS))


def scan_blocks(blocks: nnx.Module, x: jax.Array, modalities: tuple[str, ...], depth: int,
                remat: Callable | None) -> tuple[jax.Array, tuple]:
    """Runs the `depth` stacked `blocks` over x in pairs: plain windows, then shifted.

    `remat`: a rematerialisation policy applied to each block (None: no remat).
    Returns (output, per-block statistics as the unrolled stage returns them).

    A `jax.lax.scan` over the split state rather than `nnx.scan`: the blocks may be
    parameters of an outer trace (the frozen teacher inside the student's gradient in
    distillation), which `nnx.scan` refuses. Blocks hold parameters only, so nothing
    needs carrying back out.
    """
    graphdef, state = nnx.split(blocks)

    def block(x, layer_state, shifted: bool):
        layer = nnx.merge(graphdef, spmd.remove_axis(layer_state, 0, _AXIS))
        return layer(x, modalities, shifted)

    if remat is not None:
        block = jax.checkpoint(block, policy=remat, static_argnums=(2,))

    def pair(x, pair_state):
        stats = []
        for k in (0, 1):
            x, block_stats = block(x, jax.tree.map(lambda a, k=k: a[k], pair_state), bool(k))
            stats.append(block_stats)
        return x, stats

    out = []
    if depth >= 2:
        pairs = jax.tree.map(lambda a: a[:depth - depth % 2].reshape(depth // 2, 2, *a.shape[1:]), state)
        x, stats = jax.lax.scan(pair, x, pairs)
        out = [jax.tree.map(lambda a, i=i: a[i // 2], stats[i % 2]) for i in range(depth - depth % 2)]
    if depth % 2:   # an odd depth ends with a plain block, outside the loop
        x, last = block(x, jax.tree.map(lambda a: a[depth - 1], state), False)
        out.append(last)
    return x, tuple(out)


def _split(path: tuple) -> tuple[tuple, tuple] | None:
    """(('stages', i, 'blocks'), rest) for a stacked block parameter's path, else None."""
    if len(path) > 3 and path[0] == "stages" and path[2] == "blocks" and not isinstance(path[3], int):
        return path[:3], path[3:]
    return None


def _unrolled(flat: Mapping[tuple, object], layers: Callable) -> dict[tuple, object]:
    out = {}
    for path, value in flat.items():
        split = _split(path)
        if split is None:
            out[path] = value
        else:
            for j, layer in enumerate(layers(value)):
                out[(*split[0], j, *split[1])] = layer
    return out


def unrolled_params(flat: Mapping[tuple, np.ndarray]) -> dict[tuple, np.ndarray]:
    """{path: array} with every stacked block parameter split into its blocks' paths."""
    return _unrolled(flat, list)


def unrolled_shapes(flat: Mapping[tuple, tuple]) -> dict[tuple, tuple]:
    """`unrolled_params` for {path: shape}."""
    return _unrolled(flat, lambda shape: [tuple(shape[1:])] * shape[0])


def stacked_param(path: tuple, params: Mapping[tuple, np.ndarray], depth: int) -> np.ndarray | None:
    """The value of a model parameter at `path` from unrolled `params`: the blocks' arrays
    stacked for a stacked path; None where any block's array is missing."""
    split = _split(path)
    if split is None:
        return params.get(path)
    parts = [params.get((*split[0], j, *split[1])) for j in range(depth)]
    return None if any(p is None for p in parts) else np.stack(parts)
