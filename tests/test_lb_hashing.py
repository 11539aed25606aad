"""Consistent hashing strategies: Maglev, bounded-load hashing, session affinity."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.balancing._hashing import hash64, hash64_pair, next_prime
from agentcluster.balancing.affinity import SessionAffinity
from agentcluster.balancing.base import EMPTY_REQUEST, Endpoint, NoEndpoint, PickRequest
from agentcluster.balancing.bounded_load import BoundedLoad
from agentcluster.balancing.maglev import (
    DEFAULT_TABLE_SIZE,
    Maglev,
    _turns,
    build_table,
    maglev_keys_moved_on_remove,
)
from agentcluster.balancing.round_robin import RoundRobin

RNG = random.Random(0)


def eps(names: list[str], weights: list[float] | None = None) -> list[Endpoint]:
    ws = weights or [1.0] * len(names)
    return [Endpoint(node=n, weight=w) for n, w in zip(names, ws, strict=True)]


def names_of(n: int, prefix: str = "node") -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(n)]


# --- stable hashes --------------------------------------------------------------------------


def test_hash64_is_blake2b_and_not_salted() -> None:
    expected = int.from_bytes(hashlib.blake2b(b"abc", digest_size=8).digest(), "little")
    assert hash64("abc") == expected
    assert hash64("abc", b"x") != hash64("abc", b"y")
    a, b = hash64_pair("node-1")
    assert a != b and 0 <= a < 2**64 and 0 <= b < 2**64


@pytest.mark.parametrize(
    ("n", "prime"), [(0, 2), (2, 2), (4, 5), (14, 17), (65_536, 65_537), (100_000, 100_003)]
)
def test_next_prime(n: int, prime: int) -> None:
    assert next_prime(n) == prime


# --- Maglev table ---------------------------------------------------------------------------


def paper_table(names: list[str], weights: list[float], size: int) -> list[int]:
    """The paper's population loop, written plainly (the reference for build_table)."""
    offsets, skips = [], []
    for name in names:
        h1, h2 = hash64_pair(name, b"ac-maglev-node")
        offsets.append(h1 % size)
        skips.append(h2 % (size - 1) + 1)
    nxt = [0] * len(names)
    owner = [-1] * size
    top = max(weights)
    for filled, i in enumerate(_turns([w / top for w in weights]), start=1):
        c = (offsets[i] + nxt[i] * skips[i]) % size
        while owner[c] >= 0:
            nxt[i] += 1
            c = (offsets[i] + nxt[i] * skips[i]) % size
        owner[c] = i
        nxt[i] += 1
        if filled == size:
            return owner
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("n", "size", "weights"),
    [
        (1, 7, None),
        (3, 7, None),
        (5, 101, None),
        (10, 1_009, None),
        (7, 997, [1.0, 2.0, 3.0, 1.0, 0.5, 0.25, 1.0]),
        (40, 4_999, None),
        (20, 65_537, None),
        (12, 10_007, [float(1 + i % 4) for i in range(12)]),
    ],
)
def test_build_table_matches_the_paper(n: int, size: int, weights: list[float] | None) -> None:
    names = names_of(n)
    ws = weights or [1.0] * n
    assert build_table(names, ws, size) == paper_table(names, ws, size)


def envoy_turns(weights: list[float], count: int) -> list[int]:
    """Envoy's filling turns: each round, a backend goes if round * weight >= its target."""
    top = max(weights)
    ratios = [w / top for w in weights]
    targets = [0.0] * len(weights)
    out: list[int] = []
    rnd = 0
    while len(out) < count:
        for i, r in enumerate(ratios):
            if rnd * r < targets[i] or len(out) == count:
                continue
            targets[i] += 1.0
            out.append(i)
        rnd += 1
    return out


@pytest.mark.parametrize(
    "weights",
    [
        [1.0, 1.0, 1.0],
        [1.0, 2.0, 3.0, 1.0, 0.5, 0.25, 1.0],
        [0.3, 1.0, 0.3, 0.7],
        [0.1, 0.2, 0.3],
        [float(1 + i % 4) for i in range(12)],
    ],
)
def test_filling_turns_match_envoy(weights: list[float]) -> None:
    turns = _turns([w / max(weights) for w in weights])
    assert list(itertools.islice(turns, 500)) == envoy_turns(weights, 500)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(10, 200), salt=st.integers(0, 10**6))
def test_maglev_balance(n: int, salt: int) -> None:
    m = Maglev()
    m.update(eps(names_of(n, f"s{salt}")))
    shares = Counter(m.table)
    assert len(shares) == n
    mean = m.table_size / n
    assert max(shares.values()) / mean <= 1.03
    assert min(shares.values()) / mean >= 0.97


def test_maglev_weighted_shares_follow_weights() -> None:
    names = names_of(20)
    weights = [float(1 + i % 4) for i in range(20)]
    m = Maglev()
    m.update(eps(names, weights))
    shares = Counter(m.table)
    total_weight = sum(weights)
    for name, w in zip(names, weights, strict=True):
        assert shares[name] / m.table_size == pytest.approx(w / total_weight, rel=0.03)


def moved_share(before: Maglev, after: Maglev) -> float:
    assert before.table_size == after.table_size
    return sum(a != b for a, b in zip(before.table, after.table, strict=True)) / before.table_size


@settings(max_examples=8, deadline=None)
@given(n=st.integers(10, 200), salt=st.integers(0, 10**6), data=st.data())
def test_maglev_disruption_on_remove_and_add(n: int, salt: int, data: st.DataObject) -> None:
    names = names_of(n, f"d{salt}")
    full = Maglev()
    full.update(eps(names))
    gone = data.draw(st.sampled_from(names))
    smaller = Maglev()
    smaller.update(eps([x for x in names if x != gone]))
    # Keys are uniform over slots, so the share of changed slots is the share of keys moved.
    removed = moved_share(full, smaller)
    assert 1 / n - 0.002 <= removed <= 1 / n + 0.01
    # Adding the node back to n - 1 moves about 1 / n (= 1 / (N + 1) for N = n - 1).
    added = moved_share(smaller, full)
    assert 1 / n - 0.002 <= added <= 1 / n + 0.01


def test_maglev_keys_moved_on_remove_figure() -> None:
    moved = maglev_keys_moved_on_remove(n=100, keys=20_000, seed=3)
    assert 0.008 <= moved <= 1 / 100 + 0.01


def test_maglev_picks_by_key_consistently_and_ignores_update_order() -> None:
    names = names_of(30)
    a, b = Maglev(), Maglev()
    a.update(eps(names))
    b.update(eps(list(reversed(names))))
    assert list(a.table) == list(b.table)
    rng = random.Random(1)
    for i in range(200):
        req = PickRequest(key=f"user-{i}")
        first = a.pick(req, rng, 0.0)
        assert a.pick(req, rng, 5.0) == first == b.pick(req, random.Random(9), 0.0)


def test_maglev_without_key_follows_the_rng() -> None:
    m = Maglev()
    m.update(eps(names_of(10)))
    r1, r2 = random.Random(4), random.Random(4)
    seq1 = [m.pick(EMPTY_REQUEST, r1, 0.0) for _ in range(50)]
    seq2 = [m.pick(EMPTY_REQUEST, r2, 0.0) for _ in range(50)]
    assert seq1 == seq2
    assert len(set(seq1)) > 5  # spread, not one node


def test_maglev_exclude_walks_to_the_next_slot() -> None:
    m = Maglev()
    m.update(eps(names_of(5)))
    rng = random.Random(0)
    req = PickRequest(key="k")
    home = m.pick(req, rng, 0.0)
    slot = m.slot_of("k")
    expected = next(
        m.table[(slot + d) % m.table_size]
        for d in range(1, m.table_size)
        if m.table[(slot + d) % m.table_size] != home
    )
    assert m.pick(req, rng, 0.0, frozenset({home})) == expected
    with pytest.raises(NoEndpoint):
        m.pick(req, rng, 0.0, frozenset(names_of(5)))


@pytest.mark.parametrize(
    "endpoints",
    [[], [Endpoint(node="a", weight=0.0)], [Endpoint(node="a", weight=-1.0)]],
)
def test_maglev_without_eligible_endpoints(endpoints: list[Endpoint]) -> None:
    m = Maglev()
    m.update(endpoints)
    assert m.table_size == 0
    with pytest.raises(NoEndpoint):
        m.pick(PickRequest(key="x"), RNG, 0.0)


@pytest.mark.parametrize("strategy", [Maglev, BoundedLoad])
@pytest.mark.parametrize("weight", [math.inf, -math.inf, math.nan])
def test_hashing_refuses_a_garbled_weight_by_name(
    strategy: type[Maglev] | type[BoundedLoad], weight: float
) -> None:
    s = strategy()
    with pytest.raises(ValueError, match="'b' has weight"):
        s.update([Endpoint("a"), Endpoint("b", weight=weight)])


@pytest.mark.parametrize("strategy", [Maglev, BoundedLoad])
def test_hashing_counts_a_name_given_twice_once(strategy: type[Maglev] | type[BoundedLoad]) -> None:
    # Rule: a duplicated name is one node (its last weight), like the balancer's own map: two
    # entries would give it two load counters (bounded load stops bounding) or double slots.
    twice, once = strategy(), strategy()
    twice.update([Endpoint("a", weight=5.0), Endpoint("a"), Endpoint("b")])
    once.update([Endpoint("a"), Endpoint("b")])
    keys = [PickRequest(key=f"k{i}") for i in range(200)]
    assert [twice.pick(k, RNG, 0.0) for k in keys] == [once.pick(k, RNG, 0.0) for k in keys]
    if isinstance(twice, BoundedLoad):
        for _ in range(40):
            twice.on_start(twice.pick(PickRequest(key="z"), RNG, 0.0), 0.0)
        assert max(twice.load("a"), twice.load("b")) <= 25  # ceil(1.25 * 40 / 2)


def test_maglev_table_size_ladder_is_stable_under_churn() -> None:
    m = Maglev()
    m.update(eps(names_of(10)))
    assert m.table_size == DEFAULT_TABLE_SIZE
    m.update(eps(names_of(700)))
    big = m.table_size
    assert big >= 70_000 and next_prime(big) == big
    m.update(eps(names_of(701)))
    assert m.table_size == big  # one more node: same size, so few keys move
    m.update(eps(names_of(699)))
    assert m.table_size == big
    m.update(eps(names_of(100)))
    assert m.table_size == big  # within 4x of the needed rung: kept
    m.update(eps(names_of(5)))
    assert m.table_size == big
    with pytest.raises(ValueError):
        Maglev(min_table_size=1)


# --- bounded-load hashing -------------------------------------------------------------------


def exact_bound(total_after: int, n: int) -> int:
    return -(-(5 * total_after) // (4 * n))  # ceil(1.25 * T / n), exact


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), min_size=1, max_size=300),
)
def test_bounded_load_never_exceeds_the_bound(n: int, ops: list[tuple[bool, int]]) -> None:
    b = BoundedLoad()
    names = names_of(n)
    b.update(eps(names))
    rng = random.Random(n)
    inflight: list[str] = []
    for start, key in ops:
        if start or not inflight:
            node = b.pick(PickRequest(key=f"k{key}"), rng, 0.0)
            b.on_start(node, 0.0)
            inflight.append(node)
            total = len(inflight)
            assert b.total_in_flight == total
            for name in names:
                assert b.load(name) <= exact_bound(total, n)
        else:
            b.on_finish(inflight.pop(key % len(inflight)), 0.01, True, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.0]), min_size=2, max_size=20),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), min_size=1, max_size=300),
)
def test_weighted_bounded_load_places_below_each_nodes_bound(
    weights: list[float], ops: list[tuple[bool, int]]
) -> None:
    b = BoundedLoad()
    names = names_of(len(weights))
    b.update(eps(names, weights))
    rng = random.Random(len(weights))
    inflight: list[str] = []
    for start, key in ops:
        if start or not inflight:
            before = {name: b.load(name) for name in names}
            node = b.pick(PickRequest(key=f"k{key}"), rng, 0.0)
            # Below its bound (ceil of its share of 1.25 x the total with this request).
            assert before[node] < b.bound(node)
            b.on_start(node, 0.0)
            inflight.append(node)
        else:
            b.on_finish(inflight.pop(key % len(inflight)), 0.01, True, 0.0)


def test_bounded_load_keeps_keys_home_until_overloaded() -> None:
    b = BoundedLoad()
    b.update(eps(names_of(10)))
    rng = random.Random(0)
    req = PickRequest(key="hot")
    home = b.pick(req, rng, 0.0)
    assert all(b.pick(req, rng, 0.0) == home for _ in range(5))  # nothing in flight
    placed = []
    for _ in range(40):
        node = b.pick(req, rng, 0.0)
        b.on_start(node, 0.0)
        placed.append(node)
    counts = Counter(placed)
    assert counts[home] == max(counts.values())
    assert counts[home] <= exact_bound(40, 10)
    assert len(counts) > 1  # the hot key spilled to its ring successors


def test_bounded_load_exclude_and_errors() -> None:
    b = BoundedLoad()
    with pytest.raises(NoEndpoint):
        b.pick(PickRequest(key="x"), RNG, 0.0)
    b.update(eps(["a", "b"]))
    first = b.pick(PickRequest(key="x"), RNG, 0.0)
    other = b.pick(PickRequest(key="x"), RNG, 0.0, frozenset({first}))
    assert other != first
    with pytest.raises(NoEndpoint):
        b.pick(PickRequest(key="x"), RNG, 0.0, frozenset({"a", "b"}))
    with pytest.raises(ValueError):
        BoundedLoad(balance_factor=1.0)
    with pytest.raises(ValueError):
        BoundedLoad(vnodes=0)


def test_bounded_load_exclude_at_capacity_falls_back_to_least_loaded() -> None:
    b = BoundedLoad()
    b.update(eps(["a", "b", "c"]))
    for node in ["a", "a", "b"]:
        b.on_start(node, 0.0)
    # bound(T=4) = ceil(1.25 * 4 / 3) = 2: a is full, b and c are not; exclude c.
    assert b.pick(PickRequest(key="z"), RNG, 0.0, frozenset({"c"})) == "b"
    b.on_start("b", 0.0)
    b.on_start("b", 0.0)
    assert b.bound("a") == exact_bound(6, 3) == 3
    b.on_start("a", 0.0)
    # a=3, b=3, T=6: bound(7) = ceil(8.75 / 3) = 3, both full and c excluded: least loaded
    # (a tie, broken by name).
    assert b.pick(PickRequest(key="z"), RNG, 0.0, frozenset({"c"})) == "a"


def test_bounded_load_carries_in_flight_across_updates() -> None:
    b = BoundedLoad()
    b.update(eps(["a", "b"]))
    b.on_start("a", 0.0)
    b.on_start("b", 0.0)
    b.update(eps(["b"]))  # a leaves with one request in flight
    assert b.total_in_flight == 1 and b.load("a") == 1
    b.update(eps(["a", "b"]))  # and comes back before it finishes
    assert b.total_in_flight == 2 and b.load("a") == 1
    b.on_finish("a", 0.1, True, 1.0)
    b.on_finish("a", 0.1, True, 1.0)  # a stray finish is ignored
    assert b.load("a") == 0 and b.total_in_flight == 1
    b.update(eps(["a"]))
    b.on_finish("b", 0.1, True, 1.0)  # b is gone: its count drains without touching a's
    assert b.load("b") == 0 and b.total_in_flight == 0


def test_bounded_load_weighted_bound() -> None:
    b = BoundedLoad()
    b.update(eps(["big", "small"], [3.0, 1.0]))
    assert b.bound("big", total=8) == math.ceil(1.25 * 8 * 3 / 4)
    assert b.bound("small", total=8) == math.ceil(1.25 * 8 * 1 / 4)
    rng = random.Random(2)
    for i in range(200):
        node = b.pick(PickRequest(key=f"w{i}"), rng, 0.0)
        total = b.total_in_flight + 1
        assert b.load(node) < b.bound(node, total)
        b.on_start(node, 0.0)


# --- session affinity -----------------------------------------------------------------------


def affinity(ttl: float = 10.0, max_sessions: int = 100) -> SessionAffinity:
    s = SessionAffinity(RoundRobin(), ttl=ttl, max_sessions=max_sessions)
    s.update(eps(["a", "b", "c"]))
    return s


def test_affinity_sticks_and_refreshes() -> None:
    s = affinity()
    rng = random.Random(0)
    first = s.pick(PickRequest(key="u1"), rng, 0.0)
    # Round robin alone would rotate; the session keeps its node, and each use refreshes it.
    for t in (5.0, 14.0, 23.0):
        assert s.pick(PickRequest(key="u1"), rng, t) == first
    assert s.session("u1", 23.0) == first


def test_affinity_expires_after_idle_ttl() -> None:
    s = affinity(ttl=10.0)
    rng = random.Random(0)
    first = s.pick(PickRequest(key="u1"), rng, 0.0)
    assert s.session("u1", 10.0) == first
    assert s.session("u1", 10.5) is None
    s.pick(PickRequest(key="other"), rng, 10.5)  # round robin moves on
    again = s.pick(PickRequest(key="u1"), rng, 10.5)
    assert again != first  # re-picked, and remembered from now on
    assert s.pick(PickRequest(key="u1"), rng, 11.0) == again


def test_affinity_repicks_when_the_node_is_ineligible_or_excluded() -> None:
    s = affinity()
    rng = random.Random(0)
    first = s.pick(PickRequest(key="u"), rng, 0.0)
    s.update(eps([x for x in ["a", "b", "c"] if x != first]))
    moved = s.pick(PickRequest(key="u"), rng, 1.0)
    assert moved != first
    s.update(eps(["a", "b", "c"]))
    assert s.pick(PickRequest(key="u"), rng, 2.0) == moved  # stays on its new home
    retried = s.pick(PickRequest(key="u"), rng, 3.0, frozenset({moved}))
    assert retried != moved
    assert s.pick(PickRequest(key="u"), rng, 4.0) == retried


def test_affinity_lru_bound_and_expired_purge() -> None:
    s = affinity(ttl=100.0, max_sessions=3)
    rng = random.Random(0)
    for i, key in enumerate(["k1", "k2", "k3"]):
        s.pick(PickRequest(key=key), rng, float(i))
    s.pick(PickRequest(key="k1"), rng, 3.0)  # k1 is now the most recently used
    s.pick(PickRequest(key="k4"), rng, 4.0)  # evicts the LRU entry: k2
    assert len(s) == 3
    assert s.session("k2", 4.0) is None
    assert all(s.session(k, 4.0) is not None for k in ("k1", "k3", "k4"))
    s.pick(PickRequest(key="k5"), rng, 500.0)  # everything else has expired: purged
    assert len(s) == 1
    s.forget("k5")
    assert len(s) == 0


def test_affinity_passes_keyless_requests_and_feedback_through() -> None:
    inner = BoundedLoad()
    s = SessionAffinity(inner)
    s.update(eps(["a", "b"]))
    node = s.pick(EMPTY_REQUEST, random.Random(0), 0.0)
    assert len(s) == 0
    s.on_start(node, 0.0)
    assert inner.load(node) == 1
    s.on_finish(node, 0.01, True, 0.1)
    assert inner.load(node) == 0
    assert s.inner is inner
    with pytest.raises(ValueError):
        SessionAffinity(inner, ttl=0.0)
    with pytest.raises(ValueError):
        SessionAffinity(inner, max_sessions=0)


def test_affinity_over_maglev_survives_a_node_joining() -> None:
    s = SessionAffinity(Maglev())
    names = names_of(20)
    s.update(eps(names))
    rng = random.Random(0)
    keys = [f"sess-{i}" for i in range(300)]
    before = {k: s.pick(PickRequest(key=k), rng, 0.0) for k in keys}
    s.update(eps([*names, "newcomer"]))
    after = {k: s.pick(PickRequest(key=k), rng, 1.0) for k in keys}
    assert after == before  # Maglev alone would move about 1/21 of them
    plain = Maglev()
    plain.update(eps([*names, "newcomer"]))
    assert any(plain.pick(PickRequest(key=k), rng, 0.0) != before[k] for k in keys)
