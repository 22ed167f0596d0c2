"""Captioning and VQA sets in their published layouts (RSICD / UCM-Captions JSON, RSVQA) become
optical records carrying their text (ringmoe/data/ingest/text.py, `tools.convert captions|rsvqa`)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from array_record.python.array_record_module import ArrayRecordReader

from ringmoe.data import schema, shards
from ringmoe.data.ingest import text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_rgb(path, value):
    data = np.full((3, 16, 16), value, np.uint8)
    data[0, 0, 0] = 255
    with rasterio.open(path, "w", driver="PNG" if path.endswith(".png") else "GTiff", width=16, height=16,
                       count=3, dtype="uint8") as ds:
        ds.write(data)


def read_all(out_dir):
    manifest = shards.read_manifest(out_dir)
    records = []
    for path in shards.checked_shard_paths(out_dir, manifest):
        reader = ArrayRecordReader(path)
        records += [schema.decode(b, path) for b in reader.read_all()]
        reader.close()
    return records


@pytest.fixture()
def captions_set(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_rgb(str(images / "airport_1.png"), 51)
    write_rgb(str(images / "river_2.tif"), 102)
    doc = {"dataset": "rsicd", "images": [
        {"filename": "airport_1.png", "split": "train",
         "sentences": [{"raw": "many planes are parked near a terminal ."}, {"raw": "an airport . "}]},
        {"filename": "river_2.tif", "split": "test", "sentences": [{"raw": "a river runs through green fields ."}]},
        {"filename": "missing_3.jpg", "split": "train", "sentences": [{"raw": "a stadium ."}]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    return tmp_path


def test_captions_json_becomes_records_with_their_captions(captions_set, tmp_path):
    out = str(tmp_path / "out")
    manifest = text.convert_captions(str(captions_set / "dataset.json"), str(captions_set / "images"), out,
                                     max_bad_records=1)
    assert manifest["records"] == 2 and manifest["extra"]["bad_records"] == 1
    assert "missing_3.jpg: no such file" in manifest["extra"]["errors"][0]
    by_id = {r.sample_id: r for r in read_all(out)}
    assert by_id["airport_1"].captions == ("many planes are parked near a terminal .", "an airport .")
    pixels = by_id["river_2"].modalities["optical"].pixels
    np.testing.assert_allclose(pixels[1, 1], [0.4, 0.4, 0.4], rtol=1e-6)   # 102 / 255
    train = text.convert_captions(str(captions_set / "dataset.json"), str(captions_set / "images"),
                                  str(tmp_path / "train"), split="test")
    assert train["records"] == 1
    with pytest.raises(schema.RecordError, match="missing_3.jpg: no such file"):
        text.convert_captions(str(captions_set / "dataset.json"), str(captions_set / "images"), str(tmp_path / "x"))


def test_rsvqa_json_becomes_records_with_their_questions(tmp_path):
    images = tmp_path / "Images_LR"
    images.mkdir()
    for i in (0, 1):
        write_rgb(str(images / f"{i}.tif"), 10 * (i + 1))
    questions = {"questions": [
        {"id": 0, "img_id": 0, "type": "presence", "question": "Is there a road?", "answers_ids": [0], "active": True},
        {"id": 1, "img_id": 0, "type": "rural_urban", "question": "Is it a rural or an urban area",
         "answers_ids": [1], "active": True},
        {"id": 2, "img_id": 1, "type": "count", "question": "How many buildings are there?", "answers_ids": [2],
         "active": False},
        {"id": 3, "img_id": 1, "type": "comp", "question": "Is there more water than buildings?",
         "answers_ids": [3], "active": True}]}
    answers = {"answers": [{"id": 0, "answer": "yes"}, {"id": 1, "answer": "rural"}, {"id": 2, "answer": "0"},
                           {"id": 3, "answer": "no"}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    out = str(tmp_path / "out")
    assert text.convert_rsvqa(str(tmp_path / "q.json"), str(tmp_path / "a.json"), str(images), out)["records"] == 2
    by_id = {r.sample_id: r for r in read_all(out)}
    assert by_id["0"].questions == ({"type": "presence", "question": "Is there a road?", "answer": "yes"},
                                    {"type": "rural_urban", "question": "Is it a rural or an urban area",
                                     "answer": "rural"})
    assert by_id["1"].questions == ({"type": "comp", "question": "Is there more water than buildings?",
                                     "answer": "no"},)   # the inactive question is left out
    questions["questions"][3]["answers_ids"] = [9]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    with pytest.raises(schema.RecordError, match=r"q.json: questions\[3\]: no key 9"):
        text.convert_rsvqa(str(tmp_path / "q.json"), str(tmp_path / "a.json"), str(images), str(tmp_path / "y"))


def test_malformed_captions_json_names_the_entry(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"filename": "a.png", "sentences": [{"text": "x"}]}]}))
    with pytest.raises(schema.RecordError, match=r"bad.json: images\[0\]: no key 'raw'"):
        list(text.karpathy_captions(str(tmp_path / "bad.json")))
    (tmp_path / "notjson.json").write_text("{")
    with pytest.raises(schema.RecordError, match="notjson.json: not valid JSON"):
        list(text.karpathy_captions(str(tmp_path / "notjson.json")))


def test_convert_tool_takes_the_captions_kind(captions_set, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.convert", "captions", "--captions-json",
                          str(captions_set / "dataset.json"), "--images", str(captions_set / "images"),
                          "--out", str(tmp_path / "cli"), "--split", "train", "--max-bad-records", "1"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"records": 1, "shards": 1, "bad_records": 1,
                                                       "out": str(tmp_path / "cli")}
