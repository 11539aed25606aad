"""The in-process coordination store: one state machine, no replication.

Theory of operation: :class:`MemoryStore` is the three shared pieces wired together the way a
replicated backend wires them, minus the log:

* every write is a :data:`~agentcluster.store._kv.Command`, round-tripped through the command
  codec and applied to a :class:`~agentcluster.store._kv.KVStateMachine` -- so it accepts and
  rejects exactly what the Raft backend would -- and the events it produced go to a
  :class:`~agentcluster.store._watch.WatchHub`;
* lease deadlines live in :class:`~agentcluster.store._leases.LeaseTimers`; one owned
  background task sleeps on the :class:`~agentcluster.clock.Clock` until the next deadline
  and revokes what expired (on a virtual-time loop, a 10 s lease expires at exactly t + 10 s);
* any request that arrives after a lease's deadline but before the expiry task ran revokes the
  lease first (a keep-alive is then refused, a put on it fails, a read misses its keys, a
  fenced write of a lock it held finds the lock key gone), so no lease outlives its TTL by
  scheduling luck.

Every method is ``async`` (the interface is): each takes effect in one synchronous step of the
machine when called -- so concurrent tasks see a linearizable store -- then yields to the loop
once before returning, like a round trip, so that no caller can starve the others. After :meth:`close`, every method
raises :class:`~agentcluster.store.base.StoreUnavailable` and open watches end.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from agentcluster.clock import Clock, MonotonicClock, TimerHandle
from agentcluster.store._checks import (
    check_delete_args,
    check_key,
    check_lease_id,
    check_put_args,
    check_range_args,
    check_ttl,
    check_txn_args,
    check_unicode_key,
    check_watch_args,
)
from agentcluster.store._kv import (
    Command,
    CompactCmd,
    CompactResult,
    DeleteCmd,
    DeleteResult,
    KVStateMachine,
    LeaseGrantCmd,
    LeaseRevokeCmd,
    PutCmd,
    PutResult,
    Result,
    TxnCmd,
    check_txn_writes,
    checked_command,
    encode_write,
    unwrap,
)
from agentcluster.store._leases import LeaseTimers
from agentcluster.store._watch import WatchHub
from agentcluster.store.base import (
    Compare,
    KeyValue,
    Lease,
    LeaseNotFound,
    RangeResult,
    Store,
    StoreUnavailable,
    TxnOp,
    TxnResult,
    WatchEvent,
)

__all__ = ["MemoryStore"]

T = TypeVar("T")

# asyncio runs a timer up to its clock resolution early; a lease due within this much of
# ``now`` counts as due, or the expiry task would spin on a deadline a hair in the future.
_TIMER_SLACK = 1e-6


async def _reply(result: T) -> T:
    # Every call yields once, as a round trip to a real store would: a caller looping on
    # the store cannot starve the lease timer, watch readers or other clients.
    await asyncio.sleep(0)
    return result


class MemoryStore(Store):
    """A single-process store (tests, single-node deployments); see the module docstring."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        max_events: int = 10_000,
        max_watch_queue: int = 1024,
    ) -> None:
        self._clock: Clock = clock or MonotonicClock()
        self._machine = KVStateMachine(max_events=max_events)
        self._timers = LeaseTimers()
        self._hub = WatchHub(self._machine, max_queue=max_watch_queue)
        self._closed = False
        self._expiry: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def machine(self) -> KVStateMachine:
        """The state machine (read it, do not apply to it behind the store's back)."""
        return self._machine

    # -- reads --

    async def get(self, key: str) -> KeyValue | None:
        self._check_open()
        check_key(key)
        check_unicode_key(key)
        self._expire_due()
        return await _reply(self._machine.get(key))

    async def range(self, prefix: str, *, limit: int = 0, start: str = "") -> RangeResult:
        self._check_open()
        check_range_args(prefix, limit, start)
        check_unicode_key(prefix)
        check_unicode_key(start)
        self._expire_due()
        return await _reply(self._machine.range(prefix, limit, start))

    async def revision(self) -> int:
        self._check_open()
        self._expire_due()
        return await _reply(self._machine.revision)

    # -- writes --

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_put_args(key, lease)
        return await _reply(unwrap(self._apply(PutCmd(key, value, lease)), PutResult).revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        check_delete_args(key, prefix)
        return await _reply(unwrap(self._apply(DeleteCmd(key, prefix)), DeleteResult).deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        check_txn_args(compares, success, failure)
        check_txn_writes(success, failure)
        cmd = TxnCmd(list(compares), list(success), list(failure))
        return await _reply(unwrap(self._apply(cmd), TxnResult))

    async def compact(self, revision: int) -> int:
        """Forget watch history before ``revision``; returns the oldest revision kept."""
        return await _reply(unwrap(self._apply(CompactCmd(revision)), CompactResult).oldest)

    # -- leases --

    async def lease_grant(self, ttl: float) -> Lease:
        check_ttl(ttl)
        lease = unwrap(self._apply(LeaseGrantCmd(float(ttl))), Lease)
        self._timers.grant(lease.id, lease.ttl, self._clock.now())
        if self._expiry is None:
            self._expiry = asyncio.create_task(self._expire_leases(), name="memory-store-leases")
        self._wake.set()
        return await _reply(lease)

    async def lease_keepalive(self, lease_id: int) -> float:
        self._check_open()
        check_lease_id(lease_id)
        lease = self._machine.lease(lease_id)
        if lease is None:
            raise LeaseNotFound(f"lease {lease_id:x} not found")
        if not self._timers.keepalive(lease_id, self._clock.now()):
            self._revoke(lease_id)  # past its deadline: the expiry task just had not run yet
            raise LeaseNotFound(f"lease {lease_id:x} expired")
        return await _reply(lease.ttl)

    async def lease_revoke(self, lease_id: int) -> None:
        self._check_open()
        check_lease_id(lease_id)
        self._revoke(lease_id)
        await _reply(None)

    # -- watches, lifecycle --

    def watch(
        self, prefix: str, *, start_revision: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        check_watch_args(prefix, start_revision)
        check_unicode_key(prefix)
        return self._hub.watch(prefix, start_revision)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        task, self._expiry = self._expiry, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- internals --

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")

    def _expire_due(self) -> None:
        """Revoke the leases past their deadline that the expiry task has not reached yet."""
        for lease_id in self._timers.expired(self._clock.now()):
            self._revoke(lease_id)

    def _apply(self, cmd: Command) -> Result:
        self._check_open()
        if not isinstance(cmd, LeaseRevokeCmd):
            self._expire_due()
        result = self._machine.apply(_checked(cmd))
        if self._machine.last_events:
            self._hub.publish(self._machine.last_events)
        return result

    def _revoke(self, lease_id: int) -> None:
        self._apply(LeaseRevokeCmd(lease_id))
        self._timers.forget(lease_id)

    async def _expire_leases(self) -> None:
        clock = self._clock
        while True:
            now = clock.now()
            for lease_id in self._timers.expired(now + _TIMER_SLACK):
                self._revoke(lease_id)
            deadline = self._timers.next_deadline()
            self._wake.clear()
            timer: TimerHandle | None = None
            if deadline != math.inf:
                timer = clock.call_later(deadline - now, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()


def _checked(cmd: Command) -> Command:
    """``cmd`` as the embedded store would log it: encoded, within its size limit, decoded
    (so the memory store takes and refuses what the raft backend does)."""
    return checked_command(encode_write(cmd))
