"""The LoadBalancer agent's decisions, as pure commands: surges switch the strategy and are
proposed to the other balancers, quarantine signals reach the balancer, ticks and reports
become directives."""

from __future__ import annotations

from agentcluster.agents import cmd
from agentcluster.balancing.directives import (
    BalancerTick,
    ProposeSurge,
    ReportLoad,
    SetQuarantined,
    SetStrategy,
)
from agentcluster.clustering.load_balancer import LoadBalancer, LoadBalancerState
from agentcluster.coordination.proposals import VoteRequest
from agentcluster.signals import Signal


def _events(*kinds: str) -> Signal:
    return Signal(type="cluster.lb.events", data={"events": [{"kind": k} for k in kinds]})


def test_ticks_and_reports_become_directives() -> None:
    agent = LoadBalancer()
    _, d = cmd(agent, Signal(type="cluster.lb.tick"))
    assert d == [BalancerTick()]
    _, d = cmd(agent, Signal(type="cluster.lb.report"))
    assert d == [ReportLoad()]


def test_a_surge_switches_strategy_proposes_and_switches_back() -> None:
    agent = LoadBalancer(state=LoadBalancerState(strategy="latency_aware"))
    state, d = cmd(agent, _events("surge_start"))
    assert d == [SetStrategy("least_connections"), ProposeSurge("least_connections")]
    assert state.surge and state.surge_mode and state.surges == 1
    agent = agent.with_state(state)
    # A second start while surging changes nothing; the end switches back.
    state, d = cmd(agent, _events("surge_start"))
    assert d == []
    state, d = cmd(agent.with_state(state), _events("breaker", "surge_end"))
    assert d == [SetStrategy("latency_aware")]
    assert not state.surge and not state.surge_mode and state.events == 4


def test_a_cluster_surge_decision_switches_a_calm_balancer() -> None:
    agent = LoadBalancer()
    state, d = cmd(agent, Signal(type="cluster.lb.surge_decided", data={}))
    assert d == [SetStrategy("least_connections")] and state.surge_mode
    _, d = cmd(agent.with_state(state), Signal(type="cluster.lb.surge_decided", data={}))
    assert d == []


def test_balancers_vote_on_surges_from_their_own_view() -> None:
    request = VoteRequest("r1", "n2/load_balancer", {"strategy": "x"}, "n1", 2.0, "lb.surge")
    signal = Signal(type="cluster.consensus.vote_request", data=request)
    _, d = cmd(LoadBalancer(state=LoadBalancerState(surge=True)), signal)
    assert d[0].signal.data["vote"] == "yes"  # type: ignore[attr-defined]
    _, d = cmd(LoadBalancer(), signal)
    assert d[0].signal.data["vote"] == "abstain"  # type: ignore[attr-defined]


def test_quarantine_signals_reach_the_balancer() -> None:
    agent = LoadBalancer()
    state, d = cmd(agent, Signal(type="cluster.health.quarantine.started", data={"node": "n3"}))
    assert d == [SetQuarantined(("n3",))]
    state, d = cmd(
        agent.with_state(state),
        Signal(type="cluster.health.quarantine.started", data={"node": "n1"}),
    )
    assert d == [SetQuarantined(("n1", "n3"))]
    state, d = cmd(
        agent.with_state(state),
        Signal(type="cluster.health.quarantine.released", data={"node": "n3"}),
    )
    assert d == [SetQuarantined(("n1",))] and state.quarantined == ["n1"]
    _, d = cmd(agent.with_state(state), Signal(type="cluster.health.quarantine.started"))
    assert d == []  # no node named: nothing to do
