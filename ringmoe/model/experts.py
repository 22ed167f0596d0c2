"""Expert groups: stacked expert FFNs behind a router.

`Experts` stores E feed-forward networks as stacked weights whose leading axis
is the logical `expert` axis, so expert parallelism is a sharding rule, not code.
`RoutedExperts` is one router plus its experts; the hierarchical MoE layer
(`moe.py`) holds one per modality (modal-specialised experts) and one shared by
all modalities (collaborative experts).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.model import dispatch
from ringmoe.model.ffn import DEFAULT_INIT
from ringmoe.model.router import (Router, RoutingPlan, by_segment, make_plan, policy, router_logits,
                                  segment_statistics)
from ringmoe.sharding import cast_sharded, partitioned, stack_sharded


class Experts(nnx.Module):
    """E independent FFNs: w_in (E, D, F), w_out (E, F, D) and their biases."""

    def __init__(self, num_experts: int, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        init = lambda *names: partitioned(DEFAULT_INIT, *names)  # noqa: E731
        zeros = lambda *names: partitioned(nnx.initializers.zeros, *names)  # noqa: E731
        self.w_in = nnx.Param(init("expert", "embed", "mlp")(rngs.params(), (num_experts, dim, hidden)))
        self.b_in = nnx.Param(zeros("expert", "mlp")(rngs.params(), (num_experts, hidden)))
        self.w_out = nnx.Param(init("expert", "mlp", "embed")(rngs.params(), (num_experts, hidden, dim)))
        self.b_out = nnx.Param(zeros("expert", "embed")(rngs.params(), (num_experts, dim)))

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    WEIGHTS = ("w_in", "b_in", "w_out", "b_out")   # the order `dispatch` takes them in

    def weights(self) -> tuple[jax.Array, ...]:
        """The four weight arrays in the compute dtype (cast before any FSDP gather)."""
        return tuple(cast_sharded(getattr(self, name), self.dtype) for name in self.WEIGHTS)


class RoutedExperts(nnx.Module):
    """A router and the experts it routes over; tokens (G, S, D) -> (G, S, D)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, moe_config, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.router = Router(dim, num_experts, rngs=rngs,
                             selection_bias=policy(moe_config.router).selection_bias)
        self.experts = Experts(num_experts, dim, hidden, dtype=dtype, rngs=rngs)
        self.policy = moe_config.router
        self.top_k = min(moe_config.top_k, num_experts)
        self.capacity_factor = moe_config.capacity_factor
        self.dispatch = moe_config.dispatch

    def __call__(self, x: jax.Array, segments: int = 1) -> tuple[jax.Array, tuple[dict[str, jax.Array], ...]]:
        """Tokens x (G, S, D), one routing group per image -> (y (G, S, D), statistics).

        The statistics are `route`'s, one dict per segment: a batch that interleaves
        `segments` modalities image by image gets each modality's own statistics (the
        routing itself is per group, so it is the same whatever the segments).
        """
        logits = self.router(x)
        plan = self.plan(logits, self.router.selection_bias())
        return self.apply(x, plan), segment_statistics(logits, plan, self.policy, segments)

    def plan(self, logits: jax.Array, bias: jax.Array | None) -> RoutingPlan:
        """This group's routing of router logits (G, S, E); `bias` broadcasts against them."""
        return make_plan(logits, router=self.policy, top_k=self.top_k, capacity_factor=self.capacity_factor,
                         bias=bias)

    def apply(self, x: jax.Array, plan: RoutingPlan) -> jax.Array:
        """The experts' gated sum for tokens x (G, S, D) routed by `plan`."""
        return dispatch.run(self.dispatch, self.experts.weights(), x.astype(self.experts.dtype), plan)


def route_by_modality(groups: Sequence[RoutedExperts], x: jax.Array, *, loop: bool = False
                      ) -> tuple[jax.Array, tuple[dict, ...]]:
    """Tokens x (G, S, D) interleaving len(groups) modalities image by image, image b of
    modality i at x[b * len(groups) + i], each routed by its own modality's `groups[i]`
    (modal-specialised experts) -> (y (G, S, D), statistics per modality).

    Each modality's router sees only its own images and its experts compute only their
    tokens. The routers run vmapped over the modality axis and the plan and statistics
    are computed once for all groups; the experts' weights are stacked over the modality
    axis (cast and pinned to their sharding as one array). One copy of the program
    whatever the number of modalities, run one of two ways (`model.moe.modal_experts_loop`):

    * vmapped (`loop=False`): one batched matmul over (modality, expert) per expert
      layer. The faster step: the base config's train step (batch 8) on a 2-core CPU
      took 6.57 s against 8.71 s looped (medians of 6, both in one process, alternating;
      README "Against the code before issue 16").
    * looped (`loop=True`, `jax.lax.map`): one modality's experts at a time, so under
      FSDP one modality's experts are gathered at a time. The loop stacks each
      modality's activations for the backward pass and slices them out again (the
      data movement that slows the CPU step), but at 14.7B it holds less and the TPU
      compiles it sooner: h100-64 6.00 GB of temporaries per device against 9.16 GB
      vmapped, v5p-128 compiled in 4.6 against 6.8 minutes (`tools.aot`, README
      "Running on a pod")."""
    count, first = len(groups), groups[0]
    per_modality = by_segment(x, count)                                   # (count, G / count, S, D)
    kernels = jnp.stack([g.router.kernel[...] for g in groups])
    logits = jnp.swapaxes(jax.vmap(router_logits)(kernels, per_modality), 0, 1)   # (G / count, count, S, E)
    logits = logits.reshape(-1, *logits.shape[2:])                        # (G, S, E), interleaved as x
    bias = None
    if first.router.bias is not None:   # group b * count + i gets modality i's selection bias
        biases = jnp.stack([g.router.selection_bias() for g in groups])  # (count, E)
        bias = jnp.tile(biases, (logits.shape[0] // count, 1))[:, None, :]   # (G, 1, E)
    plan = first.plan(logits, bias)
    weights = tuple(stack_sharded([getattr(g.experts, name) for g in groups], first.experts.dtype)
                    for name in Experts.WEIGHTS)

    def apply(weights, x, expert_index, gate, slot):
        return dispatch.run(first.dispatch, weights, x.astype(first.experts.dtype),
                            RoutingPlan(expert_index, gate, slot, plan.capacity))

    own = by_segment(plan, count)
    operands = (weights, per_modality, own.expert_index, own.gate, own.slot)
    y = jax.lax.map(lambda a: apply(*a), operands) if loop else jax.vmap(apply)(*operands)
    return jnp.swapaxes(y, 0, 1).reshape(x.shape), segment_statistics(logits, plan, first.policy, count)
