"""Leader leases never serve a stale read (thesis §6.4.1), at the edges a review found.

Deterministic: perfect clocks (no drift at all), the "lan" preset (election 0.3 s, heartbeat
0.05 s, clock_drift 0.1: a lease lasts 0.27 s from a quorum-acknowledged round). A small
network delivers, drops or holds each message as a test decides.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from agentcluster.consensus.raft import Entry, HardState, MemoryStorage, RaftNode
from agentcluster.consensus.raft.messages import AppendEntries, AppendEntriesResponse, TimeoutNow
from agentcluster.consensus.raft.presets import RAFT_PRESETS

CFG = RAFT_PRESETS["lan"]
IDS = ["a", "b", "c"]


class _ZeroRng(random.Random):
    """Election timeouts exactly ``election_timeout`` (the low end of the random range)."""

    def random(self) -> float:
        return 0.0


def _storage(n: int) -> MemoryStorage:
    return MemoryStorage(HardState(1, None, n), [Entry(1, k, b"x") for k in range(1, n + 1)])


class Net:
    def __init__(self, logs: dict[str, int]) -> None:
        self.storage = {i: _storage(n) for i, n in logs.items()}
        self.nodes = {
            i: RaftNode(i, IDS, config=CFG, rng=random.Random(k), now=0.0, storage=self.storage[i])
            for k, i in enumerate(IDS)
        }
        self.out: list[Any] = []
        self.reads: dict[str, list[tuple[int, int]]] = {i: [] for i in IDS}

    def process(self, i: str) -> None:
        n = self.nodes[i]
        rd = n.ready()
        self.storage[i].persist(rd.hard_state, rd.entries)
        self.out.extend(rd.messages)
        self.reads[i].extend(rd.read_states)
        n.advance(rd)

    def flush(
        self,
        now: float,
        keep: Callable[[Any], Any],
        hold: list[Any] | None = None,
        rounds: int = 50,
    ) -> None:
        """Process every node, deliver messages ``keep`` accepts (others are dropped, or put
        in ``hold`` when ``keep`` returns "hold"), until quiet."""
        for _ in range(rounds):
            for i in IDS:
                self.process(i)
            if not self.out:
                return
            batch, self.out = self.out, []
            for m in batch:
                k = keep(m)
                if k == "hold":
                    assert hold is not None
                    hold.append(m)
                elif k:
                    self.nodes[m.dst].step(m, now)
        raise AssertionError("not quiet")


def test_a_read_waiting_for_the_first_commit_is_not_admitted_on_an_expired_lease_6_4_1() -> None:
    # a and b hold entries 1-2, c only entry 1 (it will need probing). All committed at 2.
    net = Net({"a": 2, "b": 2, "c": 1})
    a, b = net.nodes["a"], net.nodes["b"]
    b._rng = _ZeroRng()  # b's election timer: exactly 0.3 s after its last leader contact
    t0 = 1.0
    # a is elected leader of term 2 at t0; its noop (index 3) goes out in round 1 (sent t0).
    a.tick(t0)
    held: list[Any] = []

    def first(m: Any) -> Any:
        if isinstance(m, AppendEntriesResponse) and m.src == "b" and m.dst == "a":
            return "hold"  # b's acknowledgement of the noop is delayed in the network
        # a's second probe to c is lost: c last hears from a at t0.
        lost = isinstance(m, AppendEntries) and m.dst == "c" and m.entries and m.prev_index < 2
        return not lost

    net.flush(t0, first, held)
    assert a.state == "leader" and a.term == 2 and a.commit_index == 2  # noop not committed
    assert len(held) == 1 and held[0].success and held[0].match_index == 3

    # a keeps heartbeating (its loop runs a little late once: 0.26 instead of 0.25); every
    # message from a is lost from now on. c's rejection keeps a through its check-quorum.
    for dt in (0.05, 0.10, 0.15, 0.20, 0.26, 0.30):
        a.tick(t0 + dt)
        net.flush(t0 + dt, lambda m: False)
    assert a.state == "leader"

    # b's and c's leases of a (last contact t0) end at t0 + 0.3: b is elected (term 3) and
    # commits a write W at index 5 with c. The write is acknowledged to its client.
    now = t0 + 0.301
    b.tick(now)
    net.flush(now, lambda m: m.dst != "a" and m.src != "a")
    assert b.state == "leader" and b.term == 3
    w = b.propose(b"W", now)
    net.flush(now, lambda m: m.dst != "a" and m.src != "a")
    assert b.commit_index >= w == 5

    # AFTER W completed, a client reads at a (still leader of term 2, noop uncommitted) ...
    now = t0 + 0.303
    assert a.read_index(42, now)
    net.process("a")
    # ... and b's delayed acknowledgement of the noop arrives: a commits index 3.
    now = t0 + 0.304
    a.step(held[0], now)
    net.process("a")
    # At this real time a's lease (round 1, sent t0: valid until t0 + 0.27) has expired,
    # and indeed another leader exists. a must not answer the read from its own state
    # (it must confirm with a quorum, which it can no longer get).
    assert not a.lease_valid(now)
    served = [idx for rid, idx in net.reads["a"] if rid == 42]
    assert not served, (
        f"stale read: a served read 42 at index {served} under an expired lease, after "
        f"leader b (term 3) had committed write W at index {w}"
    )


def test_a_late_timeout_now_after_an_abandoned_transfer_cannot_meet_a_lease_read_3_10() -> None:
    """A leadership transfer that timed out must not leave a TimeoutNow able to elect
    another leader while the old leader serves lease reads."""
    net = Net({"a": 2, "b": 2, "c": 2})
    a, b = net.nodes["a"], net.nodes["b"]
    t0 = 1.0
    a.tick(t0)
    net.flush(t0, lambda m: True)
    assert a.state == "leader" and a.commit_index == 3
    # a hands leadership to b; the TimeoutNow is delayed (b's loop is stalled, say).
    assert a.transfer_leadership("b", t0)
    late: list[Any] = []
    net.flush(t0, lambda m: "hold" if isinstance(m, TimeoutNow) else True, late)
    assert len(late) == 1
    # The transfer times out after an election timeout; a keeps heartbeating, b and c ack.
    now = t0
    while now < t0 + 0.5:
        now = round(now + 0.05, 3)
        a.tick(now)
        net.flush(now, lambda m: not isinstance(m, TimeoutNow))
    assert a.state == "leader" and a._transferee is None
    # b finally processes the TimeoutNow: it campaigns with the transfer flag; c (which heard
    # from a 0 s ago) grants, skipping its lease check. a hears nothing of it yet.
    b.step(late[0], now)
    net.flush(now, lambda m: m.dst != "a" and m.src != "a")
    assert b.state == "leader" and b.term == 3  # a TimeoutNow cannot be refused: no clock
    w = b.propose(b"W", now)
    net.flush(now, lambda m: m.dst != "a" and m.src != "a")
    assert b.commit_index >= w
    # After W committed, a still believes its lease holds and serves a read at once.
    now = round(now + 0.01, 3)
    a.read_index(7, now)
    net.process("a")
    served = [idx for rid, idx in net.reads["a"] if rid == 7]
    assert not served, (
        f"stale read: a (term {a.term}) served read 7 at index {served} from its lease "
        f"while b leads term {b.term} and committed W at index {w}"
    )
