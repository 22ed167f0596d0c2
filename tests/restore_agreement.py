"""One of the two processes of tests/test_multiprocess.py::test_processes_agree_on_the_restored_step.

No training: saves steps 1..3 of a small array sharded over both processes'
devices (collectively, like the trainer), then restores the newest checkpoint
with a fresh Checkpointer, as a resumed run does, and prints one JSON line:
the step it restored and this process's shards. The test makes some reads fail
on one process only (the RINGMOE_TEST_UNREADABLE hook of ringmoe/training/checkpoint.py,
set only for the restore phase).

    python -m tests.restore_agreement WORKDIR PORT PROCESS_ID
"""
import json
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ringmoe.training import distributed
from ringmoe.training.checkpoint import Checkpointer

STEPS = 3


def main(workdir: str, port: str, process_id: str) -> None:
    distributed.initialize(f"localhost:{port}", 2, int(process_id))
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


if __name__ == "__main__":
    main(*sys.argv[1:])
