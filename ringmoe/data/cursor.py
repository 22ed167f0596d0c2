"""Where the data stream stands, whatever the number of processes reading it (elastic resume).

Every epoch puts the N records of the data set in one global order: position q of
epoch e holds record `EpochOrder.record(e, q)`, a seeded permutation redrawn each
epoch. The order depends on the seed and the epoch only, so it is the same for
any process count.

A `Cursor` says which positions have been consumed (read by the packer into a
batch that reached the trainer: used, skipped or bad alike):

    epoch      the first epoch not finished;
    segments   one `Segment` for it and for each later epoch some process has
               started: a watermark W (every position below W is consumed) and the
               consumed positions at or above W (few: processes run in step).

Process p of P reads, of each epoch, the positions not yet consumed, in
ascending order R[0], R[1], ..., taking R[p], R[p + P], R[p + 2P], ... (its
`Share`); epochs after the listed segments are whole (R = 0, 1, ..., N - 1).
Shares of one cursor are disjoint and cover the epoch, for any P.

Each process counts what it consumed as indices into its own share (`Consumed`:
a prefix and the few beyond it); `advance` merges every process's count into the
next cursor, from which P' processes carry on. So a checkpoint written by P
processes resumes on P': no record of an epoch is lost or read twice. What
changes across a resize is which process reads a record and so the batches'
make-up; a record's crop, flips and masks do not (they are keyed on the seed,
the epoch and the record index, `transform.RecordTransform`).
"""
from __future__ import annotations

import dataclasses
import sys

import grain.experimental as grain_exp
import numpy as np


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """The global order of each epoch: position -> record index (identity without shuffle).

    A fixed permutation of the data set from `seed`, composed with one redrawn per
    epoch (seed + 1 + epoch); with one process this is the order earlier versions
    of the pipeline read, so single-process streams are unchanged."""
    records: int
    seed: int
    shuffle: bool

    def record(self, epoch: int, position: int) -> int:
        n = self.records
        if not self.shuffle or n < 2:
            return int(position)
        q = grain_exp.index_shuffle(position, max_index=n - 1, seed=(self.seed + 1 + epoch) % 2**32, rounds=4)
        return int(grain_exp.index_shuffle(q, max_index=n - 1, seed=self.seed % 2**32, rounds=4))


@dataclasses.dataclass(frozen=True)
class Segment:
    """One epoch's progress: positions < watermark are consumed, and so are `consumed` (sorted,
    each >= watermark + 1)."""
    watermark: int = 0
    consumed: tuple[int, ...] = ()

    def remaining(self, records: int) -> int:
        return records - self.watermark - len(self.consumed)

    def position(self, k) -> np.ndarray:
        """Position of the k-th (0-based, vectorised) position not yet consumed."""
        k = np.asarray(k, np.int64)
        if not self.consumed:
            return self.watermark + k
        taken = np.asarray(self.consumed, np.int64)
        free_before = taken - self.watermark - np.arange(len(taken))   # free positions below each
        return self.watermark + k + np.searchsorted(free_before, k, side="right")


WHOLE = Segment()


@dataclasses.dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    segments: tuple[Segment, ...] = ()

    def segment(self, epoch: int) -> Segment:
        i = epoch - self.epoch
        if i < 0:
            raise ValueError(f"epoch {epoch} is finished (the cursor is at epoch {self.epoch})")
        return self.segments[i] if i < len(self.segments) else WHOLE

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "segments": [[s.watermark, list(s.consumed)] for s in self.segments]}

    @classmethod
    def from_json(cls, data: dict) -> "Cursor":
        return cls(int(data["epoch"]), tuple(Segment(int(w), tuple(int(c) for c in taken))
                                             for w, taken in data["segments"]))


class Share:
    """Process `process` of `count`: its stream index i -> (epoch, position), from `cursor` on,
    over epochs < num_epochs (None: forever)."""

    def __init__(self, cursor: Cursor, records: int, process: int, count: int, num_epochs: int | None):
        self.cursor, self.records, self.process, self.count = cursor, records, process, count
        self.num_epochs = num_epochs
        last = cursor.epoch + len(cursor.segments)
        if num_epochs is not None:
            last = min(last, num_epochs)
        self._listed = [self._length(cursor.segment(e)) for e in range(cursor.epoch, last)]
        self._whole = self._length(WHOLE)
        self._first_whole = max(last, cursor.epoch)

    def _length(self, segment: Segment) -> int:
        return len(range(self.process, segment.remaining(self.records), self.count))

    def __len__(self) -> int:
        listed = sum(self._listed)
        if self.num_epochs is None:
            return sys.maxsize if self._whole or listed else 0
        return listed + self._whole * max(0, self.num_epochs - self._first_whole)

    def span(self, epoch: int) -> tuple[int, int]:
        """(first stream index, length) of this process's part of `epoch`."""
        i = epoch - self.cursor.epoch
        if i < len(self._listed):
            return sum(self._listed[:i]), self._listed[i]
        return sum(self._listed) + self._whole * (epoch - self._first_whole), self._whole

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, position) of stream index `index`."""
        for i, length in enumerate(self._listed):
            if index < length:
                epoch = self.cursor.epoch + i
                return epoch, self._position(epoch, index)
            index -= length
        offset, j = divmod(index, self._whole)
        epoch = self._first_whole + offset
        return epoch, self._position(epoch, j)

    def _position(self, epoch: int, j: int) -> int:
        return int(self.cursor.segment(epoch).position(self.process + j * self.count))


class Consumed:
    """Stream indices of one process that reached the trainer: all below `watermark`, and `beyond`."""

    def __init__(self, watermark: int = 0, beyond=()):
        self.watermark, self.beyond = int(watermark), set(int(i) for i in beyond)

    def add(self, indices) -> None:
        self.beyond.update(int(i) for i in indices)
        while self.watermark in self.beyond:
            self.beyond.remove(self.watermark)
            self.watermark += 1

    def to_json(self) -> dict:
        return {"watermark": self.watermark, "beyond": sorted(self.beyond)}

    @classmethod
    def from_json(cls, data: dict) -> "Consumed":
        return cls(data["watermark"], data["beyond"])


def advance(cursor: Cursor, records: int, consumed: list[Consumed], num_epochs: int | None) -> Cursor:
    """The cursor after `consumed[p]` of process p of len(consumed), all reading from `cursor`."""
    count = len(consumed)
    shares = [Share(cursor, records, p, count, num_epochs) for p in range(count)]
    touched = [max([c.watermark - 1, *c.beyond]) for c in consumed]
    last = max([cursor.epoch + len(cursor.segments) - 1]
               + [share.locate(i)[0] for share, i in zip(shares, touched) if i >= 0])
    segments = []
    for epoch in range(cursor.epoch, last + 1):
        segment = cursor.segment(epoch)
        free = segment.remaining(records)
        # k-space: index into this epoch's free positions; process p owns k = p + j * count.
        spans = [share.span(epoch) for share in shares]
        prefixes = [min(max(done.watermark - start, 0), length) for done, (start, length) in zip(consumed, spans)]
        mark = min([free] + [p + prefix * count for p, prefix in enumerate(prefixes)])
        taken = set()
        for p, (done, (start, length), prefix) in enumerate(zip(consumed, spans, prefixes)):
            taken.update(p + (i - start) * count for i in done.beyond if start <= i < start + length)
            taken.update(p + j * count for j in range(max(0, -(-(mark - p) // count)), prefix))
        while mark in taken:
            mark += 1
        watermark = int(segment.position(mark)) if mark < free else records
        beyond = {c for c in segment.consumed if c > watermark}
        beyond.update(int(q) for q in segment.position(sorted(k for k in taken if k > mark)))
        segments.append(Segment(watermark, tuple(sorted(beyond))))
    epoch = cursor.epoch
    while segments and segments[0].watermark == records:
        segments.pop(0)
        epoch += 1
    while segments and segments[-1] == WHOLE:
        segments.pop()
    return Cursor(epoch, tuple(segments))
