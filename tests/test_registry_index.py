"""RegistryIndex: queries equal a brute-force filter, the planner uses the indexes, helpers."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcluster.coordination.query import Cond, QueryError, cond, matches_all
from agentcluster.coordination.registry import (
    AgentEntry,
    RegistryIndex,
    name_rank,
    validate_entry,
)

CAPS = ["llm", "embed", "vision", "ocr", "plan"]
NODES = ["n1", "n2", "n3"]
HEALTH = ["healthy", "degraded", "unhealthy", "unknown"]
NAMES = ["a", "b", "c", "d"]


@st.composite
def entries(draw: st.DrawFn) -> AgentEntry:
    node = draw(st.sampled_from(NODES))
    return AgentEntry(
        id=f"{node}/{draw(st.integers(0, 30))}",
        name=draw(st.sampled_from(NAMES)),
        node=node,
        capabilities=tuple(draw(st.lists(st.sampled_from(CAPS), max_size=3))),
        health=draw(st.sampled_from(HEALTH)),
        resources=draw(
            st.dictionaries(st.sampled_from(["gpu", "load"]), st.integers(0, 3).map(float))
        ),
        metadata=draw(st.dictionaries(st.sampled_from(["zone"]), st.sampled_from(["a", "b"]))),
    )


def _value(field: str, many: bool) -> st.SearchStrategy[object]:
    if field.startswith("resources."):
        one: st.SearchStrategy[object] = st.integers(0, 3)
    else:
        domain = {
            "capability": CAPS,
            "node": NODES,
            "health": HEALTH,
            "name": NAMES,
            "id": ["n1/1", "n2/2", "n3/3"],
            "metadata.zone": ["a", "b"],
        }[field]
        one = st.sampled_from(domain)
    return st.lists(one, min_size=1, max_size=3) if many else one


@st.composite
def conds(draw: st.DrawFn) -> Cond:
    field = draw(
        st.sampled_from(
            [
                *("capability", "node", "health", "name", "id"),
                *("resources.gpu", "resources.load", "metadata.zone"),
            ]
        )
    )
    ops = ["eq", "neq", "in", "not_in"]
    if field != "capability":
        ops += ["gt", "lt", "gte", "lte"]
    op = draw(st.sampled_from(ops))
    return cond(field, op, draw(_value(field, op in ("in", "not_in"))))


def _index(es: list[AgentEntry]) -> tuple[RegistryIndex, dict[str, AgentEntry]]:
    idx = RegistryIndex()
    latest: dict[str, AgentEntry] = {}
    for e in es:
        idx.upsert(e)
        latest[e.id] = e
    return idx, latest


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries(), max_size=40), st.lists(conds(), max_size=4))
def test_query_equals_brute_force(es: list[AgentEntry], cs: list[Cond]) -> None:
    idx, latest = _index(es)
    expected = sorted((e for e in latest.values() if matches_all(e, cs)), key=lambda e: e.id)
    got = idx.query(cs)
    if any(c.field == "name" and c.op in ("eq", "in") for c in cs):
        # With a name condition the name's winner comes first; same set of entries.
        assert sorted(got, key=lambda e: e.id) == expected
    else:
        assert got == expected
    assert idx.query(cs, limit=2) == got[:2]


@settings(max_examples=150)
@given(
    st.lists(entries(), max_size=30),
    st.sampled_from(["resources.gpu", "metadata.zone", "node", "health"]),
    st.booleans(),
)
def test_order_by_matches_brute_force(es: list[AgentEntry], key: str, desc: bool) -> None:
    idx, latest = _index(es)
    by_id = sorted(latest.values(), key=lambda e: e.id)
    kind, _, sub = key.partition(".")
    if kind == "resources":
        have = [e for e in by_id if sub in e.resources]
        rest = [e for e in by_id if sub not in e.resources]
        want = sorted(have, key=lambda e: e.resources[sub], reverse=desc) + rest
    elif kind == "metadata":
        have = [e for e in by_id if sub in e.metadata]
        rest = [e for e in by_id if sub not in e.metadata]
        want = sorted(have, key=lambda e: e.metadata[sub], reverse=desc) + rest
    else:
        want = sorted(by_id, key=lambda e: getattr(e, key), reverse=desc)
    assert idx.query(order_by=key, descending=desc) == want


@settings(max_examples=100)
@given(st.lists(entries(), max_size=40), st.data())
def test_indexes_survive_updates_and_removals(es: list[AgentEntry], data: st.DataObject) -> None:
    idx, latest = _index(es)
    for id in data.draw(st.lists(st.sampled_from(sorted(latest) or ["x"]), max_size=10)):
        assert idx.remove(id) == latest.pop(id, None)
    rebuilt, _ = _index(list(latest.values()))
    assert idx.summary() == rebuilt.summary()
    for c in CAPS:
        assert idx.find_capable(c, healthy_only=False) == rebuilt.find_capable(
            c, healthy_only=False
        )
    assert idx.entries() == sorted(latest.values(), key=lambda e: e.id)


def _agent(i: int, caps: tuple[str, ...], health: str = "healthy", **res: float) -> AgentEntry:
    return AgentEntry(
        id=f"n{i % 3}/a{i:03d}",
        name=f"a{i}",
        node=f"n{i % 3}",
        capabilities=caps,
        health=health,  # type: ignore[arg-type]
        resources=dict(res),
    )


def _fleet() -> RegistryIndex:
    idx = RegistryIndex()
    for i in range(300):
        caps = ("common",) + (("rare",) if i % 50 == 0 else ())
        health = "healthy" if i % 4 else "degraded"
        idx.upsert(_agent(i, caps, health, load=(i * 7) % 10 / 10, gpu=float(i % 3)))
    return idx


PLAN: list[tuple[list[Cond], str | None, int]] = [
    ([cond("capability", "eq", "rare"), cond("health", "neq", "healthy")], "capability", 6),
    ([cond("health", "eq", "degraded"), cond("capability", "in", ["rare"])], "capability", 6),
    ([cond("capability", "eq", "common"), cond("health", "in", ["degraded"])], "health", 75),
    # "capable and healthy" comes straight from the composite index.
    ([cond("capability", "eq", "rare"), cond("health", "eq", "healthy")], "capability+health", 3),
    (
        [cond("health", "eq", "degraded"), cond("capability", "eq", "common")],
        "capability+health",
        75,
    ),
    ([cond("health", "eq", "healthy"), cond("capability", "eq", "nope")], "capability+health", 0),
    (
        [
            cond("capability", "eq", "common"),
            cond("health", "eq", "healthy"),
            cond("node", "eq", "n1"),
        ],
        "node",
        100,
    ),
    ([cond("node", "in", ["n1", "n2"])], "node", 200),
    ([cond("id", "eq", "n0/a000"), cond("capability", "eq", "common")], "id", 1),
    ([cond("capability", "eq", "nope")], "capability", 0),
    ([cond("resources.gpu", "gte", 1)], None, 300),
    ([cond("capability", "neq", "rare")], None, 300),
]


@pytest.mark.parametrize(("cs", "field", "scanned"), PLAN)
def test_planner_scans_only_the_most_selective_index(
    cs: list[Cond], field: str | None, scanned: int
) -> None:
    idx = _fleet()
    assert idx.explain(cs) == (field, scanned)
    result = idx.query(cs)
    assert idx.last_scanned == scanned
    assert result == [e for e in idx.entries() if matches_all(e, cs)]


def test_helpers() -> None:
    idx = _fleet()
    rare = idx.find_capable("rare")
    assert [e.id for e in rare] == sorted(e.id for e in rare)
    assert all(e.health == "healthy" and "rare" in e.capabilities for e in rare)
    assert len(idx.find_capable("rare", healthy_only=False)) == 6
    assert idx.find_capable("nope") == []

    least = idx.least_loaded("common", n=3)
    loads = sorted((e.resources["load"], e.id) for e in idx.entries() if e.health == "healthy")
    assert [(e.resources["load"], e.id) for e in least] == loads[:3]
    assert idx.least_loaded(n=1, resource="gpu", healthy_only=False)[0].id == "n0/a000"
    assert idx.least_loaded("nope") == []
    assert idx.least_loaded(resource="tpu") == []  # nobody reports it: nobody is "least"

    gpus = idx.with_resource("gpu", 2)
    assert len(gpus) == 100 and all(e.resources["gpu"] >= 2 for e in gpus)
    assert [e.id for e in idx.with_resource("gpu", 1, capability="rare")] == [
        e.id for e in idx.find_capable("rare", healthy_only=False) if e.resources["gpu"] >= 1
    ]
    assert idx.count_by_capability() == {"common": 300, "rare": 6}
    assert idx.summary() == {
        "agents": 300,
        "nodes": {"n0": 100, "n1": 100, "n2": 100},
        "health": {"degraded": 75, "healthy": 225},
        "capabilities": {"common": 300, "rare": 6},
    }


def test_remove_node_and_updates_move_entries_between_buckets() -> None:
    idx = _fleet()
    gone = idx.remove_node("n1")
    assert len(gone) == 100 and all(e.node == "n1" for e in gone)
    assert idx.nodes() == ["n0", "n2"] and len(idx) == 200
    assert idx.remove_node("n1") == []
    e = idx.entries()[0]
    moved = msgspec.structs.replace(e, capabilities=("new",), health="unhealthy", node="n9")
    assert idx.upsert(moved) == e
    assert e.id not in {x.id for x in idx.find_capable("common", healthy_only=False)}
    assert idx.find_capable("new", healthy_only=False) == [moved]
    assert idx.query([cond("node", "eq", "n9")]) == [moved]
    assert idx.query([cond("health", "eq", "unhealthy")]) == [moved]
    assert e.id in idx and "nope" not in idx and idx.get(e.id) == moved


def test_a_load_update_keeps_the_bucket_order() -> None:
    idx = _fleet()
    before = [e.id for e in idx.find_capable("common", healthy_only=False)]
    e = idx.entries()[5]
    idx.upsert(msgspec.structs.replace(e, resources={"load": 9.0}))
    after = idx.find_capable("common", healthy_only=False)
    assert [x.id for x in after] == before
    assert after[5].resources == {"load": 9.0}


def test_query_never_exposes_internal_lists() -> None:
    idx = _fleet()
    got = idx.query([cond("capability", "eq", "rare")])
    got.clear()
    assert len(idx.query([cond("capability", "eq", "rare")])) == 6
    with pytest.raises(QueryError, match="cannot order by"):
        idx.query(order_by="colour")


def _named(node: str, token: int, at: float, unique: bool = True) -> AgentEntry:
    return AgentEntry(
        id=f"{node}/x", name="leader", node=node, unique=unique, name_token=token, registered_at=at
    )


NAME_RANK: list[tuple[list[AgentEntry], str]] = [
    ([_named("a", 0, 1.0), _named("b", 7, 9.0)], "b"),  # a store token beats none
    ([_named("a", 9, 1.0), _named("b", 7, 9.0)], "b"),  # lower token wins
    ([_named("a", 0, 5.0), _named("b", 0, 3.0)], "b"),  # then earlier registration
    ([_named("b", 0, 3.0), _named("a", 0, 3.0)], "a"),  # then lower (node, id)
    ([_named("a", 0, 1.0, unique=False), _named("b", 0, 9.0)], "b"),  # unique first
]


@pytest.mark.parametrize(("es", "winner"), NAME_RANK)
def test_by_name_puts_the_winner_first(es: list[AgentEntry], winner: str) -> None:
    idx = RegistryIndex(es)
    assert idx.by_name("leader")[0].node == winner
    assert idx.query([cond("name", "eq", "leader")])[0].node == winner
    assert min(es, key=name_rank).node == winner


VALIDATE_BAD: list[tuple[dict[str, object], str]] = [
    ({"id": ""}, "agent id must not be empty"),
    ({"name": ""}, "agent name must not be empty"),
    ({"node": ""}, "agent node must not be empty"),
    ({"name": "x" * 257}, "at most 256"),
    ({"capabilities": tuple(f"c{i}" for i in range(65))}, "65 capabilities"),
    ({"capabilities": ("",)}, "empty capability"),
    ({"resources": {f"r{i}": 1.0 for i in range(65)}}, "65 resources"),
    ({"metadata": {"k": "v" * 300}}, "metadata 'k'"),
    ({"resources": {"load": float("nan")}}, "not a finite number"),
    ({"resources": {"load": float("inf")}}, "not a finite number"),
    ({"name_token": -1}, "negative name_token"),
]


@pytest.mark.parametrize(("change", "message"), VALIDATE_BAD)
def test_validate_entry_rejects(change: dict[str, object], message: str) -> None:
    good = AgentEntry(id="n1/a", name="a", node="n1", capabilities=("llm",))
    validate_entry(good)
    with pytest.raises(ValueError, match=message):
        validate_entry(msgspec.structs.replace(good, **change))


def test_memoised_results_follow_every_change() -> None:
    idx = RegistryIndex()
    a = AgentEntry(id="n1/a", name="a", node="n1", capabilities=("llm",), resources={"gpu": 1})
    b = AgentEntry(id="n2/b", name="b", node="n2", capabilities=("db",))
    idx.upsert(a)
    idx.upsert(b)
    q = [cond("capability", "eq", "llm"), cond("resources.gpu", "gte", 1)]
    assert [e.id for e in idx.query(q)] == ["n1/a"]
    hits = idx.memo_hits
    assert [e.id for e in idx.query(q)] == ["n1/a"] and idx.memo_hits == hits + 1
    # A change to another capability's entries keeps the memo; one to this capability's not.
    idx.upsert(msgspec.structs.replace(b, resources={"gpu": 4}))
    assert [e.id for e in idx.query(q)] == ["n1/a"] and idx.memo_hits == hits + 2
    idx.upsert(msgspec.structs.replace(a, resources={"gpu": 0}))
    assert idx.query(q) == []
    # An entry that gains the capability, and one that goes away.
    idx.upsert(msgspec.structs.replace(b, capabilities=("db", "llm"), resources={"gpu": 2}))
    assert [e.id for e in idx.query(q)] == ["n2/b"]
    idx.remove("n2/b")
    assert idx.query(q) == []
    # Queries without a capability condition follow any change; results are fresh lists.
    everyone = idx.query([cond("health", "eq", "healthy")])
    everyone.clear()
    assert [e.id for e in idx.query([cond("health", "eq", "healthy")])] == ["n1/a"]
    idx.upsert(b)
    assert len(idx.query([cond("health", "eq", "healthy")])) == 2
