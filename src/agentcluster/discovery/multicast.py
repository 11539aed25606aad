"""UDP multicast discovery: nodes on one network segment announce themselves and listen.

Theory of operation: every node joins a multicast group (``239.255.86.76:7947`` by default, in
the organisation-local scope, so routers do not forward it) and sends a small
:class:`Announce` — cluster name, the address its membership transport listens on, its node
name, its send time — right away and then every ``interval`` (jittered by +/-10 % from a seeded
RNG so a rack of nodes started together does not announce in lockstep). Every announcement heard
refreshes that peer in a table; :meth:`Multicast.discover` returns the peers heard within the
last ``expiry`` seconds (three intervals by default, so one or two lost datagrams do not make
a peer disappear), and forgets older ones.

Announcements are sealed by the wire layer's :class:`~agentcluster.wire.WireCodec` with the
cluster :class:`~agentcluster.wire.Keyring`: a host without the key can neither be found nor
inject a fake peer (its frames fail authentication), and a frame replayed later than the
codec's window is refused. Refused frames, announcements of another cluster, malformed
addresses and our own announcements (looped back by ``IP_MULTICAST_LOOP``) are dropped and
counted in :class:`MulticastStats`; nothing on the receive path raises.

``ttl=1`` keeps announcements on the local link. ``interface`` selects the IPv4 address of the
interface used to join and send (``127.0.0.1`` by default, which suits tests and single-host
clusters; use the host's LAN address to discover across machines).

The object owns one background task (the announcer) and one socket; :meth:`start` is called
by the first :meth:`discover`, :meth:`close` cancels and awaits the task and closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import sys
from dataclasses import dataclass
from types import MappingProxyType

import msgspec

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.discovery.base import Candidate, Strategy, format_addr, parse_addr
from agentcluster.wire import Keyring, WireCodec, WireError

__all__ = ["Announce", "Multicast", "MulticastAnnouncer", "MulticastStats"]

DEFAULT_GROUP = "239.255.86.76"
DEFAULT_PORT = 7947


class Announce(msgspec.Struct, frozen=True, array_like=True):
    """One node saying "I am here" on the multicast group."""

    cluster: str
    addr: str  # "host:port" of the node's membership transport
    name: str  # node name
    sent_at: float  # sender's wall clock, seconds


@dataclass
class MulticastStats:
    sent: int = 0
    send_errors: int = 0
    received: int = 0
    accepted: int = 0
    dropped_auth: int = 0  # refused by the codec (bad MAC, replay, garbage...)
    dropped_cluster: int = 0  # authentic, but another cluster's name
    dropped_malformed: int = 0  # authentic, but an unusable address
    own: int = 0  # our own announcements looped back


@dataclass
class _Heard:
    announce: Announce
    at: float  # our monotonic clock


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Multicast) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._owner._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on a multicast socket say nothing about any peer.
        self._owner.stats.send_errors += 1


class Multicast(Strategy):
    """Announce this node on a multicast group and return the peers heard recently."""

    def __init__(
        self,
        group: str = DEFAULT_GROUP,
        port: int = DEFAULT_PORT,
        *,
        announce_addr: str,
        keyring: Keyring | None,
        interval: float,
        ttl: int = 1,
        interface: str = "127.0.0.1",
        cluster: str = "agentcluster",
        node_name: str | None = None,
        expiry: float | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        label: str | None = None,
    ) -> None:
        if not ipaddress.IPv4Address(group).is_multicast:
            raise ValueError(f"{group} is not an IPv4 multicast group")
        ipaddress.IPv4Address(interface)
        if not 1 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        if not interval > 0:
            raise ValueError("interval must be positive")
        if not 0 <= ttl <= 255:
            raise ValueError("ttl must be within 0..255")
        host, aport = parse_addr(announce_addr)
        self.group = group
        self.port = port
        self.announce_addr = format_addr(host, aport)
        self.interval = interval
        self.ttl = ttl
        self.interface = interface
        self.cluster = cluster
        self.node_name = node_name if node_name is not None else self.announce_addr
        self.expiry = expiry if expiry is not None else 3.0 * interval
        self.name = label or f"multicast:{group}:{port}"
        self.stats = MulticastStats()
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._rng = rng if rng is not None else random.Random()
        # A replay window of a few intervals: an announcement is only news while it is fresh.
        self.codec = WireCodec(
            Announce, keyring, replay_window=max(60.0, 2.0 * self.expiry), wall=self._clock.wall
        )
        self._heard: dict[str, _Heard] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._start_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            # Several nodes on one host (and tests) share the group port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # On Linux, binding to the group address filters out unicast and other groups sent
            # to the same port; elsewhere bind to any address.
            sock.bind((self.group if sys.platform.startswith("linux") else "", self.port))
            iface = socket.inet_aton(self.interface)
            mreq = socket.inet_aton(self.group) + iface
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, self.ttl)
            # Loop back so nodes on the same host hear each other.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        """Join the group and start announcing; idempotent."""
        # The lock makes concurrent first discover() calls open one socket, not two.
        async with self._start_lock:
            if self._closed:
                raise RuntimeError("multicast discovery is closed")
            if self._transport is not None:
                return
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), sock=self._socket()
            )
            self._transport = transport
            # The first announcement goes out before start() returns: peers hear us at once.
            self.announce()
            self._task = asyncio.create_task(self._announce_loop(), name=f"{self.name} announcer")

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    async def __aenter__(self) -> Multicast:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- sending -----------------------------------------------------------------------------

    def announce(self) -> None:
        """Send one announcement now (also done every ``interval`` by the background task)."""
        transport = self._transport
        if transport is None:
            return
        message = Announce(self.cluster, self.announce_addr, self.node_name, self._clock.wall())
        try:
            transport.sendto(self.codec.encode(message), (self.group, self.port))
        except (OSError, WireError):
            self.stats.send_errors += 1
            return
        self.stats.sent += 1

    async def _announce_loop(self) -> None:
        while True:
            await self._clock.sleep(self.interval * self._rng.uniform(0.9, 1.1))
            self.announce()

    # -- receiving ---------------------------------------------------------------------------

    def _on_datagram(self, data: bytes) -> None:
        self.stats.received += 1
        message = self.codec.try_decode(data)
        if message is None:
            self.stats.dropped_auth += 1
            return
        if not isinstance(message, Announce):  # the codec's type makes this unreachable
            self.stats.dropped_malformed += 1
            return
        if message.cluster != self.cluster:
            self.stats.dropped_cluster += 1
            return
        try:
            host, port = parse_addr(message.addr)
        except ValueError:
            self.stats.dropped_malformed += 1
            return
        addr = format_addr(host, port)
        if addr == self.announce_addr:
            self.stats.own += 1
            return
        self.stats.accepted += 1
        self._heard.pop(addr, None)  # re-insert: the table stays ordered by last heard
        self._heard[addr] = _Heard(message, self._clock.now())

    # -- discovery ---------------------------------------------------------------------------

    def peers(self) -> dict[str, Announce]:
        """Peers heard within ``expiry``, by address (older entries are forgotten)."""
        horizon = self._clock.now() - self.expiry
        for addr in [a for a, h in self._heard.items() if h.at < horizon]:
            del self._heard[addr]
        return {addr: h.announce for addr, h in self._heard.items()}

    async def discover(self) -> list[Candidate]:
        await self.start()
        return sorted(
            Candidate(addr, self.name, MappingProxyType({"name": a.name, "cluster": a.cluster}))
            for addr, a in self.peers().items()
        )


#: The same strategy under the name that says what it does on the network.
MulticastAnnouncer = Multicast
