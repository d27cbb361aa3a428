"""How precisely an eval set measures a gate metric: 95% intervals, and near-tie decisions of the reference.

Proportions (accuracy, agreement) get the Wilson score interval through scipy: unlike the
normal approximation it stays inside [0, 1] and keeps its coverage at proportions near 1 and at
small n, which is where gates live (agreement 0.999, a few hundred samples). Task scores that
are not a count of independent successes (mAP, mIoU, pixel agreement) get a bootstrap over the
eval images through ``scipy.stats.bootstrap``; the statistic is the project's own metric
function on the resampled images, so the interval is of the number the gate compares.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np

CONFIDENCE = 0.95
# Fixed, so the same outputs give the same interval on every run and machine.
BOOTSTRAP_SEED = 0


def interval_keys(name: str, low: float, high: float, n: int) -> dict[str, float]:
    """The flat keys a metric's interval is stored under, beside the metric itself."""
    return {f"{name}.ci_low": float(low), f"{name}.ci_high": float(high), f"{name}.n": float(n)}


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def proportion_metrics(name: str, hits: np.ndarray) -> dict[str, float]:
    """``name`` = the share of true entries in ``hits``, with its Wilson interval and n."""
    n, successes = len(hits), int(np.count_nonzero(hits))
    return {name: successes / n, **interval_keys(name, *wilson_interval(successes, n), n)}


def bootstrap_metrics(
    names: list[str], values: list[float], n: int, statistic: Callable[[np.ndarray], list[float]], resamples: int
) -> dict[str, float]:
    """Intervals of the ``names`` metrics (point ``values``) by resampling the ``n`` eval images.

    ``statistic`` gets the indices of one resample (repeats allowed) and returns the metrics on
    those images. The interval is value +- z * the bootstrap standard error, clipped to [0, 1]:
    with the few resamples an mAP budget allows, the standard error (from every resample) is
    far steadier than percentile bounds (from the two or three most extreme resamples).
    """
    from scipy.stats import DegenerateDataWarning, bootstrap, norm

    if n < 2:
        # One image says nothing about how another would score: the interval is all there is.
        return {k: v for name in names for k, v in interval_keys(name, 0.0, 1.0, n).items()}
    with warnings.catch_warnings():
        # Every resample scoring the same (an engine equal to its reference) leaves the percentile
        # bounds undefined and scipy warns; the standard error used here is then 0, as it should be.
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            (np.arange(n),),
            lambda images: np.asarray(statistic(images), dtype=np.float64),
            n_resamples=resamples,
            vectorized=False,
            method="percentile",
            confidence_level=CONFIDENCE,
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
    z = float(norm.ppf(0.5 + CONFIDENCE / 2))
    metrics: dict[str, float] = {}
    for name, value, error in zip(names, values, np.atleast_1d(result.standard_error)):
        metrics.update(interval_keys(name, max(0.0, value - z * error), min(1.0, value + z * error), n))
    return metrics


def samples_to_resolve(allowed: float, half_width: float, n: float, counted: bool) -> int | None:
    """The eval set size at which ``allowed`` is at least the interval's half-width (and 1/n for
    counted proportions); None when no size does (``allowed`` is 0). Intervals narrow as 1/sqrt(n)."""
    if allowed <= 0:
        return None
    needed = n * (half_width / allowed) ** 2
    if counted:
        needed = max(needed, 1 / allowed)
    # Rounded first so that 1 / 0.01 (100.00000000000001 in floats) asks for 100, not 101.
    return math.ceil(round(needed, 6))


def softmax_margin(scores: np.ndarray) -> np.ndarray:
    """Per row: the probability of the top class minus that of the runner-up.

    Rows that are already probabilities (non-negative, summing to 1) are used as they are, so a
    model exported with its softmax inside is not softmaxed twice; anything else is taken as logits.
    """
    scores = scores.reshape(len(scores), -1).astype(np.float64)
    is_probability = np.all(scores >= 0) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    if not is_probability:
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    top2 = np.sort(scores, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]
