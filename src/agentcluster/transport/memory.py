"""The simulated network: many in-process transports, faults from a seed, time from the loop.

Theory of operation: a :class:`SimNetwork` connects :class:`MemoryTransport` objects by
address. Nothing is delivered synchronously: every packet, stream request and stream reply is
an event in one heap ordered by ``(deliver_at, sequence number)``, and the network keeps a
single ``loop.call_at`` timer armed for the earliest event. So:

* timing comes from the running event loop -- under
  :class:`~agentcluster.testing.VirtualTimeLoop` a 10-minute simulation runs as fast as the
  CPU allows, and every delivery happens at an exact virtual instant;
* all randomness (loss, jitter, duplication, reordering) is drawn from one
  ``random.Random(seed)`` in send order, and ties in delivery time are broken by send order,
  so a run is a pure function of the seed and of what the nodes do;
* events an event handler schedules for "now" run on a later loop iteration, never inside the
  current batch, so zero-delay ping-pong cannot starve the loop.

Links: each directed pair ``(src, dst)`` uses its own :class:`LinkConfig` if one was set, the
default otherwise. A packet is lost with probability ``loss``; otherwise it arrives after
``delay + U(0, jitter)`` seconds, with probability ``reorder`` plus ``U(0, 5 * delay)`` more
(so it overtakes or is overtaken), and with probability ``duplicate`` a second copy travels
independently. Streams model TCP: loss does not apply (it retransmits), delay and jitter do.

Faults: partitions and one-way drops are rules over groups of addresses, checked when a
packet or stream message is sent (what is already on the wire still arrives); ``heal``
removes them all. A crashed transport receives nothing, sends nothing, and its requests fail;
requests *to* it are refused at once (like a closed port), and requests in flight to it are
reset. A stalled transport's inbound packets and stream requests are held and delivered, in
order, when the stall ends; what the stalled node itself sends is not affected (the node shell
models its own stall). Stream requests carry the requester's address as their source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from agentcluster.transport.base import (
    ConnectFailed,
    PacketHandler,
    StreamHandler,
    Transport,
    TransportError,
    parse_addr,
)

__all__ = ["LinkConfig", "MemoryTransport", "SimNetwork", "SimNetworkStats"]


@dataclasses.dataclass(frozen=True, slots=True)
class LinkConfig:
    """Behaviour of one direction of a link (seconds and probabilities)."""

    delay: float = 0.0005
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise ValueError("delay and jitter must be >= 0")
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclasses.dataclass(slots=True)
class SimNetworkStats:
    """Counters of the whole simulated network (packets only, except ``streams``)."""

    sent: int = 0
    delivered: int = 0
    dropped_loss: int = 0
    dropped_partition: int = 0
    dropped_unreachable: int = 0  # to an address that is unknown, crashed or not started
    dropped_crashed: int = 0  # sent by a crashed (or replaced) transport
    duplicated: int = 0
    reordered: int = 0
    held: int = 0  # packets and stream requests held by a stall
    streams: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_Event = tuple[float, int, Callable[..., None], tuple[Any, ...]]


class MemoryTransport(Transport):
    """A transport attached to a :class:`SimNetwork`; create it with :meth:`SimNetwork.transport`."""

    def __init__(self, net: SimNetwork, addr: str, *, max_packet: int, max_stream: int) -> None:
        super().__init__()
        self.addr = addr
        self.max_packet = max_packet
        self.max_stream = max_stream
        self._net = net
        self._started = False
        self._closed = False
        self._crashed = False
        self._attached = True  # False once a new transport took over this address
        self._stalled = False
        self._stall_until = 0.0
        self._held: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: set[asyncio.Future[bytes]] = set()

    @property
    def crashed(self) -> bool:
        return self._crashed

    @property
    def receiving(self) -> bool:
        return self._started and not (self._closed or self._crashed) and self._attached

    async def start(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        if self._started:
            raise RuntimeError("transport already started")
        if self._closed:
            raise TransportError("transport is closed")
        self._on_packet, self._on_stream = on_packet, on_stream
        self._started = True

    def send_packet(self, addr: str, data: bytes) -> None:
        self._net._send_packet(self, addr, data)

    async def request(self, addr: str, data: bytes, *, timeout: float) -> bytes:
        return await self._net._request(self, addr, data, timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._net._detach(self)
        await self._stop_work("transport closed")

    def _halt(self, why: str) -> None:
        """Crash: drop held input, reset served streams, fail own requests."""
        self._held.clear()
        self._stalled = False
        for task in list(self._tasks):
            task.cancel()
        for fut in list(self._pending):
            if not fut.done():
                fut.set_exception(TransportError(why))

    async def _stop_work(self, why: str) -> None:
        self._halt(why)
        tasks = list(self._tasks)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept_stream(self, src: MemoryTransport, data: bytes, fut: asyncio.Future[bytes]) -> None:
        self._stats.streams_accepted += 1
        self._stats.bytes_received += len(data)
        task = asyncio.get_running_loop().create_task(self._run_stream(src, data, fut))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_stream(
        self, src: MemoryTransport, data: bytes, fut: asyncio.Future[bytes]
    ) -> None:
        try:
            reply = await self._serve_stream(src.addr, data)
        except asyncio.CancelledError:
            self._net._reply(self, src, None, fut, "connection reset")
            raise
        if reply is not None and len(reply) > self.max_stream:
            self._stats.oversized_dropped += 1
            reply = None
        if reply is not None:
            self._stats.bytes_sent += len(reply)
        self._net._reply(self, src, reply, fut, "closed the stream without a reply")


class SimNetwork:
    """A seeded, simulated network of :class:`MemoryTransport` objects (see module docstring).

    A network lives on one event loop: the first one it schedules an event on.
    """

    def __init__(self, seed: int = 0, *, default: LinkConfig | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._default = default if default is not None else LinkConfig()
        self._links: dict[tuple[str, str], LinkConfig] = {}
        self._rules: list[tuple[frozenset[str], frozenset[str]]] = []
        self._nodes: dict[str, MemoryTransport] = {}
        self._heap: list[_Event] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._firing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = SimNetworkStats()

    # ------------------------------------------------------------------ membership
    def transport(
        self, addr: str, *, max_packet: int = 1400, max_stream: int = 4 << 20
    ) -> MemoryTransport:
        """A new transport at ``addr`` (replacing a crashed one there); error if one is live."""
        parse_addr(addr)
        current = self._nodes.get(addr)
        if current is not None:
            if not current._crashed:
                raise ValueError(f"address {addr} is already in use on this network")
            current._attached = False
        transport = MemoryTransport(self, addr, max_packet=max_packet, max_stream=max_stream)
        self._nodes[addr] = transport
        return transport

    def _detach(self, transport: MemoryTransport) -> None:
        if self._nodes.get(transport.addr) is transport:
            del self._nodes[transport.addr]

    def _node(self, addr: str) -> MemoryTransport:
        node = self._nodes.get(addr)
        if node is None:
            raise ValueError(f"no transport at {addr} on this network")
        return node

    def addresses(self) -> list[str]:
        """Addresses with a transport attached (crashed ones included), sorted."""
        return sorted(self._nodes)

    def stats(self) -> SimNetworkStats:
        return dataclasses.replace(self._stats)

    # ------------------------------------------------------------------ links and faults
    def set_default(self, config: LinkConfig) -> None:
        self._default = config

    def set_link(self, src: str, dst: str, config: LinkConfig | None) -> None:
        """Give the direction ``src -> dst`` its own behaviour (``None``: back to the default)."""
        if config is None:
            self._links.pop((src, dst), None)
        else:
            self._links[(src, dst)] = config

    def link(self, src: str, dst: str) -> LinkConfig:
        """The behaviour currently in force for ``src -> dst``."""
        return self._links.get((src, dst), self._default)

    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Drop everything between the two groups, both ways, until :meth:`heal`."""
        a, b = _group(group_a), _group(group_b)
        self._rules += [(a, b), (b, a)]

    def drop_one_way(self, src_group: Iterable[str], dst_group: Iterable[str]) -> None:
        """Drop everything from ``src_group`` to ``dst_group`` (not the reverse) until healed."""
        self._rules.append((_group(src_group), _group(dst_group)))

    def heal(self) -> None:
        """Remove every partition and one-way drop (link configs and crashes stay)."""
        self._rules.clear()

    def blocked(self, src: str, dst: str) -> bool:
        """Whether a partition or one-way drop cuts ``src -> dst`` now."""
        return any(src in s and dst in d for s, d in self._rules)

    def crash(self, addr: str) -> None:
        """The node at ``addr`` dies: it stops receiving and sending; its requests fail."""
        node = self._node(addr)
        node._crashed = True
        node._halt(f"{addr} crashed")

    def restart(self, addr: str) -> None:
        """A crashed transport comes back (same object, same handlers)."""
        node = self._node(addr)
        node._crashed = False

    def crashed(self, addr: str) -> bool:
        node = self._nodes.get(addr)
        return node is not None and node._crashed

    def stall(self, addr: str, seconds: float) -> None:
        """Hold inbound packets and stream requests of ``addr`` for ``seconds`` (extends only)."""
        node = self._node(addr)
        until = self._now() + max(0.0, seconds)
        if node._stalled and until <= node._stall_until:
            return
        node._stalled = True
        node._stall_until = until
        self._push(until, self._release, (node, until))

    def unstall(self, addr: str) -> None:
        """End a stall now; held input is delivered in order."""
        node = self._node(addr)
        if node._stalled:
            node._stall_until = self._now()
            self._push(node._stall_until, self._release, (node, node._stall_until))

    def _release(self, node: MemoryTransport, until: float) -> None:
        if not node._stalled or node._stall_until != until:
            return  # extended (a later release is scheduled) or crashed meanwhile
        node._stalled = False
        held = node._held
        while held and not node._stalled:
            fn, args = held.popleft()
            fn(*args)

    # ------------------------------------------------------------------ scheduling
    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    def _push(self, at: float, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, fn, args))
        if self._firing or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        self._timer = None
        # Virtual clocks may land a hair before the deadline they were advanced to.
        limit = max(self._loop.time(), self._timer_at)
        self._timer_at = float("inf")
        last = self._seq  # events scheduled from here on wait for the next loop iteration
        heap = self._heap
        self._firing = True
        try:
            while heap and heap[0][0] <= limit and heap[0][1] <= last:
                _, _, fn, args = heapq.heappop(heap)
                fn(*args)
        finally:
            self._firing = False
            if heap:
                self._timer_at = heap[0][0]
                self._timer = self._loop.call_at(self._timer_at, self._fire)

    def _delay(self, config: LinkConfig) -> float:
        if config.jitter:
            return config.delay + self._rng.random() * config.jitter
        return config.delay

    # ------------------------------------------------------------------ packets
    def _send_packet(self, src: MemoryTransport, dst: str, data: bytes) -> None:
        stats, net = src._stats, self._stats
        if src._crashed or src._closed or not src._attached:
            net.dropped_crashed += 1
            return
        size = len(data)
        if size > src.max_packet:
            stats.oversized_dropped += 1
            return
        stats.packets_sent += 1
        stats.bytes_sent += size
        net.sent += 1
        if self._rules and self.blocked(src.addr, dst):
            net.dropped_partition += 1
            return
        config = self._links.get((src.addr, dst), self._default) if self._links else self._default
        rng = self._rng
        if config.loss and rng.random() < config.loss:
            net.dropped_loss += 1
            return
        copies = 1
        if config.duplicate and rng.random() < config.duplicate:
            copies = 2
            net.duplicated += 1
        now = self._now()
        data = bytes(data)
        for _ in range(copies):
            delay = self._delay(config)
            if config.reorder and rng.random() < config.reorder:
                delay += rng.random() * 5 * config.delay
                net.reordered += 1
            self._push(now + delay, self._arrive_packet, (src.addr, dst, data))

    def _arrive_packet(self, src: str, dst: str, data: bytes) -> None:
        node = self._nodes.get(dst)
        if node is None or not node.receiving:
            self._stats.dropped_unreachable += 1
        elif node._stalled:
            self._stats.held += 1
            node._held.append((self._arrive_packet, (src, dst, data)))
        else:
            self._stats.delivered += 1
            node._deliver_packet(src, data)

    # ------------------------------------------------------------------ streams
    async def _request(self, src: MemoryTransport, dst: str, data: bytes, timeout: float) -> bytes:
        stats = src._stats
        if src._closed or src._crashed or not src._attached:
            raise TransportError(f"{src.addr}: transport is closed or crashed")
        if len(data) > src.max_stream:
            stats.oversized_dropped += 1
            raise TransportError(
                f"request of {len(data)} bytes exceeds max_stream {src.max_stream}"
            )
        stats.streams_opened += 1
        target = self._nodes.get(dst)
        if target is None or not target.receiving:
            stats.stream_errors += 1
            raise ConnectFailed(f"connection to {dst} refused")
        self._stats.streams += 1
        stats.bytes_sent += len(data)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        src._pending.add(fut)
        if not self.blocked(src.addr, dst):
            at = self._now() + self._delay(self.link(src.addr, dst))
            self._push(at, self._arrive_request, (src, dst, bytes(data), fut))
        try:
            async with asyncio.timeout(timeout):
                reply = await fut
        except (TimeoutError, TransportError):
            stats.stream_errors += 1
            raise
        finally:
            src._pending.discard(fut)
        stats.bytes_received += len(reply)
        return reply

    def _arrive_request(
        self, src: MemoryTransport, dst: str, data: bytes, fut: asyncio.Future[bytes]
    ) -> None:
        node = self._nodes.get(dst)
        if node is None or not node.receiving:
            self._reply_failure(dst, src, fut, "connection reset")
        elif node._stalled:
            self._stats.held += 1
            node._held.append((self._arrive_request, (src, dst, data, fut)))
        else:
            node._accept_stream(src, data, fut)

    def _reply(
        self,
        server: MemoryTransport,
        client: MemoryTransport,
        reply: bytes | None,
        fut: asyncio.Future[bytes],
        why: str,
    ) -> None:
        if reply is None:
            self._reply_failure(server.addr, client, fut, why)
        elif not self.blocked(server.addr, client.addr):
            at = self._now() + self._delay(self.link(server.addr, client.addr))
            self._push(at, _resolve, (fut, reply, None))

    def _reply_failure(
        self, server: str, client: MemoryTransport, fut: asyncio.Future[bytes], why: str
    ) -> None:
        if fut.done() or self.blocked(server, client.addr):
            return
        at = self._now() + self._delay(self.link(server, client.addr))
        self._push(at, _resolve, (fut, None, TransportError(f"{server}: {why}")))


def _resolve(fut: asyncio.Future[bytes], reply: bytes | None, error: Exception | None) -> None:
    if fut.done():
        return  # the requester timed out, crashed or closed meanwhile
    if error is not None:
        fut.set_exception(error)
    elif reply is not None:
        fut.set_result(reply)


def _group(addrs: Iterable[str]) -> frozenset[str]:
    # A bare string is one address, not a collection of characters.
    return frozenset([addrs]) if isinstance(addrs, str) else frozenset(addrs)
