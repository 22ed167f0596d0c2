"""Modality extraction, and the one way every compression stage builds its model.

A stage's model is `build(stage_config, params)`: the stage's model is laid out
abstractly from its config, and each of its parameters is taken from `params`
(a flat {path: array} of the previous stage, plus the arrays the stage
replaced). Extraction replaces nothing: the one-modality model's paths are a
subset of the full model's (its patch embedding, decoder(s) and modal experts,
the collaborative and shared experts, attention, merging and norms), so every
other modality's parts are simply left behind.

Parameters are handled as host numpy arrays: a stage transform is a few gathers
and SVDs, and for the 14.7B model it needs the host memory of one float32 copy
(59 GB), not an accelerator.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from ringmoe.model.ringmoe import ParamKeys, RingMoE
from ringmoe.model.scan import stacked_param, unrolled_params

Path = tuple


def flat_params(model: RingMoE) -> dict[Path, np.ndarray]:
    """{path: host array} of every parameter of `model`, blocks unrolled (('stages', i, 'blocks',
    j, ...) whether or not the model scans its blocks)."""
    return unrolled_params({path: np.asarray(jax.device_get(v[...]))
                            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))})


def build(config, params: Mapping[Path, np.ndarray]) -> RingMoE:
    """The model of `config.model` with every parameter taken from `params` by path.

    A path the stage's model has and `params` lacks, or a shape that differs, is an
    error naming the path: a stage never silently keeps an initial value.
    """
    graphdef, abstract = jax.eval_shape(lambda: nnx.split(RingMoE(config.model, rngs=ParamKeys(0)), nnx.Param))
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        name = "/".join(map(str, path))
        value = stacked_param(path, params, config.model.depths[path[1]] if path[0] == "stages" else 0)
        if value is None:
            raise KeyError(f"compression: parameter {name} of the stage's model has no source")
        if value.shape != variable.shape:
            raise ValueError(f"compression: parameter {name} has shape {value.shape}, the stage's model "
                             f"needs {variable.shape}")
        leaves.append((path, variable.replace(jax.numpy.asarray(value, variable.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def unrolled(config, model: RingMoE) -> RingMoE:
    """`model` (of `config.model`) with its blocks unrolled, for work done block by block
    (the refit); `build(config, flat_params(...))` gives the config's own layout back."""
    config = config.copy_and_resolve_references()
    config.model.scan_layers = False
    return build(config, flat_params(model))


def extract_modality(params: Mapping[Path, np.ndarray], extracted_config) -> RingMoE:
    """The one-modality model of `extracted_config` (stages.extracted_config) from the full
    model's parameters."""
    return build(extracted_config, params)
