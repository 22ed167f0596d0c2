"""GeoTIFF ingestion: a CSV of co-registered sensor files -> schema Records -> shards.

The CSV has columns `sample_id,sensor,path` and optionally `label_path`; paths are
relative to the CSV's directory (or absolute). `sensor` is a preset spec from
`sensors` (e.g. `sentinel2_l2a:offset=0`). Rows sharing a sample_id are modalities
of one place and become one paired Record; they must be co-registered (same
shape, CRS and transform), as must the label raster. Large rasters are cut into
`tile` x `tile` records read window by window (edge remainders that do not fill
a tile are dropped); tile ids are suffixed `_r<row>_c<col>`.

Label rasters are single-band integer class-id maps; 0 (and the file's nodata)
means unlabelled, as in `schema.Record.label_map`.

Errors in one sample (unreadable file, mismatch, wrong bands/dtype, NaN pixels)
are bad records under the `max_bad_records` policy; errors in the CSV itself are
always fatal. Every message names the file.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import warnings
from typing import Iterator, Sequence

import numpy as np
import rasterio
import rasterio.errors
from rasterio.windows import Window

from ringmoe.data import sensors, shards
from ringmoe.data.badrecords import BadRecordBudget
from ringmoe.data.schema import Record, RecordError
from ringmoe.errors import describe

# Class names by id; index 0 is 'unlabelled'. esri_lulc9: the ESRI/Impact Observatory
# 10 m land-cover classes remapped to 1..9, as in the TerraMesh LULC chips of data/real.
LABEL_SCHEMES = {
    "esri_lulc9": ("unlabelled", "water", "trees", "flooded vegetation", "crops", "built area",
                   "bare ground", "snow/ice", "clouds", "rangeland"),
}
REQUIRED_COLUMNS = ("sample_id", "sensor", "path")


@dataclasses.dataclass
class Source:
    """One CSV row: a sensor file of a sample."""
    spec: str
    preset: sensors.SensorPreset
    options: dict[str, str]
    path: str


@dataclasses.dataclass
class Sample:
    """All rows of one sample_id: its co-registered files and optional label raster."""
    sample_id: str
    sources: list[Source]
    label_path: str | None = None


def label_names_from(text: str | None) -> tuple[str, ...]:
    """A named scheme from LABEL_SCHEMES, or comma-separated names (id = position)."""
    if not text:
        return ()
    if text in LABEL_SCHEMES:
        return LABEL_SCHEMES[text]
    return tuple(n.strip() for n in text.split(","))


def read_csv(csv_path: str) -> list[Sample]:
    """Parses the manifest CSV into samples in first-appearance order; fatal on any error."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise RecordError(f"{csv_path}: cannot read manifest CSV ({type(e).__name__}: {e})") from None
    if not rows:
        raise RecordError(f"{csv_path}: manifest CSV has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise RecordError(f"{csv_path}: manifest CSV lacks column(s) {missing}; "
                          f"needs {list(REQUIRED_COLUMNS)} (+ optional label_path)")
    base = os.path.dirname(os.path.abspath(csv_path))
    samples: dict[str, Sample] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path}:{line}"
        values = {c: (row.get(c) or "").strip() for c in (*REQUIRED_COLUMNS, "label_path")}
        empty = [c for c in REQUIRED_COLUMNS if not values[c]]
        if empty:
            raise RecordError(f"{where}: empty {empty}")
        preset, options = sensors.parse_spec(values["sensor"], where)
        source = Source(values["sensor"], preset, options, os.path.join(base, values["path"]))
        sample = samples.setdefault(values["sample_id"], Sample(values["sample_id"], []))
        for other in sample.sources:
            if other.preset.modality == preset.modality:
                raise RecordError(f"{where}: sample {sample.sample_id!r} has two {preset.modality} files: "
                                  f"{other.path} and {source.path}")
        sample.sources.append(source)
        if values["label_path"]:
            label = os.path.join(base, values["label_path"])
            if sample.label_path not in (None, label):
                raise RecordError(f"{where}: sample {sample.sample_id!r} has two label rasters: "
                                  f"{sample.label_path} and {label}")
            sample.label_path = label
    return list(samples.values())


def iter_geotiff_records(csv_path: str, *, tile: int | None = None, source: str = "",
                         max_bad_records: int = 0, stats: dict | None = None) -> Iterator[Record]:
    """Records of every sample (or tile) in the CSV; bad ones go through the budget."""
    samples = read_csv(csv_path)
    if tile is not None and tile < 1:
        raise RecordError(f"tile size must be >= 1, got {tile}")
    budget = BadRecordBudget(max_bad_records, stats)
    return _records(samples, tile, source or f"geotiff:{csv_path}", budget)


def _records(samples: list[Sample], tile: int | None, source: str, budget: BadRecordBudget) -> Iterator[Record]:
    for sample in samples:
        opened = _OpenSample(sample, tile)
        try:
            opened.__enter__()
        except RecordError as e:  # the whole sample is bad: counts as one record
            budget.skip(str(e))
            continue
        with opened:
            for tile_id, window in opened.windows:
                try:
                    record = opened.read(tile_id, window, source)
                except RecordError as e:
                    budget.skip(str(e))
                    continue
                budget.good()
                yield record


class _OpenSample(contextlib.ExitStack):
    """Opens a sample's rasters, checks co-registration, binds presets, plans windows."""

    def __init__(self, sample: Sample, tile: int | None) -> None:
        super().__init__()
        self.sample, self.tile = sample, tile

    def __enter__(self) -> "_OpenSample":
        super().__enter__()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        s = self.sample
        self.files = [(src, self.enter_context(_open(src.path))) for src in s.sources]
        self.label = self.enter_context(_open(s.label_path)) if s.label_path else None
        ref_src, ref = self.files[0]
        others = [(src.path, ds) for src, ds in self.files[1:]]
        if self.label is not None:
            others.append((s.label_path, self.label))
        for path, ds in others:
            _check_coregistered(ref_src.path, ref, path, ds)
        self.converters = []
        for src, ds in self.files:
            dtypes = set(ds.dtypes)
            if len(dtypes) > 1:
                raise RecordError(f"{src.path}: bands have mixed dtypes {sorted(dtypes)}")
            self.converters.append(src.preset.bind(
                src.path, count=ds.count, dtype=ds.dtypes[0], options=src.options,
                tags=ds.tags(), file_nodata=ds.nodata, gsd_m=_gsd_m(ds),
                scales=ds.scales, offsets=ds.offsets))
        if self.label is not None:
            if self.label.count != 1 or not np.issubdtype(np.dtype(self.label.dtypes[0]), np.integer):
                raise RecordError(f"{s.label_path}: label raster must be 1 integer band, got "
                                  f"{self.label.count} band(s) of {self.label.dtypes[0]}")
        self.windows = _windows(ref.height, ref.width, self.tile, ref_src.path)

    def read(self, tile_id: str | None, window: Window, source: str) -> Record:
        """Reads one window of every file into a Record."""
        modalities = {}
        for (src, ds), conv in zip(self.files, self.converters):
            where = src.path if tile_id is None else f"{src.path} tile {tile_id}"
            raw = np.moveaxis(_read(ds, src.path, window), 0, -1)
            modalities[src.preset.modality] = conv.image(raw, where)
        label_map = None
        if self.label is not None:
            raw = _read(self.label, self.sample.label_path, window)[0].astype(np.int64)
            if self.label.nodata is not None:
                raw[raw == self.label.nodata] = 0
            if raw.size and raw.min() < 0:
                raise RecordError(f"{self.sample.label_path}: negative class id {int(raw.min())}")
            label_map = raw.astype(np.int32)
        sample_id = self.sample.sample_id if tile_id is None else f"{self.sample.sample_id}_{tile_id}"
        return Record(sample_id=sample_id, modalities=modalities, label_map=label_map, source=source)


def _open(path: str):
    """rasterio.open with one clear RecordError line for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise RecordError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except Exception as e:  # rasterio raises RasterioIOError, CPLE_* for damaged files
        raise RecordError(f"{path}: unreadable GeoTIFF ({describe(e)})") from None


def _read(ds, path: str, window: Window) -> np.ndarray:
    try:
        return ds.read(window=window)
    except Exception as e:  # truncated strips/tiles surface only on read
        raise RecordError(f"{path}: unreadable pixels ({describe(e)})") from None


def _check_coregistered(path_a: str, a, path_b: str, b) -> None:
    """Same shape, CRS and geotransform, or a RecordError naming both files."""
    problems = []
    if (a.height, a.width) != (b.height, b.width):
        problems.append(f"shape {a.height}x{a.width} vs {b.height}x{b.width}")
    if a.crs != b.crs:
        problems.append(f"CRS {a.crs} vs {b.crs}")
    if not a.transform.almost_equals(b.transform, precision=1e-6):
        problems.append(f"transform {tuple(a.transform)[:6]} vs {tuple(b.transform)[:6]}")
    if problems:
        raise RecordError(f"{path_b}: not co-registered with {path_a}: {'; '.join(problems)}")


def _gsd_m(ds) -> float | None:
    """Pixel size in metres when the CRS is projected in metres and pixels are square."""
    crs = ds.crs
    if crs is None or not crs.is_projected or (crs.linear_units or "").lower() not in ("metre", "meter", "m"):
        return None
    x, y = ds.res
    return float(x) if abs(x - y) < 1e-6 * max(x, y) else None


def _windows(height: int, width: int, tile: int | None, where: str) -> list[tuple[str | None, Window]]:
    """Whole raster when `tile` is None (or equals the raster); else full tiles row-major."""
    if tile is None or (height, width) == (tile, tile):
        return [(None, Window(0, 0, width, height))]
    if height < tile or width < tile:
        raise RecordError(f"{where}: raster {height}x{width} is smaller than tile {tile}")
    return [(f"r{r:03d}_c{c:03d}", Window(c * tile, r * tile, tile, tile))
            for r in range(height // tile) for c in range(width // tile)]




def convert_geotiff(csv_path: str, out_dir: str, *, tile: int | None = None, shard_size: int = 1024,
                    max_bad_records: int = 0, label_names: Sequence[str] = (), source: str = "") -> dict:
    """CSV of GeoTIFFs -> shards in `out_dir`; returns the manifest (skipped records under 'extra')."""
    stats: dict = {}
    source = source or f"geotiff:{os.path.basename(csv_path)}"
    records = iter_geotiff_records(csv_path, tile=tile, source=source,
                                   max_bad_records=max_bad_records, stats=stats)
    return shards.write_shards(records, out_dir, shard_size=shard_size, source=source,
                               label_names=label_names, extra=stats)
