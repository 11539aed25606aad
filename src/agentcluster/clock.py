"""Time for the runtime and the cores.

Theory of operation: every timer in agentcluster goes through a :class:`Clock`. A clock has
a monotonic ``now()`` (seconds, for timeouts and schedules), a ``wall()`` (epoch seconds, for
signal timestamps), an awaitable ``sleep()`` and a ``call_later()`` that returns a cancellable
handle. Two implementations:

* :class:`MonotonicClock` follows the running asyncio loop's clock (``loop.time()``), so under
  :func:`agentcluster.testing.run_virtual` it becomes virtual without any change to the code.
* :class:`SimClock` is advanced by hand (``advance(dt)``); sans-I/O cores and simulations use
  it, and its ``sleep``/``call_later`` fire in deadline order as time is advanced.

A timer must never fire before its deadline by the loop's own clock: our shells re-arm a timer
that fired early for the rest of the wait, and uvloop both rounds a delay to the *nearest*
millisecond (under half a millisecond: "run now") and reads its clock once per loop turn in
whole milliseconds. Re-arming for a sub-millisecond rest there spins the loop until the next
millisecond -- measured: 185 to 499 callbacks for one wait, each SWIM probe round and Raft
tick burning up to a millisecond of CPU. :func:`call_later` / :func:`call_at` (and the
clock's methods) round a delay *up* to whole milliseconds on such loops; on asyncio's own loop
(nanosecond clock) they pass it through. A connection that waits for one reply after
another keeps one :class:`Deadline` -- a timer moved by assignment -- instead of a timer per
wait.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Clock",
    "Deadline",
    "MonotonicClock",
    "SimClock",
    "TimerHandle",
    "call_at",
    "call_later",
]

# Loop classes whose timers have millisecond granularity (see the module docstring).
_COARSE: dict[type, bool] = {}


def _coarse(loop: asyncio.AbstractEventLoop) -> bool:
    cls = type(loop)
    coarse = _COARSE.get(cls)
    if coarse is None:
        coarse = _COARSE[cls] = cls.__module__.partition(".")[0] == "uvloop"
    return coarse


def _not_early(loop: asyncio.AbstractEventLoop, delay: float) -> float:
    if delay <= 0.0:
        return 0.0
    if _coarse(loop):
        return math.ceil(delay * 1000.0) / 1000.0
    return delay


def call_later(
    loop: asyncio.AbstractEventLoop, delay: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """``loop.call_later`` that never runs ``callback`` before ``delay`` has passed by
    ``loop.time()`` (see the module docstring)."""
    return loop.call_later(_not_early(loop, delay), callback, *args)


def call_at(
    loop: asyncio.AbstractEventLoop, when: float, callback: Callable[..., object], *args: Any
) -> asyncio.TimerHandle:
    """``loop.call_at`` that never runs ``callback`` before ``loop.time()`` reaches ``when``."""
    if _coarse(loop):
        return loop.call_later(_not_early(loop, when - loop.time()), callback, *args)
    return loop.call_at(when, callback, *args)


class Deadline:
    """One timer for a sequence of waits that each have a deadline -- a connection's requests,
    one after the other: setting the deadline is an assignment, and the timer is re-armed only
    when it fires early or must fire earlier than it is armed for. (A timer created and
    cancelled per wait -- ``asyncio.timeout``, ``call_at`` + ``cancel`` -- allocates, starts,
    stops and closes a libuv timer on uvloop: ~4-10 us, a tenth of a loopback round trip.)
    ``on_expire`` runs when the deadline last set passes before it is cleared."""

    __slots__ = ("_at", "_handle", "_loop", "_on_expire")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expire: Callable[[], object]) -> None:
        self._loop = loop
        self._on_expire = on_expire
        self._at = math.inf
        self._handle: asyncio.TimerHandle | None = None

    def set(self, at: float) -> None:
        """Expire at ``at`` (the loop's time) unless cleared before; an infinite ``at`` waits."""
        self._at = at
        handle = self._handle
        # Invariant: an armed timer never fires later than the deadline (give or take the
        # millisecond a coarse loop rounds it up by: not worth a new timer per wait).
        if at < math.inf and (handle is None or handle.when() > at + 0.001):
            if handle is not None:
                handle.cancel()
            self._handle = call_at(self._loop, at, self._fire)

    def clear(self) -> None:
        self._at = math.inf

    def close(self) -> None:
        self._at = math.inf
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        at = self._at
        if at == math.inf:
            return  # nothing awaited now; the next set() arms a timer again
        if self._loop.time() < at:
            self._handle = call_at(self._loop, at, self._fire)  # moved since: wait on
            return
        self._at = math.inf
        self._on_expire()


class TimerHandle(Protocol):
    """A scheduled callback that can be cancelled before it fires."""

    def cancel(self) -> None: ...

    def cancelled(self) -> bool: ...


@runtime_checkable
class Clock(Protocol):
    """What the runtime needs from time."""

    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    async def sleep(self, delay: float) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle: ...


class MonotonicClock:
    """Real time, read from the running event loop when there is one.

    Reading ``loop.time()`` instead of ``time.monotonic()`` is what lets a virtual-time loop
    speed up every timer in the runtime: the loop owns time, the clock just follows it.
    """

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        # Wall time is derived from the loop's clock so that virtual loops move it too.
        self._offset: float | None = None

    def now(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    def wall(self) -> float:
        now = self.now()
        if self._offset is None:
            self._offset = time.time() - now
        return now + self._offset

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(_not_early(asyncio.get_running_loop(), delay))

    def call_later(self, delay: float, callback: Callable[[], object]) -> TimerHandle:
        return call_later(asyncio.get_running_loop(), delay, callback)


class _SimTimer:
    __slots__ = ("_cancelled", "callback", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], object]) -> None:
        self.deadline = deadline
        self.callback = callback
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


class SimClock:
    """A clock that only moves when told to.

    ``advance(dt)`` fires every due timer in deadline order (ties in scheduling order) with
    ``now()`` set to the timer's deadline, so callbacks observe the time they were due at.
    ``sleep()`` futures resolve the same way; ``await clock.run_for(dt)`` also yields to the
    event loop between timers so that woken tasks run before later timers fire.
    """

    def __init__(self, start: float = 0.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._heap: list[tuple[float, int, _SimTimer]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, delay: float, callback: Callable[[], object]) -> _SimTimer:
        timer = _SimTimer(self._now + max(0.0, delay), callback)
        heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
        return timer

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        timer = self.call_later(delay, wake)
        try:
            await fut
        finally:
            timer.cancel()

    def next_deadline(self) -> float | None:
        """The deadline of the earliest live timer, or None."""
        while self._heap and self._heap[0][2].cancelled():
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def advance(self, dt: float) -> int:
        """Move time forward by ``dt`` seconds, firing due timers; returns how many fired."""
        if dt < 0:
            raise ValueError(f"cannot move a clock backwards (dt={dt})")
        target = self._now + dt
        fired = 0
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            _, _, timer = heapq.heappop(self._heap)
            self._now = max(self._now, deadline)
            timer.callback()
            fired += 1
        self._now = target
        return fired

    async def run_for(self, dt: float, *, max_timers: int = 1_000_000) -> None:
        """Advance ``dt`` seconds, letting the event loop run after every timer."""
        target = self._now + dt
        for _ in range(max_timers):
            # Let woken tasks run (and schedule new timers) before looking at the heap.
            for _ in range(5):
                await asyncio.sleep(0)
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            self.advance(deadline - self._now)
        else:
            raise RuntimeError(f"run_for: more than {max_timers} timers fired")
        self._now = target
        for _ in range(5):
            await asyncio.sleep(0)
