"""Model checkpoints: read a model from a training run or a saved model, write a saved model.

Two layouts, both Orbax CheckpointManager directories with a JSON `meta` item
holding the model's config (so nothing has to be re-specified to load one):

* a training run (`ringmoe.training.checkpoint`): item `state`, the whole TrainState;
* a saved model (`save_model`, written by the compression pass and its export):
  item `params`, the parameters alone, plus whatever `meta` the writer adds
  (stage, modality, band metadata, ...).

`load_pretrained` reads either onto one device, read-only: an unreadable step is
reported and skipped, never moved or deleted.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import ConfigDict

from ringmoe import cli, sharding
from ringmoe.errors import describe
from ringmoe.model.ringmoe import ParamKeys, RingMoE
from ringmoe.training.checkpoint import abstract_with_shardings
from ringmoe.training.state import abstract_state

log = logging.getLogger("ringmoe.checkpoint")


@cli.reported
class CheckpointError(RuntimeError):
    """No checkpoint, or none that restores; the message names the directory (a command
    line reports it as one line, `ringmoe.cli`)."""


# Sections keyed by modality: a saved one is taken whole, never merged with base_config()'s
# (which would add back modalities the saved model or data weights did not have).
_WHOLE_SECTIONS = (("model", "modalities"), ("data", "modality_weights"))


def config_from_json(value) -> ConfigDict:
    """A config saved as JSON back as a ConfigDict, with lists turned back into tuples.

    The saved values are laid over ringmoe/config.py `base_config()`: a key added since the
    checkpoint was written (say `objectives.span_looks`) gets its default there, the one
    place defaults live, so that code reading `config.<key>` with no fallback of its own
    still loads old runs. Saved keys, including ones the base no longer has, are kept.
    This is the one place a saved config is completed."""
    from ringmoe.config import base_config

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    def over(base, saved, path=()):
        if not (isinstance(base, dict) and isinstance(saved, dict)) or path in _WHOLE_SECTIONS:
            return saved
        return {**base, **{k: over(base.get(k), v, path + (k,)) for k, v in saved.items()}}

    return ConfigDict(over(base_config().to_dict(), tuples(value)))


def one_device_mesh():
    """Every mesh axis of size 1 on the first device: where evaluation and compression run."""
    return sharding.make_mesh({}, jax.devices()[:1])


def checkpoint_directory(path: str) -> str:
    """The Orbax directory of `path`: a run's `checkpoints/` or the directory itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    inner = os.path.join(path, "checkpoints")
    return os.path.abspath(inner if os.path.isdir(inner) else path)


def _abstract_params(config, mesh):
    """(graphdef, abstract params carrying their shardings) of `config.model`; nothing allocated."""
    graphdef, params = jax.eval_shape(lambda: nnx.split(RingMoE(config.model, rngs=ParamKeys(0)), nnx.Param))
    return graphdef, abstract_with_shardings(params, sharding.state_shardings(params, mesh))


def read_meta(checkpoint_dir: str) -> tuple[int, dict]:
    """(step, meta) of the newest step whose metadata reads; CheckpointError otherwise."""
    directory = checkpoint_directory(checkpoint_dir)
    with _manager(directory) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{directory}: no checkpoint found")
        for step in steps:
            try:
                return step, manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged files
                log.warning("checkpoint %s/%d: metadata unreadable (%s)", directory, step, e)
    raise CheckpointError(f"{directory}: no checkpoint with readable metadata")


class _manager:
    """A read-only CheckpointManager as a context manager."""

    def __init__(self, directory: str):
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def __enter__(self):
        return self.manager

    def __exit__(self, *exc):
        self.manager.close()


def load_pretrained(checkpoint_dir: str) -> tuple[ConfigDict, RingMoE, int]:
    """(config, model, step) from the newest readable checkpoint of a run or a saved model.

    `checkpoint_dir` is a training workdir, its `checkpoints/` directory or a
    `save_model` directory. The parameters are restored onto one device.
    """
    directory = checkpoint_directory(checkpoint_dir)
    errors = []
    with _manager(directory) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"{directory}: no checkpoint found")
        mesh = one_device_mesh()
        for step in steps:
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                config = config_from_json(meta["config"])
                if meta.get("format") == MODEL_FORMAT:
                    graphdef, target = _abstract_params(config, mesh)
                    params = manager.restore(step, args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(target))).params
                else:
                    graphdef, abstract, shardings = abstract_state(config, mesh)
                    target = abstract_with_shardings(abstract, shardings)
                    params = manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target))).state.params
            except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for damaged files
                reason = describe(e)
                errors.append(f"step {step}: {reason}")
                log.warning("checkpoint %s/%d is unreadable (%s); trying an older one", directory, step, reason)
                continue
            return config, nnx.merge(graphdef, params), int(step)
    raise CheckpointError(f"{directory}: no readable checkpoint ({'; '.join(errors)})")


MODEL_FORMAT = "ringmoe-model"


def save_model(directory: str, config, model: RingMoE, meta: dict | None = None, *, step: int = 0) -> str:
    """Writes `model`'s parameters and `{"format", "config", **meta}` as an Orbax checkpoint
    that `load_pretrained` (and `tools.evaluate --checkpoint`) reads. Returns the directory."""
    directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
    meta = {**(meta or {}), "format": MODEL_FORMAT, "config": json.loads(config.to_json())}
    with ocp.CheckpointManager(directory, options=options) as manager:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()
    return directory
