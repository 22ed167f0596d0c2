"""The streaming input pipeline: ArrayRecord shards -> fixed-shape multi-modal batches (Grain).

Batch format (one dict per step and process; B_m rows of modality m, S = model
image_size, P = patch_size, C_m = the modality's channels in the model config):

    batch[m] = {"pixels":       float32 (B_m, S, S, C_m)   normalised per band with the
                                                           manifest mean/std
                "mask":         bool    (B_m, S/P, S/P)    SimMIM token mask, True = masked
                "valid":        bool    (B_m, S, S)        pixel holds data (False: no-data,
                                                           pixels 0 there, ignored by every loss)
                "label_map":    int32   (B_m, S, S)        class ids, 0 = unlabelled (and no data)
                "scene_label":  int32   (B_m,)             0 = none
                "record_index": int64   (B_m,)}            index of the record in the data set

Only modalities that the model config declares, the data set holds and that have
a positive weight in `data.modality_weights` are served (`Pipeline.modalities`).
B_m splits the per-process rows batch_size / process_count by those weights
(largest remainder, at least one row each) and never changes, so the train step
compiles once. Rows of different modalities that come from the same paired
record share a row index where possible (see packing.py).

Stages (Grain dataset API):
  1. record indices: each epoch's global order of [0, N) from `seed` and the
     epoch, of which process p of P (jax.process_index / process_count,
     overridable) reads positions p, p + P, p + 2P, ... (`cursor.Share`);
  2. map: RecordTransform (read, decode, random resized crop + flips identical
     across modalities and labels, per-band normalisation, SimMIM masks), with
     randomness keyed on (seed, epoch, record index) only;
  3. ModalityPackIterDataset: per-modality fixed batches;
  4. mp_prefetch over `data.num_workers` processes (0 = in-process, with a
     background thread holding `data.prefetch` batches).

Resume: `get_state()` is a JSON-serialisable dict: Grain's own iterator state
(positions only), our counters, what shapes the stream, and this process's
progress in process-count-free terms (`cursor`). `set_state()` on a fresh
pipeline with the same layout (process index and count, workers) continues with
exactly the batches the uninterrupted run would have produced; `restore()` takes
every process's state and continues on any other number of processes or workers
with every record of the epoch still read exactly once (elastic resume: the
data is exact, the make-up of the batches after the resize is not). Nothing is
pickled.

Opening a data set checks the manifest (structure, finite band statistics:
`shards.read_manifest`) and that every shard holds the records the manifest
gives it (`shards.checked_shard_paths`); a problem is a RecordError naming the
file and the field, whatever the bad-record budget.

Bad records (a record that cannot be read, decoded or validated, e.g. NaN
pixels): with data.max_bad_records = 0 the first one is a RecordError naming
the shard file, the record's index in it and the problem; with K > 0 up to K are
skipped, each logged once as a warning with the same details, and counted
(`statistics()["bad_records"]`, distinct records: one met again next epoch counts
once; kept in the resume state), and the K+1-th distinct one is an error.
"""
from __future__ import annotations

import json
import logging

import grain
import grain.experimental as grain_exp
import numpy as np

from ringmoe.data import masking, shards
from ringmoe.data.cursor import Consumed, Cursor, EpochOrder, Share, advance
from ringmoe.data.packing import ModalityPackIterDataset
from ringmoe.data.schema import MODALITIES, RecordError
from ringmoe.data.transform import ModalitySpec, RecordTransform, TransformOptions

log = logging.getLogger("ringmoe.data.pipeline")

STATE_FORMAT = "ringmoe-pipeline-state"
STATE_VERSION = 2
_COUNTERS = ("records_read", "records_used", "records_skipped", "bad_records", "images_served",
             "images_dropped", "paired_rows", "text_truncated")


class _ProcessShard(grain.MapDataset):
    """This process's stream: index i -> (epoch, record index, i), its `cursor.Share` of each
    epoch's global order from `cursor` on; `num_epochs` None = forever."""

    def __init__(self, order: EpochOrder, share: Share):
        super().__init__()
        self.order, self.share = order, share
        self._len = len(share)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = self.share.locate(int(index))
        return epoch, self.order.record(epoch, position), int(index)

    def read(self, index: int) -> tuple[int, int]:
        """(epoch, record index) of stream index `index`."""
        epoch, record, _ = self[index]
        return epoch, record

    def __str__(self) -> str:
        return f"_ProcessShard({self.share.process}/{self.share.count}, from epoch {self.share.cursor.epoch})"


def modality_batch_sizes(rows: int, weights: dict[str, float]) -> dict[str, int]:
    """Splits `rows` over modalities in proportion to `weights` (largest remainder, >= 1 each)."""
    names = [m for m in MODALITIES if weights.get(m, 0) > 0]
    if not names:
        raise ValueError("no modality to serve (model config, data set and data.modality_weights disagree)")
    if rows < len(names):
        raise ValueError(f"{rows} rows per process cannot serve {len(names)} modalities {names}; "
                         "raise batch_size")
    total = sum(weights[m] for m in names)
    exact = {m: rows * weights[m] / total for m in names}
    sizes = {m: int(exact[m]) for m in names}
    by_remainder = sorted(names, key=lambda m: (exact[m] - sizes[m], -names.index(m)), reverse=True)
    for m in by_remainder[:rows - sum(sizes.values())]:
        sizes[m] += 1
    for m in names:                                  # every served modality gets a row
        if sizes[m] == 0:
            sizes[max(names, key=lambda k: sizes[k])] -= 1
            sizes[m] = 1
    return sizes


def process_batch_sizes(config, modalities, process_count: int = 1) -> dict[str, int]:
    """Rows per modality of ONE process's batch: config.batch_size / process_count split over the
    served `modalities` by data.modality_weights (`modality_batch_sizes`). The global batch of a
    modality is this times process_count."""
    if config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
    weights = {m: float(config.data.modality_weights.get(m, 1.0)) for m in modalities}
    return modality_batch_sizes(config.batch_size // process_count, weights)


def served_modalities(config) -> tuple[str, ...]:
    """The modalities a data set holding all of them would serve: the model's, with positive weight."""
    weights = config.data.modality_weights
    return tuple(m for m in MODALITIES if m in config.model.modalities and weights.get(m, 1.0) > 0)


def batch_spec(config, batch_sizes: dict[str, int], text_shapes: dict | None = None) -> dict:
    """{modality: {key: (shape, dtype name)}} of a batch with `batch_sizes[m]` rows of modality m
    (the module docstring's format; channels from the model config, which the data must match),
    with the text arrays (`text_shapes`: key -> per-row shape and dtype) when the pipeline serves them."""
    s = config.model.image_size
    g = s // config.model.patch_size
    text = text_shapes or {}
    return {m: {"pixels": ((b, s, s, config.model.modalities[m].channels), "float32"),
                "mask": ((b, g, g), "bool"), "valid": ((b, s, s), "bool"), "label_map": ((b, s, s), "int32"),
                "scene_label": ((b,), "int32"), "record_index": ((b,), "int64"),
                **{k: ((b, *shape), dtype) for k, (shape, dtype) in text.items()}} for m, b in batch_sizes.items()}


def modality_specs(manifest: dict, config, data_dir: str) -> dict[str, ModalitySpec]:
    """Served modalities with their band statistics; channel mismatches are one-line ValueErrors."""
    weights = dict(config.data.modality_weights)
    specs = {}
    for m, entry in sorted(manifest["modalities"].items()):
        if m not in config.model.modalities or weights.get(m, 1.0) <= 0:
            continue
        model = config.model.modalities[m]
        unit = model.get("unit", "")
        if unit and unit != entry.get("unit"):
            raise ValueError(f"{data_dir}: modality {m} is in {entry.get('unit')!r} but config "
                             f"model.modalities.{m}.unit = {unit!r}")
        names = tuple(b["name"] for b in entry["bands"])
        if len(names) != model.channels:
            raise ValueError(f"{data_dir}: modality {m} has {len(names)} bands {list(names)} but "
                             f"config model.modalities.{m}.channels = {model.channels}")
        wanted = tuple(b[0] for b in model.get("bands", ()) or ())
        if wanted and wanted != names:
            raise ValueError(f"{data_dir}: modality {m} bands {list(names)} differ from config "
                             f"model.modalities.{m}.bands {list(wanted)}")
        mean, std = shards.band_stats(manifest, m, names)
        constant = [n for n, sd in zip(names, std) if not sd > 1e-12]
        if constant:   # read_manifest refused non-finite and negative ones: these are 0
            log.warning("%s: %s bands %s have std 0 in the manifest (constant over the data set): "
                        "normalised with std 1", data_dir, m, constant)
        std = np.where(std > 1e-12, std, 1.0).astype(np.float32)
        specs[m] = ModalitySpec(bands=names, mean=mean, std=std, unit=entry.get("unit"),
                                band_metadata=tuple(dict(b) for b in entry["bands"]))
    return specs


class Pipeline:
    """Iterator of batches (module docstring) for one process; also holds resume state and counters.

    Arguments default to the config: data_dir (c.data_dir), process_index/count
    (jax), num_epochs (c.data.num_epochs, 0 = forever), num_workers (c.data.num_workers),
    seed (c.seed; another seed draws another stream from the same records).
    train=False gives whole-image resizes without flips (evaluation); masks are still drawn.
    text: a callable adding text arrays to each row (`ringmoe.vlm.examples.TextTasks`, whose
    `shapes()` they follow; its sub-tasks are drawn from the record as cropped and flipped)."""

    def __init__(self, config, data_dir: str | None = None, *, process_index: int | None = None,
                 process_count: int | None = None, num_epochs: int | None = None,
                 num_workers: int | None = None, train: bool = True, seed: int | None = None, text=None):
        d = config.data
        seed = config.seed if seed is None else seed
        self.config = config
        self.data_dir = data_dir or config.data_dir
        if not self.data_dir:
            raise ValueError("no data set: set config.data_dir or pass data_dir")
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.manifest = shards.read_manifest(self.data_dir)
        paths = shards.checked_shard_paths(self.data_dir, self.manifest)
        m = config.model
        masking.check_geometry(m.image_size, m.patch_size, d.mask_block_size, d.mask_ratio)
        self.specs = modality_specs(self.manifest, config, self.data_dir)
        self.batch_sizes = process_batch_sizes(config, tuple(self.specs), process_count)
        self.modalities = tuple(self.batch_sizes)
        self.image_size, self.patch_size = m.image_size, m.patch_size
        epochs = d.num_epochs if num_epochs is None else num_epochs
        self.num_workers = d.num_workers if num_workers is None else num_workers
        self.max_bad_records = d.max_bad_records
        records = self.manifest["records"]
        if records < process_count:
            raise ValueError(f"{self.data_dir}: {records} records leave none for process "
                             f"{process_index} of {process_count}")
        self._order = EpochOrder(records, int(seed), bool(d.shuffle))
        self._process = (process_index, process_count)
        self._num_epochs = epochs or None
        lo, hi = d.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {tuple(d.crop_scale)}")
        options = TransformOptions(
            image_size=m.image_size, patch_size=m.patch_size, crop_scale=tuple(d.crop_scale),
            crop_ratio=tuple(d.crop_ratio), flip=d.flip and train, random_crop=train,
            mask_block_size=d.mask_block_size, mask_ratio=d.mask_ratio, shared_mask=d.shared_mask)
        self.transform = RecordTransform(paths, [s["records"] for s in self.manifest["shards"]],
                                         {k: self.specs[k] for k in self.modalities}, options, seed, text)
        self.text_shapes = text.shapes() if text is not None else {}
        self._read_options = grain.ReadOptions(num_threads=d.read_threads,
                                               prefetch_buffer_size=max(2 * sum(self.batch_sizes.values()), 8))
        self._prefetch = d.prefetch
        # What shapes the stream: equal in every state this pipeline resumes.
        self._stream = {"records": records, "seed": int(seed), "shuffle": bool(d.shuffle),
                        "num_epochs": int(epochs or 0), "train": train}
        # How this run reads it: a state saved under the same layout resumes batch for batch
        # (`set_state`), another one elastically (`restore`).
        self._layout = {"process_index": process_index, "process_count": process_count,
                        "batch_sizes": self.batch_sizes, "num_workers": self.num_workers}
        self._iter = None
        self._build(Cursor())
        self._reset_counters()

    def _build(self, cursor: Cursor) -> None:
        """The Grain dataset of this process's share of the stream from `cursor` on."""
        self.close()
        self.cursor = cursor
        self.shard = _ProcessShard(self._order, Share(cursor, self._order.records, *self._process, self._num_epochs))
        ds = self.shard.map(self.transform).to_iter_dataset(self._read_options)
        ds = ModalityPackIterDataset(
            ds, self.batch_sizes, image_size=self.image_size, patch_size=self.patch_size,
            channels={k: s.channels for k, s in self.specs.items()},
            max_records_per_batch=max(1000, 100 * sum(self.batch_sizes.values())),
            max_bad_records=self.max_bad_records, text_shapes=self.text_shapes)
        if self.num_workers > 0:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers,
                                                             per_worker_buffer_size=max(1, self._prefetch)))
        elif self._prefetch > 0:
            ds = grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self._prefetch)
        self._dataset = ds
        self._iter = None
        self._consumed = Consumed()

    def _reset_counters(self) -> None:
        self._stats = {k: 0 for k in _COUNTERS}
        self._stats["batches"] = 0
        self._bad: dict[int, str] = {}     # distinct bad record index -> message (at most max + 1)
        self.last_read: list[tuple[int, int]] = []

    def _iterator(self):
        if self._iter is None:
            self._iter = iter(self._dataset)
        return self._iter

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator())
        stats = batch.pop("_stats")
        self._consumed.add(stream for stream, _, _ in stats["consumed"])
        self.last_read = [(epoch, record) for _, epoch, record in stats["consumed"]]
        for k in _COUNTERS:
            self._stats[k] += stats[k]
        self._stats["batches"] += 1
        for index, message in stats["errors"]:
            if int(index) in self._bad:   # met again in a later epoch: counted in bad_reads only
                continue
            self._bad[int(index)] = message
            if len(self._bad) > self.max_bad_records:
                if self.max_bad_records == 0:
                    raise RecordError(message)
                raise RecordError(f"more than {self.max_bad_records} bad records (data.max_bad_records); "
                                  f"last: {message}")
            log.warning("skipped bad record %d of at most %d (data.max_bad_records): %s",
                        len(self._bad), self.max_bad_records, message)
        return batch

    def statistics(self) -> dict:
        """Counters since the start of the run (restored with the state): batches, records
        read/used/skipped, bad_records (distinct records) and bad_reads (every encounter,
        once per epoch), bad_record_errors (their messages), images served/dropped, paired rows."""
        out = {**self._stats, "bad_reads": self._stats["bad_records"], "bad_records": len(self._bad)}
        out["bad_record_errors"] = [self._bad[i] for i in sorted(self._bad)]
        return out

    def get_state(self) -> dict:
        """JSON-serialisable resume state: the stream's and this process's identity, the cursor
        this process started from and what it consumed since (`cursor`), counters, and Grain's
        own iterator state (positions only)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "stream": self._stream, "layout": self._layout,
                "cursor": self.cursor.to_json(), "consumed": self._consumed.to_json(),
                "stats": dict(self._stats), "bad": [[i, m] for i, m in sorted(self._bad.items())],
                "grain": self._iterator().get_state()}

    def set_state(self, state: dict) -> None:
        """Restores this process's own `get_state()` output, saved under the same layout (process
        index and count, batch sizes, workers): the batches continue exactly as the
        uninterrupted run's. Refuses any other (`restore` takes every process's states)."""
        self._check(state)
        diff = _differences(state["layout"], self._layout)
        if diff:
            raise ValueError(f"pipeline state is from another layout ({diff}): resume it with restore()")
        self._build(Cursor.from_json(state["cursor"]))
        self._iterator().set_state(state["grain"])
        self._consumed = Consumed.from_json(state["consumed"])
        self._reset_counters()
        self._stats.update({k: int(v) for k, v in state["stats"].items() if k in self._stats})
        self._bad = {int(i): str(m) for i, m in state.get("bad", [])}

    def restore(self, states: list[dict]) -> None:
        """Continues from the states every process of a run saved (in process order).

        Under the same layout, this process's own state (`set_state`: exact). Under
        another (a different process count, batch split or worker count), elastically:
        the saved processes' consumption is merged into one cursor (`cursor.advance`)
        from which this run's processes take their shares, so every record of the epoch
        is still read exactly once; which process reads it, and so the make-up of the
        batches, differs from an uninterrupted run. The counters are summed into
        process 0 ("batches": the step count, kept on every process), and the distinct
        bad records go to process 0."""
        if not states:
            raise ValueError("no pipeline state to restore")
        for state in states:
            self._check(state)
        index, count = self._process
        if len(states) == count and not _differences(states[index]["layout"], self._layout):
            self.set_state(states[index])
            return
        bases = {json.dumps(state["cursor"], sort_keys=True) for state in states}
        if len(bases) != 1:
            raise ValueError(f"pipeline states of {len(states)} processes start from {len(bases)} different cursors")
        processes = [state["layout"]["process_index"] for state in states]
        if processes != list(range(len(states))):
            raise ValueError(f"pipeline states are of processes {processes}, expected 0..{len(states) - 1} in order")
        cursor = advance(Cursor.from_json(states[0]["cursor"]), self._order.records,
                         [Consumed.from_json(state["consumed"]) for state in states], self._num_epochs)
        self._build(cursor)
        self._reset_counters()
        self._stats["batches"] = max(int(state["stats"]["batches"]) for state in states)
        if index == 0:
            for k in _COUNTERS:
                self._stats[k] = sum(int(state["stats"].get(k, 0)) for state in states)
            self._bad = {int(i): str(m) for state in states for i, m in state.get("bad", [])}
        log.info("data stream of %d processes continues on %d (elastic resume): epoch %d, %s", len(states), count,
                 cursor.epoch, ", ".join(f"epoch {cursor.epoch + i}: {s.watermark} + {len(s.consumed)} of "
                                         f"{self._order.records} consumed" for i, s in enumerate(cursor.segments))
                 or "at an epoch's start")

    def _check(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a ringmoe pipeline state")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pipeline state version {state.get('version')}, expected {STATE_VERSION} "
                             "(written before elastic resume: such a run cannot resume its data stream)")
        diff = _differences(state["stream"], self._stream)
        if diff:
            raise ValueError(f"pipeline state is from a different stream: {diff}")

    def shard_record_indices(self) -> np.ndarray:
        """Data set indices this process reads in the cursor's current epoch: disjoint across processes."""
        start, length = self.shard.share.span(self.cursor.epoch)
        return np.array([self.shard.read(i)[1] for i in range(start, start + length)], np.int64)

    def batch_spec(self) -> dict:
        """{modality: {key: (shape, dtype name)}} of every batch, for abstract model init."""
        return batch_spec(self.config, self.batch_sizes, self.text_shapes)

    def close(self) -> None:
        """Stops worker processes / threads (also done on garbage collection)."""
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _differences(saved: dict, current: dict) -> str:
    """'num_workers 0 != 1, ...' for the keys whose values differ ('' when none)."""
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k} {saved.get(k)!r} != {current.get(k)!r}" for k in keys)


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app nothing parsed them."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
