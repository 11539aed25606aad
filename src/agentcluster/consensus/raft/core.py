"""The Raft consensus core: a sans-I/O state machine in the manner of etcd-io/raft.

Theory of operation: :class:`RaftNode` never does I/O and never reads a clock. The shell feeds
it inputs -- :meth:`~RaftNode.tick` when :meth:`~RaftNode.next_deadline` is reached,
:meth:`~RaftNode.step` for every received message, :meth:`~RaftNode.propose` for client
data -- then drains :meth:`~RaftNode.ready` and confirms it with :meth:`~RaftNode.advance`.

**The Ready contract.** A :class:`Ready` holds the hard state (term, vote, commit) and the
log entries to persist, the messages to send and the committed entries to apply. The shell
persists (and syncs) first, then sends, then applies. Messages are only produced *into* a
Ready, and the Ready's hard state and entries are computed when it is drained, after every
message in it was produced -- so a vote grant (which changed ``vote``) or an append
acknowledgement (which appended entries) always travels in the same Ready as the durable
state it promises, and is sent only after that state is on disk. The leader counts its *own*
replica only up to the entries the shell confirmed persisted. A shell may also write a leader's
entries in the background (:meth:`~RaftNode.persisting`, then :meth:`~RaftNode.persisted`
when the write is done): later Readys leave them out, and they count only once written.

**Elections (§5.2).** Election timeouts are drawn from the caller's rng in
``[election_timeout, 2 * election_timeout)``. With ``pre_vote`` (thesis §9.6) a node whose
timer fires first asks "would you vote for me in term + 1?" without changing its term; only a
majority of yes answers lets it start a real election, so a node rejoining from a partition
does not force a stable cluster into a new term. Two pre-candidates of the same round grant
each other only in one direction (the more up-to-date log, then the smaller id, ranks first),
so they do not both start the real election and split it. A voter refuses both kinds of
request while it has heard from a leader within an election timeout (thesis §4.2.3), and
grants a vote at most once per term, only to a candidate whose log is at least as up to date
as its own (§5.4.1).
A new leader appends a no-op entry of its term so earlier entries can commit (§8).
Terms stay below ``MAX_TERM``: a message at or above it is dropped and a node there does not
campaign, so a forged huge term cannot make a node's next vote undecodable for its peers.

**Check-quorum (thesis §6.2).** Every election timeout a leader counts the peers that
answered it since the previous check; without a majority it steps down.

**Replication (§5.3).** Per follower the leader keeps a progress record: ``probe`` (one
AppendEntries in flight until the follower's position is known) or ``replicate`` (batches of at
most ``max_entries_per_append`` entries, ``next_index`` advanced optimistically, at most
``max_inflight`` unacknowledged batches). Entries proposed between two Readys are batched into
the same messages. A rejection carries the follower's conflicting term and the first index it
holds of it, so the leader backs up a whole term per round trip. Followers truncate a
conflicting suffix -- never below their commit index.

**Commit (§5.4.2).** The leader commits the highest index held by a majority *only if* that
entry is of its current term; earlier entries commit indirectly (the Figure 8 rule).

**Snapshots (§7).** The shell takes a snapshot of its state machine at an applied index
(:meth:`~RaftNode.snapshot_at`), stores it and compacts storage, then tells the core
(:meth:`~RaftNode.compact`). A follower whose next entry is compacted away gets an
InstallSnapshot; it either fast-forwards (it holds the snapshot's last entry) or replaces its
log and hands the snapshot to the shell in ``Ready.snapshot``.

**Membership (thesis §4.1, §4.2.3).** Single-server changes carried by ``conf`` entries; a
change takes effect when committed (as in etcd), at most one is pending, and a leader proposes
one only after it has committed an entry of its own term (the fix for the single-server bug
Ongaro described in 2015). Learners receive the log but neither vote nor count for commit. A
removed leader steps down once its removal commits. Vote requests from nodes outside the
configuration are dropped, so a removed server cannot disrupt the cluster.

**Linearizable reads (thesis §6.4) and leadership transfer (thesis §3.10)** live in
:mod:`._reads`: ReadIndex rounds, the leader lease, and handing leadership over.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agentcluster.consensus.raft._conf import ConfMixin
from agentcluster.consensus.raft._log import MemoryStorage, RaftLog, Storage
from agentcluster.consensus.raft._progress import Progress
from agentcluster.consensus.raft._reads import ReadsMixin
from agentcluster.consensus.raft._snap import SnapshotMixin
from agentcluster.consensus.raft.messages import (
    MAX_TERM,
    AppendEntries,
    AppendEntriesResponse,
    ConfState,
    Entry,
    HardState,
    InstallSnapshot,
    Message,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    SnapshotChunk,
    SnapshotChunkAck,
    TimeoutNow,
)

__all__ = ["RaftConfig", "RaftNode", "RaftState"]

RaftState = Literal["follower", "pre_candidate", "candidate", "leader"]


@dataclass(frozen=True, slots=True)
class RaftConfig:
    election_timeout: float = 1.0
    heartbeat_interval: float = 0.1
    max_entries_per_append: int = 64
    # ... and at most this many bytes of entry data (one entry always goes, whatever its
    # size): a follower catching up on large entries -- a store client's batch is one entry of
    # up to 1 MiB -- must not be sent a frame the transport refuses (4 MiB streams).
    max_append_bytes: int = 1 << 20
    max_inflight: int = 256
    pre_vote: bool = True
    check_quorum: bool = True
    lease_reads: bool = True
    clock_drift: float = 0.1
    # How long a new commit index may wait for an append to carry it to the followers before
    # an empty one is sent (0: in the same Ready). A few ms keeps that message off the write's
    # critical path; followers then apply at most this much later.
    commit_delay: float = 0.0
    # A snapshot larger than this travels in pieces of this size (see _snap): below the
    # transport's 4 MiB frame, small enough not to hold up a follower's heartbeats for long.
    snapshot_chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.election_timeout:
            raise ValueError("need 0 < heartbeat_interval < election_timeout")
        if (
            min(
                self.max_entries_per_append,
                self.max_inflight,
                self.max_append_bytes,
                self.snapshot_chunk_bytes,
            )
            < 1
        ):
            raise ValueError(
                "max_entries_per_append, max_append_bytes, max_inflight and "
                "snapshot_chunk_bytes must be >= 1"
            )
        if not 0 <= self.commit_delay < self.heartbeat_interval:
            raise ValueError("need 0 <= commit_delay < heartbeat_interval")
        if not 0 <= self.clock_drift < 1:
            raise ValueError("clock_drift must be in [0, 1)")
        if self.lease_reads and not self.check_quorum:
            raise ValueError("lease_reads needs check_quorum (followers must honour the lease)")


class RaftNode(ConfMixin, ReadsMixin, SnapshotMixin):
    def __init__(
        self,
        id: str,
        peers: Sequence[str],
        *,
        config: RaftConfig,
        rng: random.Random,
        now: float,
        storage: Storage | None = None,
        join: bool = False,
    ) -> None:
        """``peers``: the initial voters besides ``id`` (ignored once a snapshot holds the
        configuration). ``join=True`` starts with an empty configuration: the node waits to be
        added by a leader instead of bootstrapping a cluster of its own."""
        self.id = id
        self.config = config
        self._rng = rng
        storage = storage if storage is not None else MemoryStorage()
        hs = storage.hard_state
        snap = storage.snapshot
        stored = storage.entries
        if snap is not None:
            offset = stored[0].index - 1 if stored else snap.index
            offset_term = snap.term if offset == snap.index else (0 if offset == 0 else None)
            conf = snap.conf
        else:
            offset, offset_term = 0, 0
            members = () if join else tuple(dict.fromkeys([id, *peers]))
            conf = ConfState(members)
        self.log = RaftLog(stored, offset, offset_term)
        base = snap.index if snap is not None else 0
        self.commit_index = max(hs.commit, base)
        if self.commit_index > self.log.last_index:
            raise ValueError(
                f"stored commit {self.commit_index} beyond stored log {self.log.last_index}"
            )
        if not 0 <= hs.term < MAX_TERM:
            raise ValueError(f"stored term {hs.term} is outside [0, {MAX_TERM})")
        self.term = hs.term
        self.vote = hs.vote
        self.applied_index = base
        self._handed_index = base
        self._snapshot = snap
        self._pending_snapshot: Snapshot | None = None
        self._partial = None  # the pieces of a chunked snapshot received so far (see _snap)
        self._persisted_hs = hs
        self.voters: tuple[str, ...] = ()
        self.learners: tuple[str, ...] = ()
        self._conf_history: list[tuple[int, ConfState]] = []
        self._conf_changed = False
        self._pending_conf_index = 0
        self.state: RaftState = "follower"
        self.leader_id: str | None = None
        self.dropped = 0
        self._msgs: list[Message] = []
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, Progress] = {}
        self._commit_broadcast = False
        self._commit_deadline = math.inf
        self._now = now
        self._last_leader_contact = -math.inf
        # A restarted voter forgot when it last heard from a leader: it honours the lease of a
        # leader it may have acknowledged by refusing votes for one election timeout. (A node
        # still in term 0 never acknowledged anybody.)
        restarted = config.lease_reads and hs.term > 0
        self._vote_blackout_until = now + config.election_timeout if restarted else -math.inf
        self._election_deadline = math.inf
        self._heartbeat_deadline = math.inf
        self._check_quorum_deadline = math.inf
        self._seq = 0
        self._seq_sent: dict[int, float] = {}
        self._seq_flush = False
        self._reads: list[tuple[int, int, int]] = []  # (round, request id, read index)
        self._reads_waiting: list[int] = []  # request ids waiting for a commit in this term
        # Set once this leader sent a TimeoutNow: see ReadsMixin.lease_valid.
        self._lease_void = False
        self._read_states: list[tuple[int, int]] = []
        self._transferee: str | None = None
        self._transfer_deadline = math.inf
        self._set_conf(conf, base, notify=False)
        for e in self.log.slice(base + 1, self.commit_index + 1):
            if e.kind == "conf":
                self._apply_conf_entry(e)
        self._conf_changed = False
        self._reset_election_timer(now)

    # ----------------------------------------------------------------- inputs

    def next_deadline(self) -> float:
        if self.state == "leader":
            deadline = min(self._heartbeat_deadline, self._commit_deadline)
            if self.config.check_quorum:
                deadline = min(deadline, self._check_quorum_deadline)
            return min(deadline, self._transfer_deadline)
        return self._election_deadline

    def tick(self, now: float) -> None:
        self._now = now
        if self.state == "leader":
            if self.config.check_quorum and now >= self._check_quorum_deadline:
                active = sum(
                    1
                    for v in self.voters
                    if v == self.id or (v in self._progress and self._progress[v].recent_active)
                )
                if active < self._quorum():
                    self._become_follower(self.term, None, now)
                    return
                for pr in self._progress.values():
                    pr.recent_active = False
                self._check_quorum_deadline = now + self.config.election_timeout
            if now >= self._transfer_deadline:
                self._abort_transfer()
            if now >= self._commit_deadline and now < self._heartbeat_deadline:
                self._commit_deadline = math.inf
                for peer, pr in self._progress.items():
                    if pr.commit_sent < self.commit_index and pr.state == "replicate":
                        self._send_empty(peer, pr)
            if now >= self._heartbeat_deadline:
                self._commit_deadline = math.inf
                self._heartbeat_deadline = now + self.config.heartbeat_interval
                self._new_round(now)
                limit = self.config.election_timeout / self.config.heartbeat_interval
                for peer, pr in self._progress.items():
                    if pr.state == "snapshot":
                        pr.snapshot_ticks += 1
                        if pr.snapshot_ticks >= limit:
                            pr.become_probe()  # the snapshot or its answer was lost
                    if pr.state == "probe":
                        pr.probe_sent = False
                        self._send_append(peer, pr, allow_empty=True)
                    else:
                        self._send_empty(peer, pr)
        elif now >= self._election_deadline:
            if self.is_voter:
                self._campaign(now)
            else:
                self._reset_election_timer(now)

    def propose(self, data: bytes, now: float) -> int | None:
        """Append ``data`` to the leader's log; its index, or None when not the leader (or
        while it hands leadership over)."""
        if self.state != "leader" or self._transferee is not None:
            return None
        self._now = now
        index = self.log.last_index + 1
        self.log.append(Entry(self.term, index, data, "normal"))
        return index

    def step(self, msg: Message, now: float) -> None:
        self._now = now
        if msg.dst != self.id or msg.src == self.id:
            self.dropped += 1
            return
        if msg.term >= MAX_TERM:
            # Never adopt a term at the bound: our next election would carry one above it,
            # which no peer decodes (see messages.MAX_TERM).
            self.dropped += 1
            return
        if isinstance(msg, RequestVote | RequestVoteResponse) and msg.src not in self.voters:
            self.dropped += 1  # removed or unknown servers cannot disrupt (thesis §4.2.3)
            return
        if msg.term > self.term:
            if isinstance(msg, RequestVote):
                if not msg.transfer and self._in_lease(now):
                    return
                if not msg.pre_vote:
                    self._become_follower(msg.term, None, now)
            elif isinstance(msg, RequestVoteResponse) and msg.pre_vote and msg.granted:
                pass
            else:
                sent_by_leader = AppendEntries | InstallSnapshot | SnapshotChunk
                leader = msg.src if isinstance(msg, sent_by_leader) else None
                self._become_follower(msg.term, leader, now)
        elif msg.term < self.term:
            # Tell a stale leader or pre-candidate about the newer term; ignore the rest.
            if isinstance(msg, AppendEntries | InstallSnapshot | SnapshotChunk):
                reject = msg.prev_index if isinstance(msg, AppendEntries) else 0
                self._send(
                    AppendEntriesResponse(self.term, self.id, msg.src, False, reject_index=reject)
                )
            elif isinstance(msg, RequestVote) and msg.pre_vote:
                self._send(RequestVoteResponse(self.term, self.id, msg.src, False, True))
            return
        if isinstance(msg, AppendEntries):
            self._on_append(msg, now)
        elif isinstance(msg, AppendEntriesResponse):
            if self.state == "leader":
                self._on_append_response(msg, now)
        elif isinstance(msg, RequestVote):
            self._on_vote_request(msg, now)
        elif isinstance(msg, RequestVoteResponse):
            self._on_vote_response(msg, now)
        elif isinstance(msg, InstallSnapshot):
            self._on_snapshot(msg, now)
        elif isinstance(msg, SnapshotChunk):
            self._on_chunk(msg, now)
        elif isinstance(msg, SnapshotChunkAck):
            self._on_chunk_ack(msg)
        elif (
            isinstance(msg, TimeoutNow)
            and self.state == "follower"
            and msg.src == self.leader_id
            and self.is_voter
        ):
            self._become_candidate(now, transfer=True)  # TimeoutNow from our leader

    def match_index(self, peer: str) -> int:
        """Leader only: the highest index known replicated on ``peer`` (0 otherwise)."""
        pr = self._progress.get(peer)
        return pr.match if pr is not None else 0

    # ----------------------------------------------------------------- snapshots

    def snapshot_at(self, index: int, data: bytes) -> Snapshot:
        """Describe the state machine's ``data`` after applying ``index``; the shell stores the
        result, then may compact storage and call :meth:`compact`."""
        if not 0 < index <= self.applied_index:
            raise ValueError(f"cannot snapshot at {index}: applied through {self.applied_index}")
        term = self.log.term(index)
        if term is None:
            raise ValueError(f"cannot snapshot at {index}: the entry is compacted")
        snap = Snapshot(index, term, self._conf_at(index), data)
        self._snapshot = snap
        return snap

    def compact(self, through: int) -> None:
        """Forget in-memory entries up to ``through`` (at most the latest snapshot's index)."""
        limit = self._snapshot.index if self._snapshot is not None else 0
        if through > limit:
            raise ValueError(f"cannot compact through {through}: snapshot is at {limit}")
        self.log.compact(through)

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def persisting(self, index: int) -> None:
        """The shell started writing the Ready's entries (through ``index``) in the
        background: later Readys leave them out. Until :meth:`persisted` says the write is
        done they are not stable, so a leader does not count its own copy of them."""
        self.log.persisting_to = max(self.log.persisting_to, index)

    def persisted(self, index: int, term: int) -> None:
        """A background write of the entries through ``(index, term)`` completed."""
        self.log.stable_to(index, term)
        if self.state == "leader":
            self._maybe_commit()

    # ----------------------------------------------------------------- outputs

    def ready(self) -> Ready:
        """Drain the work accumulated since the last Ready (see the module docstring)."""
        self._flush_appends()
        hs = HardState(self.term, self.vote, self.commit_index)
        committed: list[Entry] = []
        if self.commit_index > self._handed_index:
            committed = self.log.slice(self._handed_index + 1, self.commit_index + 1)
            self._handed_index = self.commit_index
        msgs, self._msgs = self._msgs, []
        reads, self._read_states = self._read_states, []
        snap, self._pending_snapshot = self._pending_snapshot, None
        conf = self.conf if self._conf_changed else None
        self._conf_changed = False
        return Ready(
            hard_state=hs if hs != self._persisted_hs else None,
            entries=self.log.unstable(),
            messages=msgs,
            committed=committed,
            snapshot=snap,
            read_states=reads,
            conf=conf,
        )

    def advance(self, ready: Ready) -> None:
        """The shell persisted, sent and applied ``ready``."""
        if ready.hard_state is not None:
            self._persisted_hs = ready.hard_state
        if ready.snapshot is not None:
            self.applied_index = max(self.applied_index, ready.snapshot.index)
        if ready.entries:
            last = ready.entries[-1]
            self.log.stable_to(last.index, last.term)
        if ready.committed:
            self.applied_index = max(self.applied_index, ready.committed[-1].index)
        if self.state == "leader":
            self._maybe_commit()

    # ----------------------------------------------------------------- elections

    def _in_lease(self, now: float) -> bool:
        if not self.config.check_quorum:
            return False
        if self.state == "leader" or now < self._vote_blackout_until:
            return True
        return (
            self.leader_id is not None
            and now - self._last_leader_contact < self.config.election_timeout
        )

    def _reset_election_timer(self, now: float) -> None:
        t = self.config.election_timeout
        self._election_deadline = now + t + t * self._rng.random()

    def _campaign(self, now: float) -> None:
        if self.term + 1 >= MAX_TERM:
            self._reset_election_timer(now)  # peers refuse a term at the bound: no election
            return
        if self.config.pre_vote and len(self.voters) > 1:
            self.state = "pre_candidate"
            self.leader_id = None
            self._votes = {self.id: True}
            self._reset_election_timer(now)
            for peer in self.voters:
                if peer != self.id:
                    self._send(
                        RequestVote(
                            self.term + 1,
                            self.id,
                            peer,
                            self.log.last_index,
                            self.log.last_term,
                            pre_vote=True,
                        )
                    )
        else:
            self._become_candidate(now)

    def _become_candidate(self, now: float, *, transfer: bool = False) -> None:
        if self.term + 1 >= MAX_TERM:
            self._reset_election_timer(now)
            return
        self.term += 1
        self.vote = self.id
        self.state = "candidate"
        self.leader_id = None
        self._votes = {self.id: True}
        self._reset_election_timer(now)
        if self._quorum() == 1:
            self._become_leader(now)
            return
        for peer in self.voters:
            if peer != self.id:
                self._send(
                    RequestVote(
                        self.term,
                        self.id,
                        peer,
                        self.log.last_index,
                        self.log.last_term,
                        transfer=transfer,
                    )
                )

    def _become_follower(self, term: int, leader: str | None, now: float) -> None:
        if term > self.term:
            self.term = term
            self.vote = None
        self.state = "follower"
        self.leader_id = leader
        if leader is not None:
            self._last_leader_contact = now
        self._progress.clear()
        self._votes = {}
        self._reads.clear()
        self._reads_waiting.clear()
        self._seq_sent.clear()
        self._transferee = None
        self._transfer_deadline = math.inf
        self._commit_deadline = math.inf
        self._heartbeat_deadline = math.inf
        self._check_quorum_deadline = math.inf
        self._reset_election_timer(now)

    def _become_leader(self, now: float) -> None:
        self.state = "leader"
        self.leader_id = self.id
        self._votes = {}
        nxt = self.log.last_index + 1
        # A conf entry of an earlier leader may still be uncommitted in our log: no new
        # change until everything up to here commits.
        self._pending_conf_index = self.log.last_index
        self._progress = {p: Progress(match=0, next=nxt) for p in self.peers}
        self.log.append(Entry(self.term, nxt, b"", "noop"))
        self._heartbeat_deadline = now + self.config.heartbeat_interval
        self._check_quorum_deadline = now + self.config.election_timeout
        self._election_deadline = math.inf
        self._lease_void = False
        self._new_round(now)

    def _on_vote_request(self, msg: RequestVote, now: float) -> None:
        up_to_date = msg.last_term > self.log.last_term or (
            msg.last_term == self.log.last_term and msg.last_index >= self.log.last_index
        )
        can_vote = (
            self.vote == msg.src
            or (self.vote is None and self.leader_id is None)
            or (msg.pre_vote and msg.term > self.term)
        )
        granted = can_vote and up_to_date
        if granted and msg.pre_vote and self.state == "pre_candidate" and msg.term == self.term + 1:
            # Two pre-candidates of the same round: only the one ranked first -- the more
            # up-to-date log, then the smaller id -- gets the other's pre-vote, so they do not
            # both go on to a real election and split the votes (which costs a whole second
            # round of timeouts). A pre-vote binds nothing, so refusing one is always safe.
            mine = (self.log.last_term, self.log.last_index)
            theirs = (msg.last_term, msg.last_index)
            granted = theirs > mine or (theirs == mine and msg.src < self.id)
        if granted and not msg.pre_vote:
            self.vote = msg.src
            self._reset_election_timer(now)
        term = msg.term if (granted and msg.pre_vote) else self.term
        self._send(RequestVoteResponse(term, self.id, msg.src, granted, msg.pre_vote))

    def _on_vote_response(self, msg: RequestVoteResponse, now: float) -> None:
        if self.state == "pre_candidate" and msg.pre_vote:
            expected = self.term + 1 if msg.granted else self.term
            if msg.term != expected:
                return
        elif self.state == "candidate" and not msg.pre_vote:
            if msg.term != self.term:
                return
        else:
            return
        self._votes[msg.src] = msg.granted
        if sum(1 for v, g in self._votes.items() if g and v in self.voters) < self._quorum():
            return
        if self.state == "pre_candidate":
            self._become_candidate(now)
        else:
            self._become_leader(now)

    # ----------------------------------------------------------------- replication

    def _leader_contact(self, src: str, now: float) -> None:
        if self.state != "follower" or self.leader_id != src:
            self._become_follower(self.term, src, now)
        else:
            self._last_leader_contact = now
            self._reset_election_timer(now)

    def _on_append(self, msg: AppendEntries, now: float) -> None:
        if self.state == "leader":
            # Two leaders in one term cannot happen with correct peers: drop the frame.
            self.dropped += 1
            return
        self._leader_contact(msg.src, now)
        log = self.log
        if msg.prev_index < self.commit_index:
            # Our committed prefix (perhaps compacted) matches any leader's: skip to it.
            self._send(
                AppendEntriesResponse(
                    self.term, self.id, msg.src, True, match_index=self.commit_index, seq=msg.seq
                )
            )
            return
        prev_term = log.term(msg.prev_index)
        if prev_term is None or prev_term != msg.prev_term:
            if prev_term is None:
                hint_index, hint_term = log.last_index + 1, 0
            else:
                hint_index, hint_term = log.first_index_of_term(msg.prev_index), prev_term
            self._send(
                AppendEntriesResponse(
                    self.term,
                    self.id,
                    msg.src,
                    False,
                    reject_index=msg.prev_index,
                    hint_index=hint_index,
                    hint_term=hint_term,
                    seq=msg.seq,
                )
            )
            return
        # Validate the whole batch before touching the log: a malformed frame changes nothing.
        # (Only entries up to our last index can conflict; the rest is appended in one go.)
        conflict: int | None = None
        last_term, prev, term, last = msg.prev_term, msg.prev_index, msg.term, log.last_index
        for k, e in enumerate(msg.entries, start=1):
            if e.index != prev + k or not last_term <= e.term <= term:
                self.dropped += 1
                return
            last_term = e.term
            if conflict is None and e.index <= last and log.term(e.index) != e.term:
                conflict = e.index
        # A conflict lies after prev_index >= commit_index: committed entries are never touched.
        if conflict is not None:
            log.truncate_from(conflict)
        log.extend_after(prev, msg.entries)
        last_new = msg.prev_index + len(msg.entries)
        if msg.commit > self.commit_index:
            self._commit_to(min(msg.commit, last_new))
        self._send(
            AppendEntriesResponse(
                self.term, self.id, msg.src, True, match_index=last_new, seq=msg.seq
            )
        )

    def _commit_to(self, index: int) -> None:
        old = self.commit_index
        self.commit_index = index
        if self._partial is not None and index >= self._partial.index:
            self._partial = None  # caught up another way: the pieces are of no use now
        for i in range(max(old + 1, self.log.first_index), index + 1):
            e = self.log.entry(i)
            if e.kind == "conf":
                self._apply_conf_entry(e)

    def _on_append_response(self, msg: AppendEntriesResponse, now: float) -> None:
        pr = self._progress.get(msg.src)
        if pr is None:
            return  # from a member removed meanwhile
        pr.recent_active = True
        if msg.seq > pr.acked_seq and msg.seq <= self._seq:
            pr.acked_seq = msg.seq
            self._release_reads()
        if msg.success:
            m = msg.match_index
            if m > self.log.last_index:
                self.dropped += 1
                return
            if m > pr.match:
                pr.match = m
            pr.next = max(pr.next, m + 1)
            while pr.inflight and pr.inflight[0] <= m:
                pr.inflight.popleft()
            if pr.state != "replicate":
                pr.become_probe()
                pr.state = "replicate"
                pr.next = pr.match + 1
            self._maybe_commit()
            if msg.src == self._transferee and pr.match == self.log.last_index:
                self._send_timeout_now(msg.src)
            return
        rejected = msg.reject_index
        if rejected > self.log.last_index:
            self.dropped += 1  # we never sent such a prev_index: a corrupt or hostile peer
            return
        if pr.state == "snapshot":
            return  # an answer to an append sent before the snapshot
        if rejected <= pr.match or (pr.state == "probe" and rejected != pr.next - 1):
            return  # stale: answers a message sent before we learned better
        if msg.hint_term == 0:
            candidate = msg.hint_index
        else:
            found = self.log.last_index_of_term(msg.hint_term, rejected)
            candidate = found + 1 if found is not None else msg.hint_index
        pr.become_probe()
        pr.next = max(pr.match + 1, min(candidate, rejected))

    def _maybe_commit(self) -> None:
        matches = sorted(
            self.log.stable_index if v == self.id else self._progress[v].match
            for v in self.voters
            if v == self.id or v in self._progress
        )
        q = self._quorum()
        if len(matches) < q:
            return
        n = matches[len(matches) - q]
        # §5.4.2: only an entry of the current term is committed by counting replicas.
        if n > self.commit_index and self.log.term(n) == self.term:
            first_in_term = self.log.term(self.commit_index) != self.term
            self._commit_to(n)
            if self.config.commit_delay <= 0:
                self._commit_broadcast = True
            elif self._commit_deadline == math.inf:
                self._commit_deadline = self._now + self.config.commit_delay
            if first_in_term and self._reads_waiting:
                waiting, self._reads_waiting = self._reads_waiting, []
                for rid in waiting:
                    # Confirmed by a round started now, never by the lease: this may run
                    # after a write to disk, so ``_now`` can be older than the real time
                    # by more than the lease's drift margin.
                    self._admit_read(rid, self._now, lease_ok=False)
            if self.state == "leader" and self.id not in self.voters:
                self._become_follower(self.term, None, -math.inf)  # our removal committed

    def _flush_appends(self) -> None:
        # A read round started since the last flush is confirmed by one message per peer.
        read_round, self._seq_flush = self._seq_flush, False
        if self.state != "leader":
            return
        for peer, pr in self._progress.items():
            sent = False
            while self._send_append(peer, pr, allow_empty=False):
                sent = True
            if (self._commit_broadcast or read_round) and not sent:
                self._send_empty(peer, pr)
        self._commit_broadcast = False
        if self._commit_deadline != math.inf and all(
            pr.commit_sent >= self.commit_index
            for pr in self._progress.values()
            if pr.state == "replicate"
        ):
            # Appends carried the commit index to every follower: the next commit arms a fresh
            # delay, so steady writes never cost an empty append round (2 messages per peer).
            self._commit_deadline = math.inf

    def _send_append(self, peer: str, pr: Progress, *, allow_empty: bool) -> bool:
        if pr.state == "snapshot" or (pr.state == "probe" and pr.probe_sent):
            return False
        if pr.state == "replicate" and len(pr.inflight) >= self.config.max_inflight:
            return False
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            return self._send_snapshot(peer, pr)
        hi = min(self.log.last_index + 1, pr.next + self.config.max_entries_per_append)
        entries = self.log.slice(pr.next, hi)
        if len(entries) > 1:
            budget = self.config.max_append_bytes
            for k, e in enumerate(entries):
                budget -= len(e.data)
                if budget < 0 and k > 0:
                    entries = entries[:k]
                    break
        if not entries and not allow_empty:
            return False
        self._send(
            AppendEntries(
                self.term,
                self.id,
                peer,
                prev,
                prev_term,
                tuple(entries),
                self.commit_index,
                self._seq,
            )
        )
        pr.commit_sent = self.commit_index
        if pr.state == "probe":
            pr.probe_sent = True
        elif entries:
            pr.next = entries[-1].index + 1
            pr.inflight.append(entries[-1].index)
        return True

    def _send_empty(self, peer: str, pr: Progress) -> None:
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            if pr.state != "snapshot":
                self._send_snapshot(peer, pr)
            return
        pr.commit_sent = self.commit_index
        self._send(
            AppendEntries(
                self.term, self.id, peer, prev, prev_term, (), self.commit_index, self._seq
            )
        )
