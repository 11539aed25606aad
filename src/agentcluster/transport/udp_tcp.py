"""The production transport: UDP packets and TCP streams on one port, on asyncio.

Theory of operation: a node binds one port number twice -- a UDP datagram endpoint for packets
and a TCP server for streams -- so that one ``host:port`` address names both (as memberlist
does). Binding port 0 picks a free port: TCP is bound first (the kernel chooses), then UDP on
the same number, and if some other program already holds that UDP port the whole bind is
retried a few times.

Packets: ``send_packet`` hands the datagram to the kernel immediately (``sendto`` on a
non-blocking socket); anything larger than ``max_packet`` is counted as ``oversized_dropped``
and not sent, because IP fragmentation makes large datagrams far more likely to be lost. Host
names are resolved in the background (the packet waits for the answer) and cached, so the send
path never blocks on DNS. Errors the kernel reports later (``error_received``) are counted.

Streams: a request is one length-prefixed frame (4-byte big-endian length, then the bytes) on
a TCP connection, answered by one length-prefixed reply; the server closes without a reply
when the handler says so (or fails). After a reply the client keeps the connection for its
next request to that peer (one idle connection per peer, for at most ``_IDLE_KEEP`` seconds,
dropped when the peer closed it): a TCP handshake per request cost more than most requests.
A request's timeout is kept by its connection's one re-armable timer (:class:`_Deadline`),
not a timeout context per request. A client may keep the connection
and send further requests on it, one at a time (the control API's persistent clients do, to
save a TCP handshake per request); an idle connection is closed after
``stream_idle_timeout``. A request whose length has the top bit set (:data:`ONE_WAY_FLAG`) is
one-way: it is handled but never answered, so a peer can stream frames back to back on one
connection (the store's Raft pipes do). The server is defensive: a peer
must send its whole request (and take the reply) within ``stream_read_timeout`` seconds each, lengths above
``max_stream`` close the connection at once, and at most ``max_connections`` connections are
served together (more are closed on arrival). Every connection task is owned by the transport
and cancelled and awaited by :meth:`UdpTcpTransport.close`.

uvloop is optional: this module only uses the asyncio API, so it runs unchanged on a uvloop
event loop when the node installs one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import struct
from typing import Any

from agentcluster.clock import Deadline
from agentcluster.transport.base import (
    ConnectFailed,
    PacketHandler,
    StreamHandler,
    Transport,
    TransportError,
    format_addr,
    parse_addr,
)

__all__ = ["ONE_WAY_FLAG", "UdpTcpTransport"]

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
# Set in a request's length prefix: handle it, send no reply (lengths stay far below 2**31).
ONE_WAY_FLAG = 1 << 31
_CACHE_LIMIT = 4096  # distinct peer addresses remembered for formatting / targets
_DNS_TTL = 60.0
_DNS_NEGATIVE_TTL = 5.0
_PENDING_PER_HOST = 64  # packets held while a host name is being resolved
_UDP_BUFFER_LIMIT = 1 << 20  # queued datagram bytes beyond which sends are dropped


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTcpTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._owner._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._owner._stats.send_errors += 1


class _Deadline:
    """A connection's deadline: cancels the task using the connection when the awaited read,
    drain or connect is not done in time; :attr:`expired` tells that cancellation from any
    other. One :class:`~agentcluster.clock.Deadline` timer per connection, not a timeout
    context per request (that cost ~10 us of a 60 us loopback round trip on uvloop). A server
    connection binds its own task once; a client connection binds the requesting task for
    each request."""

    __slots__ = ("_cancelling", "_loop", "_task", "_timer", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None = None):
        self._loop = loop
        self._task = task
        self._cancelling = 0
        self._timer = Deadline(loop, self._expire)
        self.expired = False

    def bind(self, task: asyncio.Task[Any]) -> None:
        """The task this deadline cancels from now on (a client connection's next request)."""
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False

    def start(self, seconds: float) -> None:
        """The awaited operation must finish within ``seconds`` from now."""
        self._timer.set(self._loop.time() + seconds)

    def stop(self) -> None:
        self._timer.clear()

    def timed_out(self) -> bool:
        """In the bound task's ``except CancelledError``: True when this deadline, and
        nothing else, cancelled it (the cancellation is then taken back, as
        ``asyncio.timeout`` does before it raises TimeoutError)."""
        task = self._task
        return self.expired and task is not None and task.uncancel() <= self._cancelling

    def _expire(self) -> None:
        if self._task is not None:
            self.expired = True
            self._task.cancel()

    def close(self) -> None:
        self._timer.close()


# How long an idle request connection is kept for reuse: well under the server side's
# ``stream_idle_timeout`` (60 s), so a kept connection is never one the server is closing.
_IDLE_KEEP = 10.0


class UdpTcpTransport(Transport):
    """UDP + TCP on one port; see the module docstring."""

    def __init__(
        self,
        bind: str = "127.0.0.1:0",
        *,
        max_packet: int = 1400,
        max_stream: int = 4 << 20,
        stream_read_timeout: float = 5.0,
        stream_idle_timeout: float = 60.0,
        max_connections: int = 256,
        bind_attempts: int = 8,
    ) -> None:
        super().__init__()
        self._bind_host, self._bind_port = parse_addr(bind)
        if max_packet < 1 or max_stream < 1 or max_connections < 1 or bind_attempts < 1:
            raise ValueError("max_packet, max_stream, max_connections, bind_attempts must be >= 1")
        self.addr = bind
        self.max_packet = max_packet
        self.max_stream = max_stream
        self.stream_read_timeout = stream_read_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.max_connections = max_connections
        self._bind_attempts = bind_attempts
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._started = False
        self._closed = False
        self._active = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client_writers: set[asyncio.StreamWriter] = set()
        # One idle request connection kept per peer (reused by the next request to it).
        self._idle: dict[
            str, tuple[asyncio.StreamReader, asyncio.StreamWriter, _Deadline, float]
        ] = {}
        self._sources: dict[tuple[Any, ...], str] = {}
        self._targets: dict[str, tuple[str, int]] = {}  # IP-literal addresses, parsed once
        self._dns: dict[str, tuple[float, tuple[str, int] | None]] = {}
        self._pending: dict[str, list[bytes]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self, on_packet: PacketHandler, on_stream: StreamHandler) -> None:
        if self._started:
            raise RuntimeError("transport already started")
        self._started = True
        self._on_packet, self._on_stream = on_packet, on_stream
        loop = asyncio.get_running_loop()
        host = await self._bind_ip(loop)
        attempts = self._bind_attempts if self._bind_port == 0 else 1
        last: OSError | None = None
        for _ in range(attempts):
            try:
                server = await asyncio.start_server(self._on_connection, host, self._bind_port)
            except OSError as exc:
                last = exc
                continue
            port = server.sockets[0].getsockname()[1]
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _DatagramProtocol(self), local_addr=(host, port)
                )
            except OSError as exc:
                last = exc
                server.close()
                await server.wait_closed()
                continue
            self._server, self._udp = server, udp
            self.addr = format_addr(host, port)
            return
        self._started = False
        detail = last.strerror if last is not None and last.strerror else last
        raise TransportError(f"cannot bind {format_addr(host, self._bind_port)}: {detail}")

    async def _bind_ip(self, loop: asyncio.AbstractEventLoop) -> str:
        # One concrete address: a name resolving to both 127.0.0.1 and ::1 would otherwise
        # get two listening sockets with two different free ports.
        try:
            ipaddress.ip_address(self._bind_host.split("%", 1)[0])
            return self._bind_host
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(self._bind_host, None, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise TransportError(f"cannot resolve bind host {self._bind_host!r}: {exc}") from None
        return str(infos[0][4][0])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        if self._server is not None:
            self._server.close()
        for writer in list(self._client_writers):
            writer.close()
        for _, _, deadline, _ in self._idle.values():
            deadline.close()
        self._idle.clear()
        self._pending.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _own(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ packets
    def send_packet(self, addr: str, data: bytes) -> None:
        stats = self._stats
        size = len(data)
        if size > self.max_packet:
            stats.oversized_dropped += 1
            return
        if self._udp is None or self._closed:
            stats.send_errors += 1
            return
        target = self._targets.get(addr)
        if target is None:
            target = self._target(addr, data)
            if target is None:
                return
        self._sendto(target, data)

    def _sendto(self, target: tuple[str, int], data: bytes) -> None:
        udp, stats = self._udp, self._stats
        if udp is None or self._closed:
            stats.send_errors += 1
            return
        # Every asyncio (and uvloop) datagram transport has it; typeshed only lacks it.
        if udp.get_write_buffer_size() > _UDP_BUFFER_LIMIT:  # type: ignore[attr-defined]
            stats.send_errors += 1  # the kernel is not keeping up: shed, never queue without bound
            return
        try:
            udp.sendto(data, target)
        except (OSError, ValueError, TypeError):
            stats.send_errors += 1
            return
        stats.packets_sent += 1
        stats.bytes_sent += len(data)

    def _target(self, addr: str, data: bytes) -> tuple[str, int] | None:
        """Where ``addr`` points, or None when the packet was dropped or queued for DNS."""
        try:
            host, port = parse_addr(addr)
        except ValueError:
            self._stats.send_errors += 1
            return None
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return self._via_dns(addr, host, port, data)
        if len(self._targets) >= _CACHE_LIMIT:
            self._targets.clear()
        self._targets[addr] = (host, port)
        return host, port

    def _via_dns(self, addr: str, host: str, port: int, data: bytes) -> tuple[str, int] | None:
        loop = asyncio.get_running_loop()
        cached = self._dns.get(addr)
        if cached is not None and cached[0] > loop.time():
            if cached[1] is None:
                self._stats.send_errors += 1
            return cached[1]
        pending = self._pending.get(addr)
        if pending is None:
            self._pending[addr] = [data]
            self._own(loop.create_task(self._resolve(addr, host, port)))
        elif len(pending) < _PENDING_PER_HOST:
            pending.append(data)
        else:
            self._stats.send_errors += 1
        return None

    async def _resolve(self, addr: str, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        target: tuple[str, int] | None = None
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            family = self._udp.get_extra_info("socket").family if self._udp else socket.AF_INET
            usable = [i for i in infos if i[0] == family] or infos
            target = (str(usable[0][4][0]), int(usable[0][4][1]))
        except OSError:
            target = None
        ttl = _DNS_TTL if target is not None else _DNS_NEGATIVE_TTL
        if len(self._dns) >= _CACHE_LIMIT:
            self._dns.clear()
        self._dns[addr] = (loop.time() + ttl, target)
        for data in self._pending.pop(addr, []):
            if target is None:
                self._stats.send_errors += 1
            else:
                self._sendto(target, data)

    def _on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > self.max_packet:
            self._stats.oversized_dropped += 1
            return
        src = self._sources.get(addr)
        if src is None:
            if len(self._sources) >= _CACHE_LIMIT:
                self._sources.clear()
            src = self._sources[addr] = format_addr(str(addr[0]), int(addr[1]))
        self._deliver_packet(src, data)

    # ------------------------------------------------------------------ streams: server side
    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback starting a task we own: the task asyncio would create for a
        # coroutine callback logs an error when close() cancels it.
        # Over the cap, the connection is closed here, before it costs a task.
        if self._closed or self._active >= self.max_connections:
            self._stats.stream_errors += 1
            writer.close()
            return
        self._active += 1
        self._own(asyncio.get_running_loop().create_task(self._connection(reader, writer)))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_connection(reader, writer)
        finally:
            self._active -= 1
            writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(task.get_loop(), task)
        try:
            await self._serve_requests(reader, writer, deadline)
        except asyncio.CancelledError:
            if not deadline.expired:
                raise  # the transport is closing
            # The deadline cancelled a read or a reply's drain: a timeout, not a shutdown.
            task.uncancel()
        finally:
            deadline.close()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: _Deadline
    ) -> None:
        stats = self._stats
        peer = writer.get_extra_info("peername")
        src = format_addr(str(peer[0]), int(peer[1])) if peer else "unknown:0"
        first = True
        read_timeout = self.stream_read_timeout
        while not self._closed:
            try:
                # A client may keep the connection for more requests (one at a time): it then
                # has ``stream_idle_timeout`` to start the next one. (One deadline per
                # connection, moved by a float assignment: a Raft pipe streams thousands of
                # frames a second, and two timeout contexts per frame cost more than the
                # frame's own handling. A read of data already buffered does not suspend.)
                deadline.start(read_timeout if first else self.stream_idle_timeout)
                header = await reader.readexactly(_LEN.size)
                (size,) = _LEN.unpack(header)
                one_way = bool(size & ONE_WAY_FLAG)
                size &= ~ONE_WAY_FLAG
                if size > self.max_stream:
                    stats.stream_errors += 1
                    stats.oversized_dropped += 1
                    return
                deadline.start(read_timeout)
                request = await reader.readexactly(size)
                deadline.stop()
            except asyncio.CancelledError:
                if first and deadline.expired:
                    stats.stream_errors += 1
                raise
            except (asyncio.IncompleteReadError, OSError):
                if first:
                    stats.stream_errors += 1
                return
            first = False
            stats.streams_accepted += 1
            stats.bytes_received += _LEN.size + size
            reply = await self._serve_stream(src, request)
            if reply is None:
                return
            if one_way:
                continue  # the client wants no answer and keeps sending
            if len(reply) > self.max_stream:
                stats.oversized_dropped += 1
                return
            try:
                writer.write(_LEN.pack(len(reply)) + reply)
                deadline.start(read_timeout)
                await writer.drain()
                deadline.stop()
            except asyncio.CancelledError:
                if deadline.expired:
                    stats.stream_errors += 1
                raise
            except OSError:
                stats.stream_errors += 1
                return
            stats.bytes_sent += _LEN.size + len(reply)

    # ------------------------------------------------------------------ streams: client side
    async def request(self, addr: str, data: bytes, *, timeout: float) -> bytes:
        stats = self._stats
        if self._closed:
            raise TransportError("transport is closed")
        if len(data) > self.max_stream:
            stats.oversized_dropped += 1
            raise TransportError(
                f"request of {len(data)} bytes exceeds max_stream {self.max_stream}"
            )
        if math.isnan(timeout):
            raise ValueError("timeout must be a number of seconds, not NaN")
        try:
            host, port = parse_addr(addr)
        except ValueError as exc:
            raise TransportError(str(exc)) from None
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("UdpTcpTransport.request must run in a task")
        writer: asyncio.StreamWriter | None = None
        pooled = self._take_idle(addr)
        if pooled is not None:
            reader, writer, deadline = pooled
        else:
            deadline = _Deadline(loop)
        deadline.bind(task)
        if timeout < math.inf:  # an infinite timeout waits as long as it takes
            deadline.start(max(timeout, 0.0))
        keep = False
        try:
            if writer is None:
                stats.streams_opened += 1
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError as exc:
                    raise ConnectFailed(
                        f"cannot connect to {addr}: {exc.strerror or exc}"
                    ) from None
                self._client_writers.add(writer)
            writer.write(_LEN.pack(len(data)) + data)
            await writer.drain()
            stats.bytes_sent += _LEN.size + len(data)
            (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
            if size > self.max_stream:
                stats.oversized_dropped += 1
                raise TransportError(f"{addr} sent a {size}-byte reply (max {self.max_stream})")
            reply = await reader.readexactly(size)
            stats.bytes_received += _LEN.size + size
            keep = True
            return reply
        except asyncio.CancelledError:
            if deadline.timed_out():
                stats.stream_errors += 1
                raise TimeoutError(f"{addr} did not answer within {timeout}s") from None
            raise
        except TransportError:
            stats.stream_errors += 1
            raise
        except asyncio.IncompleteReadError:
            stats.stream_errors += 1
            why = "transport closed" if self._closed else "closed the stream without a reply"
            raise TransportError(f"{addr}: {why}") from None
        except OSError as exc:
            stats.stream_errors += 1
            raise TransportError(f"{addr}: {exc.strerror or exc}") from None
        finally:
            deadline.stop()  # whatever ended the request: its deadline no longer applies
            if keep and not self._closed and writer is not None:
                self._put_idle(addr, reader, writer, deadline)
            else:
                deadline.close()
                if writer is not None:
                    self._client_writers.discard(writer)
                    writer.close()

    def _take_idle(
        self, addr: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _Deadline] | None:
        """A kept connection to ``addr`` that is still open and not too old, if any."""
        idle = self._idle.pop(addr, None)
        if idle is None:
            return None
        reader, writer, deadline, since = idle
        loop = asyncio.get_running_loop()
        # A peer that closed (it stopped, or restarted on the same address) has sent its FIN
        # by now: the reader is at EOF. Old connections may be near the server's idle timeout.
        if reader.at_eof() or writer.is_closing() or loop.time() - since > _IDLE_KEEP:
            self._client_writers.discard(writer)
            writer.close()
            deadline.close()
            return None
        self._stats.streams_reused += 1
        return reader, writer, deadline

    def _put_idle(
        self,
        addr: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deadline: _Deadline,
    ) -> None:
        old = self._idle.pop(addr, None)
        if old is not None:  # one kept connection per peer: the newest
            self._client_writers.discard(old[1])
            old[1].close()
            old[2].close()
        self._idle[addr] = (reader, writer, deadline, asyncio.get_running_loop().time())
