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
  process 0 only).
"""
from __future__ import annotations

import json
import logging

import jax
import numpy as np

log = logging.getLogger("ringmoe.distributed")

_NOTHING_DETECTED = "coordinator_address should be defined"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts jax.distributed; returns False (single process) when nothing asks for it.

    Arguments left None are detected by JAX. Only "no cluster at all" is
    tolerated; a cluster that is found but misconfigured is an error.
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as e:
        if explicit or _NOTHING_DETECTED not in str(e):
            raise
        log.debug("no cluster detected by JAX: single process")
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def allgather_json(value) -> list:
    """[value of process 0, value of process 1, ...] on every process (collective: all must call)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]
