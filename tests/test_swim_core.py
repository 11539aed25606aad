"""Synchronous scenario and table tests of the SWIM + Lifeguard core (no simulator).

Cores are wired by hand: :class:`Wire` delivers every packet and stream request at once and
ticks each core exactly at its ``next_deadline()``, so times in assertions are exact. A
"lonely" core has peers it knows about but that never answer, which isolates one rule.
Each test's name says which rule of the protocol it checks.
"""

from __future__ import annotations

import itertools
import math
import random

import msgspec
import pytest

from agentcluster.membership._broadcasts import BroadcastQueue, retransmit_limit
from agentcluster.membership._suspicion import Suspicion, suspicion_timeout_for
from agentcluster.membership.config import SwimConfig, preset
from agentcluster.membership.messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    IndirectPing,
    MemberSnapshot,
    Message,
    Nack,
    NodeMeta,
    Ping,
    PushPull,
    StreamAck,
    StreamMessage,
    StreamPing,
    Suspect,
    encoded_size,
)
from agentcluster.membership.swim import Swim
from agentcluster.membership.vivaldi import Coordinate, Vivaldi
from swim_harness import PLAIN, Wire, addr, cluster, inject, lonely

# ---------------------------------------------------------------------------- join


def test_rule_join_push_pull_then_gossip_reaches_everyone() -> None:
    wire = Wire()
    wire.add("a")
    b = wire.add("b", ("a",))
    # The push-pull over a stream made both sides know each other at once.
    assert wire.state("a", "b") == "alive" and wire.state("b", "a") == "alive"
    assert b.stats.join_failures == 0
    wire.add("c", ("a",))
    wire.run(1.0)
    # c only talked to a; b learnt of c by gossip (and c of b from a's state).
    assert wire.state("b", "c") == "alive" and wire.state("c", "b") == "alive"
    assert "joined" in wire.kinds("b", "c")


def test_addr_of_is_the_member_views_address() -> None:
    wire = Wire()
    a = wire.add("a")
    wire.add("b", ("a",))
    for name in ("a", "b"):
        member = a.member(name)
        assert member is not None and a.addr_of(name) == member.addr == addr(name)
    assert a.addr_of("nobody") is None and a.member("nobody") is None


def test_rule_join_failure_counted_when_seed_unreachable() -> None:
    wire = Wire()
    wire.down.add("ghost")
    core = wire.add("a", ("ghost",))
    assert core.stats.join_failures == 1
    assert [m.name for m in core.members()] == ["a"]


# ---------------------------------------------------------------------------- probing


def test_rule_probe_direct_ack_is_success_and_feeds_vivaldi() -> None:
    wire = Wire()
    viv = Vivaldi(rng=random.Random(1))
    a = wire.add("a", vivaldi=viv)
    wire.add("b", ("a",), vivaldi=Vivaldi(rng=random.Random(2)))
    wire.run(5.0)
    assert a.stats.probes >= 4
    assert a.stats.acks == a.stats.probes
    assert a.stats.probe_failures == 0 and a.health_score() == 0
    assert a.stats.rtt_samples >= 4
    member = a.member("b")
    assert member is not None and isinstance(member.coord, Coordinate)
    assert a.estimate_rtt("b") is not None and a.estimate_rtt("nobody") is None
    me = a.member("a")
    assert me is not None and me.coord == viv.coordinate  # our own coordinate, live


def test_rule_probe_failure_suspect_then_dead_after_max_timeout() -> None:
    wire = cluster("abc")
    wire.down.add("c")
    t_suspect = wire.run_until_true(lambda: wire.state("a", "c") == "suspect", 10.0, 0.01)
    a = wire.cores["a"]
    ev = next(ev for o, ev in wire.events if o == "a" and ev.kind == "suspect")
    assert ev.member.name == "c" and ev.accuser == "a"
    # n = 3: min = 2 * 1 * 1 s, max = 6 s, k = min(2, n - 2) = 1. b's own suspicion is not
    # sent to a (no witnesses configured), so a waits the full max.
    assert a.suspicion_timeouts() == (2.0, 6.0, 1)
    wire.run_until_true(lambda: wire.state("a", "c") == "dead", 10.0, 0.01)
    assert t_suspect - ev.at < 0.011
    assert wire.state("b", "c") == "dead"
    # Whoever declared c dead (a, or b whose own probe failed too) did so exactly max = 6 s
    # after its own suspicion started; the other one took the Dead from it.
    declared = 0
    for o in "ab":
        mine = [e for obs, e in wire.events if obs == o and e.member.name == "c"]
        suspect = next(e for e in mine if e.kind == "suspect")
        dead = next(e for e in mine if e.kind == "dead")
        if dead.accuser == o:
            declared += 1
            assert suspect.accuser == o and dead.at - suspect.at == pytest.approx(6.0)
    assert declared >= 1


def test_rule_indirect_probe_rescues_a_broken_direct_path() -> None:
    wire = cluster("abc")
    wire.cut |= {("a", "b"), ("b", "a")}
    wire.streams_cut.add("b")
    wire.run(20.0)
    a, c = wire.cores["a"], wire.cores["c"]
    assert a.stats.indirect_sent > 0 and c.stats.acks_relayed > 0
    assert wire.state("a", "b") == "alive"
    assert "suspect" not in wire.kinds("a", "b")


def test_rule_helpers_nack_and_missing_nacks_raise_awareness() -> None:
    config = PLAIN.replace(stream_fallback=False)
    wire = cluster("abcd", config)
    wire.down.add("d")
    a = wire.cores["a"]
    wire.run_until_true(lambda: a.stats.probe_failures >= 1, 20.0, 0.01)
    # Both helpers answered with a nack: a's own health is not to blame.
    assert a.stats.nacks_received == 2 and a.stats.nacks_missing == 0
    assert a.health_score() == 0
    assert wire.cores["b"].stats.nacks_sent + wire.cores["c"].stats.nacks_sent >= 2

    # Helpers that never answer (we are cut off, or the nacks are lost): each missing nack
    # counts against our own health.
    core = lonely(config, ("b", "c", "d"))
    while core.stats.probe_failures == 0:
        core.tick(core.next_deadline())
        core.ready()
    assert core.stats.indirect_sent == 2 and core.stats.nacks_missing == 2
    assert core.health_score() == 2


def test_rule_stream_fallback_reaches_a_member_without_udp() -> None:
    wire = cluster("ab")
    wire.cut |= {("a", "b"), ("b", "a")}
    wire.run(10.0)
    a = wire.cores["a"]
    assert a.stats.stream_pings > 0 and a.stats.tcp_only_acks == a.stats.stream_pings
    assert wire.state("a", "b") == "alive"


def test_rule_round_robin_probes_everyone_once_per_pass() -> None:
    config = PLAIN.replace(probe_timeout=0.1)
    core = lonely(config, tuple("bcdefg"))
    targets: list[str] = []
    now = 0.0
    while len(targets) < 12:
        now = core.next_deadline()
        core.tick(now)
        for _, msg in core.ready().packets:
            if isinstance(msg, Ping):
                targets.append(msg.target)
                # Answer at once so rounds stay one interval long.
                core.handle_packet(addr(msg.target), Ack(msg.seq, msg.target), now)
                core.ready()
    first, second = targets[:6], targets[6:12]
    assert sorted(first) == sorted(second) == list("bcdefg")
    assert first != second  # reshuffled each pass (this seed)


def test_rule_ring_probes_target_the_successor() -> None:
    config = PLAIN.replace(ring_probe_ratio=1.0, probe_timeout=0.1)
    core = lonely(config, tuple("bcdefg"))
    targets = set()
    for _ in range(6):
        now = core.next_deadline()
        core.tick(now)
        for _, msg in core.ready().packets:
            if isinstance(msg, Ping):
                targets.add(msg.target)
                core.handle_packet(addr(msg.target), Ack(msg.seq, msg.target), now)
                core.ready()
    assert len(targets) == 1  # always the same member: our ring successor


# ---------------------------------------------------------------------------- suspicion


@pytest.mark.parametrize(
    ("confirmations", "k", "expected"),
    [
        (0, 3, 6.0),
        (1, 3, 6.0 - 5.0 * math.log(2) / math.log(4)),
        (2, 3, 6.0 - 5.0 * math.log(3) / math.log(4)),
        (3, 3, 1.0),
        (5, 3, 1.0),
        (0, 0, 6.0),  # nobody can confirm: the full maximum
    ],
)
def test_rule_lifeguard_suspicion_timeout_formula(
    confirmations: int, k: int, expected: float
) -> None:
    assert suspicion_timeout_for(confirmations, k, 1.0, 6.0) == pytest.approx(expected)


def test_rule_suspicion_bounds_scale_with_log_n() -> None:
    lan = SwimConfig.lan()
    minimum, maximum, k = lan.suspicion_bounds(200)
    assert minimum == pytest.approx(0.5 * math.log10(200) * 0.52)
    assert maximum == pytest.approx(4.0 * minimum)
    assert k == 2
    assert lan.suspicion_bounds(3)[2] == 1  # k capped at n - 2
    assert lan.suspicion_bounds(5)[0] == pytest.approx(0.5 * 1.0 * 0.52)  # log10 floored at 1
    memberlist_rule = PLAIN.replace(suspicion_confirmations=None, suspicion_mult=4.0)
    assert memberlist_rule.suspicion_bounds(100)[2] == 2  # suspicion_mult - 2


def test_rule_confirmations_from_distinct_accusers_shorten_suspicion() -> None:
    # probe_interval 100 s keeps the core's own probing out of the way; min = 2 s, max = 6 s.
    config = PLAIN.replace(probe_interval=100.0, probe_timeout=1.0, suspicion_mult=0.02)
    config = config.replace(suspicion_confirmations=3)
    core = lonely(config, ("b", "c", "d", "e", "x"))
    assert core.suspicion_timeouts() == pytest.approx((2.0, 6.0, 3))
    events = inject(core, Suspect("x", 0, "b"), now=10.0)
    assert [e.kind for e in events] == ["suspect"]
    inject(core, Suspect("x", 0, "c"), now=11.0)  # C = 1: deadline 10 + 6 - 4 * log2/log4 = 14
    inject(core, Suspect("x", 0, "c"), now=11.5)  # a duplicate accuser does not count
    inject(core, Suspect("x", 0, "b"), now=11.6)  # nor does the first accuser again
    deadline_c2 = 10.0 + 6.0 - 4.0 * math.log(3) / math.log(4)
    inject(core, Suspect("x", 0, "d"), now=12.0)  # C = 2
    core.tick(deadline_c2 - 1e-6)
    assert core.member("x").state == "suspect"  # type: ignore[union-attr]
    core.tick(deadline_c2)
    dead = [e for e in core.ready().events if e.member.name == "x"]
    assert [(e.kind, e.accuser, e.confirmations) for e in dead] == [("dead", "me", 2)]
    assert dead[0].at == pytest.approx(deadline_c2)


def test_rule_suspicion_class_ignores_duplicates_and_caps_at_k() -> None:
    s = Suspicion("a", 2, 1.0, 4.0, start=5.0, token=1)
    assert s.deadline == 9.0
    assert not s.confirm("a")
    assert s.confirm("b") and not s.confirm("b")
    assert s.confirm("c") and s.deadline == 6.0
    assert not s.confirm("d")  # k reached: no longer news
    assert s.confirmations == 2


def test_rule_witnesses_probe_a_fresh_suspicion_at_once() -> None:
    config = PLAIN.replace(suspicion_probers=2)
    wire = cluster("abcde", config)
    x = "e"
    witnesses = wire.cores["a"]._witnesses(x)
    assert len(witnesses) == 2
    accuser = next(n for n in "abcd" if n not in witnesses)
    wire.down.add(x)
    core = wire.cores[accuser]
    before = {w: wire.cores[w].stats.urgent_probes for w in witnesses}
    core.handle_packet(addr("q"), Gossip("q", ()), wire.now)  # no-op, keeps `now`
    # The accuser's own failed probe is what starts it: force one through the public path.
    core._on_suspect(Suspect(x, 0, accuser), wire.now)
    wire.pump()
    wire.run(0.01)
    for w in witnesses:
        assert wire.state(w, x) == "suspect"
        assert wire.cores[w].stats.urgent_probes == before[w] + 1
    # Their probes fail within a round and confirm: the accuser's timer drops to min (2 s).
    wire.run(1.5)
    suspicion = core._nodes[x].suspicion
    assert suspicion is not None and suspicion.confirmations == 2
    wire.run_until_true(lambda: wire.state(accuser, x) == "dead", 3.0, 0.01)


# ---------------------------------------------------------------------------- awareness


def test_rule_awareness_stretches_probe_interval_and_timeout() -> None:
    # b never answers but stays suspect (a huge suspicion timeout), so it keeps being probed.
    config = PLAIN.replace(indirect_checks=0, stream_fallback=False, suspicion_mult=100.0)
    core = lonely(config, ("b",))
    pings: list[float] = []
    phases: list[float] = []  # end of the direct phase (probe timeout) of each round
    scores: list[int] = []
    while len(pings) < 5:
        now = core.next_deadline()
        probe = core._probe
        core.tick(now)
        if probe is not None and probe.phase == 1 and not phases[len(pings) - 1 :]:
            phases.append(now - pings[-1])
        if any(isinstance(m, Ping) for _, m in core.ready().packets):
            pings.append(now)
            scores.append(core.health_score())
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(pings)]
    # Each failed round adds 1 (no helpers); the next round lasts interval * (score + 1),
    # and its direct phase timeout * (score + 1).
    assert gaps == [1.0, 2.0, 3.0, 4.0]
    assert scores == [0, 1, 2, 3, 4]
    assert [round(p, 6) for p in phases] == [0.2, 0.4, 0.6, 0.8]
    scaled = PLAIN.replace(awareness_scales_suspicion=True)
    assert scaled.suspicion_bounds(3, health=5)[0] == 5 * PLAIN.suspicion_bounds(3)[0]


def test_rule_awareness_saturates_and_recovers_on_success() -> None:
    config = PLAIN.replace(
        indirect_checks=0, stream_fallback=False, awareness_max_multiplier=3, suspicion_mult=100.0
    )
    core = lonely(config, ("b",))
    for _ in range(30):
        core.tick(core.next_deadline())
        core.ready()
    assert core.health_score() == 2  # capped at max_multiplier - 1
    # Answer the next probes: each success takes one off.
    for expected in (1, 0, 0):
        while True:
            now = core.next_deadline()
            core.tick(now)
            ping = next((m for _, m in core.ready().packets if isinstance(m, Ping)), None)
            if ping is not None:
                core.handle_packet(addr("b"), Ack(ping.seq, "b"), now)
                core.ready()
                break
        assert core.health_score() == expected


def test_rule_refuting_raises_awareness() -> None:
    core = lonely(PLAIN, ("b",))
    inject(core, Suspect("me", 0, "b"), now=1.0)
    assert core.incarnation == 1 and core.health_score() == 1


# ---------------------------------------------------------------------------- buddy


def test_rule_buddy_ping_carries_the_suspicion_and_target_refutes() -> None:
    wire = cluster("abc")
    a, b = wire.cores["a"], wire.cores["b"]
    inject(a, Suspect("b", 0, "c"), now=wire.now)
    assert wire.state("a", "b") == "suspect"
    wire.sent.clear()
    wire.run_until_true(lambda: wire.state("a", "b") == "alive", 10.0, 0.01)
    pings = [m for s, d, m in wire.sent if s == "a" and isinstance(m, Ping) and m.target == "b"]
    assert pings and isinstance(pings[0].gossip[0], Suspect)
    assert pings[0].gossip[0].name == "b"
    assert b.stats.refutations == 1 and b.incarnation == 1
    ack = next(m for s, d, m in wire.sent if s == "b" and isinstance(m, Ack) and d == addr("a"))
    assert ack.seq == pings[0].seq
    assert any(isinstance(g, Alive) and g.name == "b" and g.incarnation == 1 for g in ack.gossip)
    assert "alive" in wire.kinds("a", "b")


# ---------------------------------------------------------------------------- incarnations


def _setup(core: Swim, state: str, inc: int) -> None:
    inject(core, Alive("x", addr("x"), inc), now=1.0)
    if state == "suspect":
        inject(core, Suspect("x", inc, "b"), now=1.0)
    elif state == "dead":
        inject(core, Dead("x", inc, "b"), now=1.0)
    elif state == "left":
        inject(core, Dead("x", inc, "x"), now=1.0)


@pytest.mark.parametrize(
    ("initial", "entry", "expected"),
    [
        (("alive", 5), Alive("x", addr("x"), 6), ("alive", 6)),
        (("alive", 5), Alive("x", addr("x"), 5), ("alive", 5)),
        (("alive", 5), Alive("x", addr("x"), 4), ("alive", 5)),
        (("alive", 5), Suspect("x", 5, "b"), ("suspect", 5)),
        (("alive", 5), Suspect("x", 6, "b"), ("suspect", 6)),
        (("alive", 5), Suspect("x", 4, "b"), ("alive", 5)),
        (("suspect", 5), Alive("x", addr("x"), 5), ("suspect", 5)),
        (("suspect", 5), Alive("x", addr("x"), 6), ("alive", 6)),
        (("alive", 5), Dead("x", 5, "b"), ("dead", 5)),
        (("alive", 5), Dead("x", 4, "b"), ("alive", 5)),
        (("suspect", 5), Dead("x", 7, "b"), ("dead", 7)),
        (("alive", 5), Dead("x", 5, "x"), ("left", 5)),
        (("dead", 5), Alive("x", addr("x"), 5), ("dead", 5)),
        (("dead", 5), Alive("x", addr("x"), 6), ("alive", 6)),
        (("dead", 5), Suspect("x", 9, "b"), ("dead", 5)),
        (("dead", 5), Dead("x", 9, "x"), ("dead", 5)),
        (("left", 5), Alive("x", addr("x"), 6), ("alive", 6)),
        (("left", 5), Dead("x", 9, "b"), ("left", 5)),
    ],
)
def test_rule_incarnation_ordering(
    initial: tuple[str, int], entry: Alive | Suspect | Dead, expected: tuple[str, int]
) -> None:
    core = lonely(PLAIN.replace(probe_interval=100.0, probe_timeout=1.0), ("b",))
    _setup(core, *initial)
    inject(core, entry, now=2.0)
    m = core.member("x")
    assert m is not None and (m.state, m.incarnation) == expected


@pytest.mark.parametrize(
    ("entry", "incarnation"),
    [
        (Suspect("me", 0, "b"), 1),
        (Suspect("me", 3, "b"), 4),
        (Dead("me", 2, "b"), 3),
        (Alive("me", addr("me"), 0, NodeMeta(zone="other")), 1),
        (Alive("me", addr("me"), 0), 0),  # our own Alive echoed back: nothing to do
        (Suspect("me", 0, "b"), 1),
    ],
)
def test_rule_refutation_of_claims_about_ourselves(
    entry: Alive | Suspect | Dead, incarnation: int
) -> None:
    core = lonely(PLAIN, ("b",))
    inject(core, entry, now=1.0)
    assert core.incarnation == incarnation
    assert core.member("me").state == "alive"  # type: ignore[union-attr]
    if incarnation:
        out = core.ready()
        assert core.stats.refutations == 1
        core.tick(core.next_deadline())
        gossip = [g for _, m in core.ready().packets + out.packets for g in m.gossip]
        assert Alive("me", addr("me"), incarnation) in gossip


def test_rule_stale_accuser_is_told_the_newer_incarnation() -> None:
    core = lonely(PLAIN, ("b",))
    inject(core, Alive("b", addr("b"), 4), now=1.0)
    core.handle_packet(addr("c"), Gossip("c", (Alive("c", addr("c"), 0),)), 1.0)
    core.ready()
    # c still thinks b is at incarnation 2
    core.handle_packet(addr("c"), Gossip("c", (Suspect("b", 2, "c"),)), 2.0)
    sent = core.ready().packets
    assert core.member("b").state == "alive"  # type: ignore[union-attr]
    to_c = [m for a, m in sent if a == addr("c")]
    assert any(Alive("b", addr("b"), 4) in m.gossip for m in to_c)


# ---------------------------------------------------------------------------- leave, rejoin, reap


def test_rule_graceful_leave_is_left_not_dead_and_keeps_answering() -> None:
    wire = cluster("abc")
    a = wire.cores["a"]
    a.leave(wire.now)
    wire.pump()
    wire.run(0.5)
    for o in "bc":
        assert wire.state(o, "a") == "left"
        ev = [ev for obs, ev in wire.events if obs == o and ev.member.name == "a"][-1]
        assert (ev.kind, ev.accuser) == ("left", "a")
    probes = a.stats.probes
    wire.run(5.0)
    assert a.stats.probes == probes  # a leaving node accuses nobody
    # It still answers a ping and does not refute its own departure.
    a.handle_packet(addr("b"), Ping(99, "a", "b", addr("b")), wire.now)
    assert any(isinstance(m, Ack) for _, m in a.ready().packets)
    inject(a, Dead("a", a.incarnation, "b"), now=wire.now)
    assert a.stats.refutations == 0


def test_rule_restarted_node_rejoins_with_higher_incarnation() -> None:
    wire = cluster("abc")
    wire.down.add("c")
    wire.run_until_true(lambda: wire.state("a", "c") == "dead", 20.0, 0.05)
    dead_inc = wire.cores["a"].member("c").incarnation  # type: ignore[union-attr]
    wire.down.discard("c")
    new_c = wire.add("c", ("a",))  # a new process: incarnation 0, no memory
    wire.run(1.0)
    assert new_c.incarnation > dead_inc
    assert wire.state("a", "c") == "alive" and wire.state("b", "c") == "alive"
    assert wire.kinds("b", "c")[-1] == "joined"


def test_rule_rejoin_after_leave_on_the_same_core() -> None:
    wire = cluster("abc")
    c = wire.cores["c"]
    c.leave(wire.now)
    wire.pump()
    wire.run(0.5)
    assert wire.state("a", "c") == "left"
    c.join([addr("a")], wire.now)
    wire.pump()
    wire.run(1.0)
    assert wire.state("a", "c") == "alive" and wire.state("b", "c") == "alive"


def test_rule_dead_and_left_members_are_reaped() -> None:
    config = PLAIN.replace(reap_after=5.0)
    core = lonely(config.replace(probe_interval=100.0, probe_timeout=1.0), ("b", "c"))
    inject(core, Dead("b", 0, "c"), now=10.0)
    inject(core, Dead("c", 0, "c"), now=11.0)
    core.tick(14.99)
    assert core.member("b") is not None
    core.tick(15.0)
    assert core.member("b") is None and core.member("c") is not None
    core.tick(16.0)
    events = core.ready().events
    assert [(e.kind, e.member.name) for e in events] == [("reaped", "b"), ("reaped", "c")]
    # A member that came back before its reap time is not reaped.
    core2 = lonely(config.replace(probe_interval=100.0, probe_timeout=1.0), ("b",))
    inject(core2, Dead("b", 0, "c"), now=1.0)
    inject(core2, Alive("b", addr("b"), 1), now=2.0)
    core2.tick(10.0)
    assert core2.member("b").state == "alive"  # type: ignore[union-attr]


def test_rule_dead_name_reclaimed_from_a_new_address() -> None:
    core = lonely(PLAIN.replace(probe_interval=100.0, probe_timeout=1.0), ("b",))
    # While b is alive, a claim from another address is a conflict...
    inject(core, Alive("b", "elsewhere:1", 9), now=1.0)
    assert core.member("b").addr == addr("b")  # type: ignore[union-attr]
    assert core.stats.conflicts == 1
    # ...that is applied as soon as b is declared dead (a restart on a new port).
    inject(core, Dead("b", 0, "c"), now=2.0)
    m = core.member("b")
    assert m is not None and (m.state, m.addr, m.incarnation) == ("alive", "elsewhere:1", 9)


# ---------------------------------------------------------------------------- dissemination


def test_rule_retransmit_limit_is_mult_times_ceil_log10() -> None:
    # The log factor is floored at 2 (see retransmit_limit): 8, not 4, below ten members.
    assert [retransmit_limit(4, n) for n in (1, 9, 10, 99, 100, 200, 1000)] == [
        8,
        8,
        8,
        8,
        12,
        12,
        16,
    ]


def test_rule_piggyback_stops_after_the_transmit_limit_newest_first() -> None:
    q = BroadcastQueue()
    q.queue("x", Alive("x", addr("x"), 1))
    q.queue("y", Alive("y", addr("y"), 1))
    q.queue("x", Alive("x", addr("x"), 2))  # invalidates the older entry about x
    assert len(q) == 2
    taken, used = q.take(1000, limit=3)
    assert taken == [Alive("x", addr("x"), 2), Alive("y", addr("y"), 1)]  # newest first
    assert used == sum(encoded_size(e) for e in taken)
    q.queue("z", Alive("z", addr("z"), 1))
    assert q.take(1000, limit=3)[0][0] == Alive("z", addr("z"), 1)  # least transmitted first
    q.take(1000, limit=3)
    assert q.transmits("z") == 2 and "x" not in q  # x and y reached 3 transmits
    q.take(1000, limit=3)
    assert len(q) == 0


def test_rule_packets_respect_the_budget() -> None:
    config = PLAIN.replace(packet_budget=400, max_meta_size=200)
    core = lonely(config, ())
    meta = NodeMeta(zone="z" * 40, tags={f"k{i}": "v" * 20 for i in range(3)})
    for i in range(60):
        inject(core, Alive(f"m{i:02d}", addr(f"m{i:02d}"), 0, meta), now=1.0)
    sizes = []
    for _ in range(40):
        core.tick(core.next_deadline())
        for _, msg in core.ready().packets:
            sizes.append(len(msgspec.msgpack.encode(msg)))
            assert len(msg.gossip) >= 1
    assert sizes and max(sizes) <= 400
    built = sum(core.stats.bytes.values())
    assert built == sum(sizes)  # the core's accounting is exact


def test_rule_gossip_packets_only_while_something_is_pending() -> None:
    wire = cluster("abcd")
    wire.sent.clear()
    wire.run(10.0)
    assert not [m for _, _, m in wire.sent if isinstance(m, Gossip)]  # steady state: none
    wire.cores["a"].update_meta(NodeMeta(zone="z9"), wire.now)
    wire.pump()
    wire.run(3.0)
    gossip = [m for s, _, m in wire.sent if isinstance(m, Gossip)]
    assert gossip
    wire.sent.clear()
    wire.run(5.0)
    assert not [m for _, _, m in wire.sent if isinstance(m, Gossip)]


def test_rule_refutation_is_told_to_timer_holders_then_only_piggybacked() -> None:
    wire = cluster("abcdef")
    wire.sent.clear()
    b = wire.cores["b"]
    b.handle_packet(addr("c"), Gossip("c", (Suspect("b", 0, "c"),)), wire.now)
    wire.pump()
    gossip = [(s, d) for s, d, m in wire.sent if isinstance(m, Gossip)]
    # The accuser twice, plus a burst of gossip_nodes random members; nobody re-gossips it.
    assert [d for s, d in gossip if s == "b"].count(addr("c")) >= 2
    assert len(gossip) <= 2 + PLAIN.gossip_nodes and all(s == "b" for s, _ in gossip)
    wire.sent.clear()
    wire.run(5.0)
    assert not [m for _, _, m in wire.sent if isinstance(m, Gossip)]
    # ...but it rides on the probes, so every member ends up with the new incarnation.
    assert all(wire.cores[o].member("b").incarnation == 1 for o in "acdef")  # type: ignore[union-attr]


def test_rule_push_pull_merge_applies_the_normal_rules() -> None:
    core = lonely(PLAIN.replace(probe_interval=100.0, probe_timeout=1.0), ("b", "c", "d"))
    states = (
        MemberSnapshot("b", addr("b"), "alive", 3),  # newer: taken
        MemberSnapshot("c", addr("c"), "dead", 0),  # hearsay: we check c ourselves
        MemberSnapshot("d", addr("d"), "left", 0),  # left is final
        MemberSnapshot("n", addr("n"), "alive", 0),  # new member
        MemberSnapshot("u", addr("u"), "dead", 0),  # unknown and dead: ignored
    )
    reply = core.handle_stream(addr("r"), PushPull("r", addr("r"), False, states), 5.0)
    assert isinstance(reply, PushPull) and reply.reply
    assert {s.name for s in reply.states} == {"me", "b", "c", "d"}  # state before the merge
    view = {m.name: (m.state, m.incarnation) for m in core.members()}
    assert view["b"] == ("alive", 3)
    assert view["c"] == ("alive", 0)  # no timer on hearsay...
    assert view["d"] == ("left", 0)
    assert view["n"] == ("alive", 0)
    assert "u" not in view
    # ...but c is told (so it can refute) and probed by us next.
    sent = core.ready().packets
    assert any(Suspect("c", 0, "r") in m.gossip for a, m in sent if a == addr("c"))
    core.tick(core.next_deadline())
    pings = [m for a, m in core.ready().packets if isinstance(m, Ping)]
    assert [p.target for p in pings] == ["c"]
    # Hearsay about ourselves is refuted like any suspicion.
    core.handle_stream(
        addr("r"),
        PushPull("r", addr("r"), False, (MemberSnapshot("me", addr("me"), "dead", 0),)),
        6.0,
    )
    assert core.incarnation == 1


def test_rule_periodic_push_pull_with_one_random_member() -> None:
    config = PLAIN.replace(push_pull_interval=3.0)
    wire = cluster("abc", config)
    before = sum(c.stats.push_pulls for c in wire.cores.values())
    wire.run(9.0)
    after = sum(c.stats.push_pulls for c in wire.cores.values())
    assert 6 <= after - before <= 12
    assert SwimConfig().push_pull_interval_for(32) == 30.0
    assert SwimConfig().push_pull_interval_for(200) == 30.0 * 4  # ceil(log2 200 - 5) + 1


def test_rule_meta_update_propagates_and_is_size_limited() -> None:
    wire = cluster("abc")
    meta = NodeMeta(zone="eu-1", region="eu", capabilities=("gpu",), capacity={"cpu": 8.0})
    wire.cores["a"].update_meta(meta, wire.now)
    wire.pump()
    wire.run(1.0)
    for o in "bc":
        m = wire.cores[o].member("a")
        assert m is not None and m.meta == meta and m.incarnation == 1
        assert wire.kinds(o, "a")[-1] == "updated"
    with pytest.raises(ValueError, match="limit"):
        wire.cores["a"].update_meta(NodeMeta(tags={"k": "v" * 600}), wire.now)
    with pytest.raises(ValueError):
        Swim("x", "x:1", config=PLAIN, rng=random.Random(1), now=0, meta=NodeMeta(zone="z" * 600))


# ---------------------------------------------------------------------------- garbage


def test_rule_bad_or_unexpected_input_is_counted_never_raised() -> None:
    core = lonely(PLAIN, ("b",))
    bad: list[object] = [
        "not a message",
        Ack(12345, "b"),  # stale sequence number
        Nack(777, "b"),  # nack for nothing
        Ping(1, "someone-else", "b", addr("b")),  # ping for another node
        Gossip("b", (Suspect("nobody", 0, "b"), Dead("nobody", 0, "b"))),  # unknown member
        Gossip("b", (Alive("me", "other:1", 50),)),  # about us, from another address
        Ping("seq", 5, None, 3),  # type: ignore[arg-type]  # hand-built with wrong types
        Gossip("b", ("junk",)),  # type: ignore[arg-type]
        Gossip("b", 5),  # type: ignore[arg-type]
        IndirectPing(1, "b", addr("b"), "b", addr("b"), True, gossip=None),  # type: ignore[arg-type]
    ]
    for msg in bad:
        core.handle_packet("x:1", msg, 1.0)  # type: ignore[arg-type]
    assert core.handle_stream("x:1", StreamAck(1, "b"), 1.0) is None
    assert core.handle_stream("x:1", StreamPing(1, "not-me", "b", addr("b")), 1.0) is None
    assert core.handle_stream("x:1", "garbage", 1.0) is None  # type: ignore[arg-type]
    core.stream_result(424242, None, 1.0)
    dropped = core.stats.dropped
    for reason in (
        "unexpected_type",
        "stale_ack",
        "stale_nack",
        "wrong_target",
        "unknown_member",
        "addr_conflict",
        "internal_error",
        "unknown_gossip",
        "unexpected_stream",
        "unknown_stream",
    ):
        assert dropped.get(reason, 0) >= 1, reason
    assert core.member("me").state == "alive"  # type: ignore[union-attr]


def test_rule_relay_of_indirect_ping_forwards_ack_or_nacks() -> None:
    core = lonely(PLAIN, ("t",))
    core.handle_packet(addr("r"), IndirectPing(5, "t", addr("t"), "r", addr("r"), True), 1.0)
    ping = next(m for a, m in core.ready().packets if isinstance(m, Ping))
    core.handle_packet(addr("t"), Ack(ping.seq, "t"), 1.01)
    fwd = core.ready().packets
    assert [(a, m.seq, m.source) for a, m in fwd if isinstance(m, Ack)] == [(addr("r"), 5, "t")]
    # Silent target: a nack after our probe timeout.
    core.handle_packet(addr("r"), IndirectPing(6, "t", addr("t"), "r", addr("r"), True), 2.0)
    core.ready()
    core.tick(2.0 + PLAIN.probe_timeout)
    nacks = [(a, m.seq, m.source) for a, m in core.ready().packets if isinstance(m, Nack)]
    assert nacks == [(addr("r"), 6, "me")]


# ---------------------------------------------------------------------------- config, wire


def test_presets_by_name_and_unknown_name() -> None:
    assert preset("lan") == SwimConfig.lan() == SwimConfig()
    assert preset("WAN") == SwimConfig.wan()
    assert preset("local").probe_interval < preset("lan").probe_interval
    with pytest.raises(ValueError, match="unknown membership preset 'moon'"):
        preset("moon")


@pytest.mark.parametrize(
    "changes",
    [
        {"probe_interval": 0.0},
        {"probe_timeout": 0.3, "direct_retries": 1, "probe_interval": 0.5},
        {"ring_probe_ratio": 1.5},
        {"suspicion_max_timeout_mult": 0.5},
        {"packet_budget": 100},
        {"max_meta_size": 2000},
        {"indirect_checks": -1},
    ],
)
def test_config_validation(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SwimConfig().replace(**changes)


def test_messages_round_trip_compactly() -> None:
    meta = NodeMeta(zone="z1", capabilities=("gpu",), capacity={"cpu": 4.0}, tags={"a": "b"})
    msgs: list[Message] = [
        Ping(1, "b", "a", addr("a"), (Suspect("b", 3, "c"),)),
        IndirectPing(2, "b", addr("b"), "a", addr("a"), True),
        Ack(3, "b", Coordinate((0.1,) * 8, 1.5, 0.0, 1e-5), (Alive("a", addr("a"), 1, meta),)),
        Nack(4, "c"),
        Gossip("a", (Dead("x", 2, "x"),)),
    ]
    dec = msgspec.msgpack.Decoder(Message)
    for msg in msgs:
        assert dec.decode(msgspec.msgpack.encode(msg)) == msg
    assert len(msgspec.msgpack.encode(Ping(1, "node-1", "node-2", "10.0.0.2:7946"))) < 40
    sdec = msgspec.msgpack.Decoder(StreamMessage)
    pp = PushPull("a", addr("a"), True, (MemberSnapshot("a", addr("a"), "alive", 0, meta),))
    assert sdec.decode(msgspec.msgpack.encode(pp)) == pp
    with pytest.raises(msgspec.ValidationError):
        dec.decode(msgspec.msgpack.encode(Suspect("x", -1, "y")))
