"""The raft store backend: the shared store contract on a simulated cluster, from a voter and
from a node that is no voter (every request forwarded, watches long-polled), plus what only a
replicated store has to show: leader failover, snapshots catching a member up, stalls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager

import pytest

from agentcluster.store import (
    Compare,
    KeyValue,
    Lease,
    RangeResult,
    Store,
    StoreUnavailable,
    TxnOp,
    TxnResult,
    WatchEvent,
)
from agentcluster.store._kv import PutCmd, PutResult, decode_result, encode_command, unwrap
from agentcluster.store.raft import KvRequest
from agentcluster.testing import SimCluster, wait_until
from store_contract import StoreContract


class ClusterStore(Store):
    """One node's store; closing it stops the whole simulated cluster."""

    def __init__(self, cluster: SimCluster, name: str) -> None:
        self.cluster = cluster
        self.inner = cluster.nodes[name].store

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def range(self, prefix: str, *, limit: int = 0) -> RangeResult:
        return await self.inner.range(prefix, limit=limit)

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


class TestRaftStoreFromVoter(StoreContract):
    pytestmark = pytest.mark.virtual_time

    async def make_store(self) -> Store:
        return ClusterStore(await started(3, 3), "n2")


class TestRaftStoreFromClientNode(StoreContract):
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
    import agentcluster.store.raft as raft_mod

    c = await started(3, 3, seed=5)
    try:
        leader = leader_of(c)
        decoded: list[bytes] = []
        entries: list[object] = []
        real, real_entry = raft_mod.decode_command, raft_mod.decode_entry

        def counting(data: bytes) -> object:
            decoded.append(data)
            return real(data)

        def counting_entries(data: bytes) -> object:
            entry = real_entry(data)
            entries.append(entry)
            return entry

        monkeypatch.setattr(raft_mod, "decode_command", counting)
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
