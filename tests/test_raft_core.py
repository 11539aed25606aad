"""Tests of the sans-I/O Raft core; each names the rule of the Raft paper it checks.

§ numbers refer to Ongaro & Ousterhout, "In Search of an Understandable Consensus Algorithm"
(extended version); "thesis" to Ongaro's dissertation (pre-vote §9.6, check-quorum §6.2,
disruptive servers §4.2.3).

:class:`Cluster` is a deterministic harness, used both by hand (deliver exactly the messages a
scenario needs) and as a randomized simulation (seeded loss, duplication, reordering,
partitions and crashes; a crash rebuilds the node from its :class:`MemoryStorage`).
"""

from __future__ import annotations

import heapq
import random

import msgspec
import pytest

from agentcluster.consensus.raft import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    HardState,
    Message,
    RaftConfig,
    RaftNode,
    RequestVote,
    RequestVoteResponse,
    decode_message,
    encode_message,
)
from raft_harness import CFG, Cluster, lone_node, make_storage

# ----------------------------------------------------------------------------- elections


def test_election_timeouts_randomized_5_2() -> None:
    """§5.2: election timeouts are random in [T, 2T), drawn from the caller's rng."""
    delays = []
    for seed in range(200):
        node = RaftNode("a", ["b", "c"], config=CFG, rng=random.Random(seed), now=10.0)
        d = node.next_deadline() - 10.0
        assert CFG.election_timeout <= d < 2 * CFG.election_timeout
        delays.append(d)
    assert len(set(delays)) == 200
    assert max(delays) - min(delays) > 0.8
    again = RaftNode("a", ["b", "c"], config=CFG, rng=random.Random(7), now=10.0)
    assert again.next_deadline() - 10.0 == delays[7]


def test_leader_election_appends_noop_5_2_and_8() -> None:
    """§5.2 a candidate with a majority of votes leads; §8 it appends a no-op of its term."""
    c = Cluster(3)
    leader = c.elect("n1")
    assert leader.term == 1 and leader.log.entries == [Entry(1, 1, b"", "noop")]
    for n in c.nodes.values():
        assert n.term == 1 and n.leader_id == "n1" and n.commit_index == 1
    assert [e.kind for e in c.applied["n2"]] == ["noop"]


def test_single_node_cluster_commits_alone_5_2() -> None:
    """§5.2/§5.3 with one voter: the node elects itself and commits once its log is durable."""
    node = RaftNode("solo", [], config=CFG, rng=random.Random(0), now=0.0)
    node.tick(node.next_deadline())
    assert node.state == "leader" and node.term == 1
    idx = node.propose(b"x", 5.0)
    assert idx == 2
    rd = node.ready()
    assert [e.index for e in rd.entries] == [1, 2] and rd.committed == []
    node.advance(rd)
    assert [e.data for e in node.ready().committed] == [b"", b"x"]


def test_vote_at_most_once_per_term_5_2() -> None:
    """§5.2: each server votes for at most one candidate in a given term."""
    node = lone_node()
    node.step(RequestVote(5, "b", "a", 0, 0), 0.1)
    node.step(RequestVote(5, "c", "a", 0, 0), 0.2)
    node.step(RequestVote(5, "b", "a", 0, 0), 0.3)  # a retransmission is granted again
    rd = node.ready()
    assert [(m.dst, m.granted) for m in rd.messages if isinstance(m, RequestVoteResponse)] == [
        ("b", True),
        ("c", False),
        ("b", True),
    ]
    assert node.vote == "b" and node.term == 5


def test_vote_denied_to_less_up_to_date_log_5_4_1() -> None:
    """§5.4.1: a vote is granted only if the candidate's log is at least as up to date."""
    cases = [((1, 5), False), ((2, 1), False), ((2, 2), True), ((3, 1), True)]
    for (last_term, last_index), expect in cases:
        node = lone_node(storage=make_storage([1, 2], term=2))
        # A restarted node refuses votes for one election timeout (lease safety), so ask later.
        node.step(RequestVote(3, "b", "a", last_index, last_term), CFG.election_timeout)
        (resp,) = node.ready().messages
        assert isinstance(resp, RequestVoteResponse) and resp.granted is expect, (
            last_term,
            last_index,
        )


def test_term_rules_5_1() -> None:
    """§5.1: a newer term makes a server a follower; a stale-term request is rejected."""
    c = Cluster(3)
    leader = c.elect("n1")
    leader.step(AppendEntriesResponse(7, "n2", "n1", False), c.now)
    assert leader.state == "follower" and leader.term == 7 and leader.vote is None
    leader.step(AppendEntries(3, "n3", "n1", 0, 0, (), 0), c.now)
    (resp,) = leader.ready().messages
    assert isinstance(resp, AppendEntriesResponse) and not resp.success and resp.term == 7


# ----------------------------------------------------------------------------- pre-vote, check-quorum


def _isolate(c: Cluster, i: str) -> None:
    c.group[i] = 1


def test_pre_vote_rejoining_node_does_not_disrupt_leader_9_6() -> None:
    """Thesis §9.6: a partitioned node's pre-votes fail, so it never bumps its term and,
    rejoining, does not depose the stable leader."""
    c = Cluster(3, seed=3)
    leader = c.elect("n1")
    term = leader.term
    _isolate(c, "n3")
    c.advance_time(c.now + 20.0)
    assert c.nodes["n3"].state == "pre_candidate" and c.nodes["n3"].term == term
    c.group["n3"] = 0
    c.advance_time(c.now + 5.0)
    assert leader.state == "leader" and leader.term == term
    assert {i: (n.state, n.leader_id) for i, n in c.nodes.items()} == {
        "n1": ("leader", "n1"),
        "n2": ("follower", "n1"),
        "n3": ("follower", "n1"),
    }


def test_without_pre_vote_rejoining_node_disrupts_leader_9_6() -> None:
    """Thesis §9.6 (the problem pre-vote solves): without it the rejoining node's inflated
    term deposes the leader."""
    c = Cluster(3, seed=3, config=RaftConfig(pre_vote=False, check_quorum=False, lease_reads=False))
    leader = c.elect("n1")
    term = leader.term
    _isolate(c, "n3")
    c.advance_time(c.now + 20.0)
    assert c.nodes["n3"].term > term + 5
    c.group["n3"] = 0
    c.advance_time(c.now + 5.0)
    assert max(n.term for n in c.nodes.values()) > term + 5
    assert c.leaders.get(term) == "n1" and leader.term > term


def test_pre_vote_request_changes_no_state_9_6() -> None:
    """Thesis §9.6: answering a pre-vote changes neither the receiver's term nor its vote;
    a grant carries the proposed term, so the pre-candidate can count it."""
    node = lone_node(storage=make_storage([1], term=1))
    node.step(RequestVote(2, "b", "a", 1, 1, pre_vote=True), 5.0)
    node.step(RequestVote(2, "c", "a", 1, 1, pre_vote=True), 5.0)
    rd = node.ready()
    assert rd.hard_state is None and rd.entries == []
    assert rd.messages == [
        RequestVoteResponse(2, "a", "b", True, True),
        RequestVoteResponse(2, "a", "c", True, True),
    ]
    assert node.term == 1 and node.vote is None
    node.step(RequestVote(2, "b", "a", 0, 0, pre_vote=True), 5.0)
    (resp,) = node.ready().messages
    assert isinstance(resp, RequestVoteResponse) and not resp.granted and resp.term == 1


def test_pre_candidates_of_one_round_do_not_split_the_vote_9_6() -> None:
    """Thesis §9.6, liveness: two pre-candidates of the same round that granted each other
    would both start a real election and split its votes (a second round of timeouts). Only
    the one ranked first -- the more up-to-date log, then the smaller id -- gets the other's
    pre-vote; a pre-vote binds nothing, so the refusal is safe."""

    def pre_candidate(name: str) -> RaftNode:
        node = RaftNode(
            name,
            ["a", "b", "c"],
            config=CFG,
            rng=random.Random(1),
            now=0.0,
            storage=make_storage([1], term=1),
        )
        node.tick(node.next_deadline())
        assert node.state == "pre_candidate"
        node.ready()
        return node

    def answer(node: RaftNode, msg: RequestVote) -> bool:
        node.step(msg, node.next_deadline() - 0.01)
        (resp,) = node.ready().messages
        assert isinstance(resp, RequestVoteResponse) and resp.pre_vote
        return resp.granted

    a, b = pre_candidate("a"), pre_candidate("b")
    assert answer(b, RequestVote(2, "a", "b", 1, 1, pre_vote=True))  # a ranks first
    assert not answer(a, RequestVote(2, "b", "a", 1, 1, pre_vote=True))
    assert answer(a, RequestVote(2, "b", "a", 2, 1, pre_vote=True))  # a longer log wins
    assert not answer(b, RequestVote(2, "a", "b", 0, 0, pre_vote=True))  # as ever: not behind
    assert a.term == b.term == 1 and a.vote is None and b.vote is None
    # A follower still grants whoever is up to date, whatever its id.
    follower = lone_node(storage=make_storage([1], term=1))
    follower.step(RequestVote(2, "c", "a", 1, 1, pre_vote=True), 5.0)
    (resp,) = follower.ready().messages
    assert isinstance(resp, RequestVoteResponse) and resp.granted


def test_vote_ignored_while_leader_is_live_4_2_3() -> None:
    """Thesis §4.2.3: a server that heard from a leader within the election timeout ignores
    RequestVote for a higher term (no term change, no reply)."""
    c = Cluster(3)
    c.elect("n1")
    n2 = c.nodes["n2"]
    n2.step(RequestVote(9, "n3", "n2", 10, 9), c.now + 0.5)
    assert n2.term == 1 and n2.ready().messages == []
    n2.step(RequestVote(9, "n3", "n2", 10, 9), c.now + 1.5)
    assert n2.term == 9 and n2.vote == "n3"


def test_check_quorum_isolated_leader_steps_down_6_2() -> None:
    """Thesis §6.2: a leader that has not heard from a majority within an election timeout
    steps down (and does so within two timeouts)."""
    c = Cluster(3, seed=1)
    leader = c.elect("n1")
    cut = c.now
    _isolate(c, "n1")
    c.advance_time(
        cut + 2 * CFG.election_timeout + 0.01, keep=lambda m: m.src != "n1" and m.dst != "n1"
    )
    assert leader.state == "follower" and leader.leader_id is None
    c2 = Cluster(3, seed=1, config=RaftConfig(check_quorum=False, lease_reads=False))
    leader2 = c2.elect("n1")
    _isolate(c2, "n1")
    c2.advance_time(c2.now + 10.0)
    assert leader2.state == "leader"


# ----------------------------------------------------------------------------- replication


def test_batching_and_pipelining_5_3() -> None:
    """§5.3: entries go out in batches of at most max_entries_per_append, several batches in
    flight before any acknowledgement, bounded by max_inflight."""
    cfg = RaftConfig(max_entries_per_append=3, max_inflight=2)
    c = Cluster(3, config=cfg)
    leader = c.elect("n1")
    for k in range(10):
        leader.propose(f"p{k}".encode(), c.now)
    rd = c.process("n1")
    to_n2 = [m for m in rd.messages if isinstance(m, AppendEntries) and m.dst == "n2"]
    assert [[e.index for e in m.entries] for m in to_n2] == [[2, 3, 4], [5, 6, 7]]
    assert [m.prev_index for m in to_n2] == [1, 4]
    c.pending.clear()
    for m in to_n2:
        c.nodes["n2"].step(m, c.now)
    c.deliver()
    assert leader.commit_index == 11
    assert [e.data for e in c.applied["n3"][1:]] == [f"p{k}".encode() for k in range(10)]


def test_appends_are_bounded_in_bytes_with_at_least_one_entry_5_3() -> None:
    """§5.3 batching, bounded by size too: a follower catching up on large entries gets
    messages of at most max_append_bytes of entry data, except that a single larger entry
    still travels alone -- replication never stalls on a frame that is too big to send."""
    cfg = RaftConfig(max_entries_per_append=10, max_append_bytes=250, max_inflight=10)
    c = Cluster(3, config=cfg)
    leader = c.elect("n1")
    sizes = [100, 100, 100, 400, 50, 60, 70, 80, 90]
    for k, size in enumerate(sizes):
        leader.propose(bytes([k]) * size, c.now)
    rd = c.process("n1")
    to_n2 = [m for m in rd.messages if isinstance(m, AppendEntries) and m.dst == "n2"]
    batches = [[len(e.data) for e in m.entries] for m in to_n2]
    assert batches == [[100, 100], [100], [400], [50, 60, 70], [80, 90]]
    assert all(sum(b) <= 250 or len(b) == 1 for b in batches)
    c.pending.clear()
    for m in to_n2:
        c.nodes["n2"].step(m, c.now)
    c.deliver()
    assert leader.commit_index == 1 + len(sizes)
    assert [len(e.data) for e in c.applied["n3"][1:]] == sizes


def test_a_config_without_room_for_entries_is_refused() -> None:
    with pytest.raises(ValueError, match="max_append_bytes"):
        RaftConfig(max_append_bytes=0)


def test_follower_truncates_conflicting_suffix_5_3() -> None:
    """§5.3: if an existing entry conflicts with a new one, delete it and all that follow."""
    node = lone_node(storage=make_storage([1, 2, 2, 2], term=2, commit=1))
    new = (Entry(3, 2, b"new"),)
    node.step(AppendEntries(3, "b", "a", 1, 1, new, 2), 0.0)
    rd = node.ready()
    assert node.log.entries[1:] == list(new) and rd.entries == list(new)
    assert isinstance(rd.messages[0], AppendEntriesResponse) and rd.messages[0].match_index == 2
    storage = make_storage([1, 2, 2, 2], term=2)
    storage.persist(rd.hard_state, rd.entries)
    assert storage.entries == node.log.entries


def test_follower_never_truncates_committed_entries_5_3() -> None:
    """§5.3/§5.4: a frame that would overwrite a committed entry changes nothing; the follower
    answers with its commit index (every leader holds that prefix, Leader Completeness)."""
    node = lone_node(storage=make_storage([1, 2, 2], term=2, commit=3))
    node.step(AppendEntries(3, "b", "a", 1, 1, (Entry(3, 2, b"x"),), 3), 0.0)
    assert [e.term for e in node.log.entries] == [1, 2, 2]
    (resp,) = node.ready().messages
    assert isinstance(resp, AppendEntriesResponse) and resp.success and resp.match_index == 3


def test_consistency_check_and_fast_backtracking_5_3() -> None:
    """§5.3: AppendEntries carries (prev_index, prev_term); a follower rejects a mismatch with
    its conflicting term, so the leader skips a whole divergent term per round trip."""
    leader_log = make_storage([1, 3, 3, 3], term=3)
    c = Cluster(
        3,
        logs={
            "n1": leader_log,
            "n2": make_storage([1, 3, 3, 3], term=3),
            "n3": make_storage([1] + [2] * 50, term=3),
        },
    )
    rejections: list[AppendEntriesResponse] = []

    def spy(m: Message) -> bool:
        if isinstance(m, AppendEntriesResponse) and not m.success:
            rejections.append(m)
        return True

    c.fire("n1")
    c.deliver(spy)
    assert c.nodes["n1"].state == "leader" and c.nodes["n1"].term == 4
    assert len([r for r in rejections if r.src == "n3"]) <= 2
    assert c.nodes["n3"].log.entries == c.nodes["n1"].log.entries
    assert c.storage["n3"].entries == c.nodes["n1"].log.entries
    assert c.nodes["n3"].commit_index == 5


def test_lost_appends_recovered_by_heartbeat_probe_5_3() -> None:
    """§5.3: the leader retries indefinitely; a follower that lost pipelined appends is
    brought back by the heartbeat's consistency check."""
    c = Cluster(3)
    leader = c.elect("n1")
    for k in range(5):
        leader.propose(b"%d" % k, c.now)
    c.deliver(keep=lambda m: not (isinstance(m, AppendEntries) and m.dst == "n3" and m.entries))
    assert len(c.nodes["n3"].log.entries) == 1 and leader.commit_index == 6
    c.advance_time(c.now + 0.5)
    assert c.nodes["n3"].log.entries == leader.log.entries and c.nodes["n3"].commit_index == 6


# ----------------------------------------------------------------------------- commit rule


def _figure8_until_c(c: Cluster) -> RaftNode:
    """Figure 8 (a)–(c): S1 leads term 4 and gets (2, t2) onto a majority, no further.

    One deviation from the figure: S2 starts without (2, t2) and receives it in (c) together
    with S3, so the leader *knows* a majority holds it (S1, S2, S3) -- the case where a naive
    "count replicas" rule would commit it.
    """
    # (b) S1 is down; S5 wins term 3 with S3, S4 and appends its entry (a no-op at index 2).
    c.crash("n1")
    c.fire("n5")
    c.deliver(keep=lambda m: not isinstance(m, AppendEntries))
    assert c.nodes["n5"].state == "leader" and c.nodes["n5"].term == 3
    assert c.nodes["n5"].log.entries[1] == Entry(3, 2, b"", "noop")
    c.crash("n5")
    # (c) S1 restarts, leads term 4 (votes S2, S3, S4) and replicates (2, t2) to S2 and S3 only.
    c.restart("n1")
    while c.nodes["n1"].state != "leader":
        c.fire("n1")
        c.deliver(keep=lambda m: not isinstance(m, AppendEntries))
    s1 = c.nodes["n1"]
    assert s1.term == 4

    def only_index2_to_s2_s3(m: Message) -> bool:
        # Frames that must be rejected (gap before them) are delivered too: they drive backtracking.
        if isinstance(m, AppendEntries):
            if m.dst not in ("n2", "n3"):
                return False
            gap = c.nodes[m.dst].log.last_index < m.prev_index
            return gap or all(e.index <= 2 for e in m.entries)
        return True

    c.fire("n1")  # heartbeat: probe each follower
    c.deliver(only_index2_to_s2_s3)
    c.fire("n1")
    c.deliver(only_index2_to_s2_s3)
    for i in ("n2", "n3"):
        assert [e.term for e in c.nodes[i].log.entries] == [1, 2]
    assert [s1.match_index(i) for i in ("n2", "n3", "n4", "n5")] == [2, 2, 0, 0]
    return s1


def _figure8_cluster() -> Cluster:
    cfg = RaftConfig(max_entries_per_append=1)
    logs = {
        "n1": make_storage([1, 2], term=2, vote="n1", commit=1),
        "n2": make_storage([1], term=2, vote="n1", commit=1),
        "n3": make_storage([1], term=2, commit=1),
        "n4": make_storage([1], term=2, commit=1),
        "n5": make_storage([1], term=2, commit=1),
    }
    return Cluster(5, config=cfg, logs=logs)


def test_figure8_old_term_entry_on_majority_not_committed_5_4_2() -> None:
    """§5.4.2 / Figure 8: an entry of an earlier term stored on a majority is NOT committed by
    counting replicas; S5 may then legitimately overwrite it."""
    c = _figure8_cluster()
    s1 = _figure8_until_c(c)
    holders = [i for i in c.ids if i in c.nodes and c.nodes[i].log.term(2) == 2]
    assert len(holders) >= 3 and s1.commit_index == 1
    # (d) S1 crashes; S5 is elected with S2, S3, S4 and overwrites index 2 everywhere.
    c.crash("n1")
    c.restart("n5")
    c.now += 2 * CFG.election_timeout  # past every follower's leader lease
    while c.nodes["n5"].state != "leader":
        c.fire("n5")
        c.deliver()
    c.deliver()
    c.restart("n1")
    c.advance_time(c.now + 1.0)
    for n in c.nodes.values():
        assert n.log.term(2) == 3 and n.commit_index == n.log.last_index
    assert c.committed[2] == Entry(3, 2, b"", "noop")


def test_figure8_earlier_entry_commits_indirectly_5_4_2() -> None:
    """§5.4.2 / Figure 8 (e): once an entry of the current term is on a majority, it commits
    and so do the earlier-term entries before it; S5 can no longer win."""
    c = _figure8_cluster()
    s1 = _figure8_until_c(c)
    c.deliver()
    c.advance_time(c.now + 0.3, keep=lambda m: m.dst != "n4" and m.src != "n4")
    assert s1.commit_index == 3 and c.committed[2].term == 2
    c.crash("n1")
    c.restart("n5")
    c.now += 2 * CFG.election_timeout
    for _ in range(5):
        c.fire("n5")
        c.deliver()
        assert c.nodes["n5"].state != "leader"


# ----------------------------------------------------------------------------- Ready contract


def test_ready_vote_grant_travels_with_persisted_vote() -> None:
    """Ready contract (§5.2 'persist currentTerm and votedFor before responding'): the grant is
    emitted in the same Ready as the hard state recording the vote."""
    node = lone_node()
    node.step(RequestVote(4, "b", "a", 0, 0), 0.0)
    rd = node.ready()
    assert rd.hard_state == HardState(4, "b", 0)
    assert rd.messages == [RequestVoteResponse(4, "a", "b", True)]
    node.advance(rd)
    assert node.ready().empty


def test_ready_append_ack_travels_with_entries_and_stability_tracking() -> None:
    """Ready contract (§5.3 'respond after storing entries'): an ack is emitted with the
    entries it acknowledges; entries are handed out until the shell confirms them, even if
    the node keeps stepping before ``advance``."""
    node = lone_node()
    e1 = (Entry(1, 1, b"x"),)
    node.step(AppendEntries(1, "b", "a", 0, 0, e1, 0), 0.0)
    rd = node.ready()
    assert rd.entries == list(e1) and rd.hard_state == HardState(1, None, 0)
    assert rd.messages == [AppendEntriesResponse(1, "a", "b", True, match_index=1)]
    node.step(AppendEntries(1, "b", "a", 1, 1, (Entry(1, 2, b"y"),), 2), 0.0)
    node.advance(rd)
    rd2 = node.ready()
    assert [e.index for e in rd2.entries] == [2] and [e.data for e in rd2.committed] == [b"x", b"y"]
    node.advance(rd2)
    assert node.ready().empty and node.applied_index == 2


def test_leader_counts_itself_only_after_persisting_5_3() -> None:
    """Ready contract for the leader: its own replica counts toward a majority only once the
    shell confirmed the entry durable."""
    c = Cluster(3)
    leader = c.elect("n1")
    idx = leader.propose(b"v", c.now)
    assert idx == 2
    rd = leader.ready()
    for m in rd.messages:
        c.nodes[m.dst].step(m, c.now)
    for i in ("n2", "n3"):
        for m in c.process(i).messages:
            leader.step(m, c.now)
    assert leader.commit_index == 2  # followers' acks are a majority on their own
    c2 = Cluster(3)
    l2 = c2.elect("n1")
    l2.propose(b"v", c2.now)
    rd = l2.ready()
    c2.nodes["n2"].step(next(m for m in rd.messages if m.dst == "n2"), c2.now)
    (ack,) = c2.process("n2").messages
    l2.step(ack, c2.now)
    assert l2.commit_index == 1  # n2 + an unpersisted self is not a majority yet
    c2.storage["n1"].persist(rd.hard_state, rd.entries)
    l2.advance(rd)
    assert l2.commit_index == 2


# ----------------------------------------------------------------------------- wire, bad input


def test_messages_roundtrip_and_bad_input_dropped() -> None:
    """Wire: every message round-trips through msgpack; junk fails decoding; a message for
    another node or from a stranger is dropped and counted."""
    msgs: list[Message] = [
        RequestVote(1, "a", "b", 2, 1, pre_vote=True),
        RequestVoteResponse(1, "b", "a", True, True),
        AppendEntries(2, "a", "b", 1, 1, (Entry(2, 2, b"d"), Entry(2, 3, b"", "noop")), 1),
        AppendEntriesResponse(2, "b", "a", False, reject_index=3, hint_index=2, hint_term=1),
    ]
    for m in msgs:
        assert decode_message(encode_message(m)) == m
    with pytest.raises(msgspec.DecodeError):
        decode_message(b"\xc1junk")
    with pytest.raises(msgspec.ValidationError):
        decode_message(msgspec.msgpack.encode(["rv", -1, "a", "b", 0, 0, False]))
    node = lone_node()
    node.step(RequestVote(1, "b", "z", 0, 0), 0.0)
    node.step(RequestVote(1, "mallory", "a", 0, 0), 0.0)
    assert node.dropped == 2 and node.term == 0
    c = Cluster(3)
    leader = c.elect("n1")
    leader.step(AppendEntriesResponse(1, "n2", "n1", True, match_index=99), c.now)
    leader.step(AppendEntriesResponse(1, "n2", "n1", False, reject_index=99, hint_index=50), c.now)
    assert leader.dropped == 2 and leader.state == "leader"
    c.advance_time(c.now + 1.0)
    assert leader.commit_index == 1 and c.nodes["n2"].log.entries == leader.log.entries


# ----------------------------------------------------------------------------- simulation


def simulate(seed: int, n: int, *, chunk: int = 1 << 20) -> Cluster:
    """Random faults for 15 s of simulated time (5% loss, 2% duplication, 1–20 ms delays that
    reorder, random and leader-isolating partitions, crashes of up to a minority, snapshots
    with compaction on random nodes), then heal everything, restart every node and demand that
    all apply the same log. Every proposal comes with a ReadIndex read, which must not be
    released below any index committed before it was asked (thesis §6.4)."""
    # Five-node runs also exercise a delayed commit broadcast.
    delay = 0.005 if n == 5 else 0.0
    c = Cluster(
        n,
        seed=seed,
        config=RaftConfig(
            election_timeout=0.5,
            heartbeat_interval=0.05,
            commit_delay=delay,
            snapshot_chunk_bytes=chunk,
        ),
    )
    rng = random.Random(seed ^ 0x5EED)
    queue: list[tuple[float, int, Message]] = []
    seq = 0
    next_fault, next_proposal = 0.5, 0.1
    proposed = 0
    chaos_until, deadline = 15.0, 60.0
    crashed: list[str] = []
    final: int | None = None
    read_floor: dict[int, int] = {}
    sent = c.sent_kinds

    def send(msgs: list[Message]) -> None:
        nonlocal seq
        for m in msgs:
            sent[type(m).__name__] += 1
            if now < chaos_until and rng.random() < 0.05:
                continue  # lost
            copies = 2 if now < chaos_until and rng.random() < 0.02 else 1
            for _ in range(copies):
                seq += 1
                heapq.heappush(queue, (now + rng.uniform(0.001, 0.02), seq, m))

    now = 0.0
    while now < deadline:
        due = [next_fault, next_proposal, *(x.next_deadline() for x in c.nodes.values())]
        if queue:
            due.append(queue[0][0])
        now = c.now = max(now, min(due))
        while queue and queue[0][0] <= now:
            _, _, m = heapq.heappop(queue)
            if c.can_reach(m.src, m.dst):
                c.nodes[m.dst].step(m, now)
        for x in list(c.nodes.values()):
            if x.next_deadline() <= now:
                x.tick(now)
        if now >= next_proposal:
            next_proposal = now + rng.uniform(0.02, 0.2)
            leader = c.leader()
            if leader is not None and now < chaos_until:
                proposed += 1
                leader.propose(b"%d:%d" % (seed, proposed), now)
                # A linearizable read must reflect every index committed anywhere before it.
                read_floor[proposed] = max(x.commit_index for x in c.nodes.values())
                leader.read_index(proposed, now)
            if rng.random() < 0.1:
                # Snapshots + compaction, so lagging and restarted nodes need InstallSnapshot.
                victim = rng.choice(sorted(c.nodes))
                if c.nodes[victim].applied_index > 0:
                    c.take_snapshot(victim, keep=rng.choice([0, 0, 3, 50]))
        if now >= next_fault:
            next_fault = now + rng.uniform(0.3, 1.5)
            if now < chaos_until:
                action = rng.random()
                leader = c.leader()
                if action < 0.15 and leader is not None:
                    c.group = {i: int(i == leader.id) for i in c.ids}
                elif action < 0.3:
                    for i in c.ids:
                        c.group[i] = rng.randrange(2)
                elif action < 0.5:
                    c.group = dict.fromkeys(c.ids, 0)
                elif action < 0.75 and len(crashed) < (n - 1) // 2:
                    victim = rng.choice(sorted(c.nodes))
                    c.crash(victim)
                    crashed.append(victim)
                elif crashed:
                    c.restart(crashed.pop(0))
            else:
                c.group = dict.fromkeys(c.ids, 0)
                while crashed:
                    c.restart(crashed.pop(0))
        for i in list(c.nodes):
            send(c.process(i).messages)
        if now > chaos_until and not crashed:
            # A proposal can be lost with a deposed leader: propose again until one commits.
            leader = c.leader()
            if leader is not None and all(e.data != b"final" for e in leader.log.entries):
                leader.propose(b"final", now)
            final = next((e.index for e in c.committed.values() if e.data == b"final"), None)
            if final is not None and all(len(a) >= final for a in c.applied.values()):
                break
    assert final is not None and now < deadline, f"seed {seed}: no convergence"
    for i, reads in c.reads.items():
        for rid, index in reads:
            assert index >= read_floor[rid], f"seed {seed}: stale read {rid} on {i}"
    logs = [[e for e in a[:final]] for a in c.applied.values()]
    assert all(log == logs[0] for log in logs), f"seed {seed}: divergent applied sequences"
    assert logs[0][final - 1].data == b"final"
    return c


@pytest.mark.parametrize("n", [3, 5])
def test_simulation_safety_and_liveness_over_seeds(n: int) -> None:
    """§5.2 election safety (one leader per term), §5.4.3 state-machine safety (a committed
    index never changes), §6.4 read linearizability, §7 snapshots, and liveness once faults
    stop, under loss, duplication, reordering, partitions and crashes -- over 30 seeds per
    cluster size."""
    committed = 0
    for seed in range(30):
        c = simulate(seed, n)
        committed += len(c.committed)
        assert len(c.leaders) >= 1
    assert committed > 30 * 20


@pytest.mark.parametrize("n", [3, 5])
def test_simulation_with_snapshots_sent_in_pieces_over_seeds(n: int) -> None:
    """§7 with InstallSnapshot's offset: the same faults, with every snapshot over 48 bytes
    sent in pieces -- pieces lost, duplicated, reordered, cut off by partitions and crashes --
    over 20 seeds per cluster size; the same safety and liveness."""
    pieces = 0
    for seed in range(100, 120):
        c = simulate(seed, n, chunk=48)
        assert len(c.leaders) >= 1
        pieces += c.sent_kinds["SnapshotChunk"]
    assert pieces > 100  # the pieces did travel


def test_log_extend_after_appends_only_what_lies_beyond_the_last_index() -> None:
    """§5.3 (AppendEntries step 4): entries the log already holds are not appended again; the
    new suffix is appended in one go."""
    from agentcluster.consensus.raft._log import RaftLog

    log = RaftLog([Entry(1, i) for i in range(1, 4)])
    incoming = tuple(Entry(1, i) for i in range(2, 7))
    log.extend_after(1, incoming)
    assert [e.index for e in log.entries] == [1, 2, 3, 4, 5, 6]
    log.extend_after(4, incoming[3:4])  # wholly inside the log: nothing to append
    assert log.last_index == 6
