"""Virtual time for asyncio tests.

Theory of operation: an asyncio loop sleeps in ``selector.select(timeout)`` when it has
nothing ready and its next timer is ``timeout`` seconds away. :class:`VirtualTimeLoop` wraps
the selector: it polls real I/O without blocking, and when there is none it moves the loop's
own clock forward by ``timeout`` instead of waiting. Timers then fire at once, in order, with
``loop.time()`` (and so :class:`agentcluster.clock.MonotonicClock`) reading the virtual time.
A test of a 30 s retry schedule takes milliseconds, and asserts on exact virtual instants.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualTimeLoop", "advance", "eventually", "run_virtual", "wait_until"]

T = TypeVar("T")


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self, inner: selectors.BaseSelector) -> None:
        self._inner = inner
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # Nothing scheduled at all: only real I/O (or another thread) can wake us.
            return self._inner.select(None)
        events = self._inner.select(0)
        if not events and timeout > 0 and self.loop is not None:
            self.loop.advance(timeout)
        return events

    def close(self) -> None:
        self._inner.close()

    def get_map(self) -> Any:
        return self._inner.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever it would otherwise wait."""

    def __init__(self, start: float = 0.0) -> None:
        self._vtime = start
        selector = _VirtualSelector(selectors.DefaultSelector())
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self._vtime

    def advance(self, dt: float) -> None:
        self._vtime += dt


def run_virtual(main: Callable[[], Awaitable[T]] | Coroutine[Any, Any, T]) -> T:
    """Run a coroutine (or a coroutine function) to completion in virtual time."""
    coro = main() if callable(main) else main
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


async def advance(seconds: float) -> None:
    """Let ``seconds`` of loop time pass.

    Under :class:`VirtualTimeLoop` this returns as soon as every timer due in that span has
    fired, so tests read as a timeline ("advance 30 s, then check") without real waiting.
    """
    await asyncio.sleep(seconds)


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 5.0, interval: float = 0.001
) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Await ``probe()`` until it returns something truthy and return that; ``TimeoutError``
    after ``timeout`` seconds. For conditions that take I/O to check (other processes)."""
    async with asyncio.timeout(timeout):
        while True:
            result = await probe()
            if result:
                return result
            await asyncio.sleep(interval)
