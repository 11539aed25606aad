"""LoadBalancer: the agent that runs the control plane of request routing.

Theory of operation: the *data plane* -- picking a node for each call, counting outcomes,
tripping breakers, ejecting outliers -- is the :class:`~agentcluster.balancing.balancer.Balancer`
core, called directly on the call path (a routing decision never waits on a mailbox). This
agent decides everything that is not per request, and the node carries it out:

* every second (``cluster.lb.tick``) it asks for a balancer tick (:class:`BalancerTick`):
  periodic outlier detection, breaker timers, slow-start ramps, surge detection; what changed
  comes back as ``cluster.lb.events`` and is published on the bus;
* every few seconds (``cluster.lb.report``) it asks the node to publish its load -- CPU,
  memory, calls in flight -- in its membership metadata (:class:`ReportLoad`), which is how
  other balancers learn it;
* a **surge** (the request rate far above its baseline) switches this node to the surge
  strategy (:class:`SetStrategy`) and proposes the same to the other balancers through the
  MABEAM layer (:class:`ProposeSurge`, a majority proposal among the ``load_balancer``
  agents); each balancer votes yes when it sees elevated load itself. An accepted proposal
  (``cluster.lb.surge_decided``) switches every balancer for ``surge_hold`` ticks; the
  proposer renews it (proposes again) every half hold while its own surge lasts, so a
  balancer goes back to its normal strategy once its own detector is calm *and* the last
  decision has expired -- a balancer that only accepted the decision has no surge_end of its
  own to end it, and a lost renewal or a crashed proposer must not pin it for good;
* quarantine decisions from the HealthMonitor (``cluster.health.quarantine.*``) take a node
  out of rotation while it stays a member (:class:`SetQuarantined`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from agentcluster.agents import Action, ActionContext, Agent, Directive, Every, Result, Skill
from agentcluster.balancing.directives import (
    BalancerTick,
    ProposeSurge,
    ReportLoad,
    SetQuarantined,
    SetStrategy,
)
from agentcluster.clustering.base import ClusterAgentSkill
from agentcluster.coordination.proposals import VoteAction, VoteRequest
from agentcluster.coordination.voting import VoteChoice

__all__ = ["LoadBalancer", "LoadBalancerState"]


class LoadBalancerState(msgspec.Struct, frozen=True):
    strategy: str = "latency_aware"  # the normal strategy
    surge_strategy: str = "least_connections"  # P2C on in-flight: robust when latency lags
    surge: bool = False  # this node's own detector sees a surge
    surge_mode: bool = False  # routing with the surge strategy (own surge or cluster decision)
    # Ticks (one a second) an accepted cluster surge decision holds every balancer in surge
    # mode: long enough to ride out a surge between the proposer's renewals (every half
    # hold), short enough that a calm cluster is back on its normal strategy within a minute.
    surge_hold: int = 60
    hold_left: int = 0  # ticks the last accepted cluster decision still holds
    since_proposal: int = 0  # ticks since this node last proposed (renews at surge_hold // 2)
    quarantined: list[str] = []
    events: int = 0
    surges: int = 0


class LbEvents(msgspec.Struct, frozen=True):
    events: list[dict[str, Any]] = []


def _calm_down(state: LoadBalancerState, directives: list[Directive]) -> LoadBalancerState:
    """Back to the normal strategy when nothing holds the surge strategy any more: neither
    this node's own detector nor an unexpired cluster decision."""
    if state.surge_mode and not state.surge and state.hold_left <= 0:
        directives.append(SetStrategy(state.strategy))
        return msgspec.structs.replace(state, surge_mode=False)
    return state


class _Tick(Action[msgspec.Struct]):
    name = "lb_tick"

    def run(self, params: Any, ctx: ActionContext) -> Result:
        state: LoadBalancerState = ctx.state
        directives: list[Directive] = [BalancerTick()]
        hold_left = max(0, state.hold_left - 1)
        since = state.since_proposal + 1 if state.surge else state.since_proposal
        if state.surge and since >= max(1, state.surge_hold // 2):
            # Still surging here: renew the cluster decision before it expires elsewhere.
            directives.append(ProposeSurge(state.surge_strategy))
            since = 0
        new = msgspec.structs.replace(state, hold_left=hold_left, since_proposal=since)
        new = _calm_down(new, directives)
        if new == state:
            return Result(directives=directives)
        return Result(state=new, directives=directives)


class _Report(Action[msgspec.Struct]):
    name = "lb_report"

    def run(self, params: Any, ctx: ActionContext) -> list[Directive]:
        return [ReportLoad()]


class _Events(Action[LbEvents]):
    name = "lb_events"
    description = "Balancer events: a surge starts or ends -> adapt the strategy, tell peers."

    def run(self, batch: LbEvents, ctx: ActionContext) -> Result:
        state: LoadBalancerState = ctx.state
        surge, mode, surges = state.surge, state.surge_mode, state.surges
        since = state.since_proposal
        directives: list[Directive] = []
        for ev in batch.events:
            kind = ev.get("kind")
            if kind == "surge_start" and not surge:
                surge, surges = True, surges + 1
                if not mode:
                    mode = True
                    directives.append(SetStrategy(state.surge_strategy))
                directives.append(ProposeSurge(state.surge_strategy))
                since = 0
            elif kind == "surge_end" and surge:
                surge = False
                if mode and state.hold_left <= 0:
                    mode = False
                    directives.append(SetStrategy(state.strategy))
                # else: a cluster decision still holds; the tick that expires it reverts.
        new = msgspec.structs.replace(
            state,
            surge=surge,
            surge_mode=mode,
            surges=surges,
            since_proposal=since,
            events=state.events + len(batch.events),
        )
        return Result(state=new, directives=directives)


class _SurgeDecided(Action[msgspec.Struct]):
    name = "lb_surge_decided"
    description = "The balancers agreed on a surge: route with the surge strategy for a while."

    def run(self, params: Any, ctx: ActionContext) -> Result:
        state: LoadBalancerState = ctx.state
        # Every decision (a renewal too) restarts the hold: it is the decision's lifetime,
        # not the surge's, so a balancer that never sees the surge end still comes back.
        new = msgspec.structs.replace(state, surge_mode=True, hold_left=state.surge_hold)
        directives: list[Directive] = []
        if not state.surge_mode:
            directives.append(SetStrategy(state.surge_strategy))
        return Result(state=new, directives=directives)


class _Vote(VoteAction):
    name = "lb_vote"

    def decide(self, request: VoteRequest, ctx: ActionContext) -> VoteChoice:
        state: LoadBalancerState = ctx.state
        # A balancer that sees the surge itself agrees; one that does not abstains rather
        # than blocks: a surge on part of the cluster is still worth the safer strategy.
        return "yes" if state.surge else "abstain"


class _Quarantine(Action[msgspec.Struct]):
    name = "lb_quarantine"

    def run(self, params: Any, ctx: ActionContext) -> Result:
        state: LoadBalancerState = ctx.state
        signal = ctx.signal
        if signal is None or not isinstance(signal.data, dict):
            return Result()
        node = signal.data.get("node")
        if not isinstance(node, str):
            return Result()
        nodes = dict.fromkeys(state.quarantined)
        if signal.type.endswith(".released"):
            nodes.pop(node, None)
        else:
            nodes[node] = None
        quarantined = sorted(nodes)
        return Result(
            state=msgspec.structs.replace(state, quarantined=quarantined),
            directives=[SetQuarantined(tuple(quarantined))],
        )


class _LbSchedules(Skill):
    name = "lb_schedule"
    description = "The balancer's clocks: a tick every second, a load report every 5 s."

    def schedules(self) -> list[Every]:
        # One second: outlier detection and slow start need no finer steps; five seconds of
        # load-report staleness is what gossiped metadata can carry cheaply.
        return [Every(1.0, "cluster.lb.tick"), Every(5.0, "cluster.lb.report")]


class LoadBalancer(Agent):
    name = "load_balancer"
    description = "Request routing control plane: ticks, load reports, surges, quarantine."
    State = LoadBalancerState
    actions = (_Tick, _Report, _Events, _SurgeDecided, _Vote, _Quarantine)
    routes = (
        ("cluster.lb.tick", "lb_tick"),
        ("cluster.lb.report", "lb_report"),
        ("cluster.lb.events", "lb_events"),
        ("cluster.lb.surge_decided", "lb_surge_decided"),
        ("cluster.consensus.vote_request", "lb_vote"),
        ("cluster.health.quarantine.*", "lb_quarantine"),
    )
    skills = (ClusterAgentSkill(), _LbSchedules())
