"""MetricsWriter (jsonl, TensorBoard, console, resume truncation) and router-stat flattening."""
import json
import math
import os

import numpy as np

from ringmoe.training.metrics import MetricsWriter, flatten_router_stats, router_load_matrices


def lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_writes_jsonl_tensorboard_and_console(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    with MetricsWriter(workdir, total_steps=10) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step, "lr": np.float32(1e-3), "optical/total": np.array(0.5)},
                         samples=16)
        writer.write(4, {"loss": float("nan")}, samples=16)
    records = lines(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["loss"] == 0.5 and records[1]["optical/total"] == 0.5
    assert records[1]["samples_per_s"] > 0 and records[1]["sec_per_step"] > 0 and "elapsed_s" in records[1]
    assert records[3]["loss"] is None  # non-finite -> null: strict JSON
    events = [f for f in os.listdir(os.path.join(workdir, "tb")) if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(os.path.join(workdir, "tb", events[0])) > 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert out[1].startswith("step  2/10 (20.0%)") and "loss 0.5" in out[1]
    assert "samples/s" in out[1] and "ETA" in out[1] and "elapsed" in out[1]


def test_truncate_after_drops_later_lines_on_resume(tmp_path, capsys):
    workdir = str(tmp_path)
    writer = MetricsWriter(workdir, total_steps=10)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 6, "loss"')  # cut short by a crash
    resumed = MetricsWriter(workdir, total_steps=10)
    assert resumed.truncate_after(3) == 3
    assert [r["step"] for r in lines(workdir)] == [1, 2, 3]
    resumed.write(4, {"loss": 4.5}, samples=8)
    resumed.close()
    records = lines(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss"] == 4.5
    assert MetricsWriter(str(tmp_path / "fresh"), total_steps=1).truncate_after(0) == 0  # no file yet


def test_disabled_writes_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "other_process")
    writer = MetricsWriter(workdir, total_steps=5, enabled=False)
    writer.truncate_after(2)
    writer.write(3, {"loss": 1.0}, samples=4)
    writer.close()
    assert not os.path.exists(workdir)
    assert capsys.readouterr().out == ""


def fake_router_stats(layers=3, experts=2, groups=("modal", "collaborative")):
    blocks = []
    for layer in range(layers):
        skew = 0.5 + 0.1 * layer
        load = np.array([skew] + [(1 - skew) / (experts - 1)] * (experts - 1), np.float32)
        blocks.append({g: {"load": load, "dropped": np.float32(0.1 * layer), "entropy": np.float32(0.6),
                           "load_balance": np.float32(1.0), "z_loss": np.float32(2.0)} for g in groups})
    return tuple(blocks)


def test_flatten_router_stats():
    stats = {"optical": fake_router_stats(), "sar_l2": fake_router_stats(experts=4)}
    flat = flatten_router_stats(stats)
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    assert math.isclose(flat["load/optical/modal/e0"], 0.6, rel_tol=1e-6)  # mean over layers
    assert math.isclose(flat["router/optical/modal/max_load"], 0.7 * 2, rel_tol=1e-6)
    assert math.isclose(flat["router/sar_l2/collaborative/dropped"], 0.1, rel_tol=1e-6)
    assert math.isclose(flat["router/entropy"], 0.6, rel_tol=1e-6)
    # bounded: (E + 5) per modality and group, plus 2 pooled
    assert len(flat) == 2 * (2 + 5) + 2 * (4 + 5) + 2
    loads = router_load_matrices(stats)
    assert set(loads) == {"optical/modal", "optical/collaborative", "sar_l2/modal", "sar_l2/collaborative"}
    assert loads["sar_l2/modal"].shape == (3, 4)
    assert flatten_router_stats({"optical": ({}, {})}) == {}  # dense FFNs: no routers
