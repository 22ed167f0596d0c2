"""The trainer: exact resume after SIGKILL, corrupt-checkpoint fallback, sharded = 1 device.

Runs a two-stage, two-modality cut of the tiny config on 32 px synthetic scenes
so each compile stays small; the code path is the one `configs/tiny.py` uses.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ringmoe.data import synthetic
from tests.xla import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_CONFIG = '''
from configs import tiny


def get_config():
    c = tiny.get_config()
    m = c.model
    m.image_size, m.depths, m.num_heads = 32, (1, 1), (2, 4)
    for name in ("multispectral", "sar_l2"):
        del m.modalities[name]
    m.moe.num_modal_experts = 4
    m.moe.num_collaborative_experts = 4
    c.batch_size = 16
    c.data.mask_block_size = 8
    c.data.prefetch = 0
    c.total_steps = 6
    c.log_every = 1
    c.eval_every = 3
    c.checkpoint_every = 2
    c.keep_checkpoints = 3
    c.optimizer.warmup_steps = 2
    c.optimizer.lr = 1e-3
    return c
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    synthetic.write(str(root / "data"), 48, 32, seed=0, paired_fraction=0.5, labeled=True)
    (root / "small_config.py").write_text(SMALL_CONFIG)
    return root


def run_args(setup, workdir, *extra, pictures=False):
    return [sys.executable, "-m", "pretrain.train", f"--config={setup / 'small_config.py'}",
            f"--workdir={workdir}", f"--config.data_dir={setup / 'data'}", f"--config.pictures={pictures}", *extra]


def logged_numbers(workdir) -> dict[int, dict[str, float]]:
    """Every metrics line by step, less the wall-clock numbers (ringmoe.training.metrics.WALL_CLOCK_KEYS)."""
    from ringmoe.training.metrics import WALL_CLOCK_KEYS
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: {k: v for k, v in r.items() if k not in WALL_CLOCK_KEYS} for r in map(json.loads, f)}


def final_losses(workdir, key="loss") -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def env():
    e = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    e["XLA_FLAGS"] = FAST_COMPILE  # one CPU device per training process
    return e


def test_exact_resume_after_sigkill_and_corrupt_checkpoint_fallback(setup, tmp_path):
    uninterrupted = tmp_path / "a"
    subprocess.run(run_args(setup, uninterrupted, pictures=True), cwd=REPO, env=env(), check=True,
                   capture_output=True)
    reference = final_losses(uninterrupted)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    # The pictures at the end (image_every 0); the other runs here draw none (config.pictures).
    assert sorted(os.listdir(uninterrupted / "pictures")) == ["expert_load_final.png", "loss_curves.png",
                                                             "reconstructions_final.png"]
    # The fixed-batch evaluation: at step 0, every eval_every steps and at the end.
    assert sorted(final_losses(uninterrupted, "eval/loss")) == [0, 3, 6]

    killed = tmp_path / "b"
    proc = subprocess.Popen(run_args(setup, killed), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    step4 = killed / "checkpoints" / "4"
    deadline = time.time() + 600
    while not step4.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step4.exists(), "the run never finalised its step-4 checkpoint"
    subprocess.run(run_args(setup, killed), cwd=REPO, env=env(), check=True, capture_output=True)
    resumed = final_losses(killed)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # no duplicated or missing metric lines
    # Determinism and exact resume: the second process ran steps 1-4 from scratch, was killed,
    # and a third ran 5-6 from the step-4 checkpoint; every number they logged (losses, terms,
    # gradient norm, learning rate, expert loads, evaluation) equals the uninterrupted run's,
    # bit for bit (step 0: the evaluation before training).
    expected, got = logged_numbers(uninterrupted), logged_numbers(killed)
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3, 4, 5, 6]
    for step in got:
        assert got[step] == expected[step], {k: (expected[step].get(k), v) for k, v in got[step].items()
                                             if expected[step].get(k) != v}

    # Corrupt the newest checkpoint of the finished run: training resumes from step 4.
    newest = uninterrupted / "checkpoints" / "6"
    for root, _, files in os.walk(newest / "state"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(os.path.join(root, name)) // 3))
    out = subprocess.run(run_args(setup, uninterrupted, "--config.total_steps=6"), cwd=REPO, env=env(),
                         check=True, capture_output=True, text=True)
    assert f"checkpoint {newest} is unreadable" in out.stderr
    assert "resumed from step 4" in out.stderr
    np.testing.assert_allclose(final_losses(uninterrupted)[6], reference[6], rtol=0, atol=1e-6)


def test_sharded_training_matches_one_device(setup, tmp_path):
    from pretrain.ablate import load_config_file
    from pretrain.train import train

    def run(name, mesh, devices):
        config = load_config_file(str(setup / "small_config.py"))
        config.data_dir = str(setup / "data")
        config.total_steps, config.pictures = 3, False
        config.mesh.update(mesh)
        train(config, str(tmp_path / name), devices=devices)
        return final_losses(tmp_path / name)

    single = run("one", {"data": 1}, jax.devices()[:1])
    sharded = run("eight", {"data": 2, "expert": 4}, None)
    for step in (1, 2, 3):
        np.testing.assert_allclose(sharded[step], single[step], rtol=1e-4)
