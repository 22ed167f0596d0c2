"""How hard are a data set's labels? Linear-probe accuracy on raw inputs versus chance.

A pretrained encoder is only worth something if its features beat what a linear
classifier gets from the raw pixels. This module measures that floor per modality:

* scene level: multinomial logistic regression on each record's per-band means
  (the scene label is the dominant class);
* pixel level: the same on single-pixel band vectors (the label map), split by
  record (a scene's pixels all on one side, `record_split`), which
  exposes speckle: a single-look complex SAR pixel is a zero-mean circular
  Gaussian, so its raw Re/Im values carry almost no linear class information;
  the extra view "sar_l1_log_power" (log10 |S_pq|^2 per polarisation) shows
  the information is there once the phase is discarded.

Chance is the majority-class rate of the test split. The classifier is the
evaluation's linear probe (ringmoe/eval/probes.py), seeded: the figures are
reproducible, cheap (seconds) and comparable with probes on encoder features.
"""
from __future__ import annotations

import numpy as np

from ringmoe.data import shards
from ringmoe.eval.probes import linear_probe


def log_power(slc: np.ndarray) -> np.ndarray:
    """(H, W, 2P) Re/Im channels -> (H, W, P) log10 power |S_pq|^2 per polarisation."""
    power = slc.reshape(*slc.shape[:-1], -1, 2).astype(np.float64) ** 2
    return np.log10(power.sum(-1) + 1e-12)


def chance(y_test: np.ndarray) -> float:
    """Majority-class rate: the accuracy of always answering the most common class."""
    return float(np.bincount(y_test).max() / len(y_test))


def record_split(groups: np.ndarray, rng: np.random.Generator, test_fraction: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sample indices with whole records on one side: `groups[i]` is sample i's
    record. Pixels of one scene are correlated (same surface, same illumination, neighbouring
    speckle), so splitting them by pixel would test on the training scenes."""
    records = rng.permutation(np.unique(groups))
    n_test = min(max(1, int(round(len(records) * test_fraction))), len(records) - 1)
    test = np.isin(groups, records[:n_test])
    return np.flatnonzero(~test), np.flatnonzero(test)


def _probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, rng: np.random.Generator,
           test_fraction: float) -> dict:
    tr, te = record_split(groups, rng, test_fraction)
    accuracy = linear_probe(x[tr], y[tr], x[te], y[te], num_classes=int(y.max()) + 1, epochs=400, lr=0.05,
                            weight_decay=1e-4, seed=0)
    return {"accuracy": round(accuracy, 4), "chance": round(chance(y[te]), 4), "n_train": int(len(tr)),
            "n_test": int(len(te)), "test_records": int(len(np.unique(groups[te])))}


def label_hardness(data_dir: str, *, max_records: int = 2000, pixels_per_record: int = 64,
                   test_fraction: float = 0.3, seed: int = 0) -> dict:
    """Linear-probe vs chance per modality, at scene and pixel level, over the first
    `max_records` labelled records of a data set. Returns
    {"scene": {modality: {accuracy, chance, n_train, n_test}}, "pixel": {...}}."""
    rng = np.random.default_rng(seed)
    scene_x: dict[str, list] = {}
    scene_y: dict[str, list] = {}
    pix_x: dict[str, list] = {}
    pix_y: dict[str, list] = {}
    pix_record: dict[str, list] = {}
    for n, record in enumerate(shards.iter_records(data_dir)):
        if n >= max_records:
            break
        views = {name: image.pixels for name, image in record.modalities.items()}
        if "sar_l1" in views:
            views["sar_l1_log_power"] = log_power(views["sar_l1"])
        for name, pixels in views.items():
            if record.scene_label is not None:
                scene_x.setdefault(name, []).append(pixels.reshape(-1, pixels.shape[-1]).mean(0))
                scene_y.setdefault(name, []).append(record.scene_label)
            if record.label_map is not None:
                flat = record.label_map.ravel()
                pick = rng.choice(flat.size, size=min(pixels_per_record, flat.size), replace=False)
                pick = pick[flat[pick] > 0]
                pix_x.setdefault(name, []).append(pixels.reshape(-1, pixels.shape[-1])[pick])
                pix_y.setdefault(name, []).append(flat[pick])
                pix_record.setdefault(name, []).append(np.full(len(pick), n))
    out: dict = {"scene": {}, "pixel": {}}
    for name in sorted(scene_x):
        if len(scene_y[name]) >= 10:
            y = np.array(scene_y[name])
            out["scene"][name] = _probe(np.array(scene_x[name], np.float64), y, np.arange(len(y)), rng,
                                        test_fraction)
    for name in sorted(pix_x):
        x, y = np.concatenate(pix_x[name]).astype(np.float64), np.concatenate(pix_y[name])
        if len(y) >= 10 and len(pix_record[name]) >= 2:
            out["pixel"][name] = _probe(x, y, np.concatenate(pix_record[name]), rng, test_fraction)
    return out
