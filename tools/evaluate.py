"""Score a pretrained RingMoE with a probe on frozen features, against its random initialisation.

    python -m tools.evaluate --checkpoint /tmp/tiny --data /tmp/syn64 --probe knn
    python -m tools.evaluate --checkpoint /tmp/tiny/checkpoints --data /tmp/syn64 --probe linear --modality sar_l2
    python -m tools.evaluate --checkpoint /tmp/tiny --data /tmp/syn64 --probe segmentation --no-baseline
    python -m tools.evaluate --checkpoint /tmp/tiny --data /tmp/syn64 --probe knn --config.probe.knn_k=5

--checkpoint is a training workdir (or its checkpoints/ directory): the newest
readable step is restored with the run's own config, whose `probe` block holds
the probe settings (ringmoe/config.py); `--config.probe.KEY=VALUE` overrides them
for this evaluation (only `probe.*`: the model is the checkpoint's). Probes: knn and linear on scene labels
(top-1 accuracy), segmentation on label maps (mIoU). Prints a small table, then
as its LAST stdout line one JSON object with `probe`, `metric`, `value`, `ci`,
`random_init_value`, `random_init_ci`, `raw_value`, `raw_ci` (the raw-input
baseline: band means/stds, or a per-pixel head on the bands), `modality`,
`pooling`, `train_records`, `test_records`, `step` and `checkpoint`
(segmentation adds `stage` and the pixel accuracies; linear adds `maps`, the pooled
maps the head read, and `per_class`, [correct, test records] per class id, each also
with the `random_init_` and `raw_` prefixes). Every `ci` is a 95 %
interval [low, high] over the test records (Wilson for accuracies, a record
bootstrap for mIoU). Any usage or data problem exits with a one-line message.
"""
from __future__ import annotations

import errno
import json
import logging
import os

from absl import flags
from ml_collections import config_flags

from ringmoe import cli
from ringmoe.config import base_config
from ringmoe.eval.registry import PROBES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or its checkpoints/ directory.")
_DATA = flags.DEFINE_string("data", None, "Data set directory (manifest.json + shards).")
_PROBE = flags.DEFINE_string("probe", None, " | ".join(PROBES) + " (ringmoe/eval/registry.py).")
_MODALITY = flags.DEFINE_string("modality", None, "Default: the model's first modality in the data set.")
_NO_BASELINE = flags.DEFINE_boolean("no-baseline", False, "Skip the random-initialisation and raw-input baselines.")
_CONFIG = cli.define_config_dict("tools.evaluate", "config", base_config(), "Overrides of the run's probe settings "
                                 "for this evaluation: --config.probe.KEY=VALUE (ringmoe/config.py).")


def _table(result: dict) -> str:
    def fmt(v, ci=None):
        return "-" if v is None else f"{v:.4f}" + ("" if ci is None else f"  [{ci[0]:.4f}, {ci[1]:.4f}]")
    rows = [("probe", result["probe"]), ("modality", result["modality"]), ("checkpoint step", str(result["step"])),
            ("metric", result["metric"] + "  [95 % interval]"), ("pretrained", fmt(result["value"], result["ci"])),
            ("random init", fmt(result["random_init_value"], result["random_init_ci"])),
            ("raw input", fmt(result["raw_value"], result["raw_ci"]))]
    if "pixel_accuracy" in result:
        rows += [("stage", str(result["stage"])), ("pixel accuracy", fmt(result["pixel_accuracy"])),
                 ("random init pixel accuracy", fmt(result["random_init_pixel_accuracy"])),
                 ("raw input pixel accuracy", fmt(result["raw_pixel_accuracy"]))]
    rows.append(("train / test records", f"{result['train_records']} / {result['test_records']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def probe_overrides() -> dict:
    """The `--config.probe.*` values given on the command line; any other override is a usage
    error (the model, data and objectives are the checkpoint's)."""
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    other = sorted(k for k in overrides if not k.startswith("probe."))
    if other:
        raise cli.UsageError(f"--config.{other[0]}: tools.evaluate uses the checkpoint's config; only "
                             "--config.probe.* settings can change for an evaluation")
    return overrides


def main(argv) -> None:
    cli.no_arguments(argv)
    if _PROBE.value not in PROBES:
        raise cli.UsageError(f"unknown probe {_PROBE.value!r} (one of {', '.join(PROBES)})")
    overrides = probe_overrides()
    if not os.path.isdir(_DATA.value):
        raise FileNotFoundError(errno.ENOENT, "no such data set directory", _DATA.value)
    cli.setup_logging(logging.WARNING, absl_level=logging.ERROR)   # Orbax notes a directory opened read-only

    from ringmoe.eval.features import evaluate
    from ringmoe.model.checkpoint import load_pretrained
    config, model, step = load_pretrained(_CHECKPOINT.value)
    config.update_from_flattened_dict(overrides)
    result = evaluate(config, model, _DATA.value, _PROBE.value, _MODALITY.value, baseline=not _NO_BASELINE.value)
    result.update(step=step, checkpoint=os.path.abspath(_CHECKPOINT.value))
    print(_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run_absl("tools.evaluate", main, required=("checkpoint", "data", "probe"))
