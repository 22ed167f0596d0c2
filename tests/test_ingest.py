"""Ingestion: real Sentinel-1/2 chips through the GeoTIFF path (values checked against
rasterio), sensor presets and their Sentinel-2 offset rules, tiling, complex SAR, and
the TFDS path (mock_data, and a split prepared on disk without TensorFlow)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from ringmoe.data import sensors, shards
from ringmoe.data.ingest import geotiff
from ringmoe.data.schema import RecordError
from tests.tif_helpers import REAL, REAL_CSV, REAL_IDS, REPO, s1_db, write_csv, write_tif

def _read(folder, sample_id):
    with rasterio.open(os.path.join(REAL, folder, sample_id + ".tif")) as ds:
        return np.moveaxis(ds.read(), 0, -1)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("real") / "ds")
    geotiff.convert_geotiff(REAL_CSV, out, label_names=geotiff.LABEL_SCHEMES["esri_lulc9"])
    return out


def test_real_chips_convert_as_three_paired_records_with_labels(real_dir):
    m = shards.read_manifest(real_dir)
    assert m["records"] == 3 and m["paired_records"] == 3 and m["single_modality_records"] == 0
    assert m["modality_sets"] == {"multispectral+optical+sar_l2": 3}
    assert {k: v["sensors"] for k, v in m["modalities"].items()} == {
        "multispectral": {"sentinel2_l2a": 3}, "optical": {"rgb": 3}, "sar_l2": {"sentinel1_db": 3}}
    assert m["labels"]["label_map_records"] == 3
    assert sum(m["labels"]["label_map_pixels"].values()) == 3 * 224 * 224
    assert "0" not in m["labels"]["label_map_pixels"]          # chips are fully labelled 1..9
    assert m["label_names"][7] == "snow/ice"
    vv, vh = m["modalities"]["sar_l2"]["mean"]                 # DESIGN section 4 land medians
    assert -16 < vv < -10 and -22 < vh < -17


def test_real_chips_round_trip_matches_rasterio(real_dir):
    records = {r.sample_id: r for r in shards.iter_records(real_dir)}
    assert sorted(records) == sorted(REAL_IDS)
    for sid, rec in records.items():
        ms, sar, rgb = rec.modalities["multispectral"], rec.modalities["sar_l2"], rec.modalities["optical"]
        np.testing.assert_allclose(ms.pixels, _read("S2L2A", sid).astype(np.float64) / 10000, rtol=1e-6)
        np.testing.assert_array_equal(sar.pixels, _read("S1RTC", sid).astype(np.float32))
        np.testing.assert_allclose(rgb.pixels, _read("S2RGB", sid) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(rec.label_map, _read("LULC", sid)[..., 0].astype(np.int32))
        assert [b.name for b in ms.bands] == list(sensors.S2_L2A_ORDER)
        assert (ms.bands[3].wavelength_nm, ms.bands[3].bandwidth_nm) == (664.6, 31.0)   # B4
        assert ms.bands[8].name == "B8A" and ms.bands[8].wavelength_nm == 864.7
        assert [(b.polarization, b.frequency_ghz) for b in sar.bands] == [("VV", 5.405), ("VH", 5.405)]
        assert [b.name for b in rgb.bands] == ["R", "G", "B"]
        assert ms.gsd_m == sar.gsd_m == rgb.gsd_m == 10.0
        assert ms.nodata == 0.0 and sar.nodata is None


def test_cli_convert_then_inspect_real_chips(tmp_path):
    out = str(tmp_path / "ds")
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=REPO, capture_output=True, text=True)
    conv = run("tools.convert", "geotiff", "--manifest", REAL_CSV, "--out", out, "--label-names", "esri_lulc9")
    assert conv.returncode == 0, conv.stderr
    assert json.loads(conv.stdout.strip().splitlines()[-1])["records"] == 3
    insp = run("tools.inspect", out)
    assert insp.returncode == 0, insp.stderr
    summary = json.loads(insp.stdout.strip().splitlines()[-1])
    assert summary["records"] == 3 and summary["decoded"] == 3 and summary["bad_records"] == 0
    assert summary["modalities"] == {"multispectral": 3, "optical": 3, "sar_l2": 3}
    assert summary["paired_records"] == 3
    assert "B8A" in insp.stdout and "snow/ice" in insp.stdout


def test_tiling_splits_rasters_into_suffixed_windows(tmp_path):
    m = geotiff.convert_geotiff(REAL_CSV, str(tmp_path / "t"), tile=100)
    assert m["records"] == 3 * 4                                  # 224 // 100 = 2 per axis, edges dropped
    recs = {r.sample_id: r for r in shards.iter_records(str(tmp_path / "t"))}
    tile = recs["637U_59R_1_3_r001_c000"]
    assert tile.modalities["sar_l2"].pixels.shape == (100, 100, 2)
    np.testing.assert_array_equal(tile.modalities["sar_l2"].pixels,
                                  _read("S1RTC", "637U_59R_1_3")[100:200, 0:100].astype(np.float32))
    np.testing.assert_array_equal(tile.label_map, _read("LULC", "637U_59R_1_3")[100:200, 0:100, 0])


def test_s2_offset_resolution_from_options_and_tags():
    l2a = sensors.get_preset("sentinel2_l2a")
    bind = lambda **kw: l2a.bind("f.tif", count=12, dtype="uint16", **kw).offset
    assert bind(options={"offset": "-1000"}) == -1000
    assert bind(options={"baseline": "04.00"}) == -1000
    assert bind(options={"baseline": "02.09"}) == 0
    assert bind(options={"harmonized": "true"}) == 0
    assert bind(tags={"BOA_ADD_OFFSET": "-1000"}) == -1000
    assert bind(tags={"PROCESSING_BASELINE": "05.10"}) == -1000
    with pytest.raises(RecordError, match=r"f\.tif: sentinel2_l2a: cannot tell the DN offset.*offset=0"):
        bind(tags={"datetime": "2021-07-23T13:22:41"})     # acquired then; reprocessed since?
    with pytest.raises(RecordError, match="cannot tell the DN offset"):
        bind()
    conv = l2a.bind("f.tif", count=12, dtype="int16", options={"offset": "-1000"})
    img = conv.image(np.array([[[0] * 11 + [1000]]], np.int16).reshape(1, 1, 12), "f.tif")
    assert img.nodata == pytest.approx(-0.1) and img.pixels[0, 0, 0] == pytest.approx(-0.1)  # DN 0 -> fill
    assert img.pixels[0, 0, -1] == 0.0                                                       # (1000 - 1000) / 1e4


S2_OFFSET_EVIDENCE = {   # id: (preset options, tags, band scale, band offset, expected DN offset)
    "option_offset": (":offset=-1000", {}, None, None, -1000),
    "option_baseline": (":baseline=05.09", {}, None, None, -1000),
    "option_harmonized": (":harmonized=true", {"PROCESSING_BASELINE": "05.10"}, None, None, 0),
    "tag_BOA_ADD_OFFSET": ("", {"BOA_ADD_OFFSET": "-1000"}, None, None, -1000),
    "tag_RADIO_ADD_OFFSET": ("", {"RADIO_ADD_OFFSET": "-1000"}, None, None, -1000),
    "tag_PROCESSING_BASELINE_05": ("", {"PROCESSING_BASELINE": "05.10"}, None, None, -1000),
    "tag_PROCESSING_BASELINE_02": ("", {"PROCESSING_BASELINE": "02.09"}, None, None, 0),
    "band_scale_offset_-0.1": ("", {}, 1e-4, -0.1, -1000),
    "band_scale_offset_0": ("", {}, 1e-4, 0.0, 0),
    "file_written_2019": ("", {"TIFFTAG_DATETIME": "2019:06:01 12:00:00"}, None, None, 0),
}


@pytest.mark.parametrize("case", list(S2_OFFSET_EVIDENCE))
def test_s2_offset_from_each_source_of_evidence(tmp_path, case):
    """Each kind of evidence alone settles the offset of a GeoTIFF: DN 1500 is
    reflectance 0.15 with offset 0 and 0.05 with offset -1000."""
    options, tags, scale, offset, expected = S2_OFFSET_EVIDENCE[case]
    write_tif(tmp_path / "s2.tif", np.full((12, 4, 4), 1500, np.uint16), tags=tags,
              scales=None if scale is None else [scale] * 12, offsets=None if offset is None else [offset] * 12)
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l2a" + options, "s2.tif")])
    ms = next(geotiff.iter_geotiff_records(csv)).modalities["multispectral"]
    np.testing.assert_allclose(ms.pixels, (1500 + expected) / 10000, rtol=1e-6)
    assert ms.nodata == pytest.approx(expected / 10000)               # DN 0 -> offset / 1e4


def test_s2_acquisition_date_alone_is_an_error(tmp_path):
    """Sensing dates are acquisition times: a 2019 acquisition may come from the
    Collection-1 reprocessing (baseline 05.xx, offset -1000), so they settle nothing."""
    tags = {"PRODUCT_START_TIME": "2019-06-01T10:20:31.024Z", "DATATAKE_SENSING_START": "2019-06-01T10:20:31.024Z",
            "SENSING_TIME": "2019-06-01T10:20:31.024Z", "datetime": "2019-06-01T10:20:31.000000000"}
    path = write_tif(tmp_path / "s2.tif", np.full((12, 4, 4), 1500, np.uint16), tags=tags)
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l2a", "s2.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sentinel2_l2a: cannot tell the DN offset.*"
                                          r"give the sensor as sentinel2_l2a:offset=0 .* or sentinel2_l2a:offset=-1000"):
        next(geotiff.iter_geotiff_records(csv))


def test_s2_file_written_after_baseline_04_is_no_evidence(tmp_path):
    path = write_tif(tmp_path / "s2.tif", np.full((12, 4, 4), 1500, np.uint16),
                     tags={"TIFFTAG_DATETIME": "2022:03:01 08:00:00"})
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l2a", "s2.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sentinel2_l2a: cannot tell the DN offset"):
        next(geotiff.iter_geotiff_records(csv))


@pytest.mark.parametrize("scale, offset", [(2e-4, -0.1), (1e-4, -0.2)])
def test_s2_other_band_scale_offset_is_an_error_naming_file_and_values(tmp_path, scale, offset):
    path = write_tif(tmp_path / "s2.tif", np.full((12, 4, 4), 1500, np.uint16),
                     scales=[scale] * 12, offsets=[offset] * 12)
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l2a", "s2.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sentinel2_l2a: band scale/offset .*{scale:g}.*{offset:g}"):
        next(geotiff.iter_geotiff_records(csv))


def test_l1c_has_13_bands_with_b10_and_tag_offset(tmp_path):
    write_tif(tmp_path / "l1c.tif", np.full((13, 4, 4), 1500, np.uint16), tags={"RADIO_ADD_OFFSET": "-1000"})
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel2_l1c", "l1c.tif")])
    rec = next(geotiff.iter_geotiff_records(csv))
    ms = rec.modalities["multispectral"]
    assert [b.name for b in ms.bands][10] == "B10" and ms.bands[10].wavelength_nm == 1373.5
    np.testing.assert_allclose(ms.pixels, 0.05)


@pytest.mark.parametrize("as_complex", [True, False])
def test_quadpol_complex_or_eight_real_bands(tmp_path, as_complex):
    rng = np.random.default_rng(0)
    s = (rng.normal(size=(4, 6, 6)) + 1j * rng.normal(size=(4, 6, 6))).astype(np.complex64)
    arr = s if as_complex else np.stack([s.real, s.imag], 1).reshape(8, 6, 6).astype(np.float32)
    write_tif(tmp_path / "q.tif", arr)
    csv = write_csv(tmp_path / "m.csv", [("q", "sar_l1_quadpol:frequency_ghz=1.2575", "q.tif")])
    img = next(geotiff.iter_geotiff_records(csv)).modalities["sar_l1"]
    assert [b.name for b in img.bands] == ["HH_re", "HH_im", "HV_re", "HV_im", "VH_re", "VH_im", "VV_re", "VV_im"]
    assert all(b.frequency_ghz == 1.2575 for b in img.bands)
    np.testing.assert_array_equal(img.pixels[..., 6], s[3].real)      # VV re
    np.testing.assert_array_equal(img.pixels[..., 3], s[1].imag)      # HV im


def test_tfds_mock_so2sat_is_paired_sar_l1_and_multispectral(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from ringmoe.data.ingest import tfds as tfds_ingest
    with tfds.testing.mock_data(num_examples=5):
        m = tfds_ingest.convert_tfds("so2sat/all", str(tmp_path / "s"), shard_size=2)
    assert m["records"] == 5 and m["paired_records"] == 5 and len(m["shards"]) == 3
    assert len(m["label_names"]) == 17 and m["label_names"][-1] == "Water"
    sar = m["modalities"]["sar_l1"]
    assert [b["name"] for b in sar["bands"]] == ["VH_re", "VH_im", "VV_re", "VV_im"]
    assert [b["name"] for b in m["modalities"]["multispectral"]["bands"]] == list(tfds_ingest.SO2SAT_S2_BANDS)
    assert m["labels"]["scene_label_records"] == 5
    assert len(list(shards.iter_records(str(tmp_path / "s")))) == 5


def test_tfds_mock_eurosat_and_non_dn_values(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from ringmoe.data.ingest import tfds as tfds_ingest
    examples = [{"sentinel2": np.full((64, 64, 13), 1000.0 + i, np.float32), "label": i, "filename": f"Forest_{i}.tif"}
                for i in range(3)]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: examples):
        m = tfds_ingest.convert_tfds("eurosat/all", str(tmp_path / "e"))
    assert m["records"] == 3 and m["modalities"]["multispectral"]["sensors"] == {"sentinel2_l1c": 3}
    assert m["label_names"][1] == "Forest" and m["labels"]["scene_label_counts"] == {"0": 1, "1": 1, "2": 1}
    assert m["modalities"]["multispectral"]["mean"][0] == pytest.approx(0.1001)
    with tfds.testing.mock_data(num_examples=2):         # mock floats in [0, 1) are not DNs
        with pytest.raises(RecordError, match=r"eurosat/all train\[0\]: sentinel2 values are not uint16 DNs"):
            tfds_ingest.convert_tfds("eurosat/all", str(tmp_path / "bad"))


def test_tfds_prepared_on_disk_without_tensorflow_via_cli(tmp_path):
    """A real ArrayRecord split + dataset_info.json written with TFDS's own serializer,
    read through tfds.data_source by the CLI: the path a prepared split takes."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.core import splits as splits_lib
    builder = tfds.builder("eurosat/all", data_dir=str(tmp_path / "tfds"), file_format="array_record")
    os.makedirs(builder.data_dir)
    writer = ArrayRecordWriter(os.path.join(builder.data_dir, "eurosat-train.array_record-00000-of-00001"),
                               "group_size:1")
    for i in range(4):
        writer.write(builder.info.features.serialize_example(
            {"sentinel2": np.full((64, 64, 13), 2000 + i, np.float32), "label": 9, "filename": f"SeaLake_{i}.tif"}))
    writer.close()
    builder.info.set_splits(splits_lib.SplitDict([splits_lib.SplitInfo(
        name="train", shard_lengths=[4], num_bytes=0, filename_template=None)]))
    builder.info.write_to_directory(builder.data_dir)
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "tools.convert", "tfds", "--name", "eurosat/all", "--out", out,
                           "--data-dir", str(tmp_path / "tfds")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    recs = list(shards.iter_records(out))
    assert [r.sample_id for r in recs] == [f"SeaLake_{i}.tif" for i in range(4)]
    assert recs[0].scene_label == 9 and recs[2].modalities["multispectral"].pixels[0, 0, 0] == pytest.approx(0.2002)


def test_tfds_unprepared_split_is_one_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from ringmoe.data.ingest import tfds as tfds_ingest
    with pytest.raises(RecordError, match=r"tfds eurosat/all split 'train': not prepared in .*array_record"):
        tfds_ingest.convert_tfds("eurosat/all", str(tmp_path / "o"), data_dir=str(tmp_path / "none"))
    with pytest.raises(RecordError, match="not supported"):
        tfds_ingest.open_source("mnist")


# Per-band DN mean and std of EuroSAT all-band TIFFs in FILE channel order (B1..B8, B9, B10,
# B11, B12, B8A), as computed over the files (TorchGeo's EuroSAT statistics). Channel 9 is B9
# water vapour (~732 DN), 10 is B10 cirrus (~12 DN), 13 is B8A red edge 4 (~2594 DN, near B8).
EUROSAT_FILE_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B8A")
EUROSAT_FILE_MEAN = (1354.4, 1118.2, 1042.9, 947.6, 1199.5, 1999.8, 2369.2, 2296.8, 732.1, 12.1, 1819.0, 1118.9, 2594.1)
EUROSAT_FILE_STD = (245.7, 333.0, 395.1, 593.8, 566.4, 861.2, 1086.6, 1118.0, 404.9, 4.8, 1002.6, 761.3, 1231.6)


def test_tfds_eurosat_file_channels_are_reordered_to_l1c_band_order(tmp_path):
    """EuroSAT's TIFFs keep B8A last; after ingestion every band name holds its own channel
    (B8A the ~2594 DN one, B9 the ~732, B10 the ~12) with its own wavelength."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from ringmoe.data.ingest import tfds as tfds_ingest
    rng = np.random.default_rng(0)
    mean, std = np.array(EUROSAT_FILE_MEAN), np.array(EUROSAT_FILE_STD)
    examples = [{"sentinel2": np.clip(np.round(rng.normal(mean, std / 10, (64, 64, 13))), 1, None).astype(np.float32),
                 "label": i, "filename": f"Forest_{i}.tif"} for i in range(2)]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: examples):
        recs = list(tfds_ingest.iter_tfds_records("eurosat/all"))
    ms = recs[0].modalities["multispectral"]
    assert [b.name for b in ms.bands] == list(sensors.S2_L1C_ORDER)
    file_mean = dict(zip(EUROSAT_FILE_BANDS, mean))
    for j, band in enumerate(ms.bands):
        got = float(ms.pixels[..., j].mean()) * 10000
        assert got == pytest.approx(file_mean[band.name], abs=5), band.name
        assert (band.wavelength_nm, band.bandwidth_nm) == sensors.S2_BANDS[band.name][:2]
    by_wavelength = {b.wavelength_nm: float(ms.pixels[..., j].mean()) * 10000 for j, b in enumerate(ms.bands)}
    assert by_wavelength[864.7] == pytest.approx(2594, abs=5)        # B8A, file channel 13
    assert by_wavelength[945.1] == pytest.approx(732, abs=5)         # B9 water vapour, file channel 9
    assert by_wavelength[1373.5] == pytest.approx(12, abs=1)         # B10 cirrus, file channel 10
    assert by_wavelength[1613.7] == pytest.approx(1819, abs=5)       # B11 (NDBI/MNDWI), file channel 11


def _s1_linear(seed=0):
    """Linear sigma0 of a VV/VH pair with dB values uniform in [-25, 0]."""
    return (10 ** (s1_db(seed=seed, dtype=np.float64) / 10)).astype(np.float32)


def test_s1_linear_file_given_as_db_is_an_error_naming_the_file(tmp_path):
    path = write_tif(tmp_path / "s1.tif", _s1_linear())
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel1_db", "s1.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sentinel1_db: .*looks like linear sigma0.*use sentinel1_linear"):
        next(geotiff.iter_geotiff_records(csv))


def test_s1_db_range_check_rejects_values_that_are_not_db(tmp_path):
    path = write_tif(tmp_path / "s1.tif", np.full((2, 8, 8), -60.0, np.float32))   # median below -35 dB
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel1_db", "s1.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sentinel1_db: median -60 dB .*outside \[-35, 5\]"):
        next(geotiff.iter_geotiff_records(csv))


def test_s1_linear_preset_gives_db_and_nonpositive_values_become_nodata(tmp_path):
    linear = _s1_linear()
    linear[0, 1, 2], linear[1, 3, 4], linear[1, 5, 5] = 0.0, -0.002, np.nan   # noise-removal zeros/negatives
    write_tif(tmp_path / "s1.tif", linear, nodata=np.nan)
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel1_linear", "s1.tif")])
    img = next(geotiff.iter_geotiff_records(csv)).modalities["sar_l2"]
    assert [b.name for b in img.bands] == ["VV", "VH"] and img.sensor == "sentinel1_linear"
    assert all(b.frequency_ghz == sensors.S1_FREQUENCY_GHZ for b in img.bands)
    valid = np.moveaxis(linear > 0, 0, -1)
    expected = np.moveaxis(10 * np.log10(np.where(linear > 0, linear, 1).astype(np.float64)), 0, -1)
    np.testing.assert_allclose(img.pixels[valid], expected[valid], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(img.pixels[valid], np.moveaxis(s1_db(dtype=np.float64), 0, -1)[valid], atol=1e-4)
    assert img.nodata == sensors.DB_NODATA_FILL and np.isfinite(img.pixels).all()
    assert img.pixels[1, 2, 0] == img.pixels[3, 4, 1] == img.pixels[5, 5, 1] == sensors.DB_NODATA_FILL
    assert (~valid).sum() == 3


def test_s1_db_file_given_as_linear_is_an_error_pointing_to_sentinel1_db(tmp_path):
    path = write_tif(tmp_path / "s1.tif", s1_db())
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel1_linear", "s1.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sentinel1_linear: .*look like dB.*use sentinel1_db"):
        next(geotiff.iter_geotiff_records(csv))


def test_band_scale_offset_on_a_preset_that_does_not_apply_it_is_an_error(tmp_path):
    path = write_tif(tmp_path / "s1.tif", s1_db(), scales=[0.01, 0.01])
    csv = write_csv(tmp_path / "m.csv", [("a", "sentinel1_db", "s1.tif")])
    with pytest.raises(RecordError, match=rf"{path}: sensor preset 'sentinel1_db' does not apply band "
                                          r"scale/offset metadata, but the file has \['0.01/0', '0.01/0'\]"):
        next(geotiff.iter_geotiff_records(csv))
