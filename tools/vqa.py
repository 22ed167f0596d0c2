"""Answer a data set's visual questions with an RS-MoE run: accuracy by question type, and the router.

    python -m tools.vqa --checkpoint /tmp/rs2 --data /tmp/syn64_test
    python -m tools.vqa --checkpoint /tmp/rs2 --data /tmp/syn64_test --modality all --max_records 64

--checkpoint, --data and --modality as in tools.caption. Every question of each record
(its label map's RSVQA-LR-style questions at full resolution, presence, comparison,
rural_urban, count, majority, and its stored ones not among them) is answered by the
row's top expert (ringmoe/vlm/infer.py), greedily, up to --max_new_tokens tokens.
Score: exact match of the normalised answers (lower case, surrounding space and a
final full stop removed), per question type and overall, each with its Wilson 95 %
interval (ringmoe/vlm/metrics.py `vqa_accuracy`).

Written to --out (default RUN_DIR/vqa/<data set name>/<modality>):
  answers.jsonl    per question: index, sample_id, type, question, answer (predicted),
                   truth, correct, expert;
  experts_vqa.md   accuracy by type and the router table (share of each type's rows per expert);
  experts_vqa.png  the router table as a heatmap (question types x experts).
Progress with rate and ETA on stderr. The LAST stdout line is one JSON object:
checkpoint, step, data, modality, records, questions, accuracy {value, ci, n_test},
by_type {type: {value, ci, n_test}}, question_only and question_only_by_type (what the
questions' words alone can score on them: ringmoe/vlm/metrics.py `question_only_bound`), experts_by_kind {type: [share per expert]}, out,
files; with `--modality all`: modality "all" and by_modality {modality: those keys}.
"""
from __future__ import annotations

import logging

from absl import flags

from ringmoe import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "RS-MoE training workdir or its checkpoints/ directory.")
_DATA = flags.DEFINE_string("data", None, "Data set directory (manifest.json + shards).")
_MODALITY = flags.DEFINE_string("modality", None, "A modality, or `all`. Default: the model's first modality "
                                "in the data set.")
_MAX_RECORDS = flags.DEFINE_integer("max_records", None, "Answer the questions of at most this many records.",
                                    lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per batch (all their questions answered together).",
                              lower_bound=1)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "Tokens per answer (the answers are a word or two).",
                                lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Output directory (default RUN_DIR/vqa/<data name>/<modality>).")


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging(logging.WARNING, absl_level=logging.ERROR)   # Orbax notes a directory opened read-only

    from ringmoe.training.metrics import json_line
    from ringmoe.vlm import evaluate
    print(json_line(evaluate.per_modality(
        "vqa", _CHECKPOINT.value, _DATA.value, _MODALITY.value, _OUT.value,
        lambda run, modality, out: evaluate.answer_dataset(run, _DATA.value, modality, out, batch_size=_BATCH.value,
                                                           max_records=_MAX_RECORDS.value,
                                                           max_new_tokens=_MAX_NEW.value),
        lambda m, r: f"VQA on {r['records']} {m} images\n" + evaluate.accuracy_table(r))))


if __name__ == "__main__":
    cli.run_absl("tools.vqa", main, required=("checkpoint", "data"))
