"""Predictive analysis: line fits, time to threshold, the leaking-memory check, confidences."""

from __future__ import annotations

import math
import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcluster.health.predict import (
    MIN_SAMPLES,
    Prediction,
    PredictRule,
    combined_confidence,
    linear_fit,
    predict,
    time_to_threshold,
)


@pytest.mark.parametrize(
    ("ts", "vs", "slope", "intercept", "r2"),
    [
        ([0.0, 1.0], [1.0, 3.0], 2.0, 1.0, 1.0),
        ([0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], 0.0, 5.0, 0.0),
        ([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], 0.5, 1.0, 0.25),
        ([10.0, 20.0, 30.0, 40.0], [40.0, 30.0, 20.0, 10.0], -1.0, 50.0, 1.0),
        # Epoch-sized times: centring keeps every digit of the slope.
        ([1.7e9, 1.7e9 + 60.0, 1.7e9 + 120.0], [1.0, 2.0, 3.0], 1.0 / 60.0, None, 1.0),
    ],
)
def test_linear_fit_table(
    ts: list[float], vs: list[float], slope: float, intercept: float | None, r2: float
) -> None:
    s, i, r = linear_fit(ts, vs)
    assert s == pytest.approx(slope, rel=1e-12, abs=1e-15)
    if intercept is not None:
        assert i == pytest.approx(intercept)
    assert r == pytest.approx(r2)


@pytest.mark.parametrize(
    ("ts", "vs"),
    [([0.0], [1.0]), ([0.0, 1.0], [1.0]), ([3.0, 3.0], [1.0, 2.0]), ([0.0, 1.0], [math.nan, 1.0])],
)
def test_linear_fit_rejects_bad_input(ts: list[float], vs: list[float]) -> None:
    with pytest.raises(ValueError):
        linear_fit(ts, vs)


def _leak(
    seed: int, n: int, start: float, per_min: float, sigma: float
) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    return [(60.0 * i, start + per_min * i + rng.gauss(0.0, sigma)) for i in range(n)]


def test_leaking_memory_predicts_exhaustion_close_to_the_truth() -> None:
    # 60 one-minute samples of a leak of 0.5 point a minute from 40 %, with 0.8 points of noise.
    history = {"memory": _leak(1, 60, 40.0, 0.5, 0.8), "cpu": _leak(2, 60, 30.0, 0.0, 3.0)}
    preds = predict(history)
    assert [p.metric for p in preds] == ["memory"]
    p = preds[0]
    true_eta = (100.0 - (40.0 + 0.5 * 59)) / 0.5 * 60.0  # 61 minutes after the last sample
    assert p.kind == "resource_exhaustion"
    assert p.threshold == 100.0
    assert p.eta_seconds == pytest.approx(true_eta, rel=0.05)
    assert p.rate == pytest.approx(0.5 / 60.0, rel=0.05)
    assert p.confidence >= 0.85
    assert "memory" in p.detail


@pytest.mark.parametrize("sigma", [0.0, 0.5, 3.0])
def test_flat_series_predicts_nothing(sigma: float) -> None:
    history = {
        name: _leak(i, 120, level, 0.0, sigma)
        for i, (name, level) in enumerate([("memory", 60.0), ("disk", 80.0), ("error_rate", 0.1)])
    }
    assert predict(history) == []


def test_too_few_samples_predicts_nothing() -> None:
    ts = [float(i) for i in range(MIN_SAMPLES - 1)]
    assert time_to_threshold(ts, [float(i) for i in ts], 100.0) is None
    ts.append(float(MIN_SAMPLES - 1))
    assert time_to_threshold(ts, [float(i) for i in ts], 100.0) is not None


def test_time_to_threshold_exact_line_and_now() -> None:
    ts = [float(t) for t in range(10)]
    vs = [50.0 + t for t in ts]  # reaches 100 at t = 50
    p = time_to_threshold(ts, vs, 100.0, metric="disk")
    assert p is not None
    assert p.eta_seconds == pytest.approx(41.0)
    assert p.confidence == pytest.approx(10 / 15)  # r2 = 1 discounted for ten samples
    later = time_to_threshold(ts, vs, 100.0, now=30.0)
    assert later is not None and later.eta_seconds == pytest.approx(20.0)
    assert time_to_threshold(ts, vs, 100.0, horizon=40.0) is None


def test_time_to_threshold_past_the_limit_and_wrong_direction() -> None:
    ts = [float(t) for t in range(10)]
    over = time_to_threshold(ts, [95.0 + t for t in ts], 100.0)
    assert over is not None and over.eta_seconds == 0.0
    assert time_to_threshold(ts, [50.0 - t for t in ts], 100.0) is None  # falling from a ceiling
    # A floor (free space) approached by a falling series.
    floor = time_to_threshold(ts, [50.0 - t for t in ts], 10.0, rising=False)
    assert floor is not None and floor.eta_seconds == pytest.approx(31.0)
    assert time_to_threshold(ts, [50.0 + t for t in ts], 10.0, rising=False) is None


def test_predict_covers_failure_and_degradation() -> None:
    rng = random.Random(4)
    errors = [(10.0 * i, 0.01 + 0.004 * i + rng.gauss(0, 0.003)) for i in range(40)]
    latency = [(10.0 * i, 20.0 + 0.5 * i + rng.gauss(0, 0.5)) for i in range(40)]
    preds = {p.metric: p for p in predict({"response_time": latency, "error_rate": errors})}
    assert list(preds) == ["error_rate", "response_time"]  # sorted by metric
    assert preds["error_rate"].kind == "failure"
    assert preds["error_rate"].eta_seconds == pytest.approx((0.5 - 0.166) / 0.0004, rel=0.1)
    deg = preds["response_time"]
    assert deg.kind == "performance_degradation"
    # The limit is twice the median of the first ten samples (about 22.25 ms).
    assert deg.threshold == pytest.approx(2 * 22.25, rel=0.05)
    # At 39.5 ms and rising 0.05 ms/s, it reaches 44.5 ms in about 100 s.
    assert deg.eta_seconds == pytest.approx(100.0, rel=0.25)
    assert deg.confidence > 0.85  # r2 ~ 0.99 discounted by 40 / 45


def test_predict_custom_rules_and_unordered_samples() -> None:
    rule = PredictRule("free_disk", "resource_exhaustion", 5.0, rising=False, horizon=None)
    samples = [(60.0 * i, 50.0 - 0.5 * i) for i in range(20)]
    random.Random(3).shuffle(samples)
    (p,) = predict({"free_disk": samples, "memory": samples}, rules=[rule])
    assert p.metric == "free_disk"
    assert p.eta_seconds == pytest.approx((50.0 - 0.5 * 19 - 5.0) / 0.5 * 60.0)


def test_prediction_round_trips_through_msgpack() -> None:
    p = Prediction(
        kind="failure", metric="error_rate", eta_seconds=12.0, confidence=0.5, detail="x",
        threshold=0.5, rate=0.01,
    )  # fmt: skip
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=Prediction) == p


@pytest.mark.parametrize(
    ("cs", "expected"),
    [
        ([], 0.0),
        ([0.8], 0.8),
        ([0.6, 1.0], 0.8 - 0.04 / 2),
        ([0.0, 1.0], 0.5 - 0.25 / 2),
        ([1.0, 1.0, 1.0], 1.0),
        ([0.9, 0.9, 0.3], 0.7 - 0.08 / 2),
    ],
)
def test_combined_confidence_rule(cs: list[float], expected: float) -> None:
    assert combined_confidence(cs) == pytest.approx(expected)


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=20))
def test_combined_confidence_never_exceeds_the_mean(cs: list[float]) -> None:
    c = combined_confidence(cs)
    assert 0.0 <= c <= sum(cs) / len(cs) + 1e-12


def test_combined_confidence_clamps() -> None:
    assert combined_confidence([2.0, 2.0]) == 1.0
    assert combined_confidence([-1.0]) == 0.0
