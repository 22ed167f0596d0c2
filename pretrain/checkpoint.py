"""Orbax checkpoints of the whole run: train state + data-iterator state + run metadata.

Saves are asynchronous (training continues while arrays are written) and every
process writes its own shards collectively. A step directory only becomes
visible once Orbax has finalised it, so a save interrupted mid-way is never
restored; a finalised step whose files were truncated or corrupted later is
skipped with a warning naming it, moved aside to `<step>.unreadable` (kept for
inspection, never deleted) and the next older one is restored.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("ringmoe.checkpoint")


class Checkpointer:
    """Keeps the newest `keep` checkpoints of a run under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, save_every: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.save_every = save_every

    def should_save(self, step: int) -> bool:
        """Every `save_every` steps. (Orbax's own default policy would also save the first
        step of every run: one more full copy of the state, 206 GB at 14.7B.)"""
        return step % self.save_every == 0

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Starts an async save of step `step`; returns whether one was started."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process was told to stop (JAX's multi-host signal)."""
        return self.manager.reached_preemption(step)

    def restore_latest(self, abstract_state, check_meta=None) -> tuple[int, object, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable checkpoint, or None.

        `abstract_state` carries the target shardings, so a checkpoint written
        under one mesh restores under another. `check_meta(step, meta)` runs on a
        checkpoint's metadata before its arrays are read; what it raises propagates
        (a refused checkpoint is neither restored nor moved aside).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            meta = self._read(step, meta=ocp.args.JsonRestore())
            if meta is None:
                continue
            if check_meta is not None:
                check_meta(step, meta.meta)
            restored = self._read(step, state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  meta=ocp.args.JsonRestore())
            if restored is not None:
                return step, restored.state, restored.data, restored.meta
        return None

    def latest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest checkpoint whose metadata reads; nothing is moved aside."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception:  # noqa: BLE001 -- damaged: restore_latest moves it aside when it gets there
                continue
        return None

    def _read(self, step: int, **items):
        """The restored Composite of `items`, or None with the step moved aside if it is unreadable."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            path = os.path.join(self.directory, str(step))
            aside = f"{path}.unreadable"
            log.warning("checkpoint %s is unreadable (%s: %s); moved to %s, trying the previous one",
                        path, type(e).__name__, (str(e).splitlines() or [""])[0][:200], aside)
            if jax.process_index() == 0:
                os.replace(path, aside)
            self.manager.reload()
            return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs that also name where each restored array must live."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
