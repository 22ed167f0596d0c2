"""The ranges of a run's config values, checked before any work (`validate_config`).

A bad value found deep inside a run costs minutes and reads as an unrelated failure
(`--config.batch_size=0` crashed in the batch packer; `--config.total_steps=-1`
evaluated, then exited 0 having trained nothing). `validate_config` checks every
numeric setting of ringmoe/config.py against `RULES` (one rule per key) and the
settings that span keys against `CHECKS`, and raises one `ConfigError` naming
each offending key and value, e.g.

    config.total_steps = -1: must be a positive integer

A key the config lacks is not checked here (the code that reads it says so).
Names, enums and shapes (dispatch, router, remat, modalities, mesh) are checked where
they are used, with their own messages. The trainer calls this first
(`pretrain.train.train`), as do tools.bench and tools.aot.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

from ringmoe.cli import ConfigError
from ringmoe.data.schema import MODALITIES

_MISSING = object()


class Rule(NamedTuple):
    what: str                      # completes 'config.KEY = VALUE: must ...'
    ok: Callable[[Any], bool]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE_INT = Rule("must be a positive integer", lambda v: _int(v) and v > 0)
COUNT = Rule("must be an integer >= 0", lambda v: _int(v) and v >= 0)
POSITIVE = Rule("must be a finite number > 0", lambda v: _number(v) and v > 0)
NON_NEGATIVE = Rule("must be a finite number >= 0", lambda v: _number(v) and v >= 0)
PROBABILITY = Rule("must be in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
OPEN_FRACTION = Rule("must be in (0, 1)", lambda v: _number(v) and 0 < v < 1)
KEPT_FRACTION = Rule("must be in (0, 1]", lambda v: _number(v) and 0 < v <= 1)
MOMENTUM = Rule("must be in [0, 1)", lambda v: _number(v) and 0 <= v < 1)
POSITIVE_INTS = Rule("must be a non-empty sequence of positive integers",
                     lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(POSITIVE_INT.ok(x) for x in v))
FRACTION_RANGE = Rule("must be (low, high) with 0 < low <= high <= 1",
                      lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(x) for x in v)
                      and 0 < v[0] <= v[1] <= 1)
POSITIVE_RANGE = Rule("must be (low, high) with 0 < low <= high",
                      lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_number(x) for x in v)
                      and 0 < v[0] <= v[1])

# Dotted key -> its rule. Every numeric setting of ringmoe/config.py.
RULES: dict[str, Rule] = {
    # training
    "total_steps": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "grad_accum_steps": POSITIVE_INT,
    "log_every": POSITIVE_INT,
    "checkpoint_every": POSITIVE_INT,
    "keep_checkpoints": POSITIVE_INT,
    "image_every": COUNT,
    "eval_every": COUNT,
    "eval_batches": POSITIVE_INT,
    "max_nonfinite_steps": POSITIVE_INT,
    "collective_timeout_s": POSITIVE,
    "optimizer.lr": NON_NEGATIVE,
    "optimizer.init_lr": NON_NEGATIVE,
    "optimizer.end_lr": NON_NEGATIVE,
    "optimizer.warmup_steps": COUNT,
    "optimizer.b1": MOMENTUM,
    "optimizer.b2": MOMENTUM,
    "optimizer.eps": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.grad_clip": POSITIVE,
    # model
    "model.image_size": POSITIVE_INT,
    "model.patch_size": POSITIVE_INT,
    "model.window_size": POSITIVE_INT,
    "model.embed_dim": POSITIVE_INT,
    "model.depths": POSITIVE_INTS,
    "model.num_heads": POSITIVE_INTS,
    "model.mlp_ratio": POSITIVE,
    "model.moe.num_modal_experts": COUNT,
    "model.moe.num_collaborative_experts": COUNT,
    "model.moe.top_k": POSITIVE_INT,
    "model.moe.capacity_factor": POSITIVE,
    "model.moe.load_balance_weight": NON_NEGATIVE,
    "model.moe.z_loss_weight": NON_NEGATIVE,
    # data
    "data.crop_scale": FRACTION_RANGE,
    "data.crop_ratio": POSITIVE_RANGE,
    "data.mask_block_size": POSITIVE_INT,
    "data.mask_ratio": PROBABILITY,
    "data.num_epochs": COUNT,
    "data.num_workers": COUNT,
    "data.prefetch": COUNT,
    "data.read_threads": POSITIVE_INT,
    "data.max_bad_records": COUNT,
    # objectives: weights (0 = off), then the constants inside the terms
    **{f"objectives.{k}": NON_NEGATIVE for k in ("simmim", "span", "pauli", "speckle_nll", "xpol_ratio", "sam",
                                                 "index", "cross_modal_weight", "index_tolerance_nm")},
    **{f"objectives.{k}": POSITIVE for k in ("sar_looks", "span_looks", "pauli_looks", "power_eps", "sam_eps",
                                             "index_eps", "speckle_max_log_ratio")},
    # later tools (evaluation, compression) read these from the run's saved config
    "probe.knn_k": POSITIVE_INT,
    "probe.linear_lbfgs_steps": POSITIVE_INT,
    "probe.linear_epochs": POSITIVE_INT,
    "probe.linear_lr": NON_NEGATIVE,
    "probe.linear_weight_decay": NON_NEGATIVE,
    "probe.segmentation_stage": COUNT,
    "probe.segmentation_epochs": POSITIVE_INT,
    "probe.segmentation_lr": NON_NEGATIVE,
    "probe.segmentation_weight_decay": NON_NEGATIVE,
    "probe.test_fraction": OPEN_FRACTION,
    "compress.calibration_images": POSITIVE_INT,
    "compress.keep_collaborative": KEPT_FRACTION,
    "compress.distill_steps": COUNT,
    "compress.distill_lr": NON_NEGATIVE,
    "compress.distill_warmup_steps": COUNT,
    "compress.feature_weight": NON_NEGATIVE,
    "compress.reconstruction_weight": NON_NEGATIVE,
    "upcycle.noise": NON_NEGATIVE,
    "upcycle.reinit_fraction": PROBABILITY,
    "upcycle.calibration_images": POSITIVE_INT,
    "upcycle.kmeans_tokens": POSITIVE_INT,
    "upcycle.kmeans_iterations": POSITIVE_INT,
    # RS-MoE (task rsmoe)
    **{f"vlm.{k}": POSITIVE_INT for k in ("num_experts", "top_k", "num_queries", "query_layers", "query_heads",
                                         "prompt_length", "subtasks_per_image", "instruction_length",
                                         "answer_length")},
    "vlm.capacity_factor": POSITIVE,
    "vlm.load_balance_weight": NON_NEGATIVE,
    "vlm.z_loss_weight": NON_NEGATIVE,
}


def lookup(config, key: str):
    """config[a][b] for key 'a.b', or _MISSING."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def _modality_weights(config) -> list[str]:
    """No weight negative or unknown; at least one modality of the model served (weight > 0,
    a modality without an entry weighs 1)."""
    weights = lookup(config, "data.modality_weights")
    modalities = lookup(config, "model.modalities")
    if weights is _MISSING or modalities is _MISSING:
        return []
    problems = []
    for name, w in weights.items():
        key = f"config.data.modality_weights.{name} = {w!r}"
        if name not in MODALITIES:
            problems.append(f"{key}: not a modality ({', '.join(MODALITIES)})")
        elif not NON_NEGATIVE.ok(w):
            problems.append(f"{key}: {NON_NEGATIVE.what}")
    served = [m for m in modalities.keys() if weights.get(m, 1.0) > 0] if not problems else ["-"]
    if not served:
        problems.append(f"config.data.modality_weights = {dict(weights)}: no modality of the model "
                        f"({', '.join(modalities.keys())}) has a positive weight, so nothing can fill the batch")
    return problems


def _stage_lists(config) -> list[str]:
    """model.depths and model.num_heads: one entry per stage."""
    depths, heads = lookup(config, "model.depths"), lookup(config, "model.num_heads")
    if _MISSING in (depths, heads) or not (POSITIVE_INTS.ok(depths) and POSITIVE_INTS.ok(heads)):
        return []
    if len(depths) != len(heads):
        return [f"config.model.num_heads = {tuple(heads)}: must have one entry per stage of "
                f"config.model.depths = {tuple(depths)}"]
    return []


def _task(config) -> list[str]:
    """config.task names a registered task; RS-MoE's top_k is at most its expert count."""
    from ringmoe.training.tasks import TASKS
    task = lookup(config, "task")
    if task is not _MISSING and task not in TASKS:
        return [f"config.task = {task!r}: must be one of {', '.join(TASKS)}"]
    k, experts = lookup(config, "vlm.top_k"), lookup(config, "vlm.num_experts")
    found = []
    if task == "rsmoe" and POSITIVE_INT.ok(k) and POSITIVE_INT.ok(experts) and k > experts:
        found.append(f"config.vlm.top_k = {k}: must be at most config.vlm.num_experts = {experts}")
    stages, depths = lookup(config, "vlm.vision_stages"), lookup(config, "model.depths")
    if task == "rsmoe" and stages is not _MISSING and POSITIVE_INTS.ok(depths) and not (
            isinstance(stages, (tuple, list)) and stages and all(_int(s) and -len(depths) <= s < len(depths)
                                                                  for s in stages)):
        found.append(f"config.vlm.vision_stages = {stages!r}: must be a non-empty sequence of encoder stage "
                     f"indices in [-{len(depths)}, {len(depths)})")
    return found


CHECKS: tuple[Callable[[Any], list[str]], ...] = (_modality_weights, _stage_lists, _task)


def problems(config) -> list[str]:
    """Every 'config.KEY = VALUE: must ...' the config breaks (RULES, then CHECKS)."""
    found = []
    for key, rule in RULES.items():
        value = lookup(config, key)
        if value is not _MISSING and not rule.ok(value):
            found.append(f"config.{key} = {value!r}: {rule.what}")
    for check in CHECKS:
        found += check(config)
    return found


def validate_config(config) -> None:
    """ConfigError naming every out-of-range value (module doc); returns None if all are fine."""
    found = problems(config)
    if found:
        raise ConfigError("; ".join(found))
