"""The MABEAM layer on whole simulated clusters: registry, consensus, locks (virtual time)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from agentcluster.agents import Action, ActionContext, Agent
from agentcluster.cluster import Cluster, NodeCluster, elect_by
from agentcluster.coordination.proposals import CONSENSUS_PREFIX, VoteAction, VoteRequest
from agentcluster.coordination.registry_service import NameTaken
from agentcluster.coordination.voting import VoteChoice, unanimous
from agentcluster.store.base import DeleteOp
from agentcluster.testing.simcluster import SimCluster


class _Yes(VoteAction):
    name = "vote_yes"

    def decide(self, request: VoteRequest, ctx: ActionContext) -> VoteChoice:
        return "yes"


class YesVoter(Agent):
    name = "voter"
    actions = (_Yes,)
    routes = (("cluster.consensus.vote_request", "vote_yes"),)


class _Partisan(VoteAction):
    """Votes yes for coordinator n1 and no for anyone else: two coordinators of one proposal
    then tally different outcomes, and only one may be committed."""

    name = "vote_partisan"

    def decide(self, request: VoteRequest, ctx: ActionContext) -> VoteChoice:
        return "yes" if request.coordinator == "n1" else "no"


class PartisanVoter(Agent):
    name = "voter"
    actions = (_Partisan,)
    routes = (("cluster.consensus.vote_request", "vote_partisan"),)


def _visible(c: SimCluster, entry_id: str, names: list[str]) -> bool:
    return all(c.nodes[n].registry.index.get(entry_id) is not None for n in names)


def _gone(c: SimCluster, node: str, names: list[str]) -> bool:
    return all(not any(e.node == node for e in c.nodes[n].registry.index.entries()) for n in names)


async def _spawn_voters(c: SimCluster, agent: type[Agent], names: list[str]) -> list[str]:
    ids = []
    for n in names:
        await c.nodes[n].runtime.spawn(agent)
        entry = await Cluster.of(c.nodes[n]).register("voter", capabilities=["vote"])
        ids.append(entry.id)
    await c.wait_until(lambda: all(_visible(c, i, c.live()) for i in ids), timeout=10)
    return ids


@pytest.mark.virtual_time
async def test_registry_converges_then_forgets_a_dead_node() -> None:
    async with SimCluster(5, seed=21, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        node = c.nodes["n4"]
        await node.runtime.spawn(YesVoter)
        entry = await Cluster.of(node).register(
            "voter", capabilities=["llm", "vote"], resources={"gpu": 1, "load": 0.2}
        )
        assert entry.id == "n4/voter"
        took = await c.wait_until(lambda: _visible(c, entry.id, c.names), timeout=10)
        assert took < 1.0  # one push from the owner
        found = await Cluster.of(c.nodes["n1"]).find("resources.gpu>=1", capability="llm")
        assert [e.id for e in found] == ["n4/voter"]
        await c.crash("n4")
        others = [n for n in c.names if n != "n4"]
        await c.wait_until(lambda: _gone(c, "n4", others), timeout=30)
        # Anti-entropy between the survivors must not bring the dead node's entries back.
        await c.run_for(10)
        assert _gone(c, "n4", others)


@pytest.mark.virtual_time
async def test_an_agent_that_stops_is_unregistered() -> None:
    async with SimCluster(3, seed=22) as c:
        await c.wait_until(c.converged, timeout=30)
        node = c.nodes["n2"]
        await node.runtime.spawn(YesVoter)
        await Cluster.of(node).register("voter", capabilities=["vote"])
        await c.wait_until(lambda: _visible(c, "n2/voter", c.names), timeout=10)
        await node.runtime.stop_agent("voter")
        await c.wait_until(
            lambda: all(c.nodes[n].registry.index.get("n2/voter") is None for n in c.names),
            timeout=10,
        )


@pytest.mark.virtual_time
async def test_unique_names_go_through_the_store() -> None:
    async with SimCluster(3, seed=23, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        a, b = c.nodes["n1"], c.nodes["n2"]
        await a.runtime.spawn(YesVoter)
        await b.runtime.spawn(YesVoter)
        first = await Cluster.of(a).register("voter", unique=True, name="scheduler")
        assert first.name_token > 0
        with pytest.raises(NameTaken, match="n1/voter"):
            await Cluster.of(b).register("voter", unique=True, name="scheduler")


@pytest.mark.virtual_time
async def test_consensus_majority_is_committed_once_and_broadcast() -> None:
    async with SimCluster(5, seed=24, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        ids = await _spawn_voters(c, YesVoter, c.names)
        cluster = Cluster.of(c.nodes["n2"])
        decision = await cluster.consensus(ids, {"scale": 3}, rule="majority", topic="scale")
        assert decision.accepted and decision.outcome.yes >= 3
        assert decision.proposal == {"scale": 3}
        stored = await c.nodes["n1"].store.range(CONSENSUS_PREFIX)
        assert [kv.key for kv in stored.kvs] == [CONSENSUS_PREFIX + decision.ref]
        history = await Cluster.of(c.nodes["n5"]).consensus_history(topic="scale")
        assert [d.ref for d in history] == [decision.ref]

        def everyone_heard() -> bool:
            for n in c.names:
                agent = c.nodes[n].runtime.lookup("consensus_coordinator").agent
                if not any(d.ref == decision.ref for d in agent.state.history):
                    return False
            return True

        await c.wait_until(everyone_heard, timeout=10)


@pytest.mark.virtual_time
async def test_a_participant_crashing_mid_vote_times_out() -> None:
    async with SimCluster(5, seed=25, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        ids = await _spawn_voters(c, YesVoter, c.names)
        # n5 dies as the vote starts: its request is never answered.
        await c.crash("n5")
        cluster = Cluster.of(c.nodes["n1"])
        t0 = c.clock.now()
        decision = await cluster.consensus(ids, "upgrade", rule=unanimous(), timeout=2.0)
        assert decision.outcome.decision == "rejected"
        assert decision.outcome.timed_out == ["n5/voter"]
        assert decision.outcome.yes == 4
        assert c.clock.now() - t0 >= 2.0  # decided at the deadline, not before


@pytest.mark.virtual_time
async def test_two_racing_coordinators_agree_on_one_outcome() -> None:
    async with SimCluster(5, seed=26, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        ids = await _spawn_voters(c, PartisanVoter, c.names)
        one, two = NodeCluster(c.nodes["n1"]), NodeCluster(c.nodes["n2"])
        # The same proposal (one reference) started on two nodes at once: n1's tally says
        # accepted, n2's says rejected; the store keeps exactly one.
        ref = await one.start_consensus(ids, "leader=n1", ref="race-1")
        await two.start_consensus(ids, "leader=n1", ref="race-1")
        d1 = await one.consensus_result(ref)
        d2 = await two.consensus_result(ref)
        assert d1 == d2
        stored = await c.nodes["n3"].store.range(CONSENSUS_PREFIX)
        assert len(stored.kvs) == 1
        adopted = c.nodes["n1"].consensus.commits_adopted + c.nodes["n2"].consensus.commits_adopted
        assert adopted == 1


@pytest.mark.virtual_time
async def test_lock_is_exclusive_across_a_partition_and_fences_the_stale_holder() -> None:
    async with SimCluster(5, seed=27, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        stale = Cluster.of(c.nodes["n5"]).lock("deploy", ttl=2.0)
        await stale.acquire(timeout=10)
        assert await stale.fenced_put("mabeam/test/owner", b"n5")
        # n5 is cut off from everyone: its keep-alives fail and its lease runs out.
        c.partition(["n5"], [n for n in c.names if n != "n5"])
        fresh = Cluster.of(c.nodes["n1"]).lock("deploy", ttl=2.0)
        token = await fresh.acquire(timeout=30)
        assert token > stale.token
        await c.wait_until(lambda: stale.lost, timeout=10)
        c.heal()
        await c.wait_until(c.converged, timeout=120)
        # The stale holder's side effect is rejected; the holder's goes through.
        assert not await stale.fenced_put("mabeam/test/owner", b"n5-late")
        assert await fresh.fenced_put("mabeam/test/owner", b"n1")
        kv = await c.nodes["n2"].store.get("mabeam/test/owner")
        assert kv is not None and kv.value == b"n1"
        await fresh.release()


@pytest.mark.virtual_time
async def test_elect_by_criteria_is_the_same_everywhere() -> None:
    async with SimCluster(4, seed=28) as c:
        await c.wait_until(c.converged, timeout=30)
        for i, n in enumerate(c.names):
            await c.nodes[n].runtime.spawn(YesVoter)
            await Cluster.of(c.nodes[n]).register(
                "voter", capabilities=["vote"], resources={"score": float(i % 2)}
            )
        await c.wait_until(
            lambda: all(len(c.nodes[n].registry.index.find_capable("vote")) == 4 for n in c.names),
            timeout=10,
        )

        def score(e: Any) -> float:
            return float(e.resources["score"])

        winners = {
            n: elect_by(c.nodes[n].registry.index.find_capable("vote"), score) for n in c.names
        }
        assert {w.id for w in winners.values() if w is not None} == {"n2/voter"}


class ConflictState(msgspec.Struct):
    conflicts: list[str] = []


class _NoteConflict(Action[msgspec.Struct]):
    name = "note_conflict"

    def run(self, params: msgspec.Struct, ctx: ActionContext) -> dict[str, Any]:
        assert ctx.signal is not None
        winner = ctx.signal.data["winner"]
        return {"conflicts": [*ctx.state.conflicts, winner[0]]}


class NoteConflicts(Agent):
    """Votes yes and remembers the name conflicts it is told about (the winner's id)."""

    name = "voter"
    State = ConflictState
    actions = (_Yes, _NoteConflict)
    routes = (
        ("cluster.consensus.vote_request", "vote_yes"),
        ("cluster.registry.name_conflict", "note_conflict"),
    )


@pytest.mark.virtual_time
async def test_a_unique_name_taken_on_both_sides_of_a_partition_is_settled_on_heal() -> None:
    async with SimCluster(5, seed=29, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        majority, minority = ["n1", "n2", "n3", "n4"], ["n5"]
        c.partition(majority, minority)
        await c.wait_until(lambda: c.view("n1")["n5"] == "dead", timeout=60)
        # The minority side cannot reach the store: its registration stays unclaimed.
        await c.nodes["n5"].runtime.spawn(NoteConflicts)
        lost = await Cluster.of(c.nodes["n5"]).register("voter", unique=True, name="chair")
        assert lost.name_token == 0
        await c.nodes["n2"].runtime.spawn(NoteConflicts)
        won = await Cluster.of(c.nodes["n2"]).register("voter", unique=True, name="chair")
        assert won.name_token > 0
        c.heal()
        await c.wait_until(c.converged, timeout=120)
        n5_agent = c.nodes["n5"].runtime.lookup("voter")
        await c.wait_until(lambda: len(n5_agent.agent.state.conflicts) == 1, timeout=30)
        assert n5_agent.agent.state.conflicts == ["n2/voter"]
        # Every node ranks the store-backed claim first.
        for n in c.names:
            assert c.nodes[n].registry.index.by_name("chair")[0].id == "n2/voter"
        assert c.nodes["n2"].runtime.lookup("voter").agent.state.conflicts == []


@pytest.mark.virtual_time
async def test_a_standby_of_elect_outlasts_its_ttl_and_takes_over() -> None:
    # A standby can wait far longer than its lease's TTL: elect keeps it alive meanwhile.
    async with SimCluster(3, seed=26, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        a, b = Cluster.of(c.nodes["n1"]), Cluster.of(c.nodes["n2"])
        first = await a.elect("sched", b"a", ttl=2.0)
        standby = asyncio.ensure_future(b.elect("sched", b"b", ttl=2.0))
        for _ in range(10):  # the leader holds on for 5 s, keeping its own lease alive
            await a.store.lease_keepalive(first.lease)
            await c.clock.sleep(0.5)
        assert not standby.done()
        await a.store.txn([first.guard()], [DeleteOp(first.key)])  # resign
        second = await asyncio.wait_for(standby, timeout=10)
        assert second.token > first.token
        await b.store.lease_keepalive(second.lease)  # handed over alive


@pytest.mark.virtual_time
async def test_a_cancelled_campaign_leaves_no_candidate_behind() -> None:
    async with SimCluster(3, seed=27, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        a, b = Cluster.of(c.nodes["n1"]), Cluster.of(c.nodes["n2"])
        await a.elect("jobs", b"a", ttl=5.0)
        standby = asyncio.ensure_future(b.elect("jobs", b"b", ttl=5.0))
        kv = c.nodes["n1"].store_host.member.kv  # type: ignore[union-attr]
        await c.wait_until(lambda: len(kv.range("mabeam/elections/jobs/").kvs) == 2, timeout=10)
        standby.cancel()
        await asyncio.gather(standby, return_exceptions=True)
        keys = await a.store.range("mabeam/elections/jobs/")
        assert len(keys.kvs) == 1  # the standby's key went with its revoked lease
