"""SAR physics objectives (DESIGN.md section 4), in physical units.

SAR-L1 (complex scattering matrix, Re/Im interleaved per polarisation):

* span: the total polarimetric power P = |S_HH|^2 + |S_HV|^2 + |S_VH|^2 + |S_VV|^2
  (the reference's physics target; with a dual-pol product it is the sum over
  the polarisations present), in a normalised log space,
      q(P) = ln(P / P_ref + eps).
  The prediction x comes from the modality's power decoder (`power_targets`
  lays out its channels), not from the reconstructed Re/Im: single-look phase
  is uniform, so the best Re/Im reconstruction under SimMIM's L1 is 0, while its
  power is not; one decoder cannot serve both. P_ref =
  sum_c (mean_c^2 + std_c^2) over the span channels is the data set's mean span
  (E[x^2] = mean^2 + var per channel, from the manifest statistics), so q is
  unit-free (any calibration scale cancels) and the log matches the
  multiplicative nature of speckle and the span's dynamic range of several
  decades; eps (default 1e-3, i.e. a floor 30 dB below the mean span) keeps q
  and its gradient finite at P = 0 (no-data fills, dark water, zero powers).
  The loss is the Gamma deviance of the target intensity I = P / P_ref + eps
  given x (see `gamma_deviance`, shared with the SAR-L2 speckle NLL),
      L (e^d - d - 1),  d = ln I - x = q(P_target) - x,
  not an MSE in log space: the target power is speckled (single-look powers
  are exponential), and an MSE in q is minimised by E[ln I] = ln E[I] +
  psi(L) - ln L (-2.5 dB at L = 1, -0.76 dB at L = 3), the deviance by
  x = ln E[I] whatever L is. L (config `objectives.span_looks`, the span's
  effective number of looks, about 2.7 for single-look quad-pol data: see the
  config) only scales the term, as a likelihood weight.
* Pauli: the powers of the Pauli basis, k1 = |S_HH + S_VV|^2 / 2 (odd bounce),
  k2 = |S_HH - S_VV|^2 / 2 (even bounce), k3 = |S_HV + S_VH|^2 / 2 (volume).
  With both cross-pol channels k3 uses their sum, which equals DESIGN's
  2 |S_HV|^2 under reciprocity (S_HV = S_VH) and averages their noise; with one
  of them it is 2 |S_x|^2. Same log space and Gamma deviance as the span, with
  L = `objectives.pauli_looks` (1 for single-look data: each k_i is |z|^2 of
  one circular Gaussian z, an exponential power), averaged over the three.
  Needs HH, VV and a cross-pol channel, else it is skipped.

SAR-L2 (detected backscatter sigma0 in dB, e.g. Sentinel-1 GRD VV, VH):

* speckle NLL: the observed intensity I = 10^(dB/10) is speckled, I = sigma0 n
  with n ~ Gamma(L, 1/L); the negative log-likelihood of I under a predicted
  log-intensity x = ln sigma0 (x = reconstructed dB * ln10 / 10) is
  L (x + I e^-x) + const. Its minimum over x, at x = ln I, is L (ln I + 1);
  subtracting it gives, with d = ln I - x,
      nll = L (e^d - d - 1) >= 0,   0 exactly at a perfect reconstruction
  (`gamma_deviance`). Unlike an L1/L2 on dB values (biased by
  E[ln n] = psi(L) - ln L: -2.51 dB at L = 1) its expectation over speckle is
  minimised by the unbiased sigma0.
  e^d is continued linearly beyond d_max (default 5, about 22 dB of
  under-prediction) so a wild early reconstruction neither overflows nor gives
  an exploding gradient.
* cross-polarisation ratio: r = cross_dB - co_dB (VH - VV, or HV - HH), the
  standard vegetation / volume-scattering indicator; masked MSE of
  (r_rec - r_true) ln10 / 10, i.e. in natural-log units like the span terms.

Channel layout: by band name when the manifest names are given ("HH_re",
"HH_im", ...; "VV", "VH"), else by a polarisation list (config
`objectives.sar_l1_polarizations`, default HH, HV, VH, VV with Re/Im
interleaved, as in sensors.sar_l1_quadpol; `objectives.sar_l2_polarizations`,
default VV, VH as in sensors.sentinel1_db).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from ringmoe.objectives.common import masked_mean

DB_TO_LN = math.log(10.0) / 10.0   # ln(I) = dB * ln10 / 10


# --- channel layout ---------------------------------------------------------------------------

def complex_channels(channels: int, polarizations: Sequence[str] = (),
                     band_names: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    """{polarisation: (re channel, im channel)} of a complex (SAR-L1) modality.

    From `band_names` ("<pol>_re" / "<pol>_im") when given, else from
    `polarizations` with Re/Im interleaved (pol0_re, pol0_im, pol1_re, ...).
    """
    if band_names:
        if len(band_names) != channels:
            raise ValueError(f"{len(band_names)} band names for {channels} channels")
        parts: dict[str, dict[str, int]] = {}
        for i, name in enumerate(band_names):
            pol, _, part = str(name).rpartition("_")
            if part.lower() not in ("re", "im") or not pol:
                raise ValueError(f"complex SAR band {name!r} is not named <pol>_re / <pol>_im")
            parts.setdefault(pol.upper(), {})[part.lower()] = i
        incomplete = [p for p, v in parts.items() if len(v) != 2]
        if incomplete:
            raise ValueError(f"complex SAR polarisations {incomplete} lack a Re or Im channel")
        return {p: (v["re"], v["im"]) for p, v in parts.items()}
    pols = tuple(p.upper() for p in polarizations)
    if 2 * len(pols) != channels:
        raise ValueError(f"complex SAR modality has {channels} channels but polarisations {list(pols)} "
                         f"need {2 * len(pols)} (Re/Im interleaved); set objectives.sar_l1_polarizations")
    return {p: (2 * i, 2 * i + 1) for i, p in enumerate(pols)}


def detected_channels(channels: int, polarizations: Sequence[str] = (),
                      band_names: Sequence[str] | None = None) -> dict[str, int]:
    """{polarisation: channel} of a detected (SAR-L2, dB) modality, by name or by list."""
    pols = tuple(str(p).upper() for p in (band_names or polarizations))
    if len(pols) != channels:
        raise ValueError(f"detected SAR modality has {channels} channels but polarisations {list(pols)}; "
                         f"set objectives.sar_l2_polarizations")
    return {p: i for i, p in enumerate(pols)}


# --- SAR-L1: span and Pauli -------------------------------------------------------------------

def _complex(x: jax.Array, pol: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    return x[..., pol[0]], x[..., pol[1]]


def _power(re: jax.Array, im: jax.Array) -> jax.Array:
    return re * re + im * im


def span(x: jax.Array, channels: Mapping[str, tuple[int, int]]) -> jax.Array:
    """Total power P = sum_pol |S_pol|^2 of physical (..., C) Re/Im pixels -> (...)."""
    return sum(_power(*_complex(x, c)) for c in channels.values())


def is_quad_pol(channels: Mapping[str, tuple[int, int]]) -> bool:
    """HH, VV and a cross-pol channel: enough for the Pauli decomposition."""
    return "HH" in channels and "VV" in channels and ("HV" in channels or "VH" in channels)


def pauli_powers(x: jax.Array, channels: Mapping[str, tuple[int, int]]) -> jax.Array | None:
    """(..., 3) Pauli powers |HH+VV|^2/2, |HH-VV|^2/2, |HV+VH|^2/2 (2|X|^2 with one cross-pol);
    None when HH, VV or both cross-pol channels are absent."""
    if not is_quad_pol(channels):
        return None
    cross = [p for p in ("HV", "VH") if p in channels]
    hh_re, hh_im = _complex(x, channels["HH"])
    vv_re, vv_im = _complex(x, channels["VV"])
    if len(cross) == 2:
        a, b = _complex(x, channels["HV"]), _complex(x, channels["VH"])
        k3 = _power(a[0] + b[0], a[1] + b[1]) / 2
    else:
        k3 = 2 * _power(*_complex(x, channels[cross[0]]))
    k1 = _power(hh_re + vv_re, hh_im + vv_im) / 2
    k2 = _power(hh_re - vv_re, hh_im - vv_im) / 2
    return jnp.stack([k1, k2, k3], axis=-1)


def reference_power(stats: Mapping, channels: Mapping[str, tuple[int, int]]) -> jax.Array:
    """P_ref = sum over the span channels of (mean_c^2 + std_c^2): the data set's mean span."""
    mean = jnp.asarray(stats["mean"], jnp.float32)
    std = jnp.asarray(stats["std"], jnp.float32)
    idx = jnp.asarray([i for c in channels.values() for i in c])
    return jnp.maximum(jnp.sum(mean[idx] ** 2 + std[idx] ** 2), 1e-30)


def log_power(p: jax.Array, p_ref: jax.Array, eps: float) -> jax.Array:
    """q(P) = ln(P / P_ref + eps): unit-free, finite (with finite gradient) at P = 0."""
    return jnp.log(jnp.maximum(p, 0.0) / p_ref + eps)


def power_channels(channels: Mapping[str, tuple[int, int]]) -> int:
    """Channels of the power targets: span and the three Pauli powers (quad-pol), else the span."""
    return 4 if is_quad_pol(channels) else 1


def power_targets(x: jax.Array, channels: Mapping[str, tuple[int, int]], p_ref: jax.Array,
                  eps: float = 1e-3) -> jax.Array:
    """(..., K) log powers q of the span and, for quad-pol, the Pauli powers k1, k2, k3 of physical
    Re/Im pixels: the maps a SAR-L1 power decoder predicts (K = power_channels(channels))."""
    q = [log_power(span(x, channels), p_ref, eps)[..., None]]
    k = pauli_powers(x, channels)
    if k is not None:
        q.append(log_power(k, p_ref, eps))
    return jnp.concatenate(q, axis=-1)


def span_loss(predicted: jax.Array, target: jax.Array, weights: jax.Array,
              channels: Mapping[str, tuple[int, int]], p_ref: jax.Array, eps: float = 1e-3, *,
              looks: float, max_log_ratio: float = 5.0) -> jax.Array:
    """Masked Gamma deviance (`gamma_deviance`, L = looks) of the target span's intensity
    I = span(target) / p_ref + eps given a predicted log span x = q (...): d = q(span(target)) - x."""
    d = log_power(span(target, channels), p_ref, eps) - predicted
    return masked_mean(gamma_deviance(d, looks, max_log_ratio), weights)


def pauli_loss(predicted: jax.Array, target: jax.Array, weights: jax.Array,
               channels: Mapping[str, tuple[int, int]], p_ref: jax.Array, eps: float = 1e-3, *,
               looks: float, max_log_ratio: float = 5.0) -> jax.Array | None:
    """Masked Gamma deviance of the target's Pauli powers given predicted log powers (..., 3),
    averaged over the three; None if not quad-pol."""
    k_true = pauli_powers(target, channels)
    if k_true is None:
        return None
    return masked_mean(gamma_deviance(log_power(k_true, p_ref, eps) - predicted, looks, max_log_ratio), weights)


# --- Gamma deviance: the SAR-L2 speckle NLL and the span / Pauli terms above ---------------------

def gamma_deviance(d: jax.Array, looks: float, max_log_ratio: float = 5.0) -> jax.Array:
    """Per-pixel L (e^d - d - 1) of d = ln I - x (natural log).

    The Gamma(L) speckle NLL of an observed intensity I given a predicted
    log-intensity x, minus its minimum over x (>= 0, 0 at x = ln I); its
    expectation over speckle is minimised at x = ln E[I]. e^d is continued
    linearly for d > max_log_ratio (same value and slope at the joint).
    """
    d = jnp.asarray(d, jnp.float32)
    dc = jnp.minimum(d, max_log_ratio)
    e = jnp.exp(dc)
    return looks * (e - dc - 1.0 + (e - 1.0) * (d - dc))


def gamma_nll(reconstruction_db: jax.Array, target_db: jax.Array, looks: float,
              max_log_ratio: float = 5.0) -> jax.Array:
    """`gamma_deviance` of dB values: d = ln I - x = (target_dB - reconstruction_dB) ln10/10."""
    d = (jnp.asarray(target_db, jnp.float32) - jnp.asarray(reconstruction_db, jnp.float32)) * DB_TO_LN
    return gamma_deviance(d, looks, max_log_ratio)


def speckle_nll_loss(reconstruction_db: jax.Array, target_db: jax.Array, weights: jax.Array,
                     looks: float, max_log_ratio: float = 5.0) -> jax.Array:
    """`gamma_nll` averaged over masked pixels and all (dB) channels."""
    return masked_mean(gamma_nll(reconstruction_db, target_db, looks, max_log_ratio), weights)


# --- SAR-L2: cross-pol ratio ------------------------------------------------------------------

def cross_pol_pair(channels: Mapping[str, int]) -> tuple[int, int] | None:
    """(cross, co) channel of the cross-pol ratio: VH/VV, else HV/HH; None if neither pair exists."""
    for cross, co in (("VH", "VV"), ("HV", "HH")):
        if cross in channels and co in channels:
            return channels[cross], channels[co]
    return None


def xpol_ratio_loss(reconstruction_db: jax.Array, target_db: jax.Array, weights: jax.Array,
                    channels: Mapping[str, int]) -> jax.Array | None:
    """Masked MSE of the cross-pol ratio (cross_dB - co_dB) in natural-log units; None without a pair."""
    pair = cross_pol_pair(channels)
    if pair is None:
        return None
    cross, co = pair

    def ratio(x):
        return (x[..., cross] - x[..., co]).astype(jnp.float32) * DB_TO_LN

    return masked_mean((ratio(reconstruction_db) - ratio(target_db)) ** 2, weights)
