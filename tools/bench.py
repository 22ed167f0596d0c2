"""Benchmarks; each prints one JSON object as its last line.

    python -m tools.bench moe --config configs/base.py [--batch 8] [--stage 2]
    python -m tools.bench data --data DIR --config configs/tiny.py

`moe`: forward+backward of one MoE FFN layer with each dispatch path, under the
configured router and under expert choice, and of a dense FFN with the same
active FLOPs (token choice), as ratios to the dense time; with the rows each
path's experts compute against the rows the routing kept, and useful GFLOP/s.
`data`: the full input pipeline against a raw ArrayRecord read of the same records.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from ringmoe import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", 8, "moe: images per call.")
_STAGE = flags.DEFINE_integer("stage", None, "moe: Swin stage whose layer shape to use (default: deepest).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "moe: timing rounds (the minimum is reported).")
_DATA = flags.DEFINE_string("data", None, "data: directory of ArrayRecord shards + manifest.json.")
_BATCHES = flags.DEFINE_integer("batches", 50, "data: batches to time.")


def main(argv):
    if len(argv) != 2 or argv[1] not in ("moe", "data"):
        raise app.UsageError("usage: python -m tools.bench {moe|data} --config configs/NAME.py [...]")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    from pretrain.validate import validate_config
    validate_config(config)
    if argv[1] == "moe":
        from ringmoe.model import bench
        result = bench.run(config.model, batch=_BATCH.value, stage=_STAGE.value, rounds=_ROUNDS.value)
        for router, paths in result["routers"].items():
            for name, r in paths.items():
                print(f"{router:>13} {name:>6}: {r['s'] * 1e3:9.2f} ms  ratio {r['ratio']:5.2f}  rows {r['rows']:>7}"
                      f" (kept {r['kept_rows']:>7})  {r['useful_gflops']:7.2f} useful GFLOP/s")
        print(f"{'dense':>20}: {result['dense_s'] * 1e3:9.2f} ms  {result['dense_gflops']:7.2f} GFLOP/s")
    else:
        from ringmoe.data import bench
        if not _DATA.value:
            raise app.UsageError("bench data needs --data DIR")
        result = bench.run(_DATA.value, config, num_batches=_BATCHES.value)
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run_absl("tools.bench", main)
