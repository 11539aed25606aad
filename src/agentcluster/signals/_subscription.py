"""Subscriptions of the signal bus: bounded queues, acks, retries and the dead-letter queue.

Theory of operation. A :class:`Subscription` is a deque with a bound and an overflow policy,
plus waiter futures for blocked consumers (``get``) and blocked publishers (``block``
policy). ``_offer`` is the whole publish-side cost: a length check, an append and, when a
consumer waits, one future wake-up. A handler subscription's dispatch task drains the deque
in a tight loop and only awaits when it is empty (or the handler is async), so deliveries are
amortised over batches rather than paying a task switch each.

Persistent subscriptions track every signal in ``_outstanding`` (by id) until it is acked.
Handing a signal to the consumer starts an ack timer (``ack_timeout``, on the bus clock);
``ack(id)`` settles it, ``nack(id)`` or the timer firing fails the attempt. A failed attempt
is retried after ``min(backoff_max, backoff_base * 2**(attempt-1))`` seconds, shortened by up
to the bus's ``jitter`` fraction (drawn from its ``rng``) so retries spread out without ever
exceeding the cap. After ``max_attempts`` deliveries the signal goes to the
:class:`DeadLetterQueue` with the subscription name, attempts, last error text and clock
time. An ack that arrives after its timeout is ignored: the signal is already on its way
back (at-least-once). A signal id already outstanding is not queued twice (counted as a
duplicate). Retries and redriven signals bypass the bound: they were accepted once.

Everything here is driven by :class:`agentcluster.signals.bus.Bus`, which owns the tasks and
the counters; this module is split out only to keep each file readable.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

from agentcluster.clock import TimerHandle
from agentcluster.signals._signal import Signal

if TYPE_CHECKING:
    from agentcluster.signals.bus import Bus

__all__ = [
    "BusClosed",
    "BusError",
    "DeadLetter",
    "DeadLetterQueue",
    "Handler",
    "Overflow",
    "QueueFull",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionStats",
]

# One logger for everything the bus reports, whichever file it comes from.
logger = logging.getLogger("agentcluster.signals.bus")

Overflow = Literal["block", "drop_oldest", "drop_newest", "error"]
Handler = Callable[[Signal], object]
POLICIES: dict[str, int] = {"block": 0, "drop_oldest": 1, "drop_newest": 2, "error": 3}
_BLOCK, _DROP_OLDEST, _DROP_NEWEST, _ERROR = 0, 1, 2, 3
# _offer() results: accepted, not queued (dropped or duplicate), must wait, full under "error".
ACCEPTED, SKIPPED, WAIT, FULL = 1, 0, -1, -2
_QUEUED, _INFLIGHT, _WAITING, _DONE = 0, 1, 2, 3


class BusError(Exception):
    """Misuse of the bus or one of its subscriptions; the message says what."""


class BusClosed(BusError):
    """The bus is not running (not entered yet, or already exited)."""


class SubscriptionClosed(BusError):
    """The subscription was unsubscribed or its bus was closed."""


class QueueFull(BusError, asyncio.QueueFull):
    """A subscription with ``overflow="error"`` had no room for a signal."""

    def __init__(self, message: str, subscriptions: list[str]) -> None:
        super().__init__(message)
        self.subscriptions = subscriptions


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A signal a persistent subscription failed to process ``attempts`` times."""

    id: int
    signal: Signal
    subscription: str
    attempts: int
    error: str | None
    time: float  # the bus clock's now() when it was dead-lettered


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    name: str
    pattern: str
    persistent: bool
    queue_depth: int
    enqueued: int
    delivered: int
    dropped: int
    duplicates: int
    handler_errors: int
    redelivered: int
    acked: int
    in_flight: int
    dead_lettered: int


class _Delivery:
    """One signal's life in a persistent subscription, across attempts."""

    __slots__ = ("attempts", "handed_id", "last_error", "signal", "state", "timer")

    def __init__(self, signal: Signal) -> None:
        self.signal = signal
        self.attempts = 0
        self.state = _QUEUED
        self.timer: TimerHandle | None = None
        self.last_error: str | None = None
        self.handed_id = signal.id


def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(None)
            return


async def _wait(waiters: deque[asyncio.Future[None]], retry: Callable[[], bool]) -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await fut
    except BaseException:
        fut.cancel()
        try:
            waiters.remove(fut)
        except ValueError:
            pass
        # Woken and cancelled at once: pass the wake-up on so no other waiter starves.
        if not fut.cancelled() and retry():
            _wake_one(waiters)
        raise


def _error_text(error: BaseException | str | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"


class Subscription:
    """A bounded queue of signals matching ``pattern``; see :meth:`Bus.subscribe`."""

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        handler: Handler | None,
        *,
        queue_size: int,
        overflow: Overflow,
        priority: int,
        predicate: Callable[[Signal], bool] | None,
        persistent: bool,
        max_attempts: int,
        ack_timeout: float,
        backoff_base: float,
        backoff_max: float,
        name: str,
    ) -> None:
        self._bus = bus
        self.pattern = pattern
        self.handler = handler
        self.queue_size = queue_size
        self.overflow: Overflow = overflow
        self._policy = POLICIES[overflow]
        self.priority = priority
        self.predicate = predicate
        self.persistent = persistent
        self.max_attempts = max_attempts
        self.ack_timeout = ack_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.name = name
        self._queue: deque[Signal] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._outstanding: dict[str, _Delivery] = {}  # by signal id: queued/in flight/waiting
        self._inflight: dict[str, _Delivery] = {}  # by the id the consumer was handed
        self._route_id = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.enqueued = self.delivered = self.dropped = self.duplicates = 0
        self.handler_errors = self.redelivered = self.acked = self.dead_lettered = 0

    # ------------------------------------------------------------------ consumer API
    @property
    def closed(self) -> bool:
        return self._closed

    def qsize(self) -> int:
        return len(self._queue)

    async def get(self) -> Signal:
        """The next signal; raises :class:`SubscriptionClosed` once closed and drained."""
        if self.handler is not None:
            raise BusError(f"subscription {self.name!r} has a handler; it cannot be pulled")
        queue = self._queue
        while True:
            if not queue:
                if self._closed:
                    raise SubscriptionClosed(f"subscription {self.name!r} is closed")
                await _wait(self._getters, self._has_items)
                continue
            out = self._handout(self._pop())
            if out is not None:
                return out

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Signal:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def ack(self, signal_id: str) -> bool:
        """Settle an in-flight delivery; False if it is not in flight (e.g. timed out)."""
        return self._settle(signal_id, None, ok=True)

    def nack(self, signal_id: str, error: BaseException | str | None = None) -> bool:
        """Fail an in-flight delivery now (retry or dead-letter); False if not in flight."""
        return self._settle(signal_id, _error_text(error) or "nacked", ok=False)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def stats(self) -> SubscriptionStats:
        return SubscriptionStats(
            self.name, self.pattern, self.persistent, len(self._queue), self.enqueued,
            self.delivered, self.dropped, self.duplicates, self.handler_errors,
            self.redelivered, self.acked, len(self._inflight), self.dead_lettered,
        )  # fmt: skip

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription {self.name!r} pattern={self.pattern!r} {state} depth={len(self._queue)}>"

    # ------------------------------------------------------------------ queue internals
    def _has_items(self) -> bool:
        return bool(self._queue)

    def _has_room(self) -> bool:
        return len(self._queue) < self.queue_size

    def _offer(self, sig: Signal) -> int:
        if self._persistent_duplicate(sig):
            return SKIPPED
        queue = self._queue
        if len(queue) >= self.queue_size:
            policy = self._policy
            if policy == _BLOCK:
                return WAIT
            self.dropped += 1
            self._bus._dropped += 1
            if policy == _DROP_NEWEST:
                return SKIPPED
            if policy == _ERROR:
                return FULL
            old = queue.popleft()
            if self.persistent:
                self._outstanding.pop(old.id, None)
        if self.persistent:
            self._outstanding[sig.id] = _Delivery(sig)
        queue.append(sig)
        self.enqueued += 1
        if self._getters:
            _wake_one(self._getters)
        return ACCEPTED

    def _persistent_duplicate(self, sig: Signal) -> bool:
        if self.persistent and sig.id in self._outstanding:
            self.duplicates += 1
            return True
        return False

    async def _put_blocking(self, sig: Signal) -> int:
        while len(self._queue) >= self.queue_size and not self._closed:
            await _wait(self._putters, self._has_room)
        if self._closed:
            return SKIPPED
        return self._offer(sig)

    def _requeue(self, sig: Signal) -> None:
        """Queue a retry or a redriven signal, past the bound: it was accepted before."""
        self._queue.append(sig)
        if self._getters:
            _wake_one(self._getters)

    def _pop(self) -> Signal:
        sig = self._queue.popleft()
        if self._putters:
            _wake_one(self._putters)
        return sig

    def _handout(self, sig: Signal) -> Signal | None:
        """Run dispatch middleware and start the ack clock; None if middleware dropped it."""
        bus = self._bus
        hooks = bus._mw_before_dispatch
        out: Signal | None = bus._before(hooks, sig, self) if hooks else sig
        if not self.persistent:
            if out is not None:
                self.delivered += 1
                bus._delivered += 1
            return out
        d = self._outstanding.get(sig.id)
        if d is None:  # pragma: no cover - every queued persistent signal is tracked
            return out
        if out is None:  # dropped by middleware: consumed, nothing to retry
            del self._outstanding[sig.id]
            d.state = _DONE
            return None
        self.delivered += 1
        bus._delivered += 1
        d.attempts += 1
        if d.attempts > 1:
            self.redelivered += 1
            bus._redelivered += 1
        d.state = _INFLIGHT
        d.handed_id = out.id
        self._inflight[out.id] = d
        d.timer = bus._clock.call_later(
            self.ack_timeout, partial(self._on_ack_timeout, d, d.attempts)
        )
        return out

    def _settle(self, handed_id: str, error: str | None, *, ok: bool) -> bool:
        if not self.persistent:
            raise BusError(
                f"subscription {self.name!r} is not persistent; it has nothing to ack or nack"
            )
        d = self._inflight.pop(handed_id, None)
        if d is None:
            return False
        if d.timer is not None:
            d.timer.cancel()
            d.timer = None
        if ok:
            d.state = _DONE
            del self._outstanding[d.signal.id]
            self.acked += 1
        else:
            d.last_error = error
            self._fail(d)
        return True

    def _on_ack_timeout(self, d: _Delivery, attempt: int) -> None:
        if d.state != _INFLIGHT or d.attempts != attempt or self._closed:
            return
        self._inflight.pop(d.handed_id, None)
        d.timer = None
        d.last_error = f"not acked within {self.ack_timeout}s"
        self._fail(d)

    def _fail(self, d: _Delivery) -> None:
        if d.attempts >= self.max_attempts:
            d.state = _DONE
            self._outstanding.pop(d.signal.id, None)
            self._bus._dead_letter(self, d)
            return
        d.state = _WAITING
        delay = self._bus._backoff(self, d.attempts)
        d.timer = self._bus._clock.call_later(delay, partial(self._redeliver, d))

    def _redeliver(self, d: _Delivery) -> None:
        if d.state != _WAITING or self._closed:
            return
        d.timer = None
        d.state = _QUEUED
        self._requeue(d.signal)

    def _redrive(self, sig: Signal) -> bool:
        if self._persistent_duplicate(sig):
            return False
        if self.persistent:
            self._outstanding[sig.id] = _Delivery(sig)
        self._requeue(sig)
        return True

    async def _run(self) -> None:
        """Dispatch loop of a handler subscription: drain the queue without yielding."""
        handler = self.handler
        assert handler is not None
        bus = self._bus
        queue = self._queue
        while not self._closed:
            if not queue:
                await _wait(self._getters, self._has_items)
                continue
            out = self._handout(self._pop())
            if out is None:
                continue
            err: Exception | None = None
            try:
                res = handler(out)
                if res is not None and inspect.isawaitable(res):
                    await res
            except Exception as exc:
                err = exc
            if bus._mw_after_dispatch:
                bus._after(bus._mw_after_dispatch, out, self, err)
            if err is not None:
                self.handler_errors += 1
                bus._handler_errors += 1
                logger.error(
                    "handler of subscription %r failed on %s (%s)%s",
                    self.name,
                    out.type,
                    out.id,
                    "; will retry" if self.persistent else "",
                    exc_info=err,
                )
            if self.persistent:
                self._settle(out.id, _error_text(err), ok=err is None)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for d in self._outstanding.values():
            if d.timer is not None:
                d.timer.cancel()
        self._outstanding.clear()
        self._inflight.clear()
        self._queue.clear()
        for waiters in (self._getters, self._putters):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)


class DeadLetterQueue:
    """Signals that persistent subscriptions gave up on; bounded, oldest evicted first."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._entries: dict[int, tuple[DeadLetter, Subscription]] = {}
        self._next_id = 1
        self.evicted = 0

    def _add(self, sub: Subscription, d: _Delivery, now: float) -> DeadLetter:
        entry = DeadLetter(self._next_id, d.signal, sub.name, d.attempts, d.last_error, now)
        self._next_id += 1
        self._entries[entry.id] = (entry, sub)
        while len(self._entries) > self.max_size:
            del self._entries[next(iter(self._entries))]
            self.evicted += 1
        return entry

    def entries(self) -> list[DeadLetter]:
        """All entries, oldest first."""
        return [entry for entry, _ in self._entries.values()]

    async def redrive(self, entry_ids: Iterable[int] | None = None) -> int:
        """Put entries back into their subscriptions with attempts reset; return how many.

        Entries whose subscription is closed stay in the queue. Unknown ids raise
        :class:`BusError` before anything is moved.
        """
        ids = list(self._entries) if entry_ids is None else list(dict.fromkeys(entry_ids))
        unknown = [i for i in ids if i not in self._entries]
        if unknown:
            raise BusError(f"no dead-letter entries with ids {unknown}")
        moved = 0
        for entry_id in ids:
            entry, sub = self._entries[entry_id]
            if sub.closed:
                continue
            del self._entries[entry_id]
            moved += sub._redrive(entry.signal)
        return moved

    def clear(self) -> int:
        """Drop every entry; return how many there were."""
        n = len(self._entries)
        self._entries.clear()
        return n

    def __len__(self) -> int:
        return len(self._entries)
