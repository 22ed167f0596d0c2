"""The built-in per-modality objectives, one registered function each (`registry.py`).

| modality      | terms                              | math in       |
|---------------|------------------------------------|---------------|
| every one     | simmim                             | simmim.py     |
| sar_l1        | span (the reference's), pauli      | sar.py        |
|               | (from the power decoder's output)  |               |
| sar_l2        | speckle_nll, xpol_ratio            | sar.py        |
| multispectral | sam, index                         | spectral.py   |

Each function turns `TermInputs` into the arguments of its math and refuses, by
`TermInputs.cannot_run`, a modality whose channels cannot serve it.
"""
from __future__ import annotations

import jax
import numpy as np

from ringmoe.objectives import sar, spectral
from ringmoe.objectives.registry import TermInputs, objective
from ringmoe.objectives.simmim import masked_l1

SAR_L1 = ("power_eps", "speckle_max_log_ratio", "sar_l1_polarizations")


@objective("simmim", physical=False)
def simmim(term: TermInputs) -> jax.Array:
    return masked_l1(term.output["reconstruction"], term.inputs["pixels"], term.weights)


def _sar_l1(term: TermInputs):
    """(channel layout, reference power, predicted log powers) of a SAR-L1 modality. Pauli's
    quad-pol need is checked first: the power decoder's width depends on it."""
    def compute():
        layout = sar.complex_channels(term.channels, term.cfg.sar_l1_polarizations, term.band_names)
        if float(term.cfg.pauli) > 0 and not sar.is_quad_pol(layout):
            raise term.cannot_run("pauli", f"the Pauli powers need quad-pol HH, VV and HV or VH, "
                                  f"and the channels hold {sorted(layout)}")
        predicted, expected = term.output.get("log_power"), sar.power_channels(layout)
        if predicted is None or predicted.shape[-1] != expected:
            raise ValueError(f"{term.modality}: span/Pauli terms need a power decoder with {expected} channels "
                             f"(model.modalities.{term.modality}.power_head = {expected}), found "
                             f"{'none' if predicted is None else predicted.shape[-1]}")
        return layout, sar.reference_power(term.stats, layout), predicted
    return term.memo("sar_l1", compute)


@objective("span", "sar_l1", settings=("span_looks",) + SAR_L1)
def span(term: TermInputs) -> jax.Array:
    layout, p_ref, predicted = _sar_l1(term)
    return sar.span_loss(predicted[..., 0], term.target, term.weights, layout, p_ref, term.setting("power_eps"),
                         looks=term.setting("span_looks"), max_log_ratio=term.setting("speckle_max_log_ratio"))


@objective("pauli", "sar_l1", settings=("pauli_looks",) + SAR_L1)
def pauli(term: TermInputs) -> jax.Array:
    layout, p_ref, predicted = _sar_l1(term)
    return sar.pauli_loss(predicted[..., 1:], term.target, term.weights, layout, p_ref, term.setting("power_eps"),
                          looks=term.setting("pauli_looks"), max_log_ratio=term.setting("speckle_max_log_ratio"))


def _sar_l2_layout(term: TermInputs):
    return term.memo("sar_l2", lambda: sar.detected_channels(term.channels, term.cfg.sar_l2_polarizations,
                                                             term.band_names))


@objective("speckle_nll", "sar_l2", settings=("sar_looks", "speckle_max_log_ratio", "sar_l2_polarizations"))
def speckle_nll(term: TermInputs) -> jax.Array:
    _sar_l2_layout(term)   # the channels must be the configured polarisations' dB powers
    return sar.speckle_nll_loss(term.reconstruction, term.target, term.weights, term.setting("sar_looks"),
                                term.setting("speckle_max_log_ratio"))


@objective("xpol_ratio", "sar_l2", settings=("sar_l2_polarizations",))
def xpol_ratio(term: TermInputs) -> jax.Array:
    layout = _sar_l2_layout(term)
    if sar.cross_pol_pair(layout) is None:
        raise term.cannot_run("xpol_ratio", f"the cross-pol ratio needs VH and VV (or HV and HH), and the "
                              f"channels hold {list(term.band_names or term.cfg.sar_l2_polarizations)}")
    return sar.xpol_ratio_loss(term.reconstruction, term.target, term.weights, layout)


@objective("sam", "multispectral", settings=("sam_eps",))
def sam(term: TermInputs) -> jax.Array:
    if term.channels < 2:
        raise term.cannot_run("sam", f"a spectral angle needs at least 2 bands, found {term.channels}")
    return spectral.sam_loss(term.reconstruction, term.target, term.weights, term.setting("sam_eps"))


@objective("index", "multispectral", settings=("index_eps", "indices", "index_tolerance_nm"))
def index(term: TermInputs) -> jax.Array:
    bands = _index_bands(term, _wavelengths(term))
    return spectral.index_loss(term.reconstruction, term.target, term.weights, bands, term.setting("index_eps"))


def _wavelengths(term: TermInputs) -> np.ndarray:
    """Static central wavelengths (nm) of the modality's channels: the batch's 'spectra'
    override if given, else the model's configured bands."""
    if term.inputs.get("spectra") is not None:
        try:
            return np.asarray(term.inputs["spectra"][0], np.float64)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
            raise ValueError(f"{term.modality}: spectral indices need static band wavelengths; pass "
                             f"batch['{term.modality}']['spectra'] as a closed-over constant, not a traced "
                             "argument") from e
    spectra = getattr(term.model, "band_spectra", {}).get(term.modality, ())
    return np.asarray(spectra, np.float64).reshape(-1, 2)[:, 0] if len(spectra) else np.zeros((0,))


def _index_bands(term: TermInputs, wavelengths: np.ndarray) -> dict[str, tuple[int, int]]:
    """`spectral.index_bands` of every index in `objectives.indices`; an error names any index
    whose two bands the modality lacks."""
    cfg, names = term.cfg, tuple(term.cfg.indices)
    if len(wavelengths) == 0:
        raise term.cannot_run("index", f"the modality has no band wavelengths (model.modalities."
                              f"{term.modality}.bands is empty), so none of {list(names)} can be found")
    bands = spectral.index_bands(wavelengths, names, float(cfg.index_tolerance_nm))
    lacking = [n for n in names if n not in bands]
    if lacking:
        need = "; ".join(f"{n}: {' and '.join(f'{b} {spectral.S2_WAVELENGTH_NM[b]:g} nm' for b in spectral.INDICES[n])}"
                         for n in lacking)
        raise term.cannot_run("index", f"objectives.indices {list(names)} include {lacking}, whose bands "
                              f"({need}) are not all within {cfg.index_tolerance_nm:g} nm of the modality's "
                              f"{[round(float(w), 1) for w in wavelengths]} nm (drop them from objectives.indices)")
    return bands
