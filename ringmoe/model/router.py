"""Routers: which experts each token goes to, with what gate, in which buffer slot.

Tokens are routed in groups (one group = the tokens of one image): capacity,
balance statistics and expert choice are all per group, so routing never needs
tokens from another device. Three policies (`config.model.moe.router`):

* `token_choice` (the reference): each token picks its top-k experts; expert e
  takes at most C = ceil(capacity_factor * S * k / E) tokens per group, first
  choices before second choices, in token order; overflow tokens are dropped
  (their gate is 0 and the residual carries them).
* `dropless`: token choice with C = S, so no token is ever dropped.
* `expert_choice` (Zhou et al. 2022): each expert picks its top-C tokens,
  C = ceil(capacity_factor * S * k / E); a token may get 0..E experts.

Every policy produces the same token-major `RoutingPlan`, which all dispatch
implementations consume (see `dispatch.py`). Under expert choice a token's K
entries are all E experts, of which only the E*C chosen (expert, token) pairs
per group are kept (slot < capacity); dispatch computes only those.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.sharding import partitioned

ROUTERS = ("token_choice", "dropless", "expert_choice")


class RoutingPlan(NamedTuple):
    """Token-major routing of a group of S tokens over E experts.

    expert_index (G, S, K) int32: the expert of each of a token's K assignments.
    gate (G, S, K) float32: its combine weight; 0 for a dropped assignment.
    slot (G, S, K) int32: position in that expert's buffer; >= capacity if dropped
        (or, under expert choice, where K = E, if that expert did not choose the token).
    capacity: static buffer length per expert and group.
    """
    expert_index: jax.Array
    gate: jax.Array
    slot: jax.Array
    capacity: int


class Router(nnx.Module):
    """Bias-free linear map from a token to one logit per expert (no router noise)."""

    def __init__(self, dim: int, num_experts: int, *, rngs: nnx.Rngs):
        self.kernel = nnx.Param(partitioned(nnx.initializers.normal(0.02), "embed", None)(
            rngs.params(), (dim, num_experts), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Routing decisions are made in float32 whatever the compute dtype.
        return jnp.einsum("gsd,de->gse", x.astype(jnp.float32), self.kernel[...])


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def route(logits: jax.Array, *, router: str, top_k: int, capacity_factor: float
          ) -> tuple[RoutingPlan, dict[str, jax.Array]]:
    """Turns router logits (G, S, E) into a RoutingPlan plus losses and statistics.

    The returned dict (`statistics`) holds `load_balance` (Switch loss, 1.0 when
    balanced), `z_loss`, `load` (E,) fraction of assignments per expert, `dropped`
    (fraction of assignments dropped; for expert choice, of tokens left with no expert),
    `entropy` (mean router entropy, nats), and the sums the compression pass
    accumulates over calibration data: `routed` (E,) assignments each expert
    actually processed (after capacity) and `gate_mass` (E,) the sum of their gates.
    """
    plan = make_plan(logits, router=router, top_k=top_k, capacity_factor=capacity_factor)
    return plan, statistics(logits, plan, router)


def make_plan(logits: jax.Array, *, router: str, top_k: int, capacity_factor: float) -> RoutingPlan:
    """The RoutingPlan of router logits (G, S, E); every group is routed on its own."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose one of {ROUTERS}")
    groups, tokens, num_experts = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    if router == "expert_choice":
        return _expert_choice(probs, capacity(tokens, num_experts, top_k, capacity_factor))
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the number of experts {num_experts}")
    cap = tokens if router == "dropless" else capacity(tokens, num_experts, top_k, capacity_factor)
    return _token_choice(probs, top_k, cap)


def statistics(logits: jax.Array, plan: RoutingPlan, router: str) -> dict[str, jax.Array]:
    """`route`'s statistics of the groups in `logits` (G, S, E) and their `plan`.

    Every value is a mean or a sum over groups, so the statistics of a subset of the
    groups (one modality's images, `segment`) are this function of that subset.
    """
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    if router == "expert_choice":
        assigned = plan.gate > 0
        load = jnp.sum(assigned, axis=(0, 1)) / jnp.maximum(jnp.sum(assigned), 1)
        dropped = jnp.mean(~jnp.any(assigned, axis=-1))
        balance = jnp.zeros((), jnp.float32)  # balanced by construction
    else:
        chosen = jax.nn.one_hot(plan.expert_index, num_experts, dtype=jnp.float32)  # (G,S,K,E)
        load = jnp.mean(chosen, axis=(0, 1, 2))
        dropped = jnp.mean(plan.slot >= plan.capacity)
        # Switch loss on first choices: E * sum_e fraction_e * mean_prob_e, per group.
        fraction = jnp.mean(chosen[:, :, 0], axis=1)
        balance = num_experts * jnp.mean(jnp.sum(fraction * jnp.mean(probs, axis=1), axis=-1))
    return {
        "load_balance": balance,
        "z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
        "load": load,
        "dropped": dropped.astype(jnp.float32),
        "entropy": -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1)),
        "routed": jnp.sum(_per_expert(plan, plan.gate > 0, num_experts), axis=(0, 1)),
        "gate_mass": jnp.sum(_per_expert(plan, plan.gate, num_experts), axis=(0, 1)),
    }


def segment(groups, index: int, count: int):
    """Groups index, index + count, index + 2 * count, ... of every (G, ...) array in
    `groups` (logits, a RoutingPlan): one modality's images in a batch that interleaves
    `count` modalities image by image (`ringmoe.model.ringmoe`)."""
    if count == 1:
        return groups
    pick = lambda a: a.reshape(-1, count, *a.shape[1:])[:, index]  # noqa: E731
    return jax.tree.map(lambda a: a if isinstance(a, int) else pick(a), groups)   # a plan's capacity stays


def _per_expert(plan: RoutingPlan, values: jax.Array, num_experts: int) -> jax.Array:
    """(G, S, K) values of each assignment summed into their experts: (G, S, E)."""
    return jnp.einsum("gske,gsk->gse", jax.nn.one_hot(plan.expert_index, num_experts, dtype=jnp.float32),
                      values.astype(jnp.float32))


def _token_choice(probs: jax.Array, top_k: int, cap: int) -> RoutingPlan:
    groups, tokens, num_experts = probs.shape
    gate, index = jax.lax.top_k(probs, top_k)
    if top_k > 1:
        gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    # Slot = number of earlier assignments to the same expert, counting all first
    # choices of the group before any second choice (GShard priority order).
    onehot = jax.nn.one_hot(index, num_experts, dtype=jnp.int32)          # (G,S,K,E)
    priority = jnp.swapaxes(onehot, 1, 2).reshape(groups, top_k * tokens, num_experts)
    position = jnp.cumsum(priority, axis=1) - 1
    position = jnp.swapaxes(position.reshape(groups, top_k, tokens, num_experts), 1, 2)
    slot = jnp.sum(position * onehot, axis=-1).astype(jnp.int32)
    gate = jnp.where(slot < cap, gate, 0.0)
    return RoutingPlan(index.astype(jnp.int32), gate, slot, cap)


def _expert_choice(probs: jax.Array, cap: int) -> RoutingPlan:
    groups, tokens, num_experts = probs.shape
    score, token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), cap)          # (G,E,C)
    g = jnp.arange(groups)[:, None, None]
    e = jnp.arange(num_experts)[None, :, None]
    rank = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), token.shape)
    slot = jnp.full((groups, num_experts, tokens), cap, jnp.int32).at[g, e, token].set(rank)
    gate = jnp.zeros((groups, num_experts, tokens), probs.dtype).at[g, e, token].set(score)
    index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (groups, tokens, num_experts))
    return RoutingPlan(index, jnp.swapaxes(gate, 1, 2), jnp.swapaxes(slot, 1, 2), cap)
