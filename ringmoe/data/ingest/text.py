"""Remote-sensing captioning and VQA sets in their published layouts -> records with text.

  captions  the Karpathy-style JSON of RSICD, UCM-Captions and Sydney-Captions:
            {"images": [{"filename": "airport_1.jpg", "split": "train",
                         "sentences": [{"raw": "many planes are parked ..."}, ...]}, ...]}
  rsvqa     RSVQA-LR / HR: the questions JSON ({"questions": [{"id", "img_id", "type",
            "question", "answers_ids", "active"}]}) and the answers JSON
            ({"answers": [{"id", "answer", "active"}]}); image `img_id` is `<img_id>.tif`.

Each image becomes one optical record (8-bit RGB -> [0, 1] reflectance through the
`rgb` sensor preset, read with rasterio, which reads JPEG, PNG and TIFF), carrying
its captions or its questions (`schema.Record.captions` / `.questions`). A missing
or unreadable image goes through the bad-record budget like any other record;
malformed JSON is one error naming the file and the entry. Inactive RSVQA
questions (`"active": false`, the authors' removed ones) are left out.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator

import numpy as np
import rasterio

from ringmoe.data import shards
from ringmoe.data.badrecords import BadRecordBudget
from ringmoe.data.schema import Record, RecordError
from ringmoe.data.sensors import get_preset
from ringmoe.errors import describe


def _load(path: str, key: str) -> list:
    try:
        with open(path) as f:
            document = json.load(f)
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(document, dict) or not isinstance(document.get(key), list):
        raise RecordError(f"{path}: expected an object with a {key!r} list")
    return document[key]


def _what(e: Exception) -> str:
    return f"key {e.args[0]!r}" if isinstance(e, KeyError) else describe(e)


def karpathy_captions(json_path: str, split: str | None = None) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(image file name, its captions) of every image in `split` (None: all)."""
    for i, entry in enumerate(_load(json_path, "images")):
        try:
            name, sentences = entry["filename"], entry["sentences"]
            texts = tuple(s["raw"].strip() for s in sentences)
        except (KeyError, TypeError, AttributeError) as e:
            raise RecordError(f"{json_path}: images[{i}]: no {_what(e)} (expected filename, sentences[].raw)") from None
        if split is None or entry.get("split") == split:
            yield name, tuple(t for t in texts if t)


def rsvqa_questions(questions_json: str, answers_json: str) -> dict[str, list[dict]]:
    """{image id: [{"type", "question", "answer"}, ...]} of the active questions."""
    answers = {}
    for i, a in enumerate(_load(answers_json, "answers")):
        try:
            answers[a["id"]] = a["answer"]
        except (KeyError, TypeError) as e:
            raise RecordError(f"{answers_json}: answers[{i}]: no {_what(e)} (expected id, answer)") from None
    by_image: dict[str, list[dict]] = {}
    for i, q in enumerate(_load(questions_json, "questions")):
        try:
            if not q.get("active", True):
                continue
            answer = answers[q["answers_ids"][0]]
            by_image.setdefault(str(q["img_id"]), []).append(
                {"type": str(q["type"]).lower().replace(" ", "_"), "question": q["question"], "answer": str(answer)})
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise RecordError(f"{questions_json}: questions[{i}]: no {_what(e)} (expected img_id, type, question, "
                              f"answers_ids naming an answer of {answers_json})") from None
    return by_image


def rgb_record(path: str, sample_id: str, gsd_m: float, source: str, **text) -> Record:
    """One 8-bit RGB image as an optical record (RecordError naming the file when unreadable)."""
    if not os.path.isfile(path):
        raise RecordError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                raw = ds.read()
    except Exception as e:  # rasterio raises RasterioIOError, CPLE_* for damaged files
        raise RecordError(f"{path}: unreadable image ({describe(e)})") from None
    converter = get_preset("rgb").bind(path, count=raw.shape[0], dtype=raw.dtype.name, gsd_m=gsd_m)
    image = converter.image(np.moveaxis(raw, 0, -1), path)
    return Record(sample_id=sample_id, modalities={"optical": image}, source=source, **text)


def _write(images, out_dir: str, *, gsd_m: float, shard_size: int, max_bad_records: int, source: str) -> dict:
    """Shards of the optical records of `images`: (path, sample id, text fields) each; an image
    that cannot be read goes through the bad-record budget. Returns the manifest."""
    stats: dict = {}
    budget = BadRecordBudget(max_bad_records, stats)

    def records():
        for path, sample_id, text in images:
            try:
                record = rgb_record(path, sample_id, gsd_m, source, **text)
            except RecordError as e:
                budget.skip(str(e))
                continue
            budget.good()
            yield record
    return shards.write_shards(records(), out_dir, shard_size=shard_size, source=source, extra=stats)


def convert_captions(json_path: str, image_dir: str, out_dir: str, *, split: str | None = None,
                     gsd_m: float = 1.0, shard_size: int = 1024, max_bad_records: int = 0, source: str = "") -> dict:
    """A Karpathy-style captions JSON and its image folder -> shards in `out_dir` (the manifest)."""
    images = ((os.path.join(image_dir, name), os.path.splitext(name)[0], {"captions": captions})
              for name, captions in karpathy_captions(json_path, split))
    return _write(images, out_dir, gsd_m=gsd_m, shard_size=shard_size, max_bad_records=max_bad_records,
                  source=source or f"captions:{os.path.basename(json_path)}")


def convert_rsvqa(questions_json: str, answers_json: str, image_dir: str, out_dir: str, *, gsd_m: float = 10.0,
                  shard_size: int = 1024, max_bad_records: int = 0, source: str = "") -> dict:
    """RSVQA questions and answers JSON and the image folder -> shards in `out_dir` (the manifest)."""
    by_image = rsvqa_questions(questions_json, answers_json)
    images = ((os.path.join(image_dir, f"{image_id}.tif"), image_id, {"questions": tuple(by_image[image_id])})
              for image_id in sorted(by_image, key=lambda k: (len(k), k)))
    return _write(images, out_dir, gsd_m=gsd_m, shard_size=shard_size, max_bad_records=max_bad_records,
                  source=source or f"rsvqa:{os.path.basename(questions_json)}")
