"""Built-in health checks: basic, comprehensive, deep and predictive.

Theory of operation: every check here is a :class:`~agentcluster.health._check_runner.Check`
(the framework, the presets and the :class:`CheckRunner` are re-exported from this module), and
each reads the node through the narrow :class:`NodeLike` protocol, so this layer never imports
the node module above it.

* **basic** (:func:`basic_check`): one :class:`StreamPing` to a peer over the transport's
  stream, answered with a :class:`StreamAck` by the peer's SWIM core. Every ping is encoded
  afresh -- the wire layer refuses a frame whose nonce it has seen (replay protection), so a
  cached frame would be dropped the second time. The RTT is the whole request.
* **comprehensive**: connectivity (the share of alive members that answer a ping),
  application (agents down, error rate, full mailboxes), resources (vitals against
  thresholds), network performance (RTT percentiles and loss over several pings per peer),
  service availability (a read from the coordination store, a non-empty registry), security
  (key file age, TLS certificate expiry, a node without a keyring).
* **deep** (:class:`DeepCheck`): every local agent is probed. An agent that routes
  ``cluster.health.probe`` exactly is called with it; any other agent is checked for progress
  (idle, or its counters moving while messages are queued) -- sending it a probe it has no
  route for would count as one of its errors.
* **predictive** (:class:`PredictiveCheck`): metric histories from a provider are fed to
  :func:`agentcluster.health.predict.predict`; confident predictions of failure or exhaustion
  within the horizons warn or fail.

Peers are picked deterministically (sorted names, a rotating window when there are more than
``max_peers``), so a simulation run is reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol, Unpack

import msgspec
from cryptography import x509

from agentcluster.agents import Agent, Runtime
from agentcluster.clock import Clock
from agentcluster.config import NodeConfig
from agentcluster.health._check_runner import (
    CHECK_PRESETS,
    KINDS,
    Check,
    CheckContext,
    CheckResult,
    CheckRunner,
    Findings,
    Kind,
    Status,
    Timing,
    check_preset,
    worst,
)
from agentcluster.health.predict import Prediction, combined_confidence, predict
from agentcluster.health.sensors import AppHealth, LoopLagSensor, Vitals
from agentcluster.membership.messages import Member, StreamAck, StreamPing
from agentcluster.signals import Signal
from agentcluster.store.base import Store
from agentcluster.transport.base import Transport, TransportError
from agentcluster.wire import Keyring, WireCodec

__all__ = [
    "CHECK_PRESETS",
    "KINDS",
    "PROBE_TYPE",
    "ApplicationCheck",
    "BasicCheck",
    "Check",
    "CheckContext",
    "CheckResult",
    "CheckRunner",
    "ConnectivityCheck",
    "DeepCheck",
    "Findings",
    "Kind",
    "NetworkCheck",
    "NodeLike",
    "PingFailed",
    "PredictiveCheck",
    "ResourceThresholds",
    "ResourcesCheck",
    "SecurityCheck",
    "ServiceCheck",
    "Status",
    "Timing",
    "basic_check",
    "check_preset",
    "standard_checks",
    "stream_ping",
    "worst",
]

PROBE_TYPE = "cluster.health.probe"


# --------------------------------------------------------------------------- the node


class _Members(Protocol):
    def member(self, name: str) -> Member | None: ...

    def members(self) -> list[Member]: ...


class _Registry(Protocol):
    @property
    def index(self) -> Sized: ...


class NodeLike(Protocol):
    """What the checks read from a :class:`~agentcluster.node.Node` (which has all of it)."""

    @property
    def name(self) -> str: ...
    @property
    def addr(self) -> str: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def core(self) -> _Members: ...
    @property
    def stream_codec(self) -> WireCodec: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def runtime(self) -> Runtime: ...
    @property
    def keyring(self) -> Keyring | None: ...
    @property
    def config(self) -> NodeConfig: ...
    @property
    def store_host(self) -> object | None: ...
    @property
    def store(self) -> Store: ...
    @property
    def registry(self) -> _Registry: ...


class PingFailed(Exception):
    """A stream ping got no valid answer (the message says why)."""


async def stream_ping(node: NodeLike, peer: str, *, seq: int, timeout: float) -> float:
    """One StreamPing to member ``peer``; returns the RTT in seconds or raises PingFailed."""
    member = node.core.member(peer)
    if member is None:
        raise PingFailed(f"{peer} is not a member")
    clock = node.clock
    codec = node.stream_codec
    start = clock.now()
    # Encoded for every ping: a fresh nonce and timestamp (a resent frame is a replay).
    frame = codec.encode(StreamPing(seq, peer, node.name, node.addr))
    try:
        raw = await node.transport.request(member.addr, frame, timeout=timeout)
    except TimeoutError:
        raise PingFailed(f"no reply from {peer} within {timeout:g}s") from None
    except (TransportError, OSError) as exc:
        raise PingFailed(f"{peer}: {exc}") from None
    rtt = clock.now() - start
    reply = codec.try_decode(raw)
    if not isinstance(reply, StreamAck) or reply.seq != seq or reply.source != peer:
        raise PingFailed(f"{peer} sent no valid acknowledgement")
    return rtt


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 for none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


class BasicCheck(Check):
    """Reachability and RTT of one peer; ``rtt_warn`` (s): warn above it (None: never)."""

    kind = "basic"

    def __init__(
        self,
        node: NodeLike,
        peer: str,
        *,
        rtt_warn: float | None = None,
        **timing: Unpack[Timing],
    ) -> None:
        super().__init__(f"basic:{peer}", **timing)
        self.node = node
        self.peer = peer
        self.rtt_warn = rtt_warn
        self._seq = itertools.count(1)

    async def run(self, ctx: CheckContext) -> CheckResult:
        # Inside the runner's deadline, so a silent peer is reported as such.
        timeout = ctx.timeout * 0.9
        try:
            rtt = await stream_ping(self.node, self.peer, seq=next(self._seq), timeout=timeout)
        except PingFailed as exc:
            return self.result("fail", str(exc), {"peer": self.peer})
        data = {"peer": self.peer, "rtt_ms": _ms(rtt)}
        if self.rtt_warn is not None and rtt > self.rtt_warn:
            return self.result("warn", f"RTT {_ms(rtt)} ms to {self.peer}", data)
        return self.result("pass", f"{self.peer} answered in {_ms(rtt)} ms", data)


def basic_check(
    node: NodeLike, peer: str, *, rtt_warn: float | None = None, **timing: Unpack[Timing]
) -> BasicCheck:
    """A basic check of ``peer`` (a member name) from ``node``."""
    return BasicCheck(node, peer, rtt_warn=rtt_warn, **timing)


class _PeerPinger:
    """Picks up to ``max_peers`` alive peers (a rotating window over the sorted names, so a
    large cluster is covered over successive runs) and pings them concurrently."""

    def __init__(self, node: NodeLike, max_peers: int) -> None:
        self.node = node
        self.max_peers = max_peers
        self._cursor = 0
        self._seq = itertools.count(1)

    def peers(self) -> tuple[list[str], int]:
        node = self.node
        alive = sorted(m.name for m in node.core.members() if m.state == "alive")
        alive = [n for n in alive if n != node.name]
        if len(alive) <= self.max_peers:
            return alive, len(alive)
        start = self._cursor % len(alive)
        self._cursor = start + self.max_peers
        picked = (alive[start:] + alive[:start])[: self.max_peers]
        return picked, len(alive)

    async def ping(self, peers: list[str], count: int, timeout: float) -> dict[str, list[float]]:
        """RTTs per peer (missing answers are simply absent: sent - len = lost)."""

        async def one(peer: str) -> list[float]:
            rtts: list[float] = []
            for _ in range(count):
                with contextlib.suppress(PingFailed):
                    rtts.append(
                        await stream_ping(self.node, peer, seq=next(self._seq), timeout=timeout)
                    )
            return rtts

        results = await asyncio.gather(*(one(p) for p in peers))
        return dict(zip(peers, results, strict=True))


class ConnectivityCheck(Check):
    """The share of alive members that answer a ping (two tries each): anyone unreachable
    warns, fewer than ``fail_below`` reachable fails."""

    kind = "comprehensive"

    def __init__(
        self,
        node: NodeLike,
        *,
        max_peers: int = 16,
        fail_below: float = 0.5,
        **timing: Unpack[Timing],
    ) -> None:
        super().__init__("connectivity", **timing)
        self.pinger = _PeerPinger(node, max_peers)
        self.fail_below = fail_below

    async def run(self, ctx: CheckContext) -> CheckResult:
        peers, alive = self.pinger.peers()
        if not peers:
            return self.result("pass", "no other alive member", {"alive": 0, "fraction": 1.0})
        # A retry within the budget: one lost SYN is not an unreachable peer.
        rtts = await self.pinger.ping(peers, 1, ctx.timeout / 4)
        retry = [p for p, r in rtts.items() if not r]
        if retry:
            rtts.update(await self.pinger.ping(retry, 1, ctx.timeout / 4))
        unreachable = [p for p, r in rtts.items() if not r]
        fraction = 1.0 - len(unreachable) / len(peers)
        data = {"alive": alive, "probed": len(peers), "unreachable": unreachable}
        data["fraction"] = round(fraction, 4)
        found = Findings()
        if unreachable:
            status: Status = "fail" if fraction < self.fail_below else "warn"
            found.add(
                status, f"{len(unreachable)}/{len(peers)} unreachable: {', '.join(unreachable)}"
            )
        return found.result(self, f"{len(peers)}/{len(peers)} peers reachable", data)


class NetworkCheck(Check):
    """RTT percentiles and loss over ``pings`` pings to each of up to ``max_peers`` peers.
    Limits are (warn, fail): RTT p99 in seconds, loss as a fraction; LAN defaults."""

    kind = "comprehensive"

    def __init__(
        self,
        node: NodeLike,
        *,
        pings: int = 5,
        max_peers: int = 8,
        rtt_p99: tuple[float, float] = (0.05, 0.25),
        loss: tuple[float, float] = (0.05, 0.25),
        **timing: Unpack[Timing],
    ) -> None:
        super().__init__("network", **timing)
        self.pinger = _PeerPinger(node, max_peers)
        self.pings = pings
        self.rtt_p99 = rtt_p99
        self.loss = loss

    async def run(self, ctx: CheckContext) -> CheckResult:
        peers, _ = self.pinger.peers()
        if not peers:
            return self.result("pass", "no other alive member", {"peers": 0})
        # Sequential per peer: the per-ping timeout keeps the whole run inside the budget.
        rtts = await self.pinger.ping(peers, self.pings, ctx.timeout * 0.8 / self.pings)
        flat = sorted(r for rs in rtts.values() for r in rs)
        sent = self.pings * len(peers)
        loss = 1.0 - len(flat) / sent
        p50, p90, p99 = (_percentile(flat, q) for q in (0.5, 0.9, 0.99))
        data = {
            "peers": len(peers),
            "sent": sent,
            "loss": round(loss, 4),
            "rtt_p50_ms": _ms(p50),
            "rtt_p90_ms": _ms(p90),
            "rtt_p99_ms": _ms(p99),
            "rtt_max_ms": _ms(flat[-1]) if flat else 0.0,
            "per_peer_loss": {p: round(1 - len(r) / self.pings, 4) for p, r in rtts.items()},
        }
        found = Findings()
        found.grade(loss, self.loss, f"loss {loss:.0%}")
        if flat:
            found.grade(p99, self.rtt_p99, f"RTT p99 {_ms(p99)} ms")
        ok = f"RTT p50 {_ms(p50)} ms, p99 {_ms(p99)} ms, no loss to {len(peers)} peers"
        return found.result(self, ok, data)


class ApplicationCheck(Check):
    """Agents down (fail), the error rate over the last interval and mailbox fill (limits
    are (warn, fail)), new restarts (warn). ``app``: e.g. ``AppHealthTracker(runtime).sample``."""

    kind = "comprehensive"

    def __init__(
        self,
        app: Callable[[float], AppHealth],
        *,
        error_rate: tuple[float, float] = (0.05, 0.25),
        # Below this many messages in the interval a rate is noise (1 error in 2 is not 50%).
        min_messages: int = 10,
        mailbox_fill: tuple[float, float] = (0.8, 1.0),
        **timing: Unpack[Timing],
    ) -> None:
        super().__init__("application", **timing)
        self.app = app
        self.error_rate = error_rate
        self.min_messages = min_messages
        self.mailbox_fill = mailbox_fill

    async def run(self, ctx: CheckContext) -> CheckResult:
        h = self.app(ctx.now)
        found = Findings()
        if h.down:
            found.add("fail", f"agents down: {', '.join(h.down)}")
        if h.processed + h.errors >= self.min_messages:
            found.grade(h.error_rate, self.error_rate, f"error rate {h.error_rate:.1%}")
        full = h.fills(self.mailbox_fill[1])
        filling = [a for a in h.fills(self.mailbox_fill[0]) if a not in full]
        if full:
            found.add("fail", f"full mailboxes: {', '.join(full)}")
        if filling:
            found.add("warn", f"mailboxes over {self.mailbox_fill[0]:.0%}: {', '.join(filling)}")
        if h.new_restarts:
            found.add("warn", f"{h.new_restarts} agent restarts")
        data = {
            "agents": len(h.agents),
            "running": h.running,
            "down": h.down,
            "error_rate": round(h.error_rate, 4),
            "errors": h.errors,
            "processed": h.processed,
            "max_mailbox_fill": round(h.max_mailbox_fill, 4),
            "restarts": h.restarts,
            "new_restarts": h.new_restarts,
        }
        return found.result(self, f"{h.running} agents running", data)


@dataclass(frozen=True, slots=True)
class ResourceThresholds:
    """(warn, fail) per resource: fractions, and seconds for the event-loop lag p99."""

    cpu: tuple[float, float] = (0.85, 0.95)
    memory: tuple[float, float] = (0.85, 0.95)
    disk: tuple[float, float] = (0.85, 0.95)
    # Descriptors run out abruptly (accept() fails): warn earlier than for memory.
    fds: tuple[float, float] = (0.8, 0.95)
    # 100 ms of lag already delays every probe answer; a second of it looks like a dead node.
    loop_lag: tuple[float, float] = (0.1, 1.0)


class ResourcesCheck(Check):
    """Vitals against thresholds. ``vitals``: e.g. ``VitalsSampler().sample`` (a first sample
    has no CPU reading yet: CPU is then skipped)."""

    kind = "comprehensive"

    def __init__(
        self,
        vitals: Callable[[float], Vitals | None],
        *,
        loop_lag: LoopLagSensor | None = None,
        thresholds: ResourceThresholds | None = None,
        **timing: Unpack[Timing],
    ) -> None:
        super().__init__("resources", **timing)
        self.vitals = vitals
        self.loop_lag = loop_lag
        self.thresholds = thresholds or ResourceThresholds()

    async def run(self, ctx: CheckContext) -> CheckResult:
        v = self.vitals(ctx.now)
        if v is None:
            return self.result("pass", "no vitals yet")
        t = self.thresholds
        readings = [("memory", v.memory_used, t.memory), ("disk", v.disk_used, t.disk)]
        if v.interval > 0:
            readings.insert(0, ("cpu", v.cpu_system, t.cpu))
        if v.fd_limit > 0:
            readings.append(("fds", v.fd_used, t.fds))
        data: dict[str, Any] = {name: round(value, 4) for name, value, _ in readings}
        data["process_rss"] = v.process_rss
        found = Findings()
        for name, value, limits in readings:
            found.grade(value, limits, f"{name} {value:.0%}")
        if self.loop_lag is not None:
            p99 = self.loop_lag.snapshot().p99
            data["loop_lag_p99_ms"] = _ms(p99)
            found.grade(p99, t.loop_lag, f"event-loop lag p99 {_ms(p99)} ms")
        return found.result(self, "resources within thresholds", data)


class ServiceCheck(Check):
    """The coordination store answers a read (when the node has one) and the agent registry
    has entries (every node registers at least its load balancer)."""

    kind = "comprehensive"

    def __init__(
        self, node: NodeLike, *, store_key: str = "health/probe", **timing: Unpack[Timing]
    ) -> None:
        super().__init__("services", **timing)
        self.node = node
        self.store_key = store_key

    async def run(self, ctx: CheckContext) -> CheckResult:
        node = self.node
        found = Findings()
        has_store = node.store_host is not None
        data: dict[str, Any] = {"store": has_store}
        if has_store:
            start = ctx.clock.now()
            # Within most of the budget, so a hung store still lets the registry report.
            budget = ctx.timeout * 0.8
            try:
                async with asyncio.timeout(budget):
                    await node.store.get(self.store_key)
                data["store_read_ms"] = _ms(ctx.clock.now() - start)
            except TimeoutError:
                found.add("fail", f"the store did not answer a read within {budget:g}s")
            except Exception as exc:
                found.add("fail", f"store read failed: {type(exc).__name__}: {exc}")
        entries = data["registry_entries"] = len(node.registry.index)
        if entries == 0:
            found.add("warn", "the agent registry is empty")
        ok = f"store {'answers' if has_store else 'not configured'}, {entries} registry entries"
        return found.result(self, ok, data)


_DAY = 86400.0
NO_KEYRING = (
    "control API open without a token: the node has no keyring, so anyone who can reach "
    "this port can control the node"
)


class SecurityCheck(Check):
    """Key file age (warn after ``max_key_age_days``), TLS certificate expiry (``cert_path``:
    warn within ``cert_warn_days``, fail once expired or not yet valid), and a node without a
    keyring (fail: its control API and membership accept anyone)."""

    kind = "comprehensive"

    def __init__(
        self,
        node: NodeLike,
        *,
        cert_path: str | None = None,
        max_key_age_days: float = 90.0,
        cert_warn_days: float = 30.0,
        **timing: Unpack[Timing],
    ) -> None:
        super().__init__("security", **timing)
        self.node = node
        self.cert_path = cert_path
        self.max_key_age_days = max_key_age_days
        self.cert_warn_days = cert_warn_days

    async def run(self, ctx: CheckContext) -> CheckResult:
        wall = ctx.clock.wall()
        found = Findings()
        data: dict[str, Any] = {}
        if self.node.keyring is None:
            found.add("fail", NO_KEYRING)
        key_file = self.node.config.key_file
        if key_file:
            try:
                age = (wall - os.stat(key_file).st_mtime) / _DAY
            except OSError as exc:
                found.add("warn", f"cannot stat key file {key_file}: {exc.strerror}")
            else:
                data["key_age_days"] = round(age, 2)
                if age > self.max_key_age_days:
                    found.add("warn", f"key file is {age:.0f} days old: rotate the cluster key")
        if self.cert_path:
            self._cert(self.cert_path, wall, found, data)
        return found.result(self, "no security finding", data)

    def _cert(self, path: str, wall: float, found: Findings, data: dict[str, Any]) -> None:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
            if b"-----BEGIN" in raw:
                cert = x509.load_pem_x509_certificate(raw)
            else:
                cert = x509.load_der_x509_certificate(raw)
        except (OSError, ValueError) as exc:
            found.add("fail", f"cannot read TLS certificate {path}: {exc}")
            return
        left = (cert.not_valid_after_utc.timestamp() - wall) / _DAY
        data["cert_days_left"] = round(left, 2)
        if left <= 0:
            found.add("fail", f"TLS certificate {path} expired {-left:.0f} days ago")
        elif cert.not_valid_before_utc.timestamp() > wall:
            found.add("fail", f"TLS certificate {path} is not valid yet")
        elif left < self.cert_warn_days:
            found.add("warn", f"TLS certificate {path} expires in {left:.1f} days")


class DeepCheck(Check):
    """Probes every local agent concurrently, each within ``probe_timeout`` seconds."""

    kind = "deep"

    def __init__(
        self, runtime: Runtime, *, probe_timeout: float = 1.0, **timing: Unpack[Timing]
    ) -> None:
        super().__init__("agents", **timing)
        self.runtime = runtime
        self.probe_timeout = probe_timeout
        self._routes_probe: dict[type[Agent], bool] = {}

    def _has_probe_route(self, agent: Agent) -> bool:
        cls = type(agent)
        known = self._routes_probe.get(cls)
        if known is None:
            # Only an exact route counts: a catch-all ("**") would run arbitrary actions.
            targets = cls._compiled.router.match(PROBE_TYPE)
            known = any(route.pattern == PROBE_TYPE for route, _ in targets)
            self._routes_probe[cls] = known
        return known

    async def run(self, ctx: CheckContext) -> CheckResult:
        budget = min(self.probe_timeout, ctx.timeout * 0.8)
        ids = [info.id for info in self.runtime.agents()]
        rows = await asyncio.gather(*(self._probe(i, ctx.clock, budget) for i in ids))
        found = Findings()
        agents: dict[str, Any] = {}
        for agent_id, (status, detail, took) in zip(ids, rows, strict=True):
            agents[agent_id] = {"status": status, "detail": detail, "ms": _ms(took)}
            if status != "pass":
                found.add(status, f"{agent_id}: {detail}")
        return found.result(self, f"{len(ids)} agents responsive", {"agents": agents})

    async def _probe(self, agent_id: str, clock: Clock, budget: float) -> tuple[Status, str, float]:
        start = clock.now()
        server = self.runtime.get(agent_id)
        if server is None or not server.running:
            return "fail", "not running", 0.0
        if self._has_probe_route(server.agent):
            probe = Signal(type=PROBE_TYPE, source=f"/node/{self.runtime.node_id}/health")
            try:
                await server.call(probe, timeout=budget)
            except Exception as exc:
                return "fail", f"probe failed: {type(exc).__name__}: {exc}", clock.now() - start
            return "pass", "answered the probe", clock.now() - start
        # No probe route: responsive means idle, or getting through its queue within budget.
        handled = server.processed + server.errors
        while not server.idle:
            if server.processed + server.errors != handled:
                return "pass", "making progress", clock.now() - start
            if not server.running:
                return "fail", "stopped during the probe", clock.now() - start
            if clock.now() - start >= budget:
                queued = server.mailbox_depth
                if queued:
                    return "fail", f"no progress in {budget:g}s with {queued} queued", budget
                return "warn", f"busy on one message for over {budget:g}s", budget
            await clock.sleep(budget / 20)
        return "pass", "idle", clock.now() - start


# --------------------------------------------------------------------------- predictive

History = Mapping[str, Sequence[tuple[float, float]]]


Predictor = Callable[[History], Sequence[Prediction]]
Combiner = Callable[[Iterable[float]], float]


class PredictiveCheck(Check):
    """Trend predictions over ``history()`` (metric -> [(t, value)], ≥ ``min_samples`` each).
    A prediction at least ``min_confidence`` sure with an ETA within ``fail_within`` seconds
    fails, within ``warn_within`` warns."""

    kind = "predictive"

    def __init__(
        self,
        history: Callable[[], History],
        *,
        predictor: Predictor | None = None,
        combine: Combiner | None = None,
        min_samples: int = 10,
        min_confidence: float = 0.5,
        warn_within: float = 3600.0,
        fail_within: float = 600.0,
        **timing: Unpack[Timing],
    ) -> None:
        super().__init__("predictive", **timing)
        self.history = history
        self.predictor: Predictor = predictor if predictor is not None else predict
        self.combine: Combiner = combine if combine is not None else combined_confidence
        self.min_samples = min_samples
        self.min_confidence = min_confidence
        self.warn_within = warn_within
        self.fail_within = fail_within

    async def run(self, ctx: CheckContext) -> CheckResult:
        history = {k: v for k, v in self.history().items() if len(v) >= self.min_samples}
        if not history:
            return self.result("pass", f"not enough history (< {self.min_samples} samples)")
        predictions = list(self.predictor(history))
        found = Findings()
        for p in predictions:
            if p.confidence >= self.min_confidence:
                what = f"{p.kind} of {p.metric} in {p.eta_seconds:.0f}s ({p.confidence:.0%} sure)"
                # An ETA shrinks as it nears: the fail horizon is inside the warn one.
                found.grade(-p.eta_seconds, (-self.warn_within, -self.fail_within), what)
        rows = [msgspec.to_builtins(p) for p in predictions]
        combined = self.combine([p.confidence for p in predictions])
        data = {"predictions": rows, "combined_confidence": round(combined, 4)}
        ok = f"{len(predictions)} predictions, none within {self.warn_within:g}s"
        return found.result(self, ok, data)


# --------------------------------------------------------------------------- a standard set


def standard_checks(
    node: NodeLike,
    *,
    preset: str = "lan",
    peers: Iterable[str] = (),
    vitals: Callable[[float], Vitals | None] | None = None,
    app: Callable[[float], AppHealth] | None = None,
    loop_lag: LoopLagSensor | None = None,
    history: Callable[[], History] | None = None,
    cert_path: str | None = None,
) -> list[Check]:
    """Every built-in check for ``node`` on ``preset`` timings: a basic check per peer,
    the comprehensive ones (application / resources / predictive when given their inputs),
    and the deep probe of the node's agents."""
    out: list[Check] = [basic_check(node, p, preset=preset) for p in peers]
    out += [
        ConnectivityCheck(node, preset=preset),
        NetworkCheck(node, preset=preset),
        ServiceCheck(node, preset=preset),
        SecurityCheck(node, cert_path=cert_path, preset=preset),
        DeepCheck(node.runtime, preset=preset),
    ]
    if app is not None:
        out.append(ApplicationCheck(app, preset=preset))
    if vitals is not None:
        out.append(ResourcesCheck(vitals, loop_lag=loop_lag, preset=preset))
    if history is not None:
        out.append(PredictiveCheck(history, preset=preset))
    return out
