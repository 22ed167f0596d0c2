"""Parameter table of a config, built abstractly (jax.eval_shape: nothing allocated).

    python -m tools.params --config configs/ringmoe_14b.py
    python -m tools.params --config configs/lm.py:smollm2_135m
    python -m tools.params --config configs/rsmoe_1b.py

Prints a table, then as its last line JSON with `total`, and for a RingMoE config
`active_per_token` (largest over modalities), `active_per_token_by_modality` and
`per_modality`; for a language model (a config with an `lm` section) `components`;
for an RS-MoE config (`task: rsmoe`) `encoder` (its RingMoE counts, as above), `rsmoe`
(`query_transformer`, `router`, `experts`, `per_expert`, `num_experts`, `top_k`, `total`),
`per_expert_components` (the LM's rows) and `active_per_subtask`: the RS-MoE parameters
one sub-task passes through in training (query transformer, router, its top_k experts), and with
the encoder's active parameters per token added (`active_per_subtask_with_encoder`);
`active_per_answer`: the same in generation, where each row's top expert alone writes.
"""
import json
import math

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
    if config.get("task", "pretrain") == "rsmoe":
        return print_rsmoe(config)
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


def _size(module) -> int:
    """Parameters of a module (a vmapped one's stacked leading axis included)."""
    from flax import nnx
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def rsmoe_counts(config) -> dict:
    """The counts of an RS-MoE config (`ringmoe.vlm.model.VisionLanguageModel`) from its abstract
    model: the module doc's JSON keys, and `components` (table row -> count)."""
    from flax import nnx

    from ringmoe.model.ringmoe import ParamKeys
    from ringmoe.text.llama import parameter_counts
    from ringmoe.vlm.model import VisionLanguageModel, spec_of

    model = nnx.eval_shape(lambda: VisionLanguageModel(config, rngs=ParamKeys(0)))
    encoder = count(model.encoder, top_k=config.model.moe.top_k)
    spec = spec_of(config)
    lm = parameter_counts(spec.lm)
    parts = {"query_transformer": _size(model.rsmoe.queries), "router": _size(model.rsmoe.router),
             "experts": _size(model.rsmoe.experts)}
    rsmoe_total = _size(model.rsmoe)
    if sum(parts.values()) != rsmoe_total or parts["experts"] != spec.num_experts * lm["total"]:
        raise AssertionError(f"RS-MoE parts {parts} do not add up to {rsmoe_total} / {spec.num_experts} x "
                             f"{lm['total']}")
    answer = parts["query_transformer"] + parts["router"] + lm["total"]
    active = answer + (min(spec.top_k, spec.num_experts) - 1) * lm["total"]
    encoder_active = max(encoder["active_per_token"].values())
    components = {f"encoder/{k}": n for k, n in encoder["components"].items()}
    components.update({"rsmoe/query_transformer": parts["query_transformer"], "rsmoe/router": parts["router"]})
    components.update({f"rsmoe/experts/{k} ({spec.num_experts} x)": spec.num_experts * n
                       for k, n in lm["components"].items()})
    return {
        "total": encoder["total"] + rsmoe_total,
        "encoder": {"total": encoder["total"], "active_per_token": encoder_active,
                    "active_per_token_by_modality": encoder["active_per_token"],
                    "per_modality": encoder["per_modality"]},
        "rsmoe": {**parts, "per_expert": lm["total"], "num_experts": spec.num_experts, "top_k": spec.top_k,
                  "total": rsmoe_total},
        "per_expert_components": lm["components"],
        "active_per_subtask": active,
        "active_per_subtask_with_encoder": active + encoder_active,
        "active_per_answer": answer,
        "components": components,
    }


def print_rsmoe(config) -> None:
    counts = rsmoe_counts(config)
    r = counts["rsmoe"]
    print(table({"components": counts["components"], "total": counts["total"]}))
    rows = [("encoder (frozen)", counts["encoder"]["total"]),
            ("encoder active per token (largest modality)", counts["encoder"]["active_per_token"]),
            ("RS-MoE", r["total"]), ("  query transformer", r["query_transformer"]), ("  router", r["router"]),
            (f"  experts ({r['num_experts']} x {r['per_expert']:,})", r["experts"]),
            (f"active per sub-task in training (queries, router, top_k {r['top_k']} expert)",
             counts["active_per_subtask"]),
            ("  with the encoder's active per token", counts["active_per_subtask_with_encoder"]),
            ("active per answer in generation (queries, router, top expert)", counts["active_per_answer"])]
    width = max(len(a) for a, _ in rows)
    print("\n".join(f"{a:<{width}}  {b:>16,}" for a, b in rows))
    print(json.dumps({"config": config_flags.get_config_filename(flags.FLAGS["config"]),
                      **{k: v for k, v in counts.items() if k != "components"}}))


if __name__ == "__main__":
    cli.run_absl("tools.params", main, required=("config",))
