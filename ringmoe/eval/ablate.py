"""Ablation runner: every point of a grid trained under one budget, probed, tabulated.

A grid file (configs/ablations/NAME.py) returns a ConfigDict with
  base       the config file every point starts from (configs/tiny.py);
  data_dir   the pretraining data set;
  probe_data_dir  labelled records to probe on (default: data_dir; better: unseen scenes);
  budget     config overrides shared by all points (total_steps, ...);
  probe      the probe run on each point's frozen encoder (knn | linear);
  points     ((name, {dotted config key: value}), ...);
  only       optional comma-separated point names to run (default: all).
Each point trains in DIR/<name> through the one trainer (`pretrain.train.train`),
so a re-run resumes or skips finished points; `result.json` there holds its
figures. A point is only resumed or reused under the config it was trained
under (every key but the logging-only ones, `pretrain.resume.config_key`); a
directory from another config (a changed grid, budget or recipe) is moved to
DIR/<name>.stale-<n> and the point trained again. The fixed-batch masked
reconstruction loss (eval/<modality>/simmim, at the last step) and the probe
accuracy of every modality are compared; the report is DIR/ablation.md and
DIR/ablation.png.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os

import numpy as np
from matplotlib.figure import Figure
from ml_collections import ConfigDict

from ringmoe import flops
from ringmoe.visualize import read_jsonl

log = logging.getLogger("ringmoe.ablate")
RESULT_FILE = "result.json"


def load_config_file(path: str) -> ConfigDict:
    """get_config() of a config file (the same files `--config` takes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def point_config(grid: ConfigDict, overrides: dict) -> ConfigDict:
    """The base config with the grid's budget, data set and the point's overrides applied."""
    config = load_config_file(grid.base)
    config.data_dir = grid.data_dir
    for key, value in {**dict(grid.budget), **overrides}.items():
        parent = config
        *path, leaf = key.split(".")
        for name in path:
            parent = parent[name]
        if leaf not in parent:
            raise KeyError(f"ablation override {key!r}: {grid.base} has no such key")
        parent[leaf] = value
    if config.eval_every == 0:  # the fixed-batch losses at step 0 and at the end are the comparison
        config.eval_every = config.total_steps
    return config


def set_aside_if_stale(name: str, config: ConfigDict, workdir: str, key: str) -> str | None:
    """Moves a point's directory to `<workdir>.stale-<n>` (kept, never deleted) if what it holds was
    trained under another config than `config` (`pretrain.resume.config_key`: every key but the
    logging-only ones, so total_steps, the recipe and the grid's overrides all count); returns
    where it went, or None if it is current or empty. Its checkpoints' config is compared, or,
    without checkpoints, the key result.json records."""
    from pretrain import resume

    saved = resume.saved_config(workdir)
    path = os.path.join(workdir, RESULT_FILE)
    if saved is not None:
        if resume.config_key(saved) == key:
            return None
        why = resume.describe({k: v for k, v in resume.differences(saved, resume.as_json(config)).items()
                               if not resume.covered(k, resume.LOGGING_KEYS)})
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("config_key") == key:
                return None
        why = f"{RESULT_FILE} is from another config"
    else:
        return None
    n = 1
    while os.path.exists(f"{workdir}.stale-{n}"):
        n += 1
    aside = f"{workdir}.stale-{n}"
    os.replace(workdir, aside)
    log.warning("%s: trained under another config (%s); moved to %s, training it again", name, why, aside)
    return aside


def run_point(name: str, config: ConfigDict, workdir: str, probe: str, probe_data_dir: str) -> dict:
    """Trains (or resumes) one point, probes every modality, writes and returns result.json."""
    from pretrain import resume
    from pretrain.train import train
    from ringmoe.eval.features import evaluate
    from ringmoe.model.checkpoint import load_pretrained

    path = os.path.join(workdir, RESULT_FILE)
    key = resume.config_key(resume.as_json(config))
    if set_aside_if_stale(name, config, workdir, key) is None and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        log.info("%s: done already (%s)", name, path)
        return result
    train(config, workdir)
    trained, model, step = load_pretrained(workdir)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    final = {k: v for r in records if r.get("step") == step for k, v in r.items()}
    modalities = list(config.model.modalities.keys())
    result = {"name": name, "config_key": key, "total_steps": config.total_steps, "probe": probe,
              "active_tflops_per_image": flops.model_flops_per_step(config.model, {m: 1 for m in modalities},
                                                                    training=False) / len(modalities) / 1e12,
              "loss": final.get("loss"), "simmim": {}, "probe_value": {}}
    for m in modalities:
        result["simmim"][m] = final.get(f"eval/{m}/simmim")
        scores = evaluate(trained, model, probe_data_dir, probe, m, baseline=False)
        result["probe_value"][m] = scores["value"]
        result["metric"] = scores["metric"]
    result["probe_mean"] = float(np.mean(list(result["probe_value"].values())))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


def run(grid: ConfigDict, workdir: str) -> list[dict]:
    """Every point of the grid in order; returns their results."""
    if not grid.data_dir:
        raise ValueError("the grid has no data set: pass --grid.data_dir=DIR")
    names = [name for name, _ in grid.points]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate point names in the grid: {names}")
    only = [n for n in str(grid.get("only", "") or "").split(",") if n]
    if set(only) - set(names):
        raise ValueError(f"--grid.only names unknown points {sorted(set(only) - set(names))} (have {names})")
    configs = [(name, point_config(grid, dict(overrides))) for name, overrides in grid.points
               if not only or name in only]  # every config is built before any training: fail early
    results = []
    for i, (name, config) in enumerate(configs):
        log.info("point %d/%d: %s", i + 1, len(configs), name)
        results.append(run_point(name, config, os.path.join(workdir, name), grid.probe,
                                 grid.get("probe_data_dir") or grid.data_dir))
    return results


def _fmt(value, digits=3) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def write_report(results: list[dict], workdir: str, title: str) -> tuple[str, str]:
    """DIR/ablation.md (one row per point) and DIR/ablation.png (probe per point, loss curves)."""
    modalities = sorted({m for r in results for m in r["probe_value"]})
    metric = results[0].get("metric", "") if results else ""
    head = (["point", "steps", "forward GFLOP/image", "final loss"] + [f"SimMIM {m}" for m in modalities]
            + [f"{metric} {m}" for m in modalities] + [f"{metric} mean"])
    lines = [f"# Ablation: {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = ([r["name"], str(r["total_steps"]), _fmt(1e3 * r["active_tflops_per_image"], 2), _fmt(r["loss"])]
               + [_fmt(r["simmim"].get(m)) for m in modalities]
               + [_fmt(r["probe_value"].get(m)) for m in modalities] + [_fmt(r["probe_mean"])])
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"SimMIM: masked L1 on the fixed evaluation batches at the last step; {metric}: "
              f"{results[0]['probe'] if results else ''} probe on the frozen encoder (ringmoe/eval/probes.py)."]
    md = os.path.join(workdir, "ablation.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    fig = Figure(figsize=(13, 4.5))
    bars, curves = fig.subplots(1, 2)
    names = [r["name"] for r in results]
    bars.bar(range(len(results)), [r["probe_mean"] for r in results], color="tab:blue")
    bars.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel(f"{metric} (mean over modalities)")
    bars.set_title("probe per point")
    for r in results:
        rows = read_jsonl(os.path.join(workdir, r["name"], "metrics.jsonl"))
        points = [(x["step"], x["loss"]) for x in rows if isinstance(x.get("loss"), (int, float))]
        if points:
            curves.plot(*zip(*points), label=r["name"], linewidth=1.0)
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_title("training loss")
    curves.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(workdir, "ablation.png")
    fig.savefig(png, dpi=110)
    return md, png
