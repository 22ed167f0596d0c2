"""95 % intervals for probe scores: Wilson for accuracies, a record bootstrap for everything else.

A probe's test set is a sample of records, so its score is an estimate; these
intervals say how far it could move on another sample of the same size. An
accuracy is a proportion of records (correct / n_test) and gets the Wilson score
interval, which stays inside [0, 1] and behaves at 0 and n correct, where the
normal approximation does not. mIoU is a ratio of pixel counts pooled over
records, not a proportion of records, so it gets a percentile bootstrap that
resamples whole test records (seeded, so a result is reproducible).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

Z95 = 1.959963984540054   # the standard normal's 97.5 % quantile: two-sided 95 %
BOOTSTRAP_SAMPLES = 1000


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval [low, high] of the proportion correct / n.

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half width = z / (1 + z^2 / n) *
    sqrt(p (1 - p) / n + z^2 / 4n^2), with p = correct / n.
    """
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"wilson: need 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if correct == 0 else float(low)), (1.0 if correct == n else float(high))   # exact ends, no rounding


def accuracy_result(accuracy: float, n_test: int) -> dict:
    """{"value", "ci": [low, high] (Wilson), "n_test"} of an accuracy over n_test records."""
    correct = int(round(accuracy * n_test))
    return {"value": float(accuracy), "ci": list(wilson(correct, n_test)), "n_test": int(n_test)}


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, samples: int = BOOTSTRAP_SAMPLES,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over `samples` resamples of range(n) with replacement.

    `statistic` receives an index array of length n (repeats allowed) into the
    test records and returns the score of that resample.
    """
    if n <= 0:
        raise ValueError(f"bootstrap: need at least one record, got {n}")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(samples)])
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def pooled_accuracy(accuracies, n_tests) -> dict:
    """{"value", "ci", "n_test"} of several accuracies pooled as total correct / total records.

    With equal test sizes the value is the plain mean. The Wilson interval treats
    the pooled records as independent; when the accuracies score the same scenes
    (one per modality) their errors correlate, so the interval is a lower bound
    on the uncertainty of the mean, not its exact 95 %.
    """
    correct = sum(int(round(a * n)) for a, n in zip(accuracies, n_tests, strict=True))
    n = int(sum(n_tests))
    return {"value": correct / n, "ci": list(wilson(correct, n)), "n_test": n}
