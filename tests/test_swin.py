"""SwinV2 backbone pieces: shapes, shifted-window masking, CPB, post-norm, grads, counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ringmoe import sharding
from ringmoe.model.swin import (
    MASK_VALUE, PatchMerging, SwinV2Block, WindowAttention, relative_coords_table, shifted_window_mask)

D, HEADS, CPB = 16, 2, 32


class TinyFFN(nnx.Module):
    """Token-wise test FFN; `mode` switches it to zero or identity for ordering checks."""

    def __init__(self, dim, rngs):
        self.fc = nnx.Linear(dim, dim, rngs=rngs)
        self.mode = "linear"

    def __call__(self, x, modalities):
        if self.mode == "zero":
            y = jnp.zeros_like(x)
        elif self.mode == "identity":
            y = x
        else:
            y = jnp.tanh(self.fc(x))
        return y, {"aux_loss": jnp.mean(y ** 2), "modality": modalities[0]}


@pytest.fixture(autouse=True)
def _fast_cpu_init():
    """Non-partitionable threefry, for these tests only: XLA:CPU then compiles the
    initialisers of 3-D/4-D kernels in ~0.5 s instead of ~4 s; values do not matter."""
    with jax.threefry_partitionable(False):
        yield


def make_block(resolution=8, window=4, shift=True, seed=0, dtype=jnp.float32, **kw):
    rngs = nnx.Rngs(seed)
    return SwinV2Block(D, HEADS, resolution, window, shift, TinyFFN(D, rngs),
                       cpb_hidden=CPB, dtype=dtype, rngs=rngs, **kw)


def perturb(module, seed=1, scale=0.3):
    """Adds noise to every parameter so zero-initialised biases are exercised too."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda v: v + scale * rng.standard_normal(v.shape, np.float32), state))


def tokens(shape, seed=2):
    # numpy, not jax.random: each new jax.random shape costs seconds of XLA compile on CPU
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def n_params(module, exclude=None):
    total = sum(v.size for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
    return total - (n_params(exclude) if exclude is not None else 0)


def abstract_block(resolution=8, window=4, shift=True):
    return nnx.eval_shape(lambda: make_block(resolution, window, shift))


def reference_attention(attn, x, window, shift):
    """Brute force: global attention over all tokens, allowed only inside a shifted window.

    In image coordinates the shifted windows (without wrap-around) are the groups
    floor((i - shift) / window) per axis; no roll, partition or mask code is reused.
    """
    b, h, w, d = x.shape
    t = x.reshape(b, h * w, d)
    qkv = jnp.einsum("bnd,dthk->tbnhk", t, attn.qkv[...])
    q, k, v = qkv[0] + attn.q_bias[...], qkv[1], qkv[2] + attn.v_bias[...]
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(attn.logit_scale[...], math.log(100.0)))
    logits = jnp.einsum("bnhk,bmhk->bhnm", q, k) * scale[:, None, None]
    ii, jj = (a.ravel() for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    gi, gj = (ii - shift) // window, (jj - shift) // window
    allowed = (gi[:, None] == gi[None]) & (gj[:, None] == gj[None])
    dy, dx = ii[:, None] - ii[None], jj[:, None] - jj[None]
    idx = np.where(allowed, (dy + window - 1) * (2 * window - 1) + dx + window - 1, 0)
    logits = logits + attn.position_bias_table()[idx].transpose(2, 0, 1)[None]
    logits = jnp.where(allowed[None, None], logits, -jnp.inf)
    out = jnp.einsum("bhnm,bmhk->bnhk", jax.nn.softmax(logits, axis=-1), v)
    out = jnp.einsum("bnhk,hkd->bnd", out, attn.proj.kernel[...]) + attn.proj.bias[...]
    return out.reshape(b, h, w, d)


@pytest.mark.parametrize("shift", [False, True])
def test_block_matches_brute_force_reference(shift):
    block = make_block(shift=shift)
    perturb(block)
    block.ffn.mode = "zero"
    x = tokens((2, 8, 8, D))
    out, aux = block(x, ("optical",))
    assert block.shift_size == 2 and block.shift == shift
    expected = x + block.norm1(reference_attention(block.attn, x, 4, 2 if shift else 0))
    expected = expected + block.norm2(jnp.zeros_like(x))   # the zero FFN's norm2 leaves its bias
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    assert aux["modality"] == "optical"
    # A scanned stage runs a plain block's structure with shifted=True: the same output.
    other = make_block(shift=not shift)
    perturb(other)
    other.ffn.mode = "zero"
    np.testing.assert_allclose(other(x, ("optical",), shift)[0], out, atol=1e-6, rtol=1e-6)


def test_output_shape_and_window_clipping():
    block = abstract_block(resolution=8, window=4)
    out = nnx.eval_shape(lambda m, x: m(x, ("sar_l2",))[0], block, jnp.zeros((2, 8, 8, D)))
    assert out.shape == (2, 8, 8, D) and block.window_size == 4 and block.shift_size == 2
    for resolution in (2, 4):
        small = abstract_block(resolution=resolution, window=4, shift=True)
        assert small.window_size == resolution and small.shift_size == 0
        assert small.attention_mask() is None
        table = nnx.eval_shape(lambda m: m.attn.position_bias_table(), small)
        assert table.shape == ((2 * resolution - 1) ** 2, HEADS)
        x = jnp.zeros((3, resolution, resolution, D))
        assert nnx.eval_shape(lambda m, x: m(x, ("optical",))[0], small, x).shape == x.shape


def test_bad_resolution_raises():
    with pytest.raises(ValueError, match="not divisible"):
        make_block(resolution=6, window=4)
    with pytest.raises(ValueError, match="expected 8x8"):
        abstract_block()(jnp.zeros((1, 4, 4, D)), ("optical",))


def test_unshifted_windows_do_not_mix():
    block = make_block(shift=False)
    perturb(block)
    x = tokens((2, 8, 8, D))
    x2 = x.copy()
    x2[:, :4, :4] += tokens((2, 4, 4, D), seed=5)
    diff = jnp.abs(block(x2, ("optical",))[0] - block(x, ("optical",))[0]).max(axis=-1)[0]
    assert float(diff[:4, :4].min()) > 1e-4
    outside = diff.at[:4, :4].set(0.0)
    assert float(outside.max()) == 0.0


def test_shifted_window_mask():
    mask = shifted_window_mask(8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert set(np.unique(mask)) <= {0.0, MASK_VALUE} and MASK_VALUE == -100.0   # timm's value
    assert (mask[0] == 0).all()          # interior window: no wrapped tokens
    assert (mask[3] < 0).sum() > (mask[1] < 0).sum() > 0
    np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))


def test_cpb_table_shape_and_range():
    for window in (1, 3, 4):
        coords = relative_coords_table(window)
        assert coords.shape == ((2 * window - 1) ** 2, 2)
        bound = math.log2(9.0) / 3.0 if window > 1 else 0.0
        np.testing.assert_allclose(np.abs(coords).max(), bound, rtol=1e-6)
        attn = WindowAttention(D, HEADS, window, cpb_hidden=CPB, rngs=nnx.Rngs(0))
        table = attn.position_bias_table()
        assert table.shape == ((2 * window - 1) ** 2, HEADS)
        assert float(table.min()) > 0.0 and float(table.max()) < 16.0


def test_logit_scale_init_and_clamp():
    attn = WindowAttention(D, HEADS, 4, cpb_hidden=CPB, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(attn.logit_scale[...], math.log(10.0), rtol=1e-6)
    x = tokens((8, 16, D))   # the block's window batch shape, so compiled ops are reused
    attn.logit_scale[...] = jnp.full((HEADS,), math.log(100.0))
    at_cap = attn(x)
    attn.logit_scale[...] = jnp.full((HEADS,), 10.0)
    np.testing.assert_allclose(attn(x), at_cap, atol=1e-6)


def test_post_norm_ordering_and_zero_init():
    block = make_block()
    perturb(block)
    x = tokens((2, 8, 8, D))
    block.ffn.mode = "zero"
    out_zero, _ = block(x, ("optical",))
    x1 = out_zero - block.norm2(jnp.zeros_like(x))   # x + norm1(attn(x)); norm2(0) is its bias
    block.ffn.mode = "identity"
    out, _ = block(x, ("optical",))
    np.testing.assert_allclose(out, x1 + block.norm2(x1), atol=1e-5, rtol=1e-5)

    ident = make_block(zero_init_post_norm=True)
    out, _ = ident(x, ("optical",))
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_gradients_finite_and_nonzero_for_all_params():
    block = make_block(shift=True)

    def loss_fn(model, x):
        out, aux = model(x, ("optical",))
        return jnp.mean(out ** 2) + aux["aux_loss"]

    grads = nnx.jit(nnx.grad(loss_fn))(block, tokens((2, 8, 8, D)))
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert len(flat) == 15   # 13 in the block, 2 in the test FFN
    for path, g in flat:
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0.0, path


def test_block_parameter_count_is_swinv2():
    for dim, heads, cpb in ((16, 2, 32), (48, 3, 64)):
        def build():
            rngs = nnx.Rngs(0)
            return SwinV2Block(dim, heads, 8, 4, True, TinyFFN(dim, rngs), cpb_hidden=cpb, rngs=rngs)
        block = nnx.eval_shape(build)
        ffn = block.ffn
        qkv = dim * 3 * dim + 2 * dim         # q and v biases, no k bias
        proj = dim * dim + dim
        cpb_mlp = 2 * cpb + cpb + cpb * heads  # second layer bias-free, as in SwinV2
        expected = qkv + proj + heads + cpb_mlp + 2 * 2 * dim
        assert n_params(block, exclude=ffn) == expected


def test_every_param_has_logical_names():
    modules = [abstract_block(), nnx.eval_shape(lambda: PatchMerging(D, rngs=nnx.Rngs(0)))]
    for module in modules:
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            if "ffn" in path:
                continue
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var.ndim, (path, names)
    qkv = modules[0].attn.qkv
    assert qkv.shape == (D, 3, HEADS, D // HEADS)
    assert qkv.get_metadata()["out_sharding"] == ("embed", None, "heads", None)
    assert modules[0].attn.proj.kernel.get_metadata()["out_sharding"] == ("heads", None, "embed")


def test_patch_merging():
    merge = PatchMerging(D, rngs=nnx.Rngs(0))
    x = tokens((2, 8, 6, D))
    out = merge(x)
    assert out.shape == (2, 4, 3, 2 * D)
    assert n_params(merge) == 4 * D * 2 * D + 2 * 2 * D
    cat = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    np.testing.assert_allclose(out, merge.norm(cat @ merge.reduction.kernel[...]), atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        merge(tokens((1, 5, 4, D)))


def test_bfloat16_compute_keeps_float32_params():
    x = tokens((2, 8, 8, D))
    ref = make_block()(x, ("optical",))[0]
    low = make_block(dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(low, nnx.Param)))
    out = low(x, ("optical",))[0]
    assert out.dtype == x.dtype
    np.testing.assert_allclose(out, ref, atol=0.1)
    out16 = nnx.eval_shape(lambda m, x: m(x, ("optical",))[0], low, x.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16
    merge = nnx.eval_shape(lambda: PatchMerging(D, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert nnx.eval_shape(lambda m, x: m(x), merge, x).dtype == jnp.bfloat16


def test_sharded_forward_matches_unsharded():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "expert": 1, "tensor": 2}, jax.devices()[:4])
    block = make_block()
    x = tokens((2, 8, 8, D))
    expected = block(x, ("optical",))[0]
    graphdef, state = nnx.split(block)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        assert state["attn"]["qkv"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, ("optical",))[0])(state, x)
    np.testing.assert_allclose(out, expected, atol=1e-5)
