"""Train state: parameters, optimiser state, step and RNG, created already sharded.

The state is a plain pytree (so Orbax saves it and `jax.jit` shards it); the
model's structure lives in the static `graphdef`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ringmoe import sharding
from ringmoe.model.ringmoe import ParamKeys
from ringmoe.training.tasks import build_model, task_class


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array          # int32 scalar: steps taken so far (batches consumed), applied or skipped
    rng: jax.Array           # key data; the step's key is fold_in(rng, step)
    nonfinite: jax.Array     # int32 scalar: updates skipped for NaN/Inf so far (step - nonfinite applied)


def learning_rate(config) -> optax.Schedule:
    """(ref) Linear warm-up from init_lr to lr, then cosine decay to end_lr at total_steps."""
    o = config.optimizer
    return optax.warmup_cosine_decay_schedule(
        init_value=o.init_lr, peak_value=o.lr, warmup_steps=o.warmup_steps,
        decay_steps=max(config.total_steps, o.warmup_steps + 1), end_value=o.end_lr)


def schedule_count(opt_state) -> jax.Array:
    """The count the optimiser's learning-rate schedule is indexed by: the updates it has applied.

    A skipped (non-finite) update keeps the whole optimiser state, so this count, unlike
    `TrainState.step`, does not advance on one; `ringmoe.training.step` logs `schedule(schedule_count)`,
    the rate the update actually uses.
    """
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    if len(counts) != 1:
        raise ValueError(f"expected one learning-rate schedule in the optimiser state, found {len(counts)}")
    return counts[0]


# The parameters weight decay applies to: the weight matrices of linear maps, by name. Not by
# rank: biases of stacked experts (E, F), per-head q/v biases (H, K) and every norm of a scanned
# stage (layers, D) are matrices, and none of them is a weight.
DECAYED = frozenset({"kernel", "qkv", "w_in", "w_out"})


def decay_mask(params):
    """True for the parameters `DECAYED` names (the last name on the parameter's path)."""
    def decayed(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] in DECAYED
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """(ref) Global-norm clipping then AdamW; no weight decay on vectors (norms, biases, scales).
    The task's frozen parameters (`tasks`: RS-MoE's encoder) get no update and no optimiser state."""
    o = config.optimizer
    tx = optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask))
    frozen = task_class(config)(config).frozen
    if not frozen:
        return tx

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if getattr(path[0], "key", None) in frozen else "trained", params)
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _init(config, tx):
    params = nnx.state(build_model(config, ParamKeys(config.seed)), nnx.Param)
    loaded = task_class(config)(config).loaded   # filled by the task's start(): not drawn at all
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if getattr(path[0], "key", None) in loaded else x, params)
    return start_state(config, params, tx)


def start_state(config, params, tx) -> TrainState:
    """The state of step 0 around `params`: a fresh optimiser, the run's RNG, no skipped updates
    (a new run's, or an upcycled one's, `ringmoe.upcycle.build`)."""
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                      rng=jax.random.key_data(jax.random.key(config.seed)), nonfinite=jnp.zeros((), jnp.int32))


def abstract_state(config, mesh):
    """(graphdef, abstract TrainState, its NamedShardings): shapes only, nothing allocated."""
    tx = make_optimizer(config)
    graphdef, _ = jax.eval_shape(lambda: nnx.split(build_model(config, ParamKeys(config.seed))))
    abstract = jax.eval_shape(lambda: _init(config, tx))
    return graphdef, abstract, state_shardings(abstract, mesh)


def state_shardings(abstract: TrainState, mesh) -> TrainState:
    """Optimiser moments are laid out like the parameters they track; scalars are replicated."""
    param_shardings = sharding.state_shardings(abstract.params, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def as_params(subtree):
        """The params' shardings for a params-shaped subtree (optax keeps one per moment: mu, nu),
        also one of `optax.multi_transform`'s partitions (the params' tree with `MaskedNode`s where
        the other partition's leaves are); None for anything else."""
        if jax.tree.structure(subtree) == jax.tree.structure(abstract.params):
            return param_shardings
        masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
        try:
            return jax.tree.map(lambda s, x: x if masked(x) else s, param_shardings, subtree, is_leaf=masked)
        except ValueError:
            return None

    def like_params(subtree):
        laid_out = as_params(subtree)
        return laid_out if laid_out is not None else jax.tree.map(lambda _: replicated, subtree)

    opt_shardings = jax.tree.map(like_params, abstract.opt_state, is_leaf=lambda x: as_params(x) is not None)
    return TrainState(params=param_shardings, opt_state=opt_shardings, step=replicated, rng=replicated,
                      nonfinite=replicated)


def create_state(config, mesh, abstract: tuple | None = None) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Initialises the train state inside `jax.jit` straight into its sharded layout.

    Returns (graphdef, state, shardings). The initialiser runs once, so it is
    compiled without backend optimisation (half the compile time on CPU).
    `abstract`: `abstract_state(config, mesh)` when the caller has it already (it
    builds the model abstractly, seconds at the tiny size).
    """
    tx = make_optimizer(config)
    graphdef, _, shardings = abstract or abstract_state(config, mesh)
    init = jax.jit(lambda: _init(config, tx), out_shardings=shardings)
    state = init.lower().compile({"xla_backend_optimization_level": 0})()
    return graphdef, state, shardings
