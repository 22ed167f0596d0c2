"""Bad input: each case must fail with one RecordError line naming the culprit file or
record and the problem, or, under max_bad_records, be skipped and counted."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from affine import Affine
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from ringmoe.data import schema, shards
from ringmoe.data.ingest import geotiff
from ringmoe.data.schema import RecordError
from tests.tif_helpers import REPO, make_record, s1_db, s2_dn, write_csv, write_tif


def _dataset(path, n=3, shard_size=10):
    shards.write_shards([make_record(i) for i in range(n)], str(path), shard_size=shard_size, source="unit")
    return str(path), os.path.join(str(path), "shard-00000.array_record")


def _replace_record(shard, index, data):
    """Rewrites `shard` with record `index` replaced by raw `data` (counts unchanged)."""
    reader = ArrayRecordReader(shard)
    records = reader.read_all()
    reader.close()
    records[index] = data
    writer = ArrayRecordWriter(shard, shards.WRITER_OPTIONS)
    for r in records:
        writer.write(r)
    writer.close()


def _ingest(csv, **kw):
    return list(geotiff.iter_geotiff_records(csv, **kw))


# --- records and shards -------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "cut", "header"])
def test_corrupt_record_bytes_name_shard_and_record(tmp_path, damage):
    data_dir, shard = _dataset(tmp_path / "d")
    good = schema.encode(make_record(1))
    bad = {"garbage": b"\x00not a record at all",
           "cut": good[: len(good) // 2],
           "header": good[:8] + good[8:40].replace(b'"', b"#") + good[40:]}[damage]
    _replace_record(shard, 1, bad)
    with pytest.raises(RecordError, match=rf"{shard}: record 1: corrupt record bytes"):
        list(shards.iter_records(data_dir))
    stats = {}
    assert [r.sample_id for r in shards.iter_records(data_dir, max_bad_records=1, stats=stats)] == ["s0", "s2"]
    assert stats["bad_records"] == 1 and "record 1" in stats["errors"][0]


def test_inspect_counts_bad_records_and_exits_nonzero(tmp_path):
    data_dir, shard = _dataset(tmp_path / "d")
    _replace_record(shard, 2, b"junk")
    proc = subprocess.run([sys.executable, "-m", "tools.inspect", data_dir], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["records"] == 3 and summary["decoded"] == 2 and summary["bad_records"] == 1
    assert "record 2: corrupt record bytes" in summary["errors"][0]


def test_truncated_shard(tmp_path):
    data_dir, shard = _dataset(tmp_path / "d", n=4, shard_size=2)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(RecordError, match=rf"{shard}: (truncated or damaged shard: manifest says 2 records"
                                          rf"|unreadable shard)"):
        list(shards.iter_records(data_dir))
    stats = {}
    assert len(list(shards.iter_records(data_dir, max_bad_records=2, stats=stats))) == 2
    assert stats["bad_records"] == 2                               # the whole shard counts
    with pytest.raises(RecordError, match=r"more than 1 bad records"):
        list(shards.iter_records(data_dir, max_bad_records=1))
    os.remove(shard)
    with pytest.raises(RecordError, match=rf"{shard}: shard listed in manifest.json is missing"):
        shards.shard_paths(data_dir)


def test_empty_missing_and_invalid_data_set_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordError, match=rf"{tmp_path}/empty: empty directory: missing manifest.json"):
        shards.read_manifest(str(tmp_path / "empty"))
    with pytest.raises(RecordError, match="no such data set directory"):
        list(shards.iter_records(str(tmp_path / "nope")))
    data_dir, _ = _dataset(tmp_path / "d")
    manifest = os.path.join(data_dir, "manifest.json")
    with open(manifest, "w") as f:
        f.write('{"format": "ringmoe-records", ')
    with pytest.raises(RecordError, match=rf"{manifest}: invalid manifest \(JSONDecodeError"):
        shards.read_manifest(data_dir)
    with open(manifest, "w") as f:
        json.dump({"format": "ringmoe-records", "schema_version": 1, "records": 5, "shards": [
            {"file": "shard-00000.array_record", "records": 3}], "modalities": {}, "label_names": []}, f)
    with pytest.raises(RecordError, match="shard record counts sum to 3, not 5"):
        shards.read_manifest(data_dir)
    os.remove(manifest)
    with pytest.raises(RecordError, match="incomplete or not a data set: missing manifest.json"):
        shards.read_manifest(data_dir)
    proc = subprocess.run([sys.executable, "-m", "tools.inspect", str(tmp_path / "empty")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "empty directory" in proc.stderr


# --- GeoTIFF sources ----------------------------------------------------------------

def test_nan_inf_pixels_name_file_and_band(tmp_path):
    arr = s1_db()
    arr[1, 2, 3] = np.nan
    arr[1, 0, 0] = np.inf
    path = write_tif(tmp_path / "s1.tif", arr)
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel1_db", "s1.tif")])
    with pytest.raises(RecordError, match=rf"{path}: 2 NaN/Inf pixels not marked as nodata \(per band VH:2\)"):
        _ingest(csv)
    # Declared as nodata they are filled and left out of the statistics: the whole pixel, as
    # training leaves it out (schema.valid_pixels), so VV loses the same two pixels as VH.
    arr[1, 0, 0] = np.nan
    write_tif(tmp_path / "s1n.tif", arr, nodata=np.nan)
    csv = write_csv(tmp_path / "n.csv", [("a", "sentinel1_db", "s1n.tif")])
    m = geotiff.convert_geotiff(csv, str(tmp_path / "out"))
    assert m["modalities"]["sar_l2"]["valid_pixels"] == [62, 62]
    rec = next(shards.iter_records(str(tmp_path / "out")))
    assert rec.modalities["sar_l2"].nodata == -9999.0 and rec.modalities["sar_l2"].pixels[2, 3, 1] == -9999.0


def test_wrong_band_count_names_file_preset_expected_and_got(tmp_path):
    path = write_tif(tmp_path / "s2.tif", s2_dn(bands=3))
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l2a:offset=0", "s2.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sensor preset 'sentinel2_l2a' expects 12 bands .* got 3$"):
        _ingest(csv)


def test_wrong_dtype_names_file_preset_expected_and_got(tmp_path):
    path = write_tif(tmp_path / "s2.tif", s2_dn(dtype=np.uint8))
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l2a:offset=0", "s2.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sensor preset 'sentinel2_l2a' expects dtype uint16 or int16, "
                                          "got uint8"):
        _ingest(csv)
    path = write_tif(tmp_path / "rgb.tif", np.zeros((3, 4, 4), np.float32))
    csv = write_csv(tmp_path / "r.csv", [("a", "rgb", "rgb.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sensor preset 'rgb' expects dtype uint8, got float32"):
        _ingest(csv)


def test_unreadable_geotiff_names_it(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"this is not a TIFF file" * 10)
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel1_db", "junk.tif")])
    with pytest.raises(RecordError, match=rf"{tmp_path}/junk.tif: unreadable GeoTIFF"):
        _ingest(csv)
    good = write_tif(tmp_path / "big.tif", s2_dn(h=64, w=64))
    with open(good, "r+b") as f:
        f.truncate(os.path.getsize(good) // 3)
    csv = write_csv(tmp_path / "t.csv", [("a", "sentinel2_l2a:offset=0", "big.tif")])
    with pytest.raises(RecordError, match=rf"{good}: unreadable (GeoTIFF|pixels)"):
        _ingest(csv)
    csv = write_csv(tmp_path / "x.csv", [("a", "sentinel1_db", "missing.tif")])
    with pytest.raises(RecordError, match=rf"{tmp_path}/missing.tif: no such file"):
        _ingest(csv)


@pytest.mark.parametrize("what", ["transform", "crs", "shape", "label"])
def test_coregistration_mismatch_names_both_files(tmp_path, what):
    s2 = write_tif(tmp_path / "s2.tif", s2_dn())
    kw = {"transform": {"transform": Affine(10.0, 0.0, 500010.0, 0.0, -10.0, 6000000.0)},
          "crs": {"crs": "EPSG:32633"}, "shape": {}, "label": {}}[what]
    s1 = write_tif(tmp_path / "s1.tif", s1_db(h=9) if what == "shape" else s1_db(), **kw)
    rows = [("a", "sentinel2_l2a:offset=0", "s2.tif", ""), ("a", "sentinel1_db", "s1.tif", "")]
    if what == "label":
        write_tif(tmp_path / "s1.tif", s1_db())
        lab = write_tif(tmp_path / "lab.tif", np.ones((1, 8, 8), np.uint8), transform=Affine(20, 0, 0, 0, -20, 0))
        rows[0] = ("a", "sentinel2_l2a:offset=0", "s2.tif", "lab.tif")
    csv = write_csv(tmp_path / "m.csv", rows, label=True)
    other = lab if what == "label" else s1
    problem = {"transform": "transform", "crs": "CRS EPSG:32632 vs EPSG:32633", "shape": "shape 8x8 vs 9x8",
               "label": "transform"}[what]
    with pytest.raises(RecordError, match=rf"{other}: not co-registered with {s2}: .*{problem}"):
        _ingest(csv)


def test_max_bad_records_skips_and_counts_then_fails(tmp_path):
    nan = s1_db()
    nan[0, 0, 0] = np.nan
    write_tif(tmp_path / "good.tif", s1_db())
    write_tif(tmp_path / "nan.tif", nan)
    rows = [("a", "sentinel1_db", "good.tif"), ("b", "sentinel1_db", "nan.tif"), ("c", "sentinel1_db", "good.tif")]
    csv = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(RecordError, match="nan.tif: 1 NaN/Inf pixels"):        # default 0: stop at the first
        geotiff.convert_geotiff(csv, str(tmp_path / "o0"))
    m = geotiff.convert_geotiff(csv, str(tmp_path / "o1"), max_bad_records=1)
    assert m["records"] == 2 and m["extra"]["bad_records"] == 1 and "nan.tif" in m["extra"]["errors"][0]
    rows.append(("d", "sentinel1_db", "nan.tif"))
    csv = write_csv(tmp_path / "m2.csv", rows)
    with pytest.raises(RecordError, match=r"^more than 1 bad records \(2\); last: [^;]*nan.tif: 1 NaN/Inf pixels"):
        geotiff.convert_geotiff(csv, str(tmp_path / "o2"), max_bad_records=1)
    (tmp_path / "junk.tif").write_bytes(b"junk" * 50)                        # a whole sample is one bad record
    csv = write_csv(tmp_path / "m3.csv", [("a", "sentinel1_db", "good.tif"), ("j", "sentinel1_db", "junk.tif")])
    m = geotiff.convert_geotiff(csv, str(tmp_path / "o3"), max_bad_records=1)
    assert m["records"] == 1 and "junk.tif: unreadable GeoTIFF" in m["extra"]["errors"][0]


def test_csv_problems_are_fatal_and_named(tmp_path):
    write_tif(tmp_path / "a.tif", s1_db())
    (tmp_path / "cols.csv").write_text("id,sensor,path\na,sentinel1_db,a.tif\n")
    with pytest.raises(RecordError, match=r"cols.csv: manifest CSV lacks column\(s\) \['sample_id'\]"):
        _ingest(str(tmp_path / "cols.csv"))
    csv = write_csv(tmp_path / "u.csv", [("a", "sentinel3_olci", "a.tif")])
    with pytest.raises(RecordError, match=r"u.csv:2: unknown sensor preset 'sentinel3_olci'"):
        _ingest(csv)
    csv = write_csv(tmp_path / "d.csv", [("a", "sentinel1_db", "a.tif"), ("a", "sentinel1_db", "a.tif")])
    with pytest.raises(RecordError, match=r"d.csv:3: sample 'a' has two sar_l2 files"):
        _ingest(csv, max_bad_records=5)


def test_cli_reports_bad_input_as_one_line(tmp_path):
    path = write_tif(tmp_path / "s2.tif", s2_dn(bands=5))
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l2a:offset=0", "s2.tif")])
    proc = subprocess.run([sys.executable, "-m", "tools.convert", "geotiff", "--manifest", csv,
                           "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"tools.convert: error: {path}: sensor preset 'sentinel2_l2a' expects 12 bands "
                                   f"(B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9, B11, B12), got 5")
    assert not os.path.exists(tmp_path / "o") or os.listdir(tmp_path / "o") == []
