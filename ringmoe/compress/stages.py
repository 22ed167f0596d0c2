"""The model configuration after each compression stage (DESIGN.md section 2, "Compression").

    full       every modality, every expert group
    extracted  one modality: its patch embedding, decoder(s) and modal experts, plus
               the collaborative and shared experts (ref: 6.5B of 14.7B)
    pruned     the most-used fraction `keep` of the collaborative experts per layer
               (ref: 25 %, about 4.3B)
    dense      each block's remaining experts merged into one FFN of the standard
               width: a plain SwinV2 (ref: 1.06B; configs/ringmoe_1b.py at full size)

Each stage is a config transform, so its parameter count comes from the model
code built abstractly (`dry_run`), exactly as the stage's weights will be laid out.
"""
from __future__ import annotations

import copy
import math

from ml_collections import ConfigDict

from ringmoe.model.params import abstract_model, count

STAGES = ("full", "extracted", "pruned", "dense")


def check_arguments(config, modality: str, keep: float) -> None:
    """Clear errors before any work: unknown modality, keep fraction outside (0, 1]."""
    modalities = list(config.model.modalities.keys())
    if modality not in modalities:
        raise ValueError(f"unknown modality {modality!r}: the config has {', '.join(modalities)}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--keep-collaborative must be in (0, 1], got {keep}")
    if not config.model.moe.enabled:
        raise ValueError("the config is already dense (model.moe.enabled = False): nothing to compress")


def kept_experts(num_experts: int, keep: float) -> int:
    """Collaborative experts left per layer: ceil(keep x E), at least one."""
    return max(1, math.ceil(keep * num_experts - 1e-9))


def extracted_config(config, modality: str) -> ConfigDict:
    c = copy.deepcopy(config)
    c.model.modalities = ConfigDict({modality: config.model.modalities[modality]})
    c.data.modality_weights = ConfigDict({modality: 1.0})
    c.objectives.cross_modal = False   # one modality left: no other to decode from
    return c


def pruned_config(config, keep: float) -> ConfigDict:
    c = copy.deepcopy(config)
    c.model.moe.num_collaborative_experts = kept_experts(config.model.moe.num_collaborative_experts, keep)
    return c


def dense_config(config) -> ConfigDict:
    c = copy.deepcopy(config)
    c.model.moe.enabled = False
    return c


def stage_configs(config, modality: str, keep: float) -> dict[str, ConfigDict]:
    """{stage name: config}, in order from the full model to the dense one."""
    check_arguments(config, modality, keep)
    extracted = extracted_config(config, modality)
    pruned = pruned_config(extracted, keep)
    return {"full": config, "extracted": extracted, "pruned": pruned, "dense": dense_config(pruned)}


def dry_run(config, modality: str, keep: float) -> list[dict]:
    """[{"name", "params"}] of every stage, from shapes alone (nothing is allocated)."""
    return [{"name": name, "params": count(abstract_model(c.model))["total"]}
            for name, c in stage_configs(config, modality, keep).items()]
