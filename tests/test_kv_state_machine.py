"""The replicated KV state machine: revisions, versions, transactions, leases, history,
snapshots and the command codec. Table-driven; snapshot equivalence is a hypothesis property.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.store._kv import (
    MAX_TXN_OPS,
    Command,
    CompactCmd,
    CompactResult,
    DeleteCmd,
    DeleteResult,
    InvalidCommand,
    KVStateMachine,
    LeaseGrantCmd,
    LeaseMissing,
    LeaseRevokeCmd,
    PutCmd,
    PutResult,
    Rejected,
    Result,
    RevokeResult,
    TxnCmd,
    _snapshot_decoder,
    decode_command,
    decode_result,
    encode_command,
    encode_result,
    unwrap,
)
from agentcluster.store.base import (
    Compacted,
    Compare,
    DeleteOp,
    GetOp,
    KeyValue,
    Lease,
    LeaseNotFound,
    PutOp,
    TxnOp,
    TxnResult,
    WatchEvent,
)


def run(sm: KVStateMachine, *cmds: Command) -> list[Result]:
    return [sm.apply(cmd) for cmd in cmds]


# --- revisions and versions ---------------------------------------------------------------

# (commands, the result of each, the revision after each)
REVISION_TABLE: list[tuple[str, list[Command], list[Result], list[int]]] = [
    ("a put advances by one", [PutCmd("a", b"1")], [PutResult(1)], [1]),
    (
        "every put advances, same key or not",
        [PutCmd("a", b"1"), PutCmd("a", b"2"), PutCmd("b", b"3")],
        [PutResult(1), PutResult(2), PutResult(3)],
        [1, 2, 3],
    ),
    (
        "deleting nothing does not advance",
        [PutCmd("a", b"1"), DeleteCmd("zz"), DeleteCmd("b", prefix=True)],
        [PutResult(1), DeleteResult(0, 1), DeleteResult(0, 1)],
        [1, 1, 1],
    ),
    (
        "a prefix delete of several keys is one revision",
        [PutCmd("p/1", b""), PutCmd("p/2", b""), PutCmd("q", b""), DeleteCmd("p/", prefix=True)],
        [PutResult(1), PutResult(2), PutResult(3), DeleteResult(2, 4)],
        [1, 2, 3, 4],
    ),
    (
        "a lease grant does not advance",
        [LeaseGrantCmd(5.0), PutCmd("a", b"", lease=1)],
        [Lease(1, 5.0), PutResult(1)],
        [0, 1],
    ),
    (
        "a put on a missing lease changes nothing",
        [PutCmd("a", b"1"), PutCmd("a", b"2", lease=9)],
        [PutResult(1), LeaseMissing(9)],
        [1, 1],
    ),
    (
        "revoking a lease with keys is one revision, without keys none",
        [
            LeaseGrantCmd(1.0),
            LeaseGrantCmd(1.0),
            PutCmd("x", b"", lease=1),
            PutCmd("y", b"", lease=1),
            LeaseRevokeCmd(2),
            LeaseRevokeCmd(1),
            LeaseRevokeCmd(1),
        ],
        [
            Lease(1, 1.0),
            Lease(2, 1.0),
            PutResult(1),
            PutResult(2),
            RevokeResult(True, 0, 2),
            RevokeResult(True, 2, 3),
            RevokeResult(False, 0, 3),
        ],
        [0, 0, 1, 2, 2, 3, 3],
    ),
    (
        "a txn's writes share one revision",
        [TxnCmd([], [PutOp("a", b""), PutOp("b", b""), DeleteOp("a")])],
        [TxnResult(True, 1, [1, 1, 1])],
        [1],
    ),
    (
        "a txn without changes does not advance",
        [PutCmd("a", b"v"), TxnCmd([], [GetOp("a"), DeleteOp("missing")])],
        [PutResult(1), TxnResult(True, 1, [[KeyValue("a", b"v", 1, 1, 1)], 0])],
        [1, 1],
    ),
    (
        "a rejected command changes nothing",
        [PutCmd("a", b""), CompactCmd(5), TxnCmd([Compare("a", "value", "==", 1)], [])],
        [
            PutResult(1),
            Rejected("cannot compact to 5: the revision is 1"),
            Rejected("compare on 'value' of 'a' needs bytes"),
        ],
        [1, 1, 1],
    ),
]


@pytest.mark.parametrize(
    ("cmds", "results", "revisions"),
    [row[1:] for row in REVISION_TABLE],
    ids=[row[0] for row in REVISION_TABLE],
)
def test_revisions(cmds: list[Command], results: list[Result], revisions: list[int]) -> None:
    sm = KVStateMachine()
    seen_results, seen_revisions = [], []
    for cmd in cmds:
        seen_results.append(sm.apply(cmd))
        seen_revisions.append(sm.revision)
    assert seen_results == results
    assert seen_revisions == revisions


def test_versions_and_create_revision_follow_etcd() -> None:
    sm = KVStateMachine()
    run(sm, PutCmd("k", b"1"), PutCmd("other", b""), PutCmd("k", b"2"))
    assert sm.get("k") == KeyValue("k", b"2", create_revision=1, mod_revision=3, version=2)
    run(sm, DeleteCmd("k"), PutCmd("k", b"3"))
    # Recreated: a new life, version and create revision start over.
    assert sm.get("k") == KeyValue("k", b"3", create_revision=5, mod_revision=5, version=1)


def test_events_carry_prev_and_delete_shape() -> None:
    sm = KVStateMachine()
    run(sm, PutCmd("k", b"1"), PutCmd("k", b"2"), DeleteCmd("k"))
    first, second, gone = sm.events_since(1)
    assert first == WatchEvent("put", KeyValue("k", b"1", 1, 1, 1), None)
    assert second == WatchEvent("put", KeyValue("k", b"2", 1, 2, 2), first.kv)
    assert gone == WatchEvent("delete", KeyValue("k", b"", 0, 3, 0), second.kv)
    assert [e.revision for e in (first, second, gone)] == [1, 2, 3]


def test_last_events_are_those_of_the_last_apply() -> None:
    sm = KVStateMachine()
    sm.apply(TxnCmd([], [PutOp("a", b""), PutOp("b", b"")]))
    assert [e.kv.key for e in sm.last_events] == ["a", "b"]
    sm.apply(DeleteCmd("missing"))
    assert sm.last_events == []


# --- transactions -------------------------------------------------------------------------


def txn_fixture() -> KVStateMachine:
    """``k``: value b"m", create 1, mod 3, version 2, lease 1; ``z`` exists; ``nope`` not."""
    sm = KVStateMachine()
    run(
        sm,
        LeaseGrantCmd(10.0),
        PutCmd("k", b"a"),
        PutCmd("z", b""),
        PutCmd("k", b"m", lease=1),
    )
    assert sm.get("k") == KeyValue("k", b"m", 1, 3, 2, 1)
    return sm


COMPARE_TABLE: list[tuple[Compare, bool]] = [
    (Compare("k", "value", "==", b"m"), True),
    (Compare("k", "value", "==", b"x"), False),
    (Compare("k", "value", "!=", b"x"), True),
    (Compare("k", "value", "<", b"n"), True),
    (Compare("k", "value", "<", b"m"), False),
    (Compare("k", "value", ">", b"l"), True),
    (Compare("k", "value", ">", b"mm"), False),
    (Compare("k", "version", "==", 2), True),
    (Compare("k", "version", "!=", 2), False),
    (Compare("k", "version", "<", 3), True),
    (Compare("k", "version", ">", 2), False),
    (Compare("k", "create", "==", 1), True),
    (Compare("k", "create", ">", 0), True),
    (Compare("k", "create", "<", 1), False),
    (Compare("k", "mod", "==", 3), True),
    (Compare("k", "mod", "!=", 3), False),
    (Compare("k", "mod", "<", 4), True),
    (Compare("k", "mod", ">", 3), False),
    (Compare("k", "lease", "==", 1), True),
    (Compare("k", "lease", "==", 0), False),
    (Compare("z", "lease", "==", 0), True),
    (Compare("k", "lease", ">", 0), True),
    # A missing key: numbers are 0, its value compares with nothing (etcd's rule).
    (Compare("nope", "version", "==", 0), True),
    (Compare("nope", "create", "==", 0), True),
    (Compare("nope", "mod", "<", 1), True),
    (Compare("nope", "lease", "==", 0), True),
    (Compare("nope", "create", ">", 0), False),
    (Compare("nope", "value", "==", b""), False),
    (Compare("nope", "value", "!=", b"x"), False),
    (Compare("nope", "value", "<", b"z"), False),
    (Compare("nope", "value", ">", b""), False),
]


@pytest.mark.parametrize(("cmp", "expected"), COMPARE_TABLE, ids=repr)
def test_compare(cmp: Compare, expected: bool) -> None:
    sm = txn_fixture()
    result = unwrap(sm.apply(TxnCmd([cmp], [GetOp("k")], [GetOp("z")])), TxnResult)
    assert result.succeeded is expected
    assert result.results == [[sm.get("k")]] if expected else [[sm.get("z")]]
    assert result.revision == 3 and sm.revision == 3  # reads only


def test_txn_all_compares_must_hold() -> None:
    sm = txn_fixture()
    both = [Compare("k", "version", "==", 2), Compare("z", "version", "==", 1)]
    one = [Compare("k", "version", "==", 2), Compare("z", "version", "==", 7)]
    assert unwrap(sm.apply(TxnCmd(both, [], [])), TxnResult).succeeded
    assert not unwrap(sm.apply(TxnCmd(one, [], [])), TxnResult).succeeded
    assert unwrap(sm.apply(TxnCmd([], [], [])), TxnResult).succeeded  # no compare: then


def test_txn_runs_ops_in_order_and_reports_each() -> None:
    sm = txn_fixture()
    then: list[TxnOp] = [
        PutOp("n/1", b"x"),
        GetOp("n/", prefix=True),
        DeleteOp("z"),
        GetOp("z"),
        DeleteOp("n/", prefix=True),
    ]
    result = unwrap(sm.apply(TxnCmd([Compare("k", "mod", "==", 3)], then, [])), TxnResult)
    assert result == TxnResult(True, 4, [4, [KeyValue("n/1", b"x", 4, 4, 1)], 1, [], 1])
    assert [(e.type, e.kv.key, e.revision) for e in sm.last_events] == [
        ("put", "n/1", 4),
        ("delete", "z", 4),
        ("delete", "n/1", 4),
    ]


def test_txn_else_branch_and_cas_semantics() -> None:
    sm = txn_fixture()
    cas_create = TxnCmd([Compare("k", "mod", "==", 0)], [PutOp("k", b"new")], [GetOp("k")])
    result = unwrap(sm.apply(cas_create), TxnResult)
    assert not result.succeeded and result.results == [[sm.get("k")]] and sm.revision == 3
    cas_update = TxnCmd([Compare("k", "mod", "==", 3)], [PutOp("k", b"new")], [GetOp("k")])
    assert unwrap(sm.apply(cas_update), TxnResult) == TxnResult(True, 4, [4])
    assert sm.get("k") == KeyValue("k", b"new", 1, 4, 3, 0)  # the put dropped the lease


def test_txn_with_a_missing_lease_changes_nothing() -> None:
    sm = txn_fixture()
    ops: list[TxnOp] = [DeleteOp("z"), PutOp("a", b"", lease=99)]
    assert sm.apply(TxnCmd([], ops, [])) == LeaseMissing(99)
    assert sm.get("z") is not None and sm.revision == 3
    # The branch not taken is not checked.
    assert unwrap(sm.apply(TxnCmd([Compare("z", "version", "==", 9)], ops, [])), TxnResult)


@pytest.mark.parametrize(
    "cmd",
    [
        TxnCmd([Compare("k", "version", "==", b"2")], []),
        TxnCmd([Compare("k", "value", "==", 2)], []),
        TxnCmd([], [PutOp("", b"")]),
        PutCmd("", b""),
        LeaseGrantCmd(0.0),
        LeaseGrantCmd(float("nan")),
        CompactCmd(99),
    ],
    ids=repr,
)
def test_malformed_commands_are_rejected_without_effect(cmd: Command) -> None:
    sm = txn_fixture()
    before = sm.snapshot()
    assert isinstance(sm.apply(cmd), Rejected)
    assert sm.snapshot() == before


# --- ranges and prefixes ------------------------------------------------------------------

RANGE_KEYS = ["a", "a/1", "a/10", "a/2", "ab", "b", "b/x"]


@pytest.mark.parametrize(
    ("prefix", "limit", "keys", "more"),
    [
        ("a/", 0, ["a/1", "a/10", "a/2"], False),
        ("a", 0, ["a", "a/1", "a/10", "a/2", "ab"], False),
        ("a/", 2, ["a/1", "a/10"], True),
        ("a/", 3, ["a/1", "a/10", "a/2"], False),
        ("", 0, RANGE_KEYS, False),
        ("", 1, ["a"], True),
        ("c", 0, [], False),
        ("b/x", 0, ["b/x"], False),
        ("b/xx", 0, [], False),
    ],
)
def test_range(prefix: str, limit: int, keys: list[str], more: bool) -> None:
    sm = KVStateMachine()
    for key in reversed(RANGE_KEYS):
        sm.apply(PutCmd(key, key.encode()))
    result = sm.range(prefix, limit)
    assert [kv.key for kv in result.kvs] == keys
    assert all(kv.value == kv.key.encode() for kv in result.kvs)
    assert result.more is more and result.revision == len(RANGE_KEYS)


@pytest.mark.parametrize(
    ("prefix", "start", "limit", "keys", "more"),
    [
        ("a/", "a/10", 0, ["a/10", "a/2"], False),  # inclusive
        ("a/", "a/100", 0, ["a/2"], False),  # between two keys
        ("a/", "a/10", 1, ["a/10"], True),
        ("a/", "a/10\0", 0, ["a/2"], False),  # the successor of a key: the page after it
        ("a/", "", 0, ["a/1", "a/10", "a/2"], False),
        ("a/", "a", 0, ["a/1", "a/10", "a/2"], False),  # below the prefix: from the prefix on
        ("a/", "a/3", 0, [], False),  # past every key under the prefix
        ("a/", "b", 0, [], False),  # beyond the prefix, where other keys are
        ("", "ab", 2, ["ab", "b"], True),
        ("", "b/x", 0, ["b/x"], False),
    ],
)
def test_range_from_a_start_key(
    prefix: str, start: str, limit: int, keys: list[str], more: bool
) -> None:
    sm = KVStateMachine()
    for key in RANGE_KEYS:
        sm.apply(PutCmd(key, key.encode()))
    result = sm.range(prefix, limit, start)
    assert [kv.key for kv in result.kvs] == keys
    assert result.more is more and result.revision == len(RANGE_KEYS)


@pytest.mark.parametrize(
    ("key", "prefix", "deleted", "left"),
    [
        ("a/", True, 3, ["a", "ab", "b", "b/x"]),
        ("a", True, 5, ["b", "b/x"]),
        ("a", False, 1, ["a/1", "a/10", "a/2", "ab", "b", "b/x"]),
        ("", True, 7, []),
        ("zz", True, 0, RANGE_KEYS),
        ("a/", False, 0, RANGE_KEYS),
    ],
)
def test_delete(key: str, prefix: bool, deleted: int, left: list[str]) -> None:
    sm = KVStateMachine()
    for k in RANGE_KEYS:
        sm.apply(PutCmd(k, b""))
    result = unwrap(sm.apply(DeleteCmd(key, prefix)), DeleteResult)
    assert result.deleted == deleted
    assert [kv.key for kv in sm.range("").kvs] == left and len(sm) == len(left)
    gone = sorted(set(RANGE_KEYS) - set(left))
    assert [e.kv.key for e in sm.last_events] == gone  # in key order
    assert sm.revision == len(RANGE_KEYS) + (1 if deleted else 0)


# --- leases -------------------------------------------------------------------------------


def test_lease_ids_are_a_deterministic_counter() -> None:
    sm = KVStateMachine()
    grants = run(sm, LeaseGrantCmd(1.0), LeaseGrantCmd(2.5), LeaseRevokeCmd(1), LeaseGrantCmd(3))
    assert grants == [Lease(1, 1.0), Lease(2, 2.5), RevokeResult(True, 0, 0), Lease(3, 3.0)]
    assert sm.leases() == {2: 2.5, 3: 3.0}
    assert sm.lease(2) == Lease(2, 2.5) and sm.lease(1) is None


def test_revoke_deletes_only_keys_still_on_the_lease() -> None:
    sm = KVStateMachine()
    run(
        sm,
        LeaseGrantCmd(5.0),
        PutCmd("b", b"", lease=1),
        PutCmd("a", b"", lease=1),
        PutCmd("moved", b"", lease=1),
        PutCmd("moved", b"now without lease"),
        PutCmd("gone", b"", lease=1),
        DeleteCmd("gone"),
    )
    assert sm.lease_keys(1) == ["a", "b"]
    assert sm.apply(LeaseRevokeCmd(1)) == RevokeResult(True, 2, 7)
    assert [(e.type, e.kv.key) for e in sm.last_events] == [("delete", "a"), ("delete", "b")]
    assert [kv.key for kv in sm.range("").kvs] == ["moved"]
    assert sm.leases() == {} and sm.lease_keys(1) == []


def test_moving_a_key_between_leases() -> None:
    sm = KVStateMachine()
    run(sm, LeaseGrantCmd(5.0), LeaseGrantCmd(5.0), PutCmd("k", b"", 1), PutCmd("k", b"", 2))
    assert sm.lease_keys(1) == [] and sm.lease_keys(2) == ["k"]
    assert sm.apply(LeaseRevokeCmd(1)) == RevokeResult(True, 0, 2)
    assert sm.get("k") is not None


# --- watch history and compaction ---------------------------------------------------------


def test_events_since_filters_by_revision_and_prefix() -> None:
    sm = KVStateMachine()
    run(sm, PutCmd("a/1", b""), PutCmd("b", b""), PutCmd("a/2", b""), DeleteCmd("a/", True))
    assert [(e.kv.key, e.revision) for e in sm.events_since(2, "a/")] == [
        ("a/2", 3),
        ("a/1", 4),
        ("a/2", 4),
    ]
    assert [e.revision for e in sm.events_since(0)] == [1, 2, 3, 4, 4]
    assert sm.events_since(5) == [] and sm.events_since(99) == []


def test_compaction() -> None:
    sm = KVStateMachine()
    for i in range(5):
        sm.apply(PutCmd(f"k{i}", b""))
    assert sm.apply(CompactCmd(3)) == CompactResult(3)
    assert sm.oldest_revision == 3
    assert [e.revision for e in sm.events_since(3)] == [3, 4, 5]
    with pytest.raises(Compacted) as info:
        sm.events_since(2)
    assert (info.value.requested, info.value.oldest) == (2, 3)
    assert sm.apply(CompactCmd(1)) == CompactResult(3)  # never goes back
    assert sm.apply(CompactCmd(5)) == CompactResult(5)
    assert [e.revision for e in sm.events_since(5)] == [5]
    assert sm.apply(CompactCmd(6)) == Rejected("cannot compact to 6: the revision is 5")


@pytest.mark.parametrize(
    ("max_events", "group_sizes", "oldest", "kept"),
    [
        (4, [1, 1, 1, 1], 1, [1, 2, 3, 4]),
        (4, [1, 1, 1, 1, 1], 2, [2, 3, 4, 5]),
        (4, [1, 2, 2], 2, [2, 2, 3, 3]),
        (4, [2, 2, 1], 2, [2, 2, 3]),  # whole revisions only: 3 kept, not 4 with half of 1
        (3, [1, 5], 2, [2] * 5),  # the newest revision is always kept whole
        (1, [3, 1, 2], 3, [3, 3]),
    ],
)
def test_bounded_history_drops_whole_oldest_revisions(
    max_events: int, group_sizes: list[int], oldest: int, kept: list[int]
) -> None:
    sm = KVStateMachine(max_events=max_events)
    for rev, size in enumerate(group_sizes, start=1):
        sm.apply(TxnCmd([], [PutOp(f"r{rev}/{i}", b"") for i in range(size)]))
    assert sm.oldest_revision == oldest
    assert [e.revision for e in sm.events_since(oldest)] == kept
    if oldest > 1:
        with pytest.raises(Compacted):
            sm.events_since(oldest - 1)


def test_long_history_stays_bounded() -> None:
    sm = KVStateMachine(max_events=100)
    for i in range(10_000):
        sm.apply(PutCmd(f"k{i % 7}", b"x"))
    assert len(sm.events_since(sm.oldest_revision)) == 100
    assert sm.oldest_revision == 9_901
    assert len(sm._history) <= 2 * 100 + 64  # trimmed storage, not just a moving index


# --- snapshots ----------------------------------------------------------------------------


def test_snapshot_restore_round_trip() -> None:
    sm = txn_fixture()
    run(sm, LeaseGrantCmd(3.0), PutCmd("q", b"1", lease=2), CompactCmd(2))
    copy = KVStateMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()
    assert copy.range("") == sm.range("")
    assert copy.leases() == sm.leases() == {1: 10.0, 2: 3.0}
    assert copy.lease_keys(2) == ["q"]
    assert copy.events_since(2) == sm.events_since(2)
    assert copy.oldest_revision == 2
    assert copy.apply(LeaseGrantCmd(1.0)) == sm.apply(LeaseGrantCmd(1.0)) == Lease(3, 1.0)


def test_restore_rejects_garbage_and_keeps_state() -> None:
    sm = txn_fixture()
    before = sm.snapshot()
    for bad in (b"", b"\x00garbage", encode_command(PutCmd("a", b""))):
        with pytest.raises(InvalidCommand):
            sm.restore(bad)
    # Decodes, but a key sits on a lease the snapshot does not have.
    enc = msgspec.msgpack.Encoder()
    orphan = enc.encode(["kv1", 1, 1, 1, [KeyValue("a", b"", 1, 1, 1, 7)], [], []])
    with pytest.raises(InvalidCommand, match="missing lease"):
        sm.restore(orphan)
    unordered = enc.encode(
        [
            "kv1",
            2,
            1,
            1,
            [],
            [],
            [WatchEvent("delete", KeyValue("a", b"", 0, r, 0)) for r in (2, 1)],
        ]
    )
    with pytest.raises(InvalidCommand, match="history"):
        sm.restore(unordered)
    assert sm.snapshot() == before


KEYS = st.sampled_from(["a", "a/1", "a/2", "b", "b/1", "c"])
PREFIXES = st.sampled_from(["", "a", "a/", "b/", "c", "zz"])
LEASES = st.integers(min_value=0, max_value=4)
VALUES = st.sampled_from([b"", b"x", b"y", b"zz"])
INT_COMPARES = st.builds(
    Compare,
    KEYS,
    st.sampled_from(["version", "create", "mod", "lease"]),
    st.sampled_from(["==", "!=", "<", ">"]),
    st.integers(min_value=0, max_value=8),
)
VALUE_COMPARES = st.builds(
    Compare, KEYS, st.just("value"), st.sampled_from(["==", "!=", "<", ">"]), VALUES
)
OPS = st.one_of(
    st.builds(PutOp, KEYS, VALUES, LEASES),
    st.builds(DeleteOp, st.one_of(KEYS, PREFIXES), st.booleans()),
    st.builds(GetOp, st.one_of(KEYS, PREFIXES), st.booleans()),
)
COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.builds(PutCmd, KEYS, VALUES, LEASES),
    st.builds(DeleteCmd, st.one_of(KEYS, PREFIXES), st.booleans()),
    st.builds(
        TxnCmd,
        st.lists(st.one_of(INT_COMPARES, VALUE_COMPARES), max_size=3),
        st.lists(OPS, max_size=4),
        st.lists(OPS, max_size=4),
    ),
    st.builds(LeaseGrantCmd, st.sampled_from([0.5, 1.0, 30.0])),
    st.builds(LeaseRevokeCmd, LEASES),
    st.builds(CompactCmd, st.integers(min_value=0, max_value=40)),
)


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(COMMANDS, max_size=40),
    after=st.lists(COMMANDS, max_size=40),
    max_events=st.sampled_from([1, 5, 10_000]),
)
def test_restored_machine_is_indistinguishable(
    before: list[Command], after: list[Command], max_events: int
) -> None:
    original = KVStateMachine(max_events=max_events)
    for cmd in before:
        original.apply(decode_command(encode_command(cmd)))
    restored = KVStateMachine(max_events=max_events)
    restored.restore(original.snapshot())
    for cmd in after:
        expected = original.apply(cmd)
        assert restored.apply(cmd) == expected
        assert restored.last_events == original.last_events
        assert decode_result(encode_result(expected)) == expected
    assert restored.snapshot() == original.snapshot()
    assert restored.range("") == original.range("")
    assert restored.leases() == original.leases()
    oldest = original.oldest_revision
    assert restored.oldest_revision == oldest
    assert restored.events_since(oldest) == original.events_since(oldest)
    # Invariants along the way: the history covers exactly oldest..revision, in order.
    revs = [e.revision for e in original.events_since(oldest)]
    assert revs == sorted(revs)
    if revs:
        assert revs[-1] == original.revision and set(revs) == set(range(revs[0], revs[-1] + 1))


WRITES: st.SearchStrategy[Command] = st.one_of(
    st.builds(PutCmd, KEYS, VALUES),
    st.builds(DeleteCmd, st.one_of(KEYS, PREFIXES), st.booleans()),
    st.builds(TxnCmd, st.just([]), st.lists(st.builds(PutOp, KEYS, VALUES), max_size=4)),
)


@settings(max_examples=200, deadline=None)
@given(cmds=st.lists(WRITES, min_size=1, max_size=300), max_events=st.sampled_from([1, 2, 3, 7]))
def test_history_bound_matches_a_model_that_keeps_everything(
    cmds: list[Command], max_events: int
) -> None:
    """After every write: the oldest revision kept is the first from which at most
    ``max_events`` events follow (the newest revision whole in any case), and the events
    from there are exactly the model's -- through the in-place trims and the compactions of
    the backing list."""
    sm = KVStateMachine(max_events=max_events)
    everything: list[WatchEvent] = []
    for cmd in cmds:
        sm.apply(cmd)
        everything += sm.last_events
        if not everything:
            assert sm.oldest_revision == 1
            continue
        newest = everything[-1].revision
        oldest = newest
        for rev in range(1, newest + 1):
            if sum(1 for e in everything if e.revision >= rev) <= max_events:
                oldest = rev
                break
        assert sm.oldest_revision == max(1, oldest)
        kept = [e for e in everything if e.revision >= sm.oldest_revision]
        assert sm.events_since(sm.oldest_revision) == kept
        # What a snapshot carries too: whole revisions only.
        assert _snapshot_decoder.decode(sm.snapshot()).history == kept


# --- the codec ----------------------------------------------------------------------------

ROUND_TRIP: list[Command] = [
    PutCmd("k", b"v", 3),
    DeleteCmd("", prefix=True),
    TxnCmd(
        [Compare("k", "value", "==", b"v"), Compare("k", "mod", ">", 2)],
        [PutOp("k", b"w", 1), DeleteOp("p/", True)],
        [GetOp("k")],
    ),
    LeaseGrantCmd(2.5),
    LeaseRevokeCmd(7),
    CompactCmd(12),
]


@pytest.mark.parametrize("cmd", ROUND_TRIP, ids=repr)
def test_command_round_trip(cmd: Command) -> None:
    assert decode_command(encode_command(cmd)) == cmd


GARBAGE: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not msgpack", b"\xc1\xc1\xc1"),
    ("random bytes", bytes(range(256))),
    ("unknown tag", msgspec.msgpack.encode(["zz", "k"])),
    ("a map", msgspec.msgpack.encode({"key": "k"})),
    ("wrong field type", msgspec.msgpack.encode(["p", 5, b"v", 0])),
    ("empty key", msgspec.msgpack.encode(["p", "", b"v", 0])),
    ("negative lease", msgspec.msgpack.encode(["p", "k", b"v", -1])),
    ("zero ttl", msgspec.msgpack.encode(["lg", 0.0])),
    ("infinite ttl", msgspec.msgpack.encode(["lg", float("inf")])),
    ("negative compact", msgspec.msgpack.encode(["c", -5])),
    ("truncated", encode_command(ROUND_TRIP[2])[:-3]),
    ("trailing bytes", encode_command(ROUND_TRIP[0]) + b"\x00"),
    ("too many ops", msgspec.msgpack.encode(["t", [], [["get", "k", False]] * (MAX_TXN_OPS + 1)])),
    ("bad compare op", msgspec.msgpack.encode(["t", [["cmp", "k", "mod", "<=", 1]], []])),
    ("a result, not a command", encode_result(PutResult(3))),
]


@pytest.mark.parametrize("data", [g[1] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_decoding_garbage_raises_the_typed_error(data: bytes) -> None:
    with pytest.raises(InvalidCommand):
        decode_command(data)


def test_invalid_command_is_a_value_error_and_results_decode_strictly() -> None:
    assert issubclass(InvalidCommand, ValueError)
    with pytest.raises(InvalidCommand):
        decode_result(encode_command(PutCmd("k", b"")))


@pytest.mark.parametrize(
    ("result", "kind", "error"),
    [
        (PutResult(4), PutResult, None),
        (LeaseMissing(10), PutResult, LeaseNotFound),
        (Rejected("nope"), TxnResult, InvalidCommand),
        (DeleteResult(1, 2), PutResult, InvalidCommand),
    ],
)
def test_unwrap(result: Result, kind: type[PutResult], error: type[Exception] | None) -> None:
    if error is None:
        assert unwrap(result, kind) is result
    else:
        with pytest.raises(error):
            unwrap(result, kind)


def test_command_with_a_key_that_is_not_utf8_is_an_invalid_command() -> None:
    from agentcluster.store._kv import decode_command

    with pytest.raises(InvalidCommand):
        decode_command(b"\x93\xa1p\xa2\x80\x81\xc4\x00")  # ["p", <not UTF-8>, b""]
