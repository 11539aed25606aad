"""``agentcluster bench consensus``: latency, throughput and failover of the coordination store.

Theory of operation: the same measurements run against either backend, through the same
:class:`~agentcluster.store.base.Store` interface:

* ``raft``: a :class:`~agentcluster.launcher.LocalCluster` of node processes on loopback, every
  node a store voter with its Raft log on disk and fsync on; clients are
  :class:`~agentcluster.store.remote.RemoteStore` connections to a node's control API.
* ``etcd``: a real etcd cluster (Debian's ``etcd-server``) started on loopback by
  :class:`~agentcluster.store._etcd_cluster.EtcdCluster` with etcd's default timeouts; clients
  are :class:`~agentcluster.store.etcd.EtcdStore` connections. With ``etcd_tls`` the
  members' client listeners speak TLS and require client certificates (a throw-away CA), as
  a production etcd would; our own store's frames are always sealed (AES-GCM), so this is the
  like-for-like comparison.

Keys: ``put_p50_ms`` / ``put_p99_ms`` -- one client, sequential puts to the leader;
``puts_per_s`` -- 16 concurrent clients for a few seconds, sharing one client connection
(our client batches concurrent requests; etcd's gRPC client multiplexes them on one channel);
``puts_per_s_separate_connections`` -- the same with one connection per client;
``puts_per_s_64_clients`` -- four times as many clients on one connection (how throughput
scales with outstanding requests); ``cas_p99_ms`` -- sequential
compare-and-sets on one key; ``failover_p50_ms`` / ``failover_p99_ms`` -- SIGKILL the leader,
then time until the first put through a surviving member succeeds (10 runs; the killed member
is restarted and caught up between runs); ``lost_acknowledged_writes`` -- every put that was
acknowledged during the whole run (a writer runs through the failovers too) is read back at
the end; a missing or different value is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from typing import Any

from agentcluster import tuning
from agentcluster.bench._host import CpuPressure
from agentcluster.bench.membership import percentile
from agentcluster.store.base import Store, StoreError

__all__ = ["run"]


class _Backend(ABC):
    name: str

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def leader(self) -> str:
        """The current leader's id (waits for one)."""

    @abstractmethod
    def members(self) -> list[str]: ...

    @abstractmethod
    async def client(self, members: list[str], *, timeout: float) -> Store:
        """A store client entering through ``members`` (in that order)."""

    @abstractmethod
    async def kill(self, member: str) -> None: ...

    @abstractmethod
    async def restart(self, member: str) -> None:
        """Start ``member`` again and wait until it has caught up."""


class _RaftBackend(_Backend):
    name = "raft"

    def __init__(self, n: int, preset: str) -> None:
        from agentcluster.launcher import LocalCluster

        self.cluster = LocalCluster(n, preset=preset, store_voters=n, fsync=True)

    async def start(self) -> None:
        await self.cluster.start()

    async def stop(self) -> None:
        await self.cluster.close()

    def members(self) -> list[str]:
        return [n.addr for n in self.cluster.nodes]

    async def _stats(self, addr: str) -> dict[str, Any] | None:
        from agentcluster.control import ControlError, request

        try:
            stats = await request(addr, "stats", keyring=self.cluster.keyring, timeout=1.0)
        except ControlError:
            return None
        store = stats.get("store") if isinstance(stats, dict) else None
        return store if isinstance(store, dict) else None

    async def leader(self) -> str:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            for addr in self.members():
                st = await self._stats(addr)
                if st is not None and st.get("state") == "leader":
                    return addr
            await asyncio.sleep(0.02)
        raise TimeoutError("no raft leader within 30 s")

    async def client(self, members: list[str], *, timeout: float) -> Store:
        from agentcluster.store.remote import RemoteStore

        return RemoteStore(members, keyring=self.cluster.keyring, timeout=timeout)

    async def kill(self, member: str) -> None:
        await self.cluster.kill(self._name(member))

    def _name(self, addr: str) -> str:
        return next(n.name for n in self.cluster.nodes if n.addr == addr)

    async def restart(self, member: str) -> None:
        await self.cluster.spawn(self.cluster.node(self._name(member)))
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            mine = await self._stats(member)
            leader = await self._stats(await self.leader())
            if mine and leader and mine.get("applied_index", -1) >= leader["commit_index"] - 16:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{member} did not catch up within 60 s")


class _EtcdBackend(_Backend):
    name = "etcd"

    def __init__(self, n: int, *, tls: bool = False) -> None:
        from agentcluster.store._etcd_cluster import EtcdCluster

        self.cluster = EtcdCluster(n, tls=tls)
        pki = self.cluster.pki
        self._tls: dict[str, Any] = (
            {}
            if pki is None
            else {"ca_file": pki.ca_file, "cert_file": pki.client_cert, "key_file": pki.client_key}
        )

    async def start(self) -> None:
        await self.cluster.start()

    async def stop(self) -> None:
        await self.cluster.stop()

    def members(self) -> list[str]:
        return list(self.cluster.endpoints)

    async def leader(self) -> str:
        return (await self.cluster.leader(timeout=30.0)).endpoint

    async def client(self, members: list[str], *, timeout: float) -> Store:
        from agentcluster.store.etcd import EtcdStore

        return await EtcdStore.connect(members, timeout=timeout, **self._tls)

    async def kill(self, member: str) -> None:
        await self.cluster.kill(member)

    async def restart(self, member: str) -> None:
        await self.cluster.restart(member)


def _ms(seconds: list[float], q: float) -> float:
    return round(percentile(seconds, q) * 1000, 3)


async def _sequential(store: Store, n: int) -> list[float]:
    lat = []
    for i in range(n):
        t = time.perf_counter()
        await store.put(f"bench/seq/{i}", b"v" * 64)
        lat.append(time.perf_counter() - t)
    return lat


async def _cas(store: Store, n: int) -> list[float]:
    rev = await store.put("bench/cas", b"0")
    lat = []
    for i in range(n):
        t = time.perf_counter()
        res = await store.cas("bench/cas", b"%d" % i, expected_revision=rev)
        lat.append(time.perf_counter() - t)
        if not res.succeeded:
            raise RuntimeError("a sequential compare-and-set failed")
        rev = res.revision
    return lat


async def _throughput(
    backend: _Backend, leader: str, clients: int, seconds: float, *, shared: bool
) -> float:
    """Puts per second of ``clients`` concurrent writers; with ``shared`` they share one
    client connection (requests batched, as gRPC multiplexes etcd clients over one channel),
    else each has its own."""
    if shared:
        one = await backend.client([leader], timeout=5.0)
        stores = [one] * clients
    else:
        stores = [await backend.client([leader], timeout=5.0) for _ in range(clients)]
    count = 0
    stop_at = time.perf_counter() + seconds

    async def worker(k: int, store: Store) -> None:
        nonlocal count
        i = 0
        while time.perf_counter() < stop_at:
            await store.put(f"bench/tp/{k}/{i % 100}", b"v" * 64)
            count += 1
            i += 1

    try:
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for k, store in enumerate(stores):
                tg.create_task(worker(k, store))
        return count / (time.perf_counter() - t0)
    finally:
        for store in dict.fromkeys(stores):
            await store.close()


class _Writer:
    """Puts unique keys through all members for the whole run; remembers the acknowledged."""

    def __init__(self) -> None:
        self.acked: dict[str, bytes] = {}
        self.unknown = 0
        self._stop = asyncio.Event()

    async def run(self, store: Store) -> None:
        i = 0
        while not self._stop.is_set():
            key, value = f"bench/acked/{i}", b"%d" % i
            i += 1
            try:
                await store.put(key, value)
            except (StoreError, TimeoutError):
                self.unknown += 1
                await asyncio.sleep(0.01)
                continue
            self.acked[key] = value

    def stop(self) -> None:
        self._stop.set()

    async def lost(self, store: Store) -> int:
        lost = 0
        for key, value in self.acked.items():
            kv = await store.get(key)
            if kv is None or kv.value != value:
                lost += 1
        return lost


async def _failover(backend: _Backend, runs: int) -> list[float]:
    times: list[float] = []
    for _ in range(runs):
        leader = await backend.leader()
        survivors = [m for m in backend.members() if m != leader]
        probe = await backend.client(survivors, timeout=0.5)
        try:
            await probe.put("bench/failover", b"before")
            t0 = time.perf_counter()
            await backend.kill(leader)
            deadline = t0 + 30.0
            while True:
                try:
                    await probe.put("bench/failover", b"after")
                    break
                except (StoreError, TimeoutError):
                    if time.perf_counter() > deadline:
                        raise TimeoutError("no put succeeded within 30 s of the kill") from None
            times.append(time.perf_counter() - t0)
        finally:
            await probe.close()
        await backend.restart(leader)
    return times


async def _run(
    backend: _Backend, *, puts: int, cas: int, clients: int, seconds: float, failovers: int
) -> dict[str, Any]:
    await backend.start()
    try:
        leader = await backend.leader()
        # The client process is tuned as the node processes are (see agentcluster.tuning).
        tuning.tune()
        store = await backend.client([leader], timeout=10.0)
        try:
            await _sequential(store, 100)  # warm-up: connections, caches
            seq = await _sequential(store, puts)
            cas_lat = await _cas(store, cas)
        finally:
            await store.close()
        with CpuPressure() as pressure:
            rate = await _throughput(backend, leader, clients, seconds, shared=True)
        rate_own = await _throughput(backend, leader, clients, seconds, shared=False)
        rate_many = await _throughput(backend, leader, 4 * clients, seconds, shared=True)
        writer = _Writer()
        writer_store = await backend.client(backend.members(), timeout=2.0)
        reader = await backend.client(backend.members(), timeout=10.0)
        try:
            task = asyncio.create_task(writer.run(writer_store))
            try:
                fo = await _failover(backend, failovers)
            finally:
                writer.stop()
                with contextlib.suppress(StoreError, TimeoutError):
                    await task
            lost = await writer.lost(reader)
        finally:
            await writer_store.close()
            await reader.close()
        return {
            "put_p50_ms": _ms(seq, 0.5),
            "put_p99_ms": _ms(seq, 0.99),
            "puts_per_s": round(rate, 1),
            # CPU contention during that run, ours and the host's (bench/_host.py).
            "host_cpu_pressure_pct": pressure.percent,
            "puts_per_s_separate_connections": round(rate_own, 1),
            f"puts_per_s_{4 * clients}_clients": round(rate_many, 1),
            "cas_p99_ms": _ms(cas_lat, 0.99),
            "failover_p50_ms": _ms(fo, 0.5),
            "failover_p99_ms": _ms(fo, 0.99),
            "lost_acknowledged_writes": lost,
            "acknowledged_writes_checked": len(writer.acked),
            "failover_runs": len(fo),
        }
    finally:
        await backend.stop()


def run(
    backend: str = "raft",
    *,
    nodes: int = 3,
    puts: int = 2_000,
    cas: int = 500,
    clients: int = 16,
    seconds: float = 3.0,
    failovers: int = 10,
    preset: str = "lan",
    etcd_tls: bool = False,
) -> dict[str, Any]:
    """Every key (see the module docstring); ``etcd_tls`` only with the etcd backend."""
    if backend == "raft":
        if etcd_tls:
            raise ValueError("etcd_tls applies to the etcd backend (raft frames are always sealed)")
        impl: _Backend = _RaftBackend(nodes, preset)
    elif backend == "etcd":
        impl = _EtcdBackend(nodes, tls=etcd_tls)
    else:
        raise ValueError(f"backend must be raft or etcd, not {backend!r}")
    from agentcluster.cli.cluster import run_loop

    # The clients run on uvloop too, like the nodes: the bench measures the store, not the loop.
    result = run_loop(
        _run(impl, puts=puts, cas=cas, clients=clients, seconds=seconds, failovers=failovers)
    )
    extra = {"etcd_tls": etcd_tls} if backend == "etcd" else {}
    return {"bench": "consensus", "backend": backend, "nodes": nodes, **extra, **result}
