"""The coordination-store contract: one suite that every backend must pass.

How a backend uses it: subclass :class:`StoreContract` in a ``test_*.py`` module, under a
name starting with ``Test``, and implement :meth:`StoreContract.make_store`::

    from store_contract import StoreContract

    class TestMemoryStore(StoreContract):
        pytestmark = pytest.mark.virtual_time   # optional: only for stores without real I/O

        async def make_store(self) -> Store:
            return MemoryStore()

Why hooks instead of a ``store`` fixture: ``tests/conftest.py`` runs every ``async def`` test
on its own fresh event loop and has no async fixtures, so a fixture could not connect a store
on the test's loop. Every test calls ``async with self.open_store() as store``, which awaits
:meth:`make_store` on the test's loop and closes the store afterwards.

The knobs a subclass may set (class attributes or overrides):

* :meth:`make_store` -- a connected store. Tests only touch keys under ``self.ns`` (a random
  prefix per test), revoke the leases they grant and never assume absolute revision numbers,
  so one backend instance may be shared by a whole module (e.g. one etcd cluster).
* ``short_ttl`` -- a lease TTL the backend honours and that the tests wait out; as short as
  the backend allows (etcd: 2 s; it may grant more than asked, tests use the granted TTL).
* ``long_ttl`` -- a TTL that must not run out during one test. ``lock_ttl`` -- the TTL of the
  locks under test (they are kept alive every ``lock_ttl / 3``).
* ``settle_timeout`` -- how long, in loop seconds, an effect may take to become visible
  (a watch event, a lease expiry once the TTL passed -- etcd checks expiries every 500 ms).
  Waits poll with this deadline; nothing sleeps to wait for an effect.
* :meth:`let_time_pass` -- let at least ``seconds`` pass on the store's lease clock. The
  default sleeps on the running loop: instant on a virtual-time loop, real time otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pytest

from agentcluster.store import (
    Compacted,
    Compare,
    DeleteOp,
    GetOp,
    KeyValue,
    LeaseNotFound,
    PutOp,
    Store,
    TxnOp,
    WatchEvent,
)
from agentcluster.testing import eventually
from store_contract_args import RefusalContract

T = TypeVar("T")


class StoreContract(RefusalContract):
    short_ttl: float = 1.0
    long_ttl: float = 60.0
    lock_ttl: float = 3.0
    settle_timeout: float = 10.0
    test_timeout: float = 90.0
    ns: str = ""

    # -- hooks --

    async def make_store(self) -> Store:
        raise NotImplementedError("a StoreContract subclass must implement make_store()")

    async def compact_past(self, store: Store, revision: int) -> None:
        """Make the watch history up to ``revision`` unavailable (it need not be exact: the
        history from some later revision on may go too). The default calls the backend's
        ``compact`` (memory, etcd); a backend without one writes until its history rolls."""
        await store.compact(revision + 1)  # type: ignore[attr-defined]

    async def let_time_pass(self, seconds: float) -> None:
        await asyncio.sleep(seconds)  # letting lease time pass is the point (noqa: sleep)

    # -- helpers --

    @contextlib.asynccontextmanager
    async def open_store(self) -> AsyncIterator[Store]:
        self.ns = f"contract/{secrets.token_hex(6)}/"
        store = await self.make_store()
        try:
            async with asyncio.timeout(self.test_timeout):
                yield store
        finally:
            await store.close()

    def key(self, name: str) -> str:
        return self.ns + name

    async def settled(self, awaitable: Awaitable[T]) -> T:
        async with asyncio.timeout(self.settle_timeout):
            return await awaitable

    async def take(self, events: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
        got: list[WatchEvent] = []
        async with asyncio.timeout(self.settle_timeout):
            while len(got) < n:
                got.append(await anext(events))
        return got

    async def until_gone(self, store: Store, key: str) -> None:
        async def gone() -> bool:
            return await store.get(key) is None

        await eventually(gone, timeout=self.settle_timeout, interval=0.05)

    async def keys_under(self, store: Store, prefix: str) -> list[str]:
        return [kv.key for kv in (await store.range(prefix)).kvs]

    # -- keys, revisions, ranges --

    async def test_put_get_and_versions(self) -> None:
        async with self.open_store() as store:
            k = self.key("k")
            assert await store.get(k) is None
            first = await store.put(k, b"1")
            assert await store.get(k) == KeyValue(k, b"1", first, first, 1, 0)
            second = await store.put(k, b"2")
            assert second > first
            assert await store.get(k) == KeyValue(k, b"2", first, second, 2, 0)
            assert await store.revision() >= second

    async def test_revisions_strictly_increase(self) -> None:
        async with self.open_store() as store:
            lease = await store.lease_grant(self.long_ttl)
            seen = [await store.put(self.key("a"), b"")]
            seen.append(await store.put(self.key("b"), b"", lease=lease.id))
            seen.append((await store.cas(self.key("a"), b"x", expected_revision=seen[0])).revision)
            seen.append((await store.txn([], [PutOp(self.key("c"), b"")])).revision)
            assert await store.delete(self.key("a")) == 1
            seen.append(await store.revision())
            await store.lease_revoke(lease.id)
            seen.append(await store.revision())
            seen.append(await store.put(self.key("d"), b""))
            assert all(a < b for a, b in itertools.pairwise(seen)), seen

    async def test_range_by_prefix_in_key_order_with_limit(self) -> None:
        async with self.open_store() as store:
            names = ["a/2", "b", "a/10", "ab", "a/1"]
            last = 0
            for name in names:
                last = await store.put(self.key(name), name.encode())
            result = await store.range(self.key("a/"))
            assert [kv.key for kv in result.kvs] == [self.key(n) for n in ("a/1", "a/10", "a/2")]
            assert [kv.value for kv in result.kvs] == [b"a/1", b"a/10", b"a/2"]
            assert result.revision >= last and not result.more
            limited = await store.range(self.key("a/"), limit=2)
            assert [kv.key for kv in limited.kvs] == [self.key("a/1"), self.key("a/10")]
            assert limited.more
            exact = await store.range(self.key("a/"), limit=3)
            assert len(exact.kvs) == 3 and not exact.more
            assert len((await store.range(self.key("a"))).kvs) == 4  # "ab" too
            assert (await store.range(self.key("zz"))).kvs == []

    async def test_range_from_a_start_key(self) -> None:
        async with self.open_store() as store:
            last = 0
            for name in ("a/2", "b", "a/10", "ab", "a/1"):
                last = await store.put(self.key(name), name.encode())
            prefix = self.key("a/")

            async def keys(start: str) -> list[str]:
                result = await store.range(prefix, start=start)
                return [kv.key[len(self.ns) :] for kv in result.kvs]

            assert await keys(start=self.key("a/10")) == ["a/10", "a/2"]  # inclusive
            assert await keys(start=self.key("a/100")) == ["a/2"]  # between two keys
            # A start below the prefix begins at the prefix; past its keys gives nothing.
            assert await keys(start=self.ns) == ["a/1", "a/10", "a/2"]
            assert await keys(start="") == ["a/1", "a/10", "a/2"]
            past = await store.range(prefix, start=self.key("a/3"))
            assert past.kvs == [] and not past.more and past.revision >= last
            assert await keys(start=self.key("b")) == []  # beyond the prefix, keys there
            # A page, and the next one from where it says.
            first = await store.range(prefix, limit=1, start=self.key("a/10"))
            assert [kv.key for kv in first.kvs] == [self.key("a/10")] and first.more
            assert first.next_start == self.key("a/10") + "\0"
            rest = await store.range(prefix, limit=1, start=first.next_start)
            assert [kv.key for kv in rest.kvs] == [self.key("a/2")]
            assert not rest.more and rest.next_start is None
            # The empty prefix: every key, from the start on.
            everything = await store.range("", start=self.key("a/2"), limit=2)
            assert [kv.key for kv in everything.kvs] == [self.key("a/2"), self.key("ab")]

    async def test_range_checks_its_arguments(self) -> None:
        async with self.open_store() as store:
            with pytest.raises(TypeError, match="must be str"):
                await store.range(self.ns, start=b"x")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="limit must not be negative"):
                await store.range(self.ns, limit=-1, start=self.ns)
            with pytest.raises(ValueError, match="page must be at least 1"):
                await anext(store.range_pages(self.ns, page=0))

    async def test_range_pages_list_a_prefix_once_in_key_order(self) -> None:
        async with self.open_store() as store:
            names = [f"p/{i:02d}" for i in range(11)]
            await store.txn([], [PutOp(self.key(n), n.encode()) for n in reversed(names)])
            await store.put(self.key("p0"), b"")  # next to the prefix, not under it
            pages = [page async for page in store.range_pages(self.key("p/"), page=4)]
            assert [len(p.kvs) for p in pages] == [4, 4, 3]
            assert [p.more for p in pages] == [True, True, False]
            listed = [kv.key for p in pages for kv in p.kvs]
            assert listed == [self.key(n) for n in names]
            assert all(a.revision <= b.revision for a, b in itertools.pairwise(pages))
            # A prefix that fills its last page exactly ends there, with no empty page after.
            exact = [p async for p in store.range_pages(self.key("p/0"), page=5)]
            assert [len(p.kvs) for p in exact] == [5, 5] and not exact[-1].more
            # From a start key; and an empty prefix is one empty page.
            tail = store.range_pages(self.key("p/"), page=2, start=self.key("p/08"))
            assert [kv.key for p in [p async for p in tail] for kv in p.kvs] == [
                self.key(n) for n in names[8:]
            ]
            empty = [p async for p in store.range_pages(self.key("none/"))]
            assert len(empty) == 1 and empty[0].kvs == [] and not empty[0].more

    async def test_delete_and_prefix_delete(self) -> None:
        async with self.open_store() as store:
            for name in ("p/1", "p/2", "p/3/x", "pq", "other"):
                await store.put(self.key(name), b"")
            assert await store.delete(self.key("p/1")) == 1
            assert await store.delete(self.key("p/1")) == 0
            assert await store.delete(self.key("p/"), prefix=True) == 2
            assert await self.keys_under(store, self.ns) == [self.key("other"), self.key("pq")]

    # -- compare-and-set, transactions --

    async def test_cas_create_update_and_conflict(self) -> None:
        async with self.open_store() as store:
            k = self.key("cas")
            created = await store.cas(k, b"1", expected_revision=0)
            assert created.succeeded and created.results == [created.revision]
            kv = await store.get(k)
            assert kv is not None and kv.mod_revision == created.revision
            again = await store.cas(k, b"x", expected_revision=0)
            assert not again.succeeded and again.results == [[kv]]
            updated = await store.cas(k, b"2", expected_revision=kv.mod_revision)
            assert updated.succeeded and updated.revision > kv.mod_revision
            stale = await store.cas(k, b"3", expected_revision=kv.mod_revision)
            assert not stale.succeeded
            current = stale.results[0]
            assert isinstance(current, list) and current[0].value == b"2"
            assert (await store.get(k)) == current[0]

    async def test_txn_then_and_else_with_gets(self) -> None:
        async with self.open_store() as store:
            a, b = self.key("a"), self.key("b")
            await store.put(a, b"1")
            await store.put(b, b"x")
            compares = [Compare(a, "value", "==", b"1"), Compare(b, "version", "==", 1)]
            then: list[TxnOp] = [PutOp(a, b"2"), GetOp(a), DeleteOp(b), GetOp(b)]
            done = await store.txn(compares, then, [GetOp(a)])
            assert done.succeeded
            rev = done.revision
            assert done.results[0] == rev and done.results[2:] == [1, []]
            (got_a,) = done.results[1]  # type: ignore[misc]  # a get's result is a list
            assert (got_a.value, got_a.version, got_a.mod_revision) == (b"2", 2, rev)
            otherwise = await store.txn(compares, then, [GetOp(a)])
            assert not otherwise.succeeded
            assert otherwise.results == [[await store.get(a)]]
            assert await store.get(b) is None

    async def test_txn_compare_targets(self) -> None:
        async with self.open_store() as store:
            lease = await store.lease_grant(self.long_ttl)
            try:
                k, missing = self.key("k"), self.key("missing")
                created = await store.put(k, b"m")
                modified = await store.put(k, b"m", lease=lease.id)
                table = [
                    (Compare(k, "value", "==", b"m"), True),
                    (Compare(k, "value", "<", b"n"), True),
                    (Compare(k, "value", "!=", b"m"), False),
                    (Compare(k, "version", "==", 2), True),
                    (Compare(k, "version", ">", 2), False),
                    (Compare(k, "create", "==", created), True),
                    (Compare(k, "mod", "==", modified), True),
                    (Compare(k, "mod", "<", modified), False),
                    (Compare(k, "lease", "==", lease.id), True),
                    (Compare(missing, "create", "==", 0), True),
                    (Compare(missing, "version", ">", 0), False),
                    (Compare(missing, "value", "!=", b"m"), False),
                ]
                for cmp, expected in table:
                    assert (await store.txn([cmp], [])).succeeded is expected, cmp
            finally:
                await store.lease_revoke(lease.id)

    # -- leases --

    async def test_lease_revoke_deletes_its_keys(self) -> None:
        async with self.open_store() as store:
            lease = await store.lease_grant(self.long_ttl)
            assert lease.ttl >= self.long_ttl
            await store.put(self.key("l/1"), b"", lease=lease.id)
            await store.put(self.key("l/2"), b"", lease=lease.id)
            await store.put(self.key("l/3"), b"")
            kv = await store.get(self.key("l/1"))
            assert kv is not None and kv.lease == lease.id
            await store.lease_revoke(lease.id)
            assert await self.keys_under(store, self.key("l/")) == [self.key("l/3")]
            await store.lease_revoke(lease.id)  # already gone: no error

    async def test_missing_lease_is_refused(self) -> None:
        async with self.open_store() as store:
            lease = await store.lease_grant(self.long_ttl)
            await store.lease_revoke(lease.id)
            with pytest.raises(LeaseNotFound):
                await store.put(self.key("x"), b"", lease=lease.id)
            assert await store.get(self.key("x")) is None
            with pytest.raises(LeaseNotFound):
                await store.lease_keepalive(lease.id)

    async def test_lease_expiry_deletes_its_keys(self) -> None:
        async with self.open_store() as store:
            lease = await store.lease_grant(self.short_ttl)
            k = self.key("expiring")
            await store.put(k, b"", lease=lease.id)
            await store.put(self.key("staying"), b"")
            assert await store.get(k) is not None
            await self.let_time_pass(lease.ttl)
            await self.until_gone(store, k)
            assert await store.get(self.key("staying")) is not None
            with pytest.raises(LeaseNotFound):
                await store.lease_keepalive(lease.id)

    async def test_keepalive_keeps_keys_alive(self) -> None:
        async with self.open_store() as store:
            lease = await store.lease_grant(self.short_ttl)
            k = self.key("kept")
            await store.put(k, b"", lease=lease.id)
            for _ in range(5):  # 5 * ttl/3: past the TTL
                await self.let_time_pass(lease.ttl / 3)
                assert await store.lease_keepalive(lease.id) >= self.short_ttl
                assert await store.get(k) is not None
            await self.let_time_pass(lease.ttl)
            await self.until_gone(store, k)

    # -- watches --

    async def test_watch_from_now_is_ordered_and_exactly_once(self) -> None:
        async with self.open_store() as store:
            a, b = self.key("w/a"), self.key("w/b")
            await store.put(a, b"before")
            async with store.watch(self.key("w/")) as events:
                r1 = await store.put(a, b"1")
                r2 = await store.put(b, b"2")
                r3 = (await store.txn([], [DeleteOp(a), PutOp(b, b"3")])).revision
                got = await self.take(events, 4)
                assert [(e.type, e.kv.key, e.revision) for e in got] == [
                    ("put", a, r1),
                    ("put", b, r2),
                    ("delete", a, r3),
                    ("put", b, r3),
                ]
                assert got[0].kv.value == b"1" and got[1].kv.version == 1
                assert got[2].kv.value == b"" and got[2].prev is not None
                assert got[2].prev.value == b"1"
                r4 = await store.put(self.key("w/marker"), b"")
                (marker,) = await self.take(events, 1)  # nothing repeated before it
                assert (marker.kv.key, marker.revision) == (self.key("w/marker"), r4)

    async def test_watch_from_a_past_revision_replays_then_streams(self) -> None:
        async with self.open_store() as store:
            revs = [await store.put(self.key(f"h/{i}"), str(i).encode()) for i in range(4)]
            async with store.watch(self.key("h/"), start_revision=revs[1]) as events:
                live = await store.put(self.key("h/live"), b"")
                got = await self.take(events, 4)
                assert [e.revision for e in got] == [revs[1], revs[2], revs[3], live]
                assert [e.kv.value for e in got[:3]] == [b"1", b"2", b"3"]
                marker = await store.put(self.key("h/marker"), b"")
                assert [e.revision for e in await self.take(events, 1)] == [marker]

    async def test_watch_resumes_after_reconnect_without_gap_or_repeat(self) -> None:
        async with self.open_store() as store:
            revs = [await store.put(self.key(f"r/{i}"), b"") for i in range(6)]
            async with store.watch(self.key("r/"), start_revision=revs[0]) as events:
                first = await self.take(events, 2)
            resume = first[-1].revision + 1
            async with store.watch(self.key("r/"), start_revision=resume) as events:
                rest = await self.take(events, 4)
            assert [e.revision for e in first + rest] == revs

    async def test_a_watch_from_compacted_history_fails_from_its_iterator(self) -> None:
        # As etcd, which learns of a compaction only from its stream: code that catches
        # Compacted inside the ``async with`` catches it on every backend.
        async with self.open_store() as store:
            k = self.key("k")
            first = await store.put(k, b"1")
            await store.put(k, b"2")
            await self.compact_past(store, first)
            async with store.watch(k, start_revision=first) as events:
                with pytest.raises(Compacted) as info:
                    await self.settled(anext(events))
            assert info.value.requested == first and info.value.oldest > first

    async def test_watch_on_a_prefix_ignores_other_keys(self) -> None:
        async with self.open_store() as store, store.watch(self.key("a/")) as events:
            for name in ("b", "a", "ab", "a/1", "b/a/2", "a/2"):
                await store.put(self.key(name), b"")
            got = await self.take(events, 2)
            assert [e.kv.key for e in got] == [self.key("a/1"), self.key("a/2")]

    async def test_watch_many_writes_exactly_once(self) -> None:
        async with self.open_store() as store:
            n = 300
            async with store.watch(self.key("m/")) as events:

                async def consume() -> list[int]:
                    return [e.revision for e in await self.take(events, n)]

                consumer = asyncio.create_task(consume())
                revs = [await store.put(self.key(f"m/{i % 5}"), b"") for i in range(n)]
                assert await self.settled(consumer) == revs

    # -- elections --

    async def test_election_one_leader_resign_hands_over_observe_follows(self) -> None:
        async with self.open_store() as store:
            l1 = await store.lease_grant(self.long_ttl)
            l2 = await store.lease_grant(self.long_ttl)
            e1, e2 = store.election(self.key("office")), store.election(self.key("office"))
            observer = e1.observe()
            second: asyncio.Task[object] | None = None
            try:
                assert await e1.leader() is None
                one = await self.settled(e1.campaign(b"one", lease=l1.id))
                seen = await self.settled(anext(observer))
                assert seen.value == b"one" and seen.create_revision == one.token
                second = asyncio.create_task(e2.campaign(b"two", lease=l2.id))

                async def queued() -> bool:
                    return len(await self.keys_under(store, e1.prefix)) == 2

                await eventually(queued, timeout=self.settle_timeout)
                assert not second.done()
                leader = await e2.leader()
                assert leader is not None and leader.value == b"one"
                assert await e1.proclaim(b"one'")
                assert (await self.settled(anext(observer))).value == b"one'"
                await e1.resign()
                two = await self.settled(second)
                assert isinstance(two, type(one)) and two.token > one.token
                assert (await self.settled(anext(observer))).value == b"two"
                assert not await e1.proclaim(b"stale")
                fenced = self.key("fenced")
                assert not (await store.txn([one.guard()], [PutOp(fenced, b"1")])).succeeded
                assert (await store.txn([two.guard()], [PutOp(fenced, b"2")])).succeeded
            finally:
                if second is not None:
                    second.cancel()
                    await asyncio.gather(second, return_exceptions=True)
                await observer.aclose()
                await store.lease_revoke(l1.id)
                await store.lease_revoke(l2.id)

    async def test_election_expired_leader_is_fenced_off(self) -> None:
        async with self.open_store() as store:
            short = await store.lease_grant(self.short_ttl)
            long = await store.lease_grant(self.long_ttl)
            e1, e2 = store.election(self.key("e")), store.election(self.key("e"))
            try:
                one = await self.settled(e1.campaign(b"one", lease=short.id))
                second = asyncio.create_task(e2.campaign(b"two", lease=long.id))
                await self.let_time_pass(short.ttl)
                two = await self.settled(second)
                assert two.token > one.token
                k = self.key("side-effect")
                assert not (await store.txn([one.guard()], [PutOp(k, b"stale")])).succeeded
                assert await store.get(k) is None
                leader = await e1.leader()
                assert leader is not None and leader.value == b"two"
            finally:
                await store.lease_revoke(long.id)
                await store.lease_revoke(short.id)

    async def test_cancelled_campaign_withdraws(self) -> None:
        async with self.open_store() as store:
            l1 = await store.lease_grant(self.long_ttl)
            l2 = await store.lease_grant(self.long_ttl)
            e1, e2 = store.election(self.key("c")), store.election(self.key("c"))
            try:
                await self.settled(e1.campaign(b"one", lease=l1.id))
                waiting = asyncio.create_task(e2.campaign(b"two", lease=l2.id))

                async def queued() -> bool:
                    return len(await self.keys_under(store, e1.prefix)) == 2

                await eventually(queued, timeout=self.settle_timeout)
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
                assert waiting.cancelled()
                assert len(await self.keys_under(store, e1.prefix)) == 1
                await e1.resign()
                assert await e1.leader() is None
            finally:
                await store.lease_revoke(l1.id)
                await store.lease_revoke(l2.id)

    async def test_observe_waits_for_a_first_leader(self) -> None:
        async with self.open_store() as store:
            lease = await store.lease_grant(self.long_ttl)
            election = store.election(self.key("empty"))
            observer = election.observe()
            first = asyncio.ensure_future(anext(observer))
            try:
                await asyncio.sleep(0)  # let the observer find no leader (noqa: sleep)
                assert not first.done()
                held = await self.settled(election.campaign(b"first", lease=lease.id))
                seen = await self.settled(first)
                assert (seen.key, seen.value) == (held.key, b"first")
                assert seen.create_revision == held.token
            finally:
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
                await observer.aclose()
                await store.lease_revoke(lease.id)

    # -- locks --

    async def test_lock_mutual_exclusion(self) -> None:
        async with self.open_store() as store:
            name, counter = self.key("mutex"), self.key("counter")
            await store.put(counter, b"0")
            holders, most, tokens = 0, 0, []

            async def worker() -> None:
                nonlocal holders, most
                for _ in range(3):
                    async with store.lock(name, ttl=self.lock_ttl) as lock:
                        holders += 1
                        most = max(most, holders)
                        tokens.append(lock.token)
                        kv = await store.get(counter)
                        assert kv is not None
                        await asyncio.sleep(0)  # let the others run (noqa: sleep)
                        assert await lock.fenced_put(counter, b"%d" % (int(kv.value) + 1))
                        holders -= 1

            async with asyncio.TaskGroup() as group:
                for _ in range(5):
                    group.create_task(worker())
            assert most == 1
            assert len(tokens) == 15 and tokens == sorted(set(tokens))
            final = await store.get(counter)
            assert final is not None and final.value == b"15"
            assert await self.keys_under(store, name + "/") == []

    async def test_nested_names_are_separate_locks_and_elections(self) -> None:
        # "jobs" and "jobs/7" share a key prefix ("jobs/"): their queues must not mix.
        async with self.open_store() as store:
            outer, inner = self.key("jobs"), self.key("jobs") + "/7"
            # The outer lock is not queued behind the inner one's key, under "jobs/" too.
            async with asyncio.timeout(self.settle_timeout):
                async with (
                    store.lock(inner, ttl=self.lock_ttl) as held_inner,
                    store.lock(outer, ttl=self.lock_ttl) as held_outer,
                ):
                    assert held_inner.held and held_outer.held
            lease = await store.lease_grant(self.long_ttl)
            try:
                big, small = store.election(outer + "-office"), store.election(outer + "-office/7")
                await self.settled(small.campaign(b"small", lease=lease.id))
                assert await big.leader() is None
                mine = await self.settled(big.campaign(b"big", lease=lease.id))
                leader = await store.election(outer + "-office").leader()
                assert leader is not None and leader.key == mine.key
                leader = await store.election(outer + "-office/7").leader()
                assert leader is not None and leader.value == b"small"
            finally:
                await store.lease_revoke(lease.id)

    async def test_keys_kept_beside_a_lock_or_election_are_no_candidates(self) -> None:
        # docs/cluster.md's examples keep the guarded data under the lock's or election's own
        # name; only "<name>/<hex id of its lease>" is a candidate, so the data never blocks.
        async with self.open_store() as store:
            name = self.key("nightly")
            async with store.lock(name, ttl=self.lock_ttl) as lock:
                assert await lock.fenced_put(name + "/owner", b"me")
            async with asyncio.timeout(self.settle_timeout):
                async with store.lock(name, ttl=self.lock_ttl) as again:
                    assert again.held  # taken again: the owner key is no waiter
            lease = await store.lease_grant(self.long_ttl)
            other = await store.lease_grant(self.long_ttl)
            try:
                office = self.key("scheduler")
                election = store.election(office)
                held = await self.settled(election.campaign(b"n1", lease=lease.id))
                writes = [PutOp(office + "/state", b"s"), PutOp(office + "/x", b"x", other.id)]
                assert (await store.txn([held.guard()], writes)).succeeded
                await election.resign()
                assert await election.leader() is None
                won = await self.settled(store.election(office).campaign(b"n2", lease=other.id))
                leader = await election.leader()
                assert leader is not None and leader.key == won.key
            finally:
                await store.lease_revoke(lease.id)
                await store.lease_revoke(other.id)

    async def test_lock_fencing_after_the_holder_lost_its_lease(self) -> None:
        async with self.open_store() as store:
            name, k = self.key("fence"), self.key("guarded")
            old = store.lock(name, ttl=self.lock_ttl)
            new = store.lock(name, ttl=self.lock_ttl)
            await self.settled(old.acquire())
            try:
                assert old.held and await old.fenced_put(k, b"old")
                taking = asyncio.create_task(new.acquire())
                await store.lease_revoke(old.lease)  # as if the lease had expired
                token = await self.settled(taking)
                assert token > old.token and new.held
                assert not await old.fenced_put(k, b"stale")
                kv = await store.get(k)
                assert kv is not None and kv.value == b"old"
                assert await new.fenced_put(k, b"new")

                async def lost() -> bool:
                    return old.lost

                await eventually(lost, timeout=self.settle_timeout)
                assert not old.held
            finally:
                await old.release()
                await new.release()
            assert await self.keys_under(store, name + "/") == []

    async def test_lock_acquire_timeout_leaves_nothing_behind(self) -> None:
        async with self.open_store() as store:
            name = self.key("busy")
            holder = store.lock(name, ttl=self.lock_ttl)
            waiter = store.lock(name, ttl=self.lock_ttl)
            await self.settled(holder.acquire())
            try:
                with pytest.raises(TimeoutError):
                    await waiter.acquire(timeout=0.2)
                assert await self.keys_under(store, name + "/") == [holder.key]
                assert not waiter.held
                with pytest.raises(LeaseNotFound):  # the waiter's lease is gone too
                    await store.lease_keepalive(waiter.lease)
                await holder.release()
                assert await self.settled(waiter.acquire()) > holder.token
            finally:
                await holder.release()
                await waiter.release()

    async def test_lock_released_when_the_body_raises(self) -> None:
        async with self.open_store() as store:
            name = self.key("raising")
            lock = store.lock(name, ttl=self.lock_ttl)
            with contextlib.suppress(KeyError):
                async with lock:
                    assert await self.keys_under(store, name + "/") == [lock.key]
                    raise KeyError("boom")
            assert await self.keys_under(store, name + "/") == []
            assert not lock.held
            assert not await lock.fenced_put(self.key("after"), b"")
