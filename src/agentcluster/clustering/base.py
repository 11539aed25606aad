"""What every clustering agent shares: a health skill, member views and custom directives.

Theory of operation: clustering agents (FailureDetector, NodeDiscovery, and the ones later
issues add) are ordinary agents. They mount :class:`ClusterAgentSkill`, which keeps their
health status under the ``cluster`` state key and refreshes it on a heartbeat schedule, so
the node's control API can report each one's status and the age of its last heartbeat.

The node feeds membership events to them as ``membership.events`` signals whose data is a
:class:`MemberEvents` batch (one per core step, so a join's hundreds of events cost one
message and one state copy). When an agent wants the node to do I/O (run a discovery round,
join peers) it returns a directive defined here; the node registers their executors — agents
decide, the runtime acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from agentcluster.agents import Action, ActionContext, Directive, Every, Skill

__all__ = [
    "ClusterAgentSkill",
    "ClusterHealth",
    "Discover",
    "JoinPeers",
    "MemberEventData",
    "MemberEvents",
    "MemberView",
    "apply_to_view",
]


class MemberEventData(msgspec.Struct, frozen=True):
    """One SWIM membership event, as carried in a ``membership.events`` batch."""

    kind: str  # joined | updated | suspect | alive | dead | left | reaped
    name: str
    addr: str
    state: str
    incarnation: int
    at: float
    accuser: str | None = None
    confirmations: int = 0
    zone: str = ""
    region: str = ""
    rtt: float | None = None  # estimated by Vivaldi coordinates, seconds


class MemberEvents(msgspec.Struct, frozen=True):
    """The data of a ``membership.events`` signal: every event of one core step, in order."""

    events: list[MemberEventData]


class MemberView(msgspec.Struct, frozen=True):
    addr: str
    state: str
    incarnation: int
    zone: str = ""
    region: str = ""
    changed_at: float = 0.0
    rtt: float | None = None


def apply_to_view(members: dict[str, MemberView], ev: MemberEventData) -> None:
    """Fold one event into a (copied) member view: reaped members are forgotten."""
    if ev.kind == "reaped":
        members.pop(ev.name, None)
    else:
        members[ev.name] = MemberView(
            ev.addr, ev.state, ev.incarnation, ev.zone, ev.region, ev.at, ev.rtt
        )


class ClusterHealth(msgspec.Struct, frozen=True):
    status: str = "starting"  # starting -> healthy; the heartbeat proves the mailbox moves
    heartbeats: int = 0
    last_heartbeat: float = 0.0


class _HealthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Often enough that a wedged agent is visible within seconds; cheap (one local message).
    heartbeat_interval: float = 5.0


class _Beat(Action[msgspec.Struct]):
    name = "cluster_heartbeat"

    def run(self, params: Any, ctx: ActionContext) -> ClusterHealth:
        health: ClusterHealth = ctx.state
        return ClusterHealth("healthy", health.heartbeats + 1, ctx.clock.now())


class ClusterAgentSkill(Skill):
    name = "cluster"
    description = "Health status of a clustering agent, refreshed by a heartbeat schedule."
    Config = _HealthConfig
    State = ClusterHealth
    actions = (_Beat,)
    routes = (("cluster.agent.heartbeat", "cluster_heartbeat"),)

    def schedules(self) -> Sequence[Every]:
        return [Every(self.config.heartbeat_interval, "cluster.agent.heartbeat")]


@dataclass(frozen=True, slots=True)
class Discover(Directive):
    """Ask the node to run one discovery round; the result comes back as a signal
    ``cluster.discovery.result`` to ``reply_to``."""

    reply_to: str


@dataclass(frozen=True, slots=True)
class JoinPeers(Directive):
    """Ask the node to join the cluster through these addresses."""

    addrs: tuple[str, ...]
