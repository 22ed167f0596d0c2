"""What the one training loop trains: a registry of tasks (`config.task`), one small class each.

    pretrain  masked-image pretraining of RingMoE (the objectives of `ringmoe.objectives`)
    rsmoe     vision-language tuning of RS-MoE on a RingMoE encoder (`ringmoe.vlm`)

The loop (`pretrain.train`), its checkpoints, metrics, resume and data-state handling are
the same for both; a task says only what differs:

  build(config, rngs)             the model (its parameters are the train state's)
  pipeline(config, **kw)          the data stream (the project's one Grain pipeline)
  loss_fn(graphdef, norm_stats)   loss_fn(params, batch) -> (total, (scalar terms, router stats))
  frozen                          top-level parameter names no update touches
  loaded                          top-level parameter names `start` fills from a checkpoint: the
                                  initialiser leaves them zero, so XLA drops their random draws
  balances_routers                whether a loss-free-bias router is moved after each update
  start(state, mesh)              the step-0 state of a fresh run (loaded encoder, upcycled stage 1)
  flops_per_step / tokens_per_step  for the throughput and MFU figures
  pictures                        whether the trainer draws reconstructions and expert loads

A task is built per run (`for_run(config, workdir)`); `build` alone is a class method, since
abstract shapes (`training.state.abstract_state`) are needed without a run.
"""
from __future__ import annotations

import logging

from flax import nnx

from ringmoe import flops
from ringmoe.data.pipeline import Pipeline
from ringmoe.model.ringmoe import RingMoE
from ringmoe.model.router import policy
from ringmoe.objectives.loss import pretraining_loss

log = logging.getLogger("ringmoe.tasks")


class Pretraining:
    """Masked-image pretraining: every modality's masked images reconstructed, physics terms."""
    inputs = ("pixels", "mask", "valid", "record_index")     # the batch keys the device sees
    frozen: tuple[str, ...] = ()
    loaded: tuple[str, ...] = ()
    pictures = True

    def __init__(self, config, workdir: str | None = None):
        self.config = config
        moe = config.model.moe
        self.balances_routers = bool(moe.enabled and policy(moe.router).selection_bias)

    @staticmethod
    def build(config, rngs) -> nnx.Module:
        return RingMoE(config.model, rngs=rngs)

    def pipeline(self, config, **kwargs) -> Pipeline:
        return Pipeline(config, **kwargs)

    def loss_fn(self, graphdef, norm_stats: dict):
        config = self.config

        def loss_fn(params, batch):
            model = nnx.merge(graphdef, params)
            outputs = model(batch)
            total, terms = pretraining_loss(model, outputs, batch, config.objectives, config.model.moe, norm_stats)
            router = {m: o["encoded"].router_stats for m, o in outputs.items()}
            return total, (terms, router)
        return loss_fn

    def start(self, state, mesh):
        return state

    def flops_per_step(self, global_batch: dict) -> float:
        return flops.model_flops_per_step(self.config.model, global_batch, training=True)

    def tokens_per_step(self, global_batch: dict) -> int:
        m = self.config.model
        return sum(global_batch.values()) * (m.image_size // m.patch_size) ** 2


def _vision_language():
    from ringmoe.vlm.task import VisionLanguage   # the VLM stack loads only for its task
    return VisionLanguage


TASKS = {"pretrain": lambda: Pretraining, "rsmoe": _vision_language}


def task_class(config):
    name = config.get("task", "pretrain")
    if name not in TASKS:
        raise ValueError(f"unknown config.task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]()


def for_run(config, workdir: str | None = None):
    """The task object of a run (`config.task`), in `workdir` when it keeps files there."""
    return task_class(config)(config, workdir)


def build_model(config, rngs) -> nnx.Module:
    """The model of `config.task`, with parameters drawn from `rngs` (`ParamKeys`)."""
    return task_class(config).build(config, rngs)
