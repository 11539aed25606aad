"""Anomaly detectors on hand-made and synthetic series; severity rule; routing; the labelled suite."""

from __future__ import annotations

import itertools
import math
import random

import msgspec
import pytest

from agentcluster.health.anomaly import (
    Anomaly,
    Detector,
    MetricMonitor,
    PercentileDetector,
    TrendDetector,
    ZScoreDetector,
    cpu_detector,
    latency_detector,
    memory_detector,
    network_detector,
    severity_of,
)
from agentcluster.health.synthetic import (
    SUITE_SEED,
    WARMUP,
    LabelledSeries,
    evaluate,
    make_suite,
)


def _flags(det: Detector, values: list[float]) -> dict[int, Anomaly]:
    out: dict[int, Anomaly] = {}
    for i, v in enumerate(values):
        a = det.observe(v, float(i))
        if a is not None:
            out[i] = a
    return out


def _noise(seed: int, n: int, level: float, sigma: float) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0.0, sigma) for _ in range(n)]


# ---------------------------------------------------------------- z-score


def test_zscore_hand_made_series_exact_flags() -> None:
    det = ZScoreDetector(10, 2.5, 4, metric="cpu", relearn_after=3, quiet=2)
    series = [10, 12, 10, 12, 11, 14, 11, 6, 11, 11, 20, 20, 20, 20, 21]
    flags = _flags(det, [float(v) for v in series])
    # 14: z = 3 over mean 11, sd 1; 6: z = -5.6 (both directions by default); 20 x3: a new level,
    # adopted after three flags; then the baseline is four 20s with no spread and no floor, so
    # 21 is infinitely many sigmas off.
    assert sorted(flags) == [5, 7, 10, 11, 12, 14]
    assert (flags[5].score, flags[5].expected, flags[5].severity) == (3.0, 11.0, "warning")
    assert flags[7].score == pytest.approx(-5 / math.sqrt(0.8))
    assert flags[7].severity == "critical"
    assert flags[14].score == math.inf and flags[14].severity == "critical"
    assert flags[5] == Anomaly(
        metric="cpu",
        kind="zscore",
        value=14.0,
        expected=11.0,
        score=3.0,
        severity="warning",
        at=5.0,
    )


def test_zscore_not_ready_before_min_samples() -> None:
    det = ZScoreDetector(20, 2.5, 10)
    for i in range(9):
        assert det.observe(1000.0 * (i % 2), float(i)) is None
        assert not det.ready
    det.observe(0.0, 9.0)
    assert det.ready


def test_zscore_step_is_flagged_for_relearn_after_samples_then_adopted() -> None:
    base = _noise(1, 40, 50.0, 1.0)
    step = [v + 20.0 for v in _noise(2, 60, 50.0, 1.0)]
    det = ZScoreDetector(20, 2.5, 10, min_std=2.0, direction="up")
    flags = _flags(det, base + step)
    # Flagged from the first stepped sample (delay 0), for one window, then the new normal.
    assert sorted(flags) == list(range(40, 60))
    assert det.mean == pytest.approx(70.0, abs=1.0)


def test_zscore_baseline_excludes_anomalies() -> None:
    det = ZScoreDetector(20, 2.5, 10)
    for i, v in enumerate(_noise(3, 30, 10.0, 1.0)):
        det.observe(v, float(i))
    mean, sd = det.mean, det.stdev
    for i in range(5):
        assert det.observe(30.0, 30.0 + i) is not None
    # Flagged samples never entered the window: the baseline is unchanged.
    assert (det.mean, det.stdev) == (mean, sd)


def test_zscore_spike_then_quiet_is_forgotten() -> None:
    det = ZScoreDetector(10, 2.5, 5, relearn_after=3, quiet=2)
    vals = [10.0, 11.0] * 5 + [30.0, 30.0, 10.5, 10.5, 30.0, 30.0, 10.5, 10.5, 30.0]
    flags = _flags(det, vals)
    # Never three flags without two quiet samples between: each spike is judged afresh.
    assert sorted(flags) == [10, 11, 14, 15, 18]


@pytest.mark.parametrize(
    ("direction", "flagged"),
    [("both", [10, 11]), ("up", [10]), ("down", [11])],
)
def test_zscore_direction(direction: str, flagged: list[int]) -> None:
    det = ZScoreDetector(10, 2.5, 5, direction=direction)  # type: ignore[arg-type]
    vals = [10.0, 11.0] * 5 + [20.0, 0.0]
    assert sorted(_flags(det, vals)) == flagged


@pytest.mark.parametrize(("value", "flagged"), [(52.0, False), (52.4, False), (52.6, True)])
def test_zscore_min_std_floor(value: float, flagged: bool) -> None:
    det = ZScoreDetector(10, 2.5, 5, min_std=1.0)
    for i in range(10):
        det.observe(50.0, float(i))  # no spread at all: the floor decides
    assert det.stdev == 1.0
    assert (det.observe(value, 10.0) is not None) is flagged


def test_zscore_drops_non_finite() -> None:
    det = ZScoreDetector(10, 2.5, 5)
    for i in range(10):
        det.observe(float(i % 2), float(i))
    assert det.observe(math.nan, 10.0) is None
    assert det.observe(math.inf, 11.0) is None
    assert det.dropped == 2
    assert det.mean == 0.5


def test_zscore_rejects_bad_parameters() -> None:
    for kwargs in ({"window": 0}, {"min_samples": 1}, {"min_samples": 30}, {"threshold": 0.0}):
        with pytest.raises(ValueError):
            ZScoreDetector(**kwargs)


def test_presets_follow_the_design() -> None:
    cpu, mem = cpu_detector(), memory_detector()
    assert (cpu.window, cpu.threshold, cpu.metric) == (20, 2.5, "cpu")
    assert (mem.window, mem.threshold, mem.metric) == (15, 2.0, "memory")
    net = network_detector("network_rx")
    assert (net.window, net.sensitivity, net.metric) == (30, 0.3, "network_rx")
    lat = latency_detector()
    assert (lat.factor, lat.q, lat.metric) == (2.0, 0.95, "response_time")


def test_cpu_preset_on_noisy_cpu_with_spike_and_step() -> None:
    vals = [min(100.0, max(0.0, v)) for v in _noise(4, 200, 30.0, 3.0)]
    vals[80] += 35.0
    for i in range(140, 200):
        vals[i] += 25.0
    flags = _flags(cpu_detector(), vals)
    assert 80 in flags and 140 in flags
    assert all(i == 80 or 140 <= i < 160 for i in flags)


# ---------------------------------------------------------------- trend


@pytest.mark.parametrize(
    ("window", "values", "score"),
    [
        # slope 1 per sample, 4 steps across the window, mean 12
        (5, [10.0, 11.0, 12.0, 13.0, 14.0], 4.0 / 12.0),
        (5, [14.0, 13.0, 12.0, 11.0, 10.0], -4.0 / 12.0),
        (5, [10.0, 10.0, 10.0, 10.0, 10.0], None),
        (5, [10.0, 10.5, 11.0, 11.5, 12.0], None),  # +18 %: below the 30 % sensitivity
        (3, [100.0, 150.0, 200.0], 100.0 / 150.0),
    ],
)
def test_trend_hand_made_windows(window: int, values: list[float], score: float | None) -> None:
    det = TrendDetector(window, 0.3, metric="network_rx")
    flags = _flags(det, values)
    if score is None:
        assert flags == {}
    else:
        assert list(flags) == [window - 1]
        a = flags[window - 1]
        assert a.score == pytest.approx(score)
        assert a.kind == "trend" and a.metric == "network_rx"
        assert a.severity == ("warning" if abs(score) >= 0.6 else "info")


def test_trend_not_ready_until_window_full() -> None:
    det = TrendDetector(30, 0.3)
    for i in range(29):
        assert det.observe(100.0 * (i + 1), float(i)) is None
    assert not det.ready
    assert det.observe(3000.0, 29.0) is not None
    assert det.ready


def test_trend_sustained_ramp_is_flagged_and_flat_noise_is_not() -> None:
    flat = [100.0 * (1.0 + 0.08 * g) for g in _noise(5, 200, 0.0, 1.0)]
    assert _flags(TrendDetector(), flat) == {}
    ramp = flat[:100] + [v * (1.0 + 0.02 * (i + 1)) for i, v in enumerate(flat[100:140])]
    flags = _flags(TrendDetector(), ramp)
    assert flags and min(flags) > 100 and all(a.score > 0.3 for a in flags.values())


def test_trend_burst_is_clipped_but_counts_without_clipping() -> None:
    vals = [100.0 * (1.0 + 0.05 * g) for g in _noise(6, 30, 0.0, 1.0)]
    vals[-2:] = [220.0, 230.0]  # an ordinary two-sample burst at the end of the window
    assert _flags(TrendDetector(30, 0.3), vals) == {}
    assert 29 in _flags(TrendDetector(30, 0.3, clip=1e9), vals)


def test_trend_min_level_guards_idle_links() -> None:
    vals = [0.0] * 25 + [0.001, 0.002, 0.003, 0.004, 0.005]
    assert 29 in _flags(TrendDetector(30, 0.3), vals)
    assert _flags(TrendDetector(30, 0.3, min_level=1.0), vals) == {}


# ---------------------------------------------------------------- percentile


def test_percentile_hand_made_series() -> None:
    det = PercentileDetector(2.0, 0.5, 5, metric="response_time")
    for i, v in enumerate([10.0, 20.0, 30.0, 40.0, 50.0]):
        assert det.observe(v, float(i)) is None
    assert det.ready and det.quantile == 30.0  # the median marker of five samples
    a = det.observe(61.0, 5.0)
    assert a is not None
    assert (a.kind, a.expected, a.severity) == ("percentile", 30.0, "warning")
    assert a.score == pytest.approx(61.0 / 30.0)
    assert det.quantile == 30.0  # the anomaly was not learned
    assert det.observe(60.0, 6.0) is None  # 2 x median exactly: not above
    crit = det.observe(4.0 * det.quantile, 7.0)
    assert crit is not None and crit.severity == "critical"


def test_percentile_outliers_do_not_raise_the_bar() -> None:
    rng = random.Random(8)
    det = latency_detector()
    for i in range(500):
        det.observe(rng.lognormvariate(math.log(20.0), 0.2), float(i))
    p95 = det.quantile
    assert p95 == pytest.approx(20.0 * math.exp(1.645 * 0.2), rel=0.08)
    outliers = [det.observe(200.0, 500.0 + i) for i in range(50)]
    assert all(a is not None for a in outliers)
    assert det.quantile == p95


def test_percentile_min_value_and_non_finite() -> None:
    det = PercentileDetector(2.0, 0.95, 5, min_value=1.0)
    for i in range(10):
        det.observe(0.1, float(i))
    assert det.observe(0.5, 10.0) is None  # 5x the p95, but below the absolute floor
    assert det.observe(math.nan, 11.0) is None and det.dropped == 1
    assert det.observe(2.0, 12.0) is not None
    with pytest.raises(ValueError):
        PercentileDetector(1.0)


# ---------------------------------------------------------------- severity and routing


def _a(metric: str, severity: str) -> Anomaly:
    return Anomaly(
        metric=metric, kind="zscore", value=1.0, expected=0.0, score=3.0,
        severity=severity, at=0.0,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("anomalies", "health"),
    [
        ([], "healthy"),
        ([("network_rx", "info"), ("network_tx", "info")], "healthy"),
        ([("cpu", "warning")], "degraded"),
        ([("cpu", "warning"), ("cpu", "warning"), ("cpu", "warning")], "degraded"),
        ([("cpu", "warning"), ("memory", "warning")], "degraded"),
        ([("cpu", "warning"), ("memory", "warning"), ("response_time", "warning")], "unhealthy"),
        ([("cpu", "info"), ("memory", "critical")], "unhealthy"),
    ],
)
def test_severity_of(anomalies: list[tuple[str, str]], health: str) -> None:
    assert severity_of([_a(m, s) for m, s in anomalies]) == health


def test_metric_monitor_routes_by_name() -> None:
    mon = MetricMonitor()
    kinds = {
        "cpu": ZScoreDetector,
        "memory": ZScoreDetector,
        "network_rx": TrendDetector,
        "network_tx": TrendDetector,
        "response_time": PercentileDetector,
        "response_time_p99": PercentileDetector,
    }
    for name, cls in kinds.items():
        assert isinstance(mon.detector(name), cls)
    assert mon.detector("network_rx") is mon.detector("network_rx")
    assert mon.detector("network_rx") is not mon.detector("network_tx")
    assert mon.detector("disk") is None
    assert mon.observe("disk", 1.0, 0.0) is None and mon.unrouted == 1
    assert sorted(mon.detectors) == sorted(kinds)


def test_metric_monitor_sample_returns_anomalies_in_order() -> None:
    mon = MetricMonitor()
    rng = random.Random(9)
    for i in range(40):
        sample = {"cpu": 30.0 + rng.gauss(0, 2), "memory": 50.0 + rng.gauss(0, 0.3)}
        assert mon.observe_sample(sample, float(i)) == []
    out = mon.observe_sample({"memory": 70.0, "cpu": 90.0, "gpu": 1.0}, 40.0)
    assert [(a.metric, a.severity) for a in out] == [("memory", "critical"), ("cpu", "critical")]
    assert severity_of(out) == "unhealthy"


def test_anomaly_round_trips_through_msgpack() -> None:
    a = _a("cpu", "warning")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(a), type=Anomaly) == a


# ---------------------------------------------------------------- the labelled suite


def test_suite_is_deterministic_and_well_formed() -> None:
    suite = make_suite()
    assert suite == make_suite(SUITE_SEED)
    assert suite != make_suite(SUITE_SEED + 1)
    metrics = {s.metric for s in suite}
    assert metrics == {"cpu", "memory", "network_rx", "network_tx", "response_time"}
    for s in suite:
        labels = s.labels()
        assert len(labels) == len(s.values)
        assert all(math.isfinite(v) for v in s.values)
        assert sum(labels) == sum(w.end - w.start for w in s.windows)
        spans = sorted((w.start, w.end) for w in s.windows)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
        assert all(w.start >= WARMUP for w in s.windows)
        assert ("clean" in s.name) == (not s.windows)
    kinds = {w.kind for s in suite for w in s.windows}
    assert kinds == {"spike", "step", "drift", "latency_outlier"}


def test_suite_noise_is_realistic() -> None:
    # Clean CPU series move by points between samples, not by hundredths.
    for s in make_suite():
        if s.metric == "cpu" and not s.windows:
            diffs = [abs(b - a) for a, b in itertools.pairwise(s.values)]
            assert 1.0 < sum(diffs) / len(diffs) < 5.0


class _Always:
    def observe(self, metric: str, value: float, t: float) -> Anomaly | None:
        return _a(metric, "warning")


class _Never:
    def observe(self, metric: str, value: float, t: float) -> Anomaly | None:
        return None


def test_scoring_punishes_trivial_detectors() -> None:
    suite = make_suite(clean_per_metric=2, anomalous_per_metric=2)
    always = evaluate(_Always, suite)
    never = evaluate(_Never, suite)
    assert always["recall"] == 1.0 and always["flag_precision"] < 0.2
    assert never["recall"] == 0.0 and math.isnan(never["anomaly_detection_delay_samples"])


def test_scoring_counts_windows_and_false_alarms() -> None:
    series = LabelledSeries("x", "cpu", [0.0] * 10, [])
    flags_at = {2, 3, 7}

    class Script:
        def __init__(self) -> None:
            self.i = -1

        def observe(self, metric: str, value: float, t: float) -> Anomaly | None:
            self.i += 1
            return _a(metric, "warning") if self.i in flags_at else None

    r = evaluate(Script, [series])
    # Flags at 2 and 3 are one false alarm, 7 another.
    assert (r["false_alarms"], r["false_positive_flags"], r["precision"]) == (2.0, 3.0, 0.0)


def test_default_detectors_meet_targets_on_the_suite() -> None:
    r = evaluate()
    assert r["precision"] >= 0.95
    assert r["recall"] >= 0.90
    assert r["anomaly_detection_delay_samples"] <= 1.0
    assert r["anomaly_detection_delay_samples_p95"] <= 3.0
    assert r["trend_detection_delay_samples"] <= 25.0
    assert r["injected"] >= 150 and r["samples"] >= 30_000
    for kind in ("spike", "step", "drift", "latency_outlier"):
        assert r[f"recall_{kind}"] >= 0.85
