"""NodeDiscovery: finds peers, keeps the topology and its history, scores failure risk.

Theory of operation: on a schedule the agent asks the node to run its discovery strategies
(``Discover`` directive: the node does the I/O); the result comes back as a
``cluster.discovery.result`` signal and the agent decides whom to join (candidates that are
not live members; ``JoinPeers``). Membership events (``membership.events`` batches) maintain the
topology — who is a member, where, with which estimated RTT — and a bounded history of
changes; joins, leaves and metadata updates are published as ``cluster.member.joined`` /
``left`` / ``updated`` and every change as ``cluster.topology.changed``.

Failure risk per peer (the design's score, from latency, loss and bandwidth):
``risk = 0.4·min(1, rtt / rtt_bad) + 0.4·min(1, loss) + 0.2·(1 − min(1, bandwidth / bw_good))``
where *loss* is the fraction of the peer's recent liveness events that were suspicions (a
peer that keeps getting suspected loses probes) and bandwidth, when unknown, counts as good.
A score above 0.7 is recorded as a prediction (bounded list) and published as
``cluster.member.at_risk``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agentcluster.agents import Action, ActionContext, Agent, Emit, Result, Schedule
from agentcluster.clustering.base import (
    ClusterAgentSkill,
    Discover,
    JoinPeers,
    MemberEvents,
    MemberView,
    apply_to_view,
)
from agentcluster.signals import Signal

__all__ = ["NodeDiscovery", "NodeDiscoveryState", "failure_risk"]

HISTORY_LIMIT = 256  # enough to explain the last few incidents; bounded memory per node
PREDICTION_LIMIT = 64
RISK_THRESHOLD = 0.7  # the design's threshold for recording a failure prediction
RTT_BAD = 0.25  # seconds: an RTT this high scores full latency risk
BW_GOOD = 100e6  # bytes/s that count as "no bandwidth risk"
LOSS_WINDOW = 20  # liveness events per peer considered for the loss estimate


def failure_risk(rtt: float | None, loss: float, bandwidth: float | None = None) -> float:
    latency_part = min(1.0, (rtt or 0.0) / RTT_BAD)
    bw_part = 0.0 if bandwidth is None else 1.0 - min(1.0, bandwidth / BW_GOOD)
    return round(0.4 * latency_part + 0.4 * min(1.0, max(0.0, loss)) + 0.2 * bw_part, 4)


class TopologyChange(msgspec.Struct, frozen=True):
    at: float
    kind: str
    name: str
    addr: str
    zone: str = ""


class Prediction(msgspec.Struct, frozen=True):
    at: float
    name: str
    risk: float
    rtt: float | None
    loss: float


class PeerMetrics(msgspec.Struct, frozen=True):
    rtt: float | None = None
    recent: tuple[str, ...] = ()  # last liveness kinds, newest last
    risk: float = 0.0

    @property
    def loss(self) -> float:
        return self.recent.count("suspect") / len(self.recent) if self.recent else 0.0


RETRY_MIN = 0.5  # seconds: first retry when the node is alone (its seeds were not up yet)


class NodeDiscoveryState(msgspec.Struct):
    interval: float = 10.0
    # While the node has no live peer, rounds run sooner: RETRY_MIN doubling up to interval.
    retry_delay: float = RETRY_MIN
    self_addr: str = ""
    members: dict[str, MemberView] = {}
    history: list[TopologyChange] = []
    metrics: dict[str, PeerMetrics] = {}
    predictions: list[Prediction] = []
    rounds: int = 0
    last_candidates: list[str] = []
    last_errors: dict[str, str] = {}


class StartRound(Action[msgspec.Struct]):
    name = "discovery_round"

    def run(self, params: Any, ctx: ActionContext) -> Result:
        state: NodeDiscoveryState = ctx.state
        assert ctx.agent_id is not None
        alone = not any(
            v.addr != state.self_addr and v.state in ("alive", "suspect")
            for v in state.members.values()
        )
        delay = min(state.interval, state.retry_delay) if alone else state.interval
        retry = min(state.interval, state.retry_delay * 2) if alone else RETRY_MIN
        return Result(
            state=msgspec.structs.replace(state, retry_delay=retry),
            directives=[
                Discover(reply_to=ctx.agent_id),
                Schedule(delay, Signal(type="cluster.discovery.tick"), key="round"),
            ],
        )


class RoundResult(msgspec.Struct, frozen=True):
    candidates: list[str] = []
    errors: dict[str, str] = {}
    self_addr: str = ""


class HandleResult(Action[RoundResult]):
    name = "discovery_result"

    def run(self, params: RoundResult, ctx: ActionContext) -> Result:
        state: NodeDiscoveryState = ctx.state
        live = {v.addr for v in state.members.values() if v.state in ("alive", "suspect")}
        new = tuple(a for a in params.candidates if a not in live and a != params.self_addr)
        directives: list[Any] = [JoinPeers(new)] if new else []
        return Result(
            state=msgspec.structs.replace(
                state,
                rounds=state.rounds + 1,
                self_addr=params.self_addr or state.self_addr,
                last_candidates=list(params.candidates),
                last_errors=dict(params.errors),
            ),
            directives=directives,
        )


_TOPOLOGY_KINDS = {
    "joined": "joined",
    "updated": "updated",
    "left": "left",
    "dead": "left",
    "reaped": "left",
}


class Observe(Action[MemberEvents]):
    name = "observe_membership_events"

    def run(self, batch: MemberEvents, ctx: ActionContext) -> Result:
        state: NodeDiscoveryState = ctx.state
        # One copy per batch, not per event: a join brings hundreds of events in one batch.
        members = dict(state.members)
        metrics = dict(state.metrics)
        history = list(state.history)
        predictions = list(state.predictions)
        directives: list[Any] = []
        changes: list[dict[str, str]] = []
        source = f"/node/{ctx.agent_id}"
        for ev in batch.events:
            apply_to_view(members, ev)
            old = metrics.get(ev.name, PeerMetrics())
            recent = old.recent
            if ev.kind in ("suspect", "alive", "joined"):
                recent = (*recent, "suspect" if ev.kind == "suspect" else "ok")[-LOSS_WINDOW:]
            rtt = ev.rtt if ev.rtt is not None else old.rtt
            peer = PeerMetrics(rtt=rtt, recent=recent)
            peer = msgspec.structs.replace(peer, risk=failure_risk(rtt, peer.loss))
            if ev.kind == "reaped":
                metrics.pop(ev.name, None)
            else:
                metrics[ev.name] = peer
            kind = _TOPOLOGY_KINDS.get(ev.kind)
            if kind is not None:
                history.append(TopologyChange(ev.at, ev.kind, ev.name, ev.addr, ev.zone))
                changes.append({"change": ev.kind, "name": ev.name})
                data = {"name": ev.name, "addr": ev.addr, "zone": ev.zone, "region": ev.region,
                        "incarnation": ev.incarnation, "reason": ev.kind}  # fmt: skip
                directives.append(
                    Emit(
                        Signal(
                            type=f"cluster.member.{kind}", source=source, subject=ev.name, data=data
                        )
                    )
                )
            if peer.risk > RISK_THRESHOLD and ev.kind != "reaped":
                pred = Prediction(ev.at, ev.name, peer.risk, peer.rtt, peer.loss)
                predictions.append(pred)
                directives.append(
                    Emit(
                        Signal(
                            type="cluster.member.at_risk",
                            source=source,
                            subject=ev.name,
                            data=msgspec.to_builtins(pred),
                        )
                    )
                )
        if changes:
            alive = sum(1 for v in members.values() if v.state in ("alive", "suspect"))
            directives.append(
                Emit(
                    Signal(
                        type="cluster.topology.changed",
                        source=source,
                        data={"changes": changes, "members": alive},
                    )
                )
            )
        return Result(
            state=msgspec.structs.replace(
                state,
                members=members,
                history=history[-HISTORY_LIMIT:],
                metrics=metrics,
                predictions=predictions[-PREDICTION_LIMIT:],
            ),
            directives=directives,
        )


class NodeDiscovery(Agent):
    name = "node_discovery"
    description = "Finds peers, keeps the topology and its history, predicts failures."
    State = NodeDiscoveryState
    actions = (StartRound, HandleResult, Observe)
    routes = (
        ("cluster.discovery.tick", "discovery_round"),
        ("cluster.discovery.result", "discovery_result"),
        ("membership.events", "observe_membership_events"),
    )
    skills = (ClusterAgentSkill(),)

    def on_start(self) -> Result:
        return Result(
            directives=[Schedule(0.0, Signal(type="cluster.discovery.tick"), key="round")]
        )
