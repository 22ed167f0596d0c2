"""`make demo`: the main job end to end at tiny size, on this machine, in minutes.

    python -m tools.demo [--out demo_out] [--config configs/demo.py] [--config.total_steps=150] \
        [--examples 256] [--probe-examples 2000] [--distill-steps 0]

1. labelled synthetic data (ringmoe/data/synthetic.py): a pretraining set and,
   from another seed, a probe set of unseen scenes; the real Sentinel-1/2 chips
   cut into tiles of the model's input size (ringmoe/data/ingest/geotiff.py);
   the probe set and the tiles are written beside step 2's start-up;
2. pretraining of configs/demo.py (configs/tiny.py, 150 steps) on the
   pretraining set (pretrain.train; `--config.*` overrides it);
3. RS-MoE on the pretrained encoder (configs/rsmoe_tiny.py, the encoder frozen),
   on a thread of its own beside steps 4 and 5: stage 1, one dense LM on every
   sub-task (--rsmoe-steps), then stage 2, upcycled into 3 experts + the
   instruction router (--rsmoe-steps more); captions and VQA answers for unseen
   scenes and for the real chips' tiles, scored against their grounded references
   (ringmoe.vlm.evaluate), with a caption gallery;
4. probes on the frozen encoder vs its random initialisation and vs the raw
   input (band means/stds; a per-pixel head on the bands): linear and kNN
   scene classification of the probe set for every modality (the headline
   figures are their means over modalities), segmentation of the real chips'
   land-cover maps from Sentinel-2 L2A (ringmoe.eval). 2000 probe scenes give
   400 test records, so one record is 0.25 points; every figure carries its
   95 % interval (Wilson; a record bootstrap for mIoU);
5. compression of the pretrained model to a dense SwinV2 for multispectral
   (ringmoe.compress: statistics, extraction, pruning, merge, export; the
   distillation that follows the reference's merge with --distill-steps N),
   every stage linear-probed on the probe set;
6. DEMO_OUT/report.md with the figures and the PNGs (reconstructions, expert
   loads, loss curves, calibration statistics, the RS-MoE gallery and router).
Progress lines while it runs (the last one gives the wall time); the last line
is a JSON summary of the results alone, the same for every run of one command.
"""
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from absl import flags
from ml_collections import config_flags

from ringmoe import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CHIPS_CSV = os.path.join(REPO, "tests", "data", "real_chips.csv")


def _step(i: int, n: int, text: str, start: float) -> None:
    print(f"[demo {i}/{n} | {time.perf_counter() - start:5.0f}s] {text}", flush=True)


def _report(path: str, figures: dict, pictures: list[str]) -> None:
    probes = figures["probes"]
    lines = ["# RingMoE tiny demo", "",
             f"Pretraining: configs/tiny.py, {figures['steps']} steps on {figures['synthetic_records']} "
             f"synthetic scenes ({figures['train_seconds']:.0f} s).", "",
             "Objective terms on the fixed evaluation batches (SimMIM L1 and the physics terms, "
             "unweighted), step 0 -> last step:", "",
             "| modality / term | step 0 | last | change |", "|---|---|---|---|"]
    for term, (first, last) in figures["eval_terms"].items():
        lines.append(f"| {term} | {first:.3f} | {last:.3f} | {100 * (last / first - 1):+.0f} % |")
    lines += ["", "Probes on the frozen encoder (ringmoe/eval/probes.py) vs the same config randomly "
              "initialised and vs the raw input (scene probes: per-band means and stds, log power for "
              "SAR-L1; segmentation: a per-pixel head on the bands). Each figure with its 95 % interval "
              "over the test records (Wilson; bootstrap over records for mIoU):", "",
              "| probe | data | modality | metric | test records | pretrained | random init | raw input |",
              "|---|---|---|---|---|---|---|---|"]

    def fmt(value, ci):
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    for p in probes:
        lines.append(f"| {p['probe']} | {p['data']} | {p['modality']} | {p['metric']} | {p['test_records']} | "
                     f"{fmt(p['value'], p['ci'])} | {fmt(p['random_init_value'], p['random_init_ci'])} | "
                     f"{fmt(p['raw_value'], p['raw_ci'])} |")
    maps = [f"{p['modality']} {p['maps']} / {p['random_init_maps']}" for p in probes if "maps" in p]
    lines += ["", "Linear probes: the pooled maps chosen on the validation records (probe.linear_maps), "
              "pretrained / random init: " + "; ".join(maps) + "."]
    compression = figures["compression"]
    lines += ["", f"Compression (tools.compress) of the {compression['modality']} model: keep "
              f"{compression['keep_collaborative']:.0%} of the collaborative experts, {compression['merge']} merge, "
              f"{compression['distill_steps']} distillation steps; linear probe on the probe set "
              "(full = the MoE teacher), 95 % Wilson interval:", "", "| stage | parameters | linear probe |",
              "|---|---|---|"]
    for stage in compression["stages"]:
        name = stage["name"]
        lines.append(f"| {stage['name']} | {stage['params']:,} | "
                     f"{fmt(compression['linear_probe'][name], figures['compressed_ci'][name])} |")
    export = compression["export"]
    lines += ["", f"Exported: {os.path.dirname(export['safetensors'])}, which timm loads as it is "
              f"(`timm.create_model(\"local-dir:{os.path.dirname(export['safetensors'])}\", pretrained=True)`): "
              f"{export['safetensors']} (timm SwinV2 names), {export['timm_config']} (timm's config), "
              f"{export['sidecar']} (bands, units, normalisation), {export['checkpoint']} (Orbax).", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(path))})" for p in pictures]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def rsmoe_section(config, encoder_run: str, data_dir: str, unseen: str, real: str, out: str) -> dict:
    """The two RS-MoE stages on the demo's encoder and their evaluation (module doc, step 5)."""
    from configs import rsmoe_tiny
    from pretrain.train import train
    from ringmoe.vlm import evaluate, infer
    runs = {}
    for stage, variant in (("stage1", "dense"), ("stage2", "upcycled")):
        c = rsmoe_tiny.get_config(variant)
        c.model = config.model
        c.data_dir, c.vlm.encoder, c.total_steps = data_dir, encoder_run, _RSMOE_STEPS.value
        c.checkpoint_every = c.total_steps
        c.eval_every = 0   # the stages are scored below by their captions and answers, not a held-out loss
        if stage == "stage2":
            c.vlm.init_from = runs["stage1"]
        runs[stage] = os.path.join(out, f"rsmoe_{stage}")
        train(c, runs[stage])
    run = infer.load_run(runs["stage2"])
    figures = {"steps_per_stage": _RSMOE_STEPS.value, "files": {}}
    for name, data, records in (("unseen", unseen, _RSMOE_RECORDS.value), ("real_chips", real, None)):
        caption = evaluate.caption_dataset(run, data, "multispectral", os.path.join(out, "rsmoe_eval", name, "caption"),
                                           batch_size=32, max_records=records, max_new_tokens=None,
                                           gallery=16 if name == "real_chips" else 8)
        vqa = evaluate.answer_dataset(run, data, "multispectral", os.path.join(out, "rsmoe_eval", name, "vqa"),
                                      batch_size=32, max_records=records, max_new_tokens=8)
        figures[name] = {"records": caption["records"], "bleu_4": caption["bleu_4"], "rouge_l": caption["rouge_l"],
                         "cider": caption["cider"], "vqa": vqa["accuracy"]["value"], "vqa_ci": vqa["accuracy"]["ci"],
                         "vqa_by_type": {t: r["value"] for t, r in vqa["by_type"].items()},
                         "experts_by_aspect": caption["experts_by_kind"]}
        figures["files"][name] = {**caption["files"], "vqa_answers": vqa["files"]["answers"]}
    return figures


def rsmoe_report(rsmoe: dict, root: str) -> str:
    """The report's RS-MoE section (multispectral encoder input)."""
    lines = ["", "## RS-MoE (captioning and VQA on the frozen encoder)", "",
             f"configs/rsmoe_tiny.py: stage 1 (one dense LM) then stage 2 (3 experts upcycled from it + the "
             f"instruction router), {rsmoe['steps_per_stage']} steps each. References are grounded in the label "
             "maps (ringmoe/data/grounding.py); multispectral input.", "",
             "| data | records | BLEU-4 | ROUGE-L | CIDEr | VQA accuracy [95 %] |", "|---|---|---|---|---|---|"]
    for name in ("unseen", "real_chips"):
        r = rsmoe[name]
        lines.append(f"| {name} | {r['records']} | {r['bleu_4']:.3f} | {r['rouge_l']:.3f} | {r['cider']:.3f} | "
                     f"{r['vqa']:.3f} [{r['vqa_ci'][0]:.3f}, {r['vqa_ci'][1]:.3f}] |")
    files = rsmoe["files"]["real_chips"]
    lines += ["", "Which expert wrote each caption aspect (share of rows, unseen scenes): "
              + "; ".join(f"{a} {[round(x, 2) for x in v]}" for a, v in rsmoe["unseen"]["experts_by_aspect"].items()),
              "", f"Real chips, generated and reference captions: {os.path.relpath(files['gallery_md'], root)}", "",
              f"![gallery]({os.path.relpath(files['gallery'], root)})",
              f"![experts]({os.path.relpath(files['experts'], root)})", ""]
    return "\n".join(lines)


_OUT = flags.DEFINE_string("out", "demo_out", "Output directory (replaced).")
_CONFIG = cli.define_config_file("tools.demo", "config", os.path.join(REPO, "configs", "demo.py"),
                                 "Pretraining config (configs/demo.py: configs/tiny.py, 150 steps).")
_EXAMPLES = flags.DEFINE_integer("examples", 256, "Synthetic scenes to pretrain on.", lower_bound=1)
_PROBE_EXAMPLES = flags.DEFINE_integer("probe-examples", 2000, "Synthetic scenes to probe on "
                                       "(2000: 400 test records, 0.25 points each).", lower_bound=10)
_RSMOE_STEPS = flags.DEFINE_integer("rsmoe-steps", 100, "Updates of each RS-MoE stage (0: no RS-MoE section; 100, "
                                    "traded down from 150 for the demo's time: README).", lower_bound=0)
_RSMOE_RECORDS = flags.DEFINE_integer("rsmoe-records", 200, "Unseen scenes captioned and questioned.", lower_bound=1)
_DISTILL_STEPS = flags.DEFINE_integer("distill-steps", 0, "Distillation steps of the compressed model (0: stop "
                                      "after the merge, as the reference does).", lower_bound=0)


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging(absl_level=logging.ERROR)   # Orbax notes that it opened a directory read-only
    config, out = _CONFIG.value, _OUT.value
    from pretrain.validate import validate_config
    validate_config(config)   # before minutes of data making
    start, n = time.perf_counter(), 7
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    synthetic_dir, probe_set, real, run = (os.path.join(out, d) for d in ("synthetic", "probe_set", "real_chips",
                                                                          "run"))

    from ringmoe.data import synthetic
    from ringmoe.data.ingest import geotiff
    _step(1, n, f"making {_EXAMPLES.value} labelled synthetic scenes to pretrain on", start)
    made = synthetic.write(synthetic_dir, _EXAMPLES.value, config.model.image_size, seed=0, labeled=True)

    def evaluation_data():   # needed from step 3 on
        synthetic.write(probe_set, _PROBE_EXAMPLES.value, config.model.image_size, seed=1, labeled=True)
        return geotiff.convert_geotiff(REAL_CHIPS_CSV, real, tile=config.model.image_size,
                                       label_names=geotiff.label_names_from("esri_lulc9"))

    from pretrain.train import train
    config.data_dir = synthetic_dir
    _step(2, n, f"pretraining {config_flags.get_config_filename(flags.FLAGS['config'])} for "
          f"{config.total_steps} steps (compiles first, about a minute), beside it {_PROBE_EXAMPLES.value} "
          "probe scenes and the real chips' tiles", start)
    from ringmoe.eval.features import evaluate_probes, random_init_model
    t = time.perf_counter()
    # Beside the trainer's start-up, which waits on XLA compiling on one core: the baseline's
    # initialiser compiles, and the probe set and the real chips' tiles are written (their
    # numbers are the same as made one at a time: seeded, and XLA's results do not depend on
    # what else runs).
    with ThreadPoolExecutor(2) as pool:
        baseline, evaluation = pool.submit(random_init_model, config), pool.submit(evaluation_data)
        last = train(config, run)
        chips = evaluation.result()
    train_seconds = time.perf_counter() - t

    from ringmoe.model.checkpoint import load_pretrained
    from ringmoe.visualize import read_jsonl
    trained, model, _ = load_pretrained(run)
    random_init = baseline.result()   # the same config and seed as the run's step 0
    # RS-MoE needs only the pretrained encoder and the data: it runs on a thread of its own beside
    # the probes and the compression, filling the core their compiles leave idle (its progress
    # lines interleave with theirs; its figures are the same as run alone).
    with ThreadPoolExecutor(1, thread_name_prefix="rsmoe") as pool:
        tuning = None
        if _RSMOE_STEPS.value:
            _step(3, n, f"RS-MoE, beside steps 4 and 5: stage 1 (dense LM) and stage 2 (3 upcycled experts), "
                  f"{_RSMOE_STEPS.value} steps each, then captions and VQA", start)
            tuning = pool.submit(rsmoe_section, config, run, synthetic_dir, probe_set, real, out)
        probes = []
        for modality in model.modalities:
            _step(4, n, f"linear and kNN probes of {modality} on the probe set, pretrained and random init", start)
            probes += [{**r, "data": "synthetic (unseen)"} for r in evaluate_probes(
                trained, model, probe_set, ("linear", "knn"), modality, baseline_model=random_init)]
        _step(4, n, "segmentation probe on the real chips (multispectral), pretrained and random init", start)
        probes += [{**r, "data": "real chips"} for r in evaluate_probes(
            trained, model, real, ("segmentation",), "multispectral", baseline_model=random_init)]

        from ringmoe.compress.run import compress
        _step(5, n, f"compressing to a dense multispectral SwinV2 ({_DISTILL_STEPS.value} distillation steps), "
              "probing every stage", start)
        compression = compress(run, trained, "multispectral", os.path.join(out, "compressed"),
                               keep=trained.compress.keep_collaborative, distill_steps=_DISTILL_STEPS.value,
                               data_dir=synthetic_dir, probe_data_dir=probe_set, probed={"full": next(
                                   p["value"] for p in probes if p["probe"] == "linear"
                                   and p["modality"] == "multispectral")})
        rsmoe = None
        if tuning is not None:
            _step(5, n, "waiting for RS-MoE", start)
            rsmoe = tuning.result()

    _step(6, n, "writing the report", start)
    records = read_jsonl(os.path.join(run, "metrics.jsonl"))
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    eval_terms = {k[len("eval/"):]: (evals[0][k], evals[-1][k]) for k in sorted(evals[0])
                  if k.startswith("eval/") and k.count("/") == 2 and not k.endswith("/total")}
    simmim = {k.split("/")[0]: v for k, v in eval_terms.items() if k.endswith("/simmim")}
    pictures = [os.path.join(run, "pictures", f) for f in ("loss_curves.png", "reconstructions_final.png",
                                                            "expert_load_final.png")]
    pictures += [compression["statistics"]["full"]["png"],
                 os.path.join(out, "compressed", "distill", "loss_curves.png")]
    from ringmoe.eval.intervals import accuracy_result, pooled_accuracy
    n_test = next(p["test_records"] for p in probes if p["probe"] == "linear" and p["modality"] == "multispectral")
    compressed_ci = {k: accuracy_result(v, n_test)["ci"] for k, v in compression["linear_probe"].items()}
    report = os.path.join(out, "report.md")
    _report(report, {"steps": config.total_steps, "synthetic_records": made["records"], "train_seconds": train_seconds,
                     "eval_terms": eval_terms, "probes": probes, "compression": compression,
                     "compressed_ci": compressed_ci}, [p for p in pictures if os.path.exists(p)])

    headline = {}
    for probe, name in (("linear", "linear_probe"), ("knn", "knn")):
        rows = [p for p in probes if p["probe"] == probe]   # mean over modalities = pooled correct / total
        for prefix, suffix in (("", ""), ("random_init_", "_random_init"), ("raw_", "_raw")):
            pooled = pooled_accuracy([p[prefix + "value"] for p in rows], [p["test_records"] for p in rows])
            headline[name + suffix], headline[name + suffix + "_ci"] = pooled["value"], pooled["ci"]
    seg = next(p for p in probes if p["probe"] == "segmentation")
    for prefix, suffix in (("", ""), ("random_init_", "_random_init"), ("raw_", "_raw")):
        headline["segmentation_miou" + suffix] = seg[prefix + "value"]
        headline["segmentation_miou" + suffix + "_ci"] = seg[prefix + "ci"]
    keys = ("value", "ci", "random_init_value", "random_init_ci", "raw_value", "raw_ci", "test_records")
    summary = {**headline, "probe_test_records": n_test,
               "per_modality": {p["modality"]: {k: p[k] for k in keys + ("maps", "random_init_maps")}
                                for p in probes if p["probe"] == "linear"},
               "simmim_change": {m: last_ / first - 1 for m, (first, last_) in simmim.items()},
               "eval_terms": {k: {"step0": first, "last": last_} for k, (first, last_) in eval_terms.items()},
               "compressed_linear_probe": compression["linear_probe"],
               "compressed_linear_probe_ci": compressed_ci,
               "compressed_params": {s["name"]: s["params"] for s in compression["stages"]},
               "final_loss": last.get("loss"), "real_chip_tiles": chips["records"], "report": report}
    # The wall time is on the progress line, not in the JSON: the JSON holds results only, so two
    # runs of one command print the same last line (README, "determinism").
    if rsmoe is not None:
        summary["rsmoe"] = {k: v for k, v in rsmoe.items() if k != "files"}
        with open(report, "a", encoding="utf-8") as f:
            f.write(rsmoe_report(rsmoe, os.path.dirname(report)))
    _step(7, n, f"done in {time.perf_counter() - start:.0f} s: {report}", start)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run_absl("tools.demo", main)
