"""RS-MoE's three arms under one budget, several seeds: what the router and the two stages buy.

    python -m tools.rsmoe_compare --workdir /tmp/rsmoe_cmp --data /tmp/syn64_4k --test /tmp/syn64_test \\
        --encoder /tmp/enc [--config configs/rsmoe_tiny.py] [--steps 2000] [--seeds 3] [--test_records 64]

(the data sets and encoder: configs/rsmoe_tiny.py's header; the README's RS-MoE table is this
command, about 24 minutes per seed on a 2-core CPU)

Arms (configs/rsmoe_tiny.py variants; the same data, encoder, batch and `--steps` updates each):
  dense      one LM (the same active parameters as a top-1 MoE of such LMs)
  sparse     K experts + the instruction router, from scratch
  two_stage  the dense recipe for steps / 2, then upcycled into K experts for steps / 2
             (`vlm.init_from`; each stage its own warm-up and cosine)
Each run trains through the one trainer in WORKDIR/<arm>/seed-<i> (a re-run resumes or
reuses it), then is evaluated on the unseen test scenes: captions (BLEU-1..4, ROUGE-L,
CIDEr; `tools.caption`'s evaluation) and VQA accuracy by question type (`tools.vqa`'s). The
report: WORKDIR/comparison.md (mean +- sd over seeds per arm), comparison.png, and a JSON
last line with every run's figures.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
from absl import flags
from matplotlib.figure import Figure

from ringmoe import cli

log = logging.getLogger("tools.rsmoe_compare")
ARMS = ("dense", "sparse", "two_stage")
CAPTION_METRICS = ("bleu_1", "bleu_4", "rouge_l", "cider")

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every run and the report go.")
_DATA = flags.DEFINE_string("data", None, "Training data set (labelled records).")
_TEST = flags.DEFINE_string("test", None, "Unseen test scenes (labelled records).")
_ENCODER = flags.DEFINE_string("encoder", None, "The pretrained RingMoE run every arm reads (frozen).")
_CONFIG = flags.DEFINE_string("config", "configs/rsmoe_tiny.py", "The RS-MoE config file (its variants are the arms).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Updates per arm (two_stage: half dense, half sparse).", lower_bound=2)
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per arm (config.seed + 0 .. seeds - 1).", lower_bound=1)
_RECORDS = flags.DEFINE_integer("test_records", 0, "Test records evaluated (0: all).", lower_bound=0)


def arm_configs(config_file: str, arm: str, seed: int, steps: int, data: str, encoder: str, workdir: str):
    """[(run directory, config)] of one arm and seed, in the order they train."""
    def variant(name: str, total: int):
        config = _variant(config_file, name)
        config.seed, config.total_steps, config.data_dir, config.vlm.encoder = seed, total, data, encoder
        config.checkpoint_every = total
        config.eval_every = 0
        return config
    run = os.path.join(workdir, arm, f"seed-{seed}")
    if arm != "two_stage":
        return [(run, variant("dense" if arm == "dense" else "sparse", steps))]
    first = os.path.join(run, "stage1")
    second = variant("upcycled", steps - steps // 2)
    second.vlm.init_from = first
    return [(first, variant("dense", steps // 2)), (os.path.join(run, "stage2"), second)]


def _variant(config_file: str, name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("rsmoe_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


def summarise(runs: list[dict]) -> dict:
    """Mean and sd (ddof 1; 0 for one seed) of every figure over an arm's runs."""
    out = {}
    for key in runs[0]["figures"]:
        values = np.array([r["figures"][key] for r in runs], float)
        out[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return out


def write_report(workdir: str, summary: dict, seeds: int, steps: int) -> tuple[str, str]:
    keys = list(next(iter(summary.values())))
    lines = [f"# RS-MoE: dense vs sparse vs two-stage ({steps} updates each, {seeds} seed(s), mean ± sd)", "",
             "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for arm, figures in summary.items():
        lines.append(f"| {arm} | " + " | ".join(f"{figures[k]['mean']:.3f} ± {figures[k]['sd']:.3f}" for k in keys)
                     + " |")
    lines += ["", "A difference smaller than the spreads is not an effect."]
    md = os.path.join(workdir, "comparison.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    fig = Figure(figsize=(2.2 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys))
    for ax, key in zip(np.atleast_1d(axes), keys):
        arms = list(summary)
        ax.bar(range(len(arms)), [summary[a][key]["mean"] for a in arms],
               yerr=[summary[a][key]["sd"] for a in arms], capsize=4, color=[f"C{i}" for i in range(len(arms))])
        ax.set_xticks(range(len(arms)), arms, rotation=30)
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    png = os.path.join(workdir, "comparison.png")
    fig.savefig(png, dpi=110)
    return md, png


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging(absl_level=logging.ERROR)
    from pretrain.train import train
    from ringmoe.vlm.evaluate import evaluate_run
    workdir = os.path.abspath(_WORKDIR.value)
    results = {arm: [] for arm in ARMS}
    total = len(ARMS) * _SEEDS.value
    for i, (arm, seed) in enumerate((a, s) for s in range(_SEEDS.value) for a in ARMS):
        runs = arm_configs(_CONFIG.value, arm, seed, _STEPS.value, _DATA.value, _ENCODER.value, workdir)
        for run, config in runs:
            log.info("[%d/%d] %s seed %d: training %s (%d steps)", i + 1, total, arm, seed, run, config.total_steps)
            train(config, run)
        figures = evaluate_run(runs[-1][0], _TEST.value, max_records=_RECORDS.value)
        results[arm].append({"seed": seed, "run": runs[-1][0], "figures": figures})
        log.info("[%d/%d] %s seed %d: %s", i + 1, total, arm, seed, json.dumps(figures))
    summary = {arm: summarise(runs) for arm, runs in results.items()}
    md, png = write_report(workdir, summary, _SEEDS.value, _STEPS.value)
    print(json.dumps({"steps": _STEPS.value, "seeds": _SEEDS.value, "summary": summary, "runs": results,
                      "report": md, "png": png}))


if __name__ == "__main__":
    cli.run_absl("tools.rsmoe_compare", main, required=("workdir", "data", "test", "encoder"))
