"""A client's batch of writes as one Raft entry (agentcluster.store._batch): the entry format,
the outcome plumbing, applying a batch exactly as separate entries, and splitting by size."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.store._batch import (
    MAX_BATCH_BYTES,
    MAX_BATCH_COMMANDS,
    BatchCmd,
    BatchWait,
    Failed,
    Group,
    Slot,
    decode_entry,
    encode_batch,
)
from agentcluster.store._kv import (
    Command,
    DeleteCmd,
    InvalidCommand,
    LeaseGrantCmd,
    LeaseMissing,
    LeaseRevokeCmd,
    PutCmd,
    PutResult,
    decode_result,
    encode_command,
    unwrap,
)
from agentcluster.store.raft import KvRequest, _Machine
from agentcluster.testing import wait_until
from test_store_raft import leader_of, started

# ------------------------------------------------------------------ the entry format


def test_an_entry_is_a_command_or_a_batch() -> None:
    put = PutCmd("a", b"1")
    assert decode_entry(encode_command(put)) == put
    batch, data = encode_batch([put, DeleteCmd("b")])
    assert decode_entry(data) == batch == BatchCmd([put, DeleteCmd("b")])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode(["b", []]),  # an empty batch
        msgspec.msgpack.encode(["b", [["zz", 1]]]),  # an unknown command inside
        msgspec.msgpack.encode(["b", [["p", "k", b"v", 0]] * (MAX_BATCH_COMMANDS + 1)]),
        msgspec.msgpack.encode(["b", [["p", "", b"v", 0]]]),  # a command out of bounds
    ],
)
def test_a_malformed_entry_is_invalid_never_anything_else(data: bytes) -> None:
    with pytest.raises(InvalidCommand, match="undecodable log entry"):
        decode_entry(data)


@given(st.binary(max_size=64))
@settings(max_examples=300)
def test_garbage_entries_raise_invalid_command(data: bytes) -> None:
    try:
        decode_entry(data)
    except InvalidCommand:
        pass


# ------------------------------------------------------------------ outcomes


def _group(n: int) -> tuple[BatchWait, list[Slot], Group]:
    loop = asyncio.new_event_loop()
    batch = BatchWait(loop)
    slots = [Slot(batch, k) for k in range(n)]
    for slot in slots:
        batch.started(slot)
    loop.close()
    return batch, slots, Group(slots)


def test_a_group_hands_each_command_its_own_outcome() -> None:
    batch, _, group = _group(3)
    boom = ValueError("boom")
    assert not group.done()
    group.set_result([PutResult(1), boom, PutResult(2)])
    assert group.done() and batch.left == 0
    assert batch.outcomes[0] == PutResult(1) and batch.outcomes[2] == PutResult(2)
    failed = batch.outcomes[1]
    assert isinstance(failed, Failed) and failed.exc is boom


def test_a_group_exception_reaches_every_write() -> None:
    batch, _, group = _group(2)
    exc = RuntimeError("dropped")
    group.set_exception(exc)
    assert all(isinstance(o, Failed) and o.exc is exc for o in batch.outcomes.values())


def test_a_result_of_the_wrong_shape_fails_every_write_clearly() -> None:
    batch, _, group = _group(2)
    group.set_result([PutResult(1)])
    assert all(
        isinstance(o, Failed) and isinstance(o.exc, InvalidCommand) for o in batch.outcomes.values()
    )


def test_a_write_abandoned_at_the_deadline_is_skipped_by_the_group() -> None:
    batch, slots, group = _group(2)
    slots[0].closed = True  # its caller gave up (BatchWait._abandon)
    assert not group.done()
    group.set_result([PutResult(1), PutResult(2)])
    assert group.done() and list(batch.outcomes) == [1]


# ------------------------------------------------------------------ applying a batch


class _Owner:
    """What _Machine needs of its RaftKV (leases and watch wiring are tested elsewhere)."""

    def __init__(self, *, leading: bool = False) -> None:
        from agentcluster.clock import MonotonicClock
        from agentcluster.store._leases import LeaseTimers
        from agentcluster.store._watch import WatchHub

        self.leading = leading
        self.clock = MonotonicClock()
        self.timers = LeaseTimers()
        self.machine = _Machine(self)  # type: ignore[arg-type]
        self.hub = WatchHub(self.machine.kv)
        self.published: list[object] = []  # every event handed to the watch hub, in order
        self.hub.publish = self.published.extend  # type: ignore[method-assign]

    def wake_timers(self) -> None:
        pass


_keys = st.sampled_from(["a", "a/b", "a/c", "b", "c"])
_commands = st.one_of(
    st.builds(PutCmd, _keys, st.binary(max_size=4), st.sampled_from([0, 0, 0, 1, 99])),
    st.builds(DeleteCmd, _keys, st.booleans()),
    st.builds(LeaseGrantCmd, st.sampled_from([1.0, 5.0])),
    st.builds(LeaseRevokeCmd, st.sampled_from([1, 2, 99])),
)


@given(st.lists(_commands, min_size=1, max_size=30), st.integers(0, 2**32), st.booleans())
@settings(max_examples=200, deadline=None)
def test_a_batch_applies_exactly_as_its_commands_one_by_one(
    cmds: list[Command], seed: int, leading: bool
) -> None:
    """Same results, same state (snapshot bytes), same watch events in the same order and the
    same lease timers, wherever the batch boundaries fall."""
    owners = _Owner(leading=leading), _Owner(leading=leading)
    one, batched = owners[0].machine, owners[1].machine
    expected = [one.apply(i + 1, encode_command(c)) for i, c in enumerate(cmds)]
    rng = random.Random(seed)
    got: list[object] = []
    i, index = 0, 1
    while i < len(cmds):
        n = rng.randint(1, 5)
        _, data = encode_batch(cmds[i : i + n])
        out = batched.apply(index, data)
        assert isinstance(out, list)
        got.extend(out)
        i, index = i + n, index + 1
    assert got == expected
    assert batched.snapshot() == one.snapshot()
    assert owners[1].published == owners[0].published
    timers = [
        sorted((i, t.ttl(i)) for i in range(1, 100) if i in t) for t in (o.timers for o in owners)
    ]
    assert timers[1] == timers[0]


def test_a_failing_command_fails_alone() -> None:
    machine = _Owner().machine
    _, data = encode_batch([PutCmd("a", b"1"), PutCmd("b", b"2", lease=7), PutCmd("c", b"3")])
    out = machine.apply(1, data)
    assert isinstance(out, list)
    assert out[0] == PutResult(1) and isinstance(out[1], LeaseMissing) and out[2] == PutResult(2)
    assert machine.kv.get("b") is None and machine.kv.revision == 2


# ------------------------------------------------------------------ through the leader


@pytest.mark.virtual_time
async def test_a_client_batch_is_one_entry_and_big_writes_split_it() -> None:
    c = await started(3, 3, seed=11)
    try:
        leader = leader_of(c)
        member = c.nodes[leader].store_host.member  # type: ignore[union-attr]
        assert member is not None
        store = c.nodes[leader].store

        def puts(n: int, size: int, tag: str) -> list[KvRequest]:
            return [
                KvRequest("cmd", encode_command(PutCmd(f"{tag}{i}", b"v" * size))) for i in range(n)
            ]

        before = member.shell.node.log.last_index
        replies = await store.route_many(puts(20, 10, "small"), timeout=5.0)
        assert all(r.ok for r in replies)
        assert member.shell.node.log.last_index == before + 1
        revs = [unwrap(decode_result(r.data), PutResult).revision for r in replies]
        assert revs == list(range(revs[0], revs[0] + 20))  # in request order
        # Three writes of 40 % of the byte cap: two fit in no entry together.
        big = int(MAX_BATCH_BYTES * 0.4)
        before = member.shell.node.log.last_index
        replies = await store.route_many(puts(3, big, "big"), timeout=5.0)
        assert all(r.ok for r in replies)
        assert member.shell.node.log.last_index == before + 2
        others = [c.nodes[n].store_host.member for n in c.names if n != leader]  # type: ignore[union-attr]
        await wait_until(lambda: all(m is not None and m.kv.get("big2") for m in others))
        assert all(m is not None and m.kv.get("small19") for m in others)
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_a_batch_on_a_follower_is_refused_as_not_leader_then_routed() -> None:
    c = await started(3, 3, seed=12)
    try:
        leader = leader_of(c)
        follower = next(n for n in c.names if n != leader)
        member = c.nodes[follower].store_host.member  # type: ignore[union-attr]
        assert member is not None
        loop = asyncio.get_running_loop()
        reqs = [(k, KvRequest("cmd", encode_command(PutCmd(f"f{k}", b"v")))) for k in range(3)]
        refused = member.submit_batch(reqs, BatchWait(loop))
        assert sorted(refused) == [0, 1, 2]
        assert {r.error for r in refused.values()} == {"not_leader"}
        assert {r.leader for r in refused.values()} == {leader}
        # The store routes them to the leader instead.
        replies = await c.nodes[follower].store.route_many([r for _, r in reqs], timeout=5.0)
        assert all(r.ok for r in replies)
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_a_batch_reaching_a_closed_shell_is_refused_as_not_leader() -> None:
    c = await started(3, 3, seed=13)
    try:
        leader = leader_of(c)
        member = c.nodes[leader].store_host.member  # type: ignore[union-attr]
        assert member is not None
        member.shell._closed = True  # as close() leaves it, before the role changes
        loop = asyncio.get_running_loop()
        batch = BatchWait(loop)
        reqs = [(k, KvRequest("cmd", encode_command(PutCmd(f"z{k}", b"v")))) for k in range(2)]
        try:
            assert member.submit_batch(reqs, batch) == {}
        finally:
            member.shell._closed = False  # let the cluster stop it the normal way
        assert batch.left == 0
        assert all(
            isinstance(o, Failed) and "not the leader" in str(o.exc)
            for o in batch.outcomes.values()
        )
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_a_batch_never_holds_more_commands_than_a_follower_decodes() -> None:
    c = await started(3, 3, seed=14)
    try:
        leader = leader_of(c)
        member = c.nodes[leader].store_host.member  # type: ignore[union-attr]
        assert member is not None
        n = MAX_BATCH_COMMANDS + 5
        reqs = [KvRequest("cmd", encode_command(PutCmd(f"m{i}", b"v"))) for i in range(n)]
        before = member.shell.node.log.last_index
        replies = await c.nodes[leader].store.route_many(reqs, timeout=10.0)
        assert all(r.ok for r in replies)
        assert member.shell.node.log.last_index == before + 2
        others = [c.nodes[x].store_host.member for x in c.names if x != leader]  # type: ignore[union-attr]
        await wait_until(lambda: all(m is not None and m.kv.get(f"m{n - 1}") for m in others))
        assert all(m is not None and m.kv.revision == member.kv.revision for m in others)
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_a_write_too_large_to_replicate_is_refused_and_blocks_nothing() -> None:
    from agentcluster.store.raft import MAX_WRITE_BYTES

    c = await started(3, 3, seed=15)
    try:
        leader = leader_of(c)
        store = c.nodes[leader].store
        big = KvRequest("cmd", encode_command(PutCmd("big", b"v" * (MAX_WRITE_BYTES + 1))))
        small = KvRequest("cmd", encode_command(PutCmd("small", b"v")))
        replies = await store.route_many([big, small], timeout=5.0)
        assert replies[0].error == "invalid" and "limit of" in replies[0].message
        assert replies[1].ok
        with pytest.raises(InvalidCommand, match="per write"):
            await store.put("big", b"v" * (MAX_WRITE_BYTES + 1))
        assert await store.put("after", b"v") > 0  # nothing is stuck behind it
    finally:
        await c.stop()
