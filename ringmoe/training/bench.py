"""The real train and eval steps, timed: compile (first call) and steady-state step time.

`tools.bench step` runs it for each block layout (`model.scan_layers` False and True)
on the same batch of the same data set, so the two are compared in one run: what
scanning the blocks saves in compile time and what, if anything, it costs per step.
Each layout also reports samples/s, MFU, the device's peak memory (where the backend
keeps the statistic; it counts from the start of the process) and, on request, the
top operations of a few profiled steps (`profile.py`).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from ringmoe import flops, sharding
from ringmoe.data.pipeline import Pipeline
from ringmoe.model import dispatch
from ringmoe.training import profile
from ringmoe.training.state import create_state, make_optimizer
from ringmoe.training.step import (batch_shardings, jit_train_step, make_eval_step, make_loss_fn, make_train_step,
                                   to_device)


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


# layout name -> (model.scan_layers, model.moe.modal_experts_loop): blocks unrolled or scanned,
# the modal experts vmapped or looped over the modalities (`experts.route_by_modality`).
LAYOUTS = {"unrolled": (False, False), "scanned": (True, False), "looped": (True, True)}
RATIOS = (("scanned", "unrolled"), ("looped", "scanned"))   # reported as f"{a}_over_{b}" when both ran


def _peak_bytes() -> int | None:
    """The first device's peak bytes in use since the process started (None where the backend
    keeps no memory statistics, as on the CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _one_batch(config, mesh):
    """The normalisation statistics, the batch shardings, one batch of `config.data_dir` on the
    devices and the per-modality batch sizes: what every benchmark here starts from."""
    with Pipeline(config, num_workers=0) as pipeline:
        norm_stats = {m: {"mean": s.mean, "std": s.std, "bands": s.bands} for m, s in pipeline.specs.items()}
        in_batch = batch_shardings(pipeline.batch_spec(), mesh)
        return norm_stats, in_batch, to_device(next(pipeline), in_batch), dict(pipeline.batch_sizes)


def step_times(config, *, steps: int, profile_dir: str | None = None, profile_steps: int = 3) -> dict:
    """First-call (compile + one step) seconds of the train and eval steps, and the median
    of `steps` further train steps, all on one batch of `config.data_dir`; with `profile_dir`,
    `profile_steps` more steps under the profiler and their top operations."""
    mesh = sharding.make_mesh(config.mesh)
    norm_stats, in_batch, batch, batch_sizes = _one_batch(config, mesh)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = create_state(config, mesh)
        eval_step = jax.jit(make_eval_step(graphdef, config, norm_stats), in_shardings=(shardings, in_batch))
        _, eval_first = _timed(eval_step, state, batch)
        train_step = jit_train_step(graphdef, config, norm_stats, shardings, in_batch)
        (state, _), train_first = _timed(train_step, state, batch)
        times = []
        for _ in range(steps):
            (state, _), seconds = _timed(train_step, state, batch)
            times.append(seconds)
        result = {"train_first_s": train_first, "eval_first_s": eval_first, "step_s": float(np.median(times)),
                  "step_s_min": float(np.min(times)), "step_s_max": float(np.max(times)),
                  "batch_sizes": batch_sizes, "peak_bytes_in_use": _peak_bytes()}
        if profile_dir:
            def run_steps():
                nonlocal state
                for _ in range(profile_steps):
                    state, _ = train_step(state, batch)
                jax.block_until_ready(state)
            result["profile"] = profile.top_operations(profile.trace(run_steps, profile_dir))
    return result


def run(config, *, steps: int = 5, layouts=tuple(LAYOUTS), profile_dir: str | None = None,
        profile_steps: int = 3) -> dict:
    """`step_times` for each block layout; per layout samples/s and MFU against the device's
    peak (`ringmoe.flops`: 3 x forward, active experts only; on CPU the peak is a measured
    matmul), the ratios scanned / unrolled and looped / scanned of the layouts run, and `mfu`
    of the layout the config itself uses (`mfu_layout`; configs/base.py runs unrolled).
    `profile_dir`: the last layout's profile goes there."""
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layouts {sorted(unknown)}; choose from {list(LAYOUTS)}")
    peak, peak_source = flops.device_peak_flops(jax.devices()[0], config.model.dtype)
    results, model_flops = {}, None
    for name in layouts:
        c = config.copy_and_resolve_references()
        c.model.scan_layers, c.model.moe.modal_experts_loop = LAYOUTS[name]
        r = step_times(c, steps=steps, profile_dir=profile_dir if name == layouts[-1] else None,
                       profile_steps=profile_steps)
        model_flops = flops.model_flops_per_step(config.model, r["batch_sizes"], training=True)
        r["samples_per_s"] = sum(r["batch_sizes"].values()) / r["step_s"]
        r["mfu"] = flops.mfu(model_flops, r["step_s"], jax.device_count(), peak)
        results[name] = r
    out = {"layouts": results, "model_flops_per_step": model_flops, "peak_flops": peak,
           "peak_flops_source": peak_source, "dtype": config.model.dtype,
           "dispatch": dispatch.resolve(config.model.moe.dispatch),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "devices": jax.device_count(), "jax_version": jax.__version__}
    for a, b in RATIOS:
        if a in results and b in results:
            out[f"{a}_over_{b}"] = {k: results[a][k] / results[b][k] for k in ("train_first_s", "eval_first_s", "step_s")}
    # The layout the config itself trains with (None: a combination no layout names).
    own = {layout: name for name, layout in LAYOUTS.items()}.get(
        (config.model.scan_layers, config.model.moe.modal_experts_loop))
    if own in results:
        out["mfu"], out["mfu_layout"] = results[own]["mfu"], own
    return out


def _compile_seconds(fn, *args) -> dict:
    """Trace, lower and XLA-compile seconds of jax.jit(fn)(*args), and the compiled program's
    fusion count. XLA:CPU compiles a fused computation that repeats once, so the count
    overstates the kernels it generates, which set the compile time (README, "What XLA:CPU
    spends that time on")."""
    start = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {"trace_s": traced_at - start, "lower_s": lowered_at - traced_at, "compile_s": done - lowered_at,
            "fusions": compiled.as_text().count(" fusion(")}


def compile_parts(config) -> dict:
    """Where the train step's compile time goes: trace, lower and compile seconds of its parts,
    each compiled on its own on one batch of `config.data_dir`: the loss (forward), the loss
    with its gradients (`value_and_grad`, as the step takes them), the optimiser update alone
    (global-norm clipping and AdamW over every parameter leaf) and the whole step. The parts
    overlap (the step holds the other three), so they do not add up; their differences say what
    the backward pass and the optimiser cost."""
    mesh = sharding.make_mesh(config.mesh)
    norm_stats, _, batch, _ = _one_batch(config, mesh)
    with jax.set_mesh(mesh):
        graphdef, state, _ = create_state(config, mesh)
        loss_fn = make_loss_fn(graphdef, config, norm_stats)
        tx = make_optimizer(config)
        parts = {
            "forward": (lambda params, batch: loss_fn(params, batch)[0], state.params, batch),
            "value_and_grad": (jax.value_and_grad(loss_fn, has_aux=True), state.params, batch),
            "optimizer": (lambda state, grads: tx.update(grads, state.opt_state, state.params), state, state.params),
            "train_step": (make_train_step(graphdef, config, norm_stats), state, batch),
        }
        result = {name: _compile_seconds(fn, *args) for name, (fn, *args) in parts.items()}
    result["parameter_leaves"] = len(jax.tree.leaves(state.params))
    return result
