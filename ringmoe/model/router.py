"""Routers: which experts each token goes to, with what gate, in which buffer slot.

Tokens are routed in groups (one group = the tokens of one image): capacity,
balance statistics and expert choice are all per group, so routing never needs
tokens from another device. The policies (`config.model.moe.router`), one small
class each in `ROUTERS`:

* `token_choice` (the reference): each token picks its top-k experts; expert e
  takes at most C = ceil(capacity_factor * S * k / E) tokens per group, first
  choices before second choices, in token order; overflow tokens are dropped
  (their gate is 0 and the residual carries them).
* `dropless`: token choice with C = S, so no token is ever dropped.
* `expert_choice` (Zhou et al. 2022): each expert picks its top-C tokens,
  C = ceil(capacity_factor * S * k / E); a token may get 0..E experts.
* `loss_free_bias` (Wang et al. 2024, DeepSeek-V3): token choice whose top-k is
  taken over the probabilities plus a per-expert bias; the gates stay the plain
  probabilities. The bias is no trained weight: after each step it moves by
  `moe.bias_update_rate` towards balance, up for experts below the mean load and
  down for those above (`update_bias`), so the load balances without an
  auxiliary loss pulling on the router's weights.

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


INIT_STD = 0.02   # std of a fresh router kernel's entries


class Router(nnx.Module):
    """Bias-free linear map from a token to one logit per expert (no router noise).

    With `selection_bias` it also holds `bias` (E,), added to the probabilities to
    select experts (never to the gates) and set by `update_bias`, not by gradients.
    """

    def __init__(self, dim: int, num_experts: int, *, rngs: nnx.Rngs, selection_bias: bool = False):
        self.kernel = nnx.Param(partitioned(nnx.initializers.normal(INIT_STD), "embed", None)(
            rngs.params(), (dim, num_experts), jnp.float32))
        self.bias = (nnx.Param(partitioned(nnx.initializers.zeros, None)(rngs.params(), (num_experts,), jnp.float32))
                     if selection_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        return router_logits(self.kernel[...], x)

    def selection_bias(self) -> jax.Array | None:
        """The bias added to the probabilities for selection (no gradient), or None."""
        return None if self.bias is None else jax.lax.stop_gradient(self.bias[...])


def router_logits(kernel: jax.Array, x: jax.Array) -> jax.Array:
    """Tokens x (G, S, D) -> logits (G, S, E), in float32 whatever the compute dtype:
    routing decisions are made in float32."""
    return jnp.einsum("gsd,de->gse", x.astype(jnp.float32), kernel)


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def route(logits: jax.Array, *, router: str, top_k: int, capacity_factor: float,
          bias: jax.Array | None = None) -> tuple[RoutingPlan, dict[str, jax.Array]]:
    """Turns router logits (G, S, E) into a RoutingPlan plus losses and statistics.

    The returned dict (`statistics`) holds `load_balance` (Switch loss, 1.0 when
    balanced), `z_loss`, `load` (E,) fraction of assignments per expert, `dropped`
    (fraction of assignments dropped; for expert choice, of tokens left with no expert),
    `entropy` (mean router entropy, nats), and the sums the compression pass
    accumulates over calibration data: `routed` (E,) assignments each expert
    actually processed (after capacity) and `gate_mass` (E,) the sum of their gates.
    `bias`: the selection bias of a `loss_free_bias` router.
    """
    plan = make_plan(logits, router=router, top_k=top_k, capacity_factor=capacity_factor, bias=bias)
    return plan, statistics(logits, plan, router)


def policy(name: str):
    """The registered router policy `name`; unknown names are errors."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {tuple(ROUTERS)}")
    return ROUTERS[name]


def make_plan(logits: jax.Array, *, router: str, top_k: int, capacity_factor: float,
              bias: jax.Array | None = None) -> RoutingPlan:
    """The RoutingPlan of router logits (G, S, E); every group is routed on its own."""
    chosen = policy(router)
    if chosen.selection_bias != (bias is not None):
        raise ValueError(f"router {router!r} " + ("needs" if chosen.selection_bias else "takes no")
                         + " selection bias")
    probs = jax.nn.softmax(logits, axis=-1)
    return chosen.plan(probs, top_k, capacity_factor, bias)


def statistics(logits: jax.Array, plan: RoutingPlan, router: str) -> dict[str, jax.Array]:
    """`route`'s statistics of the groups in `logits` (G, S, E) and their `plan`.

    Every value is a mean or a sum over groups, so the statistics of a subset of the
    groups (one modality's images, `segment`) are this function of that subset.
    """
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    load, dropped, balance = policy(router).balance(probs, plan)
    return {
        "load_balance": balance,
        "z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
        "load": load,
        "dropped": dropped.astype(jnp.float32),
        "entropy": -jnp.mean(jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1)),
        "routed": jnp.sum(_per_expert(plan, plan.gate > 0, num_experts), axis=(0, 1)),
        "gate_mass": jnp.sum(_per_expert(plan, plan.gate, num_experts), axis=(0, 1)),
    }


def update_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """One loss-free balancing update: b_e += rate * sign(mean load - load_e).

    `load` (..., E): the fraction of assignments each expert was chosen for (before
    capacity), the error the bias corrects; a leading axis (stacked layers) is kept.
    """
    return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def by_segment(groups, count: int):
    """Every (G, ...) array in `groups` (logits, a RoutingPlan) as (count, G / count, ...):
    row i holds groups i, i + count, i + 2 * count, ..., one modality's images in a batch
    that interleaves `count` modalities image by image (`ringmoe.model.ringmoe`)."""
    pick = lambda a: jnp.swapaxes(a.reshape(-1, count, *a.shape[1:]), 0, 1)  # noqa: E731
    return jax.tree.map(lambda a: a if isinstance(a, int) else pick(a), groups)   # a plan's capacity stays


def segment_statistics(logits: jax.Array, plan: RoutingPlan, router: str, count: int) -> tuple[dict, ...]:
    """`statistics` of each of `count` segments (`by_segment`), one dict per segment.

    One vmapped computation over the segment axis rather than `count` copies of it: the
    same numbers, a `count`-times smaller program (these reductions were about a third
    of a tiny MoE block's compiled operations)."""
    logits, plan = by_segment((logits, plan), count)
    capacity_ = plan.capacity
    batched = jax.vmap(lambda l, e, g, s: statistics(l, RoutingPlan(e, g, s, capacity_), router))(
        logits, plan.expert_index, plan.gate, plan.slot)
    return tuple({k: v[i] for k, v in batched.items()} for i in range(count))


def _per_expert(plan: RoutingPlan, values: jax.Array, num_experts: int) -> jax.Array:
    """(G, S, K) values of each assignment summed into their experts: (G, S, E)."""
    return jnp.einsum("gske,gsk->gse", jax.nn.one_hot(plan.expert_index, num_experts, dtype=jnp.float32),
                      values.astype(jnp.float32))


class TokenChoice:
    """Each token picks its top-k experts; capacity C per expert and group (module docstring)."""
    selection_bias = False

    def capacity(self, tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
        return capacity(tokens, num_experts, top_k, capacity_factor)

    def plan(self, probs, top_k, capacity_factor, bias=None) -> RoutingPlan:
        groups, tokens, num_experts = probs.shape
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds the number of experts {num_experts}")
        scores = probs if bias is None else probs + bias
        return _token_choice(probs, scores, top_k, self.capacity(tokens, num_experts, top_k, capacity_factor))

    def uniform_gate_sum(self, num_experts: int, top_k: int, capacity_factor: float) -> float:
        """A token's gates summed, when every expert is equally likely and nothing is dropped:
        top-1 keeps the probability 1/E; top-k >= 2 renormalises its k gates to sum to 1."""
        return 1.0 / num_experts if top_k == 1 else 1.0

    def balance(self, probs, plan):
        """(load (E,) over all assignments, dropped fraction, Switch loss on first choices)."""
        num_experts = probs.shape[-1]
        chosen = jax.nn.one_hot(plan.expert_index, num_experts, dtype=jnp.float32)  # (G,S,K,E)
        load = jnp.mean(chosen, axis=(0, 1, 2))
        dropped = jnp.mean(plan.slot >= plan.capacity)
        # Switch loss on first choices: E * sum_e fraction_e * mean_prob_e, per group.
        fraction = jnp.mean(chosen[:, :, 0], axis=1)
        switch = num_experts * jnp.mean(jnp.sum(fraction * jnp.mean(probs, axis=1), axis=-1))
        return load, dropped, switch


class Dropless(TokenChoice):
    """Token choice with C = S: no token is ever dropped."""

    def capacity(self, tokens, num_experts, top_k, capacity_factor) -> int:
        return tokens


class LossFreeBias(TokenChoice):
    """Token choice selecting by probabilities + a balancing bias; gates are the probabilities."""
    selection_bias = True


class ExpertChoice:
    """Each expert picks its top-C tokens per group; balanced by construction."""
    selection_bias = False

    def plan(self, probs, top_k, capacity_factor, bias=None) -> RoutingPlan:
        groups, tokens, num_experts = probs.shape
        return _expert_choice(probs, capacity(tokens, num_experts, top_k, capacity_factor))

    def uniform_gate_sum(self, num_experts: int, top_k: int, capacity_factor: float) -> float:
        """A token's gates summed on average when every expert is equally likely: the E experts
        take C = capacity_factor * S * k / E tokens each, so a token has capacity_factor * k
        experts on average, each with gate 1/E (an average only: how many experts a token
        gets varies)."""
        return capacity_factor * top_k / num_experts

    def balance(self, probs, plan):
        """(load (E,) over chosen pairs, fraction of tokens with no expert, 0)."""
        assigned = plan.gate > 0
        load = jnp.sum(assigned, axis=(0, 1)) / jnp.maximum(jnp.sum(assigned), 1)
        dropped = jnp.mean(~jnp.any(assigned, axis=-1))
        return load, dropped, jnp.zeros((), jnp.float32)


ROUTERS = {"token_choice": TokenChoice(), "dropless": Dropless(), "expert_choice": ExpertChoice(),
           "loss_free_bias": LossFreeBias()}


def _token_choice(probs: jax.Array, scores: jax.Array, top_k: int, cap: int) -> RoutingPlan:
    """Top-k of `scores` per token, gated by `probs` (the same array unless biased)."""
    groups, tokens, num_experts = probs.shape
    _, index = jax.lax.top_k(scores, top_k)
    gate = jnp.take_along_axis(probs, index, axis=-1)
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
