import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from dpo_driver.stats import bootstrap_mean, decide, paired_bootstrap_diff, wilson_interval


def wilson_by_root_finding(k, n, confidence):
    """Independent reference: the Wilson bounds are the p where the score test is exactly at z."""
    z = norm.ppf(0.5 + confidence / 2)
    p_hat = k / n
    score = lambda p: (p_hat - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731
    # Brackets stop short of p_hat at 0/n and n/n, where p_hat itself is a trivial root.
    low = 0.0 if k == 0 else brentq(score, 1e-12, min(p_hat, 1 - 1e-9), xtol=1e-14)
    high = 1.0 if k == n else brentq(score, max(p_hat, 1e-9), 1 - 1e-12, xtol=1e-14)
    return low, high


@pytest.mark.parametrize(
    "k,n,expected",
    [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0))],  # textbook values at 95%
)
def test_wilson_textbook_values(k, n, expected):
    assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (37, 50), (1, 3), (199, 200)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_score_test_inversion(k, n, confidence):
    assert wilson_interval(k, n, confidence) == pytest.approx(wilson_by_root_finding(k, n, confidence), abs=1e-9)


def test_wilson_is_symmetric_and_widens_with_confidence():
    low, high = wilson_interval(37, 50)
    assert wilson_interval(13, 50) == pytest.approx((1 - high, 1 - low))
    narrow, wide = wilson_interval(37, 50, 0.9), wilson_interval(37, 50, 0.99)
    assert wide[0] < narrow[0] < 37 / 50 < narrow[1] < wide[1]


@pytest.mark.parametrize("k,n,confidence", [(0, 0, 0.95), (3, 2, 0.95), (-1, 5, 0.95), (1, 5, 1.0), (1, 5, 0.0)])
def test_wilson_rejects_bad_input(k, n, confidence):
    with pytest.raises(ValueError):
        wilson_interval(k, n, confidence)


def test_bootstrap_identical_policies_give_zero():
    a = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    assert paired_bootstrap_diff(a, a.copy()) == (0.0, 0.0, 0.0)


def test_bootstrap_candidate_better_everywhere_is_above_zero():
    assert paired_bootstrap_diff(np.zeros(20), np.ones(20), n_boot=500) == (1.0, 1.0, 1.0)


def test_bootstrap_mostly_better_interval_excludes_zero():
    a = np.zeros(40)
    b = np.r_[np.ones(30), np.zeros(10)]
    diff, low, high = paired_bootstrap_diff(a, b, n_boot=2000)
    assert diff == pytest.approx(0.75)
    assert 0 < low < diff < high <= 1


def test_bootstrap_width_matches_normal_theory_on_large_sample():
    rng = np.random.default_rng(7)
    a = (rng.random(2000) < 0.5).astype(float)
    b = (rng.random(2000) < 0.6).astype(float)
    diff, low, high = paired_bootstrap_diff(a, b, n_boot=4000, seed=1)
    se = np.std(b - a, ddof=1) / math.sqrt(a.size)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert low < diff < high


def test_bootstrap_is_deterministic_given_seed():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    first = paired_bootstrap_diff(a, b, n_boot=1000, seed=5)
    assert paired_bootstrap_diff(a, b, n_boot=1000, seed=5) == first
    assert paired_bootstrap_diff(a, b, n_boot=1000, seed=6) != first


def test_stratified_estimate_is_mean_of_task_means():
    # Task "x" has 2 episodes, task "y" has 6: pooled and per-task means differ.
    a = np.array([0, 0, 0, 0, 0, 0, 0, 0])
    b = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    tasks = np.array(["x", "x", "y", "y", "y", "y", "y", "y"])
    diff, low, high = paired_bootstrap_diff(a, b, strata=tasks, n_boot=2000)
    assert diff == pytest.approx((1.0 + 1 / 6) / 2)
    assert diff != pytest.approx(b.mean() - a.mean())
    assert low <= diff <= high


def test_stratified_resamples_within_tasks():
    # Within each task the difference is constant, so a within-task bootstrap has no spread;
    # an unstratified one mixes tasks and does.
    a = np.zeros(20)
    b = np.r_[np.ones(10), np.zeros(10)]
    tasks = np.repeat(["x", "y"], 10)
    assert paired_bootstrap_diff(a, b, strata=tasks, n_boot=500) == (0.5, 0.5, 0.5)
    _, low, high = paired_bootstrap_diff(a, b, n_boot=500)
    assert low < 0.5 < high


def test_bootstrap_mean_of_single_stratum_equals_unstratified():
    x = np.random.default_rng(0).random(30)
    assert bootstrap_mean(x, strata=["t"] * 30, n_boot=300) == bootstrap_mean(x, n_boot=300)


@pytest.mark.parametrize(
    "a,b,kwargs",
    [
        ([1, 0, 1], [1, 0], {}),
        ([], [], {}),
        ([1, float("nan")], [1, 0], {}),
        ([1, 0], [1, 1], {"strata": ["x"]}),
        ([1, 0], [1, 1], {"n_boot": 0}),
        ([1, 0], [1, 1], {"confidence": 1.5}),
    ],
)
def test_bootstrap_rejects_bad_input(a, b, kwargs):
    with pytest.raises(ValueError):
        paired_bootstrap_diff(a, b, **kwargs)


@pytest.mark.parametrize(
    "interval,expected",
    [
        ((0.12, 0.06, 0.18), "promote"),
        ((-0.12, -0.18, -0.06), "keep previous"),
        ((0.02, -0.03, 0.07), "needs review"),
        ((0.05, 0.0, 0.10), "needs review"),  # touching zero is not evidence
        ((0.0, 0.0, 0.0), "needs review"),
    ],
)
def test_decide(interval, expected):
    assert decide(*interval) == expected


@pytest.mark.parametrize("interval", [(float("nan"), 0.0, 1.0), (0.1, 0.2, 0.0)])
def test_decide_rejects_broken_intervals(interval):
    with pytest.raises(ValueError):
        decide(*interval)
