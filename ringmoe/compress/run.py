"""The compression pass, stage by stage (DESIGN.md section 2, "Compression"; `tools.compress`).

    1 statistics  routing of the full model over calibration images of every modality
    2 extracted   the chosen modality's model                               stages/extracted
    3 pruned      the most-used collaborative experts per layer             stages/pruned
    4 dense_MERGE every block's experts merged into one FFN (`--merge`:      stages/dense_MERGE
                  `svd` from the weights, `refit` also fitted on calibration tokens)
    5 dense       the merged model distilled against the MoE teacher        stages/dense
    6 export      Orbax checkpoint + safetensors + sidecar of the last one  export/

Every stage's model is saved (`save_model`) and loads with `load_pretrained`. With
`probe_data_dir`, the linear probe of the evaluation module scores every stage
and the teacher (the full model); `probed` passes in scores a caller already has
(the demo probes the full model before it compresses), which are not recomputed.
Everything is summed up in `report.json` and `report.md`.
"""
from __future__ import annotations

import json
import logging
import os
import time

from ringmoe.compress import merging, refit, stages, statistics
from ringmoe.compress.distill import distill
from ringmoe.compress.export import export
from ringmoe.compress.extraction import extract_modality, flat_params
from ringmoe.compress.pruning import prune_collaborative
from ringmoe.data import shards
from ringmoe.data.pipeline import modality_specs
from ringmoe.model.checkpoint import config_from_json, load_pretrained, read_meta, save_model
from ringmoe.model.params import count

log = logging.getLogger("ringmoe.compress")

# How a block's experts become one dense FFN: name -> merge(teacher, teacher_config, dense_config,
# statistics, modality, data_dir, *, max_images) -> (dense model, report with "ranks" [and "blocks"]).
MERGES = {"svd": merging.svd_merge, "refit": refit.refit_merge}


def check_checkpoint(checkpoint: str, config) -> None:
    """The checkpoint's model must be the one `config` describes; the error lists what differs."""
    _, meta = read_meta(checkpoint)
    if "config" not in meta:
        raise ValueError(f"{checkpoint}: its metadata holds no config")
    saved = config_from_json(meta["config"]).model.to_dict()
    wanted = config.model.to_dict()
    differences = _differences(saved, wanted)
    if differences:
        raise ValueError(f"{checkpoint} was trained with another model config: "
                         + "; ".join(differences[:6]) + (" ..." if len(differences) > 6 else ""))


def _differences(a, b, prefix="model") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    normal = lambda x: json.loads(json.dumps(x))  # noqa: E731 - tuples and lists compare alike
    return [] if normal(a) == normal(b) else [f"{prefix}: checkpoint {a!r}, config {b!r}"]


def check_arguments(config, modality: str, keep: float, merge: str, distill_steps: int, checkpoint: str,
                    data_dir: str, probed: dict | None = None) -> None:
    """Every argument error, before any work starts."""
    stages.check_arguments(config, modality, keep)
    if merge not in MERGES:
        raise ValueError(f"unknown --merge {merge!r} (one of {', '.join(MERGES)})")
    names = ["full", "extracted", "pruned", f"dense_{merge}"] + (["dense"] if distill_steps else [])
    unknown = sorted(set(probed or ()) - set(names))
    if unknown:
        raise ValueError(f"probed scores given for {unknown}, not stages of this pass ({', '.join(names)})")
    if distill_steps < 0:
        raise ValueError(f"--distill-steps must be >= 0, got {distill_steps}")
    if not data_dir:
        raise ValueError("no calibration data: give --data-dir or set config.data_dir")
    specs = modality_specs(shards.read_manifest(data_dir), stages.extracted_config(config, modality), data_dir)
    if modality not in specs:
        raise ValueError(f"{data_dir}: holds no {modality} images to calibrate and distill on")
    check_checkpoint(checkpoint, config)


def compress(checkpoint: str, config, modality: str, out: str, *, keep: float, merge: str = "refit",
             distill_steps: int, data_dir: str | None = None, probe_data_dir: str | None = None,
             probed: dict[str, float] | None = None) -> dict:
    """Runs every stage; returns the report (also written to `out`/report.json)."""
    data_dir = data_dir or config.data_dir
    check_arguments(config, modality, keep, merge, distill_steps, checkpoint, data_dir, probed)
    configs = stages.stage_configs(config, modality, keep)
    for c in configs.values():
        c.data_dir = data_dir
    settings = config.compress
    started = time.perf_counter()
    report = {"modality": modality, "keep_collaborative": keep, "merge": merge, "distill_steps": distill_steps,
              "checkpoint": os.path.abspath(checkpoint), "stages": []}
    models = {}

    def stage(name, model, stage_config, saved=True):
        models[name] = model
        entry = {"name": name, "params": int(count(model)["total"])}
        if saved:
            entry["path"] = save_model(os.path.join(out, "stages", name), stage_config, model,
                                       {"stage": name, "modality": modality})
        report["stages"].append(entry)
        log.info("stage %-9s %14s parameters  (%.0f s)", name, f"{entry['params']:,}", time.perf_counter() - started)

    _, full, _ = load_pretrained(checkpoint)
    stage("full", full, config, saved=False)
    entry = report["stages"][0]
    entry["path"] = os.path.abspath(checkpoint)

    served = list(modality_specs(shards.read_manifest(data_dir), config, data_dir))
    full_stats = statistics.expert_statistics(full, config, data_dir, served,
                                              max_images=settings.calibration_images)
    report["statistics"] = {"full": statistics.save(full_stats, os.path.join(out, "statistics"), "full")}

    params = flat_params(full)
    stage("extracted", extract_modality(params, configs["extracted"]), configs["extracted"])
    pruned, kept = prune_collaborative(params, configs["pruned"], full_stats, modality)
    report["kept_collaborative_experts"] = kept
    stage("pruned", pruned, configs["pruned"])

    pruned_stats = statistics.expert_statistics(pruned, configs["pruned"], data_dir, [modality],
                                                max_images=settings.calibration_images)
    report["statistics"]["pruned"] = statistics.save(pruned_stats, os.path.join(out, "statistics"), "pruned")
    dense, merge_report = MERGES[merge](pruned, configs["pruned"], configs["dense"], pruned_stats, modality,
                                        data_dir, max_images=settings.calibration_images)
    report["merge_ranks"] = merge_report["ranks"]
    if "blocks" in merge_report:
        report["merge_fit"] = merge_report["blocks"]
    stage(f"dense_{merge}", dense, configs["dense"])

    if distill_steps:
        dense, metrics = distill(dense, models["extracted"], configs["dense"], modality, steps=distill_steps,
                                 workdir=os.path.join(out, "distill"), data_dir=data_dir)
        report["distill_last"] = metrics
        stage("dense", dense, configs["dense"])

    spec = modality_specs(shards.read_manifest(data_dir), configs["dense"], data_dir)[modality]
    report["export"] = export(os.path.join(out, "export"), dense, configs["dense"], modality, spec,
                              {"stage": report["stages"][-1]["name"]})
    if probe_data_dir:
        report["linear_probe"] = probe_stages(models, configs, probe_data_dir, modality, probed)
    report["seconds"] = time.perf_counter() - started
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    write_markdown(report, os.path.join(out, "report.md"))
    return report


def write_markdown(report: dict, path: str) -> None:
    """The stages with their parameters (and probe accuracies), and the merge's ranks."""
    probes = report.get("linear_probe") or {}
    lines = [f"# Compression of {report['checkpoint']} to a dense {report['modality']} model", "",
             f"Collaborative experts kept: {report['keep_collaborative']:.0%} per layer; merge: {report['merge']}"
             f"; distillation steps: {report['distill_steps']}.", "",
             "| stage | parameters | linear probe |", "|---|---|---|"]
    for stage in report["stages"]:
        probe = probes.get(stage["name"])
        lines.append(f"| {stage['name']} | {stage['params']:,} | {'-' if probe is None else f'{probe:.3f}'} |")
    lines += ["", "SVD merge, per block: hidden units given to each expert (rank) and the share of its",
              "[W_in^T | w W_out] energy they keep.", "", "| block | expert: group, mean gate, rank, energy |",
              "|---|---|"]
    for i, block in enumerate(report["merge_ranks"]):
        cells = ", ".join(f"{e['group']} {e['weight']:.2f} r{e['rank']} {e['energy_kept']:.0%}" for e in block)
        lines.append(f"| {i} | {cells} |")
    if report.get("merge_fit"):
        lines += ["", "Refit (refit.py), per block: the ridge rho chosen on the held-out fifth of the calibration",
                  "images, and there the FFN output error ||f(h) - y||^2 / ||y||^2 of the refitted and of the",
                  "SVD merge's output layer.", "", "| block | tokens | rho | held-out error | SVD merge |",
                  "|---|---|---|---|---|"]
        for i, b in enumerate(report["merge_fit"]):
            errors = [("-" if b[k] is None else f"{b[k]:.4f}") for k in ("held_out_error", "held_out_error_svd")]
            lines.append(f"| {i} | {b['tokens']} | {b['ridge']} | {errors[0]} | {errors[1]} |")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def probe_stages(models: dict, configs: dict, data_dir: str, modality: str,
                 probed: dict[str, float] | None = None) -> dict[str, float]:
    """Linear-probe accuracy of every stage's model on `modality` (the full model is the teacher);
    the stages named in `probed` keep the score given there (the same probe on the same data)."""
    from ringmoe.eval.features import evaluate

    out = {}
    for name, model in models.items():
        if name in (probed or {}):
            out[name] = probed[name]
            log.info("linear probe %-9s %.3f (given)", name, out[name])
            continue
        stage_config = configs[name] if name in configs else configs["dense"]   # dense_<merge>: the dense one
        result = evaluate(stage_config, model, data_dir, "linear", modality, baseline=False)
        out[name] = result["value"]
        log.info("linear probe %-9s %.3f", name, result["value"])
    return out
