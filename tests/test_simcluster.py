"""Whole clusters of real nodes on the simulated network, in virtual time, from a seed."""

from __future__ import annotations

import pytest

from agentcluster.testing.simcluster import SimCluster
from agentcluster.transport.memory import LinkConfig
from agentcluster.wire import Keyring


@pytest.mark.virtual_time
async def test_cluster_converges_and_detects_a_crash() -> None:
    async with SimCluster(6, seed=3, preset="lan") as c:
        took = await c.wait_until(c.converged, timeout=30)
        assert took < 10
        t = c.clock.now()
        await c.crash("n4")
        others = [n for n in c.names if n != "n4"]
        await c.wait_until(lambda: all(c.view(o)["n4"] == "dead" for o in others), timeout=30)
        seen = c.first_seen("dead", "n4", after=t)
        assert set(seen) == set(others)
        assert max(seen.values()) - t < 10
        # The agents published it too.
        fd = c.nodes["n1"].runtime.lookup("failure_detector")
        assert fd.agent.state.members["n4"].state == "dead"


@pytest.mark.virtual_time
async def test_restart_rejoins_with_a_higher_incarnation() -> None:
    async with SimCluster(4, seed=5) as c:
        await c.wait_until(c.converged, timeout=30)
        before = {m.name: m.incarnation for m in c.nodes["n1"].members()}["n3"]
        await c.crash("n3")
        await c.wait_until(lambda: c.view("n1")["n3"] == "dead", timeout=30)
        await c.restart("n3")
        await c.wait_until(c.converged, timeout=30)
        after = {m.name: m.incarnation for m in c.nodes["n1"].members()}["n3"]
        assert after > before


@pytest.mark.virtual_time
async def test_partition_each_side_sees_the_other_dead_then_merges() -> None:
    async with SimCluster(6, seed=7) as c:
        await c.wait_until(c.converged, timeout=30)
        left, right = c.names[:3], c.names[3:]
        c.partition(left, right)
        await c.wait_until(
            lambda: (
                all(c.view(a)[b] == "dead" for a in left for b in right)
                and all(c.view(b)[a] == "dead" for a in left for b in right)
            ),
            timeout=60,
        )
        c.heal()
        # Push-pull anti-entropy and rejoining refutations merge the two sides again.
        await c.wait_until(c.converged, timeout=120)


@pytest.mark.virtual_time
async def test_one_way_loss_is_survived_by_indirect_probes() -> None:
    async with SimCluster(5, seed=11) as c:
        await c.wait_until(c.converged, timeout=30)
        c.drop_one_way(["n1"], ["n2"])  # n1 cannot reach n2 directly; others can
        t = c.clock.now()
        await c.run_for(60)
        assert c.first_seen("dead", "n2", after=t) == {}
        assert c.view("n1")["n2"] == "alive"


@pytest.mark.virtual_time
async def test_stalled_node_is_suspected_then_refutes() -> None:
    async with SimCluster(5, seed=13) as c:
        await c.wait_until(c.converged, timeout=30)
        t = c.clock.now()
        c.stall("n5", 0.8)
        await c.run_for(30)
        assert c.first_seen("dead", "n5", after=t) == {}
        assert c.converged()


@pytest.mark.virtual_time
async def test_a_node_without_the_key_cannot_join() -> None:
    c = SimCluster(4, seed=17)
    await c.start(c.names[:3])
    try:
        await c.wait_until(lambda: c.converged(c.names[:3]), timeout=30)
        c.keyring = Keyring.generate()  # the fourth node gets a different key
        await c.start(["n4"])
        await c.run_for(20)
        assert "n4" not in c.view("n1")
        assert set(c.view("n4")) <= {"n4"}
        drops = c.nodes["n1"].packet_codec.drops.as_dict()
        stream_drops = c.nodes["n1"].stream_codec.drops.as_dict()
        assert drops["bad_mac"] + stream_drops["bad_mac"] > 0
    finally:
        await c.stop()


def test_same_seed_same_history() -> None:
    from agentcluster.testing import run_virtual

    async def scenario(seed: int) -> list[tuple[float, str, str, str]]:
        c = SimCluster(5, seed=seed, link=LinkConfig(delay=0.002, jitter=0.001, loss=0.05))
        async with c:
            await c.run_for(10)
            await c.crash("n3")
            await c.run_for(20)
        return [(round(e.at, 9), e.observer, e.kind, e.subject) for e in c.log]

    first = run_virtual(scenario(21))
    again = run_virtual(scenario(21))
    other = run_virtual(scenario(22))
    assert first == again
    assert first != other


@pytest.mark.virtual_time
async def test_metadata_updates_reach_every_node() -> None:
    async with SimCluster(4, seed=19) as c:
        await c.wait_until(c.converged, timeout=30)
        c.nodes["n2"].update_meta(capacity={"gpu": 2.0}, tags={"role": "trainer"})

        def everyone_knows() -> bool:
            for name in c.names:
                meta = next(m.meta for m in c.nodes[name].members() if m.name == "n2")
                if meta.capacity != {"gpu": 2.0} or meta.tags != {"role": "trainer"}:
                    return False
            return True

        await c.wait_until(everyone_knows, timeout=30)
        assert c.first_seen("updated", "n2")
        with pytest.raises(ValueError, match="limit"):
            c.nodes["n2"].update_meta(tags={f"k{i}": "v" * 200 for i in range(10)})
