"""Caption a data set's images with an RS-MoE run, score the captions, and show which expert wrote what.

    python -m tools.caption --checkpoint /tmp/rs2 --data /tmp/syn64_test
    python -m tools.caption --checkpoint /tmp/rs2 --data /tmp/syn64_test --modality all --max_records 64

--checkpoint is an RS-MoE training workdir (or its checkpoints/ directory): the newest
readable step, with the run's own config and tokenizer (RUN_DIR/tokenizer.json, else
config.vlm.tokenizer). Every record of --data carrying the modality (default: the
first modality the model and data share; `all`: each of them) is encoded whole and
captioned aspect by aspect, each aspect by its top expert (ringmoe/vlm/infer.py);
the caption is the aspects' sentences in order. References: the record's stored
captions, else grounded captions of its label map (5 phrasings). Scores: BLEU-1..4,
ROUGE-L, CIDEr and, with Java, METEOR (ringmoe/vlm/metrics.py; SPICE is not computed
and the result says why).

Written to --out (default RUN_DIR/caption/<data set name>/<modality>):
  captions.jsonl  per record: index, sample_id, caption, parts {aspect: sentence},
                  experts {aspect: expert}, references;
  experts.md      the router table (share of each aspect's rows per expert) and the scores;
  experts.png     that table as a heatmap (aspects x experts);
  gallery.png / gallery.md   the first --gallery records: image (RGB composite, 2-98 %
                  stretch), generated and reference captions.
Progress with rate and ETA on stderr. The LAST stdout line is one JSON object:
checkpoint, step, data, modality, records, bleu_1..bleu_4, rouge_l, cider, meteor
(null without Java), note, unavailable, experts_by_kind {aspect: [share per expert]},
out, files; with `--modality all`: checkpoint, step, data, modality "all" and
by_modality {modality: that object's other keys}.
"""
from __future__ import annotations

import logging

from absl import flags

from ringmoe import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "RS-MoE training workdir or its checkpoints/ directory.")
_DATA = flags.DEFINE_string("data", None, "Data set directory (manifest.json + shards).")
_MODALITY = flags.DEFINE_string("modality", None, "A modality, or `all`. Default: the model's first modality "
                                "in the data set.")
_MAX_RECORDS = flags.DEFINE_integer("max_records", None, "Caption at most this many records.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per batch.", lower_bound=1)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens per aspect (default: config.vlm.answer_length).",
                                lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Output directory (default RUN_DIR/caption/<data name>/<modality>).")
_GALLERY = flags.DEFINE_integer("gallery", 8, "Records shown in gallery.png / gallery.md (0: none).", lower_bound=0)


def main(argv) -> None:
    cli.no_arguments(argv)
    cli.setup_logging(logging.WARNING, absl_level=logging.ERROR)   # Orbax notes a directory opened read-only

    from ringmoe.training.metrics import json_line
    from ringmoe.vlm import evaluate
    print(json_line(evaluate.per_modality(
        "caption", _CHECKPOINT.value, _DATA.value, _MODALITY.value, _OUT.value,
        lambda run, modality, out: evaluate.caption_dataset(run, _DATA.value, modality, out, batch_size=_BATCH.value,
                                                            max_records=_MAX_RECORDS.value,
                                                            max_new_tokens=_MAX_NEW.value,
                                                            gallery=_GALLERY.value),
        evaluate.summary_table)))


if __name__ == "__main__":
    cli.run_absl("tools.caption", main, required=("checkpoint", "data"))
