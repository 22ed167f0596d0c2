"""Ablation runner: every point of a grid trained under one budget, probed, tabulated.

A grid file (configs/ablations/NAME.py) returns a ConfigDict with
  base       the config file every point starts from (configs/tiny.py);
  data_dir   the pretraining data set;
  probe_data_dir  labelled records to probe on (default: data_dir; better: unseen scenes);
  budget     config overrides shared by all points (total_steps, ...);
  probe      the probe run on each point's frozen encoder (knn | linear);
  points     ((name, {dotted config key: value}), ...); a point (name, overrides, source)
             is the second stage of a two-stage recipe: its run starts from the
             final checkpoint of the earlier point `source` (same seed), upcycled into
             its MoE (`ringmoe.upcycle`, settings in its `upcycle.*` keys), and its
             steps are counted with the source's;
  seeds      runs per point, seeds config.seed + 0 .. seeds - 1 (default 3): a point's
             figures are the mean and standard deviation over them, since one run's
             probe differs from the next by more than many ablation effects;
  only       optional comma-separated point names to run (default: all).
Each run trains in DIR/<name>/seed-<i> through the one trainer (`pretrain.train.train`),
so a re-run resumes or skips finished points; `result.json` there holds its
figures. A point is only resumed or reused under the config it was trained
under (every key but the logging-only ones, `pretrain.resume.config_key`); a
directory from another config (a changed grid, budget or recipe) is moved to
DIR/<name>/seed-<i>.stale-<n> and the run trained again. The fixed-batch masked
reconstruction loss (eval/<modality>/simmim, at the last step) and the probe
accuracy of every modality are compared as mean +- sd over the seeds; the report
is DIR/ablation.md and DIR/ablation.png (error bars: the sd).
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

from ringmoe import cli, flops
from ringmoe.visualize import read_jsonl

log = logging.getLogger("ringmoe.ablate")
RESULT_FILE = "result.json"
_COLORS = [f"C{i}" for i in range(10)] * 10   # one colour per point, its seeds alike


@cli.reported(status=2)
class UnknownOverrideError(KeyError):
    """A grid's budget or point overrides a key its base config does not have."""


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
            if name not in parent or not isinstance(parent[name], ConfigDict):
                raise UnknownOverrideError(f"ablation override {key!r}: {grid.base} has no such key")
            parent = parent[name]
        if leaf not in parent:
            raise UnknownOverrideError(f"ablation override {key!r}: {grid.base} has no such key")
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


def run_point(name: str, config: ConfigDict, workdir: str, probe: str, probe_data_dir: str,
              source: tuple[str, str, int] | None = None) -> dict:
    """Trains (or resumes) one point, probes every modality, writes and returns result.json.
    `source` (name, workdir, total steps): a two-stage point's first stage, whose final
    checkpoint is upcycled into this run's step 0 when the run has no checkpoint yet."""
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
    if source is not None and resume.saved_config(workdir) is None:
        from ringmoe.upcycle.run import upcycle
        report = upcycle(source[1], config, workdir)
        log.info("%s: upcycled %s (step %d), step-0 feature distance %s", name, source[0], report["source_step"],
                 report["step0_feature_distance"])
    train(config, workdir)
    trained, model, step = load_pretrained(workdir)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    final = {k: v for r in records if r.get("step") == step for k, v in r.items()}
    modalities = list(config.model.modalities.keys())
    result = {"name": name, "config_key": key, "total_steps": config.total_steps + (source[2] if source else 0),
              "source": source[0] if source else None, "probe": probe,
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


def summarise(name: str, runs: list[dict]) -> dict:
    """One point's figures over its seeds: the means under the single-run keys ('loss',
    'simmim', 'probe_value', 'probe_mean'), their standard deviations (ddof 1; 0 for one
    run) under '<key>_sd', and the runs themselves under 'runs'."""
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    first = runs[0]
    out = {"name": name, "seeds": len(runs), "runs": runs, "total_steps": first["total_steps"],
           "source": first.get("source"),
           "probe": first["probe"], "metric": first.get("metric", ""),
           "active_tflops_per_image": first["active_tflops_per_image"]}
    for key in ("loss", "probe_mean"):
        out[key], out[f"{key}_sd"] = stats([r[key] for r in runs])
    for key in ("simmim", "probe_value"):
        per = {m: stats([r[key].get(m) for r in runs]) for m in first[key]}
        out[key] = {m: v[0] for m, v in per.items()}
        out[f"{key}_sd"] = {m: v[1] for m, v in per.items()}
    return out


def run(grid: ConfigDict, workdir: str) -> list[dict]:
    """Every point of the grid in order, each with `grid.seeds` seeds; returns their summaries."""
    from pretrain import resume

    if not grid.data_dir:
        raise ValueError("the grid has no data set: pass --grid.data_dir=DIR")
    names = [point[0] for point in grid.points]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate point names in the grid: {names}")
    sources = {point[0]: point[2] for point in grid.points if len(point) > 2}
    for name, source in sources.items():
        if source not in names[:names.index(name)]:
            raise ValueError(f"point {name!r} starts from {source!r}, which is not an earlier point of the grid")
    only = [n for n in str(grid.get("only", "") or "").split(",") if n]
    if set(only) - set(names):
        raise ValueError(f"--grid.only names unknown points {sorted(set(only) - set(names))} (have {names})")
    missing = [f"{n} (starts from {sources[n]})" for n in only if n in sources and sources[n] not in only]
    if missing:
        raise ValueError(f"--grid.only must name the first stage of {', '.join(missing)} too")
    seeds = int(grid.get("seeds", 3))
    if seeds < 1:
        raise ValueError(f"--grid.seeds must be >= 1, got {seeds}")
    configs = [(point[0], point_config(grid, dict(point[1]))) for point in grid.points
               if not only or point[0] in only]  # every config is built before any training: fail early
    results, seeded_configs = [], {}
    for i, (name, config) in enumerate(configs):
        runs = []
        for s in range(seeds):
            log.info("point %d/%d: %s, seed %d/%d", i + 1, len(configs), name, s + 1, seeds)
            seeded = ConfigDict(config.to_dict())
            seeded.seed = config.seed + s
            source = None
            if name in sources:
                first = seeded_configs[sources[name], s]
                seeded.upcycle.source_key = resume.config_key(resume.as_json(first))
                source = (sources[name], os.path.join(workdir, sources[name], f"seed-{s}"), first.total_steps)
            seeded_configs[name, s] = seeded
            runs.append(run_point(name, seeded, os.path.join(workdir, name, f"seed-{s}"), grid.probe,
                                  grid.get("probe_data_dir") or grid.data_dir, source))
        results.append(summarise(name, runs))
    return results


def _fmt(value, digits=3, sd=None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def write_report(results: list[dict], workdir: str, title: str) -> tuple[str, str]:
    """DIR/ablation.md (one row per point) and DIR/ablation.png (probe per point, loss curves)."""
    modalities = sorted({m for r in results for m in r["probe_value"]})
    metric = results[0].get("metric", "") if results else ""
    head = (["point", "steps", "forward GFLOP/image", "final loss"] + [f"SimMIM {m}" for m in modalities]
            + [f"{metric} {m}" for m in modalities] + [f"{metric} mean"])
    lines = [f"# Ablation: {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        sd = lambda key, m=None: (r.get(f"{key}_sd") or {}).get(m) if m else r.get(f"{key}_sd")  # noqa: E731
        steps = str(r["total_steps"]) + (f" (from {r['source']})" if r.get("source") else "")
        row = ([r["name"], steps, _fmt(1e3 * r["active_tflops_per_image"], 2),
                _fmt(r["loss"], sd=sd("loss"))]
               + [_fmt(r["simmim"].get(m), sd=sd("simmim", m)) for m in modalities]
               + [_fmt(r["probe_value"].get(m), sd=sd("probe_value", m)) for m in modalities]
               + [_fmt(r["probe_mean"], sd=sd("probe_mean"))])
        lines.append("| " + " | ".join(row) + " |")
    seeds = results[0].get("seeds", 1) if results else 1
    lines += ["", f"Mean ± standard deviation over {seeds} seed(s) per point. SimMIM: masked L1 on the fixed "
              f"evaluation batches at the last step; {metric}: {results[0]['probe'] if results else ''} probe on "
              "the frozen encoder (ringmoe/eval/probes.py). A difference smaller than the spreads is not an effect."]
    md = os.path.join(workdir, "ablation.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    fig = Figure(figsize=(13, 4.5))
    bars, curves = fig.subplots(1, 2)
    names = [r["name"] for r in results]
    bars.bar(range(len(results)), [r["probe_mean"] for r in results], color="tab:blue",
             yerr=[r.get("probe_mean_sd") or 0.0 for r in results], capsize=4)
    bars.set_xticks(range(len(results)), names, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel(f"{metric} (mean over modalities)")
    bars.set_title(f"probe per point (mean ± sd over {seeds} seed(s))")
    for color, r in zip(_COLORS, results):
        for s in range(r.get("seeds", 1)):
            rows = read_jsonl(os.path.join(workdir, r["name"], f"seed-{s}", "metrics.jsonl"))
            points = [(x["step"], x["loss"]) for x in rows if isinstance(x.get("loss"), (int, float))]
            if points:   # a second stage is drawn after its first: shifted by the steps its run lacks
                shift = r["total_steps"] - max(step for step, _ in points)
                curves.plot([step + shift for step, _ in points], [loss for _, loss in points],
                            label=r["name"] if s == 0 else None, linewidth=1.0, color=color)
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_title("training loss")
    curves.legend(fontsize=7)
    fig.tight_layout()
    png = os.path.join(workdir, "ablation.png")
    fig.savefig(png, dpi=110)
    return md, png
