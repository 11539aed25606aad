"""Leader election and locks with fencing tokens, as recipes over the :class:`Store` interface.

Theory of operation (etcd's ``concurrency`` package, over our interface only, so the recipes
run unchanged on every backend):

* **Campaign.** A candidate creates ``<name>/<lease id in hex>`` on its lease with one
  transaction (create if absent; if the key is already there -- the same candidate campaigning
  again -- it keeps it). The key's ``create_revision`` is its place in the queue and its
  **fencing token**. The candidate whose key has the lowest ``create_revision`` under
  ``<name>/`` holds the office; everybody else watches for the deletion of the key just
  before its own (the highest ``create_revision`` below its own), so a resignation wakes one
  waiter, not all of them. After each deletion it re-reads the queue: the deleted key may
  not have been the last one ahead.
* **Tokens only grow.** A key created later has a larger revision, and a holder's key is the
  oldest key left, so every successive holder has a larger token than the one before it.
* **Fencing.** ``Compare(key, "create", "==", token)`` holds exactly while the holder's key
  exists -- that is, while it holds the office. A side effect written in a transaction with
  that guard (:meth:`Lock.fenced_put`, :meth:`Leadership.guard`) is rejected once the holder
  lost its lease, even if the holder has not noticed yet: a stale holder is harmless.
* **Locks** own their lease: :class:`Lock` grants one per acquisition, keeps it alive from an
  owned background task every ``ttl / 3``, and deletes the key and revokes the lease on
  release. If a keep-alive is refused (the lease expired or was revoked), or none succeeded
  for a whole TTL, the lock sets :attr:`Lock.lost`: from then on **the holder must not rely
  on the lock** -- another task may already hold it, and fenced writes fail.
* **Elections** use the caller's lease (the caller keeps it alive, e.g. with the lease of its
  session), as in etcd.

Keys of one election or lock live under ``<name>/``; give locks and elections distinct names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType

import msgspec

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.store.base import (
    Compacted,
    Compare,
    DeleteOp,
    GetOp,
    KeyValue,
    LeaseNotFound,
    PutOp,
    Store,
    StoreError,
)

__all__ = ["Election", "Leadership", "Lock", "keep_lease_alive"]

log = logging.getLogger(__name__)

# How long a cancelled campaign may spend withdrawing its key before leaving it to its lease.
_CLEANUP_TIMEOUT = 5.0


class Leadership(msgspec.Struct, frozen=True):
    """The office held: the candidate's key, its fencing token and its lease."""

    key: str
    token: int  # the key's create_revision
    lease: int

    def guard(self) -> Compare:
        """A compare that holds only while this leadership does."""
        return Compare(self.key, "create", "==", self.token)


def _lowest(kvs: Sequence[KeyValue]) -> KeyValue | None:
    return min(kvs, key=lambda kv: kv.create_revision, default=None)


def _queue(prefix: str, kvs: Sequence[KeyValue]) -> list[KeyValue]:
    """The candidates' keys under ``prefix``: ``prefix`` + the hex id of the lease the key is
    attached to, as a campaign writes them. Nothing deeper -- so the queues of ``jobs`` and
    ``jobs/7`` (whose keys also start with ``jobs/``) stay apart -- and no other key: data a
    holder keeps beside its lock (``jobs/owner``, fenced) is no candidate, or it would stand in
    the queue for good and no one would take the lock again."""
    start = len(prefix)
    return [kv for kv in kvs if kv.lease and kv.key[start:] == f"{kv.lease:x}"]


async def _campaign(store: Store, prefix: str, lease: int, value: bytes) -> Leadership:
    """Join the queue under ``prefix`` and wait until first in it."""
    key = f"{prefix}{lease:x}"
    withdraw: list[Compare] = []  # unknown token yet: the key (named after our lease) is ours
    try:
        result = await store.txn(
            [Compare(key, "create", "==", 0)], [PutOp(key, value, lease)], [GetOp(key)]
        )
        if result.succeeded:
            token = result.revision
        else:
            found = result.results[0]
            if not isinstance(found, list) or not found:
                raise StoreError(f"campaign: {key!r} exists but could not be read")
            token = found[0].create_revision
            if found[0].value != value:
                await store.txn([Compare(key, "create", "==", token)], [PutOp(key, value, lease)])
        leadership = Leadership(key, token, lease)
        withdraw = [leadership.guard()]
        await _wait_for_turn(store, prefix, leadership)
    except BaseException:
        # Leave the queue: a cancelled or failed candidate must not block the ones behind it.
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(_CLEANUP_TIMEOUT):
                await store.txn(withdraw, [DeleteOp(key)])
        raise
    return leadership


async def _wait_for_turn(store: Store, prefix: str, leadership: Leadership) -> None:
    while True:
        queue = await store.range(prefix)
        mine: KeyValue | None = None
        ahead: KeyValue | None = None  # the last key before ours
        for kv in _queue(prefix, queue.kvs):
            if kv.key == leadership.key:
                mine = kv
            elif kv.create_revision < leadership.token and (
                ahead is None or kv.create_revision > ahead.create_revision
            ):
                ahead = kv
        if mine is None or mine.create_revision != leadership.token:
            raise LeaseNotFound(
                f"{leadership.key!r} vanished while waiting (lease expired or revoked)"
            )
        if ahead is None:
            return
        await _wait_deleted(store, ahead.key, queue.revision + 1)


async def _wait_deleted(store: Store, key: str, start_revision: int) -> None:
    """Return once ``key`` is deleted at or after ``start_revision`` (or the watch ended:
    the caller re-reads the state either way)."""
    with contextlib.suppress(Compacted):
        async with store.watch(key, start_revision=start_revision) as events:
            async for event in events:
                if event.type == "delete" and event.kv.key == key:
                    return


class Election:
    """One candidate's view of the election ``name`` (see the module docstring)."""

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self.name = name
        self.prefix = f"{name}/"
        self._leadership: Leadership | None = None

    @property
    def leadership(self) -> Leadership | None:
        """The office this object won (None before :meth:`campaign` or after :meth:`resign`)."""
        return self._leadership

    async def campaign(self, value: bytes, *, lease: int) -> Leadership:
        """Wait until this candidate leads; ``value`` is what observers see.

        Raises :class:`LeaseNotFound` if ``lease`` is gone or expires while waiting. Cancelling
        the campaign withdraws the candidate.
        """
        if lease <= 0:
            raise ValueError("a candidate needs a lease")
        self._leadership = await _campaign(self._store, self.prefix, lease, value)
        return self._leadership

    async def proclaim(self, value: bytes) -> bool:
        """Change the leader's value; False if this candidate no longer leads."""
        held = self._leadership
        if held is None:
            return False
        result = await self._store.txn([held.guard()], [PutOp(held.key, value, held.lease)])
        return result.succeeded

    async def resign(self) -> None:
        """Give the office up (the next candidate takes over); the lease stays."""
        held, self._leadership = self._leadership, None
        if held is not None:
            await self._store.txn([held.guard()], [DeleteOp(held.key)])

    async def leader(self) -> KeyValue | None:
        """The current leader's key, or None."""
        return _lowest(_queue(self.prefix, (await self._store.range(self.prefix)).kvs))

    async def observe(self) -> AsyncGenerator[KeyValue, None]:
        """The leader's key-value now (if any) and at every change (a new leader, or a new
        value proclaimed), without end; a vacancy is not reported, the next leader is.

        An async generator: close it (``contextlib.aclosing``) to stop watching promptly.
        """
        last: KeyValue | None = None
        while True:
            snapshot = await self._store.range(self.prefix)
            leader = _lowest(_queue(self.prefix, snapshot.kvs))
            if leader is not None and leader != last:
                last = leader
                yield leader
            watched = self.prefix if leader is None else leader.key
            with contextlib.suppress(Compacted):
                async with self._store.watch(
                    watched, start_revision=snapshot.revision + 1
                ) as events:
                    async for event in events:
                        if leader is None:
                            if event.type == "put" and _queue(self.prefix, [event.kv]):
                                break  # a first candidate: re-read who leads
                            continue
                        if event.kv.key != leader.key:
                            continue  # a longer key sharing the prefix; later keys never lead
                        if event.type == "delete":
                            break
                        leader = event.kv
                        if leader != last:
                            last = leader
                            yield leader


async def keep_lease_alive(
    store: Store, lease_id: int, ttl: float, clock: Clock, *, what: str
) -> None:
    """Keep ``lease_id`` alive every ``ttl / 3``; return once it is (or may be) gone: refused
    as unknown, or no keep-alive succeeded for a whole TTL. The caller then treats what the
    lease guarded as lost."""
    interval = ttl / 3
    last_ok = clock.now()
    while True:
        await clock.sleep(interval)
        sent = clock.now()
        try:
            await store.lease_keepalive(lease_id)
        except LeaseNotFound:
            return
        except StoreError:
            if clock.now() - last_ok >= ttl:
                return  # the lease may be gone: assume the worst
            continue
        except Exception:
            log.exception("%s: keep-alive failed; treating the lease as lost", what)
            return
        last_ok = sent


class Lock:
    """A distributed lock with a fencing token; an async context manager.

    ``async with store.lock("jobs/7") as lock: await lock.fenced_put(...)``. See the module
    docstring for what :attr:`lost` means: once it is set, stop acting as the holder.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        ttl: float = 10.0,
        value: bytes = b"",
        clock: Clock | None = None,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"lock ttl must be positive, not {ttl!r}")
        self._store = store
        self.name = name
        self.prefix = f"{name}/"
        self.ttl = ttl
        self.value = value
        self._clock: Clock = clock or MonotonicClock()
        self._lease = 0
        self._key: str | None = None
        self._token = 0
        self._lost = False
        self._keeper: asyncio.Task[None] | None = None

    @property
    def token(self) -> int:
        """The fencing token of the last acquisition (0 before the first)."""
        return self._token

    @property
    def key(self) -> str | None:
        return self._key

    @property
    def lease(self) -> int:
        return self._lease

    @property
    def lost(self) -> bool:
        """True once the lease was lost while held: the holder must not rely on the lock."""
        return self._lost

    @property
    def held(self) -> bool:
        return self._keeper is not None and self._key is not None and not self._lost

    def guard(self) -> Compare:
        """The compare that fences a write: true only while this acquisition holds."""
        if self._key is None:
            raise RuntimeError("the lock was never acquired")
        return Compare(self._key, "create", "==", self._token)

    async def fenced_put(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Put ``key`` only while holding the lock; False (and nothing written) otherwise."""
        result = await self._store.txn([self.guard()], [PutOp(key, value, lease)])
        return result.succeeded

    async def acquire(self, *, timeout: float | None = None) -> int:
        """Wait for the lock (``TimeoutError`` after ``timeout`` seconds, leaving no key
        behind); returns the fencing token."""
        if self._keeper is not None:
            raise RuntimeError("the lock is held or being acquired: release() it first")
        self._lost = False
        self._key = None
        self._token = 0
        lease = await self._store.lease_grant(self.ttl)
        self._lease = lease.id
        self._keeper = asyncio.create_task(
            self._keep_alive(lease.id), name=f"lock-keepalive {self.name}"
        )
        try:
            async with asyncio.timeout(timeout):
                held = await _campaign(self._store, self.prefix, lease.id, self.value)
        except BaseException:
            await self._stop(delete_key=None)
            raise
        self._key = held.key
        self._token = held.token
        return held.token

    async def release(self) -> None:
        """Delete the key and revoke the lease. If the store cannot be reached, the key
        vanishes when the lease expires. Releasing twice is harmless."""
        if self._keeper is not None:
            await self._stop(delete_key=self._key)

    async def _stop(self, *, delete_key: str | None) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        with contextlib.suppress(StoreError):
            if delete_key is not None:
                await self._store.delete(delete_key)
            await self._store.lease_revoke(self._lease)

    async def _keep_alive(self, lease_id: int) -> None:
        await keep_lease_alive(
            self._store, lease_id, self.ttl, self._clock, what=f"lock {self.name}"
        )
        self._lost = True

    async def __aenter__(self) -> Lock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()
