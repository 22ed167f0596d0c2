"""Training metrics: one JSON line per logged step, TensorBoard events, a console line.

`MetricsWriter` is the trainer's only sink for numbers:

* `workdir/metrics.jsonl`: one JSON object per `write` (step, the scalars, and
  samples_per_s / sec_per_step / elapsed_s / wall_time), flushed at once so a
  crash loses nothing already logged. Non-finite values are written as null,
  so the file stays strict JSON (jq, pandas) and a NaN loss still shows as a gap.
* `workdir/tb/`: tensorboardX event files with the same scalars.
* stdout: `step 120/10000 (1.2%) | loss 0.4321 | 85.3 samples/s | 0.42 s/step |
  elapsed 0:01:23 | ETA 1:09:10`.

Resume: call `truncate_after(step)` with the last step whose update the restored
checkpoint holds. Lines logged after it (the crashed run went on, then lost that
work) are dropped from metrics.jsonl and TensorBoard is opened with
`purge_step=step + 1`, which hides its later events, so the resumed run's
curves have no duplicates. Writes always append.

Only process 0 should write: pass `enabled=False` elsewhere and nothing at all
is created or printed.

`flatten_router_stats` turns router statistics into a bounded set of scalars;
the full per-layer, per-expert loads go to `router_load_matrices` (for the
heatmap in ringmoe/visualize.py) instead of the scalar stream, because
layers x experts x groups x modalities is hundreds of curves at 14B scale.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
# Keys the writer adds to every record (a caller's scalar of the same name wins).
_TIMING_KEYS = ("samples_per_s", "sec_per_step", "elapsed_s", "wall_time")
# Every logged number that depends on the wall clock. All others are functions of the
# config, its seed and the data: the same command twice logs them bit for bit
# (tests/test_train.py; README "Determinism" says what must be held fixed).
WALL_CLOCK_KEYS = _TIMING_KEYS + ("step_s", "tokens_per_s", "mfu")


def _scalar(name: str, value) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar (shape {array.shape})")
    return float(array.reshape(()))


def _json_value(value):
    if isinstance(value, Mapping):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value if not isinstance(value, float) or math.isfinite(value) else None


def json_line(record: Mapping) -> str:
    """`record` as one line of strict JSON: NaN and +-Inf (at any depth) become null, and
    `allow_nan=False` makes any that slipped through an error instead of a bare `NaN`
    token that jq, pandas and json.loads(parse_constant=...) reject. Used for every
    metrics.jsonl line and the trainer's final line."""
    return json.dumps(_json_value(dict(record)), allow_nan=False)


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


class MetricsWriter:
    """Writes metrics.jsonl, TensorBoard events and a progress line (see module doc).

    write(step, scalars, samples=B): `samples` is the number of images in ONE step
    (the global batch); throughput is samples x steps since the previous write,
    over the seconds since then, so logging every N steps needs no bookkeeping.
    """

    def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True, stream=None):
        self.workdir, self.total_steps, self.enabled = workdir, int(total_steps), enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb_dir = os.path.join(workdir, TB_DIR)
        self._stream = stream
        self._tb = None
        self._purge_step: int | None = None
        self._start = time.perf_counter()
        self._base_step = 0                      # step the run starts from (resume step)
        self._last: tuple[int, float] | None = None   # (step, time) of the previous write
        self._first: tuple[int, float] | None = None  # (step, time) of the first write here
        if enabled:
            os.makedirs(workdir, exist_ok=True)

    # -- resume -------------------------------------------------------------
    def truncate_after(self, step: int) -> int:
        """Drops metrics.jsonl lines with a step > `step` (and unreadable lines, e.g. one
        cut short by a crash); later writes append. Returns how many lines were dropped."""
        if not self.enabled:
            return 0
        step = int(step)
        self._base_step = step
        self._purge_step = step + 1
        if self._tb is not None:  # reopen so the purge marker is written
            self._tb.close()
            self._tb = None
        if not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    keep = int(json.loads(line)["step"]) <= step
                except (ValueError, KeyError, TypeError):
                    keep = False
                if keep:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += bool(line.strip())
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return dropped

    # -- writing ------------------------------------------------------------
    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
            self._tb = SummaryWriter(self.tb_dir, purge_step=self._purge_step)
            self._purge_step = None  # the marker is written once, when the writer opens
        return self._tb

    def write(self, step: int, scalars: Mapping[str, float], *, samples: int | None = None) -> dict:
        """Logs `scalars` at `step` to all three sinks; returns the record written."""
        if not self.enabled:
            return {}
        step = int(step)
        now = time.perf_counter()
        values = {str(k): _scalar(k, v) for k, v in scalars.items()}
        prev_step, prev_time = self._last if self._last else (self._base_step, self._start)
        steps, seconds = step - prev_step, now - prev_time
        timing: dict[str, float | None] = {"samples_per_s": None, "sec_per_step": None,
                                           "elapsed_s": now - self._start, "wall_time": time.time()}
        if steps > 0 and seconds > 0:
            timing["sec_per_step"] = seconds / steps
            if samples:
                timing["samples_per_s"] = samples * steps / seconds
        if self._first is None and samples:  # an evaluation-only write says nothing of the step rate
            self._first = (step, now)
        # ETA from the mean rate since the first write of this process (compile time
        # excluded once there are two writes), else from the last interval.
        first_step, first_time = self._first or (step, now)
        rate = (now - first_time) / (step - first_step) if step > first_step else timing["sec_per_step"]
        eta = max(self.total_steps - step, 0) * rate if rate is not None else None
        self._last = (step, now)

        record = {"step": step, **values}
        for key, value in timing.items():
            if key not in record and value is not None:
                record[key] = value
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_line(record) + "\n")
            f.flush()

        tb = self._tensorboard()
        for key, value in record.items():
            if key not in ("step", "wall_time", "elapsed_s") and math.isfinite(value):
                tb.add_scalar(key, value, step, walltime=timing["wall_time"])
        tb.flush()
        print(self.progress_line(step, values, timing, eta), file=self._stream or sys.stdout, flush=True)
        return record

    def progress_line(self, step: int, values: Mapping[str, float], timing: Mapping, eta: float | None) -> str:
        total = max(self.total_steps, 1)
        parts = [f"step {step:>{len(str(total))}}/{total} ({100.0 * step / total:.1f}%)"]
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4g}")
        for key in ("lr", "learning_rate"):
            if key in values:
                parts.append(f"lr {values[key]:.3g}")
                break
        if timing.get("samples_per_s") is not None:
            parts.append(f"{timing['samples_per_s']:.1f} samples/s")
        if timing.get("sec_per_step") is not None:
            parts.append(f"{timing['sec_per_step']:.3g} s/step")
        parts += [f"elapsed {_clock(timing.get('elapsed_s'))}", f"ETA {_clock(eta)}"]
        return " | ".join(parts)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- router statistics ---------------------------------------------------------
def _blocks(stats) -> Sequence[Mapping]:
    """Accepts Encoded.router_stats (a tuple per block) or an Encoded itself."""
    return getattr(stats, "router_stats", stats)


def router_load_matrices(router_stats_by_modality: Mapping[str, Sequence[Mapping]]) -> dict[str, np.ndarray]:
    """{'<modality>/<group>': load fractions (layers, experts)} for the heatmap.

    router_stats_by_modality[m] is Encoded.router_stats of m's forward pass: per
    block {'modal'|'collaborative': {'load': (E,), ...}}. Extra leading axes
    (micro-batches, steps) are averaged. Blocks without routers are skipped.
    """
    rows: dict[str, list[np.ndarray]] = {}
    for modality, blocks in router_stats_by_modality.items():
        for block in _blocks(blocks):
            for group, stats in block.items():
                load = np.asarray(stats["load"], np.float64)
                rows.setdefault(f"{modality}/{group}", []).append(load.reshape(-1, load.shape[-1]).mean(0))
    return {key: np.stack(value) for key, value in rows.items()}


def flatten_router_stats(router_stats_by_modality: Mapping[str, Sequence[Mapping]]) -> dict[str, float]:
    """Router statistics as a bounded set of scalars, per modality m and group g:

    * load/m/g/e<j>: expert j's share of assignments, averaged over layers;
    * router/m/g/max_load: max over layers and experts of share x E (1 = balanced,
      E = every token on one expert), the imbalance a layer average can hide;
    * router/m/g/{dropped, entropy, load_balance, z_loss}: means over layers;
    * router/dropped, router/entropy: means over every group and modality.

    That is (E + 5) scalars per modality and group (72 for the 14B layout);
    per-layer loads go to `router_load_matrices` and the heatmap.
    """
    out: dict[str, float] = {}
    pooled: dict[str, list[float]] = {"dropped": [], "entropy": []}
    for key, load in router_load_matrices(router_stats_by_modality).items():
        experts = load.shape[1]
        for j, share in enumerate(load.mean(0)):
            out[f"load/{key}/e{j}"] = float(share)
        out[f"router/{key}/max_load"] = float(load.max() * experts)
    for modality, blocks in router_stats_by_modality.items():
        per_group: dict[str, dict[str, list[float]]] = {}
        for block in _blocks(blocks):
            for group, stats in block.items():
                for name in ("dropped", "entropy", "load_balance", "z_loss"):
                    if name in stats:
                        per_group.setdefault(group, {}).setdefault(name, []).append(
                            float(np.mean(np.asarray(stats[name], np.float64))))
        for group, terms in per_group.items():
            for name, values in terms.items():
                out[f"router/{modality}/{group}/{name}"] = float(np.mean(values))
                if name in pooled:
                    pooled[name].extend(values)
    for name, values in pooled.items():
        if values:
            out[f"router/{name}"] = float(np.mean(values))
    return out

