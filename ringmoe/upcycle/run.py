"""Upcycle a dense checkpoint into a new training run of an MoE config (`tools.upcycle`).

    source (training run or saved model) --plan--> step-0 TrainState of `config` (sharded
    like training, fresh optimiser) --> OUT/checkpoints/0, which `pretrain.train --config
    <the same config> --workdir OUT` resumes at step 0

With k-means routers or a data set to measure on, the dense counterpart of the target
(`dense_counterpart`) is built on one device first: the calibration model of `routers.py`,
and the reference for the step-0 check, the relative distance between the upcycled MoE's
final features and the dense model's on a batch of each modality (0 when upcycling is
exact, `build.py`; a random router's top-1 gates make it small, not 0).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe import sharding
from ringmoe.data import shards
from ringmoe.data.pipeline import modality_specs
from ringmoe.eval.features import image_batches
from ringmoe.model.checkpoint import load_pretrained, one_device_mesh
from ringmoe.model.ringmoe import ParamKeys, RingMoE
from ringmoe.upcycle.build import check_layouts, name, shapes, upcycled_params, upcycled_state, write_run
from ringmoe.upcycle.plan import UpcycleError, make_plan
from ringmoe.upcycle.routers import kmeans_kernels, router_init

log = logging.getLogger("ringmoe.upcycle")
CHECK_IMAGES = 8   # images per modality of the step-0 check


def dense_config_of(config):
    """`config` with MoE off: its dense counterpart."""
    dense = config.copy_and_resolve_references()
    dense.model.moe.enabled = False
    return dense


def dense_counterpart(source_params: nnx.State, source_config, config):
    """(dense config, model) on one device: `config`'s modalities and blocks with MoE off, every
    parameter the source has copied and the rest the target's own fresh values (the same
    seed, so the patch embeddings the source lacks are the upcycled model's)."""
    dense_config = dense_config_of(config)
    check_layouts(source_config, dense_config)
    graphdef, abstract = jax.eval_shape(lambda: nnx.split(RingMoE(dense_config.model, rngs=ParamKeys(0)), nnx.Param))
    plan = make_plan(shapes(source_params), shapes(abstract))
    source = {name(p): v[...] for p, v in nnx.to_flat_state(source_params)}
    params = jax.jit(lambda s: upcycled_params(dense_config, plan, s, None))(source)
    return dense_config, nnx.merge(graphdef, params)


@functools.partial(nnx.jit, static_argnames=("modality",))
def _features(model, pixels, modality: str):
    return model.encode(pixels, modality).features


def served(config, data_dir: str) -> list[str]:
    """The target's modalities that `data_dir` holds, in model order."""
    specs = modality_specs(shards.read_manifest(data_dir), config, data_dir)
    return [m for m in config.model.modalities.keys() if m in specs]


def reference_features(dense, config, data_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{modality: (pixels, the dense model's final features)} of its first CHECK_IMAGES images, for
    each modality of the target that `data_dir` holds."""
    out = {}
    for m in served(config, data_dir):
        for pixels, n, _ in image_batches(config, data_dir, m, CHECK_IMAGES, pad=False):
            out[m] = (pixels[:n], np.asarray(jax.device_get(_features(dense, jnp.asarray(pixels[:n]), m))))
            break
    return out


def step0_distance(moe, reference: dict) -> dict[str, float]:
    """Per modality, ||F_moe - F_dense|| / ||F_dense|| of the final features on the reference images."""
    out = {}
    for m, (pixels, dense) in reference.items():
        ours = np.asarray(jax.device_get(_features(moe, jnp.asarray(pixels), m)), np.float64)
        out[m] = float(np.linalg.norm(ours - dense) / max(np.linalg.norm(dense), 1e-30))
    return out


def upcycle(source_dir: str, config, out: str, *, data_dir: str | None = None, devices=None) -> dict:
    """Upcycles the dense model of `source_dir` into step 0 of a run of `config` in `out`.

    data_dir (default config.data_dir): the calibration images of the k-means routers and of
    the step-0 check (none: no check). Returns the report also written to OUT/upcycle.json.
    """
    start = time.perf_counter()
    if not config.model.moe.enabled:
        raise UpcycleError("the target config has model.moe.enabled = False: nothing to upcycle into")
    init = router_init(config.upcycle.router_init)
    data_dir = data_dir or config.data_dir or None
    if init.calibrated and not data_dir:
        raise UpcycleError("upcycle.router_init = 'kmeans' needs calibration images: set --config.data_dir")
    checkpoints = os.path.join(os.path.abspath(out), "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):   # before any work (write_run checks again)
        raise UpcycleError(f"{checkpoints} already holds checkpoints: upcycling writes step 0 of a new run; "
                           "choose an empty --out")
    source_config, source_model, source_step = load_pretrained(source_dir)
    if source_config.model.moe.enabled:
        raise UpcycleError(f"{source_dir}: the source is a Mixture of Experts (model.moe.enabled = True): "
                           "upcycling starts from a dense model")
    source_params = nnx.state(source_model, nnx.Param)
    reference, calibrated = {}, None
    if data_dir:
        with jax.set_mesh(one_device_mesh()):
            dense_config, dense = dense_counterpart(source_params, source_config, config)
            reference = reference_features(dense, config, data_dir)
            if init.calibrated:
                have = served(config, data_dir)
                missing = [m for m in config.model.modalities.keys() if m not in have]
                if missing:
                    raise UpcycleError(f"{data_dir} holds no {', '.join(missing)} images: k-means routers need "
                                       "every modality's tokens (use --router-init random)")
                calibrated = kmeans_kernels(dense, dense_config, config, data_dir)
    mesh = sharding.make_mesh(config.mesh, devices)
    with jax.set_mesh(mesh):
        plan, graphdef, state, _ = upcycled_state(source_params, source_config, config, mesh,
                                                  init.kernel_fn(calibrated or {}))
        distance = step0_distance(nnx.merge(graphdef, state.params), reference)
    target_shapes = {k: tuple(v) for k, v in shapes(state.params).items()}
    report = {"source": os.path.abspath(source_dir), "source_step": int(source_step),
              "router_init": config.upcycle.router_init, "noise": config.upcycle.noise,
              "reinit_fraction": config.upcycle.reinit_fraction,
              "params": plan.count(target_shapes), "fresh_parts": plan.fresh_parts(),
              "unused_source": list(plan.unused), "step0_feature_distance": distance}
    meta = {"config": json.loads(config.to_json()),
            "upcycled_from": {"path": report["source"], "step": report["source_step"],
                              "config": json.loads(source_config.to_json())}}
    report["checkpoint"] = write_run(out, config, state, meta)
    report["seconds"] = time.perf_counter() - start
    with open(os.path.join(out, "upcycle.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report
