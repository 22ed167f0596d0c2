"""Ahead-of-time compile of the real train step for a target machine: does it fit, how fast could it be.

    python -m tools.aot --config configs/ringmoe_14b.py --topology h100-64 [--config.mesh.fsdp=16 ...]
    python -m tools.aot --config configs/rsmoe_1b.py --topology h100-8

The step is the one of the config's task (`config.task`, `ringmoe.training.tasks`): for
RS-MoE (`rsmoe`) the batch also carries each image's sub-tasks' text arrays
(`ringmoe.vlm.examples.text_shapes`) and the device sees the task's own input keys.

Builds the abstract sharded train state (`ringmoe.training.state.abstract_state`: shapes
only, nothing allocated) on the target's device mesh (`sharding.make_mesh`),
the global batch the target's processes would feed (`pipeline.process_batch_sizes`
per process, times the processes), and the trainer's own jitted step
(`ringmoe.training.step.jit_train_step`: the same function, shardings and donation);
lowers and compiles it, and prints per-device argument / output / temporary
bytes, FLOPs per step and the step time at the target's peak and at 50 % MFU.

Devices: a TPU target uses `jax.experimental.topologies.get_topology_desc`
(compile-only TPU devices) when libtpu is installed; otherwise, and for GPU
targets, the step is compiled by the CPU compiler for the same number of fake
CPU devices, and the output says so (`compiled_for`). The per-device bytes are
then the CPU compiler's buffer assignment of the SPMD-partitioned program: the
state and batch shards are exact, temporaries an estimate (GPU/TPU compilers
schedule and fuse differently). On CPU the tool stops at that buffer assignment
(`ringmoe.compile_memory`: the same numbers as `memory_analysis()`) instead of
building the CPU executable, which takes hours for the 14.7B step;
`--full_compile` builds it. The CPU compile uses XLA's memory-minimising
scheduler (`CPU_XLA_FLAGS`): the CPU default orders work for thread parallelism
and held 2.7x the temporaries on a cut of the 14.7B step, while GPU and TPU
compilers schedule under the device's memory limit. The MoE dispatch `auto` is resolved for the
target's platform, not for the CPU that compiles.

FLOPs: `model_flops_per_step` is the task's analytic count (`flops_per_step`; for
pretraining `ringmoe.flops`: active experts only, 3 x forward, the figure MFU is
defined on; for RS-MoE the frozen encoder's forward plus 6 x the LM parameters per
expert slot token); the step times use it. `xla_flops_per_step` is XLA's cost
analysis (with recomputation, dispatch and padding): of the compiled per-device
program times the devices, or, when the CPU executable is not built, of the
lowered global program. XLA counts a loop body once, so with scanned blocks (`model.scan_layers`) it counts
one block per stage, and the figure is a lower bound (the source says so).

Exceeding the device memory exits with status 1 and a message naming the
largest buffers. The last stdout line is JSON: topology, devices,
per_device_bytes, device_memory_bytes, fits, and the rest of the figures.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from pretrain.validate import validate_config
from ringmoe import cli, compile_memory, sharding, topology
from ringmoe.data.pipeline import batch_spec, process_batch_sizes, served_modalities
from ringmoe.model import dispatch
from ringmoe.training import tasks
from ringmoe.training.checkpoint import abstract_with_shardings
from ringmoe.training.state import abstract_state
from ringmoe.training.step import jit_train_step
from ringmoe.training.step import abstract_batch, batch_shardings

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_TOPOLOGY = flags.DEFINE_enum("topology", None, list(topology.TOPOLOGIES), "Target machine (ringmoe/topology.py).")
_MEMORY = flags.DEFINE_integer("memory_bytes", None, "Device memory to check against (default: the topology's).")
_FULL = flags.DEFINE_bool("full_compile", False, "On fake CPU devices, build the CPU executable and read "
                          "memory_analysis() rather than stopping at the buffer assignment (hours at 14.7B).")
_DUMP = flags.DEFINE_string("dump_to", None, "On fake CPU devices: keep XLA's dump (HLO, buffer assignment) here.")
_TOP = flags.DEFINE_integer("largest", 8, "How many of the largest per-device buffers to name.")

_START = time.perf_counter()
# XLA CPU flags for the fake-device compile (see the module doc). XLA reads them from the
# environment once, when the backend starts (as a compile option this one is ignored).
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def progress(message: str) -> None:
    print(f"[aot {time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def use_fake_cpu_devices(count: int) -> None:
    """Makes the CPU backend hold `count` devices; must run before anything initialises a backend."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), *CPU_XLA_FLAGS)).strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)  # wins over any --xla_force_host_platform_device_count


def target_devices(target: topology.Topology) -> tuple[list, str, str]:
    """(devices, compiled_for, why): compile-only TPU devices if JAX can describe the slice,
    else the fake CPU devices."""
    if target.tpu_topology:
        from jax.experimental import topologies
        try:
            devices = topologies.get_topology_desc(platform="tpu", **target.tpu_topology).devices
            return list(devices), "tpu-topology", f"TPU topology {target.tpu_topology['topology_name']} from libtpu"
        except Exception as e:  # RuntimeError without libtpu; anything else libtpu may raise
            why = f"no TPU topology available to JAX ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    else:
        why = "JAX has no compile-only GPU topology without a CUDA backend"
    devices = jax.devices("cpu")
    if len(devices) != target.devices:
        raise RuntimeError(f"{len(devices)} CPU devices, need {target.devices}: the backend was initialised "
                           "before use_fake_cpu_devices")
    return devices, "cpu-fake-devices", f"{why}; compiled by the CPU compiler for {target.devices} fake devices"


def for_target(config, target: topology.Topology):
    """The config as the target runs it: MoE dispatch `auto` resolved for the target's platform."""
    config = config.copy_and_resolve_references()
    config.model.moe.dispatch = dispatch.resolve(config.model.moe.dispatch, target.platform)
    return config


def placeholder_norm_stats(config) -> dict:
    """Per-band statistics of a data set (mean 0, std 1): they are constants of the step, so
    their values change nothing compiled; band names from the config where it has them."""
    stats = {}
    for m, mc in config.model.modalities.items():
        names = tuple(b[0] for b in mc.get("bands", ()) or ()) or None
        stats[m] = {"mean": np.zeros(mc.channels, np.float32), "std": np.ones(mc.channels, np.float32),
                    "bands": names}
    return stats


def text_shapes(config) -> dict | None:
    """The per-row text arrays a batch of the config's task carries (None for pretraining)."""
    if config.get("task", "pretrain") != "rsmoe":
        return None
    from ringmoe.vlm import examples
    v = config.vlm
    return examples.text_shapes(v.subtasks_per_image, v.instruction_length, v.answer_length)


def per_device_bytes(abstract, shardings) -> list[tuple[str, int]]:
    """(path, bytes on one device) of every array of a tree, from its sharding's shard shape."""
    out = []
    for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(shardings)):
        shard = s.shard_shape(a.shape) if a.shape else ()
        out.append((jax.tree_util.keystr(path), math.prod(shard) * np.dtype(a.dtype).itemsize))
    return out


def compile_step(lowered, compiled_for: str, devices: int) -> dict:
    """memory (per device), temporaries (the largest, where known), xla_flops (per step),
    xla_flops_source, running (a compile thread is left running)."""
    if compiled_for == "cpu-fake-devices" and not _FULL.value:
        jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would dump nothing
        memory, temporaries = compile_memory.cpu_buffer_assignment(lowered, "jit_step", keep_dump=_DUMP.value,
                                                                   largest=_TOP.value)
        return {"memory": memory, "temporaries": temporaries, "xla_flops": _flops(lowered.cost_analysis()),
                "xla_flops_source": "lowered global program", "running": True}
    compiled = lowered.compile()
    per_device = _flops(compiled.cost_analysis())
    return {"memory": compile_memory.from_compiled(compiled), "temporaries": [],
            "xla_flops": per_device * devices if per_device is not None else None,
            "xla_flops_source": "compiled per-device program x devices", "running": False}


def _flops(cost) -> float | None:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv):
    cli.no_arguments(argv)
    target = topology.get(_TOPOLOGY.value)
    if _MEMORY.value is not None:
        target = dataclasses.replace(target, memory_bytes=_MEMORY.value)
    validate_config(_CONFIG.value)
    use_fake_cpu_devices(target.devices)
    config = for_target(_CONFIG.value, target)
    devices, compiled_for, why = target_devices(target)
    progress(f"target {target.describe()}")
    progress(f"compiled for: {compiled_for} ({why})")

    mesh = sharding.make_mesh(config.mesh, devices)
    graphdef, abstract, shardings = abstract_state(config, mesh)
    rows = process_batch_sizes(config, served_modalities(config), target.processes)
    global_rows = {m: b * target.processes for m, b in rows.items()}
    task = tasks.for_run(config)
    spec = batch_spec(config, global_rows, text_shapes(config))
    in_batch = batch_shardings(spec, mesh, task.inputs)
    batch = abstract_batch(spec, in_batch)
    state = abstract_with_shardings(abstract, shardings)
    progress(f"mesh {dict(mesh.shape)}; global batch {global_rows} ({target.processes} processes x {rows}); "
             f"remat {config.model.remat}, dtype {config.model.dtype}, dispatch {config.model.moe.dispatch}, "
             f"grad_accum_steps {config.grad_accum_steps}")

    step = jit_train_step(graphdef, config, placeholder_norm_stats(config), shardings, in_batch)
    progress("lowering ...")
    with jax.set_mesh(mesh):
        lower_start = time.perf_counter()
        lowered = step.lower(state, batch)
        lower_s = time.perf_counter() - lower_start
        partial = compiled_for == "cpu-fake-devices" and not _FULL.value
        progress(f"lowered in {lower_s:.1f} s; compiling" + (" up to the buffer assignment ..." if partial else " ..."))
        compile_start = time.perf_counter()
        compiled = compile_step(lowered, compiled_for, target.devices)
    compile_s = time.perf_counter() - compile_start
    progress(f"compiled in {compile_s:.1f} s")

    memory, xla_flops, running = compiled["memory"], compiled["xla_flops"], compiled["running"]
    if config.model.scan_layers:
        compiled["xla_flops_source"] += "; a scanned stage's loop body counted once (a lower bound)"
    args, outs, temps, alias = memory.argument_bytes, memory.output_bytes, memory.temp_bytes, memory.alias_bytes
    total = memory.total_bytes
    temporaries = compiled["temporaries"]
    state_buffers = per_device_bytes(abstract, shardings)
    state_bytes = sum(n for _, n in state_buffers)
    batch_bytes = sum(n for _, n in per_device_bytes(batch, jax.tree.map(lambda b: b.sharding, batch)))
    model_flops = task.flops_per_step(global_rows)   # outside the mesh context (abstract LM counts)
    at_peak = model_flops / (target.devices * target.peak_flops)
    fits = total <= target.memory_bytes
    flops_note = ("analytic, active experts, 3 x forward" if isinstance(task, tasks.Pretraining) else
                  f"analytic, the {config.task} task's flops_per_step")
    largest = sorted(state_buffers, key=lambda x: -x[1])[:_TOP.value]

    print(f"per device: arguments {gb(args)} (train state {gb(state_bytes)}, batch {gb(batch_bytes)}), "
          f"outputs {gb(outs)}, temporaries {gb(temps)}, aliased (donated) {gb(alias)}")
    print(f"per device total {gb(total)} of {gb(target.memory_bytes)}: "
          f"{'fits' if fits else 'DOES NOT FIT'} ({100 * total / target.memory_bytes:.0f} %)")
    print(f"model FLOPs per step {model_flops:.4g} ({flops_note}); "
          f"XLA-counted {xla_flops:.4g} ({compiled['xla_flops_source']})" if xla_flops else "XLA cost analysis: none")
    print(f"step time at {target.peak_flops / 1e12:.0f} TFLOP/s peak per device: {at_peak:.3f} s; "
          f"at 50 % MFU: {2 * at_peak:.3f} s")
    result = {
        "topology": target.name, "devices": target.devices, "processes": target.processes,
        "compiled_for": compiled_for, "note": why,
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "task": config.get("task", "pretrain"),
        "mesh": dict(mesh.shape), "batch_size": config.batch_size, "global_batch": global_rows,
        "grad_accum_steps": config.grad_accum_steps, "remat": config.model.remat, "dtype": config.model.dtype,
        "dispatch": config.model.moe.dispatch,
        "per_device_bytes": int(total), "argument_bytes": int(args), "output_bytes": int(outs),
        "temp_bytes": int(temps), "alias_bytes": int(alias), "state_bytes_per_device": int(state_bytes),
        "batch_bytes_per_device": int(batch_bytes), "device_memory_bytes": target.memory_bytes, "fits": fits,
        "model_flops_per_step": model_flops, "xla_flops_per_step": xla_flops, "xla_flops_source": compiled["xla_flops_source"],
        "memory_source": "buffer assignment (CPU executable not built)" if running else "compiled.memory_analysis()",
        "peak_flops_per_device": target.peak_flops, "step_s_at_peak": at_peak, "step_s_at_50pct_mfu": 2 * at_peak,
        "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
        "largest_state_buffers_per_device": [[name, n] for name, n in largest],
        "largest_temporaries_per_device": [[name, shape, n] for name, shape, n in temporaries],
    }
    if temporaries:
        print("largest temporaries per device: " + "; ".join(f"{n} {s} {gb(b)}" for n, s, b in temporaries))
    if not fits:
        named = "; ".join(f"{name} {gb(n)}" for name, n in largest)
        temps_named = "; ".join(f"{n} {s} {gb(b)}" for n, s, b in temporaries)
        print(f"tools.aot: {target.name}: {gb(total)} per device exceeds the {gb(target.memory_bytes)} of a "
              f"device (arguments {gb(args)}, outputs {gb(outs)}, temporaries {gb(temps)}, aliased {gb(alias)}); "
              + (f"largest temporaries: {temps_named}; " if temporaries else "")
              + f"largest state buffers per device: {named}", file=sys.stderr)
    print(json.dumps(result), flush=True)
    sys.stderr.flush()
    if running:  # the CPU compile thread is still building the executable nobody needs
        os._exit(0 if fits else 1)
    if not fits:
        sys.exit(1)


if __name__ == "__main__":
    cli.run_absl("tools.aot", main, required=("config", "topology"))
