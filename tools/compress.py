"""Compress a pretrained RingMoE to a dense SwinV2 for one modality, and export it.

    python -m tools.compress --config configs/ringmoe_14b.py --modality optical --dry-run
    python -m tools.compress --checkpoint /tmp/tiny --config configs/tiny.py --modality optical \\
        --out /tmp/tiny_optical [--keep-collaborative 0.25] [--merge refit|svd] [--distill-steps 200] \\
        [--data-dir /tmp/syn64] [--probe-data-dir /tmp/probe_set]

Stages (ringmoe/compress/run.py): expert statistics -> modality extraction ->
collaborative pruning -> merge into a dense FFN per block (truncated SVD of the
experts' weights; `refit`, the default, then refits every block's output layer to
the pruned MoE's FFN outputs on calibration tokens) -> distillation ->
export (Orbax checkpoint, model.safetensors under timm SwinV2 names, model.json).
Each stage's model is saved under OUT/stages/ and loads with
`tools.evaluate --checkpoint`. --dry-run computes every stage's parameter count
from shapes alone (nothing allocated). Calibration and distillation read
--data-dir (default: config.data_dir); --probe-data-dir adds the linear-probe
accuracy of every stage. `--config.compress.*` overrides the other settings
(ringmoe/config.py). Bad arguments (unknown modality, a keep fraction outside
(0, 1], a checkpoint trained with another config) stop with a one-line error
before any work. The LAST stdout line is JSON: `stages` [{name, params}, ...]
and, for a real run, the probe accuracies, paths and seconds.
"""
import json
import logging

from absl import app, flags
from ml_collections import config_flags

from ringmoe import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of the checkpoint's model (configs/NAME.py).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/) to compress.")
_MODALITY = flags.DEFINE_string("modality", None, "The modality the dense model serves.")
_OUT = flags.DEFINE_string("out", None, "Output directory: stages/, statistics/, distill/, export/, report.*")
_KEEP = flags.DEFINE_float("keep-collaborative", None, "Share of collaborative experts kept per layer "
                           "(default config.compress.keep_collaborative, the reference's 0.25).")
_MERGE = flags.DEFINE_string("merge", "refit", "How each block's experts become one FFN: refit (SVD, then the "
                             "output layer fitted on calibration tokens) or svd (weights only).")
_DISTILL = flags.DEFINE_integer("distill-steps", None, "Distillation steps (default "
                                "config.compress.distill_steps; 0 = none, as in the reference).")
_DATA = flags.DEFINE_string("data-dir", None, "Calibration / distillation data (default config.data_dir).")
_PROBE = flags.DEFINE_string("probe-data-dir", None, "Labelled data: linear-probe every stage.")
_DRY = flags.DEFINE_boolean("dry-run", False, "Only each stage's parameter count, from shapes.")


def main(argv):
    cli.no_arguments(argv)
    cli.setup_logging(absl_level=logging.ERROR)   # Orbax notes that it opened a directory read-only
    config = _CONFIG.value
    keep = config.compress.keep_collaborative if _KEEP.value is None else _KEEP.value
    from ringmoe.compress import stages
    if _DRY.value:
        result = {"stages": stages.dry_run(config, _MODALITY.value, keep)}
        for s in result["stages"]:
            print(f"{s['name']:<10} {s['params']:>16,}")
        print(json.dumps(result))
        return
    if not _CHECKPOINT.value or not _OUT.value:
        raise app.UsageError("--checkpoint and --out are required (or --dry-run)")

    from ringmoe.compress.run import compress
    steps = config.compress.distill_steps if _DISTILL.value is None else _DISTILL.value
    report = compress(_CHECKPOINT.value, config, _MODALITY.value, _OUT.value, keep=keep, merge=_MERGE.value,
                      distill_steps=steps, data_dir=_DATA.value, probe_data_dir=_PROBE.value)
    for s in report["stages"]:
        probe = report.get("linear_probe", {}).get(s["name"])
        print(f"{s['name']:<10} {s['params']:>16,}" + ("" if probe is None else f"   linear probe {probe:.3f}"))
    summary = {"stages": [{"name": s["name"], "params": s["params"]} for s in report["stages"]],
               "linear_probe": report.get("linear_probe"), "export": report["export"],
               "seconds": report["seconds"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run_absl("tools.compress", main, required=("config", "modality"))
