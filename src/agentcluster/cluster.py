"""The ``Cluster`` facade: the API users write against, in-process or remote.

Theory of operation: one interface, two ways in.

* :class:`NodeCluster` wraps a running :class:`~agentcluster.node.Node` in this process
  (``Cluster.of(node)``): registry reads are function calls on the node's local index,
  proposals go to the node's ConsensusCoordinator, store primitives use ``node.store``.
* :class:`RemoteCluster` (``agentcluster.connect("host:port", key_file=...)``) talks to a
  node over the authenticated control API: registry and consensus functions through the
  ``mabeam`` op, store primitives through :class:`~agentcluster.store.remote.RemoteStore`,
  events by long-polling the node's bus journal.

Locks, elections, barriers and semaphores are recipes over the store interface, so both
facades hand out the very same objects. Errors are typed: :class:`ClusterError` and its
subclasses; a remote error keeps the remote exception's type name in ``remote_type``.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster.calls import MAX_CALL_TIMEOUT
from agentcluster.clock import MonotonicClock
from agentcluster.coordination.auction_service import AuctionOutcome
from agentcluster.coordination.auctions import AuctionError, AuctionKind
from agentcluster.coordination.barrier import Barrier
from agentcluster.coordination.consensus_service import ConsensusError, ConsensusTimeout
from agentcluster.coordination.proposals import Decision
from agentcluster.coordination.query import Cond, parse_cond
from agentcluster.coordination.registry import AgentEntry, Health
from agentcluster.coordination.registry_service import NameTaken, RegistryError
from agentcluster.coordination.semaphore import Semaphore
from agentcluster.coordination.voting import Rule, parse_rule
from agentcluster.errors import (
    CallError,
    CallRemoteError,
    ClusterError,
    NoCapacity,
    Rejected,
    RemoteError,
    Timeout,
)
from agentcluster.signals import Signal
from agentcluster.store._recipes import Election, Leadership, Lock, keep_lease_alive
from agentcluster.store.base import Store, StoreError

if TYPE_CHECKING:
    from agentcluster.control import ControlError
    from agentcluster.node import Node

__all__ = [
    "Cluster",
    "ClusterError",
    "MemberInfo",
    "NodeCluster",
    "RemoteCluster",
    "RemoteError",
    "connect",
    "elect_by",
]


class MemberInfo(msgspec.Struct, frozen=True):
    name: str
    addr: str
    state: str
    zone: str = ""
    region: str = ""
    capabilities: list[str] = []


Where = Cond | str


class Registration(msgspec.Struct, frozen=True):
    """A ``register`` call's arguments (what a remote node receives, too)."""

    agent: str
    capabilities: list[str]
    resources: dict[str, float]
    metadata: dict[str, str]
    health: Health
    unique: bool
    name: str | None


class AuctionRequest(msgspec.Struct, frozen=True):
    """An ``auction`` call's arguments (what a remote node receives, too)."""

    bidders: list[str]
    item: str
    kind: AuctionKind
    duration: float
    reserve: float
    start_price: float
    min_increment: float
    step: float
    step_interval: float


def _conds(where: Iterable[Where], capability: str | None, healthy_only: bool) -> list[Cond]:
    conds = [w if isinstance(w, Cond) else parse_cond(w) for w in where]
    if capability is not None:
        conds.append(Cond("capability", "eq", capability))
    if healthy_only:
        conds.append(Cond("health", "eq", "healthy"))
    return conds


def _rule(rule: Rule | str) -> Rule:
    return parse_rule(rule) if isinstance(rule, str) else rule


def _participants(participants: Iterable[AgentEntry | str]) -> list[str]:
    return [p.id if isinstance(p, AgentEntry) else p for p in participants]


def elect_by(
    candidates: Iterable[AgentEntry], criteria: Callable[[AgentEntry], float]
) -> AgentEntry | None:
    """The candidate with the highest ``criteria`` score; ties go to the smallest id, so every
    node that sees the same registry elects the same agent (no messages needed)."""
    best: AgentEntry | None = None
    best_key: tuple[float, str] | None = None
    for entry in candidates:
        score = float(criteria(entry))
        key = (-score, entry.id)
        if best_key is None or key < best_key:
            best, best_key = entry, key
    return best


class Cluster(ABC):
    """What a user program sees of the cluster."""

    @staticmethod
    def of(node: Node) -> NodeCluster:
        return NodeCluster(node)

    # ----------------------------------------------------------------- registry
    async def register(
        self,
        agent: str,
        *,
        capabilities: Iterable[str] = (),
        resources: Mapping[str, float] | None = None,
        metadata: Mapping[str, str] | None = None,
        health: Health = "healthy",
        unique: bool = False,
        name: str | None = None,
    ) -> AgentEntry:
        """Register an agent running on the node (by id or name) with its capabilities."""
        return await self._register(
            Registration(
                agent, list(capabilities), dict(resources or {}), dict(metadata or {}),
                health, unique, name,
            )
        )  # fmt: skip

    @abstractmethod
    async def _register(self, reg: Registration) -> AgentEntry: ...

    @abstractmethod
    async def unregister(self, entry_id: str) -> bool: ...

    async def find(
        self,
        *where: Where,
        capability: str | None = None,
        healthy_only: bool = False,
        limit: int = 0,
        order_by: str | None = None,
        descending: bool = False,
    ) -> list[AgentEntry]:
        """Registered agents matching every condition (``"resources.gpu>=1"`` or a Cond)."""
        return await self._find(
            _conds(where, capability, healthy_only), limit, order_by, descending
        )

    @abstractmethod
    async def _find(
        self, conds: list[Cond], limit: int, order_by: str | None, descending: bool
    ) -> list[AgentEntry]: ...

    async def least_loaded(
        self, capability: str, *, n: int = 1, resource: str = "load"
    ) -> list[AgentEntry]:
        return await self.find(
            capability=capability, healthy_only=True, order_by=f"resources.{resource}", limit=n
        )

    @abstractmethod
    async def members(self) -> list[MemberInfo]: ...

    # ----------------------------------------------------------------- consensus
    async def start_consensus(
        self,
        participants: Iterable[AgentEntry | str],
        proposal: Any,
        *,
        rule: Rule | str = "majority",
        timeout: float = 5.0,
        topic: str = "",
        ref: str | None = None,
    ) -> str:
        """Open a proposal among agents; returns its reference."""
        return await self._start_consensus(
            _participants(participants), proposal, _rule(rule), timeout, topic, ref
        )

    @abstractmethod
    async def _start_consensus(
        self,
        participants: list[str],
        proposal: Any,
        rule: Rule,
        timeout: float,
        topic: str,
        ref: str | None,
    ) -> str: ...

    @abstractmethod
    async def consensus_result(self, ref: str, *, timeout: float = 15.0) -> Decision: ...

    async def consensus(
        self,
        participants: Iterable[AgentEntry | str],
        proposal: Any,
        *,
        rule: Rule | str = "majority",
        timeout: float = 5.0,
        topic: str = "",
    ) -> Decision:
        """Run a proposal to its committed decision."""
        ref = await self.start_consensus(
            participants, proposal, rule=rule, timeout=timeout, topic=topic
        )
        return await self.consensus_result(ref, timeout=timeout + 10.0)

    @abstractmethod
    async def consensus_history(
        self, *, limit: int = 100, topic: str | None = None
    ) -> list[Decision]: ...

    # ----------------------------------------------------------------- calls
    async def call(
        self,
        capability: str,
        signal: Signal | str,
        data: Any = None,
        *,
        timeout: float = 5.0,
        key: str | None = None,
        idempotent: bool = False,
    ) -> Any:
        """Run ``signal`` (a Signal, or a type with ``data``) on an agent with ``capability``
        somewhere in the cluster, picked by the load balancer; returns the agent's reply.
        ``key`` makes calls with one key stick to one node (with a hashing strategy);
        ``idempotent`` allows a retry on another node after a timeout or a lost connection.
        Raises :class:`~agentcluster.errors.NoCapacity`, :class:`~agentcluster.errors.Timeout`,
        :class:`~agentcluster.errors.Rejected` or :class:`~agentcluster.errors.CallRemoteError`;
        ``ValueError`` for a timeout that is no deadline (not above 0, over 300 s) or a
        signal too large to send."""
        return await self._call_agent(
            capability, _signal(signal, data), timeout=timeout, key=key, idempotent=idempotent
        )

    @abstractmethod
    def _call_agent(
        self, capability: str, signal: Signal, *, timeout: float, key: str | None, idempotent: bool
    ) -> Awaitable[Any]:
        """The call's outcome, to await (a node's own cluster hands out the call service's
        coroutine itself: one frame less on every call)."""

    @abstractmethod
    async def routes(self, *, decisions: int = 50) -> dict[str, Any]:
        """The node's routing view: per-node weights, breakers, ejections, and its last
        ``decisions`` routing decisions (at most the 1,000 it keeps)."""

    # ----------------------------------------------------------------- auctions
    async def auction(
        self,
        bidders: Iterable[AgentEntry | str],
        item: str,
        *,
        kind: AuctionKind = "vickrey",
        duration: float = 2.0,
        reserve: float = 0.0,
        start_price: float = 0.0,
        min_increment: float = 1.0,
        step: float = 1.0,
        step_interval: float = 0.1,
    ) -> AuctionOutcome:
        """Auction ``item`` among bidder agents (sealed_first_price, vickrey, english,
        dutch); returns the committed outcome once it closes."""
        request = AuctionRequest(
            _participants(bidders), item, kind, duration, reserve, start_price, min_increment,
            step, step_interval,
        )  # fmt: skip
        return await self._auction(request)

    @abstractmethod
    async def _auction(self, request: AuctionRequest) -> AuctionOutcome: ...

    # ----------------------------------------------------------------- store primitives
    @property
    @abstractmethod
    def store(self) -> Store: ...

    def lock(self, name: str, *, ttl: float = 10.0) -> Lock:
        """A distributed lock with a fencing token (``async with cluster.lock("x") as l``)."""
        return Lock(self.store, f"mabeam/locks/{name}", ttl=ttl)

    def election(self, name: str) -> Election:
        return Election(self.store, f"mabeam/elections/{name}")

    async def elect(self, name: str, value: bytes, *, ttl: float = 10.0) -> Leadership:
        """Campaign until elected; the leadership carries its fencing token. While it waits
        as a standby, its lease (``ttl``) is kept alive here -- a standby may wait far longer
        than one TTL; once elected, the caller keeps it alive
        (``cluster.store.lease_keepalive(leadership.lease)``). A campaign that fails or is
        cancelled revokes its lease (its key goes with it)."""
        store = self.store
        lease = await store.lease_grant(ttl)
        keeper = asyncio.create_task(
            keep_lease_alive(store, lease.id, ttl, MonotonicClock(), what=f"election {name}"),
            name=f"election-keepalive {name}",
        )
        try:
            return await self.election(name).campaign(value, lease=lease.id)
        except BaseException:
            with contextlib.suppress(StoreError):
                await store.lease_revoke(lease.id)
            raise
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    def barrier(self, name: str, parties: int) -> Barrier:
        return Barrier(self.store, f"mabeam/barriers/{name}", parties)

    def semaphore(self, name: str, limit: int, *, ttl: float = 10.0) -> Semaphore:
        """A counting semaphore / resource pool of ``limit`` units, with fencing tokens."""
        return Semaphore(self.store, f"mabeam/semaphores/{name}", limit, ttl=ttl)

    # ----------------------------------------------------------------- events
    @abstractmethod
    def watch(self, pattern: str = "cluster.**") -> AsyncIterator[Signal]:
        """Signals on the node's bus matching ``pattern`` (e.g. ``cluster.consensus.*``)."""

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class NodeCluster(Cluster):
    """The facade over a node running in this process."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def _register(self, reg: Registration) -> AgentEntry:
        return await self.node.registry.register(
            reg.agent,
            capabilities=reg.capabilities,
            resources=reg.resources,
            metadata=reg.metadata,
            health=reg.health,
            unique=reg.unique,
            name=reg.name,
        )

    async def unregister(self, entry_id: str) -> bool:
        return await self.node.registry.unregister(entry_id)

    async def _find(
        self, conds: list[Cond], limit: int, order_by: str | None, descending: bool
    ) -> list[AgentEntry]:
        return self.node.registry.index.query(
            conds, limit=limit, order_by=order_by, descending=descending
        )

    async def members(self) -> list[MemberInfo]:
        return [
            MemberInfo(
                m.name, m.addr, m.state, m.meta.zone, m.meta.region, list(m.meta.capabilities)
            )
            for m in sorted(self.node.members(), key=lambda m: m.name)
        ]

    async def _start_consensus(
        self,
        participants: list[str],
        proposal: Any,
        rule: Rule,
        timeout: float,
        topic: str,
        ref: str | None,
    ) -> str:
        return await self.node.consensus.start(
            participants, proposal, rule=rule, timeout=timeout, topic=topic, ref=ref
        )

    async def consensus_result(self, ref: str, *, timeout: float = 15.0) -> Decision:
        return await self.node.consensus.result(ref, timeout=timeout)

    async def consensus_history(
        self, *, limit: int = 100, topic: str | None = None
    ) -> list[Decision]:
        return await self.node.consensus.history(limit=limit, topic=topic)

    def _call_agent(
        self, capability: str, signal: Signal, *, timeout: float, key: str | None, idempotent: bool
    ) -> Awaitable[Any]:
        return self.node.calls.call(
            capability, signal, timeout=timeout, key=key, idempotent=idempotent
        )

    async def routes(self, *, decisions: int = 50) -> dict[str, Any]:
        b = self.node.balancer
        n = max(0, min(decisions, b.decisions.maxlen or 0))
        return b.snapshot(self.node.clock.now(), decisions=n)

    async def _auction(self, request: AuctionRequest) -> AuctionOutcome:
        svc = self.node.auctions
        ref = await svc.start(
            request.bidders, request.item, kind=request.kind, duration=request.duration,
            reserve=request.reserve, start_price=request.start_price,
            min_increment=request.min_increment, step=request.step,
            step_interval=request.step_interval,
        )  # fmt: skip
        return await svc.result(ref, timeout=request.duration + 15.0)

    @property
    def store(self) -> Store:
        return self.node.store

    async def watch(self, pattern: str = "cluster.**") -> AsyncIterator[Signal]:
        bus = self.node.runtime.bus
        sub = bus.subscribe(pattern, queue_size=4096, overflow="drop_oldest")
        try:
            async for signal in sub:
                yield signal
        finally:
            bus.unsubscribe(sub)

    async def close(self) -> None:
        """Nothing to release: the node belongs to its owner."""


_REMOTE_TYPES: dict[str, type[ClusterError]] = {}


class _NameTakenRemote(RemoteError, NameTaken):
    pass


class _ConsensusTimeoutRemote(RemoteError, ConsensusTimeout):
    pass


class _ConsensusRemote(RemoteError, ConsensusError):
    pass


class _RegistryRemote(RemoteError, RegistryError):
    pass


class _AuctionRemote(RemoteError, AuctionError):
    pass


_REMOTE_TYPES.update(
    AuctionError=_AuctionRemote,
    NameTaken=_NameTakenRemote,
    ConsensusTimeout=_ConsensusTimeoutRemote,
    ConsensusError=_ConsensusRemote,
    RegistryError=_RegistryRemote,
)


class RemoteCluster(Cluster):
    """The facade over a node's control API (see :func:`connect`)."""

    def __init__(self, nodes: Sequence[str], *, keyring: Any, timeout: float = 5.0) -> None:
        from agentcluster.control import ControlClient
        from agentcluster.store.remote import RemoteStore

        if not nodes:
            raise ValueError("connect needs at least one node address")
        self.nodes = list(nodes)
        self.timeout = timeout
        self._client = ControlClient(self.nodes[0], keyring=keyring, timeout=timeout)
        self._watcher = ControlClient(self.nodes[0], keyring=keyring, timeout=timeout)
        self._store = RemoteStore(self.nodes, keyring=keyring, timeout=timeout)

    async def _call(self, fn: str, *, timeout: float | None = None, **args: Any) -> Any:
        from agentcluster.control import ControlError

        try:
            return await self._client.call("mabeam", {"fn": fn, **args}, timeout=timeout)
        except ControlError as exc:
            raise _remote_error(str(exc)) from None

    async def _register(self, reg: Registration) -> AgentEntry:
        raw = await self._call("register", **msgspec.structs.asdict(reg))
        return msgspec.convert(raw, AgentEntry)

    async def unregister(self, entry_id: str) -> bool:
        return bool(await self._call("unregister", id=entry_id))

    async def _find(
        self, conds: list[Cond], limit: int, order_by: str | None, descending: bool
    ) -> list[AgentEntry]:
        raw = await self._call(
            "find",
            where=[msgspec.to_builtins(c) for c in conds],
            limit=limit,
            order_by=order_by,
            descending=descending,
        )
        return msgspec.convert(raw, list[AgentEntry])

    async def members(self) -> list[MemberInfo]:
        from agentcluster.control import ControlError

        try:
            rows = await self._client.call("members")
        except ControlError as exc:
            raise _remote_error(str(exc)) from None
        return [
            MemberInfo(r["name"], r["addr"], r["state"], r["zone"], r["region"], r["capabilities"])
            for r in rows
        ]

    async def _start_consensus(
        self,
        participants: list[str],
        proposal: Any,
        rule: Rule,
        timeout: float,
        topic: str,
        ref: str | None,
    ) -> str:
        from agentcluster.coordination._finite import non_finite_value

        # Refused here as the node's ConsensusService refuses it in-process: the same
        # ConsensusError from both facades (the node's own check answers other clients).
        bad = non_finite_value(proposal, "proposal")
        if bad is not None:
            raise ConsensusError(bad)
        return str(
            await self._call(
                "consensus_start",
                participants=participants,
                proposal=proposal,
                rule=msgspec.to_builtins(rule),
                timeout=timeout,
                topic=topic,
                ref=ref,
            )
        )

    async def consensus_result(self, ref: str, *, timeout: float = 15.0) -> Decision:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            wait = min(max(0.0, deadline - loop.time()), 25.0)
            try:
                raw = await self._call(
                    "consensus_result", ref=ref, wait=wait, timeout=wait + self.timeout
                )
            except ConsensusTimeout:
                if loop.time() >= deadline:
                    raise
                continue
            return msgspec.convert(raw, Decision)

    async def consensus_history(
        self, *, limit: int = 100, topic: str | None = None
    ) -> list[Decision]:
        raw = await self._call("consensus_history", limit=limit, topic=topic)
        return msgspec.convert(raw, list[Decision])

    async def _call_agent(
        self, capability: str, signal: Signal, *, timeout: float, key: str | None, idempotent: bool
    ) -> Any:
        from agentcluster.control import ControlError
        from agentcluster.wire import Oversized

        if not 0 < timeout <= MAX_CALL_TIMEOUT:
            raise ValueError(
                f"timeout must be > 0 and <= {MAX_CALL_TIMEOUT:g} seconds, not {timeout}"
            )
        data = msgspec.to_builtins(signal)

        def args(left: float) -> dict[str, Any]:
            # The node gets what is left of the caller's deadline once the request leaves
            # (the connection is shared: it may have waited for its turn).
            return {
                "capability": capability,
                "signal": data,
                "timeout": left,
                "key": key,
                "idempotent": idempotent,
            }

        try:
            # The deadline covers the wait for the connection; the reply gets a little on top
            # to come back (the node answers Timeout itself once the deadline passes; an
            # entry node that hangs must not hold the caller for the client's whole timeout
            # more).
            slack = min(self.timeout, 0.05 + 0.1 * timeout)
            out = await self._client.call("call", args, timeout=timeout, slack=slack)
        except Oversized as exc:  # nothing was sent: the caller's input
            raise ValueError(
                f"call to {capability!r}: the signal is too large to send ({exc})"
            ) from None
        except ControlError as exc:
            raise _call_failure(capability, exc) from None
        if out.get("ok"):
            return out.get("data")
        raise call_error(out)

    async def routes(self, *, decisions: int = 50) -> dict[str, Any]:
        from agentcluster.control import ControlError

        try:
            return dict(await self._client.call("routes", {"decisions": decisions}))
        except ControlError as exc:
            raise _remote_error(str(exc)) from None

    async def _auction(self, request: AuctionRequest) -> AuctionOutcome:
        raw = await self._call(
            "auction",
            timeout=request.duration + 15.0 + self.timeout,
            **msgspec.structs.asdict(request),
        )
        return msgspec.convert(raw, AuctionOutcome)

    @property
    def store(self) -> Store:
        return self._store

    async def watch(self, pattern: str = "cluster.**") -> AsyncIterator[Signal]:
        from agentcluster.control import ControlError

        after: str | None = None
        while True:
            try:
                raw = await self._watcher.call(
                    "mabeam",
                    {"fn": "watch", "pattern": pattern, "after": after, "wait": 10.0},
                    timeout=10.0 + self.timeout,
                )
            except ControlError as exc:
                raise _remote_error(str(exc)) from None
            for item in raw:
                signal = msgspec.convert(item, Signal)
                after = signal.id
                yield signal

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()
        with contextlib.suppress(Exception):
            await self._watcher.close()
        await self._store.close()


def _signal(signal: Signal | str, data: Any) -> Signal:
    if isinstance(signal, Signal):
        if data is not None:
            raise ValueError("pass data inside the Signal, or a signal type with data")
        return signal
    return Signal(type=signal, data=data)


def call_error(out: Mapping[str, Any]) -> CallError:
    """The typed error a ``call`` control reply describes."""
    kind = str(out.get("error_type", ""))
    message = str(out.get("error", ""))
    attempts = tuple(out.get("attempts", ()))
    if kind == "NoCapacity":
        return NoCapacity(message, attempts=attempts)
    if kind == "Timeout":
        return Timeout(message, attempts=attempts)
    if kind == "Rejected":
        return Rejected(message, reason=str(out.get("reason", "")), attempts=attempts)
    return CallRemoteError(message, str(out.get("remote_type", kind)), attempts=attempts)


def _remote_type(message: str) -> str:
    """The exception type a control error names ("" if none): control errors read
    "<addr>: <Type>: <message>" when the node raised."""
    _, _, rest = message.partition(": ")
    type_name, sep, _ = rest.partition(": ")
    return type_name if sep and type_name.isidentifier() else ""


def _remote_error(message: str) -> ClusterError:
    type_name = _remote_type(message)
    if type_name:
        cls = _REMOTE_TYPES.get(type_name, RemoteError)
        return cls(message, type_name)
    return RemoteError(message)


def _call_failure(capability: str, exc: ControlError) -> CallError:
    """The typed error of a remote ``call`` whose control request failed (``exc``, a
    ControlError), as the node's own call path types a failed attempt: not sent is
    NoCapacity (this client's node cannot take it), a deadline passed or a connection lost
    after sending is Timeout (it may have run), an error the node answered is remote."""
    message = f"call to {capability!r}: {exc}"
    if exc.timed_out:
        return Timeout(message)
    if exc.not_sent:
        return NoCapacity(message)
    if exc.answered:
        return CallRemoteError(message, _remote_type(str(exc)))
    return Timeout(f"{message}; the call may have run")


def connect(
    node: str | Sequence[str], *, key_file: str | None = None, timeout: float = 5.0
) -> RemoteCluster:
    """A :class:`RemoteCluster` through the control API of ``node`` (``host:port``); the
    cluster key file is ``key_file`` or ``$AGENTCLUSTER_KEY_FILE``."""
    import os

    from agentcluster.wire import Keyring

    path = key_file or os.environ.get("AGENTCLUSTER_KEY_FILE")
    keyring = Keyring.from_file(path) if path else None
    nodes = [node] if isinstance(node, str) else list(node)
    return RemoteCluster(nodes, keyring=keyring, timeout=timeout)
