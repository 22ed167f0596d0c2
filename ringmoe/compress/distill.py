"""Distillation of the merged dense student against the MoE teacher (ours; the reference stops
after the SVD merge).

Each step, on a batch of the modality from the pretraining stream:

    feature  mean over the encoder's stage maps and its final features of the MSE
             between the student's and the teacher's, each layer-normalised per
             token (the scale of a stage says nothing; its directions do). Both see
             the unmasked images, as a downstream user's encoder will.
    reconstruction  the pretraining objective of the modality (SimMIM and its
             physics terms) on the masked images, so the student's decoder stays
             useful and the features stay tied to the pixels.

    loss = compress.feature_weight * feature + compress.reconstruction_weight * reconstruction

It runs through the trainer's own step (`ringmoe.training.step.jit_train_step`: clipping,
AdamW, non-finite guard) with the teacher's parameters as a frozen input, sharded
over `config.mesh` exactly like pretraining: state and teacher laid out by their
logical axes, batches split over the data axes.
"""
from __future__ import annotations

import copy
import logging
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe import sharding, visualize
from ringmoe.data.pipeline import Pipeline
from ringmoe.model.ringmoe import RingMoE
from ringmoe.objectives.loss import pretraining_loss
from ringmoe.training.metrics import MetricsWriter
from ringmoe.training.state import TrainState, make_optimizer, state_shardings
from ringmoe.training.step import batch_shardings, jit_train_step, to_device

log = logging.getLogger("ringmoe.compress")


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-6)


def feature_loss(student, teacher) -> jax.Array:
    """Mean over stage maps and final features of the MSE of layer-normalised tokens."""
    pairs = list(zip(student.stage_features, teacher.stage_features)) + [(student.features, teacher.features)]
    return jnp.mean(jnp.stack([jnp.mean((_normalize(s) - _normalize(jax.lax.stop_gradient(t))) ** 2)
                               for s, t in pairs]))


def distill_config(config, steps: int):
    """The student's config with the distillation schedule as its optimiser settings."""
    c = copy.deepcopy(config)
    c.total_steps = steps
    c.optimizer.lr = c.compress.distill_lr
    c.optimizer.warmup_steps = min(c.compress.distill_warmup_steps, max(steps // 10, 1))
    return c


def make_loss_fn(student_graphdef, teacher_graphdef, config, modality: str, norm_stats: dict):
    """loss_fn(params, batch, teacher_params) -> (total, (terms, {})) for make_train_step."""
    weights = config.compress

    def loss_fn(params, batch, teacher_params):
        student = nnx.merge(student_graphdef, params)
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        inputs = batch[modality]
        pixels, valid = inputs["pixels"], inputs.get("valid")
        feature = feature_loss(student.encode(pixels, modality, valid=valid),
                               teacher.encode(pixels, modality, valid=valid))
        outputs = student({modality: inputs})
        reconstruction, terms = pretraining_loss(student, outputs, batch, config.objectives, config.model.moe,
                                                 norm_stats)
        total = weights.feature_weight * feature + weights.reconstruction_weight * reconstruction
        return total, ({"feature": feature, "reconstruction": reconstruction, **terms}, {})

    return loss_fn


def distill(student: RingMoE, teacher: RingMoE, config, modality: str, *, steps: int, workdir: str,
            data_dir: str | None = None, devices=None) -> tuple[RingMoE, dict]:
    """Trains `student` (the dense stage's model, config `config`) for `steps` steps to match
    `teacher` on `modality`. Writes metrics.jsonl, TensorBoard events and loss_curves.png
    under `workdir`; returns (the distilled student, the last logged metrics)."""
    config = distill_config(config, steps)
    mesh = sharding.make_mesh(config.mesh, devices)
    s_graphdef, s_params = nnx.split(student, nnx.Param)
    t_graphdef, t_params = nnx.split(teacher, nnx.Param)
    tx = make_optimizer(config)
    os.makedirs(workdir, exist_ok=True)
    with Pipeline(config, data_dir or config.data_dir) as pipeline, jax.set_mesh(mesh):
        if tuple(pipeline.modalities) != (modality,):
            raise ValueError(f"distillation data serves {pipeline.modalities}, expected only {modality!r}")
        norm_stats = {modality: {"mean": pipeline.specs[modality].mean, "std": pipeline.specs[modality].std,
                                 "bands": pipeline.specs[modality].bands}}

        def init(params):
            return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                              rng=jax.random.key_data(jax.random.key(config.seed)),
                              nonfinite=jnp.zeros((), jnp.int32))

        shardings = state_shardings(jax.eval_shape(init, s_params), mesh)
        state = jax.jit(init, out_shardings=shardings)(jax.device_put(s_params, shardings.params))
        teacher_shardings = sharding.state_shardings(t_params, mesh)
        t_params = jax.device_put(t_params, teacher_shardings)
        in_batch = batch_shardings(pipeline.batch_spec(), mesh)
        loss_fn = make_loss_fn(s_graphdef, t_graphdef, config, modality, norm_stats)
        step_fn = jit_train_step(s_graphdef, config, norm_stats, shardings, in_batch, loss_fn=loss_fn,
                                 frozen_shardings=(teacher_shardings,))
        last = {}
        with MetricsWriter(workdir, total_steps=steps, enabled=jax.process_index() == 0) as writer:
            start = time.perf_counter()
            for step in range(steps):
                state, metrics = step_fn(state, to_device(next(pipeline), in_batch), t_params)
                done = step + 1
                if done % config.log_every == 0 or done == steps:
                    host = jax.device_get(metrics)
                    last = {k: float(v) for k, v in host.items() if k != "router"}
                    last["step_s"] = (time.perf_counter() - start) / done
                    writer.write(done, last, samples=config.batch_size)
        visualize.save_loss_curves(os.path.join(workdir, "loss_curves.png"), writer.path,
                                   keys=["loss", "feature", "reconstruction"])
    return nnx.merge(s_graphdef, jax.tree.map(jnp.asarray, jax.device_get(state.params))), last
