"""The signal bus: in-process publish/subscribe with acks, a dead-letter queue and a journal.

Theory of operation. ``publish`` validates a signal, runs the ``before_publish`` middleware,
appends it to the journal, asks the :class:`~agentcluster.signals.router.Router` which
subscriptions match, and offers it to each one's bounded queue. A full queue applies the
subscription's overflow policy: ``block`` makes ``publish`` await space (backpressure),
``drop_oldest``/``drop_newest`` drop and count, ``error`` delivers to everyone else and then
raises :class:`QueueFull` naming the full subscriptions. Nothing else happens on the publish
path: no task per signal, one journal tuple per signal, so it stays allocation-light.

A subscription is consumed either by a *handler* (sync or async; the bus runs one dispatch
task per handler subscription inside its TaskGroup, draining the queue in a tight loop) or by
the user (``await sub.get()`` / ``async for sig in sub``). A handler that raises in a plain
subscription is logged and counted; the dispatch task goes on.

Persistent subscriptions (acks, ack timeouts, retries with capped exponential backoff and
jitter from the bus's ``rng``, the dead-letter queue) live in
:mod:`agentcluster.signals._subscription`; its docstring has the exact rules. Handler
subscriptions ack when the handler returns and nack when it raises.

The journal keeps ``(publish time, signal)`` pairs bounded by count and by age (by
``clock.now()``); ``replay`` and ``trace_chain`` read it, so they only know what it still
holds. Middleware hooks are optional; one that raises is logged and counted and the bus
carries on as if it had returned its input. All timers use the bus's ``clock``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.signals._signal import Signal, validate_type
from agentcluster.signals._subscription import (
    FULL,
    POLICIES,
    WAIT,
    BusClosed,
    BusError,
    DeadLetter,
    DeadLetterQueue,
    Handler,
    Overflow,
    QueueFull,
    Subscription,
    SubscriptionClosed,
    SubscriptionStats,
    _Delivery,
)
from agentcluster.signals.router import Router, pattern_matcher, validate_pattern

__all__ = [
    "Bus",
    "BusClosed",
    "BusError",
    "BusStats",
    "DeadLetter",
    "DeadLetterQueue",
    "Middleware",
    "Overflow",
    "QueueFull",
    "SignalNotFound",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionStats",
    "bench_bus",
]

logger = logging.getLogger(__name__)
_NEW, _RUNNING, _CLOSED = 0, 1, 2


class SignalNotFound(BusError, LookupError):
    """A signal id is not in the journal."""


class Middleware:
    """Optional base class: override any subset of hooks (plain objects with them work too).

    ``before_*`` hooks return the signal to use (possibly a new one) or None to drop it.
    """

    def before_publish(self, signal: Signal) -> Signal | None:
        return signal

    def after_publish(self, signal: Signal) -> None:
        return None

    def before_dispatch(self, signal: Signal, subscription: Subscription) -> Signal | None:
        return signal

    def after_dispatch(
        self, signal: Signal, subscription: Subscription, error: BaseException | None
    ) -> None:
        return None


_HOOKS = ("before_publish", "after_publish", "before_dispatch", "after_dispatch")


@dataclass(frozen=True, slots=True)
class BusStats:
    published: int
    delivered: int  # hand-overs to a handler or a get(), redeliveries included
    dropped: int  # overflow drops over all subscriptions
    filtered: int  # dropped by before_publish middleware
    unrouted: int  # published with no matching subscription
    dead_lettered: int
    redelivered: int
    handler_errors: int
    middleware_errors: int
    predicate_errors: int  # subscription predicates that raised (counted as non-matches)
    dlq_size: int
    dlq_evicted: int
    journal_size: int
    subscriptions: dict[str, SubscriptionStats]


class Bus:
    """Publish/subscribe over a :class:`Router`; use as ``async with Bus() as bus:``."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        journal_max_size: int = 10_000,
        journal_max_age: float | None = 3600.0,
        dlq_max_size: int = 10_000,
        jitter: float = 0.1,
    ) -> None:
        if not isinstance(journal_max_size, int) or journal_max_size < 0:
            raise ValueError(f"journal_max_size must be an int >= 0, got {journal_max_size!r}")
        if journal_max_age is not None and not journal_max_age > 0:
            raise ValueError(
                f"journal_max_age must be > 0 seconds or None, got {journal_max_age!r}"
            )
        if not isinstance(dlq_max_size, int) or dlq_max_size < 1:
            raise ValueError(f"dlq_max_size must be an int >= 1, got {dlq_max_size!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._rng = rng if rng is not None else random.Random()
        self._jitter = jitter
        self._router: Router[Subscription] = Router()
        self._subs: dict[str, Subscription] = {}
        self._sub_seq = 0
        self._journal: deque[tuple[float, Signal]] = deque(maxlen=journal_max_size)
        self._journal_max_age = journal_max_age
        self._dlq = DeadLetterQueue(dlq_max_size)
        self._tg: asyncio.TaskGroup | None = None
        self._state = _NEW
        self._mw_before_publish: list[Callable[..., Any]] = []
        self._mw_after_publish: list[Callable[..., Any]] = []
        self._mw_before_dispatch: list[Callable[..., Any]] = []
        self._mw_after_dispatch: list[Callable[..., Any]] = []
        self._published = self._delivered = self._dropped = self._filtered = 0
        self._unrouted = self._dead_lettered = self._redelivered = 0
        self._handler_errors = self._middleware_errors = 0

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Bus:
        if self._state != _NEW:
            raise BusError("a Bus can be entered only once")
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._state = _RUNNING
        for sub in self._subs.values():
            self._spawn(sub)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = _CLOSED
        for sub in self._subs.values():
            sub._close()
        assert self._tg is not None
        try:
            await self._tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The TaskGroup wraps an error raised in the ``async with`` body; our tasks never
            # fail on their own, so hand the body's exception back unwrapped.
            if exc is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc:
                return
            raise

    @property
    def running(self) -> bool:
        return self._state == _RUNNING

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def dlq(self) -> DeadLetterQueue:
        return self._dlq

    def _spawn(self, sub: Subscription) -> None:
        if sub.handler is not None and self._tg is not None:
            sub._task = self._tg.create_task(sub._run(), name=f"bus-subscription-{sub.name}")

    # ------------------------------------------------------------------ subscriptions
    def subscribe(
        self,
        pattern: str,
        handler: Handler | None = None,
        *,
        queue_size: int = 1024,
        overflow: Overflow = "block",
        priority: int = 0,
        predicate: Callable[[Signal], bool] | None = None,
        persistent: bool = False,
        max_attempts: int = 5,
        ack_timeout: float = 30.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        name: str | None = None,
    ) -> Subscription:
        """Subscribe to signals whose type matches ``pattern`` (see the module docstring)."""
        if self._state == _CLOSED:
            raise BusClosed("cannot subscribe: the bus is closed")
        validate_pattern(pattern)
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable or None, got {handler!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if overflow not in POLICIES:
            raise ValueError(f"overflow must be one of {sorted(POLICIES)}, got {overflow!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0 seconds, got {ack_timeout!r}")
        if not 0 <= backoff_base <= backoff_max:
            raise ValueError(
                f"need 0 <= backoff_base <= backoff_max, got {backoff_base!r} and {backoff_max!r}"
            )
        self._sub_seq += 1
        if name is None:
            name = f"sub-{self._sub_seq}"
        elif name in self._subs:
            raise ValueError(f"a subscription named {name!r} already exists on this bus")
        sub = Subscription(
            self,
            pattern,
            handler,
            queue_size=queue_size,
            overflow=overflow,
            priority=priority,
            predicate=predicate,
            persistent=persistent,
            max_attempts=max_attempts,
            ack_timeout=float(ack_timeout),
            backoff_base=float(backoff_base),
            backoff_max=float(backoff_max),
            name=name,
        )
        sub._route_id = self._router.add(pattern, sub, priority=priority, predicate=predicate)
        self._subs[name] = sub
        if self._state == _RUNNING:
            self._spawn(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop routing to ``sub`` and close it (idempotent); queued signals are discarded."""
        if sub._bus is not self:
            raise BusError(f"subscription {sub.name!r} belongs to another bus")
        if sub.closed:
            return
        self._router.remove(sub._route_id)
        del self._subs[sub.name]
        sub._close()

    def subscriptions(self) -> list[Subscription]:
        return list(self._subs.values())

    def use(self, middleware: object) -> object:
        """Install middleware (any object with some of the hooks); returns it."""
        found = False
        for hook in _HOOKS:
            fn = getattr(middleware, hook, None)
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"middleware {middleware!r}: {hook} is not callable")
            found = True
            # Inherited no-op hooks of the base class would only cost time on every signal.
            if getattr(type(middleware), hook, None) is getattr(Middleware, hook):
                continue
            getattr(self, f"_mw_{hook}").append(fn)
        if not found:
            raise TypeError(f"{middleware!r} has none of the middleware hooks {_HOOKS}")
        return middleware

    # ------------------------------------------------------------------ publishing
    async def publish(self, signal: Signal) -> int:
        """Journal and deliver ``signal``; return how many subscriptions queued it."""
        if self._state != _RUNNING:
            raise BusClosed("the bus is not running; use `async with Bus(...) as bus:`")
        if not isinstance(signal, Signal):
            raise TypeError(f"publish() takes a Signal, got {type(signal).__name__}")
        validate_type(signal.type)
        if self._mw_before_publish:
            maybe = self._before(self._mw_before_publish, signal)
            if maybe is None:
                self._filtered += 1
                return 0
            signal = maybe
        now = self._clock.now()
        journal = self._journal
        journal.append((now, signal))
        max_age = self._journal_max_age
        if max_age is not None and journal and journal[0][0] < now - max_age:
            self._trim_journal(now)
        self._published += 1
        subs = self._router.match(signal)
        if not subs:
            self._unrouted += 1
        accepted = 0
        full: list[str] | None = None
        for sub in subs:
            res = sub._offer(signal)
            if res == WAIT:
                res = await sub._put_blocking(signal)
            elif res == FULL:
                full = [*(full or ()), sub.name]
                continue
            accepted += res
        if self._mw_after_publish:
            self._after(self._mw_after_publish, signal)
        if full is not None:
            names = full
            raise QueueFull(
                f"signal {signal.id} ({signal.type}) was not queued for subscription(s) "
                f"{', '.join(map(repr, names))}: queue full (overflow='error')",
                names,
            )
        return accepted

    async def publish_many(self, signals: Iterable[Signal]) -> int:
        """Publish each signal in order; return the total number of queued deliveries."""
        total = 0
        for sig in signals:
            total += await self.publish(sig)
        return total

    # ------------------------------------------------------------------ journal
    def _trim_journal(self, now: float) -> None:
        if self._journal_max_age is None:
            return
        cutoff = now - self._journal_max_age
        journal = self._journal
        while journal and journal[0][0] < cutoff:
            journal.popleft()

    def _since(self, since_time: datetime | float | None, since_id: str | None) -> list[Signal]:
        now = self._clock.now()
        self._trim_journal(now)
        entries = list(self._journal)
        if since_id is not None:
            for i in range(len(entries) - 1, -1, -1):
                if entries[i][1].id == since_id:
                    entries = entries[i + 1 :]
                    break
            else:
                raise SignalNotFound(
                    f"signal id {since_id!r} is not in the journal (never published on this "
                    "bus, or evicted by journal_max_size/journal_max_age)"
                )
        if since_time is not None:
            cutoff = self._to_clock_time(since_time, now)
            entries = [e for e in entries if e[0] >= cutoff]
        return [sig for _, sig in entries]

    def _to_clock_time(self, since: datetime | float, now: float) -> float:
        if isinstance(since, datetime):
            if since.tzinfo is None:
                raise ValueError(f"since_time {since!r} is naive; give a timezone-aware datetime")
            return since.timestamp() - (self._clock.wall() - now)
        if isinstance(since, bool) or not isinstance(since, int | float):
            raise TypeError(
                f"since_time must be a datetime or a bus clock reading (float), got {since!r}"
            )
        return float(since)

    def replay(
        self,
        *,
        since_time: datetime | float | None = None,
        since_id: str | None = None,
        pattern: str = "**",
    ) -> list[Signal]:
        """Journaled signals matching ``pattern``, oldest first, after a point.

        ``since_time``: a timezone-aware datetime (wall time) or a float on the bus clock's
        ``now()`` scale; signals published at or after it. ``since_id``: signals published
        after the (latest) journal entry with that id, exclusive; an id the journal does
        not hold raises :class:`SignalNotFound`. Both together: both must hold.
        """
        matches = pattern_matcher(pattern)
        return [s for s in self._since(since_time, since_id) if matches(s.type)]

    async def replay_to(
        self,
        subscription: Subscription,
        *,
        since_time: datetime | float | None = None,
        since_id: str | None = None,
        pattern: str | None = None,
    ) -> int:
        """Re-deliver journaled signals into one subscription; return how many it queued.

        With ``pattern=None`` the subscription's own pattern and predicate select the
        signals. The subscription's overflow policy applies as for a publish.
        """
        sub = subscription
        if sub._bus is not self or sub.closed:
            raise BusError(f"subscription {sub.name!r} is closed or belongs to another bus")
        # A one-route router applies the pattern and predicate exactly as publish does.
        select: Router[bool] = Router(cache_size=64)
        if pattern is None:
            select.add(sub.pattern, True, predicate=sub.predicate)
        else:
            select.add(pattern, True)
        queued = 0
        for sig in [s for s in self._since(since_time, since_id) if select.match(s)]:
            res = sub._offer(sig)
            if res == WAIT:
                res = await sub._put_blocking(sig)
            elif res == FULL:
                raise QueueFull(
                    f"replay into subscription {sub.name!r} stopped after {queued} signals: "
                    "queue full (overflow='error')",
                    [sub.name],
                )
            queued += res
        return queued

    def trace_chain(self, signal_id: str) -> list[Signal]:
        """The signal and everything it caused, transitively, breadth-first, from the journal.

        Children of one signal come in publish order. Raises :class:`SignalNotFound` if the
        journal does not hold ``signal_id``.
        """
        self._trim_journal(self._clock.now())
        by_id: dict[str, Signal] = {}
        children: dict[str, list[Signal]] = {}
        for _, sig in self._journal:
            if sig.id in by_id:
                continue
            by_id[sig.id] = sig
            cause = sig.causation_id
            if cause is not None:
                children.setdefault(cause, []).append(sig)
        root = by_id.get(signal_id)
        if root is None:
            raise SignalNotFound(f"signal id {signal_id!r} is not in the journal")
        chain = [root]
        seen = {root.id}
        i = 0
        while i < len(chain):
            for child in children.get(chain[i].id, ()):
                if child.id not in seen:
                    seen.add(child.id)
                    chain.append(child)
            i += 1
        return chain

    # ------------------------------------------------------------------ internals
    def _dead_letter(self, sub: Subscription, d: _Delivery) -> None:
        self._dead_lettered += 1
        sub.dead_lettered += 1
        entry = self._dlq._add(sub, d, self._clock.now())
        logger.warning(
            "signal %s (%s) dead-lettered from subscription %r after %d attempts: %s",
            d.signal.id,
            d.signal.type,
            sub.name,
            d.attempts,
            entry.error,
        )

    def _backoff(self, sub: Subscription, attempt: int) -> float:
        delay = min(sub.backoff_max, sub.backoff_base * 2.0 ** min(attempt - 1, 60))
        if self._jitter:
            delay *= 1.0 - self._jitter * self._rng.random()
        return delay

    def _middleware_failed(self, hook: object, what: str, exc: BaseException | None) -> None:
        self._middleware_errors += 1
        name = getattr(hook, "__qualname__", repr(hook))
        logger.error("middleware %s %s; ignoring it", name, what, exc_info=exc)

    def _filter(self, hook: Callable[..., Any], sig: Signal, *args: Any) -> Signal | None:
        """Run one before_* hook; on failure keep ``sig``."""
        try:
            out = hook(sig, *args)
        except Exception as exc:
            self._middleware_failed(hook, "raised", exc)
            return sig
        if out is None or out is sig:
            return out
        if not isinstance(out, Signal):
            self._middleware_failed(hook, f"returned {type(out).__name__}, not a Signal", None)
            return sig
        try:
            validate_type(out.type)
        except ValueError as exc:
            self._middleware_failed(hook, "returned a signal with an invalid type", exc)
            return sig
        return out

    def _before(self, hooks: list[Callable[..., Any]], sig: Signal, *args: Any) -> Signal | None:
        for hook in hooks:
            out = self._filter(hook, sig, *args)
            if out is None:
                return None
            sig = out
        return sig

    def _after(self, hooks: list[Callable[..., Any]], *args: Any) -> None:
        for hook in hooks:
            try:
                hook(*args)
            except Exception as exc:
                self._middleware_failed(hook, "raised", exc)

    def stats(self) -> BusStats:
        return BusStats(
            self._published, self._delivered, self._dropped, self._filtered, self._unrouted,
            self._dead_lettered, self._redelivered, self._handler_errors,
            self._middleware_errors, self._router.predicate_errors, len(self._dlq),
            self._dlq.evicted, len(self._journal),
            {name: sub.stats() for name, sub in self._subs.items()},
        )  # fmt: skip


async def bench_bus(n_signals: int = 50_000, n_subscribers: int = 10) -> float:
    """Deliveries per second: publish ``n_signals`` to ``n_subscribers`` handler subscriptions
    (all matching, through a mix of patterns) until every subscriber has received every one.
    Signal construction is outside the timed part."""
    if n_signals < 1 or n_subscribers < 1:
        raise ValueError("bench_bus needs n_signals >= 1 and n_subscribers >= 1")
    signals = [Signal(type=f"bench.load.k{i % 16}", data=i) for i in range(n_signals)]
    target = n_signals * n_subscribers
    done = asyncio.Event()
    received = 0

    def handler(sig: Signal) -> None:
        nonlocal received
        received += 1
        if received == target:
            done.set()

    patterns = ("bench.**", "bench.load.*", "bench.*.*", "**", "*.load.**")
    async with Bus() as bus:
        for i in range(n_subscribers):
            bus.subscribe(patterns[i % len(patterns)], handler, name=f"bench-{i}")
        start = time.perf_counter()
        for sig in signals:
            await bus.publish(sig)
        await done.wait()
        elapsed = time.perf_counter() - start
    return target / elapsed if elapsed > 0 else float("inf")
