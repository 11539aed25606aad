"""The simulated network, in virtual time: timing, faults, streams, determinism; addresses."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable

import pytest

from agentcluster.testing import advance, run_virtual
from agentcluster.transport import (
    LinkConfig,
    MemoryTransport,
    SimNetwork,
    Transport,
    TransportError,
    format_addr,
    parse_addr,
)

pytestmark = pytest.mark.virtual_time

Log = list[tuple[float, str, bytes]]


async def node(net: SimNetwork, addr: str, reply: bool = True) -> tuple[MemoryTransport, Log]:
    """A started transport that logs packets (time, src, data) and echoes stream requests."""
    transport = net.transport(addr)
    log: Log = []
    loop = asyncio.get_running_loop()

    def on_packet(src: str, data: bytes) -> None:
        log.append((loop.time(), src, data))

    async def on_stream(src: str, data: bytes) -> bytes | None:
        return b"re:" + data if reply else None

    await transport.start(on_packet, on_stream)
    return transport, log


# ---------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:7946", ("127.0.0.1", 7946)),
        ("n1:0", ("n1", 0)),
        ("[::1]:7946", ("::1", 7946)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        ("example.com:65535", ("example.com", 65535)),
    ],
)
def test_parse_and_format_addr(text: str, parsed: tuple[str, int]) -> None:
    assert parse_addr(text) == parsed
    assert format_addr(*parsed) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("127.0.0.1", "expected 'host:port'"),
        (":7946", "empty host"),
        ("h:", "not a number"),
        ("h:x1", "not a number"),
        ("h:-1", "not a number"),
        ("h:65536", "out of range"),
        ("::1:7946", "brackets"),
        ("[::1:7946", "missing ']'"),
        ("[::1]7946", "expected ':port'"),
        ("[nope]:1", "not an IPv6 address"),
        ("h:٣", "not a number"),
    ],
)
def test_parse_addr_errors_are_clear(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_addr(text)


def test_link_config_validates() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkConfig(loss=1.5)
    with pytest.raises(ValueError, match="delay"):
        LinkConfig(delay=-1)
    with pytest.raises(AttributeError):
        LinkConfig().delay = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------- timing


async def test_delay_is_exact_in_virtual_time() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.01))
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    a.send_packet("b:1", b"one")
    await advance(0.005)
    a.send_packet("b:1", b"two")
    await advance(0.1)
    assert [(round(t - t0, 9), src, data) for t, src, data in log_b] == [
        (0.01, "a:1", b"one"),
        (0.015, "a:1", b"two"),
    ]
    assert isinstance(a, Transport)


async def test_jitter_follows_the_seeded_draws() -> None:
    seed, delay, jitter = 42, 0.02, 0.01
    net = SimNetwork(seed, default=LinkConfig(delay=delay, jitter=jitter))
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    t0 = asyncio.get_running_loop().time()
    for i in range(200):
        a.send_packet("b:1", i.to_bytes(2, "big"))
    await advance(1.0)
    draws = random.Random(seed)
    expected = sorted((delay + draws.random() * jitter, i) for i in range(200))
    got = [(t - t0, int.from_bytes(data, "big")) for t, _, data in log_b]
    assert [i for _, i in got] == [i for _, i in expected]
    assert [t for t, _ in got] == pytest.approx([t for t, _ in expected], abs=1e-9)
    assert min(t for t, _ in got) >= delay and max(t for t, _ in got) <= delay + jitter


async def test_fifo_without_reordering_even_at_equal_times() -> None:
    net = SimNetwork(3)
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    for i in range(500):
        a.send_packet("b:1", i.to_bytes(2, "big"))
    await advance(0.01)
    assert [int.from_bytes(d, "big") for _, _, d in log_b] == list(range(500))


async def test_per_link_config_overrides_the_default() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.001))
    a, log_a = await node(net, "a:1")
    b, log_b = await node(net, "b:1")
    net.set_link("a:1", "b:1", LinkConfig(delay=0.5))
    assert net.link("a:1", "b:1").delay == 0.5 and net.link("b:1", "a:1").delay == 0.001
    t0 = asyncio.get_running_loop().time()
    a.send_packet("b:1", b"slow")
    b.send_packet("a:1", b"fast")
    await advance(1.0)
    assert log_a[0][0] - t0 == pytest.approx(0.001)
    assert log_b[0][0] - t0 == pytest.approx(0.5)
    net.set_link("a:1", "b:1", None)
    net.set_default(LinkConfig(delay=0.2))
    assert net.link("a:1", "b:1").delay == 0.2


# ---------------------------------------------------------------------------- loss, dup, reorder


async def test_loss_rate_within_tolerance() -> None:
    net = SimNetwork(7, default=LinkConfig(loss=0.2))
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    for _ in range(10_000):
        a.send_packet("b:1", b"x")
    await advance(0.01)
    stats = net.stats()
    assert 0.18 <= 1 - len(log_b) / 10_000 <= 0.22
    assert stats.dropped_loss == 10_000 - len(log_b) and stats.delivered == len(log_b)
    assert stats.sent == 10_000


async def test_duplication() -> None:
    net = SimNetwork(7, default=LinkConfig(duplicate=0.3))
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    for i in range(2_000):
        a.send_packet("b:1", i.to_bytes(2, "big"))
    await advance(0.01)
    dups = net.stats().duplicated
    assert 500 <= dups <= 700 and len(log_b) == 2_000 + dups
    assert {int.from_bytes(d, "big") for _, _, d in log_b} == set(range(2_000))


async def test_reordering_happens_only_when_configured() -> None:
    net = SimNetwork(5, default=LinkConfig(delay=0.01, reorder=0.2))
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    for i in range(1_000):
        a.send_packet("b:1", i.to_bytes(2, "big"))
        await advance(0.001)
    await advance(1.0)
    order = [int.from_bytes(d, "big") for _, _, d in log_b]
    assert sorted(order) == list(range(1_000)) and order != list(range(1_000))
    inversions = sum(1 for x, y in itertools.pairwise(order) if x > y)
    assert inversions > 50
    assert 150 <= net.stats().reordered <= 250
    latencies = [t - int.from_bytes(d, "big") * 0.001 for t, _, d in log_b]
    assert min(latencies) == pytest.approx(0.01) and max(latencies) <= 0.01 + 5 * 0.01 + 1e-6
    assert max(latencies) > 0.03


# ---------------------------------------------------------------------------- partitions


async def test_partition_one_way_and_heal() -> None:
    net = SimNetwork(1)
    a, log_a = await node(net, "a:1")
    b, log_b = await node(net, "b:1")
    c, log_c = await node(net, "c:1")

    async def exchange() -> set[tuple[str, str]]:
        for log in (log_a, log_b, log_c):
            log.clear()
        for src in (a, b, c):
            for dst in ("a:1", "b:1", "c:1"):
                if dst != src.addr:
                    src.send_packet(dst, b"hi")
        await advance(0.01)
        return {(s, d) for d, log in (("a", log_a), ("b", log_b), ("c", log_c)) for _, s, _ in log}

    every = {("a:1", "b"), ("a:1", "c"), ("b:1", "a"), ("b:1", "c"), ("c:1", "a"), ("c:1", "b")}
    assert await exchange() == every
    net.partition(["a:1"], ["b:1", "c:1"])
    assert await exchange() == {("b:1", "c"), ("c:1", "b")}
    assert net.stats().dropped_partition == 4
    net.heal()
    assert await exchange() == every
    net.drop_one_way("a:1", ["b:1"])  # a bare string is one address
    assert net.blocked("a:1", "b:1") and not net.blocked("b:1", "a:1")
    assert await exchange() == every - {("a:1", "b")}
    net.heal()
    assert await exchange() == every


async def test_packets_already_in_flight_cross_a_new_partition() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.1))
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    a.send_packet("b:1", b"before")
    await advance(0.05)
    net.partition(["a:1"], ["b:1"])
    a.send_packet("b:1", b"during")
    await advance(0.5)
    assert [d for _, _, d in log_b] == [b"before"]


# ---------------------------------------------------------------------------- crash, restart, stall


async def test_crash_and_restart() -> None:
    net = SimNetwork(1)
    a, log_a = await node(net, "a:1")
    b, log_b = await node(net, "b:1")
    loop = asyncio.get_running_loop()
    net.crash("b:1")
    assert net.crashed("b:1") and b.crashed
    a.send_packet("b:1", b"lost")
    b.send_packet("a:1", b"never sent")
    t0 = loop.time()
    with pytest.raises(TransportError, match="refused"):
        await a.request("b:1", b"q", timeout=5)
    with pytest.raises(TransportError):
        await b.request("a:1", b"q", timeout=5)
    assert loop.time() == t0, "refusal is immediate"
    await advance(0.01)
    assert log_a == [] and log_b == []
    stats = net.stats()
    assert stats.dropped_unreachable == 1 and stats.dropped_crashed == 1
    with pytest.raises(ValueError, match="no transport"):
        net.crash("zz:1")
    net.restart("b:1")
    a.send_packet("b:1", b"back")
    await advance(0.01)
    assert [d for _, _, d in log_b] == [b"back"]
    assert await a.request("b:1", b"q", timeout=1) == b"re:q"


async def test_recreate_after_crash_and_duplicate_address() -> None:
    net = SimNetwork(1)
    a, _ = await node(net, "a:1")
    old, _ = await node(net, "b:1")
    with pytest.raises(ValueError, match="already in use"):
        net.transport("b:1")
    with pytest.raises(ValueError, match="expected 'host:port'"):
        net.transport("nohost")
    net.crash("b:1")
    new, log_new = await node(net, "b:1")
    assert net.addresses() == ["a:1", "b:1"]
    a.send_packet("b:1", b"to the new one")
    old.send_packet("a:1", b"from a ghost")
    await advance(0.01)
    assert [d for _, _, d in log_new] == [b"to the new one"]
    await old.close()  # the replaced transport's close must not detach its successor
    assert await a.request("b:1", b"q", timeout=1) == b"re:q"
    await new.close()
    assert net.addresses() == ["a:1"]


async def test_crash_resets_streams_in_flight_and_fails_own_requests() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.01))
    a, _ = await node(net, "a:1")
    b = net.transport("b:1")
    entered = asyncio.Event()

    async def slow(src: str, data: bytes) -> bytes:
        entered.set()
        await asyncio.sleep(10)  # a handler that is slow on purpose (noqa: sleep)
        return b"late"

    await b.start(lambda s, d: None, slow)
    t0 = asyncio.get_running_loop().time()
    req = asyncio.create_task(a.request("b:1", b"q", timeout=5))
    await entered.wait()
    net.crash("b:1")
    with pytest.raises(TransportError, match="reset"):
        await req
    assert asyncio.get_running_loop().time() - t0 == pytest.approx(0.02)
    # A crashed requester's own pending request fails too.
    net.restart("b:1")
    blocked = asyncio.create_task(a.request("b:1", b"q", timeout=5))
    await advance(0.001)
    net.crash("a:1")
    with pytest.raises(TransportError, match="crashed"):
        await blocked
    assert a.stats().stream_errors == 2
    await b.close()


async def test_stall_holds_and_releases_in_order() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.01))
    a, _ = await node(net, "a:1")
    b, log_b = await node(net, "b:1")
    _, log_a = await node(net, "c:1")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    net.stall("b:1", 1.0)
    net.stall("b:1", 0.5)  # shorter: no effect
    for i in range(5):
        a.send_packet("b:1", bytes([i]))
        await advance(0.1)
    reply = asyncio.create_task(a.request("b:1", b"q", timeout=3))
    b.send_packet("c:1", b"out")  # a stalled node's sends are not held by the network
    await advance(0.4)
    assert log_b == [] and len(log_a) == 1
    await advance(0.1)
    assert [d for _, _, d in log_b] == [bytes([i]) for i in range(5)]
    assert all(t == pytest.approx(t0 + 1.0) for t, _, _ in log_b)
    assert await reply == b"re:q"
    assert loop.time() == pytest.approx(t0 + 1.01)
    assert net.stats().held == 6
    # A request that gives up before the stall ends times out.
    net.stall("b:1", 2.0)
    with pytest.raises(TimeoutError):
        await a.request("b:1", b"q", timeout=0.5)
    net.unstall("b:1")
    a.send_packet("b:1", b"after")
    await advance(0.05)
    assert log_b[-1][2] == b"after"


async def test_stall_extends_and_crash_drops_held() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.01))
    a, _ = await node(net, "a:1")
    _, log_b = await node(net, "b:1")
    net.stall("b:1", 0.5)
    await advance(0.2)
    net.stall("b:1", 1.0)  # now until t=1.2
    a.send_packet("b:1", b"x")
    await advance(0.5)
    assert log_b == []
    await advance(0.6)
    assert len(log_b) == 1
    net.stall("b:1", 1.0)
    a.send_packet("b:1", b"y")
    await advance(0.1)
    net.crash("b:1")
    net.restart("b:1")
    await advance(2.0)
    assert [d for _, _, d in log_b] == [b"x"]


# ---------------------------------------------------------------------------- streams


async def test_stream_round_trip_takes_two_link_delays() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.01, loss=1.0))  # loss never hits streams
    a, _ = await node(net, "a:1")
    b, _ = await node(net, "b:1")
    net.set_link("b:1", "a:1", LinkConfig(delay=0.03))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await a.request("b:1", b"hello", timeout=1) == b"re:hello"
    assert loop.time() - t0 == pytest.approx(0.04)
    sa, sb = a.stats(), b.stats()
    assert (sa.streams_opened, sb.streams_accepted) == (1, 1)
    assert (sa.bytes_sent, sa.bytes_received) == (5, 8)
    assert (sb.bytes_received, sb.bytes_sent) == (5, 8)


async def test_stream_failures() -> None:
    net = SimNetwork(1)
    a, _ = await node(net, "a:1")
    await node(net, "silent:1", reply=False)
    bad = net.transport("bad:1")

    async def broken(src: str, data: bytes) -> bytes:
        raise RuntimeError("handler bug")

    await bad.start(lambda s, d: None, broken)
    loop = asyncio.get_running_loop()
    with pytest.raises(TransportError, match="without a reply"):
        await a.request("silent:1", b"q", timeout=1)
    with pytest.raises(TransportError, match="without a reply"):
        await a.request("bad:1", b"q", timeout=1)
    assert bad.stats().handler_errors == 1
    with pytest.raises(TransportError, match="refused"):
        await a.request("nobody:1", b"q", timeout=1)
    net.partition(["a:1"], ["silent:1"])
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await a.request("silent:1", b"q", timeout=2.5)
    assert loop.time() - t0 == pytest.approx(2.5)
    with pytest.raises(TransportError, match="max_stream"):
        await a.request("bad:1", b"x" * ((4 << 20) + 1), timeout=1)
    assert a.stats().stream_errors == 4 and a.stats().oversized_dropped == 1


async def test_reply_path_partition_times_out() -> None:
    net = SimNetwork(1)
    a, _ = await node(net, "a:1")
    b, _ = await node(net, "b:1")
    net.drop_one_way(["b:1"], ["a:1"])
    with pytest.raises(TimeoutError):
        await a.request("b:1", b"q", timeout=1)
    assert b.stats().streams_accepted == 1


async def test_handler_errors_and_oversized_packets_are_counted() -> None:
    net = SimNetwork(1)
    a = net.transport("a:1")
    b = net.transport("b:1", max_packet=100)

    def explode(src: str, data: bytes) -> None:
        raise ValueError("boom")

    async def no_stream(src: str, data: bytes) -> None:
        return None

    await a.start(explode, no_stream)
    await b.start(explode, no_stream)
    b.send_packet("a:1", b"x" * 101)
    b.send_packet("a:1", b"x" * 100)
    b.send_packet("a:1", b"x")
    await advance(0.01)
    sa, sb = a.stats(), b.stats()
    assert sb.oversized_dropped == 1 and sb.packets_sent == 2 and sb.bytes_sent == 101
    assert sa.packets_received == 2 and sa.handler_errors == 2 and sa.bytes_received == 101
    assert sa.as_dict()["handler_errors"] == 2


async def test_unstarted_transport_receives_nothing() -> None:
    net = SimNetwork(1)
    a, _ = await node(net, "a:1")
    net.transport("b:1")
    a.send_packet("b:1", b"x")
    await advance(0.01)
    assert net.stats().dropped_unreachable == 1
    with pytest.raises(TransportError, match="refused"):
        await a.request("b:1", b"q", timeout=1)


async def test_zero_delay_events_yield_to_the_loop() -> None:
    net = SimNetwork(1, default=LinkConfig(delay=0.0))
    a = net.transport("a:1")
    b = net.transport("b:1")
    bounces: list[int] = []
    interleaved: list[int] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def bounce(me: MemoryTransport, peer: str) -> Callable[[str, bytes], None]:
        def on_packet(src: str, data: bytes) -> None:
            bounces.append(len(bounces))
            if len(bounces) < 5_000:  # deep enough to overflow the stack if it recursed
                loop.call_soon(interleaved.append, len(bounces))
                me.send_packet(peer, data)
            else:
                done.set()

        return on_packet

    async def none(src: str, data: bytes) -> None:
        return None

    await a.start(bounce(a, "b:1"), none)
    await b.start(bounce(b, "a:1"), none)
    a.send_packet("b:1", b"ball")
    await done.wait()
    assert len(interleaved) >= 4_990  # other callbacks ran between bounces
    assert loop.time() == 0.0


async def test_close_fails_pending_requests_and_leaves_no_tasks() -> None:
    net = SimNetwork(1)
    a, _ = await node(net, "a:1")
    b = net.transport("b:1")
    entered = asyncio.Event()

    async def hang(src: str, data: bytes) -> bytes:
        entered.set()
        await asyncio.Event().wait()
        return b""

    await b.start(lambda s, d: None, hang)
    waiting = asyncio.create_task(a.request("b:1", b"q", timeout=60))
    await entered.wait()
    await a.close()
    with pytest.raises(TransportError, match="closed"):
        await waiting
    await b.close()
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(TransportError):
        await a.request("b:1", b"q", timeout=1)
    a.send_packet("b:1", b"x")
    assert net.addresses() == []
    await a.close()  # idempotent


# ---------------------------------------------------------------------------- determinism


def _simulate(seed: int) -> list[tuple[float, str, str, bytes]]:
    """Ten nodes gossiping at random over a lossy, jittery, duplicating, reordering network."""

    async def main() -> list[tuple[float, str, str, bytes]]:
        config = LinkConfig(delay=0.002, jitter=0.003, loss=0.1, duplicate=0.05, reorder=0.1)
        net = SimNetwork(seed, default=config)
        loop = asyncio.get_running_loop()
        addrs = [f"10.0.0.{i}:7946" for i in range(10)]
        log: list[tuple[float, str, str, bytes]] = []
        rng = random.Random(seed + 1000)
        transports: dict[str, MemoryTransport] = {}

        def handler(me: str) -> Callable[[str, bytes], None]:
            def on_packet(src: str, data: bytes) -> None:
                log.append((loop.time(), src, me, data))
                hops = data[0]
                if hops < 4:
                    transports[me].send_packet(rng.choice(addrs), bytes([hops + 1]) + data[1:])

            return on_packet

        async def on_stream(src: str, data: bytes) -> bytes:
            return data[::-1]

        for addr in addrs:
            transports[addr] = net.transport(addr)
            await transports[addr].start(handler(addr), on_stream)
        net.partition(addrs[:3], addrs[7:])
        for round_ in range(30):
            for addr in addrs:
                transports[addr].send_packet(rng.choice(addrs), bytes([0, round_]))
            reply = await transports[addrs[4]].request(
                rng.choice(addrs), bytes([round_]), timeout=1
            )
            log.append((loop.time(), "reply", addrs[4], reply))
            if round_ == 15:
                net.heal()
            await advance(0.01)
        await advance(1.0)
        for t in transports.values():
            await t.close()
        return log

    return run_virtual(main)


def test_same_seed_same_delivery_log_different_seed_differs() -> None:
    first, second, other = _simulate(11), _simulate(11), _simulate(12)
    assert len(first) > 500
    assert first == second
    assert first != other
