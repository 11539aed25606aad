"""SimCluster: N real nodes over the simulated network, in one process, in virtual time.

Theory of operation: every node is the real :class:`~agentcluster.node.Node` — runtime,
clustering agents, membership shell, SWIM core, wire codec with the cluster keyring — but its
transport is a :class:`~agentcluster.transport.memory.MemoryTransport` on one
:class:`~agentcluster.transport.memory.SimNetwork`. Run it on
:class:`~agentcluster.testing.VirtualTimeLoop` (``run_virtual``): all timers are loop timers,
so simulated minutes take seconds and a run is reproducible from its seed (the network, every
node's RNG and the fault schedule derive from it).

Faults: ``crash`` (the process vanishes: no leave, the address stops answering), ``restart``
(a fresh process with the same name and address rejoins), ``stall`` (the node's event loop is
blocked: nothing is processed until it ends), ``partition`` / ``drop_one_way`` / ``heal``,
``set_link`` for delay / loss / duplication / reordering. ``at(t, fault)`` schedules any of
them at a simulated instant. Every membership event every node sees is recorded in ``log``
with its simulated time, which is what detection-time measurements read.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agentcluster.clock import MonotonicClock
from agentcluster.config import NodeConfig
from agentcluster.consensus.raft import MemoryStorage
from agentcluster.discovery import StaticSeeds
from agentcluster.membership.messages import MemberEvent
from agentcluster.node import Node
from agentcluster.transport.memory import LinkConfig, SimNetwork
from agentcluster.wire import Keyring

__all__ = ["ObservedEvent", "SimCluster"]


async def _sim_resolve(host: str, port: int) -> list[str]:
    # Simulated hosts are names on the SimNetwork, not DNS names.
    return [host]


def _no_load() -> tuple[float, float]:
    return 0.0, 0.0


@dataclass(frozen=True, slots=True)
class ObservedEvent:
    at: float
    observer: str
    kind: str
    subject: str
    incarnation: int


class SimCluster:
    """``async with SimCluster(5, seed=1) as c: ...`` (on a virtual-time loop)."""

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        preset: str = "lan",
        link: LinkConfig | None = None,
        keyring: Keyring | None = None,
        zones: Iterable[str] = ("z1", "z2", "z3"),
        record: bool = True,
        store_voters: int = 0,
        snapshot_every: int = 10_000,
    ) -> None:
        """``store_voters``: the first that many nodes hold the coordination store's Raft
        log (kept in memory across crashes and restarts, like a disk); 0: no store."""
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got {n}")
        self.seed = seed
        self.preset = preset
        self.rng = random.Random(seed)
        self.net = SimNetwork(seed, default=link or LinkConfig())
        self.keyring = keyring if keyring is not None else Keyring([self.rng.randbytes(32)])
        self.zones = list(zones) or [""]
        self.names = [f"n{i + 1}" for i in range(n)]
        if not 0 <= store_voters <= n:
            raise ValueError(f"store_voters must be within 0..{n}, got {store_voters}")
        self.store_voters = self.names[:store_voters]
        self.snapshot_every = snapshot_every
        self.raft_storage: dict[str, MemoryStorage] = {}
        self.nodes: dict[str, Node] = {}
        self.crashed: set[str] = set()
        self.log: list[ObservedEvent] = []
        self.record = record
        self.clock = MonotonicClock()
        self._incarnations: dict[str, int] = {}
        self._tasks: list[asyncio.TimerHandle] = []
        self._pending: set[asyncio.Task[Any]] = set()

    def addr(self, name: str) -> str:
        return f"{name}:7946"

    def config(self, name: str) -> NodeConfig:
        index = self.names.index(name)
        seeds = [self.addr(s) for s in self.names[:2] if s != name]
        return NodeConfig(
            name=name,
            bind=self.addr(name),
            seeds=seeds,
            zone=self.zones[index % len(self.zones)],
            preset=self.preset,
            # Rediscovery of the seeds is what merges the two sides of a healed partition
            # (as Serf's reconnect does); it costs nothing while the seeds are live members.
            discovery_interval=15.0,
            store_voters=self.store_voters,
            snapshot_every=self.snapshot_every,
        )

    def _make(self, name: str) -> Node:
        node = Node(
            self.config(name),
            keyring=self.keyring,
            transport=self.net.transport(self.addr(name)),
            clock=self.clock,
            rng=random.Random(f"{self.seed}/{name}/{self._incarnations.get(name, 0)}"),
            strategies=[StaticSeeds(self.config(name).seeds, resolve=_sim_resolve)],
            raft_storage=(
                self.raft_storage.setdefault(name, MemoryStorage())
                if name in self.store_voters
                else None
            ),
            # Real CPU readings would make runs differ: simulated nodes report no load.
            load_probe=_no_load,
            vitals=False,
        )
        if self.record:
            node.listeners.append(self._recorder(name))
        return node

    def _recorder(self, observer: str) -> Callable[[MemberEvent], None]:
        def record(ev: MemberEvent) -> None:
            self.log.append(
                ObservedEvent(self.clock.now(), observer, ev.kind, ev.member.name, ev.incarnation)
            )

        return record

    # ------------------------------------------------------------------ lifecycle
    async def start(self, names: Iterable[str] | None = None) -> None:
        for name in names if names is not None else self.names:
            node = self._make(name)
            self.nodes[name] = node
            await node.start()

    async def stop(self) -> None:
        for handle in self._tasks:
            handle.cancel()
        for task in list(self._pending):
            task.cancel()
        for name, node in list(self.nodes.items()):
            if name not in self.crashed:
                await node.stop(leave=False)
        self.nodes.clear()

    async def __aenter__(self) -> SimCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ faults
    async def crash(self, name: str) -> None:
        """The process dies: no leave message, its address stops answering."""
        node = self.nodes[name]
        self.crashed.add(name)
        self.net.crash(self.addr(name))
        await node.stop(leave=False)

    async def restart(self, name: str) -> Node:
        """A fresh process with the same name and address joins again."""
        if name not in self.crashed:
            await self.crash(name)
        self._incarnations[name] = self._incarnations.get(name, 0) + 1
        node = self._make(name)  # a new transport at the same address (the old one closed)
        self.nodes[name] = node
        self.crashed.discard(name)
        await node.start()
        return node

    def stall(self, name: str, seconds: float) -> None:
        """Block the node's event loop for ``seconds`` (alive, but processing nothing)."""
        self.nodes[name].membership.stall(seconds)
        if self.nodes[name].store_host is not None:
            self.nodes[name].store_host.stall(seconds)  # type: ignore[union-attr]
        self.net.stall(self.addr(name), seconds)

    def partition(self, side_a: Iterable[str], side_b: Iterable[str]) -> None:
        self.net.partition([self.addr(n) for n in side_a], [self.addr(n) for n in side_b])

    def drop_one_way(self, src: Iterable[str], dst: Iterable[str]) -> None:
        self.net.drop_one_way([self.addr(n) for n in src], [self.addr(n) for n in dst])

    def heal(self) -> None:
        self.net.heal()

    def set_link(self, src: str, dst: str, config: LinkConfig) -> None:
        self.net.set_link(self.addr(src), self.addr(dst), config)

    def at(self, when: float, fault: Callable[[], Any]) -> None:
        """Run ``fault`` (a function or coroutine function) at simulated time ``when``."""
        loop = asyncio.get_running_loop()

        def fire() -> None:
            result = fault()
            if asyncio.iscoroutine(result):
                task = loop.create_task(result)
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

        self._tasks.append(loop.call_at(when, fire))

    # ------------------------------------------------------------------ observation
    async def run_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def live(self) -> list[str]:
        return [n for n in self.names if n in self.nodes and n not in self.crashed]

    def view(self, name: str) -> dict[str, str]:
        """Member name -> state, as ``name`` sees the cluster."""
        return {m.name: m.state for m in self.nodes[name].members()}

    def converged(self, alive: Iterable[str] | None = None) -> bool:
        """Every live node sees exactly ``alive`` (default: the live nodes) as alive."""
        expected = set(alive if alive is not None else self.live())
        for name in expected:
            if name not in self.nodes or name in self.crashed:
                return False
            seen = {m for m, s in self.view(name).items() if s == "alive"}
            if seen != expected:
                return False
        return True

    async def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float, step: float = 0.05
    ) -> float:
        """Advance simulated time until ``predicate`` holds; return how long it took."""
        start = self.clock.now()
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(step)
        return self.clock.now() - start

    def first_seen(self, kind: str, subject: str, *, after: float = 0.0) -> dict[str, float]:
        """For each observer, the first time it recorded ``kind`` about ``subject``."""
        out: dict[str, float] = {}
        for ev in self.log:
            if ev.kind == kind and ev.subject == subject and ev.at >= after:
                out.setdefault(ev.observer, ev.at)
        return out
