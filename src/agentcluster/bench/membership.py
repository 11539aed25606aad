"""``agentcluster bench membership``: join, crash and stall detection, false positives, cost.

Theory of operation — two modes, one set of keys:

* ``sim``: a :class:`~agentcluster.testing.SimCluster` of real nodes on the simulated network
  in virtual time. Every link loses ``loss`` of its packets; ``laggy`` of the nodes stall
  0.3–0.8 s again and again (alive, slow). After a quiet window (where steady-state packets
  and bytes per node per second are measured), nodes are crashed one at a time; each crash is
  timed until every live member has marked it dead, and the node is restarted later (its
  rejoin is timed until every member lists it alive). A stall probe blocks one node until the
  others declare it dead. Any death of a node that was not crashed or stalled on purpose is a
  false positive.
* ``real``: a :class:`~agentcluster.launcher.LocalCluster` of node processes on loopback;
  crashes are SIGKILL, stalls SIGSTOP, timings come from each node's own view (the wall time
  at which it changed the member's state), read through the control API.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from agentcluster.transport.memory import LinkConfig

__all__ = ["percentile", "run_real", "run_sim"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


# ---------------------------------------------------------------------------------- sim
async def _sim(
    n: int, duration: float, seed: int, loss: float, laggy: float, crashes: int, preset: str
) -> dict[str, Any]:
    from agentcluster.testing.simcluster import SimCluster

    rng = random.Random(seed)
    joiners = max(3, min(10, n // 20))
    cluster = SimCluster(
        n + joiners,
        seed=seed,
        preset=preset,
        link=LinkConfig(delay=0.001, jitter=0.0005, loss=loss),
    )
    base = cluster.names[:n]
    extra = cluster.names[n:]
    clock = cluster.clock
    t0 = clock.now()
    # Nodes come up in waves of 100 a second (a thousand processes never start in the same
    # millisecond, and two seeds answering a thousand simultaneous joins is a test of the
    # seeds, not of membership).
    for i in range(0, n, 100):
        await cluster.start(base[i : i + 100])
        await cluster.run_for(1.0)

    def converged() -> bool:
        # O(n) instead of comparing every view: each node counts n live members.
        return all(cluster.nodes[name].core.num_live == n for name in base)

    await cluster.wait_until(converged, timeout=600, step=0.5)
    converge_s = clock.now() - t0

    # Laggy nodes: never seeds (n1, n2), never crash victims.
    candidates = base[2:]
    lag_nodes = rng.sample(candidates, k=min(len(candidates), round(laggy * n)))
    stop_lag = False

    async def lag_loop(name: str) -> None:
        lrng = random.Random(f"{seed}/lag/{name}")
        while not stop_lag:
            await asyncio.sleep(lrng.uniform(1.0, 4.0))
            if name in cluster.nodes and name not in cluster.crashed:
                cluster.stall(name, lrng.uniform(0.3, 0.8))

    lag_tasks = [asyncio.ensure_future(lag_loop(name)) for name in lag_nodes]
    intentional: dict[str, list[tuple[float, float]]] = {}

    def mark(name: str, start: float, end: float) -> None:
        intentional.setdefault(name, []).append((start, end))

    def everyone_lists(subject: str) -> Callable[[], bool]:
        def check() -> bool:
            return all(cluster.view(o).get(subject) == "alive" for o in cluster.live())

        return check

    try:
        # Quiet window: steady-state cost.
        def totals() -> tuple[int, int]:
            p = b = 0
            for name in cluster.live():
                ms = cluster.nodes[name].membership
                p += ms.packets_sent
                b += ms.bytes_sent
            return p, b

        quiet = min(60.0, duration * 0.2)
        p0, b0 = totals()
        await cluster.run_for(quiet)
        p1, b1 = totals()
        live_n = len(cluster.live())
        packets_rate = (p1 - p0) / live_n / quiet
        bytes_rate = (b1 - b0) / live_n / quiet

        # Crashes, spread over the remaining time; each victim restarts later.
        remaining = duration - quiet
        gap = remaining / (crashes + 1)
        victims = [v for v in candidates if v not in lag_nodes]
        rng.shuffle(victims)
        detect: list[float] = []
        joins: list[float] = []
        undetected = 0
        for i in range(crashes):
            await cluster.run_for(gap * 0.5)
            victim = victims[i % len(victims)]
            at = clock.now()
            await cluster.crash(victim)
            observers = [x for x in cluster.live()]

            def all_dead(v: str = victim, obs: list[str] = observers) -> bool:
                return all(
                    cluster.view(o).get(v, "dead") in ("dead", "left")
                    for o in obs
                    if o in cluster.nodes and o not in cluster.crashed
                )

            try:
                await cluster.wait_until(all_dead, timeout=60, step=0.05)
            except TimeoutError:
                undetected += 1
            seen = cluster.first_seen("dead", victim, after=at)
            for obs in observers:
                if obs in seen:
                    detect.append(seen[obs] - at)
            mark(victim, at, math.inf)
            await cluster.run_for(gap * 0.5)
            started = clock.now()
            await cluster.restart(victim)
            intentional[victim][-1] = (at, clock.now())
            try:
                await cluster.wait_until(everyone_lists(victim), timeout=60, step=0.05)
                joins.append(clock.now() - started)
            except TimeoutError:
                joins.append(math.inf)

        # New nodes joining a running cluster.
        for name in extra:
            started = clock.now()
            await cluster.start([name])
            try:
                await cluster.wait_until(everyone_lists(name), timeout=60, step=0.02)
                joins.append(clock.now() - started)
            except TimeoutError:
                joins.append(math.inf)

        # Stall probe: one node blocked until everyone declares it dead.
        stall_times: list[float] = []
        stall_victim = victims[-1]
        at = clock.now()
        cluster.stall(stall_victim, 30.0)
        mark(stall_victim, at, at + 30.0 + 10.0)
        observers = [x for x in cluster.live() if x != stall_victim]
        try:
            await cluster.wait_until(
                lambda: all(
                    cluster.view(o).get(stall_victim) in ("dead", "left") for o in observers
                ),
                timeout=30,
                step=0.05,
            )
        except TimeoutError:
            undetected += 1
        seen = cluster.first_seen("dead", stall_victim, after=at)
        stall_times = [seen[o] - at for o in observers if o in seen]
        await cluster.run_for(15.0)  # it wakes up, refutes and is alive again
    finally:
        stop_lag = True
        for task in lag_tasks:
            task.cancel()
        if sys.exc_info()[0] is not None:
            await cluster.stop()

    false_positives = 0
    for ev in cluster.log:
        if ev.kind != "dead":
            continue
        windows = intentional.get(ev.subject, [])
        if not any(start <= ev.at <= end + 1.0 for start, end in windows):
            false_positives += 1
    await cluster.stop()
    return {
        "nodes": n,
        "simulated_s": round(clock.now() - t0, 1),
        "initial_convergence_s": round(converge_s, 3),
        "join_convergence_p99_s": _r(percentile(joins, 0.99)),
        "crash_detection_p50_s": _r(percentile(detect, 0.50)),
        "crash_detection_p99_s": _r(percentile(detect, 0.99)),
        "stall_detection_p99_s": _r(percentile(stall_times, 0.99)),
        "join_samples_s": [_r(j) for j in joins],
        "false_positive_deaths": false_positives,
        "undetected": undetected,
        "packets_per_node_per_s": round(packets_rate, 3),
        "bytes_per_node_per_s": round(bytes_rate, 1),
        "crashes": crashes,
        "laggy_nodes": len(lag_nodes),
        "loss": loss,
    }


def run_sim(
    n: int = 200,
    *,
    duration: float = 600.0,
    seed: int = 1,
    loss: float = 0.05,
    laggy: float = 0.10,
    crashes: int = 10,
    preset: str = "lan",
) -> dict[str, Any]:
    from agentcluster.testing import run_virtual

    wall = time.perf_counter()
    result = run_virtual(_sim(n, duration, seed, loss, laggy, crashes, preset))
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    return result


# --------------------------------------------------------------------------------- real
async def _real(n: int, trials: int, preset: str) -> dict[str, Any]:
    from agentcluster.launcher import LocalCluster

    async with LocalCluster(n, preset=preset) as cluster:
        await cluster.wait_converged(timeout=60)

        async def view_of(name: str) -> list[dict[str, Any]] | None:
            try:
                data: list[dict[str, Any]] = await cluster.ask(name, "members", timeout=1.0)
                return data
            except Exception:
                return None

        false_deaths: set[tuple[str, str, int]] = set()

        async def wait_state(
            subject: str, states: tuple[str, ...], observers: list[str], timeout: float
        ) -> dict[str, float]:
            """Poll until every observer reports ``subject`` in ``states``; return each
            observer's change time (its own wall clock)."""
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            got: dict[str, float] = {}
            while loop.time() < end:
                for obs in observers:
                    if obs in got:
                        continue
                    view = await view_of(obs)
                    for m in view or []:
                        if m["name"] == subject and m["state"] in states:
                            got[obs] = m["changed_at"]
                        elif m["name"] != subject and m["state"] in ("dead", "left"):
                            # Nobody else was broken on purpose: a death here is false.
                            false_deaths.add((obs, m["name"], m["incarnation"]))
                if len(got) == len(observers):
                    return got
                await asyncio.sleep(0.05)
            return got

        # Steady-state cost over a quiet window.
        stats0 = {p.name: await cluster.ask(p.name, "stats") for p in cluster.nodes}
        await asyncio.sleep(5.0)
        stats1 = {p.name: await cluster.ask(p.name, "stats") for p in cluster.nodes}
        span = 5.0
        packets_rate = (
            sum(stats1[k]["packets_sent"] - stats0[k]["packets_sent"] for k in stats0) / n / span
        )
        bytes_rate = (
            sum(stats1[k]["bytes_sent"] - stats0[k]["bytes_sent"] for k in stats0) / n / span
        )

        detect: list[float] = []
        stalls: list[float] = []
        joins: list[float] = []
        victims = [p.name for p in cluster.nodes[2:]] or [cluster.nodes[-1].name]
        for i in range(trials):
            victim = victims[i % len(victims)]
            observers = [p.name for p in cluster.nodes if p.name != victim]
            killed_at = time.time()
            await cluster.kill(victim)
            seen = await wait_state(victim, ("dead", "left"), observers, 30)
            detect += [t - killed_at for t in seen.values()]
            # Rejoin: from the moment the new node has started (its own clock, read from
            # its stats; process start-up and imports are not membership) until every
            # member lists it alive.
            await cluster.spawn(cluster.node(victim))
            started = await _started_at(cluster, victim)
            seen = await wait_state(victim, ("alive",), observers, 30)
            joins += [max(0.0, t - started) for t in seen.values()]
            await cluster.wait_converged(timeout=30)

            stalled = victims[(i + 1) % len(victims)]
            observers = [p.name for p in cluster.nodes if p.name != stalled]
            paused_at = time.time()
            cluster.pause(stalled)
            seen = await wait_state(stalled, ("dead", "left"), observers, 30)
            stalls += [t - paused_at for t in seen.values()]
            cluster.resume(stalled)
            await cluster.wait_converged(timeout=30)

    return {
        "nodes": n,
        "trials": trials,
        "join_convergence_p99_s": _r(percentile(joins, 0.99)),
        "crash_detection_p50_s": _r(percentile(detect, 0.50)),
        "crash_detection_p99_s": _r(percentile(detect, 0.99)),
        "stall_detection_p99_s": _r(percentile(stalls, 0.99)),
        "false_positive_deaths": len(false_deaths),
        "packets_per_node_per_s": round(packets_rate, 3),
        "bytes_per_node_per_s": round(bytes_rate, 1),
    }


async def _started_at(cluster: Any, name: str, timeout: float = 30.0) -> float:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        try:
            stats = await cluster.ask(name, "stats", timeout=0.5)
            return float(stats["started_at"])
        except Exception:
            await asyncio.sleep(0.02)
    raise TimeoutError(f"{name} did not come up within {timeout}s")


def run_real(n: int = 10, *, trials: int = 5, preset: str = "local") -> dict[str, Any]:
    wall = time.perf_counter()
    result = asyncio.run(_real(n, trials, preset))
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    return result
