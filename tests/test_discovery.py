"""Discovery strategies: addresses, merging, static seeds, DNS (local server), multicast, file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcluster.discovery import (
    AddressFile,
    Announce,
    Candidate,
    DiscoveryError,
    DnsA,
    DnsSrv,
    Multicast,
    StaticSeeds,
    Strategy,
    discover_all,
    format_addr,
    parse_addr,
)
from agentcluster.testing import advance, eventually, wait_until
from agentcluster.wire import Keyring, WireCodec

# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", 7946)),
        ("10.0.0.1:7000", ("10.0.0.1", 7000)),
        (" seed-1.internal:80 ", ("seed-1.internal", 80)),
        ("localhost", ("localhost", 7946)),
        ("node_a.example.", ("node_a.example.", 7946)),
        ("[::1]:7000", ("::1", 7000)),
        ("[fd00::5]", ("fd00::5", 7946)),
        ("fd00::5", ("fd00::5", 7946)),
        ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
    ],
)
def test_parse_addr_valid(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "host:",
        "host:0",
        "host:65536",
        "host:port",
        "host:-1",
        "[::1",
        "[::1]7000",
        "[not-v6]:7000",
        "[10.0.0.1]:7000",
        "fd00::zz",
        "300.1.1.1",
        "1.2.3:7000",
        "bad host:7000",
        "-leading.example",
        "a..b",
        "x" * 64 + ".example",
        "http://example.com",
    ],
)
def test_parse_addr_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_addr(text)


@given(st.text(max_size=60))
def test_parse_addr_only_raises_value_error(text: str) -> None:
    try:
        host, port = parse_addr(text)
    except ValueError:
        return
    assert 1 <= port <= 65535
    assert parse_addr(format_addr(host, port)) == (host, port)


def test_candidate_meta_is_not_identity() -> None:
    a = Candidate("10.0.0.1:1", "dns", {"target": "x"})
    b = Candidate("10.0.0.1:1", "dns", {"target": "y"})
    assert a == b and hash(a) == hash(b)
    assert sorted([Candidate("b:1", "s"), Candidate("a:1", "z"), Candidate("a:1", "b")]) == [
        Candidate("a:1", "b"),
        Candidate("a:1", "z"),
        Candidate("b:1", "s"),
    ]
    assert dict(Candidate("a:1", "s").meta) == {}


# -- discover_all ------------------------------------------------------------------------------


class Fixed(Strategy):
    def __init__(self, name: str, addrs: list[str], partial: str | None = None) -> None:
        self.name = name
        self.addrs = addrs
        self.partial = partial
        self.rounds = 0

    async def discover(self) -> list[Candidate]:
        self.rounds += 1
        if self.partial is not None:
            self.last_error = self.partial
        return [Candidate(a, self.name, {"by": self.name}) for a in self.addrs]


class Failing(Strategy):
    name = "failing"

    async def discover(self) -> list[Candidate]:
        raise RuntimeError("backend down")


class Hanging(Strategy):
    name = "hanging"

    def __init__(self) -> None:
        self.cancelled = False

    async def discover(self) -> list[Candidate]:
        try:
            await asyncio.sleep(3600)  # a strategy that hangs on purpose (noqa: sleep)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return []


@pytest.mark.virtual_time
async def test_discover_all_merges_and_reports() -> None:
    loop = asyncio.get_running_loop()
    hanging = Hanging()
    a = Fixed("a", ["10.0.0.2:1", "10.0.0.1:1"])
    b = Fixed("b", ["10.0.0.1:1", "10.0.0.3:1"], partial="one name did not resolve")
    start = loop.time()
    result = await discover_all([b, Failing(), hanging, a], timeout=2.0)
    # The hung strategy cost exactly its timeout, and was cancelled.
    assert loop.time() - start == pytest.approx(2.0)
    assert hanging.cancelled
    assert result.addrs == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
    assert result.found[0].sources == ("a", "b")
    assert result.found[0].meta["by"] == "a"
    assert result.found[2].sources == ("b",)
    assert dict(result.errors) == {
        "b": "one name did not resolve",
        "failing": "RuntimeError: backend down",
        "hanging": "timed out after 2 s",
    }
    assert dict(result.counts) == {"a": 2, "b": 2, "failing": 0, "hanging": 0}
    # Partial errors are per round: cleared when the strategy has none.
    b.partial = None
    again = await discover_all([a, b], timeout=1.0)
    assert dict(again.errors) == {}
    assert a.rounds == b.rounds == 2


async def test_discover_all_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unique"):
        await discover_all([Fixed("x", []), Fixed("x", [])], timeout=1.0)
    with pytest.raises(ValueError):
        await discover_all([], timeout=0.0)
    empty = await discover_all([], timeout=1.0)
    assert empty.found == () and dict(empty.errors) == {}


# -- static seeds ------------------------------------------------------------------------------


def test_static_validates_at_construction() -> None:
    with pytest.raises(ValueError):
        StaticSeeds(["10.0.0.1:7000", "not a host"])
    with pytest.raises(ValueError):
        StaticSeeds(["10.0.0.1"], default_port=0)
    with pytest.raises(TypeError):
        StaticSeeds("10.0.0.1")


async def test_static_literals_and_real_resolution() -> None:
    seeds = StaticSeeds(["10.0.0.1", "[::1]:7000", "localhost:7001"], default_port=7946)
    found = await seeds.discover()
    addrs = sorted(c.addr for c in found)
    assert "10.0.0.1:7946" in addrs and "[::1]:7000" in addrs
    assert "127.0.0.1:7001" in addrs  # via getaddrinfo (/etc/hosts)
    local = next(c for c in found if c.addr == "127.0.0.1:7001")
    assert local.source == "static" and local.meta["host"] == "localhost"
    assert seeds.last_error is None


async def test_static_re_resolves_every_round() -> None:
    answers = {"seed.internal": ["10.1.0.1"], "gone.internal": []}
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    seeds = StaticSeeds(["seed.internal", "10.0.0.9:1"], resolve=resolve)
    first = await discover_all([seeds], timeout=1.0)
    assert first.addrs == ["10.0.0.9:1", "10.1.0.1:7946"]
    answers["seed.internal"] = ["10.1.0.2", "10.1.0.3"]  # the seed moved
    second = await discover_all([seeds], timeout=1.0)
    assert second.addrs == ["10.0.0.9:1", "10.1.0.2:7946", "10.1.0.3:7946"]
    assert calls == ["seed.internal", "seed.internal"]
    # One name failing is a partial error; all failing is a failed round.
    partial = StaticSeeds(["seed.internal", "missing.internal"], resolve=resolve)
    r = await discover_all([partial], timeout=1.0)
    assert len(r.found) == 2 and "missing.internal" in r.errors["static"]
    dead = StaticSeeds(["missing.internal", "gone.internal"], resolve=resolve, label="dead")
    r = await discover_all([dead], timeout=1.0)
    assert r.found == () and "missing.internal" in r.errors["dead"]
    with pytest.raises(DiscoveryError):
        await dead.discover()


# -- DNS, against a tiny authoritative server on 127.0.0.1 --------------------------------------


class TinyDns(asyncio.DatagramProtocol):
    """Answers from ``zone`` ((name, type) -> rdata texts); NXDOMAIN for unknown names; never
    answers names in ``silent`` (to test timeouts)."""

    def __init__(self) -> None:
        self.zone: dict[tuple[str, str], list[str]] = {}
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport does not subclass DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not any(n == name for n, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif records := self.zone.get((name, rdtype)):
            response.answer.append(dns.rrset.from_text(name, 30, "IN", rdtype, *records))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@contextlib.asynccontextmanager
async def tiny_dns() -> AsyncIterator[tuple[TinyDns, dns.asyncresolver.Resolver]]:
    """A running TinyDns and a resolver that asks only it (no internet involved)."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(TinyDns, local_addr=("127.0.0.1", 0))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = transport.get_extra_info("sockname")[1]
    resolver.timeout = 0.5
    resolver.lifetime = 1.0
    try:
        yield server, resolver
    finally:
        transport.close()


async def test_dns_a_and_aaaa() -> None:
    async with tiny_dns() as (server, resolver):
        server.zone[("peers.test.", "A")] = ["127.0.0.11", "127.0.0.12"]
        server.zone[("peers.test.", "AAAA")] = ["fd00::11"]
        strategy = DnsA("peers.test.", 7946, resolver=resolver)
        result = await discover_all([strategy], timeout=2.0)
        assert result.addrs == ["127.0.0.11:7946", "127.0.0.12:7946", "[fd00::11]:7946"]
        assert result.found[0].sources == ("dns-a:peers.test.",)
        assert dict(result.errors) == {}
        # Every round asks again: a scaled service is seen at once.
        server.zone[("peers.test.", "A")] = ["127.0.0.13"]
        del server.zone[("peers.test.", "AAAA")]  # NoAnswer for AAAA is not an error
        result = await discover_all([strategy], timeout=2.0)
        assert result.addrs == ["127.0.0.13:7946"]
        assert dict(result.errors) == {}
        assert server.queries.count(("peers.test.", "A")) == 2
        only_v4 = DnsA("peers.test.", 1, resolver=resolver, rdtypes=["A"])
        assert [c.addr for c in await only_v4.discover()] == ["127.0.0.13:1"]


async def test_dns_srv_two_targets_different_ports() -> None:
    async with tiny_dns() as (server, resolver):
        name = "_agentcluster._udp.test."
        server.zone[(name, "SRV")] = [
            "10 60 7001 n1.test.",
            "10 40 7002 n2.test.",
            "20 0 7003 .",  # "no service" target: ignored
        ]
        server.zone[("n1.test.", "A")] = ["127.0.0.21"]
        server.zone[("n1.test.", "AAAA")] = ["fd00::21"]
        server.zone[("n2.test.", "A")] = ["127.0.0.22"]
        strategy = DnsSrv(name, resolver=resolver)
        found = await strategy.discover()
        assert sorted(c.addr for c in found) == [
            "127.0.0.21:7001",
            "127.0.0.22:7002",
            "[fd00::21]:7001",
        ]
        n2 = next(c for c in found if c.addr == "127.0.0.22:7002")
        assert dict(n2.meta) == {"target": "n2.test.", "priority": "10", "weight": "40"}
        assert strategy.last_error is None
        result = await discover_all([strategy], timeout=2.0)
        assert len(result.found) == 3 and dict(result.errors) == {}


async def test_dns_nxdomain_is_empty_not_fatal() -> None:
    async with tiny_dns() as (server, resolver):
        server.zone[("other.test.", "A")] = ["127.0.0.1"]
        a = DnsA("missing.test.", 7946, resolver=resolver)
        srv = DnsSrv("_x._udp.missing.test.", resolver=resolver)
        result = await discover_all([a, srv], timeout=2.0)
        assert result.found == ()
        assert "NXDOMAIN" in result.errors["dns-a:missing.test."]
        assert "NXDOMAIN" in result.errors["dns-srv:_x._udp.missing.test."]
        assert await a.discover() == []


async def test_dns_timeout() -> None:
    async with tiny_dns() as (server, resolver):
        server.zone[("slow.test.", "A")] = ["127.0.0.1"]
        server.silent.add("slow.test.")
        server.zone[("fast.test.", "A")] = ["127.0.0.31"]
        # The resolver's own lifetime (1 s) expires: reported, others unaffected.
        slow = DnsA("slow.test.", 7946, resolver=resolver)
        fast = DnsA("fast.test.", 7946, resolver=resolver)
        result = await discover_all([slow, fast], timeout=5.0)
        assert result.addrs == ["127.0.0.31:7946"]
        assert "timeout" in result.errors["dns-a:slow.test."].lower()
        # The round's timeout is shorter than the resolver's: discover_all cuts it off.
        resolver.lifetime = 30.0
        resolver.timeout = 30.0
        srv = DnsSrv("slow.test.", resolver=resolver)
        result = await discover_all([srv, fast], timeout=0.2)
        assert result.errors["dns-srv:slow.test."] == "timed out after 0.2 s"
        assert result.addrs == ["127.0.0.31:7946"]


def test_dns_validation() -> None:
    with pytest.raises(ValueError):
        DnsA("x.test.", 0)
    with pytest.raises(ValueError):
        DnsA("x.test.", 1, rdtypes=["MX"])
    with pytest.raises(ValueError):
        DnsSrv("x.test.", rdtypes=[])


# -- multicast on loopback ---------------------------------------------------------------------

GROUP = "239.255.86.76"


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loopback_multicast_works(port: int) -> bool:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind((GROUP, port))
        lo = socket.inet_aton("127.0.0.1")
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(GROUP) + lo)
        rx.settimeout(1.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, lo)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        tx.sendto(b"probe", (GROUP, port))
        return rx.recv(16) == b"probe"
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


@pytest.fixture(scope="module")
def multicast_port() -> Iterator[int]:
    """A port on which loopback multicast is known to work (enabled on `lo` if needed)."""
    port = _free_udp_port()
    if not _loopback_multicast_works(port):
        # Some kernels/containers need the MULTICAST flag on lo before they deliver to it.
        with contextlib.suppress(OSError):
            subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], check=False)
        if not _loopback_multicast_works(port):
            pytest.fail(
                "IPv4 multicast on the loopback interface does not work here: run as root "
                "`ip link set lo multicast on` (and check that no firewall drops 239.0.0.0/8)"
            )
    yield port


async def test_multicast_finds_authenticated_peers_only(multicast_port: int) -> None:
    keyring = Keyring.generate()

    def make(
        addr: str, ring: Keyring | None = keyring, cluster: str = "agentcluster", name: str = ""
    ) -> Multicast:
        return Multicast(
            port=multicast_port,
            interval=0.05,
            keyring=ring,
            announce_addr=addr,
            cluster=cluster,
            node_name=name or None,
        )

    a = make("127.0.0.1:7001", name="a")
    b = make("127.0.0.1:7002", name="b")
    stranger = make("127.0.0.1:7003", Keyring.generate())
    other_cluster = make("127.0.0.1:7004", cluster="another")
    plaintext = make("127.0.0.1:7005", None)
    nodes = [a, b, stranger, other_cluster, plaintext]
    try:
        for node in nodes:
            await node.start()

        async def addrs(node: Multicast) -> list[str]:
            return [c.addr for c in await node.discover()]

        found: list[str] = []

        async def a_sees_b() -> bool:
            found[:] = await addrs(a)
            return found == ["127.0.0.1:7002"]

        await _poll(a_sees_b)
        # Wait until a has heard every kind of intruder at least once.
        await wait_until(
            lambda: a.stats.dropped_auth >= 2 and a.stats.dropped_cluster >= 1, timeout=5.0
        )
        assert await addrs(a) == ["127.0.0.1:7002"]
        assert a.stats.own >= 1
        assert a.codec.drops.bad_mac >= 2
        meta = (await a.discover())[0].meta
        assert dict(meta) == {"name": "b", "cluster": "agentcluster"}
        # The stranger hears garbage only (wrong key), the plaintext node too.
        assert await addrs(stranger) == []
        assert await addrs(plaintext) == []
        # Through discover_all, with its source name.
        # Through discover_all, with its source name (b joined after a's first announcement,
        # so it may need a's next one).
        await _poll(lambda: _has(b, "127.0.0.1:7001"))
        result = await discover_all([b], timeout=1.0)
        assert result.addrs == ["127.0.0.1:7001"]
        assert result.found[0].sources == (f"multicast:{GROUP}:{multicast_port}",)
    finally:
        for node in nodes:
            await node.close()
    assert all(n._task is None and n._transport is None for n in nodes)


async def test_multicast_garbage_and_expiry(multicast_port: int) -> None:
    keyring = Keyring.generate()
    a = Multicast(port=multicast_port, interval=0.05, keyring=keyring, announce_addr="127.0.0.1:1")
    b = Multicast(port=multicast_port, interval=0.05, keyring=keyring, announce_addr="127.0.0.1:2")
    try:
        await a.start()
        await b.start()
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        rng = random.Random(3)
        codec = WireCodec(Announce, keyring)
        bad_addr = codec.encode(Announce("agentcluster", "not an address", "x", 0.0))
        try:
            for size in (0, 1, 15, 40, 200):
                tx.sendto(rng.randbytes(size), (GROUP, multicast_port))
            tx.sendto(bad_addr, (GROUP, multicast_port))
        finally:
            tx.close()
        await wait_until(lambda: a.stats.dropped_malformed >= 1 and a.stats.dropped_auth >= 5)
        await _poll(lambda: _has(a, "127.0.0.1:2"))
        # b goes quiet: a forgets it after `expiry` (3 intervals).
        await b.close()
        await _poll(lambda: _lacks(a, "127.0.0.1:2"))
        assert "127.0.0.1:2" not in a.peers()
    finally:
        await a.close()
        await b.close()


async def _has(node: Multicast, addr: str) -> bool:
    return addr in [c.addr for c in await node.discover()]


async def _lacks(node: Multicast, addr: str) -> bool:
    return not await _has(node, addr)


async def _poll(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    await eventually(predicate, timeout=timeout, interval=0.01)


def test_multicast_validation() -> None:
    keyring = Keyring.generate()
    with pytest.raises(ValueError):
        Multicast("10.0.0.1", announce_addr="127.0.0.1:1", keyring=keyring, interval=1.0)
    with pytest.raises(ValueError):
        Multicast(announce_addr="127.0.0.1:1", keyring=keyring, interval=0.0)
    with pytest.raises(ValueError):
        Multicast(announce_addr="bad host", keyring=keyring, interval=1.0)


async def test_multicast_lifecycle(multicast_port: int) -> None:
    def make() -> Multicast:
        return Multicast(
            port=multicast_port,
            announce_addr="127.0.0.1:1",
            keyring=Keyring.generate(),
            interval=60.0,
        )

    m = make()
    async with m:
        assert m.stats.sent == 1  # announced at once on start
    with pytest.raises(RuntimeError):
        await m.start()
    result = await discover_all([m], timeout=1.0)
    assert "closed" in result.errors[m.name]
    # Two concurrent first rounds open one socket and announce once.
    m2 = make()
    try:
        await asyncio.gather(m2.discover(), m2.discover())
        assert m2.stats.sent == 1
    finally:
        await m2.close()


# -- address file ------------------------------------------------------------------------------


async def test_file_parse_and_reread_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "peers"
    path.write_text(
        "# peers of the cluster\n"
        "10.0.0.1\n"
        "\n"
        "10.0.0.2:7000   # trailing comment\n"
        "[fd00::1]:7001\n"
        "not a valid line\n"
        "10.0.0.1:7946\n"  # duplicate of line 2
    )
    f = AddressFile(path)
    result = await discover_all([f], timeout=1.0)
    assert result.addrs == ["10.0.0.1:7946", "10.0.0.2:7000", "[fd00::1]:7001"]
    assert "line 6" in result.errors[f.name]
    assert f.reads == 1
    await f.discover()
    assert f.reads == 1  # unchanged: not parsed again
    # Same size, new content: the mtime tells.
    path.write_text(path.read_text().replace("10.0.0.2", "10.0.0.3"))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert "10.0.0.3:7000" in [c.addr for c in await f.discover()]
    assert f.reads == 2
    # Swapped by rename (a new inode), as a ConfigMap update does.
    tmp = tmp_path / "peers.new"
    tmp.write_text("10.0.0.9\n")
    os.replace(tmp, path)
    assert [c.addr for c in await f.discover()] == ["10.0.0.9:7946"]
    assert f.last_error is None


async def test_file_missing_is_an_error_not_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    f = AddressFile(path, default_port=9000)
    result = await discover_all([f], timeout=1.0)
    assert result.found == ()
    assert "no such file" in result.errors[f.name]
    path.write_text("10.0.0.1\n")  # appears later: found on the next round
    result = await discover_all([f], timeout=1.0)
    assert result.addrs == ["10.0.0.1:9000"]
    assert dict(result.errors) == {}
    path.write_bytes(b"\xff\xfe\x00garbage")
    result = await discover_all([f], timeout=1.0)
    assert result.found == () and "UTF-8" in result.errors[f.name]


async def test_file_names_are_resolved_every_round(tmp_path: Path) -> None:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return [f"10.2.0.{len(calls)}"]

    path = tmp_path / "peers"
    path.write_text("seed.internal:7000\n")
    f = AddressFile(path, resolve=resolve)
    assert [c.addr for c in await f.discover()] == ["10.2.0.1:7000"]
    assert [c.addr for c in await f.discover()] == ["10.2.0.2:7000"]
    assert f.reads == 1


@pytest.mark.virtual_time
async def test_file_watch_in_virtual_time(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    path = tmp_path / "peers"
    path.write_text("10.0.0.1\n")
    f = AddressFile(path, poll_interval=1.0)
    seen: list[tuple[float, list[str]]] = []

    async def consume() -> None:
        async for candidates in f.watch():
            seen.append((loop.time(), [c.addr for c in candidates]))

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(consume())
        await wait_until(lambda: len(seen) == 1)
        assert seen[0] == (0.0, ["10.0.0.1:7946"])
        await advance(10.0)
        assert len(seen) == 1  # no change, no yield
        changed_at = loop.time()
        path.write_text("10.0.0.1\n10.0.0.2:7000\n")
        await wait_until(lambda: len(seen) == 2)
        assert seen[1][1] == ["10.0.0.1:7946", "10.0.0.2:7000"]
        assert seen[1][0] - changed_at <= 1.0  # within one poll interval
        path.unlink()
        await wait_until(lambda: len(seen) == 3)
        assert seen[2][1] == []
        assert f.last_error is not None and "no such file" in f.last_error
        path.write_text("10.0.0.5\n")
        await wait_until(lambda: len(seen) == 4)
        assert seen[3][1] == ["10.0.0.5:7946"]
        task.cancel()
