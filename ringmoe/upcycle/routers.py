"""How an upcycled MoE's routers start (`config.upcycle.router_init`, one class each in ROUTER_INITS).

A dense model has no router, so every router of the MoE is new. Its experts start as
copies of one FFN: they only diverge if they get different tokens, and what the router
sends where from the first step is all that distinguishes them.

* `random`: the target's own fresh router (N(0, 0.02) entries, `router.INIT_STD`).
* `kmeans`: each router's columns are the centroids of a spherical k-means over
  calibration tokens (the block's FFN inputs), so from the first step each expert gets
  one cluster of similar tokens. Cosine k-means because a bias-free linear router picks
  argmax_e <x, c_e>, which for unit centroids is the cluster of largest cosine: the router
  reproduces the clustering exactly. The centroids are scaled to the norm a random column
  has (0.02 sqrt(D)), so the gates start as near 1/E as a random router's: only the
  direction differs from `random`, which is what the ablation compares. A modal router
  clusters its modality's tokens; the collaborative router, every modality's, equally many each.
* `uniform`: zero kernels, every logit equal: the upcycled model is exactly the dense
  one for top-1 routing too (`build.py`) when nothing is dropped (the exactness check).
  Ties go to the first expert and gradients keep the other experts tied, so it is
  for checking, not for training.

The calibration tokens are the FFN inputs of the dense model with the target's modalities
(the target's config with MoE off: the source's blocks, the target's fresh patch
embeddings where the source lacks a modality), which at step 0 are the upcycled MoE's
own up to its routing: every block but the FFN is the same.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from ringmoe.compress.extraction import unrolled
from ringmoe.eval.features import image_batches
from ringmoe.model import blockwise
from ringmoe.model.router import INIT_STD
from ringmoe.upcycle.plan import UpcycleError

log = logging.getLogger("ringmoe.upcycle")


class RandomInit:
    """The target's fresh router."""
    calibrated = False

    def kernel_fn(self, calibrated):
        return lambda path, fresh: fresh


class UniformInit:
    """Zero kernels: equal logits, the exactly-dense start (module docstring)."""
    calibrated = False

    def kernel_fn(self, calibrated):
        return lambda path, fresh: jnp.zeros_like(fresh)


class KMeansInit:
    """Spherical k-means centroids of calibration tokens (`kmeans_kernels`)."""
    calibrated = True

    def kernel_fn(self, calibrated):
        def kernel(path, fresh):
            if path not in calibrated:
                raise UpcycleError(f"k-means router init: no centroids for {path}")
            return jnp.asarray(calibrated[path], fresh.dtype)
        return kernel


ROUTER_INITS = {"random": RandomInit(), "kmeans": KMeansInit(), "uniform": UniformInit()}


def router_init(name: str):
    if name not in ROUTER_INITS:
        raise UpcycleError(f"unknown upcycle.router_init {name!r}; choose one of {', '.join(ROUTER_INITS)}")
    return ROUTER_INITS[name]


@functools.partial(jax.jit, static_argnames=("k", "iterations"))
def spherical_kmeans(x: jax.Array, key: jax.Array, k: int, iterations: int) -> jax.Array:
    """(k, D) unit centroids of the rows of x (N, D) under cosine similarity: k-means++ seeding
    on 1 - cos, then `iterations` Lloyd steps (assign each row to its most similar centroid,
    centroid = normalised sum of its rows; an empty cluster keeps its centroid)."""
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    n = x.shape[0]
    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, n)
    centroids = [x[first]]
    distance = jnp.maximum(1.0 - x @ x[first], 0.0)
    for i in range(1, k):
        p = distance / jnp.maximum(jnp.sum(distance), 1e-12)
        p = jnp.where(jnp.sum(distance) > 0, p, jnp.full_like(p, 1.0 / n))
        pick = jax.random.choice(jax.random.fold_in(key, i), n, p=p)
        centroids.append(x[pick])
        distance = jnp.minimum(distance, jnp.maximum(1.0 - x @ x[pick], 0.0))
    centroids = jnp.stack(centroids)

    def lloyd(_, c):
        assigned = jax.nn.one_hot(jnp.argmax(x @ c.T, axis=-1), k, dtype=jnp.float32)
        sums = assigned.T @ x
        norms = jnp.linalg.norm(sums, axis=-1, keepdims=True)
        return jnp.where(norms > 0, sums / jnp.maximum(norms, 1e-12), c)

    return jax.lax.fori_loop(0, iterations, lloyd, centroids)


def ffn_inputs(dense, config, data_dir: str, modality: str, *, images: int, tokens: int, seed: int,
               batch_size: int = 16) -> list[np.ndarray]:
    """Per block (model order), up to `tokens` FFN inputs (rows (tokens, D)) of the unrolled dense
    model `dense` on the first `images` images of `modality` in `data_dir`, sampled with `seed`."""
    streams, seen = [], 0
    for pixels, n, _ in image_batches(config, data_dir, modality, batch_size, pad=False):
        n = min(n, images - seen)
        streams.append(blockwise.embed(dense, jnp.asarray(pixels[:n]), modality))
        seen += n
        if seen >= images:
            break
    if not streams:
        raise UpcycleError(f"{data_dir}: no {modality} images to calibrate the k-means routers on")
    rng = np.random.default_rng(seed)
    out = []
    for stage in dense.stages:
        for block in stage.blocks:
            inputs = [blockwise.ffn_input(block, x) for x in streams]
            rows = np.concatenate([np.asarray(h, np.float32).reshape(-1, h.shape[-1]) for h in inputs])
            out.append(rows[rng.choice(len(rows), size=min(tokens, len(rows)), replace=False)])
            streams = [blockwise.block_output(block, h, modality) for h in inputs]
        if stage.merging is not None:
            streams = [blockwise.merge(stage.merging, x) for x in streams]
    return out


def kmeans_kernels(dense_model, dense_config, config, data_dir: str) -> dict[str, np.ndarray]:
    """{router kernel path of `config`'s model: (.., D, E) kernel} from spherical k-means over the
    FFN inputs of `dense_model` (the target's modalities, MoE off: module docstring) on
    `data_dir`. Paths and stacking follow `config.model.scan_layers`."""
    u = config.upcycle
    moe = config.model.moe
    dense = unrolled(dense_config, dense_model)
    modalities = list(config.model.modalities.keys())
    tokens = {m: ffn_inputs(dense, config, data_dir, m, images=u.calibration_images, tokens=u.kmeans_tokens,
                            seed=config.seed + i) for i, m in enumerate(modalities)}
    key = jax.random.fold_in(jax.random.key(config.seed), 0x4B4D)
    kernels: dict[str, list] = {}
    block = 0
    for i, depth in enumerate(config.model.depths):
        for j in range(depth):
            prefix = f"stages/{i}/blocks" + ("" if config.model.scan_layers else f"/{j}")
            groups = []
            if moe.num_modal_experts:
                groups += [(f"{prefix}/ffn/modal_experts/{m}/router/kernel", [tokens[m][block]], moe.num_modal_experts)
                           for m in modalities]
            if moe.num_collaborative_experts:
                groups.append((f"{prefix}/ffn/collaborative_experts/router/kernel",
                               [tokens[m][block] for m in modalities], moe.num_collaborative_experts))
            for g, (path, rows, experts) in enumerate(groups):
                rows = np.concatenate(rows)
                centroids = spherical_kmeans(jnp.asarray(rows), jax.random.fold_in(key, block * 64 + g),
                                             experts, u.kmeans_iterations)
                dim = rows.shape[-1]
                kernels.setdefault(path, []).append(np.asarray(centroids).T * INIT_STD * math.sqrt(dim))
            block += 1
    out = {path: np.stack(ks) if config.model.scan_layers else ks[0] for path, ks in kernels.items()}
    log.info("k-means routers: %d kernels from %s tokens per modality and block", len(out),
             {m: len(t[0]) for m, t in tokens.items()})
    return out
