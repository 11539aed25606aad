"""Tests for agentcluster.agents.supervisor (OTP-style supervision), mostly in virtual time."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest

from agentcluster.agents.supervisor import (
    Child,
    ChildSpec,
    ChildStartError,
    RestartType,
    Strategy,
    Supervisor,
    SupervisorError,
    SupervisorEscalation,
    SupervisorEvent,
    TaskChild,
    child_spec_for,
    supervisor_spec,
)
from agentcluster.clock import SimClock
from agentcluster.testing import advance


class Boom(Exception):
    pass


async def until(cond: Callable[[], bool], what: str, turns: int = 2000) -> None:
    """Poll ``cond`` between event-loop turns (no timer, so no virtual time passes)."""
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting for: {what}")


class Workers:
    """Test children whose every instance waits for the test to end it (normally or not)."""

    def __init__(self) -> None:
        self.exits: dict[str, asyncio.Future[BaseException | None]] = {}
        self.runs: list[str] = []

    def spec(
        self, id: str, restart: RestartType = "permanent", shutdown_timeout: float = 5.0
    ) -> ChildSpec:
        async def run() -> None:
            fut: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
            self.exits[id] = fut
            self.runs.append(id)
            try:
                outcome = await fut
            finally:
                # A stopped instance must not look "ready" to the next ready() call.
                if self.exits.get(id) is fut:
                    del self.exits[id]
            if outcome is not None:
                raise outcome

        return child_spec_for(run, id=id, restart=restart, shutdown_timeout=shutdown_timeout)

    async def ready(self, *ids: str) -> None:
        await until(
            lambda: all(i in self.exits and not self.exits[i].done() for i in ids),
            f"children {ids} running",
        )

    async def end(self, id: str, reason: BaseException | None = None) -> None:
        await self.ready(id)
        self.exits.pop(id).set_result(reason)


class Log:
    def __init__(self) -> None:
        self.events: list[SupervisorEvent] = []

    def __call__(self, event: SupervisorEvent) -> None:
        self.events.append(event)

    def pairs(self, since: int = 0, kinds: tuple[str, ...] = ()) -> list[tuple[str, str | None]]:
        return [(e.kind, e.child_id) for e in self.events[since:] if not kinds or e.kind in kinds]

    def mark(self) -> int:
        return len(self.events)


def child_of(sup: Supervisor, id: str) -> Child | None:
    return next(info.child for info in sup.which_children() if info.id == id)


def no_other_tasks() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


# --------------------------------------------------------------------------- strategies

STRATEGY_CASES: dict[str, list[tuple[str, str | None]]] = {
    "one_for_one": [("child_exited", "b"), ("child_restarted", "b")],
    "one_for_all": [
        ("child_exited", "b"),
        ("child_terminated", "c"),
        ("child_terminated", "a"),
        ("child_restarted", "a"),
        ("child_restarted", "b"),
        ("child_restarted", "c"),
    ],
    "rest_for_one": [
        ("child_exited", "b"),
        ("child_terminated", "c"),
        ("child_restarted", "b"),
        ("child_restarted", "c"),
    ],
}


@pytest.mark.virtual_time
@pytest.mark.parametrize("strategy", list(STRATEGY_CASES))
async def test_strategy_restarts_exactly_the_right_children(strategy: Strategy) -> None:
    w, log = Workers(), Log()
    sup = Supervisor(
        [w.spec("a"), w.spec("b"), w.spec("c")], strategy=strategy, on_event=log, name="top"
    )
    await sup.start()
    assert log.pairs() == [("child_started", i) for i in "abc"]
    await w.ready("a", "b", "c")
    before = {i: child_of(sup, i) for i in "abc"}
    mark = log.mark()

    await w.end("b", Boom("b crashed"))
    expected = STRATEGY_CASES[strategy]
    await until(lambda: len(log.pairs(mark)) >= len(expected), "restart done")
    assert log.pairs(mark) == expected
    restarted = {cid for kind, cid in expected if kind == "child_restarted"}
    for i in "abc":
        assert (child_of(sup, i) is before[i]) == (i not in restarted), i
    assert {info.id: info.restarts for info in sup.which_children()} == {
        i: int(i in restarted) for i in "abc"
    }
    assert all(info.running for info in sup.which_children())
    # Supervisor-stopped siblings are not crashes: exactly one restart was counted.
    assert sup.count_restarts() == 1
    exited = next(e for e in log.events[mark:] if e.kind == "child_exited")
    assert isinstance(exited.reason, Boom)

    mark = log.mark()
    await sup.stop()
    assert log.pairs(mark) == [
        ("child_terminated", "c"),
        ("child_terminated", "b"),
        ("child_terminated", "a"),
        ("stopped", None),
    ]
    assert await sup.wait() is None
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_one_for_all_drops_temporary_and_starts_stopped_siblings_like_otp() -> None:
    w, log = Workers(), Log()
    sup = Supervisor(
        [w.spec("a", "transient"), w.spec("t", "temporary"), w.spec("c")],
        strategy="one_for_all",
        on_event=log,
    )
    await sup.start()
    await w.end("a")  # transient, normal exit: not restarted, spec kept
    await until(lambda: not sup.which_children()[0].running, "a exited")
    assert sup.count_restarts() == 0
    mark = log.mark()
    await w.end("c", Boom())
    await until(lambda: ("child_restarted", "c") in log.pairs(mark), "group restart")
    assert log.pairs(mark) == [
        ("child_exited", "c"),
        ("child_terminated", "t"),
        ("child_restarted", "a"),  # OTP's start_children starts every member of the group
        ("child_restarted", "c"),
    ]
    assert [i.id for i in sup.which_children()] == ["a", "c"]
    await sup.stop()


@pytest.mark.virtual_time
async def test_simultaneous_crashes_cause_one_group_restart() -> None:
    w, log = Workers(), Log()
    sup = Supervisor([w.spec("a"), w.spec("b"), w.spec("c")], strategy="one_for_all", on_event=log)
    await sup.start()
    await w.ready("a", "b", "c")
    mark = log.mark()
    # Both exits are queued before the supervisor reacts to the first: c's exit then refers
    # to an instance the group restart already replaced and must be ignored.
    w.exits.pop("b").set_result(Boom("b"))
    w.exits.pop("c").set_result(Boom("c"))
    await until(lambda: ("child_restarted", "c") in log.pairs(mark), "group restart")
    for _ in range(50):
        await asyncio.sleep(0)
    assert log.pairs(mark) == [
        ("child_exited", "b"),
        ("child_terminated", "c"),
        ("child_terminated", "a"),
        ("child_restarted", "a"),
        ("child_restarted", "b"),
        ("child_restarted", "c"),
    ]
    assert sup.count_restarts() == 1
    await sup.stop()


# --------------------------------------------------------------------------- restart types

RESTART_CASES = [
    # restart type, crashed?, restarted?, spec kept?
    ("permanent", False, True, True),
    ("permanent", True, True, True),
    ("transient", False, False, True),
    ("transient", True, True, True),
    ("temporary", False, False, False),
    ("temporary", True, False, False),
]


@pytest.mark.virtual_time
@pytest.mark.parametrize(("restart", "crash", "restarted", "kept"), RESTART_CASES)
async def test_restart_types(
    restart: RestartType, crash: bool, restarted: bool, kept: bool
) -> None:
    w, log = Workers(), Log()
    sup = Supervisor([w.spec("x", restart), w.spec("other")], on_event=log)
    await sup.start()
    mark = log.mark()
    await w.end("x", Boom() if crash else None)
    await until(lambda: ("child_exited", "x") in log.pairs(mark), "exit seen")
    await until(lambda: not restarted or ("child_restarted", "x") in log.pairs(mark), "restart")
    # Let any (wrong) restart happen before asserting that none did.
    for _ in range(50):
        await asyncio.sleep(0)
    assert (("child_restarted", "x") in log.pairs(mark)) == restarted
    assert sup.count_restarts() == int(restarted)
    ids = [i.id for i in sup.which_children()]
    assert ("x" in ids) == kept
    if kept:
        assert sup.which_children()[0].running == restarted
    assert w.runs.count("x") == 1 + int(restarted)
    await sup.stop()
    assert no_other_tasks()


# --------------------------------------------------------------------------- intensity


@pytest.mark.virtual_time
async def test_three_crashes_within_five_seconds_escalate() -> None:
    w, log = Workers(), Log()
    loop = asyncio.get_running_loop()
    sup = Supervisor(
        [w.spec("a"), w.spec("b"), w.spec("c")],
        max_restarts=2,
        max_seconds=5.0,
        name="sup",
        on_event=log,
    )
    await sup.start()
    t0 = loop.time()
    for _ in range(2):
        await w.end("b", Boom())
        await w.ready("b")
        await advance(2.0)
    assert sup.running and sup.count_restarts() == 2
    mark = log.mark()
    await w.end("b", Boom("third"))  # at t0 + 4: 3 restarts within 5 s > max_restarts=2
    reason = await sup.wait()
    assert loop.time() - t0 == pytest.approx(4.0)
    assert isinstance(reason, SupervisorEscalation)
    assert (reason.supervisor, reason.child_id, reason.restarts) == ("sup", "b", 3)
    assert isinstance(reason.reason, Boom) and "third" in str(reason)
    assert "'sup'" in str(reason) and "'b'" in str(reason)
    assert log.pairs(mark) == [
        ("child_exited", "b"),
        ("escalated", "b"),
        ("child_terminated", "c"),
        ("child_terminated", "a"),
        ("stopped", None),
    ]
    assert log.events[-1].reason is reason
    assert sup.count_restarts() == 2
    assert not any(i.running for i in sup.which_children())
    await sup.stop()  # a no-op after exit
    with pytest.raises(SupervisorError, match="not running"):
        await sup.start_child(w.spec("d"))
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_three_crashes_spread_over_twenty_seconds_do_not_escalate() -> None:
    w = Workers()
    sup = Supervisor([w.spec("a")], max_restarts=2, max_seconds=5.0)
    await sup.start()
    for _ in range(3):
        await w.end("a", Boom())
        await w.ready("a")
        await advance(10.0)
    assert sup.running and sup.count_restarts() == 3
    await sup.stop()
    assert await sup.wait() is None


@pytest.mark.virtual_time
async def test_intensity_window_slides_and_is_inclusive() -> None:
    w = Workers()
    sup = Supervisor([w.spec("a")], max_restarts=2, max_seconds=5.0)
    await sup.start()
    # Restarts at t=0, 4, 6: the window ending at 6 holds only 4 and 6 -> fine.
    for delay in (4.0, 2.0):
        await w.end("a", Boom())
        await w.ready("a")
        await asyncio.sleep(delay)
    await w.end("a", Boom())
    await w.ready("a")
    assert sup.running and sup.count_restarts() == 3
    # t=9: the window [4, 9] includes the restart exactly 5 s ago -> 3 restarts -> give up.
    await advance(3.0)
    await w.end("a", Boom())
    assert isinstance(await sup.wait(), SupervisorEscalation)


@pytest.mark.virtual_time
async def test_default_intensity_allows_three_restarts_and_escalates_on_the_fourth() -> None:
    w = Workers()
    sup = Supervisor([w.spec("a")])  # max_restarts=3, max_seconds=5, as OTP's defaults
    await sup.start()
    for _ in range(3):
        await w.end("a", Boom())
        await w.ready("a")
    assert sup.running and sup.count_restarts() == 3
    await w.end("a", Boom())
    assert isinstance(await sup.wait(), SupervisorEscalation)


@pytest.mark.virtual_time
async def test_max_restarts_zero_escalates_on_first_exit_needing_a_restart() -> None:
    w = Workers()
    sup = Supervisor([w.spec("t", "transient"), w.spec("p")], max_restarts=0)
    await sup.start()
    await w.end("t")  # normal exit of a transient needs no restart
    await until(lambda: not sup.which_children()[0].running, "t exited")
    assert sup.running
    await w.end("p")  # a permanent child is restarted even after a normal exit
    reason = await sup.wait()
    assert isinstance(reason, SupervisorEscalation) and reason.child_id == "p"
    assert reason.reason is None


async def test_intensity_is_measured_with_the_injected_clock() -> None:
    clock = SimClock()
    w = Workers()
    sup = Supervisor([w.spec("a")], max_restarts=1, max_seconds=5.0, clock=clock)
    await sup.start()
    for _ in range(4):
        await w.end("a", Boom())
        await w.ready("a")
        clock.advance(6.0)  # the loop's clock does not move; only the injected one does
    assert sup.running and sup.count_restarts() == 4
    await w.end("a", Boom())
    await w.ready("a")
    await w.end("a", Boom())  # second restart at the same SimClock instant
    assert isinstance(await sup.wait(), SupervisorEscalation)


# --------------------------------------------------------------------------- failed restarts


class FlakyStart:
    """A spec whose start fails ``failures`` times after the first successful start."""

    def __init__(self, w: Workers, id: str, failures: int) -> None:
        self.inner = w.spec(id)
        self.failures = failures
        self.calls = 0

    async def start(self) -> Child:
        self.calls += 1
        if self.calls > 1 and self.failures > 0:
            self.failures -= 1
            raise Boom(f"start #{self.calls} failed")
        return await self.inner.start()

    def spec(self) -> ChildSpec:
        return ChildSpec(self.inner.id, self.start)


@pytest.mark.virtual_time
async def test_failed_restart_consumes_intensity_then_retries() -> None:
    w, log = Workers(), Log()
    flaky = FlakyStart(w, "a", failures=1)
    sup = Supervisor([flaky.spec()], max_restarts=2, on_event=log)
    await sup.start()
    await w.end("a", Boom())
    await w.ready("a")
    assert flaky.calls == 3
    assert sup.count_restarts() == 2  # the failed attempt counted
    assert [k for k, _ in log.pairs()] == [
        "child_started",
        "child_exited",
        "child_start_failed",
        "child_restarted",
    ]
    assert sup.which_children()[0].restarts == 1
    await sup.stop()


@pytest.mark.virtual_time
async def test_restart_that_keeps_failing_escalates() -> None:
    w, log = Workers(), Log()
    flaky = FlakyStart(w, "a", failures=100)
    sup = Supervisor([flaky.spec(), w.spec("b")], max_restarts=3, on_event=log)
    await sup.start()
    await w.end("a", Boom())
    reason = await sup.wait()
    assert isinstance(reason, SupervisorEscalation)
    assert flaky.calls == 1 + 3  # first start, then three failed restarts, the fourth refused
    assert isinstance(reason.reason, Boom) and "start #4" in str(reason.reason)
    assert log.pairs(kinds=("child_start_failed",)) == [("child_start_failed", "a")] * 3
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_rest_for_one_failed_restart_retries_from_the_failed_child() -> None:
    w, log = Workers(), Log()
    flaky = FlakyStart(w, "b", failures=1)
    sup = Supervisor(
        [w.spec("a"), flaky.spec(), w.spec("c")], strategy="rest_for_one", on_event=log
    )
    await sup.start()
    await w.ready("a", "b", "c")
    mark = log.mark()
    await w.end("b", Boom())
    await until(lambda: ("child_restarted", "c") in log.pairs(mark), "c restarted")
    assert log.pairs(mark) == [
        ("child_exited", "b"),
        ("child_terminated", "c"),
        ("child_start_failed", "b"),
        ("child_restarted", "b"),
        ("child_restarted", "c"),
    ]
    assert sup.count_restarts() == 2
    await sup.stop()


# --------------------------------------------------------------------------- nesting


@pytest.mark.virtual_time
async def test_nested_supervisor_escalates_to_parent_which_restarts_it() -> None:
    w, top_log, subs = Workers(), Log(), []

    def make_sub() -> Supervisor:
        sub = Supervisor([w.spec("w1"), w.spec("w2")], max_restarts=1, name="sub")
        subs.append(sub)
        return sub

    top = Supervisor(
        [w.spec("sibling"), supervisor_spec("sub", make_sub)], name="top", on_event=top_log
    )
    await top.start()
    await w.ready("sibling", "w1", "w2")
    sibling = child_of(top, "sibling")
    mark = top_log.mark()

    await w.end("w1", Boom())  # sub restarts w1 itself
    await w.ready("w1")
    assert subs[0].count_restarts() == 1 and top.count_restarts() == 0
    await w.end("w1", Boom())  # second restart within 5 s > 1: sub gives up
    await until(lambda: len(subs) == 2 and subs[1].running, "sub restarted by top")

    first = await subs[0].wait()
    assert isinstance(first, SupervisorEscalation) and first.supervisor == "sub"
    exited = next(e for e in top_log.events[mark:] if e.kind == "child_exited")
    assert exited.child_id == "sub" and exited.reason is first
    assert top_log.pairs(mark) == [("child_exited", "sub"), ("child_restarted", "sub")]
    assert top.count_restarts() == 1
    assert child_of(top, "sibling") is sibling  # one_for_one at the top
    await w.ready("w1", "w2")
    assert w.runs.count("w2") == 2  # the fresh sub started fresh children

    await top.stop()
    assert not subs[1].running and await subs[1].wait() is None
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_escalation_climbs_through_two_levels() -> None:
    w = Workers()

    def make_sub() -> Supervisor:
        return Supervisor([w.spec("leaf")], max_restarts=0, name="sub")

    top = Supervisor([supervisor_spec("sub", make_sub)], max_restarts=0, name="top")
    await top.start()
    await w.end("leaf", Boom())
    reason = await top.wait()
    assert isinstance(reason, SupervisorEscalation)
    assert reason.supervisor == "top" and reason.child_id == "sub"
    assert isinstance(reason.reason, SupervisorEscalation) and reason.reason.supervisor == "sub"
    assert reason.__cause__ is reason.reason
    assert no_other_tasks()


# --------------------------------------------------------------------------- shutdown


def stubborn(log: list[str], id: str, shutdown_timeout: float) -> ChildSpec:
    """A graceful child that ignores the stop request until it is force-cancelled."""

    async def run(stopping: asyncio.Event) -> None:
        try:
            await stopping.wait()
            log.append(f"{id}:asked")
            await advance(3600)
        except asyncio.CancelledError:
            log.append(f"{id}:forced")
            raise

    async def start() -> Child:
        return TaskChild.spawn_graceful(run, name=id)

    return ChildSpec(id, start, shutdown_timeout=shutdown_timeout)


def slow_cleanup(log: list[str], id: str, cleanup: float, shutdown_timeout: float) -> ChildSpec:
    """A cancel-stopped child whose cleanup takes ``cleanup`` seconds."""

    async def run() -> None:
        try:
            await advance(3600)
        finally:
            log.append(f"{id}:cleanup")
            await asyncio.sleep(cleanup)
            log.append(f"{id}:cleaned")

    return child_spec_for(run, id=id, shutdown_timeout=shutdown_timeout)


@pytest.mark.virtual_time
async def test_ordered_shutdown_reverse_order_with_forced_cancel_after_timeout() -> None:
    w, log = Workers(), Log()
    trace: list[str] = []
    sup = Supervisor(
        [
            w.spec("a"),
            stubborn(trace, "b", shutdown_timeout=2.0),
            slow_cleanup(trace, "c", cleanup=0.5, shutdown_timeout=3.0),
            slow_cleanup(trace, "d", cleanup=10.0, shutdown_timeout=1.5),
        ],
        on_event=log,
    )
    await sup.start()
    await w.ready("a")
    b = child_of(sup, "b")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    mark = log.mark()
    async with asyncio.timeout(60):
        await sup.stop()
    # d: 1.5 s then forced; c: cleans up in 0.5 s; b: 2 s then forced; a: at once.
    assert loop.time() - t0 == pytest.approx(1.5 + 0.5 + 2.0)
    assert trace == ["d:cleanup", "c:cleanup", "c:cleaned", "b:asked", "b:forced"]
    assert log.pairs(mark) == [
        ("child_terminated", "d"),
        ("child_terminated", "c"),
        ("child_terminated", "b"),
        ("child_terminated", "a"),
        ("stopped", None),
    ]
    assert isinstance(b, TaskChild) and b.forced and await b.wait() is None
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_stop_timeout_bounds_the_whole_shutdown() -> None:
    trace: list[str] = []
    sup = Supervisor(
        [stubborn(trace, "a", shutdown_timeout=5.0), stubborn(trace, "b", shutdown_timeout=5.0)]
    )
    await sup.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await sup.stop(3.0)  # b gets 3 s (and is forced), a what is left: nothing
    assert loop.time() - t0 == pytest.approx(3.0)
    # a's stop request and its forced cancel land before it runs again: it never sees "asked".
    assert trace == ["b:asked", "b:forced", "a:forced"]
    assert await sup.wait() is None
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_stop_forces_a_supervisor_stuck_in_a_child_start() -> None:
    w = Workers()
    gate = asyncio.Event()

    async def hanging_start() -> Child:
        await gate.wait()
        raise AssertionError("never gets here")

    flaky_calls = 0

    async def start_then_hang() -> Child:
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls == 1:
            return await w.spec("h").start()
        return await hanging_start()

    sup = Supervisor([w.spec("a"), ChildSpec("h", start_then_hang)])
    await sup.start()
    await w.end("h", Boom())  # the restart hangs in start()
    await until(lambda: flaky_calls == 2, "restart in progress")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await sup.stop(2.0)
    assert loop.time() - t0 == pytest.approx(2.0)
    assert await sup.wait() is None
    assert not any(i.running for i in sup.which_children())
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_async_context_manager_starts_and_stops() -> None:
    w = Workers()
    async with Supervisor([w.spec("a"), w.spec("b")]) as sup:
        await w.ready("a", "b")
        assert sup.running and all(i.running for i in sup.which_children())
    assert not sup.running and await sup.wait() is None
    assert no_other_tasks()


# --------------------------------------------------------------------------- dynamic children


@pytest.mark.virtual_time
async def test_dynamic_start_terminate_restart_delete() -> None:
    w, log = Workers(), Log()
    sup = Supervisor([w.spec("a")], strategy="rest_for_one", on_event=log)
    await sup.start()
    await sup.start_child(w.spec("b"))
    await sup.start_child(w.spec("c", "temporary"))
    assert [(i.id, i.running) for i in sup.which_children()] == [
        ("a", True),
        ("b", True),
        ("c", True),
    ]
    with pytest.raises(ValueError, match="already has a child with id 'b'"):
        await sup.start_child(w.spec("b"))

    await sup.terminate_child("b")
    assert [(i.id, i.running) for i in sup.which_children()] == [
        ("a", True),
        ("b", False),
        ("c", True),
    ]
    with pytest.raises(SupervisorError, match="running"):
        await sup.delete_child("a")
    await sup.restart_child("b")
    assert sup.which_children()[1].running
    with pytest.raises(SupervisorError, match="running"):
        await sup.restart_child("b")

    await sup.terminate_child("c")  # temporary: the spec goes too
    assert [i.id for i in sup.which_children()] == ["a", "b"]
    await sup.terminate_child("b")
    await sup.delete_child("b")
    assert [i.id for i in sup.which_children()] == ["a"]
    with pytest.raises(LookupError, match="no child 'zz'"):
        await sup.terminate_child("zz")
    assert sup.count_restarts() == 0  # manual operations are not restarts

    # A dynamically added child is appended, so rest_for_one restarts it after "a".
    await sup.start_child(w.spec("d"))
    await w.ready("a", "d")
    mark = log.mark()
    await w.end("a", Boom())
    await until(lambda: ("child_restarted", "d") in log.pairs(mark), "d restarted")
    assert log.pairs(mark) == [
        ("child_exited", "a"),
        ("child_terminated", "d"),
        ("child_restarted", "a"),
        ("child_restarted", "d"),
    ]
    await sup.stop()
    assert no_other_tasks()


@pytest.mark.virtual_time
async def test_start_child_failure_raises_and_adds_nothing() -> None:
    async def bad_start() -> Child:
        raise Boom("nope")

    sup = Supervisor([])
    await sup.start()
    with pytest.raises(ChildStartError, match="could not start child 'bad'") as info:
        await sup.start_child(ChildSpec("bad", bad_start))
    assert isinstance(info.value.__cause__, Boom)
    assert sup.which_children() == []
    await sup.stop()


@pytest.mark.virtual_time
async def test_start_returning_a_non_child_is_a_start_failure() -> None:
    async def wrong() -> Child:
        return 42  # type: ignore[return-value]

    with pytest.raises(ChildStartError, match="not a Child"):
        await Supervisor([ChildSpec("w", wrong)]).start()


@pytest.mark.virtual_time
async def test_children_can_be_added_and_deleted_before_start() -> None:
    w = Workers()
    sup = Supervisor([w.spec("a")])
    await sup.start_child(w.spec("b"))
    await sup.start_child(w.spec("c"))
    await sup.delete_child("c")
    await sup.start()
    await w.ready("a", "b")
    assert [i.id for i in sup.which_children()] == ["a", "b"]
    await sup.stop()


# --------------------------------------------------------------------------- start failure


@pytest.mark.virtual_time
async def test_start_failure_rolls_back_in_reverse_order() -> None:
    w, log = Workers(), Log()

    async def fail() -> Child:
        raise Boom("c cannot start")

    sup = Supervisor(
        [w.spec("a"), w.spec("b"), ChildSpec("c", fail), w.spec("d")], on_event=log, name="s"
    )
    with pytest.raises(ChildStartError, match="supervisor 's' could not start child 'c'") as info:
        await sup.start()
    assert isinstance(info.value.reason, Boom)
    assert log.pairs() == [
        ("child_started", "a"),
        ("child_started", "b"),
        ("child_start_failed", "c"),
        ("child_terminated", "b"),
        ("child_terminated", "a"),
        ("stopped", None),
    ]
    assert "d" not in w.runs
    assert await sup.wait() is info.value
    assert not any(i.running for i in sup.which_children())
    with pytest.raises(SupervisorError, match="already started"):
        await sup.start()
    assert no_other_tasks()


# --------------------------------------------------------------------------- misc


@pytest.mark.virtual_time
async def test_task_child_reports_crash_normal_exit_and_foreign_cancel() -> None:
    async def crash() -> None:
        raise Boom("x")

    async def normal() -> None:
        return None

    async def forever() -> None:
        await advance(3600)

    crashed, ended, cancelled = (TaskChild.spawn(f) for f in (crash, normal, forever))
    assert isinstance(await crashed.wait(), Boom)
    assert await ended.wait() is None
    cancelled._task.cancel()
    assert isinstance(await cancelled.wait(), asyncio.CancelledError)
    await crashed.stop(1.0)  # already exited: returns at once
    with pytest.raises(ValueError, match="stop timeout"):
        await ended.stop(-1)
    assert isinstance(crashed, Child)


@pytest.mark.virtual_time
async def test_task_child_that_swallows_cancellation_is_abandoned_after_grace() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await advance(3600)
            except asyncio.CancelledError:
                continue

    child = TaskChild.spawn(deaf, force_grace=0.5)
    await asyncio.sleep(0)  # let it reach its try block; a task cancelled earlier never runs
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await child.stop(1.0)
    assert loop.time() - t0 == pytest.approx(1.5)
    assert not child.done() and child.forced
    release.set()
    child._task.cancel()
    assert await child.wait() is None


@pytest.mark.virtual_time
async def test_on_event_errors_do_not_break_the_supervisor() -> None:
    def bad(event: SupervisorEvent) -> None:
        raise RuntimeError("observer bug")

    w = Workers()
    sup = Supervisor([w.spec("a")], on_event=bad)
    await sup.start()
    await w.end("a", Boom())
    await w.ready("a")
    assert sup.count_restarts() == 1
    await sup.stop()


def test_bad_configuration_is_rejected_with_clear_errors() -> None:
    async def start() -> Child:
        raise AssertionError

    spec = ChildSpec("a", start)
    with pytest.raises(ValueError, match="strategy"):
        Supervisor(strategy="one_for_none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_restarts"):
        Supervisor(max_restarts=-1)
    with pytest.raises(ValueError, match="max_seconds"):
        Supervisor(max_seconds=0)
    with pytest.raises(ValueError, match="max_seconds"):
        Supervisor(max_seconds=math.inf)
    with pytest.raises(ValueError, match="already has a child with id 'a'"):
        Supervisor([spec, spec])
    with pytest.raises(TypeError, match="ChildSpec"):
        Supervisor(["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="child id"):
        ChildSpec("", start)
    with pytest.raises(ValueError, match="restart must be one of"):
        ChildSpec("a", start, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shutdown_timeout"):
        ChildSpec("a", start, shutdown_timeout=-1.0)
    with pytest.raises(TypeError, match="start must be callable"):
        ChildSpec("a", "start")  # type: ignore[arg-type]


async def test_wait_and_operations_need_a_running_supervisor() -> None:
    sup = Supervisor([])
    with pytest.raises(SupervisorError, match="never started"):
        await sup.wait()
    with pytest.raises(SupervisorError, match="not running"):
        await sup.terminate_child("a")
    await sup.stop()  # stopping a never-started supervisor just marks it exited
    assert await sup.wait() is None


async def test_real_time_smoke() -> None:
    """The same machinery on a normal loop: restart a crashing child, then shut down."""
    w = Workers()
    async with Supervisor([w.spec("a"), w.spec("b")], strategy="one_for_all") as sup:
        await w.end("a", Boom())
        await until(lambda: sup.count_restarts() == 1 and w.runs.count("b") == 2, "restart")
    assert no_other_tasks()
