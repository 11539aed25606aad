"""Real node processes: a node whose CPU is hogged (stopped most of every 50 ms) is flagged
degraded by its peers' health monitors and gets less traffic, but is never declared dead; and
``agentcluster health`` shows it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from typing import Any

import pytest

import agentcluster
from agentcluster.control import request
from agentcluster.launcher import LocalCluster
from agentcluster.testing import eventually

pytestmark = pytest.mark.slow

ECHO = "agentcluster.examples.worker:Echo"


async def _hog(lc: LocalCluster, name: str, stop: asyncio.Event) -> None:
    """Starve ``name`` of CPU: SIGSTOP for 40 ms of every 50 ms until ``stop``."""
    try:
        while not stop.is_set():
            lc.pause(name)
            await asyncio.sleep(0.04)  # (noqa: sleep) the duty cycle is the fault itself
            lc.resume(name)
            await asyncio.sleep(0.01)  # (noqa: sleep) the duty cycle is the fault itself
    finally:
        lc.resume(name)


async def _status(lc: LocalCluster, observer: str, peer: str) -> str:
    view = await request(lc.node(observer).addr, "health", keyring=lc.keyring, timeout=5.0)
    return str(view["peers"].get(peer, {}).get("status", "unknown"))


async def _shares(cluster: agentcluster.RemoteCluster, n: int) -> Counter[str]:
    """Where the last ``n`` (<= 50) calls went, eight at a time (enough in flight that a
    healthy pair shares the load), as n1's balancer recorded."""
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            await cluster.call("echo", "app.echo", {"i": i}, timeout=5.0, idempotent=True)

    await asyncio.gather(*(one(i) for i in range(n)))
    routes = await cluster.routes()
    return Counter(d["node"] for d in routes["decisions"][-n:] if d["capability"] == "echo")


async def test_a_hogged_node_is_degraded_and_avoided_but_not_dead() -> None:
    async with LocalCluster(3, preset="local", agents=[ECHO]) as lc:
        await lc.wait_converged(timeout=60)
        cluster = agentcluster.connect(lc.nodes[0].addr, key_file=str(lc.key_file))
        stop = asyncio.Event()
        hog: asyncio.Task[None] | None = None
        try:

            async def ready() -> bool:
                return len(await cluster.find(capability="echo")) == 3

            await eventually(ready, timeout=30)
            # Calls enter at n1 but are served by n2 and n3 (a local agent would win them all).
            assert await cluster.unregister("n1/echo")
            # While healthy, n3 is in rotation. Latency-aware routing favours whichever node
            # answered faster lately: one slow answer of n3 during start-up (a host hiccup)
            # makes it look slow until its estimate decays (time constant 10 s), so this
            # waits, on the clock, for it to take a share.
            before: Counter[str] = Counter()

            async def n3_in_rotation() -> bool:
                nonlocal before
                before = await _shares(cluster, 50)
                return before["n3"] >= 5

            try:
                await eventually(n3_in_rotation, timeout=90, interval=0.05)
            except TimeoutError:
                raise AssertionError(f"n3 never took a share of the calls: {before}") from None

            hog = asyncio.ensure_future(_hog(lc, "n3", stop))

            async def degraded() -> bool:
                return await _status(lc, "n1", "n3") == "degraded" and (
                    await _status(lc, "n2", "n3") == "degraded"
                )

            await eventually(degraded, timeout=30, interval=0.2)
            during = await _shares(cluster, 50)
            # Latency-aware routing and the degraded/quarantined status steer calls away.
            assert during["n3"] <= 2, (before, during)
            # Alive all along: degraded is not dead.
            views = await lc.views()
            for name, rows in views.items():
                if name != "n3" and rows is not None:
                    assert {r["name"]: r["state"] for r in rows}["n3"] in ("alive", "suspect")

            env = {**os.environ, "AGENTCLUSTER_KEY_FILE": str(lc.key_file)}
            view: dict[str, Any] = {}

            async def cli_shows_degraded() -> bool:
                # The CLI's own snapshot: a status judged on a sliding window may read
                # healthy for a moment between two of the hog's bad spells, so ask again.
                nonlocal view
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agentcluster.cli", "health", "--node",
                    lc.nodes[0].addr, "--json",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode == 0, err.decode()
                view = json.loads(out)
                return bool(view["peers"]["n3"]["status"] == "degraded")

            try:
                await eventually(cli_shows_degraded, timeout=30, interval=0.2)
            except TimeoutError:
                raise AssertionError(f"the CLI never showed n3 degraded: {view}") from None
            assert view["vitals"] is not None and "cpu_system" in view["vitals"]
            stop.set()
            await hog
            # Never declared dead by anyone: the failure detectors counted no death.
            for node in lc.nodes[:2]:
                view = await request(node.addr, "health", keyring=lc.keyring, timeout=5.0)
                assert view["deaths_seen"] == 0
        finally:
            stop.set()
            if hog is not None:
                with contextlib.suppress(Exception):
                    await hog
            await cluster.close()
