"""The argument checks every backend makes before it asks anyone, so that each refuses the
same requests the same way.

Theory of operation: a store interface is only one interface if a request that one backend
refuses is refused by all -- else code tested on the memory store fails on etcd in production,
or the other way round. Each backend's methods call these functions first; each raises
:class:`~agentcluster.store.base.InvalidCommand` (a ``ValueError`` too) for a value out of
range, ``TypeError`` for a value of the wrong type, and returns nothing. The rules are etcd's
where etcd has one (an empty key is refused; at most 128 compares or operations per list; lease
ids are positive 64-bit numbers), the embedded store's wire limits where etcd's are wider (keys
of at most 8,192 characters, TTLs of at most ten years), so that every backend can honour them.
The embedded state machine checks the same again for requests that come over the wire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from agentcluster.store.base import (
    MAX_KEY_LENGTH,
    MAX_LEASE_TTL,
    MAX_TXN_OPS,
    Compare,
    DeleteOp,
    GetOp,
    InvalidCommand,
    PutOp,
    TxnOp,
)

__all__ = [
    "check_delete_args",
    "check_key",
    "check_lease_id",
    "check_put_args",
    "check_range_args",
    "check_ttl",
    "check_txn_args",
    "check_unicode_key",
    "check_watch_args",
]

_INT64 = 2**63  # lease ids, revisions, limits and compared numbers are signed 64-bit


def check_key(
    key: str, what: str = "a key", *, empty_ok: bool = False, longest: int = MAX_KEY_LENGTH
) -> None:
    """A key (``empty_ok``: a prefix or a start, where ``""`` means "from the first key")."""
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a str, not {type(key).__name__}")
    if not key and not empty_ok:
        raise InvalidCommand(f"{what} must not be empty")
    if len(key) > longest:
        raise InvalidCommand(
            f"{what} is {len(key):,} characters long; the store's keys are at most "
            f"{MAX_KEY_LENGTH:,}"
        )


def check_unicode_key(key: str) -> None:
    """The embedded and memory stores keep keys as text: a lone surrogate (how the etcd
    backend spells a key another etcd client wrote as bytes that are not UTF-8) has no
    encoding there."""
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidCommand(
                f"the key {key!r} is not valid Unicode text (a lone surrogate): only the etcd "
                "backend carries such keys"
            ) from None


def check_put_args(key: str, lease: int) -> None:
    """A put's key and lease. The store's hot path: one test when both are fine, the full
    checks (and their messages) only when one is not."""
    if (
        type(key) is not str
        or not 0 < len(key) <= MAX_KEY_LENGTH
        or type(lease) is not int
        or not 0 <= lease < _INT64
    ):
        check_key(key)
        check_lease_id(lease, "lease")


def check_delete_args(key: str, prefix: bool) -> None:
    """A delete of one key must name it (``""`` with ``prefix`` means every key); as etcd."""
    if not prefix and not key:
        raise InvalidCommand("a key must not be empty (delete every key with prefix=True)")
    check_key(key, "the prefix" if prefix else "the key", empty_ok=prefix)


def check_watch_args(prefix: str, start_revision: int) -> None:
    check_key(prefix, "the prefix", empty_ok=True)
    _check_int(start_revision, "start_revision")
    if start_revision < 0:
        raise InvalidCommand(f"start_revision must be >= 0, got {start_revision}")
    if start_revision >= _INT64:
        raise InvalidCommand(f"start_revision must be below 2**63, got {start_revision}")


def check_range_args(prefix: str, limit: int, start: str) -> None:
    if not isinstance(prefix, str) or not isinstance(start, str):
        raise TypeError(
            f"prefix and start must be str, not {type(prefix).__name__} / {type(start).__name__}"
        )
    _check_int(limit, "limit")
    if limit < 0:
        raise InvalidCommand(f"limit must not be negative, got {limit}")
    if limit >= _INT64:
        raise InvalidCommand(f"limit must be below 2**63 (0: no limit), got {limit}")
    check_key(prefix, "the prefix", empty_ok=True)
    # A position in the key order, not a key: RangeResult.next_start after a key of the
    # longest length is one character longer.
    check_key(start, "start", empty_ok=True, longest=MAX_KEY_LENGTH + 1)


def check_lease_id(lease_id: int, what: str = "a lease id") -> None:
    """A lease id is a positive signed 64-bit number, as etcd grants them; 0 is "no lease"
    where a put takes one, and an id no lease has elsewhere."""
    _check_int(lease_id, what)
    if not 0 <= lease_id < _INT64:
        raise InvalidCommand(f"{what} must be a non-negative 64-bit number, got {lease_id}")


def check_ttl(ttl: float) -> None:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"a lease TTL must be a number of seconds, not {type(ttl).__name__}")
    if not math.isfinite(ttl) or not 0 < ttl <= MAX_LEASE_TTL:
        raise InvalidCommand(
            f"a lease TTL must be above 0 and at most {MAX_LEASE_TTL:,.0f} s (ten years), "
            f"got {ttl!r}"
        )


def check_txn_args(
    compares: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp]
) -> None:
    for what, items in (("compares", compares), ("operations", success), ("operations", failure)):
        if len(items) > MAX_TXN_OPS:
            raise InvalidCommand(
                f"a transaction may hold at most {MAX_TXN_OPS} {what} per list, got {len(items)}"
            )
    for cmp in compares:
        check_key(cmp.key, "a compared key")
        wants_bytes = cmp.target == "value"
        if isinstance(cmp.value, bytes) != wants_bytes or isinstance(cmp.value, bool):
            kind = "bytes" if wants_bytes else "an int"
            raise InvalidCommand(f"compare on {cmp.target!r} of {cmp.key!r} needs {kind}")
        if not wants_bytes and not -_INT64 <= cmp.value < _INT64:  # type: ignore[operator]
            raise InvalidCommand(f"compare on {cmp.target!r} of {cmp.key!r}: out of 64 bits")
    for op in (*success, *failure):
        if isinstance(op, PutOp):
            check_key(op.key, "a key in the transaction")
            check_lease_id(op.lease, "a put's lease")
        elif isinstance(op, DeleteOp | GetOp):
            check_key(op.key, "a key in the transaction", empty_ok=op.prefix)
        else:
            raise TypeError(f"a transaction takes PutOp, DeleteOp and GetOp, not {op!r}")


def _check_int(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
