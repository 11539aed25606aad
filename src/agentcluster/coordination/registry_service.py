"""The registry on a node: the asyncio shell around :class:`RegistrySync`, and unique names.

Theory of operation: the sync core decides what to send and when; this shell moves its
messages. Registry frames ride the node's stream port behind a one-byte channel prefix
(``G``), sealed with the cluster keyring like every other frame. Each peer gets an ordered
sender (one task draining a queue), so the deltas of one owner reach a peer in the order they
were made -- a reordering would only cost a pull, but needlessly. A failed send drops that
peer's queue: the core's anti-entropy digests repair whatever was lost.

Membership drives the core: a member that joins or comes back is ``member_up`` (full push and
pull), a member that dies or leaves is ``member_down`` (its entries vanish everywhere, and
gossip cannot bring them back until it returns).

**Unique names** go through the coordination store: ``mabeam/names/<name>`` is created (if
absent) on this node's lease and its ``create_revision`` becomes the entry's ``name_token``.
A name somebody else holds is refused (:class:`NameTaken`). When the store cannot be reached
(this node is on the minority side of a partition) the entry is registered optimistically
with token 0 and the claim is retried in the background; after the partition heals the core
resolves any conflict deterministically (a store-backed claim beats an optimistic one) and
the losing agent is told with a ``cluster.registry.name_conflict`` signal.

Hostile input must not take the node down: the loop runs inside the node's task group, so a
frame that cannot be encoded (too large, a value out of range) is logged and dropped -- the
core's anti-entropy repairs what it would have carried -- and any other error of one loop
round is logged and the loop goes on after a short pause. An inbound frame that does not
decode closes its connection: a host without the cluster key must not keep stream slots.

Local agents that stop for good lose their entries: every second the shell checks that each
registered agent still runs (twice in a row, so a supervisor restart does not unregister).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster.coordination.registry import AgentEntry, Health, RegistryIndex, validate_entry
from agentcluster.coordination.registry_sync import (
    RegistryEvent,
    RegistrySync,
    SyncConfig,
    SyncMessage,
)
from agentcluster.membership.messages import MemberEvent
from agentcluster.signals import Signal
from agentcluster.store.base import Compare, DeleteOp, GetOp, PutOp, StoreError, TxnResult
from agentcluster.transport.base import TransportError
from agentcluster.wire import WireCodec, WireError

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = ["REGISTRY_PREFIX", "NameTaken", "RegistryError", "RegistryService"]

log = logging.getLogger(__name__)

REGISTRY_PREFIX = b"G"
NAMES_PREFIX = "mabeam/names/"
_SEND_TIMEOUT = 2.0
_QUEUE_LIMIT = 256  # frames queued for one peer before the oldest are dropped (digests repair)
_NAME_LEASE_TTL = 10.0  # a dead node's unique names free up this long after it stops
_ERROR_PAUSE = 1.0  # after a failed loop round: never spin on an error that repeats


class RegistryError(Exception):
    """A registration was refused (bad entry, unknown agent, name taken)."""


class NameTaken(RegistryError):
    def __init__(self, name: str, holder: str) -> None:
        super().__init__(f"the unique name {name!r} is held by {holder}")
        self.name = name
        self.holder = holder


class RegFrame(msgspec.Struct, frozen=True, array_like=True):
    """A sync message and the node that sent it (stream sources are ephemeral ports)."""

    sender: str
    msg: SyncMessage


class _PeerSender:
    """Sends frames to one peer in order, one stream request at a time."""

    def __init__(self, service: RegistryService, dst: str) -> None:
        self.service = service
        self.dst = dst
        self.queue: collections.deque[bytes] = collections.deque()
        self.task: asyncio.Task[None] | None = None

    def push(self, frame: bytes) -> None:
        if len(self.queue) >= _QUEUE_LIMIT:
            self.queue.popleft()
            self.service.send_failures += 1
        self.queue.append(frame)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        svc = self.service
        while self.queue:
            addr = svc.addr_of(self.dst)
            if addr is None:
                svc.send_failures += len(self.queue)
                self.queue.clear()
                return
            frame = self.queue.popleft()
            try:
                await svc.node.transport.request(addr, frame, timeout=_SEND_TIMEOUT)
            except (TransportError, TimeoutError, OSError):
                # The peer is gone or slow: what was queued is stale; anti-entropy repairs.
                svc.send_failures += 1 + len(self.queue)
                self.queue.clear()
                return
            svc.frames_sent += 1


class RegistryService:
    """One node's registry: local registrations, the merged view, name claims."""

    def __init__(self, node: Node, *, config: SyncConfig | None = None) -> None:
        self.node = node
        self.config = config if config is not None else SyncConfig()
        # The epoch orders a restarted node's state after its previous life's.
        self.core = RegistrySync(
            node.name,
            int(node.clock.wall() * 1_000_000_000),
            random.Random(node.rng.random()),
            self.config,
            now=node.clock.now(),
        )
        self.codec = WireCodec(RegFrame, node.keyring, wall=node.clock.wall, max_size=4 << 20)
        self._senders: dict[str, _PeerSender] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._claims: dict[str, str] = {}  # unique name -> entry id still to claim in the store
        self._lease = 0
        self._missing: dict[str, int] = {}
        self._outbox: list[Signal] = []
        self.frames_sent = 0
        self.frames_received = 0
        self.send_failures = 0
        self.encode_failures = 0
        self.loop_errors = 0

    # ----------------------------------------------------------------- lifecycle
    async def start(self, tg: asyncio.TaskGroup) -> None:
        self.node.listeners.append(self._on_member_event)
        for m in self.node.members():
            if m.name != self.node.name and m.state in ("alive", "suspect"):
                self.core.member_up(m.name, self.node.clock.now())
        self._task = tg.create_task(self._run(), name=f"registry:{self.node.name}")

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.node.listeners.remove(self._on_member_event)
        tasks = [s.task for s in self._senders.values() if s.task is not None]
        if self._task is not None:
            tasks.append(self._task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._lease and self.node.store_host is not None:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.node.store.lease_revoke(self._lease)

    @property
    def index(self) -> RegistryIndex:
        """The merged view of every node's entries (read it directly: no network)."""
        return self.core.index

    # ----------------------------------------------------------------- registrations
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
        """Register the running local agent ``agent`` (an id or a name)."""
        server = self.node.runtime.get(agent)
        if server is None:
            raise RegistryError(f"no running agent {agent!r} on node {self.node.name}")
        entry_id = f"{self.node.name}/{server.id}"
        entry = AgentEntry(
            id=entry_id,
            name=name if name is not None else server.name,
            node=self.node.name,
            capabilities=tuple(dict.fromkeys(capabilities)),
            health=health,
            resources={k: float(v) for k, v in (resources or {}).items()},
            metadata=dict(metadata or {}),
            unique=unique,
            registered_at=self.node.clock.wall(),
        )
        try:
            validate_entry(entry)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        if unique:
            token = await self._claim(entry.name, entry_id)
            entry = msgspec.structs.replace(entry, name_token=token)
        self._publish(self.core.register(entry, self.node.clock.now()))
        self._wake.set()
        return entry

    async def update(
        self,
        entry_id: str,
        *,
        health: Health | None = None,
        resources: Mapping[str, float] | None = None,
        metadata: Mapping[str, str] | None = None,
        capabilities: Iterable[str] | None = None,
    ) -> AgentEntry:
        """Change a local entry (health, resources, metadata, capabilities)."""
        current = self.core.index.get(entry_id)
        if current is None or current.node != self.node.name:
            raise RegistryError(f"no local registry entry {entry_id!r} on {self.node.name}")
        changes: dict[str, Any] = {}
        if health is not None:
            changes["health"] = health
        if resources is not None:
            changes["resources"] = {k: float(v) for k, v in resources.items()}
        if metadata is not None:
            changes["metadata"] = dict(metadata)
        if capabilities is not None:
            changes["capabilities"] = tuple(dict.fromkeys(capabilities))
        entry = msgspec.structs.replace(current, **changes)
        try:
            validate_entry(entry)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        self._publish(self.core.register(entry, self.node.clock.now()))
        self._wake.set()
        return entry

    async def unregister(self, entry_id: str) -> bool:
        current = self.core.index.get(entry_id)
        if current is None or current.node != self.node.name:
            return False
        self._publish(self.core.unregister(entry_id, self.node.clock.now()))
        self._wake.set()
        self._claims.pop(current.name, None)
        if current.unique and current.name_token and self.node.store_host is not None:
            key = NAMES_PREFIX + current.name
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.node.store.txn(
                        [Compare(key, "value", "==", entry_id.encode())],
                        [DeleteOp(key)],
                    )
        return True

    async def _claim(self, name: str, entry_id: str) -> int:
        if self.node.store_host is None:
            raise RegistryError(
                "a unique name needs the coordination store (configure store_voters)"
            )
        try:
            async with asyncio.timeout(2.0):
                result = await self._try_claim(name, entry_id)
        except (StoreError, TimeoutError) as exc:
            # The minority side of a partition: register optimistically, claim later.
            log.warning("unique name %r registered unclaimed for now: %s", name, exc)
            self._claims[name] = entry_id
            return 0
        return result

    async def _try_claim(self, name: str, entry_id: str) -> int:
        store = self.node.store
        if not self._lease:
            self._lease = (await store.lease_grant(_NAME_LEASE_TTL)).id
        key = NAMES_PREFIX + name
        res: TxnResult = await store.txn(
            [Compare(key, "create", "==", 0)],
            [PutOp(key, entry_id.encode(), self._lease)],
            [GetOp(key)],
        )
        if res.succeeded:
            got = await store.get(key)
            return got.create_revision if got is not None else 0
        kvs = res.results[0]
        assert isinstance(kvs, list)
        holder = kvs[0].value.decode() if kvs else "?"
        if holder == entry_id:
            return kvs[0].create_revision
        raise NameTaken(name, holder)

    # ----------------------------------------------------------------- the loop
    async def _run(self) -> None:
        clock = self.node.clock
        next_check = clock.now() + 1.0
        while True:
            pause = 0.0
            try:
                next_check = await self._round(next_check)
            except Exception:
                # This task lives in the node's task group: dying would stop the node.
                self.loop_errors += 1
                log.exception("registry loop round failed on %s", self.node.name)
                pause = _ERROR_PAUSE
            delay = max(min(self.core.next_deadline(), next_check) - clock.now(), pause)
            self._wake.clear()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def _round(self, next_check: float) -> float:
        """One pass of the loop; returns when housekeeping is due next."""
        now = self.node.clock.now()
        self.core.tick(now)
        self._flush()
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            for signal in outbox:
                try:
                    await self.node.runtime.bus.publish(signal)
                except Exception:
                    log.exception("registry event %s could not be published", signal.type)
        if now >= next_check:
            next_check = now + 1.0
            await self._housekeeping()
        return next_check

    async def _housekeeping(self) -> None:
        runtime = self.node.runtime
        for entry in [e for e in self.core.index.entries() if e.node == self.node.name]:
            agent_id = entry.id.split("/", 1)[1]
            # By id only: a new agent of the same name does not keep a stopped one's entry.
            if runtime.get_id(agent_id) is not None:
                self._missing.pop(entry.id, None)
                continue
            misses = self._missing[entry.id] = self._missing.get(entry.id, 0) + 1
            if misses >= 2:
                self._missing.pop(entry.id, None)
                await self.unregister(entry.id)
        if self._lease and self.node.store_host is not None:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.node.store.lease_keepalive(self._lease)
        for name, entry_id in list(self._claims.items()):
            current = self.core.index.get(entry_id)
            if current is None:
                self._claims.pop(name, None)
                continue
            try:
                async with asyncio.timeout(1.0):
                    token = await self._try_claim(name, entry_id)
            except NameTaken as exc:
                # Someone holds it in the store: their entry wins the conflict; ours stays
                # unclaimed and the core tells our agent when the two entries meet.
                log.warning("%s", exc)
                self._claims.pop(name, None)
                continue
            except (StoreError, TimeoutError):
                continue
            self._claims.pop(name, None)
            self._publish(
                self.core.register(
                    msgspec.structs.replace(current, name_token=token), self.node.clock.now()
                )
            )
            self._wake.set()

    def _flush(self) -> None:
        for dst, msg in self.core.ready():
            try:
                data = REGISTRY_PREFIX + self.codec.encode(RegFrame(self.node.name, msg))
            except (WireError, msgspec.EncodeError, OverflowError, ValueError, TypeError) as exc:
                # One frame we cannot send (too large, a value out of range): drop it, the
                # core's digests repair what it carried. Never let it stop the loop.
                self.encode_failures += 1
                log.error(
                    "registry %s to %s dropped, it cannot be encoded: %s",
                    type(msg).__name__,
                    dst,
                    exc,
                )
                continue
            sender = self._senders.get(dst)
            if sender is None:
                sender = self._senders[dst] = _PeerSender(self, dst)
            sender.push(data)

    def addr_of(self, name: str) -> str | None:
        member = self.node.core.member(name)
        if member is None or member.state not in ("alive", "suspect"):
            return None
        return member.addr

    # ----------------------------------------------------------------- inbound
    async def on_stream(self, src: str, data: bytes) -> bytes | None:
        """Handle one registry frame: ``b""`` (keep the connection) once it is applied,
        ``None`` (close it, no reply) when it does not decode -- a host without the cluster
        key must not hold a stream slot by trickling garbage."""
        frame = self.codec.try_decode(data)
        if frame is None:
            return None
        self.frames_received += 1
        events = self.core.step(frame.sender, frame.msg, self.node.clock.now())
        self._publish(events)
        self._flush()
        return b""

    def _on_member_event(self, ev: MemberEvent) -> None:
        name = ev.member.name
        if name == self.node.name:
            return
        now = self.node.clock.now()
        if ev.kind in ("joined", "alive"):
            self.core.member_up(name, now)
        elif ev.kind in ("dead", "left"):
            self._publish(self.core.member_down(name, now))
            sender = self._senders.pop(name, None)
            if sender is not None and sender.task is not None:
                sender.task.cancel()
        self._wake.set()

    # ----------------------------------------------------------------- events
    def _publish(self, events: list[RegistryEvent]) -> None:
        if not events:
            return
        runtime = self.node.runtime
        source = f"/node/{self.node.name}/registry"
        for ev in events:
            data = msgspec.to_builtins(ev.entry)
            if ev.kind == "name_conflict":
                winner = msgspec.to_builtins(ev.winner) if ev.winner is not None else None
                signal = Signal(
                    type="cluster.registry.name_conflict",
                    source=source,
                    subject=ev.entry.id,
                    data={"entry": data, "winner": winner},
                )
                agent_id = ev.entry.id.split("/", 1)[1]
                server = runtime.get_id(agent_id)
                if server is not None:
                    with contextlib.suppress(Exception):
                        server.cast_nowait(signal)
            else:
                signal = Signal(
                    type=f"cluster.registry.{ev.kind}",
                    source=source,
                    subject=ev.entry.id,
                    data=data,
                )
            self._bus_publish(signal)

    def _bus_publish(self, signal: Signal) -> None:
        # Published from the loop task: callers here are synchronous (core steps).
        self._outbox.append(signal)
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self.core.index),
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "send_failures": self.send_failures,
            "encode_failures": self.encode_failures,
            "loop_errors": self.loop_errors,
            "unclaimed_names": sorted(self._claims),
            "core": msgspec.to_builtins(self.core.stats),
        }
