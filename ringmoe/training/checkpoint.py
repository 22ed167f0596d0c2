"""Orbax checkpoints of the whole run: train state + data-iterator state + run metadata.

Saves are asynchronous (training continues while arrays are written) and every
process writes its own shards collectively. A step directory only becomes
visible once Orbax has finalised it, so a save interrupted mid-way is never
restored.

Resume restores the same step on every process, the newest one that every
process can read; a finalised step whose files were later truncated, corrupted
or are unreadable from one host is skipped. `restore_latest`:

1. each process probes the steps it sees, from files alone (no collective): the
   step's metadata and data-iterator JSON and the state's tree metadata;
2. the processes gather every probe (`distributed.allgather_json`) and take the
   newest step that all of them read;
3. all restore that step; a process whose read of its array shards fails still
   passes Orbax's restore barrier, and the processes gather again whether each
   one succeeded: if any failed, all go on to the next older common step.

The probe reads no arrays, so it is cheap (a few small files per step) and a
step damaged only in its array files passes it: step 3 catches that.

A step that some process cannot read is moved aside to `<step>.unreadable` by
process 0 alone (kept for inspection, never deleted), with a warning on every
process naming the step and each process that failed, with its error. One
process runs the same code (its gathers return at once).

A failed save (a full disk, a lost mount, a permission error) happens in Orbax's
background threads. `check()`, called every step, notices it as soon as that save
has ended, without waiting for one still running; `save()` and `wait()` notice it
too. Each raises SaveError once, one line: "checkpoint 20 failed: no space left on
device (...); last good checkpoint: 10 (...)". Orbax's own error records for it,
which carry a traceback from each of its threads, are cut to one line each
(`_OneLineOrbaxErrors`). The failed step is not finalised, so nothing older is
deleted by `keep`; the save's other writes are waited for (`_drain`), the trainer
stops and `close()` shuts the manager down. The
partial `<step>.orbax-checkpoint-tmp` directory it leaves is removed when the next
run starts (`remove_partial_saves`, process 0, with a warning).

Waiting: the gathers wait at most `collective_timeout_s` for every process
(`distributed.allgather_json`), then fail with an error naming the processes
that did not arrive; they come before Orbax's own barriers at both a save (the
data states) and a restore (the probes), so a hung process is named there. A
process that dies is also noticed by JAX's coordination service
(jax.distributed.initialize's heartbeat_timeout_seconds, 100 s by default).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp

from ringmoe.errors import describe
from ringmoe.training import distributed

log = logging.getLogger("ringmoe.checkpoint")

# Orbax names its barriers "<prefix>_<name>"; this run sets the prefix, so that a restore that
# raised can pass the barrier that ends every CheckpointManager.restore (orbax-checkpoint 0.12,
# _src/checkpointers/checkpointer.py Checkpointer.restore) and that the failure skipped.
_BARRIER_PREFIX = "ringmoe"
_ORBAX_RESTORE_BARRIER = ocp.multihost.unique_barrier_key("Checkpointer:restore", prefix=_BARRIER_PREFIX)


# How Orbax names the directory of a save until it is finalised (orbax-checkpoint 0.12:
# "<step>.orbax-checkpoint-tmp", and the same suffix on each item inside it).
TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX


# Replica-parallel saving (Orbax's default off GPU) splits the write of a replicated array
# among its replicas, at the price of one compiled slice per array shape and sharding on the
# first save: 312 slices, 9.4 s of a 10 s first save for the 2-modality micro model on 8 CPU
# devices. Below 1 MiB per replica a split write saves nothing; the big arrays at scale keep it.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


@functools.cache
def _register_array_handler() -> None:
    """Orbax's jax.Array handler, with replica-parallel saving only above the size above
    (once per process: Orbax logs each override)."""
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES),
        override=True)


# The data item of a checkpoint that starts a run rather than continuing one (an upcycled
# model's step 0, `ringmoe.upcycle.build.write_run`): the data stream starts at its beginning.
FRESH_DATA_STATE = {"stream": "start"}


class SaveError(RuntimeError):
    """An asynchronous checkpoint save failed; the message names the step, the cause and
    the newest checkpoint that is still good."""


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, save_every: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        _OneLineOrbaxErrors.install()
        _register_array_handler()
        self._saving: int | None = None   # step of the save started last and not yet checked
        # Orbax's manager waits for every process without a limit: wait with one first.
        distributed.barrier(f"the opening of {self.directory}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=True, create=True,
                                               multiprocessing_options=ocp.options.MultiprocessingOptions(
                                                   barrier_sync_key_prefix=_BARRIER_PREFIX))
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.save_every = save_every

    def should_save(self, step: int) -> bool:
        """Every `save_every` steps. (Orbax's own default policy would also save the first
        step of every run: one more full copy of the state, 206 GB at 14.7B.)"""
        return step % self.save_every == 0

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save of step `step`; returns whether one was started. Waits for the
        previous save first: SaveError if that one failed, or if this one cannot start."""
        self.wait()
        try:
            started = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 -- the synchronous part (directories, the array copy)
            raise self._failed(step, e) from None
        if started:
            self._saving = step
        return started

    def remove_partial_saves(self) -> None:
        """Process 0 removes the `<step>.orbax-checkpoint-tmp` directories of saves that never
        finished (failed, or the process died): never restorable (Orbax lists finalised steps
        only), they only hold disk space, which may be what the failed save lacked. Each
        removal is a warning. Only the run that owns the workdir calls this (the trainer, at
        start): a tool reading a live run's checkpoints would remove the save in progress."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if TMP_SUFFIX in name and os.path.isdir(path):
                log.warning("removing %s: the partial directory of a checkpoint save that did not finish", path)
                shutil.rmtree(path, ignore_errors=True)

    def check(self) -> None:
        """SaveError if the save started last has ended in failure; returns at once while it
        is still running (no wait), so the trainer calls it every step."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Waits for the save in flight (if any); SaveError if it failed."""
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- whatever the writer raised (OSError, TensorStore's ValueError)
            self._drain()
            raise self._failed(step, e) from None

    def _drain(self, timeout_s: float = 600.0) -> None:
        """Waits for the other writes of a failed save. Orbax's commit thread stops at the first
        write that fails and leaves the rest (the array shards) running; closing the manager
        under them, or exiting, makes each one fail again on a closed event loop with a traceback
        of its own (thousands at scale). Reaches into orbax-checkpoint 0.12's AsyncCheckpointer
        (`_async_manager._commit_futures`); with other internals it does nothing."""
        manager = getattr(getattr(self.manager, "_checkpointer", None), "_async_manager", None)
        for future in list(getattr(manager, "_commit_futures", None) or ()):
            try:
                future.result(timeout=timeout_s)
            except Exception:  # noqa: BLE001 -- the same failure again, already reported
                pass

    def _failed(self, step: int | None, error: Exception) -> SaveError:
        """The one-line SaveError for a failed save of `step`, naming the newest good checkpoint."""
        try:
            self.manager.reload()   # the failed step is not listed; older ones were not deleted
            good = sorted(s for s in self.manager.all_steps() if s != step)
        except Exception:  # noqa: BLE001 -- the directory itself may be what failed
            good = []
        last = (f"last good checkpoint: {good[-1]} ({os.path.join(self.directory, str(good[-1]))})" if good
                else f"no earlier checkpoint in {self.directory}")
        what = "a checkpoint" if step is None else f"checkpoint {step}"
        return SaveError(f"{what} failed: {_cause(error)}; {last}")

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process was told to stop (JAX's multi-host signal)."""
        return self.manager.reached_preemption(step)

    def restore_latest(self, abstract_state, check_meta=None) -> tuple[int, object, dict, dict] | None:
        """(step, state, data_state, meta) of the newest checkpoint every process reads, or None.

        Collective: every process must call it, and all return the same step.
        `abstract_state` carries the target shardings, so a checkpoint written
        under one mesh restores under another. `check_meta(step, meta)` runs on
        the agreed checkpoint's metadata before its arrays are read; what it
        raises propagates (a refused checkpoint is neither restored nor moved
        aside). It sees the same metadata on every process, so it decides alike.
        """
        probes = {step: self._probe(step) for step in self.manager.all_steps()}
        seen = distributed.allgather_json({str(step): error for step, (_, error) in probes.items()},
                                          f"the restore of {self.directory} (which steps each process reads)")
        moved = False
        for step in sorted({int(s) for steps in seen for s in steps}, reverse=True):
            failed = {p: steps.get(str(step), "not found") for p, steps in enumerate(seen)}
            failed = {p: error for p, error in failed.items() if error is not None}
            if not failed:
                if check_meta is not None:
                    check_meta(step, probes[step][0])
                restored, error = self._restore(step, abstract_state)
                failed = {p: e for p, e in enumerate(distributed.allgather_json(
                    error, f"the restore of checkpoint {step} (whether each process read it)")) if e is not None}
                if not failed:
                    self._after_moving(moved)
                    return step, restored.state, restored.data, restored.meta
            self._move_aside(step, failed)
            moved = True
        self._after_moving(moved)
        return None

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint this process reads (`_probe`: no collective,
        nothing moved aside; restore_latest moves a damaged one aside when it gets there)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            meta, error = self._probe(step)
            if error is None:
                return step, meta
        return None

    def _probe(self, step: int) -> tuple[dict | None, str | None]:
        """(meta, None) if this process reads the step's JSON items and its state's tree
        metadata, else (None, error). Files only: no collective, so processes may disagree."""
        path = pathlib.Path(self.directory, str(step))
        handler = ocp.StandardCheckpointHandler()
        try:
            _test_hook(step, "probe")
            meta = ocp.JsonCheckpointHandler().restore(path / "meta")
            ocp.JsonCheckpointHandler().restore(path / "data")
            handler.metadata(path / "state")
            return meta, None
        except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many types for damaged files
            return None, describe(e)
        finally:
            handler.close()

    def _restore(self, step: int, abstract_state) -> tuple[object | None, str | None]:
        """(the restored Composite, None), or (None, error). A failed restore has skipped the
        barrier that ends Orbax's restore on the other processes: this one passes it here, so
        the collectives that follow stay paired."""
        try:
            _test_hook(step, "restore")
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore())), None
        except Exception as e:  # noqa: BLE001 -- as in _probe
            ocp.multihost.sync_global_processes(_ORBAX_RESTORE_BARRIER)
            return None, describe(e)

    def _move_aside(self, step: int, failed: dict[int, str]) -> None:
        """Process 0 renames step `step` to `<step>.unreadable`; every process warns."""
        path = os.path.join(self.directory, str(step))
        aside = f"{path}.unreadable"
        who = "; ".join(f"process {p} ({error})" for p, error in sorted(failed.items()))
        log.warning("checkpoint %s is unreadable on %s: moved to %s, every process tries the previous one",
                    path, who, aside)
        if jax.process_index() == 0 and os.path.isdir(path):
            os.replace(path, aside)

    def _after_moving(self, moved: bool) -> None:
        """After process 0 moved steps aside, every process re-lists the steps (once they are moved)."""
        if moved:
            if jax.process_count() > 1:
                distributed.barrier("the checkpoints moved aside")
            self.manager.reload()

    def close(self) -> None:
        """Waits for the save in flight and closes the manager. Never raises: it runs while
        another error may be on its way out (a failure not reported yet is logged, one line);
        call `wait()` first to have a failed last save raise."""
        try:
            self.wait()
        except SaveError as e:
            log.error("%s", e)
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001 -- as above: report, do not mask the error in flight
            log.error("closing the checkpoint manager of %s: %s", self.directory, describe(e))




def _cause(e: BaseException) -> str:
    """'no space left on device (/run/checkpoints/20.orbax-checkpoint-tmp/...)' for an OSError
    (also one found as the cause of a wrapping error); the first line of anything else."""
    seen = e
    while seen is not None and not (isinstance(seen, OSError) and seen.strerror):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        if "No space left on device" in str(e) or f"errno {errno.ENOSPC}" in str(e).lower():
            return f"no space left on device ({describe(e)})"
        return describe(e)
    where = f" ({seen.filename})" if seen.filename else ""
    return f"{seen.strerror[:1].lower()}{seen.strerror[1:]}{where}"


class _OneLineOrbaxErrors(logging.Filter):
    """Cuts Orbax's error records to one line: a failed save is logged with a full traceback
    by each thread it passes through (each item's writer, the commit thread, the finalize
    thread), where SaveError already says what happened. Keeps the record (message and the
    exception's first line), drops the traceback. Installed once on absl's logger."""

    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            logging.getLogger("absl").addFilter(cls())
            cls._installed = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()} ({describe(error)})", ()
            record.exc_info, record.exc_text = None, None
        return True


def _test_hook(step: int, phase: str) -> None:
    """TEST HOOK, unset in real runs: RINGMOE_TEST_UNREADABLE="1:3:probe,1:2:restore" makes
    process 1's probe of step 3 and its restore of step 2 fail, a host-local read failure on
    demand (tests/test_multiprocess.py)."""
    for entry in filter(None, os.environ.get("RINGMOE_TEST_UNREADABLE", "").split(",")):
        process, bad, when = entry.split(":")
        if (int(process), int(bad), when) == (jax.process_index(), step, phase):
            raise OSError(f"RINGMOE_TEST_UNREADABLE: process {process} cannot {phase} step {step}")


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs that also name where each restored array must live."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
