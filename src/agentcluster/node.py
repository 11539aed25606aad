"""One node: the runtime, the transport, membership and the clustering agents, wired together.

Theory of operation: a :class:`Node` is what one OS process runs (or one simulated node in a
:class:`~agentcluster.testing.SimCluster`). Starting it opens the transport (one port for
UDP packets and TCP streams), enters the agent runtime, starts the clustering subtree (a
one_for_one supervisor with the FailureDetector and NodeDiscovery agents) and the membership
shell around the SWIM core, then joins the seeds.

Inbound bytes are dispatched here: packets go to the membership shell; stream requests are
decoded once and routed by type — SWIM push-pull / stream pings to the shell, control
requests to :mod:`agentcluster.control`, agent envelopes to the local runtime (so a ``Send``
directive reaches an agent on another node). Membership events become ``membership.events``
batches cast to the clustering agents, which decide what the rest of the node hears.

Everything is authenticated with the cluster keyring when there is one (a node without the key
can neither join nor inject); a node without a keyring logs a warning at start.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
from collections.abc import Callable
from typing import Any

import msgspec

from agentcluster import tuning
from agentcluster.agents import Agent, AgentServer, MailboxFull, Runtime
from agentcluster.agents.runtime import UnknownAgent
from agentcluster.balancing.balancer import Balancer
from agentcluster.balancing.service import BalancerService
from agentcluster.calls import CallService
from agentcluster.clock import Clock, MonotonicClock
from agentcluster.clustering.base import Discover, JoinPeers, MemberEventData, MemberEvents
from agentcluster.clustering.consensus_coordinator import ConsensusCoordinator
from agentcluster.clustering.failure_detector import FailureDetector
from agentcluster.clustering.health_monitor import HealthMonitor
from agentcluster.clustering.load_balancer import LoadBalancer, LoadBalancerState
from agentcluster.clustering.node_discovery import NodeDiscovery, NodeDiscoveryState
from agentcluster.config import NodeConfig
from agentcluster.consensus.raft import Storage
from agentcluster.control import (
    AgentEnvelope,
    CallRequest,
    ControlReply,
    ControlRequest,
    NodeStream,
    encode_control_reply,
    handle_control,
)
from agentcluster.coordination.auction_service import AuctionService
from agentcluster.coordination.consensus_service import ConsensusService
from agentcluster.coordination.registry_service import REGISTRY_PREFIX, RegistryService
from agentcluster.discovery import (
    DEFAULT_PORT,
    AddressFile,
    DnsA,
    DnsSrv,
    Multicast,
    StaticSeeds,
    Strategy,
    discover_all,
    format_addr,
)
from agentcluster.discovery import parse_addr as parse_seed
from agentcluster.health.service import HealthService
from agentcluster.logs import log_context
from agentcluster.membership.config import preset
from agentcluster.membership.messages import MemberEvent, Message, NodeMeta, validate_meta
from agentcluster.membership.service import MembershipService
from agentcluster.membership.swim import Swim
from agentcluster.membership.vivaldi import Vivaldi
from agentcluster.signals import Signal
from agentcluster.store._node import KV_PREFIX, RAFT_PREFIX, NodeStore
from agentcluster.store.base import Store
from agentcluster.transport.base import Transport
from agentcluster.transport.udp_tcp import UdpTcpTransport
from agentcluster.wire import Keyring, WireCodec

__all__ = ["Node"]

log = logging.getLogger(__name__)

CLUSTERING_AGENTS = ("failure_detector", "node_discovery")
EventListener = Callable[[MemberEvent], None]


def load_agent_class(spec: str) -> type[Agent]:
    """``"package.module:AgentClass"`` -> the class; ValueError saying what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"agent {spec!r} must be given as 'package.module:AgentClass'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"agent {spec!r}: cannot import {module_name}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise ValueError(f"agent {spec!r}: {attr} is not an Agent class in {module_name}")
    return cls


class Node:
    """A cluster node. ``async with Node(config) as node: ...``."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        keyring: Keyring | None = None,
        transport: Transport | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        strategies: list[Strategy] | None = None,
        raft_storage: Storage | None = None,
        load_probe: Callable[[], tuple[float, float]] | None = None,
        vitals: bool = True,
    ) -> None:
        """``raft_storage``: the store voter's Raft storage to use instead of opening
        ``data_dir`` (a simulation keeps one per node across restarts). ``load_probe``: the
        (cpu, memory) fractions this node reports (default: psutil; a simulation passes a
        deterministic one). ``vitals``: sample this host's vitals for health monitoring (a
        simulation turns it off: real readings would make runs differ)."""
        self.config = config
        self.name = config.name
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.rng = rng if rng is not None else random.Random()
        if keyring is None and config.key_file:
            keyring = Keyring.from_file(config.key_file)
        self.keyring = keyring
        self.transport: Transport = (
            transport if transport is not None else UdpTcpTransport(config.bind)
        )
        wall = self.clock.wall
        self.packet_codec = WireCodec(Message, keyring, wall=wall)
        self.stream_codec = WireCodec(NodeStream, keyring, wall=wall, max_size=4 << 20)
        self.swim_config = preset(config.preset)
        self.runtime = Runtime(config.name, clock=self.clock, rng=self.rng)
        self.strategies = strategies if strategies is not None else self._default_strategies()
        self.listeners: list[EventListener] = []
        self.events_dropped = 0
        # Bumped at every batch of membership events (routing tables rebuild on change).
        self.membership_version = 0
        self.started_at = 0.0
        self._core: Swim | None = None
        self._membership: MembershipService | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stopped = asyncio.Event()
        self._raft_storage = raft_storage
        self.store_host: NodeStore | None = None
        self.registry = RegistryService(self)
        self.consensus = ConsensusService(self)
        self.auctions = AuctionService(self)
        self.balancer = Balancer(
            rng=random.Random(self.rng.random()),
            now=self.clock.now(),
            strategy=config.lb_strategy,
        )
        self.calls = CallService(self, self.balancer)
        self.lb = BalancerService(self, self.balancer, load_probe=load_probe)
        self.health = HealthService(self, vitals=vitals)

    # ------------------------------------------------------------------ lifecycle
    def _default_strategies(self) -> list[Strategy]:
        out: list[Strategy] = []
        if self.config.seeds:
            out.append(StaticSeeds(self.config.seeds))
        if self.config.seeds_file:
            out.append(AddressFile(self.config.seeds_file))
        out.extend(DnsA(name, DEFAULT_PORT) for name in self.config.dns_a)
        out.extend(DnsSrv(name) for name in self.config.dns_srv)
        return out

    @property
    def addr(self) -> str:
        return self.config.advertise or self.transport.addr

    @property
    def core(self) -> Swim:
        if self._core is None:
            raise RuntimeError(f"node {self.name} is not started")
        return self._core

    @property
    def membership(self) -> MembershipService:
        if self._membership is None:
            raise RuntimeError(f"node {self.name} is not started")
        return self._membership

    def meta(self) -> NodeMeta:
        c = self.config
        return NodeMeta(
            zone=c.zone,
            region=c.region,
            capabilities=tuple(c.capabilities),
            tags=dict(c.tags),
        )

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        with log_context(node_id=self.name):
            if self.keyring is None:
                log.warning(
                    "node %s runs WITHOUT a cluster key: any host that can reach %s can join "
                    "and inject messages (set key_file)",
                    self.name,
                    self.config.bind,
                )
            self._tg = asyncio.TaskGroup()
            await self._tg.__aenter__()
            await self.transport.start(self._on_packet, self._on_stream)
            self.started_at = self.clock.now()
            if self.config.multicast:
                # Built here: the announcement carries the address the transport bound.
                self.strategies.append(
                    Multicast(
                        self.config.multicast_group,
                        self.config.multicast_port,
                        announce_addr=self.addr,
                        keyring=self.keyring,
                        interval=max(1.0, self.config.discovery_interval / 2),
                        interface=self.config.multicast_interface,
                        node_name=self.name,
                        clock=self.clock,
                    )
                )
            self._core = Swim(
                self.name,
                self.addr,
                config=self.swim_config,
                rng=self.rng,
                now=self.clock.now(),
                meta=self.meta(),
                vivaldi=Vivaldi(rng=self.rng),
            )
            self._membership = MembershipService(
                self._core,
                self.transport,
                self.packet_codec,
                self.stream_codec,
                self.clock,
                self._on_events,
            )
            await self.runtime.__aenter__()
            self.runtime.remote_sender = self._send_remote
            self.runtime.register_directive(Discover, self._run_discover)
            self.runtime.register_directive(JoinPeers, self._run_join)
            self.consensus.attach()
            self.auctions.attach()
            self.lb.attach()
            self.health.attach()
            await self.runtime.start_supervisor(
                "clustering",
                [
                    self.runtime.agent_spec(FailureDetector),
                    self.runtime.agent_spec(
                        NodeDiscovery,
                        state=NodeDiscoveryState(interval=self.config.discovery_interval),
                    ),
                    self.runtime.agent_spec(ConsensusCoordinator),
                    self.runtime.agent_spec(
                        LoadBalancer, state=LoadBalancerState(strategy=self.config.lb_strategy)
                    ),
                    self.runtime.agent_spec(HealthMonitor),
                ],
                strategy="one_for_one",
            )
            await self._membership.start(self._tg)
            if self.config.store_voters:
                self.store_host = NodeStore(self, storage=self._raft_storage)
                await self.store_host.start(self._tg)
            await self.registry.start(self._tg)
            await self.lb.start(self._tg)
            await self.health.start(self._tg)
            for spec in self.config.agents:
                await self._start_user_agent(spec)
            seeds = [format_addr(*parse_seed(s)) for s in self.config.seeds]
            seeds = [s for s in seeds if s != self.addr]
            if seeds:
                self._membership.join(seeds)
            log.info("node %s up at %s (%d seeds)", self.name, self.addr, len(seeds))

    async def stop(self, *, leave: bool = True, leave_timeout: float | None = None) -> None:
        """Stop the node; with ``leave`` it first tells the cluster it is leaving (graceful)."""
        if self._tg is None:
            return
        tg, self._tg = self._tg, None
        try:
            await self.registry.close()
            await self.consensus.close()
            await self.auctions.close()
            await self.lb.close()
            await self.health.close()
            if self.store_host is not None:
                # Before leaving membership, while peers still route to us: a leaving leader
                # hands Raft leadership over, so the store barely notices.
                await self.store_host.close(graceful=leave)
            if leave and self._membership is not None:
                self._membership.leave()
                # Give the leave gossip a few gossip rounds to get out before closing.
                wait = (
                    leave_timeout
                    if leave_timeout is not None
                    else self.swim_config.leave_propagate_delay
                )
                await self.clock.sleep(wait)
            if self._membership is not None:
                self._membership.close()
            await self.runtime.__aexit__(None, None, None)
            for strategy in self.strategies:
                try:
                    await strategy.close()
                except Exception:
                    log.exception("closing discovery strategy %s failed", strategy.name)
            await self.transport.close()
        finally:
            if self._membership is not None:
                self._membership.close()  # idempotent; cancels in-flight stream requests
            await tg.__aexit__(None, None, None)
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _start_user_agent(self, spec: str) -> None:
        """Start ``module:Class`` under the root supervisor and register it."""
        cls = load_agent_class(spec)
        server = await self.runtime.spawn(cls)
        await self.registry.register(server.id, capabilities=getattr(cls, "capabilities", ()) or ())

    # ------------------------------------------------------------------ inbound
    def _on_packet(self, src: str, data: bytes) -> None:
        if data[:1] == RAFT_PREFIX:
            if self.store_host is not None:
                self.store_host.on_packet(data[1:])
        elif self._membership is not None:
            self._membership.on_packet(src, data)

    async def _on_stream(self, src: str, data: bytes) -> bytes | None:
        prefix = data[:1]
        if prefix == REGISTRY_PREFIX:
            return await self.registry.on_stream(src, data[1:])
        if prefix in (RAFT_PREFIX, KV_PREFIX):
            if self.store_host is None:
                return None
            return await self.store_host.on_stream(prefix, data[1:])
        msg = self.stream_codec.try_decode(data)
        if msg is None:
            return None
        reply: Any
        if isinstance(msg, ControlRequest):
            return encode_control_reply(self, msg, await handle_control(self, msg))
        if isinstance(msg, AgentEnvelope):
            reply = await self._deliver_envelope(msg)
        elif isinstance(msg, CallRequest):
            return self.calls.encode_reply(await self.calls.serve(msg))
        elif isinstance(msg, ControlReply):
            return None
        else:
            if self._membership is None:
                return None
            reply = await self._membership.on_stream_message(src, msg)
        if reply is None:
            return None
        return self.stream_codec.encode(reply)

    async def _deliver_envelope(self, env: AgentEnvelope) -> ControlReply:
        try:
            await self.runtime.cast(env.agent, env.signal, timeout=1.0)
        except UnknownAgent as exc:
            return ControlReply(ok=False, error=str(exc))
        except MailboxFull as exc:
            return ControlReply(ok=False, error=str(exc))
        return ControlReply(ok=True)

    # ------------------------------------------------------------------ membership events
    def _event_data(self, ev: MemberEvent) -> MemberEventData:
        m = ev.member
        rtt = None if m.name == self.name else self.core.estimate_rtt(m.name)
        return MemberEventData(
            kind=ev.kind,
            name=m.name,
            addr=m.addr,
            state=m.state,
            incarnation=ev.incarnation,
            at=ev.at,
            accuser=ev.accuser,
            confirmations=ev.confirmations,
            zone=m.meta.zone,
            region=m.meta.region,
            rtt=rtt,
        )

    def _on_events(self, events: list[MemberEvent]) -> None:
        self.membership_version += 1
        for ev in events:
            for listener in self.listeners:
                try:
                    listener(ev)
                except Exception:
                    log.exception("membership listener failed")
        # One signal per core step: a join's hundreds of events cost one message per agent.
        signal = Signal(
            type="membership.events",
            source=f"/node/{self.name}",
            data=MemberEvents([self._event_data(ev) for ev in events]),
        )
        for agent in CLUSTERING_AGENTS:
            server = self.runtime.get(agent)
            if server is None:
                self.events_dropped += len(events)
                continue
            try:
                server.cast_nowait(signal)
            except Exception:
                self.events_dropped += len(events)

    # ------------------------------------------------------------------ directives
    async def _run_discover(self, server: AgentServer, d: Discover) -> None:
        round_ = await discover_all(self.strategies, timeout=5.0)
        result = {
            "candidates": list(round_.addrs),
            "errors": dict(round_.errors),
            "self_addr": self.addr,
        }
        try:
            await self.runtime.cast(
                d.reply_to, Signal(type="cluster.discovery.result", data=result), timeout=1.0
            )
        except Exception:
            log.warning("discovery result could not be delivered to %s", d.reply_to)

    def _run_join(self, server: AgentServer, d: JoinPeers) -> None:
        addrs = [a for a in d.addrs if a != self.addr]
        if addrs and self._membership is not None:
            self._membership.join(addrs)

    async def _send_remote(self, node: str, agent: str, signal: Signal) -> None:
        member = self.core.member(node)
        if member is None or member.state not in ("alive", "suspect"):
            raise UnknownAgent(f"node {node!r} is not a live member of the cluster")
        data = self.stream_codec.encode(AgentEnvelope(agent=agent, signal=signal))
        raw = await self.transport.request(member.addr, data, timeout=5.0)
        reply = self.stream_codec.try_decode(raw)
        if not isinstance(reply, ControlReply):
            raise UnknownAgent(f"node {node!r} sent no valid reply")
        if not reply.ok:
            raise UnknownAgent(f"node {node!r}: {reply.error}")

    def update_meta(
        self,
        *,
        zone: str | None = None,
        region: str | None = None,
        capabilities: tuple[str, ...] | None = None,
        capacity: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> NodeMeta:
        """Change this node's metadata; the cluster hears it through gossip (``updated``)."""
        current = self.core.member(self.name)
        meta = current.meta if current is not None else self.meta()
        changes: dict[str, Any] = {
            "zone": zone, "region": region, "capabilities": capabilities,
            "capacity": capacity, "tags": tags,
        }  # fmt: skip
        new = msgspec.structs.replace(meta, **{k: v for k, v in changes.items() if v is not None})
        validate_meta(new, self.swim_config.max_meta_size)
        self.membership.update_meta(new)
        return new

    # ------------------------------------------------------------------ views
    @property
    def store(self) -> Store:
        """The coordination store (routes to the Raft leader); needs ``store_voters``."""
        if self.store_host is None:
            raise RuntimeError(
                f"node {self.name} has no coordination store: set store_voters (and start it)"
            )
        return self.store_host.store

    def members(self) -> list[Any]:
        return self.core.members()

    def wall_of(self, t: float) -> float:
        """Convert a core timestamp (clock.now scale) to Unix time."""
        return self.clock.wall() - (self.clock.now() - t)

    def stats(self) -> dict[str, Any]:
        ms = self.membership
        return {
            "node": self.name,
            "addr": self.addr,
            "uptime_s": round(self.clock.now() - self.started_at, 3),
            "started_at": round(self.wall_of(self.started_at), 6),
            "packets_sent": ms.packets_sent,
            "bytes_sent": ms.bytes_sent,
            "packets_received": ms.packets_received,
            "bytes_received": ms.bytes_received,
            "stream_failures": ms.stream_failures,
            "wire_drops": {
                "packets": self.packet_codec.drops.as_dict(),
                "streams": self.stream_codec.drops.as_dict(),
            },
            "transport": msgspec.to_builtins(self.transport.stats()),
            "swim": msgspec.to_builtins(self.core.stats),
            "health_score": self.core.health_score(),
            "events_dropped": self.events_dropped,
            "agents": len(self.runtime),
            "store": self.store_host.stats() if self.store_host is not None else None,
            "registry": self.registry.stats(),
            "consensus": self.consensus.stats(),
            "auctions": self.auctions.stats(),
            "calls": self.calls.stats(),
            "tuning": tuning.stats(),
        }
