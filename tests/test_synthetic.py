"""Synthetic scenes: sensor physics sanity, determinism, pairing, CLI, label hardness."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ringmoe.data import hardness, shards, synthetic
from ringmoe.data.schema import MODALITIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

S2 = {b: i for i, b in enumerate(("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"))}
CLS = {c: i for i, c in enumerate(synthetic.CLASSES)}


def ndvi(x):
    return (x[..., S2["B8"]] - x[..., S2["B4"]]) / (x[..., S2["B8"]] + x[..., S2["B4"]])


@pytest.fixture(scope="module")
def scenes():
    return [synthetic.make_record(7, i, 96) for i in range(12)]


def _by_class(records, modality, fn=lambda p: p):
    """{class index: concatenated per-pixel values} over all records."""
    out = {}
    for r in records:
        values = fn(r.modalities[modality].pixels)
        for c in np.unique(r.label_map):
            out.setdefault(c - 1, []).append(values[r.label_map == c])
    return {c: np.concatenate(v) for c, v in out.items()}


def test_class_spectra_are_physical():
    s = synthetic.SPECTRA
    assert s.shape == (len(synthetic.CLASSES), 12) and len(synthetic.CLASSES) >= 6
    for c in ("forest", "cropland", "grassland", "wetland"):
        assert ndvi(s[CLS[c]]) > 0.5, c
        assert s[CLS[c], S2["B5"]] < s[CLS[c], S2["B7"]]          # red edge
    water = s[CLS["water"]]
    assert ndvi(water) < 0 and water[S2["B8"]] <= 0.012 and np.all(np.diff(water[1:]) <= 0)
    soil = s[CLS["bare_soil"]]
    assert soil[S2["B2"]] < soil[S2["B4"]] < soil[S2["B8"]] < soil[S2["B11"]]
    urban = s[CLS["urban"]]
    assert urban.min() > 0.1 and urban.max() - urban.min() < 0.15     # flat and bright
    assert (urban[S2["B11"]] - urban[S2["B8"]]) > 0                     # NDBI > 0


def test_generated_reflectance_and_rgb(scenes):
    by_class = _by_class(scenes, "multispectral", ndvi)
    assert np.median(by_class[CLS["water"]]) < 0
    for c in ("forest", "cropland"):
        assert np.median(by_class[CLS[c]]) > 0.5, c
    for r in scenes:
        refl, rgb = r.modalities["multispectral"].pixels, r.modalities["optical"].pixels
        assert 0 < refl.min() and refl.max() <= 1 and 0 <= rgb.min() and rgb.max() <= 1
        np.testing.assert_allclose(rgb, np.clip(refl[..., [3, 2, 1]] * synthetic.RGB_GAIN, 0, 1), atol=1e-6)


def test_sar_l2_db_ranges(scenes):
    vv = {c: np.median(v) for c, v in _by_class(scenes, "sar_l2", lambda p: p[..., 0]).items()}
    vh = {c: np.median(v) for c, v in _by_class(scenes, "sar_l2", lambda p: p[..., 1]).items()}
    assert -26 < vv[CLS["water"]] < -18 and vh[CLS["water"]] < -24
    assert vv[CLS["urban"]] > -8 and vv[CLS["urban"]] == max(vv.values())
    land = [c for c in vv if c not in (CLS["water"], CLS["urban"])]
    assert all(-17 < vv[c] < -6 for c in land)
    assert all(vh[c] < vv[c] - 4 for c in vv)                          # cross-pol below co-pol
    assert vh[CLS["forest"]] > vh[CLS["cropland"]] > vh[CLS["bare_soil"]]   # volume scattering


def test_speckle_is_unit_mean_gamma():
    rng = np.random.default_rng(0)
    for looks in (1.0, 4.4):
        n = synthetic.speckle(rng, np.ones(400_000), looks)
        assert abs(n.mean() - 1) < 0.01 and abs(n.var() - 1 / looks) < 0.02 * (1 / looks) + 0.01
    # In dB the L=1 log bias is psi(1) - ln 1 = -0.5772 nepers = -2.51 dB (DESIGN.md s.4).
    db = synthetic.to_db(synthetic.speckle(rng, np.ones(400_000), 1.0))
    assert abs(db.mean() + 2.51) < 0.05


def test_sar_l1_span_matches_backscatter():
    rng = np.random.default_rng(1)
    vv, vh = 10 ** (-9 / 10), 10 ** (-16 / 10)
    power = np.broadcast_to(np.array([vv, vh]), (300, 300, 2))
    slc = synthetic.quadpol(rng, power, np.full((300, 300), 0.4))
    assert slc.shape == (300, 300, 8) and slc.dtype == np.float32
    np.testing.assert_array_equal(slc[..., 2:4], slc[..., 4:6])      # S_HV == S_VH
    p = slc.reshape(300, 300, 4, 2).astype(np.float64) ** 2
    p = p.sum(-1).mean((0, 1))                                         # E|S_pq|^2: HH, HV, VH, VV
    np.testing.assert_allclose(p, [vv, vh, vh, vv], rtol=0.03)
    assert abs(synthetic.span(slc).mean() / (2 * (vv + vh)) - 1) < 0.02
    for c in range(8):                                                 # circular: zero-mean parts
        assert abs(slc[..., c].mean()) < 0.01


def test_scene_span_tracks_class_backscatter(scenes):
    span = _by_class(scenes, "sar_l1", synthetic.span)
    expect = 2 * (10 ** (synthetic.SIGMA0_DB[:, 0] / 10) + 10 ** (synthetic.SIGMA0_DB[:, 1] / 10))
    for c, v in span.items():
        if v.size > 2000:  # patch terms are zero-mean in dB, so the linear mean is a little higher
            assert 0.6 < v.mean() / expect[c] < 1.8, synthetic.CLASSES[c]


def test_labels_and_coregistration(scenes):
    seen = set()
    for r in scenes:
        assert r.label_map.dtype == np.int32 and r.label_map.min() >= 1
        assert r.label_map.max() <= len(synthetic.CLASSES)
        assert r.scene_label == np.bincount(r.label_map.ravel()).argmax()
        assert {im.pixels.shape[:2] for im in r.modalities.values()} == {r.label_map.shape}
        seen |= set(np.unique(r.label_map).tolist())
    assert len(seen) >= 6
    assert len({r.scene_label for r in scenes}) >= 3


def test_determinism_from_seed():
    a, b = synthetic.make_record(3, 5, 32), synthetic.make_record(3, 5, 32)
    c = synthetic.make_record(4, 5, 32)
    for m in a.modalities:
        np.testing.assert_array_equal(a.modalities[m].pixels, b.modalities[m].pixels)
    np.testing.assert_array_equal(a.label_map, b.label_map)
    assert not np.array_equal(a.label_map, c.label_map) or not np.array_equal(
        a.modalities["sar_l2"].pixels, c.modalities["sar_l2"].pixels)
    assert [r.sample_id for r in synthetic.generate(3, 16, 3)] == [f"synthetic-3-{i:08d}" for i in range(3)]


def test_paired_fraction():
    records = list(synthetic.generate(300, 16, 11, paired_fraction=0.3, labeled=False))
    paired = [r for r in records if len(r.modalities) > 1]
    assert abs(len(paired) / 300 - 0.3) < 0.08
    assert all(set(r.modalities) == set(MODALITIES) for r in paired)
    singles = [next(iter(r.modalities)) for r in records if len(r.modalities) == 1]
    assert set(singles) == set(MODALITIES)
    assert all(r.label_map is None and r.scene_label is None for r in records)


def test_cli_writes_data_set(tmp_path):
    out = tmp_path / "ds"
    proc = subprocess.run([sys.executable, "-m", "tools.make_synthetic", "--out", str(out), "--examples", "10",
                           "--image-size", "16", "--seed", "2", "--paired-fraction", "0.5", "--labeled",
                           "--shard-size", "4"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = shards.read_manifest(str(out))
    assert summary["records"] == manifest["records"] == 10 and summary["shards"] == 3
    assert manifest["label_names"][0] == "unlabelled" and manifest["label_names"][1:] == list(synthetic.CLASSES)
    assert len(manifest["modalities"]["multispectral"]["mean"]) == 12
    first = next(shards.iter_records(str(out)))
    ref = synthetic.make_record(2, 0, 16, paired_fraction=0.5)
    for m in ref.modalities:
        np.testing.assert_array_equal(first.modalities[m].pixels, ref.modalities[m].pixels)


def test_label_hardness_linear_probe(tmp_path):
    synthetic.write(str(tmp_path / "h"), 60, 32, 5, paired_fraction=1.0, labeled=True)
    h = hardness.label_hardness(str(tmp_path / "h"), pixels_per_record=100)
    px = h["pixel"]
    assert px["multispectral"]["accuracy"] > px["multispectral"]["chance"] + 0.4
    assert px["sar_l2"]["accuracy"] > px["sar_l2"]["chance"] + 0.1
    assert px["sar_l1"]["accuracy"] < px["sar_l1"]["chance"] + 0.1       # raw Re/Im: no linear signal
    assert px["sar_l1_log_power"]["accuracy"] > px["sar_l1"]["accuracy"] + 0.1
    assert set(h["scene"]) >= {"optical", "multispectral", "sar_l2", "sar_l1"}


def test_pixel_probe_splits_by_record(tmp_path):
    """Records whose pixels carry a record fingerprint and a random per-record class: a split by
    pixel tests on training scenes and scores ~1; a split by record must score near chance."""
    from ringmoe.data.schema import Band, ModalityImage, Record
    rng = np.random.default_rng(0)
    n, channels = 40, 48
    bands = tuple(Band(f"c{i}", wavelength_nm=400.0 + 10 * i, bandwidth_nm=10.0) for i in range(channels))
    classes = rng.permutation(np.repeat([1, 2], n // 2))
    records = []
    for i in range(n):
        fingerprint = rng.normal(size=channels)
        px = (fingerprint + 0.01 * rng.normal(size=(8, 8, channels))).astype(np.float32)
        records.append(Record(f"r{i}", {"multispectral": ModalityImage("multispectral", px, bands, "test", 10.0)},
                              label_map=np.full((8, 8), classes[i], np.int32)))
    shards.write_shards(records, str(tmp_path / "f"), source="test", label_names=["none", "a", "b"])
    px = hardness.label_hardness(str(tmp_path / "f"), pixels_per_record=16)["pixel"]["multispectral"]
    assert px["accuracy"] < 0.9, px
    assert px["test_records"] == 12 and px["n_test"] == 12 * 16


def _herbaceous_patch(cls: int, i: int, size: int = 32):
    """One patch of class `cls` filling the scene: (reflectance, SAR-L2 dB, cover)."""
    rng = np.random.default_rng([99, cls, i])
    segments, seed_class = np.zeros((size, size), np.int32), np.array([cls])
    cover = synthetic.canopy_cover(rng, segments, seed_class)
    refl = synthetic.reflectance(rng, segments, seed_class, cover)
    sar = synthetic.to_db(synthetic.speckle(rng, synthetic.sigma0(rng, segments, seed_class, cover),
                                            synthetic.DEFAULT_LOOKS))
    return refl, sar, cover


def _coherence(image: np.ndarray) -> float:
    """Orientation coherence of the gradient structure tensor: 1 for strips, ~0 for isotropic clumps."""
    gy, gx = np.gradient(image)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    return float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy))


def test_cropland_and_grassland_differ_only_in_arrangement():
    """The herbaceous pair shares spectra, backscatter and cover fraction: a linear probe on the raw
    baseline's per-band means and stds is at chance, while one texture number (strips are oriented,
    clumps are not) separates them. So an encoder can beat the band statistics only by seeing structure."""
    from ringmoe.eval.probes import lbfgs_probe
    from ringmoe.eval.raw import band_statistics
    ms, sar, coherence, y = [], [], [], []
    for label, cls in enumerate((synthetic.CROPLAND, synthetic.GRASSLAND)):
        for i in range(80):
            refl, db, cover = _herbaceous_patch(cls, i)
            assert set(np.unique(cover)) <= {0.0, 1.0}
            ms.append(band_statistics(refl[None], "multispectral")[0])
            sar.append(band_statistics(db[None], "sar_l2")[0])
            coherence.append([_coherence(refl[..., 7])])
            y.append(label)
    ms, sar, coherence, y = map(np.asarray, (ms, sar, coherence, y))
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:110], order[110:]

    def accuracy(x):
        return lbfgs_probe(x[train], y[train], x[test], y[test], num_classes=2, steps=200, seed=0)["accuracy"]
    # 50 test patches: chance +- 0.14. The 60 m bands leak a little (6x6 averaging keeps more of a
    # labyrinth than of strips), about 0.6 on 100 test patches.
    assert accuracy(ms) < 0.72 and accuracy(sar) < 0.7
    assert accuracy(coherence) > 0.95
    # Same expected cover: mean NIR within 0.01 reflectance of each other.
    nir = ms[:, S2["B8"]]                                      # band_statistics: means first
    assert abs(nir[y == 0].mean() - nir[y == 1].mean()) < 0.01
