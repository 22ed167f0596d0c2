"""No-data pixels: marked by the reader's fill, carried as the batch's "valid" through the
crop, zero in the encoder's input, absent from every loss term and from the probes' labels."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.data import pipeline as pl
from ringmoe.data import sensors, shards
from ringmoe.data.schema import ModalityImage, Record, valid_pixels
from ringmoe.model.ringmoe import create_model
from ringmoe.training.step import make_loss_fn
from tests.small import micro_config

S2_FILL = 0.0       # sentinel2_l2a:offset=0 writes DN 0 -> reflectance 0 into no-data pixels


def test_valid_pixels_rule():
    """Any channel at the fill marks a pixel invalid, except for complex SAR (all channels)."""
    s2 = sensors.get_preset("sentinel2_l2a")
    px = np.full((2, 2, 12), 0.1, np.float32)
    px[0, 0] = S2_FILL
    px[0, 1, 3] = S2_FILL                                  # one band missing
    image = ModalityImage("multispectral", px, s2.bands, s2.name, 10.0, nodata=S2_FILL)
    np.testing.assert_array_equal(valid_pixels(image), [[False, False], [True, True]])
    quad = sensors.get_preset("sar_l1_quadpol")
    z = np.full((2, 2, 8), 0.3, np.float32)
    z[0, 0] = 0.0                                           # 0 + 0j everywhere: the SLC fill
    z[1, 1, 0] = 0.0                                        # Re(HH) = 0 alone: a legitimate sample
    image = ModalityImage("sar_l1", z, quad.bands, quad.name, 8.0, nodata=0.0)
    np.testing.assert_array_equal(valid_pixels(image), [[False, True], [True, True]])
    assert valid_pixels(ModalityImage("sar_l1", z, quad.bands, quad.name, 8.0)).all()


def test_slc_zero_fill_is_no_data():
    """Complex presets read 0 + 0j (SLC burst borders, zero-filled margins) as no data."""
    z = np.full((4, 4, 4), 0.5 + 0.25j, np.complex64)
    z[:, 0] = 0
    z[1, 1, 0] = 0.7j                                       # Re(HH) = 0 alone stays valid
    conv = sensors.get_preset("sar_l1_quadpol").bind("slc.tif", count=4, dtype="complex64")
    expected = np.ones((4, 4), bool)
    expected[:, 0] = False
    np.testing.assert_array_equal(valid_pixels(conv.image(z, "slc.tif")), expected)


def test_pipeline_marks_no_data_invalid_zero_and_unlabelled(tmp_path):
    """A stripe of no-data rows: "valid" False there, normalised pixels 0 (the band mean), label 0;
    the manifest's band statistics skip them."""
    rng = np.random.default_rng(0)
    s2, quad = sensors.get_preset("sentinel2_l2a"), sensors.get_preset("sar_l1_quadpol")
    records = []
    for i in range(4):
        ms = rng.uniform(0.05, 0.4, (32, 32, 12)).astype(np.float32)
        ms[:8] = S2_FILL
        slc = rng.normal(size=(32, 32, 8)).astype(np.float32)
        slc[-4:] = 0.0
        records.append(Record(f"r{i}", {
            "multispectral": ModalityImage("multispectral", ms, s2.bands, s2.name, 10.0, nodata=S2_FILL),
            "sar_l1": ModalityImage("sar_l1", slc, quad.bands, quad.name, 8.0, nodata=0.0)},
            label_map=np.ones((32, 32), np.int32), scene_label=1))
    data = str(tmp_path / "data")
    manifest = shards.write_shards(records, data, source="test", label_names=["none", "one"])
    assert min(manifest["modalities"]["multispectral"]["mean"]) > 0.2        # fills not averaged in
    assert manifest["modalities"]["multispectral"]["valid_pixels"][0] == 4 * 24 * 32
    config = micro_config(("multispectral", "sar_l1"))
    config.batch_size, config.data.prefetch, config.data.mask_block_size = 4, 0, 8
    with pl.Pipeline(config, data, process_index=0, process_count=1, train=False) as p:
        batch = next(p)
    for m, bad_rows in (("multispectral", slice(0, 8)), ("sar_l1", slice(-4, None))):
        b = batch[m]
        expected = np.ones((32, 32), bool)
        expected[bad_rows] = False
        assert b["valid"].shape == (2, 32, 32)
        np.testing.assert_array_equal(b["valid"], np.broadcast_to(expected, b["valid"].shape))
        assert np.all(b["pixels"][:, bad_rows] == 0) and np.all(b["label_map"][:, bad_rows] == 0)
        assert np.all(b["label_map"][:, expected] == 1)


def test_loss_and_gradients_ignore_values_under_no_data():
    """The train step's loss (SimMIM, span, Pauli, speckle NLL, cross-pol ratio, SAM, indices,
    cross-modal, router): whatever no-data pixels hold changes neither the loss nor its gradients."""
    config = micro_config(("multispectral", "sar_l2", "sar_l1"))
    config.objectives.cross_modal = True
    c = config.model
    model = create_model(c, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    grid = c.image_size // c.patch_size
    batch, norm = {}, {}
    valid = np.ones((2, 32, 32), bool)
    valid[0, 4:20, 8:24] = False                              # a no-data hole, masked and unmasked tokens
    valid[1, :, :6] = False
    for i, (m, mc) in enumerate(c.modalities.items()):
        k1, k2 = jax.random.split(jax.random.key(i))
        batch[m] = {"pixels": jax.random.normal(k1, (2, 32, 32, mc.channels)),
                    "mask": jax.random.bernoulli(k2, 0.6, (2, grid, grid)),
                    "valid": jnp.asarray(valid), "record_index": jnp.array([3, 4])}
        norm[m] = {"mean": np.full(mc.channels, -15.0 if m == "sar_l2" else 0.1, np.float32),
                   "std": np.full(mc.channels, 4.0 if m == "sar_l2" else 0.05, np.float32)}
    loss_and_grads = jax.jit(jax.value_and_grad(make_loss_fn(graphdef, config, norm), has_aux=True))
    (loss, (terms, _)), grads = loss_and_grads(params, batch)
    assert {"sar_l1/span", "sar_l1/pauli", "sar_l2/speckle_nll", "sar_l2/xpol_ratio", "multispectral/sam",
            "multispectral/index", "cross_modal"} <= set(terms)
    garbage = {m: {**b, "pixels": jnp.where(b["valid"][..., None], b["pixels"],
                                            jnp.float32(1e4) * jax.random.normal(jax.random.key(9), b["pixels"].shape))}
               for m, b in batch.items()}
    (loss2, (terms2, _)), grads2 = loss_and_grads(params, garbage)
    assert float(loss2) == float(loss), {k: (float(terms[k]), float(terms2[k])) for k in terms}
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
