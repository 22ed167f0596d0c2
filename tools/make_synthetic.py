"""Writes a synthetic, physically grounded multi-modal data set (ringmoe/data/synthetic.py).

    python -m tools.make_synthetic --out /tmp/synth --examples 512 --image-size 64 --seed 0 \
        [--paired-fraction 0.5] [--labeled] [--shard-size 1024] [--looks 4.4] [--hardness]

Paired records carry optical, multispectral, sar_l2 and sar_l1; unpaired ones a
single modality. The last stdout line is a JSON summary (records, paired/unpaired
counts, shards, seconds; with --hardness the linear-probe figures of
ringmoe/data/hardness.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from ringmoe import cli


@cli.command("tools.make_synthetic")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="empty output directory")
    p.add_argument("--examples", type=int, required=True, help="number of records")
    p.add_argument("--image-size", type=int, default=64, help="record height = width in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paired-fraction", type=float, default=1.0,
                   help="share of records holding all four modalities (the rest hold one)")
    p.add_argument("--labeled", action="store_true", help="store label maps and scene labels")
    p.add_argument("--shard-size", type=int, default=1024, help="records per ArrayRecord shard")
    p.add_argument("--looks", type=float, default=None, help="SAR-L2 speckle looks (default 4.4)")
    p.add_argument("--hardness", action="store_true", help="also report linear-probe accuracy (needs --labeled)")
    a = p.parse_args(argv)
    if a.examples < 1 or a.image_size < 8 or not 0.0 <= a.paired_fraction <= 1.0:
        p.error("need --examples >= 1, --image-size >= 8 and --paired-fraction in [0, 1]")
    if a.hardness and not a.labeled:
        p.error("--hardness needs --labeled")

    from ringmoe.data import synthetic
    kwargs = {"paired_fraction": a.paired_fraction, "labeled": a.labeled}
    if a.looks is not None:
        kwargs["looks"] = a.looks
    start = time.time()
    manifest = synthetic.write(a.out, a.examples, a.image_size, a.seed, shard_size=a.shard_size, **kwargs)
    summary = {"out": a.out, "records": manifest["records"], "paired_records": manifest["paired_records"],
               "single_modality_records": manifest["single_modality_records"],
               "modality_records": {m: v["records"] for m, v in manifest["modalities"].items()},
               "shards": len(manifest["shards"]), "image_size": a.image_size, "seed": a.seed,
               "labeled": a.labeled, "seconds": round(time.time() - start, 2)}
    if a.hardness:
        from ringmoe.data import hardness
        summary["hardness"] = hardness.label_hardness(a.out)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
