"""Counting semaphores / resource pools over the coordination store, with fencing tokens.

Theory of operation (a recipe over the :class:`~agentcluster.store.base.Store` interface only,
in the style of :class:`agentcluster.store._recipes.Lock`):

* **Request.** An acquisition grants its own lease (``ttl``) and creates
  ``<name>/<lease id in hex>`` on it, holding its weight. The key's ``create_revision`` is its
  place in the queue and its **fencing token**: a key created later has a larger revision, so
  tokens grow with each new request.
* **Holding, FIFO.** A request holds once the weights of every request created at or before
  it (by ``create_revision``) sum to at most ``limit``. Weights are positive, so the holders
  are always a prefix of the queue: a request never overtakes an earlier one, and a big
  request is not starved by a stream of small ones behind it. Once a request holds it keeps
  holding (only later requests can appear, and those do not count for it).
* **Waking.** A waiter reads the queue at one revision, then watches ``<name>/`` from that
  revision + 1 and keeps the weight ahead of it up to date from the deletion events alone: a
  release costs each waiter one dictionary lookup, never a read of the store, so there is no
  herd of re-reads, and the one-watch-from-revision + 1 pattern misses no release.
* **Keep-alive and loss.** The :class:`Permit` keeps its lease alive from an owned background
  task every ``ttl / 3``. If a keep-alive is refused, or none succeeded for a whole TTL, it
  sets :attr:`Permit.lost`: from then on the holder must not rely on its units -- another
  request may already hold them. A holder whose process dies frees its units when its lease
  expires.
* **Fencing.** ``Compare(key, "create", "==", token)`` holds exactly while the permit's key
  exists. A side effect written with that guard (:meth:`Permit.fenced_put`) is rejected once
  the lease expired, even if the holder has not noticed yet.
* **Release / withdrawal** revokes the lease, which deletes the key in the same revision (one
  wake-up per waiter, not two). A cancelled or timed-out acquire withdraws its request the
  same way; if the store cannot be reached the key vanishes when the lease expires.

Every handle of one semaphore must use the same ``limit``. Give semaphores names that are not
prefixes of one another (``pool`` and ``pool/gpu``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import msgspec

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.coordination.barrier import clock_timeout
from agentcluster.store._recipes import _CLEANUP_TIMEOUT, keep_lease_alive
from agentcluster.store.base import (
    Compacted,
    Compare,
    GetOp,
    KeyValue,
    PutOp,
    Store,
    StoreError,
)

__all__ = ["Permit", "Semaphore", "SemaphoreError", "SemaphoreTimeout"]

log = logging.getLogger(__name__)


class SemaphoreError(StoreError):
    """Base of every semaphore error."""


class SemaphoreTimeout(SemaphoreError, TimeoutError):
    """The units were not granted within the timeout (the request was withdrawn)."""


class _Request(msgspec.Struct, frozen=True):
    weight: int


_encode = msgspec.json.Encoder().encode
_request_decoder = msgspec.json.Decoder(_Request)


def _weight(kv: KeyValue) -> int:
    try:
        weight = _request_decoder.decode(kv.value).weight
    except msgspec.DecodeError as exc:
        raise SemaphoreError(f"{kv.key!r} is not a semaphore request: {exc}") from None
    if weight < 1:
        raise SemaphoreError(f"{kv.key!r} requests {weight} units")
    return weight


class Permit:
    """Units held from a :class:`Semaphore`; an async context manager (released on exit).

    See the module docstring for what :attr:`lost` means: once it is set, stop acting as a
    holder."""

    __slots__ = (
        "_clock",
        "_keeper",
        "_lost",
        "_store",
        "_ttl",
        "key",
        "lease",
        "name",
        "token",
        "weight",
    )

    def __init__(
        self, store: Store, name: str, key: str, lease: int, weight: int, ttl: float, clock: Clock
    ) -> None:
        self._store = store
        self.name = name
        self.key = key
        self.lease = lease
        self.weight = weight
        self.token = 0  # the key's create_revision, known once the request is queued
        self._ttl = ttl
        self._clock = clock
        self._lost = False
        self._keeper: asyncio.Task[None] | None = asyncio.create_task(
            self._keep_alive(), name=f"semaphore-keepalive {name}"
        )

    @property
    def lost(self) -> bool:
        """True once the lease could not be kept alive: do not rely on the permit."""
        return self._lost

    @property
    def held(self) -> bool:
        """Acquired, not released and not lost."""
        return self._keeper is not None and self.token > 0 and not self._lost

    def guard(self) -> Compare:
        """The compare that fences a write: true only while this permit's key exists."""
        return Compare(self.key, "create", "==", self.token)

    async def fenced_put(self, key: str, value: bytes) -> bool:
        """Put ``key`` only while the permit is held; False (and nothing written) otherwise."""
        result = await self._store.txn([self.guard()], [PutOp(key, value)])
        return result.succeeded

    async def release(self) -> None:
        """Give the units back: stop the keep-alive and revoke the lease (which deletes the
        key). If the store cannot be reached, the key vanishes when the lease expires.
        Releasing twice is harmless."""
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        with contextlib.suppress(StoreError, TimeoutError):
            async with asyncio.timeout(_CLEANUP_TIMEOUT):
                await self._store.lease_revoke(self.lease)

    async def _keep_alive(self) -> None:
        await keep_lease_alive(
            self._store, self.lease, self._ttl, self._clock, what=f"semaphore {self.name}"
        )
        self._lost = True

    def __repr__(self) -> str:
        return f"Permit({self.key!r}, token={self.token}, weight={self.weight})"

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class Semaphore:
    """A counting semaphore / resource pool of ``limit`` units (see the module docstring).

    ``async with await pool.acquire(2) as permit: await permit.fenced_put(...)``."""

    def __init__(
        self,
        store: Store,
        name: str,
        limit: int,
        *,
        ttl: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        if not name:
            raise ValueError("a semaphore needs a name")
        if limit < 1:
            raise ValueError(f"a semaphore needs at least one unit, not {limit!r}")
        if not ttl > 0:
            raise ValueError(f"semaphore ttl must be positive, not {ttl!r}")
        self._store = store
        self.name = name
        self.prefix = f"{name}/"
        self.limit = limit
        self.ttl = ttl
        self._clock: Clock = clock or MonotonicClock()

    async def acquire(self, weight: int = 1, *, timeout: float | None = None) -> Permit:
        """Wait until ``weight`` units are granted, first come first served.

        Raises :class:`ValueError` if ``weight`` is not in ``1..limit``;
        :class:`SemaphoreTimeout` after ``timeout`` seconds (on the semaphore's clock);
        :class:`SemaphoreError` if the request's lease was lost while waiting. On any failure
        or cancellation the request is withdrawn."""
        if not 1 <= weight <= self.limit:
            raise ValueError(f"weight must be within 1..{self.limit}, not {weight!r}")
        lease = await self._store.lease_grant(self.ttl)
        key = f"{self.prefix}{lease.id:x}"
        permit = Permit(self._store, self.name, key, lease.id, weight, self.ttl, self._clock)
        ahead = [0]  # weight queued ahead at the last look, for the timeout message
        try:
            async with clock_timeout(self._clock, timeout):
                permit.token = await self._enqueue(permit)
                await self._wait_for_units(permit, ahead)
        except TimeoutError:
            await permit.release()
            raise SemaphoreTimeout(
                f"semaphore {self.name!r}: {weight} of {self.limit} units not granted within "
                f"{timeout} s ({ahead[0]} units held or queued ahead)"
            ) from None
        except BaseException:
            await permit.release()
            raise
        return permit

    async def holders(self) -> list[tuple[str, int]]:
        """``(key, weight)`` of the requests holding units now, oldest first."""
        return self._holders((await self._store.range(self.prefix)).kvs)[0]

    async def available(self) -> int:
        """Units not held now (requests waiting for more than that do not count)."""
        return self.limit - self._holders((await self._store.range(self.prefix)).kvs)[1]

    # -- internals --

    def _holders(self, kvs: list[KeyValue]) -> tuple[list[tuple[str, int]], int]:
        held: list[tuple[str, int]] = []
        total = 0
        for kv in sorted(kvs, key=lambda kv: kv.create_revision):
            weight = _weight(kv)
            if total + weight > self.limit:
                break  # FIFO: nobody behind the first waiter holds
            total += weight
            held.append((kv.key, weight))
        return held, total

    async def _enqueue(self, permit: Permit) -> int:
        key = permit.key
        result = await self._store.txn(
            [Compare(key, "create", "==", 0)],
            [PutOp(key, _encode(_Request(permit.weight)), permit.lease)],
            [GetOp(key)],
        )
        if result.succeeded:
            return result.revision
        # The key is named after a lease granted just now: only we could have created it.
        raise SemaphoreError(f"semaphore {self.name!r}: {key!r} exists already")

    async def _wait_for_units(self, permit: Permit, ahead_out: list[int]) -> None:
        key, token, room = permit.key, permit.token, self.limit - permit.weight
        while True:
            snapshot = await self._store.range(self.prefix)
            ahead: dict[str, int] = {}
            total = 0
            mine = False
            for kv in snapshot.kvs:
                if kv.create_revision < token:
                    weight = _weight(kv)
                    ahead[kv.key] = weight
                    total += weight
                elif kv.key == key:
                    mine = kv.create_revision == token
            if not mine:
                raise SemaphoreError(
                    f"semaphore {self.name!r}: {key!r} vanished while waiting "
                    "(lease expired or revoked)"
                )
            ahead_out[0] = total
            if total <= room:
                return
            with contextlib.suppress(Compacted):
                async with self._store.watch(
                    self.prefix, start_revision=snapshot.revision + 1
                ) as events:
                    async for event in events:
                        if event.type != "delete":
                            continue  # a put is a later request: it never counts for us
                        gone = event.kv.key
                        if gone == key:
                            raise SemaphoreError(
                                f"semaphore {self.name!r}: {key!r} vanished while waiting "
                                "(lease expired or revoked)"
                            )
                        weight = ahead.pop(gone, 0)
                        if weight:
                            total -= weight
                            ahead_out[0] = total
                            if total <= room:
                                return
            # The watch ended (compacted history, a backend reconnect): read the queue again.
