"""Phi-accrual failure detector: growth tables, monotonicity, window bound, registry."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.membership.phi import MAX_PHI, PhiAccrual, PhiConfig, PhiRegistry, phi_value


def _exact_phi(elapsed: float, mean: float, std: float) -> float:
    """Phi from the exact normal tail (erfc), to check the logistic approximation."""
    y = (elapsed - mean) / std
    return -math.log10(0.5 * math.erfc(y / math.sqrt(2.0)))


def _feed(detector: PhiAccrual, intervals: list[float], start: float = 0.0) -> float:
    t = start
    detector.heartbeat(t)
    for dt in intervals:
        t += dt
        detector.heartbeat(t)
    return t


def test_zero_before_first_heartbeat() -> None:
    d = PhiAccrual()
    assert d.phi(0.0) == 0.0
    assert d.phi(1e9) == 0.0
    assert d.available(1e9)
    assert d.last_heartbeat is None


def test_first_heartbeat_bootstraps_from_first_interval() -> None:
    d = PhiAccrual(PhiConfig(first_interval=2.0))
    d.heartbeat(10.0)
    assert d.intervals == (1.5, 2.5)
    assert d.mean == pytest.approx(2.0)
    assert d.std == pytest.approx(0.5)
    # One heartbeat is enough for a silent peer to become suspect.
    assert d.phi(12.0) == pytest.approx(math.log10(2.0))
    assert d.available(10.0 + 2.0 + 4 * 0.5)
    assert not d.available(10.0 + 2.0 + 6 * 0.5)


# elapsed since the last beat -> expected phi, for 150 beats exactly 1 s apart (so the window
# holds only 1.0 s intervals and the deviation is the 50 ms floor).
REGULAR = [
    (0.5, 0.0, 1e-6),
    (1.0, math.log10(2.0), 1e-9),  # at the mean: P(later) = 1/2
    (1.05, 0.80, 0.01),
    (1.1, 1.64, 0.01),
    (1.2, 4.74, 0.01),
    (1.25, 7.30, 0.01),
    (1.3, 10.78, 0.01),
    (1.5, 37.58, 0.01),
    (2.0, 259.05, 0.01),
    (5.0, MAX_PHI, 0.0),
]


@pytest.mark.parametrize(("elapsed", "expected", "tol"), REGULAR)
def test_regular_heartbeats_table(elapsed: float, expected: float, tol: float) -> None:
    d = PhiAccrual()
    last = _feed(d, [1.0] * 150)
    assert d.mean == pytest.approx(1.0)
    assert d.std == pytest.approx(0.05)
    assert d.phi(last + elapsed) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize("elapsed", [0.8, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.5])
def test_logistic_close_to_exact_normal(elapsed: float) -> None:
    # The logistic CDF is within 1.4e-4 of the normal one (in probability, not in log space).
    approx = 10.0 ** -phi_value(elapsed, 1.0, 0.05)
    exact = 10.0 ** -_exact_phi(elapsed, 1.0, 0.05)
    assert approx == pytest.approx(exact, abs=1.5e-4)


# Jittery heartbeats (uniform 0.5-1.5 s): the learned deviation is ~0.29 s, so the same delay
# raises much less suspicion than on a regular link.
JITTERY = [
    (1.0, 0.2, 0.5),
    (1.5, 1.0, 2.2),
    (2.0, 3.0, 5.5),
    (2.5, 7.0, 12.0),
    (3.0, 14.0, 24.0),
]


@pytest.mark.parametrize(("elapsed", "low", "high"), JITTERY)
def test_jittery_heartbeats_table(elapsed: float, low: float, high: float) -> None:
    rng = random.Random(1)
    d = PhiAccrual()
    last = _feed(d, [rng.uniform(0.5, 1.5) for _ in range(150)])
    assert d.std == pytest.approx(0.29, abs=0.04)
    assert low <= d.phi(last + elapsed) <= high
    regular = PhiAccrual()
    regular_last = _feed(regular, [1.0] * 150)
    if elapsed > 1.0:
        assert d.phi(last + elapsed) < regular.phi(regular_last + elapsed)


def test_long_pause_saturates_and_is_not_learned() -> None:
    d = PhiAccrual()
    last = _feed(d, [1.0] * 50)
    assert d.phi(last + 30.0) == MAX_PHI
    assert not d.available(last + 30.0)
    d.heartbeat(last + 30.0)  # the peer is back
    # The 30 s gap was not learned: the next normal beat is not suspicious...
    assert 30.0 not in d.intervals
    assert d.mean == pytest.approx(1.0)
    assert d.phi(last + 31.0) < 1.0
    # ...and a second pause is detected as fast as the first one.
    assert d.phi(last + 30.0 + 1.5) > 8.0


def test_acceptable_pause_shifts_the_curve() -> None:
    plain = PhiAccrual()
    tolerant = PhiAccrual(PhiConfig(acceptable_pause=2.0))
    a = _feed(plain, [1.0] * 20)
    b = _feed(tolerant, [1.0] * 20)
    assert tolerant.phi(b + 3.0) == pytest.approx(plain.phi(a + 1.0))
    assert tolerant.available(b + 3.0)
    assert not plain.available(a + 3.0)


def test_window_bound() -> None:
    cfg = PhiConfig(window=10)
    d = PhiAccrual(cfg)
    _feed(d, [0.5] * 5 + [2.0] * 30)
    assert len(d.intervals) == 10
    # The bootstrap samples and the old 0.5 s intervals have been pushed out.
    assert d.intervals == (2.0,) * 10
    assert d.mean == pytest.approx(2.0)


def test_threshold_argument() -> None:
    d = PhiAccrual()
    last = _feed(d, [1.0] * 20)
    p = d.phi(last + 1.2)
    assert d.available(last + 1.2, threshold=p + 0.01)
    assert not d.available(last + 1.2, threshold=p)


def test_invalid_inputs() -> None:
    d = PhiAccrual()
    with pytest.raises(ValueError):
        d.heartbeat(math.nan)
    with pytest.raises(ValueError):
        d.heartbeat(math.inf)
    d.heartbeat(0.0)
    with pytest.raises(ValueError):
        d.phi(math.nan)
    assert d.phi(math.inf) == MAX_PHI
    assert d.phi(-math.inf) == 0.0
    for bad in (
        {"window": 1},
        {"min_std": 0.0},
        {"first_interval": -1.0},
        {"acceptable_pause": -0.1},
    ):
        with pytest.raises(ValueError):
            PhiConfig(**bad)


def test_out_of_order_heartbeat_does_not_go_back_in_time() -> None:
    d = PhiAccrual()
    _feed(d, [1.0] * 5)  # last at 5.0
    d.heartbeat(4.5)
    assert d.last_heartbeat == 5.0
    assert min(d.intervals) >= 0.0


@settings(max_examples=300, deadline=None)
@given(
    intervals=st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=30),
    probes=st.lists(st.floats(min_value=-5.0, max_value=1e4), min_size=2, max_size=30),
    pause=st.floats(min_value=0.0, max_value=5.0),
)
def test_phi_monotone_between_heartbeats(
    intervals: list[float], probes: list[float], pause: float
) -> None:
    d = PhiAccrual(PhiConfig(window=8, acceptable_pause=pause))
    last = _feed(d, intervals)
    values = [d.phi(last + x) for x in sorted(probes)]
    for earlier, later in itertools.pairwise(values):
        assert earlier <= later
    for v in values:
        assert math.isfinite(v) and 0.0 <= v <= MAX_PHI


def test_phi_monotone_dense_sweep() -> None:
    # Every representable step matters near the mean and the cap: sweep finely.
    d = PhiAccrual()
    last = _feed(d, [1.0] * 30)
    prev = -1.0
    for i in range(200_000):
        v = d.phi(last + i * 1e-4)
        assert v >= prev
        prev = v
    assert prev == MAX_PHI


def test_registry() -> None:
    reg = PhiRegistry(PhiConfig(first_interval=1.0))
    assert reg.phi("ghost", 100.0) == 0.0
    assert reg.available("ghost", 100.0)
    for t in range(10):
        reg.heartbeat("b", float(t))
        if t < 5:
            reg.heartbeat("a", float(t))
    assert list(reg) == ["b", "a"]
    assert len(reg) == 2 and "a" in reg
    scores = reg.scores(10.0)
    assert list(scores) == ["b", "a"]
    assert scores["a"] > scores["b"]
    assert not reg.available("a", 10.0)
    assert reg.available("b", 10.0)
    detector = reg.get("a")
    assert detector is not None and detector.last_heartbeat == 4.0
    reg.remove("a")
    reg.remove("a")
    assert "a" not in reg
    assert reg.phi("a", 10.0) == 0.0
    assert list(reg.scores(10.0)) == ["b"]
