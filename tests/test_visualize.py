"""PNG pictures: valid files of sensible size; composites pick bands by physics."""
import json
import struct
import types

import numpy as np
import pytest
from matplotlib import image as mpimg

from configs import tiny
from ringmoe import visualize
from ringmoe.model.ringmoe import Encoded, RingMoE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path, min_side=150, max_side=6000):
    width, height = png_size(path)
    assert min_side <= width <= max_side and min_side <= height <= max_side, (width, height)
    assert mpimg.imread(path).shape[:2] == (height, width)  # decodes


@pytest.fixture(scope="module")
def tiny_setup():
    config = tiny.get_config().model
    # RingMoE.spectra on a stand-in: the real method, no parameters built.
    model = types.SimpleNamespace(band_spectra={m: tuple((b[1], b[2]) for b in config.modalities[m].bands)
                                                for m in config.modalities.keys()})
    model.spectra = lambda m: RingMoE.spectra(model, m)
    rng = np.random.default_rng(0)
    size, grid = config.image_size, config.image_size // config.patch_size
    batch, outputs, norm_stats = {}, {}, {}
    for m, mc in config.modalities.items():
        pixels = rng.normal(size=(3, size, size, mc.channels)).astype(np.float32)
        batch[m] = {"pixels": pixels, "mask": rng.random((3, grid, grid)) < 0.6,
                    "record_index": np.arange(3)}
        features = np.zeros((3, 2, 2, 256), np.float32)
        outputs[m] = {"reconstruction": pixels + 0.3 * rng.normal(size=pixels.shape).astype(np.float32),
                      "encoded": Encoded(features, (features,), ())}
        mean = {"sar_l2": [-12.0, -19.0]}.get(m, [0.1] * mc.channels)
        norm_stats[m] = {"mean": np.asarray(mean, np.float32)[:mc.channels],
                         "std": np.full(mc.channels, 0.05 if m != "sar_l2" else 3.0, np.float32)}
    return model, batch, outputs, norm_stats


def test_reconstructions_png(tmp_path, tiny_setup):
    model, batch, outputs, norm_stats = tiny_setup
    path = visualize.save_reconstructions(str(tmp_path / "pics" / "rec.png"), batch, outputs, model, norm_stats,
                                          max_rows=2)
    assert path.endswith("rec.png")
    width, height = png_size(path)
    assert height > width  # 4 modalities x 2 rows, 3 columns
    check_png(path)
    # without norm stats (percentile stretch) and with one row
    check_png(visualize.save_reconstructions(str(tmp_path / "raw.png"), batch, outputs, None, None, max_rows=1))


def test_multispectral_composite_picks_bands_by_wavelength():
    wavelengths = np.array([832.8, 492.4, 664.6, 442.7, 559.8])  # B8, B2, B4, B1, B3: any order
    x = np.arange(5, dtype=np.float32)[None, None, :] * np.ones((2, 2, 1), np.float32)
    rgb, fixed = visualize.composite("multispectral", x, wavelengths)
    assert fixed is None and rgb[0, 0].tolist() == [2.0, 4.0, 1.0]  # B4, B3, B2


def test_sar_composites():
    x = np.zeros((1, 1, 8), np.float32)
    x[..., 0] = 1.0   # HH = 1
    x[..., 6] = 1.0   # VV = 1  -> |HH - VV| = 0, |HH + VV| = 2
    x[..., 2] = 0.5   # HV = 0.5
    x[..., 4] = 0.5   # VH = 0.5 -> |HV + VH| / 2 = 0.5
    rgb, _ = visualize.composite("sar_l1", x)
    assert rgb[0, 0, 0] < -100 and rgb[0, 0, 1] == pytest.approx(20 * np.log10(0.5), abs=1e-3)
    assert rgb[0, 0, 2] == pytest.approx(20 * np.log10(2.0), abs=1e-3)
    db = np.array([[[-12.0, -20.0]]], np.float32)
    rgb, fixed = visualize.composite("sar_l2", db)
    assert rgb[0, 0].tolist() == [-12.0, -20.0, 8.0] and fixed == visualize.SAR_L2_DB_RANGES


def test_expert_load_heatmap_png(tmp_path):
    rng = np.random.default_rng(1)
    loads = {}
    for key, experts in (("optical/modal", 2), ("optical/collaborative", 2), ("sar_l1/modal", 4)):
        raw = rng.random((8, experts))
        loads[key] = raw / raw.sum(1, keepdims=True)
    check_png(visualize.save_expert_load_heatmap(str(tmp_path / "load.png"), loads))
    check_png(visualize.save_expert_load_heatmap(str(tmp_path / "none.png"), {}), min_side=100)


def test_loss_curves_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w", encoding="utf-8") as f:
        for step in range(1, 21):
            f.write(json.dumps({"step": step, "loss": 2.0 / step, "optical/total": 1.0 / step,
                                "optical/simmim": 0.9 / step, "sar_l2/total": 1.0 / step ** 0.5,
                                "router/total": 1e-3, "lr": 1e-4, "grad_norm": None}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "eval/loss": 1.0, "eval/optical/simmim": 0.5,
                                    "eval/optical/total": 0.5}) + "\n")
        f.write('{"step": 21, "loss"')  # a line cut short
    totals, terms, evals = visualize.default_loss_keys(visualize.read_jsonl(str(metrics)))
    assert totals == ["loss", "optical/total", "sar_l2/total"] and terms == ["optical/simmim"]
    assert evals == ["eval/loss", "eval/optical/simmim"]
    check_png(visualize.save_loss_curves(str(tmp_path / "loss.png"), str(metrics)))
    check_png(visualize.save_loss_curves(str(tmp_path / "lr.png"), str(metrics), keys=["lr"]))
    check_png(visualize.save_loss_curves(str(tmp_path / "empty.png"), str(tmp_path / "missing.jsonl")),
              min_side=100)
