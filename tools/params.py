"""Parameter table of a config, built abstractly (jax.eval_shape: nothing allocated).

    python -m tools.params --config configs/ringmoe_14b.py
    python -m tools.params --config configs/lm.py:smollm2_135m

Prints a table, then as its last line JSON with `total`, and for a RingMoE config
`active_per_token` (largest over modalities), `active_per_token_by_modality` and
`per_modality`; for a language model (a config with an `lm` section) `components`.
"""
import json

from absl import flags
from ml_collections import config_flags

from ringmoe import cli
from ringmoe.model.params import abstract_model, count, table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).", lock_config=True)


def main(argv):
    cli.no_arguments(argv)
    config = _CONFIG.value
    if "lm" in config:
        return language_model(config)
    counts = count(abstract_model(config.model), top_k=config.model.moe.top_k)
    print(table(counts))
    print(json.dumps({
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "total": counts["total"],
        "active_per_token": max(counts["active_per_token"].values()),
        "active_per_token_by_modality": counts["active_per_token"],
        "per_modality": counts["per_modality"],
    }))


def language_model(config) -> None:
    from ringmoe.text.llama import LMSpec, parameter_counts
    counts = parameter_counts(LMSpec.from_config(config.lm))
    print(table(counts))
    print(json.dumps({"config": config_flags.get_config_filename(flags.FLAGS["config"]), "total": counts["total"],
                      "components": counts["components"]}))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    cli.run_absl("tools.params", main)
