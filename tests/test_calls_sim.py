"""``cluster.call`` on simulated clusters (virtual time): routing, typed errors, retries, and
traffic that keeps flowing while a node dies or stalls."""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import msgspec
import pytest

from agentcluster.agents import Action, ActionContext, Agent, Result
from agentcluster.balancing.limits import AdaptiveConcurrency, ConcurrencyConfig
from agentcluster.cluster import Cluster
from agentcluster.control import CallRequest
from agentcluster.errors import CallError, CallRemoteError, NoCapacity, Rejected, Timeout
from agentcluster.examples.worker import Echo
from agentcluster.signals import Signal
from agentcluster.testing.simcluster import SimCluster


async def _workers(c: SimCluster, names: list[str], *, mailbox: int | None = None) -> None:
    await c.wait_until(c.converged, timeout=30)
    for n in names:
        await c.nodes[n].runtime.spawn(Echo, mailbox_size=mailbox)
        await Cluster.of(c.nodes[n]).register("echo", capabilities=["echo"])

    def everywhere() -> bool:
        return all(
            len(c.nodes[o].registry.index.find_capable("echo")) == len(names) for o in c.live()
        )

    await c.wait_until(everywhere, timeout=10)


def _served_by(reply: Any) -> str:
    return str(reply["agent"])


@pytest.mark.virtual_time
async def test_calls_are_spread_over_the_capable_nodes() -> None:
    async with SimCluster(4, seed=41) as c:
        await _workers(c, ["n2", "n3", "n4"])
        cluster = Cluster.of(c.nodes["n1"])
        served: collections.Counter[str] = collections.Counter()
        for i in range(90):
            reply = await cluster.call("echo", "app.echo", {"i": i}, timeout=2.0)
            assert reply["echo"] == {"i": i}
            served[_served_by(reply)] += 1
        counts = [c.nodes[n].runtime.lookup("echo").agent.state.served for n in ("n2", "n3", "n4")]
        assert sum(counts) == 90 and min(counts) >= 10
        routes = await cluster.routes()
        assert routes["capabilities"]["echo"]["eligible"] == ["n2", "n3", "n4"]
        assert len(routes["decisions"]) == 50 and all(d["ok"] for d in routes["decisions"])


@pytest.mark.virtual_time
async def test_errors_are_typed() -> None:
    async with SimCluster(3, seed=42) as c:
        await _workers(c, ["n2"])
        cluster = Cluster.of(c.nodes["n1"])
        with pytest.raises(NoCapacity, match="nobody-has-this"):
            await cluster.call("nobody-has-this", "app.echo", {})
        with pytest.raises(CallRemoteError) as remote:
            await cluster.call("echo", "app.echo", {"fail": "bad input"})
        assert remote.value.remote_type == "ValueError" and "bad input" in str(remote.value)
        assert remote.value.attempts == ("n2",)
        served = c.nodes["n2"].calls.served
        with pytest.raises(Timeout):
            await cluster.call("echo", "app.echo", {"sleep": 5.0}, timeout=1.0)
        # The target finishes the run its caller gave up on, and counts it as failed (late).
        await c.wait_until(lambda: c.nodes["n2"].calls.failed == 2, timeout=10)
        assert c.nodes["n2"].calls.served == served
        # The agent raised: that is its answer, not a reason to take the node out.
        assert (await cluster.call("echo", "app.echo", {"ok": 1}))["echo"] == {"ok": 1}


@pytest.mark.virtual_time
async def test_a_full_mailbox_sheds_with_rejected() -> None:
    async with SimCluster(2, seed=43) as c:
        await _workers(c, ["n2"], mailbox=1)
        # A fixed, roomy concurrency limit: the mailbox is what sheds here.
        roomy = ConcurrencyConfig(
            initial_limit=100.0, min_limit=100.0, max_limit=100.0, probe_limit=100
        )
        c.nodes["n2"].calls.limiter = AdaptiveConcurrency(roomy, rng=random.Random(1))
        cluster = Cluster.of(c.nodes["n1"])
        calls = [cluster.call("echo", "app.echo", {"sleep": 0.5}, timeout=5.0) for _ in range(6)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        rejected = [r for r in results if isinstance(r, Rejected)]
        assert rejected and all(isinstance(r, dict | Rejected) for r in results)
        assert {r.reason for r in rejected} == {"overload"}


@pytest.mark.virtual_time
async def test_the_concurrency_limit_sheds_with_rejected_naming_it() -> None:
    async with SimCluster(2, seed=45) as c:
        await _workers(c, ["n2"])
        target = c.nodes["n2"]
        # One call at a time, also while it probes its baseline latency.
        one = ConcurrencyConfig(initial_limit=1.0, min_limit=1.0, max_limit=1.0, probe_limit=1)
        target.calls.limiter = AdaptiveConcurrency(one, rng=random.Random(1))
        cluster = Cluster.of(c.nodes["n1"])
        calls = [cluster.call("echo", "app.echo", {"sleep": 0.5}, timeout=5.0) for _ in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        served = [r for r in results if isinstance(r, dict)]
        rejected = [r for r in results if isinstance(r, Rejected)]
        assert len(served) == 1 and len(rejected) == 3, results
        assert {r.reason for r in rejected} == {"concurrency_limit"}
        assert all("concurrency limit" in str(r) for r in rejected)
        assert target.calls.shed == 3


async def _traffic(
    cluster: Cluster, n: int, *, idempotent: bool, concurrency: int = 8
) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            try:
                # 10 ms of work per call: the traffic lasts long enough to span the faults.
                return await cluster.call(
                    "echo", "app.echo", {"i": i, "sleep": 0.01}, timeout=2.0, idempotent=idempotent
                )
            except CallError as exc:
                return exc

    return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.virtual_time
async def test_calls_keep_succeeding_when_a_node_dies_mid_traffic() -> None:
    async with SimCluster(5, seed=44) as c:
        await _workers(c, ["n2", "n3", "n4", "n5"])
        cluster = Cluster.of(c.nodes["n1"])
        t0 = c.clock.now()
        c.at(t0 + 0.2, lambda: c.crash("n3"))
        results = await _traffic(cluster, 400, idempotent=True)
        assert c.clock.now() - t0 > 0.4  # the crash came mid-traffic
        assert "n3" in c.crashed
        assert all(isinstance(r, dict) for r in results), [
            r for r in results if not isinstance(r, dict)
        ]
        # Non-idempotent calls right after a crash either succeed or fail with a typed error.
        t1 = c.clock.now()
        c.at(t1 + 0.1, lambda: c.crash("n4"))
        mixed = await _traffic(cluster, 200, idempotent=False)
        assert c.clock.now() - t1 > 0.2
        assert all(isinstance(r, dict | CallError) for r in mixed)
        assert sum(isinstance(r, dict) for r in mixed) >= 190


@pytest.mark.virtual_time
async def test_traffic_moves_away_from_a_stalled_node() -> None:
    async with SimCluster(4, seed=45) as c:
        await _workers(c, ["n2", "n3", "n4"])
        cluster = Cluster.of(c.nodes["n1"])
        await _traffic(cluster, 60, idempotent=True)
        before = c.nodes["n3"].runtime.lookup("echo").agent.state.served
        c.stall("n3", 5.0)
        results = await _traffic(cluster, 300, idempotent=True)
        assert all(isinstance(r, dict) for r in results)
        during = c.nodes["n3"].runtime.lookup("echo").agent.state.served - before
        # Peak-EWMA: after the first slow replies the stalled node gets almost nothing.
        assert during <= 30


@pytest.mark.virtual_time
async def test_a_timing_out_target_crosses_the_error_rate_threshold() -> None:
    async with SimCluster(2, seed=46) as c:
        await _workers(c, ["n2"])
        node = c.nodes["n1"]
        events = node.runtime.bus.subscribe("cluster.lb.threshold", queue_size=16)
        cluster = Cluster.of(node)
        for _ in range(10):
            # Timeouts, until the breaker and outlier ejection take the node out.
            with pytest.raises((Timeout, NoCapacity)):
                await cluster.call("echo", "app.echo", {"sleep": 1.0}, timeout=0.1)
        signal = await asyncio.wait_for(events.get(), timeout=5)
        assert signal.data["metric"] == "error_rate"
        assert node.lb.thresholds.threshold("error_rate") >= 0.05


class _Odd(Action[msgspec.Struct]):
    name = "odd"

    def run(self, params: msgspec.Struct, ctx: ActionContext) -> Result:
        return Result(reply=object())  # nothing can carry this over the wire


class Odd(Agent):
    name = "odd"
    actions = (_Odd,)
    routes = (("app.odd", "odd"),)


@pytest.mark.virtual_time
async def test_an_unserialisable_reply_is_a_typed_error() -> None:
    async with SimCluster(2, seed=47) as c:
        await c.wait_until(c.converged, timeout=30)
        await c.nodes["n2"].runtime.spawn(Odd)
        await Cluster.of(c.nodes["n2"]).register("odd", capabilities=["odd"])
        await c.wait_until(
            lambda: bool(c.nodes["n1"].registry.index.find_capable("odd")), timeout=10
        )
        with pytest.raises(CallRemoteError) as err:
            await Cluster.of(c.nodes["n1"]).call("odd", "app.odd")
        assert err.value.remote_type == "TypeError"


@pytest.mark.virtual_time
async def test_an_ejection_on_the_call_path_is_published() -> None:
    async with SimCluster(3, seed=48) as c:
        await _workers(c, ["n2", "n3"])
        node = c.nodes["n1"]
        ejections = node.runtime.bus.subscribe("cluster.lb.eject", queue_size=8)
        # Round robin keeps sending to n3 (latency-aware would shun it after one failure).
        node.balancer.set_strategy("round_robin", now=c.clock.now())
        await c.crash("n3")  # its calls now fail to connect until it is known dead
        cluster = Cluster.of(node)
        for i in range(20):
            await cluster.call("echo", "app.echo", {"i": i}, timeout=2.0)
        signal = await asyncio.wait_for(ejections.get(), timeout=5)
        assert signal.subject == "n3" and signal.data["reason"]


@pytest.mark.virtual_time
async def test_successes_reach_the_balancer_and_a_recovery_is_published() -> None:
    # A successful call's outcome is recorded a loop turn after the caller has its answer:
    # every one is counted, and a breaker that closes on them is still announced.
    async with SimCluster(3, seed=49) as c:
        await _workers(c, ["n2"])
        node = c.nodes["n1"]
        bal = node.balancer
        changes = node.runtime.bus.subscribe("cluster.lb.breaker", queue_size=16)
        for _ in range(5):  # five failures in a row: n2's breaker opens
            bal.finished("echo", "n2", 0.01, False, c.clock.now())
        assert str(bal.breakers.state("n2", c.clock.now())) == "open"
        cluster = Cluster.of(node)
        await c.run_for(2.0)  # past the (jittered) first open period: half-open
        before = len(bal.decisions)
        for i in range(3):  # the three probes
            assert (await cluster.call("echo", "app.echo", {"i": i}, timeout=2.0))["echo"] == {
                "i": i
            }
        await asyncio.sleep(0)
        assert len(bal.decisions) == before + 3
        assert all(d.ok and d.node == "n2" for d in list(bal.decisions)[-3:])
        seen = []
        while not any(s.data["reason"] == "probes_ok" for s in seen):
            seen.append(await asyncio.wait_for(changes.get(), timeout=5))
        assert str(bal.breakers.state("n2", c.clock.now())) == "closed"


@pytest.mark.virtual_time
async def test_a_replaced_agent_serves_the_next_calls() -> None:
    # The serving node remembers which local agent serves a capability; a new agent in the
    # old one's place (another id) must be found, and a stopped one never called.
    async with SimCluster(2, seed=48) as c:
        await _workers(c, ["n2"])
        cluster = Cluster.of(c.nodes["n1"])
        target = c.nodes["n2"]
        assert _served_by(await cluster.call("echo", "app.echo", {"i": 1})) == "echo"
        await target.runtime.stop_agent("echo")
        await target.runtime.spawn(Echo, id="echo-2")
        await Cluster.of(target).register("echo-2", capabilities=["echo"])
        # The stopped agent's entry goes (its node's housekeeping), though the new one has
        # the same name.
        await c.wait_until(
            lambda: (
                [e.id for e in c.nodes["n1"].registry.index.find_capable("echo")] == ["n2/echo-2"]
            ),
            timeout=10,
        )
        assert _served_by(await cluster.call("echo", "app.echo", {"i": 2})) == "echo-2"


@pytest.mark.virtual_time
async def test_an_agent_restarted_under_its_id_serves_the_next_calls() -> None:
    # The serving node caches the agent server itself, per registry version: a new server
    # under the same id (a restart, which leaves the registry entry as it was) must replace
    # it, and the stopped one never be called.
    async with SimCluster(1, seed=49) as c:
        node = c.nodes["n1"]
        await node.runtime.spawn(Echo, id="echo")
        await Cluster.of(node).register("echo", capabilities=["echo"])
        sig = Signal(type="app.echo", data={"i": 1})
        first = await node.calls.serve(CallRequest("echo", sig, 5.0))
        assert first.ok and first.data["served"] == 1
        version = node.registry.index.capability_version("echo")
        old = node.runtime.get_id("echo")
        await node.runtime.stop_agent("echo")
        await node.runtime.spawn(Echo, id="echo")
        assert node.runtime.get_id("echo") is not old
        assert node.registry.index.capability_version("echo") == version
        again = await node.calls.serve(CallRequest("echo", sig, 5.0))
        assert again.ok, again
        assert again.data["served"] == 1  # the new agent's own count


@pytest.mark.virtual_time
async def test_a_call_for_a_named_agent_that_is_missing_or_ambiguous_is_a_typed_reply() -> None:
    async with SimCluster(1, seed=50) as c:
        node = c.nodes["n1"]
        await node.runtime.spawn(Echo, id="echo-a")
        await node.runtime.spawn(Echo, id="echo-b")
        sig = Signal(type="app.echo", data={"i": 1})
        missing = await node.calls.serve(CallRequest("echo", sig, 5.0, agent="nobody"))
        assert (missing.ok, missing.error_type) == (False, "NoAgent")
        assert "nobody" in missing.error
        both = await node.calls.serve(CallRequest("echo", sig, 5.0, agent="echo"))
        assert (both.ok, both.error_type) == (False, "AgentError")
        assert "several agents" in both.error
        one = await node.calls.serve(CallRequest("echo", sig, 5.0, agent="echo-b"))
        assert one.ok and one.data["agent"] == "echo-b"
        # Nothing was admitted for the two that named no single agent.
        assert node.calls.limiter.in_flight == 0 and node.calls.failed == 0


@pytest.mark.virtual_time
async def test_a_cancelled_call_leaves_nothing_in_flight_nor_holds_a_probe() -> None:
    # A caller cancelled mid-call records no outcome, but its attempt must not stay "in
    # flight" (latency-aware routing would avoid the node for good) nor keep the half-open
    # breaker's probe slot (the breaker would never probe again).
    async with SimCluster(2, seed=44) as c:
        await _workers(c, ["n2"])
        caller = c.nodes["n1"]
        cluster = Cluster.of(caller)
        balancer = caller.calls.balancer
        await cluster.call("echo", "app.echo", {"warm": 1})
        strategy = balancer._routes["echo"].strategy
        # A success is recorded on the next loop turn: wait for it, so "1" below is the call's.
        await c.wait_until(lambda: strategy.inflight("n2") == 0, timeout=5)
        slow = asyncio.ensure_future(cluster.call("echo", "app.echo", {"sleep": 0.5}, timeout=9))
        await c.wait_until(lambda: strategy.inflight("n2") == 1, timeout=5)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert strategy.inflight("n2") == 0
        # The same for a probe of a half-open breaker: its slot is free again.
        breaker = balancer.breakers.get("n2")
        breaker._enter_half_open()
        probes = breaker.config.half_open_probes
        probe = asyncio.ensure_future(cluster.call("echo", "app.echo", {"sleep": 0.5}, timeout=9))
        await c.wait_until(lambda: strategy.inflight("n2") == 1, timeout=5)
        assert breaker.snapshot(c.clock.now())["probes_left"] == probes - 1
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert breaker.snapshot(c.clock.now())["probes_left"] == probes
        assert strategy.inflight("n2") == 0
        for i in range(probes):  # the probes that do complete close it
            assert (await cluster.call("echo", "app.echo", {"i": i}))["echo"] == {"i": i}
        await c.wait_until(lambda: str(breaker.state(c.clock.now())) == "closed", timeout=5)
