"""Input pipeline: fixed shapes, co-registered augmentation, normalisation, masks,
exact resume, process sharding, bad-record policy, modality serving."""
import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from configs import tiny
from ringmoe.data import pipeline as pl
from ringmoe.data import schema, sensors, shards, synthetic
from ringmoe.data.schema import ModalityImage, Record, RecordError
from tests.tif_helpers import REAL_CSV

PRESET = {"optical": "rgb", "multispectral": "sentinel2_l2a", "sar_l2": "sentinel1_db",
          "sar_l1": "sar_l1_quadpol"}
CHANNELS = {"optical": 3, "multispectral": 12, "sar_l2": 2, "sar_l1": 8}


def config(batch_size=8, **data):
    c = tiny.get_config()
    c.batch_size = batch_size
    c.data.prefetch = 0
    c.data.read_threads = 1
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def take(pipe, n):
    return [next(pipe) for _ in range(n)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """48 labelled 64 px synthetic records, half paired, in 3 shards."""
    d = str(tmp_path_factory.mktemp("mixed"))
    synthetic.write(d, 48, 64, 1, shard_size=16, paired_fraction=0.5, labeled=True)
    return d


@pytest.fixture(scope="module")
def coords(tmp_path_factory):
    """Paired 40 x 48 records whose every channel holds the pixel's row (even channels) or
    column (odd channels), plus label id = 1 + row * 48 + column: any crop/flip shows up."""
    d = str(tmp_path_factory.mktemp("coords"))
    h, w = 40, 48
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def image(m):
        preset = sensors.get_preset(PRESET[m])
        px = np.stack([yy if c % 2 == 0 else xx for c in range(CHANNELS[m])], -1)
        return ModalityImage(m, px, preset.bands, preset.name, 10.0)

    labels = (1 + yy * w + xx).astype(np.int32)
    recs = [Record(f"c{i}", {m: image(m) for m in PRESET}, labels, 1) for i in range(8)]
    shards.write_shards(recs, d, source="coords", label_names=[str(i) for i in range(h * w + 1)])
    return d


def test_shapes_dtypes_and_spec(mixed):
    with pl.Pipeline(config(), mixed, process_index=0, process_count=1) as p:
        assert p.batch_sizes == {"optical": 2, "multispectral": 2, "sar_l2": 2, "sar_l1": 2}
        spec = p.batch_spec()
        for batch in take(p, 4):
            assert set(batch) == set(spec)
            for m, arrays in batch.items():
                for k, (shape, dtype) in spec[m].items():
                    assert arrays[k].shape == shape and arrays[k].dtype == np.dtype(dtype), (m, k)
                assert arrays["pixels"].shape == (2, 64, 64, CHANNELS[m])
                assert np.all(arrays["record_index"] >= 0) and np.all(arrays["scene_label"] >= 1)
                assert np.isfinite(arrays["pixels"]).all()


def test_batch_sizes_follow_weights():
    assert pl.modality_batch_sizes(10, {"optical": 1, "sar_l2": 1}) == {"optical": 5, "sar_l2": 5}
    assert pl.modality_batch_sizes(12, {"optical": 3, "sar_l2": 1, "sar_l1": 0}) == {"optical": 9, "sar_l2": 3}
    assert pl.modality_batch_sizes(4, {"optical": 100, "sar_l2": 1}) == {"optical": 3, "sar_l2": 1}
    with pytest.raises(ValueError, match="raise batch_size"):
        pl.modality_batch_sizes(1, {"optical": 1, "sar_l2": 1})


def test_crop_and_flip_identical_across_modalities(coords):
    """One crop box and one pair of flips for every modality and the labels; each modality
    resampled as its unit requires (augment.RESAMPLERS): reflectance bilinearly, complex SAR
    by nearest neighbour (the label's pixel), dB through linear power (within the pixel)."""
    c = config(batch_size=16, crop_scale=(0.2, 0.5))
    flips = set()
    with pl.Pipeline(c, coords, process_index=0, process_count=1) as p:
        for batch in take(p, 3):
            order = np.argsort(batch["optical"]["record_index"], kind="stable")
            lab = batch["optical"]["label_map"][order] - 1
            label_yx = np.stack([lab // 48, lab % 48], -1)
            ref = None
            for m in ("optical", "multispectral", "sar_l2", "sar_l1"):
                spec = p.specs[m]
                raw = batch[m]["pixels"] * spec.std + spec.mean          # undo normalisation
                assert np.allclose(raw[..., 0::2], raw[..., :1], atol=1e-3)  # every row channel agrees
                assert np.allclose(raw[..., 1::2], raw[..., 1:2], atol=1e-3)
                order = np.argsort(batch[m]["record_index"], kind="stable")
                yx = raw[order][..., :2]
                np.testing.assert_array_equal(batch[m]["label_map"][order] - 1, lab)
                unit = schema.UNITS[m]
                if unit == "reflectance":
                    ref = yx if ref is None else ref
                    np.testing.assert_allclose(yx, ref, atol=1e-3)       # same crop + flip everywhere
                    # the nearest-neighbour label sits within half a pixel of the bilinear coordinate
                    assert np.abs(label_yx - yx).max() <= 0.5 + 1e-3
                elif unit == "complex":
                    np.testing.assert_allclose(yx, label_yx, atol=1e-3)  # a source pixel: the label's
                else:   # dB interpolated in power lies between the two source pixels
                    assert np.abs(yx - ref).max() < 1.0
            for y in ref[..., 0]:
                span = np.ptp(y)
                assert 0 < span < 40 * np.sqrt(0.5 * 4 / 3) + 1        # a crop, not the whole image
                flips.add(bool(y[-1, 0] < y[0, 0]))
    assert flips == {True, False}                                          # vertical flips happen


def test_normalisation_uses_manifest_stats(mixed):
    manifest = shards.read_manifest(mixed)
    records = list(shards.iter_records(mixed))
    with pl.Pipeline(config(), mixed, process_index=0, process_count=1, train=False) as p:
        batch = next(p)
    for m, arrays in batch.items():
        mean = np.array(manifest["modalities"][m]["mean"], np.float32)
        std = np.array(manifest["modalities"][m]["std"], np.float32)
        for row, idx in enumerate(arrays["record_index"]):
            want = (records[idx].modalities[m].pixels - mean) / std       # identity crop at 64 px
            np.testing.assert_allclose(arrays["pixels"][row], want, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(arrays["label_map"][row], records[idx].label_map)


def test_mask_ratio_and_blocks(mixed):
    with pl.Pipeline(config(mask_block_size=16), mixed, process_index=0, process_count=1) as p:
        batch = next(p)
    masks = np.concatenate([a["mask"] for a in batch.values()])
    assert masks.shape[1:] == (16, 16)                    # 64 px / patch 4
    blocks = masks.reshape(-1, 4, 4, 4, 4)                # 16 px blocks = 4 x 4 patches
    assert np.all(blocks.all(axis=(2, 4)) == blocks.any(axis=(2, 4)))   # whole blocks only
    assert np.all(blocks.all(axis=(2, 4)).sum((1, 2)) == round(0.6 * 16))
    assert len({m.tobytes() for m in masks}) > 1


def _equal(a, b):
    for m in a:
        for k in a[m]:
            np.testing.assert_array_equal(a[m][k], b[m][k], err_msg=f"{m}/{k}")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(mixed, workers):
    """k batches, save the state as JSON, restore in a fresh pipeline: the next batches are
    those of the uninterrupted run (which just carries on after get_state)."""
    c = config(prefetch=1)
    with pl.Pipeline(c, mixed, process_index=0, process_count=1, num_workers=workers) as p:
        take(p, 4)
        state = json.loads(json.dumps(p.get_state()))    # JSON round trip: no pickle
        stats = p.statistics()
        straight = take(p, 3)
    with pl.Pipeline(c, mixed, process_index=0, process_count=1, num_workers=workers) as p:
        p.set_state(state)
        assert p.statistics() == stats
        resumed = take(p, 3)
    for a, b in zip(straight, resumed):
        _equal(a, b)
    if workers == 0:   # and a fresh run reproduces the same stream from the start
        with pl.Pipeline(c, mixed, process_index=0, process_count=1, num_workers=workers) as p:
            _equal(take(p, 5)[-1], take_after(c, mixed, 4))
    with pl.Pipeline(c, mixed, process_index=0, process_count=1, num_workers=workers + 1) as p:
        with pytest.raises(ValueError, match="num_workers"):
            p.set_state(state)


def take_after(c, data_dir, k):
    """The batch after the first k of a fresh in-process pipeline."""
    with pl.Pipeline(c, data_dir, process_index=0, process_count=1, num_workers=0) as p:
        take(p, k)
        return next(p)


def test_process_shards_disjoint_and_cover(mixed):
    c = config()
    p0 = pl.Pipeline(c, mixed, process_index=0, process_count=2, num_epochs=1)
    p1 = pl.Pipeline(c, mixed, process_index=1, process_count=2, num_epochs=1)
    a, b = set(p0.shard_record_indices().tolist()), set(p1.shard_record_indices().tolist())
    assert not a & b and a | b == set(range(48)) and abs(len(a) - len(b)) <= 1
    with pl.Pipeline(c, mixed) as single:                 # jax.process_index/count: 0 of 1
        assert sorted(single.shard_record_indices().tolist()) == list(range(48))
    for pipe, own in ((p0, a), (p1, b)):
        assert sum(pipe.batch_sizes.values()) == 4        # 8 global rows over 2 processes
        served = set()
        for batch in pipe:                               # one epoch, then StopIteration
            for arrays in batch.values():
                served |= set(arrays["record_index"].tolist())
        assert served and served <= own
        pipe.close()


def test_paired_records_share_rows(tmp_path):
    d = str(tmp_path / "paired")
    synthetic.write(d, 24, 32, 3, paired_fraction=1.0, labeled=False)
    c = config(batch_size=12)
    c.model.image_size = 32
    with pl.Pipeline(c, d, process_index=0, process_count=1) as p:
        for batch in take(p, 3):
            rows = {m: a["record_index"].tolist() for m, a in batch.items()}
            assert len({tuple(r) for r in rows.values()}) == 1, rows
        assert p.statistics()["paired_rows"] == 9


@pytest.fixture
def corrupt(tmp_path):
    """A 12-record data set whose shard-00001 records 1 and 3 are garbage bytes."""
    d = str(tmp_path / "bad")
    synthetic.write(d, 12, 32, 4, shard_size=6, paired_fraction=0.0, labeled=True)
    path = os.path.join(d, "shard-00001.array_record")
    reader = ArrayRecordReader(path)
    data = [reader.read([i])[0] for i in range(reader.num_records())]
    reader.close()
    data[1], data[3] = b"not a record", b"\x00" * 40
    writer = ArrayRecordWriter(path, shards.WRITER_OPTIONS)
    for item in data:
        writer.write(item)
    writer.close()
    return d


def test_bad_record_is_a_clear_error(corrupt):
    c = config(batch_size=4)
    c.model.image_size = 32
    with pl.Pipeline(c, corrupt, process_index=0, process_count=1) as p:
        with pytest.raises(RecordError, match=r"shard-00001\.array_record record [13] \(data set record (7|9)\)"):
            take(p, 12)


def test_bad_records_skipped_and_counted(corrupt):
    c = config(batch_size=4, max_bad_records=2)
    c.model.image_size = 32
    with pl.Pipeline(c, corrupt, process_index=0, process_count=1) as p:
        while p.statistics()["records_read"] < 3 * 12:    # three epochs
            next(p)
        s = p.statistics()
        assert s["bad_records"] == 2 and s["bad_reads"] >= 4
        assert all("shard-00001.array_record record" in e for e in s["bad_record_errors"])
    c.data.max_bad_records = 1
    with pl.Pipeline(c, corrupt, process_index=0, process_count=1) as p:
        with pytest.raises(RecordError, match="more than 1 bad records"):
            take(p, 40)


def test_missing_modalities_not_served_and_channel_check(tmp_path, mixed):
    d = str(tmp_path / "two")
    recs = []
    for r in synthetic.generate(8, 32, 5):
        r.modalities = {m: r.modalities[m] for m in ("optical", "sar_l2")}
        recs.append(r)
    shards.write_shards(recs, d, source="test", label_names=synthetic.LABEL_NAMES)
    c = config(batch_size=6)
    c.model.image_size = 32
    with pl.Pipeline(c, d, process_index=0, process_count=1) as p:
        assert p.modalities == ("optical", "sar_l2") and p.batch_sizes == {"optical": 3, "sar_l2": 3}
        assert set(next(p)) == {"optical", "sar_l2"}
    c = config()
    c.data.modality_weights.sar_l1 = 0.0
    with pl.Pipeline(c, mixed, process_index=0, process_count=1) as p:
        assert "sar_l1" not in p.modalities
    c = config()
    c.model.modalities.multispectral.channels = 4
    c.model.modalities.multispectral.embed = "patch"
    c.model.modalities.multispectral.bands = ()
    with pytest.raises(ValueError, match=r"multispectral has 12 bands .*channels = 4"):
        pl.Pipeline(c, mixed, process_index=0, process_count=1)


def test_config_unit_must_match_the_data(mixed):
    """A config that states a modality's unit is refused by data in another unit (configs/
    ringmoe_14b.py once called its SAR-L2 channels amplitude while the speckle NLL read dB)."""
    c = config()
    c.model.modalities.sar_l2.unit = "amplitude"
    with pytest.raises(ValueError, match=r"sar_l2 is in 'db' but config model.modalities.sar_l2.unit = 'amplitude'"):
        pl.Pipeline(c, mixed, process_index=0, process_count=1)
    c.model.modalities.sar_l2.unit = "db"
    pl.Pipeline(c, mixed, process_index=0, process_count=1).close()
    from configs import ringmoe_14b
    assert ringmoe_14b.get_config().model.modalities.sar_l2.unit == "db"


def test_real_chips_serve_three_modalities(tmp_path):
    """Ingested S2 L2A (12) + S1 dB (2) + RGB (3) chips with LULC labels run through the tiny config."""
    from ringmoe.data.ingest import geotiff
    d = str(tmp_path / "real")
    geotiff.convert_geotiff(REAL_CSV, d, tile=64, label_names=geotiff.LABEL_SCHEMES["esri_lulc9"])
    with pl.Pipeline(config(batch_size=12), d, process_index=0, process_count=1) as p:
        assert p.modalities == ("optical", "multispectral", "sar_l2")
        batch = next(p)
    for m, arrays in batch.items():
        assert arrays["pixels"].shape == (4, 64, 64, CHANNELS[m]) and np.isfinite(arrays["pixels"]).all()
        assert abs(arrays["pixels"].mean()) < 3 and arrays["label_map"].max() >= 1
    assert len({tuple(a["record_index"].tolist()) for a in batch.values()}) == 1   # paired rows line up
