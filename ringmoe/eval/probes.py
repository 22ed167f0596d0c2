"""Probes that score frozen features: kNN, linear (logistic regression) and 1x1 segmentation.

Pure array functions: features and labels in, a number out. Heads are trained
full-batch with AdamW inside one `jax.jit` (a `lax.scan` over the steps), from
a seeded initialisation, so a probe's result is a deterministic function of its
inputs and settings. Splits are by record index, never by pixel or patch, so no
record is seen on both sides.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ringmoe.eval.intervals import bootstrap

KNN_TEMPERATURE = 0.07    # DINO's kNN: each neighbour votes with exp(cosine / T)
_KNN_CHUNK = 1024         # test rows scored per call (bounds the (rows, n_train) similarity matrix)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_predict(train_x, train_y, test_x, *, k: int, num_classes: int):
    sims = test_x @ train_x.T
    top, idx = jax.lax.top_k(sims, k)
    votes = jax.nn.one_hot(train_y[idx], num_classes) * jnp.exp(top / KNN_TEMPERATURE)[..., None]
    return jnp.argmax(votes.sum(1), -1)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int) -> float:
    """Top-1 accuracy of a weighted kNN vote on L2-normalised features.

    Cosine similarity to every training row; the k = min(k, n_train) most similar
    vote for their label with weight exp(sim / 0.07) (DINO); labels are any integers.
    """
    classes, train_idx = np.unique(np.asarray(train_y), return_inverse=True)
    normalise = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    train_x = jnp.asarray(normalise(np.asarray(train_x, np.float32)))
    test_x = normalise(np.asarray(test_x, np.float32))
    k = min(k, len(train_idx))
    rows = min(_KNN_CHUNK, len(test_x))
    preds = []
    for start in range(0, len(test_x), rows):
        chunk = test_x[start:start + rows]
        padded = np.pad(chunk, ((0, rows - len(chunk)), (0, 0)))   # one compiled shape
        pred = _knn_predict(train_x, jnp.asarray(train_idx), jnp.asarray(padded), k=k, num_classes=len(classes))
        preds.append(np.asarray(pred)[:len(chunk)])
    return float(np.mean(classes[np.concatenate(preds)] == np.asarray(test_y)))


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Both sets scaled per channel (last axis) with the training set's mean and std."""
    train, test = np.asarray(train, np.float32), np.asarray(test, np.float32)
    axes = tuple(range(train.ndim - 1))
    mean, std = train.mean(axes), train.std(axes) + 1e-6
    return jnp.asarray((train - mean) / std), jnp.asarray((test - mean) / std)


def _init_head(dim: int, num_classes: int, seed: int) -> dict:
    return {"w": 0.01 * jax.random.normal(jax.random.key(seed), (dim, num_classes)),
            "b": jnp.zeros((num_classes,))}


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps"))
def _fit(params: dict, data: tuple, lr, weight_decay, *, loss_fn, steps: int) -> dict:
    """`steps` full-batch AdamW updates of `loss_fn(params, *data)`; no decay on the bias."""
    tx = optax.adamw(lr, weight_decay=weight_decay, mask={"w": True, "b": False})

    def step(carry, _):
        params, opt_state = carry
        updates, opt_state = tx.update(jax.grad(loss_fn)(params, *data), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params


def _linear_loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y).mean()


def linear_probe(train_x, train_y, test_x, test_y, *, num_classes: int, epochs: int, lr: float,
                 weight_decay: float, seed: int) -> float:
    """Test accuracy of multinomial logistic regression on frozen features.

    Protocol: features standardised per dimension with the training mean/std; a
    linear layer (weights ~ N(0, 0.01^2) from `seed`, zero bias) trained with
    AdamW (`lr`, `weight_decay` on the weights only) for `epochs` full-batch steps
    on the mean softmax cross-entropy; labels are class ids in [0, num_classes).
    """
    _check_labels(np.concatenate([np.ravel(train_y), np.ravel(test_y)]), num_classes)
    train_x, test_x = _standardise(train_x, test_x)
    params = _fit(_init_head(train_x.shape[-1], num_classes, seed), (train_x, jnp.asarray(train_y, jnp.int32)),
                  lr, weight_decay, loss_fn=_linear_loss, steps=epochs)
    pred = np.asarray(jnp.argmax(test_x @ params["w"] + params["b"], -1))
    return float(np.mean(pred == np.asarray(test_y)))


L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)   # penalties tried, strongest first (a tie keeps the stronger)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _lbfgs_fit(x, y, l2, *, num_classes: int, steps: int) -> dict:
    """Minimises mean softmax cross-entropy + l2 / 2 * |w|^2 (bias free) with `steps` L-BFGS iterations."""
    def loss(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
        return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    params = {"w": jnp.zeros((x.shape[-1], num_classes)), "b": jnp.zeros((num_classes,))}
    opt, value_and_grad = optax.lbfgs(), optax.value_and_grad_from_state(loss)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params


def _accuracy(params, x, y) -> float:
    return float(np.mean(np.asarray(jnp.argmax(x @ params["w"] + params["b"], -1)) == np.asarray(y)))


def lbfgs_probe(train_x, train_y, test_x, test_y, *, num_classes: int, steps: int, seed: int,
                validation_fraction: float = 0.2, l2_grid: Sequence[float] = L2_GRID,
                candidates: Sequence[tuple[str, np.ndarray]] | None = None) -> dict:
    """Test accuracy of L2-regularised logistic regression solved to convergence, penalty chosen on validation.

    Protocol (the usual linear evaluation, e.g. SimCLR's and CLIP's): features
    standardised with the training mean/std; `validation_fraction` of the training
    records (seeded) held out; for each penalty of `l2_grid` the convex objective
    mean cross-entropy + l2/2 |w|^2 minimised with `steps` full-batch L-BFGS
    iterations from zero; the penalty with the best validation accuracy (ties: the
    stronger) refit on all training records and scored on the test records.
    Why: a fixed number of AdamW steps stops wherever it stops, and on the demo's
    probe set 300 steps left the low-dimensional band statistics far from their
    optimum (train accuracy 0.83 -> 0.95 from 300 to 10,000 steps), so the
    comparison depended on the optimiser, not the features.

    `candidates` ((name, column indices), ...), optional: feature subsets chosen among
    on the same validation records, jointly with the penalty (ties: the earlier
    candidate); `ringmoe.eval.registry.Linear` offers all pooled maps and each one
    alone. Returns {"accuracy", "train_accuracy", "l2", "features" (the candidate's
    name; "all" without candidates), "per_class" ([correct, test records] for each
    class id 0 .. num_classes - 1: which classes the accuracy comes from)}.
    """
    _check_labels(np.concatenate([np.ravel(train_y), np.ravel(test_y)]), num_classes)
    train_x, test_x = _standardise(train_x, test_x)
    train_y = jnp.asarray(train_y, jnp.int32)
    fit_idx, val_idx = split_indices(np.arange(len(train_y)), validation_fraction, seed)
    candidates = candidates or (("all", np.arange(train_x.shape[-1])),)

    def validation_accuracy(job):
        columns, l2 = job
        x = train_x[:, columns]
        fit = _lbfgs_fit(x[fit_idx], train_y[fit_idx], l2, num_classes=num_classes, steps=steps)
        return _accuracy(fit, x[val_idx], train_y[val_idx])

    # The fits are independent small XLA programs that leave cores idle: run them side by side
    # (1.45x faster on 2 cores; each fit's numbers are the same as one at a time).
    jobs = [(columns, l2) for _, columns in candidates for l2 in l2_grid]
    with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        scores = list(pool.map(validation_accuracy, jobs))
    best = int(np.argmax(scores))
    (name, columns), l2 = candidates[best // len(l2_grid)], float(l2_grid[best % len(l2_grid)])
    train_x, test_x = train_x[:, columns], test_x[:, columns]
    params = _lbfgs_fit(train_x, train_y, l2, num_classes=num_classes, steps=steps)
    test_y = np.asarray(test_y)
    right = np.asarray(jnp.argmax(test_x @ params["w"] + params["b"], -1)) == test_y
    correct, records = (np.bincount(test_y[m], minlength=num_classes) for m in (right, slice(None)))
    per_class = [[int(c), int(r)] for c, r in zip(correct, records)]
    return {"accuracy": float(np.mean(right)), "train_accuracy": _accuracy(params, train_x, train_y),
            "l2": l2, "features": name, "per_class": per_class}


def _segment_logits(params, feats, size: tuple[int, int]):
    """(N, h, w, D) -> 1x1 head -> bilinear upsampling to (N, H, W, K)."""
    logits = feats @ params["w"] + params["b"]
    return jax.image.resize(logits, (feats.shape[0], *size, logits.shape[-1]), "bilinear")


def _segment_loss(params, feats, labels):
    """Cross-entropy over labelled pixels only (label 0 = unlabelled; class c -> index c - 1)."""
    logits = _segment_logits(params, feats, labels.shape[1:])
    valid = labels > 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels - 1, 0))
    return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)


@functools.partial(jax.jit, static_argnames="size")
def _segment_predict(params, feats, size: tuple[int, int]):
    return jnp.argmax(_segment_logits(params, feats, size), -1) + 1


def segmentation_probe(train_f, train_lab, test_f, test_lab, *, num_classes: int, epochs: int, lr: float,
                       weight_decay: float, seed: int) -> dict:
    """mIoU and pixel accuracy of a linear 1x1 head on per-patch features.

    Features (N, h, w, D) are standardised per channel with the training mean/std;
    the head's logits (N, h, w, K) are upsampled bilinearly to the label maps
    (N, H, W) and trained like `linear_probe` on the cross-entropy of labelled
    pixels (classes 1..K; 0 = unlabelled is ignored in training and metrics).
    mIoU averages IoU over the classes present in the test labels or predictions;
    "miou_ci" is its 95 % percentile bootstrap over test records (seeded by `seed`),
    "n_test" the number of test records.
    """
    _check_labels(np.concatenate([np.ravel(train_lab), np.ravel(test_lab)]), num_classes + 1)
    train_f, test_f = _standardise(train_f, test_f)
    train_lab, test_lab = jnp.asarray(train_lab, jnp.int32), np.asarray(test_lab, np.int64)
    params = _fit(_init_head(train_f.shape[-1], num_classes, seed), (train_f, train_lab), lr, weight_decay,
                  loss_fn=_segment_loss, steps=epochs)
    pred = np.asarray(_segment_predict(params, test_f, size=test_lab.shape[1:]))
    valid = test_lab > 0
    if not valid.any():
        raise ValueError("segmentation probe: the test label maps hold no labelled pixel")
    # One confusion matrix per test record, so the bootstrap can resample records.
    cell = np.where(valid, (test_lab - 1) * num_classes + (pred - 1), num_classes ** 2)   # unlabelled: spare bin
    rows = np.arange(len(cell))[:, None, None]
    confusion = np.zeros((len(cell), num_classes ** 2 + 1), np.int64)
    np.add.at(confusion, (np.broadcast_to(rows, cell.shape), cell), 1)
    confusion = confusion[:, :-1].reshape(-1, num_classes, num_classes)
    total = confusion.sum(0)
    return {"miou": _miou(total), "pixel_accuracy": float(np.trace(total) / valid.sum()),
            "miou_ci": list(bootstrap(lambda idx: _miou(confusion[idx].sum(0)), len(confusion), seed=seed)),
            "n_test": int(len(confusion))}


def _miou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes present in the truth or the predictions of a (K, K) confusion matrix."""
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0])) if (union > 0).any() else 0.0


def _check_labels(labels: np.ndarray, limit: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= limit):
        raise ValueError(f"labels must lie in [0, {limit}), got [{labels.min()}, {labels.max()}]")


def split_indices(record_indices: Sequence[int], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, test) split of record indices, sorted, both non-empty.

    The test side holds round(test_fraction * n) records, clamped to [1, n - 1];
    which ones depends only on `seed` and the set of indices, not their order.
    """
    indices = np.unique(np.asarray(record_indices, np.int64))
    if len(indices) < 2:
        raise ValueError(f"a probe needs at least 2 labelled records (one to train, one to test), got {len(indices)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(max(int(round(test_fraction * len(indices))), 1), len(indices) - 1)
    test = np.random.default_rng(seed).permutation(indices)[:n_test]
    return np.setdiff1d(indices, test), np.sort(test)


def dataset_split(manifest: Mapping, record_indices: Sequence[int], test_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The data set's own split when its manifest has one, else `split_indices`.

    A manifest may carry {"splits": {"train": [record indices], "test": [...]}}
    (e.g. a benchmark's official split); only `record_indices` (the labelled
    records carrying the probed modality) are kept from it.
    """
    splits = manifest.get("splits")
    if not splits:
        return split_indices(record_indices, test_fraction, seed)
    indices = np.asarray(record_indices, np.int64)
    train = np.intersect1d(indices, np.asarray(splits.get("train", []), np.int64))
    test = np.intersect1d(indices, np.asarray(splits.get("test", []), np.int64))
    if not len(train) or not len(test):
        raise ValueError(f"the manifest's splits leave {len(train)} train and {len(test)} test records "
                         "among the labelled ones; each side needs at least one")
    return train, test
