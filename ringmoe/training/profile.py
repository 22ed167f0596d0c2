"""A few steps under `jax.profiler`, summarised as the operations that took the time.

`jax.profiler.trace(..., create_perfetto_trace=True)` writes a Chrome / Perfetto
trace (`perfetto_trace.json.gz`) beside the TensorBoard one. Its complete events
('X') on an accelerator's own processes ('/device:GPU:0', '/device:TPU:0') are the
kernels and HLO operations the device ran; they are grouped by HLO operation
(`args.hlo_op` where the profiler names it, else the event name) and ranked by
total self time: an event's duration less that of the events nested in it on the
same thread, so a wrapper such as the CPU's `ThunkExecutor::Execute` is not
counted twice. Waits ('... wait for ...') are idle time, not work, and are left out.
A second ranking groups the operations by kind (the name less its '.N' suffix:
all `fusion.*`, all `convolution.*`), which is what says where the time goes.
The CPU backend has no device process: there the events of XLA's own threads are
used, or failing those the host's, minus Python frames ('$...'), and `source`
says which. The trace itself stays in the directory for TensorBoard
or Perfetto.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

import jax


def trace(run_steps, logdir: str) -> str:
    """Runs `run_steps()` (which must block until its work is done) under the profiler;
    returns the Perfetto trace file it wrote."""
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        run_steps()
    files = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "perfetto_trace.json.gz")),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{logdir}: jax.profiler wrote no perfetto_trace.json.gz")
    return files[-1]


def _events(path: str) -> tuple[list[dict], dict[int, str], dict[tuple[int, int], str]]:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e["name"] == "thread_name"}
    return [e for e in events if e.get("ph") == "X" and "dur" in e], processes, threads


def _self_times(events: list[dict]):
    """(event, its duration less its direct children's) for events nested per thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e["pid"], e.get("tid")].append(e)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        self_us, stack = {}, []
        for i, e in enumerate(thread):
            while stack and thread[stack[-1]]["ts"] + thread[stack[-1]]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                self_us[stack[-1]] -= e["dur"]
            self_us[i] = e["dur"]
            stack.append(i)
        yield from ((thread[i], max(us, 0.0)) for i, us in self_us.items())


def top_operations(path: str, k: int = 10) -> dict:
    """{source, trace, total_ms, operations, kinds}: the `k` costliest operations and operation
    kinds, each [{name, ms, share, count}]."""
    events, processes, threads = _events(path)
    device = [e for e in events if processes.get(e["pid"], "").startswith("/device:")]
    xla = [e for e in events if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")]
    host = [e for e in events if not e["name"].startswith("$")]
    idle = re.compile(r"\bwait\b", re.IGNORECASE)
    for source, chosen in (("device", device), ("xla_threads", xla), ("host", host)):
        if chosen:
            break
    else:
        source, chosen = "none", []
    totals, counts = collections.Counter(), collections.Counter()
    for e, self_us in _self_times(chosen):
        name = (e.get("args") or {}).get("hlo_op") or e["name"]
        if not idle.search(name):
            totals[name] += self_us / 1e3     # microseconds -> ms
            counts[name] += 1
    kinds, kind_counts = collections.Counter(), collections.Counter()
    for name, ms in totals.items():
        kind = re.sub(r"\.\d+$", "", name)
        kinds[kind] += ms
        kind_counts[kind] += counts[name]
    total = sum(totals.values())

    def ranked(table, n):
        return [{"name": name, "ms": ms, "share": ms / total if total else 0.0, "count": n[name]}
                for name, ms in table.most_common(k)]
    return {"source": source, "trace": path, "total_ms": total, "operations": ranked(totals, counts),
            "kinds": ranked(kinds, kind_counts)}


def as_text(summary: dict, title: str) -> str:
    """The summary as an aligned table, for a person to read."""
    lines = [f"{title}: {summary['total_ms']:.1f} ms of {summary['source']} events (self time, summed over "
             "threads and streams)"]
    for key, label in (("operations", "operation"), ("kinds", "operation kind")):
        lines += ["", f"top {len(summary[key])} by {label}", f"{'ms':>10} {'share':>6} {'count':>6}  {label}"]
        lines += [f"{op['ms']:10.2f} {op['share']:6.1%} {op['count']:6d}  {op['name']}" for op in summary[key]]
    return "\n".join(lines) + f"\n\ntrace: {summary['trace']}\n"
