"""The ``Cluster`` API through ``agentcluster.connect`` against 3 real node processes, and the
``agents`` / ``consensus history`` commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

import agentcluster
from agentcluster.coordination.registry_service import NameTaken
from agentcluster.launcher import LocalCluster
from agentcluster.testing import eventually

pytestmark = pytest.mark.slow

VOTER = "agentcluster.examples.voter:Voter"


def _cli(*args: str, key_file: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGENTCLUSTER_KEY_FILE": key_file}
    return subprocess.run(
        [sys.executable, "-m", "agentcluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def test_connect_registry_consensus_locks_barriers_and_events() -> None:
    async with LocalCluster(3, preset="local", agents=[VOTER]) as lc:
        await lc.wait_converged(timeout=60)
        key = str(lc.key_file)
        cluster = agentcluster.connect(lc.nodes[0].addr, key_file=key)
        try:

            async def voters() -> list[agentcluster.AgentEntry] | None:
                found = await cluster.find(capability="vote")
                return found if {e.node for e in found} == {n.name for n in lc.nodes} else None

            found = await eventually(voters, timeout=30)
            ids = sorted(e.id for e in found)
            assert ids == [f"{n.name}/voter" for n in lc.nodes]
            assert [m.state for m in await cluster.members()] == ["alive"] * 3

            events = cluster.watch("cluster.consensus.decided")
            first_event = asyncio.ensure_future(anext(events))
            yes = await cluster.consensus(ids, {"plan": "a"}, topic="plans")
            # Two yes votes of three already make the majority: decided early.
            assert yes.accepted and yes.outcome.yes >= 2
            no = await cluster.consensus(ids, {"plan": "b", "veto": True}, topic="plans")
            assert no.outcome.decision == "rejected" and no.outcome.no >= 2
            abstained = await cluster.consensus(
                ids, {"abstain": True}, rule="quorum:2", topic="other"
            )
            assert abstained.outcome.decision == "no_quorum"
            signal = await asyncio.wait_for(first_event, 10)
            assert signal.type == "cluster.consensus.decided"
            # The long poll may have reached the node after the first decision was out.
            assert signal.subject in (yes.ref, no.ref, abstained.ref)
            await events.aclose()

            history = await cluster.consensus_history(topic="plans")
            assert [d.ref for d in history] == [yes.ref, no.ref]

            # Unique names through the remote API; the error keeps its type.
            await cluster.register("voter", capabilities=["vote"], unique=True, name="chair")
            other = agentcluster.connect(lc.nodes[1].addr, key_file=key)
            try:
                with pytest.raises(NameTaken):
                    await other.register("voter", unique=True, name="chair")
            finally:
                await other.close()

            # An auction through the remote API (voters do not bid: nobody buys).
            out = await cluster.auction(ids, "slot", duration=0.3)
            assert out.result.reason == "no_bids" and out.bidders == ids and out.revision > 0

            async with cluster.lock("deploy", ttl=5.0) as lock:
                assert lock.token > 0
                assert await lock.fenced_put("mabeam/test/deployer", b"me")
            barrier = cluster.barrier("start", 2)
            await barrier.arrive("a")
            waiter = asyncio.ensure_future(barrier.wait(timeout=10))
            await barrier.arrive("b")
            assert await waiter > 0

            agents_out = _cli("agents", "--node", lc.nodes[2].addr, "--json", key_file=key)
            assert agents_out.returncode == 0, agents_out.stderr
            rows = json.loads(agents_out.stdout)
            # Every node's voter and its own load balancer (registered by the node).
            assert sorted(r["id"] for r in rows if "vote" in r["capabilities"]) == ids
            lbs = [r["id"] for r in rows if "cluster.load_balancer" in r["capabilities"]]
            assert sorted(lbs) == [f"{n.name}/load_balancer" for n in lc.nodes]
            table = _cli("agents", "--node", lc.nodes[2].addr, "--capability", "nope", key_file=key)
            assert table.returncode == 0 and "0 agents" in table.stdout
            hist = _cli("consensus", "history", "--node", lc.nodes[1].addr, "--json", key_file=key)
            assert hist.returncode == 0, hist.stderr
            assert [d["ref"] for d in json.loads(hist.stdout)] == [
                yes.ref,
                no.ref,
                abstained.ref,
            ]
            bad = _cli(
                "agents", "--node", lc.nodes[0].addr, "--where", "resources.gpu>>1", key_file=key
            )
            assert bad.returncode == 1 and "error:" in bad.stderr
        finally:
            await cluster.close()
