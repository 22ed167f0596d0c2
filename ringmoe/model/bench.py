"""MoE layer benchmark: every dispatch path against a dense FFN of equal active FLOPs.

One hierarchical MoE layer (modal + collaborative + shared experts) is timed for
forward + backward with each dispatch path, next to a dense FFN whose hidden
width is the sum of the widths a token activates (top_k modal + top_k
collaborative + shared), so both do the same useful FLOPs per token. All paths
are timed in the same process, interleaved round by round, and reported as
ratios to the dense time, which is what survives a noisy shared machine.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringmoe.model import dispatch
from ringmoe.model.ffn import FeedForward
from ringmoe.model.moe import HierarchicalMoE


def _train_step_fn(module, inputs_fn):
    """A jitted forward+backward of `module` on x, returning grads w.r.t. params and x."""
    graphdef, params = nnx.split(module, nnx.Param)

    @jax.jit
    def step(params, x):
        def loss(params, x):
            y = inputs_fn(nnx.merge(graphdef, params), x)
            return jnp.mean(y.astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1))(params, x)

    return lambda x: step(params, x)


def layer_shape(model_config, stage: int | None = None) -> dict:
    """Width, hidden width and tokens per image of a stage (default: the deepest stage)."""
    depths = list(model_config.depths)
    stage = int(np.argmax(depths)) if stage is None else stage
    dim = model_config.embed_dim * 2 ** stage
    side = model_config.image_size // model_config.patch_size // 2 ** stage
    return {"stage": stage, "dim": dim, "hidden": int(dim * model_config.mlp_ratio), "tokens": side * side,
            "side": side}


def run(model_config, *, batch: int, stage: int | None = None, rounds: int = 5, iters: int = 3,
        paths=dispatch.PATHS, seed: int = 0) -> dict:
    """Times every path; returns dense_s, paths {name: {s, ratio}}, best_ratio, best_path."""
    shape = layer_shape(model_config, stage)
    moe_cfg = model_config.moe
    dtype = jnp.dtype(model_config.dtype)
    modality = next(iter(model_config.modalities.keys()))
    active = (min(moe_cfg.top_k, moe_cfg.num_modal_experts) + min(moe_cfg.top_k, moe_cfg.num_collaborative_experts)
              + int(moe_cfg.shared_expert))
    x = jax.random.normal(jax.random.key(seed), (batch, shape["side"], shape["side"], shape["dim"]), dtype)

    steps = {}
    dense = FeedForward(shape["dim"], shape["hidden"] * active, dtype=dtype, rngs=nnx.Rngs(seed))
    steps["dense"] = _train_step_fn(dense, lambda m, x: m(x))
    for path in paths:
        cfg = moe_cfg.copy_and_resolve_references()
        cfg.dispatch = path
        layer = HierarchicalMoE(shape["dim"], shape["hidden"], list(model_config.modalities.keys()), cfg,
                                dtype=dtype, rngs=nnx.Rngs(seed))
        steps[path] = _train_step_fn(layer, lambda m, x: m(x, modality)[0])

    for fn in steps.values():  # compile + warm up
        jax.block_until_ready(fn(x))
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(iters):
                out = fn(x)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / iters)
    best = {name: float(np.min(t)) for name, t in times.items()}
    dense_s = best.pop("dense")
    result = {"paths": {p: {"s": s, "ratio": s / dense_s} for p, s in best.items()}}
    best_path = min(result["paths"], key=lambda p: result["paths"][p]["ratio"])
    return {"layer": {**shape, "batch": batch, "active_ffns": active, "dtype": str(dtype),
                      "backend": jax.default_backend()},
            "dense_s": dense_s, **result, "best_path": best_path,
            "best_ratio": result["paths"][best_path]["ratio"], "auto_path": dispatch.default_path()}
