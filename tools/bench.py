"""Benchmarks; each prints one JSON object as its last line.

    python -m tools.bench moe --config configs/base.py [--batch 8] [--stage 2] [--paths sort,tokamax]
    python -m tools.bench data --data DIR --config configs/tiny.py
    python -m tools.bench step --data DIR --config configs/tiny.py [--steps 5] [--layouts scanned]
        [--profile_dir DIR --profile_steps 3]
    python -m tools.bench compile --data DIR --config configs/tiny.py
    python -m tools.bench lm --config configs/lm.py:tiny [--batch 1] [--prompt_length 32] [--new_tokens 64]

`moe`: forward+backward of one MoE FFN layer with each dispatch path, under the
configured router and under expert choice, and of a dense FFN with the same
active FLOPs (token choice), as ratios to the dense time; with the rows each
path's experts compute against the rows the routing kept, and useful GFLOP/s; paths
whose library does not import are listed under `skipped` with the reason.
`data`: the full input pipeline against a raw ArrayRecord read of the same records.
`step`: the real train and eval steps on one batch of DIR, blocks unrolled and scanned
(`model.scan_layers`, or the `--layouts` named; `looped`: scanned with the modal experts
looped over the modalities, `model.moe.modal_experts_loop`): first-call (compile) seconds,
median step seconds, samples/s, MFU, peak device memory, and the scanned / unrolled and
looped / scanned ratios; with
`--profile_dir`, the top 10 operations of `--profile_steps` profiled steps, also written
as text to DIR/top_ops.txt.
`compile`: where the train step's compile time goes: trace, lower and XLA compile seconds
and compiled fusions of the loss, the loss with its gradients, the optimiser update and the
whole step, each compiled on its own (ringmoe/training/bench.py `compile_parts`).
`lm`: greedy decode speed of the language model (configs/lm.py, random weights) with the
key/value cache against re-running the whole sequence per token, and their ratio
(ringmoe/text/bench.py).
"""
import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from ringmoe import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)
_BATCH = flags.DEFINE_integer("batch", None, "moe: images per call (default 8); lm: prompts (default 1).")
_STAGE = flags.DEFINE_integer("stage", None, "moe: Swin stage whose layer shape to use (default: deepest).")
_ROUNDS = flags.DEFINE_integer("rounds", None, "moe, lm: timing rounds, the minimum is reported "
                                "(default moe 5, lm 3).")
_PROMPT = flags.DEFINE_integer("prompt_length", 32, "lm: tokens per prompt.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "lm: tokens generated per prompt.")
_DATA = flags.DEFINE_string("data", None, "data: directory of ArrayRecord shards + manifest.json.")
_BATCHES = flags.DEFINE_integer("batches", 50, "data: batches to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "step: train steps timed after the first (the median is reported).")
_PATHS = flags.DEFINE_list("paths", None, "moe: dispatch paths to time (default: every registered path).")
_LAYOUTS = flags.DEFINE_list("layouts", ["unrolled", "scanned"], "step: layouts to time: unrolled, scanned, "
                             "looped (ringmoe/training/bench.py LAYOUTS).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "step: profile the last layout's steps into DIR.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "step: steps under the profiler.", lower_bound=1)
MODES = ("moe", "data", "step", "compile", "lm")


def main(argv):
    if len(argv) != 2 or argv[1] not in MODES:
        raise app.UsageError(f"usage: python -m tools.bench {{{'|'.join(MODES)}}} --config configs/NAME.py [...]")
    config = _CONFIG.value
    from pretrain.validate import validate_config
    validate_config(config)
    if argv[1] == "moe":
        from ringmoe.model import bench
        result = bench.run(config.model, batch=_BATCH.value or 8, stage=_STAGE.value, rounds=_ROUNDS.value or 5,
                           paths=_PATHS.value)
        for router, paths in result["routers"].items():
            for name, r in paths.items():
                print(f"{router:>13} {name:>6}: {r['s'] * 1e3:9.2f} ms  ratio {r['ratio']:5.2f}  rows {r['rows'] or 'n/a':>7}"
                      f" (kept {r['kept_rows']:>7})  {r['useful_gflops']:7.2f} useful GFLOP/s")
        print(f"{'dense':>20}: {result['dense_s'] * 1e3:9.2f} ms  {result['dense_gflops']:7.2f} GFLOP/s")
        for name, why in result["skipped"].items():
            print(f"skipped {name}: {why}")
    elif argv[1] == "lm":
        from ringmoe.text import bench
        from ringmoe.text.llama import LMSpec
        result = {"config": config_flags.get_config_filename(flags.FLAGS["config"]), **bench.run(
            LMSpec.from_config(config.lm), batch=_BATCH.value or 1, prompt_length=_PROMPT.value,
            new_tokens=_NEW.value, rounds=_ROUNDS.value or 3, seed=config.seed)}
        print(f"cached {result['cached_tokens_per_s']:.1f} tok/s, full forward "
              f"{result['full_forward_tokens_per_s']:.1f} tok/s: speedup {result['speedup']:.1f}x, "
              f"same tokens: {result['same_tokens']}")
    elif argv[1] == "data":
        from ringmoe.data import bench
        if not _DATA.value:
            raise app.UsageError("bench data needs --data DIR")
        result = bench.run(_DATA.value, config, num_batches=_BATCHES.value)
    elif argv[1] == "compile":
        from ringmoe.training import bench
        if not _DATA.value:
            raise app.UsageError("bench compile needs --data DIR")
        config = config.copy_and_resolve_references()
        config.data_dir = _DATA.value
        result = bench.compile_parts(config)
        for name, r in result.items():
            if isinstance(r, dict):
                print(f"{name:>15}: trace {r['trace_s']:5.1f} s  lower {r['lower_s']:5.1f} s  compile "
                      f"{r['compile_s']:5.1f} s  {r['fusions']:6d} fusions")
    else:
        from ringmoe.training import bench
        if not _DATA.value:
            raise app.UsageError("bench step needs --data DIR")
        config = config.copy_and_resolve_references()
        config.data_dir = _DATA.value
        result = bench.run(config, steps=_STEPS.value, layouts=tuple(_LAYOUTS.value),
                           profile_dir=_PROFILE_DIR.value, profile_steps=_PROFILE_STEPS.value)
        for name, r in result["layouts"].items():
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            print(f"{name:>9}: train first call {r['train_first_s']:7.1f} s  eval first call "
                  f"{r['eval_first_s']:6.1f} s  step {r['step_s']:7.3f} s  {r['samples_per_s']:8.1f} samples/s"
                  f"  MFU {mfu}")
            if "profile" in r:
                from ringmoe.training import profile
                text = profile.as_text(r["profile"], f"{name} layout, {_PROFILE_STEPS.value} steps")
                with open(f"{_PROFILE_DIR.value}/top_ops.txt", "w") as f:
                    f.write(text)
                print(text, end="")
        for a, b in bench.RATIOS:
            if f"{a}_over_{b}" in result:
                print(f"{a} / {b}: " + "  ".join(f"{k} {v:.2f}" for k, v in result[f"{a}_over_{b}"].items()))
    result.setdefault("jax_version", jax.__version__)
    result.setdefault("device_kind", jax.devices()[0].device_kind)
    result["command"] = " ".join(["python -m tools.bench"] + sys.argv[1:])
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run_absl("tools.bench", main, required=("config",))
