"""RS-MoE: an instruction router over lightweight language-model experts, reading RingMoE's features.

    vision tokens (B, S, C) --QueryTransformer--> visual queries (B, Q, E)
    instruction tokens (B, T) --expert 0's embedding--> (B, T, E)
    InstructionRouter(instruction [, visual queries]) -> top-k experts with weights, and for
        every expert its own soft prompt (B, K, P, E) conditioned on the instruction
    expert k reads [visual queries | its prompt | instruction | answer so far] and writes
        the answer (caption part or VQA answer)

A task is split into sub-tasks, one instruction each (for a caption: its aspects,
`data.grounding.ASPECTS`: composition, layout, objects; for VQA: the question), so
the router can hand different aspects to different experts; a caption is the
sub-tasks' answers in order, each written by its top expert.

Training (`loss`): each sub-task (a row) goes to its top-k experts, each expert
taking at most `capacity` = ceil(capacity_factor * rows * top_k / K) rows in row
order (the vision MoE's token-choice rule, `model/router.py`; a row over an expert's
capacity is dropped for that expert and counted in `dropped`). The experts run only
on the rows they hold, stacked (K, capacity, ...) and vmapped over the expert axis:
top_k * capacity_factor times one LM's compute, not K times. A row's loss is its
chosen experts' answer cross-entropies weighted by their gates, plus the router's
load-balance and z-losses.

The experts are one `LanguageModel` vmapped over a leading `expert` axis (logical
name "expert", which the rules table maps to the `expert` mesh axis).
"""
from __future__ import annotations

import dataclasses
import math

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
    capacity_factor: float = 1.5 # rows per expert: ceil(factor * rows * top_k / K)
    projector: str = "qformer"   # PROJECTORS: qformer (num_queries learned queries) | linear (every token)
    router_input: str = "instruction"   # ROUTER_INPUTS: what the gate reads
    prompt_input: str = "instruction"   # ROUTER_INPUTS: what the FiLM prompts read


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


class LinearProjector(nnx.Module):
    """Every vision token mapped into the language model's width (a linear map, then LayerNorm), as
    LLaVA's projector: the LM reads all S tokens instead of Q queries; out (B, S, E)."""

    def __init__(self, spec: RSMoESpec, *, rngs: nnx.Rngs):
        self.vision = nnx.Linear(spec.vision_dim, spec.lm.hidden_size, rngs=rngs)
        self.norm = nnx.LayerNorm(spec.lm.hidden_size, rngs=rngs)

    def __call__(self, vision_tokens: jax.Array) -> jax.Array:
        return self.norm(self.vision(vision_tokens))


# How the vision tokens reach the language model (`vlm.projector`).
PROJECTORS = {"qformer": QueryTransformer, "linear": LinearProjector}


@dataclasses.dataclass
class Routing:
    probs: jax.Array       # (B, K) router softmax
    gates: jax.Array       # (B, K) top-k probabilities renormalised, 0 elsewhere
    prompts: jax.Array     # (B, K, P, E) each expert's soft prompt for this instruction
    load_balance: jax.Array
    z_loss: jax.Array


def _pooled_instruction(instruction: jax.Array, valid: jax.Array) -> jax.Array:
    weights = valid[..., None].astype(instruction.dtype)
    return _unit_rms((instruction * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0))


def instruction_only(instruction: jax.Array, valid: jax.Array, visual: jax.Array) -> jax.Array:
    """The pooled instruction (B, E): rows asking the same thing are routed alike whatever the
    scene, so the split the router learns is a split of instructions (the paper's router)."""
    return _pooled_instruction(instruction, valid)


def instruction_and_image(instruction: jax.Array, valid: jax.Array, visual: jax.Array) -> jax.Array:
    """The pooled instruction and the pooled visual queries (B, 2E). Each half on one scale (unit
    RMS): token embeddings start at 0.02 and the visual queries leave a LayerNorm at ~1, so
    unnormalised the image would outvote the instruction 50:1. Once the queries carry the scene,
    rows may be split by scene rather than by what they ask (README, RS-MoE)."""
    return jnp.concatenate([_pooled_instruction(instruction, valid), _unit_rms(visual.mean(1))], -1)


# What the instruction router's gate (`vlm.router_input`) and its prompts (`vlm.prompt_input`) read:
# name -> (function, its width in LM widths).
ROUTER_INPUTS = {"instruction": (instruction_only, 1), "instruction_and_image": (instruction_and_image, 2)}


class InstructionRouter(nnx.Module):
    """Chooses experts from one input and writes each expert's soft prompt from another (each one
    of `ROUTER_INPUTS`: the instruction, or the instruction and the visual queries). The gate reads
    `router_input`, the prompts `prompt_input` (both default to the instruction alone, the paper's
    router: rows asking the same thing go to the same experts with the same prompts whatever the
    scene). The prompts are a learned base prompt per expert modulated by that input (FiLM: scale
    and shift per expert). Prompts that also read the image bought nothing over three seeds
    (README, RS-MoE), so the default stays the paper's.

    The gate is trained by the answers only where a row has two or more experts to compare: top-k
    >= 2 renormalises the chosen gates, so the row's loss sum_k g_k nll_k moves weight to the expert
    whose answer was better. At top-1 the renormalised gate is exactly 1 and the answers give it no
    gradient (one expert's loss says nothing about another's); its split of the rows is then set by
    the load-balance and z-losses alone."""

    def __init__(self, spec: RSMoESpec, *, rngs: nnx.Rngs):
        for key in ("router_input", "prompt_input"):
            if getattr(spec, key) not in ROUTER_INPUTS:
                raise ValueError(f"unknown vlm.{key} {getattr(spec, key)!r} (known: {', '.join(ROUTER_INPUTS)})")
        self.gate_input, gate_width = ROUTER_INPUTS[spec.router_input]
        self.prompt_input, prompt_width = ROUTER_INPUTS[spec.prompt_input]
        d, k, p = spec.lm.hidden_size, spec.num_experts, spec.prompt_length
        self.top_k = spec.top_k
        self.gate = nnx.Param(partitioned(INIT, "embed", "expert")(rngs.params(), (gate_width * d, k)))
        self.base = nnx.Param(partitioned(INIT, "expert", None, "embed")(rngs.params(), (k, p, d)))
        self.film = nnx.Param(partitioned(nnx.initializers.zeros, "expert", None, "embed")(
            rngs.params(), (k, prompt_width * d, 2 * d)))

    def __call__(self, instruction: jax.Array, valid: jax.Array, visual: jax.Array) -> Routing:
        logits = self.gate_input(instruction, valid, visual) @ self.gate[...]          # (B, K)
        probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
        top, chosen = jax.lax.top_k(probs, self.top_k)
        gates = jnp.zeros_like(probs).at[jnp.arange(probs.shape[0])[:, None], chosen].set(
            top / top.sum(-1, keepdims=True))
        scale, shift = jnp.split(jnp.einsum("bc,kcf->bkf", self.prompt_input(instruction, valid, visual),
                                            self.film[...]), 2, -1)                     # (B, K, E) each
        prompts = self.base[...][None] * (1 + scale[:, :, None]) + shift[:, :, None]
        k = probs.shape[-1]
        load = jnp.mean(gates > 0, 0)          # share of rows each expert is chosen for
        load_balance = k * jnp.sum(load * probs.mean(0)) / self.top_k
        z_loss = jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1) ** 2)
        return Routing(probs, gates, prompts, load_balance, z_loss)


def _unit_rms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


class RSMoE(nnx.Module):
    def __init__(self, spec: RSMoESpec, *, rngs: nnx.Rngs):
        self.spec = spec
        if spec.projector not in PROJECTORS:
            raise ValueError(f"unknown vlm.projector {spec.projector!r} (known: {', '.join(PROJECTORS)})")
        self.queries = PROJECTORS[spec.projector](spec, rngs=rngs)
        self.router = InstructionRouter(spec, rngs=rngs)

        @nnx.split_rngs(splits=spec.num_experts)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "expert"})
        def experts(rngs):
            return LanguageModel(spec.lm, rngs=rngs)
        self.experts = experts(rngs)

    def embed_instruction(self, instruction):
        """Instruction tokens in expert 0's table (the upcycled source's): the router's input."""
        return self.experts.embed[...][0].astype(jnp.dtype(self.spec.lm.dtype))[instruction]

    def route(self, vision_tokens, instruction, instruction_valid):
        """Visual queries per image (B, Q, E) and the routing of every sub-task (B*N rows; the
        instruction (B, N, I) holds N sub-tasks per image)."""
        visual = self.queries(vision_tokens)
        n = instruction.shape[1]
        visual_rows = jnp.repeat(visual, n, 0)
        routing = self.router(self.embed_instruction(_rows(instruction)), _rows(instruction_valid), visual_rows)
        return visual_rows, routing

    def expert_inputs(self, lm, visual, prompt, instruction, instruction_valid, answer, answer_valid):
        """One expert's input embeddings [visual (Q) | its prompt (P) | instruction (I) | answer (A)] and
        their validity, for rows (R, ...)."""
        x = jnp.concatenate([visual.astype(prompt.dtype), prompt, lm.embed_tokens(instruction),
                             lm.embed_tokens(answer)], 1)
        fixed = jnp.ones((answer.shape[0], visual.shape[1] + prompt.shape[1]), bool)
        return x, jnp.concatenate([fixed, instruction_valid, answer_valid], 1)

    def loss(self, vision_tokens, instruction, instruction_valid, answer, answer_valid, *,
             balance_weight: float = 1e-2, z_weight: float = 1e-3) -> tuple[jax.Array, dict]:
        """Gate-weighted answer cross-entropy of the dispatched rows + router losses (module doc).

        vision_tokens (B, S, D); instruction, instruction_valid (B, N, I); answer, answer_valid (B, N, A).
        Metrics: answer_nll, load_balance, z_loss, dropped (share of chosen (row, expert) pairs over
        capacity), expert_load (K,) (share of rows choosing each expert), expert_prob (K,), and the
        per-row top expert `top_expert` (B*N,) for statistics by sub-task kind."""
        spec = self.spec
        visual, routing = self.route(vision_tokens, instruction, instruction_valid)
        instruction, instruction_valid, answer, answer_valid = map(
            _rows, (instruction, instruction_valid, answer, answer_valid))
        r, k = routing.gates.shape
        capacity = min(r, math.ceil(spec.capacity_factor * r * spec.top_k / k))
        slots, kept = dispatch(routing.gates, capacity)                    # (R, K, C) one-hot, (R, K)
        take = jnp.argmax(slots, 0)                                          # (K, C) row of each slot
        prompts = jnp.take_along_axis(jnp.moveaxis(routing.prompts, 1, 0), take[..., None, None], 1)

        def one(lm, prompt, rows_):
            x, valid = self.expert_inputs(lm, visual[rows_], prompt, instruction[rows_], instruction_valid[rows_],
                                          answer[rows_], answer_valid[rows_])
            logits = lm.forward_embeddings(x, valid=valid, logits_for=answer.shape[1] + 1)[:, :-1]
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), answer[rows_][..., None], -1)[..., 0]
            mask = answer_valid[rows_].astype(jnp.float32)
            return (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)         # (C,)
        per_slot = _expert_call(self.experts, one, prompts, take)              # (K, C)
        per_row = jnp.einsum("rkc,kc,rk->r", slots.astype(jnp.float32), per_slot, routing.gates)
        answer_loss = jnp.mean(per_row)
        total = answer_loss + balance_weight * routing.load_balance + z_weight * routing.z_loss
        chosen = routing.gates > 0
        metrics = {"answer_nll": answer_loss, "load_balance": routing.load_balance, "z_loss": routing.z_loss,
                   "dropped": 1.0 - kept.sum() / jnp.maximum(chosen.sum(), 1),
                   "expert_load": jnp.mean(chosen, 0), "expert_prob": routing.probs.mean(0),
                   "top_expert": jnp.argmax(routing.probs, -1)}
        return total, metrics


def _rows(x: jax.Array) -> jax.Array:
    """(B, N, ...) sub-tasks per image -> (B*N, ...) rows, image-major."""
    return x.reshape(-1, *x.shape[2:])


def dispatch(gates: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Token-choice slots of rows over experts: `slots` (R, K, C) bool, True where row r fills slot c
    of expert k (each expert's chosen rows in row order, the first `capacity` of them), and `kept`
    (R, K): chosen and within capacity. An unfilled slot reads row 0 and is weighted 0."""
    chosen = gates > 0
    position = jnp.cumsum(chosen, 0) - 1
    kept = chosen & (position < capacity)
    slots = kept[..., None] & (position[..., None] == jnp.arange(capacity))
    return slots, kept


def _expert_call(experts, fn, *per_expert):
    """fn(one expert, its slices of `per_expert`) for every expert (vmapped over the stacked axis)."""
    @nnx.vmap(in_axes=(0,) + (0,) * len(per_expert), out_axes=0)
    def call(lm, *args):
        return fn(lm, *args)
    return call(experts, *per_expert)
