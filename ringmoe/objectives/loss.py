"""The pretraining loss: SimMIM + physics terms per modality, cross-modal term, router losses.

    total = sum_m  sum_t w_t L_{m,t}            (per-modality terms, "{m}/{t}")
          + w_cross L_cross                    ("cross_modal", if enabled)
          + router_loss.total                  ("router/total")

Terms by modality (DESIGN.md sections 2-4; the weights are `objectives.<term>`):

| modality      | terms                              | module        |
|---------------|------------------------------------|---------------|
| every one     | simmim                             | simmim.py     |
| sar_l1        | span (the reference's), pauli      | sar.py        |
|               | (from the power decoder's output)  |               |
| sar_l2        | speckle_nll, xpol_ratio            | sar.py        |
| multispectral | sam, index                         | spectral.py   |

A term with weight 0 is neither computed nor reported. A term with weight > 0
that cannot run (Pauli without quad-pol, xpol_ratio without a cross-pol pair, an
index whose bands are missing, cross_modal with one modality) is an error naming
the modality, the term and why: set its weight to 0 to train without it.
`config.objectives` must hold exactly `OBJECTIVE_KEYS`, the keys of ringmoe/config.py
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

from collections.abc import Mapping

import difflib

import jax
import jax.numpy as jnp
import numpy as np

from ringmoe.model.moe import router_loss
from ringmoe.objectives import sar, spectral
from ringmoe.objectives.common import denormalize, loss_weights
from ringmoe.objectives.crossmodal import cross_modal_loss
from ringmoe.objectives.simmim import masked_l1

PHYSICS_TERMS = {
    "sar_l1": ("span", "pauli"),
    "sar_l2": ("speckle_nll", "xpol_ratio"),
    "multispectral": ("sam", "index"),
}


# Every key `config.objectives` holds: the names the loss reads. Their values (defaults
# included) are written once, in ringmoe/config.py `base_config()`; tests/test_objectives.py
# checks that the two lists agree.
OBJECTIVE_KEYS = frozenset((
    "cross_modal", "cross_modal_weight", "index", "index_eps", "index_tolerance_nm", "indices",
    "pauli", "pauli_looks", "power_eps", "sam", "sam_eps", "sar_l1_polarizations",
    "sar_l2_polarizations", "sar_looks", "simmim", "span", "span_looks", "speckle_max_log_ratio",
    "speckle_nll", "xpol_ratio",
))


def check_objectives(objectives_config) -> None:
    """Refuses a `config.objectives` with a key the loss does not know (a misspelt term would
    otherwise weigh 0 without a word) or without one it reads (no second default here)."""
    keys = set(objectives_config.keys())
    unknown = sorted(keys - OBJECTIVE_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(OBJECTIVE_KEYS), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"config.objectives has unknown key(s) {', '.join(hints)}; known: "
                         f"{', '.join(sorted(OBJECTIVE_KEYS))}")
    missing = sorted(OBJECTIVE_KEYS - keys)
    if missing:
        raise ValueError(f"config.objectives lacks {', '.join(map(repr, missing))}: build configs on "
                         "ringmoe/config.py base_config() (a config saved in a checkpoint gets the keys it "
                         "predates from ringmoe.model.checkpoint.config_from_json)")


def weight(objectives_config, name: str) -> float:
    """The configured weight of term `name` (every key exists: `check_objectives`)."""
    return float(objectives_config[name])


def _wavelengths(model, modality: str, inputs: Mapping):
    """Static central wavelengths (nm) of the modality's channels: the batch's 'spectra'
    override if given, else the model's configured bands."""
    if inputs.get("spectra") is not None:
        try:
            return np.asarray(inputs["spectra"][0], np.float64)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
            raise ValueError(f"{modality}: spectral indices need static band wavelengths; pass "
                             f"batch['{modality}']['spectra'] as a closed-over constant, not a traced "
                             "argument") from e
    spectra = getattr(model, "band_spectra", {}).get(modality, ())
    return np.asarray(spectra, np.float64).reshape(-1, 2)[:, 0] if len(spectra) else np.zeros((0,))


def _cannot_run(modality: str, term: str, cfg, why: str) -> ValueError:
    """The error of a term asked for (weight > 0) whose inputs the modality lacks."""
    return ValueError(f"{modality}: objectives.{term} = {weight(cfg, term)} asks for the {term} term, but {why}; "
                      f"set objectives.{term} = 0 to train without it")


def _index_bands(modality: str, wavelengths: np.ndarray, cfg) -> dict[str, tuple[int, int]]:
    """`spectral.index_bands` of every index in `objectives.indices`; an error names any index
    whose two bands the modality lacks."""
    names = tuple(cfg.indices)
    if len(wavelengths) == 0:
        raise _cannot_run(modality, "index", cfg, f"the modality has no band wavelengths (model.modalities."
                          f"{modality}.bands is empty), so none of {list(names)} can be found")
    bands = spectral.index_bands(wavelengths, names, float(cfg.index_tolerance_nm))
    lacking = [n for n in names if n not in bands]
    if lacking:
        need = "; ".join(f"{n}: {' and '.join(f'{b} {spectral.S2_WAVELENGTH_NM[b]:g} nm' for b in spectral.INDICES[n])}"
                         for n in lacking)
        raise _cannot_run(modality, "index", cfg, f"objectives.indices {list(names)} include {lacking}, whose bands "
                          f"({need}) are not all within {cfg.index_tolerance_nm:g} nm of the modality's "
                          f"{[round(float(w), 1) for w in wavelengths]} nm (drop them from objectives.indices)")
    return bands


def physics_terms(model, modality: str, output: Mapping, inputs: Mapping, weights: jax.Array,
                  objectives_config, stats: Mapping | None) -> dict[str, jax.Array]:
    """The enabled physics terms of one modality (unweighted); `output` is the model's output
    for it ('reconstruction', and 'log_power' from a power decoder). A term with weight > 0
    that the modality's channels cannot serve is an error naming it, never a silent skip."""
    cfg = objectives_config
    enabled = [t for t in PHYSICS_TERMS.get(modality, ()) if weight(cfg, t) > 0]
    if not enabled:
        return {}
    if stats is None:
        raise ValueError(f"physics terms {enabled} of {modality} need norm_stats['{modality}'] "
                         "(per-band mean/std of the manifest) to work in physical units")
    rec = denormalize(output["reconstruction"], stats)
    true = denormalize(inputs["pixels"], stats)
    channels = rec.shape[-1]
    names = stats.get("bands")
    out = {}
    if modality == "sar_l1":
        layout = sar.complex_channels(channels, cfg.sar_l1_polarizations, names)
        if "pauli" in enabled and not sar.is_quad_pol(layout):
            raise _cannot_run(modality, "pauli", cfg, f"the Pauli powers need quad-pol HH, VV and HV or VH, "
                              f"and the channels hold {sorted(layout)}")
        p_ref = sar.reference_power(stats, layout)
        eps = float(cfg.power_eps)
        predicted = output.get("log_power")
        expected = sar.power_channels(layout)
        if predicted is None or predicted.shape[-1] != expected:
            raise ValueError(f"{modality}: span/Pauli terms need a power decoder with {expected} channels "
                             f"(model.modalities.{modality}.power_head = {expected}), found "
                             f"{'none' if predicted is None else predicted.shape[-1]}")
        max_log_ratio = float(cfg.speckle_max_log_ratio)
        if "span" in enabled:
            out["span"] = sar.span_loss(predicted[..., 0], true, weights, layout, p_ref, eps,
                                        looks=float(cfg.span_looks), max_log_ratio=max_log_ratio)
        if "pauli" in enabled:
            out["pauli"] = sar.pauli_loss(predicted[..., 1:], true, weights, layout, p_ref, eps,
                                          looks=float(cfg.pauli_looks), max_log_ratio=max_log_ratio)
    elif modality == "sar_l2":
        layout = sar.detected_channels(channels, cfg.sar_l2_polarizations, names)
        if "speckle_nll" in enabled:
            out["speckle_nll"] = sar.speckle_nll_loss(rec, true, weights, float(cfg.sar_looks),
                                                      float(cfg.speckle_max_log_ratio))
        if "xpol_ratio" in enabled:
            if sar.cross_pol_pair(layout) is None:
                raise _cannot_run(modality, "xpol_ratio", cfg, f"the cross-pol ratio needs VH and VV (or HV and "
                                  f"HH), and the channels hold {list(names or cfg.sar_l2_polarizations)}")
            out["xpol_ratio"] = sar.xpol_ratio_loss(rec, true, weights, layout)
    elif modality == "multispectral":
        if "sam" in enabled:
            if channels < 2:
                raise _cannot_run(modality, "sam", cfg, f"a spectral angle needs at least 2 bands, found {channels}")
            out["sam"] = spectral.sam_loss(rec, true, weights, float(cfg.sam_eps))
        if "index" in enabled:
            bands = _index_bands(modality, _wavelengths(model, modality, inputs), cfg)
            out["index"] = spectral.index_loss(rec, true, weights, bands, float(cfg.index_eps))
    return out


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
        raw = {}
        if weight(cfg, "simmim") > 0:
            raw["simmim"] = masked_l1(out["reconstruction"], inputs["pixels"], weights)
        raw.update(physics_terms(model, m, out, inputs, weights, cfg, norm_stats.get(m)))
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
