"""The feed-forward network of a transformer block (Linear -> GELU -> Linear).

Used as the always-on shared expert and as the FFN of the dense SwinV2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.sharding import cast_sharded, partitioned

DEFAULT_INIT = nnx.initializers.truncated_normal(0.02)


def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU x * Phi(x) of SwinV2 and timm (PyTorch's nn.GELU default); jax.nn.gelu
    defaults to the tanh approximation, which differs by up to ~5e-4 and breaks timm parity."""
    return jax.nn.gelu(x, approximate=False)


class FeedForward(nnx.Module):
    """x (..., D) -> (..., D) through a hidden layer of width `hidden`."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=partitioned(DEFAULT_INIT, "embed", "mlp"),
                              bias_init=partitioned(nnx.initializers.zeros, "mlp"), rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=partitioned(DEFAULT_INIT, "mlp", "embed"),
                              bias_init=partitioned(nnx.initializers.zeros, "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _linear(self.fc2, self.hidden(x), self.dtype)

    def hidden(self, x: jax.Array) -> jax.Array:
        """The hidden units GELU(x fc1 + b1), (..., hidden): what fc2 maps to the output."""
        return gelu(_linear(self.fc1, x, self.dtype))


def _linear(layer: nnx.Linear, x: jax.Array, dtype) -> jax.Array:
    """A Linear in the compute dtype; the float32 parameters are cast (before any FSDP gather),
    not stored, in it."""
    y = jnp.dot(x.astype(dtype), cast_sharded(layer.kernel, dtype))
    return y + cast_sharded(layer.bias, dtype)
