"""Text generation with the key/value cache: greedy, beam search and nucleus sampling.

    generate(model, [[1, 2, 3], [4, 5]], 16)                     # new tokens of each prompt
    generate(model, prompts, 16, method="beam", num_beams=4)
    generate(model, prompts, 16, method="sample", temperature=0.7, top_p=0.9, seed=1)
    generate_from_embeddings(model, embeddings, valid, 16, stop_tokens=(end,))   # (B, T, E) inputs

`generate_from_embeddings` starts from input EMBEDDINGS instead of tokens: a
vision-language model's prefix of visual queries, soft prompt and instruction
(`ringmoe/vlm/infer.py`). The prefill feeds them to `forward_embeddings`; the
decode, which feeds the generated tokens, is the same program as for tokens.

Prompts of different lengths are LEFT-padded into one batch (each row's real tokens
numbered from position 0, pads masked out), so every row's next token sits in the
same slot. The cache has a fixed size (longest prompt + max_new_tokens), so two
programs serve a whole generation, each compiled once per shape: `_prefill` runs the
padded prompts and picks the first new token; `_decode` runs one token per row
through the model (`_step`) inside a `lax.while_loop` until every row has stopped or
max_new_tokens are out. `TRACES` counts how often each was traced (tests check the
step is compiled once, not once per token).

A method (`METHODS`) is one small class deciding the next tokens from the last
logits (`choose`), inside the compiled programs:
  greedy  the argmax, no penalties: Hugging Face's `generate(do_sample=False)`;
  sample  softmax(logits / temperature), cut to the smallest set of tokens whose
          probability reaches top_p (nucleus), drawn from `jax.random.key(seed)`;
  beam    `num_beams` hypotheses per prompt ranked by their summed log-probs; one
          that emits a stop token is finished with score sum / length**length_penalty
          (length: its new tokens, the stop included) as Hugging Face ranks them.
A row ends after its first stop token (kept in the output) or after max_new_tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.text.llama import init_cache

TRACES: collections.Counter = collections.Counter()   # "prefill", "step": times traced (compiled)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What shapes the compiled programs (static: a change recompiles). The other arguments
    (stop tokens, pad_id, temperature, top_p, length_penalty) travel as values in the carry's
    "knobs", so changing them reuses the programs."""
    max_new_tokens: int
    num_beams: int = 1
    nucleus: bool = False            # top_p < 1: sort the vocabulary each step


def make_knobs(stop_tokens, pad_id, temperature, top_p, length_penalty) -> dict:
    return {"stops": jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32), "pad": jnp.int32(pad_id),
            "temperature": jnp.float32(temperature), "top_p": jnp.float32(top_p),
            "length_penalty": jnp.float32(length_penalty)}


@dataclasses.dataclass(frozen=True)
class Greedy:
    """One row per prompt, the most probable token each step."""
    settings: Settings
    beams = 1

    def pick(self, logits: jax.Array, key: jax.Array, knobs: dict) -> jax.Array:
        return jnp.argmax(logits, -1).astype(jnp.int32)

    def start(self, batch: int, key: jax.Array) -> dict:
        n = self.settings.max_new_tokens
        return {"out": jnp.zeros((batch, n), jnp.int32), "done": jnp.zeros((batch,), bool), "key": key}

    def choose(self, carry: dict, logits: jax.Array, cache: dict):
        """Writes each row's next token at column t; a row that has stopped gets pad_id."""
        t, knobs = carry["t"], carry["knobs"]
        token = self.pick(logits, jax.random.fold_in(carry["key"], t), knobs)
        token = jnp.where(carry["done"], knobs["pad"], token)
        out = jax.lax.dynamic_update_slice_in_dim(carry["out"], token[:, None], t, 1)
        done = carry["done"] | jnp.isin(token, knobs["stops"])
        return {**carry, "out": out, "done": done, "next": token}, cache

    def finish(self, carry: dict) -> list[list[int]]:
        """Each row's tokens up to and including its first stop token (rows done early end in pads)."""
        stops = set(np.asarray(carry["knobs"]["stops"]).tolist())
        steps = int(carry["t"])
        rows = []
        for row in np.asarray(carry["out"])[:, :steps].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            rows.append(row[:end])
        return rows


@dataclasses.dataclass(frozen=True)
class Sample(Greedy):
    """One row per prompt, each token drawn from the tempered, nucleus-cut distribution."""

    def pick(self, logits: jax.Array, key: jax.Array, knobs: dict) -> jax.Array:
        logits = logits / knobs["temperature"]
        if self.settings.nucleus:   # keep a token if the tokens more probable than it hold < top_p
            ordered = jnp.sort(logits, -1)[:, ::-1]
            before = jnp.cumsum(jax.nn.softmax(ordered, -1), -1) - jax.nn.softmax(ordered, -1)
            kept = jnp.sum(before < knobs["top_p"], -1, keepdims=True)          # >= 1: the top token
            threshold = jnp.take_along_axis(ordered, kept - 1, -1)
            logits = jnp.where(logits >= threshold, logits, -jnp.inf)
        return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Beam:
    """`num_beams` rows per prompt (prompt b's beams are rows b*K .. b*K+K-1).

    Each step the 2K best extensions (over all K beams x vocabulary) are ranked; those
    ending in a stop token among the first K join the prompt's finished list (its K
    best by normalised score), the K best others are the new beams and the cache rows
    are gathered to follow them. A prompt is done once it has K finished hypotheses
    and its best beam, normalised at the current length, cannot beat the worst
    (Hugging Face's early_stopping=False rule); at the end, unfinished prompts' beams
    compete as they are.
    """
    settings: Settings

    @property
    def beams(self) -> int:
        return self.settings.num_beams

    def start(self, batch: int, key: jax.Array) -> dict:
        k, n = self.beams, self.settings.max_new_tokens
        score = jnp.tile(jnp.asarray([0.0] + [-1e9] * (k - 1), jnp.float32), (batch, 1))  # one live beam at first
        return {"seq": jnp.zeros((batch, k, n), jnp.int32), "score": score,
                "finished_seq": jnp.zeros((batch, k, n), jnp.int32), "finished_len": jnp.zeros((batch, k), jnp.int32),
                "finished_score": jnp.full((batch, k), -jnp.inf, jnp.float32), "done": jnp.zeros((batch,), bool)}

    def choose(self, carry: dict, logits: jax.Array, cache: dict):
        k, t, knobs = self.beams, carry["t"], carry["knobs"]
        batch, vocab = carry["score"].shape[0], logits.shape[-1]
        logp = jax.nn.log_softmax(logits, -1).reshape(batch, k, vocab)
        values, flat = jax.lax.top_k((carry["score"][:, :, None] + logp).reshape(batch, k * vocab), 2 * k)
        beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seq = jnp.take_along_axis(carry["seq"], beam[:, :, None], 1)                    # (B, 2K, N)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, token[:, :, None], t, 2)
        norm = (t + 1).astype(jnp.float32) ** knobs["length_penalty"]
        stop = jnp.isin(token, knobs["stops"])
        # Finished: the stop-token extensions ranked among the first K, while the prompt is not done.
        new = jnp.where(stop & (jnp.arange(2 * k) < k) & ~carry["done"][:, None],
                        values / norm, -jnp.inf)
        fin_score, best = jax.lax.top_k(jnp.concatenate([carry["finished_score"], new], 1), k)
        fin_seq = jnp.take_along_axis(jnp.concatenate([carry["finished_seq"], seq], 1), best[:, :, None], 1)
        fin_len = jnp.take_along_axis(jnp.concatenate(
            [carry["finished_len"], jnp.broadcast_to(t + 1, new.shape)], 1), best, 1)
        # Running: the K best extensions that did not stop.
        score, keep = jax.lax.top_k(jnp.where(stop, -jnp.inf, values), k)
        parent = jnp.take_along_axis(beam, keep, 1)
        rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        cache = {**cache, "layers": jax.tree.map(lambda x: x[rows], cache["layers"])}
        done = carry["done"] | (jnp.all(fin_score > -jnp.inf, 1)
                                & (score[:, 0] / norm <= fin_score[:, -1]))
        return {**carry, "seq": jnp.take_along_axis(seq, keep[:, :, None], 1), "score": score,
                "finished_seq": fin_seq, "finished_len": fin_len, "finished_score": fin_score, "done": done,
                "next": jnp.take_along_axis(token, keep, 1).reshape(-1)}, cache

    def finish(self, carry: dict) -> list[list[int]]:
        """The best finished hypothesis of each prompt, unfinished prompts' beams competing too."""
        c = jax.device_get(carry)
        steps, penalty = int(c["t"]), float(c["knobs"]["length_penalty"])
        rows = []
        for b in range(c["score"].shape[0]):
            pool = [(c["finished_score"][b, i], c["finished_seq"][b, i, :c["finished_len"][b, i]])
                    for i in range(self.beams) if np.isfinite(c["finished_score"][b, i])]
            if not c["done"][b]:
                pool += [(c["score"][b, i] / steps ** penalty, c["seq"][b, i, :steps]) for i in range(self.beams)]
            rows.append(max(pool, key=lambda p: p[0])[1].tolist())
        return rows


METHODS = {"greedy": Greedy, "sample": Sample, "beam": Beam}


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _prefill(graphdef, method, state, cache, carry, inputs, positions, valid):
    """Runs the padded prompts (writing the cache) and chooses the first new token of each row.
    `inputs`: token ids (B, T), or input embeddings (B, T, E) (`forward_embeddings`)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    forward = model.forward_embeddings if inputs.ndim == 3 else model
    logits, cache = forward(inputs, positions, valid, cache)
    carry, cache = method.choose(carry, logits[:, -1], cache)
    return {**carry, "t": carry["t"] + 1}, cache


def _step(graphdef, method, state, carry_cache):
    """One token per row through the model at its next position, then the method's choice."""
    TRACES["step"] += 1
    carry, cache = carry_cache
    carry = {**carry, "position": carry["position"] + 1}      # the position of the token fed now
    tokens, positions = carry["next"][:, None], carry["position"][:, None]
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, jnp.ones(tokens.shape, bool), cache)
    carry, cache = method.choose(carry, logits[:, 0], cache)
    return {**carry, "t": carry["t"] + 1}, cache


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 4))
def _decode(graphdef, method, state, carry, cache):
    """`_step` until every row is done or max_new_tokens are chosen: the final carry and cache (returned
    so the donated cache is updated in place)."""
    n = method.settings.max_new_tokens
    cond = lambda cc: (cc[0]["t"] < n) & ~jnp.all(cc[0]["done"])   # noqa: E731
    return jax.lax.while_loop(cond, functools.partial(_step, graphdef, method, state), (carry, cache))


def check_arguments(prompts, max_new_tokens: int, method: str, num_beams: int, temperature: float,
                    top_p: float, spec) -> None:
    """ValueError naming the first bad argument (and the prompt index for an empty prompt)."""
    check_settings(max_new_tokens, method, num_beams, temperature, top_p, spec)
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty (generation needs at least one token to start from)")
    length = max(map(len, prompts)) + max_new_tokens
    if length > spec.max_positions:
        raise ValueError(f"longest prompt ({max(map(len, prompts))}) + max_new_tokens ({max_new_tokens}) = "
                         f"{length} exceeds the model's max_positions {spec.max_positions}")


def check_settings(max_new_tokens: int, method: str, num_beams: int, temperature: float, top_p: float,
                   spec) -> None:
    """ValueError naming the first bad generation setting (the checks shared by both entry points)."""
    if method not in METHODS:
        raise ValueError(f"unknown generation method {method!r} (known: {sorted(METHODS)})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 1 <= num_beams <= spec.vocab_size // 2:   # each step ranks 2 x num_beams extensions
        raise ValueError(f"num_beams must be in [1, vocab_size / 2 = {spec.vocab_size // 2}], got {num_beams}")


def left_pad(prompts: list[list[int]], pad_id: int, repeat: int = 1):
    """tokens, positions (B*repeat, P) int32 and valid (B*repeat, P) bool, each prompt's real tokens
    at the end of its row numbered from 0; each prompt repeated `repeat` times in a row (beams)."""
    width = max(map(len, prompts))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt):] = prompt
        valid[i, width - len(prompt):] = True
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    return tuple(np.repeat(a, repeat, 0) for a in (tokens, positions, valid))


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, method: str = "greedy",
             num_beams: int = 4, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: tuple[int, ...] = (), pad_id: int = 0, length_penalty: float = 1.0) -> list[list[int]]:
    """The new tokens of each prompt (module doc); a row ends after a stop token (kept) or max_new_tokens."""
    spec = model.spec
    check_arguments(prompts, max_new_tokens, method, num_beams, temperature, top_p, spec)
    searcher = _searcher(method, max_new_tokens, num_beams, top_p)
    tokens, positions, valid = left_pad(prompts, pad_id, searcher.beams)
    knobs = make_knobs(stop_tokens, pad_id, temperature, top_p, length_penalty)
    return _run(model, searcher, tokens, positions, valid, len(prompts), seed, knobs)


def generate_from_embeddings(model, embeddings, valid, max_new_tokens: int, *, method: str = "greedy",
                             num_beams: int = 4, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                             stop_tokens: tuple[int, ...] = (), pad_id: int = 0,
                             length_penalty: float = 1.0) -> list[list[int]]:
    """`generate` from input embeddings (B, T, E) and their validity (B, T) bool instead of token ids.

    Invalid slots may sit anywhere (a prefix [visual | prompt | left-padded instruction] has them
    in the middle): each row's valid slots are numbered from 0 (positions = cumsum(valid) - 1, the
    model's own default) and the rest are masked out. The LAST slot of every row must be valid: its
    logits choose the first new token. `generate_from_embeddings(model, model.embed_tokens(t), v, n)`
    equals `generate` on the prompts that (t, v) left-pads, token for token."""
    spec = model.spec
    check_settings(max_new_tokens, method, num_beams, temperature, top_p, spec)
    embeddings, valid = jnp.asarray(embeddings), np.asarray(valid, bool)
    if embeddings.ndim != 3 or embeddings.shape[-1] != spec.hidden_size:
        raise ValueError(f"embeddings must be (batch, length, {spec.hidden_size}), got {tuple(embeddings.shape)}")
    if valid.shape != embeddings.shape[:2]:
        raise ValueError(f"valid {valid.shape} does not match the embeddings' (batch, length) "
                         f"{tuple(embeddings.shape[:2])}")
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"no inputs to generate from (embeddings {tuple(embeddings.shape)})")
    if not valid[:, -1].all():
        raise ValueError(f"row {int(np.flatnonzero(~valid[:, -1])[0])}: its last slot is not valid (pad on the "
                         "left: the last slot's logits choose the first new token)")
    length = embeddings.shape[1] + max_new_tokens
    if length > spec.max_positions:
        raise ValueError(f"inputs ({embeddings.shape[1]}) + max_new_tokens ({max_new_tokens}) = {length} exceeds "
                         f"the model's max_positions {spec.max_positions}")
    searcher = _searcher(method, max_new_tokens, num_beams, top_p)
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    repeat = lambda a: jnp.repeat(a, searcher.beams, 0) if searcher.beams > 1 else a  # noqa: E731
    knobs = make_knobs(stop_tokens, pad_id, temperature, top_p, length_penalty)
    return _run(model, searcher, repeat(embeddings), repeat(jnp.asarray(positions)), repeat(jnp.asarray(valid)),
                embeddings.shape[0], seed, knobs)


def _searcher(method: str, max_new_tokens: int, num_beams: int, top_p: float):
    return METHODS[method](Settings(max_new_tokens, num_beams if method == "beam" else 1,
                                    method == "sample" and top_p < 1.0))


def _run(model, searcher, inputs, positions, valid, batch: int, seed: int, knobs: dict) -> list[list[int]]:
    """Prefill `inputs` (tokens or embeddings, rows already repeated per beam), decode, finish."""
    graphdef, state = nnx.split(model)
    cache = init_cache(model.spec, inputs.shape[0], inputs.shape[1] + searcher.settings.max_new_tokens)
    carry = {**searcher.start(batch, jax.random.key(seed)), "t": jnp.zeros((), jnp.int32),
             "position": jnp.asarray(positions[:, -1]), "knobs": knobs}
    carry, cache = _prefill(graphdef, searcher, state, cache, carry, inputs, positions, valid)
    carry, _ = _decode(graphdef, searcher, state, carry, cache)
    return searcher.finish(carry)
