"""The activation-aware merge (ringmoe/compress/refit.py) against the weight-SVD merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ringmoe.compress import merging, pruning, refit, stages, statistics
from ringmoe.compress.extraction import flat_params
from ringmoe.compress.run import MERGES
from ringmoe.eval.features import image_batches
from ringmoe.model.ringmoe import create_model
from tests.small import encode, initial_run, micro_config

CALIBRATION, HELD_OUT = 24, 16


def test_ridge_fit_recovers_an_exact_output_layer_and_falls_back_to_the_prior():
    """From streamed sufficient statistics: targets that are an affine map of the hidden units
    are recovered exactly; a huge ridge returns the prior (the SVD merge's layer)."""
    rng = np.random.default_rng(0)
    f, d = 12, 5
    w, b = rng.normal(size=(f, d)), rng.normal(size=d)
    stats = refit.Moments.zeros(f, d)
    for _ in range(4):   # four batches, streamed
        h = np.asarray(jax.nn.gelu(jnp.asarray(rng.normal(size=(50, f)))), np.float64)
        stats = stats + refit.Moments.of(h, h @ w + b)
    prior = (rng.normal(size=(f, d)), rng.normal(size=d))
    fitted_w, fitted_b = refit.ridge_fit(stats, prior, ridge=1e-12)
    np.testing.assert_allclose(fitted_w, w, atol=1e-6)
    np.testing.assert_allclose(fitted_b, b, atol=1e-6)
    assert stats.error(fitted_w, fitted_b) < 1e-10 * stats.error(*prior)
    shrunk_w, _ = refit.ridge_fit(stats, prior, ridge=1e12)
    np.testing.assert_allclose(shrunk_w, prior[0], atol=1e-6)


@pytest.fixture(scope="module")
def pruned_micro(tmp_path_factory):
    """A micro model's pruned optical stage, its routing statistics and a data set of
    CALIBRATION + HELD_OUT labelled scenes."""
    config = micro_config(("optical", "sar_l2"))
    config.compress.calibration_images = CALIBRATION
    _, data_dir = initial_run(tmp_path_factory.mktemp("refit"), config, CALIBRATION + HELD_OUT)
    full = create_model(config.model, seed=0)
    configs = stages.stage_configs(config, "optical", 0.5)
    full_stats = statistics.expert_statistics(full, config, data_dir, ["optical"], max_images=CALIBRATION)
    pruned, _ = pruning.prune_collaborative(flat_params(full), configs["pruned"], full_stats, "optical")
    pruned_stats = statistics.expert_statistics(pruned, configs["pruned"], data_dir, ["optical"],
                                                max_images=CALIBRATION)
    return configs, pruned, pruned_stats, data_dir


def _held_out_pixels(config, data_dir):
    pixels = np.concatenate([p[:n] for p, n, _ in image_batches(config, data_dir, "optical", 8, pad=False)])
    assert len(pixels) == CALIBRATION + HELD_OUT
    return jnp.asarray(pixels[CALIBRATION:])   # images the merges never saw


def _stage_errors(student, teacher, pixels):
    """Per stage, ||student - teacher||^2 / ||teacher||^2 of the stage maps."""
    s, t = encode(student, pixels, "optical"), encode(teacher, pixels, "optical")
    return [float(jnp.sum((a - b) ** 2) / jnp.sum(b ** 2)) for a, b in zip(s.stage_features, t.stage_features)]


def test_refit_merge_beats_the_svd_merge_on_held_out_images(pruned_micro):
    configs, pruned, pruned_stats, data_dir = pruned_micro
    assert set(MERGES) == {"svd", "refit"}
    svd, _ = MERGES["svd"](pruned, configs["pruned"], configs["dense"], pruned_stats, "optical", data_dir,
                           max_images=CALIBRATION)
    fitted, report = MERGES["refit"](pruned, configs["pruned"], configs["dense"], pruned_stats, "optical",
                                     data_dir, max_images=CALIBRATION)
    # Its fc1 is the SVD merge's; only the output layers were refitted.
    svd_params, fitted_params = flat_params(svd), flat_params(fitted)
    for path, value in svd_params.items():
        if "fc2" not in path:
            np.testing.assert_array_equal(fitted_params[path], value, err_msg=str(path))
    # On the calibration images' held-out fold (chosen before the refit on all of them),
    # per block: never worse than the SVD merge, and better somewhere.
    blocks = report["blocks"]
    assert len(blocks) == len(pruning.block_prefixes(svd_params))
    assert all(b["held_out_error"] <= b["held_out_error_svd"] for b in blocks)
    assert any(b["held_out_error"] < 0.9 * b["held_out_error_svd"] for b in blocks)
    # On images neither merge saw: every stage map of the dense model is closer to the pruned teacher's.
    pixels = _held_out_pixels(configs["pruned"], data_dir)
    svd_errors, fitted_errors = _stage_errors(svd, pruned, pixels), _stage_errors(fitted, pruned, pixels)
    assert all(f < s for f, s in zip(fitted_errors, svd_errors)), (fitted_errors, svd_errors)
    # The SVD entry is today's merge, unchanged.
    direct, _ = merging.merge_experts(flat_params(pruned), configs["dense"], pruned_stats, "optical")
    for path, value in flat_params(direct).items():
        np.testing.assert_array_equal(svd_params[path], value)
