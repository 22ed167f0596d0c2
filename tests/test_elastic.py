"""Elastic resume: a data stream saved by P processes continues on P' without losing or repeating
a record of the epoch (`ringmoe/data/cursor.py`, `Pipeline.restore`), and collective waits that
end with an error naming the process that did not arrive (`training/distributed.py`).

`pytest -k elastic` selects these tests; the trainer-level ones (real `pretrain.train`
processes joined by jax.distributed) are in tests/test_multiprocess.py."""
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from ringmoe.data import pipeline as pl
from ringmoe.data import synthetic
from ringmoe.data.cursor import Consumed, Cursor, Share, advance
from tests.test_pipeline import _equal, config


@pytest.mark.parametrize("seed", range(4))
def test_elastic_cursor_reads_every_position_of_an_epoch_once(seed):
    """Random process counts each consume a random prefix of their share, plus a few indices
    beyond it (what workers and prefetch leave out of order); the merged cursor's shares, read
    to the end, complete every epoch: each position exactly once."""
    rng = random.Random(seed)
    for _ in range(50):
        records = rng.randrange(5, 60)
        cursor, seen = Cursor(), {}
        for count in [rng.randrange(1, 5) for _ in range(rng.randrange(1, 5))]:
            consumed = []
            for p in range(count):
                share = Share(cursor, records, p, count, None)
                prefix = rng.randrange(0, 2 * records // count + 2)
                indices = list(range(prefix)) + [prefix + d for d in rng.sample(range(5), rng.randrange(3))]
                for i in indices:
                    epoch, position = share.locate(i)
                    seen.setdefault(epoch, []).append(position)
                consumed.append(Consumed())
                consumed[-1].add(indices)
            cursor = json_round_trip(advance(cursor, records, consumed, None))
        share, last, i = Share(cursor, records, 0, 1, None), max(seen, default=0), 0
        while (located := share.locate(i))[0] <= last:
            seen.setdefault(located[0], []).append(located[1])
            i += 1
        for epoch in range(last + 1):
            assert sorted(seen[epoch]) == list(range(records)), (records, epoch)


def json_round_trip(cursor: Cursor) -> Cursor:
    return Cursor.from_json(json.loads(json.dumps(cursor.to_json())))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """60 labelled 64 px synthetic records, half paired (so the packer also skips and drops)."""
    d = str(tmp_path_factory.mktemp("elastic"))
    synthetic.write(d, 60, 64, 3, shard_size=20, paired_fraction=0.5, labeled=True)
    return d


def pipelines(data_dir, count, states=None, **data):
    c = config(batch_size=24, **data)
    pipes = [pl.Pipeline(c, data_dir, process_index=p, process_count=count) for p in range(count)]
    if states is not None:
        for pipe in pipes:
            pipe.restore(states)
    return pipes


def run(pipes, steps, read):
    """`steps` batches from every pipeline, appending what each consumed to `read`; then every
    process's state through JSON (no pickle), as a checkpoint holds them."""
    for _ in range(steps):
        for pipe in pipes:
            next(pipe)
            read.extend(pipe.last_read)
    states = [json.loads(json.dumps(pipe.get_state())) for pipe in pipes]
    for pipe in pipes:
        pipe.close()
    return states


def test_elastic_pipeline_2_then_1_then_3_processes_reads_every_record_once(mixed):
    """2 processes for 2 steps, then 1 process (with 2 Grain workers and prefetch: batches in
    flight are not counted) for 2 steps, then 3 processes until epoch 0 is over: every record
    of epoch 0 is read exactly once, and nothing of epoch 1 twice. The global batch keeps its
    24 rows (6 per modality) at every size."""
    read: list[tuple[int, int]] = []
    two = pipelines(mixed, 2)
    assert [sum(p.batch_sizes.values()) for p in two] == [12, 12]
    states = run(two, 2, read)
    one = pipelines(mixed, 1, states, num_workers=2, prefetch=2)
    assert one[0].batch_sizes == {m: 6 for m in one[0].batch_sizes}
    assert one[0].statistics()["batches"] == 2
    assert one[0].statistics()["records_read"] == sum(s["stats"]["records_read"] for s in states)
    states = run(one, 2, read)
    three = pipelines(mixed, 3, states)
    steps = 0
    while min(epoch for epoch, _ in read[-24:]) == 0 and steps < 20:
        for pipe in three:
            next(pipe)
            read.extend(pipe.last_read)
        steps += 1
    for pipe in three:
        pipe.close()
    by_epoch = {e: Counter(r for epoch, r in read if epoch == e) for e in {e for e, _ in read}}
    assert sorted(by_epoch[0]) == list(range(60)) and set(by_epoch[0].values()) == {1}
    assert max(by_epoch.get(1, Counter({0: 1})).values()) == 1
    assert 1 in by_epoch, "the 3-process part did not reach epoch 1"


def test_elastic_restore_under_the_same_layout_is_exact(mixed):
    """`restore` with the states of the same process count continues batch for batch."""
    pipes = pipelines(mixed, 2)
    for _ in range(2):
        for pipe in pipes:
            next(pipe)
    states = [json.loads(json.dumps(pipe.get_state())) for pipe in pipes]
    following = [next(pipe) for pipe in pipes]
    for pipe, batch in zip(pipelines(mixed, 2, states), following):
        _equal(next(pipe), batch)
        pipe.close()


def test_elastic_restore_refuses_another_stream(mixed):
    states = run(pipelines(mixed, 2), 1, [])
    c = config(batch_size=24)
    c.seed = 1
    with pytest.raises(ValueError, match="different stream: seed 0 != 1"):
        pl.Pipeline(c, mixed, process_index=0, process_count=1).restore(states)
    states[1]["cursor"]["epoch"] = 3
    with pytest.raises(ValueError, match="2 different cursors"):
        pipelines(mixed, 1)[0].restore(states)


WAITS = {"open": "the opening of {}",
         "restore": "the restore of {} (which steps each process reads)",
         "save": "checkpoint 7 (the data states)"}


@pytest.mark.parametrize("where", sorted(WAITS))
def test_elastic_a_hung_process_ends_the_wait_with_an_error_naming_it(tmp_path, where):
    """Process 1 hangs before opening the checkpoints (start-up: process 0 waits before Orbax's
    own barrier), before the restore, or before the trainer's gather of the data states that
    precedes a save; process 0's wait ends after the configured 5 s with a CollectiveTimeoutError
    naming process 1 and the wait, instead of hanging."""
    from tests.test_multiprocess import REPO, free_port
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
               RINGMOE_TEST_TIMEOUT="5")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.restore_agreement", str(tmp_path), port, str(i), f"1:{where}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    assert result is not None, err[-3000:]
    wait = WAITS[where].format(tmp_path / "checkpoints")
    assert result["error"] == (f"waiting at {wait}: process 1 of 2 did not arrive within 5 s "
                               "(collective_timeout_s; this is process 0)")
    assert 5 <= result["waited_s"] < 15
