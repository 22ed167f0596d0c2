"""Decode speed: greedy generation with the key/value cache against re-running the whole sequence.

`tools.bench lm` times, in one process and interleaved round by round (the minimum of
each is kept, which is what survives a noisy shared machine):
  cached        `generate.generate` (one prefill, then one compiled single-token step per
                token over a fixed-size cache);
  full_forward  no cache: the prompt and the tokens so far sit in a buffer padded to the
                final length (so one program serves every step), the model runs over all
                of it each step and the argmax at the last real position is appended.
Both are greedy on the same random prompts and random weights, and compiled before
timing (the first call's excess over a timed round is reported as compile time).
Tokens per second count new tokens over all rows, prefill included. `same_tokens` says
whether the two produced the same tokens (with random weights the logits are nearly
flat, so a float-rounding tie could flip one; with real weights they agree).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.text.generate import generate
from ringmoe.text.llama import LMSpec, build


@functools.partial(jax.jit, static_argnums=(0, 2))
def _full_forward_greedy(graphdef, state, new_tokens: int, buffer):
    """buffer (B, P + new_tokens) int32 with the prompts in its first P slots -> the buffer filled
    greedily, each token from a forward pass over the whole (padded) buffer."""
    model = nnx.merge(graphdef, state)
    prompt_length = buffer.shape[1] - new_tokens
    slots = jnp.arange(buffer.shape[1])

    def step(i, buffer):
        last = prompt_length + i - 1                                  # the last real slot
        valid = jnp.broadcast_to(slots <= last, buffer.shape)
        logits = model(buffer, jnp.broadcast_to(slots, buffer.shape), valid)
        token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, last, 1, keepdims=False), -1)
        return jax.lax.dynamic_update_slice_in_dim(buffer, token.astype(jnp.int32)[:, None], last + 1, 1)

    return jax.lax.fori_loop(0, new_tokens, step, buffer)


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def run(spec: LMSpec, *, batch: int = 1, prompt_length: int = 32, new_tokens: int = 64, rounds: int = 3,
        seed: int = 0, log=print) -> dict:
    """Tokens per second of both ways (module doc), their ratio, compile seconds, and `same_tokens`."""
    if min(batch, prompt_length, new_tokens, rounds) < 1:
        raise ValueError("batch, prompt_length, new_tokens and rounds must all be >= 1")
    model = build(spec, seed)
    prompts = np.random.default_rng(seed).integers(1, spec.vocab_size, (batch, prompt_length)).astype(np.int32)
    graphdef, state = nnx.split(model)
    buffer = np.zeros((batch, prompt_length + new_tokens), np.int32)
    buffer[:, :prompt_length] = prompts
    ways = {"cached": lambda: np.asarray(generate(model, prompts.tolist(), new_tokens)),
            "full_forward": lambda: np.asarray(_full_forward_greedy(graphdef, state, new_tokens, buffer)
                                               [:, prompt_length:])}
    tokens, first = {}, {}
    for name, fn in ways.items():
        log(f"[bench lm] {name}: compiling and a first run ...")
        tokens[name], first[name] = _timed(fn)
        log(f"[bench lm] {name}: first call {first[name]:.1f} s")
    best = {name: float("inf") for name in ways}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in ways.items():
            best[name] = min(best[name], _timed(fn)[1])
        elapsed = time.perf_counter() - start
        log(f"[bench lm] round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {batch * new_tokens / best[name]:.1f} tok/s" for name in ways)
            + f" | elapsed {elapsed:.1f} s | ETA {elapsed / (r + 1) * (rounds - r - 1):.1f} s")
    rate = {name: batch * new_tokens / best[name] for name in ways}
    return {"batch": batch, "prompt_length": prompt_length, "new_tokens": new_tokens, "rounds": rounds,
            "cached_tokens_per_s": rate["cached"], "full_forward_tokens_per_s": rate["full_forward"],
            "speedup": rate["cached"] / rate["full_forward"],
            "compile_s": {name: max(first[name] - best[name], 0.0) for name in ways},
            "same_tokens": bool(np.array_equal(tokens["cached"], tokens["full_forward"]))}
