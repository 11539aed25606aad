"""OTP-style supervision for asyncio.

Theory of operation: a :class:`Supervisor` owns an ordered list of children, each described by
a :class:`ChildSpec` (an id, a ``start`` factory, a restart type and a shutdown timeout). A child
is anything implementing the small :class:`Child` protocol: ``wait()`` returns when it has
exited (``None`` = normal exit, an exception = crash) and ``stop(timeout)`` asks it to stop
and returns within ``timeout``. Supervisors implement that protocol too, so they nest.

After :meth:`Supervisor.start` has started the children in order, one runner task (which owns a
TaskGroup) does all the work, serially, from one inbox, like an Erlang process's mailbox: a
watcher task per running child turns ``child.wait()`` into an "exited" message, and the public
operations (``start_child``, ``terminate_child``, ``restart_child``, ``delete_child``, ``stop``)
are messages too, so no lock is needed and no two decisions race.

On an exit the restart type decides (permanent: always restart; transient: only after a crash;
temporary: never, and the spec is dropped), then the strategy decides who restarts:
``one_for_one`` the child alone; ``one_for_all`` every child (the others are stopped in reverse
start order, then all start in order); ``rest_for_one`` the child and those started after it.
Exactly as in OTP, a group restart also starts group members that were not running (a
transient that exited normally, a terminated child) and drops temporary members.

Every restart first passes the intensity check: more than ``max_restarts`` restarts within any
``max_seconds`` window (sliding, read from the injected :class:`~agentcluster.clock.Clock`)
and the supervisor gives up: it stops every child in reverse order and exits with
:class:`SupervisorEscalation`, which its parent sees as a crash. A ``start`` that raises during
a restart is a failed attempt: it consumed one unit of intensity, and the supervisor retries
through its inbox (OTP's ``try_again_restart``) until a start succeeds or intensity runs out.

A child the supervisor stops itself has its watcher cancelled first and its exit is matched
by identity, so supervisor-initiated stops are never mistaken for crashes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

from agentcluster.agents._children import (
    Child,
    ChildSpec,
    RestartType,
    TaskChild,
    _check_timeout,
    _wait_done,
    child_spec_for,
)
from agentcluster.clock import Clock, MonotonicClock

__all__ = [
    "Child",
    "ChildInfo",
    "ChildSpec",
    "ChildStartError",
    "EventKind",
    "RestartType",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorEscalation",
    "SupervisorEvent",
    "TaskChild",
    "child_spec_for",
    "supervisor_spec",
]

logger = logging.getLogger(__name__)

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
EventKind = Literal[
    "child_started",
    "child_restarted",
    "child_start_failed",
    "child_exited",
    "child_terminated",
    "escalated",
    "stopped",
]

_STRATEGIES: frozenset[str] = frozenset(("one_for_one", "one_for_all", "rest_for_one"))

T = TypeVar("T")


@dataclass(frozen=True)
class ChildInfo:
    """One row of :meth:`Supervisor.which_children`."""

    id: str
    running: bool
    restarts: int
    restart: RestartType
    restarting: bool = False
    child: Child | None = None


@dataclass(frozen=True)
class SupervisorEvent:
    """Something the supervisor did or saw, as passed to ``on_event``.

    ``child_started``: started by ``start()``, ``start_child()`` or ``restart_child()``;
    ``child_restarted``: started again by a restart; ``child_start_failed``: a ``start`` raised
    (``reason``); ``child_exited``: exited on its own (``reason``: None = normal);
    ``child_terminated``: stopped by the supervisor; ``escalated``: intensity exceeded
    (``reason`` is the :class:`SupervisorEscalation`); ``stopped``: the supervisor exited
    (``reason`` as returned by ``wait()``).
    """

    kind: EventKind
    supervisor: str
    child_id: str | None
    reason: BaseException | None
    at: float


class SupervisorError(Exception):
    """A supervisor operation was misused (wrong state, running child, ...)."""


class ChildStartError(SupervisorError):
    """A child's ``start`` raised; the original exception is ``__cause__`` and ``reason``."""

    def __init__(self, supervisor: str, child_id: str, reason: BaseException) -> None:
        super().__init__(
            f"supervisor {supervisor!r} could not start child {child_id!r}: {reason!r}"
        )
        self.supervisor = supervisor
        self.child_id = child_id
        self.reason = reason


class SupervisorEscalation(SupervisorError):
    """A supervisor exceeded its restart intensity, stopped its children and gave up."""

    def __init__(
        self,
        supervisor: str,
        child_id: str,
        restarts: int,
        max_restarts: int,
        max_seconds: float,
        reason: BaseException | None,
    ) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up: child {child_id!r} needed restart number "
            f"{restarts} within {max_seconds:g}s (max_restarts={max_restarts}); "
            f"last exit reason: {reason!r}"
        )
        self.supervisor = supervisor
        self.child_id = child_id
        self.restarts = restarts
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self.reason = reason


def supervisor_spec(
    id: str,
    make: Callable[[], Supervisor],
    *,
    restart: RestartType = "permanent",
    shutdown_timeout: float = math.inf,
) -> ChildSpec:
    """A spec for a nested supervisor: every start builds a fresh one with ``make()``."""

    async def start() -> Child:
        sup = make()
        await sup.start()
        return sup

    return ChildSpec(id=id, start=start, restart=restart, shutdown_timeout=shutdown_timeout)


@dataclass(eq=False)
class _Entry:
    spec: ChildSpec
    child: Child | None = None
    watcher: asyncio.Task[None] | None = None
    restarts: int = 0
    restarting: bool = False  # a restart attempt failed; a retry message is queued
    removed: bool = False


@dataclass(frozen=True, slots=True)
class _Exited:
    entry: _Entry
    child: Child
    reason: BaseException | None


@dataclass(frozen=True, slots=True)
class _Retry:
    entry: _Entry
    reason: BaseException | None


@dataclass(frozen=True, slots=True)
class _Call:
    op: Callable[[], Awaitable[Any]]
    fut: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _Stop:
    deadline: float | None


_Msg = _Exited | _Retry | _Call | _Stop
_State = Literal["new", "starting", "running", "stopping", "exited"]


class Supervisor:
    """Starts, watches and restarts children; itself a :class:`Child`, so supervisors nest.

    ``on_event`` is called synchronously for every :class:`SupervisorEvent`; an exception it
    raises is logged and otherwise ignored.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = "one_for_one",
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        clock: Clock | None = None,
        name: str = "supervisor",
        on_event: Callable[[SupervisorEvent], None] | None = None,
    ) -> None:
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(_STRATEGIES)}, got {strategy!r}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if not isinstance(max_seconds, int | float) or not 0 < max_seconds < math.inf:
            raise ValueError(f"max_seconds must be a finite number > 0, got {max_seconds!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"supervisor name must be a non-empty string, got {name!r}")
        self._name = name
        self._strategy: Strategy = strategy
        self._max_restarts = max_restarts
        self._max_seconds = float(max_seconds)
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._on_event = on_event
        # Insertion-ordered by id: start order for shutdown, O(1) lookups with many children.
        self._entries: dict[str, _Entry] = {}
        for spec in children:
            self._add_spec(spec)
        self._state: _State = "new"
        self._inbox: asyncio.Queue[_Msg] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._restart_times: collections.deque[float] = collections.deque()
        self._restart_count = 0
        self._stop_requested = False
        self._exit_reason: BaseException | None = None
        self._exited = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @property
    def running(self) -> bool:
        return self._state == "running"

    async def start(self) -> None:
        """Start the children in order; on a failure stop the started ones in reverse and raise."""
        if self._state != "new":
            raise SupervisorError(f"supervisor {self._name!r} was already started")
        self._state = "starting"
        started: list[_Entry] = []
        try:
            for entry in list(self._entries.values()):
                failure = await self._start_entry(entry, "child_started", watch=False)
                if failure is not None:
                    raise ChildStartError(self._name, entry.spec.id, failure) from failure
                started.append(entry)
        except BaseException as exc:
            for entry in reversed(started):
                await self._terminate(entry, entry.spec.shutdown_timeout)
            self._finish(exc if isinstance(exc, Exception) else None)
            raise
        self._state = "running"
        self._runner = asyncio.get_running_loop().create_task(
            self._run(), name=f"supervisor:{self._name}"
        )

    async def start_child(self, spec: ChildSpec) -> None:
        """Add a child at the end and start it (before ``start()``: only add it)."""
        if not isinstance(spec, ChildSpec):
            raise TypeError(f"start_child needs a ChildSpec, got {spec!r}")
        if self._state == "new":
            self._add_spec(spec)
            return

        async def op() -> None:
            self._check_new_id(spec.id)
            entry = _Entry(spec)
            failure = await self._start_entry(entry, "child_started")
            if failure is not None:
                raise ChildStartError(self._name, spec.id, failure) from failure
            self._entries[spec.id] = entry

        await self._call(op)

    async def terminate_child(self, id: str) -> None:
        """Stop a child (within its shutdown timeout) and keep its spec; temporary: drop it."""

        async def op() -> None:
            entry = self._find(id)
            entry.restarting = False
            if entry.child is not None:
                await self._terminate(entry, entry.spec.shutdown_timeout)
            if entry.spec.restart == "temporary":
                self._remove(entry)

        await self._call(op)

    async def restart_child(self, id: str) -> None:
        """Start a terminated child again (does not count towards restart intensity)."""

        async def op() -> None:
            entry = self._find(id)
            self._check_not_running(entry, "restart")
            failure = await self._start_entry(entry, "child_started")
            if failure is not None:
                raise ChildStartError(self._name, id, failure) from failure

        await self._call(op)

    async def delete_child(self, id: str) -> None:
        """Forget a child that is not running."""
        if self._state == "new":
            self._remove(self._find(id))
            return

        async def op() -> None:
            entry = self._find(id)
            self._check_not_running(entry, "delete")
            self._remove(entry)

        await self._call(op)

    def which_children(self) -> list[ChildInfo]:
        return [
            ChildInfo(
                id=e.spec.id,
                running=e.child is not None,
                restarts=e.restarts,
                restart=e.spec.restart,
                restarting=e.restarting,
                child=e.child,
            )
            for e in self._entries.values()
        ]

    def count_restarts(self) -> int:
        """Restart attempts made so far (each one consumed restart intensity)."""
        return self._restart_count

    async def stop(self, timeout: float | None = None) -> None:
        """Ordered shutdown: children stop in reverse start order, then the supervisor exits.

        Each child gets its ``shutdown_timeout``; with ``timeout`` the whole shutdown is also
        bounded by it (later children get what is left, and past it the supervisor's runner is
        cancelled and the remaining children are stopped with timeout 0).
        """
        if timeout is not None:
            _check_timeout("stop timeout", timeout)
        if self._state == "new":
            self._finish(None)
            return
        if self._state == "starting":
            raise SupervisorError(
                f"supervisor {self._name!r} is still starting; cancel the start() call instead"
            )
        self._stop_requested = True
        if self._state == "running":
            self._state = "stopping"
            deadline = None if timeout is None else self._clock.now() + timeout
            self._inbox.put_nowait(_Stop(deadline))
        runner = self._runner
        if runner is None or runner.done():
            return
        if asyncio.current_task() is runner:
            return  # called by a child's start(); the runner handles the queued stop next
        if timeout is None:
            await asyncio.wait([runner])
        elif not await _wait_done(runner, timeout, self._clock):
            logger.warning(
                "supervisor %r did not shut down within %gs; forcing it", self._name, timeout
            )
            runner.cancel()
            await asyncio.wait([runner])

    async def wait(self) -> BaseException | None:
        """Return when the supervisor has exited: None after ``stop()``, else why it gave up."""
        if self._state == "new":
            raise SupervisorError(f"supervisor {self._name!r} was never started")
        await self._exited.wait()
        return self._exit_reason

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"<Supervisor {self._name!r} {self._strategy} {self._state}>"

    def _add_spec(self, spec: ChildSpec) -> None:
        if not isinstance(spec, ChildSpec):
            raise TypeError(f"supervisor {self._name!r}: children must be ChildSpec, got {spec!r}")
        self._check_new_id(spec.id)
        self._entries[spec.id] = _Entry(spec)

    def _check_new_id(self, id: str) -> None:
        if id in self._entries:
            raise ValueError(f"supervisor {self._name!r} already has a child with id {id!r}")

    def _find(self, id: str) -> _Entry:
        entry = self._entries.get(id)
        if entry is not None:
            return entry
        known = list(self._entries)
        raise LookupError(f"supervisor {self._name!r} has no child {id!r} (children: {known})")

    def _check_not_running(self, entry: _Entry, what: str) -> None:
        if entry.child is not None:
            raise SupervisorError(
                f"cannot {what} child {entry.spec.id!r} of supervisor {self._name!r}: it is "
                "running (terminate_child it first)"
            )
        if entry.restarting:
            raise SupervisorError(
                f"cannot {what} child {entry.spec.id!r} of supervisor {self._name!r}: "
                "the supervisor is restarting it"
            )

    def _remove(self, entry: _Entry) -> None:
        if not entry.removed:
            entry.removed = True
            del self._entries[entry.spec.id]

    def _emit(self, kind: EventKind, child_id: str | None, reason: BaseException | None) -> None:
        if self._on_event is None:
            return
        event = SupervisorEvent(kind, self._name, child_id, reason, self._clock.now())
        try:
            self._on_event(event)
        except Exception:
            logger.exception("supervisor %r: on_event callback failed for %s", self._name, kind)

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        if self._state != "running":
            raise SupervisorError(f"supervisor {self._name!r} is not running ({self._state})")
        if asyncio.current_task() is self._runner:
            raise SupervisorError(
                f"supervisor {self._name!r}: a child's start() cannot call back into its "
                "own supervisor (it would wait for itself)"
            )
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Call(op, fut))
        result: T = await fut
        return result

    def _finish(self, reason: BaseException | None) -> None:
        self._state = "exited"
        self._exit_reason = reason
        self._tg = None
        while not self._inbox.empty():
            msg = self._inbox.get_nowait()
            if isinstance(msg, _Call) and not msg.fut.done():
                msg.fut.set_exception(
                    SupervisorError(f"supervisor {self._name!r} exited before handling the call")
                )
        self._exited.set()
        if reason is None:
            logger.info("supervisor %r stopped", self._name)
        else:
            # Being cancelled is a shutdown from outside (the owner is going away), not a
            # failure of this supervisor: it must not flood the logs when a whole node stops.
            level = logging.INFO if isinstance(reason, asyncio.CancelledError) else logging.ERROR
            logger.log(level, "supervisor %r exited: %r", self._name, reason)
        self._emit("stopped", None, reason)

    async def _start_entry(
        self, entry: _Entry, kind: EventKind, *, watch: bool = True
    ) -> Exception | None:
        """Start one child; return the exception if its ``start`` failed."""
        spec = entry.spec
        try:
            child = await spec.start()
            # Duck-typed rather than isinstance(child, Child): a runtime Protocol check costs
            # ~100 us, which dominated starting thousands of agents.
            if not (
                callable(getattr(child, "wait", None)) and callable(getattr(child, "stop", None))
            ):
                raise TypeError(
                    f"start() of child {spec.id!r} returned {child!r}, which is not a Child "
                    "(it needs async wait() and stop(timeout))"
                )
        except Exception as exc:
            logger.error("supervisor %r: child %r failed to start: %r", self._name, spec.id, exc)
            self._emit("child_start_failed", spec.id, exc)
            return exc
        entry.child = child
        entry.restarting = False
        if watch:
            assert self._tg is not None, "watchers are only created by the runner"
            entry.watcher = self._tg.create_task(
                self._watch(entry, child), name=f"supervisor:{self._name}:watch:{spec.id}"
            )
        logger.debug("supervisor %r: %s %r", self._name, kind, spec.id)
        self._emit(kind, spec.id, None)
        return None

    async def _watch(self, entry: _Entry, child: Child) -> None:
        try:
            reason = await child.wait()
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the supervisor stopped watching this child
            reason = exc  # the child's wait() itself was cancelled: treat as a crash
        except Exception as exc:
            reason = exc
        self._inbox.put_nowait(_Exited(entry, child, reason))

    async def _terminate(self, entry: _Entry, grace: float) -> None:
        """Stop a running child on the supervisor's own initiative (never counted as a crash)."""
        child = entry.child
        if child is None:
            return
        if entry.watcher is not None:
            entry.watcher.cancel()
            entry.watcher = None
        try:
            await child.stop(grace)
        except Exception as exc:
            logger.error(
                "supervisor %r: stopping child %r raised %r", self._name, entry.spec.id, exc
            )
        # Only now: if this await is cancelled (a forced shutdown), the child stays listed
        # as running and gets stopped again with timeout 0.
        entry.child = None
        self._emit("child_terminated", entry.spec.id, None)

    async def _shutdown_children(self, deadline: float | None) -> None:
        for entry in reversed(list(self._entries.values())):
            if entry.child is None:
                continue
            timeout = entry.spec.shutdown_timeout
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - self._clock.now()))
            await self._terminate(entry, timeout)

    async def _run(self) -> None:
        reason: BaseException | None = None
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    for entry in self._entries.values():
                        if entry.child is not None:
                            entry.watcher = tg.create_task(
                                self._watch(entry, entry.child),
                                name=f"supervisor:{self._name}:watch:{entry.spec.id}",
                            )
                    reason = await self._serve()
                    for entry in self._entries.values():
                        if entry.watcher is not None:
                            entry.watcher.cancel()
                            entry.watcher = None
            finally:
                self._tg = None
                self._state = "stopping"
                # Children are only left running here after a forced stop or a supervisor bug.
                if any(e.child is not None for e in self._entries.values()):
                    await self._shutdown_children(self._clock.now())
        except asyncio.CancelledError:
            reason = (
                None
                if self._stop_requested
                else asyncio.CancelledError(f"supervisor {self._name!r} was cancelled")
            )
            raise
        except Exception as exc:
            # Reported through wait() like any crash; re-raising would only produce an
            # unretrieved-exception warning on a task nobody awaits for its result.
            logger.exception("supervisor %r crashed", self._name)
            reason = exc
        finally:
            self._finish(reason)

    async def _serve(self) -> BaseException | None:
        while True:
            msg = await self._inbox.get()
            if isinstance(msg, _Stop):
                await self._shutdown_children(msg.deadline)
                return None
            if isinstance(msg, _Call):
                await self._handle_call(msg)
                continue
            if isinstance(msg, _Exited):
                escalation = await self._on_exit(msg)
            else:
                escalation = await self._on_retry(msg)
            if escalation is not None:
                return escalation

    async def _handle_call(self, msg: _Call) -> None:
        if msg.fut.done():  # the caller gave up (was cancelled) before we got to it
            return
        try:
            result = await msg.op()
        except Exception as exc:
            if not msg.fut.done():
                msg.fut.set_exception(exc)
        except BaseException:
            # The runner itself is being cancelled: release the caller before unwinding.
            if not msg.fut.done():
                msg.fut.set_exception(
                    SupervisorError(f"supervisor {self._name!r} exited while handling the call")
                )
            raise
        else:
            if not msg.fut.done():
                msg.fut.set_result(result)

    async def _on_exit(self, msg: _Exited) -> SupervisorEscalation | None:
        entry = msg.entry
        if entry.child is not msg.child:
            return None  # an instance the supervisor already stopped or replaced
        entry.child = None
        entry.watcher = None
        reason = msg.reason
        if reason is None:
            logger.info("supervisor %r: child %r exited normally", self._name, entry.spec.id)
        else:
            logger.warning("supervisor %r: child %r crashed: %r", self._name, entry.spec.id, reason)
        self._emit("child_exited", entry.spec.id, reason)
        if self._stop_requested:
            return None
        restart = entry.spec.restart
        if restart == "temporary":
            self._remove(entry)
            return None
        if restart == "transient" and reason is None:
            return None
        return await self._restart(entry, reason)

    async def _on_retry(self, msg: _Retry) -> SupervisorEscalation | None:
        entry = msg.entry
        if entry.removed or not entry.restarting or entry.child is not None:
            return None  # started by a group restart or terminated meanwhile
        if self._stop_requested:
            return None
        return await self._restart(entry, msg.reason)

    def _intensity_exceeded(self) -> bool:
        now = self._clock.now()
        times = self._restart_times
        times.append(now)
        # Inclusive window, as OTP's add_restart: a restart exactly max_seconds ago counts.
        threshold = now - self._max_seconds
        while times and times[0] < threshold:
            times.popleft()
        return len(times) > self._max_restarts

    def _group(self, entry: _Entry) -> list[_Entry]:
        if self._strategy == "one_for_one":
            return [entry]
        if self._strategy == "one_for_all":
            return list(self._entries.values())
        entries = list(self._entries.values())
        return entries[entries.index(entry) :]

    async def _restart(
        self, entry: _Entry, reason: BaseException | None
    ) -> SupervisorEscalation | None:
        if self._intensity_exceeded():
            return await self._escalate(entry, reason)
        self._restart_count += 1
        group = self._group(entry)
        for member in reversed(group):
            if member.child is not None:
                await self._terminate(member, member.spec.shutdown_timeout)
            if member.spec.restart == "temporary":
                self._remove(member)
        for member in group:
            if member.removed:
                continue
            failure = await self._start_entry(member, "child_restarted")
            if failure is not None:
                member.restarting = True
                self._inbox.put_nowait(_Retry(member, failure))
                break
            member.restarts += 1
        return None

    async def _escalate(self, entry: _Entry, reason: BaseException | None) -> SupervisorEscalation:
        escalation = SupervisorEscalation(
            self._name,
            entry.spec.id,
            len(self._restart_times),
            self._max_restarts,
            self._max_seconds,
            reason,
        )
        escalation.__cause__ = reason
        entry.restarting = False
        self._state = "stopping"
        logger.error("%s", escalation)
        self._emit("escalated", entry.spec.id, escalation)
        await self._shutdown_children(None)
        return escalation
