"""Expert groups: stacked expert FFNs behind a router.

`Experts` stores E feed-forward networks as stacked weights whose leading axis
is the logical `expert` axis, so expert parallelism is a sharding rule, not code.
`RoutedExperts` is one router plus its experts; the hierarchical MoE layer
(`moe.py`) holds one per modality (modal-specialised experts) and one shared by
all modalities (collaborative experts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.model import dispatch
from ringmoe.model.ffn import DEFAULT_INIT
from ringmoe.model.router import Router, make_plan, policy, segment, statistics
from ringmoe.sharding import cast_sharded, partitioned


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

    def weights(self) -> tuple[jax.Array, ...]:
        """The four weight arrays in the compute dtype (cast before any FSDP gather)."""
        return tuple(cast_sharded(p, self.dtype) for p in (self.w_in, self.b_in, self.w_out, self.b_out))


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
        plan = make_plan(logits, router=self.policy, top_k=self.top_k, capacity_factor=self.capacity_factor,
                         bias=self.router.selection_bias())
        stats = tuple(statistics(segment(logits, i, segments), segment(plan, i, segments), self.policy)
                      for i in range(segments))
        y = dispatch.run(self.dispatch, self.experts.weights(), x.astype(self.experts.dtype), plan)
        return y, stats
