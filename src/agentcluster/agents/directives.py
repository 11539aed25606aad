"""Directives: what an agent asks the runtime to do.

Theory of operation: agents decide, the runtime acts. ``cmd`` is pure and returns the new
state plus a list of directives; the :class:`~agentcluster.agents.server.AgentServer` then
executes each directive in order. Directives are small frozen dataclasses (they may carry
callables or agent definitions, which is why they are not msgspec Structs: they never cross
the network themselves — a ``Send`` carries a Signal, and only the Signal is encoded).

Users add their own directive by subclassing :class:`Directive` and registering an executor
with ``Runtime.register_directive(MyDirective, handler)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentcluster.signals import Signal

if TYPE_CHECKING:
    from agentcluster.agents.agent import Agent
    from agentcluster.agents.sensors import Sensor

__all__ = [
    "Cancel",
    "Directive",
    "Emit",
    "Reply",
    "Schedule",
    "Send",
    "SpawnAgent",
    "StartSensor",
    "Stop",
    "StopAgent",
    "StopSensor",
]


@dataclass(frozen=True, slots=True)
class Directive:
    """Base class of every directive (the built-in ones and users' own)."""


@dataclass(frozen=True, slots=True)
class Emit(Directive):
    """Publish a signal on the node's bus (``to=None``) or deliver it to one local agent."""

    signal: Signal
    to: str | None = None


@dataclass(frozen=True, slots=True)
class Send(Directive):
    """Deliver a signal to an agent (by id or name) on a node; ``node=None`` means this node."""

    agent: str
    signal: Signal
    node: str | None = None


@dataclass(frozen=True, slots=True)
class Schedule(Directive):
    """Deliver ``signal`` to this agent after ``after`` seconds; ``key`` names the timer.

    Scheduling again with the same key replaces the pending timer (so periodic work that
    re-schedules itself never piles up timers).
    """

    after: float
    signal: Signal
    key: str | None = None

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ValueError(f"Schedule.after must be >= 0, got {self.after}")


@dataclass(frozen=True, slots=True)
class Cancel(Directive):
    """Cancel the pending timer scheduled with ``key`` (no error if it already fired)."""

    key: str


@dataclass(frozen=True, slots=True)
class SpawnAgent(Directive):
    """Start a child agent, linked to this one: it is stopped when this agent stops."""

    agent: type[Agent]
    id: str | None = None
    state: Any = None
    opts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StopAgent(Directive):
    """Stop a local agent by id or name."""

    agent: str
    reason: str = "normal"


@dataclass(frozen=True, slots=True)
class StartSensor(Directive):
    """Run a sensor whose signals are delivered to this agent; ``key`` names it for StopSensor."""

    sensor: Sensor
    key: str


@dataclass(frozen=True, slots=True)
class StopSensor(Directive):
    key: str


@dataclass(frozen=True, slots=True)
class Reply(Directive):
    """Answer the current ``call`` with ``data`` (ignored for a ``cast``)."""

    data: Any = None


@dataclass(frozen=True, slots=True)
class Stop(Directive):
    """Stop this agent after the current instruction; ``reason != 'normal'`` counts as a crash."""

    reason: str = "normal"
