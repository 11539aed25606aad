"""Incremental statistics: Welford (unbounded and windowed), RollingWindow, Ewma, P² quantiles."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.health.stats import Ewma, P2Quantile, RollingWindow, Welford, exact_quantile

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def _close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-9 * max(1.0, scale))


def _exact(xs: list[float]) -> tuple[float, float]:
    mean = math.fsum(xs) / len(xs)
    var = math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, var


# ---------------------------------------------------------------- Welford


@given(st.lists(finite, min_size=1, max_size=200))
def test_welford_matches_exact_two_pass(xs: list[float]) -> None:
    w = Welford()
    for i, x in enumerate(xs, 1):
        w.add(x)
        mean, var = _exact(xs[:i])
        scale = max(abs(v) for v in xs[:i]) ** 2
        assert w.count == i
        assert _close(w.mean, mean, scale)
        assert _close(w.variance, var, scale)
    assert w.values() == []  # unbounded: nothing stored


@given(st.lists(finite, min_size=1, max_size=200), st.integers(min_value=1, max_value=25))
def test_windowed_welford_matches_exact_over_last_n(xs: list[float], n: int) -> None:
    w = Welford(window=n)
    for i in range(1, len(xs) + 1):
        w.add(xs[i - 1])
        tail = xs[max(0, i - n) : i]
        mean, var = _exact(tail)
        # Removing a sample leaves rounding error on the scale of that sample until the next
        # recomputation (at most one window later): judge by the last two windows' magnitude.
        scale = max(abs(v) for v in xs[max(0, i - 2 * n) : i]) ** 2
        assert w.count == len(tail)
        assert w.values() == tail
        assert math.isclose(w.mean, mean, rel_tol=1e-7, abs_tol=1e-9 * math.sqrt(max(1.0, scale)))
        assert math.isclose(w.variance, var, rel_tol=1e-6, abs_tol=1e-9 * max(1.0, scale))


def test_windowed_welford_does_not_drift_over_a_long_stream() -> None:
    rng = random.Random(1)
    xs = [1e9 + rng.gauss(0.0, 1.0) for _ in range(20_000)]
    w = Welford(window=50)
    for x in xs:
        w.add(x)
    mean, var = _exact(xs[-50:])
    assert w.mean == pytest.approx(mean, rel=1e-12)
    assert w.variance == pytest.approx(var, rel=1e-6)


@pytest.mark.parametrize(
    ("xs", "mean", "var", "pop_var"),
    [
        ([], 0.0, 0.0, 0.0),
        ([5.0], 5.0, 0.0, 0.0),
        ([1.0, 3.0], 2.0, 2.0, 1.0),
        ([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0], 5.0, 32.0 / 7.0, 4.0),
    ],
)
def test_welford_table(xs: list[float], mean: float, var: float, pop_var: float) -> None:
    w = Welford()
    for x in xs:
        w.add(x)
    assert (w.mean, w.population_variance) == pytest.approx((mean, pop_var))
    assert w.variance == pytest.approx(var)
    assert w.stdev == pytest.approx(math.sqrt(var))


def test_welford_window_of_one_and_clear() -> None:
    w = Welford(window=1)
    for x in (3.0, 8.0, -2.0):
        w.add(x)
        assert (w.count, w.mean, w.variance) == (1, x, 0.0)
    w.clear()
    assert (w.count, w.mean, w.values()) == (0, 0.0, [])
    w.add(4.0)
    assert w.values() == [4.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_samples_are_rejected(bad: float) -> None:
    for stat in (Welford(), Welford(window=3), RollingWindow(3), Ewma(0.5), P2Quantile(0.5)):
        with pytest.raises(ValueError, match="finite"):
            stat.add(bad)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        Welford(window=0)
    with pytest.raises(ValueError):
        RollingWindow(0)
    with pytest.raises(ValueError):
        Ewma()
    with pytest.raises(ValueError):
        Ewma(0.5, halflife=3.0)
    with pytest.raises(ValueError):
        Ewma(0.0)
    with pytest.raises(ValueError):
        Ewma(halflife=-1.0)
    for q in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            P2Quantile(q)


# ---------------------------------------------------------------- RollingWindow


@given(st.lists(finite, min_size=1, max_size=150), st.integers(min_value=1, max_value=20))
@settings(max_examples=150)
def test_rolling_window_matches_exact(xs: list[float], n: int) -> None:
    r = RollingWindow(n)
    for i in range(1, len(xs) + 1):
        evicted = r.add(xs[i - 1])
        assert evicted == (xs[i - 1 - n] if i > n else None)
        tail = xs[max(0, i - n) : i]
        assert list(r) == tail
        assert r.last == tail[-1]
        assert len(r) == len(tail)
        assert r.full == (i >= n)
        mean, var = _exact(tail)
        scale = max(abs(v) for v in xs[max(0, i - 2 * n) : i]) ** 2
        assert math.isclose(r.mean, mean, rel_tol=1e-7, abs_tol=1e-9 * math.sqrt(max(1.0, scale)))
        assert math.isclose(r.variance, var, rel_tol=1e-6, abs_tol=1e-9 * max(1.0, scale))


def test_rolling_window_large_offset_keeps_precision() -> None:
    rng = random.Random(3)
    r = RollingWindow(20)
    xs = [5e8 + rng.gauss(0.0, 0.01) for _ in range(5_000)]
    r.extend(xs)
    mean, var = _exact(xs[-20:])
    assert r.mean == pytest.approx(mean, rel=1e-13)
    assert r.variance == pytest.approx(var, rel=1e-5)


def test_rolling_window_empty_and_clear() -> None:
    r = RollingWindow(4)
    assert (len(r), r.mean, r.variance, list(r)) == (0, 0.0, 0.0, [])
    with pytest.raises(IndexError):
        _ = r.last
    r.extend([1.0, 2.0, 3.0, 4.0, 5.0])
    assert list(r) == [2.0, 3.0, 4.0, 5.0]
    r.clear()
    assert (len(r), r.mean) == (0, 0.0)
    r.add(9.0)
    assert (list(r), r.mean, r.variance) == ([9.0], 9.0, 0.0)


# ---------------------------------------------------------------- Ewma


def test_ewma_hand_computed() -> None:
    e = Ewma(0.5)
    e.add(10.0)
    assert (e.value, e.variance, e.count) == (10.0, 0.0, 1)
    e.add(20.0)  # diff 10, mean 15, var = 0.5 * (0 + 10 * 5) = 25
    assert (e.value, e.variance) == (15.0, 25.0)
    e.add(15.0)  # diff 0: mean stays, var halves
    assert (e.value, e.variance, e.stdev) == (15.0, 12.5, math.sqrt(12.5))


def test_ewma_halflife_means_half_weight_after_halflife_samples() -> None:
    e = Ewma(halflife=10.0)
    assert (1.0 - e.alpha) ** 10 == pytest.approx(0.5)
    e.add(0.0)
    for _ in range(10):
        e.add(1.0)
    assert e.value == pytest.approx(0.5)


def test_ewma_converges_to_a_new_level_and_its_variance() -> None:
    rng = random.Random(5)
    e = Ewma(0.05)
    seen: list[float] = []
    for i in range(5000):
        e.add(rng.gauss(100.0, 2.0))
        if i >= 1000:
            seen.append(e.variance)
    assert e.value == pytest.approx(100.0, abs=1.0)
    # Any one reading is noisy (~40 effective samples); on average it is the true variance.
    assert statistics.fmean(seen) == pytest.approx(4.0, rel=0.1)
    for _ in range(200):
        e.add(50.0)
    assert e.value == pytest.approx(50.0, abs=0.01)


# ---------------------------------------------------------------- P²


@pytest.mark.parametrize(
    ("xs", "q", "expected"),
    [
        ([7.0], 0.5, 7.0),
        ([1.0, 2.0], 0.5, 1.5),
        ([3.0, 1.0, 2.0], 0.5, 2.0),
        ([4.0, 1.0, 3.0, 2.0], 0.95, 3.85),
        ([4.0, 1.0, 3.0, 2.0], 0.25, 1.75),
    ],
)
def test_p2_is_exact_below_five_samples(xs: list[float], q: float, expected: float) -> None:
    p = P2Quantile(q)
    for x in xs:
        p.add(x)
    assert p.value == pytest.approx(expected)
    assert p.value == pytest.approx(exact_quantile(xs, q))


def test_p2_with_five_samples_is_their_median_marker() -> None:
    p = P2Quantile(0.5)
    for x in (5.0, 1.0, 4.0, 2.0, 3.0):
        p.add(x)
    assert p.value == 3.0
    with pytest.raises(ValueError):
        _ = P2Quantile(0.5).value


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
@pytest.mark.parametrize(
    "dist",
    [
        lambda r: r.uniform(0.0, 100.0),
        lambda r: r.gauss(50.0, 10.0),
        lambda r: r.lognormvariate(3.0, 0.5),
        lambda r: r.expovariate(0.1),
    ],
    ids=["uniform", "normal", "lognormal", "exponential"],
)
def test_p2_close_to_exact_quantile_on_large_streams(q: float, dist: object) -> None:
    rng = random.Random(11)
    draw = dist  # a callable drawing from rng
    assert callable(draw)
    xs = [float(draw(rng)) for _ in range(20_000)]
    p = P2Quantile(q)
    for x in xs:
        p.add(x)
    # Judge by rank: the estimate sits within one percentile of the target rank.
    rank = sum(1 for x in xs if x <= p.value) / len(xs)
    assert abs(rank - q) < 0.01
    assert p.count == len(xs)


@given(st.lists(finite, min_size=1, max_size=300), st.sampled_from([0.1, 0.5, 0.95]))
@settings(max_examples=200)
def test_p2_estimate_stays_within_the_sample_range(xs: list[float], q: float) -> None:
    p = P2Quantile(q)
    for x in xs:
        p.add(x)
        assert min(xs) <= p.value <= max(xs)


def test_p2_close_on_a_shuffled_ramp() -> None:
    xs = [float(i) for i in range(1, 1001)]
    random.Random(2).shuffle(xs)
    p = P2Quantile(0.95)
    for x in xs:
        p.add(x)
    assert p.value == pytest.approx(statistics.quantiles(xs, n=20)[-1], rel=0.02)


def test_exact_quantile_table_and_errors() -> None:
    assert exact_quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert exact_quantile([10.0, 0.0], 0.0) == 0.0
    assert exact_quantile([10.0, 0.0], 1.0) == 10.0
    assert exact_quantile([0.0, 10.0], 0.3) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        exact_quantile([], 0.5)
    with pytest.raises(ValueError):
        exact_quantile([1.0], 1.5)
