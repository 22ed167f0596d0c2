"""A decoder-only language model in the layout today's small open LMs share (Llama, Qwen2, SmolLM).

    tokens (B, T) -> embed -> L x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> logits

* RMSNorm: x / sqrt(mean(x^2) + eps) * scale, computed in float32 (as Hugging Face does);
* attention: grouped-query (`num_kv_heads` key/value heads shared by num_heads /
  num_kv_heads query heads each), rotary position embeddings on q and k (the
  "rotate half" layout: the first and second halves of each head are the pairs),
  optional q/k/v biases (Qwen2), no output bias;
* MLP: down(silu(gate(x)) * up(x));
* the output projection is the embedding's transpose when `tie_embeddings`.

Positions are given per token (B, T), so a left-padded batch numbers each row's
real tokens from 0 and pads never shift a row. `valid` (B, T) says which tokens
are real; a token attends to the real tokens at or before its own slot.

The key/value cache (`init_cache`) is a plain pytree of fixed size (B, S_max): a
call writes its T tokens at `cache["index"]` and attends over every slot the
cache holds, masked, so one compiled decode step serves every token
(`ringmoe/text/generate.py`). Called without a cache the model attends over its
own T tokens: the same numbers (tests/test_text_generate.py).

Every parameter carries logical axis names (`vocab`, `embed`, `heads`,
`kv_heads`, `mlp`) that the project's one rules table (`ringmoe.sharding`) maps
onto a mesh.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.sharding import partitioned

INIT = nnx.initializers.normal(0.02)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LMSpec:
    """Shape and numerics of a language model (the Hugging Face config's terms)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None          # None: hidden_size / num_heads
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()             # () or sorted (key, value) pairs, "rope_type" among them
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    attention_bias: bool = False
    max_positions: int = 2048
    dtype: str = "float32"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config) -> "LMSpec":
        """From a ConfigDict or dict with these field names (rope_scaling as a dict or None)."""
        values = dict(config)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown language-model config keys {unknown}")
        scaling = values.get("rope_scaling") or {}
        values["rope_scaling"] = tuple(sorted(dict(scaling).items()))
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head_dim {self.head_size} must be even (rotary pairs)")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported (supported: {list(ROPE_TYPES)})")


def rope_frequencies(spec: LMSpec) -> np.ndarray:
    """Inverse frequencies (head_size / 2,) of the rotary embedding, after the checkpoint's scaling."""
    d = spec.head_size
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = dict(spec.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":   # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, smooth between
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        original = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * np.pi / inv
        smooth = (original / wavelength - low) / (high - low)
        scaled = np.where(wavelength > original / low, inv / factor, inv)
        middle = (wavelength <= original / low) & (wavelength >= original / high)
        inv = np.where(middle, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x (B, T, H, D) rotated by angle position * inv_freq, halves as pairs ("rotate half")."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)    # (B, T, D/2)
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = nnx.Param(partitioned(nnx.initializers.ones, "embed")(rngs.params(), (dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(jnp.float32)
        y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x.dtype)


def _param(rngs: nnx.Rngs, shape: tuple, names: tuple, init=INIT) -> nnx.Param:
    return nnx.Param(partitioned(init, *names)(rngs.params(), shape))


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions, reading and writing a cache if given."""

    def __init__(self, spec: LMSpec, *, rngs: nnx.Rngs):
        e, h, k, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_size
        self.spec = spec
        self.q = _param(rngs, (e, h, d), ("embed", "heads", None))
        self.k = _param(rngs, (e, k, d), ("embed", "kv_heads", None))
        self.v = _param(rngs, (e, k, d), ("embed", "kv_heads", None))
        self.o = _param(rngs, (h, d, e), ("heads", None, "embed"))
        if spec.attention_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, (h, d), ("heads", None), zeros)
            self.k_bias = _param(rngs, (k, d), ("kv_heads", None), zeros)
            self.v_bias = _param(rngs, (k, d), ("kv_heads", None), zeros)

    def __call__(self, x, positions, valid, cache: dict | None):
        spec, dtype = self.spec, x.dtype
        q = jnp.einsum("bte,ehd->bthd", x, self.q[...].astype(dtype))
        k = jnp.einsum("bte,ehd->bthd", x, self.k[...].astype(dtype))
        v = jnp.einsum("bte,ehd->bthd", x, self.v[...].astype(dtype))
        if spec.attention_bias:
            q, k, v = (q + self.q_bias[...].astype(dtype), k + self.k_bias[...].astype(dtype),
                       v + self.v_bias[...].astype(dtype))
        inv_freq = rope_frequencies(spec)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        t = x.shape[1]
        if cache is None:
            keys, values, key_valid = k, v, valid
            query_slot = key_slot = jnp.arange(t)
        else:
            start = cache["index"]
            keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, 1)
            values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, 1)
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid, start, 1)
            cache = {**cache, "k": keys, "v": values, "valid": key_valid}
            query_slot, key_slot = start + jnp.arange(t), jnp.arange(keys.shape[1])
        allowed = (key_slot[None, :] <= query_slot[:, None])[None] & key_valid[:, None, :]   # (B, T, S)
        group = spec.num_heads // spec.num_kv_heads
        q = q.reshape(*q.shape[:2], spec.num_kv_heads, group, spec.head_size)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(dtype)).astype(jnp.float32)
        scores = scores / np.sqrt(spec.head_size)
        scores = jnp.where(allowed[:, None, None], scores, -1e30)
        weights = jax.nn.softmax(scores, -1).astype(dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, values.astype(dtype))
        out = out.reshape(*out.shape[:2], spec.num_heads, spec.head_size)
        return jnp.einsum("bthd,hde->bte", out, self.o[...].astype(dtype)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, spec: LMSpec, *, rngs: nnx.Rngs):
        e, f = spec.hidden_size, spec.intermediate_size
        self.gate = _param(rngs, (e, f), ("embed", "mlp"))
        self.up = _param(rngs, (e, f), ("embed", "mlp"))
        self.down = _param(rngs, (f, e), ("mlp", "embed"))

    def __call__(self, x):
        dtype = x.dtype
        hidden = jax.nn.silu(x @ self.gate[...].astype(dtype)) * (x @ self.up[...].astype(dtype))
        return hidden @ self.down[...].astype(dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, spec: LMSpec, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, rngs=rngs)
        self.attention = Attention(spec, rngs=rngs)
        self.mlp_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, rngs=rngs)
        self.mlp = MLP(spec, rngs=rngs)

    def __call__(self, x, positions, valid, cache):
        y, cache = self.attention(self.attention_norm(x), positions, valid, cache)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


class LanguageModel(nnx.Module):
    """tokens (B, T) int, positions (B, T) int, valid (B, T) bool [, cache] -> logits (B, T, V) float32
    [, the cache with these tokens written]."""

    def __init__(self, spec: LMSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        self.embed = _param(rngs, (spec.vocab_size, spec.hidden_size), ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(spec, rngs=rngs) for _ in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, rngs=rngs)
        if not spec.tie_embeddings:
            self.lm_head = _param(rngs, (spec.hidden_size, spec.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens, positions=None, valid=None, cache: dict | None = None):
        return self.forward_embeddings(self.embed_tokens(tokens), positions, valid, cache)

    def embed_tokens(self, tokens) -> jax.Array:
        """(B, T) token ids -> (B, T, E) input embeddings."""
        return self.embed[...].astype(jnp.dtype(self.spec.dtype))[tokens]

    def forward_embeddings(self, x, positions=None, valid=None, cache: dict | None = None,
                           logits_for: int | None = None):
        """The model on input embeddings x (B, T, E): token embeddings, or any mix with vectors
        from elsewhere (a vision-language model's visual tokens and soft prompts). `logits_for` = n:
        logits of the last n positions only (B, n, V): a trainer scoring answers needs no others,
        and over a 49k vocabulary the full (B, T, V) is the largest buffer of the step."""
        if valid is None:
            valid = jnp.ones(x.shape[:2], bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(valid, -1) - 1, 0)
        dtype = jnp.dtype(self.spec.dtype)
        x = x.astype(dtype)
        layer_caches = None if cache is None else cache["layers"]
        new_layers = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, valid, None if cache is None else
                                   {**layer_caches[i], "index": cache["index"]})
            new_layers.append(layer_cache)
        x = self.norm(x if logits_for is None else x[:, -logits_for:])
        head = self.embed[...].T if self.spec.tie_embeddings else self.lm_head[...]
        logits = (x @ head.astype(dtype)).astype(jnp.float32)
        if cache is None:
            return logits
        layers = [{k: c[k] for k in ("k", "v", "valid")} for c in new_layers]
        return logits, {"layers": layers, "index": cache["index"] + x.shape[1]}


def init_cache(spec: LMSpec, batch: int, length: int, dtype=None) -> dict:
    """An empty cache of `length` slots per row: per layer keys and values (B, S, KV, D) and which
    slots hold real tokens, and the next slot to write ("index")."""
    dtype = jnp.dtype(dtype or spec.dtype)
    shape = (batch, length, spec.num_kv_heads, spec.head_size)
    layer = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),  # noqa: E731
                     "valid": jnp.zeros((batch, length), bool)}
    return {"layers": [layer() for _ in range(spec.num_layers)], "index": jnp.zeros((), jnp.int32)}


def build(spec: LMSpec, seed: int = 0) -> LanguageModel:
    return LanguageModel(spec, rngs=nnx.Rngs(seed))


def parameter_counts(spec: LMSpec) -> dict:
    """{"total", "components": {embedding, attention, mlp, norms, lm_head}} from the abstract model's
    shapes (jax.eval_shape: nothing allocated)."""
    model = nnx.eval_shape(lambda: build(spec))
    components = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(k) for k in path]
        row = next((c for c, key in (("attention", "attention"), ("mlp", "mlp"), ("lm_head", "lm_head"),
                                      ("embedding", "embed")) if key in names), "norms")
        components[row] += int(np.prod(var.shape))
    return {"total": sum(components.values()), "components": components}
