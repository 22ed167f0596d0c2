"""Frozen RingMoE features of a whole data set, and the probes scored on them.

A pretrained encoder is restored read-only from a training run's Orbax
checkpoints (its config comes from the checkpoint's metadata, so nothing has to
be re-specified). Every record carrying the probed modality is encoded exactly
once, as the training pipeline prepares it minus the randomness: the whole
image resized to the model's input size, normalised with the manifest's band
statistics, no crop, no flip, no mask. `evaluate` runs a probe on these
features and, as the baseline that says what pretraining bought, on those of
the same model at its initialisation (same config and seed, same split), and
on the raw input (ringmoe.eval.raw: what the bands alone give). Every score
comes with its 95 % interval over the test records (ringmoe.eval.intervals).
"""
from __future__ import annotations

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from ringmoe.config import base_config
from ringmoe.data import shards
from ringmoe.data.pipeline import modality_specs
from ringmoe.data.schema import RecordError
from ringmoe.data.transform import RecordTransform, TransformOptions
from ringmoe.eval.probes import dataset_split
from ringmoe.eval.raw import band_statistics, raw_bands
from ringmoe.eval.registry import PROBES
from ringmoe.model.checkpoint import one_device_mesh
from ringmoe.model.ringmoe import RingMoE, create_model

def random_init_model(config) -> RingMoE:
    """The model the pretraining run started from (same config, same seed): the baseline."""
    return create_model(config.model, seed=config.seed, mesh=one_device_mesh())


def probe_settings(config) -> ConfigDict:
    """`config.probe`, with the defaults of ringmoe/config.py for keys a run's config lacks."""
    settings = base_config().probe
    if "probe" in config:
        settings.update(config.probe)
    return settings


def available_modalities(config, model: RingMoE, manifest: dict, data_dir: str) -> list[str]:
    """The model's modalities that the data set holds (and the run served), in model order."""
    specs = modality_specs(manifest, config, data_dir)
    return [m for m in model.modalities if m in specs]


POOLINGS = ("stages", "final")


@functools.partial(nnx.jit, static_argnames=("modality", "stage", "pooling"))
def _encode(model: RingMoE, pixels, modality: str, stage: int | None, pooling: str):
    encoded = model.encode(pixels, modality)
    patch = None if stage is None else encoded.stage_features[stage].astype(jnp.float32)
    if pooling == "final":
        return encoded.features.mean((1, 2)), patch
    maps = [f.astype(jnp.float32) for f in encoded.stage_features] + [encoded.features]
    return jnp.concatenate([stat(f, (1, 2)) for f in maps for stat in (jnp.mean, jnp.std)], -1), patch


def pooled_maps(model: RingMoE) -> list[tuple[str, np.ndarray]]:
    """(name, column indices) of each map in the "stages" pooling: 'stage<i>' for every stage's
    map before merging, 'final' for the normalised output; each map's mean columns then its std."""
    stages = len(model.stages)
    dims = [model.out_dim // 2 ** (stages - 1 - i) for i in range(stages)] + [model.out_dim]   # widths double
    names = [f"stage{i}" for i in range(len(model.stages))] + ["final"]
    bounds = np.cumsum([0] + [2 * d for d in dims])
    return [(name, np.arange(lo, hi)) for name, lo, hi in zip(names, bounds[:-1], bounds[1:])]


def image_batches(config, data_dir: str, modality: str, batch_size: int = 32, *, pad: bool = True):
    """Every record of `data_dir` that carries `modality`, once, in record order, in batches.

    Yields (pixels (batch_size, S, S, C), n, rows) where rows = {"scene_label",
    "label_map", "record_index"} lists of the n real rows. With `pad` a short last
    batch is filled with zero rows, so every batch has one shape and a jitted
    encoder compiles once; without it the last batch has n rows. Images are
    the whole record resized to the model's input, normalised, unmasked and
    unflipped. A bad record is a RecordError naming its shard file and index.
    """
    manifest = shards.read_manifest(data_dir)
    specs = modality_specs(manifest, config, data_dir)
    if modality not in specs:
        raise ValueError(f"{data_dir}: modality {modality!r} is not served (have {sorted(specs)})")
    size = config.model.image_size
    options = TransformOptions(image_size=size, patch_size=config.model.patch_size, flip=False,
                               random_crop=False, mask_block_size=size, mask_ratio=0.0)
    transform = RecordTransform(shards.shard_paths(data_dir), [s["records"] for s in manifest["shards"]],
                                {modality: specs[modality]}, options, seed=0)
    elements = grain.MapDataset.range(manifest["records"]).map(lambda i: (0, i, i)).map(transform).to_iter_dataset(
        grain.ReadOptions(num_threads=config.data.read_threads, prefetch_buffer_size=2 * batch_size))
    pending: list[np.ndarray] = []
    rows: dict[str, list] = {"scene_label": [], "label_map": [], "record_index": []}

    def flush():
        n = len(pending)
        pixels = np.stack(pending + [np.zeros_like(pending[0])] * ((batch_size - n) if pad else 0))
        batch = (pixels, n, {k: list(v) for k, v in rows.items()})
        pending.clear()
        for v in rows.values():
            v.clear()
        return batch

    found = False
    for element in elements:
        if element["bad"]:
            raise RecordError(element["bad"])   # names the shard file and record
        image = element["images"].get(modality)
        if image is None:
            continue
        found = True
        pending.append(image["pixels"])
        for k in rows:
            rows[k].append(element[k])
        if len(pending) == batch_size:
            yield flush()
    if pending:
        yield flush()
    if not found:
        raise ValueError(f"{data_dir}: no record carries {modality}")


def extract(model: RingMoE, config, data_dir: str, modality: str, *, stage: int | None = None,
            batch_size: int = 32, pooling: str = "stages", raw: bool = False) -> dict[str, np.ndarray | None]:
    """Encodes every record of `data_dir` that carries `modality` (`image_batches`).

    Returns numpy arrays: pooled (N, D), pooled_maps (`pooled_maps`: which columns each
    map fills; None unless pooling "stages"), patch (N, h, w, D_stage) = the stage's
    map before merging (None without `stage`), scene_label (N,), label_map
    (N, S, S) and record_index (N,); with `raw` also the raw-input baseline's
    inputs (ringmoe.eval.raw): raw_pooled (N, 2 C') per-band means and stds and,
    with `stage`, raw_patch (N, S, S, C') the bands per pixel.

    `pooling` "stages" (the default) concatenates the spatial mean and std of
    every stage's map before merging and of the final normalised features (for
    configs/tiny.py 2 x (32 + 64 + 128 + 256 + 256) = 1472 dims); "final" is the
    mean of the final stride-32 features alone. Why: on the demo's checkpoint the
    final mean scored below the raw band means on every modality, because the
    deep stages keep little of the band levels and textures the scene class
    depends on, while the first stages and the spatial std keep them (README,
    "Probes"); a linear probe on all stages uses whatever each stage holds.
    """
    return extract_models([model], config, data_dir, modality, stage=stage, batch_size=batch_size,
                          pooling=pooling, raw=raw)[0]


def extract_models(models, config, data_dir: str, modality: str, *, stage: int | None = None,
                   batch_size: int = 32, pooling: str = "stages", raw: bool = False) -> list[dict]:
    """`extract` for several models of one data layout (a pretrained model and its random
    initialisation, as `evaluate_probes` asks), reading the data once; the raw-input
    baseline's arrays (`raw`) go with the first model's features."""
    if stage is not None and not all(0 <= stage < len(m.stages) for m in models):
        raise ValueError(f"stage {stage} not in [0, {min(len(m.stages) for m in models)})")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r} (one of {', '.join(POOLINGS)})")
    spec = modality_specs(shards.read_manifest(data_dir), config, data_dir)[modality] if raw else None
    encoded: list[dict[str, list]] = [{"pooled": [], "patch": []} for _ in models]
    out: dict[str, list] = {k: [] for k in ("scene_label", "label_map", "record_index", "raw_pooled", "raw_patch")}
    for pixels, n, rows in image_batches(config, data_dir, modality, batch_size):
        device_pixels = jnp.asarray(pixels)
        for model, arrays in zip(models, encoded):
            pooled, patch = jax.device_get(_encode(model, device_pixels, modality, stage, pooling))
            arrays["pooled"].append(pooled[:n])
            if patch is not None:
                arrays["patch"].append(patch[:n])
        if spec is not None:   # undo the normalisation: the baseline sees physical units
            physical = pixels[:n] * spec.std + spec.mean
            out["raw_pooled"].append(band_statistics(physical, modality))
            if stage is not None:
                out["raw_patch"].append(raw_bands(physical, modality))
        for k, v in rows.items():
            out[k].extend(v)
    joined = lambda parts: np.concatenate(parts) if parts else None  # noqa: E731
    shared = {"scene_label": np.asarray(out["scene_label"], np.int64),
              "label_map": np.stack(out["label_map"]).astype(np.int64),
              "record_index": np.asarray(out["record_index"], np.int64)}
    return [{"pooled": joined(arrays["pooled"]), "patch": joined(arrays["patch"]),
             "raw_pooled": joined(out["raw_pooled"]) if i == 0 else None,
             "raw_patch": joined(out["raw_patch"]) if i == 0 else None,
             "pooled_maps": pooled_maps(model) if pooling == "stages" else None, **shared}
            for i, (model, arrays) in enumerate(zip(models, encoded))]


def evaluate(config, model: RingMoE, data_dir: str, probe: str, modality: str | None = None, *,
             baseline: bool = True) -> dict:
    """Runs one probe on `model` and, with `baseline`, on its random initialisation and the raw input.

    kNN / linear use each record's scene label (0 = none: such records are left
    out); segmentation uses the label maps (records without a labelled pixel are
    left out). Returns {"probe", "metric", "value", "ci", "random_init_value",
    "random_init_ci", "raw_value", "raw_ci" (the raw-input baseline, ringmoe.eval.raw;
    these four None without `baseline`), "modality", "pooling", "train_records",
    "test_records"} plus, for segmentation, "stage" and "pixel_accuracy",
    "random_init_pixel_accuracy", "raw_pixel_accuracy". Every "ci" is a 95 %
    interval [low, high] over the test records: Wilson for accuracies, a seeded
    record bootstrap for mIoU (ringmoe.eval.intervals).
    """
    return evaluate_probes(config, model, data_dir, (probe,), modality, baseline=baseline)[0]


def evaluate_probes(config, model: RingMoE, data_dir: str, probes, modality: str | None = None, *,
                    baseline: bool = True, baseline_model: RingMoE | None = None) -> list[dict]:
    """`evaluate` for several probes of one modality, encoding the data set once per model.
    `baseline_model` (default: `random_init_model(config)`, built here) lets a caller that
    probes several modalities initialise the baseline once."""
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise ValueError(f"unknown probe {unknown[0] if unknown else None!r} (one of {', '.join(PROBES)})")
    manifest = shards.read_manifest(data_dir)
    available = available_modalities(config, model, manifest, data_dir)
    if modality is None and not available:
        raise ValueError(f"{data_dir}: holds none of the model's modalities ({', '.join(model.modalities)})")
    modality = modality or available[0]
    if modality not in available:
        raise ValueError(f"unknown modality {modality!r} for this model and data set (available: "
                         f"{', '.join(available) or 'none'})")
    settings = probe_settings(config)
    stage = settings.segmentation_stage if any(PROBES[p].needs_patch for p in probes) else None
    models = [model]
    if baseline:
        models.append(baseline_model if baseline_model is not None else random_init_model(config))
    features, random_features = (extract_models(models, config, data_dir, modality, stage=stage,
                                                pooling=settings.pooling, raw=baseline) + [None])[:2]
    names = len(manifest["label_names"])   # label_names[i] names class id i; id 0 = unlabelled / none
    results = []
    for name in probes:
        probe = PROBES[name]
        labelled = probe.labelled(features)
        num_classes = probe.num_classes(features, names)
        if not labelled.any():
            raise ValueError(f"{data_dir}: no {modality} record has {probe.label_kind}; the {name} probe needs them")
        train, test = dataset_split(manifest, features["record_index"][labelled],
                                    settings.test_fraction, settings.seed)
        scores = probe.score(features, train, test, settings, num_classes)
        raw = probe.score(features, train, test, settings, num_classes, inputs="raw_") if baseline else {}
        result = {"probe": name, "metric": probe.metric, "value": scores["value"], "ci": scores["ci"],
                  "random_init_value": None, "random_init_ci": None,
                  "raw_value": raw.get("value"), "raw_ci": raw.get("ci"), "modality": modality,
                  "pooling": settings.pooling, "train_records": int(len(train)),
                  "test_records": int(len(test))}
        if probe.needs_patch:
            result["stage"] = stage
        for extra in probe.extras:
            result.update({extra: scores[extra], f"random_init_{extra}": None, f"raw_{extra}": raw.get(extra)})
        if random_features is not None:
            random_scores = probe.score(random_features, train, test, settings, num_classes)
            result.update(random_init_value=random_scores["value"], random_init_ci=random_scores["ci"])
            for extra in probe.extras:
                result[f"random_init_{extra}"] = random_scores[extra]
        results.append(result)
    return results
