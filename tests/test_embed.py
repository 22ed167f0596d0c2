"""Patch embeddings: fixed-channel PatchEmbed, the complex-SAR one and the wavelength-aware one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ringmoe.config import S2_L2A_BANDS
from ringmoe.model.embed import (EMBEDDINGS, ComplexPatchEmbed, PatchEmbed, WavelengthPatchEmbed, build_embedding,
                                  log_power, projected_channels)

D, P = 16, 4
WAVELENGTHS = np.array([b[1] for b in S2_L2A_BANDS], np.float32)
BANDWIDTHS = np.array([b[2] for b in S2_L2A_BANDS], np.float32)


@pytest.fixture(autouse=True)
def _fast_cpu_init():
    """Non-partitionable threefry, for these tests only: XLA:CPU then compiles the
    initialisers of 3-D kernels in ~0.5 s instead of ~4 s; values do not matter."""
    with jax.threefry_partitionable(False):
        yield


def pixels(channels, seed=0, size=8):
    # numpy, not jax.random: each new jax.random shape costs seconds of XLA compile on CPU
    return np.random.default_rng(seed).uniform(0.0, 0.5, (2, size, size, channels)).astype(np.float32)


def wave_embed():
    return WavelengthPatchEmbed(D, P, hidden=32, rngs=nnx.Rngs(0))


def test_patch_embed_shape_and_conv_equivalence():
    embed = PatchEmbed(3, D, P, rngs=nnx.Rngs(0))
    x = pixels(3)
    out = embed(x)
    assert out.shape == (2, 2, 2, D)
    kernel = embed.proj.kernel[...].reshape(P, P, 3, D)   # HWIO convolution kernel
    conv = jax.lax.conv_general_dilated(x, kernel, (P, P), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(out, embed.norm(conv + embed.proj.bias[...]), atol=1e-5)


def test_patch_embed_errors():
    embed = nnx.eval_shape(lambda: PatchEmbed(3, D, P, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="expected 3 channels, got 4"):
        embed(jnp.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        embed(jnp.zeros((2, 8, 6, 3)))


def single_look(power, seed=0, size=8):
    """(2, size, size, 8) single-look quad-pol pixels, Re/Im interleaved: z ~ CN(0, power)."""
    z = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 2), (2, size, size, 8))
    return z.astype(np.float32)


def test_patch_embed_cannot_see_sar_l1_backscatter_but_complex_embed_can():
    """A single-look pixel is zero-mean whatever its backscatter, and LayerNorm after a
    bias-free projection divides out the token's scale: scaling the scene's power by 16
    (12 dB) leaves PatchEmbed's tokens unchanged. The log-power channels carry it."""
    z = single_look(1.0)
    plain = PatchEmbed(8, D, P, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(plain(4.0 * z), plain(z), atol=1e-4)
    embed = ComplexPatchEmbed(8, D, P, rngs=nnx.Rngs(0))
    brighter = np.asarray(embed(4.0 * z))
    change = np.linalg.norm(brighter - np.asarray(embed(z)), axis=-1) / np.linalg.norm(brighter, axis=-1)
    assert change.min() > 0.1, change


def test_log_power_values():
    """ln(Re^2 + Im^2) per polarisation; its mean over single-look pixels is ln sigma^2 - 0.5772
    (Euler's gamma) and its variance pi^2/6, whatever sigma^2: additive, fixed-variance speckle."""
    x = np.array([[3.0, 4.0, 0.0, 0.0, -1.0, 0.0, 0.5, 0.5]], np.float32)
    np.testing.assert_allclose(log_power(x), [[np.log(25.0), 0.0, 0.0, np.log(0.5)]], atol=1e-6)
    for power in (0.01, 1.0, 100.0):
        lp = np.asarray(log_power(single_look(power, seed=1, size=64)))
        assert abs(lp.mean() - (np.log(power) - np.euler_gamma)) < 0.03, (power, lp.mean())
        assert abs(lp.var() - np.pi ** 2 / 6) < 0.06, (power, lp.var())
    with pytest.raises(ValueError, match="Re/Im pairs"):
        log_power(np.zeros((1, 3), np.float32))


def test_complex_embed_projects_log_powers_after_re_im():
    embed = ComplexPatchEmbed(8, D, P, rngs=nnx.Rngs(0))
    assert embed.proj.kernel.shape == (P * P * 12, D) and projected_channels("complex", 8) == 12
    z = single_look(2.0)
    features = np.concatenate([z, np.asarray(log_power(z))], -1)
    np.testing.assert_allclose(embed(z), PatchEmbed.__call__(embed, features), atol=1e-5)
    with pytest.raises(ValueError, match="expected 8 Re/Im channels, got 6"):
        embed(jnp.zeros((2, 8, 8, 6)))
    with pytest.raises(ValueError, match="not Re/Im pairs"):
        ComplexPatchEmbed(7, D, P, rngs=nnx.Rngs(0))


def test_embedding_registry():
    assert isinstance(build_embedding("complex", 8, D, P, dtype=jnp.float32, rngs=nnx.Rngs(0)), ComplexPatchEmbed)
    assert set(EMBEDDINGS) == {"patch", "wavelength", "complex"}
    with pytest.raises(ValueError, match="unknown patch embedding 'conv'"):
        build_embedding("conv", 3, D, P, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_every_param_has_logical_names():
    for build in (lambda: PatchEmbed(3, D, P, rngs=nnx.Rngs(0)), wave_embed):
        module = nnx.eval_shape(build)
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var.ndim, (path, names)
    assert nnx.eval_shape(build).norm.scale.get_metadata()["out_sharding"] == ("embed",)


def test_wavelength_embed_any_band_subset():
    embed = wave_embed()
    full = embed(pixels(12), WAVELENGTHS, BANDWIDTHS)
    assert full.shape == (2, 2, 2, D) and bool(jnp.all(jnp.isfinite(full)))
    subset = [1, 2, 3, 7]    # B2, B3, B4, B8
    part = embed(pixels(12)[..., subset], WAVELENGTHS[subset], BANDWIDTHS[subset])
    assert part.shape == (2, 2, 2, D)
    one = embed(pixels(12)[..., :1], WAVELENGTHS[:1], BANDWIDTHS[:1])
    assert one.shape == (2, 2, 2, D) and bool(jnp.all(jnp.isfinite(one)))
    # The same pixels labelled with other wavelengths embed differently.
    relabelled = embed(pixels(12)[..., subset], WAVELENGTHS[[0, 8, 10, 11]], BANDWIDTHS[[0, 8, 10, 11]])
    assert float(jnp.abs(relabelled - part).max()) > 1e-3


def test_wavelength_embed_permutation_invariant():
    embed = wave_embed()
    x = pixels(12)
    perm = np.random.default_rng(3).permutation(12)
    out = embed(x, WAVELENGTHS, BANDWIDTHS)
    permuted = embed(x[..., perm], WAVELENGTHS[perm], BANDWIDTHS[perm])
    np.testing.assert_allclose(permuted, out, atol=1e-5, rtol=1e-5)


def test_wavelength_embed_is_a_mean_over_bands():
    """Duplicating every band leaves the pre-norm projection unchanged (divide by C)."""
    embed = wave_embed()
    x = pixels(12)
    twice = embed.project(np.concatenate([x, x], -1), np.tile(WAVELENGTHS, 2), np.tile(BANDWIDTHS, 2))
    np.testing.assert_allclose(twice, embed.project(x, WAVELENGTHS, BANDWIDTHS), atol=1e-5, rtol=1e-5)


def test_wavelength_embed_errors():
    embed = nnx.eval_shape(wave_embed)
    with pytest.raises(ValueError, match=r"wavelengths_nm of shape \(4,\)"):
        embed(jnp.zeros((2, 8, 8, 4)), WAVELENGTHS, BANDWIDTHS)
    with pytest.raises(ValueError, match="positive"):
        embed(jnp.zeros((2, 8, 8, 2)), np.array([500.0, 0.0]), np.array([10.0, 10.0]))


def test_wavelength_embed_gradients_and_jit():
    embed = wave_embed()
    x = pixels(12)

    def loss_fn(model, x, wl, bw):
        return jnp.mean(model(x, wl, bw) * jnp.arange(D))

    grads = nnx.jit(nnx.grad(loss_fn))(embed, x, WAVELENGTHS, BANDWIDTHS)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0.0, path
    # Traced wavelengths (no concrete positivity check) give the eager result.
    jitted = nnx.jit(lambda m, x, wl, bw: m(x, wl, bw))(embed, x, WAVELENGTHS, BANDWIDTHS)
    np.testing.assert_allclose(jitted, embed(x, WAVELENGTHS, BANDWIDTHS), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    for build, args in ((lambda: PatchEmbed(3, D, P, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), (pixels(3),)),
                        (lambda: WavelengthPatchEmbed(D, P, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                         (pixels(12), WAVELENGTHS, BANDWIDTHS))):
        module = nnx.eval_shape(build)
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
        assert nnx.eval_shape(lambda m, *a: m(*a), module, *args).dtype == jnp.bfloat16
