"""The RingMoE pretraining loop: one trainer for 1 CPU, 8 fake devices or a pod.

    python -m pretrain.train --config configs/tiny.py --workdir /tmp/run \\
        --config.data_dir=/tmp/synthetic --config.total_steps=300

Mesh from `config.mesh`; state created sharded; the jitted, donated step from
`ringmoe.training.step`; async Orbax checkpoints holding state + data-iterator state
(`ringmoe.training.checkpoint`); metrics to `workdir/metrics.jsonl`, TensorBoard and the
console (`ringmoe.training.metrics`); with `eval_every`, the loss on fixed batches at step
0, every N steps and at the end (`eval/...` metrics: the same pixels and masks
each time, so the curve is free of batch-to-batch noise); PNGs of reconstructions and expert loads. A
workdir with checkpoints resumes from the newest one every process can read, if the config it
was trained under differs only in keys that may change (`pretrain.resume`:
logging intervals, total_steps, mesh, ...; any other difference is an error
naming each key); a workdir written by `tools.upcycle` holds step 0 of a new run
(an upcycled MoE, a fresh optimiser, the data stream from its start) and trains
from there. SIGTERM saves a checkpoint and exits cleanly.

Failures end the run with one message and nothing already saved lost: a save that
fails in the background (`checkpoint.SaveError`, noticed at the next step), too
many non-finite updates or a run whose updates were all skipped (`NonFiniteGuard`),
bad input (`ringmoe.data.pipeline`: RecordError naming the file and record; with
data.max_bad_records > 0, skipped records are logged and counted as `bad_records`
in the metrics and the final line). The final stdout line is strict JSON.

Multi-process (one process per TPU VM host, or per GPU / node under SLURM):
`jax.distributed` is initialised from --coordinator_address/--num_processes/
--process_id or by JAX's own cluster detection (`ringmoe.training.distributed`); each
process reads its own disjoint share of the records and contributes its rows to
the global batch; checkpoints are written collectively (each process its array
shards; the data-iterator states of all processes gathered into the checkpoint);
metrics, TensorBoard and PNGs come from process 0 only.

Before any work the config's values are checked (`pretrain.validate`) and process 0
locks the workdir (`pretrain.lock`: a second run on it stops with 'workdir in use by
pid N'). On the command line, bad input, a bad flag, config key or value and a file
that cannot be read or written end the run with one line on stderr
(`ringmoe.cli`; --debug gives the traceback). Preemption: a single
process stops on SIGTERM; several processes stop together at the step that JAX's
preemption sync manager agrees on (`Checkpointer.reached_preemption`).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import threading
import time
from types import SimpleNamespace

import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from pretrain import resume
from pretrain.lock import workdir_lock
from pretrain.validate import validate_config
from ringmoe import cli, flops, sharding, visualize
from ringmoe.data.pipeline import Pipeline
from ringmoe.training import distributed, tasks
from ringmoe.training.checkpoint import FRESH_DATA_STATE, Checkpointer, SaveError, abstract_with_shardings
from ringmoe.training.metrics import MetricsWriter, flatten_router_stats, json_line, router_load_matrices
from ringmoe.training.state import abstract_state, create_state
from ringmoe.training.step import (abstract_batch, batch_shardings, compile_ahead, jit_train_step, make_eval_step,
                                   to_device)

log = logging.getLogger("ringmoe.train")

_FLAGS = SimpleNamespace()


def define_flags() -> None:
    """The command line. Defined only when this module runs as the program, so that tools
    with flags of their own (tools.ablate's --workdir) can import `train`."""
    _FLAGS.config = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
    _FLAGS.workdir = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, PNGs.")
    _FLAGS.coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
    _FLAGS.num_processes = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-host).")
    _FLAGS.process_id = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
    _FLAGS.log_records = flags.DEFINE_bool(
        "log_records", False, "Audit: each process appends the record indices of every batch it reads to "
        "workdir/records/process_<i>.jsonl.")


class NonFiniteError(RuntimeError):
    """Too many consecutive NaN/Inf updates; the message names the modality and term."""


class NonFiniteGuard:
    """Counts the skipped (NaN/Inf) updates in a row on the host and stops the run on
    either of two rules, both on `limit` = config.max_nonfinite_steps:

    * `limit` skipped updates in a row, anywhere in the run;
    * at the last step of the run (`check(last=True)`), every update of the last
      min(limit, steps this process ran) skipped: a run shorter than `limit`, or resumed
      that close to its end, that learnt nothing in its last steps ends with an error
      instead of exit status 0 (the final step is then not saved).

    A step's 'finite' flag is read only when the host waits for that step anyway, so the
    check costs no device sync of its own: one step late (`check` after the next step was
    queued: the device keeps working while the host reads), or at once when the step is
    logged, checkpointed or the last (`check` before the save: those read the step's
    results regardless). Every step is checked exactly once, the last one included, and
    the error names the step whose flag was read: a step that reaches the limit is never
    saved as a finished checkpoint, and no step after it either.
    """

    def __init__(self, limit: int):
        self.limit, self.run, self.pending, self.checked = limit, 0, None, 0

    def defer(self, step: int, metrics: dict) -> None:
        self.pending = (step, metrics)

    def check(self, *, last: bool = False) -> None:
        """Reads the deferred step's flag (if any); NonFiniteError by the rules above."""
        if self.pending is None:
            return
        (step, metrics), self.pending = self.pending, None
        self.checked += 1
        self.run = 0 if float(metrics["finite"]) else self.run + 1
        if self.run >= self.limit:
            raise NonFiniteError(f"{self.run} consecutive non-finite updates up to step {step}: "
                                 f"{describe_nonfinite(jax.device_get(metrics))}")
        if last and self.run and self.run >= self.checked:
            raise NonFiniteError(f"the run ended at step {step} with every one of its {self.run} updates "
                                 f"non-finite (all skipped; fewer than max_nonfinite_steps = {self.limit} "
                                 f"steps ran): {describe_nonfinite(jax.device_get(metrics))}")


def initialize_distributed(timeout_s: float) -> bool:
    """Starts JAX's multi-controller runtime from the flags or the cluster JAX detects (if any);
    every wait for the other processes lasts at most `timeout_s` (config collective_timeout_s)."""
    return distributed.initialize(_FLAGS.coordinator.value, _FLAGS.num_processes.value, _FLAGS.process_id.value,
                                  timeout_s)


def fixed_eval_batches(task, config, shardings: dict) -> list[dict]:
    """`config.eval_batches` device batches drawn once from the data set with seed + 1."""
    with task.pipeline(config, seed=config.seed + 1, num_workers=0) as pipeline:
        return [to_device(next(pipeline), shardings) for _ in range(config.eval_batches)]


def evaluate(eval_fn, state, batches: list[dict]) -> dict[str, float]:
    """Mean of every loss term over the fixed batches, as 'eval/<term>'."""
    sums: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(eval_fn(state, batch)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {f"eval/{k}": v / len(batches) for k, v in sums.items()}


def describe_nonfinite(metrics: dict) -> str:
    bad = [k for k, v in metrics.items() if k != "router" and not math.isfinite(float(v))]
    terms = [k for k in bad if k not in ("loss", "grad_norm")]
    if terms:
        return "non-finite terms: " + ", ".join(terms)
    return "loss finite but gradients non-finite" if "grad_norm" in bad else "non-finite loss"


def check_saved_config(config, step: int, meta: dict) -> None:
    """Refuses to resume checkpoint `step` if it was trained under a config that differs in a
    key outside `resume.RESUME_ALLOWED` (ConfigMismatchError naming each key and both values);
    logs the allowed differences."""
    if "config" not in meta:
        log.warning("checkpoint %d records no config: cannot check that it matches this run's", step)
        return
    allowed = resume.check_resume(meta["config"], json.loads(config.to_json()), f"checkpoint {step}")
    if allowed:
        log.warning("resuming checkpoint %d under changed settings: %s", step, resume.describe(allowed))


def restore_data_state(pipeline: Pipeline, data_state: dict) -> None:
    """Continues `pipeline` from a checkpoint's data item (`gathered_data_state`): exactly when
    the checkpoint was written by as many processes, elastically otherwise (`Pipeline.restore`).
    A checkpoint that starts a run (`FRESH_DATA_STATE`: an upcycled model's step 0) leaves the
    stream at its start."""
    if data_state == FRESH_DATA_STATE:
        return
    if "processes" not in data_state:
        raise ValueError("the checkpoint's data state holds no process states: it was written before "
                         "the states were gathered, and its data stream cannot resume")
    pipeline.restore(data_state["processes"])


def bad_records(pipeline: Pipeline) -> int:
    """Distinct bad records skipped so far by all processes (collective: every process calls
    it at the same log steps), restored with the data state on resume."""
    return sum(distributed.allgather_json(pipeline.statistics()["bad_records"], "the bad-record count"))


def gathered_data_state(pipeline: Pipeline, step: int) -> dict:
    """Every process's iterator state, in process order (collective), for checkpoint `step`."""
    return {"processes": distributed.allgather_json(pipeline.get_state(), f"checkpoint {step} (the data states)")}


class RecordLog:
    """Audit trail (--log_records): for every batch this process read, the record indices of its
    rows ("records", per modality) and every record the packer consumed for it, placed or not
    ("read": [epoch, record index] pairs; what elastic resume counts)."""

    def __init__(self, workdir: str, enabled: bool):
        self.file = None
        if enabled:
            os.makedirs(os.path.join(workdir, "records"), exist_ok=True)
            self.file = open(os.path.join(workdir, "records", f"process_{jax.process_index()}.jsonl"), "a")

    def write(self, step: int, batch: dict, read: list) -> None:
        if self.file is not None:
            rows = {m: [int(i) for i in b["record_index"]] for m, b in batch.items()}
            self.file.write(json.dumps({"step": step, "records": rows, "read": [list(r) for r in read]}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def train(config, workdir: str, devices=None, *, log_records: bool = False) -> dict:
    """Runs (or resumes) pretraining on `devices` (default: all); returns the last logged metrics.

    The config's values are checked first (`validate.validate_config`: ConfigError naming each
    bad key), then the workdir is locked for the whole run (`lock.workdir_lock`, process 0:
    WorkdirInUseError if another run holds it), before any data or device is touched.
    log_records: each process appends its batches' record indices to workdir/records/."""
    validate_config(config)
    with workdir_lock(workdir, enabled=jax.process_index() == 0):
        return _train(config, workdir, devices, log_records=log_records)


def _train(config, workdir: str, devices, *, log_records: bool) -> dict:
    os.makedirs(workdir, exist_ok=True)
    distributed.set_timeout(config.collective_timeout_s)
    mesh = sharding.make_mesh(config.mesh, devices)
    task = tasks.for_run(config, workdir)
    pipeline = task.pipeline(config)
    norm_stats = {m: {"mean": pipeline.specs[m].mean, "std": pipeline.specs[m].std, "bands": pipeline.specs[m].bands}
                  for m in pipeline.modalities}
    graphdef, abstract, shardings = abstract_state(config, mesh)
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    lead = jax.process_index() == 0
    # Outside the mesh context: on CPU this times a matmul on one local device.
    peak, peak_source = flops.device_peak_flops(jax.local_devices()[0], config.model.dtype)

    global_batch = {m: b * jax.process_count() for m, b in pipeline.batch_sizes.items()}
    step_flops = task.flops_per_step(global_batch)   # outside the mesh: it may build abstract models
    checkpointer.remove_partial_saves()   # what a failed or killed save left behind
    with jax.set_mesh(mesh):
        spec, placed = pipeline.batch_spec(), abstract_with_shardings(abstract, shardings)
        in_batch = batch_shardings(spec, mesh, task.inputs)
        global_spec = {m: {k: ((rows * jax.process_count(), *shape), dtype) for k, ((rows, *shape), dtype) in a.items()}
                       for m, a in spec.items()}   # every process's rows
        compiling = compile_ahead(jit_train_step(graphdef, config, norm_stats, shardings, in_batch), mesh, placed,
                                  abstract_batch(global_spec, in_batch))
        restored = checkpointer.restore_latest(placed, check_meta=functools.partial(check_saved_config, config))
        if restored is not None:
            start, state, data_state, _ = restored
            restore_data_state(pipeline, data_state)
            log.info("resumed from step %d", start)
        else:
            start = 0
            graphdef, state, _ = create_state(config, mesh, (graphdef, abstract, shardings))
            state = task.start(state, mesh)

        writer = MetricsWriter(workdir, total_steps=config.total_steps, enabled=lead)
        writer.truncate_after(start)
        eval_batches = fixed_eval_batches(task, config, in_batch) if config.eval_every else []
        eval_fn = jax.jit(make_eval_step(graphdef, config, norm_stats), in_shardings=(shardings, in_batch),
                          out_shardings=shardings.step)  # replicated: every process can read the losses
        if eval_batches and start == 0:
            writer.write(0, evaluate(eval_fn, state, eval_batches))
        step_fn = compiling.result()
        meta = {"config": json.loads(config.to_json()), "mesh": dict(mesh.shape), "peak_flops_source": peak_source}

        stop = {"signal": None}
        # Several processes must stop at the same step: there JAX's preemption sync manager
        # owns SIGTERM (a Python handler would replace its notifier) and reached_preemption
        # says when; a single process stops on the signal itself. A run on another thread
        # (the demo's RS-MoE stages beside its probes) leaves the signal to the main thread
        # (Python lets only the main thread set handlers).
        owns_sigterm = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum)) if owns_sigterm else None
        records = RecordLog(workdir, log_records)
        last, guard = {}, NonFiniteGuard(config.max_nonfinite_steps)
        window_start, window_steps = time.perf_counter(), 0
        batch, pictures = None, task.pictures and config.pictures
        try:
            for step in range(start, config.total_steps):
                batch = next(pipeline)
                records.write(step + 1, batch, pipeline.last_read)
                device_batch = to_device(batch, in_batch)
                state, metrics = step_fn(state, device_batch)
                window_steps += 1
                checkpointer.check()  # a save that failed since the last step stops the run here
                guard.check()  # the previous step's flag, read now that this one is queued
                done = step + 1
                guard.defer(done, metrics)
                scores = {}
                if eval_batches and (done % config.eval_every == 0 or done == config.total_steps):
                    eval_start = time.perf_counter()
                    scores = evaluate(eval_fn, state, eval_batches)
                    window_start += time.perf_counter() - eval_start  # step timing leaves evaluation out
                if done % config.log_every == 0 or done == config.total_steps:
                    host = jax.device_get(metrics)
                    seconds = (time.perf_counter() - window_start) / window_steps
                    scalars = {k: float(v) for k, v in host.items() if k != "router"}
                    scalars.update(flatten_router_stats(host["router"]))
                    scalars.update({"step_s": seconds, "samples_per_s": sum(global_batch.values()) / seconds,
                                    "tokens_per_s": task.tokens_per_step(global_batch) / seconds,
                                    "model_tflops_per_step": step_flops / 1e12,
                                    "nonfinite_total": float(state.nonfinite),
                                    "bad_records": bad_records(pipeline)})
                    if peak:
                        scalars["mfu"] = flops.mfu(step_flops, seconds, jax.device_count(), peak)
                    scalars.update(scores)
                    writer.write(done, scalars, samples=sum(global_batch.values()))
                    last = {"step": done, **scalars}
                    window_start, window_steps = time.perf_counter(), 0
                elif scores:
                    writer.write(done, scores)
                if pictures and config.image_every and done % config.image_every == 0:
                    save_pictures(workdir, done, graphdef, state, device_batch, metrics, norm_stats, lead)
                preempted = stop["signal"] is not None or checkpointer.reached_preemption(done)
                save = checkpointer.should_save(done) or preempted or done == config.total_steps
                if save or done % config.log_every == 0:
                    # The host waits for this step anyway: check it now, before it is saved.
                    guard.check(last=done == config.total_steps)
                if save:
                    checkpointer.save(done, state, gathered_data_state(pipeline, done), {**meta, "step": done}, force=True)
                if preempted:
                    log.warning("stopping at step %d on request (signal %s); checkpoint saved", done, stop["signal"])
                    break
            guard.check()  # (every step was checked above: a no-op, kept as the guarantee)
            checkpointer.wait()  # the last save: its failure is this run's error
            if pictures and batch is not None and not preempted:
                save_pictures(workdir, "final", graphdef, state, device_batch, metrics, norm_stats, lead)
        finally:
            if owns_sigterm:
                signal.signal(signal.SIGTERM, previous)
            records.close()
            checkpointer.close()
            writer.close()
            pipeline.close()
    return last


PICTURE_ROWS = 4  # images per modality in the reconstruction PNG


def save_pictures(workdir, tag, graphdef, state, device_batch, metrics, norm_stats, lead) -> None:
    """Reconstructions of the first rows of the current global batch, the expert-load heatmap and
    the loss curves. Every process runs the forward pass (it is collective); process 0 draws."""
    model = nnx.merge(graphdef, state.params)
    replicated = jax.sharding.NamedSharding(state.step.sharding.mesh, jax.sharding.PartitionSpec())

    def first_rows(model, batch):
        inputs = {m: {k: b[k] for k in ("pixels", "mask", "valid") if k in b} for m, b in batch.items()}
        out = model(inputs)
        head = lambda x: x[:PICTURE_ROWS]  # noqa: E731
        return ({m: jax.tree.map(head, inputs[m]) for m in inputs},
                {m: {k: head(v) for k, v in o.items() if k in ("reconstruction", "log_power")} for m, o in out.items()})

    batch, outputs = jax.device_get(nnx.jit(first_rows, out_shardings=replicated)(model, device_batch))
    if not lead:
        return
    out_dir = os.path.join(workdir, "pictures")
    os.makedirs(out_dir, exist_ok=True)
    visualize.save_reconstructions(os.path.join(out_dir, f"reconstructions_{tag}.png"), batch, outputs, model,
                                   norm_stats)
    visualize.save_expert_load_heatmap(os.path.join(out_dir, f"expert_load_{tag}.png"),
                                       router_load_matrices(jax.device_get(metrics["router"])))
    visualize.save_loss_curves(os.path.join(out_dir, "loss_curves.png"), os.path.join(workdir, "metrics.jsonl"))


def main(argv):
    cli.no_arguments(argv)
    cli.setup_logging()
    initialize_distributed(_FLAGS.config.value.collective_timeout_s)
    try:
        last = train(_FLAGS.config.value, _FLAGS.workdir.value, log_records=_FLAGS.log_records.value)
    except (NonFiniteError, SaveError) as e:
        raise SystemExit(f"pretrain.train: stopped: {e}") from None
    except resume.ConfigMismatchError as e:
        raise SystemExit(f"pretrain.train: not resumed: {e}") from None
    except distributed.CollectiveTimeoutError as e:
        raise SystemExit(f"pretrain.train: stopped: {e}") from None
    print(json_line(last))   # strict JSON: a NaN loss is null


if __name__ == "__main__":
    define_flags()
    cli.run_absl("pretrain.train", main, required=("config", "workdir"))
