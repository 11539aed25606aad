"""Hostile and malformed network input: counters at their limits, garbage that holds
connections, poisoned coordinates, skewed clocks. A node must never crash, never keep what it
cannot use, and never be pushed into sending what its peers cannot decode."""

from __future__ import annotations

import asyncio
import math
import random
import struct

import msgspec
import pytest

from agentcluster.consensus.raft import (
    AppendEntries,
    AppendEntriesResponse,
    HardState,
    MemoryStorage,
    RaftNode,
)
from agentcluster.consensus.raft import Message as RaftMessage
from agentcluster.consensus.raft.messages import MAX_TERM
from agentcluster.coordination.registry import AgentEntry
from agentcluster.coordination.registry_service import REGISTRY_PREFIX, RegFrame
from agentcluster.coordination.registry_sync import (
    MAX_EPOCH,
    MAX_VERSION,
    Digest,
    Full,
    RegistrySync,
    SyncConfig,
    SyncDecodeError,
    decode_sync,
    encode_sync,
)
from agentcluster.membership.config import preset
from agentcluster.membership.messages import (
    MAX_INCARNATION,
    Ack,
    Alive,
    Dead,
    Gossip,
    Message,
    NodeMeta,
    Ping,
    Suspect,
)
from agentcluster.membership.swim import Swim
from agentcluster.membership.vivaldi import Coordinate, Vivaldi
from agentcluster.testing import SimCluster
from agentcluster.transport import TransportError
from agentcluster.wire import Keyring, Malformed, Replayed, WireCodec
from raft_harness import CFG as RAFT_CFG

MAX_I64 = 2**63 - 1
MAX_U64 = 2**64 - 1
RING = Keyring([b"k" * 32])


def roundtrip(codec_type: object, msg: object) -> object:
    """``msg`` sealed by one codec and opened by another (a peer): None if the peer drops it."""
    return WireCodec(codec_type, RING).try_decode(WireCodec(codec_type, RING).encode(msg))


# ============================================================================ SWIM incarnation


def swim(name: str, *, vivaldi: Vivaldi | None = None) -> Swim:
    return Swim(
        name,
        f"{name}:1",
        config=preset("lan"),
        rng=random.Random(1),
        now=0.0,
        vivaldi=vivaldi,
    )


def introduce(core: Swim, *names: str) -> None:
    core.handle_packet(
        f"{names[0]}:1", Gossip(names[0], tuple(Alive(n, f"{n}:1", 0) for n in names)), 0.0
    )
    core.ready()


def test_an_incarnation_beyond_the_bound_fails_decoding() -> None:
    for entry in (
        Suspect("b", MAX_I64, "a"),
        Dead("b", MAX_I64, "a"),
        Alive("b", "b:1", MAX_I64),
    ):
        frame = WireCodec(Message, RING).encode(Gossip("a", (entry,)))
        with pytest.raises(Malformed):
            WireCodec(Message, RING).decode(frame)


@pytest.mark.parametrize("forged", [MAX_I64, 2**62, 2**62 + 1])
def test_a_suspicion_at_a_huge_incarnation_never_makes_us_send_what_peers_drop(
    forged: int,
) -> None:
    """A Suspect about b near the int64 limit (handed to the core directly, as if the codec let
    it through) used to make b refute at 2**63, which no peer decodes: b was unrefutable. Now
    it is ignored, and b still refutes an honest suspicion, in an Alive every peer accepts."""
    b = swim("b")
    introduce(b, "a")
    b.handle_packet("a:1", Gossip("a", (Suspect("b", forged, "a"),)), 0.1)
    for _, msg in b.ready().packets:
        assert roundtrip(Message, msg) is not None, f"a peer drops {msg}"
    assert b.incarnation < 2**62
    assert b.stats.dropped.get("incarnation_bound") == 1
    # An honest suspicion is refuted as usual, and the refutation lands at a.
    a = swim("a")
    introduce(a, "b")
    b.handle_packet("a:1", Gossip("a", (Suspect("b", 0, "a"),)), 0.2)
    packets = b.ready().packets
    assert packets and b.incarnation == 1
    for _, msg in packets:
        got = roundtrip(Message, msg)
        assert isinstance(got, Message)
        a.handle_packet("b:1", got, 0.3)
    member = a.member("b")
    assert member is not None and member.state == "alive" and member.incarnation == 1


def test_a_suspicion_just_below_the_bound_is_refuted_within_it() -> None:
    b = swim("b")
    introduce(b, "a")
    b.handle_packet("a:1", Gossip("a", (Suspect("b", MAX_INCARNATION - 1, "a"),)), 0.1)
    packets = b.ready().packets
    assert packets and b.incarnation == MAX_INCARNATION
    a = swim("a")
    introduce(a, "b")
    for _, msg in packets:
        got = roundtrip(Message, msg)
        assert isinstance(got, Message), f"a peer drops {msg}"
        a.handle_packet("b:1", got, 0.2)
    member = a.member("b")
    assert member is not None and member.incarnation == MAX_INCARNATION
    # At the bound: accusations are ignored (no room to refute them), and so is an Alive
    # about us that we could only answer above it; our metadata can no longer change.
    for entry in (
        Suspect("b", MAX_INCARNATION, "a"),
        Dead("b", MAX_INCARNATION, "a"),
        Alive("b", "b:1", MAX_INCARNATION, NodeMeta(zone="x")),
    ):
        b.handle_packet("a:1", Gossip("a", (entry,)), 0.3)
        assert b.ready().packets == [] and b.incarnation == MAX_INCARNATION
        assert b.member("b").state == "alive"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="incarnation"):
        b.update_meta(NodeMeta(zone="y"), 0.4)


def test_a_peer_ignores_accusations_at_the_bound_about_others() -> None:
    a = swim("a")
    introduce(a, "b", "c")
    a.handle_packet("c:1", Gossip("c", (Dead("b", MAX_INCARNATION, "c"),)), 0.1)
    a.handle_packet("c:1", Gossip("c", (Suspect("b", MAX_INCARNATION, "c"),)), 0.1)
    assert a.member("b").state == "alive"  # type: ignore[union-attr]
    assert a.stats.dropped["incarnation_bound"] == 2


# ============================================================================ Raft term


def test_a_raft_term_beyond_the_bound_fails_decoding() -> None:
    msg = AppendEntriesResponse(MAX_I64, "b", "a", False)
    with pytest.raises(Malformed):
        WireCodec(RaftMessage, RING).decode(WireCodec(RaftMessage, RING).encode(msg))


def test_a_huge_raft_term_is_not_adopted_and_later_votes_still_decode() -> None:
    """A message at term 2**63-1 used to be adopted (and persisted); the next pre-vote then
    carried 2**63, which no peer decodes: the node could never be elected again."""
    node = RaftNode("a", ["b", "c"], config=RAFT_CFG, rng=random.Random(0), now=0.0)
    node.step(AppendEntriesResponse(MAX_I64, "b", "a", False), 0.1)
    assert node.term == 0 and node.dropped == 1
    node.ready()
    node.tick(node.next_deadline() + 5.0)
    sent = list(node.ready().messages)
    assert sent
    for msg in sent:
        assert roundtrip(RaftMessage, msg) is not None, f"a peer drops {msg}"


def test_raft_terms_stop_short_of_the_bound() -> None:
    node = RaftNode("a", ["b", "c"], config=RAFT_CFG, rng=random.Random(0), now=0.0)
    node.step(AppendEntries(MAX_TERM, "b", "a", 0, 0, (), 0), 0.1)
    assert node.term == 0  # a term at the bound is never adopted...
    node.step(AppendEntries(MAX_TERM - 1, "b", "a", 0, 0, (), 0), 0.2)
    assert node.term == MAX_TERM - 1  # ...one below it is
    node.ready()
    node.tick(node.next_deadline() + 5.0)
    # No election into the bound: a vote there would be dropped by every peer.
    assert node.state == "follower" and node.term == MAX_TERM - 1
    for msg in node.ready().messages:
        assert msg.term < MAX_TERM and roundtrip(RaftMessage, msg) is not None
    # A hard state persisted beyond the bound (by an older version) is a clear error.
    with pytest.raises(ValueError, match="stored term"):
        RaftNode(
            "a",
            ["b"],
            config=RAFT_CFG,
            rng=random.Random(0),
            now=0.0,
            storage=MemoryStorage(HardState(term=MAX_I64)),
        )


# ============================================================================ Vivaldi


def next_probe(a: Swim, since: float = 0.0) -> tuple[Ping, float]:
    """Tick ``a`` from ``since`` until it sends a Ping; the ping and when."""
    now = since
    while now < since + 10.0:
        now += 0.05
        a.tick(now)
        ping = next((m for _, m in a.ready().packets if isinstance(m, Ping)), None)
        if ping is not None:
            return ping, now
    raise AssertionError("no probe within 10 s")


GOOD = Coordinate((0.01,) * 8, 0.5, 0.0, 0.001)


@pytest.mark.parametrize(
    "bad",
    [
        Coordinate((math.nan,) * 8, 0.5, 0.0, 0.001),
        Coordinate((0.0,) * 8, math.inf, 0.0, 0.001),
        Coordinate((0.0,) * 3, 0.5, 0.0, 0.001),
        Coordinate((0.0,) * 8, 0.5, 0.0, -1.0),
    ],
)
def test_an_invalid_coordinate_in_an_ack_is_not_kept(bad: Coordinate) -> None:
    """The coordinate used to be stored before Vivaldi refused it, so estimate_rtt (events,
    the control API, discovery metrics) reported NaN for that peer."""
    a = swim("a", vivaldi=Vivaldi(rng=random.Random(2)))
    introduce(a, "b")
    ping, now = next_probe(a)
    a.handle_packet("b:1", Ack(ping.seq, "b", bad), now + 0.001)
    assert a.stats.dropped.get("bad_coordinate") == 1
    assert a.member("b").coord is None  # type: ignore[union-attr]
    assert a.estimate_rtt("b") is None


def test_an_invalid_coordinate_leaves_the_previous_one() -> None:
    a = swim("a", vivaldi=Vivaldi(rng=random.Random(2)))
    introduce(a, "b")
    ping, now = next_probe(a)
    a.handle_packet("b:1", Ack(ping.seq, "b", GOOD), now + 0.001)
    assert a.member("b").coord == GOOD  # type: ignore[union-attr]
    before = a.estimate_rtt("b")
    assert before is not None and math.isfinite(before)
    ping, now = next_probe(a, now + 0.001)
    nan = Coordinate((math.nan,) * 8, 0.5, 0.0, 0.0)
    a.handle_packet("b:1", Ack(ping.seq, "b", nan), now + 0.001)
    assert a.stats.dropped.get("bad_coordinate") == 1
    assert a.member("b").coord == GOOD  # type: ignore[union-attr]
    rtt = a.estimate_rtt("b")
    assert rtt is not None and math.isfinite(rtt)


def test_without_vivaldi_an_invalid_coordinate_is_not_kept_either() -> None:
    a = swim("a")
    introduce(a, "b")
    ping, now = next_probe(a)
    a.handle_packet("b:1", Ack(ping.seq, "b", Coordinate((math.nan,), 0.5, 0.0, 0.0)), now)
    assert a.member("b").coord is None  # type: ignore[union-attr]
    assert a.stats.dropped.get("bad_coordinate") == 1


# ============================================================================ replay cache


class Wall:
    def __init__(self, t: float, skew: float = 0.0) -> None:
        self.t, self.skew = t, skew

    def __call__(self) -> float:
        return self.t + self.skew


def test_a_skewed_sender_overflowing_the_nonce_cache_does_not_block_on_time_senders() -> None:
    """The cache evicted in arrival order and raised its floor to the evicted entry's
    timestamp: one evicted frame from a sender 30 s ahead (inside the 60 s window) put the
    floor 30 s in the future and every on-time frame was refused as a replay."""
    clock = Wall(1000.0)
    rx = WireCodec(Message, RING, wall=clock, max_nonces=3)
    ahead = WireCodec(Message, RING, wall=lambda: clock.t + 30.0)
    on_time = WireCodec(Message, RING, wall=clock)
    assert rx.try_decode(ahead.encode(Gossip("skewed"))) is not None
    sent = []
    for i in range(6):
        clock.t += 0.01
        frame = on_time.encode(Gossip("ok"))
        sent.append(frame)
        assert rx.try_decode(frame) is not None, f"fresh frame #{i} refused: {rx.drops!r}"
    assert len(rx._nonces) == 3  # still bounded
    # Nothing was forgotten towards accepting: every frame seen is refused again.
    for frame in sent:
        with pytest.raises(Replayed):
            rx.decode(frame)


def test_the_nonce_cache_floor_only_rises_to_the_oldest_evicted_timestamp() -> None:
    clock = Wall(1000.0)
    rx = WireCodec(Message, RING, wall=clock, max_nonces=4)
    frames = []
    for skew in (20.0, -5.0, 10.0, 0.0, -10.0, 5.0):
        tx = WireCodec(Message, RING, wall=Wall(clock.t, skew))
        frames.append((skew, tx.encode(Gossip("x"))))
    for _, frame in frames:
        assert rx.try_decode(frame) is not None
    # Two evictions: the two oldest timestamps (-10 s, then -5 s).
    assert rx._nonces.floor_ms == int((clock.t - 5.0) * 1000)
    for _, frame in frames:
        with pytest.raises(Replayed):
            rx.decode(frame)


# ============================================================================ registry core


def test_registry_digest_claiming_max_epoch_does_not_break_encoding() -> None:
    """Digest {us: (2**64-1, 0)} made _about_self take epoch 2**64, and every later message
    about ourselves raised OverflowError in the encoder."""
    codec = WireCodec(RegFrame, RING, max_size=4 << 20)
    core = RegistrySync("n1", 1, random.Random(0))
    core.member_up("n2", 0.0)
    core.ready()
    core.step("n2", Digest({"n1": (MAX_U64, 0)}), 0.1)
    core.register(AgentEntry("n1/a", "a", "n1"), 0.2)
    core.tick(5.0)
    out = core.ready()
    assert out
    for _, msg in out:
        codec.encode(RegFrame("n1", msg))
        decode_sync(encode_sync(msg))
    assert core.epoch == 1 and core.stats.out_of_range_dropped == 1


def test_registry_epochs_and_versions_beyond_the_bound_fail_decoding() -> None:
    for raw in (
        ["g", {"n1": [MAX_EPOCH + 1, 0]}],
        ["g", {"n1": [0, MAX_U64]}],
        ["f", "n1", MAX_EPOCH + 1, 0, 0, 1, []],
        ["d", "n1", 1, 0, MAX_U64, [], []],
    ):
        with pytest.raises(SyncDecodeError):
            decode_sync(msgspec.msgpack.encode(raw))


def test_registry_outranks_claims_at_the_bound_without_stepping_past_it() -> None:
    core = RegistrySync("n1", 1, random.Random(0))
    peer = RegistrySync("n2", 2, random.Random(1))
    core.member_up("n2", 0.0)
    peer.member_up("n1", 0.0)
    core.ready()
    peer.ready()
    core.step("n2", Digest({"n1": (MAX_EPOCH - 1, 7)}), 0.1)
    assert core.owner_state("n1") == (MAX_EPOCH, 0)
    core.step("n2", Digest({"n1": (MAX_EPOCH, 7)}), 0.2)
    assert core.owner_state("n1") == (MAX_EPOCH, 8)  # the version outranks it now
    # A peer holding the forged state takes ours: what we send decodes and wins.
    peer.step("n1", Full("n1", MAX_EPOCH, 7, 0, 1, (AgentEntry("n1/fake", "f", "n1"),)), 0.3)
    for _, msg in core.ready():
        peer.step("n1", decode_sync(encode_sync(msg)), 0.3)
    assert peer.owner_state("n1") == (MAX_EPOCH, 8) and len(peer.index) == 0
    # Nothing above both bounds: ignored, not stepped past.
    core.step("n2", Digest({"n1": (MAX_EPOCH, MAX_VERSION)}), 0.4)
    assert core.owner_state("n1") == (MAX_EPOCH, 8)
    with pytest.raises(ValueError, match="epoch"):
        RegistrySync("n3", MAX_EPOCH + 1, random.Random(0))


def test_a_peer_cannot_make_us_keep_unlimited_unknown_owners() -> None:
    cfg = SyncConfig(max_unknown_owners=8)
    core = RegistrySync("n1", 1, random.Random(0), cfg)
    core.member_up("n2", 0.0)
    for i in range(50):
        core.step("n2", Full(f"ghost{i}", 1, 1, 0, 1, ()), 0.1)
    assert len([o for o in map(core.owner_state, (f"ghost{i}" for i in range(50))) if o]) == 8
    assert core.stats.unknown_owners_dropped == 42
    # Split Fulls of further strangers are not buffered either.
    core.step("n2", Full("ghost99", 1, 1, 0, 2, ()), 0.1)
    assert core._assembly == {}
    # A live member is always kept, and one that comes up stops counting as unknown.
    core.step("n2", Full("n2", 1, 1, 0, 1, ()), 0.1)
    assert core.owner_state("n2") == (1, 1)
    core.member_up("ghost0", 0.2)
    core.step("n2", Full("ghost50", 1, 1, 0, 1, ()), 0.3)
    assert core.owner_state("ghost50") == (1, 1)


def test_registry_digest_grown_by_a_peer_still_fits_a_frame() -> None:
    """~16k invented owners, all kept and listed in a digest that is never split, made the
    digest exceed the 4 MiB frame: the codec raised Oversized inside the node's task group."""
    core = RegistrySync("n1", 1, random.Random(0))
    core.member_up("n2", 0.0)
    core.ready()
    for i in range(16_500):
        core.step("n2", Full(f"{i:0>256}", 1, 1, 0, 1, ()), 0.1)
    core.ready()
    core.tick(5.0)
    codec = WireCodec(RegFrame, RING, max_size=4 << 20)
    out = core.ready()
    assert any(isinstance(m, Digest) for _, m in out)
    for _, msg in out:
        codec.encode(RegFrame("n1", msg))


def test_a_digest_too_large_for_a_frame_is_sent_partial_and_rotates() -> None:
    names = [f"member-{i:03d}-" + "x" * 80 for i in range(60)]
    cfg = SyncConfig(max_digest_bytes=2_000)
    core = RegistrySync("n1", 1, random.Random(0), cfg)
    for n in names:
        core.member_up(n, 0.0)
        core.step(n, Full(n, 1, 1, 0, 1, ()), 0.0)
    core.ready()
    seen: set[str] = set()
    for k in range(40):
        core.tick(1.0 + k)
        digests = [m for _, m in core.ready() if isinstance(m, Digest)]
        assert len(digests) == 1 and digests[0].partial
        assert len(encode_sync(digests[0])) <= cfg.max_digest_bytes
        assert "n1" in digests[0].owners
        seen |= set(digests[0].owners)
    assert seen == {"n1", *names}  # every owner gets compared now and then
    # The receiver does not read an owner missing from a partial digest as one we lack.
    other = RegistrySync("n2", 2, random.Random(1), cfg)
    other.member_up("n1", 0.0)
    other.step("n1", Full("n1", 1, 0, 0, 1, ()), 0.0)
    other.step("n1", Full("elsewhere", 1, 1, 0, 1, ()), 0.0)
    other.ready()
    other.step("n1", Digest({"n1": (1, 0)}, partial=True), 0.5)
    assert other.ready() == []
    other.step("n1", Digest({"n1": (1, 0)}), 0.6)
    assert [(d, type(m), getattr(m, "owner", None)) for d, m in other.ready()] == [
        ("n1", Full, "n2"),
        ("n1", Full, "elsewhere"),
    ]


# ============================================================================ registry service


def entry_of(node: str, i: int) -> AgentEntry:
    return AgentEntry(f"{node}/x{i}", f"x{i}", node)


@pytest.mark.virtual_time
async def test_a_hostile_registry_frame_does_not_take_the_node_down() -> None:
    """The Digest {n1: (2**64-1, 0)}, sealed with the cluster key and sent to n1's stream
    port, used to kill n1's registry loop (OverflowError) and with it n1's task group."""
    async with SimCluster(2, seed=1) as c:
        n1, n2 = c.nodes["n1"], c.nodes["n2"]
        await c.wait_until(lambda: c.converged(), timeout=30.0)
        frame = REGISTRY_PREFIX + n2.registry.codec.encode(
            RegFrame("n2", Digest({"n1": (MAX_U64, 0)}))
        )
        with pytest.raises(TransportError):  # refused: the stream closes without a reply
            await n2.transport.request(n1.addr, frame, timeout=2.0)
        assert n1.registry.codec.drops.malformed == 1
        n1.registry.core.register(entry_of("n1", 1), c.clock.now())
        n1.registry._wake.set()
        await c.wait_until(lambda: n2.registry.index.get("n1/x1") is not None, timeout=10.0)
        task = n1.registry._task
        assert task is not None and not task.done()


@pytest.mark.virtual_time
async def test_the_registry_loop_survives_a_frame_it_cannot_encode() -> None:
    async with SimCluster(2, seed=2) as c:
        n1, n2 = c.nodes["n1"], c.nodes["n2"]
        await c.wait_until(lambda: c.converged(), timeout=30.0)
        svc = n1.registry
        limit = svc.codec.max_size
        svc.codec.max_size = 64  # every registry frame is now Oversized
        svc.core.register(entry_of("n1", 1), c.clock.now())
        svc._wake.set()
        await c.wait_until(lambda: svc.encode_failures > 0, timeout=10.0)
        assert svc._task is not None and not svc._task.done()
        assert n2.registry.index.get("n1/x1") is None
        # Once frames fit again, anti-entropy repairs what the dropped frame carried.
        svc.codec.max_size = limit
        await c.wait_until(lambda: n2.registry.index.get("n1/x1") is not None, timeout=10.0)


@pytest.mark.virtual_time
async def test_the_registry_loop_survives_an_error_in_one_round() -> None:
    async with SimCluster(2, seed=3) as c:
        n1, n2 = c.nodes["n1"], c.nodes["n2"]
        await c.wait_until(lambda: c.converged(), timeout=30.0)
        svc = n1.registry
        real_tick = svc.core.tick
        calls: list[float] = []

        def failing_tick(now: float) -> None:
            if not calls:
                calls.append(now)
                raise RuntimeError("boom")
            real_tick(now)

        svc.core.tick = failing_tick
        svc._wake.set()
        await c.wait_until(lambda: svc.loop_errors == 1, timeout=10.0)
        svc.core.register(entry_of("n1", 2), c.clock.now())
        svc._wake.set()
        await c.wait_until(lambda: n2.registry.index.get("n1/x2") is not None, timeout=10.0)
        assert svc._task is not None and not svc._task.done() and svc.loop_errors == 1


# ============================================================================ keyless slowloris


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server closes the connection (EOF); False if it keeps it 10 s."""
    try:
        async with asyncio.timeout(10.0):
            return await reader.read() == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


@pytest.mark.parametrize("prefix", [b"G", b"R"])
async def test_a_frame_that_does_not_decode_closes_the_stream(prefix: bytes) -> None:
    """Registry ('G') and Raft ('R') frames that failed to decode were answered with "keep
    the connection": a host without the cluster key held stream slots for ever by trickling
    one-byte one-way garbage, until max_connections refused control, registry and Raft."""
    from agentcluster.config import NodeConfig
    from agentcluster.node import Node
    from agentcluster.transport import UdpTcpTransport, parse_addr
    from agentcluster.transport.udp_tcp import ONE_WAY_FLAG

    transport = UdpTcpTransport("127.0.0.1:0", stream_idle_timeout=60.0)
    cfg = NodeConfig(name="victim", bind="127.0.0.1:0", preset="local", store_voters=["victim"])
    async with Node(cfg, keyring=RING, transport=transport) as node:
        host, port = parse_addr(node.transport.addr)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            garbage = prefix + b"\x01" * 40
            writer.write(struct.pack("!I", len(garbage) | ONE_WAY_FLAG) + garbage)
            await writer.drain()
            assert await closed_by_server(reader), "a keyless peer keeps its stream slot"
        finally:
            writer.close()
        # The handler contract: bad input -> close without a reply.
        assert await node._on_stream("evil:1", prefix + b"\x00" * 32) is None
        assert await node._on_stream("evil:1", prefix) is None
