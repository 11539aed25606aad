"""``cluster.call`` across real node processes: a node killed under load loses no call
without a typed error, and idempotent calls succeed on retry."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

import agentcluster
from agentcluster.errors import CallError
from agentcluster.launcher import LocalCluster
from agentcluster.testing import eventually

pytestmark = pytest.mark.slow

ECHO = "agentcluster.examples.worker:Echo"


async def _load(
    cluster: agentcluster.RemoteCluster, n: int, *, idempotent: bool, concurrency: int = 16
) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            try:
                return await cluster.call(
                    "echo", "app.echo", {"i": i, "sleep": 0.005}, timeout=3.0,
                    idempotent=idempotent,
                )  # fmt: skip
            except CallError as exc:
                return exc

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_calls_survive_a_killed_node() -> None:
    async with LocalCluster(4, preset="local", agents=[ECHO], store_voters=0) as lc:
        await lc.wait_converged(timeout=60)
        key = str(lc.key_file)
        cluster = agentcluster.connect(lc.nodes[0].addr, key_file=key)
        try:

            async def everyone() -> bool:
                return len(await cluster.find(capability="echo")) == 4

            await eventually(everyone, timeout=30)
            warm = await _load(cluster, 200, idempotent=True)
            assert all(isinstance(r, dict) for r in warm)
            served = {r["agent"] for r in warm}
            assert served == {"echo"}

            victim = lc.nodes[3].name
            load = asyncio.ensure_future(_load(cluster, 1500, idempotent=True))
            await asyncio.sleep(0.3)  # (noqa: sleep) let the load run before the kill
            assert not load.done()  # the kill lands mid-load
            await lc.kill(victim)
            results = await load
            failed = [r for r in results if not isinstance(r, dict)]
            assert not failed, failed[:3]

            # Non-idempotent calls: each one succeeds or fails with a typed error.
            mixed = await _load(cluster, 300, idempotent=False)
            assert all(isinstance(r, dict | CallError) for r in mixed)

            routes = await cluster.routes()
            assert "echo" in routes["capabilities"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agentcluster.cli", "routes", "--node", lc.nodes[0].addr,
                "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "AGENTCLUSTER_KEY_FILE": key},
            )  # fmt: skip
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, stderr.decode()
            view = json.loads(stdout)
            assert view["strategy"] == "latency_aware" and view["decisions"]
        finally:
            await cluster.close()


@pytest.mark.parametrize("preset", ["local", "lan"])
async def test_the_call_overhead_measurement_reports_both_paths(preset: str) -> None:
    # What `agentcluster bench lb` times: cluster.call against a real node process, and a
    # bare stream round trip to it, percentile by percentile.
    import gc

    from agentcluster import tuning
    from agentcluster.bench.lb import _call_overhead

    threshold = gc.get_threshold()
    try:
        out = await _call_overhead(30, preset)
    finally:  # the bench tunes its own process (GC, scheduler): give pytest's back
        gc.unfreeze()
        gc.set_threshold(*threshold)
        tuning.tune_scheduler("normal")
    assert out["calls_timed"] == 30 and out["call_preset"] == preset
    for key in ("call", "transport_rtt"):
        assert 0 < out[f"{key}_p50_us"] <= out[f"{key}_p99_us"]
    assert out["call_overhead_p50_us"] == pytest.approx(
        out["call_p50_us"] - out["transport_rtt_p50_us"], abs=0.2
    )
