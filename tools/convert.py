"""Convert sensor files or a TFDS split into a RingMoE data set (shards + manifest.json).

    python -m tools.convert geotiff --manifest tests/data/real_chips.csv --out data/real_chips \
        --label-names esri_lulc9 [--tile 224] [--shard-size 1024] [--max-bad-records 0]
    python -m tools.convert tfds --name eurosat/all --out data/eurosat [--split train] [--data-dir D]
    python -m tools.convert captions --captions-json RSICD/dataset_rsicd.json --images RSICD/RSICDimages \
        --out data/rsicd_train [--split train] [--gsd 1.0]
    python -m tools.convert rsvqa --questions-json LR_split_train_questions.json \
        --answers-json LR_split_train_answers.json --images Images_LR --out data/rsvqa_lr_train [--gsd 10]

Prints a short summary, then as its last line the JSON of `records`, `shards`,
`bad_records` and `out`. Bad input stops with one error line (exit status 1) unless
--max-bad-records allows skipping it.
"""
import json

from absl import flags

from ringmoe import cli

_OUT = flags.DEFINE_string("out", None, "Output directory (new or empty).", required=True)
_SHARD_SIZE = flags.DEFINE_integer("shard-size", 1024, "Records per shard.", lower_bound=1)
_MAX_BAD = flags.DEFINE_integer("max-bad-records", 0, "Skip and count up to K bad records "
                                "(default 0: stop at the first).", lower_bound=0)
# geotiff
_MANIFEST = flags.DEFINE_string("manifest", None, "geotiff: CSV of co-registered GeoTIFFs "
                                "(sample_id,sensor,path[,label_path]); paths relative to its directory.")
_TILE = flags.DEFINE_integer("tile", None, "geotiff: cut rasters into SIZE x SIZE records.", lower_bound=1)
_LABEL_NAMES = flags.DEFINE_string("label-names", None, "geotiff: class names by id: a scheme (esri_lulc9) "
                                   "or comma-separated names, id 0 first.")
_SOURCE = flags.DEFINE_string("source", "", "geotiff: provenance / attribution stored in the manifest.")
# tfds
_NAME = flags.DEFINE_string("name", None, "tfds: a prepared TFDS data set (eurosat/all, so2sat/all).")
_SPLIT = flags.DEFINE_string("split", "train", "tfds: the split; captions: keep only this split (default: all).")
_DATA_DIR = flags.DEFINE_string("data-dir", None, "tfds: TFDS data_dir holding the prepared split.")

# captions / rsvqa (ringmoe/data/ingest/text.py)
_CAPTIONS_JSON = flags.DEFINE_string("captions-json", None, "captions: Karpathy-style JSON (RSICD, UCM-Captions).")
_QUESTIONS_JSON = flags.DEFINE_string("questions-json", None, "rsvqa: the questions JSON.")
_ANSWERS_JSON = flags.DEFINE_string("answers-json", None, "rsvqa: the answers JSON.")
_IMAGES = flags.DEFINE_string("images", None, "captions / rsvqa: the folder of the images.")
_GSD = flags.DEFINE_float("gsd", None, "captions / rsvqa: ground sampling distance of the images in metres "
                          "(default 1 for captions, 10 for RSVQA-LR's Sentinel-2).", lower_bound=0.0)

KINDS = {"geotiff": (_MANIFEST, _TILE, _LABEL_NAMES, _SOURCE), "tfds": (_NAME, _SPLIT, _DATA_DIR),
         "captions": (_CAPTIONS_JSON, _IMAGES, _SPLIT, _GSD, _SOURCE),
         "rsvqa": (_QUESTIONS_JSON, _ANSWERS_JSON, _IMAGES, _GSD, _SOURCE)}
REQUIRED = {"geotiff": (_MANIFEST,), "tfds": (_NAME,), "captions": (_CAPTIONS_JSON, _IMAGES),
            "rsvqa": (_QUESTIONS_JSON, _ANSWERS_JSON, _IMAGES)}


def _kind(argv: list[str]) -> str:
    """The source kind (the one positional argument); a flag of the other kind is a usage error."""
    if len(argv) != 2 or argv[1] not in KINDS:
        raise cli.UsageError(f"one source kind: python -m tools.convert {{{'|'.join(KINDS)}}} --out DIR ...")
    kind = argv[1]
    for flag in REQUIRED[kind]:
        if flag.value is None:
            raise cli.UsageError(f"{kind} needs --{flag.name}")
    own = {f.name for f in KINDS[kind]}
    misplaced = sorted({f"--{f.name}" for fs in KINDS.values() for f in fs if f.present and f.name not in own})
    if misplaced:
        raise cli.UsageError(f"{', '.join(misplaced)}: not a flag of {kind}")
    return kind


def _geotiff() -> dict:
    from ringmoe.data.ingest import geotiff
    return geotiff.convert_geotiff(
        _MANIFEST.value, _OUT.value, tile=_TILE.value, shard_size=_SHARD_SIZE.value,
        max_bad_records=_MAX_BAD.value, label_names=geotiff.label_names_from(_LABEL_NAMES.value),
        source=_SOURCE.value)


def _tfds() -> dict:
    from ringmoe.data.ingest import tfds
    return tfds.convert_tfds(_NAME.value, _OUT.value, split=_SPLIT.value, data_dir=_DATA_DIR.value,
                             shard_size=_SHARD_SIZE.value, max_bad_records=_MAX_BAD.value)


def _captions() -> dict:
    from ringmoe.data.ingest import text
    return text.convert_captions(
        _CAPTIONS_JSON.value, _IMAGES.value, _OUT.value, split=_SPLIT.value if _SPLIT.present else None,
        gsd_m=_GSD.value or 1.0, shard_size=_SHARD_SIZE.value, max_bad_records=_MAX_BAD.value,
        source=_SOURCE.value)


def _rsvqa() -> dict:
    from ringmoe.data.ingest import text
    return text.convert_rsvqa(
        _QUESTIONS_JSON.value, _ANSWERS_JSON.value, _IMAGES.value, _OUT.value, gsd_m=_GSD.value or 10.0,
        shard_size=_SHARD_SIZE.value, max_bad_records=_MAX_BAD.value, source=_SOURCE.value)


CONVERTERS = {"geotiff": _geotiff, "tfds": _tfds, "captions": _captions, "rsvqa": _rsvqa}


def main(argv) -> None:
    manifest = CONVERTERS[_kind(argv)]()
    extra = manifest.get("extra", {})
    print(f"wrote {manifest['records']} records in {len(manifest['shards'])} shard(s) to {_OUT.value}; "
          f"modalities {dict((m, v['records']) for m, v in manifest['modalities'].items())}; "
          f"paired {manifest['paired_records']}; skipped {extra.get('bad_records', 0)} bad record(s)")
    for message in extra.get("errors", []):
        print(f"  skipped: {message}")
    print(json.dumps({"records": manifest["records"], "shards": len(manifest["shards"]),
                      "bad_records": extra.get("bad_records", 0), "out": _OUT.value}))


if __name__ == "__main__":
    cli.run_absl("tools.convert", main)
