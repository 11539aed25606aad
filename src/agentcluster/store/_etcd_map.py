"""Mapping between the store's types and etcd's v3 protobuf messages (the etcd backend).

Theory of operation: pure functions, no I/O. Keys are ``str`` encoded as UTF-8 with
``surrogateescape`` (so keys written by other clients round-trip); a prefix is the key range
``[prefix, prefix with its last byte + 1)`` and the empty prefix the whole key space
(``[\\0, \\0)`` in etcd's notation); comparisons, transaction operations, key-values and
watch events map one to one (see :mod:`agentcluster.store.etcd`).
"""

from __future__ import annotations

from typing import Any

from aetcd import rpc

from agentcluster.store.base import (
    Compare,
    DeleteOp,
    KeyValue,
    PutOp,
    StoreError,
    TxnOp,
    WatchEvent,
)

__all__ = [
    "compare_msg",
    "event_of",
    "key_bytes",
    "key_range",
    "key_str",
    "kv_of",
    "op_result",
    "prefix_range",
    "request_op",
]

_TARGETS: dict[str, tuple[int, str]] = {
    "value": (rpc.Compare.VALUE, "value"),
    "version": (rpc.Compare.VERSION, "version"),
    "create": (rpc.Compare.CREATE, "create_revision"),
    "mod": (rpc.Compare.MOD, "mod_revision"),
    "lease": (rpc.Compare.LEASE, "lease"),
}
_RESULTS: dict[str, int] = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def key_str(key: bytes) -> str:
    return bytes(key).decode("utf-8", "surrogateescape")


def prefix_range(prefix: str, start: str = "") -> tuple[bytes, bytes]:
    """``(key, range_end)`` covering every key that starts with ``prefix`` and is ``>=
    start`` (compared as etcd compares keys: as bytes)."""
    key = key_bytes(prefix)
    first = max(key or b"\0", key_bytes(start))
    if not key:
        return first, b"\0"
    end = bytearray(key)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return first, bytes(end[: i + 1])
    return first, b"\0"  # all 0xff: every key from ``first`` on


def key_range(key: str, prefix: bool) -> tuple[bytes, bytes]:
    return prefix_range(key) if prefix else (key_bytes(key), b"")


def kv_of(kv: Any) -> KeyValue:
    return KeyValue(
        key=key_str(kv.key),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def event_of(ev: Any, has_prev: bool) -> WatchEvent:
    prev = kv_of(ev.prev_kv) if has_prev and ev.HasField("prev_kv") else None
    if ev.type == rpc.Event.DELETE:
        return WatchEvent(type="delete", kv=kv_of(ev.kv), prev=prev)
    return WatchEvent(type="put", kv=kv_of(ev.kv), prev=prev)


def compare_msg(cmp: Compare) -> Any:
    target, field = _TARGETS[cmp.target]
    # The value's type was checked against the target by base.check_txn_args.
    msg = rpc.Compare(key=key_bytes(cmp.key), target=target, result=_RESULTS[cmp.op])
    setattr(msg, field, cmp.value)
    return msg


def request_op(op: TxnOp) -> Any:
    if isinstance(op, PutOp):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=key_bytes(op.key), value=op.value, lease=op.lease)
        )
    key, end = key_range(op.key, op.prefix)
    if isinstance(op, DeleteOp):
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=end))
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end))


def op_result(resp: Any, revision: int) -> int | list[KeyValue]:
    which = resp.WhichOneof("response")
    if which == "response_put":
        return revision  # every write of a transaction happens at the transaction's revision
    if which == "response_delete_range":
        return int(resp.response_delete_range.deleted)
    if which == "response_range":
        return [kv_of(kv) for kv in resp.response_range.kvs]
    raise StoreError(f"etcd answered a transaction operation with {which!r}")
