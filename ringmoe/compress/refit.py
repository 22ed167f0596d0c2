"""Activation-aware merge: the SVD merge's hidden units, each block's output layer refitted
on calibration tokens to what the pruned MoE block actually outputs.

The dense FFN of a block is f(h) = a(h) W + b with hidden units a(h) = GELU(h W1 + b1).
The SVD merge (`merging.py`) picks W1, b1, W, b from the weights alone, with every
gate replaced by its mean. Keeping its W1, b1, the output layer is linear in (W, b),
so its best value on calibration tokens (h_t, y_t) is a closed-form ridge least
squares, where y_t is the pruned teacher block's FFN output (its routers, per-token
gates, top-k and capacity drops included) and the prior W0 is the SVD merge's fc2:

    min_{W,b}  sum_t ||a_t W + b - y_t||^2 + lam ||W - W0||_F^2

Zero gradient in b gives b = mean(y) - mean(a) W; substituted, with the centred
moments S = sum_t (a_t - mean a)^T (a_t - mean a) and G = sum_t (a_t - mean a)^T (y_t - mean y),

    (S + lam I) W = G + lam W0,      W(lam) = V diag(1 / (s + lam)) V^T (G + lam W0)

for S = V diag(s) V^T: one eigendecomposition per block, then O(F^2 D) per lam.
lam -> 0 is plain least squares; lam -> inf gives back W0 (and the best bias for it).
lam = rho tr(S) / F (rho times the mean eigenvalue, so rho is scale-free); rho is
chosen from RIDGES by the error on a held-out fifth of the calibration images
(image i with i % 5 == 4) of a fit on the other four fifths, with rho = inf (the SVD
merge's layer, unchanged) among the candidates, so on that fold a block is never
worse than the SVD merge; then the block is refitted on every image with that rho.

Everything comes from streamed sufficient statistics (`Moments`): with A = [a, 1]
(n, F+1), M = A^T A, C = A^T Y and q = ||Y||^2, the error of Wa = [W; b] is
<Wa, M Wa> - 2 <Wa, C> + q, and the centred moments above are M and C less the
outer products of the sums (M's last row and column). Memory does not grow with
the token count: (F+1)^2 float64 per fold, 1.6 GB at the 14.7B model's last stage
(D = 3584, F = 14336). Each batch's moments are computed on the device in float32
at HIGHEST matmul precision (no TF32) and summed on the host in float64.

Sequential: block l is fitted on the inputs the dense student itself produces (its
blocks before l already merged and refitted), and the targets are the teacher's
FFN applied to those same inputs, so each block is fitted to the function it
replaces on the distribution it will see, and the error of earlier blocks is not
ignored (as layer-wise post-training quantisation, GPTQ, does). This keeps each
calibration image's stream at the current block on the host between blocks
(images x tokens x D float32: 2.1 GB for 512 images at the 14.7B model's first
stage); the cost is one forward pass of the teacher's FFNs and of the student.

What it does not change: fc1 (which hidden directions each expert keeps is still
chosen from the weights), attention and norms; the fit is on the FFN output y, not
on the block output x + norm2(y) (a LayerNorm: not linear in W).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.compress import merging
from ringmoe.compress.extraction import build, flat_params, unrolled
from ringmoe.eval.features import image_batches
from ringmoe.model import blockwise

log = logging.getLogger("ringmoe.compress")

RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)   # rho; inf = the SVD merge's layer
HELD_OUT_EVERY = 5          # calibration image i is in the held-out fold iff i % 5 == 4


@dataclasses.dataclass
class Moments:
    """Sufficient statistics of a least-squares fit of Y (n, D) on A = [a, 1] (n, F+1):
    gram = A^T A (F+1, F+1), cross = A^T Y (F+1, D), square = ||Y||^2, all float64."""
    gram: np.ndarray
    cross: np.ndarray
    square: float

    @classmethod
    def zeros(cls, hidden: int, dim: int) -> "Moments":
        return cls(np.zeros((hidden + 1, hidden + 1)), np.zeros((hidden + 1, dim)), 0.0)

    @classmethod
    def of(cls, a, y) -> "Moments":
        """Of arrays a (n, F) and y (n, D)."""
        a1 = np.concatenate([np.asarray(a, np.float64), np.ones((len(a), 1))], axis=1)
        y = np.asarray(y, np.float64)
        return cls(a1.T @ a1, a1.T @ y, float(np.sum(y * y)))

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.gram + np.asarray(other.gram, np.float64),
                       self.cross + np.asarray(other.cross, np.float64), self.square + float(other.square))

    @property
    def tokens(self) -> float:
        return float(self.gram[-1, -1])

    def error(self, w: np.ndarray, b: np.ndarray) -> float:
        """sum_t ||a_t w + b - y_t||^2 over the tokens summed in."""
        wa = np.concatenate([w, b[None]], axis=0).astype(np.float64)
        return float(np.sum(wa * (self.gram @ wa)) - 2.0 * np.sum(wa * self.cross) + self.square)

    def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(S, G, mean a, mean y) of the module docstring."""
        n = max(self.tokens, 1.0)
        mean_a, mean_y = self.gram[:-1, -1] / n, self.cross[-1] / n
        s = self.gram[:-1, :-1] - n * np.outer(mean_a, mean_a)
        g = self.cross[:-1] - n * np.outer(mean_a, mean_y)
        return (s + s.T) / 2, g, mean_a, mean_y


def ridge_path(moments: Moments, prior: tuple[np.ndarray, np.ndarray], ridges):
    """[(W, b)] minimising ||a W + b - y||^2 + lam ||W - W0||^2, lam = rho tr(S) / F, for each
    rho of `ridges` (inf: the prior itself), from one eigendecomposition of S."""
    w0, b0 = (np.asarray(p, np.float64) for p in prior)
    s, g, mean_a, mean_y = moments.centred()
    eigenvalues, vectors = np.linalg.eigh(s)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    scale = max(float(np.trace(s)) / len(s), 1e-30)
    out = []
    for rho in ridges:
        if math.isinf(rho):
            out.append((w0, b0))
            continue
        lam = rho * scale
        w = vectors @ ((vectors.T @ (g + lam * w0)) / (eigenvalues + lam)[:, None])
        out.append((w, mean_y - mean_a @ w))
    return out


def ridge_fit(moments: Moments, prior, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """`ridge_path` for one rho."""
    return ridge_path(moments, prior, (ridge,))[0]


def choose_ridge(fit: Moments, held_out: Moments, prior) -> tuple[float, dict]:
    """The rho of RIDGES whose fit on `fit` has the least error on `held_out`, and
    {"held_out_error", "held_out_error_svd"} relative to the held-out targets' ||y||^2."""
    if held_out.tokens == 0 or fit.tokens == 0:   # fewer than HELD_OUT_EVERY images: keep the SVD merge's
        return math.inf, {"held_out_error": None, "held_out_error_svd": None}
    errors = [held_out.error(w, b) for w, b in ridge_path(fit, prior, RIDGES)]
    best = int(np.argmin(errors))
    norm = max(held_out.square, 1e-30)
    return RIDGES[best], {"held_out_error": errors[best] / norm, "held_out_error_svd": errors[-1] / norm}


@functools.partial(nnx.jit, static_argnames=("modality",))
def _block_moments(student_block, teacher_ffn, x, held_out, modality: str):
    """The FFN input h of the student's block on its stream x, and the float32 moments of
    (student hidden units, teacher FFN output on h) of the fit fold and the held-out fold."""
    h = student_block.attend(x)
    y, _ = teacher_ffn(h, (modality,))
    a = student_block.ffn.ffn.hidden(h).astype(jnp.float32)
    tokens = h.shape[1] * h.shape[2]
    a = jnp.concatenate([a.reshape(-1, a.shape[-1]), jnp.ones((a.shape[0] * tokens, 1), jnp.float32)], axis=1)
    y = y.astype(jnp.float32).reshape(-1, y.shape[-1])
    dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    def moments(weight):   # weight (tokens,) in {0, 1}
        aw = a * weight[:, None]
        return dot(aw.T, a), dot(aw.T, y), jnp.sum(weight[:, None] * y * y)

    token_held_out = jnp.repeat(held_out.astype(jnp.float32), tokens)
    return h, moments(1.0 - token_held_out), moments(token_held_out)


def _calibration_stream(student, config, data_dir: str, modality: str, max_images: int, batch_size: int):
    """[(tokens after the patch embedding, held-out mask per image)] of up to `max_images`
    images, on the host."""
    stream, images = [], 0
    for pixels, n, _ in image_batches(config, data_dir, modality, batch_size, pad=False):
        n = min(n, max_images - images)
        index = np.arange(images, images + n)
        stream.append((np.asarray(blockwise.embed(student, jnp.asarray(pixels[:n]), modality)),
                       index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1))
        images += n
        if images >= max_images:
            break
    return stream


def refit_merge(teacher, teacher_config, dense_config, statistics: dict, modality: str, data_dir: str, *,
                max_images: int, batch_size: int = 32):
    """The SVD merge of `teacher` (the pruned MoE) with every block's output layer refitted,
    block after block, on up to `max_images` calibration images of `data_dir`.
    Returns (dense model, {"ranks": the SVD merge's report, "blocks": per block {"ridge",
    "held_out_error", "held_out_error_svd", "tokens"}})."""
    student, report = merging.svd_merge(teacher, teacher_config, dense_config, statistics, modality, data_dir,
                                        max_images=max_images)
    teacher, student = unrolled(teacher_config, teacher), unrolled(dense_config, student)   # block by block
    stream = _calibration_stream(student, teacher_config, data_dir, modality, max_images, batch_size)
    blocks = []
    for teacher_stage, stage in zip(teacher.stages, student.stages):
        for teacher_block, block in zip(teacher_stage.blocks, stage.blocks):
            fc2 = block.ffn.ffn.fc2
            hidden, dim = fc2.kernel.shape
            fit, held_out, inputs = Moments.zeros(hidden, dim), Moments.zeros(hidden, dim), []
            for x, mask in stream:
                h, fit_sums, held_sums = jax.device_get(
                    _block_moments(block, teacher_block.ffn, jnp.asarray(x), jnp.asarray(mask), modality))
                fit, held_out = fit + Moments(*fit_sums), held_out + Moments(*held_sums)
                inputs.append((h, mask))
            prior = (np.asarray(fc2.kernel[...]), np.asarray(fc2.bias[...]))
            ridge, errors = choose_ridge(fit, held_out, prior)
            w, b = ridge_fit(fit + held_out, prior, ridge)
            fc2.kernel[...] = jnp.asarray(w, fc2.kernel.dtype)
            fc2.bias[...] = jnp.asarray(b, fc2.bias.dtype)
            blocks.append({"ridge": ridge if math.isfinite(ridge) else "svd", **errors,
                           "tokens": int((fit + held_out).tokens)})
            log.info("refit block %d: rho %g, held-out error %s (SVD merge %s)", len(blocks) - 1, ridge,
                     errors["held_out_error"], errors["held_out_error_svd"])
            stream = [(np.asarray(blockwise.block_output(block, jnp.asarray(h), modality)), mask) for h, mask in inputs]
        if stage.merging is not None:
            stream = [(np.asarray(blockwise.merge(stage.merging, jnp.asarray(x))), mask) for x, mask in stream]
    return build(dense_config, flat_params(student)), {**report, "blocks": blocks}
