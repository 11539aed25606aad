"""Clocks and virtual time."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentcluster.clock import Clock, MonotonicClock, SimClock
from agentcluster.testing import VirtualTimeLoop, advance, run_virtual


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(MonotonicClock(), Clock)
    assert isinstance(SimClock(), Clock)


def test_sim_clock_fires_timers_in_deadline_order() -> None:
    clock = SimClock(start=10.0)
    fired: list[tuple[str, float]] = []
    clock.call_later(5, lambda: fired.append(("b", clock.now())))
    clock.call_later(1, lambda: fired.append(("a", clock.now())))
    clock.call_later(5, lambda: fired.append(("c", clock.now())))  # tie: scheduling order
    cancelled = clock.call_later(2, lambda: fired.append(("x", clock.now())))
    cancelled.cancel()
    assert clock.next_deadline() == 11.0
    assert clock.advance(4) == 1
    assert fired == [("a", 11.0)]
    assert clock.now() == 14.0
    clock.advance(10)
    assert fired == [("a", 11.0), ("b", 15.0), ("c", 15.0)]
    assert clock.next_deadline() is None
    assert cancelled.cancelled()
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


def test_sim_clock_wall_time_moves_with_it() -> None:
    clock = SimClock(start=0.0, wall_start=1000.0)
    clock.advance(2.5)
    assert clock.wall() == 1002.5


async def test_sim_clock_sleep_and_run_for() -> None:
    clock = SimClock()
    woke: list[float] = []

    async def sleeper(d: float) -> None:
        await clock.sleep(d)
        woke.append(clock.now())
        await clock.sleep(d)  # a timer scheduled by a woken task still fires within run_for
        woke.append(clock.now())

    tasks = [asyncio.ensure_future(sleeper(d)) for d in (3.0, 1.0)]
    await clock.run_for(10.0)
    assert woke == [1.0, 2.0, 3.0, 6.0]
    assert clock.now() == 10.0
    await asyncio.gather(*tasks)


def test_virtual_loop_makes_long_waits_instant() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        start = loop.time()
        await advance(3600)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.Event().wait()
        assert MonotonicClock().now() == loop.time()
        return loop.time() - start

    wall = time.perf_counter()
    assert run_virtual(main) == pytest.approx(3630.0)
    assert time.perf_counter() - wall < 5.0


def test_monotonic_clock_without_a_loop() -> None:
    clock = MonotonicClock()
    a = clock.now()
    assert clock.now() >= a
    assert abs(clock.wall() - time.time()) < 5


def _rearm_until(when_of: str) -> list[tuple[int, float, float]]:
    """On uvloop, wait for deadlines a fraction of a millisecond away the way our shells do
    (a timer that fires early is re-armed for the rest); per deadline: callbacks, when, fired."""
    import uvloop

    from agentcluster.clock import call_at, call_later

    async def wait_for(
        loop: asyncio.AbstractEventLoop, deadline: float
    ) -> tuple[int, float, float]:
        done: asyncio.Future[float] = loop.create_future()
        calls = 0

        def fire() -> None:
            nonlocal calls
            calls += 1
            now = loop.time()
            if now < deadline:  # early: wait on for the rest
                if when_of == "at":
                    call_at(loop, deadline, fire)
                else:
                    call_later(loop, deadline - now, fire)
            else:
                done.set_result(now)

        if when_of == "at":
            call_at(loop, deadline, fire)
        else:
            call_later(loop, deadline - loop.time(), fire)
        fired = await done
        return calls, deadline, fired

    async def main() -> list[tuple[int, float, float]]:
        loop = asyncio.get_running_loop()
        out = []
        for rest in (0.0004, 0.0014, 0.0100004, 0.0):
            out.append(await wait_for(loop, loop.time() + rest))
        # The clock's own sleep is not cut short either.
        clock = MonotonicClock()
        t0 = clock.now()
        await clock.sleep(0.0004)
        out.append((1, t0 + 0.0004, clock.now()))
        return out

    return uvloop.run(main())


@pytest.mark.parametrize("when_of", ["at", "later"])
def test_timers_never_fire_early_on_a_millisecond_loop(when_of: str) -> None:
    # uvloop rounds delays to the nearest millisecond and reads its clock in whole ones:
    # re-arming for the sub-millisecond rest of a wait spun the loop 185-499 times.
    for calls, deadline, fired in _rearm_until(when_of):
        assert calls == 1, f"{calls} callbacks to reach one deadline"
        assert fired >= deadline


async def test_timers_on_asyncios_loop_keep_their_exact_deadline() -> None:
    from agentcluster.clock import call_at, call_later

    loop = asyncio.get_running_loop()
    when = loop.time() + 0.0004
    assert call_at(loop, when, lambda: None).when() == when
    assert call_later(loop, 0.0004, lambda: None).when() == pytest.approx(when, abs=1e-4)


@pytest.mark.virtual_time
async def test_a_deadline_keeps_one_timer_for_a_sequence_of_waits() -> None:
    from agentcluster.clock import Deadline

    loop = asyncio.get_running_loop()
    fired: list[float] = []
    d = Deadline(loop, lambda: fired.append(loop.time()))
    t0 = loop.time()
    d.set(t0 + 1.0)
    first = d._handle
    d.set(t0 + 5.0)  # later: the armed timer stays and re-arms itself when it fires early
    assert d._handle is first
    await advance(4.9)
    assert fired == []
    await advance(0.2)
    assert fired == [pytest.approx(t0 + 5.0)]
    d.set(loop.time() + 3.0)
    d.set(loop.time() + 1.0)  # earlier: a timer for the earlier time
    await advance(1.1)
    assert len(fired) == 2 and fired[1] == pytest.approx(t0 + 6.1, abs=0.01)
    d.set(loop.time() + 1.0)
    d.clear()  # the wait ended in time: the timer's firing does nothing
    await advance(2.0)
    assert len(fired) == 2
    d.set(float("inf"))  # no deadline: no timer
    assert d._handle is None
    d.set(loop.time() + 1.0)
    d.close()
    await advance(2.0)
    assert len(fired) == 2 and d._handle is None
