"""Multi-process plumbing: starting JAX's multi-controller runtime, and sharing small host values.

One process runs per host (TPU VM) or per GPU / node (SLURM); every process runs
the same program on its own devices and XLA SPMD does the communication. What
this module adds is only what the trainer needs around that:

* `initialize`: `jax.distributed.initialize` from explicit arguments, or from
  whatever JAX's own cluster detection finds (SLURM under `srun`, Cloud TPU VMs
  via their metadata, Open MPI, Kubernetes, or JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES / JAX_PROCESS_ID given as flags); with nothing found the run
  stays single-process;
* `allgather_json`: every process's small JSON value on every process (the data
  iterators' resume states, which Orbax's JSON items would otherwise take from
  process 0 only), through the coordination service's key-value store, with a
  deadline: a process that does not arrive within `set_timeout` seconds (config
  `collective_timeout_s`) ends every process that waits for it with a
  `CollectiveTimeoutError` naming it and the wait, instead of a silent hang.
  The trainer's waits at start-up (jax.distributed.initialize, then the restore's
  gather), at each checkpoint (the data states) and at a restore (the probes and
  the agreement) all go through it; Orbax's own barriers come after them.
"""
from __future__ import annotations

import itertools
import json
import logging
import time

import jax

log = logging.getLogger("ringmoe.distributed")

_NOTHING_DETECTED = "coordinator_address should be defined"


DEFAULT_TIMEOUT_S = 600.0   # ringmoe.config's collective_timeout_s
_timeout_s = DEFAULT_TIMEOUT_S
_gathers = itertools.count()   # every process gathers in the same order: the n-th gather's keys


class CollectiveTimeoutError(RuntimeError):
    """A process did not arrive at a collective wait in time (the message names it)."""


def set_timeout(seconds: float) -> None:
    """How long `allgather_json` waits for the slowest process (config collective_timeout_s)."""
    global _timeout_s
    if not seconds > 0:
        raise ValueError(f"collective timeout must be > 0 seconds, got {seconds}")
    _timeout_s = float(seconds)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Starts jax.distributed; returns False (single process) when nothing asks for it.

    Arguments left None are detected by JAX. Only "no cluster at all" is
    tolerated; a cluster that is found but misconfigured is an error. Every
    process must connect within `timeout_s` (JAX's error then names the missing
    tasks); later waits use the same limit (`set_timeout`).
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    set_timeout(timeout_s)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=max(1, round(timeout_s)))
    except ValueError as e:
        if explicit or _NOTHING_DETECTED not in str(e):
            raise
        log.debug("no cluster detected by JAX: single process")
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def allgather_json(value, what: str = "a gather") -> list:
    """[value of process 0, value of process 1, ...] on every process (collective: all must call,
    in the same order). `what` names the wait in the CollectiveTimeoutError raised when some
    process has not arrived within the timeout."""
    if jax.process_count() == 1:
        return [value]
    from jax._src import distributed as jax_distributed  # the coordination service's client: no public API
    client = jax_distributed.global_state.client
    me, count, n = jax.process_index(), jax.process_count(), next(_gathers)
    key = f"ringmoe/gather/{n}"
    client.key_value_set(f"{key}/{me}", json.dumps(value))
    deadline = time.monotonic() + _timeout_s
    values = []
    for process in range(count):
        wait_ms = max(1, int(1000 * (deadline - time.monotonic())))
        try:
            values.append(json.loads(client.blocking_key_value_get(f"{key}/{process}", wait_ms)))
        except Exception as e:  # noqa: BLE001 -- the runtime raises its own error type for a deadline
            arrived = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(f"{key}/")}
            missing = [p for p in range(count) if p not in arrived]
            if not missing:
                raise
            raise CollectiveTimeoutError(
                f"waiting at {what}: process{'es' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} of {count} did not arrive within {_timeout_s:g} s "
                f"(collective_timeout_s; this is process {me})") from e
    if n >= 2:   # every process has read gather n - 2 once any reached gather n: drop our key of it
        client.key_value_delete(f"ringmoe/gather/{n - 2}/{me}")
    return values


def barrier(what: str) -> None:
    """Waits until every process reaches the same barrier (`allgather_json` of nothing)."""
    allgather_json(None, what)
