"""The full RingMoE encoder: shapes, modalities, parameter counts of the configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ringmoe_14b, ringmoe_1b, tiny
from ringmoe.model.params import abstract_model, count
from ringmoe.model.ringmoe import create_model


def small_config(**moe):
    """The tiny config cut to two stages and two modalities, for fast compiles."""
    c = tiny.get_config().model
    c.image_size, c.depths, c.num_heads = 32, (2, 2), (2, 4)
    for m in ("sar_l2", "sar_l1"):
        del c.modalities[m]
    c.moe.update(moe)
    return c


@pytest.fixture(scope="module")
def model():
    return create_model(small_config(), seed=0)


def random_batch(config, batch=2, seed=0):
    out = {}
    grid = config.image_size // config.patch_size
    for i, (m, mc) in enumerate(config.modalities.items()):
        k1, k2 = jax.random.split(jax.random.key(seed + i))
        out[m] = {"pixels": jax.random.normal(k1, (batch, config.image_size, config.image_size, mc.channels)),
                  "mask": jax.random.bernoulli(k2, 0.6, (batch, grid, grid))}
    return out


def test_forward_shapes_and_router_stats(model):
    config = small_config()
    out = nnx.jit(lambda m, b: m(b))(model, random_batch(config))
    for m, mc in config.modalities.items():
        rec = out[m]["reconstruction"]
        assert rec.shape == (2, 32, 32, mc.channels)
        assert np.isfinite(np.asarray(rec)).all()
        enc = out[m]["encoded"]
        assert enc.features.shape == (2, 4, 4, 64)
        assert [f.shape[1] for f in enc.stage_features] == [8, 4]
        assert len(enc.router_stats) == sum(config.depths)
        assert set(enc.router_stats[0]) == {"modal", "collaborative"}


def test_one_backbone_pass_equals_a_pass_per_modality(model):
    """All modalities through one pass (images interleaved) is the model of one pass per
    modality: the same reconstructions, features and router statistics."""
    config = small_config()
    batch = random_batch(config)
    assert model.passes(batch) == [model.modalities]   # one pass: every modality shares the grid
    forward = nnx.jit(lambda m, b: m(b))
    joint = forward(model, batch)
    for m in config.modalities:
        alone = forward(model, {m: batch[m]})[m]
        np.testing.assert_allclose(joint[m]["reconstruction"], alone["reconstruction"], rtol=2e-5, atol=2e-5)
        for a, b in zip(joint[m]["encoded"].stage_features, alone["encoded"].stage_features):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
        for a, b in zip(jax.tree.leaves(joint[m]["encoded"].router_stats),
                        jax.tree.leaves(alone["encoded"].router_stats)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    # Token grids or batch sizes that differ make separate passes.
    uneven = {"optical": batch["optical"], "multispectral": {"pixels": batch["multispectral"]["pixels"][:1]}}
    assert sorted(model.passes(uneven)) == [("multispectral",), ("optical",)]


def test_mask_token_replaces_masked_patches(model):
    pixels = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    mask = jnp.zeros((1, 8, 8), bool).at[0, 2, 3].set(True)
    tokens = model.embed(pixels, "optical", mask)
    np.testing.assert_allclose(tokens[0, 2, 3], model.mask_token[...], rtol=1e-6)
    plain = model.embed(pixels, "optical")
    np.testing.assert_allclose(tokens[0, 0, 0], plain[0, 0, 0], rtol=1e-6)


def test_wavelength_embedding_takes_band_subsets(model):
    wl, bw = model.spectra("multispectral")
    pixels = jax.random.normal(jax.random.key(1), (1, 32, 32, 12))
    full = model.encode(pixels, "multispectral")
    subset = np.array([1, 2, 3, 7])  # B2 B3 B4 B8
    four = model.encode(pixels[..., subset], "multispectral", spectra=(wl[subset], bw[subset]))
    assert full.features.shape == four.features.shape
    assert not np.allclose(full.features, four.features)


def test_unknown_modality_is_a_clear_error(model):
    with pytest.raises(ValueError, match="modality 'hyperspectral' is not in this model"):
        model.embed(jnp.zeros((1, 32, 32, 3)), "hyperspectral")


def test_dense_config_has_no_routers():
    c = small_config()
    c.moe.enabled = False
    counts = count(abstract_model(c))
    assert not any("expert" in k for k in counts["components"])
    assert counts["active_per_token"]["optical"] == counts["per_modality"]["optical"]


def test_reference_parameter_counts():
    """DESIGN.md s.2: 14.74B in all, 6.53B per modality, ~2.4B active; 1.06B dense."""
    giant = count(abstract_model(ringmoe_14b.get_config().model))
    assert abs(giant["total"] / 14.74e9 - 1) < 0.01
    for m, n in giant["per_modality"].items():
        assert abs(n / 6.53e9 - 1) < 0.02, m
    for m, n in giant["active_per_token"].items():
        assert 2.3e9 < n < 2.5e9, m
    dense = count(abstract_model(ringmoe_1b.get_config().model))
    assert abs(dense["total"] / 1.06e9 - 1) < 0.02


def test_scanned_blocks_and_remat_change_nothing():
    """Scanned blocks with remat inside the scan give the loss and gradients of unrolled blocks
    without remat: neither changes a value. Stage 0 has five blocks (two steps of a plain-shifted
    pair, then a plain block after the loop); stage 1 one block, which never shifts (4x4 tokens =
    one window). Two compiles only: this test is among the slowest."""
    from ringmoe.model.scan import unrolled_params

    def loss_and_grads(scan_layers, remat):
        config = small_config()
        del config.modalities["multispectral"]   # one modality: half the compiles
        config.depths = (5, 1)
        config.scan_layers, config.remat = scan_layers, remat
        model = create_model(config, seed=0)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            out = nnx.merge(graphdef, params)(random_batch(config))
            return sum(jnp.mean(o["reconstruction"] ** 2) for o in out.values())
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return value, unrolled_params({path: np.asarray(g[...]) for path, g in nnx.to_flat_state(grads)})

    reference_loss, reference_grads = loss_and_grads(False, "none")
    assert ("stages", 0, "blocks", 4, "attn", "qkv") in reference_grads
    value, grads = loss_and_grads(True, "block")
    np.testing.assert_allclose(value, reference_loss, rtol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for path, g in grads.items():   # float32 rounding of a differently fused program
        reference = reference_grads[path]
        np.testing.assert_allclose(g, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max(), err_msg=str(path))
    with pytest.raises(ValueError, match="unknown model.remat 'most'"):
        config = small_config()
        config.remat = "most"
        create_model(config, seed=0)
