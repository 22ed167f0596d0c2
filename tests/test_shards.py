"""Shards + manifest: round trip, shard splitting, streaming band statistics over valid
pixels, label bookkeeping, Grain readability, and refusing to clobber a data set."""
import json
import os

import numpy as np
import pytest

from ringmoe.data import schema, shards
from ringmoe.data.schema import RecordError
from tests.tif_helpers import make_record


def test_round_trip_and_shard_split(tmp_path):
    recs = [make_record(i) for i in range(5)]
    m = shards.write_shards(recs, str(tmp_path), shard_size=2, source="unit", label_names=("a", "b", "c"))
    assert [s["records"] for s in m["shards"]] == [2, 2, 1]
    assert shards.read_manifest(str(tmp_path)) == json.loads(json.dumps(m))
    assert [os.path.basename(p) for p in shards.shard_paths(str(tmp_path))] == [s["file"] for s in m["shards"]]
    stats = {}
    back = list(shards.iter_records(str(tmp_path), stats=stats))
    assert stats["records"] == 5 and stats["bad_records"] == 0
    for a, b in zip(recs, back):
        assert a.sample_id == b.sample_id and a.scene_label == b.scene_label and b.source == "test"
        np.testing.assert_array_equal(a.label_map, b.label_map)
        for name, img in a.modalities.items():
            np.testing.assert_array_equal(img.pixels, b.modalities[name].pixels)
            assert img.bands == b.modalities[name].bands and img.sensor == b.modalities[name].sensor
    assert m["paired_records"] == 5 and m["modality_sets"] == {"multispectral+sar_l2": 5}
    assert m["labels"]["scene_label_counts"] == {"0": 3, "1": 2}
    assert sum(m["labels"]["label_map_pixels"].values()) == 5 * 6 * 5


def test_band_stats_are_over_valid_pixels_and_band_names(tmp_path):
    recs = [make_record(i, nodata=-1.0) for i in range(3)]
    recs[0].modalities["multispectral"].pixels[:2, :, 0] = -1.0            # nodata in B2 only
    recs[1].modalities = {"multispectral": make_record(1, bands=("B2", "B10")).modalities["multispectral"]}
    m = shards.write_shards(recs, str(tmp_path), source="unit")
    ms = m["modalities"]["multispectral"]
    assert [b["name"] for b in ms["bands"]] == ["B2", "B3", "B10"]          # union, first-seen order
    b2 = np.concatenate([r.modalities["multispectral"].pixels[..., 0].ravel() for r in recs])
    b2 = b2[b2 != -1.0].astype(np.float64)
    assert ms["valid_pixels"][0] == b2.size == 3 * 30 - 10
    assert ms["mean"][0] == pytest.approx(b2.mean(), rel=1e-9) and ms["std"][0] == pytest.approx(b2.std(), rel=1e-9)
    assert ms["valid_pixels"][2] == 30                                       # B10 only in record 1
    assert m["single_modality_records"] == 1 and m["paired_records"] == 2
    mean, std = shards.band_stats(m, "multispectral", ["B10", "B2"])
    assert mean.dtype == np.float32 and mean[1] == pytest.approx(b2.mean())
    with pytest.raises(RecordError, match="no statistics for multispectral bands"):
        shards.band_stats(m, "multispectral", ["B9"])


def test_grain_array_record_source_reads_shards(tmp_path):
    grain = pytest.importorskip("grain.python")
    shards.write_shards([make_record(i) for i in range(3)], str(tmp_path), shard_size=2, source="unit")
    source = grain.ArrayRecordDataSource(shards.shard_paths(str(tmp_path)))
    assert len(source) == 3
    assert schema.decode(source[2], "grain[2]").sample_id == "s2"


def test_refuses_existing_data_set_and_cleans_up_failed_write(tmp_path):
    shards.write_shards([make_record(0)], str(tmp_path / "a"), source="unit")
    with pytest.raises(RecordError, match="already holds a data set"):
        shards.write_shards([make_record(1)], str(tmp_path / "a"), source="unit")
    bad = make_record(2)
    bad.modalities["sar_l2"].pixels[0, 0, 0] = np.nan
    with pytest.raises(RecordError, match=r"unit #1: record 's2' sar_l2: 1 NaN/Inf pixels"):
        shards.write_shards([make_record(1), bad], str(tmp_path / "b"), source="unit")
    assert os.listdir(tmp_path / "b") == []                                  # rerun can use the same dir
    with pytest.raises(RecordError, match="no records to write"):
        shards.write_shards([], str(tmp_path / "c"), source="unit")


def test_label_ids_must_fit_label_names(tmp_path):
    rec = make_record(0)
    rec.label_map[0, 0] = 7
    with pytest.raises(RecordError, match=r"unit #0: record 's0': class id 7 but only 3 label names"):
        shards.write_shards([rec], str(tmp_path), source="unit", label_names=("a", "b", "c"))
