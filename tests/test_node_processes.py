"""Real node processes on loopback: crash detection, rejoin, the members command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from agentcluster.control import request
from agentcluster.launcher import LocalCluster
from agentcluster.testing import eventually

pytestmark = pytest.mark.slow


async def test_five_processes_detect_a_kill_and_rejoin() -> None:
    async with LocalCluster(5, preset="local") as cluster:
        await cluster.wait_converged(timeout=60)
        killed_at = time.time()
        await cluster.kill("n4")
        others = ["n1", "n2", "n3", "n5"]

        async def all_dead() -> dict[str, float] | None:
            views = await cluster.views()
            out = {}
            for name in others:
                for m in views[name] or []:
                    if m["name"] == "n4" and m["state"] == "dead":
                        out[name] = m["changed_at"]
            return out if len(out) == len(others) else None

        seen = await eventually(all_dead, timeout=30)
        detection = max(seen.values()) - killed_at
        assert detection < 2.5, f"crash detection took {detection:.2f}s"
        await cluster.spawn(cluster.node("n4"))
        await cluster.wait_converged(timeout=30)

        # The members command shows the same view, authenticated with the cluster key.
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agentcluster.cli", "members", "--node", cluster.node("n1").addr,
             "--key-file", str(cluster.key_file), "--json"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert {r["name"]: r["state"] for r in rows} == {f"n{i}": "alive" for i in range(1, 6)}
        assert {r["zone"] for r in rows} == {"z1", "z2", "z3"}

        # Without the key, the control API stays shut.
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agentcluster.cli", "members", "--node", cluster.node("n1").addr],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 1
        assert "error" in out.stderr


async def test_sigterm_leaves_gracefully() -> None:
    async with LocalCluster(3, preset="local") as cluster:
        await cluster.wait_converged(timeout=60)
        # `node run` tunes its process once up (agentcluster.tuning); stats show it.
        stats = await request(cluster.nodes[0].addr, "stats", keyring=cluster.keyring)
        assert stats["tuning"]["gc_threshold"][0] == 20_000
        assert stats["tuning"]["gc_frozen"] > 1_000
        assert stats["tuning"]["sched"] == "batch"
        code = await cluster.terminate("n3")
        assert code == 0

        async def left_everywhere() -> bool:
            views = await cluster.views()
            states = [
                m["state"] for v in (views["n1"], views["n2"]) for m in v or [] if m["name"] == "n3"
            ]
            return states == ["left", "left"]

        assert await eventually(left_everywhere, timeout=10)
