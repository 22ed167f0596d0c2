"""Per-record work of the input pipeline: read, decode, crop + flip, normalise, mask, validity.

`RecordTransform` turns (epoch, record index) into one training element. It runs
inside Grain (in worker processes when there are any), so it holds only
picklable state: shard paths, band statistics and numbers. Randomness comes
from `np.random.default_rng([seed, epoch, record_index])`: a record's crop, flips
and masks in a given epoch do not depend on the process count, the worker count
or where in the stream it lands, which is what makes resume and re-sharding exact.

A record that cannot be read, decoded or validated, or whose bands do not match
the data set's, becomes a `bad` element whose message names the shard file, the
record's index in it and the data set index; the packer counts it and the
pipeline decides (max_bad_records) whether that is fatal.
"""
from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from ringmoe.data import augment, masking, schema
from ringmoe.errors import first_line


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
    """What the pipeline serves for one modality: band names (in order) and their statistics,
    and what the manifest says of them (the pixels' physical unit, each band's physics:
    wavelength / bandwidth in nm, or radar frequency in GHz and polarisation)."""
    bands: tuple[str, ...]
    mean: np.ndarray   # (C,) float32
    std: np.ndarray    # (C,) float32, > 0
    unit: str | None = None
    band_metadata: tuple[dict, ...] = ()

    @property
    def channels(self) -> int:
        return len(self.bands)

    @property
    def inv_std(self) -> np.ndarray:
        return (1.0 / self.std).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    image_size: int
    patch_size: int
    crop_scale: tuple[float, float] = (0.2, 0.5)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    random_crop: bool = True          # False: resize the whole record (evaluation)
    mask_block_size: int = 32
    mask_ratio: float = 0.6
    shared_mask: bool = False         # one mask for all modalities of a paired record


class RecordTransform:
    """Callable (epoch, record_index) -> element dict; see the module docstring.

    Element: {"record_index": int, "epoch": int, "stream": int, "bad": "" or message, "scene_label": int (0 = none),
              "label_map": int32 (S, S) (zeros = unlabelled),
              ["text": the `text` callable's arrays of the record as cropped, when given],
              "images": {modality: {"pixels": float32 (S, S, C), "mask": bool (S/P, S/P),
                                    "valid": bool (S, S)}}}
    with only the served modalities the record holds. Pixels without data
    (`schema.valid_pixels`, resampled with the crop) are False in "valid" and 0 in
    "pixels" (the band mean); every loss term and probe label ignores them."""

    def __init__(self, paths: list[str], counts: list[int], specs: dict[str, ModalitySpec],
                 options: TransformOptions, seed: int, text=None):
        self.paths = list(paths)
        self._starts = np.cumsum([0] + list(counts))[:-1].tolist()
        self._specs = dict(specs)
        self._opt = options
        self._seed = int(seed)
        self.text = text      # None, or a callable adding "text" arrays (ringmoe.vlm.examples.TextTasks)
        self._source = None   # opened lazily, in the process that uses it

    def _read(self, index: int) -> bytes:
        if self._source is None:
            import grain
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source[index]

    def where(self, index: int) -> str:
        """'/data/set/shard-00003.array_record record 17 (data set record 3089)' for error
        messages: the shard file as the pipeline opened it, the record's index in it."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return f"{self.paths[shard]} record {index - self._starts[shard]} (data set record {index})"

    def __call__(self, item: tuple[int, int, int]) -> dict:
        """item: (epoch, record index, the process's stream index), which the element carries
        on ("epoch", "record_index", "stream") so the pipeline can count what it consumed."""
        epoch, index, stream = (int(v) for v in item)
        return {**self._element(epoch, index), "epoch": epoch, "stream": stream}

    def _element(self, epoch: int, index: int) -> dict:
        try:
            data = self._read(index)
        except Exception as e:  # riegeli reports corruption as RuntimeError
            return _bad(index, f"{self.where(index)}: unreadable ({type(e).__name__}: {first_line(e)})")
        where = self.where(index)
        try:
            record = schema.decode(data, where)
            schema.validate(record, where)
            element = self.apply(record, index, np.random.default_rng([self._seed, 1, epoch, index]))
            if self.text is not None and element["images"]:
                seen = element["label_map"] if record.label_map is not None else None
                try:
                    element["text"] = self.text(record, seen, epoch, index)
                except ValueError as e:
                    raise schema.RecordError(f"{where}: no text sub-task ({e})") from None
            return element
        except schema.RecordError as e:
            return _bad(index, str(e))

    def apply(self, record: schema.Record, index: int, rng: np.random.Generator) -> dict:
        """Crop, flip, normalise and mask one decoded record (all served modalities alike; each
        resampled as its unit requires, `augment.RESAMPLERS`)."""
        opt, size = self._opt, self._opt.image_size
        served = [m for m in record.modalities if m in self._specs]
        label_map = np.zeros((size, size), np.int32)
        element = {"record_index": index, "bad": "", "images": {}, "label_map": label_map,
                   "scene_label": int(record.scene_label or 0)}
        if not served:
            return element
        height, width = record.modalities[served[0]].pixels.shape[:2]
        if opt.random_crop:
            crop = augment.sample_crop(rng, height, width, size, scale=tuple(opt.crop_scale),
                                       ratio=tuple(opt.crop_ratio), flip=opt.flip)
        else:
            crop = augment.identity_crop(height, width, size)
        if record.label_map is not None:
            element["label_map"] = augment.resample_nearest(record.label_map, crop).astype(np.int32)
        shared = masking.simmim_mask(rng, size, opt.patch_size, opt.mask_block_size, opt.mask_ratio)
        for m in sorted(served):
            image, spec = record.modalities[m], self._specs[m]
            names = tuple(b.name for b in image.bands)
            if names != spec.bands:
                raise schema.RecordError(f"{self.where(index)}: {m} bands {list(names)} differ from the "
                                         f"data set's {list(spec.bands)}")
            valid = schema.valid_pixels(image)
            # Fill no-data with the band mean first, so no fill value (e.g. -9999 dB) enters
            # an interpolation; valid output pixels never draw on it anyway.
            px = image.pixels if valid.all() else np.where(valid[..., None], image.pixels, spec.mean)
            out, valid = augment.resample(px, valid, crop, schema.UNITS[m])
            out -= spec.mean
            out *= spec.inv_std
            out[~valid] = 0.0   # what the encoder sees there: the band mean
            mask = shared if opt.shared_mask else masking.simmim_mask(
                rng, size, opt.patch_size, opt.mask_block_size, opt.mask_ratio)
            element["images"][m] = {"pixels": out, "mask": mask, "valid": valid}
        return element


def _bad(index: int, message: str) -> dict:
    return {"record_index": index, "bad": message, "images": {}, "label_map": None, "scene_label": 0}


