"""Sparse upcycling: turn a dense SwinV2 / RingMoE checkpoint into step 0 of an MoE training run.

    python -m tools.upcycle --from /tmp/dense_run --config configs/tiny.py --out /tmp/upcycled \\
        --config.data_dir=/tmp/syn64 [--router-init random|kmeans|uniform] [--noise 0.0] \\
        [--reinit-fraction 0.0]
    python -m pretrain.train --config configs/tiny.py --workdir /tmp/upcycled --config.data_dir=/tmp/syn64
    python -m tools.upcycle --from configs/ringmoe_1b.py --config configs/ringmoe_14b.py --dry-run

--from: a training run, its checkpoints/ or a saved model (a compression stage, or a public
SwinV2 brought in by `tools.import_swinv2`); for --dry-run also a config file. Every
parameter of the --config model is copied (attention, norms, merging, the patch
embeddings and decoders the source has), made from the dense FFN (each modal and
collaborative expert a copy; the shared expert the FFN itself; output layers scaled so
that the MoE starts as the dense model, ringmoe/upcycle/build.py), or fresh (every
router, and the parts of modalities the source lacks, which the tool names). The step-0
checkpoint holds a fresh optimiser and the --config (with these settings in its
`upcycle` section): resume it with `pretrain.train` and the same --config. The MoE's
modalities are --config's (a flag changing them would write a run that config cannot resume).

--config.data_dir (the data the run will train on) gives the k-means routers their
calibration images and measures the step-0 distance of the MoE's features from the
dense model's. --dry-run lays everything out from shapes on an abstract mesh of
--topology's devices: parameter counts by source, the fresh parts and per-device bytes;
nothing is allocated. The LAST stdout line is JSON.
"""
import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from ringmoe import cli

_FROM = flags.DEFINE_string("from", None, "The dense model: a training run, a saved model or (--dry-run) a config file.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "The MoE config the run trains (configs/NAME.py).")
_OUT = flags.DEFINE_string("out", None, "The new run's workdir (must hold no checkpoints).")
_ROUTER = flags.DEFINE_enum("router-init", None, ["random", "kmeans", "uniform"],
                            "How the routers start (default config.upcycle.router_init; ringmoe/upcycle/routers.py).")
_NOISE = flags.DEFINE_float("noise", None, "Noise on each expert copy, std relative to the weight's "
                            "(default config.upcycle.noise).")
_REINIT = flags.DEFINE_float("reinit-fraction", None, "Drop-Upcycling: share of each expert's hidden units "
                             "re-drawn (default config.upcycle.reinit_fraction).")
_DRY = flags.DEFINE_boolean("dry-run", False, "Only the plan and per-device bytes, from shapes.")
_TOPOLOGY = flags.DEFINE_string("topology", "h100-64", "--dry-run: the machine whose devices the mesh spans "
                                "(ringmoe/topology.py).")


def _config():
    config = _CONFIG.value
    for flag, key in ((_ROUTER, "router_init"), (_NOISE, "noise"), (_REINIT, "reinit_fraction")):
        if flag.value is not None:
            config.upcycle[key] = flag.value
    from pretrain.validate import validate_config
    validate_config(config)
    return config


def _source_config(path: str):
    if path.endswith(".py"):
        from pretrain.ablate import load_config_file
        return load_config_file(path)
    from ringmoe.model.checkpoint import config_from_json, read_meta
    return config_from_json(read_meta(path)[1]["config"])


def _dry_run(config) -> dict:
    from jax.sharding import AbstractMesh

    from ringmoe import topology
    from ringmoe.sharding import MESH_AXES, mesh_shape
    from ringmoe.upcycle.build import dry_run
    from ringmoe.upcycle.routers import router_init
    target = topology.get(_TOPOLOGY.value)
    sizes = mesh_shape(config.mesh, target.devices)
    mesh = AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)
    report = dry_run(_source_config(_FROM.value), config, mesh, router_init(config.upcycle.router_init).kernel_fn({}))
    report["topology"] = target.name
    report["fits"] = report["per_device_bytes"]["peak_estimate"] <= target.memory_bytes
    rows = [("source (dense) parameters", report["source_params"]), ("target (MoE) parameters", report["target_params"])]
    rows += [(f"  {kind}", n) for kind, n in report["by_kind"].items()]
    for label, n in rows:
        print(f"{label:<28} {n:>18,}")
    print(f"fresh parts: {', '.join(report['fresh_parts']) or 'none'}")
    print(f"unused source parameters: {len(report['unused_source'])}")
    print(f"mesh {report['mesh']} on {target.describe()}")
    for label, n in report["per_device_bytes"].items():
        print(f"  per device {label:<18} {n / 1e9:10.2f} GB")
    return report


def main(argv):
    cli.no_arguments(argv)
    cli.setup_logging(absl_level=logging.ERROR)   # Orbax notes that it opened a directory read-only
    config = _config()
    if _DRY.value:
        print(json.dumps({"dry_run": _dry_run(config)}))
        return
    if not _OUT.value:
        raise app.UsageError("--out is required (or --dry-run)")
    if _FROM.value.endswith(".py"):
        raise app.UsageError(f"--from {_FROM.value}: a real upcycling needs a checkpoint directory "
                             "(a config file only serves --dry-run)")
    if not os.path.isdir(_FROM.value):
        raise app.UsageError(f"--from {_FROM.value}: no such checkpoint directory")
    from ringmoe.upcycle.run import upcycle
    report = upcycle(_FROM.value, config, _OUT.value)
    for kind, n in report["params"].items():
        print(f"{kind:<8} {n:>14,}")
    print(f"fresh parts: {', '.join(report['fresh_parts']) or 'none'}")
    for m, d in report["step0_feature_distance"].items():
        print(f"step-0 feature distance from the dense model, {m}: {d:.2e}")
    print(f"wrote {report['checkpoint']} (step 0): python -m pretrain.train --config <the same config> "
          f"--workdir {_OUT.value}")
    print(json.dumps(report))


if __name__ == "__main__":
    cli.run_absl("tools.upcycle", main, required=("from", "config"))
