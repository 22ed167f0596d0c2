"""SwinV2 backbone pieces shared by every modality: window attention, blocks, merging.

Follows SwinV2 (Liu et al., 2022): scaled cosine attention, log-spaced continuous
relative position bias (CPB), post-norm residuals, and patch merging that reduces
before it normalises. Parameter shapes and counts are the standard SwinV2 ones so
that parameter totals reproduce the paper's and compressed models can be exported
under standard SwinV2 names.

Every parameter carries logical axis names (`ringmoe.sharding.partitioned`):
model width is 'embed' and attention heads are 'heads', so FSDP shards along the
width and tensor parallelism splits heads. Parameters are float32; matmuls run in
the module's compute `dtype`, while softmax and LayerNorm run in float32.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.sharding import cast_sharded, constrain, partitioned

# Swin initialises every Linear weight from a truncated normal with std 0.02.
DENSE_INIT = nnx.initializers.truncated_normal(stddev=0.02)
ZEROS = nnx.initializers.zeros_init()
ONES = nnx.initializers.ones_init()
# Additive mask for token pairs that must not attend: SwinV2's and timm's -100, so that
# the exported model computes exactly what timm computes. (Scaled cosine logits lie in
# [-s, s] + (0, 16) with s = exp(logit_scale) <= 100; at the initial s = 10 a masked pair
# weighs below e^-80 of an unmasked one. Only a head that learns s near 100 leaks, in both.)
MASK_VALUE = -100.0
# Width of the continuous position bias MLP: SwinV2's, and fixed in timm (no argument), so
# not a config key: every config exports to a model timm builds from its own arguments.
CPB_HIDDEN = 512
LOG_MAX_LOGIT_SCALE = math.log(100.0)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm over the last axis, computed in float32, returned in the input dtype.

    eps is PyTorch's 1e-5 (SwinV2's), scale and bias are annotated 'embed'.
    `zero_scale` starts the scale at 0, as SwinV2 does for its residual post-norms.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, zero_scale: bool = False):
        super().__init__(
            dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
            scale_init=partitioned(ZEROS if zero_scale else ONES, "embed"),
            bias_init=partitioned(ZEROS, "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def relative_coords_table(window: int) -> np.ndarray:
    """Log-spaced relative coordinates of a window, ((2w-1)^2, 2), the CPB MLP input.

    Offsets in [-(w-1), w-1] are scaled to [-8, 8], then mapped through
    sign(x) * log2(|x| + 1) / log2(8), so values lie in [-log2(9)/3, log2(9)/3].
    """
    r = np.arange(-(window - 1), window, dtype=np.float64)
    table = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1).reshape(-1, 2)
    table = table / max(window - 1, 1) * 8.0
    table = np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8.0)
    return table.astype(np.float32)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """(N, N) index into the ((2w-1)^2) CPB table for each query/key pair of a window."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


@functools.lru_cache(maxsize=None)
def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """Additive (nW, N, N) mask keeping cyclically shifted windows from mixing regions.

    After rolling by -shift, the last row/column of windows holds tokens that were
    not adjacent in the image; tokens only attend within their own region.
    """
    labels = np.zeros((resolution, resolution), np.int32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            labels[rows, cols] = 3 * i + j
    windows = window_partition(labels[None, :, :, None], window)[..., 0]
    same = windows[:, :, None] == windows[:, None, :]
    return np.where(same, 0.0, MASK_VALUE).astype(np.float32)


def window_partition(x, window: int):
    """(B, H, W, D) -> (B * nW, window*window, D), windows batch-major then row-major."""
    b, h, w, d = x.shape
    x = x.reshape(b, h // window, window, w // window, window, d)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, d)


def window_reverse(windows, window: int, h: int, w: int):
    """Inverse of `window_partition`: (B * nW, window*window, D) -> (B, H, W, D)."""
    d = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, d)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, d)


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class WindowAttention(nnx.Module):
    """SwinV2 multi-head self-attention inside one window, with scaled cosine logits.

    logits = cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(CPB), where
    the continuous position bias comes from a 2 -> cpb_hidden -> ReLU -> heads MLP
    over log-spaced relative coordinates (second layer bias-free, as in SwinV2).
    q and v have biases, k has none.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, *, cpb_hidden: int = CPB_HIDDEN,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim {dim} not divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        self.num_heads, self.window_size, self.dtype = num_heads, window_size, dtype
        self.qkv = nnx.Param(partitioned(DENSE_INIT, "embed", None, "heads", None)(
            rngs.params(), (dim, 3, num_heads, head_dim), jnp.float32))
        self.q_bias = nnx.Param(partitioned(ZEROS, "heads", None)(
            rngs.params(), (num_heads, head_dim), jnp.float32))
        self.v_bias = nnx.Param(partitioned(ZEROS, "heads", None)(
            rngs.params(), (num_heads, head_dim), jnp.float32))
        self.proj = nnx.Einsum(
            "bnhk,hkd->bnd", (num_heads, head_dim, dim), (dim,), dtype=dtype,
            param_dtype=jnp.float32, kernel_init=partitioned(DENSE_INIT, "heads", None, "embed"),
            bias_init=partitioned(ZEROS, "embed"), rngs=rngs)
        self.logit_scale = nnx.Param(partitioned(nnx.initializers.constant(math.log(10.0)), "heads")(
            rngs.params(), (num_heads,), jnp.float32))
        self.cpb_fc1 = nnx.Linear(
            2, cpb_hidden, param_dtype=jnp.float32, kernel_init=partitioned(DENSE_INIT, None, None),
            bias_init=partitioned(ZEROS, None), rngs=rngs)
        self.cpb_fc2 = nnx.Linear(
            cpb_hidden, num_heads, use_bias=False, param_dtype=jnp.float32,
            kernel_init=partitioned(DENSE_INIT, None, None), rngs=rngs)

    def position_bias_table(self) -> jax.Array:
        """The CPB table, ((2w-1)^2, heads) in float32, each entry in (0, 16)."""
        hidden = jax.nn.relu(self.cpb_fc1(jnp.asarray(relative_coords_table(self.window_size))))
        return 16.0 * jax.nn.sigmoid(self.cpb_fc2(hidden))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: (num_windows * B, N, D); mask: (nW, N, N) additive or None -> (nW * B, N, D).

        Windows must be batch-major (window index = b * nW + w), as from `window_partition`.
        """
        bw, n, _ = x.shape
        if n != self.window_size ** 2:
            raise ValueError(f"WindowAttention: expected {self.window_size ** 2} tokens per window, got {n}")
        dt = self.dtype
        qkv = jnp.einsum("bnd,dthk->tbnhk", x.astype(dt), cast_sharded(self.qkv, dt))
        q = qkv[0] + self.q_bias[...].astype(dt)
        k = qkv[1]
        v = qkv[2] + self.v_bias[...].astype(dt)
        q, k, v = (constrain(t, "batch", None, "act_heads", None) for t in (q, k, v))

        q = _l2_normalize(q.astype(jnp.float32)).astype(dt)
        k = _l2_normalize(k.astype(jnp.float32)).astype(dt)
        logits = jnp.einsum("bnhk,bmhk->bhnm", q, k, preferred_element_type=jnp.float32)
        scale = jnp.exp(jnp.minimum(self.logit_scale[...], LOG_MAX_LOGIT_SCALE))
        logits = logits * scale[:, None, None]

        bias = self.position_bias_table()[relative_position_index(self.window_size).reshape(-1)]
        logits = logits + bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.reshape(bw // nw, nw, self.num_heads, n, n)
            logits = (logits + mask.astype(jnp.float32)[None, :, None]).reshape(bw, self.num_heads, n, n)

        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum("bhnm,bmhk->bnhk", weights, v)
        return self.proj(out)


class SwinV2Block(nnx.Module):
    """One SwinV2 block: (shifted) window attention and an injected FFN, post-norm.

    x = x + norm1(attn(x)); y, aux = ffn(x, modalities); x = x + norm2(y)
    (`attend` is the first step, `add_ffn` the last: the compression's refit runs
    them around a teacher's and a student's FFN). When resolution <= window_size
    the window is clipped to the resolution and the shift dropped, as in Swin. The
    residual stream keeps the input's dtype.
    `zero_init_post_norm=True` starts norm1/norm2 scales at 0 (SwinV2's
    `_init_respostnorm`), making the block an identity at initialisation.

    Whether the windows are shifted is `shift`, or the `shifted` argument of a call: a
    scanned stage runs its plain and its shifted blocks with one block's structure
    (`ringmoe.model.scan`).
    """

    def __init__(self, dim: int, num_heads: int, resolution: int, window_size: int, shift: bool,
                 ffn: nnx.Module, *, cpb_hidden: int = CPB_HIDDEN, dtype=jnp.float32, rngs: nnx.Rngs,
                 zero_init_post_norm: bool = False):
        if resolution <= window_size:
            window_size, shift_size = resolution, 0
        else:
            shift_size = window_size // 2
        if resolution % window_size:
            raise ValueError(f"SwinV2Block: resolution {resolution} not divisible by window {window_size}")
        # shift_size: how far a shifted block rolls its windows (0: this stage never shifts).
        self.resolution, self.window_size, self.shift_size = resolution, window_size, shift_size
        self.shift = bool(shift) and shift_size > 0
        self.attn = WindowAttention(dim, num_heads, window_size, cpb_hidden=cpb_hidden,
                                    dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, rngs=rngs, zero_scale=zero_init_post_norm)
        self.ffn = ffn
        self.norm2 = LayerNorm(dim, rngs=rngs, zero_scale=zero_init_post_norm)

    def attention_mask(self) -> np.ndarray | None:
        """The (nW, N, N) additive mask of this stage's shifted windows, or None if it never shifts."""
        if not self.shift_size:
            return None
        return shifted_window_mask(self.resolution, self.window_size, self.shift_size)

    def __call__(self, x: jax.Array, modalities: Sequence[str], shifted: bool | None = None
                 ) -> tuple[jax.Array, dict]:
        """x: (B, H, W, D) with H = W = resolution, the images of `modalities` interleaved
        (`HierarchicalMoE`) -> (same shape, the ffn's aux dict)."""
        x = self.attend(x, shifted)
        y, aux = self.ffn(x, modalities)
        return self.add_ffn(x, y), aux

    def attend(self, x: jax.Array, shifted: bool | None = None) -> jax.Array:
        """The block up to its FFN: x + norm1(attn(x)), the FFN's input.

        `shifted`: whether to shift the windows; None for the block's own `shift`.
        """
        _, h, w, _ = x.shape
        if h != self.resolution or w != self.resolution:
            raise ValueError(f"SwinV2Block: expected {self.resolution}x{self.resolution} tokens, got {h}x{w}")
        x = constrain(x, "batch", None, None, "act_embed")
        s = self.shift_size if (self.shift if shifted is None else shifted) else 0
        ws = self.window_size
        shifted_x = jnp.roll(x, (-s, -s), axis=(1, 2)) if s else x
        mask = self.attention_mask() if s else None
        attn = self.attn(window_partition(shifted_x, ws), None if mask is None else jnp.asarray(mask))
        attn = window_reverse(attn, ws, h, w)
        if s:
            attn = jnp.roll(attn, (s, s), axis=(1, 2))
        x = x + self.norm1(attn.astype(jnp.float32)).astype(x.dtype)
        return constrain(x, "batch", None, None, "act_embed")

    def add_ffn(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """The block's output from its FFN's input x and output y: x + norm2(y)."""
        x = x + self.norm2(y.astype(jnp.float32)).astype(x.dtype)
        return constrain(x, "batch", None, None, "act_embed")


class PatchMerging(nnx.Module):
    """Halves the resolution and doubles the width: 2x2 neighbours -> 4D -> Linear 2D -> LayerNorm.

    Neighbours are concatenated in Swin's order (0,0), (1,0), (0,1), (1,1) (row, col
    offsets) so the reduction weight loads into standard Swin code unchanged.
    """

    def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.reduction = nnx.Linear(
            4 * dim, 2 * dim, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(DENSE_INIT, None, "embed"), rngs=rngs)
        self.norm = LayerNorm(2 * dim, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, D) -> (B, H/2, W/2, 2D), in the compute dtype."""
        _, h, w, _ = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"PatchMerging: needs even H and W, got {h}x{w}")
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = self.norm(self.reduction(x.astype(self.dtype)))
        return constrain(x, "batch", None, None, "act_embed")
