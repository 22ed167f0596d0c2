"""One of the two processes of tests/test_multiprocess.py::test_processes_agree_on_the_restored_step.

No training: saves steps 1..3 of a small array sharded over both processes'
devices (collectively, like the trainer), then restores the newest checkpoint
with a fresh Checkpointer, as a resumed run does, and prints one JSON line:
the step it restored and this process's shards. The test makes some reads fail
on one process only (the RINGMOE_TEST_UNREADABLE hook of ringmoe/training/checkpoint.py,
set only for the restore phase).

    python -m tests.restore_agreement WORKDIR PORT PROCESS_ID

With a fourth argument PROCESS:open, PROCESS:restore or PROCESS:save (and
RINGMOE_TEST_TIMEOUT seconds), that process hangs (sleeps) before opening the
checkpoints, before restoring, or before the trainer's gather of the data states
at a save, and the other prints the error its wait ends with: the collective
timeout (tests/test_elastic.py).
"""
import json
import os
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ringmoe.training import distributed
from ringmoe.training.checkpoint import Checkpointer

STEPS = 3


def main(workdir: str, port: str, process_id: str, hung: str | None = None) -> None:
    distributed.initialize(f"localhost:{port}", 2, int(process_id),
                           timeout_s=float(os.environ.get("RINGMOE_TEST_TIMEOUT", distributed.DEFAULT_TIMEOUT_S)))
    if hung is not None:
        return wait_for(workdir, *hung.split(":"))
    sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec("data"))

    def state(step: int):
        values = np.arange(8, dtype=np.float32) * step
        return {"w": jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])}

    hook = os.environ.pop("RINGMOE_TEST_UNREADABLE", None)  # saves must succeed
    checkpointer = Checkpointer(workdir, keep=STEPS, save_every=1)
    for step in range(1, STEPS + 1):
        checkpointer.save(step, state(step), {"processes": [step]}, {"step": step})
    checkpointer.close()

    if hook is not None:
        os.environ["RINGMOE_TEST_UNREADABLE"] = hook
    checkpointer = Checkpointer(workdir, keep=STEPS, save_every=1)
    abstract = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding)}
    step, restored, data, meta = checkpointer.restore_latest(abstract)
    shards = [np.asarray(s.data).tolist() for s in restored["w"].addressable_shards]
    print(json.dumps({"process": jax.process_index(), "step": step, "shards": shards, "data": data,
                      "meta": meta}), flush=True)
    checkpointer.close()


def wait_for(workdir: str, hung: str, where: str) -> None:
    """Process `hung` sleeps before `where` (open, restore, save); the other opens and restores,
    or opens and gathers the data states of checkpoint 7 as the trainer does before a save."""
    start = time.monotonic()
    if jax.process_index() == int(hung):
        if where != "open":
            Checkpointer(workdir, keep=1, save_every=1)
        time.sleep(600)
        return
    try:
        checkpointer = Checkpointer(workdir, keep=1, save_every=1)
        if where == "save":
            from pretrain.train import gathered_data_state

            class Pipeline:   # the one method the gather calls
                def get_state(self):
                    return {}
            gathered_data_state(Pipeline(), 7)
        else:
            checkpointer.restore_latest({})
        error = None
    except distributed.CollectiveTimeoutError as e:
        error = str(e)
    print(json.dumps({"process": jax.process_index(), "error": error,
                      "waited_s": round(time.monotonic() - start, 2)}), flush=True)
    os._exit(0)  # not JAX's exit-time shutdown, which would wait for the hung process


if __name__ == "__main__":
    main(*sys.argv[1:])
