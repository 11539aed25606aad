"""Registry query language: building, parsing and matching conditions (table-driven)."""

from __future__ import annotations

import msgspec
import pytest

from agentcluster.coordination.query import (
    Cond,
    QueryError,
    compile_query,
    cond,
    matches,
    matches_all,
    parse_cond,
)
from agentcluster.coordination.registry import AgentEntry

# ----------------------------------------------------------------------------- parse_cond

PARSE_OK: list[tuple[str, Cond]] = [
    ("capability=llm", Cond("capability", "eq", "llm")),
    ("capability == llm", Cond("capability", "eq", "llm")),
    ("health!=unhealthy", Cond("health", "neq", "unhealthy")),
    ("resources.gpu>=1", Cond("resources.gpu", "gte", 1)),
    ("resources.mem_gb<8", Cond("resources.mem_gb", "lt", 8)),
    ("resources.load <= 0.5", Cond("resources.load", "lte", 0.5)),
    ("resources.load>0.25", Cond("resources.load", "gt", 0.25)),
    ("resources.gpu=2", Cond("resources.gpu", "eq", 2)),
    ("node in n1,n2", Cond("node", "in", ("n1", "n2"))),
    ("node in n1, n2 ,n3", Cond("node", "in", ("n1", "n2", "n3"))),
    ("metadata.zone not_in a,b", Cond("metadata.zone", "not_in", ("a", "b"))),
    ("resources.gpu in 1,2", Cond("resources.gpu", "in", (1, 2))),
    ("resources.load gte 2", Cond("resources.load", "gte", 2)),
    ("name lt m", Cond("name", "lt", "m")),
    ("metadata.k8s.io/zone=eu-1", Cond("metadata.k8s.io/zone", "eq", "eu-1")),
    ("id=n1/worker", Cond("id", "eq", "n1/worker")),
    ("  health = degraded  ", Cond("health", "eq", "degraded")),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_OK)
def test_parse_cond_accepts(text: str, expected: Cond) -> None:
    got = parse_cond(text)
    assert got == expected
    assert type(got.value) is type(expected.value)


PARSE_BAD: list[tuple[str, str]] = [
    ("", "cannot parse condition"),
    ("capability", "cannot parse condition"),
    ("capability=", "missing value"),
    ("colour=red", "unknown field 'colour'"),
    ("resources.gpu>=lots", "'lots' is not a number"),
    ("resources.gpu>=nan", "not a finite number"),
    ("resources.gpu in 1,,2", "empty item"),
    ("node in a,", "empty item"),
    ("capability>llm", "capability is a set"),
    ("health=sick", "health is one of"),
    ("resources.=3", "needs a key after the dot"),
    ("metadata.=x", "needs a key after the dot"),
]


@pytest.mark.parametrize(("text", "message"), PARSE_BAD)
def test_parse_cond_rejects(text: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_cond(text)


COND_BAD: list[tuple[str, str, object, str]] = [
    ("capability", "like", "x", "unknown op 'like'"),
    ("node", "in", "n1", "in needs a list"),
    ("node", "not_in", [], "at least one value"),
    ("resources.gpu", "gte", "1", "resources.gpu needs a number"),
    ("resources.gpu", "gte", True, "resources.gpu needs a number"),
    ("resources.gpu", "lt", float("inf"), "must be finite"),
    ("resources.gpu", "in", [1, "x"], "resources.gpu needs a number"),
    ("node", "eq", 3, "node needs a string"),
    ("metadata.zone", "gt", 1.5, "metadata.zone needs a string"),
    ("capability", "gte", "a", "capability is a set"),
    ("cpu", "eq", "x", "unknown field 'cpu'"),
]


@pytest.mark.parametrize(("field", "op", "value", "message"), COND_BAD)
def test_cond_rejects_with_a_message_naming_the_fault(
    field: str, op: str, value: object, message: str
) -> None:
    with pytest.raises(QueryError, match=message) as info:
        cond(field, op, value)
    assert field in str(info.value)


def test_cond_round_trips_through_msgpack() -> None:
    c = cond("resources.gpu", "in", [1, 2.5])
    data = msgspec.msgpack.encode(c)
    assert msgspec.msgpack.decode(data, type=Cond) == c


# ----------------------------------------------------------------------------- matches

E = AgentEntry(
    id="n1/a",
    name="alpha",
    node="n1",
    capabilities=("llm", "embed"),
    health="degraded",
    resources={"gpu": 2.0, "load": 0.5},
    metadata={"zone": "eu"},
)

MATCH: list[tuple[str, str, object, bool]] = [
    # scalar fields: string comparisons
    ("id", "eq", "n1/a", True),
    ("id", "neq", "n1/a", False),
    ("name", "in", ["beta", "alpha"], True),
    ("name", "not_in", ["beta", "alpha"], False),
    ("name", "gt", "aaa", True),
    ("name", "lt", "aaa", False),
    ("name", "gte", "alpha", True),
    ("name", "lte", "alpha", True),
    ("node", "eq", "n2", False),
    ("node", "neq", "n2", True),
    ("node", "in", ["n2", "n3"], False),
    ("node", "not_in", ["n2", "n3"], True),
    ("health", "eq", "degraded", True),
    ("health", "neq", "healthy", True),
    ("health", "in", ["healthy", "unknown"], False),
    ("health", "not_in", ["healthy", "unknown"], True),
    ("health", "lt", "e", True),
    # the set field
    ("capability", "eq", "llm", True),
    ("capability", "eq", "vision", False),
    ("capability", "neq", "llm", False),
    ("capability", "neq", "vision", True),
    ("capability", "in", ["vision", "embed"], True),
    ("capability", "in", ["vision", "ocr"], False),
    ("capability", "not_in", ["vision", "ocr"], True),
    ("capability", "not_in", ["vision", "llm"], False),
    # resources: numbers, int and float alike
    ("resources.gpu", "eq", 2, True),
    ("resources.gpu", "eq", 2.0, True),
    ("resources.gpu", "neq", 2, False),
    ("resources.gpu", "gt", 1, True),
    ("resources.gpu", "gt", 2, False),
    ("resources.gpu", "gte", 2, True),
    ("resources.gpu", "lt", 2, False),
    ("resources.gpu", "lte", 2, True),
    ("resources.gpu", "in", [1, 2], True),
    ("resources.gpu", "not_in", [1, 2], False),
    ("resources.load", "lt", 0.75, True),
    # a missing resource: only neq / not_in match
    ("resources.tpu", "eq", 0, False),
    ("resources.tpu", "neq", 0, True),
    ("resources.tpu", "gt", -1, False),
    ("resources.tpu", "gte", -1, False),
    ("resources.tpu", "lt", 100, False),
    ("resources.tpu", "lte", 100, False),
    ("resources.tpu", "in", [0, 1], False),
    ("resources.tpu", "not_in", [0, 1], True),
    # metadata: strings; missing keys behave like missing resources
    ("metadata.zone", "eq", "eu", True),
    ("metadata.zone", "neq", "eu", False),
    ("metadata.zone", "in", ["us", "eu"], True),
    ("metadata.zone", "not_in", ["us"], True),
    ("metadata.zone", "gt", "ap", True),
    ("metadata.zone", "lte", "ap", False),
    ("metadata.rack", "eq", "r1", False),
    ("metadata.rack", "neq", "r1", True),
    ("metadata.rack", "gt", "", False),
    ("metadata.rack", "in", ["r1"], False),
    ("metadata.rack", "not_in", ["r1"], True),
]


@pytest.mark.parametrize(("field", "op", "value", "expected"), MATCH)
def test_matches(field: str, op: str, value: object, expected: bool) -> None:
    assert matches(E, cond(field, op, value)) is expected


def test_conditions_are_anded() -> None:
    yes = cond("capability", "eq", "llm")
    no = cond("health", "eq", "healthy")
    assert matches_all(E, [yes])
    assert not matches_all(E, [yes, no])
    assert matches_all(E, [])


def test_directly_built_conditions_are_validated_when_compiled() -> None:
    # A Cond decoded from a peer skips cond(); compiling it still checks and normalises it.
    assert compile_query([Cond("node", "in", ["n1"])])([E]) == [E]  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="needs a number"):
        compile_query([Cond("resources.gpu", "gt", "1")])


def test_hostile_keys_are_data_not_code() -> None:
    # Keys reach the compiled filter as values, never as source text.
    key = "x') or __import__('os').system('false') or ('"
    e = msgspec.structs.replace(E, metadata={key: "v"})
    assert matches(e, cond("metadata." + key, "eq", "v"))
    assert not matches(E, cond("metadata." + key, "eq", "v"))
