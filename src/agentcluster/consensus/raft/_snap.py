"""Snapshot transfer for :class:`~agentcluster.consensus.raft.core.RaftNode` (§7): whole, or
in chunks (a mixin that keeps ``core.py`` readable).

Theory of operation: a snapshot whose data fits ``RaftConfig.snapshot_chunk_bytes`` travels as
one :class:`InstallSnapshot`. A larger one -- the store's state and watch history easily pass
the transport's 4 MiB frame -- travels as :class:`SnapshotChunk` messages, one at a time, as
the thesis's InstallSnapshot with ``offset`` does: each carries the snapshot's index, term and
configuration, its offset and the total size. The follower keeps the bytes received so far of
one snapshot (by index and term, from one leader term) and answers each piece with
:class:`SnapshotChunkAck` -- the piece it answers and the offset it wants next. The leader
sends the next piece only for the answer to the piece in flight, so a duplicated piece or a
late answer never adds a second stream of pieces; a lost one stalls the transfer until the
leader gives up waiting and starts again at 0, which the follower answers with the offset it
holds. Each answer counts as contact: the leader falls back to probing only after an election
timeout without one, so a snapshot of any size gets through at the link's pace. A transfer
keeps to the snapshot it began with, even when the leader takes a newer one meanwhile (the
log keeps ``snapshot_keep`` entries behind a snapshot for such a follower to go on from): a
transfer slower than the snapshots would otherwise start over for ever. The last piece
installs the snapshot exactly as a whole InstallSnapshot does, and is answered the same way
(an :class:`AppendEntriesResponse`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from agentcluster.consensus.raft.messages import (
    AppendEntriesResponse,
    InstallSnapshot,
    Message,
    Snapshot,
    SnapshotChunk,
    SnapshotChunkAck,
)

if TYPE_CHECKING:
    from agentcluster.consensus.raft._log import RaftLog
    from agentcluster.consensus.raft._progress import Progress
    from agentcluster.consensus.raft.core import RaftConfig, RaftState
    from agentcluster.consensus.raft.messages import ConfState

__all__ = ["SnapshotMixin"]


class _Partial(msgspec.Struct):
    """The pieces of one snapshot received so far."""

    index: int
    term: int
    conf: ConfState
    leader_term: int
    total: int
    data: bytearray


class SnapshotMixin:
    id: str
    config: RaftConfig
    state: RaftState
    term: int
    commit_index: int
    log: RaftLog
    dropped: int
    _progress: dict[str, Progress]
    _snapshot: Snapshot | None
    _pending_snapshot: Snapshot | None
    _handed_index: int
    _seq: int
    _partial: _Partial | None

    if TYPE_CHECKING:  # provided by RaftNode and its other mixins (declared only)

        def _send(self, msg: Message) -> None: ...
        def _leader_contact(self, src: str, now: float) -> None: ...
        def _commit_to(self, index: int) -> None: ...
        def _set_conf(self, conf: ConfState, index: int, *, notify: bool = True) -> None: ...

    # ------------------------------------------------------------------ leader

    def _send_snapshot(self, peer: str, pr: Progress) -> bool:
        snap = self._snapshot
        if snap is None:
            raise AssertionError("an entry was compacted without a snapshot")
        pr.become_probe()
        pr.state = "snapshot"
        pr.next = snap.index + 1
        if len(snap.data) <= self.config.snapshot_chunk_bytes:
            self._send(InstallSnapshot(self.term, self.id, peer, snap, self._seq))
        else:
            pr.snap = snap
            self._send_chunk(peer, pr, 0)
        return False

    def _send_chunk(self, peer: str, pr: Progress, offset: int) -> None:
        snap = pr.snap
        assert snap is not None
        piece = snap.data[offset : offset + self.config.snapshot_chunk_bytes]
        part = Snapshot(snap.index, snap.term, snap.conf, piece)
        pr.snap_offset = offset
        self._send(SnapshotChunk(self.term, self.id, peer, part, offset, len(snap.data), self._seq))

    def _on_chunk_ack(self, msg: SnapshotChunkAck) -> None:
        pr = self._progress.get(msg.src)
        if self.state != "leader" or pr is None or pr.state != "snapshot" or pr.snap is None:
            return  # an answer to a transfer that ended (installed, or given up)
        if (msg.index, msg.offset) != (pr.snap.index, pr.snap_offset):
            return  # a duplicate's answer, or a late one: the piece in flight has its own
        pr.recent_active = True
        pr.snapshot_ticks = 0
        if msg.received < len(pr.snap.data):
            self._send_chunk(msg.src, pr, msg.received)

    # ------------------------------------------------------------------ follower

    def _on_snapshot(self, msg: InstallSnapshot, now: float) -> None:
        if self.state == "leader":
            self.dropped += 1
            return
        self._leader_contact(msg.src, now)
        self._install(msg.snapshot, msg.src, msg.seq)

    def _on_chunk(self, msg: SnapshotChunk, now: float) -> None:
        if self.state == "leader":
            self.dropped += 1
            return
        self._leader_contact(msg.src, now)
        snap = msg.snapshot
        if snap.index <= self.commit_index:
            self._partial = None  # nothing to install: say where we are, as for a whole one
            self._install(snap, msg.src, msg.seq)
            return
        part = self._partial
        key = (snap.index, snap.term, msg.term, msg.total)
        if part is None or (part.index, part.term, part.leader_term, part.total) != key:
            if msg.offset != 0:
                self._ack_chunk(msg, 0)  # a piece of a snapshot we hold nothing of
                return
            part = _Partial(snap.index, snap.term, snap.conf, msg.term, msg.total, bytearray())
            self._partial = part
        if msg.offset != len(part.data):
            self._ack_chunk(msg, len(part.data))  # lost or repeated: ask for the next one
            return
        part.data += snap.data
        if len(part.data) > part.total:  # longer than announced: start over
            self._partial = None
            self._ack_chunk(msg, 0)
            return
        if len(part.data) < part.total:
            self._ack_chunk(msg, len(part.data))
            return
        self._partial = None
        whole = Snapshot(part.index, part.term, part.conf, bytes(part.data))
        self._install(whole, msg.src, msg.seq)

    def _ack_chunk(self, msg: SnapshotChunk, received: int) -> None:
        index = msg.snapshot.index
        self._send(SnapshotChunkAck(self.term, self.id, msg.src, index, msg.offset, received))

    def _install(self, snap: Snapshot, leader: str, seq: int) -> None:
        if snap.index > self.commit_index:
            if self.log.term(snap.index) == snap.term:
                self._commit_to(snap.index)  # we hold its last entry: fast-forward (§7)
            else:
                self.log.restore(snap.index, snap.term)
                self.commit_index = snap.index
                self._handed_index = snap.index
                self._snapshot = snap
                self._pending_snapshot = snap
                self._set_conf(snap.conf, snap.index)
        self._send(
            AppendEntriesResponse(
                self.term, self.id, leader, True, match_index=self.commit_index, seq=seq
            )
        )
