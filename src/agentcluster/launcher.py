"""LocalCluster: N real node processes on loopback, for ``agentcluster up`` and benchmarks.

Theory of operation: the launcher picks free loopback ports, writes a fresh cluster key to a
private temporary directory, and starts each node as ``python -m agentcluster.cli node run``
with the first node as seed. Children get ``PR_SET_PDEATHSIG`` (Linux), so they die with the
launcher even if it is killed with SIGKILL: no orphans. Faults are real signals: ``kill``
sends SIGKILL (a crash), ``stop`` SIGTERM (graceful leave), ``pause``/``resume``
SIGSTOP/SIGCONT (a stalled process). Views come from each node's authenticated control API.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentcluster import control
from agentcluster.wire import Keyring

__all__ = ["LocalCluster", "ProcNode", "die_with_parent", "free_port"]


def free_port(host: str = "127.0.0.1", *, avoid: Sequence[int] = ()) -> int:
    """A port free for both TCP and UDP on ``host`` right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            if port in avoid:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no free TCP+UDP port on {host} after 100 tries")


def die_with_parent() -> None:
    """A ``preexec_fn``: the child gets SIGKILL when its parent dies, and starts with no
    signals blocked."""
    # Linux only: the kernel sends SIGKILL to the child when the thread that forked it dies.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass
    # An event loop such as uvloop may block signals in the thread that forks; the child
    # inherits that mask, and a Go program like etcd dies of SIGSEGV when its runtime's
    # signals are blocked.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


@dataclass
class ProcNode:
    name: str
    addr: str
    zone: str
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    paused: bool = False
    extra_args: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class LocalCluster:
    """Start, watch, break and stop N node processes on 127.0.0.1."""

    def __init__(
        self,
        n: int,
        *,
        preset: str = "local",
        zones: Sequence[str] = ("z1", "z2", "z3"),
        workdir: str | Path | None = None,
        python: str = sys.executable,
        log_level: str = "warning",
        store_voters: int | None = None,
        fsync: bool = True,
        snapshot_every: int | None = None,
        agents: Sequence[str] = (),
    ) -> None:
        """``store_voters``: how many nodes (the first ones) hold the coordination store's
        Raft log, each under ``workdir/<name>/``; default 3 (fewer in smaller clusters), 0 for
        no store. ``agents``: user agents (``module:Class``) every node starts."""
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got {n}")
        voters = min(n, 3) if store_voters is None else store_voters
        if not 0 <= voters <= n:
            raise ValueError(f"store_voters must be within 0..{n}, got {voters}")
        self.fsync = fsync
        self.snapshot_every = snapshot_every
        self.agents = list(agents)
        self.n = n
        self.preset = preset
        self.zones = list(zones) or ["z1"]
        self.python = python
        self.log_level = log_level
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="agentcluster-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keyring = Keyring.generate()
        self.key_file = self.workdir / "cluster.key"
        self.keyring.to_file(self.key_file)
        ports: list[int] = []
        for _ in range(n):
            ports.append(free_port(avoid=ports))
        self.nodes = [
            ProcNode(
                name=f"n{i + 1}",
                addr=f"127.0.0.1:{port}",
                zone=self.zones[i % len(self.zones)],
                log_path=self.workdir / f"n{i + 1}.log",
            )
            for i, port in enumerate(ports)
        ]
        self.store_voters = [node.name for node in self.nodes[:voters]]

    def node(self, name: str) -> ProcNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} (nodes: {[n.name for n in self.nodes]})")

    def _seeds(self, me: ProcNode) -> list[str]:
        # Two seeds, so a restart of the first node does not strand the others.
        return [n.addr for n in self.nodes[:2] if n is not me] or [self.nodes[0].addr]

    async def spawn(self, node: ProcNode) -> None:
        if node.running:
            raise RuntimeError(f"{node.name} is already running")
        args = [
            self.python, "-m", "agentcluster.cli", "node", "run",
            "--name", node.name, "--bind", node.addr, "--zone", node.zone,
            "--key-file", str(self.key_file), "--preset", self.preset,
            "--log-level", self.log_level,
        ]  # fmt: skip
        for seed in self._seeds(node):
            args += ["--seed", seed]
        for voter in self.store_voters:
            args += ["--store-voter", voter]
        if node.name in self.store_voters:
            args += ["--data-dir", str(self.workdir / node.name)]
            args += ["--fsync" if self.fsync else "--no-fsync"]
            if self.snapshot_every is not None:
                args += ["--snapshot-every", str(self.snapshot_every)]
        for agent in self.agents:
            args += ["--agent", agent]
        args += node.extra_args
        # A local file open is instant; the child inherits the descriptor.
        log = open(node.log_path, "ab")  # noqa: SIM115, ASYNC230
        try:
            node.proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        node.paused = False

    async def start(self) -> None:
        for node in self.nodes:
            await self.spawn(node)

    async def kill(self, name: str) -> None:
        """SIGKILL: a crash. Waits until the process is gone."""
        node = self.node(name)
        if node.proc is not None and node.proc.returncode is None:
            if node.paused:
                node.proc.send_signal(signal.SIGCONT)
            node.proc.kill()
            await node.proc.wait()
        node.paused = False

    async def terminate(self, name: str, *, timeout: float = 10.0) -> int | None:
        """SIGTERM: a graceful leave; SIGKILL if it has not exited within ``timeout``."""
        node = self.node(name)
        proc = node.proc
        if proc is None or proc.returncode is not None:
            return None if proc is None else proc.returncode
        if node.paused:
            proc.send_signal(signal.SIGCONT)
            node.paused = False
        proc.terminate()
        try:
            async with asyncio.timeout(timeout):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
            return await proc.wait()

    async def restart(self, name: str) -> None:
        node = self.node(name)
        await self.kill(name)
        node.restarts += 1
        await self.spawn(node)

    def pause(self, name: str) -> None:
        node = self.node(name)
        if node.proc is not None and node.proc.returncode is None:
            node.proc.send_signal(signal.SIGSTOP)
            node.paused = True

    def resume(self, name: str) -> None:
        node = self.node(name)
        if node.proc is not None and node.proc.returncode is None and node.paused:
            node.proc.send_signal(signal.SIGCONT)
            node.paused = False

    async def ask(self, name: str, op: str, *, timeout: float = 2.0) -> Any:
        return await control.request(
            self.node(name).addr, op, keyring=self.keyring, timeout=timeout
        )

    async def views(self, *, timeout: float = 1.0) -> dict[str, list[dict[str, Any]] | None]:
        """Every running node's member list (None where the node did not answer)."""

        async def one(node: ProcNode) -> list[dict[str, Any]] | None:
            if not node.running or node.paused:
                return None
            try:
                data: list[dict[str, Any]] = await self.ask(node.name, "members", timeout=timeout)
                return data
            except control.ControlError:
                return None

        results = await asyncio.gather(*(one(n) for n in self.nodes))
        return {n.name: r for n, r in zip(self.nodes, results, strict=True)}

    async def converged(self, alive: Sequence[str] | None = None) -> bool:
        """Every running node answers and lists exactly ``alive`` (default: the running
        nodes) as alive."""
        expected = set(alive if alive is not None else [n.name for n in self.nodes if n.running])
        views = await self.views()
        for name in expected:
            view = views.get(name)
            if view is None:
                return False
            seen = {m["name"] for m in view if m["state"] == "alive"}
            if seen != expected:
                return False
        return True

    async def wait_converged(self, *, timeout: float = 30.0, interval: float = 0.05) -> float:
        """Poll until converged; returns the seconds it took."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with asyncio.timeout(timeout):
            while not await self.converged():
                await asyncio.sleep(interval)
        return loop.time() - start

    async def close(self) -> None:
        await asyncio.gather(*(self.terminate(n.name, timeout=5.0) for n in self.nodes))
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
