"""The UDP + TCP transport on 127.0.0.1: packets, streams, limits, hostile peers, clean close."""

from __future__ import annotations

import asyncio
import errno
import math
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from agentcluster.testing import wait_until
from agentcluster.transport import TransportError, UdpTcpTransport, parse_addr

Received = list[tuple[str, bytes]]
StreamFn = Callable[[str, bytes], Awaitable[bytes | None]]


async def echo(src: str, data: bytes) -> bytes | None:
    return b"re:" + data


@asynccontextmanager
async def running(
    stream: StreamFn = echo, **kw: Any
) -> AsyncIterator[tuple[UdpTcpTransport, Received]]:
    transport = UdpTcpTransport("127.0.0.1:0", **kw)
    got: Received = []
    await transport.start(lambda src, data: got.append((src, data)), stream)
    try:
        yield transport, got
    finally:
        await transport.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def raw_exchange(addr: str, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes to the TCP side and read whatever comes back until EOF."""
    host, port = parse_addr(addr)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


# ---------------------------------------------------------------------------- binding


async def test_binds_udp_and_tcp_on_the_same_free_port() -> None:
    async with running() as (t, _):
        host, port = parse_addr(t.addr)
        assert host == "127.0.0.1" and port > 0
        # Both protocols hold the port: binding either again fails.
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s, pytest.raises(OSError):
                s.bind(("127.0.0.1", port))


async def test_retries_when_the_udp_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    real = loop.create_datagram_endpoint
    calls: list[Any] = []

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("local_addr"))
        if len(calls) == 1:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "create_datagram_endpoint", flaky)
    async with running() as (t, _):
        assert len(calls) == 2 and calls[1][1] == parse_addr(t.addr)[1]


async def test_fixed_port_in_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        t = UdpTcpTransport(f"127.0.0.1:{port}")
        with pytest.raises(TransportError, match=f"cannot bind 127.0.0.1:{port}"):
            await t.start(lambda s, d: None, echo)
        await t.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_bind_by_host_name() -> None:
    t = UdpTcpTransport("localhost:0")
    await t.start(lambda s, d: None, echo)
    try:
        host, port = parse_addr(t.addr)
        assert host in ("127.0.0.1", "::1") and port > 0
        async with running() as (other, _):
            assert await other.request(t.addr, b"x", timeout=2) == b"re:x"
    finally:
        await t.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
async def test_ipv6_loopback() -> None:
    got: Received = []
    a, b = UdpTcpTransport("[::1]:0"), UdpTcpTransport("[::1]:0")
    await a.start(lambda src, data: got.append((src, data)), echo)
    await b.start(lambda src, data: None, echo)
    try:
        assert a.addr.startswith("[::1]:")
        b.send_packet(a.addr, b"v6")
        await wait_until(lambda: got == [(b.addr, b"v6")], timeout=5)
        assert await b.request(a.addr, b"q", timeout=2) == b"re:q"
    finally:
        await a.close()
        await b.close()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="expected 'host:port'"):
        UdpTcpTransport("nope")
    with pytest.raises(ValueError, match=">= 1"):
        UdpTcpTransport(max_packet=0)


# ---------------------------------------------------------------------------- packets


async def test_packets_both_ways() -> None:
    async with running() as (a, got_a), running() as (b, got_b):
        a.send_packet(b.addr, b"ping")
        b.send_packet(a.addr, b"pong")
        await wait_until(lambda: bool(got_a and got_b), timeout=5)
        assert got_b == [(a.addr, b"ping")] and got_a == [(b.addr, b"pong")]
        for i in range(50):
            a.send_packet(b.addr, i.to_bytes(2, "big"))
        await wait_until(lambda: len(got_b) == 51, timeout=5)
        sa, sb = a.stats(), b.stats()
        assert sa.packets_sent == 51 and sb.packets_received == 51
        assert sa.bytes_sent == sb.bytes_received == 4 + 100


async def test_packets_to_a_host_name_are_resolved_in_the_background() -> None:
    async with running() as (a, _), running() as (b, got_b):
        port = parse_addr(b.addr)[1]
        for i in range(3):
            a.send_packet(f"localhost:{port}", bytes([i]))
        await wait_until(lambda: len(got_b) == 3, timeout=5)
        assert [d for _, d in got_b] == [b"\x00", b"\x01", b"\x02"]
        a.send_packet(f"localhost:{port}", b"cached")
        await wait_until(lambda: len(got_b) == 4, timeout=5)
        a.send_packet("no-such-host.invalid:1", b"x")
        await wait_until(lambda: a.stats().send_errors == 1, timeout=10)


async def test_oversized_packets_are_dropped_on_both_sides() -> None:
    async with running(max_packet=4000) as (a, _), running() as (b, got_b):
        a.send_packet(b.addr, b"x" * 4001)
        assert a.stats().oversized_dropped == 1 and a.stats().packets_sent == 0
        a.send_packet(b.addr, b"x" * 3000)  # fine for a, too big for b
        a.send_packet(b.addr, b"x" * 1400)
        await wait_until(lambda: b.stats().oversized_dropped == 1 and len(got_b) == 1, timeout=5)
        assert len(got_b[0][1]) == 1400
        b.send_packet(a.addr, b"x" * 1401)
        assert b.stats().oversized_dropped == 2


async def test_packet_handler_errors_are_counted() -> None:
    def explode(src: str, data: bytes) -> None:
        raise RuntimeError("handler bug")

    b = UdpTcpTransport()
    await b.start(explode, echo)
    try:
        async with running() as (a, _):
            a.send_packet(b.addr, b"1")
            a.send_packet(b.addr, b"2")
            await wait_until(lambda: b.stats().handler_errors == 2, timeout=5)
            assert await a.request(b.addr, b"still alive", timeout=2) == b"re:still alive"
    finally:
        await b.close()


async def test_bad_addresses_and_closed_transport_count_send_errors() -> None:
    async with running() as (a, _):
        a.send_packet("not an address", b"x")
        a.send_packet("[::1]:1", b"x")  # IPv6 target from an IPv4 socket
        await wait_until(lambda: a.stats().send_errors == 2, timeout=5)
    a.send_packet("127.0.0.1:1", b"x")
    assert a.stats().send_errors == 3
    with pytest.raises(TransportError, match="closed"):
        await a.request("127.0.0.1:1", b"x", timeout=1)


# ---------------------------------------------------------------------------- streams


async def test_stream_request_reply_and_concurrency() -> None:
    async def slow_echo(src: str, data: bytes) -> bytes:
        await asyncio.sleep(0.01)  # a handler that takes a moment, on purpose (noqa: sleep)
        return data[::-1]

    async with running(slow_echo) as (b, _), running() as (a, _):
        assert await a.request(b.addr, b"abc", timeout=2) == b"cba"
        assert await a.request(b.addr, b"", timeout=2) == b""
        big = bytes(range(256)) * 4096  # 1 MiB
        assert await a.request(b.addr, big, timeout=5) == big[::-1]
        replies = await asyncio.gather(
            *(a.request(b.addr, str(i).encode(), timeout=5) for i in range(50))
        )
        assert replies == [str(i).encode()[::-1] for i in range(50)]
        sa, sb = a.stats(), b.stats()
        # Sequential requests reuse the kept connection; concurrent ones need their own.
        assert sa.streams_opened + sa.streams_reused == 53 and sb.streams_accepted == 53
        assert sa.streams_reused >= 2
        assert sa.stream_errors == 0 and sb.stream_errors == 0


async def test_a_kept_connection_the_server_closed_is_not_reused() -> None:
    async with running(stream_idle_timeout=0.05) as (b, _), running() as (a, _):
        assert await a.request(b.addr, b"one", timeout=2) == b"re:one"
        assert await a.request(b.addr, b"two", timeout=2) == b"re:two"
        assert a.stats().streams_reused == 1
        # The server drops the idle connection; the client notices the EOF and reconnects.
        kept = a._idle[b.addr][0]
        await wait_until(kept.at_eof, timeout=5)
        assert await a.request(b.addr, b"three", timeout=2) == b"re:three"
        stats = a.stats()
        assert stats.streams_opened == 2 and stats.streams_reused == 1
        assert stats.stream_errors == 0


def stuck_until(release: asyncio.Event) -> StreamFn:
    """A stream handler that answers only once ``release`` is set."""

    async def stuck(src: str, data: bytes) -> bytes:
        await release.wait()
        return b"late"

    return stuck


async def test_stream_timeout() -> None:
    release = asyncio.Event()
    async with running(stuck_until(release)) as (b, _), running() as (a, _):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await a.request(b.addr, b"q", timeout=0.2)
        assert 0.15 < time.monotonic() - started < 2
        assert a.stats().stream_errors == 1


async def test_a_kept_connections_deadline_follows_each_request() -> None:
    """Requests share a kept connection and its one timer: a short timeout after a long one
    still fires on time, a finished request's deadline never cancels its task later, and a
    timed-out connection is not reused."""
    hold = asyncio.Event()

    async def maybe_stuck(src: str, data: bytes) -> bytes:
        if data == b"stuck":
            await hold.wait()
        return b"re:" + data

    async with running(maybe_stuck) as (b, _), running() as (a, _):
        assert await a.request(b.addr, b"one", timeout=30) == b"re:one"
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"did not answer within 0\.2s"):
            await a.request(b.addr, b"stuck", timeout=0.2)
        assert 0.15 < time.monotonic() - started < 2
        stats = a.stats()
        assert stats.streams_reused == 1 and stats.stream_errors == 1
        assert b.addr not in a._idle  # the timed-out connection was closed
        hold.set()
        # A request that finished well inside its deadline: the task lives on past it (the
        # kept connection's timer is still armed for it, and its firing must cancel nothing).
        assert await a.request(b.addr, b"two", timeout=0.1) == b"re:two"
        timer = a._idle[b.addr][2]._timer
        assert timer._handle is not None
        await wait_until(lambda: timer._handle is None, timeout=5)  # it fired, idle
        assert await a.request(b.addr, b"three", timeout=5) == b"re:three"
        # A deadline already passed: no reply is awaited.
        hold.clear()
        with pytest.raises(TimeoutError):
            await a.request(b.addr, b"stuck", timeout=0)
        hold.set()
        assert await a.request(b.addr, b"four", timeout=5) == b"re:four"
        with pytest.raises(ValueError, match="NaN"):
            await a.request(b.addr, b"x", timeout=math.nan)
        assert b.addr in a._idle  # the kept connection was not taken for a refused request


async def test_a_cancelled_request_stays_cancelled() -> None:
    """Cancelling the caller is a cancellation, not a timeout."""
    hold = asyncio.Event()
    async with running(stuck_until(hold)) as (b, _), running() as (a, _):
        call = asyncio.ensure_future(a.request(b.addr, b"q", timeout=30))
        await wait_until(lambda: b.stats().streams_accepted == 1, timeout=5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert a.stats().stream_errors == 0
        hold.set()


async def test_refused_connection_fails_fast() -> None:
    async with running() as (a, _):
        started = time.monotonic()
        with pytest.raises(TransportError, match="cannot connect"):
            await a.request(f"127.0.0.1:{free_port()}", b"q", timeout=5)
        assert time.monotonic() - started < 1
        with pytest.raises(TransportError, match="expected 'host:port'"):
            await a.request("bogus", b"q", timeout=1)


async def test_no_reply_and_failing_handler_close_the_stream() -> None:
    async def picky(src: str, data: bytes) -> bytes | None:
        if data == b"boom":
            raise RuntimeError("handler bug")
        if data == b"wrong type":
            return "not bytes"  # type: ignore[return-value]
        return None

    async with running(picky) as (b, _), running() as (a, _):
        for request in (b"nothing", b"boom", b"wrong type"):
            with pytest.raises(TransportError, match="without a reply"):
                await a.request(b.addr, request, timeout=2)
        assert b.stats().handler_errors == 2
        assert a.stats().stream_errors == 3


async def test_stream_size_limits() -> None:
    async def huge(src: str, data: bytes) -> bytes:
        return b"x" * 2000

    async with running(huge, max_stream=1000) as (b, _), running(max_stream=1000) as (a, _):
        with pytest.raises(TransportError, match="exceeds max_stream"):
            await a.request(b.addr, b"x" * 1001, timeout=2)
        # b refuses to send a reply above its own limit, so a sees no reply.
        with pytest.raises(TransportError, match="without a reply"):
            await a.request(b.addr, b"x", timeout=2)
        assert b.stats().oversized_dropped == 1
    async with running(huge) as (b, _), running(max_stream=1000) as (a, _):
        with pytest.raises(TransportError, match="2000-byte reply"):
            await a.request(b.addr, b"x", timeout=2)


# ---------------------------------------------------------------------------- hostile peers


async def test_garbage_on_the_tcp_port_never_crashes_the_server() -> None:
    async with running(stream_read_timeout=0.3, max_stream=1 << 16) as (b, _):
        cases = [
            b"",  # connect and close
            b"\x00\x00",  # truncated length prefix
            struct.pack("!I", 100) + b"only ten b",  # truncated body
            struct.pack("!I", 0xFFFFFFFF),  # huge length
            struct.pack("!I", (1 << 16) + 1) + b"x" * 100,  # just above max_stream
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # a confused HTTP client
            bytes(range(256)) * 10,
        ]
        for payload in cases:
            assert await raw_exchange(b.addr, payload) == b""
        # A slow client is cut after the read timeout.
        started = time.monotonic()
        assert await raw_exchange(b.addr, struct.pack("!I", 10) + b"abc", half_close=False) == b""
        assert 0.25 < time.monotonic() - started < 3
        assert b.stats().stream_errors == len(cases) + 1
        assert b.stats().streams_accepted == 0
        # A well-formed raw request gets a well-formed reply; the server is still fine.
        reply = await raw_exchange(b.addr, struct.pack("!I", 2) + b"hi")
        assert reply == struct.pack("!I", 5) + b"re:hi"
        async with running() as (a, _):
            assert await a.request(b.addr, b"ok", timeout=2) == b"re:ok"


async def test_connection_cap() -> None:
    async with running(max_connections=2, stream_read_timeout=0.5) as (b, _), running() as (a, _):
        host, port = parse_addr(b.addr)
        idle = [await asyncio.open_connection(host, port) for _ in range(2)]
        await wait_until(lambda: b._active == 2, timeout=5)
        with pytest.raises(TransportError):  # closed at once: EOF or reset, by timing
            await a.request(b.addr, b"q", timeout=2)
        assert b.stats().stream_errors == 1
        # The idle connections are cut by the read timeout, freeing their slots.
        await wait_until(lambda: b._active == 0, timeout=5)
        assert await a.request(b.addr, b"q", timeout=2) == b"re:q"
        for _, writer in idle:
            writer.close()


# ---------------------------------------------------------------------------- close


async def test_close_leaves_no_tasks_and_fails_pending_requests() -> None:
    entered = asyncio.Event()

    async def hang(src: str, data: bytes) -> bytes:
        entered.set()
        await asyncio.Event().wait()
        return b""

    a = UdpTcpTransport()
    b = UdpTcpTransport()
    await a.start(lambda s, d: None, echo)
    await b.start(lambda s, d: None, hang)
    pending = asyncio.create_task(a.request(b.addr, b"q", timeout=30))
    host, port = parse_addr(b.addr)
    idle = await asyncio.open_connection(host, port)
    await entered.wait()
    await a.close()
    with pytest.raises(TransportError, match="transport closed"):
        await pending
    await b.close()
    await b.close()  # idempotent
    idle[1].close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    # The port is free again.
    again = UdpTcpTransport(b.addr)
    await again.start(lambda s, d: None, echo)
    await again.close()
    with pytest.raises(RuntimeError, match="already started"):
        await a.start(lambda s, d: None, echo)


async def test_kept_connection_one_way_frames_then_request_reply() -> None:
    """A client may keep the connection: one-way frames (top bit of the length set) are
    handled in order and never answered; an ordinary request on the same connection is."""
    from agentcluster.transport.udp_tcp import ONE_WAY_FLAG

    seen: list[bytes] = []

    async def record(src: str, data: bytes) -> bytes:
        seen.append(data)
        return data.upper()

    async with running(record) as (b, _):
        host, port = parse_addr(b.addr)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for word in (b"one", b"two", b"three"):
                writer.write(struct.pack("!I", len(word) | ONE_WAY_FLAG) + word)
            writer.write(struct.pack("!I", 3) + b"ask")
            await writer.drain()
            async with asyncio.timeout(2):
                (size,) = struct.unpack("!I", await reader.readexactly(4))
                assert await reader.readexactly(size) == b"ASK"
            assert seen == [b"one", b"two", b"three", b"ask"]
            assert b.stats().streams_accepted == 4
        finally:
            writer.close()


async def test_read_deadlines_cut_slow_peers_but_never_a_slow_handler() -> None:
    """One deadline per connection (no timer per frame): a kept connection idle past
    ``stream_idle_timeout`` or a request stalled mid-frame past ``stream_read_timeout`` is
    closed, while a handler taking longer than either is answered, and many frames in a row
    each get the full timeouts."""

    async def slow(src: str, data: bytes) -> bytes:
        if data == b"slow":
            # The input under test: a handler slower than both read deadlines (real sockets,
            # so real time; nothing waits on an effect here).
            await asyncio.sleep(0.5)  # (noqa: sleep)
        return data

    async with running(slow, stream_read_timeout=0.2, stream_idle_timeout=0.3) as (b, _):
        host, port = parse_addr(b.addr)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for word in (b"slow", b"a", b"b", b"slow"):
                writer.write(struct.pack("!I", len(word)) + word)
                await writer.drain()
                async with asyncio.timeout(2):
                    (size,) = struct.unpack("!I", await reader.readexactly(4))
                    assert await reader.readexactly(size) == word
                # The input under test: idle for a while, but within the idle timeout.
                await asyncio.sleep(0.15)  # (noqa: sleep)
            writer.write(struct.pack("!I", 10) + b"abc")  # stalls mid-frame
            started = time.monotonic()
            async with asyncio.timeout(2):
                assert await reader.read() == b""  # closed by the server
            assert 0.15 < time.monotonic() - started < 1.5
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!I", 2) + b"hi")
            await writer.drain()
            async with asyncio.timeout(2):
                assert await reader.readexactly(6) == struct.pack("!I", 2) + b"hi"
                started = time.monotonic()
                assert await reader.read() == b""  # idle past the idle timeout
            assert 0.25 < time.monotonic() - started < 1.5
        finally:
            writer.close()
        assert b.stats().stream_errors == 0  # neither cut came before a first request
        assert await raw_exchange(b.addr, struct.pack("!I", 2) + b"ok") == (
            struct.pack("!I", 2) + b"ok"
        )
