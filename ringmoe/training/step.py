"""The jitted, donated train step (loss, gradients with accumulation, guarded update),
the matching evaluation step (the same loss, no update), and the batches they take:
host rows laid out as global arrays over the mesh. Pretraining and distillation both
run through these."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ringmoe import sharding
from ringmoe.model.balance import balance_routers
from ringmoe.training import tasks
from ringmoe.training.state import TrainState, learning_rate, make_optimizer, schedule_count

MODEL_INPUTS = tasks.Pretraining.inputs   # the device-side keys of a pretraining batch


def model_inputs(batch: dict, inputs: tuple[str, ...] = MODEL_INPUTS) -> dict:
    """The device-side part of a pipeline batch (labels stay on the host)."""
    return {m: {k: b[k] for k in inputs if k in b} for m, b in batch.items()}


def make_loss_fn(graphdef, config, norm_stats: dict):
    """loss_fn(params, batch) -> (total, (scalar terms, router statistics)): the objective of
    `config.task` (`ringmoe.training.tasks`)."""
    return tasks.for_run(config).loss_fn(graphdef, norm_stats)


def make_eval_step(graphdef, config, norm_stats: dict):
    """Returns eval_step(state, batch) -> {'loss', every objective term}: no gradients, no update."""
    loss_fn = make_loss_fn(graphdef, config, norm_stats)

    def eval_step(state: TrainState, batch: dict) -> dict:
        loss, (terms, _) = loss_fn(state.params, batch)
        return {"loss": loss, **terms}

    return eval_step


def make_train_step(graphdef, config, norm_stats: dict, loss_fn=None):
    """Returns step(state, batch, *frozen) -> (state, metrics), to be wrapped in jax.jit by the caller.

    metrics: 'loss', every objective term, 'grad_norm', 'lr', 'finite' (1.0 when the
    update was applied; a NaN/Inf loss or gradient skips it and bumps
    state.nonfinite) and 'router' (per modality, per block route() statistics).

    The learning-rate schedule follows the updates applied, not `state.step`: a skipped
    update keeps the whole optimiser state (Adam's moments, its bias-correction count and
    the schedule's count are one state, and keeping only part of it would let the bias
    correction and the rate disagree), so the schedule resumes where the last applied
    update left it; warm-up takes `warmup_steps` real updates. The price: after k skips
    the run ends k updates short of the schedule's end (the rate slightly above end_lr).
    'lr' is that rate, `schedule(schedule_count(opt_state))`, the one this step's update
    uses (or would have used, when skipped).

    The skip is one `jax.lax.cond` over the whole update, not a select per parameter
    and moment: with a select per leaf XLA fused the AdamW arithmetic into the select of
    each parameter, mu and nu and copied the old moments first, and the tiny step ran
    about 4 % slower on the CPU and the 14.7B step on h100-64 held 0.14 GB more
    temporaries per device (README, "Where the rest goes"). The price: the clipping inside
    the branch computes the gradient norm again (XLA shares no work across a
    conditional), one more read of the gradients where the selects copied both moments.
    On GPU, XLA reads a conditional's predicate on the host, so the optimiser's kernels
    are launched once the gradient norm is known, which they need anyway.

    A `loss_free_bias` router's selection bias moves with each applied update
    (`ringmoe.model.balance`), outside the optimiser.
    `loss_fn(params, batch, *frozen) -> (total, (terms, router))` defaults to the
    pretraining objective; `frozen` are inputs that get no gradient (the teacher's
    parameters when distilling).
    """
    tx = make_optimizer(config)
    schedule = learning_rate(config)
    accum = int(config.grad_accum_steps)
    moe = config.model.moe
    biased = tasks.for_run(config).balances_routers   # loss-free balancing after each update

    def balanced(params, router, batch):
        """`params` with every router's selection bias moved by this step's load (`balance_routers`)."""
        model = nnx.merge(graphdef, params)
        balance_routers(model, router, {m: b["pixels"].shape[0] for m, b in batch.items()},
                        float(moe.bias_update_rate))
        return nnx.state(model, nnx.Param)

    loss_fn = loss_fn or make_loss_fn(graphdef, config, norm_stats)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch, frozen):
        if accum == 1:
            return grad_fn(params, batch, *frozen)

        def split(x):
            if x.shape[0] % accum:
                raise ValueError(f"per-modality batch {x.shape[0]} not divisible by grad_accum_steps={accum}")
            return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

        def body(acc, micro):
            return jax.tree.map(jnp.add, acc, grad_fn(params, micro, *frozen)), None

        micro = jax.tree.map(split, batch)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro),
                                                            *frozen))
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / accum, total)

    def step(state: TrainState, batch: dict, *frozen) -> tuple[TrainState, dict]:
        (loss, (terms, router)), grads = gradients(state.params, batch, frozen)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if biased:
                params = balanced(params, router, batch)
            return params, opt_state

        params, opt_state = jax.lax.cond(finite, apply, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=state.rng,
                               nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "lr": schedule(schedule_count(state.opt_state)),
                   "finite": finite.astype(jnp.float32), "router": router}
        return new_state, metrics

    return step


def jit_train_step(graphdef, config, norm_stats: dict, state_shardings: TrainState, batch_layout: dict, *,
                   loss_fn=None, frozen_shardings: tuple = ()):
    """The step as the trainer runs it (and `tools.aot` compiles it): jitted, the state donated,
    state, batch and frozen inputs in their shardings, the new state in the same shardings and
    the metrics replicated, so that every process can read them. `loss_fn`: as in
    `make_train_step`, with one frozen input per entry of `frozen_shardings`."""
    return jax.jit(make_train_step(graphdef, config, norm_stats, loss_fn=loss_fn), donate_argnums=0,
                   in_shardings=(state_shardings, batch_layout, *frozen_shardings),
                   out_shardings=(state_shardings, state_shardings.step))


def batch_shardings(spec: dict, mesh, inputs: tuple[str, ...] = MODEL_INPUTS) -> dict:
    """Every model-input array (`inputs`: the task's) of a batch spec (`Pipeline.batch_spec()`)
    split over the data-like mesh axes along its first dim."""
    return {m: {k: jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh(("batch",) + (None,) * (len(s) - 1)))
                for k, (s, _) in spec[m].items() if k in inputs}
            for m in spec}


def device_dtype(dtype) -> np.dtype:
    """The dtype a batch array has on the device: int64 (record indices) becomes JAX's int32."""
    dtype = np.dtype(dtype)
    return np.dtype(np.int32) if dtype == np.int64 else dtype


def to_device(batch: dict, shardings: dict) -> dict:
    """Process-local numpy rows -> global arrays (each process holds its own rows): the arrays
    `shardings` lays out (`batch_shardings`), the rest stays on the host."""
    out = {}
    for m, arrays in model_inputs(batch, tuple(next(iter(shardings.values())))).items():
        out[m] = {}
        for k, x in arrays.items():
            x = x.astype(device_dtype(x.dtype), copy=False)
            out[m][k] = jax.make_array_from_process_local_data(shardings[m][k], x)
    return out


def abstract_batch(spec: dict, shardings: dict) -> dict:
    """ShapeDtypeStructs of the device batch that `to_device` makes, for ahead-of-time lowering;
    `spec` holds GLOBAL shapes (every process's rows)."""
    return {m: {k: jax.ShapeDtypeStruct(shape, device_dtype(name), sharding=shardings[m][k])
                for k, (shape, name) in spec[m].items() if k in shardings[m]} for m in spec}


def compile_ahead(step_fn, mesh, abstract_state: TrainState, batch: dict) -> Future:
    """Compiles `step_fn` (`jit_train_step`'s) for the abstract state and batch (ShapeDtypeStructs
    with shardings: `abstract_batch`) on a thread of its own; the Future's result is the compiled
    step, called like `step_fn`. XLA compiles on one core: the trainer restores or initialises
    the state and compiles its evaluation meanwhile (a compiled step that does not fit the
    arrays it is later called with is an error, not a second compile)."""
    def compile_step():
        with jax.set_mesh(mesh):   # the mesh context is per thread
            return step_fn.lower(abstract_state, batch).compile()
    pool = ThreadPoolExecutor(1, thread_name_prefix="compile-step")
    future = pool.submit(compile_step)
    pool.shutdown(wait=False)   # the thread ends with its one job
    return future
