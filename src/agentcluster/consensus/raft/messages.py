"""Raft wire messages, log entries and the values the core hands to its shell.

Theory of operation: everything that crosses the network is a frozen ``msgspec.Struct``
encoded array-like with a short tag, forming the tagged union :data:`Message`. Every message
names its sender (``src``) and receiver (``dst``) and carries the sender's ``term``, so the core
can apply the term rules of the Raft paper (§5.1) before looking at anything else.

* :class:`RequestVote` / :class:`RequestVoteResponse` -- elections (§5.2) and, with
  ``pre_vote=True``, the pre-vote round of the thesis §9.6 that asks "would you vote for me?"
  without anybody changing term.
* :class:`AppendEntries` / :class:`AppendEntriesResponse` -- replication and heartbeats
  (§5.3). A rejection carries ``reject_index`` (the ``prev_index`` that failed) and a hint
  (``hint_index``, ``hint_term``: the follower's conflicting term and the first index it holds
  of that term, or its last index + 1 when the log is too short) so the leader skips a whole
  term per round trip instead of one entry.

Peer-controlled sizes are bounded so a corrupt frame fails decoding instead of reaching the
core. The second half holds what is *not* sent: :class:`HardState` (what must be on stable
storage before a message that depends on it leaves) and :class:`Ready`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = [
    "MAX_ENTRIES_PER_MESSAGE",
    "MAX_TERM",
    "AppendEntries",
    "AppendEntriesResponse",
    "ConfChange",
    "ConfOp",
    "ConfState",
    "Entry",
    "EntryKind",
    "HardState",
    "InstallSnapshot",
    "Message",
    "Ready",
    "RequestVote",
    "RequestVoteResponse",
    "Snapshot",
    "SnapshotChunk",
    "SnapshotChunkAck",
    "TimeoutNow",
    "decode_conf_change",
    "decode_message",
    "encode_conf_change",
    "encode_message",
]

# A hard cap on entries in one frame, far above any configured batch size.
MAX_ENTRIES_PER_MESSAGE = 65_536

NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Counter = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# Terms grow by one per election, so an honest cluster never gets near this bound; it sits
# far below the int64 limit of the encoding. A term above it fails decoding (malformed), and
# the core neither adopts a term at the bound nor campaigns into it -- so every term a node
# sends is one its peers accept, and one forged message cannot push a node to a term whose
# next election no peer could decode.
MAX_TERM = 2**62
Term = Annotated[int, msgspec.Meta(ge=0, le=MAX_TERM)]
EntryKind = Literal["normal", "noop", "conf"]


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One log entry; ``noop`` entries are appended by a new leader (§5.4.2, §8); ``conf``
    entries carry an encoded configuration change (§4.1 of the thesis)."""

    term: Term
    index: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
    data: bytes = b""
    kind: EntryKind = "normal"


class ConfState(msgspec.Struct, frozen=True, array_like=True):
    """The cluster configuration: voters decide elections and commits, learners only follow."""

    voters: tuple[NodeId, ...] = ()
    learners: tuple[NodeId, ...] = ()


class Snapshot(msgspec.Struct, frozen=True, array_like=True):
    """The state machine's state after applying every entry up to ``index`` (of ``term``),
    with the configuration in force at that point; ``data`` is opaque to Raft."""

    index: Counter
    term: Term
    conf: ConfState
    data: bytes = b""


class RequestVote(msgspec.Struct, frozen=True, array_like=True, tag="rv"):
    """A vote (or pre-vote) request; for a pre-vote ``term`` is the term it *would* use."""

    term: Term
    src: NodeId
    dst: NodeId
    last_index: Counter
    last_term: Term
    pre_vote: bool = False
    # Sent by a leadership-transfer target (thesis §3.10): voters skip the "leader is live"
    # refusal, since the leader itself asked for the election.
    transfer: bool = False


class RequestVoteResponse(msgspec.Struct, frozen=True, array_like=True, tag="rvr"):
    term: Term
    src: NodeId
    dst: NodeId
    granted: bool
    pre_vote: bool = False


class AppendEntries(msgspec.Struct, frozen=True, array_like=True, tag="ae"):
    """Entries after ``prev_index`` (empty for a heartbeat); ``src`` is the leader."""

    term: Term
    src: NodeId
    dst: NodeId
    prev_index: Counter
    prev_term: Term
    entries: Annotated[tuple[Entry, ...], msgspec.Meta(max_length=MAX_ENTRIES_PER_MESSAGE)]
    commit: Counter
    # The leader's heartbeat round, echoed back: acknowledged rounds confirm leadership for
    # ReadIndex and time the leader lease (thesis §6.4).
    seq: Counter = 0

    @property
    def leader(self) -> str:
        return self.src


class AppendEntriesResponse(msgspec.Struct, frozen=True, array_like=True, tag="aer"):
    """``match_index`` on success; on rejection ``reject_index`` and the backtracking hint."""

    term: Term
    src: NodeId
    dst: NodeId
    success: bool
    match_index: Counter = 0
    reject_index: Counter = 0
    hint_index: Counter = 0
    hint_term: Term = 0
    seq: Counter = 0


class InstallSnapshot(msgspec.Struct, frozen=True, array_like=True, tag="is"):
    """The leader's snapshot for a follower whose next entry was compacted away (§7); the
    follower answers with an :class:`AppendEntriesResponse`."""

    term: Term
    src: NodeId
    dst: NodeId
    snapshot: Snapshot
    seq: Counter = 0


class SnapshotChunk(msgspec.Struct, frozen=True, array_like=True, tag="sc"):
    """A piece of a snapshot too large for one message (the thesis's InstallSnapshot with
    ``offset``): ``snapshot`` carries the index, term and configuration, and in ``data`` just
    the bytes from ``offset`` on; ``total`` is the size of the whole data. The follower
    answers a middle piece with :class:`SnapshotChunkAck`, the last as it answers an
    :class:`InstallSnapshot`. (A tag of its own: a node that predates chunks drops the
    pieces rather than installing one as a whole snapshot.)"""

    term: Term
    src: NodeId
    dst: NodeId
    snapshot: Snapshot
    offset: Counter
    total: Counter
    seq: Counter = 0


class SnapshotChunkAck(msgspec.Struct, frozen=True, array_like=True, tag="sa"):
    """The answer to the piece at ``offset`` of the snapshot at ``index``: the follower holds
    ``received`` bytes of it, the offset it wants next (0: start over)."""

    term: Term
    src: NodeId
    dst: NodeId
    index: Counter
    offset: Counter
    received: Counter


class TimeoutNow(msgspec.Struct, frozen=True, array_like=True, tag="tn"):
    """Leadership transfer (thesis §3.10): "start an election now"."""

    term: Term
    src: NodeId
    dst: NodeId


ConfOp = Literal["add_voter", "add_learner", "remove"]


class ConfChange(msgspec.Struct, frozen=True, array_like=True):
    """One single-server membership change (thesis §4.1), carried by a ``conf`` entry.

    The leader fills in ``result``, the whole configuration after the change, so a server
    that joins with an empty configuration learns every member from the entry alone."""

    op: ConfOp
    node: NodeId
    result: ConfState | None = None


Message = (
    RequestVote
    | RequestVoteResponse
    | AppendEntries
    | AppendEntriesResponse
    | InstallSnapshot
    | SnapshotChunk
    | SnapshotChunkAck
    | TimeoutNow
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def encode_message(msg: Message) -> bytes:
    return _encoder.encode(msg)


_conf_decoder = msgspec.msgpack.Decoder(ConfChange)


def encode_conf_change(change: ConfChange) -> bytes:
    return _encoder.encode(change)


def decode_conf_change(data: bytes) -> ConfChange:
    return _conf_decoder.decode(data)


def decode_message(data: bytes) -> Message:
    """Decode one frame; raises ``msgspec.DecodeError``/``ValidationError`` on bad input."""
    return _decoder.decode(data)


class HardState(msgspec.Struct, frozen=True, array_like=True):
    """The state that must survive a crash: current term, vote in it, commit index."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


class Ready(msgspec.Struct, frozen=True):
    """One batch of work for the shell, to be handled **in this order**:

    0. if ``snapshot`` is set: save it and restore the state machine from it;
    1. write ``hard_state`` (if not None) and append ``entries`` (an entry at an index already
       stored replaces it and everything after it) to stable storage, and sync;
    2. only then send ``messages`` -- a vote grant or an append acknowledgement is never
       handed out in a Ready earlier than the hard state / entries it promises are durable.
       (A *leader* may send first and write in parallel: its messages are appends, and it
       counts its own copy only after :meth:`RaftNode.advance` confirms the write.);
    3. apply ``committed`` to the state machine, in order;
    4. call :meth:`RaftNode.advance` with this Ready.
    """

    # (A frozen Struct, not a frozen dataclass: one is built per turn of every node, and the
    # dataclass's per-field ``object.__setattr__`` made that several times dearer.)
    hard_state: HardState | None = None
    entries: list[Entry] = msgspec.field(default_factory=list)
    messages: list[Message] = msgspec.field(default_factory=list)
    committed: list[Entry] = msgspec.field(default_factory=list)
    # A snapshot received from the leader: save it (discarding the log) and restore the state
    # machine from it *before* step 1's entries and step 3's committed entries.
    snapshot: Snapshot | None = None
    # Linearizable reads released by this Ready: (request id, read index). Serve each once
    # the state machine has applied the read index.
    read_states: list[tuple[int, int]] = msgspec.field(default_factory=list)
    # The configuration, when it changed (a committed ``conf`` entry or a snapshot).
    conf: ConfState | None = None

    @property
    def empty(self) -> bool:
        return (
            self.hard_state is None
            and not self.entries
            and not self.messages
            and not self.committed
            and self.snapshot is None
            and not self.read_states
            and self.conf is None
        )
