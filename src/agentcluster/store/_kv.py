"""The replicated key-value state machine behind every self-hosted store backend.

Theory of operation: :class:`KVStateMachine` is a pure, deterministic core -- no asyncio, no
clock, no randomness. It holds the store's whole replicated state (keys, leases, the revision
counter, the lease-id counter and a bounded watch history) and changes only through
:meth:`KVStateMachine.apply` of a :data:`Command`. Two machines that applied the same commands
in the same order are identical, which is what lets the Raft backend apply its committed log
on every node, and the memory backend use the machine directly.

* **Commands** are msgspec tagged structs (:data:`Command`); :func:`encode_command` /
  :func:`decode_command` turn them into log-entry bytes and back, with peer-controlled sizes
  bounded, so a corrupt entry raises :class:`InvalidCommand` instead of reaching the machine.
* **Results** are msgspec structs too (:data:`Result`), so a node that applied a proposal can
  send its outcome back to a remote proposer. Errors are values (:class:`LeaseMissing`,
  :class:`Rejected`): a rejected command changes nothing, and is rejected identically on every
  replica. :func:`unwrap` turns an error value into the matching exception.
* **Revisions** follow :mod:`agentcluster.store.base`: one per command that changed at least
  one key (the writes of a transaction or of a lease revocation share it); lease grants,
  reads, failed and no-op writes leave it alone. Every changed key appends a
  :class:`~agentcluster.store.base.WatchEvent`, so every revision has at least one event.
* **Watch history** keeps whole revisions, oldest dropped first, beyond ``max_events`` (the
  newest revision is always kept) or below a :class:`CompactCmd`; :meth:`events_since` raises
  :class:`~agentcluster.store.base.Compacted` for what is gone.
* **Snapshots** (:meth:`snapshot` / :meth:`restore`) carry keys, leases, both counters, the
  compaction floor and the retained history, encoded canonically (keys and leases sorted), so
  a restored machine answers every read and every later command exactly as the original.
* **Lease TTLs** are replicated only as numbers (:meth:`leases`); counting them down is the
  driver's job (:mod:`._leases`), as etcd keeps TTL timers on the leader only.

Keys live in a dict plus a sorted key list, so a prefix range is ``O(log n + k)``, from any
start key (a page of a long listing costs no more than the first).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from typing import Annotated, TypeVar

import msgspec

from agentcluster.store.base import (
    MAX_KEY_LENGTH,
    Compacted,
    Compare,
    DeleteOp,
    GetOp,
    InvalidCommand,
    KeyValue,
    Lease,
    LeaseNotFound,
    PutOp,
    RangeResult,
    TxnOp,
    TxnResult,
    WatchEvent,
)

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_TXN_OPS",
    "MAX_VALUE_BYTES",
    "MAX_WRITE_BYTES",
    "Command",
    "CompactCmd",
    "CompactResult",
    "DeleteCmd",
    "DeleteResult",
    "InvalidCommand",
    "KVStateMachine",
    "LeaseGrantCmd",
    "LeaseMissing",
    "LeaseRevokeCmd",
    "PutCmd",
    "PutResult",
    "Rejected",
    "Result",
    "RevokeResult",
    "TxnCmd",
    "check_txn_writes",
    "checked_command",
    "decode_command",
    "decode_result",
    "encode_command",
    "encode_result",
    "encode_write",
    "unwrap",
    "write_too_large",
]

MAX_KEY_BYTES = MAX_KEY_LENGTH  # characters, as msgspec's max_length counts them
MAX_VALUE_BYTES = 16 * 1024 * 1024
MAX_TXN_OPS = 1024
_MAX_TTL = 10 * 365 * 24 * 3600.0

_Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_BYTES)]
_Prefix = Annotated[str, msgspec.Meta(max_length=MAX_KEY_BYTES)]
_Value = Annotated[bytes, msgspec.Meta(max_length=MAX_VALUE_BYTES)]
_Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Ttl = Annotated[float, msgspec.Meta(gt=0.0, le=_MAX_TTL)]


# --- commands -----------------------------------------------------------------------------


class PutCmd(msgspec.Struct, frozen=True, array_like=True, tag="p"):
    key: _Key
    value: _Value
    lease: _Id = 0


class DeleteCmd(msgspec.Struct, frozen=True, array_like=True, tag="d"):
    key: _Prefix
    prefix: bool = False


class TxnCmd(msgspec.Struct, frozen=True, array_like=True, tag="t"):
    compares: Annotated[list[Compare], msgspec.Meta(max_length=MAX_TXN_OPS)]
    success: Annotated[list[TxnOp], msgspec.Meta(max_length=MAX_TXN_OPS)]
    failure: Annotated[list[TxnOp], msgspec.Meta(max_length=MAX_TXN_OPS)] = []


class LeaseGrantCmd(msgspec.Struct, frozen=True, array_like=True, tag="lg"):
    ttl: _Ttl


class LeaseRevokeCmd(msgspec.Struct, frozen=True, array_like=True, tag="lr"):
    lease_id: _Id


class CompactCmd(msgspec.Struct, frozen=True, array_like=True, tag="c"):
    """Forget watch history older than ``revision`` (which must not be in the future)."""

    revision: _Id


Command = PutCmd | DeleteCmd | TxnCmd | LeaseGrantCmd | LeaseRevokeCmd | CompactCmd

# --- results ------------------------------------------------------------------------------


class PutResult(msgspec.Struct, frozen=True, array_like=True, tag="put"):
    revision: int


class DeleteResult(msgspec.Struct, frozen=True, array_like=True, tag="del"):
    deleted: int
    revision: int


class RevokeResult(msgspec.Struct, frozen=True, array_like=True, tag="rvk"):
    found: bool
    deleted: int
    revision: int


class CompactResult(msgspec.Struct, frozen=True, array_like=True, tag="cpt"):
    oldest: int  # the oldest revision the history can still answer


class LeaseMissing(msgspec.Struct, frozen=True, array_like=True, tag="nolease"):
    """Error value: a put named a lease that does not exist; nothing changed."""

    lease_id: int


class Rejected(msgspec.Struct, frozen=True, array_like=True, tag="rej"):
    """Error value: the command is malformed for this state; nothing changed."""

    reason: str


Result = (
    PutResult
    | DeleteResult
    | TxnResult
    | Lease
    | RevokeResult
    | CompactResult
    | LeaseMissing
    | Rejected
)

R = TypeVar("R", PutResult, DeleteResult, TxnResult, Lease, RevokeResult, CompactResult)


def unwrap(result: Result, kind: type[R]) -> R:
    """``result`` as ``kind``; an error value raises :class:`LeaseNotFound` or
    :class:`InvalidCommand`."""
    if isinstance(result, kind):
        return result
    if isinstance(result, LeaseMissing):
        raise LeaseNotFound(f"lease {result.lease_id:x} not found")
    if isinstance(result, Rejected):
        raise InvalidCommand(result.reason)
    raise InvalidCommand(f"expected {kind.__name__}, got {type(result).__name__}")


_encoder = msgspec.msgpack.Encoder()
_command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)
_result_decoder: msgspec.msgpack.Decoder[Result] = msgspec.msgpack.Decoder(Result)


def encode_command(cmd: Command) -> bytes:
    return _encoder.encode(cmd)


def decode_command(data: bytes) -> Command:
    """Decode one command; raises :class:`InvalidCommand` on any malformed input."""
    try:
        return _command_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidCommand(f"undecodable command: {exc}") from exc


def encode_result(result: Result) -> bytes:
    return _encoder.encode(result)


def decode_result(data: bytes) -> Result:
    """Decode one result; raises :class:`InvalidCommand` on any malformed input."""
    try:
        return _result_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidCommand(f"undecodable result: {exc}") from exc


# --- snapshots ----------------------------------------------------------------------------


class _Snapshot(msgspec.Struct, frozen=True, array_like=True, tag="kv1"):
    revision: int
    oldest: int
    next_lease: int
    kvs: list[KeyValue]
    leases: list[Lease]
    history: list[WatchEvent]


_snapshot_decoder: msgspec.msgpack.Decoder[_Snapshot] = msgspec.msgpack.Decoder(_Snapshot)


def _event_revision(event: WatchEvent) -> int:
    return event.kv.mod_revision


class _LeaseRecord:
    __slots__ = ("keys", "ttl")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.keys: dict[str, None] = {}  # a dict, not a set: deterministic order


# --- the state machine --------------------------------------------------------------------


# A write is one log entry, and a follower receives an entry in one stream frame (4 MiB):
# anything larger could never replicate, and every write behind it would wait forever.
MAX_WRITE_BYTES = 3 << 20


def write_too_large(size: int) -> str:
    return (
        f"a write of {size:,} bytes exceeds the store's limit of {MAX_WRITE_BYTES:,} bytes "
        "per write"
    )


def encode_write(cmd: Command) -> bytes:
    """A write as a client sends it, refused here when no member would take it: a key that is
    not valid Unicode text (a lone surrogate, see store/_checks.py), or too large to replicate."""
    try:
        data = encode_command(cmd)
    except UnicodeEncodeError as exc:
        raise InvalidCommand(f"a key is not valid Unicode text: {exc}") from None
    if len(data) > MAX_WRITE_BYTES:
        raise InvalidCommand(write_too_large(len(data)))
    return data


def checked_command(data: bytes) -> Command:
    """Decode a write for the log, or raise InvalidCommand (garbage, or too large to
    replicate)."""
    if len(data) > MAX_WRITE_BYTES:
        raise InvalidCommand(write_too_large(len(data)))
    cmd = decode_command(data)
    if isinstance(cmd, TxnCmd):
        check_txn_writes(cmd.success, cmd.failure)
    return cmd


def check_txn_writes(*branches: Sequence[TxnOp]) -> None:
    """Refuse a transaction branch that puts one key twice, or puts a key it also deletes
    (by name or by prefix), as etcd does ("duplicate key given in txn request"): which write
    would win, and what the watch events say, is no one's intent. Deleting a key twice is
    harmless and allowed, as in etcd. Checked before a transaction reaches the log (the state
    machine keeps applying what it was given, so old logs replay as they did)."""
    for ops in branches:
        puts: set[str] = set()
        deletes: list[DeleteOp] = []
        for op in ops:
            if isinstance(op, PutOp):
                if op.key in puts or any(_covers(d, op.key) for d in deletes):
                    raise InvalidCommand(
                        f"a transaction writes {op.key!r} twice in one branch (two puts, or "
                        "a put and a delete)"
                    )
                puts.add(op.key)
            elif isinstance(op, DeleteOp):
                clash = next((k for k in puts if _covers(op, k)), None)
                if clash is not None:
                    raise InvalidCommand(
                        f"a transaction deletes {clash!r}, which it also puts in the same branch"
                    )
                deletes.append(op)


def _covers(op: DeleteOp, key: str) -> bool:
    return key.startswith(op.key) if op.prefix else key == op.key


class KVStateMachine:
    """The store's replicated state; see the module docstring."""

    def __init__(self, *, max_events: int = 10_000) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.max_events = max_events
        self._kvs: dict[str, KeyValue] = {}
        self._keys: list[str] = []  # sorted
        self._leases: dict[int, _LeaseRecord] = {}
        self._next_lease = 1
        self._revision = 0
        self._oldest = 1
        self._history: list[WatchEvent] = []
        self._hist_start = 0  # events before this index are dropped (trimmed lazily)
        self.last_events: list[WatchEvent] = []
        """The events of the last :meth:`apply` (for the driver to publish to watchers)."""

    # -- reads --

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def oldest_revision(self) -> int:
        """The oldest revision :meth:`events_since` can still answer."""
        return self._oldest

    def __len__(self) -> int:
        return len(self._kvs)

    def get(self, key: str) -> KeyValue | None:
        return self._kvs.get(key)

    def range(self, prefix: str, limit: int = 0, start: str = "") -> RangeResult:
        """Keys starting with ``prefix`` and ``>= start`` in key order; ``limit`` 0 means no
        limit. The keys under a prefix are one run of the sorted list, so the scan begins at
        the later of the two bounds and stops at the first key outside the prefix."""
        kvs: list[KeyValue] = []
        keys = self._keys
        more = False
        for i in range(bisect_left(keys, max(prefix, start)), len(keys)):
            key = keys[i]
            if not key.startswith(prefix):
                break
            if limit and len(kvs) == limit:
                more = True
                break
            kvs.append(self._kvs[key])
        return RangeResult(kvs, self._revision, more)

    def lease(self, lease_id: int) -> Lease | None:
        record = self._leases.get(lease_id)
        return None if record is None else Lease(lease_id, record.ttl)

    def leases(self) -> dict[int, float]:
        """Every live lease's id and TTL (for the driver's lease timers)."""
        return {lease_id: record.ttl for lease_id, record in self._leases.items()}

    def lease_keys(self, lease_id: int) -> list[str]:
        record = self._leases.get(lease_id)
        return [] if record is None else sorted(record.keys)

    def events_since(self, revision: int, prefix: str = "") -> list[WatchEvent]:
        """Retained events with a revision >= ``revision`` under ``prefix``, in order.

        Raises :class:`Compacted` when ``revision`` is older than :attr:`oldest_revision`.
        """
        wanted = max(revision, 1)
        if wanted < self._oldest:
            raise Compacted(revision, self._oldest)
        start = bisect_left(self._history, wanted, lo=self._hist_start, key=_event_revision)
        events = self._history[start:]
        if prefix:
            return [e for e in events if e.kv.key.startswith(prefix)]
        return events

    # -- writes --

    def apply(self, cmd: Command) -> Result:
        """Apply one command; deterministic; never raises on a well-typed command."""
        self.last_events = []
        match cmd:
            case PutCmd(key, value, lease):
                return self._apply_put(key, value, lease)
            case DeleteCmd(key, prefix):
                return self._apply_delete(key, prefix)
            case TxnCmd(compares, success, failure):
                return self._apply_txn(compares, success, failure)
            case LeaseGrantCmd(ttl):
                return self._apply_grant(ttl)
            case LeaseRevokeCmd(lease_id):
                return self._apply_revoke(lease_id)
            case CompactCmd(revision):
                return self._apply_compact(revision)
        raise InvalidCommand(f"not a command: {type(cmd).__name__}")

    def _apply_put(self, key: str, value: bytes, lease: int) -> Result:
        error = self._check_put(key, lease)
        if error is not None:
            return error
        rev = self._revision + 1
        events: list[WatchEvent] = []
        self._put(key, value, lease, rev, events)
        self._commit(rev, events)
        return PutResult(rev)

    def _apply_delete(self, key: str, prefix: bool) -> Result:
        rev = self._revision + 1
        events: list[WatchEvent] = []
        deleted = self._delete(key, prefix, rev, events)
        self._commit(rev, events)
        return DeleteResult(deleted, self._revision)

    def _apply_txn(
        self, compares: list[Compare], success: list[TxnOp], failure: list[TxnOp]
    ) -> Result:
        for cmp in compares:
            wants_bytes = cmp.target == "value"
            if isinstance(cmp.value, bytes) != wants_bytes:
                kind = "bytes" if wants_bytes else "an int"
                return Rejected(f"compare on {cmp.target!r} of {cmp.key!r} needs {kind}")
        succeeded = all(self._compare(cmp) for cmp in compares)
        ops = success if succeeded else failure
        for op in ops:
            if isinstance(op, PutOp):
                error = self._check_put(op.key, op.lease)
                if error is not None:
                    return error
        rev = self._revision + 1
        events: list[WatchEvent] = []
        results: list[int | list[KeyValue]] = []
        for op in ops:
            if isinstance(op, PutOp):
                self._put(op.key, op.value, op.lease, rev, events)
                results.append(rev)
            elif isinstance(op, DeleteOp):
                results.append(self._delete(op.key, op.prefix, rev, events))
            else:
                results.append(self._read(op))
        self._commit(rev, events)
        return TxnResult(succeeded, self._revision, results)

    def _apply_grant(self, ttl: float) -> Result:
        if not 0.0 < ttl <= _MAX_TTL:
            return Rejected(f"lease ttl {ttl!r} out of range")
        lease_id = self._next_lease
        self._next_lease += 1
        self._leases[lease_id] = _LeaseRecord(ttl)
        return Lease(lease_id, ttl)

    def _apply_revoke(self, lease_id: int) -> Result:
        record = self._leases.pop(lease_id, None)
        if record is None:
            return RevokeResult(False, 0, self._revision)
        rev = self._revision + 1
        events: list[WatchEvent] = []
        keys = sorted(record.keys)
        for key in keys:
            self._delete_key(key, rev, events)
        self._commit(rev, events)
        return RevokeResult(True, len(keys), self._revision)

    def _apply_compact(self, revision: int) -> Result:
        if revision > self._revision:
            return Rejected(f"cannot compact to {revision}: the revision is {self._revision}")
        if revision > self._oldest:
            self._drop_before(revision)
        return CompactResult(self._oldest)

    # -- helpers --

    def _check_put(self, key: str, lease: int) -> Result | None:
        if not key:
            return Rejected("a key must not be empty")
        if lease and lease not in self._leases:
            return LeaseMissing(lease)
        return None

    def _compare(self, cmp: Compare) -> bool:
        kv = self._kvs.get(cmp.key)
        ours: int | bytes
        if cmp.target == "value":
            if kv is None:
                return False  # a missing key's value compares with nothing (as in etcd)
            ours = kv.value
        elif kv is None:
            ours = 0
        elif cmp.target == "version":
            ours = kv.version
        elif cmp.target == "create":
            ours = kv.create_revision
        elif cmp.target == "mod":
            ours = kv.mod_revision
        else:
            ours = kv.lease
        theirs = cmp.value
        if cmp.op == "==":
            return ours == theirs
        if cmp.op == "!=":
            return ours != theirs
        if cmp.op == "<":
            return ours < theirs  # type: ignore[operator]  # both sides checked alike above
        return ours > theirs  # type: ignore[operator]

    def _read(self, op: GetOp) -> list[KeyValue]:
        if op.prefix:
            return self.range(op.key).kvs
        kv = self._kvs.get(op.key)
        return [] if kv is None else [kv]

    def _put(self, key: str, value: bytes, lease: int, rev: int, events: list[WatchEvent]) -> None:
        prev = self._kvs.get(key)
        if prev is None:
            kv = KeyValue(key, value, rev, rev, 1, lease)
            insort(self._keys, key)
        else:
            kv = KeyValue(key, value, prev.create_revision, rev, prev.version + 1, lease)
            if prev.lease and prev.lease != lease:
                self._detach(prev.lease, key)
        if lease:
            self._leases[lease].keys[key] = None
        self._kvs[key] = kv
        events.append(WatchEvent("put", kv, prev))

    def _delete(self, key: str, prefix: bool, rev: int, events: list[WatchEvent]) -> int:
        if not prefix:
            if key not in self._kvs:
                return 0
            self._delete_key(key, rev, events)
            return 1
        lo = bisect_left(self._keys, key)
        hi = lo
        while hi < len(self._keys) and self._keys[hi].startswith(key):
            hi += 1
        doomed = self._keys[lo:hi]
        del self._keys[lo:hi]
        for name in doomed:
            self._forget_key(name, rev, events)
        return len(doomed)

    def _delete_key(self, key: str, rev: int, events: list[WatchEvent]) -> None:
        del self._keys[bisect_left(self._keys, key)]
        self._forget_key(key, rev, events)

    def _forget_key(self, key: str, rev: int, events: list[WatchEvent]) -> None:
        prev = self._kvs.pop(key)
        if prev.lease:
            self._detach(prev.lease, key)
        events.append(WatchEvent("delete", KeyValue(key, b"", 0, rev, 0), prev))

    def _detach(self, lease_id: int, key: str) -> None:
        record = self._leases.get(lease_id)
        if record is not None:
            record.keys.pop(key, None)

    def _commit(self, rev: int, events: list[WatchEvent]) -> None:
        """Advance to ``rev`` if anything changed, and record the events."""
        if not events:
            return
        self._revision = rev
        history = self._history
        history.extend(events)
        self.last_events = events
        excess = len(history) - self._hist_start - self.max_events
        if excess <= 0:
            return
        # Drop whole revisions: a watcher must never see part of one.
        first_kept = self._hist_start + excess
        cut_rev = history[first_kept - 1].kv.mod_revision + 1
        if cut_rev > rev:
            self._drop_before(rev)  # the newest revision alone is over the bound: kept whole
        elif history[first_kept].kv.mod_revision >= cut_rev:
            # The cut falls exactly at ``first_kept`` -- as it does for a steady writer, which
            # trims one revision per write (inline: this is every write's path once the
            # history is full, and the general case below cost it a third of the apply).
            self._hist_start = first_kept
            self._oldest = cut_rev
            if first_kept > 64 and first_kept * 2 > len(history):
                del history[:first_kept]
                self._hist_start = 0
        else:
            # Every event before ``first_kept`` is older than ``cut_rev``: the cut is after
            # it, found by bisection from there.
            self._drop_before(cut_rev, first_kept)

    def _drop_before(self, revision: int, lo: int | None = None) -> None:
        """Forget the history of every revision below ``revision``; ``lo``, when given, is
        an index before which every event is older than ``revision``."""
        if revision <= self._oldest:
            return
        history = self._history
        cut = self._hist_start if lo is None else lo
        if lo is None or (cut < len(history) and _event_revision(history[cut]) < revision):
            cut = bisect_left(history, revision, lo=cut, key=_event_revision)
        self._hist_start = cut
        self._oldest = revision
        if cut > 64 and cut * 2 > len(self._history):
            del self._history[:cut]
            self._hist_start = 0

    # -- snapshots --

    def snapshot(self) -> bytes:
        """The whole state, canonically encoded."""
        snap = _Snapshot(
            revision=self._revision,
            oldest=self._oldest,
            next_lease=self._next_lease,
            kvs=[self._kvs[key] for key in self._keys],
            leases=[Lease(i, self._leases[i].ttl) for i in sorted(self._leases)],
            history=self._history[self._hist_start :],
        )
        return _encoder.encode(snap)

    def restore(self, data: bytes) -> None:
        """Replace the whole state by a :meth:`snapshot`'s; raises :class:`InvalidCommand`
        (and changes nothing) when ``data`` is not a consistent snapshot."""
        try:
            snap = _snapshot_decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidCommand(f"undecodable snapshot: {exc}") from exc
        leases = {lease.id: _LeaseRecord(lease.ttl) for lease in snap.leases}
        kvs: dict[str, KeyValue] = {}
        for kv in snap.kvs:
            if kv.key in kvs or kv.mod_revision > snap.revision:
                raise InvalidCommand(f"snapshot: bad key {kv.key!r}")
            if kv.lease:
                if kv.lease not in leases:
                    raise InvalidCommand(f"snapshot: key {kv.key!r} on a missing lease")
                leases[kv.lease].keys[kv.key] = None
            kvs[kv.key] = kv
        history = list(snap.history)
        revs = [_event_revision(e) for e in history]
        if revs != sorted(revs) or (revs and (revs[0] < snap.oldest or revs[-1] > snap.revision)):
            raise InvalidCommand("snapshot: watch history out of order")
        if any(lease_id >= snap.next_lease for lease_id in leases) or snap.oldest < 1:
            raise InvalidCommand("snapshot: inconsistent counters")
        self._kvs = kvs
        self._keys = sorted(kvs)
        self._leases = leases
        self._next_lease = snap.next_lease
        self._revision = snap.revision
        self._oldest = snap.oldest
        self._history = history
        self._hist_start = 0
        self.last_events = []
        excess = len(history) - self.max_events
        if excess > 0:
            cut_rev = _event_revision(history[excess - 1]) + 1
            self._drop_before(min(cut_rev, self._revision))
