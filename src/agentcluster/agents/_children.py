"""Children of supervisors: the :class:`Child` protocol, :class:`ChildSpec`, and
:class:`TaskChild`, a ready-made child wrapping a coroutine.

Theory of operation: a supervisor only needs two things from a child — ``wait()`` (returns
the exit reason: ``None`` for a normal exit, an exception for a crash) and ``stop(timeout)``.
Agent servers, nested supervisors and :class:`TaskChild` all provide them. ``TaskChild`` runs
one coroutine in a task it owns; stopping it cancels the task (or, with ``spawn_graceful``,
sets an event the coroutine watches) and force-cancels after the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from agentcluster.clock import Clock, MonotonicClock

__all__ = ["Child", "ChildSpec", "RestartType", "TaskChild", "child_spec_for"]

logger = logging.getLogger("agentcluster.agents.supervisor")

RestartType = Literal["permanent", "transient", "temporary"]
_RESTART_TYPES: frozenset[str] = frozenset(("permanent", "transient", "temporary"))


@runtime_checkable
class Child(Protocol):
    """What a supervisor needs from a child.

    ``wait()`` may be called any number of times, also after the exit (then it returns at once).
    ``stop(timeout)`` on a child that has already exited returns at once.
    """

    async def wait(self) -> BaseException | None:
        """Return when the child has exited: ``None`` if normally, else the crash reason."""
        ...

    # The protocol's ``timeout`` is a grace period before forcing, not a bound to impose on
    # the call with asyncio.timeout, hence the noqa on every stop().
    async def stop(self, timeout: float) -> None:
        """Ask the child to stop; force it after ``timeout`` seconds and return."""
        ...


def _check_timeout(what: str, timeout: float) -> None:
    if not isinstance(timeout, int | float) or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"{what} must be a number >= 0 (math.inf allowed), got {timeout!r}")


@dataclass(frozen=True)
class ChildSpec:
    """How to start one child and what to do when it exits.

    ``shutdown_timeout`` bounds the child's ``stop()`` during ordered shutdown and group
    restarts; use ``math.inf`` for a nested supervisor (as OTP recommends ``infinity``).
    """

    id: str
    start: Callable[[], Awaitable[Child]]
    restart: RestartType = "permanent"
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"child id must be a non-empty string, got {self.id!r}")
        if not callable(self.start):
            raise TypeError(f"child {self.id!r}: start must be callable, got {self.start!r}")
        if self.restart not in _RESTART_TYPES:
            raise ValueError(
                f"child {self.id!r}: restart must be one of {sorted(_RESTART_TYPES)}, "
                f"got {self.restart!r}"
            )
        _check_timeout(f"child {self.id!r}: shutdown_timeout", self.shutdown_timeout)


async def _wait_done(fut: asyncio.Future[Any], limit: float, clock: Clock) -> bool:
    """Wait until ``fut`` is done or ``limit`` clock seconds passed; True if done.

    Never cancels ``fut``: a timeout only stops the waiting, the caller decides what next.
    """
    if fut.done():
        return True
    if limit <= 0:
        return False
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(*_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    fut.add_done_callback(wake)
    handle = None if math.isinf(limit) else clock.call_later(limit, wake)
    try:
        await waiter
    finally:
        fut.remove_done_callback(wake)
        if handle is not None:
            handle.cancel()
    return fut.done()


def _consume_result(task: asyncio.Task[Any]) -> None:
    # A crash is reported through wait(); retrieving it here keeps asyncio from also logging
    # "Task exception was never retrieved" when nobody happened to call wait().
    if not task.cancelled():
        task.exception()


class TaskChild:
    """A :class:`Child` running one coroutine function in its own task.

    Two ways to stop: :meth:`spawn` children are asked to stop by cancellation (cleanup goes in
    ``finally`` / ``except CancelledError``); :meth:`spawn_graceful` children get an
    :class:`asyncio.Event` that ``stop()`` sets. Either way, a child still running ``timeout``
    seconds after ``stop()`` is force-cancelled (again, for a cancel-stopped one); a task that
    swallows even that is abandoned after ``force_grace`` more seconds, with an error logged.

    ``wait()`` returns None after a normal return or a stop, the exception after a crash, and
    a :class:`asyncio.CancelledError` if the task was cancelled by someone other than ``stop()``.
    """

    def __init__(
        self,
        run: Callable[[], Awaitable[object]],
        *,
        name: str | None = None,
        stop_event: asyncio.Event | None = None,
        clock: Clock | None = None,
        force_grace: float = 1.0,
    ) -> None:
        _check_timeout("force_grace", force_grace)
        self.name = name if name is not None else getattr(run, "__qualname__", repr(run))
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._stop_event = stop_event
        self._force_grace = force_grace
        self._stop_requested = False
        self._forced = False
        self._task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._main(run), name=f"child:{self.name}"
        )
        self._task.add_done_callback(_consume_result)

    @classmethod
    def spawn(
        cls,
        coro_fn: Callable[[], Awaitable[object]],
        *,
        name: str | None = None,
        clock: Clock | None = None,
        force_grace: float = 1.0,
    ) -> TaskChild:
        """Run ``coro_fn()`` now; ``stop()`` cancels it."""
        return cls(coro_fn, name=name, clock=clock, force_grace=force_grace)

    @classmethod
    def spawn_graceful(
        cls,
        coro_fn: Callable[[asyncio.Event], Awaitable[object]],
        *,
        name: str | None = None,
        clock: Clock | None = None,
        force_grace: float = 1.0,
    ) -> TaskChild:
        """Run ``coro_fn(stopping)`` now; ``stop()`` sets ``stopping`` and cancels only later."""
        stopping = asyncio.Event()
        label = name if name is not None else getattr(coro_fn, "__qualname__", repr(coro_fn))
        return cls(
            lambda: coro_fn(stopping),
            name=label,
            stop_event=stopping,
            clock=clock,
            force_grace=force_grace,
        )

    @staticmethod
    async def _main(run: Callable[[], Awaitable[object]]) -> None:
        await run()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def forced(self) -> bool:
        """True once ``stop()`` had to force-cancel the task after its timeout."""
        return self._forced

    def done(self) -> bool:
        return self._task.done()

    async def wait(self) -> BaseException | None:
        if not self._task.done():
            await asyncio.wait([self._task])
        if self._task.cancelled():
            if self._stop_requested:
                return None
            return asyncio.CancelledError(f"child {self.name!r} was cancelled")
        return self._task.exception()

    async def stop(self, timeout: float) -> None:
        _check_timeout("stop timeout", timeout)
        task = self._task
        if task.done():
            return
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()
        else:
            task.cancel()
        if await _wait_done(task, timeout, self._clock):
            return
        logger.warning("child %r did not stop within %gs; cancelling it", self.name, timeout)
        self._forced = True
        task.cancel()
        if await _wait_done(task, self._force_grace, self._clock):
            return
        logger.error(
            "child %r ignored cancellation for %gs; abandoning its task",
            self.name,
            self._force_grace,
        )

    def __repr__(self) -> str:
        state = "done" if self._task.done() else "running"
        return f"<TaskChild {self.name!r} {state}>"


def child_spec_for(
    coro_fn: Callable[[], Awaitable[object]],
    *,
    id: str | None = None,
    restart: RestartType = "permanent",
    shutdown_timeout: float = 5.0,
    clock: Clock | None = None,
) -> ChildSpec:
    """A spec whose every start runs ``coro_fn()`` in a fresh :class:`TaskChild`."""
    child_id = id if id is not None else getattr(coro_fn, "__name__", "")

    async def start() -> Child:
        return TaskChild.spawn(coro_fn, name=child_id, clock=clock)

    return ChildSpec(id=child_id, start=start, restart=restart, shutdown_timeout=shutdown_timeout)
