"""What every ablation grid shares: the base config, data sets, budget and probe."""
from ml_collections import ConfigDict


def grid(points) -> ConfigDict:
    """A grid of `points` ((name, {dotted config key: value}), ...) over configs/tiny.py.

    Everything else is overridable on the command line (--grid.KEY=VALUE); see
    pretrain/ablate.py for the meaning of each key.
    """
    return ConfigDict({
        "base": "configs/tiny.py",
        "data_dir": "",
        "probe_data_dir": "",
        "budget": {"total_steps": 100, "log_every": 10, "checkpoint_every": 1000, "eval_every": 0},
        "probe": "linear",
        "seeds": 3,                    # runs per point: figures are mean +- sd over them
        "only": "",
        "points": tuple(points),
    })
