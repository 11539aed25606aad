"""Adaptive concurrency, surge detection and adaptive thresholds."""

from __future__ import annotations

import heapq
import math
import random
from collections import deque

import pytest

from agentcluster.balancing.limits import (
    DEFAULT_THRESHOLDS,
    AdaptiveConcurrency,
    AdaptiveThresholds,
    ConcurrencyConfig,
    SurgeConfig,
    SurgeDetector,
    Ticket,
)

# -- adaptive concurrency ----------------------------------------------------------------------


def _serve(
    workers: int, service: float, load: float, duration: float, seed: int
) -> tuple[AdaptiveConcurrency, list[float], float, list[float]]:
    """A server with ``workers`` parallel slots and a FIFO queue, Poisson arrivals at ``load``
    times its capacity, service times uniform in [0.5, 1.5] x ``service``; every arrival asks
    the limiter first. Returns the limiter, its estimate once a second, the shed fraction and
    the latencies of admitted requests in the second half."""
    rng = random.Random(seed)
    limiter = AdaptiveConcurrency(rng=random.Random(seed + 1))
    rate = load * workers / service
    queue: deque[tuple[float, Ticket]] = deque()
    done: list[tuple[float, float, int, Ticket]] = []  # (finish, arrival, seq, ticket)
    busy = seq = arrivals = shed = 0
    now = 0.0
    next_arrival = rng.expovariate(rate)
    next_report = 1.0
    estimates: list[float] = []
    latencies: list[float] = []

    def start(arrival: float, ticket: Ticket) -> None:
        nonlocal busy, seq
        busy += 1
        seq += 1
        finish = now + service * rng.uniform(0.5, 1.5)
        heapq.heappush(done, (finish, arrival, seq, ticket))

    while now < duration:
        if done and done[0][0] <= next_arrival:
            now, arrival, _, ticket = heapq.heappop(done)
            limiter.release(ticket, now - arrival, True, now)
            if now > duration / 2:
                latencies.append(now - arrival)
            busy -= 1
            if queue:
                start(*queue.popleft())
        else:
            now = next_arrival
            next_arrival = now + rng.expovariate(rate)
            arrivals += 1
            admitted = limiter.acquire(now)
            if admitted is None:
                shed += 1
            elif busy < workers:
                start(now, admitted)
            else:
                queue.append((now, admitted))
        while now >= next_report:
            estimates.append(limiter.estimate)
            next_report += 1.0
    return limiter, estimates, shed / arrivals, latencies


@pytest.mark.parametrize(("workers", "service"), [(20, 0.02), (40, 0.05)])
def test_gradient_converges_near_true_concurrency_and_sheds_beyond(
    workers: int, service: float
) -> None:
    # Fixed point with a saturated server: limit = tolerance * C + queue_size = 1.2 C + 4.
    # The limit climbs additively (queue_size * smoothing per window) from 20, so C = 40 takes
    # about 40 windows to get there.
    limiter, estimates, shed, latencies = _serve(workers, service, 2.0, 80.0, seed=workers)
    late = estimates[60:]
    mean_limit = sum(late) / len(late)
    assert workers <= min(late) and max(late) <= 1.2 * workers + 4 + 0.15 * workers, late
    assert mean_limit == pytest.approx(1.2 * workers + 4, rel=0.15)
    # Offered twice the capacity: about half is shed (the probes shed a little more).
    assert 0.45 <= shed <= 0.6
    latencies.sort()
    p99 = latencies[int(0.99 * len(latencies))]
    # Admitted work waits at most for the tolerated queue: no unbounded queueing delay.
    assert p99 <= 3.0 * service
    assert limiter.probes >= 1 and limiter.long_rtt == pytest.approx(service, rel=0.15)


def test_under_capacity_nothing_is_shed_after_the_first_probe() -> None:
    _, _, shed, latencies = _serve(20, 0.01, 0.5, 30.0, seed=7)
    assert shed < 0.005  # only around the start-up probe, when concurrency is pinned
    latencies.sort()
    assert latencies[int(0.99 * len(latencies))] <= 0.0151  # never queued: <= 1.5 x service


def test_probe_pins_the_limit_and_ignores_stale_samples() -> None:
    cfg = ConcurrencyConfig(
        probe_limit=2, probe_samples=3, window=0.1, window_samples=2, probe_interval=0.5
    )
    lim = AdaptiveConcurrency(cfg)
    # Rule: a probe pins concurrency to probe_limit.
    assert lim.probing and lim.limit == 2
    a, b = lim.acquire(0.0), lim.acquire(0.0)
    assert a is not None and b is not None and lim.acquire(0.0) is None
    assert lim.shed == 1
    lim.release(a, 0.01, True, 0.01)
    lim.release(b, 0.01, True, 0.01)
    c = lim.acquire(0.02)
    assert c is not None
    lim.release(c, 0.01, True, 0.03)
    assert not lim.probing and lim.long_rtt == pytest.approx(0.01) and lim.probes == 1
    assert lim.limit == int(cfg.initial_limit)
    # Rule: the next probe starts at the first window closing after probe_interval.
    old, e, f = lim.acquire(0.5), lim.acquire(0.5), lim.acquire(0.5)
    assert old is not None and e is not None and f is not None
    lim.release(e, 0.01, True, 0.6)
    lim.release(f, 0.01, True, 0.6)
    assert lim.probing
    # Rule: while a request from before the probe is in flight, new ones are not clean, and
    # neither they nor the old one count towards the baseline.
    g = lim.acquire(0.6)
    assert g is not None and not g.clean
    lim.release(old, 5.0, True, 0.7)
    lim.release(g, 5.0, True, 0.7)
    for _ in range(3):
        h = lim.acquire(0.7)
        assert h is not None and h.clean
        lim.release(h, 0.02, True, 0.72)
    assert not lim.probing and lim.long_rtt == pytest.approx(0.02) and lim.probes == 2
    with pytest.raises(ValueError):
        lim.release(h, 0.01, True, 0.8)  # released twice


def test_app_limited_windows_do_not_grow_the_limit() -> None:
    cfg = ConcurrencyConfig(probe_samples=1, window=0.1, window_samples=5)
    lim = AdaptiveConcurrency(cfg)
    t = 0.0
    first = lim.acquire(t)
    assert first is not None
    lim.release(first, 0.01, True, t)
    for _ in range(200):  # one request at a time: far below limit / 2
        t += 0.02
        ticket = lim.acquire(t)
        assert ticket is not None
        lim.release(ticket, 0.01, True, t + 0.01)
    assert lim.estimate == cfg.initial_limit


def test_failures_do_not_feed_the_rtt() -> None:
    cfg = ConcurrencyConfig(probe_samples=2)
    lim = AdaptiveConcurrency(cfg)
    for _ in range(10):  # fast failures during the probe: no baseline from them
        ticket = lim.acquire(0.0)
        assert ticket is not None
        lim.release(ticket, 0.0001, False, 0.0)
    assert lim.probing and lim.long_rtt == 0.0


def _after_probe(cfg: ConcurrencyConfig) -> AdaptiveConcurrency:
    """A limiter whose start-up probe measured a 10 ms baseline, one request at a time."""
    lim = AdaptiveConcurrency(cfg)
    for _ in range(cfg.probe_samples):
        ticket = lim.acquire(0.0)
        assert ticket is not None
        lim.release(ticket, 0.01, True, 0.01)
    assert not lim.probing and lim.long_rtt == pytest.approx(0.01)
    return lim


def _offer(
    lim: AdaptiveConcurrency,
    outcomes: list[tuple[float, bool]],
    seconds: float,
    demand: int = 200,
    start: float = 0.01,
) -> None:
    """Callers keep ``demand`` calls open; the n-th admitted call finishes after
    ``outcomes[n % len(outcomes)]`` = (latency, ok). A tick every 5 ms."""
    pending: list[tuple[float, int, float, bool, Ticket]] = []
    admitted = 0
    for step in range(int(seconds / 0.005)):
        now = start + step * 0.005
        while pending and pending[0][0] <= now:
            finish, _, latency, ok, done = heapq.heappop(pending)
            lim.release(done, latency, ok, finish)
        while len(pending) < demand:
            ticket = lim.acquire(now)
            if ticket is None:
                break
            latency, ok = outcomes[admitted % len(outcomes)]
            heapq.heappush(pending, (now + latency, admitted, latency, ok, ticket))
            admitted += 1


@pytest.mark.parametrize(
    ("rule", "outcomes", "shrinks"),
    [
        ("every call timing out is congestion: the limit shrinks", [(5.0, False)], True),
        ("fast failures are the agent's answer", [(0.01, True)] * 3 + [(0.0005, False)], False),
        ("a minority of timeouts among fast replies", [(0.01, True)] * 9 + [(5.0, False)], False),
    ],
)
def test_failures_that_took_far_longer_than_the_baseline_are_drops(
    rule: str, outcomes: list[tuple[float, bool]], shrinks: bool
) -> None:
    lim = _after_probe(ConcurrencyConfig())
    before = lim.estimate
    _offer(lim, outcomes, 20.0)
    assert (lim.estimate < before) == shrinks, (rule, before, lim.estimate)


def test_sustained_timeouts_shrink_the_limit_down_to_min_limit_but_not_below() -> None:
    cfg = ConcurrencyConfig(probe_interval=3600.0)  # no probe pins the limit meanwhile
    lim = _after_probe(cfg)
    _offer(lim, [(5.0, False)], 300.0)
    assert lim.estimate == cfg.min_limit and lim.limit == int(cfg.min_limit)


# -- surge detection ---------------------------------------------------------------------------


def _drive(det: SurgeDetector, rates: list[float], start: float = 0.0) -> list[tuple[str, float]]:
    """Feed one second per entry at the given request rate; the (kind, time) events."""
    events: list[tuple[str, float]] = []
    for second, rate in enumerate(rates):
        n = int(rate)
        for i in range(n):
            det.record(start + second + i / max(n, 1))
        events.extend((e.kind, e.at) for e in det.tick(start + second + 1.0))
    return events


def test_surge_start_and_end_with_hysteresis() -> None:
    det = SurgeDetector(SurgeConfig())
    rates = [100.0] * 60 + [300.0] * 20 + [100.0] * 30
    events = _drive(det, rates)
    assert [k for k, _ in events] == ["start", "end"]
    start, end = events[0][1], events[1][1]
    # Detected within the short window (5 buckets) of the surge at t = 60.
    assert 60.0 < start <= 65.0
    # Ends only after the short rate is back under 1.5x for end_hold (5) buckets.
    assert 80.0 + 5.0 <= end <= 80.0 + 5.0 + 5.0
    assert det.baseline == pytest.approx(100.0, rel=0.05)  # frozen during the surge


def test_rate_hovering_between_the_thresholds_does_not_flap() -> None:
    # Rule: start above 2x, end only below 1.5x: 1.8x after a surge keeps it on, and 1.8x
    # from calm never starts one.
    det = SurgeDetector()
    events = _drive(det, [100.0] * 60 + [250.0] * 10 + [180.0] * 60)
    assert [k for k, _ in events] == ["start"] and det.active
    calm = SurgeDetector()
    assert _drive(calm, [100.0] * 60 + [180.0] * 60) == [] and not calm.active


@pytest.mark.parametrize(
    ("rule", "rates", "surges"),
    [
        ("no surge during warm-up", [5.0] * 5 + [500.0] * 20, 0),
        ("below min_rate a tripling is no surge", [2.0] * 60 + [8.0] * 20, 0),
        ("a single bursty second is smoothed away", [100.0] * 60 + [600.0] + [100.0] * 20, 0),
        ("a doubling plus sustained is a surge", [100.0] * 60 + [260.0] * 10, 1),
    ],
)
def test_surge_guards(rule: str, rates: list[float], surges: int) -> None:
    events = _drive(SurgeDetector(), rates)
    assert sum(k == "start" for k, _ in events) == surges, rule


def test_silence_ends_a_surge_and_decays_the_baseline_in_closed_form() -> None:
    det = SurgeDetector()
    _drive(det, [100.0] * 60 + [400.0] * 10)
    assert det.active
    baseline = det.baseline
    events = det.tick(70.0 + 3600.0)  # an hour of silence, one call
    assert [e.kind for e in events] == ["end"]
    assert not det.active and det.baseline < baseline * 0.001
    assert det.short_rate == 0.0


def test_a_lasting_step_in_traffic_ends_its_surge_and_becomes_the_baseline() -> None:
    # Rule: a surge lasts at most max_duration; then its level is the new normal, and a later
    # surge above that level is detected again.
    cfg = SurgeConfig()
    det = SurgeDetector(cfg)
    events = _drive(det, [20.0] * 120 + [60.0] * 3600)
    assert [k for k, _ in events] == ["start", "end"]
    assert events[1][1] - events[0][1] == pytest.approx(cfg.max_duration, abs=cfg.bucket)
    assert not det.active and det.baseline == pytest.approx(60.0, rel=0.01)
    later = _drive(det, [60.0] * 60 + [150.0] * 20 + [60.0] * 30, start=3720.0)
    assert [k for k, _ in later] == ["start", "end"]


@pytest.mark.parametrize(
    ("rule", "rates"),
    [
        ("from a silent baseline, silence ends a surge", [0.0] * 40 + [5.0] * 10 + [0.0] * 20),
        ("from a busy baseline, silence ends a surge", [10.0] * 40 + [50.0] * 10 + [0.0] * 20),
    ],
)
def test_with_min_rate_zero_silence_ends_a_surge(rule: str, rates: list[float]) -> None:
    det = SurgeDetector(SurgeConfig(min_rate=0.0))
    events = _drive(det, rates)
    assert [k for k, _ in events] == ["start", "end"] and not det.active, rule


def test_with_min_rate_zero_a_long_silence_ends_a_surge_in_one_tick() -> None:
    det = SurgeDetector(SurgeConfig(min_rate=0.0))
    _drive(det, [0.0] * 40 + [5.0] * 10)
    assert det.active
    assert [e.kind for e in det.tick(50.0 + 3600.0)] == ["end"] and not det.active


# -- adaptive thresholds -----------------------------------------------------------------------


def test_defaults_are_the_designs() -> None:
    t = AdaptiveThresholds()
    assert t.thresholds() == {
        "cpu": 0.8,
        "memory": 0.85,
        "connections": 0.9,
        "response_time_ms": 1000.0,
        "error_rate": 0.05,
    }
    assert set(DEFAULT_THRESHOLDS) == set(t.thresholds())


@pytest.mark.parametrize(
    ("rule", "metrics", "breached"),
    [
        ("all under", {"cpu": 0.5, "memory": 0.5}, []),
        ("at the threshold breaches", {"cpu": 0.8}, ["cpu"]),
        ("several, in spec order", {"error_rate": 0.1, "cpu": 0.9}, ["cpu", "error_rate"]),
        ("response time in ms", {"response_time_ms": 1500.0}, ["response_time_ms"]),
        ("unknown metrics ignored", {"gpu": 1.0}, []),
    ],
)
def test_breached(rule: str, metrics: dict[str, float], breached: list[str]) -> None:
    assert AdaptiveThresholds().breached(metrics) == breached, rule


def test_thresholds_adapt_up_to_a_noisy_baseline_but_not_past_the_ceiling() -> None:
    rng = random.Random(5)
    t = AdaptiveThresholds()
    for _ in range(2000):
        t.observe({"cpu": rng.gauss(0.7, 0.03), "response_time_ms": rng.gauss(1200.0, 100.0)})
    # cpu: 0.7 + 3 x 0.03 = 0.79 < 0.8: stays at the default.
    assert t.threshold("cpu") == 0.8
    # response time: learned from every sample, 1200 + 3 x 100: rises above the default.
    assert t.threshold("response_time_ms") == pytest.approx(1500.0, rel=0.03)
    for _ in range(5000):
        t.observe({"response_time_ms": rng.uniform(0.0, 9999.0)})
    assert t.threshold("response_time_ms") <= DEFAULT_THRESHOLDS["response_time_ms"].ceiling


def _learned_cpu(normal: float, spread: float, samples: int = 2000) -> AdaptiveThresholds:
    rng = random.Random(11)
    t = AdaptiveThresholds()
    for _ in range(samples):
        t.observe({"cpu": normal + rng.uniform(-spread, spread)})
    return t


@pytest.mark.parametrize(
    ("rule", "cpu", "breached"),
    [
        ("its normal is no breach", 0.85, []),
        ("nor is its usual jitter", 0.87, []),
        ("a spike above its normal breaches", 0.92, ["cpu"]),
        ("and so does saturation", 0.99, ["cpu"]),
    ],
)
def test_a_normal_above_the_default_is_learned_and_spikes_above_it_breach(
    rule: str, cpu: float, breached: list[str]
) -> None:
    # The module's example: a node whose normal CPU is 0.85 against the default 0.8.
    t = _learned_cpu(0.85, 0.02)
    assert t.breached({"cpu": cpu}) == breached, (rule, t.threshold("cpu"))


def test_a_steady_metric_is_not_in_breach_at_its_own_level() -> None:
    # Rule: a metric without jitter still gets min_margin (2 %) above its level.
    t = AdaptiveThresholds()
    for _ in range(100):
        t.observe({"error_rate": 0.1})
    assert t.breached({"error_rate": 0.1}) == []
    assert t.breached({"error_rate": 0.11}) == ["error_rate"]


def test_a_step_to_a_new_normal_breaches_for_a_while_then_is_learned() -> None:
    # Rule: a sustained change is learned at the halflife's pace -- not at once, not never.
    t = _learned_cpu(0.5, 0.02)
    breaches = [bool(t.observe({"cpu": 0.9})) for _ in range(2000)]
    assert all(breaches[:100]) and not any(breaches[500:])


@pytest.mark.parametrize(("rule", "cpu"), [("at the ceiling", 0.95), ("above it", 0.99)])
def test_saturation_breaches_however_long_it_lasts(rule: str, cpu: float) -> None:
    # Rule: a report is learned as at most its ceiling, so saturation never becomes normal.
    t = AdaptiveThresholds(min_samples=2)
    for _ in range(1000):
        assert t.observe({"cpu": cpu}) == ["cpu"], rule
    assert t.threshold("cpu") == DEFAULT_THRESHOLDS["cpu"].ceiling
    assert t.snapshot()["cpu"]["samples"] == 1000.0


def test_one_absurd_report_does_not_drag_the_threshold() -> None:
    # Rule: it is learned as the ceiling, and the spread is linear in a deviation.
    rng = random.Random(3)
    t = AdaptiveThresholds()
    for _ in range(1000):
        t.observe({"response_time_ms": rng.gauss(200.0, 20.0)})
    assert t.observe({"response_time_ms": 1e12}) == ["response_time_ms"]
    assert t.threshold("response_time_ms") == DEFAULT_THRESHOLDS["response_time_ms"].default


def test_bad_values_are_ignored() -> None:
    t = AdaptiveThresholds(min_samples=2)
    t.observe({"cpu": math.nan, "memory": math.inf})
    t.observe({"cpu": 0.5})
    assert t.snapshot()["cpu"]["samples"] == 1.0 and t.snapshot()["memory"]["samples"] == 0.0
