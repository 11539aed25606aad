"""Counting semaphores / resource pools over the coordination store (MemoryStore, virtual
time)."""

from __future__ import annotations

import asyncio
import random

import pytest

from agentcluster.coordination.semaphore import (
    Permit,
    Semaphore,
    SemaphoreError,
    SemaphoreTimeout,
)
from agentcluster.store import MemoryStore
from agentcluster.store.base import RangeResult, StoreUnavailable
from agentcluster.testing import advance, wait_until


class _CutOffStore(MemoryStore):
    """A store whose keep-alives from some leases never arrive: their holder is as good as
    crashed (or partitioned away), and its leases expire after their TTL."""

    def __init__(self) -> None:
        super().__init__()
        self.cut: set[int] = set()

    async def lease_keepalive(self, lease_id: int) -> float:
        if lease_id in self.cut:
            raise StoreUnavailable("cut off")
        return await super().lease_keepalive(lease_id)


def _now() -> float:
    return asyncio.get_running_loop().time()


def _keepers() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name().startswith("semaphore-keepalive"))


async def _keys(store: MemoryStore, prefix: str) -> list[str]:
    return [kv.key for kv in (await store.range(prefix)).kvs]


@pytest.mark.virtual_time
@pytest.mark.parametrize(("limit", "workers", "seed"), [(1, 20, 1), (3, 40, 2), (5, 60, 3)])
async def test_never_more_than_limit_units_held(limit: int, workers: int, seed: int) -> None:
    async with MemoryStore() as store:
        rng = random.Random(seed)
        plan = [
            (rng.randint(1, limit), rng.uniform(0, 3), rng.uniform(0.1, 2)) for _ in range(workers)
        ]
        in_use = 0
        most = 0
        grants = 0

        async def worker(weight: int, start: float, work: float) -> None:
            nonlocal in_use, most, grants
            await advance(start)  # staggered arrivals (noqa: sleep)
            sem = Semaphore(store, "pool", limit, ttl=5.0)
            async with await sem.acquire(weight) as permit:
                in_use += weight
                most = max(most, in_use)
                assert in_use <= limit, f"{in_use} units held, limit {limit}"
                assert await permit.fenced_put("pool-work", b"%d" % permit.token)
                await advance(work)  # holding the units while working (noqa: sleep)
                in_use -= weight
                grants += 1

        async with asyncio.TaskGroup() as group:
            for weight, start, work in plan:
                group.create_task(worker(weight, start, work))
        assert grants == workers
        assert most == limit or max(w for w, _, _ in plan) < limit
        sem = Semaphore(store, "pool", limit)
        assert await sem.holders() == []
        assert await sem.available() == limit
        assert await _keys(store, "pool/") == []
        assert store.machine.leases() == {}
        assert _keepers() == 0


@pytest.mark.virtual_time
async def test_fifo_with_weights_a_big_request_is_not_starved() -> None:
    async with MemoryStore() as store:
        sem = Semaphore(store, "pool", 3)
        small = await sem.acquire(2)
        big = asyncio.create_task(sem.acquire(3))
        await wait_until(lambda: len(store.machine.range("pool/").kvs) == 2)
        # A stream of one-unit requests: each would fit beside the holder, none may pass.
        smalls = [asyncio.create_task(sem.acquire(1)) for _ in range(3)]
        await wait_until(lambda: len(store.machine.range("pool/").kvs) == 5)
        await advance(5)  # (noqa: sleep)
        assert not big.done() and not any(s.done() for s in smalls)
        assert await sem.holders() == [(small.key, 2)]
        assert await sem.available() == 1
        await small.release()
        got_big = await big
        assert got_big.token > small.token
        await advance(1)  # (noqa: sleep)
        assert not any(s.done() for s in smalls)
        assert await sem.holders() == [(got_big.key, 3)]
        await got_big.release()
        permits = await asyncio.gather(*smalls)
        assert [p.token for p in permits] == sorted(p.token for p in permits)
        assert await sem.available() == 0
        for p in permits:
            await p.release()
        assert await sem.available() == 3


@pytest.mark.virtual_time
async def test_a_crashed_holder_frees_its_units_after_the_ttl() -> None:
    async with _CutOffStore() as store:
        sem = Semaphore(store, "pool", 2, ttl=3.0)
        crashed = await sem.acquire(2)
        start = _now()
        store.cut.add(crashed.lease)  # its keep-alives stop reaching the store
        waiting = asyncio.create_task(sem.acquire(1))
        await advance(1.5)  # (noqa: sleep)
        assert not waiting.done()
        permit = await asyncio.wait_for(waiting, timeout=10)
        # The lease was last renewed at ``start`` at the latest: expiry within one TTL.
        assert _now() - start <= 3.0 + 1e-6
        assert await sem.holders() == [(permit.key, 1)]
        await wait_until(lambda: crashed.lost, timeout=10)
        assert not crashed.held
        await crashed.release()
        await permit.release()
        assert _keepers() == 0


@pytest.mark.virtual_time
async def test_fencing_rejects_a_stale_holder() -> None:
    async with _CutOffStore() as store:
        sem = Semaphore(store, "pool", 1, ttl=3.0)
        old = await sem.acquire()
        assert await old.fenced_put("resource", b"old")
        store.cut.add(old.lease)
        new = await sem.acquire(timeout=10)  # granted once the old lease expired
        assert new.token > old.token
        # The stale holder may not have noticed yet, but its writes are refused.
        assert not await old.fenced_put("resource", b"stale")
        kv = await store.get("resource")
        assert kv is not None and kv.value == b"old"
        assert await new.fenced_put("resource", b"new")
        await wait_until(lambda: old.lost, timeout=10)
        await old.release()
        await new.release()
        assert not await new.fenced_put("resource", b"after")


@pytest.mark.virtual_time
async def test_timeout_withdraws_the_request() -> None:
    async with MemoryStore() as store:
        sem = Semaphore(store, "pool", 2)
        holder = await sem.acquire(2)
        start = _now()
        with pytest.raises(SemaphoreTimeout, match=r"1 of 2 units not granted within 4") as info:
            await sem.acquire(1, timeout=4)
        assert isinstance(info.value, TimeoutError)
        assert _now() - start == pytest.approx(4)
        assert await _keys(store, "pool/") == [holder.key]
        assert list(store.machine.leases()) == [holder.lease]  # the waiter's lease is gone
        assert _keepers() == 1
        await holder.release()
        later = await sem.acquire(2, timeout=1)
        assert later.token > holder.token
        await later.release()


@pytest.mark.virtual_time
async def test_cancelled_acquire_withdraws_the_request() -> None:
    async with MemoryStore() as store:
        sem = Semaphore(store, "pool", 1)
        holder = await sem.acquire()
        waiting = asyncio.create_task(sem.acquire())
        await wait_until(lambda: len(store.machine.range("pool/").kvs) == 2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await _keys(store, "pool/") == [holder.key]
        assert list(store.machine.leases()) == [holder.lease]
        assert _keepers() == 1
        await holder.release()


@pytest.mark.virtual_time
async def test_the_keep_alive_holds_a_permit_past_its_ttl() -> None:
    async with MemoryStore() as store:
        sem = Semaphore(store, "pool", 1, ttl=2.0)
        async with await sem.acquire() as permit:
            await advance(20)  # ten TTLs (noqa: sleep)
            assert permit.held and not permit.lost
            assert await permit.fenced_put("k", b"v")
            assert await sem.holders() == [(permit.key, 1)]
        assert not permit.held
        assert await sem.available() == 1
        assert store.machine.leases() == {}


@pytest.mark.virtual_time
async def test_a_waiter_whose_lease_is_revoked_gets_an_error() -> None:
    async with MemoryStore() as store:
        sem = Semaphore(store, "pool", 1)
        holder = await sem.acquire()
        waiting = asyncio.create_task(sem.acquire())
        await wait_until(lambda: len(store.machine.leases()) == 2)
        await wait_until(lambda: len(store.machine.range("pool/").kvs) == 2)
        (lease,) = [lease for lease in store.machine.leases() if lease != holder.lease]
        await store.lease_revoke(lease)
        with pytest.raises(SemaphoreError, match="vanished while waiting"):
            await waiting
        assert _keepers() == 1
        await holder.release()


@pytest.mark.virtual_time
async def test_bad_weights_and_arguments() -> None:
    async with MemoryStore() as store:
        sem = Semaphore(store, "pool", 3)
        for weight in (0, -1, 4):
            with pytest.raises(ValueError):
                await sem.acquire(weight)
        assert store.machine.leases() == {}  # refused before granting anything
        with pytest.raises(ValueError):
            Semaphore(store, "pool", 0)
        with pytest.raises(ValueError):
            Semaphore(store, "pool", 1, ttl=0)
        await store.put("pool/garbage", b"not json")
        with pytest.raises(SemaphoreError, match="not a semaphore request"):
            await sem.holders()


@pytest.mark.virtual_time
async def test_permit_repr_and_double_release() -> None:
    async with MemoryStore() as store:
        permit: Permit = await Semaphore(store, "pool", 2).acquire(2)
        assert f"token={permit.token}" in repr(permit)
        await permit.release()
        await permit.release()
        assert store.machine.leases() == {}


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.ranges = 0

    async def range(self, prefix: str, *, limit: int = 0, start: str = "") -> RangeResult:
        self.ranges += 1
        return await super().range(prefix, limit=limit, start=start)


@pytest.mark.virtual_time
async def test_releases_wake_waiters_without_rereading_the_queue() -> None:
    async with _CountingStore() as store:
        sem = Semaphore(store, "pool", 1)
        waiters = 30
        holder = await sem.acquire()
        tasks = [asyncio.create_task(sem.acquire()) for _ in range(waiters)]
        await wait_until(lambda: len(store.machine.range("pool/").kvs) == waiters + 1)
        await advance(1)  # every waiter has read the queue once and is watching (noqa: sleep)
        assert store.ranges == waiters + 1
        permit = holder
        granted: list[asyncio.Task[Permit]] = []
        for _ in range(waiters):
            await permit.release()
            await wait_until(lambda: sum(t.done() for t in tasks) == len(granted) + 1)
            (task,) = [t for t in tasks if t.done() and t not in granted]
            granted.append(task)
            permit = task.result()
        await permit.release()
        assert granted == tasks  # FIFO: granted in the order requested
        # Thirty releases, each seen by every remaining waiter, and still one read per acquire.
        assert store.ranges == waiters + 1
