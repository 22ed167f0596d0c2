"""Convert sensor files or a TFDS split into a RingMoE data set (shards + manifest.json).

    python -m tools.convert geotiff --manifest tests/data/real_chips.csv --out data/real_chips \
        --label-names esri_lulc9 [--tile 224] [--shard-size 1024] [--max-bad-records 0]
    python -m tools.convert tfds --name eurosat/all --out data/eurosat [--split train] [--data-dir D]

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
_SPLIT = flags.DEFINE_string("split", "train", "tfds: the split.")
_DATA_DIR = flags.DEFINE_string("data-dir", None, "tfds: TFDS data_dir holding the prepared split.")

KINDS = {"geotiff": (_MANIFEST, _TILE, _LABEL_NAMES, _SOURCE), "tfds": (_NAME, _SPLIT, _DATA_DIR)}
REQUIRED = {"geotiff": _MANIFEST, "tfds": _NAME}


def _kind(argv: list[str]) -> str:
    """The source kind (the one positional argument); a flag of the other kind is a usage error."""
    if len(argv) != 2 or argv[1] not in KINDS:
        raise cli.UsageError(f"one source kind: python -m tools.convert {{{'|'.join(KINDS)}}} --out DIR ...")
    kind = argv[1]
    if REQUIRED[kind].value is None:
        raise cli.UsageError(f"{kind} needs --{REQUIRED[kind].name}")
    misplaced = [f"--{f.name}" for other, fs in KINDS.items() if other != kind for f in fs if f.present]
    if misplaced:
        raise cli.UsageError(f"{', '.join(misplaced)}: not a flag of {kind}")
    return kind


def main(argv) -> None:
    kind = _kind(argv)
    if kind == "geotiff":
        from ringmoe.data.ingest import geotiff
        manifest = geotiff.convert_geotiff(
            _MANIFEST.value, _OUT.value, tile=_TILE.value, shard_size=_SHARD_SIZE.value,
            max_bad_records=_MAX_BAD.value, label_names=geotiff.label_names_from(_LABEL_NAMES.value),
            source=_SOURCE.value)
    else:
        from ringmoe.data.ingest import tfds
        manifest = tfds.convert_tfds(_NAME.value, _OUT.value, split=_SPLIT.value, data_dir=_DATA_DIR.value,
                                     shard_size=_SHARD_SIZE.value, max_bad_records=_MAX_BAD.value)
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
