"""Pretraining objectives: SimMIM, SAR and spectral physics terms, cross-modal term, total loss."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from ringmoe.config import S2_L2A_BANDS
from ringmoe.model.decoders import SimMIMDecoder
from ringmoe.model.ringmoe import Encoded
from ringmoe.objectives import crossmodal, sar, spectral
from ringmoe.objectives.common import denormalize, masked_mean, pixel_mask
from ringmoe.objectives.loss import pretraining_loss
from ringmoe.objectives.simmim import masked_l1
from tests.small import micro_config

B, H, P = 2, 8, 2                       # rows, image side, patch size -> 4 x 4 tokens
QUAD = sar.complex_channels(8, ("HH", "HV", "VH", "VV"))
S1 = sar.detected_channels(2, ("VV", "VH"))
S2_WL = np.array([b[1] for b in S2_L2A_BANDS])
OBJECTIVES = tiny.get_config().objectives


def token_mask(seed=0):
    return jax.random.bernoulli(jax.random.key(seed), 0.5, (B, H // P, H // P)).at[0, 0, 0].set(True)


def weights(seed=0):
    return pixel_mask(token_mask(seed), P)


def normal(seed, channels, scale=1.0, shift=0.0):
    return jax.random.normal(jax.random.key(seed), (B, H, H, channels)) * scale + shift


def reflectance(seed, channels=12):
    return jax.random.uniform(jax.random.key(seed), (B, H, H, channels), minval=0.02, maxval=0.5)


def powers(x, layout=QUAD, p_ref=2.0, eps=1e-3):
    """The power decoder's targets [log span, log Pauli k1..k3] of Re/Im pixels."""
    return sar.power_targets(x, layout, jnp.float32(p_ref), eps)


def span_of(r, t, w, layout=QUAD, p_ref=2.0, eps=1e-3):
    """Span loss of a power decoder that predicted the powers of reconstruction r."""
    return sar.span_loss(powers(r, layout, p_ref, eps)[..., 0], t, w, layout, jnp.float32(p_ref), eps,
                         looks=OBJECTIVES.span_looks)


def pauli_of(r, t, w, layout=QUAD, p_ref=2.0):
    return sar.pauli_loss(powers(r, layout, p_ref)[..., 1:], t, w, layout, jnp.float32(p_ref),
                          looks=OBJECTIVES.pauli_looks)


# Every physics term as f(reconstruction, target, weights), on physical pixels of its modality.
TERMS = {
    "span": (span_of, lambda s: normal(s, 8)),
    "pauli": (pauli_of, lambda s: normal(s, 8)),
    "speckle_nll": (lambda r, t, w: sar.speckle_nll_loss(r, t, w, 4.4), lambda s: normal(s, 2, 4.0, -15.0)),
    "xpol_ratio": (lambda r, t, w: sar.xpol_ratio_loss(r, t, w, S1), lambda s: normal(s, 2, 4.0, -15.0)),
    "sam": (spectral.sam_loss, reflectance),
    "index": (lambda r, t, w: spectral.index_loss(r, t, w, spectral.index_bands(S2_WL)), reflectance),
    "simmim": (masked_l1, lambda s: normal(s, 3)),
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_is_zero_at_perfect_reconstruction_and_grows_under_perturbation(name):
    fn, make = TERMS[name]
    target, w = make(1), weights()
    assert float(fn(target, target, w)) == pytest.approx(0.0, abs=1e-6)
    assert float(fn(make(2), target, w)) > 1e-3


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_ignores_unmasked_pixels(name):
    fn, make = TERMS[name]
    target, rec, w = make(1), make(2), weights()
    garbage = jnp.where(w[..., None] > 0, rec, rec * 7.0 - 3.0)
    np.testing.assert_allclose(fn(garbage, target, w), fn(rec, target, w), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("case", ["perfect", "zeros", "random"])
def test_term_gradient_is_finite(name, case):
    fn, make = TERMS[name]
    target = make(1)
    rec = {"perfect": target, "zeros": jnp.zeros_like(target), "random": make(2)}[case]
    if case == "zeros":
        target = jnp.zeros_like(target)
    grad = jax.grad(lambda r: fn(r, target, weights()))(rec)
    assert np.isfinite(np.asarray(grad)).all()
    assert np.isfinite(float(fn(rec, target, weights())))


def test_simmim_ignores_nan_in_pixels_it_does_not_score():
    # masked_mean selects with where(), not a product with the mask: NaN * 0 would be NaN.
    target, rec, w = normal(1, 3), normal(2, 3), weights()
    poisoned = jnp.where(w[..., None] > 0, target, jnp.nan)
    np.testing.assert_allclose(masked_l1(rec, poisoned, w), masked_l1(rec, target, w), rtol=1e-6)
    assert np.isfinite(np.asarray(jax.grad(lambda r: masked_l1(r, poisoned, w))(rec))).all()


def test_denormalize_and_shape_check():
    stats = {"mean": np.array([1.0, -2.0]), "std": np.array([0.5, 3.0])}
    z = jnp.array([[[[2.0, -1.0]]]])
    np.testing.assert_allclose(denormalize(z, stats), [[[[2.0, -5.0]]]])
    with pytest.raises(ValueError, match="3 channels"):
        denormalize(jnp.zeros((1, 1, 1, 3)), stats)


def test_masked_mean_of_empty_mask_is_zero():
    assert float(masked_mean(jnp.ones((B, H, H)), jnp.zeros((B, H, H)))) == 0.0


# --- SAR-L1 --------------------------------------------------------------------------------------

def test_span_is_total_power_and_phase_invariant_while_pauli_sees_the_phase():
    s = normal(3, 8)
    np.testing.assert_allclose(sar.span(s, QUAD), jnp.sum(s * s, -1), rtol=1e-5)
    # A common phase rotation of every channel changes neither span nor Pauli powers.
    c, si = math.cos(0.7), math.sin(0.7)
    rotated = jnp.stack([s[..., 0::2] * c - s[..., 1::2] * si, s[..., 0::2] * si + s[..., 1::2] * c],
                        -1).reshape(s.shape)
    w = weights()
    assert float(span_of(rotated, s, w)) == pytest.approx(0, abs=1e-8)
    assert float(pauli_of(rotated, s, w)) == pytest.approx(0, abs=1e-8)
    # Flipping the sign of S_VV swaps odd and even bounce: same span, different Pauli powers.
    flipped = s.at[..., 6:8].multiply(-1.0)
    assert float(span_of(flipped, s, w)) == pytest.approx(0, abs=1e-8)
    assert float(pauli_of(flipped, s, w)) > 0.1


def test_pauli_powers_sum_to_span_under_reciprocity():
    s = normal(4, 8)
    s = s.at[..., 4:6].set(s[..., 2:4])            # S_VH = S_HV
    k = sar.pauli_powers(s, QUAD)
    np.testing.assert_allclose(jnp.sum(k, -1), sar.span(s, QUAD), rtol=1e-5)
    np.testing.assert_allclose(k[..., 2], 2 * (s[..., 2] ** 2 + s[..., 3] ** 2), rtol=1e-5)


def test_span_of_scaled_amplitude_is_the_deviance_of_the_log_power_ratio():
    s, w, looks = normal(5, 8), weights(), OBJECTIVES.span_looks
    # Power over-predicted 4x: d = ln P - ln 4P = -ln 4, deviance L (1/4 + ln 4 - 1).
    over = span_of(2.0 * s, s, w, p_ref=1.0, eps=1e-12)
    assert float(over) == pytest.approx(looks * (0.25 + math.log(4.0) - 1), rel=1e-3)
    # Under-predicted 4x: d = +ln 4, L (4 - ln 4 - 1), dearer (a Gamma likelihood's asymmetry).
    under = span_of(0.5 * s, s, w, p_ref=1.0, eps=1e-12)
    assert float(under) == pytest.approx(looks * (4.0 - math.log(4.0) - 1), rel=1e-3)


def test_complex_layout_by_band_name_and_dual_pol():
    names = ("VV_re", "VV_im", "HH_re", "HH_im", "VH_re", "VH_im", "HV_re", "HV_im")
    layout = sar.complex_channels(8, band_names=names)
    assert layout == {"VV": (0, 1), "HH": (2, 3), "VH": (4, 5), "HV": (6, 7)}
    s = normal(6, 8)
    order = [layout[p][i] for p in ("HH", "HV", "VH", "VV") for i in (0, 1)]
    np.testing.assert_allclose(sar.pauli_powers(s, layout), sar.pauli_powers(s[..., order], QUAD), rtol=1e-6)
    dual = sar.complex_channels(4, ("VH", "VV"))    # Sentinel-1 SLC: span yes, Pauli no
    assert sar.power_channels(dual) == 1 and sar.power_channels(QUAD) == 4
    assert powers(normal(1, 4), dual).shape[-1] == 1
    assert sar.pauli_loss(powers(normal(1, 4), dual), normal(2, 4), weights(), dual, 1.0, looks=1.0) is None
    assert float(span_of(normal(1, 4), normal(2, 4), weights(), dual, 1.0)) > 0
    with pytest.raises(ValueError, match="need 8"):
        sar.complex_channels(6, ("HH", "HV", "VH", "VV"))


def test_reference_power_is_mean_span_of_the_data_set():
    stats = {"mean": np.zeros(8), "std": np.full(8, 2.0)}
    assert float(sar.reference_power(stats, QUAD)) == pytest.approx(32.0)


def single_look_quad_pol(n_side, powers, rho, seed=0):
    """Reciprocal single-look scattering vectors (B, n, n, 8), Re/Im interleaved HH, HV, VH, VV:
    circular complex Gaussian with E|S_pq|^2 = powers[pq] and HH-VV correlation rho."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((3, B, n_side, n_side, 2)) @ np.array([1.0, 1j]) / math.sqrt(2)   # E|z|^2 = 1
    hh = math.sqrt(powers["HH"]) * z[0]
    vv = math.sqrt(powers["VV"]) * (rho * z[0] + math.sqrt(1 - rho ** 2) * z[1])
    hv = math.sqrt(powers["HV"]) * z[2]
    return jnp.asarray(np.stack([f(s) for s in (hh, hv, hv, vv) for f in (np.real, np.imag)], -1), jnp.float32)


def constant_minimiser(loss, k):
    """argmin over a constant prediction x (k,) of loss(x), by Newton on the JAX gradient."""
    x, grad, hess = jnp.zeros(k), jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))   # eager: op by op
    for _ in range(30):
        step = jnp.linalg.solve(hess(x), grad(x))
        x = x - step
        if float(jnp.abs(step).max()) < 1e-6:
            break
    return x


def test_span_and_pauli_losses_are_minimised_by_the_log_of_the_mean_intensity():
    """Under single-look speckle the best constant prediction is ln E[I], I = P/P_ref + eps (the
    Gamma deviance's minimiser), not E[ln I] (MSE in log space: -2.5 dB for exponential powers)."""
    pw, rho, eps = {"HH": 1.0, "HV": 0.15, "VV": 0.6}, 0.4, 1e-3
    s = single_look_quad_pol(160, pw, rho)
    w = jnp.ones(s.shape[:-1])
    cross = 2 * rho * math.sqrt(pw["HH"] * pw["VV"])
    mean_power = np.array([pw["HH"] + 2 * pw["HV"] + pw["VV"], (pw["HH"] + pw["VV"] + cross) / 2,
                           (pw["HH"] + pw["VV"] - cross) / 2, 2 * pw["HV"]])   # E[span], E[k1], E[k2], E[k3]
    p_ref = jnp.float32(mean_power[0])                            # the mean span: I is ~1
    expected = np.log(mean_power / mean_power[0] + eps)           # ln E[I]
    span_x = constant_minimiser(lambda x: sar.span_loss(jnp.broadcast_to(x[0], w.shape), s, w, QUAD, p_ref,
                                                        eps, looks=OBJECTIVES.span_looks), 1)
    pauli_x = constant_minimiser(lambda x: sar.pauli_loss(jnp.broadcast_to(x, w.shape + (3,)), s, w, QUAD,
                                                          p_ref, eps, looks=OBJECTIVES.pauli_looks), 3)
    error_db = 10 * math.log10(math.e) * (np.concatenate([span_x, pauli_x]) - expected)
    assert np.abs(error_db).max() < 0.05, f"minimiser - 10 log10 E[I] (dB), span, k1, k2, k3: {error_db}"


# --- SAR-L2 --------------------------------------------------------------------------------------

def test_gamma_nll_matches_the_likelihood_and_its_minimum():
    looks = 4.4
    target_db = jnp.array([-15.0, -20.0, -8.0])
    rec_db = jnp.array([-12.0, -25.0, -8.0])
    intensity = 10 ** (target_db / 10)
    x = rec_db * math.log(10) / 10
    expected = looks * (x + intensity * jnp.exp(-x)) - looks * (jnp.log(intensity) + 1)
    np.testing.assert_allclose(sar.gamma_nll(rec_db, target_db, looks), expected, rtol=1e-4, atol=1e-6)
    # Minimum over the prediction is at the observed intensity.
    grid = jnp.linspace(-30, 0, 3001)
    best = grid[jnp.argmin(sar.gamma_nll(grid, jnp.full_like(grid, -14.0), looks))]
    assert float(best) == pytest.approx(-14.0, abs=0.02)
    # Under-predicting the intensity costs more than over-predicting by the same dB.
    assert float(sar.gamma_nll(jnp.array(-17.0), jnp.array(-14.0), looks)) > \
        float(sar.gamma_nll(jnp.array(-11.0), jnp.array(-14.0), looks))


def test_gamma_nll_linear_tail_is_continuous_and_finite():
    target = jnp.array(0.0)
    d_max_db = 5.0 / (math.log(10) / 10)
    f = lambda r: sar.gamma_nll(r, target, 1.0, 5.0)           # noqa: E731
    below, above = float(f(-d_max_db + 1e-3)), float(f(-d_max_db - 1e-3))
    assert above == pytest.approx(below, rel=1e-3)
    g = jax.grad(f)
    assert float(g(-d_max_db - 1e-3)) == pytest.approx(float(g(-d_max_db + 1e-3)), rel=1e-2)
    assert np.isfinite(float(f(-3000.0))) and np.isfinite(float(g(-3000.0)))


def test_xpol_ratio_sees_the_ratio_not_the_level():
    target, w = normal(1, 2, 4.0, -15.0), weights()
    brighter = target + 3.0                                   # both channels +3 dB: same ratio
    assert float(sar.xpol_ratio_loss(brighter, target, w, S1)) == pytest.approx(0, abs=1e-8)
    assert float(sar.speckle_nll_loss(brighter, target, w, 4.4)) > 0.1
    vh_up = target.at[..., S1["VH"]].add(3.0)
    assert float(sar.xpol_ratio_loss(vh_up, target, w, S1)) == pytest.approx((0.3 * math.log(10)) ** 2,
                                                                              rel=1e-4)
    assert sar.xpol_ratio_loss(target, target, w, {"VV": 0, "HH": 1}) is None


# --- multispectral -------------------------------------------------------------------------------

def test_spectral_angle_values_and_scale_invariance():
    x, y = jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])
    assert float(spectral.spectral_angle(x, y)) == pytest.approx(math.pi / 4, rel=1e-5)
    assert float(spectral.spectral_angle(x, -x)) == pytest.approx(math.pi, rel=1e-5)
    target, w = reflectance(1), weights()
    assert float(spectral.sam_loss(2.5 * target, target, w)) == pytest.approx(0, abs=1e-5)
    shape = target.at[..., 7].multiply(2.0)                   # brighter NIR: a different material
    assert float(spectral.sam_loss(shape, target, w)) > 0.01
    assert float(spectral.spectral_angle(jnp.zeros(4), jnp.ones(4))) == pytest.approx(math.pi / 2, rel=1e-4)


def test_index_bands_found_by_wavelength_in_any_order_and_subset():
    full = spectral.index_bands(S2_WL, ("ndvi", "ndwi", "ndbi", "mndwi"))
    assert full == {"ndvi": (7, 3), "ndwi": (2, 7), "ndbi": (10, 7), "mndwi": (2, 10)}
    perm = np.random.default_rng(0).permutation(12)
    permuted = spectral.index_bands(S2_WL[perm])
    inverse = {int(c): i for i, c in enumerate(perm)}
    assert permuted == {k: (inverse[a], inverse[b]) for k, (a, b) in full.items() if k != "mndwi"}
    # B2 B3 B4 B8: no SWIR, so NDBI is skipped.
    assert spectral.index_bands(S2_WL[[1, 2, 3, 7]]) == {"ndvi": (3, 2), "ndwi": (1, 3)}
    # Without B8, B8A (864.7 nm) stands in for it; the red-edge B5 does not stand in for B4.
    no_b8 = [i for i in range(12) if i != 7]
    assert spectral.index_bands(S2_WL[no_b8])["ndvi"] == (7, 3)
    assert "ndvi" not in spectral.index_bands(S2_WL[[4, 7]])
    assert spectral.index_bands(()) == {}
    with pytest.raises(ValueError, match="unknown spectral index"):
        spectral.index_bands(S2_WL, ("evi",))


def test_index_loss_uses_the_found_bands():
    target, w = reflectance(1), weights()
    bands = spectral.index_bands(S2_WL)
    # eps = 0: the plain indices, scale invariant; the reflectance floor (eps 0.05) is not, a little.
    assert float(spectral.index_loss(1.7 * target, target, w, bands, eps=0.0)) == pytest.approx(0, abs=1e-5)
    assert 0 < float(spectral.index_loss(1.7 * target, target, w, bands)) < 0.05
    nir = target.at[..., 7].multiply(1.5)                     # B8 only: NDVI, NDWI, NDBI all move
    assert float(spectral.index_loss(nir, target, w, bands)) > 0.02
    swir12 = target.at[..., 11].multiply(1.5)                 # B12 is in no index
    assert float(spectral.index_loss(swir12, target, w, bands)) == pytest.approx(0, abs=1e-6)
    assert spectral.index_loss(target, target, w, {}) is None
    b8, b4 = target[..., 7], target[..., 3]
    ndvi = (b8 - b4) / (b8 + b4)
    np.testing.assert_allclose(spectral.normalized_difference(b8, b4, 0.0), ndvi, rtol=1e-5)
    # The floor shrinks the index by the pixel's brightness weight (a + b) / (a + b + eps).
    np.testing.assert_allclose(spectral.normalized_difference(b8, b4, 0.05),
                               ndvi * (b8 + b4) / (b8 + b4 + 0.05), rtol=1e-5)


def test_index_gradient_is_bounded_at_reflectance_scale():
    """For N = (a - b) / (|a| + |b| + eps), |dN/da| = (2|b| + eps) / (|a| + |b| + eps)^2 <= 1/eps
    (largest at a = b = 0; likewise for b), so the L1 index error's gradient per pixel and per unit
    reflectance is at most 1/eps: with a reflectance-scale eps (>= 0.01) at most 100, instead of
    ~1/(a + b) that makes dark, noisy pixels (water, shadow, a collapsed reconstruction) dominate."""
    eps, bands = OBJECTIVES.index_eps, {"ndvi": (0, 1)}
    target = jnp.array([[0.010, 0.025],       # (NIR, red): dark water
                        [0.003, 0.002],       # shadow
                        [0.300, 0.050],       # vegetation, for contrast
                        [0.010, 0.025]])      # dark water, reconstructed as 0 (collapsed)
    rec = target.at[:, 0].multiply(1.1).at[3].set(0.0)
    w = jnp.ones(4)
    assert float(spectral.index_loss(target, target, w, bands, eps)) == 0.0
    per_pixel = np.abs(jax.grad(lambda r: spectral.index_loss(r, target, w, bands, eps))(rec)) * 4
    a, b = rec[0]
    np.testing.assert_allclose(per_pixel[0, 0], (2 * b + eps) / (a + b + eps) ** 2, rtol=1e-3)
    assert per_pixel.max() <= (1 + 1e-3) / eps
    assert per_pixel.max() <= 1 / 0.01, (
        f"|d loss / d reflectance| per pixel (NIR, red) of water, shadow, vegetation, collapsed: {per_pixel}; "
        f"water / vegetation d/dNIR: {per_pixel[0, 0] / per_pixel[2, 0]:.1f}")


# --- cross-modal ---------------------------------------------------------------------------------

class FakeModel:
    """What the objectives read from RingMoE: patch_size, decoders, band_spectra."""

    def __init__(self, channels, dim=4, stride=H // 2, band_spectra=None):
        self.patch_size = P
        self.decoders = {m: SimMIMDecoder(dim, stride, c, rngs=nnx.Rngs(i)) for i, (m, c) in
                         enumerate(channels.items())}
        self.band_spectra = band_spectra or {m: () for m in channels}


def encoded(seed, rows, stats=()):
    return Encoded(jax.random.normal(jax.random.key(seed), (rows, 2, 2, 4)), (), stats)


def test_cross_modal_uses_only_rows_with_equal_record_index():
    model = FakeModel({"optical": 3, "sar_l2": 2})
    feats_sar = encoded(10, 2).features
    batch = {"optical": {"pixels": normal(1, 3)[jnp.array([0, 1, 0])], "mask": token_mask()[jnp.array([0, 1, 1])],
                         "record_index": jnp.array([5, 7, -1])},
             "sar_l2": {"pixels": normal(2, 2)[:2], "mask": token_mask(1)[:2],
                        "record_index": jnp.array([7, -1])}}
    outputs = {"optical": {"encoded": encoded(11, 3)}, "sar_l2": {"encoded": Encoded(feats_sar, (), ())}}
    # Only optical row 1 <-> sar row 0 pair (record 7); -1 never pairs with -1.
    opt_from_sar = masked_l1(model.decoders["optical"](feats_sar[:1]), batch["optical"]["pixels"][1:2],
                             pixel_mask(batch["optical"]["mask"][1:2], P))
    sar_from_opt = masked_l1(model.decoders["sar_l2"](outputs["optical"]["encoded"].features[1:2]),
                             batch["sar_l2"]["pixels"][:1], pixel_mask(batch["sar_l2"]["mask"][:1], P))
    loss = crossmodal.cross_modal_loss(model, outputs, batch)
    np.testing.assert_allclose(loss, (opt_from_sar + sar_from_opt) / 2, rtol=1e-5)
    # Pixels of unpaired rows do not matter.
    batch["optical"]["pixels"] = batch["optical"]["pixels"].at[0].add(100.0).at[2].add(100.0)
    np.testing.assert_allclose(crossmodal.cross_modal_loss(model, outputs, batch), loss, rtol=1e-5)
    # No pairs at all: 0.
    batch["sar_l2"]["record_index"] = jnp.array([1, 2])
    assert float(crossmodal.cross_modal_loss(model, outputs, batch)) == 0.0


# --- the total loss ------------------------------------------------------------------------------

ALL = {"optical": 3, "multispectral": 12, "sar_l2": 2, "sar_l1": 8}


def loss_inputs(seed=0):
    def stats(c, i):
        return {"mean": np.linspace(-1.0, 1.0, c) * (i + 1), "std": np.linspace(0.5, 2.0, c)}

    spectra = {m: () for m in ALL}
    spectra["multispectral"] = tuple((b[1], b[2]) for b in S2_L2A_BANDS)
    model = FakeModel(ALL, band_spectra=spectra)
    norm = {m: stats(c, i) for i, (m, c) in enumerate(ALL.items())}
    batch, outputs = {}, {}
    for i, (m, c) in enumerate(ALL.items()):
        router = ({"modal": {"load_balance": jnp.float32(1.0 + i), "z_loss": jnp.float32(2.0)}},)
        batch[m] = {"pixels": normal(seed + i, c), "mask": token_mask(i), "record_index": jnp.array([3, i + 10])}
        outputs[m] = {"reconstruction": normal(seed + 20 + i, c), "encoded": encoded(i, B, router)}
    outputs["sar_l1"]["log_power"] = normal(seed + 40, 4)   # the power decoder's span + Pauli maps
    return model, outputs, batch, norm


def jitted_loss(model, cfg, moe, norm):
    return jax.jit(lambda outputs, batch: pretraining_loss(model, outputs, batch, cfg, moe, norm))


def test_pretraining_loss_terms_total_and_weight_zero():
    config = tiny.get_config()
    cfg, moe = config.objectives, config.model.moe
    cfg.cross_modal = True
    model, outputs, batch, norm = loss_inputs()
    total, terms = jitted_loss(model, cfg, moe, norm)(outputs, batch)
    expected = {f"{m}/{t}" for m in ALL for t in ("simmim", "total")} | {
        "sar_l1/span", "sar_l1/pauli", "sar_l2/speckle_nll", "sar_l2/xpol_ratio", "multispectral/sam",
        "multispectral/index", "cross_modal", "router/modal_load_balance", "router/modal_z_loss", "router/total"}
    assert set(terms) == expected
    assert all(np.isfinite(float(v)) for v in terms.values())
    # Router (modal group only here): the modal loss averaged over modalities (1, 2, 3, 4 -> 2.5).
    assert float(terms["router/modal_load_balance"]) == pytest.approx(2.5)
    assert float(terms["router/total"]) == pytest.approx(1e-3 * 2.5 + moe.z_loss_weight * 2.0)
    w = {"simmim": cfg.simmim, "span": cfg.span, "pauli": cfg.pauli, "speckle_nll": cfg.speckle_nll,
         "xpol_ratio": cfg.xpol_ratio, "sam": cfg.sam, "index": cfg.index}
    for m in ALL:
        own = sum(w[k.split("/")[1]] * float(v) for k, v in terms.items()
                  if k.startswith(m + "/") and not k.endswith("/total"))
        assert float(terms[f"{m}/total"]) == pytest.approx(own, rel=1e-5)
    assert float(total) == pytest.approx(sum(float(terms[f"{m}/total"]) for m in ALL)
                                         + cfg.cross_modal_weight * float(terms["cross_modal"])
                                         + float(terms["router/total"]), rel=1e-5)
    # The physics terms see physical units: de-normalised with norm_stats.
    stats = norm["sar_l2"]
    rec = denormalize(outputs["sar_l2"]["reconstruction"], stats)
    true = denormalize(batch["sar_l2"]["pixels"], stats)
    np.testing.assert_allclose(terms["sar_l2/speckle_nll"],
                               sar.speckle_nll_loss(rec, true, pixel_mask(batch["sar_l2"]["mask"], P), 4.4),
                               rtol=1e-4)
    # Gradients with respect to every reconstruction and feature map are finite.
    grads = jax.grad(lambda o: pretraining_loss(model, o, batch, cfg, moe, norm)[0])(outputs)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_weight_zero_removes_terms_and_dense_router_terms_are_zero():
    config = tiny.get_config()
    cfg, moe = config.objectives, config.model.moe
    cfg.span, cfg.sam, cfg.simmim, cfg.cross_modal = 0.0, 0.0, 0.0, False
    model, outputs, batch, norm = loss_inputs()
    outputs = {m: {**o, "encoded": o["encoded"]._replace(router_stats=({}, {}))} for m, o in outputs.items()}
    _, terms = pretraining_loss(model, outputs, batch, cfg, moe, norm)
    assert set(terms) == {f"{m}/total" for m in ALL} | {
        "sar_l1/pauli", "sar_l2/speckle_nll", "sar_l2/xpol_ratio", "multispectral/index",
        "router/total"}
    assert float(terms["router/total"]) == 0.0   # a dense model: no router, no router terms but the total
    assert float(terms["optical/total"]) == 0.0
    with pytest.raises(ValueError, match="norm_stats"):
        pretraining_loss(model, outputs, batch, cfg, moe, {})
    del outputs["sar_l1"]["log_power"]
    with pytest.raises(ValueError, match="sar_l1: span/Pauli terms need a power decoder with 4 channels"):
        pretraining_loss(model, outputs, batch, cfg, moe, norm)


def test_router_terms_of_the_total_loss_golden_values():
    """Router terms of pretraining_loss on the typed-in statistics of tests/test_moe.py
    (ROUTER_GOLDEN, arithmetic there): modal 1.7, collaborative 1.6 (each with the full 1e-3),
    z-losses 6.5 and 3 (1e-4): total 1e-3 * 3.3 + 1e-4 * 9.5 = 4.25e-3."""
    from tests.test_moe import golden_stats
    config = tiny.get_config()
    cfg, moe = config.objectives, config.model.moe
    for name in ("simmim", "span", "pauli", "speckle_nll", "xpol_ratio", "sam", "index"):
        cfg[name] = 0.0
    moe.load_balance_weight, moe.z_loss_weight = 1e-3, 1e-4
    model = FakeModel({"optical": 3, "sar_l2": 2})
    outputs, batch = {}, {}
    for i, (m, layers) in enumerate(golden_stats(("modal", "collaborative")).items()):
        outputs[m] = {"reconstruction": normal(i, model.decoders[m].channels), "encoded": encoded(i, B, tuple(layers))}
        batch[m] = {"pixels": outputs[m]["reconstruction"], "mask": token_mask(i)}
    total, terms = pretraining_loss(model, outputs, batch, cfg, moe)
    assert float(terms["router/total"]) == pytest.approx(4.25e-3, rel=1e-6)
    assert float(total) == pytest.approx(4.25e-3, rel=1e-6)   # every other term has weight 0
    assert float(terms["router/modal_load_balance"]) == pytest.approx(1.7, rel=1e-6)
    assert float(terms["router/collaborative_load_balance"]) == pytest.approx(1.6, rel=1e-6)
    assert float(terms["router/modal_z_loss"]) == pytest.approx(6.5, rel=1e-6)
    assert float(terms["router/collaborative_z_loss"]) == pytest.approx(3.0, rel=1e-6)


def test_pretraining_loss_jits_on_a_real_model():
    """Forward + loss under nnx.jit on RingMoE itself (gradients: the test above; a backward
    compile of even this model takes ~30 s on 2 cores)."""
    from ringmoe.model.ringmoe import create_model
    config = micro_config(("multispectral", "sar_l1"))   # the two with the most physics terms
    c = config.model
    model = create_model(c, seed=0)
    grid = c.image_size // c.patch_size
    batch, norm = {}, {}
    for i, (m, mc) in enumerate(c.modalities.items()):
        k1, k2 = jax.random.split(jax.random.key(i))
        batch[m] = {"pixels": jax.random.normal(k1, (2, 32, 32, mc.channels)),
                    "mask": jax.random.bernoulli(k2, 0.6, (2, grid, grid)),
                    "record_index": jnp.array([i, 100])}
        norm[m] = {"mean": np.full(mc.channels, 0.1, np.float32), "std": np.full(mc.channels, 0.05, np.float32)}
    config.objectives.cross_modal = True

    @nnx.jit
    def loss(model, batch):
        outputs = model({m: {"pixels": b["pixels"], "mask": b["mask"]} for m, b in batch.items()})
        return pretraining_loss(model, outputs, batch, config.objectives, c.moe, norm)

    total, terms = loss(model, batch)
    assert np.isfinite(float(total)) and all(np.isfinite(float(v)) for v in terms.values())
    assert {"sar_l1/span", "sar_l1/pauli", "multispectral/sam", "multispectral/index", "cross_modal"} <= set(terms)
    assert float(terms["router/modal_load_balance"]) > 0 and float(terms["router/collaborative_load_balance"]) > 0


# --- configs that fail loudly (issue 14, fault 7) -----------------------------------------------

def physics_inputs(channels, band_spectra=None, bands=None):
    """(model, outputs, batch, norm) for `channels` = {modality: C}, router-free; norm[m]['bands']
    from `bands` (manifest band names), when given."""
    model = FakeModel(channels, band_spectra=band_spectra)
    outputs, batch, norm = {}, {}, {}
    for i, (m, c) in enumerate(channels.items()):
        outputs[m] = {"reconstruction": normal(20 + i, c, 0.1, 0.2), "encoded": encoded(i, B)}
        batch[m] = {"pixels": normal(i, c, 0.1, 0.2), "mask": token_mask(i), "record_index": jnp.array([3, i + 10])}
        norm[m] = {"mean": np.zeros(c, np.float32), "std": np.ones(c, np.float32)}
        if bands and m in bands:
            norm[m]["bands"] = bands[m]
    if "sar_l1" in outputs:
        outputs["sar_l1"]["log_power"] = normal(40, 4)
    return model, outputs, batch, norm


def test_unknown_objective_key_is_an_error():
    config = tiny.get_config()
    # ringmoe/config.py locks the section: a config file's misspelt key fails where it is written.
    with pytest.raises(AttributeError, match="spann"):
        config.objectives.spann = 1.0
    # A config that got one anyway (unlocked, or restored from JSON): the loss refuses it.
    cfg = config.objectives
    with cfg.unlocked():
        cfg.spann = 1.0
    model, outputs, batch, norm = physics_inputs({"optical": 3})
    with pytest.raises(ValueError, match=r"unknown key.*'spann'.*did you mean 'span'"):
        pretraining_loss(model, outputs, batch, cfg, config.model.moe, norm)


def test_objective_settings_have_no_default_outside_configs_common():
    """loss.py reads every setting from the config: a missing one is an error naming it, not a
    second default typed into the loss."""
    config = tiny.get_config()
    cfg = config.objectives
    with cfg.unlocked():
        del cfg["sar_looks"]
    model, outputs, batch, norm = physics_inputs({"sar_l2": 2})
    with pytest.raises(ValueError, match="objectives lacks .*'sar_looks'"):
        pretraining_loss(model, outputs, batch, cfg, config.model.moe, norm)


def test_old_checkpoint_configs_get_the_current_defaults_in_one_place():
    """A config saved before a key existed loads with base_config()'s value of that key; what it
    saved stays, and modality maps are taken whole (not merged with the base's)."""
    from ringmoe.config import base_config
    from ringmoe.model.checkpoint import config_from_json
    saved = json.loads(tiny.get_config().to_json())
    del saved["objectives"]["span_looks"], saved["model"]["remat"]
    saved["objectives"]["sar_looks"] = 1.0
    saved["data"]["modality_weights"] = {"optical": 1.0}
    config = config_from_json(saved)
    assert config.objectives.span_looks == base_config().objectives.span_looks
    assert config.model.remat == base_config().model.remat
    assert config.objectives.sar_looks == 1.0
    assert dict(config.data.modality_weights) == {"optical": 1.0}
    assert config.model.depths == (2, 2, 2, 2) and set(config.model.modalities) == set(tiny.get_config().model.modalities)


def loss_with(objectives, channels, **kw):
    model, outputs, batch, norm = physics_inputs(channels, **kw)
    return pretraining_loss(model, outputs, batch, objectives, tiny.get_config().model.moe, norm)


def test_a_term_asked_for_that_cannot_run_is_an_error():
    cfg = tiny.get_config().objectives
    # index on a multispectral modality without wavelengths (configs/ringmoe_14b.py's modality(4)).
    with pytest.raises(ValueError, match=r"multispectral: objectives.index .*no band wavelengths"):
        loss_with(cfg, {"multispectral": 4})
    # ... or without the bands of one of its indices: B, G, R, NIR have no SWIR for NDBI.
    bgrn = tuple((b[1], b[2]) for b in S2_L2A_BANDS if b[0] in ("B2", "B3", "B4", "B8"))
    with pytest.raises(ValueError, match=r"multispectral: objectives.index .*ndbi"):
        loss_with(cfg, {"multispectral": 4}, band_spectra={"multispectral": bgrn})
    # xpol_ratio without a cross-pol pair.
    with cfg.unlocked():
        cfg.sar_l2_polarizations = ("VV", "VV")
    with pytest.raises(ValueError, match=r"sar_l2: objectives.xpol_ratio .*cross-pol"):
        loss_with(cfg, {"sar_l2": 2})
    # Pauli without quad-pol (dual-pol HH/HV from the manifest's band names).
    cfg = tiny.get_config().objectives
    with pytest.raises(ValueError, match=r"sar_l1: objectives.pauli .*quad-pol"):
        loss_with(cfg, {"sar_l1": 4}, bands={"sar_l1": ("HH_re", "HH_im", "HV_re", "HV_im")})
    # cross_modal with one modality: no other modality to decode from.
    cfg.cross_modal = True
    with pytest.raises(ValueError, match=r"objectives.cross_modal .*one modality"):
        loss_with(cfg, {"optical": 3})


ALL_TERMS = {"sar_l1/span", "sar_l1/pauli", "sar_l2/speckle_nll", "sar_l2/xpol_ratio", "multispectral/sam",
             "multispectral/index"}


@pytest.mark.parametrize("name, physics", [
    # multispectral B, G, R, NIR with SAM and NDVI/NDWI; SAR-L2 one VV band in three channels
    # (speckle NLL, xpol_ratio off); SAR-L1 span and Pauli.
    ("ringmoe_14b", ALL_TERMS - {"sar_l2/xpol_ratio"}),
    ("tiny", ALL_TERMS),          # all four modalities, every term of ringmoe/config.py
    ("base", ALL_TERMS),
    ("ringmoe_1b", set()),        # optical only: SimMIM
])
def test_config_trains_the_terms_its_comments_name(name, physics):
    import importlib
    config = importlib.import_module(f"configs.{name}").get_config()
    channels = {m: mc.channels for m, mc in config.model.modalities.items()}
    spectra = {m: tuple((b[1], b[2]) for b in mc.bands) for m, mc in config.model.modalities.items()}
    _, terms = loss_with(config.objectives, channels, band_spectra=spectra)
    trained = {k for k in terms if not k.endswith("/total") and not k.startswith("router/")}
    assert trained == {f"{m}/simmim" for m in channels} | physics


def test_the_loss_reads_exactly_the_objective_keys_of_configs_common():
    """ringmoe/ never imports configs/: the loss names its keys, ringmoe/config.py holds their values."""
    from ringmoe.config import base_config
    from ringmoe.objectives.loss import objective_keys
    assert set(base_config().objectives.keys()) == objective_keys()


def test_a_new_objective_is_one_registered_function():
    """Adding an objective touches the file that defines it and the config, nothing else: this
    test registers `brightness` (optical only: squared error of the images' mean value, in
    normalised units) and the loss refuses a config without its key, then trains and
    reports it, for optical images only."""
    from ringmoe.objectives import registry
    from ringmoe.objectives.loss import check_objectives

    @registry.objective("brightness", "optical", physical=False)
    def brightness(term):
        return (jnp.mean(term.output["reconstruction"]) - jnp.mean(term.inputs["pixels"])) ** 2

    try:
        model, outputs, batch, norm = physics_inputs({"optical": 3, "sar_l2": 2})
        config = tiny.get_config()
        cfg = config.objectives
        with pytest.raises(ValueError, match="lacks 'brightness'"):
            check_objectives(cfg)
        with cfg.unlocked():
            cfg.brightness = 0.25
        _, terms = pretraining_loss(model, outputs, batch, cfg, config.model.moe, norm)
        expected = float((jnp.mean(outputs["optical"]["reconstruction"]) - jnp.mean(batch["optical"]["pixels"])) ** 2)
        assert float(terms["optical/brightness"]) == pytest.approx(expected, rel=1e-6)
        assert "sar_l2/brightness" not in terms
        assert float(terms["optical/total"]) == pytest.approx(float(terms["optical/simmim"]) + 0.25 * expected,
                                                              rel=1e-6)
    finally:
        del registry.OBJECTIVES["brightness"]
    with pytest.raises(ValueError, match="unknown key.*'brightness'"):
        check_objectives(cfg)
