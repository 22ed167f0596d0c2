"""Per-modality patch embeddings: a fixed-channel one and a wavelength-aware one.

`PatchEmbed` is Swin's strided patch projection (a p x p, stride-p convolution,
written as reshape-to-patches + Linear) followed by LayerNorm. Its kernel is laid
out (p_row, p_col, C) x D, i.e. a flattened HWIO convolution kernel, so it exports
to a standard Swin `patch_embed.proj` unchanged.

`WavelengthPatchEmbed` (the DOFA / Copernicus-FM idea) generates each band's
projection kernel from the band's central wavelength and bandwidth, so any set of
bands, in any order, runs through the same weights.

`ComplexPatchEmbed` is `PatchEmbed` over single-look complex SAR with each
polarisation's log power appended to its Re/Im channels. Why: a distributed
target's single-look pixel z is circular Gaussian, z ~ CN(0, sigma^2), so every
linear function of the pixels has expectation 0 whatever the backscatter sigma^2
is, and the LayerNorm after a projection with zero bias divides out the token's
scale: PatchEmbed(a z) = PatchEmbed(z) for every a > 0, so the backscatter level,
which is what separates land covers, never reaches the backbone. ln|z|^2 turns
the multiplicative speckle into additive noise of fixed variance (pi^2/6, i.e.
5.6 dB) around ln sigma^2 - 0.577, a linear function of the backscatter in dB,
which the projection then averages over the patch's p*p pixels.

`EMBEDDINGS` names them for `config.model.modalities.M.embed`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.model.ffn import gelu
from ringmoe.model.swin import DENSE_INIT, ZEROS, LayerNorm
from ringmoe.sharding import constrain, partitioned

# Sinusoid frequencies (radians per decade) applied to log10 wavelength/bandwidth.
# The top one, 512*pi, separates Sentinel-2 B8 (832.8 nm) from B8A (864.7 nm) by ~26 rad.
NUM_FREQS = 10
FREQS = np.pi * 2.0 ** np.arange(NUM_FREQS)
# log10 reference points: wavelengths relative to 1 um, bandwidths relative to 100 nm.
WAVELENGTH_REF_NM = 1000.0
BANDWIDTH_REF_NM = 100.0
LECUN = nnx.initializers.lecun_normal()
# fan-in is the hidden axis (0) of the (hidden, p*p, D) kernel generator.
HEAD_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))


def to_patches(x: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p, W/p, p*p, C), patch pixels in row-major order."""
    b, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p, c)


def _check_spatial(name: str, x: jax.Array, patch_size: int) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: expected pixels (B, H, W, C), got shape {x.shape}")
    if x.shape[1] % patch_size or x.shape[2] % patch_size:
        raise ValueError(f"{name}: H, W = {x.shape[1]}, {x.shape[2]} not divisible by patch size {patch_size}")


class PatchEmbed(nnx.Module):
    """Strided patch projection p*p*C -> D with bias, then LayerNorm: (B,H,W,C) -> (B,H/p,W/p,D)."""

    def __init__(self, channels: int, dim: int, patch_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.channels, self.patch_size, self.dtype = channels, patch_size, dtype
        self.proj = nnx.Linear(
            patch_size * patch_size * channels, dim, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=partitioned(LECUN, None, "embed"),
            bias_init=partitioned(ZEROS, "embed"), rngs=rngs)
        self.norm = LayerNorm(dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_spatial("PatchEmbed", x, self.patch_size)
        if x.shape[-1] != self.channels:
            raise ValueError(f"PatchEmbed: expected {self.channels} channels, got {x.shape[-1]} "
                             f"(input shape {x.shape})")
        patches = to_patches(x, self.patch_size)
        patches = patches.reshape(*patches.shape[:3], -1).astype(self.dtype)
        return constrain(self.norm(self.proj(patches)), "batch", None, None, "act_embed")


def log_power(x: jax.Array) -> jax.Array:
    """(..., 2P) Re/Im interleaved per polarisation -> (..., P) natural-log power |z|^2.

    A pixel with no power (only no-data, which the encoder has set to 0 + 0j) gets 0,
    not log 0: it carries no measurement, like a no-data pixel's 0 in the other channels.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"complex pixels need Re/Im pairs, got {x.shape[-1]} channels")
    x = x.astype(jnp.float32)
    power = x[..., 0::2] ** 2 + x[..., 1::2] ** 2
    has_power = power > 0
    return jnp.where(has_power, jnp.log(jnp.where(has_power, power, 1.0)), 0.0)


class ComplexPatchEmbed(PatchEmbed):
    """PatchEmbed over [Re/Im of each polarisation, ln |z|^2 of each]: 2P -> 3P channels
    per pixel (module doc: why the backscatter needs the log power to be seen)."""

    def __init__(self, channels: int, dim: int, patch_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % 2:
            raise ValueError(f"ComplexPatchEmbed: {channels} channels are not Re/Im pairs")
        super().__init__(channels + channels // 2, dim, patch_size, dtype=dtype, rngs=rngs)
        self.complex_channels = channels

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.complex_channels:
            raise ValueError(f"ComplexPatchEmbed: expected {self.complex_channels} Re/Im channels, got "
                             f"{x.shape[-1]} (input shape {x.shape})")
        return super().__call__(jnp.concatenate([x, log_power(x).astype(x.dtype)], -1))


def spectral_features(wavelengths_nm: jax.Array, bandwidths_nm: jax.Array) -> jax.Array:
    """(C,), (C,) -> (C, 2 * (1 + 2 * NUM_FREQS)): log10 values and their sinusoids.

    Log scale lets one encoding span visible light (~400 nm) to C-band SAR (5.55 cm).
    """
    feats = []
    for values, ref in ((wavelengths_nm, WAVELENGTH_REF_NM), (bandwidths_nm, BANDWIDTH_REF_NM)):
        z = jnp.log10(jnp.asarray(values, jnp.float32) / ref)[:, None]
        angles = z * jnp.asarray(FREQS, jnp.float32)
        feats += [z, jnp.sin(angles), jnp.cos(angles)]
    return jnp.concatenate(feats, axis=-1)


class WavelengthPatchEmbed(nnx.Module):
    """Patch embedding whose per-band kernels come from (wavelength, bandwidth).

    A hypernetwork maps each band's spectral features to a kernel (p*p -> D) and a
    bias (D). The output is the MEAN over bands of each band's projection (divided
    by C, not sqrt(C)): spectra are strongly correlated across bands, so a plain sum
    grows ~linearly in C; with the mean, repeating every band leaves the output
    unchanged. Being a mean over bands, it is invariant to permuting bands together
    with their wavelengths, and runs for any C >= 1. LayerNorm follows.
    """

    def __init__(self, dim: int, patch_size: int, *, hidden: int = 128, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.patch_size, self.dtype = patch_size, dtype
        in_features = 2 * (1 + 2 * NUM_FREQS)
        # Variance-preserving inits so band-specific kernels are not vanishingly small
        # at the start (with Swin's std 0.02 every band would begin near-identical).
        dense = dict(param_dtype=jnp.float32, kernel_init=partitioned(LECUN, None, None),
                     bias_init=partitioned(ZEROS, None), rngs=rngs)
        self.fc1 = nnx.Linear(in_features, hidden, **dense)
        self.fc2 = nnx.Linear(hidden, hidden, **dense)
        self.kernel_head = nnx.Einsum(
            "ch,hqd->cqd", (hidden, patch_size * patch_size, dim), (patch_size * patch_size, dim),
            param_dtype=jnp.float32, kernel_init=partitioned(HEAD_INIT, None, None, "embed"),
            bias_init=partitioned(ZEROS, None, "embed"), rngs=rngs)
        self.bias_head = nnx.Linear(
            hidden, dim, param_dtype=jnp.float32, kernel_init=partitioned(DENSE_INIT, None, "embed"),
            bias_init=partitioned(ZEROS, "embed"), rngs=rngs)
        self.norm = LayerNorm(dim, rngs=rngs)

    def generate(self, wavelengths_nm: jax.Array, bandwidths_nm: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-band kernels (C, p*p, D) and biases (C, D), in float32."""
        h = gelu(self.fc1(spectral_features(wavelengths_nm, bandwidths_nm)))
        h = gelu(self.fc2(h))
        return self.kernel_head(h), self.bias_head(h)

    def project(self, x: jax.Array, wavelengths_nm: jax.Array, bandwidths_nm: jax.Array) -> jax.Array:
        """The band-averaged projection before LayerNorm, float32: (B,H,W,C) -> (B,H/p,W/p,D)."""
        _check_spatial("WavelengthPatchEmbed", x, self.patch_size)
        c = x.shape[-1]
        for name, values in (("wavelengths_nm", wavelengths_nm), ("bandwidths_nm", bandwidths_nm)):
            if jnp.shape(values) != (c,):
                raise ValueError(f"WavelengthPatchEmbed: expected {name} of shape ({c},) for {c} "
                                 f"bands, got {jnp.shape(values)}")
            if not isinstance(values, jax.core.Tracer) and np.any(np.asarray(values) <= 0):
                raise ValueError(f"WavelengthPatchEmbed: {name} must be positive, got {values}")
        kernels, biases = self.generate(wavelengths_nm, bandwidths_nm)
        patches = to_patches(x, self.patch_size).astype(self.dtype)
        out = jnp.einsum("bhwqc,cqd->bhwd", patches, kernels.astype(self.dtype),
                         preferred_element_type=jnp.float32)
        return (out + jnp.sum(biases, axis=0)) / c

    def __call__(self, x: jax.Array, wavelengths_nm: jax.Array, bandwidths_nm: jax.Array) -> jax.Array:
        """pixels (B,H,W,C), wavelengths_nm (C,), bandwidths_nm (C,) -> (B,H/p,W/p,D)."""
        out = self.norm(self.project(x, wavelengths_nm, bandwidths_nm)).astype(self.dtype)
        return constrain(out, "batch", None, None, "act_embed")


# config embed name -> (builder(channels, dim, patch_size, dtype, rngs), features per pixel the
# projection sees for `channels` input channels: for FLOP counts).
EMBEDDINGS = {
    "patch": (lambda c, dim, p, dtype, rngs: PatchEmbed(c, dim, p, dtype=dtype, rngs=rngs), lambda c: c),
    "wavelength": (lambda c, dim, p, dtype, rngs: WavelengthPatchEmbed(dim, p, dtype=dtype, rngs=rngs),
                   lambda c: c),
    "complex": (lambda c, dim, p, dtype, rngs: ComplexPatchEmbed(c, dim, p, dtype=dtype, rngs=rngs),
                lambda c: c + c // 2),
}


def _kind(name: str):
    if name not in EMBEDDINGS:
        raise ValueError(f"unknown patch embedding {name!r} (one of {', '.join(EMBEDDINGS)})")
    return EMBEDDINGS[name]


def build_embedding(name: str, channels: int, dim: int, patch_size: int, *, dtype, rngs) -> nnx.Module:
    """The patch embedding `name` (EMBEDDINGS) for `channels` input channels."""
    return _kind(name)[0](channels, dim, patch_size, dtype, rngs)


def projected_channels(name: str, channels: int) -> int:
    """Features per pixel that embedding `name`'s projection sees for `channels` inputs."""
    return _kind(name)[1](channels)
