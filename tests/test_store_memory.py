"""The memory store: the shared contract (in virtual and in real time) plus what only a
single-process store can promise -- exact lease timing, exact revisions, watch back-pressure.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from agentcluster.clock import SimClock
from agentcluster.store import (
    Compacted,
    InvalidCommand,
    KVStateMachine,
    LeaseNotFound,
    MemoryStore,
    PutOp,
    RangeResult,
    ReplyTooLarge,
    Store,
    StoreUnavailable,
    WatchEvent,
    WatchHub,
)
from agentcluster.store._kv import PutCmd, TxnCmd
from agentcluster.testing import advance, wait_until
from store_contract import StoreContract


class TestMemoryStore(StoreContract):
    """The contract on a virtual-time loop: every TTL passes instantly."""

    pytestmark = pytest.mark.virtual_time

    async def make_store(self) -> Store:
        return MemoryStore()


class TestMemoryStoreRealTime(StoreContract):
    """The contract in real time with short TTLs, as the etcd and raft backends run it."""

    short_ttl = 0.2
    lock_ttl = 0.6
    settle_timeout = 5.0

    async def make_store(self) -> Store:
        return MemoryStore()


async def take(
    events: AsyncIterator[WatchEvent], n: int, *, timeout: float = 10.0
) -> list[WatchEvent]:
    async with asyncio.timeout(timeout):
        return [await anext(events) for _ in range(n)]


# --- exact lease timing (virtual time) ----------------------------------------------------


@pytest.mark.virtual_time
async def test_lease_expires_at_exactly_its_ttl() -> None:
    loop = asyncio.get_running_loop()
    async with MemoryStore() as store:
        start = loop.time()
        lease = await store.lease_grant(10.0)
        await store.put("k", b"", lease=lease.id)
        async with store.watch("k") as events:
            await advance(9.999)
            assert await store.get("k") is not None
            (gone,) = await take(events, 1, timeout=60.0)
            assert gone.type == "delete"
            assert loop.time() - start == pytest.approx(10.0, abs=1e-6)
        with pytest.raises(LeaseNotFound):
            await store.lease_keepalive(lease.id)


@pytest.mark.virtual_time
async def test_keepalive_restarts_the_ttl_from_its_own_instant() -> None:
    loop = asyncio.get_running_loop()
    async with MemoryStore() as store:
        start = loop.time()
        lease = await store.lease_grant(10.0)
        await store.put("k", b"", lease=lease.id)
        await advance(6.0)
        assert await store.lease_keepalive(lease.id) == 10.0
        async with store.watch("k") as events:
            await advance(9.99)
            assert await store.get("k") is not None
            (gone,) = await take(events, 1, timeout=60.0)
            assert loop.time() - start == pytest.approx(16.0, abs=1e-6)
            assert gone.type == "delete"


@pytest.mark.virtual_time
async def test_leases_expire_in_deadline_order_and_late_grants_wake_the_timer() -> None:
    loop = asyncio.get_running_loop()
    async with MemoryStore() as store:
        start = loop.time()
        slow = await store.lease_grant(30.0)
        await store.put("slow", b"", lease=slow.id)
        fast = await store.lease_grant(2.0)  # earlier than the deadline the task sleeps on
        await store.put("fast", b"", lease=fast.id)
        seen: list[tuple[str, float]] = []
        async with store.watch("") as events:
            for _ in range(2):
                (event,) = await take(events, 1, timeout=60.0)
                seen.append((event.kv.key, round(loop.time() - start, 6)))
        assert seen == [("fast", 2.0), ("slow", 30.0)]


async def test_keepalive_after_the_deadline_is_refused_even_before_the_timer_ran() -> None:
    clock = SimClock()
    async with MemoryStore(clock=clock) as store:
        lease = await store.lease_grant(5.0)
        await store.put("k", b"", lease=lease.id)
        await clock.run_for(4.0)
        assert await store.lease_keepalive(lease.id) == 5.0
        clock.advance(5.0)  # the deadline passed; the expiry task has not run yet
        with pytest.raises(LeaseNotFound):
            await store.lease_keepalive(lease.id)
        assert await store.get("k") is None


async def test_writes_after_the_deadline_find_the_lease_gone_before_the_timer_ran() -> None:
    # A holder paused past its TTL (a GC pause, a busy loop) must be fenced off at once, not
    # when the expiry task next gets the CPU.
    clock = SimClock()
    async with MemoryStore(clock=clock) as store:
        lock = store.lock("job", ttl=5.0)
        await lock.acquire()
        assert await lock.fenced_put("out", b"1")
        lease = await store.lease_grant(5.0)
        await store.put("mine", b"", lease=lease.id)
        clock.advance(5.0)  # both deadlines passed; the expiry task has not run yet
        assert await store.get("mine") is None
        assert not await lock.fenced_put("out", b"stale")
        with pytest.raises(LeaseNotFound):
            await store.put("k", b"v", lease=lease.id)
        assert (await store.get("out")).value == b"1"  # type: ignore[union-attr]
        assert (await store.range("job/")).kvs == [] and store.machine.leases() == {}


async def test_a_sim_clock_drives_expiry() -> None:
    clock = SimClock()
    async with MemoryStore(clock=clock) as store:
        lease = await store.lease_grant(3.0)
        await store.put("k", b"", lease=lease.id)
        await clock.run_for(2.9)
        assert await store.get("k") is not None
        await clock.run_for(0.1)
        assert await store.get("k") is None
        assert store.machine.leases() == {}


@pytest.mark.virtual_time
async def test_a_lock_outlives_its_ttl_while_kept_alive() -> None:
    async with MemoryStore() as store:
        async with store.lock("job", ttl=3.0) as lock:
            await advance(60.0)
            assert lock.held and not lock.lost
            assert await lock.fenced_put("out", b"1")
        assert (await store.range("job/")).kvs == []


class FlakyKeepalives(MemoryStore):
    """A store whose keep-alives fail as if the network were down."""

    down = False

    async def lease_keepalive(self, lease_id: int) -> float:
        if self.down:
            raise StoreUnavailable("no route to the store")
        return await super().lease_keepalive(lease_id)


@pytest.mark.virtual_time
async def test_a_lock_is_lost_after_a_ttl_without_a_successful_keepalive() -> None:
    loop = asyncio.get_running_loop()
    async with FlakyKeepalives() as store:
        lock = store.lock("job", ttl=3.0)
        await lock.acquire()
        await advance(10.0)
        assert lock.held
        store.down = True
        went_down = loop.time()
        await wait_until(lambda: lock.lost, timeout=10.0)
        # Lost once keep-alives failed for a whole TTL since the last good one (<= ttl/3 ago).
        assert 2.0 - 1e-6 <= loop.time() - went_down <= 3.0 + 0.01  # + the poll interval
        assert not lock.held
        await lock.release()
        assert (await store.range("job/")).kvs == []


# --- exact revisions ----------------------------------------------------------------------


async def test_revisions_exactly() -> None:
    async with MemoryStore() as store:
        assert await store.revision() == 0
        assert await store.put("a", b"") == 1
        assert await store.delete("missing") == 0
        lease = await store.lease_grant(10.0)
        assert await store.revision() == 1  # no-op delete, lease grant: no revision
        txn = await store.txn([], [PutOp("b", b"", lease.id), PutOp("c", b"", lease.id)])
        assert txn.revision == 2 and txn.results == [2, 2]
        assert (await store.txn([], [])).revision == 2
        await store.lease_revoke(lease.id)
        assert await store.revision() == 3  # two keys, one revision
        assert await store.delete("", prefix=True) == 1
        assert await store.revision() == 4


async def test_invalid_input_is_a_typed_error_and_changes_nothing() -> None:
    async with MemoryStore() as store:
        with pytest.raises(InvalidCommand):
            await store.put("", b"")
        with pytest.raises(InvalidCommand):
            await store.lease_grant(0)
        with pytest.raises(InvalidCommand):
            await store.put("k", "not bytes")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await store.range("", limit=-1)
        assert await store.revision() == 0 and store.machine.leases() == {}


class _SmallReplies(MemoryStore):
    """Refuses, as a full reply frame would, any range answer of more than ``fits`` keys."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits
        self.asked: list[int] = []

    async def range(self, prefix: str, *, limit: int = 0, start: str = "") -> RangeResult:
        self.asked.append(limit)
        result = await super().range(prefix, limit=limit, start=start)
        if len(result.kvs) > self.fits:
            raise ReplyTooLarge(f"{len(result.kvs)} keys do not fit")
        return result


async def test_range_pages_halve_a_page_too_large_for_a_reply_and_grow_back() -> None:
    async with _SmallReplies(fits=3) as store:
        for i in range(10):
            await store.put(f"k/{i}", b"")
        pages = [page async for page in store.range_pages("k/", page=8)]
        assert [kv.key for page in pages for kv in page.kvs] == [f"k/{i}" for i in range(10)]
        assert [len(page.kvs) for page in pages] == [2, 2, 2, 2, 2]
        # Halved until a page fitted, then each next page asks for twice as many again.
        assert store.asked == [8, 4, 2, 4, 2, 4, 2, 4, 2, 4]


async def test_range_pages_give_up_when_one_key_does_not_fit() -> None:
    async with _SmallReplies(fits=0) as store:
        await store.put("k/1", b"")
        with pytest.raises(ReplyTooLarge):
            await anext(store.range_pages("k/", page=4))
        assert store.asked == [4, 2, 1]


# --- watches: back-pressure, compaction, races --------------------------------------------


async def test_a_slow_watcher_catches_up_from_history_exactly_once() -> None:
    async with MemoryStore(max_watch_queue=4) as store, store.watch("k") as events:
        revs = [await store.put(f"k{i % 3}", b"%d" % i) for i in range(50)]
        got = await take(events, 50)
        assert [e.revision for e in got] == revs
        assert [e.kv.value for e in got] == [b"%d" % i for i in range(50)]
        marker = await store.put("k-marker", b"")
        assert [e.revision for e in await take(events, 1)] == [marker]


async def test_a_watcher_behind_the_retained_history_gets_compacted() -> None:
    async with MemoryStore(max_watch_queue=2, max_events=5) as store, store.watch("") as events:
        for i in range(20):
            await store.put(f"k{i}", b"")
        assert [e.revision for e in await take(events, 2)] == [1, 2]
        with pytest.raises(Compacted) as info:
            await anext(events)
        assert info.value.requested == 3 and info.value.oldest == 16


async def test_watch_from_a_compacted_revision_fails_from_its_iterator() -> None:
    async with MemoryStore() as store:
        for i in range(5):
            await store.put(f"k{i}", b"")
        assert await store.compact(4) == 4
        async with store.watch("", start_revision=3) as events:
            with pytest.raises(Compacted) as info:
                await anext(events)
            assert (info.value.requested, info.value.oldest) == (3, 4)
        async with store.watch("", start_revision=4) as events:
            assert [e.revision for e in await take(events, 2)] == [4, 5]


async def test_hub_late_publish_is_not_repeated() -> None:
    machine = KVStateMachine()
    hub = WatchHub(machine)
    machine.apply(PutCmd("a", b"1"))
    late = machine.last_events  # applied, not yet published
    async with hub.watch("", start_revision=1) as events:
        hub.publish(late)  # the replay already had it
        machine.apply(PutCmd("b", b"2"))
        hub.publish(machine.last_events)
        got = await take(events, 2)
        assert [(e.kv.key, e.revision) for e in got] == [("a", 1), ("b", 2)]
        machine.apply(PutCmd("c", b"3"))
        hub.publish(machine.last_events)
        assert [e.kv.key for e in await take(events, 1)] == ["c"]
    assert len(hub) == 0


async def test_hub_resync_after_a_snapshot_restore() -> None:
    leader, follower = KVStateMachine(), KVStateMachine()
    hub = WatchHub(follower)
    async with hub.watch("") as events:
        for key in ("a", "b"):
            leader.apply(PutCmd(key, b""))
        follower.restore(leader.snapshot())  # events arrived without a publish
        hub.resync()
        assert [e.kv.key for e in await take(events, 2)] == ["a", "b"]


async def test_close_ends_watches_and_refuses_everything() -> None:
    store = MemoryStore()
    lease = await store.lease_grant(5.0)
    async with store.watch("") as events:
        await store.put("k", b"", lease=lease.id)
        reader = asyncio.create_task(take(events, 2))
        await wait_until(lambda: len(store._hub) == 1)
        await store.close()
        with pytest.raises(StopAsyncIteration):
            await reader
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    await store.close()  # idempotent
    for call in (store.get("k"), store.put("k", b""), store.revision(), store.lease_grant(1)):
        with pytest.raises(StoreUnavailable):
            await call
    with pytest.raises(StoreUnavailable):
        async with store.watch(""):
            pass


@pytest.mark.parametrize("seed", range(40))
async def test_hub_delivers_exactly_once_under_random_interleavings(seed: int) -> None:
    """Writes, late publishes, resyncs and a reader that pauses at random: the reader gets
    exactly the history from its start revision, in order."""
    rng = random.Random(seed)
    machine = KVStateMachine()
    hub = WatchHub(machine, max_queue=rng.randint(1, 6))
    for i in range(rng.randint(0, 10)):
        machine.apply(PutCmd(f"k{i % 4}", b""))
    start = rng.randint(1, machine.revision + 2)
    prefix = rng.choice(["", "k1", "k"])
    pending: list[WatchEvent] = []
    async with hub.watch(prefix, start) as events:
        got: list[WatchEvent] = []

        async def read() -> None:
            async for event in events:
                got.append(event)
                for _ in range(rng.randint(0, 3)):
                    await asyncio.sleep(0)  # a reader of random speed (noqa: sleep)

        reader = asyncio.create_task(read())
        for i in range(200):
            roll = rng.random()
            if roll < 0.5:
                if rng.random() < 0.3:
                    machine.apply(TxnCmd([], [PutOp(f"k{i % 3}", b""), PutOp("k3", b"")]))
                else:
                    machine.apply(PutCmd(f"k{i % 5}", b"%d" % i))
                pending.extend(machine.last_events)
            elif roll < 0.8 and pending:
                cut = rng.randint(1, len(pending))
                while cut < len(pending) and pending[cut].revision == pending[cut - 1].revision:
                    cut += 1  # a driver publishes whole revisions
                hub.publish(pending[:cut])
                del pending[:cut]
            elif roll < 0.85:
                hub.resync()
            else:
                await asyncio.sleep(0)  # let the reader run (noqa: sleep)
        hub.publish(pending)
        expected = machine.events_since(start, prefix)
        await wait_until(lambda: len(got) >= len(expected))
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert got == expected
