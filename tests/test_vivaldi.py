"""Vivaldi coordinates: accuracy on a synthetic network, input validation, no NaN, determinism."""

from __future__ import annotations

import math
import random
import statistics

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.membership.vivaldi import Coordinate, Vivaldi, VivaldiConfig, estimate_rtt


def _network(seed: int, n: int = 30) -> tuple[list[tuple[float, float]], list[float]]:
    """n nodes in a 100 ms x 100 ms plane, each with a 1-10 ms access link."""
    rng = random.Random(seed)
    pos = [(rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.1)) for _ in range(n)]
    heights = [rng.uniform(0.001, 0.010) for _ in range(n)]
    return pos, heights


def _simulate(seed: int, observations: int, n: int = 30) -> tuple[list[Vivaldi], list[float]]:
    pos, heights = _network(seed, n)
    rng = random.Random(seed + 1)

    def true_rtt(i: int, j: int) -> float:
        return math.dist(pos[i], pos[j]) + heights[i] + heights[j]

    nodes = [Vivaldi(rng=random.Random(seed * 1000 + i)) for i in range(n)]
    for _ in range(observations):
        i, j = rng.sample(range(n), 2)
        noisy = true_rtt(i, j) * (1.0 + rng.uniform(-0.02, 0.02))
        nodes[i].observe(f"n{j}", nodes[j].coordinate, noisy)
    errors = [
        abs(estimate_rtt(nodes[i].coordinate, nodes[j].coordinate) - true_rtt(i, j))
        / true_rtt(i, j)
        for i in range(n)
        for j in range(i + 1, n)
    ]
    return nodes, errors


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_converges_on_synthetic_network(seed: int) -> None:
    _, before = _simulate(seed, observations=0)
    nodes, after = _simulate(seed, observations=4000)
    # Everyone at the origin: every estimate is wrong by roughly 100 %.
    assert statistics.median(before) > 0.8
    assert statistics.median(after) < 0.15
    # Confidence grew: errors fell well below the initial max_error.
    assert statistics.median(v.coordinate.error for v in nodes) < 0.5


def test_heights_capture_access_links() -> None:
    # A star: every path is access link + access link (RTT = h_i + h_j), which a 2-D plane
    # cannot embed for 20 nodes. The heights must take the load (median well above the 10 us
    # floor), and the estimates must still be usable.
    rng = random.Random(4)
    n = 20
    heights = [rng.uniform(0.005, 0.020) for _ in range(n)]
    nodes = [Vivaldi(VivaldiConfig(dimensionality=2), random.Random(i)) for i in range(n)]
    for _ in range(4000):
        i, j = rng.sample(range(n), 2)
        nodes[i].observe(f"n{j}", nodes[j].coordinate, heights[i] + heights[j])
    assert statistics.median(v.coordinate.height for v in nodes) > 0.002
    errors = [
        abs(estimate_rtt(nodes[i].coordinate, nodes[j].coordinate) - (heights[i] + heights[j]))
        / (heights[i] + heights[j])
        for i in range(n)
        for j in range(i + 1, n)
    ]
    assert statistics.median(errors) < 0.2


def test_initial_coordinate() -> None:
    cfg = VivaldiConfig(dimensionality=4)
    v = Vivaldi(cfg, random.Random(1))
    c = v.coordinate
    assert c.vec == (0.0,) * 4
    assert c.error == cfg.max_error
    assert c.adjustment == 0.0
    assert c.height == cfg.height_min


def test_coordinate_wire_roundtrip_is_compact() -> None:
    c = Coordinate(vec=(0.1, -0.2), error=0.5, adjustment=-0.001, height=0.002)
    raw = msgspec.msgpack.encode(c)
    assert msgspec.msgpack.decode(raw, type=Coordinate) == c
    # array_like: no field names on the wire.
    assert b"vec" not in raw
    assert msgspec.msgpack.decode(raw) == [[0.1, -0.2], 0.5, -0.001, 0.002]


def test_estimate_rtt_formula() -> None:
    a = Coordinate((0.0, 0.0), 1.0, 0.0, 0.001)
    b = Coordinate((0.003, 0.004), 1.0, 0.0, 0.002)
    assert estimate_rtt(a, b) == pytest.approx(0.005 + 0.003)
    # Positive adjustments are added...
    a2 = Coordinate(a.vec, 1.0, 0.001, a.height)
    assert estimate_rtt(a2, b) == pytest.approx(0.009)
    # ...negative ones too, unless that would make the estimate non-positive.
    a3 = Coordinate(a.vec, 1.0, -1.0, a.height)
    assert estimate_rtt(a3, b) == pytest.approx(0.008)
    assert estimate_rtt(a, b) == estimate_rtt(b, a)
    with pytest.raises(ValueError):
        estimate_rtt(a, Coordinate((0.0,), 1.0, 0.0, 0.0))


GOOD = Coordinate((0.01,) * 8, 0.5, 0.0, 0.001)


@pytest.mark.parametrize(
    ("coord", "rtt"),
    [
        (GOOD, math.nan),
        (GOOD, math.inf),
        (GOOD, -0.001),
        (GOOD, 11.0),  # above max_rtt: a stall, not a network latency
        (Coordinate((0.0,) * 3, 0.5, 0.0, 0.001), 0.01),  # wrong dimensionality
        (Coordinate((math.nan,) + (0.0,) * 7, 0.5, 0.0, 0.001), 0.01),
        (Coordinate((0.0,) * 8, math.inf, 0.0, 0.001), 0.01),
        (Coordinate((0.0,) * 8, -1.0, 0.0, 0.001), 0.01),
        (Coordinate((0.0,) * 8, 0.5, math.nan, 0.001), 0.01),
        (Coordinate((0.0,) * 8, 0.5, 0.0, -0.001), 0.01),
        (Coordinate((0.0,) * 8, 0.5, 0.0, math.inf), 0.01),
    ],
)
def test_invalid_input_raises_and_leaves_state(coord: Coordinate, rtt: float) -> None:
    v = Vivaldi(rng=random.Random(3))
    v.observe("a", GOOD, 0.02)
    before = v.coordinate
    with pytest.raises(ValueError):
        v.observe("b", coord, rtt)
    assert v.coordinate == before
    assert v.stats.updates == 1


def test_latency_filter_takes_median() -> None:
    # With the filter, one huge spike among steady samples must not move us much.
    cfg = VivaldiConfig(dimensionality=2)
    peer = Coordinate((0.0, 0.0), 0.1, 0.0, cfg.height_min)

    def run(samples: list[float]) -> float:
        v = Vivaldi(cfg, random.Random(5))
        for s in samples:
            v.observe("p", peer, s)
        return v.estimate_rtt(peer)

    steady = run([0.02] * 30)
    spiked = run([0.02] * 29 + [5.0])
    assert spiked == pytest.approx(steady, rel=0.05)
    unfiltered = VivaldiConfig(dimensionality=2, latency_filter_size=1)
    v = Vivaldi(unfiltered, random.Random(5))
    for s in [0.02] * 29 + [5.0]:
        v.observe("p", peer, s)
    assert v.estimate_rtt(peer) > 2 * steady


def test_forget_drops_samples() -> None:
    v = Vivaldi(rng=random.Random(1))
    v.observe("p", GOOD, 0.02)
    assert "p" in v._samples
    v.forget("p")
    v.forget("never-seen")
    assert "p" not in v._samples


def test_deterministic_with_seed() -> None:
    a, errs_a = _simulate(11, observations=500)
    b, errs_b = _simulate(11, observations=500)
    assert [v.coordinate for v in a] == [v.coordinate for v in b]
    assert errs_a == errs_b
    c, _ = _simulate(12, observations=500)
    assert [v.coordinate for v in a] != [v.coordinate for v in c]


def test_coincident_points_separate() -> None:
    v = Vivaldi(VivaldiConfig(dimensionality=3), random.Random(2))
    other = Coordinate((0.0,) * 3, 1.5, 0.0, 10.0e-6)
    v.observe("p", other, 0.05)
    assert math.hypot(*v.coordinate.vec) > 0.0


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        VivaldiConfig(dimensionality=0)
    with pytest.raises(ValueError):
        VivaldiConfig(latency_filter_size=0)
    with pytest.raises(ValueError):
        VivaldiConfig(cc=0.0)


_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.tuples(_floats, _floats),
            st.floats(min_value=0.0, max_value=1e6),
            _floats,
            st.floats(min_value=0.0, max_value=1e6),
            st.floats(min_value=0.0, max_value=10.0),
        ),
        max_size=40,
    ),
    seed=st.integers(0, 2**32),
)
def test_never_nan(
    steps: list[tuple[str, tuple[float, float], float, float, float, float]], seed: int
) -> None:
    v = Vivaldi(VivaldiConfig(dimensionality=2), random.Random(seed))
    for peer, vec, error, adjustment, height, rtt in steps:
        c = v.observe(peer, Coordinate(vec, error, adjustment, height), rtt)
        assert all(math.isfinite(x) for x in c.vec)
        assert math.isfinite(c.error) and 0.0 <= c.error <= 1.5
        assert math.isfinite(c.adjustment)
        assert math.isfinite(c.height) and c.height >= VivaldiConfig().height_min
        assert math.isfinite(v.estimate_rtt(c))
