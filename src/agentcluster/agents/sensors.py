"""Sensors: the outside world turned into signals.

Theory of operation: a sensor is a long-running coroutine, ``run(emit, clock)``, that calls
``emit(signal)`` whenever it has something to say, until it is cancelled. Whoever starts it
decides where signals go: the :class:`~agentcluster.agents.server.AgentServer` delivers them
to its agent (``StartSensor`` directive, skill sensors and schedules), the runtime can also
publish them on the bus. Kinds:

* periodic: :class:`PeriodicSensor` (a signal every ``interval``; drift-free: the next tick
  is computed from the previous deadline, not from when the tick ran) and its
  :class:`HeartbeatSensor`;
* event-driven: :class:`EventSensor`, fed by ``push()`` (thread-safe variant too), and
  :class:`BusSensor`, which forwards the bus signals matching a pattern.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agentcluster.clock import Clock
from agentcluster.signals import Signal, validate_type

if TYPE_CHECKING:
    from agentcluster.signals.bus import Bus

__all__ = [
    "BusSensor",
    "Emit",
    "EventSensor",
    "HeartbeatSensor",
    "PeriodicSensor",
    "Sensor",
]

log = logging.getLogger(__name__)

# Where a sensor's signals go; the result (e.g. the bus's delivery count) is ignored.
Emit = Callable[[Signal], Awaitable[object]]


class Sensor(ABC):
    """Base class: implement :meth:`run`."""

    name: str = "sensor"

    @abstractmethod
    async def run(self, emit: Emit, clock: Clock) -> None:
        """Emit signals until cancelled."""


class PeriodicSensor(Sensor):
    """Emit a signal every ``interval`` seconds.

    ``make`` is either a signal type (a signal with ``data`` is built each tick) or a callable
    returning the next signal (or None to skip a tick). A tick that falls behind (the emit
    blocked on a full mailbox) is skipped rather than fired in a burst.
    """

    def __init__(
        self,
        interval: float,
        make: str | Callable[[], Signal | None],
        *,
        data: Any = None,
        source: str = "/agentcluster/sensor",
        initial_delay: float | None = None,
        name: str = "periodic",
    ) -> None:
        if not interval > 0:
            raise ValueError(f"sensor interval must be > 0, got {interval}")
        if isinstance(make, str):
            validate_type(make)
        self.interval = interval
        self.make = make
        self.data = data
        self.source = source
        self.initial_delay = interval if initial_delay is None else initial_delay
        self.name = name
        self.ticks = 0

    def next_signal(self) -> Signal | None:
        if isinstance(self.make, str):
            return Signal(type=self.make, source=self.source, data=self.data)
        return self.make()

    async def run(self, emit: Emit, clock: Clock) -> None:
        deadline = clock.now() + self.initial_delay
        while True:
            await clock.sleep(deadline - clock.now())
            signal = self.next_signal()
            self.ticks += 1
            if signal is not None:
                await emit(signal)
            deadline += self.interval
            now = clock.now()
            if deadline < now:  # fell behind: skip the missed ticks
                missed = int((now - deadline) // self.interval) + 1
                deadline += missed * self.interval


class HeartbeatSensor(PeriodicSensor):
    """``agent.heartbeat`` every ``interval`` s, carrying a sequence number and the time."""

    def __init__(
        self,
        interval: float,
        *,
        source: str = "/agentcluster/heartbeat",
        clock: Clock | None = None,
    ) -> None:
        super().__init__(interval, self._beat, source=source, name="heartbeat")
        self._seq = 0
        self._clock = clock

    def _beat(self) -> Signal:
        self._seq += 1
        data: dict[str, Any] = {"seq": self._seq}
        if self._clock is not None:
            data["at"] = self._clock.now()
        return Signal(type="agent.heartbeat", source=self.source, data=data)

    async def run(self, emit: Emit, clock: Clock) -> None:
        self._clock = clock
        await super().run(emit, clock)


class EventSensor(Sensor):
    """Event-driven: whatever is pushed becomes a signal (via ``to_signal``) and is emitted.

    ``push`` is for code on the event loop; ``push_threadsafe`` for other threads (callbacks
    from libraries that run their own threads). The buffer is bounded; overflow is counted.
    """

    def __init__(
        self,
        to_signal: Callable[[Any], Signal | None],
        *,
        maxsize: int = 1024,
        name: str = "event",
    ) -> None:
        self.to_signal = to_signal
        self.name = name
        self.dropped = 0
        self.conversion_errors = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self._loop: asyncio.AbstractEventLoop | None = None

    def push(self, event: Any) -> bool:
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            return False
        return True

    def push_threadsafe(self, event: Any) -> None:
        if self._loop is None:
            raise RuntimeError(f"sensor {self.name!r} is not running")
        self._loop.call_soon_threadsafe(self.push, event)

    async def run(self, emit: Emit, clock: Clock) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            event = await self._queue.get()
            try:
                signal = self.to_signal(event)
            except Exception:
                self.conversion_errors += 1
                log.exception("sensor %s could not turn %r into a signal", self.name, event)
                continue
            if signal is not None:
                await emit(signal)


class BusSensor(Sensor):
    """Forward bus signals matching ``pattern`` (bounded, oldest dropped when behind)."""

    def __init__(
        self, bus: Bus, pattern: str, *, queue_size: int = 1024, name: str = "bus"
    ) -> None:
        self.bus = bus
        self.pattern = pattern
        self.queue_size = queue_size
        self.name = name

    async def run(self, emit: Emit, clock: Clock) -> None:
        sub = self.bus.subscribe(
            self.pattern, queue_size=self.queue_size, overflow="drop_oldest", name=self.name
        )
        try:
            async for signal in sub:
                await emit(signal)
        finally:
            self.bus.unsubscribe(sub)
