"""Sensors (periodic, heartbeat, event-driven, bus) and skills running inside a server."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import msgspec
import pytest

from agentcluster.agents import (
    Action,
    ActionContext,
    Agent,
    BusSensor,
    EventSensor,
    Every,
    HeartbeatSensor,
    PeriodicSensor,
    Runtime,
    Skill,
)
from agentcluster.clock import SimClock
from agentcluster.signals import Signal
from agentcluster.testing import advance, run_virtual, wait_until


async def collect(sensor: Any, clock: Any, n: int) -> list[tuple[float, Signal]]:
    got: list[tuple[float, Signal]] = []
    done = asyncio.Event()

    async def emit(sig: Signal) -> None:
        got.append((clock.now(), sig))
        if len(got) >= n:
            done.set()

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(sensor.run(emit, clock))
        await done.wait()
        task.cancel()
    return got


@pytest.mark.virtual_time
async def test_periodic_sensor_is_drift_free() -> None:
    from agentcluster.clock import MonotonicClock

    clock = MonotonicClock()
    t0 = clock.now()
    got = await collect(PeriodicSensor(2.5, "test.tick", data={"k": 1}), clock, 4)
    assert [round(t - t0, 9) for t, _ in got] == [2.5, 5.0, 7.5, 10.0]
    assert all(s.type == "test.tick" and s.data == {"k": 1} for _, s in got)


@pytest.mark.virtual_time
async def test_periodic_sensor_skips_ticks_when_behind() -> None:
    from agentcluster.clock import MonotonicClock

    clock = MonotonicClock()
    t0 = clock.now()
    times: list[float] = []

    async def slow_emit(sig: Signal) -> None:
        times.append(clock.now() - t0)
        await advance(2.5)  # takes longer than the interval

    sensor = PeriodicSensor(1.0, "test.tick")
    task = asyncio.ensure_future(sensor.run(slow_emit, clock))
    await advance(10.1)
    task.cancel()
    # Ticks at 1, then the next due after 3.5 is 4, then 7, then 10: no burst of missed ticks.
    assert [round(t, 6) for t in times] == [1.0, 4.0, 7.0, 10.0]


async def test_periodic_sensor_with_sim_clock_and_callable() -> None:
    clock = SimClock()
    counter = iter(range(100))

    def make() -> Signal | None:
        n = next(counter)
        return None if n % 2 else Signal(type="test.even", data=n)

    got: list[Any] = []

    async def emit(sig: Signal) -> None:
        got.append((clock.now(), sig.data))

    task = asyncio.ensure_future(PeriodicSensor(1.0, make, initial_delay=0.5).run(emit, clock))
    await clock.run_for(4.6)
    task.cancel()
    assert got == [(0.5, 0), (2.5, 2), (4.5, 4)]


def test_sensor_argument_errors() -> None:
    with pytest.raises(ValueError, match="interval"):
        PeriodicSensor(0, "a.b")
    with pytest.raises(ValueError, match="invalid signal type"):
        PeriodicSensor(1, "not a type")


@pytest.mark.virtual_time
async def test_heartbeat_sensor() -> None:
    from agentcluster.clock import MonotonicClock

    clock = MonotonicClock()
    got = await collect(HeartbeatSensor(5.0), clock, 3)
    assert [s.data["seq"] for _, s in got] == [1, 2, 3]
    assert all(s.type == "agent.heartbeat" for _, s in got)


async def test_event_sensor_push_threadsafe_and_errors() -> None:
    def convert(event: Any) -> Signal | None:
        if event == "skip":
            return None
        if event == "bad":
            raise ValueError("cannot convert")
        return Signal(type="test.event", data=event)

    sensor = EventSensor(convert, maxsize=10)
    got: list[Any] = []
    done = asyncio.Event()

    async def emit(sig: Signal) -> None:
        got.append(sig.data)
        if len(got) == 3:
            done.set()

    task = asyncio.ensure_future(sensor.run(emit, SimClock()))
    await asyncio.sleep(0)
    assert sensor.push(1)
    sensor.push("skip")
    sensor.push("bad")
    thread = threading.Thread(target=sensor.push_threadsafe, args=(2,))
    thread.start()
    thread.join()
    sensor.push(3)
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    assert sorted(got) == [1, 2, 3]
    assert sensor.conversion_errors == 1
    full = EventSensor(convert, maxsize=1)
    assert full.push(1) and not full.push(2)
    assert full.dropped == 1
    with pytest.raises(RuntimeError, match="not running"):
        full.push_threadsafe(3)


class Log(msgspec.Struct):
    seen: list[Any] = msgspec.field(default_factory=list)
    at: list[float] = msgspec.field(default_factory=list)


class Note(Action[msgspec.Struct]):
    name = "note"

    def run(self, params: Any, ctx: ActionContext) -> dict[str, Any]:
        assert ctx.signal is not None
        return {"seen": [*ctx.state.seen, ctx.signal.type], "at": [*ctx.state.at, ctx.clock.now()]}


async def test_bus_sensor_forwards_matching_signals_to_an_agent() -> None:
    class Listener(Agent):
        name = "listener"
        State = Log
        actions = (Note,)
        routes = (("app.**", "note"),)

    async with Runtime() as rt:
        server = await rt.spawn(Listener)
        server._start_sensor("bus", BusSensor(rt.bus, "app.interesting.*"))
        await asyncio.sleep(0)
        await rt.bus.publish(Signal(type="app.boring.x"))
        await rt.bus.publish(Signal(type="app.interesting.x"))
        await rt.bus.publish(Signal(type="app.interesting.y"))
        await wait_until(lambda: len(server.agent.state.seen) >= 2)
        assert server.agent.state.seen == ["app.interesting.x", "app.interesting.y"]


class TickState(msgspec.Struct):
    ticks: int = 0
    at: list[float] = msgspec.field(default_factory=list)


class CountTick(Action[msgspec.Struct]):
    name = "count_tick"

    def run(self, params: Any, ctx: ActionContext) -> TickState:
        return TickState(ctx.state.ticks + 1, [*ctx.state.at, ctx.clock.now()])


class TickConfig(msgspec.Struct, frozen=True):
    every: float = 3.0


class Ticker(Skill):
    name = "ticker"
    Config = TickConfig
    State = TickState
    actions = (CountTick,)
    routes = (("skill.tick", "count_tick"),)

    def schedules(self) -> list[Every]:
        return [Every(self.config.every, "skill.tick")]

    def sensors(self) -> list[tuple[str, Any]]:
        return [("hb", HeartbeatSensor(100.0))]


class Ticking(Agent):
    name = "ticking"
    skills = (Ticker({"every": 3.0}),)


def test_skill_schedules_and_sensors_run_in_the_server() -> None:
    async def main() -> tuple[list[float], list[str]]:
        async with Runtime() as rt:
            t0 = asyncio.get_running_loop().time()
            server = await rt.spawn(Ticking)
            await wait_until(lambda: server.agent.skill_states["ticker"].ticks >= 3, timeout=100)
            return [t - t0 for t in server.agent.skill_states["ticker"].at], sorted(server.sensors)

    at, sensors = run_virtual(main)
    assert [round(t, 6) for t in at] == [3.0, 6.0, 9.0]
    assert sensors == ["ticker.every.0", "ticker.hb"]


async def test_runtime_sensor_publishes_on_the_bus() -> None:
    async with Runtime() as rt:
        sub = rt.bus.subscribe("test.tick")
        rt.start_sensor("ticks", PeriodicSensor(0.01, "test.tick"))
        assert (await asyncio.wait_for(sub.get(), 5)).type == "test.tick"
        rt.stop_sensor("ticks")
