"""Agent registry entries and the indexed local view every node reads from.

Theory of operation: an :class:`AgentEntry` describes one agent (id, name, owning node,
capabilities, health, resources, metadata). :class:`RegistryIndex` holds the entries a node
knows -- its own and those disseminated by the other nodes (see ``registry_sync``) -- and answers
queries without touching the network. It is a plain synchronous object: the registry service
mutates it from one place and readers call it directly (the ETS pattern of ARCHITECTURE §3).

*Indexes.* Besides ``id -> entry`` there are buckets per capability, node, health and name. A
bucket is a dict plus a lazily built id-sorted list of its entries; replacing an entry that is
already in a bucket patches the sorted list in place (bisect), so the frequent case -- an agent
reporting a new load -- costs no re-sort, while inserts and removals merely mark the list stale.

*Planner.* :meth:`RegistryIndex.query` takes ANDed conditions. Among the equality and ``in``
conditions on an indexed field it picks the one with the fewest candidates (the size of the
bucket, or the sum for ``in``), takes that bucket's id-sorted list and runs the remaining
conditions as one fused, cached filter (``query.compile_query``) over it. A composite
(capability, health) index serves the discovery query "capable and healthy" (both conditions
at once, no per-entry check). Without an indexed
condition it scans everything. Results come in id order (free: buckets are id-sorted), or by
``order_by`` (missing resource / metadata values last, ties by id), and a query with a ``name``
condition lists the name's winner first (see :func:`name_rank`).

*Unique names.* Two unique entries with one name can meet after a partition heals. The winner
is deterministic: a nonzero ``name_token`` (the coordination store's revision of the name
claim) beats 0, a lower token beats a higher one, then the earlier ``registered_at``, then the
lower ``(node, id)``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Literal

import msgspec

from agentcluster.coordination.query import (
    INDEXED_FIELDS,
    Cond,
    QueryError,
    compile_query,
)

__all__ = [
    "MAX_CAPABILITIES",
    "MAX_ITEMS",
    "MAX_STRING",
    "AgentEntry",
    "Health",
    "RegistryIndex",
    "name_rank",
    "validate_entry",
]

Health = Literal["healthy", "degraded", "unhealthy", "unknown"]
MAX_CAPABILITIES = 64
MAX_ITEMS = 64
MAX_STRING = 256


class AgentEntry(msgspec.Struct, frozen=True, array_like=True):
    """One agent as the registry knows it."""

    id: str
    name: str
    node: str
    capabilities: tuple[str, ...] = ()
    health: Health = "healthy"
    resources: dict[str, float] = {}
    metadata: dict[str, str] = {}
    unique: bool = False
    name_token: int = 0
    registered_at: float = 0.0


def _check_str(what: str, s: object) -> None:
    if not isinstance(s, str):
        raise ValueError(f"{what} must be a string, not {type(s).__name__}")
    if len(s) > MAX_STRING:
        raise ValueError(f"{what} is {len(s)} characters long (at most {MAX_STRING})")


def validate_entry(e: AgentEntry) -> None:
    """Raise ValueError (naming the field) if ``e`` breaks the registry's limits."""
    for what, s in (("id", e.id), ("name", e.name), ("node", e.node)):
        _check_str(f"agent {what}", s)
        if not s:
            raise ValueError(f"agent {what} must not be empty")
    if e.health not in ("healthy", "degraded", "unhealthy", "unknown"):
        raise ValueError(f"agent {e.id!r}: unknown health {e.health!r}")
    if len(e.capabilities) > MAX_CAPABILITIES:
        raise ValueError(
            f"agent {e.id!r} has {len(e.capabilities)} capabilities (at most {MAX_CAPABILITIES})"
        )
    for c in e.capabilities:
        _check_str(f"agent {e.id!r}: capability", c)
        if not c:
            raise ValueError(f"agent {e.id!r}: empty capability")
    for what, items in (("resources", e.resources), ("metadata", e.metadata)):
        if len(items) > MAX_ITEMS:
            raise ValueError(f"agent {e.id!r} has {len(items)} {what} (at most {MAX_ITEMS})")
        for k in items:
            _check_str(f"agent {e.id!r}: {what} key", k)
    for k, v in e.resources.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"agent {e.id!r}: resource {k!r} = {v!r} is not a finite number")
    for k, s in e.metadata.items():
        _check_str(f"agent {e.id!r}: metadata {k!r}", s)
    if e.name_token < 0:
        raise ValueError(f"agent {e.id!r}: negative name_token {e.name_token}")
    if not math.isfinite(e.registered_at):
        raise ValueError(f"agent {e.id!r}: registered_at is not finite")


_MEMO_MAX = 4096  # memoised query results kept (cleared when full)


def name_rank(e: AgentEntry) -> tuple[bool, bool, int, float, str, str]:
    """Sort key of the entries sharing a name: the first is the one that keeps the name."""
    return (not e.unique, e.name_token == 0, e.name_token, e.registered_at, e.node, e.id)


class _Bucket:
    """The entries under one index key: a dict, plus an id-sorted list built on demand."""

    __slots__ = ("_entries", "_ids", "by_id")

    def __init__(self) -> None:
        self.by_id: dict[str, AgentEntry] = {}
        self._ids: list[str] | None = None
        self._entries: list[AgentEntry] | None = None

    def put(self, e: AgentEntry) -> None:
        known = e.id in self.by_id
        self.by_id[e.id] = e
        if self._entries is not None and self._ids is not None:
            if known:
                self._entries[bisect_left(self._ids, e.id)] = e
            else:
                self._ids = self._entries = None

    def pop(self, id: str) -> None:
        del self.by_id[id]
        self._ids = self._entries = None

    def sorted(self) -> list[AgentEntry]:
        """Entries by id. The list is shared: callers must not mutate it."""
        if self._entries is None:
            by_id = self.by_id
            self._ids = sorted(by_id)
            self._entries = [by_id[i] for i in self._ids]
        return self._entries


_Index = dict[Any, _Bucket]
_EMPTY: list[AgentEntry] = []
_ORDER_SCALARS = frozenset({"id", "name", "node", "health", "registered_at"})


def _put(index: _Index, key: Hashable, e: AgentEntry) -> None:
    bucket = index.get(key)
    if bucket is None:
        bucket = index[key] = _Bucket()
    bucket.put(e)


def _pop(index: _Index, key: Hashable, id: str) -> None:
    bucket = index[key]
    bucket.pop(id)
    if not bucket.by_id:
        del index[key]


class RegistryIndex:
    """The indexed set of known agent entries (see the module docstring)."""

    def __init__(self, entries: Iterable[AgentEntry] = ()) -> None:
        self._all = _Bucket()
        self._by_cap: _Index = {}
        self._by_node: _Index = {}
        self._by_health: _Index = {}
        self._by_name: _Index = {}
        # (capability, health): "capable and healthy" is the discovery query; this bucket
        # answers it with no per-entry check at all.
        self._by_cap_health: _Index = {}
        self._indexes: dict[str, _Index] = {
            "capability": self._by_cap,
            "node": self._by_node,
            "health": self._by_health,
            "name": self._by_name,
        }
        # Candidates examined by the last query (the size of the planner's pick).
        self.last_scanned = 0
        # Bumped on every change of an entry with the capability: routing tables built from
        # the capable entries are rebuilt only when their capability's version moved.
        self._cap_versions: dict[str, int] = {}
        self._version = 0  # any change
        self._memo: dict[Hashable, tuple[tuple[int, ...], list[AgentEntry]]] = {}
        self.memo_hits = 0
        for e in entries:
            self.upsert(e)

    # ------------------------------------------------------------------ mutation

    def upsert(self, e: AgentEntry) -> AgentEntry | None:
        """Insert or replace ``e`` (by id); returns the entry it replaced."""
        prev = self._all.by_id.get(e.id)
        self._touch(e.capabilities)
        if prev is not None:
            self._touch(prev.capabilities)
            if prev.node != e.node:
                _pop(self._by_node, prev.node, e.id)
            if prev.health != e.health:
                _pop(self._by_health, prev.health, e.id)
            if prev.name != e.name:
                _pop(self._by_name, prev.name, e.id)
            if prev.capabilities != e.capabilities:
                for c in dict.fromkeys(prev.capabilities):
                    if c not in e.capabilities:
                        _pop(self._by_cap, c, e.id)
                        _pop(self._by_cap_health, (c, prev.health), e.id)
            if prev.health != e.health:
                for c in dict.fromkeys(prev.capabilities):
                    if c in e.capabilities:
                        _pop(self._by_cap_health, (c, prev.health), e.id)
        self._all.put(e)
        _put(self._by_node, e.node, e)
        _put(self._by_health, e.health, e)
        _put(self._by_name, e.name, e)
        # A duplicated capability is indexed once (put is idempotent per id).
        for c in e.capabilities:
            _put(self._by_cap, c, e)
            _put(self._by_cap_health, (c, e.health), e)
        return prev

    def remove(self, id: str) -> AgentEntry | None:
        """Drop the entry with this id; returns it (None if unknown)."""
        prev = self._all.by_id.get(id)
        if prev is None:
            return None
        self._touch(prev.capabilities)
        self._all.pop(id)
        _pop(self._by_node, prev.node, id)
        _pop(self._by_health, prev.health, id)
        _pop(self._by_name, prev.name, id)
        for c in dict.fromkeys(prev.capabilities):
            _pop(self._by_cap, c, id)
            _pop(self._by_cap_health, (c, prev.health), id)
        return prev

    def remove_node(self, node: str) -> list[AgentEntry]:
        """Drop every entry owned by ``node``; returns them by id."""
        bucket = self._by_node.get(node)
        if bucket is None:
            return []
        gone = list(bucket.sorted())
        for e in gone:
            self.remove(e.id)
        return gone

    def _touch(self, capabilities: tuple[str, ...]) -> None:
        self._version += 1
        versions = self._cap_versions
        for c in capabilities:
            versions[c] = versions.get(c, 0) + 1

    def capability_version(self, capability: str) -> int:
        """A number that changes whenever an entry with ``capability`` changes."""
        return self._cap_versions.get(capability, 0)

    # ------------------------------------------------------------------ reads

    def get(self, id: str) -> AgentEntry | None:
        return self._all.by_id.get(id)

    def __len__(self) -> int:
        return len(self._all.by_id)

    def __contains__(self, id: object) -> bool:
        return id in self._all.by_id

    def entries(self) -> list[AgentEntry]:
        """All entries by id."""
        return list(self._all.sorted())

    def nodes(self) -> list[str]:
        """Nodes owning at least one entry, sorted."""
        return sorted(self._by_node)

    def by_name(self, name: str) -> list[AgentEntry]:
        """Entries with this name, the one that keeps the name (:func:`name_rank`) first."""
        bucket = self._by_name.get(name)
        return [] if bucket is None else sorted(bucket.by_id.values(), key=name_rank)

    def _candidates(self, c: Cond) -> tuple[int, list[AgentEntry]] | None:
        """(count, id-sorted candidates) for an indexed eq / in condition, else None."""
        field, op = c.field, c.op
        if field not in INDEXED_FIELDS or (op != "eq" and op != "in"):
            return None
        values = c.value if isinstance(c.value, tuple) else (c.value,)
        if field == "id":
            found = [e for v in dict.fromkeys(values) if (e := self._all.by_id.get(v)) is not None]  # type: ignore[arg-type]
            found.sort(key=lambda e: e.id)
            return len(found), found
        index = self._indexes[field]
        buckets = [b for v in dict.fromkeys(values) if (b := index.get(v)) is not None]
        if not buckets:
            return 0, _EMPTY
        if len(buckets) == 1:
            return len(buckets[0].by_id), buckets[0].sorted()
        merged: dict[str, AgentEntry] = {}
        for b in buckets:
            merged.update(b.by_id)
        return len(merged), [merged[i] for i in sorted(merged)]

    def _plan(self, conds: Sequence[Cond]) -> tuple[tuple[int, ...], str | None, list[AgentEntry]]:
        """(conditions the candidates already satisfy, index used, id-sorted candidates)."""
        best: tuple[int, ...] = ()
        best_field: str | None = None
        best_size = len(self._all.by_id) + 1
        best_list = _EMPTY
        cap_eq = health_eq = -1
        for i, c in enumerate(conds):
            if c.field not in INDEXED_FIELDS or (c.op != "eq" and c.op != "in"):
                continue
            # A cheap size bound first, so a big `in` is merged only if it wins.
            if c.op == "eq" and c.field != "id":
                if c.field == "capability":
                    cap_eq = i
                elif c.field == "health":
                    health_eq = i
                b = self._indexes[c.field].get(c.value)
                size = 0 if b is None else len(b.by_id)
                if size < best_size:
                    best, best_field, best_size = (i,), c.field, size
                    best_list = _EMPTY if b is None else b.sorted()
                continue
            got = self._candidates(c)
            if got is not None and got[0] < best_size:
                best, best_field, (best_size, best_list) = (i,), c.field, got
        if cap_eq >= 0 and health_eq >= 0:
            b = self._by_cap_health.get((conds[cap_eq].value, conds[health_eq].value))
            # On a tie the pair wins: its candidates satisfy two conditions.
            if b is None or len(b.by_id) <= best_size:
                best, best_field = (cap_eq, health_eq), "capability+health"
                best_list = _EMPTY if b is None else b.sorted()
        if not best:
            return (), None, self._all.sorted()
        return best, best_field, best_list

    def explain(self, conds: Sequence[Cond]) -> tuple[str | None, int]:
        """(indexed field the planner would use or None for a full scan, candidate count)."""
        _, field, cands = self._plan(conds)
        return field, len(cands)

    def query(
        self,
        conds: Sequence[Cond] = (),
        *,
        limit: int = 0,
        order_by: str | None = None,
        descending: bool = False,
    ) -> list[AgentEntry]:
        """Entries satisfying every condition, by id (or ``order_by``), at most ``limit``.

        Results are memoised until an entry they could depend on changes: the versions of the
        capabilities the query names (``capability eq``), else any change at all. Readers that
        repeat a query between registry changes -- the common case -- pay a dict lookup."""
        try:
            key: Hashable = (tuple(conds), limit, order_by, descending)
            hash(key)
        except TypeError:  # an unhashable value (a list): not memoised
            return self._query(conds, limit, order_by, descending)
        stamp = self._stamp(conds)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == stamp:
            self.memo_hits += 1
            return list(hit[1])
        found = self._query(conds, limit, order_by, descending)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = (stamp, found)
        return list(found)

    def _stamp(self, conds: Sequence[Cond]) -> tuple[int, ...]:
        caps = [c.value for c in conds if c.field == "capability" and c.op == "eq"]
        if not caps:
            return (-1, self._version)
        versions = self._cap_versions
        return tuple(versions.get(c, 0) for c in caps if isinstance(c, str))

    def _query(
        self,
        conds: Sequence[Cond],
        limit: int,
        order_by: str | None,
        descending: bool,
    ) -> list[AgentEntry]:
        picked, _, cands = self._plan(conds)
        self.last_scanned = len(cands)
        rest = [c for i, c in enumerate(conds) if i not in picked] if picked else conds
        es = compile_query(rest)(cands) if rest else cands
        if order_by is not None:
            es = _ordered(es, order_by, descending)
        elif descending:
            es = es[::-1]
        elif any(c.field == "name" and (c.op == "eq" or c.op == "in") for c in conds):
            es = sorted(es, key=lambda e: (e.name, *name_rank(e)))
        if limit > 0 and len(es) > limit:
            return es[:limit]
        # Never hand out a bucket's shared list.
        return list(es) if es is cands else es

    # ------------------------------------------------------------------ discovery helpers

    def find_capable(self, capability: str, *, healthy_only: bool = True) -> list[AgentEntry]:
        """Agents with ``capability`` (healthy ones only by default), by id."""
        bucket = (
            self._by_cap_health.get((capability, "healthy"))
            if healthy_only
            else self._by_cap.get(capability)
        )
        return [] if bucket is None else list(bucket.sorted())

    def least_loaded(
        self,
        capability: str | None = None,
        *,
        n: int = 1,
        resource: str = "load",
        healthy_only: bool = True,
    ) -> list[AgentEntry]:
        """The ``n`` agents reporting the lowest ``resource`` (ties by id); agents that do
        not report it are left out -- an unknown load is not a low one."""
        if capability is None:
            bucket = self._by_health.get("healthy") if healthy_only else self._all
        elif healthy_only:
            bucket = self._by_cap_health.get((capability, "healthy"))
        else:
            bucket = self._by_cap.get(capability)
        if bucket is None:
            return []
        es = [e for e in bucket.sorted() if resource in e.resources]
        if not es or n <= 0:
            return []
        # min() and sorted() are stable and ``es`` is id-sorted, so equal values keep id order.
        if n == 1:
            return [min(es, key=lambda e: e.resources[resource])]
        return sorted(es, key=lambda e: e.resources[resource])[:n]

    def with_resource(
        self, resource: str, minimum: float, *, capability: str | None = None
    ) -> list[AgentEntry]:
        """Agents with at least ``minimum`` of ``resource`` (and ``capability``), by id."""
        if capability is None:
            es = self._all.sorted()
        else:
            bucket = self._by_cap.get(capability)
            if bucket is None:
                return []
            es = bucket.sorted()
        return [e for e in es if (x := e.resources.get(resource)) is not None and x >= minimum]

    def count_by_capability(self) -> dict[str, int]:
        """Number of agents per capability, by capability name."""
        return {c: len(self._by_cap[c].by_id) for c in sorted(self._by_cap)}

    def summary(self) -> dict[str, Any]:
        """``{"agents": n, "nodes": {..}, "health": {..}, "capabilities": {..}}`` (counts)."""
        return {
            "agents": len(self._all.by_id),
            "nodes": {n: len(self._by_node[n].by_id) for n in sorted(self._by_node)},
            "health": {h: len(self._by_health[h].by_id) for h in sorted(self._by_health)},
            "capabilities": self.count_by_capability(),
        }


def _ordered(es: list[AgentEntry], order_by: str, descending: bool) -> list[AgentEntry]:
    """``es`` (id-sorted) ordered by a field; missing mapping values last, ties by id."""
    if order_by in _ORDER_SCALARS:
        attr = order_by
        return sorted(es, key=lambda e: getattr(e, attr), reverse=descending)
    if order_by.startswith("resources.") and len(order_by) > 10:
        rk = order_by[10:]
        have = [e for e in es if rk in e.resources]
        rest = [e for e in es if rk not in e.resources]
        # sorted() is stable with reverse=True too, so equal values keep id order.
        return sorted(have, key=lambda e: e.resources[rk], reverse=descending) + rest
    if order_by.startswith("metadata.") and len(order_by) > 9:
        mk = order_by[9:]
        have = [e for e in es if mk in e.metadata]
        rest = [e for e in es if mk not in e.metadata]
        return sorted(have, key=lambda e: e.metadata[mk], reverse=descending) + rest
    raise QueryError(
        f"cannot order by {order_by!r} (id, name, node, health, registered_at, "
        "resources.<name> or metadata.<key>)"
    )
