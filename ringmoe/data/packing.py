"""Packs per-record elements into fixed per-modality batches (a Grain IterDataset).

Records hold one modality (unpaired) or several (paired); the model wants, for
each modality m, exactly B_m rows every step so nothing recompiles. The packer
pulls elements from its parent and places them into B_m rows per modality:

* a paired record's images go to the SAME row index in every modality that still
  has room, taken from the top (row 0 upwards); while all those modalities have
  been filled alike (always the case for records carrying the same modality set)
  that row is shared, so a cross-modal objective can use row i of optical and
  row i of sar_l2 as one place (`record_index` says so in any case);
* an unpaired record's image goes to the lowest free row from the bottom, so it
  never takes a row a paired record could share;
* images of a modality whose rows are full are dropped (counted), and a record
  with nothing placeable is skipped (counted). The mixture weights therefore act
  by sampling: a modality over-represented in the data relative to its weight
  is subsampled.

The batch is emitted as soon as every modality is full, so nothing is carried
over between batches: the iterator state is just the parent's (JSON), which
makes resume exact. Per-batch counters (records read, bad records with their
first messages, dropped images) ride along under "_stats" for the pipeline to
accumulate (every bad record as [index, message], so the pipeline can count
distinct ones), with every element pulled, used or not, as [stream index, epoch,
record index] under "consumed": what the pipeline's elastic state counts. An exhausted parent ends iteration and drops the partial batch.

Bad records: the packer is where they are first seen, so it enforces what it can
of the budget (`max_bad_records`, data.max_bad_records) at once: with 0 the first
bad record is its RecordError (shard file, record index, what is wrong), and with
K more than K distinct bad records within one batch are an error; the pipeline
counts across batches (and epochs, and a resume). Without this, a shard whose
every record fails kept the packer reading until it gave up on the batch and
blamed the modality weights.
"""
from __future__ import annotations

import grain
import numpy as np

from ringmoe.data.schema import RecordError


class ModalityPackIterDataset(grain.IterDataset):
    """Parent elements (see transform.RecordTransform) -> batch dicts of fixed shape."""

    def __init__(self, parent: grain.IterDataset, batch_sizes: dict[str, int], *, image_size: int,
                 patch_size: int, channels: dict[str, int], max_records_per_batch: int,
                 max_bad_records: int = 0, text_shapes: dict | None = None):
        super().__init__(parent)
        self._text = dict(text_shapes or {})   # key -> (per-row shape, dtype name) of the elements' "text"
        self._sizes = dict(batch_sizes)
        self._shape = (image_size, image_size // patch_size, channels)
        self._max_records = int(max_records_per_batch)
        self._max_bad = int(max_bad_records)

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._sizes, self._shape, self._max_records, self._max_bad,
                             self._text)

    def __str__(self) -> str:
        return f"ModalityPackIterDataset(batch_sizes={self._sizes})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent, sizes, shape, max_records, max_bad, text):
        super().__init__(parent)
        self._sizes, self._shape, self._max_records, self._max_bad = sizes, shape, max_records, max_bad
        self._text = text

    def _empty(self) -> dict:
        size, grid, channels = self._shape
        return {m: {"pixels": np.zeros((b, size, size, channels[m]), np.float32),
                    "mask": np.zeros((b, grid, grid), bool),
                    "valid": np.zeros((b, size, size), bool),
                    "label_map": np.zeros((b, size, size), np.int32),
                    "scene_label": np.zeros((b,), np.int32),
                    "record_index": np.full((b,), -1, np.int64),
                    **{k: np.zeros((b, *shape), dtype) for k, (shape, dtype) in self._text.items()}}
                for m, b in self._sizes.items()}

    def __next__(self) -> dict:
        batch = self._empty()
        lo = {m: 0 for m in self._sizes}
        hi = dict(self._sizes)
        stats = {"records_read": 0, "records_used": 0, "records_skipped": 0, "bad_records": 0,
                 "images_served": 0, "images_dropped": 0, "paired_rows": 0, "text_truncated": 0, "errors": [],
                 "consumed": []}
        while any(lo[m] < hi[m] for m in self._sizes):
            if stats["records_read"] >= self._max_records:
                raise self._starved(stats, [m for m in self._sizes if lo[m] < hi[m]])
            element = next(self._parent)   # StopIteration ends the stream; the partial batch is dropped
            stats["records_read"] += 1
            stats["consumed"].append([element["stream"], element["epoch"], element["record_index"]])
            if element["bad"]:
                stats["bad_records"] += 1
                stats["errors"].append([element["record_index"], element["bad"]])
                self._check_budget(stats["errors"])
                continue
            images = element["images"]
            open_ = [m for m in images if lo[m] < hi[m]]
            stats["images_dropped"] += len(images) - len(open_)
            if not open_:
                stats["records_skipped"] += 1
                continue
            if len(images) == 1:
                m = open_[0]
                hi[m] -= 1
                rows = {m: hi[m]}
            else:
                top = {lo[m] for m in open_}
                if len(top) == 1 and len(open_) > 1:
                    stats["paired_rows"] += 1
                rows = {m: lo[m] for m in open_}
                for m in open_:
                    lo[m] += 1
            for m, r in rows.items():
                out = batch[m]
                out["pixels"][r] = images[m]["pixels"]
                out["mask"][r] = images[m]["mask"]
                out["valid"][r] = valid = images[m]["valid"]
                out["label_map"][r] = np.where(valid, element["label_map"], 0)   # no data, no label
                out["scene_label"][r] = element["scene_label"]
                out["record_index"][r] = element["record_index"]
                for k in self._text:
                    out[k][r] = element["text"][k]
            if self._text:
                stats["text_truncated"] += element["text"]["truncated"]
            stats["records_used"] += 1
            stats["images_served"] += len(rows)
        batch["_stats"] = stats
        return batch

    def _check_budget(self, errors: list) -> None:
        """RecordError once this batch alone holds more distinct bad records than allowed."""
        if self._max_bad == 0:
            raise RecordError(errors[-1][1])
        distinct = {int(i) for i, _ in errors}
        if len(distinct) > self._max_bad:
            raise RecordError(f"more than {self._max_bad} bad records (data.max_bad_records); "
                              f"last: {errors[-1][1]}")

    def _starved(self, stats: dict, starved: list[str]) -> Exception:
        """The error for a batch that `max_records` reads did not fill, naming the real cause:
        bad records (how many, the last one), or too few records of the starved modalities."""
        read, bad = stats["records_read"], len(stats["errors"])
        if 2 * bad >= read:
            return RecordError(f"read {read} records without filling the rows of {starved}: {bad} of them were "
                               f"bad records (data.max_bad_records = {self._max_bad}); last: {stats['errors'][-1][1]}")
        among = f" ({bad} bad records among them)" if bad else ""
        return RuntimeError(f"read {read} records without filling the rows of {starved}{among}: too few such "
                            f"records for their data.modality_weights")

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
