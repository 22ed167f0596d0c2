"""The pretraining loss: SimMIM + physics terms per modality, cross-modal term, router losses.

    total = sum_m  sum_t w_t L_{m,t}            (per-modality terms, "{m}/{t}")
          + w_cross L_cross                    ("cross_modal", if enabled)
          + router_loss.total                  ("router/total")

Per-modality terms are registered by name (`registry.py`; the built-in ones, SimMIM
for every modality and the SAR and spectral physics terms, in `terms.py`, DESIGN.md
sections 2-4); the weights are `objectives.<term>`.

A term with weight 0 is neither computed nor reported. A term with weight > 0
that cannot run (Pauli without quad-pol, xpol_ratio without a cross-pol pair, an
index whose bands are missing, cross_modal with one modality) is an error naming
the modality, the term and why: set its weight to 0 to train without it.
`config.objectives` must hold exactly `objective_keys()`, the keys of ringmoe/config.py
base_config() (`check_objectives`): a misspelt key is an error, and the loss has no defaults
of its own. Physics terms see physical units: reconstruction and
target are de-normalised with `norm_stats[m]` (common.py). Every term averages
over the pixels that are masked and hold data (`common.loss_weights`): a no-data
pixel has no target, and the encoder sees 0 (the band mean) there.

Router losses (`moe.router_loss`): load_balance_weight (1e-3, ref) times the modal
Switch loss averaged over modalities plus the same weight times the collaborative
one, z-loss likewise, all averaged over layers. The collaborative router's
statistics are kept per modality; its loss is their mean weighted by each
modality's images, which is the reference's loss over the whole mixed batch
(routing groups are images). Logged as
"router/{modal,collaborative}_{load_balance,z_loss}" (unweighted, for the groups
the model has) and "router/total" (weighted; 0 for a dense model).

`terms` holds each term's unweighted value (for logging); "{m}/total",
"router/total" and the returned total are weighted sums.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from ringmoe.model.moe import router_loss
from ringmoe.objectives import registry
from ringmoe.objectives.common import loss_weights
from ringmoe.objectives.crossmodal import cross_modal_loss

CROSS_MODAL_KEYS = ("cross_modal", "cross_modal_weight")   # the one term across modalities


def objective_keys() -> frozenset[str]:
    """Every key `config.objectives` holds: each registered term's weight and settings, and
    the cross-modal term's. Their values (defaults included) are written once, in
    ringmoe/config.py `base_config()`; tests/test_objectives.py checks that the two agree."""
    keys = set(CROSS_MODAL_KEYS)
    for o in registry.registered().values():
        keys.add(o.name)
        keys.update(o.settings)
    return frozenset(keys)


def check_objectives(objectives_config) -> None:
    """Refuses a `config.objectives` with a key the loss does not know (a misspelt term would
    otherwise weigh 0 without a word) or without one it reads (no second default here)."""
    known = objective_keys()
    keys = set(objectives_config.keys())
    unknown = sorted(keys - known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"config.objectives has unknown key(s) {', '.join(hints)}; known: "
                         f"{', '.join(sorted(known))}")
    missing = sorted(known - keys)
    if missing:
        raise ValueError(f"config.objectives lacks {', '.join(map(repr, missing))}: build configs on "
                         "ringmoe/config.py base_config() (a config saved in a checkpoint gets the keys it "
                         "predates from ringmoe.model.checkpoint.config_from_json)")


def weight(objectives_config, name: str) -> float:
    """The configured weight of term `name` (every key exists: `check_objectives`)."""
    return float(objectives_config[name])


def modality_terms(model, modality: str, output: Mapping, inputs: Mapping, weights: jax.Array,
                   objectives_config, stats: Mapping | None) -> dict[str, jax.Array]:
    """The enabled terms of one modality (unweighted), in registration order; `output` is the
    model's output for it ('reconstruction', and 'log_power' from a power decoder). A term
    with weight > 0 that the modality's channels cannot serve is an error naming it, never
    a silent skip."""
    enabled = [o for o in registry.objectives_of(modality) if weight(objectives_config, o.name) > 0]
    physical = [o.name for o in enabled if o.physical]
    if physical and stats is None:
        raise ValueError(f"physics terms {physical} of {modality} need norm_stats['{modality}'] "
                         "(per-band mean/std of the manifest) to work in physical units")
    term = registry.TermInputs(model, modality, output, inputs, weights, objectives_config, stats)
    return {o.name: o.fn(term) for o in enabled}


def pretraining_loss(model, outputs: Mapping, batch: Mapping, objectives_config, moe_config,
                     norm_stats: Mapping | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, {term name: scalar}) of one step.

    model: the RingMoE (patch_size, decoders, band_spectra); outputs = model(inputs)
    with inputs[m] = {'pixels', 'mask'[, 'valid']}; batch[m]: 'pixels' (normalised), 'mask'
    (B, h, w) True = masked, optional 'valid' (B, H, W) pixel holds data (every term
    ignores the others), 'record_index' (for the cross-modal term);
    objectives_config: `config.objectives`; moe_config: `config.model.moe`;
    norm_stats[m] = {'mean': (C,), 'std': (C,)[, 'bands': names]} for modalities
    with physics terms. Jit-compatible: everything static is decided in Python.
    """
    cfg = objectives_config
    check_objectives(cfg)
    norm_stats = norm_stats or {}
    patch_size = model.patch_size
    terms: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    for m, out in outputs.items():
        inputs = batch[m]
        weights = loss_weights(inputs, patch_size)   # masked and holding data
        raw = modality_terms(model, m, out, inputs, weights, cfg, norm_stats.get(m))
        modality_total = jnp.zeros((), jnp.float32)
        for name, value in raw.items():
            terms[f"{m}/{name}"] = value
            modality_total = modality_total + weight(cfg, name) * value
        terms[f"{m}/total"] = modality_total
        total = total + modality_total

    if cfg.cross_modal and weight(cfg, "cross_modal_weight") > 0:
        if len(outputs) < 2:
            raise ValueError(f"objectives.cross_modal is on (weight {weight(cfg, 'cross_modal_weight')}) but the "
                             f"batch has one modality ({', '.join(outputs) or 'none'}): there is no other modality "
                             "to decode from; set objectives.cross_modal = False")
        terms["cross_modal"] = cross_modal_loss(model, outputs, batch, patch_size)
        total = total + weight(cfg, "cross_modal_weight") * terms["cross_modal"]

    if outputs:
        router = router_loss({m: out["encoded"].router_stats for m, out in outputs.items()}, moe_config,
                             images={m: batch[m]["pixels"].shape[0] for m in outputs})
        terms.update({f"router/{key}": value for key, value in router.items()})
        total = total + terms["router/total"]
    return total, terms
