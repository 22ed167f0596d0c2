"""Convert sensor files or a TFDS split into a RingMoE data set (shards + manifest.json).

    python -m tools.convert geotiff --manifest tests/data/real_chips.csv --out data/real_chips \
        --label-names esri_lulc9 [--tile 224] [--shard-size 1024] [--max-bad-records 0]
    python -m tools.convert tfds --name eurosat/all --out data/eurosat [--split train] [--data-dir D]

Prints a short summary, then as its last line the JSON of `records`, `shards`,
`bad_records` and `out`. Bad input stops with one error line (exit status 1) unless
--max-bad-records allows skipping it.
"""
import argparse
import json

from ringmoe import cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("geotiff", help="CSV of co-registered GeoTIFFs (sample_id,sensor,path[,label_path])")
    g.add_argument("--manifest", required=True, help="CSV file; paths relative to its directory")
    g.add_argument("--tile", type=int, default=None, help="cut rasters into SIZE x SIZE records")
    g.add_argument("--label-names", default=None,
                   help="class names by id: a scheme (esri_lulc9) or comma-separated names, id 0 first")
    g.add_argument("--source", default="", help="provenance / attribution stored in the manifest")
    t = sub.add_parser("tfds", help="a prepared TFDS split (eurosat/all, so2sat/all)")
    t.add_argument("--name", required=True)
    t.add_argument("--split", default="train")
    t.add_argument("--data-dir", default=None, help="TFDS data_dir holding the prepared split")
    for s in (g, t):
        s.add_argument("--out", required=True, help="output directory (new or empty)")
        s.add_argument("--shard-size", type=int, default=1024, help="records per shard")
        s.add_argument("--max-bad-records", type=int, default=0,
                       help="skip and count up to K bad records (default 0: stop at the first)")
    return p


@cli.command("tools.convert")
def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.kind == "geotiff":
        from ringmoe.data.ingest import geotiff
        manifest = geotiff.convert_geotiff(
            args.manifest, args.out, tile=args.tile, shard_size=args.shard_size,
            max_bad_records=args.max_bad_records, label_names=geotiff.label_names_from(args.label_names),
            source=args.source)
    else:
        from ringmoe.data.ingest import tfds
        manifest = tfds.convert_tfds(args.name, args.out, split=args.split, data_dir=args.data_dir,
                                     shard_size=args.shard_size, max_bad_records=args.max_bad_records)
    extra = manifest.get("extra", {})
    print(f"wrote {manifest['records']} records in {len(manifest['shards'])} shard(s) to {args.out}; "
          f"modalities {dict((m, v['records']) for m, v in manifest['modalities'].items())}; "
          f"paired {manifest['paired_records']}; skipped {extra.get('bad_records', 0)} bad record(s)")
    for message in extra.get("errors", []):
        print(f"  skipped: {message}")
    print(json.dumps({"records": manifest["records"], "shards": len(manifest["shards"]),
                      "bad_records": extra.get("bad_records", 0), "out": args.out}))


if __name__ == "__main__":
    main()
