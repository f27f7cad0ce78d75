"""Interval estimates and the promotion rule for comparing two policies' success rates.

Pure functions on numbers and arrays; no I/O, no global random state.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# Resample in blocks so n_boot x n_episodes indices never sit in memory at once.
_BOOT_BLOCK = 1000


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}; pass e.g. 0.95")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and does not
    collapse to zero width at 0/n or n/n, which are common for small per-task evaluations.
    """
    _check_confidence(confidence)
    if n <= 0:
        raise ValueError(f"n must be positive to estimate a rate, got n={n}; evaluate at least one episode")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clip float round-off only: at 0/n the exact lower bound is 0.
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-episode outcomes, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; drop or fix those episodes before comparing")
    return arr


def bootstrap_mean(
    x, strata=None, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Percentile-bootstrap (estimate, low, high) for the mean of ``x``.

    With ``strata`` (one label per element), indices are resampled within each stratum and
    the statistic is the unweighted mean of per-stratum means, so every stratum (task)
    counts equally however many episodes it has.
    """
    _check_confidence(confidence)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = _as_1d(x, "x")
    if strata is None:
        groups = [x]
    else:
        labels = np.asarray(strata)
        if labels.shape != x.shape:
            raise ValueError(f"strata has shape {labels.shape} but outcomes have shape {x.shape}; pass one label per episode")
        # np.unique sorts, so the resampling order (and thus the result) does not depend on row order.
        groups = [x[labels == s] for s in np.unique(labels)]

    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for g in groups:
        for start in range(0, n_boot, _BOOT_BLOCK):
            stop = min(start + _BOOT_BLOCK, n_boot)
            idx = rng.integers(0, g.size, size=(stop - start, g.size))
            boot[start:stop] += g[idx].mean(axis=1)
    boot /= len(groups)
    estimate = float(np.mean([g.mean() for g in groups]))
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return estimate, float(low), float(high)


def paired_bootstrap_diff(
    a, b, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0, strata=None
) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high) from a paired percentile bootstrap.

    ``a[i]`` and ``b[i]`` must be the same episode (task + seed) under the baseline and the
    candidate policy. Resampling episode indices (not the two arrays independently) keeps the
    pairing, so seed-to-seed difficulty cancels and the interval is narrower than an unpaired one.
    """
    a = _as_1d(a, "a")
    b = _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(
            f"a has {a.size} episodes but b has {b.size}; a paired comparison needs the same episodes under both policies"
        )
    return bootstrap_mean(b - a, strata=strata, n_boot=n_boot, confidence=confidence, seed=seed)


def decide(diff: float, low: float, high: float) -> str:
    """Promotion rule on a (candidate - baseline) difference and its confidence interval.

    - "promote": the whole interval lies above 0 (low > 0): the candidate is better.
    - "keep previous": the whole interval lies below 0 (high < 0): the candidate is worse.
    - "needs review": the interval touches or contains 0: the evaluation cannot tell them
      apart; a person decides (or more seeds are evaluated).
    The decision rests on the interval alone; ``diff`` is taken so call sites read naturally
    and NaNs anywhere are caught.
    """
    if any(math.isnan(v) for v in (diff, low, high)):
        raise ValueError(f"decide() got NaN in (diff={diff}, low={low}, high={high}); the evaluation is broken")
    if low > high:
        raise ValueError(f"interval low={low} > high={high}; pass (diff, low, high) in that order")
    if low > 0:
        return "promote"
    if high < 0:
        return "keep previous"
    return "needs review"
