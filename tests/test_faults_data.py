"""The trainer under bad input and faults (issue 15): each case starts from the faulty input
and checks the message (file, record or key named), how the run ends, and that nothing
earlier is lost.

Data: a truncated or corrupted shard, a manifest that claims more records than a shard
holds, non-finite or negative band statistics, a NaN record with no bad-record budget and
NaN records within one. Faults: an asynchronous checkpoint save that fails (a full disk,
simulated by making Orbax's JSON writer raise ENOSPC for one step), a run whose updates
are all skipped, and the strict JSON of metrics.jsonl and the final line.

Trains the micro config (one modality, 32 px) in-process on one CPU device.
"""
import dataclasses
import errno
import json
import logging
import os
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from ringmoe.data import schema, shards, synthetic
from ringmoe.data.pipeline import Pipeline
from ringmoe.data.schema import RecordError
from tests.small import micro_config, poison_steps

@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """24 paired 32 px records in 3 shards of 8."""
    d = str(tmp_path_factory.mktemp("faults") / "data")
    synthetic.write(d, 24, 32, 0, shard_size=8, paired_fraction=1.0)
    return d


@pytest.fixture
def data(clean, tmp_path):
    """A private copy of the clean data set, to damage."""
    d = str(tmp_path / "data")
    shutil.copytree(clean, d)
    return d


def run_config(data_dir, total_steps=6, **kw):
    c = micro_config(("optical",))
    c.data_dir, c.batch_size, c.data.prefetch, c.data.read_threads = data_dir, 8, 0, 1
    c.total_steps, c.log_every, c.checkpoint_every, c.keep_checkpoints = total_steps, 2, 2, 3
    c.eval_every, c.image_every = 0, 0
    for key, value in kw.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


@pytest.fixture
def trainer(monkeypatch):
    """pretrain.train on one device, and a `main` runner with these flags (no pictures:
    `micro_config`)."""
    from pretrain import train
    monkeypatch.setattr(train, "initialize_distributed", lambda timeout_s: False)
    real = train.train
    monkeypatch.setattr(train, "train", lambda config, workdir, **kw: real(config, workdir, jax.devices()[:1], **kw))

    def main(config, workdir):
        flag = lambda v: SimpleNamespace(value=v)  # noqa: E731
        monkeypatch.setattr(train, "_FLAGS", SimpleNamespace(config=flag(config), workdir=flag(str(workdir)),
                                                             log_records=flag(False)))
        train.main([])
    monkeypatch.setattr(train, "run_main", main, raising=False)
    return train


def shard(data_dir, i=1):
    return os.path.join(data_dir, f"shard-{i:05d}.array_record")


def rewrite(path, change):
    """Rewrites an ArrayRecord shard with change(list of record bytes) applied."""
    reader = ArrayRecordReader(path)
    records = reader.read_all()
    reader.close()
    change(records)
    writer = ArrayRecordWriter(path, shards.WRITER_OPTIONS)
    for r in records:
        writer.write(r)
    writer.close()


def nan_record(data: bytes) -> bytes:
    """The same record with every optical pixel NaN (encode does not validate)."""
    record = schema.decode(data, "test")
    image = record.modalities["optical"]
    record.modalities["optical"] = dataclasses.replace(image, pixels=np.full_like(image.pixels, np.nan))
    return schema.encode(record)


def poison(data_dir, indices, i=1):
    def change(records):
        for k in indices:
            records[k] = nan_record(records[k])
    rewrite(shard(data_dir, i), change)


def strict(line: str) -> dict:
    """json.loads that refuses NaN / Infinity tokens."""
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    return json.loads(line, parse_constant=refuse)


def metric_lines(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [strict(line) for line in f]


# --- data set integrity: checked when the pipeline opens the data set -------------------

def test_truncated_shard_stops_at_open_naming_the_file(trainer, data, tmp_path):
    path = shard(data)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    for budget in (0, 8):   # a damaged shard is not a bad record: no budget lets it through
        with pytest.raises(RecordError, match=rf"^{path}: truncated or damaged shard: manifest says 8 records, "
                                              r"file (is unreadable|holds \d+)$"):
            trainer.train(run_config(data, **{"data.max_bad_records": budget}), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()   # stopped before anything was written


def test_manifest_claiming_more_records_than_a_shard_holds(trainer, data, tmp_path):
    manifest = os.path.join(data, "manifest.json")
    m = json.load(open(manifest))
    m["shards"][1]["records"] += 4
    m["records"] += 4
    with open(manifest, "w") as f:
        json.dump(m, f)
    with pytest.raises(RecordError, match=rf"^{shard(data)}: truncated or damaged shard: manifest says 12 records, "
                                          r"file holds 8$"):
        trainer.train(run_config(data), tmp_path / "run")


@pytest.mark.parametrize("field, index, value, problem", [
    ("mean", 1, float("nan"), r"modalities\.optical\.mean\[1\] \(band 'G'\) is nan: band statistics must be finite"),
    ("std", 2, float("inf"), r"modalities\.optical\.std\[2\] \(band 'B'\) is inf: band statistics must be finite"),
    ("std", 0, -0.5, r"modalities\.optical\.std\[0\] \(band 'R'\) is -0\.5: a standard deviation cannot be negative"),
    ("mean", None, [0.1], r"modalities\.optical\.mean: expected one value per band \(3\), got 1 values"),
], ids=["nan-mean", "inf-std", "negative-std", "one-mean-for-three-bands"])
def test_invalid_manifest_statistics_name_the_file_and_field(trainer, data, tmp_path, field, index, value, problem):
    """Before: a NaN mean trained with every update skipped (exit 0 for a short run)."""
    manifest = os.path.join(data, "manifest.json")
    m = json.load(open(manifest))
    if index is None:
        m["modalities"]["optical"][field] = value
    else:
        m["modalities"]["optical"][field][index] = value
    with open(manifest, "w") as f:
        json.dump(m, f)   # writes NaN / Infinity tokens, as a hand edit or another tool might
    with pytest.raises(RecordError, match=rf"^{manifest}: invalid manifest: {problem}$"):
        trainer.train(run_config(data), tmp_path / "run")
    with pytest.raises(RecordError, match=problem):   # every reader: the same check
        shards.read_manifest(data)


# --- bad records ----------------------------------------------------------------------------

def test_corrupted_shard_stops_at_the_first_bad_record(trainer, data, tmp_path):
    """Record counts intact, bytes inside damaged: found when read; with no budget the first
    one stops the run, naming the shard and the record (before: after a few steps, or after
    1000 failed reads blaming data.modality_weights when the whole shard failed)."""
    path = shard(data)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        f.write(b"\xff" * 4096)
    with pytest.raises(RecordError, match=rf"^{path} record \d \(data set record \d+\): unreadable \(RuntimeError: "):
        trainer.train(run_config(data), tmp_path / "run")


def test_nan_record_without_budget_stops_naming_shard_and_index(trainer, data, tmp_path):
    poison(data, [3])
    with pytest.raises(RecordError, match=rf"^{shard(data)} record 3 \(data set record 11\): "
                                          r"record 'synthetic-0-00000011' optical: 3072 NaN/Inf pixels(\n|$)"):
        trainer.train(run_config(data), tmp_path / "run")


def test_a_data_set_of_bad_records_names_them_not_the_modality_weights(data):
    """A budget larger than the data: the packer gives up on the batch and says why."""
    for i in range(3):
        poison(data, range(8), i)
    config = run_config(data, **{"data.max_bad_records": 100_000})
    with Pipeline(config, process_index=0, process_count=1) as pipeline:
        with pytest.raises(RecordError, match=r"^read 1000 records without filling the rows of \['optical'\]: "
                                              r"1000 of them were bad records \(data.max_bad_records = 100000\); "
                                              rf"last: {data}/shard-0000\d\.array_record record \d "):
            next(pipeline)


def test_nan_records_within_budget_are_logged_counted_and_reported(trainer, data, tmp_path, caplog, capsys):
    poison(data, [3, 5])
    config = run_config(data, **{"data.max_bad_records": 8})
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="ringmoe"):
        trainer.run_main(config, workdir)
    final = strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 6 and final["bad_records"] == 2
    skips = sorted(r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage())
    assert len(skips) == 2, skips   # once per record, although every epoch meets it again
    for line in skips:
        assert "of at most 8 (data.max_bad_records)" in line and "optical: 3072 NaN/Inf pixels" in line
    assert sum(f"{shard(data)} record 3 (data set record 11)" in line for line in skips) == 1
    assert sum(f"{shard(data)} record 5 (data set record 13)" in line for line in skips) == 1
    logged = metric_lines(workdir)
    counts = [r["bad_records"] for r in logged]
    assert [r["step"] for r in logged] == [2, 4, 6] and counts == sorted(counts) and counts[-1] == 2

    # The count is part of the checkpointed data state: resuming from step 4 logs steps 5-6
    # as the uninterrupted run did, and logs no skip again for a record already counted.
    shutil.rmtree(workdir / "checkpoints" / "6")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ringmoe"):
        trainer.train(config, workdir)
    assert [r["step"] for r in metric_lines(workdir)] == [2, 4, 6]
    assert [r["bad_records"] for r in metric_lines(workdir)] == counts
    assert not [r for r in caplog.records if "skipped bad record" in r.getMessage()]

    with pytest.raises(RecordError, match=rf"^more than 1 bad records \(data.max_bad_records\); "
                                          rf"last: {shard(data)} record [35] "):
        trainer.train(run_config(data, **{"data.max_bad_records": 1}), tmp_path / "other")


# --- a failed asynchronous checkpoint save ------------------------------------------------------

def fail_saves_of_step(monkeypatch, step):
    """Orbax's JSON items of checkpoint `step` fail as on a full disk, in its background threads."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch
    real = jch.JsonCheckpointHandler._save_fn

    async def save_fn(self, item, directory):
        if os.path.basename(os.path.dirname(str(directory))).startswith(f"{step}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await real(self, item, directory)
    monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", save_fn)
    return lambda: monkeypatch.setattr(jch.JsonCheckpointHandler, "_save_fn", real)


def test_failed_async_save_stops_once_keeps_the_last_good_checkpoint(trainer, data, tmp_path, monkeypatch,
                                                                      caplog):
    """Before: noticed at the next save (two steps later), six tracebacks, and a last line
    "RuntimeError: cannot schedule new futures after shutdown"."""
    workdir = tmp_path / "run"
    ckpt = workdir / "checkpoints"
    restore = fail_saves_of_step(monkeypatch, 4)
    config = run_config(data, log_every=1)
    with caplog.at_level(logging.INFO):
        with pytest.raises(SystemExit) as stopped:
            trainer.run_main(config, workdir)
    message = str(stopped.value.code)
    assert message == (f"pretrain.train: stopped: checkpoint 4 failed: no space left on device "
                       f"({ckpt}/4.orbax-checkpoint-tmp/data.orbax-checkpoint-tmp); "
                       f"last good checkpoint: 2 ({ckpt}/2)"), message
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if "checkpoint 4 failed" in r.getMessage()]   # said once: the exit
    assert sorted(os.listdir(ckpt)) == ["2", "4.orbax-checkpoint-tmp"]
    steps = [r["step"] for r in metric_lines(workdir)]
    assert steps == list(range(1, steps[-1] + 1)) and 4 <= steps[-1] <= 6   # noticed by the step-6 save at the latest

    # The next start removes the partial directory, resumes from step 2 and finishes.
    restore()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ringmoe"):
        trainer.train(config, workdir)
    assert f"removing {ckpt}/4.orbax-checkpoint-tmp" in caplog.text and "resumed from step 2" in caplog.text
    assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]
    assert [r["step"] for r in metric_lines(workdir)] == [1, 2, 3, 4, 5, 6]   # no duplicate lines


# --- non-finite updates and strict JSON ---------------------------------------------------------

def test_a_run_whose_updates_were_all_skipped_exits_nonzero(trainer, data, tmp_path, monkeypatch):
    """Before: 3 steps, all skipped (fewer than max_nonfinite_steps = 5): exit 0 and a final
    line with bare NaN tokens."""
    poison_steps(monkeypatch, trainer, {1, 2, 3})
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^pretrain.train: stopped: the run ended at step 3 with every one of its 3 "
                                         r"updates non-finite \(all skipped; fewer than max_nonfinite_steps = 5 "
                                         r"steps ran\): non-finite terms: optical/simmim"):
        trainer.run_main(run_config(data, total_steps=3), workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]   # the end is not saved as finished
    assert [(r["step"], r["loss"]) for r in metric_lines(workdir)] == [(2, None), (3, None)]   # NaN is null


def test_guard_acts_on_the_step_it_reads_and_final_line_is_strict_json(trainer, data, tmp_path, monkeypatch,
                                                                       capsys):
    # Limit 2, steps 2-3 non-finite, nothing logged: step 3's flag is read one step late, at
    # step 4, before step 4 is saved; the error names step 3 and no later step is saved.
    poison_steps(monkeypatch, trainer, {2, 3})
    config = run_config(data, log_every=1000, max_nonfinite_steps=2)
    with pytest.raises(trainer.NonFiniteError, match=r"^2 consecutive non-finite updates up to step 3: "):
        trainer.train(config, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == ["2"]

    # Only the last step non-finite: the run ends normally, its final line is strict JSON.
    poison_steps(monkeypatch, trainer, {3})
    trainer.run_main(run_config(data, total_steps=3, log_every=1), tmp_path / "b")
    final = strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 3 and final["loss"] is None and final["finite"] == 0.0 and final["bad_records"] == 0
    assert [r["loss"] is None for r in metric_lines(tmp_path / "b")] == [False, False, True]
