"""RS-MoE: an instruction router over lightweight language-model experts, reading RingMoE's features.

    vision tokens (B, S, C) --QueryTransformer--> visual queries (B, Q, E)
    instruction tokens (B, T) --expert 0's embedding--> (B, T, E)
    InstructionRouter(instruction, visual queries) -> top-k experts with weights, and for
        every expert its own soft prompt (B, K, P, E) conditioned on the instruction
    expert k reads [visual queries | its prompt | instruction | answer so far] and writes
        the answer (caption part or VQA answer)

A task is split into sub-tasks, one instruction each (for a caption: its aspects,
`data.grounding.ASPECTS`: composition, layout, objects; for VQA: the question), so
the router can hand different aspects to different experts; a caption is the
sub-tasks' answers in order, each written by its top expert.

Training (`loss`): every expert is run on every row and its answer's cross-entropy
weighted by the router's top-k gate (0 for the experts not chosen), plus the
router's load-balance and z-losses (the vision MoE's, `model/router.py`).
Running all K experts is K times the compute of the chosen ones: fine at the tiny
scale this module is exercised at, and the thing to replace by capacity-based
dispatch (`model/dispatch.py`) before the 1B config trains.

The experts are one `LanguageModel` vmapped over a leading `expert` axis (logical
name "expert", which the rules table maps to the `expert` mesh axis).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.sharding import partitioned
from ringmoe.text.llama import LanguageModel, LMSpec

INIT = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class RSMoESpec:
    lm: LMSpec
    vision_dim: int              # channels of the encoder's last-stage tokens
    num_experts: int = 3
    top_k: int = 1
    num_queries: int = 16        # visual queries (InstructBLIP uses 32)
    query_layers: int = 2
    query_heads: int = 4
    prompt_length: int = 4       # soft-prompt vectors per expert


class QueryTransformer(nnx.Module):
    """Learned queries that cross-attend to the vision tokens, then attend to each other (a
    Q-Former without its text branch); out: (B, Q, E) in the language model's width."""

    def __init__(self, spec: RSMoESpec, *, rngs: nnx.Rngs):
        d = spec.lm.hidden_size
        self.queries = nnx.Param(INIT(rngs.params(), (spec.num_queries, d)))
        self.vision = nnx.Linear(spec.vision_dim, d, rngs=rngs)
        self.layers = nnx.List([_QueryLayer(d, spec.query_heads, rngs=rngs) for _ in range(spec.query_layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, vision_tokens: jax.Array) -> jax.Array:
        memory = self.vision(vision_tokens)
        x = jnp.broadcast_to(self.queries[...], (memory.shape[0], *self.queries.shape))
        for layer in self.layers:
            x = layer(x, memory)
        return self.norm(x)


class _QueryLayer(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.cross_norm, self.self_norm, self.mlp_norm = (nnx.LayerNorm(d, rngs=rngs) for _ in range(3))
        self.cross = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.attend = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.mlp_in, self.mlp_out = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, memory):
        x = x + self.cross(self.cross_norm(x), memory)
        y = self.self_norm(x)
        x = x + self.attend(y, y)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x)), approximate=False))


@dataclasses.dataclass
class Routing:
    probs: jax.Array       # (B, K) router softmax
    gates: jax.Array       # (B, K) top-k probabilities renormalised, 0 elsewhere
    prompts: jax.Array     # (B, K, P, E) each expert's soft prompt for this instruction
    load_balance: jax.Array
    z_loss: jax.Array


class InstructionRouter(nnx.Module):
    """Chooses experts from the instruction and the visual queries, and writes each expert's soft
    prompt: a learned base prompt per expert, modulated by the instruction (FiLM: scale and shift
    per expert from the pooled instruction and image)."""

    def __init__(self, spec: RSMoESpec, *, rngs: nnx.Rngs):
        d, k, p = spec.lm.hidden_size, spec.num_experts, spec.prompt_length
        self.top_k = spec.top_k
        self.gate = nnx.Param(partitioned(INIT, "embed", "expert")(rngs.params(), (2 * d, k)))
        self.base = nnx.Param(partitioned(INIT, "expert", None, "embed")(rngs.params(), (k, p, d)))
        self.film = nnx.Param(partitioned(nnx.initializers.zeros, "expert", None, "embed")(
            rngs.params(), (k, 2 * d, 2 * d)))

    def __call__(self, instruction: jax.Array, valid: jax.Array, visual: jax.Array) -> Routing:
        weights = valid[..., None].astype(instruction.dtype)
        pooled = jnp.concatenate([(instruction * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0),
                                  visual.mean(1)], -1)                                   # (B, 2E)
        logits = pooled @ self.gate[...]
        probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
        top, chosen = jax.lax.top_k(probs, self.top_k)
        gates = jnp.zeros_like(probs).at[jnp.arange(probs.shape[0])[:, None], chosen].set(
            top / top.sum(-1, keepdims=True))
        scale, shift = jnp.split(jnp.einsum("bc,kcf->bkf", pooled, self.film[...]), 2, -1)   # (B, K, E) each
        prompts = self.base[...][None] * (1 + scale[:, :, None]) + shift[:, :, None]
        k = probs.shape[-1]
        load = jnp.mean(gates > 0, 0)          # share of rows each expert is chosen for
        load_balance = k * jnp.sum(load * probs.mean(0)) / self.top_k
        z_loss = jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1) ** 2)
        return Routing(probs, gates, prompts, load_balance, z_loss)


class RSMoE(nnx.Module):
    def __init__(self, spec: RSMoESpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.queries = QueryTransformer(spec, rngs=rngs)
        self.router = InstructionRouter(spec, rngs=rngs)

        @nnx.split_rngs(splits=spec.num_experts)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "expert"})
        def experts(rngs):
            return LanguageModel(spec.lm, rngs=rngs)
        self.experts = experts(rngs)

    def logits(self, vision_tokens, instruction, instruction_valid, answer, answer_valid):
        """Every expert's next-token logits over the answer (B, K, A, V), and the routing.

        Expert k reads [visual queries (Q) | its prompt (P) | instruction (T) | answer (A)]; the
        logits at answer position a predict answer token a + 1 (position a - 1's for token a)."""
        spec = self.spec
        visual = self.queries(vision_tokens)
        table = self.experts.embed[...][0]          # the instruction in expert 0's (the upcycled source's) table
        embedded = table.astype(jnp.dtype(spec.lm.dtype))[instruction]
        routing = self.router(embedded, instruction_valid, visual)
        b = answer.shape[0]
        valid = jnp.concatenate([jnp.ones((b, spec.num_queries + spec.prompt_length), bool), instruction_valid,
                                 answer_valid], 1)

        def one(lm, prompt):
            x = jnp.concatenate([visual.astype(prompt.dtype), prompt, lm.embed_tokens(instruction),
                                 lm.embed_tokens(answer)], 1)
            return lm.forward_embeddings(x, valid=valid)[:, -answer.shape[1] - 1:-1]
        logits = _expert_call(self.experts, one, jnp.moveaxis(routing.prompts, 1, 0))
        return jnp.moveaxis(logits, 0, 1), routing

    def loss(self, vision_tokens, instruction, instruction_valid, answer, answer_valid,
             balance_weight: float = 1e-2, z_weight: float = 1e-3) -> tuple[jax.Array, dict]:
        """Gate-weighted answer cross-entropy + router losses; metrics per expert."""
        logits, routing = self.logits(vision_tokens, instruction, instruction_valid, answer, answer_valid)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), answer[:, None, :, None], -1)[..., 0]
        mask = answer_valid[:, None, :].astype(jnp.float32)
        per_expert = (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)          # (B, K)
        answer_loss = jnp.mean(jnp.sum(routing.gates * per_expert, -1))
        total = answer_loss + balance_weight * routing.load_balance + z_weight * routing.z_loss
        metrics = {"answer_nll": answer_loss, "load_balance": routing.load_balance, "z_loss": routing.z_loss,
                   "expert_load": jnp.mean(routing.gates > 0, 0), "expert_prob": routing.probs.mean(0)}
        return total, metrics


def _expert_call(experts, fn, per_expert):
    """fn(one expert, its slice of `per_expert`) for every expert (vmapped over the stacked axis)."""
    @nnx.vmap(in_axes=(0, 0), out_axes=0)
    def call(lm, arg):
        return fn(lm, arg)
    return call(experts, per_expert)
