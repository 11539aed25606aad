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
replica only up to the entries the shell confirmed persisted.

**Elections (§5.2).** Election timeouts are drawn from the caller's rng in
``[election_timeout, 2 * election_timeout)``. With ``pre_vote`` (thesis §9.6) a node whose
timer fires first asks "would you vote for me in term + 1?" without changing its term; only a
majority of yes answers lets it start a real election, so a node rejoining from a partition
does not force a stable cluster into a new term. A voter refuses both kinds of request while it
has heard from a leader within an election timeout (thesis §4.2.3), and grants a vote at most
once per term, only to a candidate whose log is at least as up to date as its own (§5.4.1).
A new leader appends a no-op entry of its term so earlier entries can commit (§8).

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
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from agentcluster.consensus.raft._log import MemoryStorage, RaftLog
from agentcluster.consensus.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    HardState,
    Message,
    Ready,
    RequestVote,
    RequestVoteResponse,
)

__all__ = ["RaftConfig", "RaftNode", "RaftState"]

RaftState = Literal["follower", "pre_candidate", "candidate", "leader"]


@dataclass(frozen=True, slots=True)
class RaftConfig:
    election_timeout: float = 1.0
    heartbeat_interval: float = 0.1
    max_entries_per_append: int = 64
    max_inflight: int = 256
    pre_vote: bool = True
    check_quorum: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.election_timeout:
            raise ValueError("need 0 < heartbeat_interval < election_timeout")
        if self.max_entries_per_append < 1 or self.max_inflight < 1:
            raise ValueError("max_entries_per_append and max_inflight must be >= 1")


@dataclass(slots=True)
class _Progress:
    match: int
    next: int
    state: Literal["probe", "replicate"] = "probe"
    probe_sent: bool = False
    inflight: deque[int] = field(default_factory=deque)
    recent_active: bool = False


class RaftNode:
    def __init__(
        self,
        id: str,
        peers: Sequence[str],
        *,
        config: RaftConfig,
        rng: random.Random,
        now: float,
        storage: MemoryStorage | None = None,
    ) -> None:
        self.id = id
        self.config = config
        self._rng = rng
        self.peers: list[str] = list(dict.fromkeys(p for p in peers if p != id))
        self._quorum = (len(self.peers) + 1) // 2 + 1
        storage = storage if storage is not None else MemoryStorage()
        hs = storage.hard_state
        self.log = RaftLog(storage.entries)
        if hs.commit > self.log.last_index:
            raise ValueError(f"stored commit {hs.commit} beyond stored log {self.log.last_index}")
        self.term = hs.term
        self.vote = hs.vote
        self.commit_index = hs.commit
        # No snapshots: a rebuilt node re-applies its committed log from the start.
        self.applied_index = 0
        self._handed_index = 0
        self._persisted_hs = hs
        self.state: RaftState = "follower"
        self.leader_id: str | None = None
        self.dropped = 0
        self._msgs: list[Message] = []
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Progress] = {}
        self._commit_broadcast = False
        self._last_leader_contact = -math.inf
        self._election_deadline = math.inf
        self._heartbeat_deadline = math.inf
        self._check_quorum_deadline = math.inf
        self._reset_election_timer(now)

    # ----------------------------------------------------------------- inputs

    def next_deadline(self) -> float:
        if self.state == "leader":
            if self.config.check_quorum:
                return min(self._heartbeat_deadline, self._check_quorum_deadline)
            return self._heartbeat_deadline
        return self._election_deadline

    def tick(self, now: float) -> None:
        if self.state == "leader":
            if self.config.check_quorum and now >= self._check_quorum_deadline:
                active = 1 + sum(1 for pr in self._progress.values() if pr.recent_active)
                if active < self._quorum:
                    self._become_follower(self.term, None, now)
                    return
                for pr in self._progress.values():
                    pr.recent_active = False
                self._check_quorum_deadline = now + self.config.election_timeout
            if now >= self._heartbeat_deadline:
                self._heartbeat_deadline = now + self.config.heartbeat_interval
                for peer, pr in self._progress.items():
                    if pr.state == "probe":
                        pr.probe_sent = False
                        self._send_append(peer, pr, allow_empty=True)
                    else:
                        self._send_empty(peer, pr)
        elif now >= self._election_deadline:
            self._campaign(now)

    def propose(self, data: bytes, now: float) -> int | None:
        """Append ``data`` to the leader's log; its index, or None when not the leader."""
        if self.state != "leader":
            return None
        index = self.log.last_index + 1
        self.log.append(Entry(self.term, index, data, "normal"))
        return index

    def step(self, msg: Message, now: float) -> None:
        if msg.dst != self.id or msg.src not in self._peer_set():
            self.dropped += 1
            return
        if msg.term > self.term:
            if isinstance(msg, RequestVote):
                if self._in_lease(now):
                    return
                if not msg.pre_vote:
                    self._become_follower(msg.term, None, now)
            elif isinstance(msg, RequestVoteResponse) and msg.pre_vote and msg.granted:
                pass
            else:
                leader = msg.src if isinstance(msg, AppendEntries) else None
                self._become_follower(msg.term, leader, now)
        elif msg.term < self.term:
            # Tell a stale leader or pre-candidate about the newer term; ignore the rest.
            if isinstance(msg, AppendEntries):
                self._send(
                    AppendEntriesResponse(
                        self.term, self.id, msg.src, False, reject_index=msg.prev_index
                    )
                )
            elif isinstance(msg, RequestVote) and msg.pre_vote:
                self._send(RequestVoteResponse(self.term, self.id, msg.src, False, True))
            return
        if isinstance(msg, AppendEntries):
            self._on_append(msg, now)
        elif isinstance(msg, AppendEntriesResponse):
            if self.state == "leader":
                self._on_append_response(msg)
        elif isinstance(msg, RequestVote):
            self._on_vote_request(msg, now)
        else:
            self._on_vote_response(msg, now)

    def match_index(self, peer: str) -> int:
        """Leader only: the highest index known replicated on ``peer`` (0 otherwise)."""
        pr = self._progress.get(peer)
        return pr.match if pr is not None else 0

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
        return Ready(
            hard_state=hs if hs != self._persisted_hs else None,
            entries=self.log.unstable(),
            messages=msgs,
            committed=committed,
        )

    def advance(self, ready: Ready) -> None:
        """The shell persisted, sent and applied ``ready``."""
        if ready.hard_state is not None:
            self._persisted_hs = ready.hard_state
        if ready.entries:
            last = ready.entries[-1]
            self.log.stable_to(last.index, last.term)
        if ready.committed:
            self.applied_index = max(self.applied_index, ready.committed[-1].index)
        if self.state == "leader":
            self._maybe_commit()

    # ----------------------------------------------------------------- elections

    def _peer_set(self) -> dict[str, None]:
        return dict.fromkeys(self.peers)

    def _in_lease(self, now: float) -> bool:
        if not self.config.check_quorum:
            return False
        if self.state == "leader":
            return True
        return (
            self.leader_id is not None
            and now - self._last_leader_contact < self.config.election_timeout
        )

    def _reset_election_timer(self, now: float) -> None:
        t = self.config.election_timeout
        self._election_deadline = now + t + t * self._rng.random()

    def _campaign(self, now: float) -> None:
        if self.config.pre_vote and self.peers:
            self.state = "pre_candidate"
            self.leader_id = None
            self._votes = {self.id: True}
            self._reset_election_timer(now)
            for peer in self.peers:
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

    def _become_candidate(self, now: float) -> None:
        self.term += 1
        self.vote = self.id
        self.state = "candidate"
        self.leader_id = None
        self._votes = {self.id: True}
        self._reset_election_timer(now)
        if self._quorum == 1:
            self._become_leader(now)
            return
        for peer in self.peers:
            self._send(
                RequestVote(self.term, self.id, peer, self.log.last_index, self.log.last_term)
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
        self._heartbeat_deadline = math.inf
        self._check_quorum_deadline = math.inf
        self._reset_election_timer(now)

    def _become_leader(self, now: float) -> None:
        self.state = "leader"
        self.leader_id = self.id
        self._votes = {}
        nxt = self.log.last_index + 1
        self._progress = {p: _Progress(match=0, next=nxt) for p in self.peers}
        self.log.append(Entry(self.term, nxt, b"", "noop"))
        self._heartbeat_deadline = now + self.config.heartbeat_interval
        self._check_quorum_deadline = now + self.config.election_timeout
        self._election_deadline = math.inf

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
        if sum(1 for g in self._votes.values() if g) < self._quorum:
            return
        if self.state == "pre_candidate":
            self._become_candidate(now)
        else:
            self._become_leader(now)

    # ----------------------------------------------------------------- replication

    def _on_append(self, msg: AppendEntries, now: float) -> None:
        if self.state == "leader":
            # Two leaders in one term cannot happen with correct peers: drop the frame.
            self.dropped += 1
            return
        if self.state != "follower" or self.leader_id != msg.src:
            self._become_follower(self.term, msg.src, now)
        else:
            self._last_leader_contact = now
            self._reset_election_timer(now)
        log = self.log
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
                )
            )
            return
        # Validate the whole batch before touching the log: a malformed frame changes nothing.
        conflict: int | None = None
        last_term = msg.prev_term
        for k, e in enumerate(msg.entries, start=1):
            if e.index != msg.prev_index + k or not last_term <= e.term <= msg.term:
                self.dropped += 1
                return
            last_term = e.term
            if conflict is None:
                t = log.term(e.index)
                if t is not None and t != e.term:
                    conflict = e.index
        if conflict is not None and conflict <= self.commit_index:
            self.dropped += 1
            return
        if conflict is not None:
            log.truncate_from(conflict)
        for e in msg.entries:
            if e.index > log.last_index:
                log.append(e)
        last_new = msg.prev_index + len(msg.entries)
        if msg.commit > self.commit_index:
            self.commit_index = max(self.commit_index, min(msg.commit, last_new))
        self._send(AppendEntriesResponse(self.term, self.id, msg.src, True, match_index=last_new))

    def _on_append_response(self, msg: AppendEntriesResponse) -> None:
        pr = self._progress[msg.src]
        pr.recent_active = True
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
            if pr.state == "probe":
                pr.state = "replicate"
                pr.next = pr.match + 1
                pr.inflight.clear()
            self._maybe_commit()
            return
        rejected = msg.reject_index
        if rejected > self.log.last_index:
            self.dropped += 1  # we never sent such a prev_index: a corrupt or hostile peer
            return
        if rejected <= pr.match or (pr.state == "probe" and rejected != pr.next - 1):
            return  # stale: answers a message sent before we learned better
        if msg.hint_term == 0:
            candidate = msg.hint_index
        else:
            found = self.log.last_index_of_term(msg.hint_term, rejected)
            candidate = found + 1 if found is not None else msg.hint_index
        pr.state = "probe"
        pr.probe_sent = False
        pr.inflight.clear()
        pr.next = max(pr.match + 1, min(candidate, rejected))

    def _maybe_commit(self) -> None:
        matches = sorted([self.log.stable_index, *(p.match for p in self._progress.values())])
        n = matches[len(matches) - self._quorum]
        # §5.4.2: only an entry of the current term is committed by counting replicas.
        if n > self.commit_index and self.log.term(n) == self.term:
            self.commit_index = n
            self._commit_broadcast = True

    def _flush_appends(self) -> None:
        if self.state != "leader":
            return
        for peer, pr in self._progress.items():
            sent = False
            while self._send_append(peer, pr, allow_empty=False):
                sent = True
            if self._commit_broadcast and not sent:
                self._send_empty(peer, pr)
        self._commit_broadcast = False

    def _send_append(self, peer: str, pr: _Progress, *, allow_empty: bool) -> bool:
        if pr.state == "probe" and pr.probe_sent:
            return False
        if pr.state == "replicate" and len(pr.inflight) >= self.config.max_inflight:
            return False
        hi = min(self.log.last_index + 1, pr.next + self.config.max_entries_per_append)
        entries = self.log.slice(pr.next, hi)
        if not entries and not allow_empty:
            return False
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        assert prev_term is not None
        self._send(
            AppendEntries(
                self.term, self.id, peer, prev, prev_term, tuple(entries), self.commit_index
            )
        )
        if pr.state == "probe":
            pr.probe_sent = True
        elif entries:
            pr.next = entries[-1].index + 1
            pr.inflight.append(entries[-1].index)
        return True

    def _send_empty(self, peer: str, pr: _Progress) -> None:
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        assert prev_term is not None
        self._send(AppendEntries(self.term, self.id, peer, prev, prev_term, (), self.commit_index))

    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)
