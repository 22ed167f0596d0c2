"""SimMIM light decoders: one per modality, from the stride-32 feature map to pixels.

A 1x1 convolution (a per-position Linear) to stride*stride*C channels, then a
pixel shuffle back to the input resolution (Xie et al. 2022, as in the reference).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.model.ffn import DEFAULT_INIT
from ringmoe.sharding import partitioned


class SimMIMDecoder(nnx.Module):
    """features (B, h, w, D) -> reconstruction (B, h*stride, w*stride, channels)."""

    def __init__(self, dim: int, stride: int, channels: int, *, rngs: nnx.Rngs):
        self.stride, self.channels = stride, channels
        self.proj = nnx.Linear(dim, stride * stride * channels,
                               kernel_init=partitioned(DEFAULT_INIT, "embed", None),
                               bias_init=partitioned(nnx.initializers.zeros, None), rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        batch, h, w, _ = features.shape
        r, c = self.stride, self.channels
        y = self.proj(features.astype(jnp.float32)).reshape(batch, h, w, r, r, c)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(batch, h * r, w * r, c)
