"""Barriers over the coordination store (MemoryStore, virtual time)."""

from __future__ import annotations

import asyncio

import pytest

from agentcluster.clock import SimClock
from agentcluster.coordination.barrier import (
    Barrier,
    BarrierError,
    BarrierMismatch,
    BarrierTimeout,
)
from agentcluster.store import MemoryStore
from agentcluster.store.base import LeaseNotFound
from agentcluster.testing import advance, wait_until


def _now() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.virtual_time
@pytest.mark.parametrize(
    "delays",
    [
        [0.0],
        [0.0, 1.0],
        [3.0, 0.5, 2.0, 1.0],
        [0.0, 0.0, 0.0, 5.0, 0.0],
        [1.5, 1.5, 4.0, 0.25, 3.0, 2.0, 0.75, 3.5],
    ],
)
async def test_all_released_together_none_early(delays: list[float]) -> None:
    async with MemoryStore() as store:
        parties = len(delays)
        start = _now()
        released: dict[str, float] = {}
        revisions: list[int] = []

        async def participant(i: int, delay: float) -> None:
            await advance(delay)  # arrives late on purpose (noqa: sleep)
            barrier = Barrier(store, "b", parties)
            revisions.append(await barrier.arrive_and_wait(f"p{i}", timeout=60))
            released[f"p{i}"] = _now() - start

        async with asyncio.TaskGroup() as group:
            for i, delay in enumerate(delays):
                group.create_task(participant(i, delay))
        last = max(delays)
        assert sorted(released) == sorted(f"p{i}" for i in range(parties))
        assert all(t == pytest.approx(last) for t in released.values()), released
        assert len(set(revisions)) == 1
        # The completion revision is the last arrival's: nobody was released before it.
        arrivals = (await store.range("b/arrived/")).kvs
        assert revisions[0] == max(kv.create_revision for kv in arrivals)


@pytest.mark.virtual_time
async def test_waiters_stay_blocked_until_the_last_arrival() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "b", 3)
        waiters = [asyncio.create_task(barrier.wait()) for _ in range(3)]
        assert await barrier.arrive("a") == 1
        assert await barrier.arrive("b") == 2
        await advance(10)  # time passes with two of three arrived (noqa: sleep)
        assert not any(w.done() for w in waiters)
        assert await store.get("b/done") is None
        assert await barrier.arrive("c") == 3
        results = await asyncio.gather(*waiters)
        assert len(set(results)) == 1


@pytest.mark.virtual_time
async def test_timeout_raises_with_a_clear_message() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "meet", 3)
        await barrier.arrive("a")
        await barrier.arrive("b")
        start = _now()
        with pytest.raises(BarrierTimeout, match=r"'meet': 2 of 3 participants arrived within 5"):
            await barrier.wait(timeout=5)
        assert _now() - start == pytest.approx(5)
        with pytest.raises(TimeoutError):  # a BarrierTimeout is a TimeoutError too
            await barrier.wait(timeout=1)
        # The timed-out arrive_and_wait keeps its arrival (arriving is a fact).
        other = Barrier(store, "solo", 2)
        with pytest.raises(BarrierTimeout, match="1 of 2"):
            await other.arrive_and_wait("x", timeout=2)
        assert await other.arrived() == ["x"]


@pytest.mark.virtual_time
async def test_timeout_follows_the_barrier_clock() -> None:
    async with MemoryStore() as store:
        clock = SimClock()
        barrier = Barrier(store, "b", 2, clock=clock)
        waiting = asyncio.create_task(barrier.wait(timeout=30))
        await advance(100)  # loop time passes; the barrier's clock does not (noqa: sleep)
        assert not waiting.done()
        await clock.run_for(30)
        with pytest.raises(BarrierTimeout, match="0 of 2"):
            await waiting


@pytest.mark.virtual_time
async def test_outer_cancel_stays_a_cancel() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "b", 2)
        waiting = asyncio.create_task(barrier.wait(timeout=30))
        await advance(1)  # let it start watching (noqa: sleep)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting


@pytest.mark.virtual_time
async def test_mismatched_party_counts_are_refused() -> None:
    async with MemoryStore() as store:
        three = Barrier(store, "b", 3)
        four = Barrier(store, "b", 4)
        assert await three.create() is True
        assert await three.create() is False
        assert await Barrier(store, "b", 3).create() is False
        with pytest.raises(BarrierMismatch, match="exists for 3 parties, not 4"):
            await four.create()
        with pytest.raises(BarrierMismatch):
            await four.arrive("x")
        with pytest.raises(BarrierMismatch):
            await four.wait(timeout=1)
        assert await three.arrived() == []  # the refused arrival left nothing


@pytest.mark.virtual_time
async def test_arrive_is_idempotent_and_creates_the_barrier() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "b", 3)
        assert await barrier.arrive("alice") == 1
        assert await store.get("b/parties") is not None
        rev = await store.revision()
        assert await barrier.arrive("alice") == 1
        assert await store.revision() == rev  # the repeat wrote nothing
        assert await Barrier(store, "b", 3).arrive("bob") == 2
        assert await barrier.arrive("alice") == 2
        assert await barrier.arrived() == ["alice", "bob"]
        with pytest.raises(ValueError):
            await barrier.arrive("")
        with pytest.raises(LeaseNotFound):
            await barrier.arrive("carol", lease=12345)
        assert await barrier.arrived() == ["alice", "bob"]


@pytest.mark.virtual_time
async def test_an_expired_arrival_before_completion_drops_out() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "b", 3)
        lease = await store.lease_grant(2.0)
        assert await barrier.arrive("mortal", lease=lease.id) == 1
        assert await barrier.arrive("y") == 2
        waiting = asyncio.create_task(barrier.wait())
        await advance(3)  # the lease expires, nobody keeps it alive (noqa: sleep)
        assert await barrier.arrived() == ["y"]
        assert await barrier.arrive("z") == 2
        await advance(1)  # (noqa: sleep)
        assert not waiting.done()  # the waiter counted the expiry: 2 of 3, not 3
        assert await barrier.arrive("w") == 3
        revision = await waiting
        assert revision == (await store.get("b/arrived/w")).create_revision  # type: ignore[union-attr]


@pytest.mark.virtual_time
async def test_completion_is_sticky_after_a_lease_expiry() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "b", 2)
        lease = await store.lease_grant(2.0)
        await barrier.arrive("a", lease=lease.id)
        assert await barrier.arrive("b") == 2  # completes it; the arrival records done
        done = await store.get("b/done")
        assert done is not None
        await advance(5)  # a's lease expires after completion (noqa: sleep)
        assert await barrier.arrived() == ["b"]
        rev = await barrier.wait(timeout=1)
        assert rev == await Barrier(store, "b", 2).wait(timeout=1)
        assert await store.get("b/done") == done  # written once


@pytest.mark.virtual_time
async def test_wait_after_completion_returns_at_once() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "b", 2)
        await barrier.arrive("a")
        await barrier.arrive("b")
        start = _now()
        for _ in range(3):
            await barrier.wait(timeout=0.5)
        assert _now() == start


@pytest.mark.virtual_time
async def test_a_waiter_records_completion_when_arrivals_did_not() -> None:
    async with MemoryStore() as store:
        # Arrivals written straight into the store (a participant that crashed between its
        # arrival and recording completion): the first waiter to see it records it.
        barrier = Barrier(store, "b", 2)
        await barrier.create()
        await store.put("b/arrived/a", b"")
        rev = await store.put("b/arrived/b", b"")
        await store.put("b/arrived/c", b"")  # one more than needed: completion was at b
        assert await store.get("b/done") is None
        assert await barrier.wait(timeout=1) == rev
        assert await store.get("b/done") is not None
        assert await Barrier(store, "b", 2).wait() == rev


@pytest.mark.virtual_time
async def test_delete_removes_every_key_and_fails_waiters() -> None:
    async with MemoryStore() as store:
        barrier = Barrier(store, "b", 3)
        await barrier.arrive("a")
        waiting = asyncio.create_task(barrier.wait())
        await advance(1)  # (noqa: sleep)
        await barrier.delete()
        with pytest.raises(BarrierError, match="deleted"):
            await waiting
        assert (await store.range("b/")).kvs == []
        assert await barrier.arrive("a") == 1  # a fresh barrier


@pytest.mark.virtual_time
async def test_many_waiters_one_arrival_each() -> None:
    async with MemoryStore() as store:
        parties = 50
        released: list[int] = []

        async def run(i: int) -> None:
            released.append(await Barrier(store, "big", parties).arrive_and_wait(f"{i:03}"))

        tasks = [asyncio.create_task(run(i)) for i in range(parties - 1)]
        await wait_until(lambda: len(store.machine.range("big/arrived/").kvs) == parties - 1)
        await advance(1)  # (noqa: sleep)
        assert released == []
        await run(parties - 1)
        await asyncio.gather(*tasks)
        assert len(released) == parties and len(set(released)) == 1


def test_bad_arguments() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError):
        Barrier(store, "b", 0)
    with pytest.raises(ValueError):
        Barrier(store, "", 2)
