"""Writes a synthetic, physically grounded multi-modal data set (ringmoe/data/synthetic.py).

    python -m tools.make_synthetic --out /tmp/synth --examples 512 --image-size 64 --seed 0 \
        [--paired-fraction 0.5] [--labeled] [--shard-size 1024] [--looks 4.4] [--hardness] [--captions 5]

Paired records carry optical, multispectral, sar_l2 and sar_l1; unpaired ones a
single modality. With --labeled --captions N each record also carries N grounded
captions and the visual questions of its label map (ringmoe/data/grounding.py).
The last stdout line is a JSON summary (records, paired/unpaired
counts, shards, seconds; with --hardness the linear-probe figures of
ringmoe/data/hardness.py).
"""
from __future__ import annotations

import json
import time

from absl import flags

from ringmoe import cli

_OUT = flags.DEFINE_string("out", None, "Empty output directory.", required=True)
_EXAMPLES = flags.DEFINE_integer("examples", None, "Number of records.", required=True, lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image-size", 64, "Record height = width in pixels.", lower_bound=8)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice.")
_PAIRED = flags.DEFINE_float("paired-fraction", 1.0, "Share of records holding all four modalities "
                             "(the rest hold one).", lower_bound=0.0, upper_bound=1.0)
_LABELED = flags.DEFINE_boolean("labeled", False, "Store label maps and scene labels.")
_SHARD_SIZE = flags.DEFINE_integer("shard-size", 1024, "Records per ArrayRecord shard.", lower_bound=1)
_LOOKS = flags.DEFINE_float("looks", None, "SAR-L2 speckle looks (default: ringmoe/data/synthetic.py's 4.4).")
_CAPTIONS = flags.DEFINE_integer("captions", 0, "Grounded captions per record, with its visual questions "
                                 "(needs --labeled; 0: no text).", lower_bound=0)
_HARDNESS = flags.DEFINE_boolean("hardness", False, "Also report linear-probe accuracy (needs --labeled).")


def main(argv) -> None:
    cli.no_arguments(argv)
    if _HARDNESS.value and not _LABELED.value:
        raise cli.UsageError("--hardness needs --labeled")
    if _CAPTIONS.value and not _LABELED.value:
        raise cli.UsageError("--captions needs --labeled (the text is derived from the label maps)")
    from ringmoe.data import synthetic
    kwargs = {"paired_fraction": _PAIRED.value, "labeled": _LABELED.value, "captions": _CAPTIONS.value}
    if _LOOKS.value is not None:
        kwargs["looks"] = _LOOKS.value
    start = time.time()
    manifest = synthetic.write(_OUT.value, _EXAMPLES.value, _IMAGE_SIZE.value, _SEED.value,
                               shard_size=_SHARD_SIZE.value, **kwargs)
    summary = {"out": _OUT.value, "records": manifest["records"], "paired_records": manifest["paired_records"],
               "single_modality_records": manifest["single_modality_records"],
               "modality_records": {m: v["records"] for m, v in manifest["modalities"].items()},
               "shards": len(manifest["shards"]), "image_size": _IMAGE_SIZE.value, "seed": _SEED.value,
               "labeled": _LABELED.value, "captions": _CAPTIONS.value, "seconds": round(time.time() - start, 2)}
    if _HARDNESS.value:
        from ringmoe.data import hardness
        summary["hardness"] = hardness.label_hardness(_OUT.value)
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run_absl("tools.make_synthetic", main)
