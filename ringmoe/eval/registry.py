"""The probes, one small class each, chosen by name (`PROBES`).

A probe says which labels it learns (a record's scene label, or its label map),
which features it reads (`pooled` (N, D), or `patch` (N, h, w, D) of the stage
`probe.segmentation_stage`) and how it scores them: `score(features, train,
test, settings, num_classes, inputs)` -> {"value", "ci", "n_test", extras}.
`features` are `ringmoe.eval.features.extract`'s; `inputs` "raw_" asks for the
raw-input baseline's features instead of the encoder's. Adding a probe is one
class here; `evaluate_probes` and `tools.evaluate` take their names from `PROBES`.
"""
from __future__ import annotations

import numpy as np

from ringmoe.eval.intervals import accuracy_result
from ringmoe.eval.probes import knn_accuracy, lbfgs_probe, linear_probe, segmentation_probe


class SceneProbe:
    """A probe of the records' scene labels (0 = none: such records are left out) on pooled features."""
    metric = "top1_accuracy"
    label_kind = "scene labels"
    needs_patch = False
    extras: tuple[str, ...] = ()

    def labelled(self, features: dict) -> np.ndarray:
        return features["scene_label"] > 0

    def num_classes(self, features: dict, names: int) -> int:
        return max(names, int(features["scene_label"].max()) + 1)   # ids used as is, 0 unused

    def split(self, features: dict, train: np.ndarray, test: np.ndarray, inputs: str):
        tr, te = np.isin(features["record_index"], train), np.isin(features["record_index"], test)
        return features[inputs + "pooled"], features["scene_label"], tr, te


class KNN(SceneProbe):
    """k-nearest-neighbour top-1 accuracy (`probe.knn_k`)."""

    def score(self, features, train, test, settings, num_classes, inputs=""):
        x, y, tr, te = self.split(features, train, test, inputs)
        if inputs:   # band statistics come in mixed units: give every one the same weight
            x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
        return accuracy_result(knn_accuracy(x[tr], y[tr], x[te], y[te], settings.knn_k), int(te.sum()))


# probe.linear_solver -> {"accuracy", "features"} of a linear head (ringmoe/eval/probes.py): "lbfgs" solves
# the logistic regression to convergence with a validated L2 (and, given candidates, validated maps);
# "adamw" is the earlier fixed-step recipe, on every column.
LINEAR_SOLVERS = {
    "lbfgs": lambda xtr, ytr, xte, yte, k, s, candidates: lbfgs_probe(
        xtr, ytr, xte, yte, num_classes=k, steps=s.linear_lbfgs_steps, seed=s.seed, candidates=candidates),
    "adamw": lambda xtr, ytr, xte, yte, k, s, candidates: {
        "accuracy": linear_probe(xtr, ytr, xte, yte, num_classes=k, epochs=s.linear_epochs, lr=s.linear_lr,
                                 weight_decay=s.linear_weight_decay, seed=s.seed), "features": "all"},
}

# probe.linear_maps -> the feature subsets the linear head may use, given extract()'s pooled_maps
# (None for the raw baseline and for pooling "final": then every column). Any other value names
# one map ("stage0" .. "final", `features.pooled_maps`): the head reads that map alone, which shows
# where in the encoder the class is (README, "Probes").
LINEAR_MAPS = {
    "all": lambda maps: None,
    "validated": lambda maps: None if not maps else [("all", np.concatenate([c for _, c in maps]))] + list(maps),
}


def linear_candidates(name: str, maps):
    """The candidates of `probe.linear_maps` = `name` among `maps` ((map name, columns), ...; None when
    the features are one map: pooling "final")."""
    if name in LINEAR_MAPS:
        return LINEAR_MAPS[name](maps)
    if maps is None:
        raise ValueError(f"probe.linear_maps {name!r} names a pooled map, but these features are one map "
                         "(probe.pooling = 'final'); name a map with pooling 'stages'")
    named = [m for m in maps if m[0] == name]
    if not named:
        raise ValueError(f"unknown probe.linear_maps {name!r} (one of {' | '.join(LINEAR_MAPS)}, or a pooled map: "
                         f"{' | '.join(n for n, _ in maps)})")
    return named


class Linear(SceneProbe):
    """A linear classifier's top-1 accuracy (`probe.linear_solver`: `LINEAR_SOLVERS`), on the pooled
    maps `probe.linear_maps` allows (`LINEAR_MAPS`); "maps" names those it used, "per_class" gives
    [correct, test records] per class id (None for the adamw solver)."""
    extras = ("maps", "per_class")

    def score(self, features, train, test, settings, num_classes, inputs=""):
        if settings.linear_solver not in LINEAR_SOLVERS:
            raise ValueError(f"unknown probe.linear_solver {settings.linear_solver!r} ({' | '.join(LINEAR_SOLVERS)})")
        x, y, tr, te = self.split(features, train, test, inputs)
        # The raw baseline's band statistics are one map: the head reads all of them.
        candidates = None if inputs else linear_candidates(settings.linear_maps, features.get("pooled_maps"))
        if candidates is not None and settings.linear_solver != "lbfgs":
            raise ValueError(f"probe.linear_maps {settings.linear_maps!r} selects pooled maps, which only the "
                             "lbfgs solver does: set probe.linear_maps=all for adamw")
        fit = LINEAR_SOLVERS[settings.linear_solver](x[tr], y[tr], x[te], y[te], num_classes, settings, candidates)
        return {**accuracy_result(fit["accuracy"], int(te.sum())), "maps": fit["features"],
                "per_class": fit.get("per_class")}


class Segmentation:
    """A per-pixel head on one stage's patch features, scored by mIoU over the label maps
    (records without a labelled pixel are left out; classes 1..K, 0 = unlabelled)."""
    metric = "miou"
    label_kind = "label maps"
    needs_patch = True
    extras = ("pixel_accuracy",)

    def labelled(self, features: dict) -> np.ndarray:
        labels = features["label_map"]
        return labels.reshape(len(labels), -1).max(1) > 0

    def num_classes(self, features: dict, names: int) -> int:
        return max(names - 1, int(features["label_map"].max()))

    def score(self, features, train, test, settings, num_classes, inputs=""):
        tr, te = np.isin(features["record_index"], train), np.isin(features["record_index"], test)
        f, y = features[inputs + "patch"], features["label_map"]
        scores = segmentation_probe(f[tr], y[tr], f[te], y[te], num_classes=num_classes,
                                    epochs=settings.segmentation_epochs, lr=settings.segmentation_lr,
                                    weight_decay=settings.segmentation_weight_decay, seed=settings.seed)
        return {"value": scores["miou"], "ci": scores["miou_ci"], "n_test": scores["n_test"],
                "pixel_accuracy": scores["pixel_accuracy"]}


PROBES = {"knn": KNN(), "linear": Linear(), "segmentation": Segmentation()}
