"""Score a pretrained RingMoE with a probe on frozen features, against its random initialisation.

    python -m tools.evaluate --checkpoint /tmp/tiny --data /tmp/syn64 --probe knn
    python -m tools.evaluate --checkpoint /tmp/tiny/checkpoints --data /tmp/syn64 --probe linear --modality sar_l2
    python -m tools.evaluate --checkpoint /tmp/tiny --data /tmp/syn64 --probe segmentation --no-baseline

--checkpoint is a training workdir (or its checkpoints/ directory): the newest
readable step is restored with the run's own config, whose `probe` block holds
the probe settings (ringmoe/config.py). Probes: knn and linear on scene labels
(top-1 accuracy), segmentation on label maps (mIoU). Prints a small table, then
as its LAST stdout line one JSON object with `probe`, `metric`, `value`, `ci`,
`random_init_value`, `random_init_ci`, `raw_value`, `raw_ci` (the raw-input
baseline: band means/stds, or a per-pixel head on the bands), `modality`,
`pooling`, `train_records`, `test_records`, `step` and `checkpoint`
(segmentation adds `stage` and the pixel accuracies). Every `ci` is a 95 %
interval [low, high] over the test records (Wilson for accuracies, a record
bootstrap for mIoU). Any usage or data problem exits with a one-line message.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys

from ringmoe import cli
from ringmoe.eval.registry import PROBES


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


@cli.command("tools.evaluate")
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="training workdir or its checkpoints/ directory")
    p.add_argument("--data", required=True, help="data set directory (manifest.json + shards)")
    p.add_argument("--probe", required=True, help=" | ".join(PROBES))
    p.add_argument("--modality", default=None, help="default: the model's first modality in the data set")
    p.add_argument("--no-baseline", action="store_true", help="skip the random-initialisation baseline")
    args = p.parse_args(argv)
    if args.probe not in PROBES:
        raise cli.UsageError(f"unknown probe {args.probe!r} (one of {', '.join(PROBES)})")
    if not os.path.isdir(args.data):
        raise FileNotFoundError(errno.ENOENT, "no such data set directory", args.data)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)   # Orbax notes that it opened a directory read-only

    from ringmoe.eval.features import evaluate
    from ringmoe.model.checkpoint import load_pretrained
    config, model, step = load_pretrained(args.checkpoint)
    result = evaluate(config, model, args.data, args.probe, args.modality, baseline=not args.no_baseline)
    result.update(step=step, checkpoint=os.path.abspath(args.checkpoint))
    print(_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
