"""The local runtime: the agent table, supervision, the bus and directive executors.

Theory of operation: a :class:`Runtime` is what one node process runs. Entering it
(``async with Runtime() as rt``) opens a task group that owns every agent task and sensor
task, starts the bus, and starts the root supervisor (one_for_one). ``spawn`` starts an agent
under that supervisor by default (or under a parent agent, linked, or unsupervised); a crashed
agent is restarted from its initial state with the same id. Leaving the block stops the
agents in reverse start order, then the bus. The table maps ids to running servers and names
to ids; ``call``/``cast`` look targets up there. ``send`` to another node goes through a
remote sender that the node layer installs (the runtime itself knows no network).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from agentcluster.agents.agent import Agent, AgentError
from agentcluster.agents.directives import Directive
from agentcluster.agents.sensors import Sensor
from agentcluster.agents.server import AgentServer, AgentStopped, ErrorPolicy, Message
from agentcluster.agents.supervisor import ChildSpec, Supervisor, SupervisorEvent
from agentcluster.clock import Clock, MonotonicClock
from agentcluster.logs import node_id_var
from agentcluster.signals import Signal
from agentcluster.signals.bus import Bus

__all__ = ["AgentInfo", "RemoteSender", "Runtime", "UnknownAgent"]

log = logging.getLogger(__name__)

T = TypeVar("T")
D = TypeVar("D", bound=Directive)
RemoteSender = Callable[[str, str, Signal], Awaitable[None]]
DirectiveHandler = Callable[[AgentServer, Any], Awaitable[None] | None]


class UnknownAgent(AgentStopped, LookupError):
    """No running agent has that id or name."""


@dataclass(frozen=True, slots=True)
class AgentInfo:
    id: str
    name: str
    running: bool
    mailbox: int
    processed: int
    errors: int
    supervised: bool


class Runtime:
    """Hosts agents on one node. Use as ``async with Runtime(node_id) as rt``."""

    def __init__(
        self,
        node_id: str = "local",
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        mailbox_size: int = 1024,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        bus: Bus | None = None,
    ) -> None:
        self.node_id = node_id
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.rng = rng if rng is not None else random.Random()
        self.mailbox_size = mailbox_size
        self.bus = bus if bus is not None else Bus(clock=self.clock, rng=self.rng)
        self.supervisor = Supervisor(
            strategy="one_for_one",
            max_restarts=max_restarts,
            max_seconds=max_seconds,
            clock=self.clock,
            name=f"{node_id}/root",
            on_event=self._on_supervisor_event,
        )
        self.remote_sender: RemoteSender | None = None
        self._directive_handlers: dict[type[Directive], DirectiveHandler] = {}
        self._table: dict[str, AgentServer] = {}
        self._by_name: dict[str, dict[str, None]] = {}
        # Which supervisor (the root or a subtree) restarts each supervised agent.
        self._supervisor_of: dict[str, Supervisor] = {}
        self._subtrees: dict[str, Supervisor] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._sensor_tasks: dict[str, asyncio.Task[None]] = {}
        # Supervisor events become bus signals through one pump task; bounded, so a storm of
        # restarts cannot grow memory (the oldest events are dropped and counted).
        self._events: deque[SupervisorEvent] = deque(maxlen=4096)
        self._events_ready = asyncio.Event()
        self.events_dropped = 0

    # ----------------------------------------------------------------- lifecycle
    async def __aenter__(self) -> Runtime:
        node_id_var.set(self.node_id)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        await self.bus.__aenter__()
        self._pump = self._tg.create_task(self._pump_events(), name="supervisor-events")
        await self.supervisor.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        tg = self._tg
        if tg is None:
            return
        try:
            for task in self._sensor_tasks.values():
                task.cancel()
            await self.supervisor.stop()
            for server in reversed(list(self._table.values())):
                await server.stop()
            self._pump.cancel()
            await self.bus.__aexit__(None, None, None)
        finally:
            self._tg = None
            await tg.__aexit__(None, None, None)

    def _spawn_task(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        if self._tg is None:
            coro.close()
            raise AgentError("the runtime is not running (use 'async with Runtime() as rt')")
        return self._tg.create_task(coro, name=name)

    def _on_supervisor_event(self, event: SupervisorEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.events_dropped += 1
        self._events.append(event)
        self._events_ready.set()

    async def _pump_events(self) -> None:
        source = f"/node/{self.node_id}/supervisor"
        while True:
            await self._events_ready.wait()
            self._events_ready.clear()
            while self._events:
                ev = self._events.popleft()
                signal = Signal(
                    type=f"runtime.supervisor.{ev.kind}",
                    source=source,
                    subject=ev.child_id,
                    data={
                        "supervisor": ev.supervisor,
                        "child": ev.child_id,
                        "reason": None
                        if ev.reason is None
                        else f"{type(ev.reason).__name__}: {ev.reason}",
                    },
                )
                try:
                    await self.bus.publish(signal)
                except Exception:
                    log.exception("could not publish supervisor event %s", ev.kind)

    # ----------------------------------------------------------------- agents
    async def spawn(
        self,
        agent: type[Agent] | Agent,
        *,
        id: str | None = None,
        state: Any = None,
        restart: Literal["permanent", "transient", "temporary"] | None = "permanent",
        mailbox_size: int | None = None,
        error_policy: ErrorPolicy | None = None,
        parent: AgentServer | None = None,
        shutdown_timeout: float = 5.0,
    ) -> AgentServer:
        """Start an agent and return its server.

        ``restart`` is the OTP restart type under the root supervisor (``None``: not
        supervised). An agent spawned by another agent (``parent``) is linked to it instead.
        Restarts begin again from the initial state given here.
        """
        if parent is not None or restart is None:
            initial = self._initial(agent, id, state)
            size = mailbox_size if mailbox_size is not None else self.mailbox_size
            return self._start_server(
                initial, parent=parent, mailbox_size=size, error_policy=error_policy
            )
        spec = self.agent_spec(
            agent,
            id=id,
            state=state,
            restart=restart,
            mailbox_size=mailbox_size,
            error_policy=error_policy,
            shutdown_timeout=shutdown_timeout,
        )
        self._supervisor_of[spec.id] = self.supervisor
        try:
            await self.supervisor.start_child(spec)
        except BaseException:
            self._supervisor_of.pop(spec.id, None)
            raise
        return self._table[spec.id]

    def _initial(self, agent: type[Agent] | Agent, id: str | None, state: Any) -> Agent:
        if isinstance(agent, Agent):
            if id is not None or state is not None:
                raise AgentError("pass id/state to the agent instance, not to spawn()")
            initial = agent
        else:
            initial = agent(id=id, state=state)
        if initial.id in self._table:
            raise AgentError(f"an agent with id {initial.id!r} is already running")
        return initial

    def agent_spec(
        self,
        agent: type[Agent] | Agent,
        *,
        id: str | None = None,
        state: Any = None,
        restart: Literal["permanent", "transient", "temporary"] = "permanent",
        mailbox_size: int | None = None,
        error_policy: ErrorPolicy | None = None,
        shutdown_timeout: float = 5.0,
    ) -> ChildSpec:
        """A supervisor child spec that starts this agent (fresh from its initial state)."""
        initial = self._initial(agent, id, state)
        size = mailbox_size if mailbox_size is not None else self.mailbox_size

        async def start() -> AgentServer:
            return self._start_server(
                initial, parent=None, mailbox_size=size, error_policy=error_policy
            )

        return ChildSpec(
            id=initial.id, start=start, restart=restart, shutdown_timeout=shutdown_timeout
        )

    async def start_supervisor(
        self,
        id: str,
        children: Sequence[ChildSpec],
        *,
        strategy: Literal["one_for_one", "one_for_all", "rest_for_one"] = "one_for_one",
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        restart: Literal["permanent", "transient", "temporary"] = "permanent",
    ) -> None:
        """Start a nested supervisor (a subtree of agents) under the root supervisor.

        Build the children with :meth:`agent_spec`. When the subtree exceeds its restart
        intensity it escalates to the root, which restarts the whole subtree.
        """
        ids = [spec.id for spec in children]

        async def start() -> Supervisor:
            sup = Supervisor(
                children,
                strategy=strategy,
                max_restarts=max_restarts,
                max_seconds=max_seconds,
                clock=self.clock,
                name=f"{self.node_id}/{id}",
                on_event=self._on_supervisor_event,
            )
            await sup.start()
            for child_id in ids:
                self._supervisor_of[child_id] = sup
            self._subtrees[id] = sup
            return sup

        await self.supervisor.start_child(
            ChildSpec(id=id, start=start, restart=restart, shutdown_timeout=math.inf)
        )

    def subtree(self, id: str) -> Supervisor:
        """The running nested supervisor started with :meth:`start_supervisor`."""
        sup = self._subtrees.get(id)
        if sup is None or not sup.running:
            raise LookupError(f"no running supervisor {id!r} on {self.node_id}")
        return sup

    def _start_server(
        self,
        agent: Agent,
        *,
        parent: AgentServer | None,
        mailbox_size: int,
        error_policy: ErrorPolicy | None,
    ) -> AgentServer:
        if agent.id in self._table:
            raise AgentError(f"an agent with id {agent.id!r} is already running")
        server = AgentServer(
            agent, self, mailbox_size=mailbox_size, error_policy=error_policy, parent=parent
        )
        self._table[agent.id] = server
        self._by_name.setdefault(agent.name, {})[agent.id] = None
        server.start()
        return server

    def _server_exited(self, server: AgentServer) -> None:
        if self._table.get(server.id) is server:
            del self._table[server.id]
            ids = self._by_name.get(server.name)
            if ids is not None:
                ids.pop(server.id, None)
                if not ids:
                    del self._by_name[server.name]

    async def stop_agent(self, target: str, *, reason: str = "normal") -> None:
        """Stop an agent for good (it is not restarted), with its linked children."""
        server = self.lookup(target)
        if server._task is asyncio.current_task():
            server._stopping = True  # an agent stopping itself: finish the current instruction
            return
        sup = self._supervisor_of.pop(server.id, None)
        if sup is not None and sup.running:
            await sup.terminate_child(server.id)
            await sup.delete_child(server.id)
        else:
            await server.stop()
        log.info("agent %s stopped (%s)", server.id, reason)

    async def restart_agent(self, target: str) -> bool:
        """Stop a supervised agent and start it again from its initial state (a recovery
        action for a stuck agent); False when it is not supervised (nothing to restart it)."""
        server = self.lookup(target)
        sup = self._supervisor_of.get(server.id)
        if sup is None or not sup.running:
            return False
        await sup.terminate_child(server.id)
        await sup.restart_child(server.id)
        return True

    def get_id(self, agent_id: str) -> AgentServer | None:
        """The running agent with exactly this id (never a match by name)."""
        return self._table.get(agent_id)

    def get(self, target: str) -> AgentServer | None:
        """The running agent with this id, or else the only running agent with this name."""
        server = self._table.get(target)
        if server is not None:
            return server
        ids = self._by_name.get(target)
        if ids is not None and len(ids) == 1:
            return self._table.get(next(iter(ids)))
        return None

    def lookup(self, target: str) -> AgentServer:
        server = self.get(target)
        if server is None:
            if len(self._by_name.get(target, ())) > 1:
                raise AgentError(f"{target!r} names several agents; address one by id")
            raise UnknownAgent(f"no running agent with id or name {target!r} on {self.node_id}")
        return server

    def find(self, name: str) -> list[AgentServer]:
        """Every running agent of this definition name."""
        return [self._table[i] for i in self._by_name.get(name, ()) if i in self._table]

    def agents(self) -> list[AgentInfo]:
        return [
            AgentInfo(
                id=s.id,
                name=s.name,
                running=s.running,
                mailbox=s.mailbox_depth,
                processed=s.processed,
                errors=s.errors,
                supervised=s.id in self._supervisor_of,
            )
            for s in self._table.values()
        ]

    def __len__(self) -> int:
        return len(self._table)

    # ----------------------------------------------------------------- messaging
    async def call(self, target: str, message: Message, *, timeout: float | None = 5.0) -> Any:
        return await self.lookup(target).call(message, timeout=timeout)

    async def call_direct(self, target: str, message: Message, *, timeout: float) -> Any:
        """:meth:`call`, run on the caller's task when the agent is idle (see
        :meth:`AgentServer.call_direct`): the serving side of ``cluster.call``."""
        return await self.lookup(target).call_direct(message, timeout=timeout)

    async def cast(self, target: str, message: Message, *, timeout: float | None = 5.0) -> None:
        await self.lookup(target).cast(message, timeout=timeout)

    async def send(self, agent: str, signal: Signal, *, node: str | None = None) -> None:
        """Deliver a signal to an agent on this node or, through the remote sender, another."""
        if node is None or node == self.node_id:
            await self.cast(agent, signal)
            return
        if self.remote_sender is None:
            raise AgentError(f"cannot send to node {node!r}: this runtime has no transport")
        await self.remote_sender(node, agent, signal)

    def register_directive(
        self, directive: type[D], handler: Callable[[AgentServer, D], Awaitable[None] | None]
    ) -> None:
        """Teach the runtime a user-defined directive."""
        if not (isinstance(directive, type) and issubclass(directive, Directive)):
            raise TypeError(f"{directive!r} is not a Directive subclass")
        self._directive_handlers[directive] = handler

    # ----------------------------------------------------------------- sensors
    def start_sensor(self, key: str, sensor: Sensor) -> None:
        """Run a sensor whose signals are published on the bus."""
        old = self._sensor_tasks.pop(key, None)
        if old is not None:
            old.cancel()
        self._sensor_tasks[key] = self._spawn_task(
            self._run_sensor(key, sensor), name=f"sensor:{key}"
        )

    def stop_sensor(self, key: str) -> None:
        task = self._sensor_tasks.pop(key, None)
        if task is not None:
            task.cancel()

    async def _run_sensor(self, key: str, sensor: Sensor) -> None:
        try:
            await sensor.run(self.bus.publish, self.clock)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("runtime sensor %s failed", key)
        finally:
            if self._sensor_tasks.get(key) is asyncio.current_task():
                del self._sensor_tasks[key]
