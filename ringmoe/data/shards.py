"""Data sets on disk: ArrayRecord shards of encoded records plus one `manifest.json`.

Layout of a data set directory:

    manifest.json            what is in it (below); written last, so a directory
                             without one is an incomplete conversion
    shard-00000.array_record records as `schema.encode` bytes, one per ArrayRecord
    shard-00001.array_record   entry (group_size 1: cheap random access for Grain)

The manifest holds the schema version, the record count, shard files with their
record counts, the modalities present (records, sensors, band metadata and the
per-band mean/std over valid pixels (`schema.valid_pixels`), accumulated in float64 while
streaming; the pipeline normalises with them), counts of paired vs single-modality
records, label names and counts, and the source. Nothing is pickled.

Training reads shards with Grain's ArrayRecordDataSource(shard_paths(dir)) and
`schema.decode`; `iter_records` is the simple sequential reader for tools.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from ringmoe.data import schema
from ringmoe.data.badrecords import BadRecordBudget
from ringmoe.data.schema import Record, RecordError
from ringmoe.errors import first_line

MANIFEST = "manifest.json"
FORMAT = "ringmoe-records"
WRITER_OPTIONS = "group_size:1,zstd:3"
_SHARD_RE = re.compile(r"^shard-\d{5}\.array_record$")


class _BandStats:
    """Streaming per-band count/mean/M2 (Chan et al. parallel update, float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def add(self, n: int, mean: float, m2: float) -> None:
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def summary(self) -> tuple[float | None, float | None]:
        if self.n == 0:
            return None, None
        return float(self.mean), float(np.sqrt(self.m2 / self.n))


class _Tally:
    """Everything the manifest says about records, accumulated one record at a time."""

    def __init__(self) -> None:
        self.records = 0
        self.modality_records: Counter = Counter()
        self.sensors: dict[str, Counter] = {}
        self.bands: dict[str, dict[str, dict]] = {}          # modality -> band name -> Band dict
        self.stats: dict[str, dict[str, _BandStats]] = {}    # modality -> band name -> stats
        self.combos: Counter = Counter()
        self.label_pixels: Counter = Counter()
        self.scene_labels: Counter = Counter()
        self.label_map_records = 0

    def add(self, record: Record) -> None:
        self.records += 1
        self.combos["+".join(sorted(record.modalities))] += 1
        for name, image in record.modalities.items():
            self.modality_records[name] += 1
            self.sensors.setdefault(name, Counter())[image.sensor] += 1
            bands = self.bands.setdefault(name, {})
            stats = self.stats.setdefault(name, {})
            px = image.pixels.reshape(-1, image.pixels.shape[-1])
            valid = np.broadcast_to(schema.valid_pixels(image).reshape(-1, 1), px.shape)
            n = valid.sum(0)
            x = np.where(valid, px, 0).astype(np.float64)
            mean = x.sum(0) / np.maximum(n, 1)
            m2 = (np.where(valid, px - mean, 0.0) ** 2).sum(0)
            for i, band in enumerate(image.bands):
                bands.setdefault(band.name, _band_dict(band))
                stats.setdefault(band.name, _BandStats()).add(int(n[i]), float(mean[i]), float(m2[i]))
        if record.label_map is not None:
            self.label_map_records += 1
            ids, counts = np.unique(record.label_map, return_counts=True)
            self.label_pixels.update({int(i): int(c) for i, c in zip(ids, counts)})
        if record.scene_label is not None:
            self.scene_labels[int(record.scene_label)] += 1

    def modalities(self) -> dict:
        out = {}
        for name in sorted(self.modality_records):
            names = list(self.bands[name])
            summaries = [self.stats[name][b].summary() for b in names]
            out[name] = {
                "records": self.modality_records[name], "unit": schema.UNITS[name],
                "sensors": dict(self.sensors[name]), "bands": [self.bands[name][b] for b in names],
                "mean": [m for m, _ in summaries], "std": [s for _, s in summaries],
                "valid_pixels": [self.stats[name][b].n for b in names],
            }
        return out


def _band_dict(band: schema.Band) -> dict:
    return {k: v for k, v in dataclasses.asdict(band).items() if v is not None}


def write_shards(records: Iterable[Record], out_dir: str, *, shard_size: int = 1024, source: str,
                 label_names: Sequence[str] = (), extra: Mapping | None = None) -> dict:
    """Validates, encodes and writes `records` into ArrayRecord shards of at most
    `shard_size` records under `out_dir`, then writes and returns the manifest.

    Refuses a directory that already holds a data set. `label_names[i]` names class
    id i (for label maps id 0 is 'unlabelled'); a label id outside them is an error.
    `extra` (JSON-able) is copied under the manifest's "extra" key after the last
    record is consumed, so an ingester can pass its live bad-record stats dict."""
    if shard_size < 1:
        raise RecordError(f"{out_dir}: shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    existing = [f for f in os.listdir(out_dir) if f == MANIFEST or _SHARD_RE.match(f)]
    if existing:
        raise RecordError(f"{out_dir}: already holds a data set ({sorted(existing)[0]}); use an empty directory")
    tally, shard_list, writer, count = _Tally(), [], None, 0
    try:
        for record in records:
            where = f"{source} #{tally.records}"
            schema.validate(record, where)
            _check_labels(record, label_names, where)
            data = schema.encode(record)
            if writer is None:
                shard_list.append({"file": f"shard-{len(shard_list):05d}.array_record", "records": 0})
                writer = ArrayRecordWriter(os.path.join(out_dir, shard_list[-1]["file"]), WRITER_OPTIONS)
            writer.write(data)
            shard_list[-1]["records"] += 1
            tally.add(record)
            count += 1
            if shard_list[-1]["records"] == shard_size:
                writer.close()
                writer = None
    except BaseException:
        if writer is not None:
            writer.close()
        for s in shard_list:  # leave no half-written data set behind: a rerun can use the same dir
            os.remove(os.path.join(out_dir, s["file"]))
        raise
    if writer is not None:
        writer.close()
    if count == 0:
        raise RecordError(f"{out_dir}: no records to write (source {source})")
    paired = sum(n for combo, n in tally.combos.items() if "+" in combo)
    manifest = {
        "format": FORMAT, "schema_version": schema.SCHEMA_VERSION, "source": source,
        "records": count, "shards": shard_list, "modalities": tally.modalities(),
        "paired_records": paired, "single_modality_records": count - paired,
        "modality_sets": dict(sorted(tally.combos.items())),
        "label_names": list(label_names),
        "labels": {
            "label_map_records": tally.label_map_records,
            "scene_label_records": sum(tally.scene_labels.values()),
            "label_map_pixels": {str(k): v for k, v in sorted(tally.label_pixels.items())},
            "scene_label_counts": {str(k): v for k, v in sorted(tally.scene_labels.items())},
        },
    }
    if extra:
        manifest["extra"] = dict(extra)
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, allow_nan=False)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return manifest


def _check_labels(record: Record, label_names: Sequence[str], where: str) -> None:
    where = f"{where}: record {record.sample_id!r}"
    ids = []
    if record.label_map is not None:
        if not np.issubdtype(record.label_map.dtype, np.integer):
            raise RecordError(f"{where}: label_map must be integer class ids, got {record.label_map.dtype}")
        if record.label_map.size:
            ids += [int(record.label_map.min()), int(record.label_map.max())]
    if record.scene_label is not None:
        ids.append(int(record.scene_label))
    if ids and min(ids) < 0:
        raise RecordError(f"{where}: negative class id {min(ids)}")
    if ids and label_names and max(ids) >= len(label_names):
        raise RecordError(f"{where}: class id {max(ids)} but only {len(label_names)} label names")


def read_manifest(data_dir: str) -> dict:
    """Loads and checks `data_dir/manifest.json` (structure, shard counts, finite band
    statistics); any problem is one RecordError line naming the file and the field."""
    if not os.path.exists(data_dir):
        raise RecordError(f"{data_dir}: no such data set directory")
    if not os.path.isdir(data_dir):
        raise RecordError(f"{data_dir}: not a directory")
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        what = "empty directory" if not os.listdir(data_dir) else "incomplete or not a data set"
        raise RecordError(f"{data_dir}: {what}: missing {MANIFEST}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: invalid manifest ({type(e).__name__}: {e})") from None
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(m: object, path: str) -> None:
    def bad(problem: str):
        raise RecordError(f"{path}: invalid manifest: {problem}")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        bad(f"not a {FORMAT} manifest")
    if m.get("schema_version") != schema.SCHEMA_VERSION:
        bad(f"schema version {m.get('schema_version')!r}, this code reads {schema.SCHEMA_VERSION}")
    for key, kind in (("records", int), ("shards", list), ("modalities", dict), ("label_names", list)):
        if not isinstance(m.get(key), kind):
            bad(f"{key!r} missing or not a {kind.__name__}")
    for s in m["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and _SHARD_RE.match(s["file"])
                and isinstance(s.get("records"), int) and s["records"] >= 0):
            bad(f"bad shard entry {s!r}")
    if sum(s["records"] for s in m["shards"]) != m["records"]:
        bad(f"shard record counts sum to {sum(s['records'] for s in m['shards'])}, not {m['records']}")
    for name, entry in m["modalities"].items():
        _check_band_stats(name, entry, bad)


def _check_band_stats(modality: str, entry: object, bad) -> None:
    """The per-band statistics the pipeline normalises with: one mean and one std per band,
    each finite (std >= 0), or both null (a band without valid pixels). A NaN here would
    make every normalised pixel NaN and every update non-finite, so it is refused where
    the manifest is read, naming the field and band."""
    key = f"modalities.{modality}"
    if not isinstance(entry, dict) or not isinstance(entry.get("bands"), list):
        bad(f"{key}: 'bands' missing or not a list")
    names = [b.get("name") if isinstance(b, dict) else None for b in entry["bands"]]
    for field in ("mean", "std"):
        values = entry.get(field)
        if not isinstance(values, list) or len(values) != len(names):
            got = f"{len(values)} values" if isinstance(values, list) else repr(values)
            bad(f"{key}.{field}: expected one value per band ({len(names)}), got {got}")
    for i, (mean, std) in enumerate(zip(entry["mean"], entry["std"])):
        where = f"{key}.%s[{i}] (band {names[i]!r})"
        if (mean is None) != (std is None):
            bad(f"{where % 'mean'} and std must both be numbers or both null, got {mean!r} and {std!r}")
        for field, value in (("mean", mean), ("std", std)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                bad(f"{where % field} is {value!r}, not a number")
            if not math.isfinite(value):
                bad(f"{where % field} is {value}: band statistics must be finite")
        if std is not None and std < 0:
            bad(f"{where % 'std'} is {std}: a standard deviation cannot be negative")


def shard_paths(data_dir: str) -> list[str]:
    """Paths of the data set's shards in manifest order; a missing shard is a RecordError."""
    paths = [os.path.join(data_dir, s["file"]) for s in read_manifest(data_dir)["shards"]]
    for p in paths:
        if not os.path.isfile(p):
            raise RecordError(f"{p}: shard listed in {MANIFEST} is missing")
    return paths


def checked_shard_paths(data_dir: str, manifest: Mapping) -> list[str]:
    """Paths of the data set's shards, after checking that each one opens and holds the
    number of records the manifest gives it; a missing, unreadable, truncated or padded
    shard is a RecordError naming the file and both counts. Opens every shard once
    (ArrayRecord reads its footer and index, not the records): what the pipeline does
    when it opens a data set, so a damaged shard stops the run before the first step,
    whatever the bad-record budget."""
    def fail(message: str, n: int = 0) -> None:
        raise RecordError(message)
    paths = []
    for shard in manifest["shards"]:
        path = os.path.join(data_dir, shard["file"])
        _close(_open_shard(path, shard["records"], fail))
        paths.append(path)
    return paths


def band_stats(manifest: Mapping, modality: str, band_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 arrays of `band_names` of `modality`, from the manifest."""
    entry = manifest["modalities"].get(modality)
    if entry is None:
        raise RecordError(f"manifest has no modality {modality!r} (has {sorted(manifest['modalities'])})")
    index = {b["name"]: i for i, b in enumerate(entry["bands"])}
    missing = [b for b in band_names if b not in index or entry["mean"][index[b]] is None]
    if missing:
        raise RecordError(f"manifest has no statistics for {modality} bands {missing}")
    mean = np.array([entry["mean"][index[b]] for b in band_names], np.float32)
    std = np.array([entry["std"][index[b]] for b in band_names], np.float32)
    return mean, std


def iter_records(data_dir: str, max_bad_records: int = 0, stats: dict | None = None) -> Iterator[Record]:
    """Decodes every record of a data set in order.

    The manifest is checked at call time. A record that fails to read, decode or
    validate is a RecordError naming the shard and record index; with
    `max_bad_records` K > 0 up to K bad records are skipped and counted instead (a
    truncated or unreadable shard counts all its records). `stats`, if given, gets
    'records' (good), 'bad_records' and 'errors' (messages)."""
    manifest = read_manifest(data_dir)
    budget = BadRecordBudget(max_bad_records, stats)
    return _iter_records(data_dir, manifest, budget)


def _iter_records(data_dir: str, manifest: dict, budget: BadRecordBudget) -> Iterator[Record]:
    for shard in manifest["shards"]:
        path = os.path.join(data_dir, shard["file"])
        reader = _open_shard(path, shard["records"], budget.skip)
        if reader is None:
            continue
        try:
            for i in range(shard["records"]):
                where = f"{path}: record {i}"
                try:
                    data = reader.read([i])[0]
                except Exception as e:  # riegeli reports corruption as RuntimeError
                    budget.skip(f"{where}: unreadable ({type(e).__name__}: {first_line(e)})")
                    continue
                try:
                    record = schema.decode(data, where)
                    schema.validate(record, where)
                except RecordError as e:
                    budget.skip(str(e))
                    continue
                budget.good()
                yield record
        finally:
            _close(reader)


def check_dataset(data_dir: str) -> dict:
    """Decodes every record (no bad-record limit) and returns the manifest plus a
    'check' entry: decoded (good) records, bad_records, first errors, decoded modality
    and paired counts. Manifest problems still raise RecordError."""
    manifest = read_manifest(data_dir)
    stats: dict = {}
    combos: Counter = Counter()
    for record in _iter_records(data_dir, manifest, BadRecordBudget(2**62, stats)):
        combos["+".join(sorted(record.modalities))] += 1
    manifest["check"] = {
        "decoded": stats["records"], "bad_records": stats["bad_records"], "errors": stats["errors"][:10],
        "modality_sets": dict(sorted(combos.items())),
        "paired_records": sum(n for c, n in combos.items() if "+" in c),
    }
    return manifest


def _open_shard(path: str, expected: int, skip) -> ArrayRecordReader | None:
    """Opens a shard and checks its record count; on failure reports via `skip`."""
    if not os.path.isfile(path):
        skip(f"{path}: shard listed in {MANIFEST} is missing", expected)
        return None
    try:
        reader = ArrayRecordReader(path)
        found = reader.num_records() if reader.ok() else None
    except Exception as e:  # a file shorter than one block, or not ArrayRecord at all
        skip(f"{path}: unreadable shard ({type(e).__name__}: {first_line(e)})", expected)
        return None
    if found != expected:
        _close(reader)
        got = "file is unreadable" if found is None else f"file holds {found}"
        skip(f"{path}: truncated or damaged shard: manifest says {expected} records, {got}", expected)
        return None
    return reader


def _close(reader: ArrayRecordReader) -> None:
    """Closes a reader; a damaged file's reader raises on close, which adds nothing."""
    try:
        reader.close()
    except Exception:
        pass


