"""TFDS ingestion: prepared eurosat/all and so2sat/all splits -> schema Records -> shards.

Reads through `tfds.data_source` (random-access ArrayRecord + numpy feature
decoding), which works without TensorFlow; so does `tfds.testing.mock_data`.
What needs TensorFlow is *preparing* eurosat (its generator globs with
tf.io.gfile) and anything through `tfds.load` / tf.data, neither used here. A split
must therefore already be prepared in ArrayRecord format (`file_format=array_record`);
nothing is downloaded.

Mappings (feature specs of tensorflow-datasets 4.9.10):
* eurosat/all: `sentinel2` float32 (64, 64, 13) holds Sentinel-2 L1C DNs (uint16 values
  as floats) in the channel order of EuroSAT's TIFFs, B1..B8, B9, B10, B11, B12, B8A
  (B8A last; EuroSAT issue 7, TorchGeo pull request 2480). The channels are reordered
  into the L1C order of `sentinel2_l1c` (B1..B8, B8A, B9..B12) before band metadata is
  bound, so every channel gets its own wavelength. EuroSAT was made in 2017 from L1C
  products, years before processing baseline 04.00 (2022) introduced the offset, so
  offset 0. `label` -> scene_label.
* so2sat/all: `sentinel1` float32 (32, 32, 8) = Re/Im of unfiltered VH, Re/Im of VV,
  Lee-filtered VH and VV intensities, Re/Im of the Lee-filtered covariance term. The
  first four are the complex dual-pol SLC signal -> `sentinel1_slc` sar_l1 (4 channels);
  the four speckle-filtered derivatives are dropped. `sentinel2` float32 (32, 32, 10) is
  reflectance already (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12) -> multispectral.
  Both in one paired record; `label` (LCZ class) -> scene_label.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np

from ringmoe.data import sensors, shards
from ringmoe.data.badrecords import BadRecordBudget
from ringmoe.data.schema import ModalityImage, Record, RecordError
from ringmoe.errors import describe

SO2SAT_S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
# Channel order of EuroSAT's all-band TIFFs, and the file channel of each L1C-order band.
EUROSAT_FILE_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B8A")
EUROSAT_TO_L1C = tuple(EUROSAT_FILE_BANDS.index(b) for b in sensors.S2_L1C_ORDER)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _eurosat(ex: dict, index: int, split: str, where: str) -> Record:
    dn = np.asarray(ex["sentinel2"])
    if dn.ndim != 3 or dn.shape[-1] != len(EUROSAT_FILE_BANDS):
        raise RecordError(f"{where}: sentinel2 must be (H, W, 13), got {dn.shape}")
    if not np.all(np.isfinite(dn)) or np.any(dn != np.round(dn)) or dn.min() < 0 or dn.max() > 65535:
        raise RecordError(f"{where}: sentinel2 values are not uint16 DNs "
                          f"(range {np.nanmin(dn):g}..{np.nanmax(dn):g}); not EuroSAT all-band data?")
    conv = sensors.get_preset("sentinel2_l1c").bind(
        where, count=dn.shape[-1], dtype="uint16", options={"offset": "0"}, gsd_m=10.0)
    name = _text(ex.get("filename", b"")) or f"{split}-{index:06d}"
    l1c = dn[..., list(EUROSAT_TO_L1C)].astype(np.uint16)
    return Record(sample_id=name, modalities={"multispectral": conv.image(l1c, where)},
                  scene_label=int(ex["label"]))


def _so2sat(ex: dict, index: int, split: str, where: str) -> Record:
    s1, s2 = np.asarray(ex["sentinel1"]), np.asarray(ex["sentinel2"])
    if s1.ndim != 3 or s1.shape[-1] != 8 or s2.ndim != 3 or s2.shape[-1] != len(SO2SAT_S2_BANDS):
        raise RecordError(f"{where}: expected sentinel1 (H, W, 8) and sentinel2 (H, W, 10), "
                          f"got {s1.shape} and {s2.shape}")
    slc = sensors.get_preset("sentinel1_slc").bind(f"{where} sentinel1", count=4, dtype=s1.dtype)
    sar = slc.image(s1[..., :4], f"{where} sentinel1")
    ms = ModalityImage(modality="multispectral", pixels=s2.astype(np.float32),
                       bands=tuple(sensors.sentinel2_band(b) for b in SO2SAT_S2_BANDS),
                       sensor="so2sat_sentinel2", gsd_m=10.0)
    sample = ex.get("sample_id")
    sample_id = f"{split}-{int(sample) if sample is not None else index:06d}"
    return Record(sample_id=sample_id, modalities={"sar_l1": sar, "multispectral": ms},
                  scene_label=int(ex["label"]))


MAPPERS: dict[str, Callable[[dict, int, str, str], Record]] = {
    "eurosat/all": _eurosat, "so2sat/all": _so2sat}


def open_source(name: str, split: str = "train", data_dir: str | None = None):
    """(data source, label names) of a prepared split; one RecordError line otherwise."""
    key = name.split(":")[0]
    if key not in MAPPERS:
        raise RecordError(f"tfds {name!r}: not supported; choose one of {sorted(MAPPERS)}")
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # a broken optional install should read as one line
        raise RecordError(f"tfds {name}: cannot import tensorflow_datasets ({type(e).__name__}: {e})") from None
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        info = getattr(ds, "dataset_info", None) or tfds.builder(name, data_dir=data_dir).info
        names = list(info.features["label"].names)
    except Exception as e:
        raise RecordError(_open_error(tfds, name, split, data_dir, e)) from None
    return ds, names


def _open_error(tfds, name: str, split: str, data_dir: str | None, e: Exception) -> str:
    """Says why a split would not open; TFDS's own message for an unprepared data set
    ('TFRECORD not supported') misleads, so check for dataset_info.json first."""
    try:
        version_dir = tfds.builder(name, data_dir=data_dir).data_dir
        prepared = os.path.exists(os.path.join(version_dir, "dataset_info.json"))
    except Exception:
        version_dir, prepared = data_dir or "the default data_dir", True
    hint = (f"prepare it in ArrayRecord format first (tfds build {name.split(':')[0]} "
            "--file_format=array_record; eurosat's generator needs TensorFlow), then pass --data-dir")
    if not prepared:
        return f"tfds {name} split {split!r}: not prepared in {version_dir}; {hint}"
    return f"tfds {name} split {split!r} in {version_dir}: cannot open ({describe(e)}); {hint}"


def iter_tfds_records(name: str, *, split: str = "train", data_dir: str | None = None,
                      max_bad_records: int = 0, stats: dict | None = None) -> Iterator[Record]:
    """Records of one split, in index order; bad examples go through the budget."""
    ds, _ = open_source(name, split, data_dir)
    mapper = MAPPERS[name.split(":")[0]]
    budget = BadRecordBudget(max_bad_records, stats)
    source = f"tfds:{name}/{split}"

    def records() -> Iterator[Record]:
        for i in range(len(ds)):
            where = f"tfds {name} {split}[{i}]"
            try:
                ex = ds[i]
            except Exception as e:  # riegeli / proto errors from a damaged shard
                budget.skip(f"{where}: unreadable ({describe(e)})")
                continue
            try:
                record = mapper(ex, i, split, where)
            except (RecordError, KeyError, TypeError, ValueError) as e:
                budget.skip(str(e) if isinstance(e, RecordError) else f"{where}: {type(e).__name__}: {e}")
                continue
            record.source = source
            budget.good()
            yield record
    return records()


def convert_tfds(name: str, out_dir: str, *, split: str = "train", data_dir: str | None = None,
                 shard_size: int = 1024, max_bad_records: int = 0) -> dict:
    """One prepared TFDS split -> shards in `out_dir`; returns the manifest."""
    _, label_names = open_source(name, split, data_dir)
    stats: dict = {}
    records = iter_tfds_records(name, split=split, data_dir=data_dir,
                                max_bad_records=max_bad_records, stats=stats)
    return shards.write_shards(records, out_dir, shard_size=shard_size, source=f"tfds:{name}/{split}",
                               label_names=label_names, extra=stats)
