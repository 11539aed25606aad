"""The raft store backend: the shared store contract on a simulated cluster, from a voter and
from a node that is no voter (every request forwarded, watches long-polled), plus what only a
replicated store has to show: leader failover, snapshots catching a member up, stalls."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager

import msgspec
import pytest

from agentcluster.clock import MonotonicClock
from agentcluster.consensus.raft import MemoryStorage, RaftConfig
from agentcluster.consensus.raft.messages import Message, RequestVote, TimeoutNow
from agentcluster.store import (
    Compare,
    KeyValue,
    KVStateMachine,
    Lease,
    RangeResult,
    Store,
    StoreError,
    StoreUnavailable,
    TxnOp,
    TxnResult,
    WatchEvent,
)
from agentcluster.store._kv import (
    LeaseGrantCmd,
    PutCmd,
    PutResult,
    decode_result,
    encode_command,
    unwrap,
)
from agentcluster.store.base import MAX_TXN_OPS, PutOp
from agentcluster.store.raft import KvClient, KvReply, KvRequest, RaftKV
from agentcluster.testing import SimCluster, wait_until
from store_contract import StoreContract


class ClusterStore(Store):
    """One node's store; closing it stops the whole simulated cluster."""

    def __init__(self, cluster: SimCluster, name: str) -> None:
        self.cluster = cluster
        self.inner = cluster.nodes[name].store

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def range(self, prefix: str, *, limit: int = 0, start: str = "") -> RangeResult:
        return await self.inner.range(prefix, limit=limit, start=start)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self.inner.delete(key, prefix=prefix)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp] = ()
    ) -> TxnResult:
        return await self.inner.txn(compares, success, failure)

    async def revision(self) -> int:
        return await self.inner.revision()

    async def lease_grant(self, ttl: float) -> Lease:
        return await self.inner.lease_grant(ttl)

    async def lease_keepalive(self, lease_id: int) -> float:
        return await self.inner.lease_keepalive(lease_id)

    async def lease_revoke(self, lease_id: int) -> None:
        await self.inner.lease_revoke(lease_id)

    def watch(
        self, prefix: str, *, start_revision: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        return self.inner.watch(prefix, start_revision=start_revision)

    async def close(self) -> None:
        await self.cluster.stop()


async def started(n: int, voters: int, seed: int = 1, **kw: object) -> SimCluster:
    c = SimCluster(n, seed=seed, store_voters=voters, **kw)  # type: ignore[arg-type]
    await c.start()
    await c.run_for(1.0)
    return c


class _RaftContract(StoreContract):
    async def compact_past(self, store: Store, revision: int) -> None:
        # The raft backend keeps the last 10,000 events (no compact call): roll them over,
        # with a margin for a member that answers a revision or two behind the leader.
        for i in range(10_000 // MAX_TXN_OPS + 3):
            puts = [PutOp(self.key(f"roll/{j}"), b"%d" % i) for j in range(MAX_TXN_OPS)]
            await store.txn([], puts)


class TestRaftStoreFromVoter(_RaftContract):
    pytestmark = pytest.mark.virtual_time

    async def make_store(self) -> Store:
        return ClusterStore(await started(3, 3), "n2")


class TestRaftStoreFromClientNode(_RaftContract):
    pytestmark = pytest.mark.virtual_time

    async def make_store(self) -> Store:
        return ClusterStore(await started(4, 3), "n4")


def leader_of(c: SimCluster) -> str:
    leaders = [
        n
        for n in c.live()
        if c.nodes[n].store_host and c.nodes[n].store_host.stats().get("state") == "leader"
    ]
    assert len(leaders) == 1, leaders
    return leaders[0]


@pytest.mark.virtual_time
async def test_leader_crash_writes_continue_and_acknowledged_writes_survive() -> None:
    c = await started(4, 3, seed=3)
    try:
        store = c.nodes["n4"].store
        acked = [await store.put(f"k{i}", b"%d" % i) for i in range(20)]
        assert acked == sorted(acked)
        old = leader_of(c)
        await c.crash(old)
        t0 = c.clock.now()
        rev = await store.put("after", b"x")
        assert rev > acked[-1]
        assert c.clock.now() - t0 < 1.0  # lan preset: election timeout 0.3 s
        await c.restart(old)
        await c.run_for(1.0)
        for i in range(20):
            kv = await c.nodes[old].store.get(f"k{i}")
            assert kv is not None and kv.value == b"%d" % i
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_far_behind_member_catches_up_from_a_snapshot() -> None:
    c = await started(3, 3, seed=4, snapshot_every=50)
    try:
        leader = leader_of(c)
        behind = next(n for n in c.names if n != leader)
        await c.crash(behind)
        store = c.nodes[leader].store
        for i in range(200):
            await store.put(f"k{i % 7}", b"%d" % i)
        await c.restart(behind)
        member = c.nodes[behind].store_host.member  # type: ignore[union-attr]
        assert member is not None
        await wait_until(lambda: member.kv.revision == 200, timeout=10.0)
        assert member.shell.storage.snapshot is not None
        assert (await c.nodes[behind].store.get("k3")) is not None
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_minority_side_cannot_write_and_majority_goes_on() -> None:
    c = await started(3, 3, seed=5)
    try:
        leader = leader_of(c)
        others = [n for n in c.names if n != leader]
        c.partition([leader], others)
        with pytest.raises(StoreUnavailable):
            await c.nodes[leader].store.put("lonely", b"x")
        assert (await c.nodes[others[0]].store.put("majority", b"y")) > 0
        c.heal()
        await c.run_for(2.0)
        assert (await c.nodes[leader].store.get("lonely")) is None
        kv = await c.nodes[leader].store.get("majority")
        assert kv is not None and kv.value == b"y"
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_leaving_leader_hands_leadership_over() -> None:
    """Thesis §3.10 at the node level: a leader that stops gracefully transfers leadership
    first, so writes resume within a few round trips instead of an election timeout."""
    c = await started(4, 3, seed=6)
    try:
        store = c.nodes["n4"].store
        await store.put("before", b"1")
        old = leader_of(c)
        t0 = c.clock.now()
        took_over: list[float] = []

        async def watch() -> None:
            while not took_over:
                others = [n for n in c.names[:3] if n != old]
                if any(c.nodes[n].store_host.stats().get("state") == "leader" for n in others):  # type: ignore[union-attr]
                    took_over.append(c.clock.now() - t0)
                await c.clock.sleep(0.001)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(watch())
            await c.nodes[old].stop(leave=True)
        c.crashed.add(old)
        new = leader_of(c)
        assert new != old
        assert took_over[0] < 0.1  # no election timeout (lan: 0.3 s) was waited out
        await store.put("after", b"2")
        kv = await c.nodes[new].store.get("before")
        assert kv is not None and kv.value == b"1"
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_a_client_batch_on_the_leader_is_one_raft_batch() -> None:
    """RaftStore.route_many (a client's batch through the control API): on the leader the
    writes are proposed together -- one Raft batch, each with its own revision -- a malformed
    one is refused alone, reads take the general path; on a follower every request is routed
    to the leader."""
    c = await started(3, 3, seed=8)
    try:
        leader = leader_of(c)
        host = c.nodes[leader].store_host
        assert host is not None and host.member is not None
        shell = host.member.shell
        before = shell.batches
        reqs = [KvRequest("cmd", encode_command(PutCmd(f"b{i}", b"%d" % i))) for i in range(10)]
        reqs += [KvRequest("cmd", b"\xc1"), KvRequest("get", key="b3")]
        replies = await c.nodes[leader].store.route_many(reqs, timeout=5.0)
        assert [r.ok for r in replies] == [True] * 10 + [False, True]
        assert replies[10].error == "invalid"
        revisions = [unwrap(decode_result(r.data), PutResult).revision for r in replies[:10]]
        assert revisions == sorted(set(revisions))
        assert shell.batches == before + 1
        follower = next(n for n in c.names if n != leader)
        replies = await c.nodes[follower].store.route_many(reqs[:2] + reqs[-1:], timeout=5.0)
        assert [r.ok for r in replies] == [True] * 3
        kv = await c.nodes[follower].store.get("b3")
        assert kv is not None and kv.value == b"3"
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_a_client_batch_that_cannot_commit_in_time_is_reported_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """route_many on a leader cut off from its followers: the batch's writes are appended
    but cannot commit, so at the deadline each is answered ``unavailable`` (outcome
    unknown) -- never ok, never refused as certainly not applied -- while an invalid one is
    still refused at once. The leader decoded each command once, to validate it, and
    proposed the batch as one log entry, which each follower decoded once."""
    import agentcluster.store._kv as kv_mod
    import agentcluster.store.raft as raft_mod

    c = await started(3, 3, seed=5)
    try:
        leader = leader_of(c)
        decoded: list[bytes] = []
        entries: list[object] = []
        real, real_entry = kv_mod.decode_command, raft_mod.decode_entry

        def counting(data: bytes) -> object:
            decoded.append(data)
            return real(data)

        def counting_entries(data: bytes) -> object:
            entry = real_entry(data)
            entries.append(entry)
            return entry

        monkeypatch.setattr(kv_mod, "decode_command", counting)  # the leader's validation
        monkeypatch.setattr(raft_mod, "decode_entry", counting_entries)
        ok = [KvRequest("cmd", encode_command(PutCmd(f"ok{i}", b"v"))) for i in range(3)]
        replies = await c.nodes[leader].store.route_many(ok, timeout=5.0)
        assert [r.ok for r in replies] == [True] * 3
        revisions = [unwrap(decode_result(r.data), PutResult) for r in replies]
        assert [r.revision for r in revisions] == sorted(r.revision for r in revisions)
        assert len({r.revision for r in revisions}) == 3  # a revision per write, as ever
        members = [c.nodes[n].store_host.member for n in c.names]  # type: ignore[union-attr]
        await wait_until(lambda: all(m is not None and m.kv.get("ok2") for m in members))
        # Once on the leader to validate (its apply reused the batch it built) ...
        assert [decoded.count(r.cmd) for r in ok] == [1, 1, 1]
        # ... and the one batch entry once on each follower.
        assert [type(e).__name__ for e in entries] == ["BatchCmd", "BatchCmd"]
        host = c.nodes[leader].store_host
        assert host is not None and host.member is not None
        assert host.member.machine._decoded == {}
        others = [n for n in c.names if n != leader]
        c.partition([leader], others)
        reqs = [KvRequest("cmd", encode_command(PutCmd(f"cut{i}", b"v"))) for i in range(3)]
        reqs.append(KvRequest("cmd", b"\xc1"))
        replies = await c.nodes[leader].store.route_many(reqs, timeout=0.05)
        assert [r.error for r in replies] == ["unavailable"] * 3 + ["invalid"]
    finally:
        await c.stop()


@pytest.mark.virtual_time
async def test_a_request_without_a_leader_names_its_own_deadline() -> None:
    c = await started(3, 3, seed=21)
    try:
        for n in c.names:
            c.partition([n], [m for m in c.names if m != n])
        await c.run_for(2.0)  # every leader lease and election lapses
        store = c.nodes["n1"].store
        with pytest.raises(StoreUnavailable, match=r"no leader answered within 0\.25 s"):
            await store.request(KvRequest("rev"), timeout=0.25)
    finally:
        await c.stop()


class _HeldNet:
    """Messages between RaftKV members: delivered on the next loop turn, or held while
    ``hold`` is set and released by the test, in order."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Message] = []
        self.members: dict[str, RaftKV] = {}

    def send(self, msg: Message) -> None:
        if self.hold:
            self.held.append(msg)
        else:
            asyncio.get_running_loop().call_soon(self._deliver, msg)

    def _deliver(self, msg: Message) -> None:
        self.members[msg.dst].on_message(msg)

    def release(self, to: str | None = None) -> None:
        go = [m for m in self.held if to is None or m.dst == to]
        self.held = [m for m in self.held if m not in go]
        for m in go:
            self._deliver(m)


@pytest.mark.virtual_time
@pytest.mark.parametrize("lease_reads", [False, True])
async def test_a_keepalive_racing_a_step_down_is_redirected_not_reported_expired(
    lease_reads: bool,
) -> None:
    # A keep-alive's read barrier can complete in the very turn the leader steps down (the
    # quorum's acks and a higher term's vote request arrive together). The old leader has
    # dropped its lease timers then: it must send the client to the next leader, not report
    # a live lease expired (a Lock would give up a lock it still holds).
    net = _HeldNet()
    names = ["a", "b", "c"]
    config = RaftConfig(election_timeout=1.0, heartbeat_interval=0.1, lease_reads=lease_reads)
    for i, name in enumerate(names):
        net.members[name] = RaftKV(
            name,
            names,
            storage=MemoryStorage(),
            clock=MonotonicClock(),
            rng=random.Random(i),
            send=net.send,
            raft_config=config,
        )

    def leaders() -> list[RaftKV]:
        return [m for m in net.members.values() if m.shell.is_leader and m.leading]

    async with asyncio.TaskGroup() as tg:
        for member in net.members.values():
            await member.start(tg)
        try:
            await wait_until(lambda: len(leaders()) == 1, timeout=10)
            (leader,) = leaders()
            f1, f2 = [n for n in names if n != leader.id]
            grant = await leader.serve(KvRequest("cmd", encode_command(LeaseGrantCmd(60.0))))
            lease_id = unwrap(decode_result(grant.data), Lease).id
            assert (await leader.serve(KvRequest("keepalive", n=lease_id))).ok
            net.hold = True
            if lease_reads:
                # No acks: its read lease lapses while it still leads.
                node = leader.shell.node
                await wait_until(lambda: not node.lease_valid(leader.clock.now()), timeout=2)
                assert leader.shell.is_leader
            before = len(net.held)
            keepalive = asyncio.create_task(leader.serve(KvRequest("keepalive", n=lease_id)))
            await wait_until(lambda: any(m.dst == f1 for m in net.held[before:]))  # its round
            net.release(f1)  # f1 acknowledges (its answers held)
            await wait_until(lambda: any(m.src == f1 for m in net.held))
            assert leader.shell.transfer_leadership(f2)
            await wait_until(lambda: any(isinstance(m, TimeoutNow) for m in net.held))
            net.release(f2)  # f2 campaigns (its vote request held)
            await wait_until(lambda: any(isinstance(m, RequestVote) for m in net.held))
            assert not keepalive.done()
            net.release(leader.id)  # f1's acks and f2's vote request in one turn
            reply = await keepalive
            assert not leader.shell.is_leader
            assert (reply.ok, reply.error) == (False, "not_leader"), reply
            net.hold = False
            net.release()
            await wait_until(lambda: len(leaders()) == 1, timeout=10)
            (new,) = leaders()
            assert (await new.serve(KvRequest("keepalive", n=lease_id))).ok  # it lives on
        finally:
            for member in net.members.values():
                await member.close()


@pytest.mark.virtual_time
async def test_an_events_poll_ends_quietly_when_its_member_closes() -> None:
    net = _HeldNet()
    member = RaftKV(
        "a", ["a"], storage=MemoryStorage(), clock=MonotonicClock(), rng=random.Random(0),
        send=net.send,
    )  # fmt: skip
    net.members["a"] = member
    async with asyncio.TaskGroup() as tg:
        await member.start(tg)
        await wait_until(lambda: member.shell.is_leader and member.leading, timeout=10)
        poll = asyncio.create_task(member.serve(KvRequest("events", key="", n=1, wait=20.0)))
        await wait_until(lambda: len(member.hub) > 0)
        await member.close()
        reply = await poll
        assert reply.ok and reply.data == msgspec.msgpack.encode([])


class _KvRequestBeforeStart(msgspec.Struct, frozen=True, array_like=True, tag="kvq"):
    """``KvRequest`` as it was before ranges had a start key."""

    op: str
    cmd: bytes = b""
    key: str = ""
    n: int = 0
    wait: float = 0.0


def test_range_requests_with_and_without_a_start_decode_on_either_side() -> None:
    # An older client's request decodes with no start; a member older than the field reads
    # a new request as the same range without it (what KvClient.range then guards against).
    old = msgspec.msgpack.encode(_KvRequestBeforeStart("range", key="p/", n=5))
    assert msgspec.msgpack.decode(old, type=KvRequest) == KvRequest("range", key="p/", n=5)
    new = msgspec.msgpack.encode(KvRequest("range", key="p/", n=5, start="p/7"))
    assert msgspec.msgpack.decode(new, type=_KvRequestBeforeStart).key == "p/"


class _MemberBeforeStart(KvClient):
    """A store whose every request is answered by a member that predates range starts."""

    def __init__(self) -> None:
        self._clock = MonotonicClock()
        self.kv = KVStateMachine()
        for i in range(5):
            self.kv.apply(PutCmd(f"p/{i}", b""))

    async def request(self, req: KvRequest, *, timeout: float | None = None) -> KvReply:
        seen = msgspec.msgpack.decode(msgspec.msgpack.encode(req), type=_KvRequestBeforeStart)
        return KvReply(True, msgspec.msgpack.encode(self.kv.range(seen.key, seen.n)))

    async def _call_events(self, req: KvRequest) -> KvReply:
        raise NotImplementedError

    async def close(self) -> None:
        pass


async def test_a_member_that_ignores_the_start_fails_the_range_instead_of_looping() -> None:
    store = _MemberBeforeStart()
    assert [kv.key for kv in (await store.range("p/", limit=2)).kvs] == ["p/0", "p/1"]
    with pytest.raises(StoreError, match="ignores a range's start"):
        await store.range("p/", limit=2, start="p/1\0")
    with pytest.raises(StoreError, match="ignores a range's start"):
        async for _ in store.range_pages("p/", page=2):
            pass


@pytest.mark.virtual_time
async def test_a_member_far_behind_catches_up_when_the_state_outgrows_one_frame() -> None:
    # About 6 MiB of state (and its watch history) in the snapshot: more than a transport
    # frame (4 MiB) carries, so it must travel in pieces.
    c = await started(3, 3, seed=4, snapshot_every=5)
    try:
        leader = leader_of(c)
        behind = next(n for n in c.names if n != leader)
        await c.crash(behind)
        store = c.nodes[leader].store
        value = b"v" * (600 * 1024)
        for i in range(20):
            await store.put(f"k{i % 10}", value)
        rev = (await store.get("k9")).mod_revision  # type: ignore[union-attr]
        host = c.nodes[leader].store_host
        assert host is not None and host.stats()["snapshot_index"] > 0
        await c.restart(behind)
        member = c.nodes[behind].store_host.member  # type: ignore[union-attr]
        assert member is not None
        await wait_until(lambda: member.kv.revision >= rev, timeout=20.0)
        assert member.shell.snapshots_installed >= 1
        assert member.kv.get("k3").value == value  # type: ignore[union-attr]
        assert c.nodes[leader].transport._stats.oversized_dropped == 0  # type: ignore[attr-defined]
    finally:
        await c.stop()
