"""The one record schema: a place on the ground seen by one or more modalities.

A record holds every co-registered modality of one place (paired) or a single
one (unpaired), each in its physical unit, with per-band metadata, plus optional
labels. Records are serialised as safetensors bytes (arrays + a JSON header), so
reading a shard never unpickles anything.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import safetensors.numpy

SCHEMA_VERSION = 1
MODALITIES = ("optical", "multispectral", "sar_l2", "sar_l1")
# Physical unit of each modality's pixels.
UNITS = {
    "optical": "reflectance",       # true colour scaled to [0, 1]
    "multispectral": "reflectance",  # surface / top-of-atmosphere reflectance
    "sar_l2": "db",                  # backscatter sigma0 in dB (detected product)
    "sar_l1": "complex",             # scattering matrix, Re/Im interleaved per polarisation
}


class RecordError(ValueError):
    """A record or source file is malformed; the message names it and the problem."""


@dataclasses.dataclass(frozen=True)
class Band:
    """One channel. Optical bands carry wavelength/bandwidth in nm; SAR channels
    carry radar frequency (GHz), polarisation (e.g. 'VV') and, for complex data,
    which part ('re' / 'im')."""
    name: str
    wavelength_nm: float | None = None
    bandwidth_nm: float | None = None
    frequency_ghz: float | None = None
    polarization: str | None = None
    part: str | None = None


@dataclasses.dataclass
class ModalityImage:
    """Pixels (H, W, C) of one modality in its physical unit (`UNITS`), float32.

    `nodata` is the fill value the reader wrote into pixels without data (None: all
    pixels valid); `valid_pixels` turns it into the per-pixel mask the pipeline
    and every loss term use."""
    modality: str
    pixels: np.ndarray
    bands: tuple[Band, ...]
    sensor: str
    gsd_m: float
    nodata: float | None = None


def valid_pixels(image: ModalityImage) -> np.ndarray:
    """(H, W) bool: pixels that hold data.

    A pixel is invalid when a channel holds the no-data fill (a missing band
    value makes the spectrum, the polarimetric powers and the indices all wrong),
    except for complex SAR, where one part of one polarisation can legitimately
    be exactly 0 (integer SLC samples): there the pixel is invalid only when
    every channel holds the fill (0 + 0j in all polarisations, the SLC border fill).
    """
    px = image.pixels
    if image.nodata is None:
        return np.ones(px.shape[:2], bool)
    fill = px == np.float32(image.nodata)
    missing = fill.all(-1) if UNITS.get(image.modality) == "complex" else fill.any(-1)
    return ~missing


QUESTION_KEYS = ("type", "question", "answer")


@dataclasses.dataclass
class Record:
    """A place on the ground. Text, when the record has any: reference `captions` and
    visual questions, each {"type", "question", "answer"} (RSVQA-LR's types)."""
    sample_id: str
    modalities: dict[str, ModalityImage]
    label_map: np.ndarray | None = None   # (H, W) int32 class ids, 0 = unlabelled
    scene_label: int | None = None
    source: str = ""
    captions: tuple[str, ...] = ()
    questions: tuple[dict, ...] = ()


def validate(record: Record, where: str) -> None:
    """Checks shapes, band counts and finiteness; raises RecordError naming `where`."""
    if not record.modalities:
        raise RecordError(f"{where}: record {record.sample_id!r} has no modality")
    shapes = set()
    for name, image in record.modalities.items():
        if name not in MODALITIES:
            raise RecordError(f"{where}: record {record.sample_id!r}: unknown modality {name!r}")
        if image.modality != name:
            raise RecordError(f"{where}: record {record.sample_id!r}: image of {image.modality!r} stored as {name!r}")
        px = image.pixels
        if px.ndim != 3:
            raise RecordError(f"{where}: record {record.sample_id!r} {name}: pixels must be (H, W, C), got {px.shape}")
        if px.shape[-1] != len(image.bands):
            raise RecordError(f"{where}: record {record.sample_id!r} {name}: {px.shape[-1]} channels "
                              f"but {len(image.bands)} band entries")
        if not np.all(np.isfinite(px)):
            bad = int(np.size(px) - np.count_nonzero(np.isfinite(px)))
            raise RecordError(f"{where}: record {record.sample_id!r} {name}: {bad} NaN/Inf pixels")
        shapes.add(px.shape[:2])
    if record.label_map is not None:
        lm = record.label_map
        if lm.ndim != 2 or not np.issubdtype(lm.dtype, np.integer):
            raise RecordError(f"{where}: record {record.sample_id!r}: label_map must be (H, W) integer "
                              f"class ids, got {lm.shape} {lm.dtype}")
        shapes.add(lm.shape)
    if len(shapes) > 1:
        raise RecordError(f"{where}: record {record.sample_id!r}: modalities/labels not co-registered, shapes {sorted(shapes)}")
    for i, text in enumerate(record.captions):
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: record {record.sample_id!r}: caption {i} is not a non-empty string")
    for i, qa in enumerate(record.questions):
        if (not isinstance(qa, dict) or sorted(qa) != sorted(QUESTION_KEYS)
                or not all(isinstance(qa[k], str) and qa[k].strip() for k in QUESTION_KEYS)):
            raise RecordError(f"{where}: record {record.sample_id!r}: question {i} must be non-empty strings "
                              f"{list(QUESTION_KEYS)}, got {qa!r}")


def encode(record: Record) -> bytes:
    """Serialises a record to safetensors bytes; the JSON header holds the metadata."""
    tensors: dict[str, np.ndarray] = {}
    meta: dict = {"schema_version": SCHEMA_VERSION, "sample_id": record.sample_id,
                  "scene_label": record.scene_label, "source": record.source, "modalities": {}}
    for name, image in record.modalities.items():
        tensors[f"{name}/pixels"] = np.ascontiguousarray(image.pixels, dtype=np.float32)
        meta["modalities"][name] = {
            "sensor": image.sensor, "gsd_m": image.gsd_m, "nodata": image.nodata,
            "bands": [dataclasses.asdict(b) for b in image.bands],
        }
    if record.label_map is not None:
        tensors["label_map"] = np.ascontiguousarray(record.label_map, dtype=np.int32)
    if record.captions:   # only when present: records without text keep their exact bytes
        meta["captions"] = list(record.captions)
    if record.questions:
        meta["questions"] = [dict(qa) for qa in record.questions]
    return safetensors.numpy.save(tensors, metadata={"record": json.dumps(meta)})


def decode(data: bytes, where: str) -> Record:
    """Parses bytes written by `encode`; any corruption raises RecordError naming `where`."""
    try:
        tensors = safetensors.numpy.load(data)
        meta = json.loads(_header_metadata(data)["record"])
    except RecordError:
        raise
    except Exception as e:  # safetensors / json raise several types for bad bytes
        raise RecordError(f"{where}: corrupt record bytes ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        version = meta.get("schema_version") if isinstance(meta, dict) else None
        raise RecordError(f"{where}: schema version {version}, expected {SCHEMA_VERSION}")
    try:
        modalities = {}
        for name, m in meta["modalities"].items():
            key = f"{name}/pixels"
            if key not in tensors:
                raise RecordError(f"{where}: record {meta['sample_id']!r} lacks pixels of {name}")
            modalities[name] = ModalityImage(
                modality=name, pixels=tensors[key], bands=tuple(Band(**b) for b in m["bands"]),
                sensor=m["sensor"], gsd_m=m["gsd_m"], nodata=m["nodata"])
        return Record(sample_id=meta["sample_id"], modalities=modalities,
                      label_map=tensors.get("label_map"), scene_label=meta["scene_label"], source=meta["source"],
                      captions=tuple(meta.get("captions", ())), questions=tuple(meta.get("questions", ())))
    except (KeyError, TypeError, AttributeError) as e:  # well-formed JSON, wrong content
        raise RecordError(f"{where}: malformed record metadata ({type(e).__name__}: {e})") from None


def _header_metadata(data: bytes) -> dict:
    """The `__metadata__` map of a safetensors buffer (its first 8 bytes give the header length)."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("truncated safetensors header")  # decode() adds where
    return json.loads(data[8:8 + n]).get("__metadata__", {})
