"""The real train and eval steps, timed: compile (first call) and steady-state step time.

`tools.bench step` runs it for each block layout (`model.scan_layers` False and True)
on the same batch of the same data set, so the two are compared in one run: what
scanning the blocks saves in compile time and what, if anything, it costs per step.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from ringmoe import flops, sharding
from ringmoe.data.pipeline import Pipeline
from ringmoe.training.state import create_state
from ringmoe.training.step import batch_shardings, jit_train_step, make_eval_step, to_device


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def step_times(config, *, steps: int) -> dict:
    """First-call (compile + one step) seconds of the train and eval steps, and the median
    of `steps` further train steps, all on one batch of `config.data_dir`."""
    mesh = sharding.make_mesh(config.mesh)
    with Pipeline(config, num_workers=0) as pipeline:
        norm_stats = {m: {"mean": s.mean, "std": s.std, "bands": s.bands} for m, s in pipeline.specs.items()}
        in_batch = batch_shardings(pipeline.batch_spec(), mesh)
        batch = to_device(next(pipeline), in_batch)
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
    return {"train_first_s": train_first, "eval_first_s": eval_first, "step_s": float(np.median(times)),
            "batch_sizes": dict(pipeline.batch_sizes)}


def run(config, *, steps: int = 5) -> dict:
    """`step_times` with the blocks unrolled and scanned; ratios scanned / unrolled, and the
    scanned step's MFU against the device's peak (`ringmoe.flops`: 3 x forward, active experts
    only; on CPU the peak is a measured float32 matmul)."""
    layouts = {}
    for name, scanned in (("unrolled", False), ("scanned", True)):
        c = config.copy_and_resolve_references()
        c.model.scan_layers = scanned
        layouts[name] = step_times(c, steps=steps)
    scanned = layouts["scanned"]
    ratios = {k: scanned[k] / layouts["unrolled"][k] for k in ("train_first_s", "eval_first_s", "step_s")}
    model_flops = flops.model_flops_per_step(config.model, scanned["batch_sizes"], training=True)
    peak, peak_source = flops.device_peak_flops(jax.devices()[0], config.model.dtype)
    return {"layouts": layouts, "scanned_over_unrolled": ratios, "model_flops_per_step": model_flops,
            "mfu": flops.mfu(model_flops, scanned["step_s"], jax.device_count(), peak), "peak_flops": peak,
            "peak_flops_source": peak_source, "backend": jax.default_backend(), "devices": jax.device_count()}
