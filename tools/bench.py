"""Benchmarks; each prints one JSON object as its last line.

    python -m tools.bench moe --config configs/base.py [--batch 8] [--stage 2]
    python -m tools.bench data --data DIR --config configs/tiny.py

`moe`: forward+backward of one MoE FFN layer with each dispatch path and of a
dense FFN with the same active FLOPs, as ratios to the dense time.
`data`: the full input pipeline against a raw ArrayRecord read of the same records.
"""
import json

from absl import app, flags
from ml_collections import config_flags

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
    if argv[1] == "moe":
        from ringmoe.model import bench
        result = bench.run(config.model, batch=_BATCH.value, stage=_STAGE.value, rounds=_ROUNDS.value)
        for name, r in result["paths"].items():
            print(f"{name:>8}: {r['s'] * 1e3:9.2f} ms  ratio {r['ratio']:.2f}")
        print(f"{'dense':>8}: {result['dense_s'] * 1e3:9.2f} ms")
    else:
        from ringmoe.data import bench
        if not _DATA.value:
            raise app.UsageError("bench data needs --data DIR")
        result = bench.run(_DATA.value, config, num_batches=_BATCHES.value)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
