"""Input-pipeline throughput against the floor of reading the same bytes.

`run` times the full pipeline (read, decode, crop, normalise, mask, pack into
batches) for `num_batches` batches after a warm-up, then reads the same records,
in the same shuffled order, as raw ArrayRecord bytes with no decoding. The ratio
says how much of the raw read rate the pipeline keeps: near 1 means I/O bound,
far below 1 means the host-side transform is the bottleneck (add workers).

    python -m tools.bench data --data DIR --config configs/tiny.py
"""
from __future__ import annotations

import time

import grain

from ringmoe.data import pipeline as pipeline_lib


def run(data_dir: str, config, *, num_batches: int, num_workers: int | None = None,
        warmup_batches: int = 2) -> dict:
    """Returns pipeline_samples_per_s (records through the full pipeline per second),
    pipeline_images_per_s (rows served per second, all modalities), raw_samples_per_s
    (records read as bytes per second), ratio (pipeline / raw) and the setting."""
    if num_batches < 1:
        raise ValueError("num_batches must be >= 1")
    with pipeline_lib.Pipeline(config, data_dir, process_index=0, process_count=1,
                               num_workers=num_workers) as pipe:
        start = time.perf_counter()
        for _ in range(warmup_batches):
            next(pipe)
        startup_s = time.perf_counter() - start
        before = pipe.statistics()
        start = time.perf_counter()
        for _ in range(num_batches):
            next(pipe)
        pipe_s = time.perf_counter() - start
        after = pipe.statistics()
        records = after["records_read"] - before["records_read"]
        images = after["images_served"] - before["images_served"]
        first = before["records_read"]
        order = [pipe.shard[k][1] for k in range(first, first + records)]
        workers = pipe.num_workers
        batch_sizes = dict(pipe.batch_sizes)
    source = grain.sources.ArrayRecordDataSource(pipe.transform.paths)
    start = time.perf_counter()
    nbytes = sum(len(source[i]) for i in order)
    raw_s = time.perf_counter() - start
    pipeline_rate = records / pipe_s
    raw_rate = records / raw_s
    return {
        "pipeline_samples_per_s": round(pipeline_rate, 1),
        "pipeline_images_per_s": round(images / pipe_s, 1),
        "raw_samples_per_s": round(raw_rate, 1),
        "ratio": round(pipeline_rate / raw_rate, 4),
        "batches": num_batches, "records": records, "images": images,
        "record_bytes_mean": round(nbytes / max(records, 1)),
        "pipeline_s": round(pipe_s, 3), "raw_s": round(raw_s, 3), "startup_s": round(startup_s, 3),
        "batch_sizes": batch_sizes, "image_size": int(config.model.image_size), "num_workers": workers,
    }
