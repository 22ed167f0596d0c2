"""Ways to send routed tokens through their experts (`PATHS`), one switch between them.

All take tokens x (G, S, D), stacked expert weights and a `RoutingPlan`, and
return sum_k gate_k * expert_{e_k}(x) per token (G, S, D). With no token
dropped they agree to rounding; with dropping they agree exactly too, because
every path zeroes the same dropped assignments.

* `einsum` (GShard / V-MoE, the reference): one-hot dispatch and combine
  tensors (G, S, E, C) contracted with the tokens. Simple and GSPMD-friendly,
  but the contraction costs O(S * E * C * D), which dominates for large groups.
* `sort`: gather each expert's tokens into a padded (E, G, C, D) buffer by
  index, one batched matmul per layer, gather the results back. No wasted
  FLOPs besides the capacity padding; the fastest path on CPU.
* `ragged`: sort the kept assignments by expert and run `jax.lax.ragged_dot`
  grouped matmuls over at most min(S*K, E*C) rows per group (dropless by
  nature; dropped and unchosen pairs are never rows). On the CPU it ran ~16x
  slower than a dense matmul (DESIGN.md s.3), and its GPU lowering in jax 0.10
  is reported to be a padded dense matmul (tools/gpu_check.sh measures it).
* `tokamax`: the same rows through `tokamax.ragged_dot`, DeepMind's grouped-matmul
  kernels (Pallas Mosaic on sm90 / sm100 GPUs and TPUs, Triton elsewhere on GPU,
  XLA's `ragged_dot` as its fallback on every backend, the CPU included). A
  Pallas call has no partitioning rule: under a mesh that splits the rows, GSPMD
  gathers its operands, so it is a single-device path for now.

Expert FFN rows per group: E*C on `einsum` and `sort` (the padded buffer), at
most min(S*K, E*C) on `ragged` and `tokamax`. Under expert choice every slot is
a chosen token, so all paths compute exactly E*C rows even though the plan lists all E
experts per token (`tools.bench moe` reports the rows of each path).

Under a mesh the (E, G, C, D) buffers of `einsum` and `sort` are constrained
to be split over the `expert` axis and their groups over the data axes, so
GSPMD inserts the all-to-all and every device runs its experts on its own share
of the tokens. `sort` gathers and scatters per group (vmapped), so the
partitioner keeps each group's tokens on the devices that hold the group.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging

import jax
import jax.numpy as jnp

from ringmoe.model.ffn import gelu
from ringmoe.model.router import RoutingPlan
from ringmoe.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Measurement:
    """`tools.bench moe` on one backend: forward + backward of the base config's deepest MoE
    layer per path, as a ratio to a dense FFN of the same active FLOPs (lower is faster)."""
    ratios: dict[str, float]
    source: str                 # the command, the device, the dtype, the JAX version and the date

    @property
    def fastest(self) -> str:
        return min(self.ratios, key=self.ratios.get)


# What `auto` picks, per backend, from measurements: tools/gpu_check.sh prints the row to add
# for an accelerator. A backend without a row gets UNMEASURED_PATH and a logged warning.
MEASURED: dict[str, Measurement] = {
    "cpu": Measurement(
        ratios={"einsum": 1.15, "sort": 1.05, "ragged": 2.59, "tokamax": 2.62},
        source="python -m tools.bench moe --config configs/base.py (float32, batch 8, token choice "
               "top-1); 2-core x86-64 host, jax 0.10.2, tokamax 0.0.12 (its XLA fallback), 2026-12-04"),
}
# Batched dense matmuls over a padded buffer: no grouped-GEMM lowering to trust, and the
# fastest path wherever it was measured.
UNMEASURED_PATH = "sort"


def default_path(backend: str | None = None) -> str:
    """The `auto` choice for `backend` (default: JAX's): the fastest path measured there."""
    backend = backend or jax.default_backend()
    if backend in MEASURED:
        return MEASURED[backend].fastest
    _warn_unmeasured(backend)
    return UNMEASURED_PATH


@functools.cache
def _warn_unmeasured(backend: str) -> None:
    logging.getLogger("ringmoe.dispatch").warning("MoE dispatch auto: no measurement for backend %r in ringmoe/model/dispatch.py "
                    "MEASURED; using %r. Run tools/gpu_check.sh there and add its row.", backend, UNMEASURED_PATH)


def resolve(path: str, backend: str | None = None) -> str:
    """The path a configured `model.moe.dispatch` runs on `backend` (default: JAX's)."""
    return default_path(backend) if path == "auto" else path


def run(path: str, weights, x: jax.Array, plan: RoutingPlan) -> jax.Array:
    path = resolve(path)
    if path not in PATHS:
        raise ValueError(f"unknown MoE dispatch {path!r}; choose auto or one of {tuple(PATHS)}")
    missing = unavailable(path)
    if missing:
        raise ValueError(f"MoE dispatch {path!r} cannot run here: {missing}")
    return PATHS[path](weights, x, plan)


def unavailable(path: str) -> str | None:
    """Why `path` cannot run in this environment (a library it needs does not import), or None."""
    for module in _NEEDS.get(path, ()):
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"{module} does not import ({type(e).__name__}: {e}); pip install -r requirements.txt"
    return None


def _expert_ffn(weights, xe: jax.Array) -> jax.Array:
    """Applies expert e to row block xe[e]: (E, N, D) -> (E, N, D)."""
    w_in, b_in, w_out, b_out = weights
    h = gelu(jnp.einsum("end,edf->enf", xe, w_in) + b_in[:, None])
    h = constrain(h, "act_expert", "batch", "act_mlp")   # tokens stay split: no gather of the batch
    return jnp.einsum("enf,efd->end", h, w_out) + b_out[:, None]


def _through_experts(weights, buffer: jax.Array) -> jax.Array:
    """(E, G, C, D) expert-major buffer -> expert outputs of the same shape."""
    num_experts, groups, cap, dim = buffer.shape
    buffer = constrain(buffer, "act_expert", "batch", None, "act_embed")
    out = _expert_ffn(weights, buffer.reshape(num_experts, groups * cap, dim))
    return constrain(out.reshape(buffer.shape), "act_expert", "batch", None, "act_embed")


def einsum(weights, x: jax.Array, plan: RoutingPlan) -> jax.Array:
    num_experts = weights[0].shape[0]
    onehot_e = jax.nn.one_hot(plan.expert_index, num_experts, dtype=x.dtype)      # (G,S,K,E)
    onehot_c = jax.nn.one_hot(plan.slot, plan.capacity, dtype=x.dtype)             # (G,S,K,C); 0 if dropped
    dispatch_mask = jnp.einsum("gske,gskc->gsec", onehot_e, onehot_c)
    combine = jnp.einsum("gske,gskc,gsk->gsec", onehot_e, onehot_c, plan.gate.astype(x.dtype))
    out = _through_experts(weights, jnp.einsum("gsec,gsd->egcd", dispatch_mask, x))
    return jnp.einsum("gsec,egcd->gsd", combine, out)


def sort(weights, x: jax.Array, plan: RoutingPlan) -> jax.Array:
    _, tokens, dim = x.shape
    num_experts, cap = weights[0].shape[0], plan.capacity

    def fill(x, expert_index, slot):
        """One group: (S, D) tokens -> (E, C, D) expert buffer."""
        # Which token fills each (expert, slot); empty slots point at an appended zero row.
        # Dropped assignments have slot >= cap and are discarded by mode="drop".
        token = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], slot.shape)
        slot_token = jnp.full((num_experts, cap), tokens, jnp.int32).at[expert_index, slot].set(token, mode="drop")
        return jnp.concatenate([x, jnp.zeros((1, dim), x.dtype)])[slot_token]

    def collect(out, expert_index, slot, gate):
        """One group: (E, C, D) expert outputs -> (S, D); dropped assignments read slot 0, gate 0."""
        picked = out[expert_index, jnp.minimum(slot, cap - 1)]                  # (S, K, D)
        return jnp.einsum("skd,sk->sd", picked, gate.astype(x.dtype))

    buffer = jnp.swapaxes(jax.vmap(fill)(x, plan.expert_index, plan.slot), 0, 1)   # (E, G, C, D)
    out = jnp.swapaxes(_through_experts(weights, buffer), 0, 1)                     # (G, E, C, D)
    out = constrain(out, "batch", None, None, "act_embed")   # back to the groups' devices: all-to-all
    return jax.vmap(collect)(out, plan.expert_index, plan.slot, plan.gate)


def ragged(weights, x: jax.Array, plan: RoutingPlan, grouped_matmul=jax.lax.ragged_dot) -> jax.Array:
    """Kept assignments sorted by expert through two grouped matmuls, combined token-major.

    Only kept assignments (slot < capacity) are rows: per group at most S*K (one
    per listed pair) and at most E*C (one per buffer slot), a static bound. This
    matters for expert choice, whose plan lists all E experts per token (K = E)
    of which only E*C per group are chosen: rows = G*E*C, not G*S*E. Rows left
    over when fewer assignments were kept (token dropping) join the last
    expert's group, so every row is well defined on every backend, and their
    outputs are discarded.
    """
    w_in, b_in, w_out, b_out = weights
    groups, tokens, dim = x.shape
    num_experts, top_k = w_in.shape[0], plan.expert_index.shape[-1]
    listed = groups * tokens * top_k
    rows = groups * min(tokens * top_k, num_experts * plan.capacity)
    kept = (plan.slot < plan.capacity).reshape(-1)
    key = jnp.where(kept, plan.expert_index.reshape(-1), num_experts)   # dropped pairs sort last, then are cut
    order = jnp.argsort(key, stable=True)[:rows]
    sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    sizes = sizes.at[-1].add(rows - jnp.sum(sizes))                    # padding rows: last expert, discarded
    sorted_experts = jnp.minimum(key[order], num_experts - 1)
    inputs = jnp.take(x.reshape(groups * tokens, dim), order // top_k, axis=0)
    h = gelu(grouped_matmul(inputs, w_in, sizes) + b_in[sorted_experts])
    y = grouped_matmul(h, w_out, sizes) + b_out[sorted_experts]
    # Back to (token, k) order; padding rows get distinct out-of-range targets and are dropped.
    target = jnp.where(key[order] < num_experts, order, listed + jnp.arange(rows))
    y = jnp.zeros((listed, dim), y.dtype).at[target].set(y, mode="drop", unique_indices=True)
    y = y.reshape(groups, tokens, top_k, dim)
    return jnp.einsum("gskd,gsk->gsd", y, plan.gate.astype(x.dtype))


def tokamax(weights, x: jax.Array, plan: RoutingPlan) -> jax.Array:
    """`ragged` with tokamax's grouped-matmul kernels (it picks the best one for the backend)."""
    import tokamax as tk
    from absl import flags
    if not flags.FLAGS.is_parsed():
        # tokamax reads its absl flags and, when no absl app parsed them, parses sys.argv
        # itself, which fails under any other entry point (pytest, a notebook). Its defaults.
        flags.FLAGS.mark_as_parsed()
    return ragged(weights, x, plan, grouped_matmul=tk.ragged_dot)


# The dispatch registry: name -> function(weights, x, plan), and the modules a path imports.
PATHS = {"einsum": einsum, "sort": sort, "ragged": ragged, "tokamax": tokamax}
_NEEDS = {"tokamax": ("tokamax",)}
