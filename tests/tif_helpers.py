"""Small GeoTIFF / record builders shared by the data tests (written into tmp_path)."""
import os

import numpy as np
import rasterio
from affine import Affine

from ringmoe.data.schema import Band, ModalityImage, Record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(REPO, "data", "real")   # vendored chips (data/real/SOURCE.md)
REAL_CSV = os.path.join(REPO, "tests", "data", "real_chips.csv")
REAL_IDS = ("282D_485L_3_3", "609U_541L_3_0", "637U_59R_1_3")
TRANSFORM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 6000000.0)


def write_tif(path, array, *, crs="EPSG:32632", transform=TRANSFORM, nodata=None, tags=None,
              scales=None, offsets=None):
    """Writes (C, H, W) `array` as a GeoTIFF with its own dtype, optional dataset tags and
    per-band scale/offset metadata; returns the path."""
    array = np.asarray(array)
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2],
                       count=array.shape[0], dtype=array.dtype, crs=crs, transform=transform,
                       nodata=nodata) as ds:
        ds.write(array)
        if tags:
            ds.update_tags(**tags)
        if scales is not None:
            ds.scales = scales
        if offsets is not None:
            ds.offsets = offsets
    return str(path)


def s2_dn(h=8, w=8, bands=12, seed=0, dtype=np.uint16):
    return np.random.default_rng(seed).integers(1, 5000, size=(bands, h, w)).astype(dtype)


def s1_db(h=8, w=8, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(-25, 0, size=(2, h, w)).astype(dtype)


def write_csv(path, rows, label=False):
    """rows: (sample_id, sensor, path[, label_path]) tuples."""
    header = "sample_id,sensor,path" + (",label_path" if label else "")
    with open(path, "w") as f:
        f.write(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return str(path)


def make_record(i, h=6, w=5, nodata=None, bands=("B2", "B3"), label=True):
    """A small two-modality record with deterministic pixels."""
    rng = np.random.default_rng(i)
    ms = ModalityImage("multispectral", rng.uniform(0, 1, (h, w, len(bands))).astype(np.float32),
                       tuple(Band(b, wavelength_nm=500.0 + j, bandwidth_nm=10.0) for j, b in enumerate(bands)),
                       "test_ms", 10.0, nodata)
    sar = ModalityImage("sar_l2", rng.uniform(-25, 0, (h, w, 1)).astype(np.float32),
                        (Band("VV", frequency_ghz=5.405, polarization="VV"),), "test_sar", 10.0)
    return Record(f"s{i}", {"multispectral": ms, "sar_l2": sar},
                  label_map=rng.integers(0, 3, (h, w)).astype(np.int32) if label else None,
                  scene_label=i % 2, source="test")
