"""AgentServer: one asyncio task per agent, a bounded mailbox, directive execution.

Theory of operation: the server owns one agent value. Its task takes one message at a time
from a bounded mailbox (a deque plus a waiter future: cheaper than ``asyncio.Queue`` on the
call hot path), runs it through :func:`~agentcluster.agents.agent.arun_cmd`, swaps in the new
agent value and executes the returned directives in order. ``call`` attaches a future that is
resolved with the ``Reply`` (or, without one, the new state); ``cast`` does not wait.

``call_direct`` (the serving side of ``cluster.call``) skips the mailbox when the agent is
idle: the message runs at once on the caller's task, exactly as the agent's own task would run
it (same code, one message at a time, same error policy), which saves the two event-loop turns
of a hand-over and back. Meanwhile the server counts as busy: new messages queue and wake the
agent's task once the direct run is over. A crash or a ``Stop`` met on the caller's task is
handed to the agent's task, which ends as if it had met it itself. The caller's deadline does
not interrupt a direct run (an action is never cancelled by a caller's impatience, as with
``call``); a late reply is reported as late by the caller. An agent that ends meanwhile
(cancelled when a stop timed out) cancels the caller's task with it -- hence direct runs are
for tasks that serve one request, such as a transport connection's.

A full mailbox pushes back: ``cast`` waits for room up to its timeout, then raises
:class:`MailboxFull`; ``cast_nowait`` raises at once. Errors follow the :class:`ErrorPolicy`:
log and go on, emit an ``agent.error`` signal, stop (a crash the supervisor sees), or stop
after N errors. The server implements the supervisor's child protocol (``wait`` / ``stop``),
so the runtime's supervisors restart it. Timers (``Schedule``), sensors and spawned child
agents belong to the server and end with it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from agentcluster.agents.actions import Action
from agentcluster.agents.agent import Agent, AgentError, Instruction, arun_cmd
from agentcluster.agents.directives import (
    Cancel,
    Directive,
    Emit,
    Reply,
    Schedule,
    Send,
    SpawnAgent,
    StartSensor,
    Stop,
    StopAgent,
    StopSensor,
)
from agentcluster.agents.sensors import PeriodicSensor, Sensor
from agentcluster.clock import TimerHandle, call_later
from agentcluster.logs import agent_id_var, signal_id_var
from agentcluster.signals import Signal

if TYPE_CHECKING:
    from agentcluster.agents.runtime import Runtime

__all__ = [
    "AgentCrashed",
    "AgentServer",
    "AgentStopped",
    "CallTimeout",
    "ErrorPolicy",
    "MailboxFull",
]

log = logging.getLogger(__name__)

Message = Instruction | Signal | type[Action[Any]] | str


class MailboxFull(AgentError):
    """The agent's mailbox stayed full for longer than the caller was willing to wait."""


class CallTimeout(AgentError, TimeoutError):
    """A ``call`` got no reply before its deadline."""


class AgentStopped(AgentError):
    """The agent is not running (any more)."""


class AgentCrashed(AgentError):
    """The exit reason of an agent that stopped abnormally."""


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """What a server does when an instruction fails.

    ``on_error``: ``log`` (log and go on), ``emit`` (log, and publish ``agent.error``),
    ``stop`` (stop as crashed, so a supervisor restarts the agent). ``max_errors``: crash once
    this many instructions have failed, whatever ``on_error`` says.
    """

    on_error: Literal["log", "emit", "stop"] = "log"
    max_errors: int | None = None


_STOP = object()


# What a call's reply future holds when its time ran out (see :meth:`AgentServer.call`); a
# done future is also how the agent's loop knows to skip the message.
_EXPIRED = object()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_EXPIRED)


class AgentServer:
    """Runs one agent. Create it through :meth:`Runtime.spawn`, not directly."""

    def __init__(
        self,
        agent: Agent,
        runtime: Runtime,
        *,
        mailbox_size: int = 1024,
        error_policy: ErrorPolicy | None = None,
        parent: AgentServer | None = None,
    ) -> None:
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size must be >= 1, got {mailbox_size}")
        self.agent = agent
        self.runtime = runtime
        self.id = agent.id
        self.mailbox_size = mailbox_size
        self.error_policy = error_policy or ErrorPolicy()
        self.parent = parent
        self.errors = 0
        self.processed = 0
        self._mailbox: deque[tuple[Any, asyncio.Future[Any] | None]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space_waiters: deque[asyncio.Future[None]] = deque()
        self._timers: dict[str, TimerHandle] = {}
        self._timer_seq = 0
        self._sensors: dict[str, asyncio.Task[None]] = {}
        self._children: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._exit: BaseException | None = None
        self._stopping = False
        # A message is running on a caller's task (see call_direct): the agent is busy.
        self._direct = False
        self._direct_task: asyncio.Task[Any] | None = None
        # What a direct run met that ends the agent (an error, or _STOP), for its own task.
        self._handoff: BaseException | object | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def idle(self) -> bool:
        """True while the agent's task waits on an empty mailbox and no message runs."""
        return not self._direct and self._waiter is not None and not self._waiter.done()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._done.is_set()

    def start(self) -> None:
        """Start the agent's task in the runtime's task group."""
        if self._task is not None:
            raise AgentError(f"agent {self.id!r} is already started")
        self._task = self.runtime._spawn_task(self._main(), name=f"agent:{self.id}")

    async def wait(self) -> BaseException | None:
        """Wait for the agent to exit: None if it stopped normally, else the crash reason."""
        await self._done.wait()
        return self._exit

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current instruction; cancel the task if it takes over ``timeout``."""
        if self._task is None or self._done.is_set():
            return
        self._stopping = True
        self._wake()
        try:
            async with asyncio.timeout(timeout):
                await self._done.wait()
        except TimeoutError:
            log.warning("agent %s did not stop within %.1fs; cancelling it", self.id, timeout)
            self._task.cancel()
            await self._done.wait()

    # ----------------------------------------------------------------- mailbox
    def _wake(self) -> None:
        if self._direct:
            return  # the direct run wakes the agent's task when it is over
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_alive(self) -> None:
        if self._stopping or self._done.is_set():
            raise AgentStopped(f"agent {self.id!r} is not running")

    def cast_nowait(self, message: Message) -> None:
        """Queue a message; raise :class:`MailboxFull` at once if there is no room."""
        self._check_alive()
        if len(self._mailbox) >= self.mailbox_size:
            raise MailboxFull(f"mailbox of agent {self.id!r} is full ({self.mailbox_size})")
        self._mailbox.append((message, None))
        self._wake()

    async def _wait_for_room(self, timeout: float | None) -> None:
        if len(self._mailbox) < self.mailbox_size and not self._space_waiters:
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while len(self._mailbox) >= self.mailbox_size:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._space_waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if fut in self._space_waiters:
                            self._space_waiters.remove(fut)
                    self._check_alive()
        except TimeoutError:
            raise MailboxFull(
                f"mailbox of agent {self.id!r} stayed full ({self.mailbox_size}) for {timeout}s"
            ) from None

    async def cast(self, message: Message, *, timeout: float | None = 5.0) -> None:
        """Queue a message, waiting up to ``timeout`` s for room (backpressure)."""
        self._check_alive()
        await self._wait_for_room(timeout)
        self._mailbox.append((message, None))
        self._wake()

    async def call(self, message: Message, *, timeout: float | None = 5.0) -> Any:
        """Send a message and wait for the reply, all within ``timeout`` seconds."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if len(self._mailbox) >= self.mailbox_size or self._space_waiters or timeout is None:
            try:
                async with asyncio.timeout(timeout):
                    if len(self._mailbox) >= self.mailbox_size:
                        await self._wait_for_room(None)
                    self._mailbox.append((message, fut))
                    self._wake()
                    return await fut
            except TimeoutError:
                fut.cancel()
                raise self._timed_out(timeout) from None
        # Room in the mailbox (the usual case): one timer that fails the reply's future
        # instead of a timeout context -- this is every cluster.call's path, and the
        # context's cancel-and-uncancel machinery cost more than the agent's own work.
        self._mailbox.append((message, fut))
        self._wake()
        timer = call_later(loop, timeout, _expire, fut)
        try:
            result = await fut
        finally:
            timer.cancel()
        if result is _EXPIRED:
            raise self._timed_out(timeout)
        return result

    async def call_direct(self, message: Message, *, timeout: float) -> Any:
        """Like :meth:`call`, but run ``message`` on this task at once when the agent is
        idle (see the module's docstring); otherwise through the mailbox. Should the agent
        end while the message runs (cancelled after a stop timed out), this task is
        cancelled: meant for a task that serves the one request, as a connection's does."""
        waiter = self._waiter
        if self._direct or waiter is None or waiter.done() or self._stopping:
            return await self.call(message, timeout=timeout)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._direct = True
        self._direct_task = asyncio.current_task(loop)
        token = agent_id_var.set(self.id)
        try:
            if await self._process(message, fut):
                self._handoff = _STOP
        except Exception as exc:
            # What would have ended the agent's own task ends it now, from there.
            self._handoff = exc
        finally:
            agent_id_var.reset(token)
            self._direct = False
            self._direct_task = None
            if self._handoff is not None or self._mailbox or self._stopping:
                self._wake()
        if not fut.done():
            fut.set_exception(AgentStopped(f"agent {self.id!r} stopped before replying"))
        return fut.result()

    def _timed_out(self, timeout: float | None) -> CallTimeout:
        return CallTimeout(f"call to agent {self.id!r} got no reply within {timeout}s")

    @property
    def mailbox_depth(self) -> int:
        return len(self._mailbox)

    # ----------------------------------------------------------------- main loop
    async def _main(self) -> None:
        agent_id_var.set(self.id)
        try:
            await self._run_hook_start()
            await self._start_skill_sensors()
            await self._loop()
        except asyncio.CancelledError:
            self._exit = AgentCrashed(f"agent {self.id!r} was cancelled")
        except AgentCrashed as exc:
            self._exit = exc  # the error itself was logged where it happened
            log.warning("%s", exc)
        except Exception as exc:
            self._exit = exc
            log.exception("agent %s crashed", self.id)
        finally:
            await self._cleanup()
            self._done.set()
            self.runtime._server_exited(self)

    async def _run_hook_start(self) -> None:
        outcome = self.agent.on_start()
        if outcome is not None:
            from agentcluster.agents.agent import _finish

            self.agent, directives = _finish(self.agent, Instruction("on_start"), None, outcome)
            await self._execute_all(directives, None)

    async def _start_skill_sensors(self) -> None:
        for skill in self.agent._compiled.skills.values():
            for key, sensor in skill.sensors():
                self._start_sensor(f"{skill.state_key}.{key}", sensor)
            for i, every in enumerate(skill.schedules()):
                self._start_sensor(
                    f"{skill.state_key}.every.{i}",
                    PeriodicSensor(
                        every.interval, every.type, data=every.data, source=f"/agent/{self.id}"
                    ),
                )

    async def _next(self) -> Any:
        while not self._mailbox:
            if self._stopping:
                return _STOP
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            handoff = self._handoff
            if handoff is not None:
                self._handoff = None
                if isinstance(handoff, BaseException):
                    raise handoff
                return _STOP
        if self._stopping:
            return _STOP
        item = self._mailbox.popleft()
        if self._space_waiters:
            waiter = self._space_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        return item

    async def _loop(self) -> None:
        while True:
            item = await self._next()
            if item is _STOP:
                return
            message, fut = item
            if fut is not None and fut.done():  # the caller gave up already
                continue
            if await self._process(message, fut):
                return

    async def _process(self, message: Any, fut: asyncio.Future[Any] | None) -> bool:
        """Run one message and its directives; True when the agent must stop now."""
        token = signal_id_var.set(message.id if isinstance(message, Signal) else None)
        try:
            try:
                agent, directives = await arun_cmd(self.agent, message, clock=self.runtime.clock)
            except Exception as exc:
                self.errors += 1
                if fut is not None and not fut.done():
                    fut.set_exception(exc)
                await self._on_error(message, exc)
                return False
            self.agent = agent
            self.processed += 1
            if len(directives) == 1 and type(directives[0]) is Reply:
                # A call's usual answer and nothing to carry out: no directive loop to run.
                if fut is not None and not fut.done():
                    fut.set_result(directives[0].data)
            elif directives and await self._execute_all(directives, fut):
                return True
            if fut is not None and not fut.done():
                fut.set_result(agent.state)
            return False
        finally:
            signal_id_var.reset(token)

    async def _on_error(self, message: Any, exc: Exception) -> None:
        policy = self.error_policy
        log.error(
            "agent %s failed on %s: %s: %s", self.id, _describe(message), type(exc).__name__, exc
        )
        if policy.on_error == "emit":
            err = Signal(
                type="agent.error",
                source=f"/agent/{self.id}",
                data={
                    "agent": self.id,
                    "error_type": type(exc).__name__,
                    "message": str(exc),
                    "signal_id": message.id if isinstance(message, Signal) else None,
                },
            )
            await self.runtime.bus.publish(err)
        if policy.on_error == "stop":
            raise AgentCrashed(f"agent {self.id!r} stopped on error: {exc}") from exc
        if policy.max_errors is not None and self.errors >= policy.max_errors:
            raise AgentCrashed(
                f"agent {self.id!r} reached max_errors={policy.max_errors}: {exc}"
            ) from exc

    # ----------------------------------------------------------------- directives
    async def _execute_all(
        self, directives: list[Directive], fut: asyncio.Future[Any] | None
    ) -> bool:
        """Execute directives in order; True when the agent must stop now."""
        stop: Stop | None = None
        for directive in directives:
            if isinstance(directive, Reply):
                if fut is not None and not fut.done():
                    fut.set_result(directive.data)
            elif isinstance(directive, Stop):
                stop = directive
            else:
                try:
                    await self._execute(directive)
                except Exception as exc:
                    # A directive that cannot be carried out is the agent's error, not a crash
                    # of the runtime: it goes through the same policy as a failed action.
                    self.errors += 1
                    await self._on_error(directive, exc)
        if stop is None:
            return False
        if fut is not None and not fut.done():
            fut.set_result(self.agent.state)
        if stop.reason != "normal":
            raise AgentCrashed(f"agent {self.id!r} stopped: {stop.reason}")
        return True

    async def _execute(self, d: Directive) -> None:
        rt = self.runtime
        if isinstance(d, Emit):
            if d.to is None:
                await rt.bus.publish(d.signal)
            else:
                await rt.cast(d.to, d.signal)
        elif isinstance(d, Send):
            await rt.send(d.agent, d.signal, node=d.node)
        elif isinstance(d, Schedule):
            self._schedule(d)
        elif isinstance(d, Cancel):
            timer = self._timers.pop(d.key, None)
            if timer is not None:
                timer.cancel()
        elif isinstance(d, SpawnAgent):
            child = await rt.spawn(d.agent, id=d.id, state=d.state, parent=self, **d.opts)
            self._children.append(child.id)
        elif isinstance(d, StopAgent):
            if d.agent in (self.id,):
                self._stopping = True
            else:
                await rt.stop_agent(d.agent, reason=d.reason)
        elif isinstance(d, StartSensor):
            self._start_sensor(d.key, d.sensor)
        elif isinstance(d, StopSensor):
            task = self._sensors.pop(d.key, None)
            if task is not None:
                task.cancel()
        else:
            handler = rt._directive_handlers.get(type(d))
            if handler is None:
                raise AgentError(
                    f"no executor for directive {type(d).__name__}; "
                    "register one with Runtime.register_directive"
                )
            result = handler(self, d)
            if inspect.isawaitable(result):
                await result

    def _schedule(self, d: Schedule) -> None:
        key = d.key
        if key is None:
            self._timer_seq += 1
            key = f"_timer{self._timer_seq}"
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        signal = d.signal

        def fire() -> None:
            self._timers.pop(key, None)
            if self._stopping or self._done.is_set():
                return
            try:
                self.cast_nowait(signal)
            except MailboxFull:
                log.warning("agent %s: mailbox full, scheduled %s dropped", self.id, signal.type)

        self._timers[key] = self.runtime.clock.call_later(d.after, fire)

    @property
    def timers(self) -> list[str]:
        return list(self._timers)

    # ----------------------------------------------------------------- sensors
    def _start_sensor(self, key: str, sensor: Sensor) -> None:
        old = self._sensors.pop(key, None)
        if old is not None:
            old.cancel()
        self._sensors[key] = self.runtime._spawn_task(
            self._run_sensor(key, sensor), name=f"sensor:{self.id}:{key}"
        )

    async def _emit_to_self(self, signal: Signal) -> None:
        if not self._stopping and not self._done.is_set():
            await self.cast(signal, timeout=None)

    async def _run_sensor(self, key: str, sensor: Sensor) -> None:
        try:
            await sensor.run(self._emit_to_self, self.runtime.clock)
        except asyncio.CancelledError:
            pass
        except AgentStopped:
            pass
        except Exception:
            # A broken sensor is logged, never a crash of the runtime's task group.
            log.exception("sensor %s of agent %s failed", key, self.id)
        finally:
            if self._sensors.get(key) is asyncio.current_task():
                del self._sensors[key]

    @property
    def sensors(self) -> list[str]:
        return list(self._sensors)

    # ----------------------------------------------------------------- cleanup
    async def _cleanup(self) -> None:
        self._stopping = True
        direct = self._direct_task
        if direct is not None and direct is not asyncio.current_task():
            # The agent ended (cancelled after a stop timed out, say) while a message ran on
            # a caller's task: that run ends with it, as it would have on the agent's own.
            direct.cancel()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._sensors.values()):
            task.cancel()
        self._sensors.clear()
        err = AgentStopped(f"agent {self.id!r} stopped")
        while self._mailbox:
            _, fut = self._mailbox.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(err)
        for waiter in self._space_waiters:
            if not waiter.done():
                waiter.set_result(None)
        for child in reversed(self._children):
            try:
                await self.runtime.stop_agent(child)
            except AgentStopped:
                pass
            except Exception:
                log.exception("agent %s: stopping child %s failed", self.id, child)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<AgentServer {self.id!r} {state} mailbox={len(self._mailbox)}>"


def _describe(message: Any) -> str:
    if isinstance(message, Signal):
        return f"signal {message.type} ({message.id})"
    if isinstance(message, Instruction):
        action = message.action if isinstance(message.action, str) else message.action.name
        return f"instruction {action}"
    if isinstance(message, Directive):
        return f"directive {type(message).__name__}"
    return repr(message)
