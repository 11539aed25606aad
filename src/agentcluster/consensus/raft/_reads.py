"""Linearizable reads (ReadIndex, leader lease) and leadership transfer for :class:`RaftNode`.

Theory of operation: this mixin holds the leader-side bookkeeping -- numbered heartbeat rounds
and when each was sent, reads waiting for a round (or for the first commit of the term), and
the transfer target. It reads and writes the node's state through the attributes declared
below, which :class:`~agentcluster.consensus.raft.core.RaftNode` initialises.

**Linearizable reads (thesis §6.4).** :meth:`~RaftNode.read_index` returns (through
``Ready.read_states``) an index after which the state machine may answer a read. Every
heartbeat round has a sequence number echoed by the followers; a read waits for a quorum to
acknowledge a round started after it arrived (ReadIndex). With ``lease_reads`` and
check-quorum, a leader whose quorum acknowledged a round less than ``election_timeout * (1 -
clock_drift)`` ago answers at once: until then no voter grants a vote to anybody else. A
restarted node refuses votes for one election timeout too, since it forgot when it last heard
from the leader. Reads wait until the leader has committed an entry of its term.

**Leadership transfer (thesis §3.10).** The leader stops accepting proposals and lease reads,
brings the target up to date and sends it TimeoutNow; the target starts an election at once,
marked so that voters skip the live-leader check. The transfer is abandoned after an election
timeout -- but a TimeoutNow already sent may still arrive and elect its target, past every
voter's lease: a leader that sent one serves no lease read for the rest of its term (ReadIndex
rounds still answer). A read that waited for the term's first commit is confirmed by a fresh
round, never by the lease (the commit may be noticed after a disk write, at a stale time).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agentcluster.consensus.raft.messages import Message, TimeoutNow

if TYPE_CHECKING:
    from agentcluster.consensus.raft._log import RaftLog
    from agentcluster.consensus.raft._progress import Progress
    from agentcluster.consensus.raft.core import RaftConfig, RaftState

__all__ = ["ReadsMixin"]

# How many heartbeat-round send times a leader remembers for lease timing.
_SEQ_MEMORY = 1024


class ReadsMixin:
    id: str
    config: RaftConfig
    state: RaftState
    term: int
    commit_index: int
    log: RaftLog
    voters: tuple[str, ...]
    _progress: dict[str, Progress]
    _msgs: list[Message]
    _seq: int
    _seq_sent: dict[int, float]
    _seq_flush: bool
    _reads: list[tuple[int, int, int]]
    _reads_waiting: list[int]
    _read_states: list[tuple[int, int]]
    _transferee: str | None
    _transfer_deadline: float
    _lease_void: bool

    @property
    def is_voter(self) -> bool:
        return self.id in self.voters

    def _quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)

    def read_index(self, request_id: int, now: float) -> bool:
        """Ask for a linearizable read; ``(request_id, index)`` comes back in a later
        ``Ready.read_states``. False when this node is not a leader that can serve reads."""
        if self.state != "leader" or self._transferee is not None:
            return False
        if self.log.term(self.commit_index) != self.term:
            self._reads_waiting.append(request_id)
        else:
            self._admit_read(request_id, now)
        return True

    def lease_valid(self, now: float) -> bool:
        """True while a quorum acknowledged a heartbeat round recent enough that no other
        leader can exist (thesis §6.4.1)."""
        if self.state != "leader" or self._transferee is not None or self._lease_void:
            return False
        if not self.config.lease_reads:
            return False
        acked = self._quorum_acked_seq()
        sent = self._seq_sent.get(acked)
        if sent is None:
            return len(self.voters) == 1 and self.is_voter
        budget = self.config.election_timeout * (1.0 - self.config.clock_drift)
        return now < sent + budget

    def transfer_leadership(self, target: str, now: float) -> bool:
        """Hand leadership to the voter ``target`` (thesis §3.10); False if impossible."""
        if self.state != "leader" or target == self.id or target not in self.voters:
            return False
        pr = self._progress.get(target)
        if pr is None:
            return False
        self._transferee = target
        self._transfer_deadline = now + self.config.election_timeout
        if pr.match == self.log.last_index:
            self._send_timeout_now(target)
        return True

    def _send_timeout_now(self, target: str) -> None:
        # A TimeoutNow may arrive late -- after the transfer was abandoned -- and still make
        # its target campaign past the voters' lease check: from now on in this term, no
        # lease shortcut, every read is confirmed by a quorum round.
        self._lease_void = True
        self._send(TimeoutNow(self.term, self.id, target))

    def _new_round(self, now: float) -> None:
        self._seq += 1
        self._seq_sent[self._seq] = now
        if len(self._seq_sent) > _SEQ_MEMORY:
            del self._seq_sent[next(iter(self._seq_sent))]

    def _quorum_acked_seq(self) -> int:
        acked = sorted(
            (self._seq if v == self.id else self._progress[v].acked_seq)
            for v in self.voters
            if v == self.id or v in self._progress
        )
        q = self._quorum()
        return acked[len(acked) - q] if len(acked) >= q else 0

    def _admit_read(self, request_id: int, now: float, *, lease_ok: bool = True) -> None:
        if lease_ok and self.lease_valid(now):
            self._read_states.append((request_id, self.commit_index))
            return
        # Reads that arrive before the next flush share one confirmation round.
        if not self._seq_flush:
            self._new_round(now)
            self._seq_flush = True
        self._reads.append((self._seq, request_id, self.commit_index))
        self._release_reads()

    def _release_reads(self) -> None:
        if not self._reads:
            return
        acked = self._quorum_acked_seq()
        k = 0
        while k < len(self._reads) and self._reads[k][0] <= acked:
            _, rid, index = self._reads[k]
            self._read_states.append((rid, index))
            k += 1
        del self._reads[:k]

    def _abort_transfer(self) -> None:
        self._transferee = None
        self._transfer_deadline = math.inf
