"""Parameter accounting from the model code itself (nothing typed in by hand).

Every count comes from the shapes of an (abstract) RingMoE state, classified by
where each parameter lives in the module tree.
"""
from __future__ import annotations

import math
from collections import defaultdict

from flax import nnx

from ringmoe.model.ringmoe import ParamKeys, RingMoE
from ringmoe.model.scan import unrolled_shapes

# Module-tree names that belong to one modality.
PER_MODALITY = ("embeddings", "decoders", "power_decoders", "modal_experts")


def abstract_model(model_config) -> RingMoE:
    """The model with ShapeDtypeStructs for parameters: nothing is allocated."""
    return nnx.eval_shape(lambda: RingMoE(model_config, rngs=ParamKeys(0)))


def _leaves(model) -> list[tuple[tuple, tuple]]:
    """(path, shape) of every parameter, blocks unrolled (a scanned stage's stacked parameters
    count once per block, each with its own shape)."""
    flat = unrolled_shapes({path: var.shape for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))})
    return [(tuple(str(k) for k in path), tuple(shape)) for path, shape in flat.items()]


def component(path: tuple[str, ...]) -> str:
    """A readable row name for a parameter path (used by the table)."""
    for i, key in enumerate(path):
        if key in PER_MODALITY:
            return f"{key}/{path[i + 1]}" + ("/router" if "router" in path else "")
        if key in ("collaborative_experts", "shared_expert"):
            return key + ("/router" if "router" in path else "")
    if "ffn" in path:
        return "dense_ffn"
    if "attn" in path or "attention" in path:
        return "attention"
    if "merging" in path:
        return "patch_merging"
    return "norms_and_tokens"


def count(model, top_k: int = 1) -> dict:
    """Totals: `total`, `per_modality` (that modality's sub-model), `active_per_token`
    (per modality: parameters one token of it touches with top-k routing) and
    `components` (row -> count)."""
    leaves = [(path, math.prod(shape), shape) for path, shape in _leaves(model)]
    modalities = tuple(model.modalities)
    components: dict[str, int] = defaultdict(int)
    for path, n, _ in leaves:
        components[component(path)] += n
    total = sum(n for _, n, _ in leaves)

    def owner(path):
        for i, key in enumerate(path[:-1]):
            if key in PER_MODALITY:
                return path[i + 1]
        return None

    per_modality, active = {}, {}
    for m in modalities:
        mine = [(p, n, shape) for p, n, shape in leaves if owner(p) in (None, m)]
        per_modality[m] = sum(n for _, n, _ in mine)
        inactive = 0
        for p, n, shape in mine:
            if len(p) > 1 and p[-2] == "experts":  # stacked expert weights: leading dim = number of experts
                inactive += n * (1 - min(top_k, shape[0]) / shape[0])
        active[m] = int(per_modality[m] - inactive)
    return {"total": total, "per_modality": per_modality, "active_per_token": active,
            "components": dict(sorted(components.items()))}


def table(counts: dict) -> str:
    rows = [("component", "parameters")] + [(k, f"{v:,}") for k, v in counts["components"].items()]
    rows += [("", ""), ("TOTAL", f"{counts['total']:,}")]
    rows += [(f"sub-model {m}", f"{v:,}") for m, v in counts.get("per_modality", {}).items()]
    rows += [(f"active per token ({m})", f"{v:,}") for m, v in counts.get("active_per_token", {}).items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>16}" for a, b in rows)
