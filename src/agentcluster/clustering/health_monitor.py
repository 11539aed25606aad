"""HealthMonitor: the agent that judges the health of this node and of its peers.

Theory of operation: the node's health service does the measuring -- vitals, anomaly
detectors, alert rules, the checks (a basic check is a stream ping to each peer) -- and
reports every cycle (``cluster.health.report``). This agent decides what the reports mean:

* **Peers.** A peer that failed ``unhealthy_after`` checks in a row is *unhealthy*; one whose
  recent round trips (the median of the last three) exceed ``degraded_factor`` times the
  typical round trip of the *other* peers (and ``degraded_floor``) is *degraded*. Liveness stays the
  FailureDetector's business: a slow or hogged node is degraded, not dead.
* **Quarantine by consensus.** A peer that stays degraded or unhealthy for ``confirm``
  reports is proposed for quarantine to every health monitor (:class:`ProposeQuarantine`, a
  majority proposal). Each monitor votes from its *own* checks of that peer -- yes if it sees
  the problem too, no if its checks pass, abstain without data -- so one degraded observer
  cannot evict a healthy node on its own. An accepted decision reaches every monitor
  (``cluster.health.quarantine_decided``) and each applies it (:class:`ApplyQuarantine`); the
  node stays a member, the load balancer stops routing to it, and recovery checks release it.
* **This node.** The severity of its own anomalies becomes its published status
  (:class:`SetOwnHealth`), which balancers use to weigh it down while it is degraded.
"""

from __future__ import annotations

import statistics
from typing import Any

import msgspec

from agentcluster.agents import Action, ActionContext, Agent, Directive, Every, Result, Skill
from agentcluster.clustering.base import ClusterAgentSkill
from agentcluster.coordination.proposals import VoteAction, VoteRequest
from agentcluster.coordination.voting import VoteChoice
from agentcluster.health.directives import (
    HEALTH_MONITOR,
    ApplyQuarantine,
    ProposeQuarantine,
    RunHealthCycle,
    SetOwnHealth,
    SetPeerHealth,
)

__all__ = ["HealthMonitor", "HealthMonitorState", "HealthReport", "PeerCheck", "PeerHealth"]


class PeerCheck(msgspec.Struct, frozen=True):
    peer: str
    ok: bool
    rtt: float = 0.0  # seconds; 0 when the check failed


class HealthReport(msgspec.Struct, frozen=True):
    at: float
    checks: list[PeerCheck] = []
    own_status: str = "healthy"  # from this node's anomalies
    own_reason: str = ""
    quarantined: list[str] = []


class PeerHealth(msgspec.Struct, frozen=True):
    status: str = "unknown"
    failures: int = 0  # consecutive failed checks
    rtts: list[float] = []  # the last few successful round trips, seconds
    bad_reports: int = 0  # consecutive reports with the peer degraded or unhealthy
    proposed_at: float = -1e9
    last_check: float = 0.0


class HealthMonitorState(msgspec.Struct, frozen=True):
    peers: dict[str, PeerHealth] = {}
    own: str = "healthy"
    own_reason: str = ""
    quarantined: list[str] = []
    cycles: int = 0
    proposals: int = 0
    # Decision thresholds (comment: why these defaults).
    # Three failed checks in a row: one lost ping is noise, three is a pattern.
    unhealthy_after: int = 3
    # A peer four times slower than the cluster's typical round trip is struggling ...
    degraded_factor: float = 4.0
    # ... but below 10 ms a loopback or LAN round trip is never a health problem.
    degraded_floor: float = 0.010
    # Reports in a row before proposing a quarantine: a short blip is not worth a vote.
    confirm: int = 3
    # Between two proposals about the same peer: the cluster already said no (or yes).
    cooldown: float = 30.0


def _judge(p: PeerHealth, typical: float, s: HealthMonitorState) -> str:
    if p.failures >= s.unhealthy_after:
        return "unhealthy"
    if not p.rtts:
        return "unknown" if p.failures == 0 else p.status
    recent = statistics.median(p.rtts[-3:])
    if recent > max(s.degraded_floor, s.degraded_factor * typical):
        return "degraded"
    return "healthy"


class _Tick(Action[msgspec.Struct]):
    name = "health_tick"

    def run(self, params: Any, ctx: ActionContext) -> list[Directive]:
        return [RunHealthCycle()]


class _Report(Action[HealthReport]):
    name = "health_report"
    description = "Fold a cycle's checks into the peers' health; propose quarantines."

    def run(self, report: HealthReport, ctx: ActionContext) -> Result:
        s: HealthMonitorState = ctx.state
        peers = dict(s.peers)
        for c in report.checks:
            p = peers.get(c.peer, PeerHealth())
            if c.ok:
                p = msgspec.structs.replace(
                    p, failures=0, rtts=[*p.rtts[-4:], c.rtt], last_check=report.at
                )
            else:
                p = msgspec.structs.replace(p, failures=p.failures + 1, last_check=report.at)
            peers[c.peer] = p
        medians = {n: statistics.median(p.rtts[-3:]) for n, p in peers.items() if p.rtts}
        directives: list[Directive] = []
        proposals = s.proposals
        quarantined = set(report.quarantined)
        for name, p in list(peers.items()):
            # Typical = the *other* peers' round trips: a slow peer must not raise its own bar
            # (with two peers it would be half the median).
            others = [m for n, m in medians.items() if n != name]
            typical = statistics.median(others) if others else 0.0
            status = _judge(p, typical, s)
            bad = status in ("degraded", "unhealthy")
            p = msgspec.structs.replace(
                p, status=status, bad_reports=p.bad_reports + 1 if bad else 0
            )
            if (
                bad
                and p.bad_reports >= s.confirm
                and name not in quarantined
                and report.at - p.proposed_at >= s.cooldown
            ):
                rtt = f"{statistics.median(p.rtts[-3:]) * 1000:.1f} ms" if p.rtts else "n/a"
                directives.append(
                    ProposeQuarantine(
                        name,
                        "unresponsive" if status == "unhealthy" else "degraded",
                        f"{p.failures} failed checks in a row, recent round trip {rtt}, "
                        f"typical {typical * 1000:.1f} ms",
                    )
                )
                p = msgspec.structs.replace(p, proposed_at=report.at)
                proposals += 1
            peers[name] = p
        if any(peers[n].status != (s.peers[n].status if n in s.peers else "") for n in peers):
            directives.append(SetPeerHealth(tuple(sorted((n, p.status) for n, p in peers.items()))))
        own, reason = report.own_status, report.own_reason
        if own != s.own:
            directives.append(SetOwnHealth(own, reason))
        new = msgspec.structs.replace(
            s,
            peers=peers,
            own=own,
            own_reason=reason,
            quarantined=sorted(quarantined),
            cycles=s.cycles + 1,
            proposals=proposals,
        )
        return Result(state=new, directives=directives)


class _Vote(VoteAction):
    name = "health_vote"

    def decide(self, request: VoteRequest, ctx: ActionContext) -> VoteChoice:
        s: HealthMonitorState = ctx.state
        proposal = request.proposal
        node = proposal.get("node") if isinstance(proposal, dict) else None
        if not isinstance(node, str):
            return "abstain"
        p = s.peers.get(node)
        if p is None or p.status == "unknown":
            return "abstain"  # no data of our own: neither accuse nor defend
        return "yes" if p.status in ("degraded", "unhealthy") else "no"


class _Decided(Action[msgspec.Struct]):
    name = "health_quarantine_decided"

    def run(self, params: Any, ctx: ActionContext) -> list[Directive]:
        signal = ctx.signal
        data = signal.data if signal is not None and isinstance(signal.data, dict) else {}
        node, reason = data.get("node"), data.get("reason", "degraded")
        if not isinstance(node, str):
            return []
        return [ApplyQuarantine(node, str(reason), str(data.get("decided_by", "")))]


class _Schedule(Skill):
    name = "health_schedule"
    description = "The health cycle clock."

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        # One second on a LAN: a degraded peer is noticed within a few seconds and a basic
        # check costs one stream round trip per peer (the design's 30 s is the `design`
        # preset of the checks themselves).
        interval: float = 1.0

    def schedules(self) -> list[Every]:
        return [Every(self.config.interval, "cluster.health.tick")]


class HealthMonitor(Agent):
    name = HEALTH_MONITOR
    description = "Judges this node's and its peers' health; quarantine by consensus."
    State = HealthMonitorState
    actions = (_Tick, _Report, _Vote, _Decided)
    routes = (
        ("cluster.health.tick", "health_tick"),
        ("cluster.health.report", "health_report"),
        ("cluster.consensus.vote_request", "health_vote"),
        ("cluster.health.quarantine_decided", "health_quarantine_decided"),
    )
    skills = (ClusterAgentSkill(), _Schedule())
