"""FailureDetector and NodeDiscovery decide purely: table tests on ``cmd``."""

from __future__ import annotations

import pytest

from agentcluster.agents import Emit, Schedule
from agentcluster.agents.agent import run_cmd
from agentcluster.clustering.base import Discover, JoinPeers, MemberEventData
from agentcluster.clustering.failure_detector import FailureDetector
from agentcluster.clustering.node_discovery import (
    RISK_THRESHOLD,
    NodeDiscovery,
    failure_risk,
)
from agentcluster.signals import Signal


def event(kind: str, name: str = "n2", state: str | None = None, **kw: object) -> Signal:
    states = {"joined": "alive", "alive": "alive", "updated": "alive", "suspect": "suspect",
              "dead": "dead", "left": "left", "reaped": "dead"}  # fmt: skip
    data = MemberEventData(
        kind=kind,
        name=name,
        addr=f"{name}:7946",
        state=state or states[kind],
        incarnation=int(kw.pop("incarnation", 1)),
        at=float(kw.pop("at", 10.0)),  # type: ignore[call-overload]
        **kw,  # type: ignore[arg-type]
    )
    return Signal(type="membership.events", data={"events": [data]})


@pytest.mark.parametrize(
    ("kind", "signal_type", "graceful"),
    [
        ("suspect", "cluster.member.suspect", False),
        ("alive", "cluster.member.alive", False),
        ("dead", "cluster.member.dead", False),
        ("left", "cluster.member.dead", True),
        ("joined", None, False),
        ("updated", None, False),
    ],
)
def test_failure_detector_publishes_liveness(
    kind: str, signal_type: str | None, graceful: bool
) -> None:
    agent, directives = run_cmd(FailureDetector(), event(kind, accuser="n3", confirmations=2))
    emitted = [d.signal for d in directives if isinstance(d, Emit)]
    if signal_type is None:
        assert emitted == []
    else:
        (sig,) = emitted
        assert sig.type == signal_type and sig.subject == "n2"
        assert sig.data["accuser"] == "n3" and sig.data["confirmations"] == 2
        assert sig.data["incarnation"] == 1 and sig.data["graceful"] is graceful
        assert sig.causation_id is not None  # traceable to the membership event
    assert agent.state.members["n2"].state == {"left": "left"}.get(
        kind, agent.state.members["n2"].state
    )


def test_failure_detector_counts_and_reaps() -> None:
    agent = FailureDetector()
    for kind in ("joined", "suspect", "alive", "suspect", "dead", "reaped"):
        agent, _ = run_cmd(agent, event(kind))
    assert (agent.state.suspicions, agent.state.refutations, agent.state.deaths) == (2, 1, 1)
    assert "n2" not in agent.state.members


def test_node_discovery_topology_and_history() -> None:
    agent = NodeDiscovery()
    agent, d1 = run_cmd(agent, event("joined", zone="z1", rtt=0.001))
    types = [d.signal.type for d in d1 if isinstance(d, Emit)]
    assert types == ["cluster.member.joined", "cluster.topology.changed"]
    topo = [d.signal for d in d1 if isinstance(d, Emit)][1]
    assert topo.data == {"changes": [{"change": "joined", "name": "n2"}], "members": 1}
    agent, d2 = run_cmd(agent, event("suspect"))
    assert [d.signal.type for d in d2 if isinstance(d, Emit)] == []
    agent, d3 = run_cmd(agent, event("dead"))
    assert [d.signal.type for d in d3 if isinstance(d, Emit)] == [
        "cluster.member.left",
        "cluster.topology.changed",
    ]
    assert [h.kind for h in agent.state.history] == ["joined", "dead"]


def test_a_batch_is_applied_in_order_with_one_topology_signal() -> None:
    batch = [event(k, name=f"m{i}").data["events"][0] for i, k in enumerate(("joined",) * 5)]
    batch.append(event("dead", name="m0").data["events"][0])
    agent, directives = run_cmd(
        NodeDiscovery(), Signal(type="membership.events", data={"events": batch})
    )
    assert [h.name for h in agent.state.history] == ["m0", "m1", "m2", "m3", "m4", "m0"]
    emitted = [d.signal for d in directives if isinstance(d, Emit)]
    assert [s.type for s in emitted].count("cluster.topology.changed") == 1
    assert emitted[-1].data["members"] == 4
    assert [s.type for s in emitted[:-1]] == ["cluster.member.joined"] * 5 + ["cluster.member.left"]
    fd, out = run_cmd(FailureDetector(), Signal(type="membership.events", data={"events": batch}))
    assert [d.signal.type for d in out] == ["cluster.member.dead"]  # type: ignore[attr-defined]
    assert len(fd.state.members) == 5


def test_history_is_bounded() -> None:
    agent = NodeDiscovery()
    for i in range(300):
        agent, _ = run_cmd(agent, event("joined", name=f"m{i}"))
    assert len(agent.state.history) == 256
    assert agent.state.history[-1].name == "m299"


@pytest.mark.parametrize(
    ("rtt", "loss", "bandwidth", "risk"),
    [
        (None, 0.0, None, 0.0),
        (0.25, 0.0, None, 0.4),
        (0.5, 1.0, None, 0.8),
        (0.0, 0.5, 0.0, 0.4),
        (0.125, 0.25, 50e6, 0.4),
    ],
)
def test_failure_risk_formula(
    rtt: float | None, loss: float, bandwidth: float | None, risk: float
) -> None:
    assert failure_risk(rtt, loss, bandwidth) == pytest.approx(risk)


def test_high_risk_records_a_prediction() -> None:
    agent = NodeDiscovery()
    agent, _ = run_cmd(agent, event("joined", rtt=0.5))
    for _ in range(6):  # suspected again and again (probes to it keep failing)
        agent, directives = run_cmd(agent, event("suspect", rtt=0.5))
    assert agent.state.metrics["n2"].risk > RISK_THRESHOLD
    assert agent.state.predictions and agent.state.predictions[-1].name == "n2"
    assert any(
        isinstance(d, Emit) and d.signal.type == "cluster.member.at_risk" for d in directives
    )


def test_discovery_round_asks_the_node_and_joins_only_new_candidates() -> None:
    agent = NodeDiscovery(id="nd")
    agent, directives = run_cmd(agent, Signal(type="cluster.discovery.tick"))
    assert isinstance(directives[0], Discover) and directives[0].reply_to == "nd"
    # Alone (no live peer yet): the next round comes soon, backing off 0.5, 1, 2 ... <= interval.
    assert isinstance(directives[1], Schedule) and directives[1].after == 0.5
    _, again = run_cmd(agent, Signal(type="cluster.discovery.tick"))
    assert again[1].after == 1.0  # type: ignore[attr-defined]
    agent, _ = run_cmd(agent, event("joined", name="n2"))
    _, later = run_cmd(agent, Signal(type="cluster.discovery.tick"))
    assert later[1].after == agent.state.interval  # type: ignore[attr-defined]
    result = Signal(
        type="cluster.discovery.result",
        data={
            "candidates": ["n2:7946", "n3:7946", "me:7946"],
            "errors": {"dns": "timeout"},
            "self_addr": "me:7946",
        },
    )
    agent, directives = run_cmd(agent, result)
    assert directives == [JoinPeers(("n3:7946",))]
    assert agent.state.rounds == 1 and agent.state.last_errors == {"dns": "timeout"}
