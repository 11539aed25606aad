"""The coordination store interface: one async API over every backend.

Theory of operation: the store is a flat, ordered key space (``str`` keys, ``bytes`` values)
with a single, cluster-wide, monotonically increasing **revision** -- every successful write
(put, delete, transaction with a write, lease revocation that deletes keys) advances it by one
and every key remembers the revision that created it (``create_revision``), last changed it
(``mod_revision``) and how often it changed (``version``), as in etcd's v3 model. Those numbers
are what compare-and-set, transactions, watches and fencing are built from:

* **CAS / transactions** compare a key's value, version, create or mod revision, then run one
  list of operations or the other, atomically, at one revision.
* **Leases** have a TTL and an id; keys attached to a lease vanish when it expires or is
  revoked. Keep-alives restart the TTL.
* **Watches** stream the changes under a prefix from a revision on; a watcher that reconnects
  resumes from ``last seen + 1`` and misses nothing, unless the history it asks for was
  compacted (:class:`Compacted`).
* **Ranges** list the keys under a prefix in key order, at most ``limit`` of them, from an
  inclusive ``start`` key on -- etcd's own shape (``key`` .. ``range_end``, ``limit``). A reply
  is one frame, so a big prefix is read in pages: ``RangeResult.more`` says keys remain and
  :attr:`RangeResult.next_start` is where the next page begins (the last key + ``"\\0"``, its
  immediate successor in both code-point and UTF-8 byte order). :meth:`Store.range_pages`
  does the loop. Pages are separate reads, each linearizable at its own revision: a listing
  across pages is not one snapshot (a key written meanwhile may or may not appear; one never
  appears twice, since pages move strictly forward in key order).
* **Elections and locks** are recipes over these primitives (see :mod:`._recipes`): a
  candidate creates ``<prefix>/<lease id>`` on its lease; the lowest ``create_revision`` under
  the prefix holds the office; that revision is the **fencing token**. A side effect guarded by
  ``Compare(lock_key, "create", "==", token)`` is rejected once the holder's lease expired and
  someone else took over -- a stale holder is harmless.

Backends (one module each): :mod:`.memory` (one process), :mod:`.raft` (replicated on the
cluster's nodes, the default) and :mod:`.etcd` (a real etcd cluster).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Literal, Self

import msgspec

if TYPE_CHECKING:
    from agentcluster.store._recipes import Election, Lock

__all__ = [
    "MAX_KEY_LENGTH",
    "Compacted",
    "Compare",
    "DeleteOp",
    "GetOp",
    "InvalidCommand",
    "KeyValue",
    "Lease",
    "LeaseNotFound",
    "PutOp",
    "RangeResult",
    "ReplyTooLarge",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TxnResult",
    "WatchEvent",
]


# What every backend takes, checked before anything is sent (store/_checks.py), so code that
# runs on one backend runs on all. Keys: at most this many characters (the embedded store's
# wire takes no more; etcd alone would take up to its 1.5 MiB request).
MAX_KEY_LENGTH = 8 * 1024
# Compares, or operations in one branch, per transaction: etcd's default --max-txn-ops.
MAX_TXN_OPS = 128
# The longest lease, seconds (ten years; etcd's own cap is 9e9 s).
MAX_LEASE_TTL = 10 * 365 * 24 * 3600.0


class StoreError(Exception):
    """Base of every store error."""


class StoreUnavailable(StoreError):
    """No quorum / leader / connection within the deadline; the operation may or may not have
    taken effect (the caller must treat a write as *unknown*)."""


class LeaseNotFound(StoreError):
    """The lease does not exist (never granted, expired or revoked)."""


class Compacted(StoreError):
    """A watch asked for history older than the store keeps."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"revision {requested} is compacted; the oldest kept is {oldest}")
        self.requested = requested
        self.oldest = oldest


class ReplyTooLarge(StoreError):
    """The answer would not fit in one reply frame (4 MiB): a range over that much data (read
    it in pages: ``limit`` and ``start``, or :meth:`Store.range_pages`), one revision whose
    events are that large, for a remote watch, or a transaction's reads asked through a node
    -- when that transaction wrote, the message says it was applied and at which revision (a
    write is never resent)."""


class InvalidCommand(StoreError, ValueError):
    """A request the store refuses as asked, the same way on every backend: an empty key, a
    key over :data:`MAX_KEY_LENGTH`, a compare against a value of the wrong type, more than
    :data:`MAX_TXN_OPS` compares or operations, a transaction branch that writes a key twice,
    a lease id or TTL out of range, a write too large to replicate, a command, result or
    snapshot that does not decode, or one the state machine rejected. Nothing was written;
    sending it again changes nothing."""


class KeyValue(msgspec.Struct, frozen=True, array_like=True):
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0  # 0: not attached to a lease


class RangeResult(msgspec.Struct, frozen=True, array_like=True):
    kvs: list[KeyValue]
    revision: int  # the store revision the range was read at
    more: bool = False  # True when ``limit`` cut the result: keys remain after ``kvs``

    @property
    def next_start(self) -> str | None:
        """The ``start`` of the next page when keys remain (``more``), else None: the last
        key + ``"\\0"``, the smallest key greater than it."""
        return self.kvs[-1].key + "\0" if self.more and self.kvs else None


# Lease and TxnResult are tagged: the state machine's results travel back to a proposer in a
# tagged union (``agentcluster.store._kv.Result``).
class Lease(msgspec.Struct, frozen=True, array_like=True, tag="lease"):
    id: int
    ttl: float


CompareTarget = Literal["value", "version", "create", "mod", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]


class Compare(msgspec.Struct, frozen=True, array_like=True, tag="cmp"):
    """``key``'s ``target`` ``op`` ``value``; a missing key has version / create / mod / lease
    0 and never equals a value."""

    key: str
    target: CompareTarget
    op: CompareOp
    value: int | bytes


class PutOp(msgspec.Struct, frozen=True, array_like=True, tag="put"):
    key: str
    value: bytes
    lease: int = 0


class DeleteOp(msgspec.Struct, frozen=True, array_like=True, tag="del"):
    key: str
    prefix: bool = False  # delete every key starting with ``key``


class GetOp(msgspec.Struct, frozen=True, array_like=True, tag="get"):
    key: str
    prefix: bool = False


TxnOp = PutOp | DeleteOp | GetOp


class TxnResult(msgspec.Struct, frozen=True, array_like=True, tag="txn"):
    succeeded: bool
    revision: int
    # One entry per operation run: the new revision for a put, the number of deleted keys
    # for a delete, the key-values read for a get.
    results: list[int | list[KeyValue]]


class WatchEvent(msgspec.Struct, frozen=True, array_like=True):
    type: Literal["put", "delete"]
    kv: KeyValue  # for a delete: the key with an empty value and the delete's revision
    prev: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


class Store(ABC):
    """The coordination store; every method may raise :class:`StoreUnavailable`."""

    @abstractmethod
    async def get(self, key: str) -> KeyValue | None: ...

    @abstractmethod
    async def range(self, prefix: str, *, limit: int = 0, start: str = "") -> RangeResult:
        """Keys starting with ``prefix`` and ``>= start``, in key order, at most ``limit`` of
        them (0: no limit); ``more`` says keys remain. A ``start`` below ``prefix`` begins at
        the prefix, one past every key under it gives nothing. One answer must fit one reply
        (4 MiB on the Raft backend and through an entry node, 256 MiB from etcd), else
        :class:`ReplyTooLarge`: page with ``limit`` and ``start``, or :meth:`range_pages`."""

    async def range_pages(
        self, prefix: str, *, page: int = 1000, start: str = ""
    ) -> AsyncIterator[RangeResult]:
        """Every key under ``prefix`` (from ``start`` on), as pages of at most ``page`` keys
        in key order; at least one page, the last with ``more`` false.

        Each page is one :meth:`range` -- linearizable at its own ``revision`` -- so the
        listing as a whole is no snapshot: a key written or deleted while it runs may or may
        not be in it (compare the pages' revisions to know). No key appears twice. A page
        whose answer would not fit in a reply is asked again with half as many keys (one key
        always fits: a write is smaller than a reply), growing back after each page read.
        """
        from agentcluster.store._checks import check_range_args

        if page < 1:
            raise ValueError(f"page must be at least 1, got {page}")
        check_range_args(prefix, 0, start)
        size = page
        while True:
            try:
                result = await self.range(prefix, limit=size, start=start)
            except ReplyTooLarge:
                if size == 1:
                    raise
                size //= 2
                continue
            yield result
            following = result.next_start
            if following is None:
                return
            start = following
            size = min(page, size * 2)

    @abstractmethod
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the new store revision. Raises LeaseNotFound."""

    async def cas(
        self, key: str, value: bytes, *, expected_revision: int, lease: int = 0
    ) -> TxnResult:
        """Write ``key`` only if its ``mod_revision`` equals ``expected_revision`` (0: only
        if the key does not exist). ``results[0]`` is the current key on failure."""
        return await self.txn(
            [Compare(key, "mod", "==", expected_revision)],
            [PutOp(key, value, lease)],
            [GetOp(key)],
        )

    @abstractmethod
    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); returns the number of deleted keys."""

    @abstractmethod
    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult: ...

    @abstractmethod
    async def revision(self) -> int:
        """The current store revision (a linearizable read)."""

    @abstractmethod
    async def lease_grant(self, ttl: float) -> Lease: ...

    @abstractmethod
    async def lease_keepalive(self, lease_id: int) -> float:
        """Restart the lease's TTL; returns the TTL. Raises LeaseNotFound."""

    @abstractmethod
    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease and delete its keys (no error if it is already gone)."""

    @abstractmethod
    def watch(
        self, prefix: str, *, start_revision: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        """Changes under ``prefix`` with a revision >= ``start_revision`` (0: from now on), in
        revision order, each exactly once -- across reconnects of the backend too."""

    @abstractmethod
    async def close(self) -> None: ...

    def election(self, name: str) -> Election:
        from agentcluster.store._recipes import Election

        return Election(self, name)

    def lock(self, name: str, *, ttl: float = 10.0) -> Lock:
        from agentcluster.store._recipes import Lock

        return Lock(self, name, ttl=ttl)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
