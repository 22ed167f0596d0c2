"""95 % intervals (ringmoe.eval.intervals) and the raw-input baseline (ringmoe.eval.raw) on known answers."""
import numpy as np
import pytest

from ringmoe.eval import intervals, probes, raw


@pytest.mark.parametrize("correct, n, low, high", [
    # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score, no continuity correction):
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    # 8 / 10 by hand: z^2 = 3.8415, centre = (0.8 + 0.19207) / 1.38415 = 0.71674,
    # half = 1.95996 / 1.38415 * sqrt(0.016 + 3.8415 / 400) = 1.41600 * 0.16001 = 0.22658.
    (8, 10, 0.4902, 0.9433),
])
def test_wilson_matches_textbook_values(correct, n, low, high):
    got = intervals.wilson(correct, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_is_symmetric_and_rejects_nonsense():
    low, high = intervals.wilson(3, 10)
    assert intervals.wilson(7, 10) == pytest.approx((1 - high, 1 - low))
    assert intervals.wilson(10, 10)[1] == 1.0
    for bad in ((5, 0), (11, 10), (-1, 10)):
        with pytest.raises(ValueError, match="wilson"):
            intervals.wilson(*bad)


def test_accuracy_result_carries_value_interval_and_size():
    result = intervals.accuracy_result(0.8, 10)
    assert result["value"] == 0.8 and result["n_test"] == 10
    assert result["ci"] == pytest.approx([0.4902, 0.9433], abs=1e-4)


def test_bootstrap_of_a_mean_matches_its_standard_error():
    x = np.random.default_rng(0).normal(size=400)
    low, high = intervals.bootstrap(lambda idx: x[idx].mean(), len(x), seed=0)
    half = 1.96 * x.std() / np.sqrt(len(x))      # the normal-theory 95 % half width, ~0.098
    assert low < x.mean() < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert intervals.bootstrap(lambda idx: 0.5, 10) == (0.5, 0.5)
    assert intervals.bootstrap(lambda idx: x[idx].mean(), len(x), seed=0) == (low, high)   # seeded


def test_segmentation_probe_returns_a_record_bootstrap_interval():
    rng = np.random.default_rng(3)
    regions = rng.integers(1, 4, (24, 4, 4))
    features = np.eye(3)[regions - 1] + 0.8 * rng.normal(size=(24, 4, 4, 3))   # noisy: mIoU < 1
    labels = np.repeat(np.repeat(regions, 4, 1), 4, 2)
    scores = probes.segmentation_probe(features[:12], labels[:12], features[12:], labels[12:], num_classes=3,
                                       epochs=100, lr=5e-2, weight_decay=1e-4, seed=0)
    low, high = scores["miou_ci"]
    assert scores["n_test"] == 12 and low <= scores["miou"] <= high and low < high


def test_band_statistics_and_log_power():
    pixels = np.zeros((2, 4, 4, 2), np.float32)
    pixels[0, ..., 0], pixels[1, ..., 0] = 1.0, 3.0
    pixels[:, :2, :, 1], pixels[:, 2:, :, 1] = 0.0, 2.0          # band 1: mean 1, std 1
    stats = raw.band_statistics(pixels, "multispectral")
    np.testing.assert_allclose(stats, [[1, 1, 0, 1], [3, 1, 0, 1]])
    slc = np.zeros((1, 2, 2, 8), np.float32)
    slc[..., 0], slc[..., 1] = 3.0, 4.0                           # |S_HH|^2 = 25
    slc[..., 6] = 10.0                                            # |S_VV|^2 = 100
    bands = raw.raw_bands(slc, "sar_l1")
    assert bands.shape == (1, 2, 2, 4)
    np.testing.assert_allclose(bands[0, 0, 0, [0, 3]], [np.log10(25), 2.0], rtol=1e-5)


def test_raw_baseline_solves_classes_that_differ_in_band_level_only():
    """Per-pixel noise hides each class's band level in any single pixel, but a record's band mean
    reveals it; the log power of sar_l1 reveals a class that its zero-mean Re/Im average away."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 300)
    pixels = (1.0 + y)[:, None, None, None] * 0.1 + 0.3 * rng.normal(size=(300, 8, 8, 2))
    x = raw.band_statistics(pixels, "multispectral")
    assert probes.linear_probe(x[:200], y[:200], x[200:], y[200:], num_classes=3, epochs=300, lr=1e-2,
                               weight_decay=1e-4, seed=0) >= 0.95
    amplitude = np.sqrt(10.0 ** y)[:, None, None, None]           # 0, 10, 20 dB
    slc = amplitude * rng.normal(size=(300, 8, 8, 8))
    fit = dict(num_classes=3, epochs=300, lr=1e-2, weight_decay=1e-4, seed=0)
    means = slc.mean((1, 2))                                        # Re/Im means: zero whatever the power
    assert probes.linear_probe(means[:200], y[:200], means[200:], y[200:], **fit) < 0.6
    x = raw.band_statistics(slc, "sar_l1")
    assert probes.linear_probe(x[:200], y[:200], x[200:], y[200:], **fit) >= 0.95


def test_pooled_accuracy_is_total_correct_over_total_records():
    pooled = intervals.pooled_accuracy([0.5, 0.75], [4, 8])      # 2 + 6 correct of 12
    assert pooled["value"] == pytest.approx(8 / 12) and pooled["n_test"] == 12
    assert pooled["ci"] == pytest.approx(list(intervals.wilson(8, 12)))


def test_lbfgs_probe_converges_where_few_adamw_steps_do_not():
    """Two classes differing along one of two strongly correlated features: logistic regression's
    optimum separates them, but ill-conditioning keeps 30 AdamW steps at lr 1e-3 far from it."""
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 600)
    base = rng.normal(size=600)
    x = np.stack([base, base + 0.05 * (2 * y - 1) + 0.01 * rng.normal(size=600)], 1)
    result = probes.lbfgs_probe(x[:400], y[:400], x[400:], y[400:], num_classes=2, steps=300, seed=0)
    assert result["accuracy"] >= 0.95 and result["train_accuracy"] >= 0.95
    assert result["l2"] in probes.L2_GRID
    assert probes.linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=2, epochs=30, lr=1e-3,
                               weight_decay=1e-4, seed=0) < 0.9


def test_lbfgs_probe_chooses_feature_maps_on_validation_records_only():
    """One map carries the class, the other 400 columns are noise: with 300 training records
    the head on every column overfits, the validated choice takes the informative map; the
    choice never looks at the test records (shuffling their labels leaves it alone)."""
    rng = np.random.default_rng(0)
    n = 500
    y = rng.integers(0, 2, n)
    signal = y[:, None] * 0.8 + rng.normal(size=(n, 4))
    noise = rng.normal(size=(n, 400))
    x = np.concatenate([noise[:, :200], signal, noise[:, 200:]], axis=1)
    maps = [("all", np.arange(404)), ("a", np.arange(200)), ("signal", np.arange(200, 204)),
            ("b", np.arange(204, 404))]
    chosen = probes.lbfgs_probe(x[:300], y[:300], x[300:], y[300:], num_classes=2, steps=200, seed=0,
                                candidates=maps)
    every = probes.lbfgs_probe(x[:300], y[:300], x[300:], y[300:], num_classes=2, steps=200, seed=0)
    assert chosen["features"] == "signal" and every["features"] == "all"
    assert chosen["accuracy"] > every["accuracy"] + 0.05, (chosen, every)
    shuffled = probes.lbfgs_probe(x[:300], y[:300], x[300:], rng.permutation(y[300:]), num_classes=2, steps=200,
                                  seed=0, candidates=maps)
    assert shuffled["features"] == "signal" and shuffled["l2"] == chosen["l2"]


def test_linear_maps_can_name_one_pooled_map():
    """`probe.linear_maps` = a map's name: the head reads that map alone (the class sits in
    "signal" only, so it scores high there and at chance on "a"); a name the features lack, or
    a named map of one-map features (pooling "final"), is an error naming the choices."""
    from ml_collections import ConfigDict

    from ringmoe.eval.registry import Linear

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(1, 3, n)
    x = np.concatenate([rng.normal(size=(n, 6)), (y[:, None] - 1.5) + 0.3 * rng.normal(size=(n, 2))], axis=1)
    maps = [("a", np.arange(6)), ("signal", np.arange(6, 8))]
    features = {"pooled": x, "scene_label": y, "record_index": np.arange(n), "pooled_maps": maps}
    train, test = np.arange(300), np.arange(300, n)

    def score(maps_setting, feats=features):
        settings = ConfigDict({"linear_solver": "lbfgs", "linear_maps": maps_setting, "linear_lbfgs_steps": 100,
                               "seed": 0})
        return Linear().score(feats, train, test, settings, num_classes=3)

    signal, noise = score("signal"), score("a")
    assert signal["maps"] == "signal" and signal["value"] > 0.95
    assert [sum(c) for c in zip(*signal["per_class"])] == [round(signal["value"] * 100), 100]   # [correct, records]
    assert signal["per_class"][0] == [0, 0] and all(t > 30 for _, t in signal["per_class"][1:])
    assert noise["maps"] == "a" and abs(noise["value"] - 0.5) < 0.12
    assert score("all")["maps"] == "all"
    with pytest.raises(ValueError, match="'stage9'.*validated.*a \\| signal"):
        score("stage9")
    with pytest.raises(ValueError, match="one map"):
        score("signal", {**features, "pooled_maps": None})
