"""Ablation grids: train every point under one budget, probe each, write a table and a plot.

    python -m tools.make_synthetic --out /tmp/syn64 --examples 256 --image-size 64 --seed 0 --labeled
    python -m tools.make_synthetic --out /tmp/probe_set --examples 1024 --image-size 64 --seed 1 --labeled
    python -m tools.ablate --grid configs/ablations/moe_vs_dense.py --workdir /tmp/abl_moe \\
        --grid.data_dir=/tmp/syn64 --grid.probe_data_dir=/tmp/probe_set [--grid.budget.total_steps=300]
    python -m tools.ablate --grid configs/ablations/physics_terms.py --workdir /tmp/abl_phys \\
        --grid.data_dir=/tmp/syn64 --grid.probe_data_dir=/tmp/probe_set

Every point runs with --grid.seeds seeds (default 3; mean and spread reported).
Writes DIR/<point>/seed-<i>/ (training runs), DIR/ablation.md and DIR/ablation.png, and
prints, last, JSON with the grid's points and their figures. Re-running skips
finished points and resumes interrupted ones; --grid.only=a,b runs those points
alone. Programs are cached in DIR/.jax_cache, so points sharing an architecture
compile it once.
"""
import json
import os
import time

import jax
from absl import flags
from ml_collections import config_flags

from pretrain import ablate
from ringmoe import cli

_GRID = config_flags.DEFINE_config_file("grid", None, "Grid file (configs/ablations/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the points' runs and the report.")


def main(argv):
    cli.no_arguments(argv)
    cli.setup_logging()
    start = time.perf_counter()
    grid = _GRID.value
    # Points share most programs (initialiser, probe encoders): compile each once.
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(_WORKDIR.value), ".jax_cache"))
    results = ablate.run(grid, _WORKDIR.value)
    title = os.path.basename(config_flags.get_config_filename(flags.FLAGS["grid"]))
    md, png = ablate.write_report(results, _WORKDIR.value, title)
    print(open(md, encoding="utf-8").read())
    print(json.dumps({"grid": title, "report": md, "plot": png, "seconds": round(time.perf_counter() - start, 1),
                      "points": [{k: r[k] for k in ("name", "seeds", "loss", "loss_sd", "probe_mean", "probe_mean_sd",
                                                    "probe_value", "probe_value_sd", "simmim", "simmim_sd")}
                                 for r in results]}))


if __name__ == "__main__":
    cli.run_absl("tools.ablate", main, required=("grid", "workdir"))
