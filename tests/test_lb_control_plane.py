"""The load balancer's control plane end to end: a cluster surge decision ends everywhere, a
node's own load and health reach its own endpoint, and the ``routes`` view (op, Cluster, CLI)
is valid JSON, shows the weights actually used and as many decisions as asked for."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agentcluster.agents import cmd
from agentcluster.balancing.balancer import Balancer
from agentcluster.balancing.base import Endpoint, PickRequest
from agentcluster.balancing.directives import BalancerTick, ProposeSurge, SetStrategy
from agentcluster.cluster import Cluster
from agentcluster.clustering.load_balancer import LoadBalancer, LoadBalancerState
from agentcluster.control import ControlRequest, handle_control
from agentcluster.examples.worker import Echo
from agentcluster.signals import Signal
from agentcluster.testing.simcluster import SimCluster

_DECIDED = Signal(type="cluster.lb.surge_decided", data={})
_TICK = Signal(type="cluster.lb.tick")


def _events(*kinds: str) -> Signal:
    return Signal(type="cluster.lb.events", data={"events": [{"kind": k} for k in kinds]})


def _run(agent: LoadBalancer, state: LoadBalancerState, signal: Signal) -> tuple[Any, list[Any]]:
    return cmd(agent.with_state(state), signal)


# -- a cluster surge decision has an end -------------------------------------------------------
def test_a_calm_balancer_switched_by_a_cluster_decision_switches_back() -> None:
    agent = LoadBalancer(state=LoadBalancerState(strategy="latency_aware"))
    state, d = cmd(agent, _DECIDED)
    assert d == [SetStrategy("least_connections")]
    # Two minutes of ticks and ordinary balancer events, no surge here: the decision expires.
    emitted = []
    for _ in range(120):
        for sig in (_TICK, _events("breaker", "threshold_cleared")):
            state, d = _run(agent, state, sig)
            emitted.extend(d)
    assert emitted.count(SetStrategy("latency_aware")) == 1 and not state.surge_mode


def test_a_calm_balancer_reverts_when_the_cluster_decision_expires() -> None:
    agent = LoadBalancer(state=LoadBalancerState(strategy="latency_aware", surge_hold=10))
    state, d = cmd(agent, _DECIDED)
    assert d == [SetStrategy("least_connections")]
    for _ in range(9):
        state, d = _run(agent, state, _TICK)
        assert d == [BalancerTick()]  # the decision still holds
    # A renewal (the proposer still surging) restarts the hold.
    state, d = _run(agent, state, _DECIDED)
    assert d == [] and state.surge_mode
    for _ in range(9):
        state, d = _run(agent, state, _TICK)
        assert d == [BalancerTick()]
    state, d = _run(agent, state, _TICK)
    assert d == [BalancerTick(), SetStrategy("latency_aware")]
    assert not state.surge_mode
    state, d = _run(agent, state, _TICK)
    assert d == [BalancerTick()]  # switched back once


def test_a_proposer_whose_surge_ended_before_the_decision_reverts_when_it_expires() -> None:
    agent = LoadBalancer(state=LoadBalancerState(strategy="latency_aware", surge_hold=5))
    state, d = cmd(agent, _events("surge_start"))
    assert d == [SetStrategy("least_connections"), ProposeSurge("least_connections")]
    state, d = _run(agent, state, _events("surge_end"))
    assert d == [SetStrategy("latency_aware")]  # no decision yet: back at once
    state, d = _run(agent, state, _DECIDED)  # the decision arrives late
    assert d == [SetStrategy("least_connections")]
    emitted = []
    for _ in range(5):
        state, d = _run(agent, state, _TICK)
        emitted.extend(d)
    assert emitted[-1] == SetStrategy("latency_aware") and not state.surge_mode
    assert emitted.count(SetStrategy("latency_aware")) == 1


def test_own_surge_end_waits_for_the_cluster_decision_and_a_surge_renews_it() -> None:
    agent = LoadBalancer(state=LoadBalancerState(strategy="latency_aware", surge_hold=6))
    state, _ = cmd(agent, _events("surge_start"))
    state, _ = _run(agent, state, _DECIDED)
    proposals = 0
    for _ in range(7):  # still surging here: renewed every half hold, never reverted
        state, d = _run(agent, state, _TICK)
        proposals += d.count(ProposeSurge("least_connections"))
        assert SetStrategy("latency_aware") not in d
    assert proposals == 2
    state, _ = _run(agent, state, _DECIDED)  # the renewal is accepted
    state, d = _run(agent, state, _events("surge_end"))
    assert d == [] and state.surge_mode  # the cluster decision still holds
    emitted = []
    for _ in range(6):
        state, d = _run(agent, state, _TICK)
        emitted.extend(d)
    assert ProposeSurge("least_connections") not in emitted  # calm: no more renewals
    assert emitted[-1] == SetStrategy("latency_aware") and not state.surge_mode


@pytest.mark.virtual_time
async def test_a_surge_on_one_node_ends_on_every_node() -> None:
    async with SimCluster(3, seed=7, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)

        def registered() -> bool:
            return all(
                len(c.nodes[n].registry.index.find_capable("cluster.load_balancer")) == 3
                for n in c.names
            )

        await c.wait_until(registered, timeout=30)
        n2 = c.nodes["n2"].balancer
        n2.set_strategy("round_robin", capability="echo", now=c.clock.now())
        lb1 = c.nodes["n1"].runtime.get("load_balancer")
        assert lb1 is not None
        lb1.cast_nowait(_events("surge_start"))  # n1's own detector sees a surge
        await c.wait_until(
            lambda: all(c.nodes[n].balancer.strategy == "least_connections" for n in c.names),
            timeout=20,
        )
        lb1.cast_nowait(_events("surge_end"))  # ... and it ends
        await c.clock.sleep(120.0)  # past the decision's hold
        # n2 and n3 never saw the surge themselves; they are back on their normal strategy.
        assert {n: c.nodes[n].balancer.strategy for n in c.names} == dict.fromkeys(
            c.names, "latency_aware"
        )
        assert n2.snapshot(c.clock.now())["overrides"] == {"echo": "round_robin"}


# -- a node's own metadata reaches its own endpoint --------------------------------------------
@pytest.mark.virtual_time
async def test_own_load_report_reaches_own_endpoint() -> None:
    async with SimCluster(2, seed=11) as c:
        await c.wait_until(c.converged, timeout=30)
        await c.clock.sleep(30.0)  # the first load reports are out
        n1 = c.nodes["n1"]
        await n1.runtime.spawn(Echo)
        await Cluster.of(n1).register("echo", capabilities=["echo"])
        await c.wait_until(lambda: len(n1.registry.index.find_capable("echo")) == 1, timeout=10)
        cluster = Cluster.of(n1)
        await cluster.call("echo", "app.echo", {}, timeout=2.0)
        n1.lb.load_probe = lambda: (0.9, 0.8)
        n1.lb._report_load(None, None)  # type: ignore[arg-type]  # what ReportLoad runs
        assert n1.core.member("n1").meta.capacity["cpu"] == 0.9  # type: ignore[union-attr]
        await c.clock.sleep(30.0)
        await cluster.call("echo", "app.echo", {}, timeout=2.0)
        view = await cluster.routes()
        (me,) = [n for n in view["nodes"] if n["node"] == "n1"]
        assert (me["cpu"], me["memory"]) == (0.9, 0.8)
        view = await cluster.routes(decisions=1)  # the local Cluster passes the count on
        assert len(view["decisions"]) == 1


@pytest.mark.virtual_time
async def test_own_unhealthy_status_takes_own_endpoint_out() -> None:
    async with SimCluster(2, seed=12) as c:
        await c.wait_until(c.converged, timeout=30)
        for n in c.names:
            await c.nodes[n].runtime.spawn(Echo)
            await Cluster.of(c.nodes[n]).register("echo", capabilities=["echo"])
        n1 = c.nodes["n1"]
        await c.wait_until(lambda: len(n1.registry.index.find_capable("echo")) == 2, timeout=10)
        await c.clock.sleep(30.0)
        cluster = Cluster.of(n1)
        await cluster.call("echo", "app.echo", {}, timeout=2.0)
        assert n1.balancer.eligible("echo") == ("n1", "n2")
        # What HealthService._set_own does when n1's own monitor finds it unhealthy.
        tags = n1.core.member("n1").meta.tags  # type: ignore[union-attr]
        n1.update_meta(tags={**tags, "health": "unhealthy"})
        await cluster.call("echo", "app.echo", {}, timeout=2.0)
        assert n1.balancer.eligible("echo") == ("n2",)


# -- the routes view ---------------------------------------------------------------------------
def _reject(name: str) -> float:
    raise ValueError(f"not JSON: {name}")


def _balancer_with(picks: int) -> Balancer:
    b = Balancer(rng=random.Random(1))
    b.set_endpoints("echo", [Endpoint("n2")], 0.0)
    for i in range(picks):
        node = b.pick("echo", PickRequest(), float(i))
        b.finished("echo", node, 0.001, True, float(i))
    return b


class _FakeCluster:
    """What the CLI's ``routes`` command talks to: answers as the node's op would."""

    def __init__(self, b: Balancer) -> None:
        self.b = b
        self.asked: list[int] = []

    async def routes(self, *, decisions: int = 50) -> dict[str, Any]:
        self.asked.append(decisions)
        return self.b.snapshot(1e6, decisions=decisions)


def _cli(monkeypatch: pytest.MonkeyPatch, fake: Any, *args: str) -> str:
    import asyncio

    from typer.testing import CliRunner

    import agentcluster.cli.mabeam as mabeam
    from agentcluster.cli.main import app

    monkeypatch.setattr(mabeam, "_run", lambda node, key, timeout, fn: asyncio.run(fn(fake)))
    out = CliRunner().invoke(app, ["routes", "--node", "127.0.0.1:7946", *args])
    assert out.exit_code == 0, out.output
    return out.stdout


def test_routes_json_is_valid_json_with_a_garbled_peer_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = Balancer(rng=random.Random(1))
    b.set_endpoints("echo", [Endpoint("n2", cpu=math.nan, memory=math.inf)], 0.0)
    (node,) = b.snapshot(1.0)["nodes"]
    assert (node["cpu"], node["memory"]) == (None, None)
    out = _cli(monkeypatch, _FakeCluster(b), "--json")
    view = json.loads(out, parse_constant=_reject)  # NaN / Infinity are not JSON
    assert view["nodes"][0]["cpu"] is None
    assert "?" in _cli(monkeypatch, _FakeCluster(b))  # the table shows it too

    # A node running older code still sends NaN: the CLI makes it JSON all the same.
    class _Old(_FakeCluster):
        async def routes(self, *, decisions: int = 50) -> dict[str, Any]:
            return {**await super().routes(decisions=decisions), "surge": {"baseline": math.nan}}

    view = json.loads(_cli(monkeypatch, _Old(b), "--json"), parse_constant=_reject)
    assert view["surge"]["baseline"] is None


def test_routes_decisions_option_beyond_fifty(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeCluster(_balancer_with(200))
    out = _cli(monkeypatch, fake, "--decisions", "100")
    assert "last 100 decisions" in out, out[-300:]
    view = json.loads(_cli(monkeypatch, fake, "--decisions", "120", "--json"))
    assert len(view["decisions"]) == 120
    assert fake.asked == [100, 120]


async def test_routes_op_passes_the_count_bounded_by_what_is_kept() -> None:
    b = _balancer_with(1_200)
    node = cast(Any, SimpleNamespace(balancer=b, clock=SimpleNamespace(now=lambda: 2e3)))

    async def count(**args: Any) -> int:
        reply = await handle_control(node, ControlRequest("routes", args))
        assert reply.ok, reply.error
        return len(reply.data["decisions"])

    assert await count() == 50  # the default
    assert await count(decisions=300) == 300
    assert await count(decisions=10**9) == 1_000  # all the balancer keeps
    assert await count(decisions=-3) == 0
    bad = await handle_control(node, ControlRequest("routes", {"decisions": "all"}))
    assert not bad.ok and "decisions" in (bad.error or "")


def test_routes_weight_reflects_local_degraded_verdict() -> None:
    b = Balancer(rng=random.Random(1))
    b.set_endpoints("echo", [Endpoint("n1"), Endpoint("n2")], 0.0)
    b.set_health({"n2": "degraded"}, 0.0)
    weights = {n["node"]: n["weight"] for n in b.snapshot(1.0)["nodes"]}
    assert weights == {"n1": pytest.approx(1.0), "n2": pytest.approx(0.1)}


def test_routes_table_shows_each_nodes_published_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    b = Balancer(rng=random.Random(1))
    b.set_endpoints("echo", [Endpoint("n2", in_flight=7.0), Endpoint("n3")], 0.0)
    out = _cli(monkeypatch, _FakeCluster(b))
    assert "in_fl" in out  # (the header is cut at 80 columns)
    cells = {
        line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
        for line in out.splitlines()
        if line.startswith("│ n")
    }
    assert cells["n2"][5] == "7" and cells["n3"][5] == "0", out


# -- when a node re-publishes its load -------------------------------------------------------
@pytest.mark.virtual_time
async def test_load_reports_go_out_when_in_flight_reaches_zero_and_every_few_periods() -> None:
    async with SimCluster(1, seed=13) as c:
        await c.wait_until(c.converged, timeout=30)
        n1 = c.nodes["n1"]
        n1.lb.load_probe = lambda: (0.5, 0.5)

        def report(k: int) -> dict[str, Any]:
            n1.calls.in_flight = k  # (nothing is really in flight here)
            n1.lb._report_load(None, None)  # type: ignore[arg-type]  # what ReportLoad runs
            return dict(n1.core.member("n1").meta.capacity)  # type: ignore[union-attr]

        first = report(4)
        assert first["in_flight"] == 4.0
        assert report(3)["load_report"] == first["load_report"]  # moved by 1: not yet
        assert report(1)["in_flight"] == 1.0  # moved by 3 from 4
        idle = report(0)  # moved by 1, but the node is idle now: out at once
        assert idle["in_flight"] == 0.0 and idle["load_report"] == first["load_report"] + 2
        assert report(1)["in_flight"] == 1.0  # no longer idle: out at once too
        # Nothing moves: still re-published after a few periods, with a new number.
        numbers = [report(1)["load_report"] for _ in range(6)]
        assert numbers[-1] == numbers[0] + 1, numbers
        n1.calls.in_flight = 0


def test_routes_show_the_newest_load_report_any_route_holds() -> None:
    # Routes refresh when their capability is called: "a" was last called before x's latest
    # report, which "b" holds.
    b = Balancer(rng=random.Random(1), strategy="least_connections")
    b.set_endpoints("a", [Endpoint("x", in_flight=10.0, cpu=0.9, load_report=4)], 0.0)
    b.set_endpoints("b", [Endpoint("x", in_flight=0.0, cpu=0.1, load_report=5)], 60.0)
    (x,) = [n for n in b.snapshot(60.0)["nodes"] if n["node"] == "x"]
    assert (x["in_flight"], x["cpu"], x["load_report"]) == (0.0, 0.1, 5)
    assert sorted(x["capabilities"]) == ["a", "b"]
