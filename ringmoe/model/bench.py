"""MoE layer benchmark: every dispatch path, under the configured router and expert choice.

One hierarchical MoE layer (modal + collaborative + shared experts) is timed for
forward + backward with each dispatch path and router, next to a dense FFN whose
hidden width is the sum of the widths a token activates under token choice (top_k
modal + top_k collaborative + shared). All are timed in the same process,
interleaved round by round, and reported as ratios to the dense time, which is
what survives a noisy shared machine. Each (router, path) also reports the rows
its routed experts compute (read off the traced program: padding and wasted rows
count) against the rows the routing kept, and its useful GFLOP/s: the FFN
matmul FLOPs of the kept assignments and the shared expert, forward + backward,
per second. Wasted rows show up as a low useful rate. Where a custom kernel does the
expert matmuls (tokamax's Pallas kernels on an accelerator) the program holds no matmul
to read, and `rows` is null.
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


_MATMULS = {"dot_general": lambda p: p["dimension_numbers"],
             "ragged_dot_general": lambda p: p["ragged_dot_dimension_numbers"].dot_dimension_numbers}


def expert_rows(jaxpr, w_in_shape) -> int:
    """Token rows a traced program pushes through the experts whose w_in is `w_in_shape` (E, D, F).

    Counts the rows of every matmul (`dot_general` or `ragged_dot_general`,
    sub-jaxprs included) that contracts such a weight over D, i.e. the first
    expert matmul: E x rows-per-expert for a batched matmul, the lhs rows for a
    grouped one. It is read off the program, not the routing, so padding and
    wasted rows count: this is the work the hardware is asked to do.
    """
    w_in_shape, hidden = tuple(w_in_shape), w_in_shape[-1]
    rows = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _MATMULS:
            (contract, _) = _MATMULS[eqn.primitive.name](eqn.params)
            for operand, dims in zip(eqn.invars[:2], contract):
                if operand.aval.shape == w_in_shape and tuple(dims) == (1,):
                    rows += int(np.prod(eqn.outvars[0].aval.shape)) // hidden
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1   # a scan runs its body `length` times
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    rows += repeats * expert_rows(inner, w_in_shape)
    return rows


def layer_shape(model_config, stage: int | None = None) -> dict:
    """Width, hidden width and tokens per image of a stage (default: the deepest stage)."""
    depths = list(model_config.depths)
    stage = int(np.argmax(depths)) if stage is None else stage
    dim = model_config.embed_dim * 2 ** stage
    side = model_config.image_size // model_config.patch_size // 2 ** stage
    return {"stage": stage, "dim": dim, "hidden": int(dim * model_config.mlp_ratio), "tokens": side * side,
            "side": side}


def _kept_rows(layer, x, modality) -> int:
    """Assignments the routers kept (after capacity) in one forward pass: the rows that matter."""
    _, stats = layer(x, (modality,))
    return round(sum(float(jnp.sum(group["routed"])) for group in stats[modality].values()))


def _computed_rows(layer, x, modality) -> int | None:
    """Rows the layer's routed experts compute in one forward pass (see `expert_rows`); None
    when no XLA matmul reads the expert weights: a custom kernel (tokamax's Pallas kernels on
    GPU / TPU) does the work, and its rows cannot be read off the program."""
    jaxpr = jax.make_jaxpr(lambda x: layer(x, (modality,))[0])(x).jaxpr
    groups = [layer.collaborative_experts] + ([layer.modal_experts[modality]] if layer.modal_experts else [])
    shapes = {g.experts.w_in.shape for g in groups if g is not None}
    return sum(expert_rows(jaxpr, shape) for shape in shapes) or None


def run(model_config, *, batch: int, stage: int | None = None, rounds: int = 5, iters: int = 3,
        paths=None, routers=None, seed: int = 0) -> dict:
    """Times every (router, path); routers default to the configured one and `expert_choice`,
    paths to every registered path that can run here (the others are listed under `skipped`
    with the reason).

    Returns dense_s, routers {router: {path: {s, ratio, rows, kept_rows, useful_gflops}}},
    and for the configured router `paths` (the same entries), best_path and best_ratio.
    """
    paths = list(paths or dispatch.PATHS)
    skipped = {p: why for p in paths if (why := dispatch.unavailable(p))}
    paths = [p for p in paths if p not in skipped]
    shape = layer_shape(model_config, stage)
    moe_cfg = model_config.moe
    dtype = jnp.dtype(model_config.dtype)
    modality = next(iter(model_config.modalities.keys()))
    routers = list(dict.fromkeys(routers or (moe_cfg.router, "expert_choice")))
    active = (min(moe_cfg.top_k, moe_cfg.num_modal_experts) + min(moe_cfg.top_k, moe_cfg.num_collaborative_experts)
              + int(moe_cfg.shared_expert))
    x = jax.random.normal(jax.random.key(seed), (batch, shape["side"], shape["side"], shape["dim"]), dtype)

    steps, info = {}, {}
    dense = FeedForward(shape["dim"], shape["hidden"] * active, dtype=dtype, rngs=nnx.Rngs(seed))
    steps["dense"] = _train_step_fn(dense, lambda m, x: m(x))
    for router in routers:
        for path in paths:
            cfg = moe_cfg.copy_and_resolve_references()
            cfg.dispatch, cfg.router = path, router
            layer = HierarchicalMoE(shape["dim"], shape["hidden"], list(model_config.modalities.keys()), cfg,
                                    dtype=dtype, rngs=nnx.Rngs(seed))
            steps[router, path] = _train_step_fn(layer, lambda m, x: m(x, (modality,))[0])
            info[router, path] = {"rows": _computed_rows(layer, x, modality),
                                  "kept_rows": _kept_rows(layer, x, modality)}

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
    row_flops = 3 * 2 * 2 * shape["dim"] * shape["hidden"]   # one row through one FFN, forward + backward
    tokens = x.size // shape["dim"]
    shared = tokens if moe_cfg.shared_expert else 0
    results = {router: {} for router in routers}
    for (router, path), s in best.items():
        useful = row_flops * (info[router, path]["kept_rows"] + shared)
        results[router][path] = {"s": s, "ratio": s / dense_s, **info[router, path], "useful_gflops": useful / s / 1e9}
    configured = results[routers[0]]
    best_path = min(configured, key=lambda p: configured[p]["ratio"])
    return {"layer": {**shape, "batch": batch, "active_ffns": active, "dtype": str(dtype),
                      "backend": jax.default_backend(), "router": routers[0]},
            "dense_s": dense_s, "dense_gflops": row_flops * active * tokens / dense_s / 1e9,
            "routers": results, "paths": configured, "best_path": best_path,
            "best_ratio": configured[best_path]["ratio"], "auto_path": dispatch.default_path(),
            "skipped": skipped}
