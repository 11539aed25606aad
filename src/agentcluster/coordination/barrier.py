"""Barriers over the coordination store: ``parties`` participants meet, then all go on.

Theory of operation (a recipe over the :class:`~agentcluster.store.base.Store` interface only,
so it runs unchanged on every backend). A barrier ``name`` is three kinds of keys:

* ``<name>/parties`` -- how many participants it waits for, created once, if absent, by the
  first :meth:`Barrier.create` or :meth:`Barrier.arrive`. Every handle of the barrier must
  agree on the count; one that does not gets :class:`BarrierMismatch`.
* ``<name>/arrived/<participant>`` -- one key per arrival, created if absent (arriving twice
  is one arrival), optionally on the participant's lease: a participant that dies before the
  barrier completes drops out of the count when its lease expires.
* ``<name>/done`` -- the completion record (the revision at which ``parties`` arrivals first
  existed together, and who they were). Whoever sees the completion first -- the arrival that
  completes it, or a waiter -- writes it in a transaction guarded by "``done`` does not exist
  yet", so it is written once and everybody reports the same revision. Once ``done`` exists
  the barrier stays complete: a late lease expiry does not un-complete it.

**Waiting without missing an arrival.** A waiter reads the whole barrier at one revision,
then watches ``<name>/`` from that revision + 1 and keeps the set of arrivals up to date from
the events alone (no re-read per event), so an arrival between the read and the watch is
still seen. An arrival stays recorded when a waiter times out: arriving is a fact ("I got
here"), not a wish; use a lease to make an arrival go away with its participant.

Give barriers names that are not prefixes of one another (``a`` and ``a/arrived``): the keys
of one would show up under the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.store.base import (
    Compacted,
    Compare,
    GetOp,
    KeyValue,
    PutOp,
    Store,
    StoreError,
)

__all__ = ["Barrier", "BarrierError", "BarrierMismatch", "BarrierTimeout"]


class BarrierError(StoreError):
    """Base of every barrier error."""


class BarrierTimeout(BarrierError, TimeoutError):
    """Not enough participants arrived within the timeout."""


class BarrierMismatch(BarrierError):
    """The barrier exists with another party count."""


class _Parties(msgspec.Struct, frozen=True):
    parties: int


class _Done(msgspec.Struct, frozen=True):
    revision: int  # the first revision at which ``parties`` arrivals existed together
    participants: list[str]


_encode = msgspec.json.Encoder().encode
_parties_decoder = msgspec.json.Decoder(_Parties)
_done_decoder = msgspec.json.Decoder(_Done)


class _Expiry:
    __slots__ = ("expired", "finished")

    def __init__(self) -> None:
        self.expired = False
        self.finished = False


@contextlib.asynccontextmanager
async def clock_timeout(clock: Clock, seconds: float | None) -> AsyncIterator[None]:
    """Like :func:`asyncio.timeout`, but on ``clock`` (a :class:`SimClock` too): cancel the
    body after ``seconds`` and raise :class:`TimeoutError` instead (None: no deadline)."""
    if seconds is None:
        yield
        return
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("clock_timeout needs a running task")
    state = _Expiry()
    cancelling = task.cancelling()

    def fire() -> None:
        if not state.finished:
            state.expired = True
            task.cancel()

    handle = clock.call_later(seconds, fire)
    try:
        yield
    except asyncio.CancelledError:
        # Only our own cancellation becomes a timeout; an outer cancel stays a cancel.
        if state.expired and task.uncancel() <= cancelling:
            raise TimeoutError from None
        raise
    finally:
        state.finished = True
        handle.cancel()


def _decode_parties(kv: KeyValue) -> int:
    try:
        return _parties_decoder.decode(kv.value).parties
    except msgspec.DecodeError as exc:
        raise BarrierError(f"{kv.key!r} holds no party count: {exc}") from None


def _decode_done(kv: KeyValue) -> _Done:
    try:
        return _done_decoder.decode(kv.value)
    except msgspec.DecodeError as exc:
        raise BarrierError(f"{kv.key!r} holds no completion record: {exc}") from None


class Barrier:
    """One handle on the barrier ``name`` for ``parties`` participants (see the module
    docstring). Handles are cheap; any number of them, in any process, may share a name."""

    def __init__(
        self, store: Store, name: str, parties: int, *, clock: Clock | None = None
    ) -> None:
        if not name:
            raise ValueError("a barrier needs a name")
        if parties < 1:
            raise ValueError(f"a barrier needs at least one party, not {parties!r}")
        self._store = store
        self.name = name
        self.parties = parties
        self._clock: Clock = clock or MonotonicClock()
        self.prefix = f"{name}/"
        self._parties_key = f"{name}/parties"
        self._done_key = f"{name}/done"
        self._arrived_prefix = f"{name}/arrived/"
        self._record = _encode(_Parties(parties))
        self._last_count = 0  # arrivals seen by the latest wait (for its timeout message)

    def _mismatch(self, found: int) -> BarrierMismatch:
        return BarrierMismatch(
            f"barrier {self.name!r} exists for {found} parties, not {self.parties}"
        )

    async def create(self) -> bool:
        """Create the barrier if it does not exist; True if this call created it.

        Raises :class:`BarrierMismatch` if it exists with another party count."""
        key = self._parties_key
        result = await self._store.txn(
            [Compare(key, "create", "==", 0)], [PutOp(key, self._record)], [GetOp(key)]
        )
        if result.succeeded:
            return True
        found = result.results[0]
        if isinstance(found, list) and found:
            parties = _decode_parties(found[0])
            if parties != self.parties:
                raise self._mismatch(parties)
        # Deleted between the compare and the read is impossible (one txn): the key exists.
        return False

    async def arrive(self, participant: str, *, lease: int = 0) -> int:
        """Record ``participant``'s arrival (once: arriving again changes nothing), creating
        the barrier if needed; returns how many have arrived at the revision of the arrival.

        With ``lease``, the arrival vanishes with the lease (before completion, the count
        drops; after it, the barrier stays complete). Raises :class:`BarrierMismatch`, or
        :class:`~agentcluster.store.base.LeaseNotFound` for a lease that does not exist."""
        if not participant:
            raise ValueError("a participant needs a name")
        key = self._arrived_prefix + participant
        for _ in range(3):
            result = await self._store.txn(
                [
                    Compare(self._parties_key, "value", "==", self._record),
                    Compare(key, "create", "==", 0),
                ],
                [PutOp(key, b"", lease), GetOp(self._arrived_prefix, prefix=True)],
                [GetOp(self._parties_key), GetOp(self._arrived_prefix, prefix=True)],
            )
            found, arrivals = result.results[-2], result.results[-1]
            if not isinstance(arrivals, list):
                raise BarrierError(f"barrier {self.name!r}: malformed transaction result")
            if not result.succeeded:
                if not isinstance(found, list) or not found:
                    await self.create()  # absent (never created, or deleted): retry after
                    continue
                if found[0].value != self._record:
                    raise self._mismatch(_decode_parties(found[0]))
                # Present with our count: so the arrival key existed -- an idempotent repeat.
            if len(arrivals) >= self.parties:
                await self._record_done(self._completion(arrivals), arrivals)
            return len(arrivals)
        raise BarrierError(f"barrier {self.name!r} keeps vanishing while arriving")

    async def wait(self, *, timeout: float | None = None) -> int:
        """Wait until ``parties`` participants have arrived; returns the revision at which
        the barrier became complete (the same for every waiter).

        Raises :class:`BarrierTimeout` after ``timeout`` seconds (on the barrier's clock),
        :class:`BarrierMismatch`, or :class:`BarrierError` if the barrier is deleted."""
        self._last_count = 0
        try:
            async with clock_timeout(self._clock, timeout):
                return await self._wait()
        except TimeoutError:
            raise BarrierTimeout(
                f"barrier {self.name!r}: {self._last_count} of {self.parties} participants "
                f"arrived within {timeout} s"
            ) from None

    async def arrive_and_wait(self, participant: str, *, timeout: float | None = None) -> int:
        """:meth:`arrive` then :meth:`wait`, both within ``timeout``; returns :meth:`wait`'s
        revision. The arrival stays recorded if the wait times out."""
        self._last_count = 0
        try:
            async with clock_timeout(self._clock, timeout):
                await self.arrive(participant)
                return await self._wait()
        except TimeoutError:
            raise BarrierTimeout(
                f"barrier {self.name!r}: {self._last_count} of {self.parties} participants "
                f"arrived within {timeout} s"
            ) from None

    async def arrived(self) -> list[str]:
        """The participants that have arrived (and not dropped out), in key order."""
        start = len(self._arrived_prefix)
        return [kv.key[start:] for kv in (await self._store.range(self._arrived_prefix)).kvs]

    async def delete(self) -> None:
        """Remove every key of the barrier (waiters get :class:`BarrierError`)."""
        await self._store.delete(self.prefix, prefix=True)

    # -- internals --

    def _completion(self, arrivals: list[KeyValue]) -> int:
        """The first revision at which the current arrivals numbered ``parties``."""
        revisions = sorted(kv.create_revision for kv in arrivals)
        return revisions[self.parties - 1]

    async def _record_done(self, revision: int, arrivals: list[KeyValue]) -> int:
        """Write the completion record once; returns the revision it holds (ours or the one
        another writer got in first with)."""
        start = len(self._arrived_prefix)
        record = _Done(revision, [kv.key[start:] for kv in arrivals])
        key = self._done_key
        result = await self._store.txn(
            [Compare(key, "create", "==", 0)], [PutOp(key, _encode(record))], [GetOp(key)]
        )
        if result.succeeded:
            return revision
        found = result.results[0]
        if isinstance(found, list) and found:
            return _decode_done(found[0]).revision
        raise BarrierError(f"barrier {self.name!r}: completion record unreadable")

    async def _wait(self) -> int:
        while True:
            snapshot = await self._store.range(self.prefix)
            arrivals: dict[str, KeyValue] = {}
            done: KeyValue | None = None
            for kv in snapshot.kvs:
                if kv.key == self._done_key:
                    done = kv
                elif kv.key == self._parties_key:
                    parties = _decode_parties(kv)
                    if parties != self.parties:
                        raise self._mismatch(parties)
                elif kv.key.startswith(self._arrived_prefix):
                    arrivals[kv.key] = kv
            if done is not None:
                return _decode_done(done).revision
            self._last_count = len(arrivals)
            if len(arrivals) >= self.parties:
                return await self._record_done(
                    self._completion(list(arrivals.values())), list(arrivals.values())
                )
            with contextlib.suppress(Compacted):
                async with self._store.watch(
                    self.prefix, start_revision=snapshot.revision + 1
                ) as events:
                    async for event in events:
                        kv = event.kv
                        if kv.key == self._done_key:
                            if event.type == "put":
                                return _decode_done(kv).revision
                        elif kv.key == self._parties_key:
                            if event.type == "delete":
                                raise BarrierError(f"barrier {self.name!r} was deleted")
                            parties = _decode_parties(kv)
                            if parties != self.parties:
                                raise self._mismatch(parties)
                        elif kv.key.startswith(self._arrived_prefix):
                            if event.type == "delete":
                                arrivals.pop(kv.key, None)
                            else:
                                arrivals[kv.key] = kv
                            self._last_count = len(arrivals)
                            if len(arrivals) >= self.parties:
                                return await self._record_done(
                                    event.revision, list(arrivals.values())
                                )
            # The watch ended (compacted history, a backend reconnect): read the state again.
