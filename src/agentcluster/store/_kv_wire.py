"""The wire contract between store clients and Raft members: ``KvRequest`` / ``KvReply``, the
limits a request and a reply must keep, and how a member's failures become replies and
replies become the store's errors again.

Theory of operation: every store request a client cannot run itself -- a write on a node that
is not the leader, a remote client's request to an entry node, a watch's long-poll -- travels
as a :class:`KvRequest` and comes back as a :class:`KvReply` whose ``error`` names a store
error (:func:`_error_reply` on the member, :func:`_answer` on the client), so both ends raise
the same exceptions. A write fits one log entry, which a follower receives in one 4 MiB frame
(:data:`MAX_WRITE_BYTES`); an answer fits one reply (:data:`MAX_REPLY_BYTES`) -- a range
that would not is refused with :class:`ReplyTooLarge` and read in pages instead (``limit`` and
``start``) -- and an events long-poll's answer is cut between revisions (:func:`_cut_events`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from agentcluster.consensus.raft.shell import NotLeader, OutcomeUnknown, ProposalDropped
from agentcluster.store._batch import Failed
from agentcluster.store._kv import (
    MAX_WRITE_BYTES,
    Command,
    InvalidCommand,
    Result,
    decode_result,
    encode_result,
    encode_write,
)
from agentcluster.store.base import (
    Compacted,
    LeaseNotFound,
    ReplyTooLarge,
    StoreUnavailable,
    TxnResult,
    WatchEvent,
)

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_WRITE_BYTES",
    "KvError",
    "KvOp",
    "KvReply",
    "KvRequest",
    "NotSent",
    "ReplyTooLarge",
    "applied_too_large",
    "outcome_reply",
    "write_reply",
]


class NotSent(StoreUnavailable):
    """The request certainly did not reach a member (no address, connection refused): safe
    to send again elsewhere, even a write."""


KvOp = Literal["cmd", "get", "range", "rev", "keepalive", "events"]
KvError = Literal[
    "", "not_leader", "unavailable", "dropped", "lease", "invalid", "compacted", "too_large"
]


class KvRequest(msgspec.Struct, frozen=True, array_like=True, tag="kvq"):
    op: KvOp
    cmd: bytes = b""  # an encoded Command for "cmd"
    key: str = ""  # key / prefix
    n: int = 0  # range limit, lease id, or the first revision wanted by "events"
    wait: float = 0.0  # "events": how long to wait for a first event
    # "range": the first key wanted (inclusive). Last and defaulted, so requests from older
    # clients still decode; a member older than the field ignores it (see KvClient.range).
    start: str = ""


class KvReply(msgspec.Struct, frozen=True, array_like=True, tag="kvr"):
    ok: bool
    data: bytes = b""
    error: KvError = ""
    message: str = ""
    leader: str | None = None
    n: int = 0  # "compacted": the oldest revision kept


_EVENTS_BATCH = 1_000
# An events reply is cut (at a revision boundary) once it holds this many bytes of keys and
# values: far inside a frame, so a watch replaying big values makes steady progress.
_EVENTS_BYTES = 1 << 20
# What one reply may carry: a stream frame (4 MiB) less room for the reply's own framing and
# for other replies batched with it.
MAX_REPLY_BYTES = (4 << 20) - (256 << 10)
_DECODED_MAX = 1 << 16


def _event_bytes(ev: WatchEvent) -> int:
    size = 48 + len(ev.kv.key) + len(ev.kv.value)
    if ev.prev is not None:
        size += len(ev.prev.key) + len(ev.prev.value)
    return size


def _cut_events(events: list[WatchEvent]) -> list[WatchEvent]:
    """A prefix of ``events`` ending at a revision boundary (the client resumes from the last
    revision + 1) within ``_EVENTS_BATCH`` events and ``_EVENTS_BYTES`` -- but at least the first
    revision whole. A first revision that alone does not fit in a reply goes without its
    events' previous values (each write is within a reply, but an overwrite carries the old
    value too, and a prefix delete every deleted value); ReplyTooLarge when even that does not
    fit."""
    size = 0
    boundary = 0  # events[:boundary] ends on a revision boundary
    for i, ev in enumerate(events):
        if i and ev.revision != events[i - 1].revision:
            boundary = i
            if i >= _EVENTS_BATCH or size >= _EVENTS_BYTES:
                return events[:boundary]
        size += _event_bytes(ev)
        if size > MAX_REPLY_BYTES:
            if boundary:
                return events[:boundary]  # this revision goes in the next reply
            return _without_prev(events)
    return events


def _without_prev(events: list[WatchEvent]) -> list[WatchEvent]:
    """The first revision of ``events`` with no previous values, if that fits in a reply."""
    first = events[0].revision
    bare: list[WatchEvent] = []
    size = 0
    for ev in events:
        if ev.revision != first:
            break
        bare.append(msgspec.structs.replace(ev, prev=None))
        size += _event_bytes(bare[-1])
        if size > MAX_REPLY_BYTES:
            raise ReplyTooLarge(
                f"revision {first} holds more than {MAX_REPLY_BYTES:,} bytes of events for "
                "this prefix even without previous values: too large for a remote watch "
                "(watch it on a store member)"
            )
    return bare


def _answer(req: KvRequest, reply: KvReply) -> KvReply:
    """``reply`` when it succeeded, else the store error it stands for."""
    if reply.ok:
        return reply
    if reply.error == "lease":
        raise LeaseNotFound(reply.message)
    if reply.error == "compacted":
        raise Compacted(req.n, reply.n)
    if reply.error == "invalid":
        raise InvalidCommand(reply.message)
    if reply.error == "too_large":
        raise ReplyTooLarge(reply.message)
    raise StoreUnavailable(reply.message or reply.error)


def _command_request(cmd: Command) -> KvRequest:
    return KvRequest("cmd", encode_write(cmd))


def _result(req: KvRequest, reply: KvReply) -> Result:
    """The result of the command ``req`` carried, from its ``reply``."""
    return decode_result(_answer(req, reply).data)


def _error_reply(exc: BaseException) -> KvReply | None:
    """The reply for a request that failed on a member with ``exc``; None for an exception
    that is no store error (a bug: let it propagate)."""
    if isinstance(exc, NotLeader):
        return KvReply(False, error="not_leader", message=str(exc), leader=exc.leader)
    if isinstance(exc, ProposalDropped):
        return KvReply(False, error="dropped", message=str(exc))
    if isinstance(exc, OutcomeUnknown):
        return KvReply(False, error="unavailable", message=str(exc))
    if isinstance(exc, Compacted):
        return KvReply(False, error="compacted", message=str(exc), n=exc.oldest)
    if isinstance(exc, LeaseNotFound):
        return KvReply(False, error="lease", message=str(exc))
    if isinstance(exc, ReplyTooLarge):
        return KvReply(False, error="too_large", message=str(exc))
    if isinstance(exc, InvalidCommand | ValueError):
        return KvReply(False, error="invalid", message=str(exc))
    return None


def write_reply(result: Result) -> KvReply:
    """The reply for an applied write: its result -- or, for a transaction whose reads do not
    fit in one reply, a ``too_large`` error that says it was applied (never an unknown
    outcome, which a caller might answer by writing again)."""
    data = encode_result(result)
    if len(data) > MAX_REPLY_BYTES:
        return applied_too_large(result, len(data), f"one reply ({MAX_REPLY_BYTES:,} bytes)")
    return KvReply(True, data)


def applied_too_large(result: Result, size: int, room: str) -> KvReply:
    if isinstance(result, TxnResult):
        done = (
            f"the transaction was applied at revision {result.revision} "
            f"(succeeded: {result.succeeded})"
        )
    else:
        done = "the write was applied"
    return KvReply(
        False,
        error="too_large",
        message=f"{done}, but its answer of {size:,} bytes does not fit in {room}: "
        "read what it reads with range, in pages",
    )


def outcome_reply(outcome: Result | Failed) -> KvReply:
    """The reply for a write whose proposal settled with ``outcome``."""
    if not isinstance(outcome, Failed):
        return write_reply(outcome)
    reply = _error_reply(outcome.exc)
    if reply is None:
        raise outcome.exc
    return reply
