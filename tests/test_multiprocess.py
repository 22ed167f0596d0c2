"""Multi-process training: 2 processes x 4 CPU devices train exactly like 1 process x 8 devices.

Both runs are the real trainer: the single process in this test process (its 8
fake devices), the two processes as `python -m pretrain.train` joined by
`jax.distributed` on localhost (gloo CPU collectives). The data set
has only paired records and no shuffling, so the strided per-process shards put
the same records into each global batch as the single process does (crops and
masks are keyed by record, not by process): the losses must agree. The record
audit (--log_records) shows what each process read.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pretrain.ablate import load_config_file
from pretrain.train import train
from ringmoe.data import synthetic
from tests.xla import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RECORDS = 32   # one epoch = 4 steps of 8 records (each fills one row of both modalities)

CONFIG = '''
from tests.small import micro_config


def get_config():
    c = micro_config(("optical", "sar_l1"))
    c.mesh.update({"data": 4, "expert": 2})
    c.batch_size = 16
    c.data.shuffle = False
    c.data.prefetch = 0
    c.total_steps = %d
    c.log_every = 1
    c.eval_every = 0
    c.image_every = 0
    c.checkpoint_every = 2
    return c
''' % STEPS


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    synthetic.write(str(root / "data"), RECORDS, 32, seed=0, paired_fraction=1.0, labeled=False)
    (root / "config.py").write_text(CONFIG)
    return root


def trainer(setup, workdir, devices, *extra, env=None):
    # No persistent compilation cache: JAX writes it from process 0 only, so process 0 would start
    # its first step long before process 1 has compiled, and gloo gives up waiting after 30 s.
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
               XLA_FLAGS=xla_flags(devices), **(env or {}))
    args = [sys.executable, "-m", "pretrain.train", f"--config={setup / 'config.py'}", f"--workdir={workdir}",
            f"--config.data_dir={setup / 'data'}", "--log_records", *extra]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=300) -> list[str]:
    """Waits for all; kills the rest if one fails (a lone process would wait for its peer)."""
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"trainer exited {p.returncode}:\n{err[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(setup, workdir, *extra, env=None) -> list[str]:
    coordinator = f"--coordinator_address=localhost:{free_port()}"
    return finish([trainer(setup, workdir, 4, coordinator, "--num_processes=2", f"--process_id={i}", *extra, env=env)
                   for i in range(2)])


def metrics(workdir) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def records(workdir, process) -> dict[int, set[int]]:
    """step -> record indices this process read for that step (all modalities)."""
    with open(workdir / "records" / f"process_{process}.jsonl") as f:
        return {r["step"]: {i for rows in r["records"].values() for i in rows} for r in map(json.loads, f)}


def test_two_processes_train_like_one(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    config = load_config_file(str(setup / "config.py"))
    config.data_dir = str(setup / "data")
    train(config, str(one), log_records=True)
    outs = two_processes(setup, two)

    # Metrics: one line per step, written by process 0 alone; the same losses as one process.
    single, multi = metrics(one), metrics(two)
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=1e-5)
    assert all(np.isfinite(r["loss"]) for r in single) and len({r["loss"] for r in single}) == STEPS
    progress = [[line for line in out.splitlines() if line.startswith("step ")] for out in outs]
    assert len(progress[0]) == STEPS and not progress[1]

    # Data: disjoint shares per process, together exactly the single process's batches.
    share = [records(two, 0), records(two, 1)]
    whole = records(one, 0)
    assert sorted(whole) == sorted(share[0]) == sorted(share[1]) == list(range(1, STEPS + 1))
    for step in whole:
        assert not share[0][step] & share[1][step]
        assert share[0][step] | share[1][step] == whole[step]
    assert not set().union(*share[0].values()) & set().union(*share[1].values())

    # Checkpoints: written collectively, holding both processes' iterator states.
    with open(two / "checkpoints" / str(STEPS) / "data" / "metadata") as f:
        states = json.load(f)["processes"]
    assert [s["layout"]["process_index"] for s in states] == [0, 1]
    assert sorted(os.listdir(two / "checkpoints")) == ["2", "4"]

    # Resume: the newest checkpoint (4) fails to restore on process 1 only (ringmoe/training/checkpoint.py's test
    # hook), so both processes resume from step 2, each continuing its own stream exactly.
    two_processes(setup, two, f"--config.total_steps={STEPS + 2}",
                  env={"RINGMOE_TEST_UNREADABLE": f"1:{STEPS}:restore"})
    assert f"{STEPS}.unreadable" in os.listdir(two / "checkpoints")
    resumed = [records(two, 0), records(two, 1)]
    assert sorted(resumed[1]) == list(range(1, STEPS + 3))
    assert resumed[0][3] == share[0][3] and resumed[1][3] == share[1][3]  # steps 3, 4 again, from step 2's state
    assert resumed[1][STEPS + 1] == share[1][1]  # the next epoch starts again with this process's share
    again = metrics(two)
    assert [r["step"] for r in again] == list(range(1, STEPS + 3))
    np.testing.assert_allclose([r["loss"] for r in again[:STEPS]], [r["loss"] for r in multi], rtol=1e-6)


def test_processes_agree_on_the_restored_step(tmp_path):
    """A checkpoint that one process cannot read is restored by none: both restore the newest step
    that every process reads (no training: ~15 s). Process 1 fails to probe step 3 (its metadata)
    and to restore step 2 (its arrays), through ringmoe/training/checkpoint.py's test hook."""
    coordinator = str(free_port())
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
               XLA_FLAGS=xla_flags(2),
               RINGMOE_TEST_UNREADABLE="1:3:probe,1:2:restore")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.restore_agreement", str(tmp_path), coordinator, str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.time() + 90
    for p in procs:  # a process stuck in a collective its peer never joins is killed, its output kept
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    outs, errs = zip(*(p.communicate() for p in procs))
    results = [json.loads(line) for out in outs for line in out.splitlines() if line.startswith("{")]
    assert [(r["process"], r["step"]) for r in results] == [(0, 1), (1, 1)], "\n".join(e[-2000:] for e in errs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    # Each process holds its own shards of step 1's array, and the step's data and metadata.
    assert results[0]["shards"] == [[0.0, 1.0], [2.0, 3.0]] and results[1]["shards"] == [[4.0, 5.0], [6.0, 7.0]]
    assert all(r["data"] == {"processes": [1]} and r["meta"] == {"step": 1} for r in results)
    # Moved aside once (by process 0), named in both processes' warnings with the process that failed.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.unreadable", "3.unreadable"]
    for err in errs:
        assert f"checkpoint {tmp_path / 'checkpoints' / '3'} is unreadable on process 1" in err
        assert f"checkpoint {tmp_path / 'checkpoints' / '2'} is unreadable on process 1" in err


def processes(setup, workdir, count, devices, *extra) -> list[str]:
    """`count` trainer processes of `devices` CPU devices each, joined by jax.distributed."""
    if count == 1:
        return finish([trainer(setup, workdir, devices, *extra)])
    coordinator = f"--coordinator_address=localhost:{free_port()}"
    return finish([trainer(setup, workdir, devices, coordinator, f"--num_processes={count}", f"--process_id={i}",
                           *extra) for i in range(count)])


def test_elastic_resume_on_2_then_1_then_3_processes_reads_every_record_once(setup, tmp_path):
    """One run, preempted and resumed twice on another number of processes and another mesh:

    1. 2 processes x 2 devices (mesh data 2 x expert 2) until process 1 alone gets SIGTERM:
       both stop at the same step S, save it and exit 0;
    2. 1 process x 4 devices (data 4) for step S + 1;
    3. 3 processes x 2 devices (data 3 x expert 2) for steps S + 2 and S + 3 (the parameters
       reshard each time).

    Shuffled, 24 rows (12 paired records) a step, 32 records an epoch: parts 2-3 read 36
    records, so an epoch ends inside them. From the record audit, every epoch that ended was
    read exactly once over the parts, and the last one has no record twice; the metrics have
    one line per step, 1..S + 3; the losses are finite."""
    run = tmp_path / "run"
    common = ("--config.batch_size=24", "--config.data.shuffle=True", "--config.checkpoint_every=100")
    coordinator = f"--coordinator_address=localhost:{free_port()}"
    first = [trainer(setup, run, 2, coordinator, "--num_processes=2", f"--process_id={i}", *common,
                     "--config.total_steps=40", "--config.mesh.data=2") for i in range(2)]
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not metrics(run):
        assert time.time() < deadline and all(p.poll() is None for p in first), "part 1 did not start training"
        time.sleep(0.5)
    first[1].send_signal(signal.SIGTERM)
    errs = [err for _, err in (p.communicate(timeout=300) for p in first)]
    assert [p.returncode for p in first] == [0, 0], "\n".join(e[-2000:] for e in errs)
    stopped = int(re.search(r"stopping at step (\d+)", errs[0]).group(1))
    assert f"stopping at step {stopped}" in errs[1] and stopped < 40
    assert os.listdir(run / "checkpoints") == [str(stopped)]

    processes(setup, run, 1, 4, *common, f"--config.total_steps={stopped + 1}", "--config.mesh.data=4",
              "--config.mesh.expert=1")
    processes(setup, run, 3, 2, *common, f"--config.total_steps={stopped + 3}", "--config.mesh.data=3")

    read = []
    for name in sorted(os.listdir(run / "records")):
        with open(run / "records" / name) as f:
            read += [tuple(pair) for line in f for pair in json.loads(line)["read"]]
    assert len(read) == 12 * (stopped + 3)
    last = max(epoch for epoch, _ in read)
    for epoch in range(last + 1):
        records = sorted(record for e, record in read if e == epoch)
        assert records == list(range(RECORDS)) if epoch < last else len(set(records)) == len(records), epoch
    assert (stopped + 3) * 12 // RECORDS > stopped * 12 // RECORDS   # an epoch ended after the resize
    logged = metrics(run)
    assert [r["step"] for r in logged] == list(range(1, stopped + 4))
    assert all(np.isfinite(r["loss"]) for r in logged)
    with open(run / "checkpoints" / str(stopped + 3) / "data" / "metadata") as f:
        states = json.load(f)["processes"]
    assert [s["layout"]["process_count"] for s in states] == [3, 3, 3]
