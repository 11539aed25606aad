"""Router: matching semantics, ordering, errors, removal, predicates, and a property check."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.signals._signal import Signal, SignalError
from agentcluster.signals.router import (
    RouteError,
    RouteInfo,
    Router,
    UnknownRouteError,
    bench_router,
    pattern_matcher,
    validate_pattern,
)

# ----------------------------------------------------------------------------- semantics
MATCH_TABLE = [
    # pattern, type, matches
    ("cluster.member.suspect", "cluster.member.suspect", True),
    ("cluster.member.suspect", "cluster.member.alive", False),
    ("cluster.member.suspect", "cluster.member", False),
    ("cluster.member", "cluster.member.suspect", False),
    ("cluster.*.suspect", "cluster.member.suspect", True),
    ("cluster.*.suspect", "cluster.suspect", False),
    ("cluster.*.suspect", "cluster.a.b.suspect", False),
    ("cluster.*", "cluster", False),
    ("*", "cluster", True),
    ("*", "cluster.member", False),
    ("*.*", "a.b", True),
    ("cluster.**", "cluster", True),  # ** may match zero segments
    ("cluster.**", "cluster.member", True),
    ("cluster.**", "cluster.member.suspect.now", True),
    ("cluster.**", "clusters.member", False),
    ("**", "a", True),
    ("**", "a.b.c.d", True),
    ("**.alert.*", "cluster.health.alert.critical", True),
    ("**.alert.*", "alert.critical", True),
    ("**.alert.*", "cluster.alert", False),
    ("**.alert.*", "cluster.alert.critical.more", False),
    ("a.**.z", "a.z", True),
    ("a.**.z", "a.b.z", True),
    ("a.**.z", "a.b.c.d.z", True),
    ("a.**.z", "a.b.c", False),
    ("a.**.z", "b.a.z", False),
    ("**.**", "x", True),
    ("a.**.**.b", "a.b", True),
    ("a.**.**.b", "a.x.y.b", True),
    ("*.**", "a", True),
    ("*.**", "a.b.c", True),
    ("a-b_c.D9", "a-b_c.D9", True),
    ("a-b_c.D9", "a-b_c.d9", False),  # segments are case-sensitive
]


@pytest.mark.parametrize(("pattern", "type_", "expected"), MATCH_TABLE)
def test_match_table(pattern: str, type_: str, expected: bool) -> None:
    router: Router[str] = Router()
    router.add(pattern, "t")
    assert router.match(type_) == (["t"] if expected else [])
    assert router.match(Signal(type=type_)) == (["t"] if expected else [])
    assert pattern_matcher(pattern)(type_) is expected


def test_several_targets_per_pattern_in_insertion_order() -> None:
    router: Router[str] = Router()
    router.add("a.b", "first")
    router.add("a.b", "second")
    router.add("a.b", "third")
    assert router.match("a.b") == ["first", "second", "third"]


ORDER_TABLE: list[tuple[list[tuple[str, int]], str, list[int]]] = [
    # routes (pattern, priority); type; expected order as indexes into routes
    # priority beats specificity
    ([("a.b.c", 0), ("**", 5)], "a.b.c", [1, 0]),
    # more literal segments first
    ([("a.**", 0), ("a.b.*", 0), ("a.b.c", 0)], "a.b.c", [2, 1, 0]),
    # equal literals: more '*' first (a '*' pins the segment count)
    ([("a.**", 0), ("a.*.**", 0)], "a.b.c", [1, 0]),
    # '*' count outranks '**' count: "*.**.**" needs a segment, "**" does not
    ([("**", 0), ("*.**.**", 0)], "a.b", [1, 0]),
    # equal literals and '*': fewer '**' first
    ([("a.*.**", 0), ("a.*", 0)], "a.b", [1, 0]),
    # equal counts: literal further left wins
    ([("*.b", 0), ("a.*", 0)], "a.b", [1, 0]),
    ([("**.b", 0), ("a.**", 0)], "a.b", [1, 0]),
    # full tie: insertion order
    ([("a.*", 0), ("a.*", 0), ("a.*", 0)], "a.b", [0, 1, 2]),
    # negative priorities go last
    ([("a.b", -1), ("**", 0), ("a.*", -100)], "a.b", [1, 0, 2]),
]


@pytest.mark.parametrize(("routes", "type_", "expected"), ORDER_TABLE)
def test_ordering_table(routes: list[tuple[str, int]], type_: str, expected: list[int]) -> None:
    router: Router[int] = Router()
    for i, (pattern, priority) in enumerate(routes):
        router.add(pattern, i, priority=priority)
    assert router.match(type_) == expected


def test_ordering_is_independent_of_insertion_for_distinct_keys() -> None:
    patterns = ["**", "a.**", "*.b.*", "a.b.*", "a.b.c", "a.*.c", "**.c"]
    expected = ["a.b.c", "a.b.*", "a.*.c", "*.b.*", "a.**", "**.c", "**"]
    for rotation in range(len(patterns)):
        router: Router[str] = Router()
        for p in patterns[rotation:] + patterns[:rotation]:
            router.add(p, p)
        assert router.match("a.b.c") == expected


def test_duplicate_target_appears_once_at_best_position() -> None:
    router: Router[str] = Router()
    router.add("**", "x")
    router.add("a.**", "y")
    router.add("a.b", "x", priority=3)
    assert router.match("a.b") == ["x", "y"]
    assert router.match("a.c") == ["y", "x"]


def test_unhashable_targets_are_deduplicated_by_identity() -> None:
    router: Router[list[int]] = Router()
    one: list[int] = [1]
    other: list[int] = [1]  # equal but a different object
    router.add("a.*", one)
    router.add("**", one)
    router.add("a.b", other)
    result = router.match("a.b")
    assert len(result) == 2
    assert result[0] is other and result[1] is one
    assert router.remove_target(one) == 2
    assert router.match("a.b") == [other]


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "pattern",
    ["", ".", "a.", ".a", "a..b", "a.***", "a*", "*a", "a.b c", "a/b", "é", "a.*b"],
)
def test_bad_patterns_are_rejected_naming_the_pattern(pattern: str) -> None:
    router: Router[str] = Router()
    with pytest.raises(RouteError) as info:
        router.add(pattern, "t")
    assert repr(pattern) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert len(router) == 0


def test_non_string_pattern_is_rejected() -> None:
    with pytest.raises(RouteError, match="non-empty string"):
        validate_pattern(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("priority", [-101, 101, 1000])
def test_priority_out_of_range(priority: int) -> None:
    router: Router[str] = Router()
    with pytest.raises(RouteError, match=r"outside -100\.\.100"):
        router.add("a.b", "t", priority=priority)


@pytest.mark.parametrize("priority", [True, 1.5, "1"])
def test_priority_must_be_int(priority: Any) -> None:
    router: Router[str] = Router()
    with pytest.raises(RouteError, match="priority must be an int"):
        router.add("a.b", "t", priority=priority)


def test_priority_bounds_are_inclusive() -> None:
    router: Router[str] = Router()
    router.add("a", "low", priority=-100)
    router.add("a", "high", priority=100)
    assert router.match("a") == ["high", "low"]


def test_non_callable_predicate_is_rejected() -> None:
    router: Router[str] = Router()
    with pytest.raises(RouteError, match="predicate must be callable"):
        router.add("a", "t", predicate=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("type_", ["", "a..b", "a.*", "a.**", "a b"])
def test_match_rejects_malformed_types(type_: str) -> None:
    router: Router[str] = Router()
    router.add("**", "t")
    with pytest.raises(SignalError, match="invalid signal type"):
        router.match(type_)


def test_cache_size_validation() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        Router(cache_size=-1)


# ------------------------------------------------------------------------------ removal
def test_remove_route_and_unknown_id() -> None:
    router: Router[str] = Router()
    rid = router.add("a.*", "t")
    router.add("a.b", "u")
    assert router.match("a.b") == ["u", "t"]
    router.remove(rid)
    assert router.match("a.b") == ["u"]
    assert len(router) == 1
    with pytest.raises(UnknownRouteError, match=f"no route with id {rid}") as info:
        router.remove(rid)
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, RouteError)
    assert str(info.value) == f"no route with id {rid}"


def test_remove_target_counts_and_leaves_others() -> None:
    router: Router[str] = Router()
    router.add("a.**", "x")
    router.add("a.b", "x")
    router.add("**", "y")
    assert router.remove_target("x") == 2
    assert router.remove_target("x") == 0
    assert router.match("a.b") == ["y"]
    assert [info.target for info in router.routes()] == ["y"]


def test_removing_everything_prunes_the_trie_and_readding_works() -> None:
    router: Router[int] = Router()
    ids = [router.add(p, i) for i, p in enumerate(["a.b.c", "a.*.c", "a.**", "**.c", "*"])]
    for rid in ids:
        router.remove(rid)
    assert len(router) == 0
    assert router._root.empty()
    router.add("a.*.c", 7)
    assert router.match("a.b.c") == [7]


def test_removing_one_of_two_routes_sharing_a_path_keeps_the_other() -> None:
    router: Router[str] = Router()
    first = router.add("a.**.z", "first")
    router.add("a.**.z", "second")
    router.add("a.**", "prefix")
    router.remove(first)
    assert router.match("a.q.z") == ["second", "prefix"]


def test_cache_is_invalidated_by_add_and_remove() -> None:
    router: Router[str] = Router()
    router.add("a.*", "t")
    assert router.match("a.b") == ["t"]
    rid = router.add("a.b", "u")
    assert router.match("a.b") == ["u", "t"]
    router.remove(rid)
    assert router.match("a.b") == ["t"]


def test_small_cache_stays_correct_under_eviction() -> None:
    router: Router[str] = Router(cache_size=2)
    router.add("*.x", "x")
    router.add("a.*", "a")
    for _ in range(3):
        assert router.match("a.x") == ["a", "x"]
        assert router.match("b.x") == ["x"]
        assert router.match("a.y") == ["a"]
        assert router.match("q.q") == []
    assert len(router._cache) <= 2
    uncached: Router[str] = Router(cache_size=0)
    uncached.add("**", "all")
    assert uncached.match("z") == ["all"]
    assert len(uncached._cache) == 0


def test_match_returns_a_fresh_list() -> None:
    router: Router[str] = Router()
    router.add("a", "t")
    first = router.match("a")
    first.append("junk")
    assert router.match("a") == ["t"]


def test_routes_info_is_frozen_and_in_insertion_order() -> None:
    router: Router[str] = Router()
    r1 = router.add("a.**", "x", priority=2)
    r2 = router.add("b", "y", predicate=lambda s: True)
    infos = router.routes()
    assert infos == [
        RouteInfo(r1, "a.**", 2, "x", False),
        RouteInfo(r2, "b", 0, "y", True),
    ]
    with pytest.raises(AttributeError):
        infos[0].priority = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------- predicates
def test_predicate_routes_match_only_when_true() -> None:
    router: Router[str] = Router()
    router.add("job.*", "big", priority=1, predicate=lambda s: s.data["size"] > 10)
    router.add("job.*", "any")
    assert router.match(Signal(type="job.run", data={"size": 50})) == ["big", "any"]
    assert router.match(Signal(type="job.run", data={"size": 5})) == ["any"]


def test_predicate_routes_are_skipped_for_plain_type_strings() -> None:
    router: Router[str] = Router()
    router.add("job.*", "pred", predicate=lambda s: True)
    router.add("job.*", "plain")
    assert router.match("job.run") == ["plain"]
    assert router.match(Signal(type="job.run")) == ["pred", "plain"]


def test_raising_predicate_is_a_counted_non_match() -> None:
    router: Router[str] = Router()

    def boom(sig: Signal) -> bool:
        raise RuntimeError("predicate bug")

    router.add("a.*", "bad", priority=5, predicate=boom)
    router.add("a.*", "good")
    assert router.predicate_errors == 0
    assert router.match(Signal(type="a.b")) == ["good"]
    assert router.match(Signal(type="a.c")) == ["good"]
    assert router.predicate_errors == 2


def test_failed_predicate_lets_the_target_appear_via_another_route() -> None:
    router: Router[str] = Router()
    router.add("a.b", "x", priority=9, predicate=lambda s: s.data == "yes")
    router.add("a.**", "y", priority=5)
    router.add("**", "x")
    assert router.match(Signal(type="a.b", data="yes")) == ["x", "y"]
    assert router.match(Signal(type="a.b", data="no")) == ["y", "x"]


def test_predicates_run_on_every_call_even_when_cached() -> None:
    calls: list[str] = []

    def pred(sig: Signal) -> bool:
        calls.append(sig.id)
        return True

    router: Router[str] = Router()
    router.add("a", "t", predicate=pred)
    sigs = [Signal(type="a") for _ in range(3)]
    for sig in sigs:
        assert router.match(sig) == ["t"]
    assert calls == [s.id for s in sigs]


def test_bench_router_runs_and_reports_a_rate() -> None:
    rate = bench_router(n_routes=200, n_matches=5_000, seed=3)
    assert rate > 0


# ---------------------------------------------------------------------------- properties
SEGMENTS = ["a", "b", "c"]
pattern_st = st.lists(st.sampled_from([*SEGMENTS, "*", "**"]), min_size=1, max_size=4)
type_st = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5)


def naive_match(pattern: list[str], type_: list[str]) -> bool:
    """Reference semantics, written independently of the trie."""
    if not pattern:
        return not type_
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(naive_match(rest, type_[i:]) for i in range(len(type_) + 1))
    if not type_:
        return False
    if head in ("*", type_[0]):
        return naive_match(rest, type_[1:])
    return False


def spec_key(pattern: list[str], priority: int, index: int) -> tuple[Any, ...]:
    """The documented order: priority, literals, singles, fewer '**', leftmost, insertion."""
    rank = {"*": 1, "**": 0}
    literals = sum(1 for s in pattern if s not in rank)
    return (
        -priority,
        -literals,
        -pattern.count("*"),
        pattern.count("**"),
        tuple(-rank.get(s, 2) for s in pattern),
        index,
    )


@settings(max_examples=300, deadline=None)
@given(
    routes=st.lists(
        st.tuples(pattern_st, st.integers(min_value=-3, max_value=3)), min_size=1, max_size=12
    ),
    types=st.lists(type_st, min_size=1, max_size=8),
)
def test_property_match_equals_naive_with_documented_order(
    routes: list[tuple[list[str], int]], types: list[list[str]]
) -> None:
    router: Router[int] = Router()
    for i, (pattern, priority) in enumerate(routes):
        router.add(".".join(pattern), i, priority=priority)
    for type_ in types:
        result = router.match(".".join(type_))
        expected = [i for i, (p, _) in enumerate(routes) if naive_match(p, type_)]
        assert set(result) == set(expected)
        expected.sort(key=lambda i: spec_key(routes[i][0], routes[i][1], i))
        assert result == expected
        priorities = [routes[i][1] for i in result]
        assert priorities == sorted(priorities, reverse=True)


@settings(max_examples=200, deadline=None)
@given(
    routes=st.lists(
        st.tuples(
            pattern_st,
            st.integers(min_value=-2, max_value=2),
            st.sampled_from(["x", "y", "z"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=10,
    ),
    types=st.lists(st.tuples(type_st, st.booleans()), min_size=1, max_size=6),
)
def test_property_duplicates_and_predicates(
    routes: list[tuple[list[str], int, str, bool]], types: list[tuple[list[str], bool]]
) -> None:
    # A route with a predicate accepts a signal iff the signal's data is True.
    router: Router[str] = Router()
    for pattern, priority, target, has_pred in routes:
        pred = (lambda s: s.data is True) if has_pred else None
        router.add(".".join(pattern), target, priority=priority, predicate=pred)
    for type_, flag in types:
        ordered = sorted(range(len(routes)), key=lambda i: spec_key(routes[i][0], routes[i][1], i))
        firsts: list[str] = []
        for i in ordered:
            pattern, _, target, has_pred = routes[i]
            if naive_match(pattern, type_) and (not has_pred or flag) and target not in firsts:
                firsts.append(target)
        assert router.match(Signal(type=".".join(type_), data=flag)) == firsts
        plain = [
            t
            for i in ordered
            if naive_match(routes[i][0], type_) and not routes[i][3]
            for t in [routes[i][2]]
        ]
        assert router.match(".".join(type_)) == list(dict.fromkeys(plain))
