"""Published load: the in-flight figure each node reports about itself (every client's calls)
reaches the strategies, is combined with the balancer's own live counts without counting our
calls twice, and a garbled figure from a peer is harmless."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from agentcluster.balancing.balancer import Balancer
from agentcluster.balancing.base import EMPTY_REQUEST, Endpoint, PickRequest, published_inflight
from agentcluster.balancing.geographic import Geographic
from agentcluster.balancing.least_connections import LeastConnections, others_inflight
from agentcluster.balancing.strategies import make_strategy

# The strategies that compare requests in flight (geographic through its inner strategy).
LOAD_AWARE = ["least_connections", "latency_aware", "adaptive", "geographic"]


def _names(n: int) -> list[str]:
    return [f"n{i:02d}" for i in range(n)]


# ---------------------------------------------------------------- a busy node is avoided


@pytest.mark.parametrize("name", LOAD_AWARE)
@pytest.mark.parametrize("n", [4, 20])  # a full scan, and P2C
def test_a_node_busy_with_other_clients_calls_gets_less_traffic(name: str, n: int) -> None:
    # This balancer has sent "n00" nothing, but the node says it serves 10 calls: while our
    # own calls to its idle peers stay below that, it loses every comparison.
    s = make_strategy(name)
    s.update([Endpoint(node=x, in_flight=10.0 if x == "n00" else 0.0) for x in _names(n)])
    rng = random.Random(3)
    held: Counter[str] = Counter()
    # A millisecond apart: well within the latency strategies' idle decay (10 s), which
    # would have them probe an idle node however busy it is.
    for k in range((n - 1) * 4):  # held in flight: about 4 each on the idle nodes
        node = s.pick(EMPTY_REQUEST, rng, k * 0.001)
        s.on_start(node, k * 0.001)
        held[node] += 1
    assert held["n00"] == 0, held
    # Calls that come back at once leave our counts at 0: the busy node still gets nothing.
    quick: Counter[str] = Counter()
    for k in range(200):
        now = 1.0 + k * 0.001
        node = s.pick(EMPTY_REQUEST, rng, now)
        s.on_start(node, now)
        s.on_finish(node, 0.01, True, now)
        quick[node] += 1
    assert quick["n00"] == 0 and quick.total() == 200, quick


def test_least_connections_compares_own_plus_other_clients_load() -> None:
    s = LeastConnections()
    s.update([Endpoint("a", in_flight=3.0), Endpoint("b"), Endpoint("c", in_flight=1.0)])
    rng = random.Random(0)
    got: Counter[str] = Counter()
    for k in range(5):
        node = s.pick(EMPTY_REQUEST, rng, float(k))
        s.on_start(node, float(k))
        got[node] += 1
    # b takes calls until it is as loaded as c, then b and c share them until they reach a.
    assert got == {"b": 3, "c": 2}
    assert (s.load("a"), s.load("b"), s.load("c")) == (3.0, 3.0, 3.0)
    s.on_start("a", 5.0)
    assert s.load("a") == 4.0 and s.inflight("a") == 1  # what we sent is counted apart


def test_weights_break_ties_on_the_combined_load() -> None:
    # a: 2 calls of ours; b: 2 of other clients'. Equal loads: the bigger node wins.
    s = LeastConnections()
    s.update([Endpoint("a", weight=3.0), Endpoint("b", in_flight=2.0)])
    s.on_start("a", 0.0)
    s.on_start("a", 0.0)
    assert {s.pick(EMPTY_REQUEST, random.Random(k), 0.0) for k in range(20)} == {"a"}


# ---------------------------------------------------------------- the combining rule


@pytest.mark.parametrize(
    ("rule", "figure", "report", "own", "seen", "expect"),
    [
        ("nothing published", 0.0, 1, 5, None, 0.0),
        ("others only", 10.0, 1, 0, None, 10.0),
        ("ours are subtracted when the report arrives", 10.0, 1, 4, None, 6.0),
        ("never below zero (ours still in transit)", 3.0, 1, 5, None, 0.0),
        ("kept while the report is the same", 10.0, 3, 0, (10.0, 3, 6.0), 6.0),
        ("a new figure is estimated afresh", 12.0, 4, 2, (10.0, 3, 6.0), 10.0),
        ("a new report of the same figure too", 10.0, 4, 0, (10.0, 3, 6.0), 10.0),
    ],
)
def test_others_inflight_table(
    rule: str,
    figure: float,
    report: int,
    own: int,
    seen: tuple[float, int, float] | None,
    expect: float,
) -> None:
    published = {"a": (figure, report)} if figure else {}
    before = {"a": seen} if seen is not None else {}
    others, kept = others_inflight(["a"], published, [own], before)
    assert others == [expect], rule
    assert kept == ({"a": (figure, report, expect)} if figure else {}), rule


@pytest.mark.parametrize("name", ["least_connections", "latency_aware", "adaptive", "geographic"])
def test_a_new_report_of_the_same_total_rebases_the_estimate(name: str) -> None:
    # We hold 10 calls on n0 when its report of 10 (all ours) arrives; ours finish and
    # another client's 10 take their place; n0 reports 10 again. n0 is busy: avoid it.
    s = make_strategy(name)
    names = [f"n{i}" for i in range(4)]
    s.update([Endpoint(x) for x in names])
    for _ in range(10):
        s.on_start("n0", 0.0)
    s.update([Endpoint(x, in_flight=10.0 if x == "n0" else 0.0, load_report=1) for x in names])
    for _ in range(10):
        s.on_finish("n0", 0.01, True, 0.5)
    s.update([Endpoint(x, in_flight=10.0 if x == "n0" else 0.0, load_report=2) for x in names])
    rng = random.Random(1)
    got: Counter[str] = Counter()
    for k in range(200):
        now = 1.0 + k * 0.001
        node = s.pick(EMPTY_REQUEST, rng, now)
        s.on_start(node, now)
        s.on_finish(node, 0.01, True, now)
        got[node] += 1
    assert got["n0"] == 0, got


def test_our_calls_replacing_others_are_not_counted_twice() -> None:
    s = LeastConnections()
    s.update([Endpoint("a"), Endpoint("b")])
    s.update([Endpoint("a", in_flight=10.0, load_report=1), Endpoint("b")])  # another client's
    for _ in range(10):  # theirs finish, ours take their place; a reports 10 again
        s.on_start("a", 1.0)
    s.update([Endpoint("a", in_flight=10.0, load_report=2), Endpoint("b")])
    assert s.load("a") == 10.0


def test_our_finished_calls_do_not_become_phantom_load() -> None:
    # We are the node's only client: it reports our 10 calls. They finish, and an update for
    # another reason (a breaker, a slow-start step) comes before the node's next report.
    s = LeastConnections()
    s.update([Endpoint("a"), Endpoint("b")])
    for _ in range(10):
        s.on_start("a", 0.0)
    s.update([Endpoint("a", in_flight=10.0), Endpoint("b")])
    assert s.load("a") == 10.0  # all ours: nothing added
    for _ in range(10):
        s.on_finish("a", 0.01, True, 1.0)
    s.update([Endpoint("a", in_flight=10.0), Endpoint("b", weight=2.0)])
    assert s.load("a") == 0.0
    s.update([Endpoint("a", in_flight=4.0), Endpoint("b")])  # someone else's, now
    assert s.load("a") == 4.0


# ---------------------------------------------------------------- garbled figures


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        (7.0, 7.0),
        (2.5, 2.5),
        (3, 3.0),
        (0.0, 0.0),
        (math.nan, 0.0),
        (math.inf, 0.0),
        (-math.inf, 0.0),
        (-4.0, 0.0),
        ("12", 0.0),
        (None, 0.0),
        (True, 0.0),
        (10**400, 0.0),
        ([1.0], 0.0),
    ],
)
def test_published_inflight_table(value: Any, expect: float) -> None:
    assert published_inflight(value) == expect


GARBLED: list[Any] = [math.nan, -5.0, "lots", math.inf, None]


@pytest.mark.parametrize("name", LOAD_AWARE)
def test_garbled_figures_do_not_crash_and_count_as_zero(name: str) -> None:
    s = make_strategy(name)
    eps = [Endpoint(node=f"g{i}", in_flight=v) for i, v in enumerate(GARBLED)]
    s.update([*eps, Endpoint("busy", in_flight=50.0)])
    rng = random.Random(1)
    picks = Counter(s.pick(EMPTY_REQUEST, rng, float(k)) for k in range(300))
    # The garbled ones look idle (0), like a node that reports nothing; the busy one does not.
    assert set(picks) == {e.node for e in eps}, picks
    if isinstance(s, LeastConnections):
        assert all(s.load(e.node) == 0.0 for e in eps)


def test_the_routing_view_shows_published_figures_checked() -> None:
    b = Balancer(rng=random.Random(1), strategy="least_connections")
    b.set_endpoints(
        "echo",
        [Endpoint("a", in_flight=7.0), Endpoint("b", in_flight=math.nan), Endpoint("c")],
        0.0,
    )
    view = {n["node"]: n["in_flight"] for n in b.snapshot(0.0)["nodes"]}
    assert view == {"a": 7.0, "b": 0.0, "c": 0.0}
    got: Counter[str] = Counter()
    for _ in range(60):
        node = b.pick("echo", EMPTY_REQUEST, 0.0)
        b.started("echo", node, 0.0)
        got[node] += 1
    assert got["a"] < got["b"] and got["a"] < got["c"], got


# ---------------------------------------------------------------- geographic spill-over


def test_a_zone_saturated_by_other_clients_spills_over() -> None:
    # Zone a's nodes each serve 8 calls for other clients (the default threshold) while the
    # rest of the region is idle: our requests go wider even though we sent zone a nothing.
    s = Geographic()
    s.update(
        [
            Endpoint("a1", zone="a", region="east", in_flight=8.0),
            Endpoint("a2", zone="a", region="east", in_flight=8.0),
            Endpoint("b1", zone="b", region="east"),
            Endpoint("c1", zone="c", region="west"),
        ]
    )
    assert s.tier_load(zone="a") == (0, 2) and s.tier_others(zone="a") == 16.0
    assert s.tier_others(region="east") == 16.0 and s.tier_others(zone="zz") is None
    rng = random.Random(0)
    req = PickRequest(zone="a", region="east")
    assert s.pick(req, rng, 0.0) == "b1"
    # Below the threshold the zone keeps its traffic, published load or not.
    s.update(
        [
            Endpoint("a1", zone="a", region="east", in_flight=3.0),
            Endpoint("a2", zone="a", region="east", in_flight=3.0),
            Endpoint("b1", zone="b", region="east"),
        ]
    )
    assert {s.pick(req, rng, 0.0) for _ in range(20)} <= {"a1", "a2"}
