"""``agentcluster bench health``: the HealthMonitor's numbers.

Theory of operation:

* ``basic_check_p50_ms`` / ``basic_check_p99_ms`` -- this process runs a real node that joins
  a real node process on loopback and runs the basic check against it (a stream ping with a
  fresh sealed frame, answered by the peer's membership layer), sequentially.
* ``precision``, ``recall``, ``anomaly_detection_delay_samples`` -- the default detectors over
  the fixed synthetic suite of labelled series (:mod:`agentcluster.health.synthetic`, seed 7:
  CPU, memory, network and latency series with spikes, steps, drifts and latency outliers,
  and clean ones with noise, seasonality and benign bursts). Precision counts each run of
  stray flags as one false alarm (what a deduplicating alert layer would raise);
  ``flag_precision`` counts flag by flag.
* ``quarantine_decision_p50_ms`` / ``_p99_ms`` -- 5 real node processes; a quarantine
  proposal among all health monitors (asked through one node's control API), from the
  request to the committed decision in the client's hands.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agentcluster.bench.membership import percentile

__all__ = ["run"]


async def _basic(checks: int) -> dict[str, Any]:
    from agentcluster.config import NodeConfig
    from agentcluster.health.checks import stream_ping
    from agentcluster.launcher import LocalCluster, free_port
    from agentcluster.node import Node

    async with LocalCluster(1, preset="local", store_voters=0) as lc:
        await lc.wait_converged(timeout=30)
        target = lc.nodes[0]
        config = NodeConfig(
            name="bench", bind=f"127.0.0.1:{free_port()}", seeds=[target.addr], preset="local"
        )
        async with Node(config, keyring=lc.keyring, vitals=False) as node:
            deadline = time.monotonic() + 30
            while node.core.member(target.name) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("the bench node never joined")
                await asyncio.sleep(0.02)
            for seq in range(200):  # warm up
                await stream_ping(node, target.name, seq=seq, timeout=1.0)
            rtts: list[float] = []
            perf = time.perf_counter  # the loop clock ticks in milliseconds on uvloop
            for i in range(checks):
                t0 = perf()
                await stream_ping(node, target.name, seq=1000 + i, timeout=1.0)
                rtts.append(perf() - t0)
    rtts.sort()
    return {
        "basic_check_p50_ms": round(percentile(rtts, 0.5) * 1000, 3),
        "basic_check_p99_ms": round(percentile(rtts, 0.99) * 1000, 3),
        "basic_checks": checks,
    }


async def _views_ready(lc: Any, timeout: float = 60.0) -> None:
    """Wait until every monitor has judged every peer (a monitor without data abstains)."""
    from agentcluster.control import ControlError, request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = True
        for n in lc.nodes:
            try:
                view = await request(n.addr, "health", keyring=lc.keyring, timeout=2.0)
            except ControlError:
                ready = False
                break
            peers = view.get("peers", {})
            if len(peers) < len(lc.nodes) - 1 or any(
                p["status"] == "unknown" for p in peers.values()
            ):
                ready = False
                break
        if ready:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the health monitors never judged every peer")


async def _quarantine(decisions: int) -> dict[str, Any]:
    from agentcluster.control import ControlClient
    from agentcluster.launcher import LocalCluster

    async with LocalCluster(5, preset="local") as lc:
        await lc.wait_converged(timeout=60)
        client = ControlClient(lc.nodes[0].addr, keyring=lc.keyring, timeout=10.0)
        try:
            await _views_ready(lc)
            # Every monitor registered and every node's store routes: one proposal to warm up.
            deadline = time.monotonic() + 60
            while True:
                try:
                    await client.call("health", {"action": "quarantine", "node": lc.nodes[1].name})
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            times: list[float] = []
            outcomes: dict[str, int] = {}
            for i in range(decisions):
                target = lc.nodes[1 + i % 4].name
                t0 = time.perf_counter()
                d = await client.call("health", {"action": "quarantine", "node": target})
                times.append(time.perf_counter() - t0)
                kind = str(d["outcome"][0])
                outcomes[kind] = outcomes.get(kind, 0) + 1
        finally:
            await client.close()
    times.sort()
    return {
        "quarantine_decision_p50_ms": round(percentile(times, 0.5) * 1000, 3),
        "quarantine_decision_p99_ms": round(percentile(times, 0.99) * 1000, 3),
        "quarantine_decisions": len(times),
        "quarantine_outcomes": outcomes,
    }


def run(*, checks: int = 3_000, decisions: int = 100) -> dict[str, Any]:
    from agentcluster.cli.cluster import run_loop
    from agentcluster.health.synthetic import evaluate

    suite = evaluate()
    result: dict[str, Any] = {"bench": "health"}
    result.update(run_loop(_basic(checks)))
    result.update(
        {
            "precision": round(suite["precision"], 4),
            "recall": round(suite["recall"], 4),
            "anomaly_detection_delay_samples": suite["anomaly_detection_delay_samples"],
            "anomaly_detection_delay_samples_p95": suite.get("anomaly_detection_delay_samples_p95"),
            "flag_precision": round(suite.get("flag_precision", 0.0), 4),
        }
    )
    result.update(run_loop(_quarantine(decisions)))
    return result
