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
