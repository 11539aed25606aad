"""The linearizability checker: classic histories, unknown outcomes, reports, and a brute-force
oracle that every reduction in the search must agree with."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcluster.testing import (
    UNKNOWN,
    Cas,
    CompareAndSwap,
    Delete,
    Get,
    HistoryRecorder,
    KeepAlive,
    KVModel,
    LeasePut,
    LeaseRevoke,
    Model,
    Operation,
    Put,
    Read,
    RegisterModel,
    Write,
    check_linearizability,
)
from agentcluster.testing.linearizability import check

INF = math.inf


def op(client: int, call: float, ret: float, input: Any, output: Any = None) -> Operation:
    return Operation(client, call, ret, input, output)


def unknown(client: int, call: float, input: Any) -> Operation:
    return Operation(client, call, INF, input, UNKNOWN)


# --- A single register: the classic cases ----------------------------------------------------

REGISTER_CASES: list[tuple[str, list[Operation], bool]] = [
    ("empty history", [], True),
    ("read of the initial value", [op(0, 0, 1, Read(), None)], True),
    ("sequential write then read", [op(0, 0, 1, Write(1)), op(1, 2, 3, Read(), 1)], True),
    (
        "stale read after a completed write",
        [op(0, 0, 1, Write(1)), op(0, 2, 3, Write(2)), op(1, 4, 5, Read(), 1)],
        False,
    ),
    (
        "concurrent read sees the old value",
        [op(0, 0, 10, Write(1)), op(1, 1, 2, Read(), None)],
        True,
    ),
    ("concurrent read sees the new value", [op(0, 0, 10, Write(1)), op(1, 1, 2, Read(), 1)], True),
    (
        "read of a value never written",
        [op(0, 0, 10, Write(1)), op(1, 1, 2, Read(), 7)],
        False,
    ),
    (
        "touching intervals are concurrent",
        [op(0, 0, 1, Write(1)), op(1, 1, 2, Read(), None)],
        True,
    ),
    (
        "a read that starts after the write returned must see it",
        [op(0, 0, 1, Write(1)), op(1, 1.5, 2, Read(), None)],
        False,
    ),
    (
        "two concurrent writes seen in both orders",
        [
            op(0, 0, 10, Write(1)),
            op(1, 0, 10, Write(2)),
            op(2, 1, 2, Read(), 1),
            op(2, 3, 4, Read(), 2),
            op(3, 5, 6, Read(), 1),
        ],
        False,
    ),
    (
        "two concurrent writes seen in one order",
        [
            op(0, 0, 10, Write(1)),
            op(1, 0, 10, Write(2)),
            op(2, 1, 2, Read(), 1),
            op(3, 3, 4, Read(), 2),
            op(2, 5, 6, Read(), 2),
        ],
        True,
    ),
    (
        "cas from the right value",
        [op(0, 0, 1, Write(1)), op(0, 2, 3, CompareAndSwap(1, 2), True), op(1, 4, 5, Read(), 2)],
        True,
    ),
    (
        "cas succeeding from the wrong value",
        [op(0, 0, 1, Write(1)), op(0, 2, 3, CompareAndSwap(5, 2), True)],
        False,
    ),
    (
        "cas failing although the value matched",
        [op(0, 0, 1, Write(1)), op(0, 2, 3, CompareAndSwap(1, 2), False)],
        False,
    ),
    (
        "a read concurrent with a successful cas may come before it",
        [op(0, 0, 1, Write(1)), op(0, 2, 5, CompareAndSwap(1, 2), True), op(1, 3, 4, Read(), 1)],
        True,
    ),
    (
        "two concurrent cas from the same value both succeed",
        [op(0, 0, 5, CompareAndSwap(None, 1), True), op(1, 0, 5, CompareAndSwap(None, 2), True)],
        False,
    ),
    (
        "two concurrent cas from the same value, one wins",
        [
            op(0, 0, 5, CompareAndSwap(None, 1), True),
            op(1, 0, 5, CompareAndSwap(None, 2), False),
            op(2, 6, 7, Read(), 1),
        ],
        True,
    ),
    # Unknown outcomes: may have happened (at any time after the call, even much later) or not.
    ("unknown write that was applied", [unknown(0, 0, Write(1)), op(1, 5, 6, Read(), 1)], True),
    (
        "unknown write that was not applied",
        [unknown(0, 0, Write(1)), op(1, 5, 6, Read(), None)],
        True,
    ),
    (
        "unknown write that landed late",
        [unknown(0, 0, Write(1)), op(1, 5, 6, Read(), None), op(1, 7, 8, Read(), 1)],
        True,
    ),
    (
        "unknown write cannot be undone",
        [unknown(0, 0, Write(1)), op(1, 5, 6, Read(), 1), op(1, 7, 8, Read(), None)],
        False,
    ),
    (
        "unknown write cannot take effect before its call",
        [op(1, 0, 1, Read(), 1), unknown(0, 2, Write(1))],
        False,
    ),
    (
        "read of a value no operation wrote, among unknown writes",
        [unknown(0, 0, Write(1)), unknown(1, 0, Write(2)), op(2, 5, 6, Read(), 3)],
        False,
    ),
    (
        "an unknown write takes effect at most once",
        [
            unknown(0, 0, Write(1)),
            op(1, 1, 1.5, Read(), 1),
            op(2, 2, 3, Write(2)),
            op(1, 4, 5, Read(), 2),
            op(1, 6, 7, Read(), 1),
        ],
        False,
    ),
    (
        "an unknown write saved for a later read",
        [
            op(2, 1, 2, Read(), 1),
            op(0, 3, 5, Write(0)),
            op(1, 3, 5, Write(2)),
            unknown(3, 1, Write(1)),
            op(4, 1, 1, Write(1)),
            op(2, 6, 7, Read(), 1),
        ],
        True,
    ),
    (
        "an unknown cas that could have succeeded",
        [unknown(0, 0, CompareAndSwap(None, 1)), op(1, 5, 6, Read(), 1)],
        True,
    ),
    (
        "an unknown cas that could not have succeeded",
        [op(0, 0, 1, Write(2)), unknown(0, 2, CompareAndSwap(None, 1)), op(1, 5, 6, Read(), 1)],
        False,
    ),
    (
        "an unknown read is ignored",
        [op(0, 0, 1, Write(2)), unknown(1, 2, Read()), op(1, 5, 6, Read(), 2)],
        True,
    ),
    (
        "UNKNOWN output with a finite return may still land later",
        [
            Operation(0, 0, 1, Write(1), UNKNOWN),
            op(1, 5, 6, Read(), None),
            op(1, 7, 8, Read(), 1),
        ],
        True,
    ),
]


@pytest.mark.parametrize(
    ("history", "expected"),
    [pytest.param(h, ok, id=name) for name, h, ok in REGISTER_CASES],
)
def test_register_histories(history: list[Operation], expected: bool) -> None:
    result = check(history, RegisterModel())
    assert result.ok is expected, result.report()
    assert not result.partial
    assert len(result.violations) == (0 if expected else 1)
    assert oracle(history, RegisterModel()) is expected  # the cases are right, too


# --- The key-value store ---------------------------------------------------------------------

KV_CASES: list[tuple[str, list[Operation], bool]] = [
    (
        "independent keys",
        [op(0, 0, 1, Put("a", b"1")), op(1, 0, 1, Put("b", b"2")), op(2, 2, 3, Get("a"), b"1")],
        True,
    ),
    (
        "a read of another key's value",
        [op(0, 0, 1, Put("a", b"1")), op(1, 2, 3, Get("b"), b"1")],
        False,
    ),
    (
        "delete then get",
        [op(0, 0, 1, Put("a", b"1")), op(0, 2, 3, Delete("a"), 1), op(1, 4, 5, Get("a"), None)],
        True,
    ),
    ("delete count of an absent key", [op(0, 0, 1, Delete("a"), 1)], False),
    ("delete with an unchecked output", [op(0, 0, 1, Delete("a"), None)], True),
    (
        "cas expecting absence",
        [op(0, 0, 1, Cas("a", None, b"1"), True), op(1, 2, 3, Cas("a", None, b"2"), False)],
        True,
    ),
    (
        "cas expecting absence on a present key",
        [op(0, 0, 1, Put("a", b"0")), op(1, 2, 3, Cas("a", None, b"2"), True)],
        False,
    ),
    (
        "unknown delete that was applied",
        [op(0, 0, 1, Put("a", b"0")), unknown(0, 2, Delete("a")), op(1, 5, 6, Get("a"), None)],
        True,
    ),
    (
        "a lost write on one key, fine elsewhere",
        [
            op(0, 0, 1, Put("a", b"1")),
            op(1, 0, 1, Put("b", b"1")),
            op(0, 2, 3, Get("a"), b"1"),
            op(1, 2, 3, Get("b"), None),
        ],
        False,
    ),
]


LEASE_CASES: list[tuple[str, list[Operation], bool]] = [
    (
        "a revocation removes the keys attached to the lease",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            op(0, 2, 3, LeaseRevoke(7)),
            op(1, 4, 5, Get("x"), None),
        ],
        True,
    ),
    (
        "a leased key read after its lease was revoked",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            op(0, 2, 3, LeaseRevoke(7)),
            op(1, 4, 5, Get("x"), "1"),
        ],
        False,
    ),
    (
        "a plain put detaches the key from its lease",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            op(0, 2, 3, Put("x", "2")),
            op(0, 4, 5, LeaseRevoke(7)),
            op(1, 6, 7, Get("x"), "2"),
        ],
        True,
    ),
    (
        "a detached key vanishing with its old lease",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            op(0, 2, 3, Put("x", "2")),
            op(0, 4, 5, LeaseRevoke(7)),
            op(1, 6, 7, Get("x"), None),
        ],
        False,
    ),
    (
        "re-attached to another lease, it survives the first",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            op(0, 2, 3, LeasePut("x", "2", 8), True),
            op(0, 4, 5, LeaseRevoke(7)),
            op(1, 6, 7, Get("x"), "2"),
        ],
        True,
    ),
    (
        "a put on a revoked lease succeeding",
        [op(0, 0, 1, LeaseRevoke(7)), op(1, 2, 3, LeasePut("x", "1", 7), True)],
        False,
    ),
    (
        "a put on a revoked lease refused, changing nothing",
        [
            op(0, 0, 1, Put("x", "0")),
            op(0, 2, 3, LeaseRevoke(7)),
            op(1, 4, 5, LeasePut("x", "1", 7), False),
            op(1, 6, 7, Get("x"), "0"),
        ],
        True,
    ),
    ("a put refused on a live lease", [op(0, 0, 1, LeasePut("x", "1", 7), False)], False),
    (
        "keep-alive after the revocation",
        [op(0, 0, 1, LeaseRevoke(7)), op(1, 2, 3, KeepAlive(7), True)],
        False,
    ),
    (
        "keep-alive concurrent with the revocation",
        [
            op(0, 0, 3, LeaseRevoke(7)),
            op(1, 1, 2, KeepAlive(7), True),
            op(2, 4, 5, KeepAlive(7), False),
        ],
        True,
    ),
    (
        "one revocation removes two keys at once",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            op(0, 2, 3, LeasePut("y", "2", 7), True),
            op(1, 4, 9, LeaseRevoke(7)),
            op(2, 5, 6, Get("x"), None),
            op(3, 7, 8, Get("y"), "2"),
        ],
        False,
    ),
    (
        "an unknown revocation lands between two reads",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            unknown(0, 2, LeaseRevoke(7)),
            op(1, 3, 4, Get("x"), "1"),
            op(1, 5, 6, Get("x"), None),
        ],
        True,
    ),
    (
        "a key back after an unknown revocation removed it",
        [
            op(0, 0, 1, LeasePut("x", "1", 7), True),
            unknown(0, 2, LeaseRevoke(7)),
            op(1, 3, 4, Get("x"), None),
            op(1, 5, 6, Get("x"), "1"),
        ],
        False,
    ),
    (
        "an unknown put on a lease revoked before it",
        [
            op(0, 0, 1, LeaseRevoke(7)),
            unknown(1, 2, LeasePut("x", "1", 7)),
            op(2, 3, 4, Get("x"), "1"),
        ],
        False,
    ),
]


@pytest.mark.parametrize(
    ("history", "expected"), [pytest.param(h, ok, id=name) for name, h, ok in LEASE_CASES]
)
def test_lease_histories(history: list[Operation], expected: bool) -> None:
    result = check(history, KVModel())
    assert result.ok is expected, result.report()
    assert oracle(history, KVModel()) is expected


def test_leases_join_partitions_only_where_they_link_keys() -> None:
    history = [
        op(0, 0, 1, Put("a", "1")),
        op(0, 2, 3, LeasePut("x", "2", 7), True),
        op(1, 0, 1, LeasePut("y", "3", 7), True),
        op(1, 2, 3, LeasePut("z", "4", 8), True),
        op(2, 0, 1, KeepAlive(9), True),
        op(2, 2, 3, Get("z"), "4"),
    ]
    parts = KVModel().partition(history)
    labels = sorted(KVModel().describe_partition(p) for p in parts)
    assert labels == ["key 'a'", "key 'z' with lease 8", "keys 'x', 'y' with lease 7", "lease 9"]
    result = check([*history, op(3, 4, 5, LeaseRevoke(7)), op(3, 6, 7, Get("y"), "3")], KVModel())
    assert not result.ok
    assert [v.label for v in result.violations] == ["keys 'x', 'y' with lease 7"]
    assert "revoke lease 7" in result.report()


@pytest.mark.parametrize(
    ("history", "expected"), [pytest.param(h, ok, id=name) for name, h, ok in KV_CASES]
)
def test_kv_histories(history: list[Operation], expected: bool) -> None:
    result = check(history, KVModel())
    assert result.ok is expected, result.report()
    assert oracle(history, KVModel()) is expected


def test_violation_is_isolated_to_its_key_and_reported() -> None:
    history = []
    for i, key in enumerate(["k1", "k2", "k3"]):
        history.append(Operation(i, 0.0, 1.0, Put(key, b"v1"), None, f"put-{key}"))
        history.append(Operation(i, 2.0, 3.0, Get(key), b"v1", f"get-{key}"))
    history.append(Operation(7, 4.0, 5.0, Get("k2"), b"zzz", "bad"))
    result = check_linearizability(history, KVModel())
    assert not result.ok and not result.partial
    assert result.partitions == 3 and result.partitions_checked == 3
    assert [v.label for v in result.violations] == ["key 'k2'"]
    violation = result.violations[0]
    assert violation.definite and len(violation.prefix) == 2
    assert [c.op.id for c in violation.candidates] == ["bad"]
    assert violation.candidates[0].expected == b"v1" and not violation.candidates[0].accepted
    text = result.report()
    assert "NOT LINEARIZABLE" in text
    assert "key 'k2'" in text and "'k1'" not in text
    assert "#bad client 7 [4.000000 .. 5.000000] get 'k2' -> b'zzz'" in text
    assert "model state after it: 'k2' = b'v1'" in text
    assert "the model would return b'v1'" in text


def test_report_of_an_ok_history() -> None:
    result = check([op(0, 0, 1, Put("a", b"1"))], KVModel())
    assert result.ok and result.report().startswith("linearizable: 1 of 1 partition(s)")


def test_timeout_gives_partial_never_ok() -> None:
    # Twenty concurrent writes and a read of a value none wrote: refuting it means trying every
    # subset of the writes in every order, far more than the timeout allows.
    history = [op(i, 0, 10, Write(i)) for i in range(20)]
    history.append(op(99, 1, 9, Read(), "never"))
    result = check(history, RegisterModel(), timeout=0.05)
    assert result.partial and not result.ok
    assert result.violations == () and len(result.undecided) == 1
    assert result.partitions_checked == 0 and result.explored > 0
    assert not result.undecided[0].definite
    assert "UNDECIDED" in result.report() and "timeout" in result.report()


def test_zero_timeout_decides_nothing() -> None:
    result = check([op(0, 0, 1, Put("a", b"1")), op(0, 0, 1, Put("b", b"1"))], KVModel(), timeout=0)
    assert result.partial and not result.ok and len(result.undecided) == 2


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (Operation(0, 2.0, 1.0, Write(1), None), ValueError),
        (Operation(0, INF, INF, Write(1), UNKNOWN), ValueError),
        (Operation(0, 0.0, INF, Write(1), None), ValueError),
        (Operation(0, 0.0, 1.0, "not an input", None), TypeError),
        (Operation(0, 0.0, 1.0, CompareAndSwap(1, 2), "yes"), TypeError),
    ],
)
def test_malformed_operations_raise(bad: Operation, error: type[Exception]) -> None:
    with pytest.raises(error):
        check([op(1, 0, 1, Write(1)), bad], RegisterModel(initial=1))


class Counter(Model[int]):
    """A model without partitioning or read-only hints: the generic path. Unlike a register,
    an op here can be legal in two states and lead to two different ones."""

    def init(self) -> int:
        return 0

    def step(self, state: int, input: Any, output: Any) -> tuple[bool, int]:
        if input == "inc":
            return output is UNKNOWN or output == state + 1, state + 1
        if input == "reset":
            return True, 0
        return output is UNKNOWN or output == state, state


def test_a_custom_model() -> None:
    both_one = [op(0, 0, 5, "inc", 1), op(1, 0, 5, "inc", 1)]
    in_order = [op(0, 0, 5, "inc", 2), op(1, 0, 5, "inc", 1), op(2, 6, 7, "read", 2)]
    assert not check(both_one, Counter()).ok
    assert check(in_order, Counter()).ok
    report = check(both_one, Counter()).report()
    assert "partition #0" in report and "'inc' -> 1" in report


def test_two_unknown_ops_can_both_take_effect() -> None:
    # The second unknown inc is legal with or without the first, but leads elsewhere: it is
    # not made pointless by it.
    history = [unknown(0, 0, "inc"), unknown(1, 0, "inc"), op(2, 1, 2, "read", 2)]
    assert check(history, Counter()).ok


def test_configurations_differ_by_which_unknown_op_was_used() -> None:
    # Either unknown op explains the first read, but only the blind write can explain the
    # second (the cas needs an absent value): the search must not treat "used the write" and
    # "used the cas" as the same configuration.
    history = [
        unknown(0, 0, Write(1)),
        unknown(1, 0, CompareAndSwap(None, 1)),
        op(2, 1, 2, Read(), 1),
        op(2, 3, 4, Write(0)),
        op(2, 5, 6, Read(), 1),
    ]
    assert check(history, RegisterModel()).ok
    assert oracle(history, RegisterModel())


def exhaustive(history: Sequence[Operation], model: Model[Any]) -> bool:
    """The search without any of its reductions: every order of the known ops plus any subset
    of the unknown ones that respects real time, through ``model.step``."""
    ops = list(history)
    known = [i for i, o in enumerate(ops) if o.output is not UNKNOWN and o.ret != INF]

    def search(done: frozenset[int], state: Any) -> bool:
        if all(i in done for i in known):
            return True
        for i, candidate in enumerate(ops):
            if i in done or any(j not in done and ops[j].ret < candidate.call for j in known):
                continue
            legal, after = model.step(state, candidate.input, candidate.output)
            if legal and search(done | {i}, after):
                return True
        return False

    return search(frozenset(), model.init())


@st.composite
def counter_histories(draw: st.DrawFn) -> list[Operation]:
    history = []
    for i in range(draw(st.integers(1, 7))):
        call = draw(st.integers(0, 6))
        ret = call + draw(st.integers(0, 3))
        input = draw(st.sampled_from(["inc", "inc", "read", "reset"]))
        if draw(st.integers(0, 2)) == 0:
            history.append(unknown(i, call, input))
        else:
            history.append(op(i, call, ret, input, draw(st.integers(0, 3))))
    return history


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counter_histories())
def test_agrees_with_exhaustive_search_on_a_counter(history: list[Operation]) -> None:
    result = check(history, Counter())
    assert not result.partial
    assert result.ok is exhaustive(history, Counter()), result.report()


# --- The oracle: brute force over every order, with its own sequential semantics ------------


def _execute(store: dict[Any, Any], input: Any) -> tuple[Any, dict[Any, Any]]:
    """Run ``input`` on a plain dict (the register lives under the key ``None``)."""
    store = dict(store)
    if isinstance(input, Get | Read):
        return store.get(getattr(input, "key", None)), store
    if isinstance(input, Put | Write):
        store[getattr(input, "key", None)] = input.value
        store.pop(("lease-of", getattr(input, "key", None)), None)
        return None, store
    if isinstance(input, Cas | CompareAndSwap):
        key = getattr(input, "key", None)
        if store.get(key) == input.expected:
            store[key] = input.new
            store.pop(("lease-of", key), None)
            return True, store
        return False, store
    if isinstance(input, LeasePut):
        if ("dead", input.lease) in store:
            return False, store
        store[input.key] = input.value
        store[("lease-of", input.key)] = input.lease
        return True, store
    if isinstance(input, KeepAlive):
        return ("dead", input.lease) not in store, store
    if isinstance(input, LeaseRevoke):
        for k in [k for k, v in store.items() if k[0] == "lease-of" and v == input.lease]:
            del store[k], store[k[1]]
        store[("dead", input.lease)] = True
        return None, store
    assert isinstance(input, Delete)
    existed = store.pop(input.key, None) is not None
    store.pop(("lease-of", input.key), None)
    return int(existed), store


def _matches(operation: Operation, actual: Any) -> bool:
    if isinstance(operation.input, Put | Write | LeaseRevoke):
        return True
    if isinstance(operation.input, Delete) and operation.output is None:
        return True
    return bool(operation.output == actual)


def oracle(history: Sequence[Operation], model: Model[Any]) -> bool:
    """Is there an order of the known ops plus any subset of the unknown ones that respects
    real time and the sequential semantics? Exhaustive; for small histories only."""
    ops = list(history)
    initial = {None: model.init()} if isinstance(model, RegisterModel) else {}
    unknown_ops = {i for i, o in enumerate(ops) if o.output is UNKNOWN or o.ret == INF}
    known = {i for i in range(len(ops)) if i not in unknown_ops}
    seen: set[tuple[frozenset[int], frozenset[tuple[Any, Any]]]] = set()

    def search(done: frozenset[int], store: dict[Any, Any]) -> bool:
        if known <= done:
            return True
        key = (done, frozenset(store.items()))
        if key in seen:
            return False
        seen.add(key)
        for i, candidate in enumerate(ops):
            if i in done:
                continue
            # Real time: every known op that returned before this call must already be placed.
            if any(j not in done and ops[j].ret < candidate.call for j in known):
                continue
            actual, after = _execute(store, candidate.input)
            if i in known and not _matches(candidate, actual):
                continue
            if search(done | {i}, after):
                return True
        return False

    return search(frozenset(), initial)


@st.composite
def small_histories(
    draw: st.DrawFn, kinds: Sequence[str] = ("put", "get", "get", "cas", "delete")
) -> list[Operation]:
    """Up to 7 ops on two keys and two values, executed at a random instant, then perhaps
    perturbed: a mix of linearizable and non-linearizable histories, with unknown outcomes."""
    n = draw(st.integers(1, 7))
    rows = []
    for i in range(n):
        call = draw(st.integers(0, 8))
        ret = call + draw(st.integers(0, 4))
        kind = draw(st.sampled_from(kinds))
        key = draw(st.sampled_from(["a", "b"]))
        value, other = draw(st.permutations(["x", "y"]))
        lease = draw(st.sampled_from([1, 2]))
        inputs = {
            "put": Put(key, value),
            "get": Get(key),
            "cas": Cas(key, draw(st.sampled_from([None, "x", "y"])), value),
            "delete": Delete(key),
            "lease_put": LeasePut(key, value, lease),
            "keepalive": KeepAlive(lease),
            "revoke": LeaseRevoke(lease),
        }
        fate = draw(st.sampled_from(["known", "known", "known", "applied", "lost", "perturbed"]))
        point = draw(st.floats(call, ret + 4 if fate == "applied" else ret))
        rows.append((point, i, call, ret, inputs[kind], fate, other))
    store: dict[Any, Any] = {}
    ops: list[Operation | None] = [None] * n
    for _point, i, call, ret, input, fate, other in sorted(rows, key=lambda r: (r[0], r[1])):
        if fate == "lost":
            ops[i] = Operation(i, call, INF, input, UNKNOWN)
            continue
        output, store = _execute(store, input)
        if fate == "applied":
            ops[i] = Operation(i, call, INF, input, UNKNOWN)
            continue
        if fate == "perturbed" and isinstance(input, Cas | LeasePut | KeepAlive):
            output = not output
        elif fate == "perturbed" and isinstance(input, Delete):
            output = 1 - output
        elif fate == "perturbed" and isinstance(input, Get):
            output = other if output is not None else value
        ops[i] = Operation(i, call, ret, input, output)
    return [o for o in ops if o is not None]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histories())
def test_agrees_with_brute_force_on_kv(history: list[Operation]) -> None:
    result = check(history, KVModel())
    assert not result.partial
    assert result.ok is oracle(history, KVModel()), result.report()


LEASE_KINDS = (
    "put",
    "get",
    "get",
    "cas",
    "delete",
    "lease_put",
    "lease_put",
    "keepalive",
    "revoke",
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histories(LEASE_KINDS))
def test_agrees_with_brute_force_on_kv_with_leases(history: list[Operation]) -> None:
    result = check(history, KVModel())
    assert not result.partial
    assert result.ok is oracle(history, KVModel()), result.report()


def _as_register(o: Operation) -> Operation:
    """The same history on one register (a delete becomes a blind write)."""
    i = o.input
    new: Any = Read()
    if isinstance(i, Put):
        new = Write(i.value)
    elif isinstance(i, Cas):
        new = CompareAndSwap(i.expected, i.new)
    elif isinstance(i, Delete):
        new = Write("gone")
    output = None if isinstance(i, Delete) and o.output is not UNKNOWN else o.output
    return dataclasses.replace(o, input=new, output=output)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_histories())
def test_agrees_with_brute_force_on_a_register(history: list[Operation]) -> None:
    register = [_as_register(o) for o in history]
    result = check(register, RegisterModel())
    assert not result.partial
    assert result.ok is oracle(register, RegisterModel()), result.report()


# --- Histories of a real sequential store --------------------------------------------------


def generate(
    rng: random.Random,
    n_ops: int,
    keys: int,
    clients: int,
    unknown_rate: float = 0.0,
    kinds: str = "pgcd",
) -> list[Operation]:
    """Each client runs ops back to back; each op takes effect atomically at a random instant
    inside [call, ret] on a dict (an unknown one: any time after its call, or never). Values
    are unique, so a read of ``b"never"`` is provably illegal."""
    clock = [0.0] * clients
    rows = []
    for i in range(n_ops):
        client = rng.randrange(clients)
        call = clock[client] + rng.random() * 0.5
        ret = call + rng.random() * 2
        clock[client] = ret
        lost = rng.random() < unknown_rate
        point = rng.uniform(call, ret + (5 if lost else 0))
        rows.append(
            (point, i, client, call, ret, rng.choice(kinds), f"k{rng.randrange(keys)}", lost)
        )
    store: dict[str, bytes] = {}
    history: list[Operation] = []
    for _point, i, client, call, ret, kind, key, lost in sorted(rows):
        value = f"v{i}".encode()
        input: Any = {
            "p": Put(key, value),
            "g": Get(key),
            "c": Cas(key, store.get(key) if rng.random() < 0.7 else b"v?", value),
            "d": Delete(key),
        }[kind]
        if lost and rng.random() < 0.5:
            history.append(Operation(client, call, INF, input, UNKNOWN, i))
            continue  # never took effect
        output, store = _execute(store, input)
        if lost:
            history.append(Operation(client, call, INF, input, UNKNOWN, i))
        else:
            history.append(Operation(client, call, ret, input, output, i))
    return sorted(history, key=lambda o: o.call)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n_ops=st.integers(5, 150),
    keys=st.integers(1, 4),
    clients=st.integers(1, 8),
    unknown_rate=st.sampled_from([0.0, 0.0, 0.05, 0.15]),
)
def test_executed_histories_are_linearizable_and_a_bad_read_is_caught(
    seed: int, n_ops: int, keys: int, clients: int, unknown_rate: float
) -> None:
    rng = random.Random(seed)
    history = generate(rng, n_ops, keys, clients, unknown_rate)
    result = check(history, KVModel(), timeout=60)
    assert result.ok, result.report()
    reads = [i for i, o in enumerate(history) if isinstance(o.input, Get) and o.ret != INF]
    if not reads:
        return
    bad = rng.choice(reads)
    history[bad] = dataclasses.replace(history[bad], output=b"never")
    result = check(history, KVModel(), timeout=60)
    assert not result.ok and not result.partial
    assert [v.label for v in result.violations] == [f"key {history[bad].input.key!r}"]
    assert f"#{history[bad].id} " in result.report()


def test_many_timed_out_deletes_of_one_key() -> None:
    # Thirty unknown deletes, any of which may explain each absence: interchangeable, so the
    # search must not try every subset of them before refuting the final read.
    history = [op(0, 0, 1, Put("k", b"v0"))]
    history += [unknown(100 + i, 2, Delete("k")) for i in range(30)]
    t = 3.0
    for i in range(1, 31):
        history += [op(1, t, t + 1, Put("k", b"v%d" % i)), op(2, t + 2, t + 3, Get("k"), None)]
        t += 4
    assert check(history, KVModel()).ok
    history.append(op(3, t, t + 1, Get("k"), b"never"))
    result = check(history, KVModel(), timeout=30)
    assert not result.ok and not result.partial, result.report()


def test_performance_sanity() -> None:
    rng = random.Random(7)
    many_keys = generate(rng, 2000, keys=10, clients=8, unknown_rate=0.02)
    result = check(many_keys, KVModel())
    assert result.ok and result.partitions_checked == 10, result.report()
    one_key = generate(rng, 200, keys=1, clients=10, kinds="pgc")
    result = check(one_key, KVModel())
    assert result.ok and result.partitions_checked == 1, result.report()


# --- Recording ------------------------------------------------------------------------------


def test_recorder_outcomes() -> None:
    rec = HistoryRecorder()
    a = rec.invoke("c1", Put("k", b"1"), 0.0)
    b = rec.invoke("c2", Put("k", b"2"), 0.5)
    c = rec.invoke("c3", Get("k"), 0.6)
    d = rec.invoke("c4", Put("k", b"3"), 0.7)
    rec.ok(a, 10, 1.0)
    rec.unknown(b, 2.0)
    rec.fail(c, 2.5)
    assert rec.history() == [
        Operation("c1", 0.0, 1.0, Put("k", b"1"), 10, a),
        Operation("c2", 0.5, INF, Put("k", b"2"), UNKNOWN, b),
        Operation("c4", 0.7, INF, Put("k", b"3"), UNKNOWN, d),  # still pending: unknown
    ]
    with pytest.raises(ValueError, match="already completed"):
        rec.ok(a, None, 3.0)
    with pytest.raises(ValueError, match="unknown or failed"):
        rec.unknown(c, 3.0)
    with pytest.raises(ValueError, match="before its call"):
        rec.ok(d, None, 0.1)


def test_the_recorder_keeps_the_order_of_back_to_back_ops_at_one_instant() -> None:
    # Rule: what the recorder saw first happened first, even when the clock did not move (a
    # virtual clock): one client puts x, then y, then reads x -- stale, not linearizable.
    rec = HistoryRecorder()
    h = rec.invoke(0, Put("a", "x"), 0.0)
    rec.ok(h, None, 1.0)
    h = rec.invoke(0, Put("a", "y"), 1.0)  # sent right after the previous answer
    rec.ok(h, None, 2.0)
    h = rec.invoke(0, Get("a"), 2.0)
    rec.ok(h, "x", 3.0)
    history = rec.history()
    assert all(a.ret < b.call for a, b in itertools.pairwise(history))
    assert not check(history, KVModel()).ok
    rec2 = HistoryRecorder()  # two clients at one instant, truly concurrent: both orders fine
    a = rec2.invoke(1, Put("a", "x"), 5.0)
    b = rec2.invoke(2, Get("a"), 5.0)
    rec2.ok(a, None, 5.0)
    rec2.ok(b, None, 5.0)
    assert check(rec2.history(), KVModel()).ok


@pytest.mark.virtual_time
async def test_recorder_with_async_clients() -> None:
    loop = asyncio.get_running_loop()
    store: dict[str, bytes] = {}
    rec = HistoryRecorder()
    rng = random.Random(3)

    async def client(name: int) -> None:
        for i in range(30):
            key = f"k{rng.randrange(3)}"
            input: Any = rng.choice([Put(key, f"{name}-{i}".encode()), Get(key)])
            handle = rec.invoke(name, input, loop.time())
            await asyncio.sleep(rng.random())  # request latency (noqa: sleep)
            output, new = _execute(store, input)
            store.update(new)
            if rng.random() < 0.1:
                rec.unknown(handle, loop.time())  # the reply was lost
                continue
            await asyncio.sleep(rng.random())  # response latency (noqa: sleep)
            rec.ok(handle, output, loop.time())

    async with asyncio.TaskGroup() as group:
        for name in range(5):
            group.create_task(client(name))
    history = rec.history()
    assert len(history) == 150
    result = check(history, KVModel())
    assert result.ok, result.report()


@pytest.mark.parametrize("bad", [0, -1, True, "7"])
def test_lease_operations_refuse_what_is_no_lease_id(bad: Any) -> None:
    # Lease 0 is the store's "no lease": modelled as a lease it would be judged wrongly.
    for make in (lambda: LeasePut("x", "1", bad), lambda: KeepAlive(bad), lambda: LeaseRevoke(bad)):
        with pytest.raises(ValueError, match="lease id"):
            make()
