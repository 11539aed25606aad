"""Raft core features beyond the basic algorithm; each test names the rule it checks.

"thesis" is Ongaro's dissertation: membership changes §4.1 (single-server) and §4.2.3
(disruptive servers), leadership transfer §3.10, linearizable reads §6.4 (ReadIndex) and
§6.4.1 (leases); "§7" is log compaction in the Raft paper.
"""

from __future__ import annotations

import msgspec
import pytest

from agentcluster.consensus.raft import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfState,
    InstallSnapshot,
    Message,
    RaftConfig,
    RequestVote,
    Snapshot,
    SnapshotChunk,
    SnapshotChunkAck,
    TimeoutNow,
    decode_message,
    encode_message,
)
from raft_harness import CFG, Cluster

NO_LEASE = RaftConfig(lease_reads=False)


def commit(c: Cluster, data: bytes) -> int:
    leader = c.leader()
    assert leader is not None
    index = leader.propose(data, c.now)
    assert index is not None
    c.deliver()
    assert leader.commit_index >= index
    return index


# ----------------------------------------------------------------------------- snapshots §7


def test_snapshot_compacts_log_and_node_restarts_from_it_7() -> None:
    """§7: a node snapshots its state machine, compacts its log, and after a crash rebuilds
    from snapshot + remaining entries with the same applied state."""
    c = Cluster(3)
    c.elect("n1")
    for k in range(10):
        commit(c, b"w%d" % k)
    c.take_snapshot("n2", keep=2)
    n2 = c.nodes["n2"]
    assert n2.log.offset == n2.applied_index - 2 and n2.snapshot is not None
    before = list(c.applied["n2"])
    c.crash("n2")
    c.restart("n2")
    c.advance_time(c.now + 0.5)
    assert c.applied["n2"][: len(before)] == before
    assert c.nodes["n2"].log.offset == c.storage["n2"].entries[0].index - 1


def _lagging_n3(c: Cluster, *, then_commit: int = 0) -> None:
    """n3 down while n1 commits 20 entries and snapshots (compacting them), then commits
    ``then_commit`` more; n3 back, far behind."""
    c.elect("n1")
    c.crash("n3")
    for k in range(20):
        commit(c, b"w%d" % k)
    c.take_snapshot("n1")
    for k in range(then_commit):
        commit(c, b"x%d" % k)
    c.restart("n3")


def test_lagging_follower_catches_up_through_install_snapshot_7() -> None:
    """§7: entries a follower needs were compacted by the leader, so the leader sends its
    snapshot; the follower replaces its log, restores its state machine and then follows."""
    c = Cluster(3)
    _lagging_n3(c)
    sent: list[Message] = []

    def spy(m: Message) -> bool:
        sent.append(m)
        return True

    c.advance_time(c.now + 1.0, keep=spy)
    assert any(isinstance(m, InstallSnapshot) and m.dst == "n3" for m in sent)
    commit(c, b"after")
    assert c.applied["n3"] == c.applied["n1"]
    assert c.storage["n3"].snapshot is not None
    assert c.nodes["n3"].snapshot == c.storage["n3"].snapshot


def test_install_snapshot_fast_forwards_when_follower_holds_the_entry_7() -> None:
    """§7: a follower that already holds the snapshot's last entry (same term) keeps its log
    and only advances its commit index; an older snapshot changes nothing."""
    c = Cluster(3)
    leader = c.elect("n1")
    commit(c, b"a")
    commit(c, b"b")
    c.take_snapshot("n1")
    snap = leader.snapshot
    assert snap is not None
    n2 = c.nodes["n2"]
    entries = list(n2.log.entries)
    n2.step(InstallSnapshot(leader.term, "n1", "n2", snap), c.now)
    rd = n2.ready()
    assert rd.snapshot is None and n2.log.entries == entries
    (resp,) = rd.messages
    assert isinstance(resp, AppendEntriesResponse) and resp.success
    assert resp.match_index == n2.commit_index >= snap.index


CHUNKED = RaftConfig(election_timeout=1.0, heartbeat_interval=0.1, snapshot_chunk_bytes=16)


def test_a_snapshot_larger_than_a_chunk_travels_in_pieces_7() -> None:
    """§7 (InstallSnapshot with offset): a snapshot over ``snapshot_chunk_bytes`` goes as
    pieces, one at a time, each acknowledged with the offset wanted next; the follower installs
    the same bytes as a whole InstallSnapshot would have carried."""
    c = Cluster(3, config=CHUNKED)
    _lagging_n3(c)
    snap = c.nodes["n1"].snapshot
    assert snap is not None and len(snap.data) > 3 * 16
    sent: list[Message] = []

    def spy(m: Message) -> bool:
        sent.append(m)
        return True

    c.advance_time(c.now + 1.0, keep=spy)
    pieces = [m for m in sent if isinstance(m, SnapshotChunk) and m.dst == "n3"]
    acks = [m.received for m in sent if isinstance(m, SnapshotChunkAck)]
    assert not any(isinstance(m, InstallSnapshot) for m in sent)
    assert [m.offset for m in pieces] == list(range(0, len(snap.data), 16))
    assert all(len(m.snapshot.data) <= 16 and m.total == len(snap.data) for m in pieces)
    assert acks == [m.offset + 16 for m in pieces[:-1]]  # the last is answered as a whole
    assert c.nodes["n3"].snapshot == snap
    commit(c, b"after")
    assert c.applied["n3"] == c.applied["n1"]


def test_a_lost_piece_is_sent_again_from_where_the_follower_stands_7() -> None:
    """§7: a lost piece stalls the transfer until the leader gives up waiting (an election
    timeout) and starts again; the follower answers the restart with the offset it holds, so
    nothing it has is sent twice more."""
    c = Cluster(3, config=CHUNKED)
    _lagging_n3(c)
    sent: list[Message] = []
    lost: list[SnapshotChunk] = []

    def lose_one(m: Message) -> bool:
        if isinstance(m, SnapshotChunk) and m.offset == 32 and not lost:
            lost.append(m)
            return False
        sent.append(m)
        return True

    c.advance_time(c.now + 3.0, keep=lose_one)
    assert lost
    offsets = [m.offset for m in sent if isinstance(m, SnapshotChunk)]
    assert offsets[:3] == [0, 16, 0]  # the retry starts over ...
    assert offsets[3] == 32  # ... and the follower's answer skips what it has
    assert c.nodes["n3"].snapshot == c.nodes["n1"].snapshot
    commit(c, b"after")
    assert c.applied["n3"] == c.applied["n1"]


def _chunked_transfer() -> tuple[Cluster, Snapshot, int]:
    """A cluster about to send n3 its snapshot in pieces: the snapshot and how many."""
    c = Cluster(3, config=CHUNKED)
    _lagging_n3(c)
    snap = c.nodes["n1"].snapshot
    assert snap is not None
    return c, snap, -(-len(snap.data) // 16)


def test_a_duplicated_piece_never_starts_a_second_stream_of_pieces_7() -> None:
    """§7: only the answer to the piece in flight moves a transfer on, so a piece the network
    delivers twice is answered twice but sent on once."""
    c, snap, pieces = _chunked_transfer()
    sent: list[SnapshotChunk] = []

    def duplicate_one(m: Message) -> bool:
        if isinstance(m, SnapshotChunk) and m.dst == "n3":
            sent.append(m)
            if m.offset == 16 and len(sent) == 2:
                c.pending.append(m)  # delivered twice
        return True

    c.advance_time(c.now + 1.0, keep=duplicate_one)
    assert c.nodes["n3"].snapshot == snap
    # The piece at 16 passes twice (the duplicate); every other piece once.
    assert [m.offset for m in sent] == [0, 16, *range(16, len(snap.data), 16)]
    assert len(sent) == pieces + 1


def test_an_answer_later_than_the_give_up_timeout_never_doubles_the_transfer_7() -> None:
    """§7: the leader gives up waiting and starts over at 0; the follower answers with the
    offset it holds, and the late answer to the earlier piece, landing after, is ignored."""
    c, snap, pieces = _chunked_transfer()
    sent: list[SnapshotChunk] = []
    held: list[Message] = []

    def slow_answer(m: Message) -> bool:
        if isinstance(m, SnapshotChunk) and m.dst == "n3":
            sent.append(m)
            if m.offset == 0 and len(held) == 1:
                held.append(m)
                c.pending.append(held[0])  # the slow answer lands after the restart
        if isinstance(m, SnapshotChunkAck) and m.received == 32 and not held:
            held.append(m)  # delayed past the give-up timeout, not lost
            return False
        return True

    c.advance_time(c.now + 2.5, keep=slow_answer)
    assert len(held) == 2 and c.nodes["n3"].snapshot == snap
    offsets = [m.offset for m in sent]
    assert offsets[:4] == [0, 16, 0, 32] and len(sent) == pieces + 1  # only piece 0 twice


def test_a_transfer_keeps_to_the_snapshot_it_began_with_7() -> None:
    """§7: a newer snapshot taken mid-transfer does not restart the transfer (a transfer
    slower than the snapshots would never end); the follower goes on from the one it got."""
    c = Cluster(3, config=CHUNKED)
    _lagging_n3(c, then_commit=10)
    first = c.nodes["n1"].snapshot
    assert first is not None
    sent: list[SnapshotChunk] = []

    def snapshot_midway(m: Message) -> bool:
        if isinstance(m, SnapshotChunk) and m.dst == "n3":
            sent.append(m)
            if m.offset == 64 and c.nodes["n1"].snapshot == first:
                c.take_snapshot("n1", keep=3)  # newer, and the log behind it compacted
        return True

    c.advance_time(c.now + 3.0, keep=snapshot_midway)
    newer = c.nodes["n1"].snapshot
    assert newer is not None and newer.index > first.index
    of_first = [m.offset for m in sent if m.snapshot.index == first.index]
    assert of_first == list(range(0, len(first.data), 16))  # never restarted
    commit(c, b"after")
    assert c.applied["n3"] == c.applied["n1"]


def test_a_piece_of_a_snapshot_the_follower_holds_nothing_of_is_answered_with_0_7() -> None:
    c = Cluster(3)
    leader = c.elect("n1")
    commit(c, b"a")
    n2 = c.nodes["n2"]
    part = Snapshot(50, leader.term, leader.conf, b"x" * 8)
    n2.step(SnapshotChunk(leader.term, "n1", "n2", part, 8, 24), c.now)
    (ack,) = n2.ready().messages
    assert isinstance(ack, SnapshotChunkAck) and (ack.index, ack.received) == (50, 0)
    n2.step(SnapshotChunk(leader.term, "n1", "n2", part, 0, 24), c.now)
    n2.step(SnapshotChunk(leader.term, "n1", "n2", part, 0, 24), c.now)  # repeated
    first, again = n2.ready().messages
    assert isinstance(first, SnapshotChunkAck) and first.received == 8
    assert isinstance(again, SnapshotChunkAck) and again.received == 8
    assert n2.snapshot is None or n2.snapshot.index < 50  # nothing installed from pieces


# ----------------------------------------------------------------------------- membership §4.1


def add_node(c: Cluster, new: str, op: str = "add_learner") -> None:
    leader = c.leader()
    assert leader is not None
    c.add(new)
    assert leader.propose_conf_change(ConfChange(op, new), c.now) is not None  # type: ignore[arg-type]
    c.deliver()


def test_learner_receives_log_but_does_not_vote_or_count_4_2_1() -> None:
    """Thesis §4.2.1: a new server joins as a non-voting learner; it catches up without
    changing the quorum, then is promoted to voter."""
    c = Cluster(3)
    leader = c.elect("n1")
    commit(c, b"x")
    add_node(c, "n4")
    assert leader.conf == ConfState(("n1", "n2", "n3"), ("n4",))
    c.advance_time(c.now + 0.5)
    assert c.applied["n4"] == c.applied["n1"]
    assert c.nodes["n4"].conf == leader.conf
    # Two voters down: the learner cannot help commit.
    c.crash("n2")
    c.crash("n3")
    idx = leader.propose(b"needs-quorum", c.now)
    assert idx is not None
    c.deliver()
    assert leader.commit_index < idx
    c.restart("n2")
    c.advance_time(c.now + 1.0)
    assert leader.commit_index >= idx
    # Promotion.
    assert leader.propose_conf_change(ConfChange("add_voter", "n4"), c.now) is not None
    c.deliver()
    assert leader.voters == ("n1", "n2", "n3", "n4") and leader.learners == ()


def test_one_membership_change_at_a_time_after_commit_in_term_4_1() -> None:
    """Thesis §4.1 (and the 2015 single-server fix): one change at a time, and only once the
    leader has committed an entry of its own term."""
    c = Cluster(3)
    c.fire("n1")
    c.deliver(keep=lambda m: not isinstance(m, AppendEntries))
    leader = c.nodes["n1"]
    assert leader.state == "leader" and leader.commit_index == 0
    assert leader.propose_conf_change(ConfChange("add_learner", "n4"), c.now) is None
    c.advance_time(c.now + 0.2)  # the next heartbeat probe commits the no-op
    assert leader.propose_conf_change(ConfChange("add_learner", "n4"), c.now) is not None
    assert leader.propose_conf_change(ConfChange("add_learner", "n5"), c.now) is None
    with pytest.raises(ValueError, match="changes nothing"):
        c.deliver()
        leader.propose_conf_change(ConfChange("add_learner", "n4"), c.now)


def test_removed_follower_cannot_disrupt_4_2_3() -> None:
    """Thesis §4.2.3: after its removal a server's vote requests are dropped; the remaining
    two voters keep committing."""
    c = Cluster(3)
    leader = c.elect("n1")
    assert leader.propose_conf_change(ConfChange("remove", "n3"), c.now) is not None
    c.deliver()
    assert leader.voters == ("n1", "n2")
    n2 = c.nodes["n2"]
    n2.step(RequestVote(leader.term + 5, "n3", "n2", 99, 99), c.now + 10)
    assert n2.term == leader.term and n2.dropped >= 1
    c.crash("n3")
    commit(c, b"two-voters")


def test_removed_leader_steps_down_after_commit_4_2_2() -> None:
    """Thesis §4.2.2: a leader removed from the configuration steps down once the change is
    committed; the rest elect a new leader."""
    c = Cluster(3)
    leader = c.elect("n1")
    assert leader.propose_conf_change(ConfChange("remove", "n1"), c.now) is not None
    c.deliver()
    assert leader.state == "follower" and "n1" not in leader.voters
    c.advance_time(c.now + 3.0)
    new = c.leader()
    assert new is not None and new.id in ("n2", "n3") and new.voters == ("n2", "n3")


def test_cannot_remove_last_voter() -> None:
    c = Cluster(1)
    leader = c.elect("n1")
    commit(c, b"x")
    with pytest.raises(ValueError, match="last voter"):
        leader.propose_conf_change(ConfChange("remove", "n1"), c.now)


# ----------------------------------------------------------------------------- reads §6.4


def test_read_index_waits_for_a_quorum_round_6_4() -> None:
    """Thesis §6.4: ReadIndex records the commit index and releases the read only after a
    quorum acknowledged a heartbeat round started after the request."""
    c = Cluster(3, config=NO_LEASE)
    leader = c.elect("n1")
    commit(c, b"x")
    assert leader.read_index(7, c.now)
    rd = c.process("n1")
    assert rd.read_states == []
    assert any(isinstance(m, AppendEntries) and m.seq == leader._seq for m in rd.messages)
    c.deliver()
    assert c.reads["n1"] == [(7, leader.commit_index)]


def test_deposed_leader_never_serves_a_stale_read_6_4() -> None:
    """Thesis §6.4: a leader cut off from the majority cannot confirm a round, so its read is
    never released while the majority elects a leader and commits new writes."""
    c = Cluster(3, config=NO_LEASE)
    old = c.elect("n1")
    commit(c, b"x")
    c.group["n1"] = 1
    assert old.read_index(1, c.now)
    c.advance_time(c.now + 5.0)
    new = c.leader()
    assert new is not None and new.id != "n1"
    commit(c, b"newer")
    assert c.reads["n1"] == []
    assert old.state != "leader"  # check-quorum deposed it; the read died with it


def test_lease_read_answers_at_once_and_expires_6_4_1() -> None:
    """Thesis §6.4.1: within election_timeout * (1 - drift) of a quorum-acknowledged round
    the leader answers at once; once the lease runs out it falls back to ReadIndex."""
    c = Cluster(3)
    leader = c.elect("n1")
    commit(c, b"x")
    assert leader.lease_valid(c.now)
    assert leader.read_index(1, c.now)
    c.process("n1")
    assert c.reads["n1"] == [(1, leader.commit_index)]
    c.group["n1"] = 1
    late = c.now + CFG.election_timeout * (1 - CFG.clock_drift) + 0.01
    assert not leader.lease_valid(late)
    assert leader.read_index(2, late)
    c.process("n1")
    assert c.reads["n1"] == [(1, leader.commit_index)]


def test_read_waits_for_first_commit_of_the_term_6_4() -> None:
    """Thesis §6.4: a new leader does not know the commit index until it commits an entry
    of its term (its no-op); reads wait for it."""
    c = Cluster(3, config=NO_LEASE)
    c.fire("n1")
    c.deliver(keep=lambda m: not isinstance(m, AppendEntries))
    leader = c.nodes["n1"]
    assert leader.state == "leader" and leader.read_index(3, c.now)
    c.process("n1")
    assert c.reads["n1"] == []
    c.advance_time(c.now + 0.2)  # the next heartbeat probe commits the no-op
    assert c.reads["n1"] == [(3, 1)] and leader.commit_index >= 1


def test_lease_config_requires_check_quorum() -> None:
    with pytest.raises(ValueError, match="check_quorum"):
        RaftConfig(check_quorum=False)


# ----------------------------------------------------------------------------- transfer §3.10


def test_leadership_transfer_3_10() -> None:
    """Thesis §3.10: the leader stops taking proposals, brings the target up to date, sends
    TimeoutNow; the target wins the next term at once even though the leader was live."""
    c = Cluster(3)
    leader = c.elect("n1")
    commit(c, b"x")
    c.crash("n3")
    commit(c, b"y")
    c.restart("n3")
    assert leader.transfer_leadership("n3", c.now)
    assert leader.propose(b"refused", c.now) is None
    assert not leader.lease_valid(c.now)
    sent: list[Message] = []

    def spy(m: Message) -> bool:
        sent.append(m)
        return True

    c.advance_time(c.now + 0.3, keep=spy)
    assert any(isinstance(m, TimeoutNow) and m.dst == "n3" for m in sent)
    n3 = c.nodes["n3"]
    assert n3.state == "leader" and n3.term == leader.term and leader.state == "follower"
    assert c.applied["n3"][-1].data == b"y" or any(e.data == b"y" for e in n3.log.entries)


def test_leadership_transfer_aborts_after_election_timeout_3_10() -> None:
    c = Cluster(3)
    leader = c.elect("n1")
    commit(c, b"x")
    c.group["n2"] = 1
    assert leader.transfer_leadership("n2", c.now)
    c.advance_time(c.now + CFG.election_timeout + 0.2, keep=lambda m: m.dst != "n2")
    assert leader.state == "leader" and leader.propose(b"back", c.now) is not None


def test_transfer_refused_for_non_voter_or_self() -> None:
    c = Cluster(3)
    leader = c.elect("n1")
    assert not leader.transfer_leadership("n1", c.now)
    assert not leader.transfer_leadership("nobody", c.now)
    assert not c.nodes["n2"].transfer_leadership("n3", c.now)


# ----------------------------------------------------------------------------- wire


def test_new_messages_roundtrip() -> None:
    c = Cluster(3)
    leader = c.elect("n1")
    commit(c, b"x")
    c.take_snapshot("n1")
    assert leader.snapshot is not None
    for m in (
        InstallSnapshot(2, "a", "b", leader.snapshot, 4),
        TimeoutNow(2, "a", "b"),
        RequestVote(3, "a", "b", 1, 1, transfer=True),
        AppendEntries(2, "a", "b", 0, 0, (), 0, 9),
    ):
        assert decode_message(encode_message(m)) == m
    with pytest.raises(msgspec.ValidationError):
        decode_message(msgspec.msgpack.encode(["tn", 1, "", "b"]))


def test_commit_delay_rides_on_next_append_or_a_late_empty_one() -> None:
    """A new commit index waits ``commit_delay`` for an append to carry it; without one an
    empty append tells the followers when the delay is up -- never later."""
    cfg = RaftConfig(election_timeout=1.0, heartbeat_interval=0.1, commit_delay=0.01)
    c = Cluster(3, config=cfg)
    leader = c.elect("n1")
    c.advance_time(c.now + 0.05)
    index = leader.propose(b"x", c.now)
    assert index is not None
    c.deliver()
    assert leader.commit_index == index
    assert c.nodes["n2"].commit_index < index  # not told yet: no extra message was sent
    assert leader.next_deadline() <= c.now + 0.01
    c.advance_time(c.now + 0.011)
    assert c.nodes["n2"].commit_index == index and c.nodes["n3"].commit_index == index
    with pytest.raises(ValueError, match="commit_delay"):
        RaftConfig(heartbeat_interval=0.1, commit_delay=0.2)


def test_steady_writes_carry_every_commit_index_without_an_empty_append() -> None:
    """Writes closer together than ``commit_delay``: each new commit index rides on the next
    write's append, and the delay restarts from the commit it waits for -- so between
    heartbeats no empty append is sent, yet the last commit still reaches the followers
    within ``commit_delay``."""
    cfg = RaftConfig(election_timeout=1.0, heartbeat_interval=0.1, commit_delay=0.01)
    c = Cluster(3, config=cfg)
    leader = c.elect("n1")
    c.advance_time(c.now + 0.1)  # just past a heartbeat: the next is 0.1 s away
    empty: list[AppendEntries] = []

    def watch(m: Message) -> bool:
        if isinstance(m, AppendEntries) and not m.entries:
            empty.append(m)
        return True

    index = 0
    for k in range(12):
        c.advance_time(c.now + 0.006, watch)
        proposed = leader.propose(b"w%d" % k, c.now)
        assert proposed is not None
        index = proposed
        c.deliver(watch)
        assert leader.commit_index == index
    assert empty == []
    assert c.nodes["n2"].commit_index == index - 1  # carried by the last append
    c.advance_time(c.now + 0.011, watch)
    assert c.nodes["n2"].commit_index == index and c.nodes["n3"].commit_index == index
    assert empty  # the last commit index needed one, and got it in time
