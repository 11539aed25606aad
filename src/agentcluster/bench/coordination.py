"""``agentcluster bench coordination``: registry lookups and convergence, consensus decisions
and lock acquisitions of the MABEAM layer.

Theory of operation:

* ``registry_lookup_p50_us`` / ``registry_lookup_p99_us`` -- in this process, a registry index
  of 10,000 entries (100 capabilities, 1-3 per agent, 10% not healthy, a ``gpu`` resource on
  some) answers ``capability == cap-k AND health == healthy AND resources.gpu >= 1`` for 256
  different ``k`` in turn, while one entry changes every 5,000 lookups (an agent updating
  its resources):
  exactly what a node does for a local query (no network). Results are memoised until an
  entry of the queried capability changes. ``registry_lookup_uncached_*`` time the planner
  and filter alone (every lookup computed from the indexes).
* ``registry_convergence_p50_s`` / ``_p99_s`` -- a :class:`~agentcluster.launcher.LocalCluster`
  of real node processes (10 by default), each running an example ``voter`` agent; each round
  re-registers one node's voter with a new capability through that node's control API, and
  times until every node's registry answers a query for it (all nodes polled concurrently
  over persistent control connections; the poll interval, 2 ms, bounds the resolution).
* ``consensus_decision_p50_ms`` / ``_p99_ms`` -- through :func:`agentcluster.connect`, a
  proposal among the voters of ``--nodes`` nodes (majority rule), from the client's start
  call to the committed decision in its hands (vote requests, votes, the store commit and
  the control round trips included), sequentially.
* ``lock_acquire_p50_ms`` / ``_p99_ms`` -- a lock acquired (lease grant + create + queue
  read) and released, sequentially, through the same client.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import msgspec

from agentcluster.bench.membership import percentile

__all__ = ["run", "run_lookups"]

VOTER = "agentcluster.examples.voter:Voter"
# One registry change per this many lookups: entries change when agents register, leave or
# update themselves -- rarely next to routing lookups, which run on every call.
_CHURN_EVERY = 5_000


def run_lookups(entries: int = 10_000, lookups: int = 20_000, seed: int = 1) -> dict[str, Any]:
    from agentcluster.coordination.query import Cond
    from agentcluster.coordination.registry import AgentEntry, RegistryIndex

    rng = random.Random(seed)
    index = RegistryIndex()
    for i in range(entries):
        caps = tuple(f"cap-{rng.randrange(100)}" for _ in range(rng.randint(1, 3)))
        index.upsert(
            AgentEntry(
                id=f"n{i % 10}/agent-{i}",
                name=f"agent-{i}",
                node=f"n{i % 10}",
                capabilities=tuple(dict.fromkeys(caps)),
                health="healthy" if rng.random() < 0.9 else "degraded",
                resources={"gpu": float(rng.randrange(3)), "load": rng.random()},
            )
        )
    queries = [
        [
            Cond("capability", "eq", f"cap-{rng.randrange(100)}"),
            Cond("health", "eq", "healthy"),
            Cond("resources.gpu", "gte", 1),
        ]
        for _ in range(256)
    ]
    entries_list = index.entries()
    perf = time.perf_counter_ns

    def timed(query: Any, churn: bool) -> tuple[list[float], int]:
        times: list[float] = []
        matched = 0
        for i in range(lookups):
            if churn and i % _CHURN_EVERY == _CHURN_EVERY - 1:
                # The registry changes now and then (a load report): memos of the
                # capabilities that entry has are invalidated.
                e = entries_list[rng.randrange(len(entries_list))]
                index.upsert(
                    msgspec.structs.replace(e, resources={**e.resources, "load": rng.random()})
                )
            q = queries[i & 255]
            t0 = perf()
            found = query(q)
            times.append(perf() - t0)
            matched += len(found)
        times.sort()
        return times, matched

    uncached, matched = timed(lambda q: index._query(q, 0, None, False), False)
    memo, _ = timed(index.query, True)
    return {
        "registry_entries": entries,
        "registry_lookup_p50_us": round(percentile(memo, 0.5) / 1000, 2),
        "registry_lookup_p99_us": round(percentile(memo, 0.99) / 1000, 2),
        "registry_lookup_uncached_p50_us": round(percentile(uncached, 0.5) / 1000, 2),
        "registry_lookup_uncached_p99_us": round(percentile(uncached, 0.99) / 1000, 2),
        "registry_lookup_mean_matches": round(matched / lookups, 1),
    }


async def _seen(client: Any, where: list[list[str]]) -> bool:
    from agentcluster.control import ControlError

    try:
        found = await client.call("mabeam", {"fn": "find", "where": where})
    except ControlError:
        return False
    return bool(found)


async def _convergence(cluster: Any, rounds: int, rng: random.Random) -> list[float]:
    from agentcluster.control import ControlClient

    clients = [ControlClient(n.addr, keyring=cluster.keyring, timeout=5.0) for n in cluster.nodes]
    out = []
    try:
        for r in range(rounds):
            owner = rng.randrange(len(clients))
            cap = f"bench-round-{r}"
            t0 = time.perf_counter()
            await clients[owner].call(
                "mabeam",
                {"fn": "register", "agent": "voter", "capabilities": ["vote", cap]},
            )
            where = [["capability", "eq", cap]]
            pending = set(range(len(clients)))
            deadline = t0 + 10.0
            while pending and time.perf_counter() < deadline:
                got = await asyncio.gather(*(_seen(clients[i], where) for i in sorted(pending)))
                pending -= {i for i, ok in zip(sorted(pending), got, strict=True) if ok}
                if pending:
                    await asyncio.sleep(0.002)
            if pending:
                raise TimeoutError(f"round {r}: {len(pending)} nodes never saw the change")
            out.append(time.perf_counter() - t0)
    finally:
        for c in clients:
            await c.close()
    return out


async def _wait_voters(remote: Any, n: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await remote.find(capability="vote")
        if len({e.node for e in found}) >= n:
            return sorted(e.id for e in found)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"fewer than {n} voters registered within {timeout}s")


async def _run(
    nodes: int, cluster_nodes: int, rounds: int, proposals: int, locks: int
) -> dict[str, Any]:
    from agentcluster.cluster import RemoteCluster
    from agentcluster.launcher import LocalCluster

    rng = random.Random(7)
    size = max(nodes, cluster_nodes)
    async with LocalCluster(size, preset="local", agents=[VOTER]) as cluster:
        await cluster.wait_converged(timeout=60)
        remote = RemoteCluster([n.addr for n in cluster.nodes], keyring=cluster.keyring)
        try:
            all_voters = await _wait_voters(remote, size)
            convergence = await _convergence(cluster, rounds, rng)
            names = {n.name for n in cluster.nodes[:nodes]}
            participants = [v for v in all_voters if v.split("/", 1)[0] in names]
            decisions = []
            accepted = 0
            for i in range(proposals):
                t0 = time.perf_counter()
                d = await remote.consensus(participants, {"round": i}, rule="majority")
                decisions.append(time.perf_counter() - t0)
                accepted += d.accepted
            lock_times = []
            for _ in range(locks):
                lock = remote.lock("bench")
                t0 = time.perf_counter()
                await lock.acquire(timeout=10)
                lock_times.append(time.perf_counter() - t0)
                await lock.release()
        finally:
            await remote.close()
    convergence.sort()
    decisions.sort()
    lock_times.sort()
    return {
        "cluster_nodes": size,
        "registry_convergence_p50_s": round(percentile(convergence, 0.5), 4),
        "registry_convergence_p99_s": round(percentile(convergence, 0.99), 4),
        "convergence_rounds": len(convergence),
        "consensus_participants": len(participants),
        "consensus_decision_p50_ms": round(percentile(decisions, 0.5) * 1000, 3),
        "consensus_decision_p99_ms": round(percentile(decisions, 0.99) * 1000, 3),
        "consensus_accepted": accepted,
        "consensus_runs": len(decisions),
        "lock_acquire_p50_ms": round(percentile(lock_times, 0.5) * 1000, 3),
        "lock_acquire_p99_ms": round(percentile(lock_times, 0.99) * 1000, 3),
    }


def run(
    *,
    nodes: int = 5,
    cluster_nodes: int = 10,
    entries: int = 10_000,
    lookups: int = 20_000,
    rounds: int = 30,
    proposals: int = 200,
    locks: int = 200,
) -> dict[str, Any]:
    from agentcluster.cli.cluster import run_loop

    result: dict[str, Any] = {"bench": "coordination", "nodes": nodes}
    result.update(run_lookups(entries, lookups))
    result.update(run_loop(_run(nodes, cluster_nodes, rounds, proposals, locks)))
    return result
