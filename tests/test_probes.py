"""Evaluation probes: each one on features whose answer is known, then end to end on a checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ringmoe.config import base_config
from ringmoe.data.schema import RecordError
from ringmoe.eval import probes
from ringmoe.eval.features import evaluate, extract
from ringmoe.model.checkpoint import CheckpointError, load_pretrained
from tests.small import initial_run, micro_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_P = base_config().probe   # the defaults must solve these easy cases
LINEAR = {"epochs": _P.linear_epochs, "lr": _P.linear_lr, "weight_decay": _P.linear_weight_decay, "seed": 0}
SEGMENT = {"epochs": _P.segmentation_epochs, "lr": _P.segmentation_lr,
           "weight_decay": _P.segmentation_weight_decay, "seed": 0}


def _clusters(rng, n, classes, dim, spread):
    centres = rng.normal(size=(classes, dim)) * 5
    y = rng.integers(0, classes, n)
    return centres[y] + spread * rng.normal(size=(n, dim)), y


def test_linear_probe_separates_linearly_separable_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 16))
    w = rng.normal(size=(16, 3))
    y = np.argmax(x @ w, 1)
    scores = np.sort(x @ w, 1)
    keep = scores[:, -1] - scores[:, -2] > 1.5                 # a margin, so the classes are separable
    x, y = x[keep], y[keep]
    acc = probes.linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=3, **LINEAR)
    assert acc >= 0.99


def test_knn_on_separated_clusters_and_chance_on_random_labels():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 500, 5, 8, 0.3)
    assert probes.knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=20) >= 0.99
    assert probes.knn_accuracy(x[:3], y[:3], x[400:], y[400:], k=20) <= 1.0   # k clipped to n_train
    x, y = rng.normal(size=(800, 8)), rng.integers(0, 2, 800)
    assert probes.knn_accuracy(x[:600], y[:600], x[600:], y[600:], k=20) < 0.6
    assert probes.linear_probe(x[:600], y[:600], x[600:], y[600:], num_classes=2, **LINEAR) < 0.6


def test_segmentation_probe_on_one_hot_patch_features_ignores_unlabelled_pixels():
    rng = np.random.default_rng(2)
    classes, stride = 4, 4
    regions = rng.integers(1, classes + 1, (16, 4, 4))
    blocks = np.repeat(np.repeat(regions, 2, 1), 2, 2)            # (N, 8, 8) class of each patch
    features = np.eye(classes)[blocks - 1]                         # one-hot patch features
    labels = np.repeat(np.repeat(blocks, stride, 1), stride, 2)    # (N, 32, 32)
    labels[rng.random(labels.shape) < 0.3] = 0                     # counted, pixel accuracy would be < 0.7
    # Unlabelled training images whose features all look like class 2 and outnumber it:
    # trained as any class, they would pull class 2 away.
    decoys = np.broadcast_to(np.eye(classes)[1], (8, 8, 8, classes))
    train_f = np.concatenate([features[:8], decoys])
    train_lab = np.concatenate([labels[:8], np.zeros((8, 32, 32), int)])
    scores = probes.segmentation_probe(train_f, train_lab, features[8:], labels[8:], num_classes=classes, **SEGMENT)
    assert scores["miou"] > 0.95 and scores["pixel_accuracy"] > 0.95


def test_split_is_deterministic_and_disjoint():
    indices = np.arange(3, 103)
    train, test = probes.split_indices(indices, 0.2, seed=0)
    again = probes.split_indices(indices[::-1], 0.2, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert len(test) == 20 and not set(train) & set(test) and set(train) | set(test) == set(indices)
    assert not np.array_equal(test, probes.split_indices(indices, 0.2, seed=1)[1])
    train, test = probes.split_indices([5, 9], 0.01, seed=0)
    assert len(train) == len(test) == 1
    with pytest.raises(ValueError, match="at least 2 labelled records"):
        probes.split_indices([4], 0.2, seed=0)
    manifest = {"splits": {"train": [1, 2, 3], "test": [7, 8]}}
    train, test = probes.dataset_split(manifest, [1, 2, 7, 9], 0.2, seed=0)
    assert list(train) == [1, 2] and list(test) == [7]


def _small_config():
    config = micro_config(("optical", "sar_l2"))
    config.data.mask_block_size = 16
    config.probe.segmentation_stage = 0
    config.probe.linear_epochs = config.probe.segmentation_epochs = 100
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic labelled data set and a run directory holding the initial state as step 1."""
    return initial_run(tmp_path_factory.mktemp("probe_run"), _small_config(), 24)


def test_evaluate_end_to_end_on_a_checkpoint(run):
    workdir, data_dir = run
    config, model, step = load_pretrained(workdir)
    assert step == 1 and config.model.depths == (1, 1) and config.probe.segmentation_stage == 0
    features = extract(model, config, data_dir, "optical", stage=0, batch_size=16, raw=True)
    # "stages" pooling: mean and std of the stage maps (16, 32 channels) and the final features (32).
    assert features["pooled"].shape == (24, 2 * (16 + 32 + 32)) and features["patch"].shape == (24, 8, 8, 16)
    assert extract(model, config, data_dir, "optical", pooling="final")["pooled"].shape == (24, 32)
    # which columns each map fills: stage0's mean then std, stage1's, the final features'
    maps = {name: (int(c[0]), int(c[-1]) + 1) for name, c in features["pooled_maps"]}
    assert maps == {"stage0": (0, 32), "stage1": (32, 96), "final": (96, 160)}
    patch = features["patch"]   # stage 0's map
    np.testing.assert_allclose(features["pooled"][:, 0:16], patch.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(features["pooled"][:, 16:32], patch.std((1, 2)), atol=1e-5)
    # The raw baseline's inputs are the bands in physical units: optical is reflectance in [0, 1].
    assert features["raw_pooled"].shape == (24, 6) and features["raw_patch"].shape == (24, 32, 32, 3)
    assert 0 <= features["raw_patch"].min() and features["raw_patch"].max() <= 1
    np.testing.assert_allclose(features["raw_pooled"][:, :3], features["raw_patch"].mean((1, 2)), atol=1e-5)
    assert list(features["record_index"]) == list(range(24)) and features["label_map"].shape == (24, 32, 32)
    # Routing groups are single images, so batch size and padding leave every record's features alone.
    np.testing.assert_allclose(extract(model, config, data_dir, "optical")["pooled"], features["pooled"], atol=1e-5)

    knn = evaluate(config, model, data_dir, "knn")
    assert {"probe", "metric", "value", "ci", "random_init_value", "random_init_ci", "raw_value", "raw_ci",
            "modality", "train_records", "test_records"} <= set(knn)
    for value, (low, high) in ((knn["value"], knn["ci"]), (knn["raw_value"], knn["raw_ci"])):
        assert 0 <= low <= value <= high <= 1
    assert knn["modality"] == "optical" and knn["metric"] == "top1_accuracy"
    assert knn["train_records"] + knn["test_records"] == 24
    # The checkpoint holds the initial state, so the restored model is the baseline exactly.
    assert knn["value"] == knn["random_init_value"] and 0 <= knn["value"] <= 1

    seg = evaluate(config, model, data_dir, "segmentation", "sar_l2")
    assert seg["metric"] == "miou" and seg["modality"] == "sar_l2"
    for key in ("value", "random_init_value", "raw_value", "pixel_accuracy", "random_init_pixel_accuracy",
                "raw_pixel_accuracy"):
        assert 0 <= seg[key] <= 1
    assert seg["ci"][0] <= seg["value"] <= seg["ci"][1]
    with pytest.raises(ValueError, match="available: optical, sar_l2"):
        evaluate(config, model, data_dir, "knn", "sar_l1")


def test_evaluate_cli_prints_json_last_and_one_line_errors(run):
    """`python -m tools.evaluate` (absl flags: a subprocess each, flags are per process):
    JSON last, `--config.probe.*` overrides the run's probe settings, every error one line."""
    from tests.test_faults_cli import run as run_module
    workdir, data_dir = run
    base = ["tools.evaluate", f"--checkpoint={workdir}"]
    proc = subprocess.run([sys.executable, "-m", *base, f"--data={data_dir}", "--probe=knn", "--no-baseline",
                           "--config.probe.knn_k=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["probe"] == "knn" and result["random_init_value"] is None and 0 <= result["value"] <= 1
    assert result["raw_value"] is None and result["ci"][0] <= result["value"] <= result["ci"][1]
    for args, status, message in (
            ([f"--data={data_dir}", "--probe=nope"], 2, "unknown probe 'nope'"),
            ([f"--data={data_dir}", "--probe=knn", "--config.model.embed_dim=8"], 2,
             "--config.model.embed_dim: tools.evaluate uses the checkpoint's config"),
            ([f"--data={data_dir}", "--probe=knn", "--config.probe.knn_kk=3"], 2, "knn_kk"),
            ([f"--data={data_dir}", "--probe=knn", "--modality=sar_l1"], 1, "unknown modality 'sar_l1'"),
            ([f"--data={data_dir}-missing", "--probe=knn"], 1, f"{data_dir}-missing: no such data set directory")):
        code, err = run_module(*base[:1], base[1], *args)
        assert code == status and err[-1].startswith("tools.evaluate: error: ") and message in err[-1], err
        assert not any("Traceback" in line for line in err)


def test_extract_names_a_bad_record(run, tmp_path):
    workdir, data_dir = run
    config, model, _ = load_pretrained(workdir)
    damaged = tmp_path / "data"
    shutil.copytree(data_dir, damaged)
    shard = damaged / "shard-00000.array_record"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    with pytest.raises(RecordError, match=f"{damaged}/shard-00000.array_record record 0 .*unreadable"):
        extract(model, config, str(damaged), "optical")


def test_load_pretrained_names_empty_and_unreadable_directories(run, tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*no checkpoint found"):
        load_pretrained(str(tmp_path))
    damaged = tmp_path / "run"
    shutil.copytree(run[0], damaged)
    for f in (damaged / "checkpoints" / "1" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[:f.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="no readable checkpoint .step 1: "):
        load_pretrained(str(damaged))
    assert (damaged / "checkpoints" / "1").is_dir()   # left where it was


def test_a_new_probe_is_one_registered_class(run, monkeypatch):
    """Adding a probe is one class in `PROBES` (ringmoe/eval/registry.py): this test adds a
    majority-class guesser, and `evaluate` runs it like the others, with its interval."""
    from ringmoe.eval import registry
    from ringmoe.eval.intervals import accuracy_result

    class Majority(registry.SceneProbe):
        def score(self, features, train, test, settings, num_classes, inputs=""):
            _, y, tr, te = self.split(features, train, test, inputs)
            guess = np.bincount(y[tr]).argmax()
            return accuracy_result(float(np.mean(y[te] == guess)), int(te.sum()))

    monkeypatch.setitem(registry.PROBES, "majority", Majority())
    workdir, data_dir = run
    config, model, _ = load_pretrained(workdir)
    result = evaluate(config, model, data_dir, "majority", baseline=False)
    assert result["probe"] == "majority" and result["metric"] == "top1_accuracy"
    assert result["ci"][0] <= result["value"] <= result["ci"][1] and result["test_records"] > 0
