"""FailureDetector: the clustering agent in front of the SWIM + Lifeguard core.

Theory of operation: the core itself runs in the node's membership shell (it must answer
packets within milliseconds, so it never waits on a mailbox); this agent is the part of
failure detection that *decides what the rest of the node hears*. The membership events of
each core step arrive as one ``membership.events`` signal; the agent keeps its own view of each
member's liveness (state, incarnation, last change) and turns liveness changes into
``cluster.member.suspect`` / ``cluster.member.alive`` / ``cluster.member.dead`` signals on the
bus, carrying the incarnation, the accuser and the number of independent confirmations.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agentcluster.agents import Action, ActionContext, Agent, Emit, Result
from agentcluster.clustering.base import (
    ClusterAgentSkill,
    MemberEvents,
    MemberView,
    apply_to_view,
)
from agentcluster.signals import Signal

__all__ = ["FailureDetector", "FailureDetectorState"]

# Which core events are liveness news, and the signal each becomes.
_LIVENESS = {"suspect": "suspect", "alive": "alive", "dead": "dead", "left": "dead"}


class FailureDetectorState(msgspec.Struct):
    members: dict[str, MemberView] = {}
    suspicions: int = 0
    deaths: int = 0
    refutations: int = 0


class ApplyEvents(Action[MemberEvents]):
    name = "apply_membership_events"
    description = "Fold SWIM events into the liveness view and publish liveness changes."

    def run(self, batch: MemberEvents, ctx: ActionContext) -> Result:
        state: FailureDetectorState = ctx.state
        members = dict(state.members)
        suspicions, deaths, refutations = state.suspicions, state.deaths, state.refutations
        directives = []
        source = f"/node/{ctx.agent_id}"
        for ev in batch.events:
            apply_to_view(members, ev)
            kind = _LIVENESS.get(ev.kind)
            if kind is None:
                continue
            suspicions += kind == "suspect"
            deaths += kind == "dead"
            refutations += kind == "alive"
            data: dict[str, Any] = {
                "name": ev.name,
                "addr": ev.addr,
                "incarnation": ev.incarnation,
                "accuser": ev.accuser,
                "confirmations": ev.confirmations,
                "graceful": ev.kind == "left",
                "at": ev.at,
            }
            kind_type = f"cluster.member.{kind}"
            if ctx.signal is not None:
                sig = ctx.signal.caused(kind_type, data, source=source, subject=ev.name)
            else:
                sig = Signal(type=kind_type, source=source, subject=ev.name, data=data)
            directives.append(Emit(sig))
        return Result(
            state=FailureDetectorState(members, suspicions, deaths, refutations),
            directives=directives,
        )


class FailureDetector(Agent):
    name = "failure_detector"
    description = "SWIM + Lifeguard liveness: publishes suspect / alive / dead with evidence."
    State = FailureDetectorState
    actions = (ApplyEvents,)
    routes = (("membership.events", "apply_membership_events"),)
    skills = (ClusterAgentSkill(),)
