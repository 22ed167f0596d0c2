"""Resampling preserves what the physics targets measure: the power of complex SAR-L1 and the
mean intensity of dB SAR-L2, over many random resized crops (augment.RESAMPLERS)."""
import numpy as np
import pytest

from ringmoe.data import augment, sensors
from ringmoe.data.schema import ModalityImage, Record
from ringmoe.data.transform import ModalitySpec, RecordTransform, TransformOptions

SIZE, CROPS = 128, 200


def transformed(record: Record, modality: str, channels: int) -> np.ndarray:
    """(CROPS, 32, 32, C) physical pixels of `record` after random resized crops + flips
    (unit statistics: mean 0, std 1, so normalisation is the identity)."""
    spec = ModalitySpec(bands=tuple(b.name for b in record.modalities[modality].bands),
                        mean=np.zeros(channels, np.float32), std=np.ones(channels, np.float32))
    options = TransformOptions(image_size=32, patch_size=4, mask_block_size=8, crop_scale=(0.2, 0.5))
    transform = RecordTransform([], [], {modality: spec}, options, seed=0)
    return np.stack([transform.apply(record, 0, np.random.default_rng([7, i]))["images"][modality]["pixels"]
                     for i in range(CROPS)])


def test_sar_l1_span_is_preserved_by_random_resized_crops():
    """Single-look complex speckle: bilinear weights would scale E|z|^2 by sum_k w_k^2
    (4/9 on average); the mean span after augmentation must equal the mean before within 2 %."""
    rng = np.random.default_rng(0)
    power = np.array([1.0, 0.2, 0.2, 0.5])                     # HH, HV, VH, VV
    z = (rng.normal(size=(SIZE, SIZE, 4)) + 1j * rng.normal(size=(SIZE, SIZE, 4))) * np.sqrt(power / 2)
    pixels = np.stack([z.real, z.imag], -1).reshape(SIZE, SIZE, 8).astype(np.float32)
    preset = sensors.get_preset("sar_l1_quadpol")
    record = Record("speckle", {"sar_l1": ModalityImage("sar_l1", pixels, preset.bands, preset.name, 8.0)})
    before = np.mean(np.sum(pixels ** 2, -1))
    after = np.mean(np.sum(transformed(record, "sar_l1", 8) ** 2, -1))
    assert after == pytest.approx(before, rel=0.02), f"mean span {after:.4f} after vs {before:.4f} before"


def test_sar_l1_pixels_are_source_pixels():
    """Nearest neighbour: every output Re/Im vector is one of the record's, unchanged."""
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(40, 48, 8)).astype(np.float32)
    valid = np.ones((40, 48), bool)
    crop = augment.sample_crop(np.random.default_rng(2), 40, 48, 32, scale=(0.2, 0.5))
    out, out_valid = augment.resample(pixels, valid, crop, "complex")
    source = {tuple(v) for v in pixels.reshape(-1, 8)}
    assert all(tuple(v) in source for v in out.reshape(-1, 8)) and out_valid.all()


def test_sar_l2_mean_intensity_is_preserved_by_random_resized_crops():
    """4.4-look speckle in dB: interpolating dB values is a geometric mean of intensities
    (about -0.3 dB); interpolating linear power keeps the mean intensity within 2 %."""
    rng = np.random.default_rng(3)
    looks, sigma0 = 4.4, np.array([10 ** -1.2, 10 ** -1.9])   # VV -12 dB, VH -19 dB
    intensity = sigma0 * rng.gamma(looks, 1 / looks, size=(SIZE, SIZE, 2))
    pixels = (10 * np.log10(intensity)).astype(np.float32)
    preset = sensors.get_preset("sentinel1_db")
    record = Record("speckle", {"sar_l2": ModalityImage("sar_l2", pixels, preset.bands, preset.name, 10.0)})
    before = np.mean(10 ** (pixels / 10), axis=(0, 1))
    after = np.mean(10 ** (transformed(record, "sar_l2", 2) / 10), axis=(0, 1, 2))
    np.testing.assert_allclose(after, before, rtol=0.02)


def test_reflectance_is_resampled_bilinearly():
    """Linear units keep the bilinear interpolation: a linear ramp stays exact."""
    yy, xx = np.mgrid[0:40, 0:48].astype(np.float32)
    ramp = np.stack([yy, xx], -1)
    crop = augment.sample_crop(np.random.default_rng(4), 40, 48, 32, scale=(0.2, 0.5))
    out, valid = augment.resample(ramp, np.ones((40, 48), bool), crop, "reflectance")
    np.testing.assert_allclose(out[..., 0], np.broadcast_to(crop.ys[:, None], (32, 32)), atol=1e-4)
    np.testing.assert_allclose(out[..., 1], np.broadcast_to(crop.xs[None, :], (32, 32)), atol=1e-4)
    assert valid.all()
