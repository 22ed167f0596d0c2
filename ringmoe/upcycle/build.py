"""The upcycled MoE's step-0 train state, built sharded like training, and written as a run.

Every parameter is filled as `plan.make_plan` says, inside one `jax.jit` whose outputs
carry the training shardings (`ringmoe.training.state.abstract_state`): the 14.7B target
is never gathered on one device, and its optimiser state is fresh (`start_state`).

How the output scale is preserved. A block's MoE computes

    y = sum_k g_m,k E_m,k(x)  +  sum_k g_c,k E_c,k(x)  +  S(x)

(modal experts of the token's modality, collaborative experts, the shared expert). With
every expert a copy of the dense FFN f, y = (G_m + G_c + 1) f(x), where G is the sum of
a token's gates in that group. Each group present is given an equal share 1/n of f by
scaling its output layer (w_out and b_out, or the shared expert's fc2): by 1/n for the
shared expert and by 1/(n G0) for a routed group, G0 = the policy's gate sum when every
expert is equally likely (`router.<Policy>.uniform_gate_sum`: 1/E for top-1 token choice,
1 for top-k >= 2, which renormalises). Then y = f(x) exactly whenever a token's gates
sum to G0 and none of its assignments is dropped: for top-k >= 2 with any router; for
top-1 with a router whose logits are equal for every expert (`routers.py` 'uniform').
A fresh random or k-means router (`routers.py`) has logits of about 0.02 |x|, so its
top-1 gate is near 1/E and the start near the dense model (the tool measures how near).

Symmetry breaking (identical experts get identical gradients only if they get the same
tokens; the router already sends them different ones, and these add more):
  noise            each copy + noise * std(W) * N(0, 1), per weight and layer;
  reinit_fraction  Drop-Upcycling (arXiv 2502.19261): in each expert, that share of its
                   hidden units (a column of w_in, its b_in entry, a row of w_out; each
                   expert its own draw) re-drawn from N(mean(W), std(W)) of the dense weight.
"""
from __future__ import annotations

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe import sharding
from ringmoe.model.ringmoe import ParamKeys, RingMoE
from ringmoe.model.router import policy
from ringmoe.training.checkpoint import FRESH_DATA_STATE, Checkpointer
from ringmoe.training.state import abstract_state, make_optimizer, start_state
from ringmoe.upcycle.plan import EXPERT_SOURCE, Entry, Plan, UpcycleError, make_plan

log = logging.getLogger("ringmoe.upcycle")

KEY_STREAM = 0x0C7C   # folded into key(config.seed): the upcycling draws, apart from the model's init


def name(path) -> str:
    return "/".join(map(str, path))


def shapes(params: nnx.State) -> dict[str, tuple]:
    """{path name: shape} of a (possibly abstract) parameter state."""
    return {name(p): tuple(v.shape) for p, v in nnx.to_flat_state(params)}


def output_scales(moe_config) -> dict[str, float]:
    """The factor on each group's output layer (module docstring)."""
    groups = {"modal": moe_config.num_modal_experts, "collaborative": moe_config.num_collaborative_experts}
    present = [g for g, e in groups.items() if e] + (["shared"] if moe_config.shared_expert else [])
    n = len(present)
    scales = {"shared": 1.0 / n}
    for group, experts in groups.items():
        if experts:
            gate = policy(moe_config.router).uniform_gate_sum(experts, min(moe_config.top_k, experts),
                                                              moe_config.capacity_factor)
            scales[group] = 1.0 / (n * gate)
    return scales


class _Fill:
    """What the kinds of `plan.KINDS` need to fill a parameter."""

    def __init__(self, plan: Plan, source: dict, scales: dict, key, noise: float, reinit: float, router_kernel):
        self.source, self.scales, self.key, self.noise, self.reinit = source, scales, key, noise, reinit
        self.router_kernel = router_kernel
        units = sorted({e.unit for e in plan.entries.values() if e.kind == "expert"})
        self.unit_index = {u: i for i, u in enumerate(units)}

    def __call__(self, path: str, entry: Entry, fresh: jax.Array) -> jax.Array:
        return FILLS[entry.kind](self, path, entry, fresh)

    def copied(self, path, entry, fresh):
        return self.source[entry.source]

    def fresh(self, path, entry, fresh):
        return fresh

    def shared(self, path, entry, fresh):
        value = self.source[entry.source]
        return value * self.scales["shared"] if entry.weight.startswith("fc2") else value

    def router(self, path, entry, fresh):
        return self.router_kernel(path, fresh) if entry.weight == "kernel" else fresh

    def expert(self, path, entry, fresh):
        dense = self.source[entry.source]
        trailing = EXPERT_SOURCE[entry.weight][1]
        at = dense.ndim - trailing
        value = jnp.broadcast_to(jnp.expand_dims(dense, at), fresh.shape)
        key = jax.random.fold_in(self.key, self.unit_index[entry.unit])
        weights = tuple(EXPERT_SOURCE)
        axes = tuple(range(at, dense.ndim))
        mean = jnp.expand_dims(jnp.mean(dense, axis=axes, keepdims=True), at)
        std = jnp.expand_dims(jnp.std(dense, axis=axes, keepdims=True), at)
        if self.reinit > 0 and entry.weight != "b_out":
            mask = self._dropped(key, fresh.shape[:at + 1], fresh.shape[-1] if entry.weight != "w_out"
                                 else fresh.shape[-2])
            mask = {"w_in": mask[..., None, :], "b_in": mask, "w_out": mask[..., :, None]}[entry.weight]
            draws = mean + std * jax.random.normal(jax.random.fold_in(key, 1 + weights.index(entry.weight)),
                                                   fresh.shape, fresh.dtype)
            value = jnp.where(mask, draws, value)
        if self.noise > 0:
            value = value + self.noise * std * jax.random.normal(
                jax.random.fold_in(key, 1 + len(weights) + weights.index(entry.weight)), fresh.shape, fresh.dtype)
        if entry.weight in ("w_out", "b_out"):
            value = value * self.scales[entry.group]
        return value.astype(fresh.dtype)

    def _dropped(self, key, lead: tuple, hidden: int) -> jax.Array:
        """(lead..., hidden) bool: round(reinit * hidden) hidden units of each expert, drawn
        once per expert group (`key`), so w_in, b_in and w_out drop the same units."""
        k = int(round(self.reinit * hidden))
        if k == 0:
            return jnp.zeros((*lead, hidden), bool)
        u = jax.random.uniform(jax.random.fold_in(key, 0), (*lead, hidden))
        return u <= jnp.sort(u, axis=-1)[..., k - 1:k]


FILLS = {"copied": _Fill.copied, "fresh": _Fill.fresh, "shared": _Fill.shared, "router": _Fill.router,
         "expert": _Fill.expert}


def upcycled_params(config, plan: Plan, source: dict[str, jax.Array], router_kernel) -> nnx.State:
    """The target's parameters (traceable): its fresh initialisation (seed config.seed) with
    every entry of `plan` filled from `source` {path name: array}. `router_kernel(path,
    fresh)` gives each router's kernel (`routers.ROUTER_INITS`)."""
    params = nnx.state(RingMoE(config.model, rngs=ParamKeys(config.seed)), nnx.Param)
    key = jax.random.fold_in(jax.random.key(config.seed), KEY_STREAM)
    fill = _Fill(plan, source, output_scales(config.model.moe) if config.model.moe.enabled else {}, key,
                 config.upcycle.noise, config.upcycle.reinit_fraction, router_kernel)
    leaves = []
    for path, variable in nnx.to_flat_state(params):
        path_name = name(path)
        leaves.append((path, variable.replace(fill(path_name, plan.entries[path_name], variable[...]))))
    return nnx.from_flat_state(leaves)


def check_layouts(source_config, config) -> None:
    if bool(source_config.model.scan_layers) != bool(config.model.scan_layers):
        raise UpcycleError(f"the source stores its blocks {'scanned' if source_config.model.scan_layers else 'unrolled'}"
                           f" and the target {'scanned' if config.model.scan_layers else 'unrolled'}: set "
                           f"--config.model.scan_layers={bool(source_config.model.scan_layers)}")


def abstract_source(source_config) -> nnx.State:
    return jax.eval_shape(lambda: nnx.state(RingMoE(source_config.model, rngs=ParamKeys(0)), nnx.Param))


def upcycled_state(source_params: nnx.State, source_config, config, mesh, router_kernel):
    """(plan, graphdef, step-0 TrainState of `config`, its shardings) from the dense `source_params`,
    built inside one jit straight into the training layout on `mesh`."""
    check_layouts(source_config, config)
    tx = make_optimizer(config)
    graphdef, abstract, shardings = abstract_state(config, mesh)
    plan = make_plan(shapes(source_params), shapes(abstract.params))
    source = {name(p): v[...] for p, v in nnx.to_flat_state(
        jax.device_put(source_params, sharding.state_shardings(source_params, mesh)))}

    def build(source):
        return start_state(config, upcycled_params(config, plan, source, router_kernel), tx)

    state = jax.jit(build, out_shardings=shardings).lower(source).compile(
        {"xla_backend_optimization_level": 0})(source)   # runs once: compiled unoptimised, as create_state
    return plan, graphdef, state, shardings


def per_device_bytes(abstract, shardings) -> int:
    """Bytes of one device's shards of a tree of arrays (the largest device's; shards are even)."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        shard = s.shard_shape(a.shape) if a.shape else ()
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return total


def dry_run(source_config, config, mesh, router_kernel) -> dict:
    """Parameter counts by kind, the fresh parts and per-device bytes of upcycling `source_config`'s
    model into `config`'s on `mesh` (an AbstractMesh is enough): shapes only, nothing allocated.
    The whole build is traced (`jax.eval_shape`), so what the real run would trace is checked."""
    check_layouts(source_config, config)
    source = abstract_source(source_config)
    tx = make_optimizer(config)
    _, abstract, shardings = abstract_state(config, mesh)
    target_shapes = shapes(abstract.params)
    plan = make_plan(shapes(source), target_shapes)
    flat = {name(p): v for p, v in nnx.to_flat_state(source)}
    jax.eval_shape(lambda s: start_state(config, upcycled_params(config, plan, s, router_kernel), tx), flat)
    source_bytes = per_device_bytes(source, sharding.state_shardings(source, mesh))
    params_bytes = per_device_bytes(abstract.params, shardings.params)
    state_bytes = per_device_bytes(abstract, shardings)
    return {"source_params": int(sum(math.prod(s) for s in shapes(source).values())),
            "target_params": int(sum(math.prod(s) for s in target_shapes.values())),
            "by_kind": plan.count(target_shapes), "fresh_parts": plan.fresh_parts(),
            "unused_source": list(plan.unused), "devices": int(mesh.size), "mesh": dict(mesh.shape),
            "per_device_bytes": {"source_params": source_bytes, "target_params": params_bytes,
                                 "target_optimizer": state_bytes - params_bytes, "target_state": state_bytes,
                                 "peak_estimate": source_bytes + state_bytes}}


def write_run(workdir: str, config, state, meta: dict) -> str:
    """Writes `state` as step 0 of a training run in `workdir` (its checkpoint's data item
    `FRESH_DATA_STATE`: the data stream starts at its beginning); refuses a workdir that
    already holds checkpoints. Returns the checkpoint directory."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if os.path.isdir(directory) and os.listdir(directory):
        raise UpcycleError(f"{directory} already holds checkpoints: upcycling writes step 0 of a new run; "
                           "choose an empty --out")
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    try:
        checkpointer.save(0, state, FRESH_DATA_STATE, {**meta, "step": 0}, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return directory
