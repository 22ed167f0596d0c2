"""The profile summary: self time per operation from a Perfetto trace, nesting and waits."""
import gzip
import json

import pytest

from ringmoe.training import profile


def write_trace(path, events):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "python"}}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    return str(path)


def x(name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args or None}


def test_device_events_ranked_by_self_time(tmp_path):
    trace = write_trace(tmp_path / "t.json.gz", [
        # Stream 1: a 100 us wrapper holding a 30 us and a 50 us kernel: its self time is 20 us.
        x("wrapper", 0, 100), x("k1", 10, 30, hlo_op="fusion.3"), x("k2", 50, 50, hlo_op="fusion.12"),
        # Stream 2, overlapping in time but another thread: counted on its own.
        x("gemm", 0, 40, tid=2, hlo_op="dot.1"), x("wait for it", 40, 500, tid=2),
        # The host's events are ignored when a device process exists.
        x("PjitFunction", 0, 1000, pid=2, tid=7),
    ])
    summary = profile.top_operations(trace, k=3)
    assert summary["source"] == "device"
    # Self times: fusion.12 50, dot.1 40, fusion.3 30, wrapper 20; the wait is idle, not work.
    assert summary["total_ms"] == pytest.approx(0.140)
    assert [(op["name"], op["ms"]) for op in summary["operations"]] == [
        ("fusion.12", pytest.approx(0.05)), ("dot.1", pytest.approx(0.04)), ("fusion.3", pytest.approx(0.03))]
    # By kind: fusion.3 + fusion.12 = 80 us of 140.
    assert summary["kinds"][0] == {"name": "fusion", "ms": pytest.approx(0.08), "share": pytest.approx(80 / 140),
                                   "count": 2}
    text = profile.as_text(summary, "test")
    assert "fusion.12" in text and "top 3 by operation kind" in text


def test_cpu_trace_falls_back_to_host_events_without_python_frames(tmp_path):
    trace = write_trace(tmp_path / "t.json.gz", [
        x("$train.py:10 step", 0, 900, pid=2, tid=7), x("Execute", 0, 300, pid=2, tid=7)])
    summary = profile.top_operations(trace)
    assert summary["source"] == "host"
    assert [op["name"] for op in summary["operations"]] == ["Execute"]
