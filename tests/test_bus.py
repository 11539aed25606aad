"""Bus: delivery, overflow, persistence and retries, DLQ, middleware, journal, causation."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from agentcluster.clock import SimClock
from agentcluster.signals._signal import Signal, SignalError
from agentcluster.signals.bus import (
    Bus,
    BusClosed,
    BusError,
    Middleware,
    QueueFull,
    SignalNotFound,
    Subscription,
    SubscriptionClosed,
    bench_bus,
)
from agentcluster.signals.router import RouteError
from agentcluster.testing import advance, wait_until

BUS_LOGGER = "agentcluster.signals.bus"


def now() -> float:
    return asyncio.get_running_loop().time()


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``cond`` until it holds; fail after ``within`` (virtual) seconds."""
    await wait_until(cond, timeout=within)


def drain(sub: Subscription) -> list[Signal]:
    out = []
    while sub.qsize():
        out.append(sub._handout(sub._pop()))
    return [s for s in out if s is not None]


# ----------------------------------------------------------------------------- delivery
@pytest.mark.virtual_time
async def test_publish_delivers_to_every_matching_subscription() -> None:
    async with Bus() as bus:
        member = bus.subscribe("cluster.member.*", name="member")
        everything = bus.subscribe("**", name="all")
        health = bus.subscribe("cluster.health.**", name="health")
        s1 = Signal(type="cluster.member.suspect")
        s2 = Signal(type="cluster.health.alert.critical")
        assert await bus.publish(s1) == 2
        assert await bus.publish(s2) == 2
        assert await bus.publish(Signal(type="other")) == 1
        assert await member.get() == s1
        assert [await everything.get() for _ in range(3)][:2] == [s1, s2]
        assert await health.get() == s2
        assert member.qsize() == 0 and health.qsize() == 0
        stats = bus.stats()
        assert stats.published == 3
        assert stats.delivered == 5
        assert stats.unrouted == 0
        assert await bus.publish(Signal(type="nobody.listens")) == 1  # "**" still does
        bus.unsubscribe(everything)
        assert await bus.publish(Signal(type="nobody.listens")) == 0
        assert bus.stats().unrouted == 1


@pytest.mark.virtual_time
async def test_publish_validates_and_requires_a_running_bus() -> None:
    bus = Bus()
    with pytest.raises(BusClosed, match="not running"):
        await bus.publish(Signal(type="a"))
    async with bus:
        with pytest.raises(SignalError, match=r"invalid signal type 'a\.\.b'"):
            await bus.publish(Signal(type="a..b"))
        with pytest.raises(SignalError, match="invalid signal type"):
            await bus.publish(Signal(type="a.*"))
        with pytest.raises(TypeError, match="takes a Signal, got dict"):
            await bus.publish({"type": "a"})  # type: ignore[arg-type]
        assert bus.stats().published == 0
    with pytest.raises(BusClosed):
        await bus.publish(Signal(type="a"))
    with pytest.raises(BusClosed):
        bus.subscribe("a")
    with pytest.raises(BusError, match="only once"):
        async with bus:
            pass


@pytest.mark.virtual_time
async def test_publish_many_and_subscription_predicates() -> None:
    async with Bus() as bus:
        big = bus.subscribe("job.*", predicate=lambda s: s.data > 10, name="big")
        every = bus.subscribe("job.*", name="every")
        sigs = [Signal(type="job.run", data=n) for n in (5, 50, 7, 70)]
        assert await bus.publish_many(sigs) == 6
        assert drain(big) == [sigs[1], sigs[3]]
        assert drain(every) == sigs
        assert await bus.publish(Signal(type="job.run", data="not a number")) == 1
        assert bus.stats().predicate_errors == 1


@pytest.mark.virtual_time
async def test_sync_and_async_handlers_receive_in_order() -> None:
    got_sync: list[int] = []
    got_async: list[tuple[int, float]] = []

    async def slow(sig: Signal) -> None:
        await advance(1)
        got_async.append((sig.data, now()))

    async with Bus() as bus:
        bus.subscribe("n.*", lambda s: got_sync.append(s.data))
        bus.subscribe("n.*", slow)
        for i in range(5):
            await bus.publish(Signal(type="n.x", data=i))
        await until(lambda: len(got_async) == 5, within=10)
        assert got_sync == [0, 1, 2, 3, 4]
        assert [data for data, _ in got_async] == [0, 1, 2, 3, 4]
        assert [t for _, t in got_async] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])
        assert bus.stats().delivered == 10


@pytest.mark.virtual_time
async def test_handler_subscription_made_before_enter_starts_on_enter() -> None:
    got: list[Signal] = []
    bus = Bus()
    bus.subscribe("a", got.append)
    async with bus:
        sig = Signal(type="a")
        await bus.publish(sig)
        await until(lambda: got == [sig])


@pytest.mark.virtual_time
async def test_failing_handler_is_logged_counted_and_dispatch_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []

    def handler(sig: Signal) -> None:
        if sig.data == 1:
            raise ValueError("bad data")
        got.append(sig.data)

    caplog.set_level(logging.ERROR, logger=BUS_LOGGER)
    async with Bus() as bus:
        sub = bus.subscribe("x", handler, name="fragile")
        for i in range(3):
            await bus.publish(Signal(type="x", data=i))
        await until(lambda: got == [0, 2])
        assert sub.handler_errors == 1
        assert bus.stats().handler_errors == 1
    assert any(
        "fragile" in r.getMessage() and r.exc_info and isinstance(r.exc_info[1], ValueError)
        for r in caplog.records
    )


@pytest.mark.virtual_time
async def test_get_on_handler_subscription_and_ack_on_plain_subscription_fail() -> None:
    async with Bus() as bus:
        handled = bus.subscribe("a", lambda s: None, name="handled")
        plain = bus.subscribe("a", name="plain")
        with pytest.raises(BusError, match="'handled' has a handler"):
            await handled.get()
        with pytest.raises(BusError, match="'plain' is not persistent"):
            plain.ack("some-id")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queue_size": 0}, "queue_size"),
        ({"overflow": "spill"}, "overflow must be one of"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"ack_timeout": 0}, "ack_timeout"),
        ({"backoff_base": 5, "backoff_max": 1}, "backoff_base <= backoff_max"),
        ({"handler": 3}, "handler must be callable"),
    ],
)
def test_subscribe_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    bus = Bus()
    with pytest.raises((ValueError, TypeError), match=message):
        bus.subscribe("a.b", **kwargs)
    assert bus.subscriptions() == []


def test_subscribe_rejects_bad_pattern_priority_and_duplicate_names() -> None:
    bus = Bus()
    with pytest.raises(RouteError, match=r"'a\.\.b'"):
        bus.subscribe("a..b")
    with pytest.raises(RouteError, match="priority"):
        bus.subscribe("a", priority=500)
    bus.subscribe("a", name="dup")
    with pytest.raises(ValueError, match="named 'dup' already exists"):
        bus.subscribe("b", name="dup")
    assert [s.name for s in bus.subscriptions()] == ["dup"]


def test_bus_constructor_validation() -> None:
    with pytest.raises(ValueError, match="journal_max_size"):
        Bus(journal_max_size=-1)
    with pytest.raises(ValueError, match="journal_max_age"):
        Bus(journal_max_age=0)
    with pytest.raises(ValueError, match="dlq_max_size"):
        Bus(dlq_max_size=0)
    with pytest.raises(ValueError, match="jitter"):
        Bus(jitter=1.5)


# ------------------------------------------------------------------------------ overflow
@pytest.mark.virtual_time
async def test_block_overflow_applies_backpressure() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("a", queue_size=2, name="slow")
        sigs = [Signal(type="a", data=i) for i in range(4)]
        await bus.publish(sigs[0])
        await bus.publish(sigs[1])
        blocked = asyncio.create_task(bus.publish_many(sigs[2:]))
        await advance(60)
        assert not blocked.done()
        assert sub.qsize() == 2
        got = [await sub.get() for _ in range(4)]
        assert await blocked == 2
        assert got == sigs
        assert sub.dropped == 0


@pytest.mark.virtual_time
async def test_blocked_publisher_is_released_by_unsubscribe() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("a", queue_size=1)
        await bus.publish(Signal(type="a"))
        blocked = asyncio.create_task(bus.publish(Signal(type="a")))
        await advance(1)
        assert not blocked.done()
        bus.unsubscribe(sub)
        assert await blocked == 0


@pytest.mark.virtual_time
async def test_cancelled_blocked_publisher_does_not_starve_the_next_one() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("a", queue_size=1)
        await bus.publish(Signal(type="a", data=0))
        first = asyncio.create_task(bus.publish(Signal(type="a", data=1)))
        second = asyncio.create_task(bus.publish(Signal(type="a", data=2)))
        await advance(1)
        first.cancel()
        assert (await sub.get()).data == 0
        assert await second == 1
        assert (await sub.get()).data == 2
        assert first.cancelled()


@pytest.mark.virtual_time
async def test_drop_oldest_and_drop_newest() -> None:
    async with Bus() as bus:
        oldest = bus.subscribe("a", queue_size=2, overflow="drop_oldest", name="oldest")
        newest = bus.subscribe("a", queue_size=2, overflow="drop_newest", name="newest")
        sigs = [Signal(type="a", data=i) for i in range(5)]
        await bus.publish_many(sigs)
        assert [s.data for s in drain(oldest)] == [3, 4]
        assert [s.data for s in drain(newest)] == [0, 1]
        assert oldest.dropped == 3 and newest.dropped == 3
        stats = bus.stats()
        assert stats.dropped == 6
        assert stats.subscriptions["oldest"].dropped == 3


@pytest.mark.virtual_time
async def test_error_overflow_raises_naming_the_subscription_after_delivering_to_others() -> None:
    async with Bus() as bus:
        strict = bus.subscribe("a", queue_size=1, overflow="error", name="strict")
        relaxed = bus.subscribe("a", name="relaxed")
        await bus.publish(Signal(type="a", data=0))
        second = Signal(type="a", data=1)
        with pytest.raises(QueueFull, match="'strict'") as info:
            await bus.publish(second)
        assert info.value.subscriptions == ["strict"]
        assert isinstance(info.value, asyncio.QueueFull)
        assert second.id in str(info.value)
        assert [s.data for s in drain(relaxed)] == [0, 1]
        assert [s.data for s in drain(strict)] == [0]
        assert strict.dropped == 1
        assert bus.replay()[-1] == second  # it was published (journaled) all the same


# ---------------------------------------------------------------- persistence and retries
@pytest.mark.virtual_time
async def test_failing_handler_is_retried_with_exponential_backoff_then_dead_lettered() -> None:
    times: list[float] = []

    def handler(sig: Signal) -> None:
        times.append(now())
        raise ValueError(f"boom {len(times)}")

    async with Bus(jitter=0.0) as bus:
        sub = bus.subscribe(
            "job.*", handler, persistent=True, max_attempts=4, backoff_base=1.0, name="jobs"
        )
        sig = Signal(type="job.run")
        await bus.publish(sig)
        await advance(100)
        assert times == pytest.approx([0.0, 1.0, 3.0, 7.0])
        [entry] = bus.dlq.entries()
        assert entry.signal == sig
        assert entry.subscription == "jobs"
        assert entry.attempts == 4
        assert entry.error == "ValueError: boom 4"
        assert entry.time == pytest.approx(7.0)
        stats = bus.stats()
        assert stats.dead_lettered == 1 and stats.redelivered == 3
        assert stats.subscriptions["jobs"].handler_errors == 4
        assert sub.in_flight == 0


@pytest.mark.virtual_time
async def test_backoff_is_capped_at_backoff_max() -> None:
    times: list[float] = []

    def handler(sig: Signal) -> None:
        times.append(now())
        raise RuntimeError("no")

    async with Bus(jitter=0.0) as bus:
        bus.subscribe("a", handler, persistent=True, max_attempts=6, backoff_max=3.0)
        await bus.publish(Signal(type="a"))
        await advance(100)
    # delays 1, 2, then capped at 3
    assert times == pytest.approx([0.0, 1.0, 3.0, 6.0, 9.0, 12.0])


@pytest.mark.virtual_time
async def test_backoff_jitter_comes_from_the_bus_rng() -> None:
    times: list[float] = []

    def handler(sig: Signal) -> None:
        times.append(now())
        raise RuntimeError("no")

    async with Bus(rng=random.Random(7), jitter=0.5) as bus:
        bus.subscribe("a", handler, persistent=True, max_attempts=4, backoff_base=2.0)
        await bus.publish(Signal(type="a"))
        await advance(100)
    mirror = random.Random(7)
    expected = [0.0]
    for attempt in (1, 2, 3):
        expected.append(expected[-1] + 2.0 * 2 ** (attempt - 1) * (1 - 0.5 * mirror.random()))
    assert times == pytest.approx(expected)
    assert times != pytest.approx([0.0, 2.0, 6.0, 14.0])  # the jitter did shorten them


@pytest.mark.virtual_time
async def test_unacked_pull_deliveries_time_out_and_are_redelivered() -> None:
    times: list[float] = []
    async with Bus(jitter=0.0) as bus:
        sub = bus.subscribe(
            "a", persistent=True, ack_timeout=10.0, backoff_base=2.0, max_attempts=3, name="lazy"
        )

        async def consume() -> None:
            async for _ in sub:
                times.append(now())  # and never ack

        async with asyncio.TaskGroup() as tg:
            tg.create_task(consume())
            sig = Signal(type="a")
            await bus.publish(sig)
            await advance(100)
            bus.unsubscribe(sub)
        assert times == pytest.approx([0.0, 12.0, 26.0])
        [entry] = bus.dlq.entries()
        assert entry.time == pytest.approx(36.0)
        assert entry.error == "not acked within 10.0s"
        assert entry.attempts == 3


@pytest.mark.virtual_time
async def test_ack_settles_and_late_or_unknown_acks_return_false() -> None:
    async with Bus(jitter=0.0) as bus:
        sub = bus.subscribe("a", persistent=True, ack_timeout=5.0)
        s1, s2 = Signal(type="a"), Signal(type="a")
        await bus.publish_many([s1, s2])
        got = await sub.get()
        assert got == s1 and sub.in_flight == 1
        assert sub.ack(s1.id) is True
        assert sub.ack(s1.id) is False
        assert sub.ack("never-delivered") is False
        assert await sub.get() == s2
        await advance(5.5)  # ack timeout of s2 passed; retry waits 1 s of backoff
        assert sub.ack(s2.id) is False
        await advance(1)
        assert await sub.get() == s2
        assert sub.ack(s2.id) is True
        await advance(100)
        assert sub.qsize() == 0 and bus.dlq.entries() == []
        stats = sub.stats()
        assert (stats.acked, stats.redelivered, stats.delivered) == (2, 1, 3)


@pytest.mark.virtual_time
async def test_nack_redelivers_after_backoff_with_the_given_error() -> None:
    async with Bus(jitter=0.0) as bus:
        sub = bus.subscribe("a", persistent=True, max_attempts=2, backoff_base=4.0, name="n")
        sig = Signal(type="a")
        await bus.publish(sig)
        await sub.get()
        assert sub.nack(sig.id, ValueError("parse failed")) is True
        assert sub.qsize() == 0
        await advance(3.9)
        assert sub.qsize() == 0
        await advance(0.2)
        assert sub.qsize() == 1
        again = await sub.get()
        assert again == sig
        assert sub.nack(sig.id, "gave up") is True
        [entry] = bus.dlq.entries()
        assert (entry.attempts, entry.error) == (2, "gave up")
        assert entry.time == pytest.approx(4.1)


@pytest.mark.virtual_time
async def test_handler_that_recovers_is_acked_without_dead_letter() -> None:
    calls: list[float] = []

    async def flaky(sig: Signal) -> None:
        calls.append(now())
        if len(calls) < 3:
            raise ConnectionError("try later")

    async with Bus(jitter=0.0) as bus:
        sub = bus.subscribe("a", flaky, persistent=True, backoff_base=0.5)
        await bus.publish(Signal(type="a"))
        await advance(10)
        assert calls == pytest.approx([0.0, 0.5, 1.5])
        assert sub.acked == 1 and bus.dlq.entries() == []


@pytest.mark.virtual_time
async def test_slow_handler_exceeding_ack_timeout_is_redelivered() -> None:
    starts: list[float] = []

    async def slow(sig: Signal) -> None:
        starts.append(now())
        if len(starts) == 1:
            await advance(10)  # longer than the 3 s ack timeout

    async with Bus(jitter=0.0) as bus:
        sub = bus.subscribe("a", slow, persistent=True, ack_timeout=3.0, backoff_base=1.0)
        await bus.publish(Signal(type="a"))
        await advance(30)
        # timed out at 3, requeued at 4, picked up when the first run returned at 10
        assert starts == pytest.approx([0.0, 10.0])
        assert sub.acked == 1 and sub.redelivered == 1


@pytest.mark.virtual_time
async def test_persistent_subscription_skips_duplicate_outstanding_ids() -> None:
    async with Bus() as bus:
        sub = bus.subscribe("a", persistent=True)
        sig = Signal(type="a")
        await bus.publish(sig)
        await bus.publish(sig)
        assert sub.qsize() == 1 and sub.duplicates == 1
        await sub.get()
        sub.ack(sig.id)
        await bus.publish(sig)  # settled, so a new delivery is fine
        assert sub.qsize() == 1


async def test_persistent_redelivery_with_a_sim_clock() -> None:
    clock = SimClock()
    async with Bus(clock=clock, jitter=0.0) as bus:
        sub = bus.subscribe("a", persistent=True, ack_timeout=5.0, backoff_base=1.0)
        sig = Signal(type="a")
        await bus.publish(sig)
        assert await sub.get() == sig
        clock.advance(4.9)
        assert sub.in_flight == 1
        clock.advance(0.1)
        assert sub.in_flight == 0 and sub.qsize() == 0
        clock.advance(1.0)
        assert sub.qsize() == 1
        assert await sub.get() == sig
        assert sub.redelivered == 1


# ------------------------------------------------------------------------------- the DLQ
async def _dead_letter_one(bus: Bus, fail: list[bool], name: str) -> Subscription:
    def handler(sig: Signal) -> None:
        if fail[0]:
            raise RuntimeError("still broken")

    return bus.subscribe("job.**", handler, persistent=True, max_attempts=2, name=name)


@pytest.mark.virtual_time
async def test_dlq_redrive_resets_attempts() -> None:
    fail = [True]
    async with Bus(jitter=0.0) as bus:
        sub = await _dead_letter_one(bus, fail, "worker")
        sig = Signal(type="job.a")
        await bus.publish(sig)
        await advance(10)
        assert len(bus.dlq) == 1
        # Still failing: a redrive gets max_attempts fresh deliveries, then lands back here.
        assert await bus.dlq.redrive() == 1
        assert len(bus.dlq) == 0
        await advance(10)
        [entry] = bus.dlq.entries()
        assert entry.attempts == 2 and entry.signal == sig
        fail[0] = False
        assert await bus.dlq.redrive([entry.id]) == 1
        await advance(10)
        assert len(bus.dlq) == 0
        assert sub.acked == 1
        assert bus.stats().dead_lettered == 2


@pytest.mark.virtual_time
async def test_dlq_redrive_selected_ids_unknown_ids_and_clear() -> None:
    async with Bus(jitter=0.0) as bus:
        await _dead_letter_one(bus, [True], "w")
        sigs = [Signal(type="job.a", data=i) for i in range(3)]
        await bus.publish_many(sigs)
        await advance(10)
        # Retries due at the same instant may run in any order: look entries up by data.
        entries = sorted(bus.dlq.entries(), key=lambda e: e.signal.data)
        assert [e.signal.data for e in entries] == [0, 1, 2]
        with pytest.raises(BusError, match=r"no dead-letter entries with ids \[999\]"):
            await bus.dlq.redrive([entries[0].id, 999])
        assert len(bus.dlq) == 3  # nothing moved on error
        assert await bus.dlq.redrive([entries[1].id]) == 1
        assert sorted(e.signal.data for e in bus.dlq.entries()) == [0, 2]
        assert bus.dlq.clear() == 2
        assert bus.dlq.entries() == []


@pytest.mark.virtual_time
async def test_dlq_is_bounded_and_keeps_entries_of_closed_subscriptions() -> None:
    async with Bus(jitter=0.0, dlq_max_size=2) as bus:
        sub = await _dead_letter_one(bus, [True], "w")
        for i in range(3):  # one at a time, so they are dead-lettered in this order
            await bus.publish(Signal(type="job.a", data=i))
            await advance(10)
        assert [e.signal.data for e in bus.dlq.entries()] == [1, 2]
        assert bus.dlq.evicted == 1
        assert bus.stats().dlq_evicted == 1
        bus.unsubscribe(sub)
        assert await bus.dlq.redrive() == 0
        assert len(bus.dlq) == 2


# ---------------------------------------------------------------------------- middleware
class Recorder(Middleware):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def after_publish(self, signal: Signal) -> None:
        self.events.append(("published", signal.type))

    def after_dispatch(
        self, signal: Signal, subscription: Subscription, error: BaseException | None
    ) -> None:
        self.events.append(("dispatched", subscription.name, signal.type, type(error).__name__))


@pytest.mark.virtual_time
async def test_middleware_can_drop_and_rewrite_signals() -> None:
    class DropDebug:
        def before_publish(self, signal: Signal) -> Signal | None:
            return None if signal.type.startswith("debug.") else signal

    class Tag(Middleware):
        def before_publish(self, signal: Signal) -> Signal | None:
            return Signal(type=signal.type, data={"tagged": signal.data}, id=signal.id)

    class HideFromAudit(Middleware):
        def before_dispatch(self, signal: Signal, subscription: Subscription) -> Signal | None:
            return None if subscription.name == "audit" else signal

    rec = Recorder()
    got: list[Signal] = []
    async with Bus() as bus:
        for mw in (DropDebug(), Tag(), HideFromAudit(), rec):
            assert bus.use(mw) is mw
        main = bus.subscribe("**", got.append, name="main")
        audit = bus.subscribe("**", name="audit")
        await bus.publish(Signal(type="debug.noise"))
        await bus.publish(Signal(type="app.work", data=1))
        await until(lambda: len(got) == 1)
        assert got[0].data == {"tagged": 1}
        assert audit.qsize() == 1
        pulled = asyncio.create_task(audit.get())
        await advance(1)
        assert not pulled.done()  # the only queued signal was dropped for "audit"
        pulled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pulled
        assert [s.type for s in bus.replay()] == ["app.work"]
        stats = bus.stats()
        assert stats.filtered == 1 and stats.published == 1
        assert rec.events == [
            ("published", "app.work"),
            ("dispatched", "main", "app.work", "NoneType"),
        ]
        assert main.delivered == 1 and audit.delivered == 0


@pytest.mark.virtual_time
async def test_after_dispatch_sees_handler_errors() -> None:
    rec = Recorder()

    def bad(sig: Signal) -> None:
        raise KeyError("k")

    async with Bus() as bus:
        bus.use(rec)
        bus.subscribe("a", bad, name="bad")
        await bus.publish(Signal(type="a"))
        await until(lambda: len(rec.events) == 2)
    assert rec.events[1] == ("dispatched", "bad", "a", "KeyError")


@pytest.mark.virtual_time
async def test_raising_or_misbehaving_middleware_is_counted_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Middleware):
        def before_publish(self, signal: Signal) -> Signal | None:
            raise RuntimeError("mw bug")

        def after_publish(self, signal: Signal) -> None:
            raise RuntimeError("mw bug")

        def before_dispatch(self, signal: Signal, subscription: Subscription) -> Signal | None:
            return "not a signal"  # type: ignore[return-value]

        def after_dispatch(
            self, signal: Signal, subscription: Subscription, error: BaseException | None
        ) -> None:
            raise RuntimeError("mw bug")

    class BadType(Middleware):
        def before_publish(self, signal: Signal) -> Signal | None:
            return Signal(type="bad..type")

    caplog.set_level(logging.ERROR, logger=BUS_LOGGER)
    got: list[Signal] = []
    async with Bus() as bus:
        bus.use(Broken())
        bus.use(BadType())
        bus.subscribe("a", got.append)
        sig = Signal(type="a")
        await bus.publish(sig)
        await until(lambda: len(got) == 1)
        await advance(0.1)  # let after_dispatch run
        assert got == [sig]
        assert bus.stats().middleware_errors == 5
    assert sum("middleware" in r.getMessage() for r in caplog.records) == 5


def test_use_rejects_objects_without_hooks() -> None:
    bus = Bus()
    with pytest.raises(TypeError, match="none of the middleware hooks"):
        bus.use(object())

    class NotCallable:
        before_publish = 3

    with pytest.raises(TypeError, match="before_publish is not callable"):
        bus.use(NotCallable())


# ------------------------------------------------------------------------------- journal
@pytest.mark.virtual_time
async def test_replay_by_id_pattern_and_time() -> None:
    async with Bus() as bus:
        sigs = []
        for i, type_ in enumerate(["a.x", "b.x", "a.y", "a.x"]):
            sig = Signal(type=type_, data=i)
            sigs.append(sig)
            await bus.publish(sig)
            await advance(10)  # published at t = 0, 10, 20, 30
        assert bus.replay() == sigs
        assert bus.replay(since_id=sigs[1].id) == sigs[2:]
        assert bus.replay(since_id=sigs[3].id) == []
        assert bus.replay(pattern="a.*") == [sigs[0], sigs[2], sigs[3]]
        assert bus.replay(since_id=sigs[0].id, pattern="*.x") == [sigs[1], sigs[3]]
        assert bus.replay(since_time=10.0) == sigs[1:]  # inclusive, on the clock's scale
        assert bus.replay(since_time=10.5) == sigs[2:]
        wall_at_15 = datetime.fromtimestamp(bus.clock.wall() - 25, tz=UTC)  # now is 40
        assert bus.replay(since_time=wall_at_15) == sigs[2:]
        assert bus.replay(since_time=5.0, since_id=sigs[2].id) == [sigs[3]]
        with pytest.raises(SignalNotFound, match="'nope' is not in the journal"):
            bus.replay(since_id="nope")
        with pytest.raises(ValueError, match="naive"):
            bus.replay(since_time=datetime(2024, 1, 1))
        with pytest.raises(TypeError, match="since_time"):
            bus.replay(since_time="yesterday")  # type: ignore[arg-type]
        with pytest.raises(RouteError, match=r"'a\.\.'"):
            bus.replay(pattern="a..")


@pytest.mark.virtual_time
async def test_journal_is_bounded_by_size_and_age() -> None:
    async with Bus(journal_max_size=3, journal_max_age=60.0) as bus:
        sigs = [Signal(type="a", data=i) for i in range(5)]
        await bus.publish_many(sigs)
        assert bus.replay() == sigs[2:]
        with pytest.raises(SignalNotFound, match="evicted"):
            bus.replay(since_id=sigs[0].id)
        await advance(50)
        late = Signal(type="a", data="late")
        await bus.publish(late)
        assert bus.replay() == [*sigs[3:], late]  # publishing trimmed nothing by age yet
        await advance(20)  # now 70: the first three are older than 60 s
        assert bus.replay() == [late]
        assert bus.stats().journal_size == 1


@pytest.mark.virtual_time
async def test_replay_to_redelivers_into_one_subscription() -> None:
    async with Bus() as bus:
        sigs = [Signal(type=t, data=i) for i, t in enumerate(["a.1", "b.1", "a.2", "a.3"])]
        await bus.publish_many(sigs)
        late = bus.subscribe("a.*", predicate=lambda s: s.data != 2, name="late")
        other = bus.subscribe("**", name="other")
        assert await bus.replay_to(late) == 2  # own pattern and predicate
        assert [s.data for s in drain(late)] == [0, 3]
        assert await bus.replay_to(late, since_id=sigs[0].id, pattern="**") == 3
        assert [s.data for s in drain(late)] == [1, 2, 3]
        assert other.qsize() == 0
        bus.unsubscribe(late)
        with pytest.raises(BusError, match="'late' is closed"):
            await bus.replay_to(late)


@pytest.mark.virtual_time
async def test_replay_to_respects_error_overflow() -> None:
    async with Bus() as bus:
        await bus.publish_many([Signal(type="a") for _ in range(3)])
        sub = bus.subscribe("a", queue_size=2, overflow="error", name="small")
        with pytest.raises(QueueFull, match="'small' stopped after 2"):
            await bus.replay_to(sub)


# ----------------------------------------------------------------------------- causation
@pytest.mark.virtual_time
async def test_trace_chain_follows_causation_across_three_levels() -> None:
    async with Bus() as bus:
        root = Signal(type="cluster.member.suspect")
        a = root.caused("cluster.member.probe")
        b = root.caused("cluster.health.alert")
        c = a.caused("cluster.member.dead")
        d = b.caused("cluster.health.page")
        unrelated = Signal(type="cluster.member.suspect")
        # Publish out of causal order: the chain is BFS first, publish order second.
        for sig in (root, unrelated, b, a, d, c):
            await bus.publish(sig)
        assert bus.trace_chain(root.id) == [root, b, a, d, c]
        assert bus.trace_chain(a.id) == [a, c]
        assert bus.trace_chain(c.id) == [c]
        assert bus.trace_chain(unrelated.id) == [unrelated]
        assert c.trace_id == root.id
        with pytest.raises(SignalNotFound, match="'missing'"):
            bus.trace_chain("missing")


# -------------------------------------------------------------------- stats, unsubscribe
@pytest.mark.virtual_time
async def test_stats_report_queue_depth_per_subscription() -> None:
    async with Bus() as bus:
        bus.subscribe("a.*", name="one")
        bus.subscribe("**", name="two", persistent=True)
        await bus.publish_many([Signal(type="a.b"), Signal(type="c")])
        stats = bus.stats()
        assert stats.subscriptions["one"].queue_depth == 1
        assert stats.subscriptions["two"].queue_depth == 2
        assert stats.subscriptions["two"].persistent
        assert (stats.published, stats.delivered, stats.journal_size) == (2, 0, 2)
        await bus.subscriptions()[1].get()
        assert bus.stats().subscriptions["two"].in_flight == 1


@pytest.mark.virtual_time
async def test_unsubscribe_stops_delivery_and_wakes_consumers() -> None:
    async with Bus() as bus:
        got: list[Signal] = []
        handled = bus.subscribe("a", got.append, name="h")
        pulled = bus.subscribe("a", name="p")
        iterated: list[Signal] = []

        async def iterate() -> None:
            async for sig in pulled:
                iterated.append(sig)

        consumer = asyncio.create_task(iterate())
        first = Signal(type="a")
        await bus.publish(first)
        await until(lambda: len(got) == 1 and len(iterated) == 1)
        bus.unsubscribe(handled)
        bus.unsubscribe(pulled)
        bus.unsubscribe(pulled)  # idempotent
        await asyncio.wait_for(consumer, 1)  # async for ended
        with pytest.raises(SubscriptionClosed, match="'p' is closed"):
            await pulled.get()
        assert await bus.publish(Signal(type="a")) == 0
        await advance(1)
        assert got == [first]
        assert handled._task is not None and handled._task.done()
        assert bus.stats().subscriptions == {}
        bus.subscribe("a", name="h")  # the name is free again
        with pytest.raises(BusError, match="another bus"):
            Bus().unsubscribe(handled)


@pytest.mark.virtual_time
async def test_exiting_the_bus_cancels_tasks_and_closes_subscriptions() -> None:
    started = asyncio.Event()

    async def stuck(sig: Signal) -> None:
        started.set()
        await advance(10_000)

    async with Bus() as bus:
        sub = bus.subscribe("a", stuck)
        waiting = bus.subscribe("b")
        getter = asyncio.create_task(waiting.get())
        await bus.publish(Signal(type="a"))
        await started.wait()
    assert sub.closed and waiting.closed
    assert sub._task is not None and sub._task.cancelled()
    with pytest.raises(SubscriptionClosed):
        await getter
    assert not bus.running


@pytest.mark.virtual_time
async def test_timers_of_persistent_subscriptions_do_not_fire_after_unsubscribe() -> None:
    async with Bus(jitter=0.0) as bus:
        sub = bus.subscribe("a", persistent=True, ack_timeout=1.0)
        await bus.publish(Signal(type="a"))
        await sub.get()
        bus.unsubscribe(sub)
        await advance(100)
        assert bus.dlq.entries() == [] and sub.qsize() == 0


async def test_bench_bus_delivers_everything() -> None:
    rate = await bench_bus(n_signals=2_000, n_subscribers=3)
    assert rate > 0
    with pytest.raises(ValueError, match="n_signals"):
        await bench_bus(n_signals=0)
