"""The coordination store as a sequential model for the linearizability checker.

Theory of operation: :class:`KVModel` is a map of keys to values plus the leases keys may be
attached to. Plain operations (:class:`Put`, :class:`Get`, :class:`Cas`, :class:`Delete`)
touch one key and leave it attached to no lease, as the store's do. Lease operations follow
the store's contract: :class:`LeasePut` writes a key attached to a lease (and fails, changing
nothing, once the lease is gone), :class:`KeepAlive` tells whether a lease is alive, and
:class:`LeaseRevoke` ends a lease and removes, in the same instant, every key attached to it
then. A lease is alive from its grant (which returned before any operation names it, so it is
not part of the history) until it is revoked; the model has no clock, so workloads give their
leases a TTL longer than the run, and expiry is tested apart.

Partitioning stays per key where it can: keys join one partition only when a lease links them
(a revocation changes every key attached to it at once), found with a union-find over keys
and leases. A history without lease operations splits into one partition per key, as before.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from agentcluster.testing._lin_model import UNKNOWN, Model, Operation, _fmt_value

__all__ = [
    "Cas",
    "Delete",
    "Get",
    "KVModel",
    "KeepAlive",
    "LeasePut",
    "LeaseRevoke",
    "Put",
]


@dataclass(frozen=True, slots=True)
class Put:
    """Write ``value`` (never ``None``, which means *absent*); the output is ignored."""

    key: str
    value: Hashable


@dataclass(frozen=True, slots=True)
class Get:
    """Read ``key``; the output is the value, or ``None`` when the key is absent."""

    key: str


@dataclass(frozen=True, slots=True)
class Cas:
    """Set ``key`` to ``new`` iff its value equals ``expected`` (``None``: iff it is absent);
    the output is ``True`` when it did."""

    key: str
    expected: Hashable | None
    new: Hashable


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove ``key``. Output ``None`` is not checked; an ``int`` (or ``bool``) output is the
    number of keys deleted, as ``Store.delete`` returns, and must be 1 iff the key existed."""

    key: str


@dataclass(frozen=True, slots=True)
class LeasePut:
    """Write ``value`` to ``key`` attached to ``lease``; the output is ``True`` when it was
    written, ``False`` when the lease was gone (``LeaseNotFound``: nothing changed)."""

    key: str
    value: Hashable
    lease: int

    def __post_init__(self) -> None:
        _check_lease(self.lease)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Refresh ``lease``; the output is ``True`` when it was alive, ``False`` when it was
    gone (``LeaseNotFound``)."""

    lease: int

    def __post_init__(self) -> None:
        _check_lease(self.lease)


@dataclass(frozen=True, slots=True)
class LeaseRevoke:
    """End ``lease``, removing every key attached to it; the output is ignored (revoking a
    lease that is gone is no error)."""

    lease: int

    def __post_init__(self) -> None:
        _check_lease(self.lease)


def _check_lease(lease: int) -> None:
    # The store reads lease 0 as "no lease" (a plain put; nothing to revoke), which these
    # operations do not model: a history with it would be judged by the wrong rules.
    if not isinstance(lease, int) or isinstance(lease, bool) or lease <= 0:
        raise ValueError(f"a lease id is an int > 0 (0 means no lease), not {lease!r}")


_KEYED = (Put, Get, Cas, Delete, LeasePut)
_LEASED = (KeepAlive, LeaseRevoke)

# (key, value, lease or 0), sorted by key; then the revoked leases.
_Entry = tuple[str, Hashable, int]
KVState = tuple[tuple[_Entry, ...], frozenset[int]]

_EMPTY: KVState = ((), frozenset())


def _kv_find(state: KVState, key: str) -> _Entry | None:
    for entry in state[0]:
        if entry[0] == key:
            return entry
    return None


def _kv_lookup(state: KVState, key: str) -> Hashable | None:
    entry = _kv_find(state, key)
    return None if entry is None else entry[1]


def _kv_assign(state: KVState, key: str, value: Hashable | None, lease: int = 0) -> KVState:
    entries, dead = state
    if not entries or (len(entries) == 1 and entries[0][0] == key):
        # The usual case: a partition holds one key.
        return ((), dead) if value is None else (((key, value, lease),), dead)
    # Sorted entries: one canonical, hashable form per map, so equal maps memoise as one state.
    rest = [e for e in entries if e[0] != key]
    if value is not None:
        rest.append((key, value, lease))
        rest.sort(key=lambda e: e[0])
    return tuple(rest), dead


def _revoke(state: KVState, lease: int) -> KVState:
    entries, dead = state
    return tuple(e for e in entries if e[2] != lease), dead | {lease}


class KVModel(Model[KVState]):
    """The coordination store: :class:`Put`, :class:`Get`, :class:`Cas`, :class:`Delete` on
    keys, and :class:`LeasePut`, :class:`KeepAlive`, :class:`LeaseRevoke` on leases that never
    expire by themselves (see the module docstring). Values compare by equality. The history
    is partitioned by key (keys linked by a lease share a partition); reads of unknown outcome
    are dropped (they change nothing and constrain nothing).

    The store's CAS compares a revision, not a value: with a unique value per write (as
    Jepsen-style workloads do) the value read identifies the revision, so record a revision CAS
    as ``Cas(key, value_read_with_that_revision, new)``.
    """

    def init(self) -> KVState:
        return _EMPTY

    def step(self, state: KVState, input: Any, output: Any) -> tuple[bool, KVState]:
        if isinstance(input, Get):
            return output is UNKNOWN or _kv_lookup(state, input.key) == output, state
        if isinstance(input, Put):
            return True, _kv_assign(state, input.key, input.value)
        if isinstance(input, Cas):
            matches = _kv_lookup(state, input.key) == input.expected
            if output is UNKNOWN or output is True:
                return matches, _kv_assign(state, input.key, input.new) if matches else state
            if output is False:
                return not matches, state
            raise TypeError(f"Cas output must be a bool or UNKNOWN, not {output!r}")
        if isinstance(input, Delete):
            existed = _kv_lookup(state, input.key) is not None
            # An unknown delete of an absent key is as good as omitted: answer False to prune.
            legal = existed if output is UNKNOWN else output is None or int(output) == existed
            return legal, _kv_assign(state, input.key, None)
        if isinstance(input, LeasePut):
            alive = input.lease not in state[1]
            if output is UNKNOWN or output is True:
                # An unknown put on a dead lease changed nothing: as good as omitted (pruned).
                return alive, _kv_assign(state, input.key, input.value, input.lease)
            if output is False:
                return not alive, state
            raise TypeError(f"LeasePut output must be a bool or UNKNOWN, not {output!r}")
        if isinstance(input, KeepAlive):
            alive = input.lease not in state[1]
            if output is UNKNOWN:
                return True, state
            if isinstance(output, bool):
                return output == alive, state
            raise TypeError(f"KeepAlive output must be a bool or UNKNOWN, not {output!r}")
        if isinstance(input, LeaseRevoke):
            # Revoking a revoked lease changes nothing; when unknown, that is an omission.
            if output is UNKNOWN and input.lease in state[1]:
                return False, state
            return True, _revoke(state, input.lease)
        raise TypeError(f"KVModel cannot apply {input!r}")

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        parent: dict[tuple[str, Any], tuple[str, Any]] = {}

        def find(x: tuple[str, Any]) -> tuple[str, Any]:
            root = parent.setdefault(x, x)
            while root != parent[root]:
                root = parent[root]
            while x != root:  # path compression keeps later finds short
                parent[x], x = root, parent[x]
            return root

        kept: list[tuple[Operation, tuple[str, Any]]] = []
        for op in ops:
            inp = op.input
            if isinstance(inp, _KEYED):
                if isinstance(inp, Get) and op.output is UNKNOWN:
                    continue
                node: tuple[str, Any] = ("key", inp.key)
                if isinstance(inp, LeasePut):
                    a, b = find(node), find(("lease", inp.lease))
                    if a != b:
                        parent[a] = b
            elif isinstance(inp, _LEASED):
                node = ("lease", inp.lease)
            else:
                raise TypeError(f"KVModel cannot apply {inp!r}")
            find(node)
            kept.append((op, node))
        by_root: dict[tuple[str, Any], list[Operation]] = {}
        for op, node in kept:
            by_root.setdefault(find(node), []).append(op)
        return list(by_root.values())

    def is_read_only(self, input: Any, output: Any) -> bool:
        if output is UNKNOWN:
            return False
        if isinstance(input, Get | KeepAlive):
            return True
        if isinstance(input, Cas | LeasePut):
            return output is False
        # A delete that found nothing changed nothing.
        return isinstance(input, Delete) and output is not None and int(output) == 0

    def describe_partition(self, ops: Sequence[Operation]) -> str:
        keys = sorted({op.input.key for op in ops if isinstance(op.input, _KEYED)})
        leases = sorted(
            {
                op.input.lease
                for op in ops
                if isinstance(op.input, LeasePut | KeepAlive | LeaseRevoke)
            }
        )
        parts = []
        if keys:
            parts.append(("key " if len(keys) == 1 else "keys ") + ", ".join(map(repr, keys)))
        if leases:
            parts.append(
                ("lease " if len(leases) == 1 else "leases ") + ", ".join(map(str, leases))
            )
        return " with ".join(parts)

    def describe_op(self, input: Any, output: Any) -> str:
        if isinstance(input, Get):
            return f"get {input.key!r} -> {_fmt_value(output)}"
        if isinstance(input, Put):
            return f"put {input.key!r} = {input.value!r}"
        if isinstance(input, Cas):
            expected = _fmt_value(input.expected)
            return f"cas {input.key!r} {expected} -> {input.new!r}: {_fmt_value(output)}"
        if isinstance(input, Delete):
            suffix = "" if output is None else f" -> {_fmt_value(output)}"
            return f"delete {input.key!r}{suffix}"
        if isinstance(input, LeasePut):
            return (
                f"put {input.key!r} = {input.value!r} with lease {input.lease}: "
                f"{_fmt_value(output)}"
            )
        if isinstance(input, KeepAlive):
            alive = {True: "alive", False: "gone"}.get(output, "?") if output is not None else "?"
            return f"keep-alive lease {input.lease} -> {alive}"
        if isinstance(input, LeaseRevoke):
            return f"revoke lease {input.lease}"
        return f"{input!r} -> {output!r}"

    def describe_state(self, state: KVState) -> str:
        entries, dead = state
        parts = [
            f"{k!r} = {v!r}" + (f" (lease {lease})" if lease else "") for k, v, lease in entries
        ]
        text = ", ".join(parts) if parts else "every key absent"
        if dead:
            text += "; revoked: lease " + ", ".join(str(x) for x in sorted(dead))
        return text

    def expected_output(self, state: KVState, input: Any) -> Any:
        if isinstance(input, Get):
            return _kv_lookup(state, input.key)
        if isinstance(input, Cas):
            return _kv_lookup(state, input.key) == input.expected
        if isinstance(input, Delete):
            return int(_kv_lookup(state, input.key) is not None)
        if isinstance(input, LeasePut | KeepAlive):
            return input.lease not in state[1]
        return None
