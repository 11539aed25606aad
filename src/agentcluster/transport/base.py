"""The transport interface: best-effort packets and reliable request/reply streams.

Theory of operation: a node talks to its peers in two ways, like hashicorp/memberlist:

* **packets** (UDP in production): small, unordered, may be lost or duplicated. Sending never
  blocks and never raises for network trouble; failures are only counted.
* **streams** (TCP in production): one request, one reply, over a fresh connection. A failure
  is reported to the caller as :class:`TransportError` (refused, reset, closed) or
  :class:`TimeoutError`.

A transport delivers what it receives to two handlers given to :meth:`Transport.start`. A
handler that raises is a bug in the layer above, not a network event: the transport catches
it, counts it in ``handler_errors`` and carries on, so no peer can crash a node by making its
handler fail. Addresses are ``"host:port"`` strings (IPv6 in brackets: ``"[::1]:7946"``);
:func:`parse_addr` and :func:`format_addr` convert them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

__all__ = [
    "ConnectFailed",
    "PacketHandler",
    "StreamHandler",
    "Transport",
    "TransportError",
    "TransportStats",
    "format_addr",
    "parse_addr",
]

log = logging.getLogger(__name__)

PacketHandler = Callable[[str, bytes], None]
"""``(source "host:port", data)`` for every packet received."""

StreamHandler = Callable[[str, bytes], Awaitable[bytes | None]]
"""``(source, request) -> reply``; ``None`` closes the stream without a reply."""


class TransportError(Exception):
    """A stream request failed: refused, reset, closed without reply, or transport closed."""


class ConnectFailed(TransportError):
    """The stream could not be opened: the request certainly never reached the peer (so a
    non-idempotent request may safely be sent elsewhere)."""


@dataclasses.dataclass(slots=True)
class TransportStats:
    """Counters of one transport (a snapshot when returned by :meth:`Transport.stats`)."""

    packets_sent: int = 0
    packets_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_errors: int = 0
    handler_errors: int = 0
    streams_opened: int = 0
    streams_reused: int = 0  # requests sent on a kept connection (no new connection)
    streams_accepted: int = 0
    stream_errors: int = 0
    oversized_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into ``(host, port)``; ``ValueError`` if bad."""
    if not isinstance(addr, str):
        raise ValueError(f"address must be a 'host:port' string, got {type(addr).__name__}")
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise ValueError(f"address {addr!r}: missing ']' after the IPv6 host")
        host, rest = addr[1:end], addr[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"address {addr!r}: expected ':port' after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"address {addr!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep:
            raise ValueError(f"address {addr!r}: expected 'host:port'")
        if ":" in host:
            raise ValueError(f"address {addr!r}: write IPv6 hosts in brackets, like '[::1]:7946'")
    if not host:
        raise ValueError(f"address {addr!r}: empty host")
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"address {addr!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"address {addr!r}: port {port} is out of range 0-65535")
    return host, port


def format_addr(host: str, port: int) -> str:
    """The inverse of :func:`parse_addr` (IPv6 hosts get brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Transport(ABC):
    """Packets and streams between nodes; see the module docstring for the contract."""

    addr: str
    """``"host:port"`` this transport is reachable at (final once started)."""

    def __init__(self) -> None:
        self._stats = TransportStats()
        self._on_packet: PacketHandler | None = None
        self._on_stream: StreamHandler | None = None

    @abstractmethod
    async def start(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        """Begin receiving; packets go to ``on_packet``, stream requests to ``on_stream``."""

    @abstractmethod
    def send_packet(self, addr: str, data: bytes) -> None:
        """Send one packet, best effort: never blocks, never raises for network errors."""

    @abstractmethod
    async def request(self, addr: str, data: bytes, *, timeout: float) -> bytes:
        """Send one request over a stream and return the reply.

        Raises :class:`TransportError` (refused, reset, closed without reply) or
        :class:`TimeoutError` when no reply came within ``timeout`` seconds.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving, fail pending requests, and release every task and socket."""

    def stats(self) -> TransportStats:
        """A snapshot of this transport's counters."""
        return dataclasses.replace(self._stats)

    # ------------------------------------------------------------------ for implementations
    def _deliver_packet(self, src: str, data: bytes) -> None:
        stats = self._stats
        stats.packets_received += 1
        stats.bytes_received += len(data)
        handler = self._on_packet
        if handler is None:
            return
        try:
            handler(src, data)
        except Exception:
            stats.handler_errors += 1
            log.exception("packet handler failed on a packet from %s", src)

    async def _serve_stream(self, src: str, data: bytes) -> bytes | None:
        """Run the stream handler; a handler failure means "close without reply"."""
        handler = self._on_stream
        if handler is None:
            return None
        try:
            reply = await handler(src, data)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._stats.handler_errors += 1
            log.exception("stream handler failed on a request from %s", src)
            return None
        if reply is not None and not isinstance(reply, bytes | bytearray | memoryview):
            self._stats.handler_errors += 1
            log.error("stream handler returned %s, not bytes or None", type(reply).__name__)
            return None
        return bytes(reply) if reply is not None else None
