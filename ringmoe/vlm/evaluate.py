"""Evaluation of an RS-MoE run on a data set: captions scored against references, VQA accuracy by
question type, which expert wrote what, and a gallery (the library behind `tools.caption`,
`tools.vqa`, `tools.rsmoe_compare` and the demo).

`caption_dataset`: every record of the modality encoded whole, captioned aspect by aspect
(`grounding.ASPECTS`), each aspect by its top expert (`infer.answer`); the caption is the
aspects' sentences in order; references are the record's stored captions or grounded ones
from its label map; BLEU-1..4, ROUGE-L, CIDEr and, with Java, METEOR (`metrics.caption_scores`).
`answer_dataset`: every question of each record (its label map's, and stored ones) answered
by its top expert; exact-match accuracy per type and overall with Wilson intervals.
Both write their rows (jsonl), the router table (markdown) and heatmap (PNG) to `out`.
`evaluate_run` is the two at once as flat figures, for comparisons.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import textwrap

import numpy as np


def evaluate_run(checkpoint: str, data_dir: str, *, modality: str | None = None, max_records: int = 0,
                 out: str | None = None, gallery: int = 0) -> dict:
    """Flat figures of a run on `data_dir` (one modality: the given or the first served): bleu_1,
    bleu_4, rouge_l, cider, meteor (when Java ran it), vqa (overall accuracy) and vqa_<type>."""
    from ringmoe.vlm import infer
    run = infer.load_run(checkpoint)
    modality = infer.pick_modalities(infer.served_modalities(run[0], run[1], data_dir), modality, data_dir)[0]
    out = out or infer.default_out(checkpoint, "evaluate", data_dir, modality)
    captions = caption_dataset(run, data_dir, modality, os.path.join(out, "caption"), batch_size=32,
                               max_records=max_records or None, max_new_tokens=None, gallery=gallery)
    answers = answer_dataset(run, data_dir, modality, os.path.join(out, "vqa"), batch_size=32,
                             max_records=max_records or None, max_new_tokens=8)
    figures = {k: captions[k] for k in ("bleu_1", "bleu_4", "rouge_l", "cider", "meteor") if captions[k] is not None}
    figures["aspect_information"] = captions["aspect_information"]
    figures["vqa"] = answers["accuracy"]["value"]
    figures["vqa_question_only"] = answers["question_only"]
    figures["type_information"] = answers["type_information"]
    figures.update({f"vqa_{t}": r["value"] for t, r in answers["by_type"].items()})
    figures.update(image_reliance(checkpoint, data_dir, loaded=(run[0], run[1])))
    return figures


def per_modality(tool: str, checkpoint: str, data_dir: str, modality: str | None, out: str | None, evaluate_one,
                 describe) -> dict:
    """A tool's run over the modalities asked for (one, the default one, or `all`): loads the run,
    calls evaluate_one(run, modality, out_dir) for each, prints describe(modality, result), and
    returns the JSON of the tool's last line (`all`: by_modality)."""
    from ringmoe.vlm import infer
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(2, "no such data set directory", data_dir)
    run = infer.load_run(checkpoint)
    modalities = infer.pick_modalities(infer.served_modalities(run[0], run[1], data_dir), modality, data_dir)
    results = {}
    for m in modalities:
        where = out or infer.default_out(checkpoint, tool, data_dir, m)
        if out and len(modalities) > 1:
            where = os.path.join(out, m)
        results[m] = evaluate_one(run, m, where)
        print(describe(m, results[m]))
    head = {"checkpoint": os.path.abspath(checkpoint), "step": run[2], "data": os.path.abspath(data_dir)}
    if modality == "all":
        return {**head, "modality": "all", "by_modality": results}
    return {**head, "modality": modalities[0], **results[modalities[0]]}


def image_reliance(checkpoint: str, data_dir: str, *, batches: int = 4, loaded: tuple | None = None) -> dict:
    """Does the model read the image? The teacher-forced answer NLL of `batches` evaluation batches
    of `data_dir` (whole scenes, the run's sub-task draw), with each row's own image and with
    the images rolled by one row within each modality (every answer then paired with another
    scene): {"nll", "nll_other_images"}. Equal values: the answers come from the text alone.
    `loaded`: the run's (config, model) when the caller has read them already."""
    import jax
    from flax import nnx

    from ringmoe.model.checkpoint import load_pretrained
    from ringmoe.training import tasks
    config, model = loaded if loaded is not None else load_pretrained(checkpoint)[:2]
    task = tasks.for_run(config, checkpoint)

    @nnx.jit
    def nll(model, batch):
        return model.loss(batch, balance_weight=0.0, z_weight=0.0)[1]["answer_nll"]
    keys = ("pixels", "valid", "instruction", "instruction_valid", "answer", "answer_valid")
    own, other = [], []
    with task.pipeline(config, data_dir=data_dir, train=False, num_workers=0) as pipeline:
        for _ in range(batches):
            batch = {m: {k: b[k] for k in keys} for m, b in next(pipeline).items()}
            rolled = {m: {**b, "pixels": np.roll(b["pixels"], 1, 0), "valid": np.roll(b["valid"], 1, 0)}
                      for m, b in batch.items()}
            own.append(float(nll(model, jax.tree.map(np.asarray, batch))))
            other.append(float(nll(model, rolled)))
    return {"nll": float(np.mean(own)), "nll_other_images": float(np.mean(other))}


def caption_dataset(run, data_dir: str, modality: str, out: str, *, batch_size: int, max_records: int | None,
                    max_new_tokens: int | None, gallery: int) -> dict:
    """Captions, scores, router statistics and pictures of one modality (module doc); the JSON keys."""
    from ringmoe.data import grounding, shards
    from ringmoe.vlm import examples, infer
    from ringmoe.vlm.metrics import caption_scores
    config, model, _, tokenizer, pad_id, end_id = run
    manifest = shards.read_manifest(data_dir)
    names = tuple(manifest.get("label_names", ()))
    v = config.vlm
    aspects = grounding.ASPECTS
    tokens, valid, truncated = infer.instructions([examples.CAPTION[a] for a in aspects], tokenizer,
                                                  v.instruction_length, pad_id=pad_id, end_id=end_id)
    experts = infer.split_experts(model.rsmoe)
    router = infer.RouterCounts(aspects, model.rsmoe.spec.num_experts)
    progress = infer.Progress(f"caption {modality}", infer.records_with(manifest, modality, max_records))
    os.makedirs(out, exist_ok=True)
    rows, shown = [], []
    for images in infer.encoded_images(model, config, data_dir, modality, batch_size=batch_size,
                                       max_records=max_records):
        n = len(images)
        answers, top = infer.answer(model, np.stack([im.vision for im in images]),
                                    np.broadcast_to(tokens, (n, *tokens.shape)),
                                    np.broadcast_to(valid, (n, *valid.shape)),
                                    max_new_tokens=max_new_tokens or v.answer_length, end_id=end_id, pad_id=pad_id,
                                    experts=experts)
        for i, image in enumerate(images):
            parts = {a: tokenizer.decode(answers[i * len(aspects) + j]).strip() for j, a in enumerate(aspects)}
            chosen = {a: int(top[i * len(aspects) + j]) for j, a in enumerate(aspects)}
            for a in aspects:
                router.add(a, chosen[a])
            rows.append({"index": image.index, "sample_id": image.record.sample_id,
                         "caption": " ".join(parts[a] for a in aspects if parts[a]), "parts": parts,
                         "experts": chosen, "references": infer.caption_references(image.record, names, image.index)})
            if len(shown) < gallery:
                shown.append((image, rows[-1]))
        progress.update(n)

    scored = [r for r in rows if r["references"]]
    if not scored:
        raise ValueError(f"{data_dir}: no {modality} record has a reference caption (no stored captions, no "
                         "labelled pixels)")
    with contextlib.redirect_stdout(sys.stderr):   # the scorers print their working; stdout ends in JSON
        scores = caption_scores({str(r["index"]): r["references"] for r in scored},
                                {str(r["index"]): r["caption"] for r in scored})
    files = {"captions": os.path.join(out, "captions.jsonl"), "table": os.path.join(out, "experts.md"),
             "experts": os.path.join(out, "experts.png")}
    with open(files["captions"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    router.save_heatmap(files["experts"], f"top expert per caption aspect ({modality}, {len(rows)} images)")
    result = {"records": len(rows), "scored_records": len(scored),
              **{k: scores.get(k) for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor")},
              "note": note(scores), "unavailable": scores["unavailable"], "tokenizer": scores["tokenizer"],
              "instructions_truncated": int(truncated), "experts_by_kind": router.shares(),
              "aspect_information": round(router.information(), 4)}
    with open(files["table"], "w", encoding="utf-8") as f:
        f.write(f"# Captions of {data_dir} ({modality})\n\nShare of each aspect's rows written by each expert "
                f"(its top expert):\n\n{router.table()}\n\nI(aspect; expert) / H(aspect) = "
                f"{result['aspect_information']:.3f} (1: each aspect has experts of its own; 0: none)\n\n"
                + scores_table(result) + "\n")
    if shown:
        files["gallery"] = save_gallery(os.path.join(out, "gallery.png"), shown, modality)
        files["gallery_md"] = write_gallery_md(os.path.join(out, "gallery.md"), shown, files["gallery"])
    return {**result, "out": os.path.abspath(out), "files": files}


def note(scores: dict) -> str:
    """Why a score is missing, in one line."""
    return "; ".join(f"{k}: {why}" for k, why in scores["unavailable"].items())


def scores_table(result: dict) -> str:
    keys = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
    return "| metric | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {'-' if result[k] is None else f'{result[k]:.4f}'} |" for k in keys)


def summary_table(modality: str, result: dict) -> str:
    return (f"captions of {result['records']} {modality} images ({result['scored_records']} with references)\n"
            + scores_table(result) + "\n\n" + "router (share of each aspect's rows per expert):\n"
            + "\n".join(f"  {k:<12} " + "  ".join(f"e{j} {s:.2f}" for j, s in enumerate(v))
                        for k, v in result["experts_by_kind"].items()))


def display_rgb(image, modality: str) -> np.ndarray:
    """(H, W, 3) in [0, 1] of a record's image: `visualize.composite` (optical and multispectral
    as red/green/blue, SAR as its false colour), each channel stretched to its 2-98 percentiles,
    or to the composite's fixed ranges (SAR-L2 dB)."""
    from ringmoe.visualize import composite
    wavelengths = np.array([b.wavelength_nm if b.wavelength_nm is not None else np.nan for b in image.bands])
    rgb, fixed = composite(modality, np.asarray(image.pixels, np.float64),
                           None if np.isnan(wavelengths).any() else wavelengths)
    if fixed is not None:
        lo, hi = np.array([r[0] for r in fixed]), np.array([r[1] for r in fixed])
    else:
        lo, hi = np.nanpercentile(rgb, 2, axis=(0, 1)), np.nanpercentile(rgb, 98, axis=(0, 1))
        if modality == "optical":   # one stretch for all three bands keeps the colours
            lo, hi = np.full(3, lo.min()), np.full(3, hi.max())
    return np.clip(np.nan_to_num((rgb - lo) / np.where(hi > lo, hi - lo, 1.0)), 0.0, 1.0)


def save_gallery(path: str, shown, modality: str) -> str:
    """PNG: one row per record, its image and the generated and first reference captions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 2.6 * len(shown)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shown), 2, squeeze=False, gridspec_kw={"width_ratios": [1, 3.2]})
    for (image, row), (left, right) in zip(shown, axes):
        left.imshow(display_rgb(image.record.modalities[modality], modality), interpolation="nearest")
        left.set_xticks([])
        left.set_yticks([])
        left.set_title(f"#{image.index} {image.record.sample_id}", fontsize=8)
        right.axis("off")
        text = [f"generated (experts {'/'.join(str(e) for e in row['experts'].values())}):",
                textwrap.fill(row["caption"] or "(empty)", 95), "",
                "reference:", textwrap.fill(row["references"][0] if row["references"] else "(none)", 95)]
        right.text(0.0, 1.0, "\n".join(text), va="top", ha="left", fontsize=8, family="monospace",
                   transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    return path


def write_gallery_md(path: str, shown, picture: str) -> str:
    lines = [f"# Gallery\n\n![gallery]({os.path.basename(picture)})\n"]
    for image, row in shown:
        lines.append(f"## #{image.index} {image.record.sample_id}\n")
        lines += [f"- **generated**: {row['caption'] or '(empty)'}"]
        lines += [f"  - {a} (expert {row['experts'][a]}): {row['parts'][a] or '(empty)'}" for a in row["parts"]]
        lines += ["- **references**:"] + [f"  - {r}" for r in row["references"]] + [""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def answer_dataset(run, data_dir: str, modality: str, out: str, *, batch_size: int, max_records: int | None,
                   max_new_tokens: int) -> dict:
    """Answers, accuracy and router statistics of one modality (module doc); the JSON keys."""
    from ringmoe.data import grounding, shards
    from ringmoe.vlm import infer
    from ringmoe.vlm.metrics import normalise_answer, question_only_bound, vqa_accuracy
    config, model, _, tokenizer, pad_id, end_id = run
    manifest = shards.read_manifest(data_dir)
    names = tuple(manifest.get("label_names", ()))
    experts = infer.split_experts(model.rsmoe)
    router = infer.RouterCounts(grounding.QUESTION_TYPES, model.rsmoe.spec.num_experts)
    progress = infer.Progress(f"vqa {modality}", infer.records_with(manifest, modality, max_records))
    os.makedirs(out, exist_ok=True)
    rows, records, truncated = [], 0, 0
    for images in infer.encoded_images(model, config, data_dir, modality, batch_size=batch_size,
                                       max_records=max_records):
        asked = [(image, q) for image in images for q in infer.record_questions(image.record, names)]
        records += len({image.index for image, _ in asked})
        progress.update(len(images))
        if not asked:
            continue
        tokens, valid, cut = infer.instructions([q["question"] for _, q in asked], tokenizer,
                                                config.vlm.instruction_length, pad_id=pad_id, end_id=end_id)
        truncated += cut
        # One row per question: its image's vision tokens with the question as the single sub-task.
        vision = np.stack([image.vision for image, _ in asked])
        answers, top = infer.answer(model, vision, tokens[:, None], valid[:, None], max_new_tokens=max_new_tokens,
                                    end_id=end_id, pad_id=pad_id, experts=experts)
        for (image, q), written, expert in zip(asked, answers, top):
            predicted = tokenizer.decode(written).strip()
            router.add(q["type"], int(expert))
            rows.append({"index": image.index, "sample_id": image.record.sample_id, "type": q["type"],
                         "question": q["question"], "answer": predicted, "truth": q["answer"],
                         "correct": normalise_answer(predicted) == normalise_answer(q["answer"]),
                         "expert": int(expert)})
    if not rows:
        raise ValueError(f"{data_dir}: no {modality} record has a question (no stored questions, no labelled pixels)")
    scores = vqa_accuracy([(r["type"], r["answer"], r["truth"]) for r in rows])
    blind = question_only_bound([(r["type"], r["question"], r["truth"]) for r in rows])
    files = {"answers": os.path.join(out, "answers.jsonl"), "table": os.path.join(out, "experts_vqa.md"),
             "experts": os.path.join(out, "experts_vqa.png")}
    with open(files["answers"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    router.save_heatmap(files["experts"], f"top expert per question type ({modality}, {len(rows)} questions)")
    result = {"records": records, "questions": len(rows), "accuracy": scores["overall"],
              "by_type": scores["by_type"], "question_only": blind["overall"]["value"],
              "question_only_by_type": {k: v["value"] for k, v in blind["by_type"].items()},
              "instructions_truncated": int(truncated),
              "experts_by_kind": router.shares(), "type_information": round(router.information(), 4)}
    with open(files["table"], "w", encoding="utf-8") as f:
        f.write(f"# VQA on {data_dir} ({modality})\n\nExact-match accuracy [Wilson 95 % interval]:\n\n"
                f"{accuracy_table(result)}\n\nShare of each question type's rows written by each expert "
                f"(its top expert):\n\n{router.table()}\n\nI(type; expert) / H(type) = "
                f"{result['type_information']:.3f}\n")
    return {**result, "out": os.path.abspath(out), "files": files}


def accuracy_table(result: dict) -> str:
    """Accuracy per question type and overall, with its interval and the question-only bound
    (`metrics.question_only_bound`: what the question's words alone can score here)."""
    blind = {**result["question_only_by_type"], "overall": result["question_only"]}

    def row(name, r):
        return (f"| {name} | {r['n_test']} | {r['value']:.4f} | [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] "
                f"| {blind[name]:.4f} |")
    return "\n".join(["| type | questions | accuracy | 95 % interval | question only (bound) |", "|---|---|---|---|---|"]
                     + [row(k, v) for k, v in result["by_type"].items()] + [row("overall", result["accuracy"])])
