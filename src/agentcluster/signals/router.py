"""Signal routing: a trie of dotted type patterns, matched in a fixed, documented order.

Theory of operation: a pattern such as ``cluster.*.suspect`` or ``cluster.**`` is split on
``.`` and stored along a path of trie nodes. Each node has literal children (a dict keyed by
segment), one ``*`` child (exactly one segment) and one ``**`` child (zero or more segments,
allowed anywhere in a pattern). Matching a concrete type walks the trie with an explicit stack
of ``(node, segment index)`` states; a ``**`` child fans out to every remaining index, and a
visited set keeps patterns like ``**.**`` from blowing up or matching a route twice.

The walk is the slow part, so its result is cached: type string -> routes sorted in match
order, plus the deduplicated target list of the routes without predicates. The cache is
bounded (oldest entry evicted first) and cleared on every ``add``/``remove``; a realistic
stream of a few thousand distinct types then costs one dict lookup and one list copy per
``match``. Predicates are never cached: they run on every call.

Order of ``match`` results (fully deterministic):

1. higher ``priority`` first (an int in -100..100);
2. then more *specific* first. Specificity compares, in order: more literal segments; then
   more ``*`` segments; then fewer ``**`` segments; then position, left to right, with
   literal > ``*`` > ``**`` (so ``a.*`` beats ``*.b``, since it is pinned further left);
3. then insertion order (lower route id first).

A target reached by several routes appears once, at its best position. Hashable targets are
compared by equality, unhashable ones by identity (the same rule serves ``remove_target``).

Predicates: a route with a predicate matches only if ``predicate(signal)`` is true. When
``match`` is given a plain type string there is no signal to test, so predicate routes are
skipped (treated as not matching). A predicate that raises counts as a non-match and
increments ``predicate_errors``; it never breaks matching.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from agentcluster.signals._signal import Signal, validate_type

__all__ = [
    "RouteError",
    "RouteInfo",
    "Router",
    "UnknownRouteError",
    "bench_router",
    "pattern_matcher",
    "validate_pattern",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_STAR = "*"
_DSTAR = "**"
MIN_PRIORITY = -100
MAX_PRIORITY = 100


class RouteError(ValueError):
    """A route pattern, priority or route id is invalid; the message names it."""


class UnknownRouteError(RouteError, KeyError):
    """No route has the given id."""

    def __str__(self) -> str:
        # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


def validate_pattern(pattern: str) -> list[str]:
    """Check a route pattern and return its segments; raise :class:`RouteError` if bad."""
    if not isinstance(pattern, str) or not pattern:
        raise RouteError(f"invalid route pattern {pattern!r}: must be a non-empty string")
    segments = pattern.split(".")
    for seg in segments:
        if seg in (_STAR, _DSTAR):
            continue
        if not _SEGMENT_RE.match(seg):
            what = "an empty segment" if not seg else f"bad segment {seg!r}"
            raise RouteError(
                f"invalid route pattern {pattern!r}: {what}; segments are letters, digits, "
                "'_' or '-', or exactly '*' (one segment) or '**' (zero or more)"
            )
    return segments


def pattern_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate on concrete type strings that is true when ``pattern`` matches them.

    One-off filtering (journal replay) uses this instead of a whole router. Each segment of
    the type is matched with a leading dot, so ``**`` can stand for zero segments cleanly.
    """
    parts: list[str] = []
    for seg in validate_pattern(pattern):
        if seg == _DSTAR:
            parts.append(r"(?:\.[^.]+)*")
        elif seg == _STAR:
            parts.append(r"\.[^.]+")
        else:
            parts.append(r"\." + re.escape(seg))
    regex = re.compile("".join(parts))

    def matches(type_: str) -> bool:
        return regex.fullmatch("." + type_) is not None

    return matches


def _specificity(segments: list[str]) -> tuple[int, int, int, tuple[int, ...]]:
    """A sort key where smaller means more specific (see the module docstring)."""
    literals = sum(1 for s in segments if s not in (_STAR, _DSTAR))
    singles = segments.count(_STAR)
    doubles = segments.count(_DSTAR)
    ranks = tuple(-2 if s not in (_STAR, _DSTAR) else (-1 if s == _STAR else 0) for s in segments)
    return (-literals, -singles, doubles, ranks)


class _IdentityKey:
    """Stands in for an unhashable target so it can be deduplicated by identity."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _IdentityKey) and other.obj is self.obj


def _dedup_key(target: object) -> object:
    try:
        hash(target)
    except TypeError:
        return _IdentityKey(target)
    return target


class _Route(Generic[T]):
    __slots__ = ("dkey", "id", "key", "pattern", "predicate", "priority", "segments", "target")

    def __init__(
        self,
        route_id: int,
        pattern: str,
        segments: list[str],
        target: T,
        priority: int,
        predicate: Callable[[Signal], bool] | None,
    ) -> None:
        self.id = route_id
        self.pattern = pattern
        self.segments = segments
        self.target = target
        self.priority = priority
        self.predicate = predicate
        self.dkey = _dedup_key(target)
        self.key = (-priority, *_specificity(segments), route_id)


class _Node(Generic[T]):
    __slots__ = ("children", "dstar", "routes", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.star: _Node[T] | None = None
        self.dstar: _Node[T] | None = None
        self.routes: list[_Route[T]] = []

    def empty(self) -> bool:
        return not (self.routes or self.children or self.star or self.dstar)


class _Entry(Generic[T]):
    """Cached result for one type: all matching routes in order, and the no-predicate answer."""

    __slots__ = ("has_predicates", "plain", "routes")

    def __init__(self, routes: tuple[_Route[T], ...]) -> None:
        self.routes = routes
        self.has_predicates = any(r.predicate is not None for r in routes)
        plain: list[T] = []
        seen: set[object] = set()
        for r in routes:
            if r.predicate is None and r.dkey not in seen:
                seen.add(r.dkey)
                plain.append(r.target)
        self.plain = plain


@dataclass(frozen=True, slots=True)
class RouteInfo(Generic[T]):
    """A read-only view of one route."""

    id: int
    pattern: str
    priority: int
    target: T
    has_predicate: bool


class Router(Generic[T]):
    """Maps dotted signal types to targets through wildcard patterns (see module docstring)."""

    def __init__(self, *, cache_size: int = 4096) -> None:
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be a non-negative int, got {cache_size!r}")
        self._root: _Node[T] = _Node()
        self._routes: dict[int, _Route[T]] = {}
        self._next_id = 1
        self._cache: dict[str, _Entry[T]] = {}
        self._cache_size = cache_size
        self._predicate_errors = 0

    # ------------------------------------------------------------------ mutation
    def add(
        self,
        pattern: str,
        target: T,
        *,
        priority: int = 0,
        predicate: Callable[[Signal], bool] | None = None,
    ) -> int:
        """Add a route and return its id."""
        segments = validate_pattern(pattern)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RouteError(f"route {pattern!r}: priority must be an int, got {priority!r}")
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise RouteError(
                f"route {pattern!r}: priority {priority} is outside {MIN_PRIORITY}..{MAX_PRIORITY}"
            )
        if predicate is not None and not callable(predicate):
            raise RouteError(f"route {pattern!r}: predicate must be callable, got {predicate!r}")
        node = self._root
        for seg in segments:
            if seg == _DSTAR:
                if node.dstar is None:
                    node.dstar = _Node()
                node = node.dstar
            elif seg == _STAR:
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                child = node.children.get(seg)
                if child is None:
                    child = node.children[seg] = _Node()
                node = child
        route_id = self._next_id
        self._next_id += 1
        route = _Route(route_id, pattern, segments, target, priority, predicate)
        node.routes.append(route)
        self._routes[route_id] = route
        self._cache.clear()
        return route_id

    def remove(self, route_id: int) -> None:
        """Remove one route; raise :class:`UnknownRouteError` if no route has that id."""
        route = self._routes.pop(route_id, None)
        if route is None:
            raise UnknownRouteError(f"no route with id {route_id!r}")
        self._unlink(route)
        self._cache.clear()

    def remove_target(self, target: T) -> int:
        """Remove every route of ``target``; return how many were removed."""
        key = _dedup_key(target)
        doomed = [r for r in self._routes.values() if r.dkey == key]
        for route in doomed:
            del self._routes[route.id]
            self._unlink(route)
        if doomed:
            self._cache.clear()
        return len(doomed)

    def _unlink(self, route: _Route[T]) -> None:
        # Walk down recording the path, then prune nodes left empty on the way back up.
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for seg in route.segments:
            path.append((node, seg))
            nxt = (
                node.dstar
                if seg == _DSTAR
                else node.star
                if seg == _STAR
                else node.children.get(seg)
            )
            if nxt is None:  # pragma: no cover - the trie and the id table disagree
                raise RuntimeError(f"router trie is missing the path of {route.pattern!r}")
            node = nxt
        node.routes.remove(route)
        for parent, seg in reversed(path):
            if not node.empty():
                break
            if seg == _DSTAR:
                parent.dstar = None
            elif seg == _STAR:
                parent.star = None
            else:
                del parent.children[seg]
            node = parent

    # ------------------------------------------------------------------ queries
    def match(self, signal: Signal | str) -> list[T]:
        """Targets whose routes match, in the documented order, each target once.

        Raises :class:`~agentcluster.signals._signal.SignalError` for a malformed type.
        """
        if isinstance(signal, str):
            type_ = signal
            sig: Signal | None = None
        else:
            type_ = signal.type
            sig = signal
        entry = self._cache.get(type_)
        if entry is None:
            entry = self._lookup(type_)
        if sig is None or not entry.has_predicates:
            return entry.plain.copy()
        return self._evaluate(entry.routes, sig)

    def _evaluate(self, routes: tuple[_Route[T], ...], sig: Signal) -> list[T]:
        out: list[T] = []
        seen: set[object] = set()
        for r in routes:
            pred = r.predicate
            if pred is not None:
                try:
                    ok = pred(sig)
                except Exception:
                    self._predicate_errors += 1
                    logger.debug(
                        "predicate of route %d (%s) raised", r.id, r.pattern, exc_info=True
                    )
                    continue
                if not ok:
                    continue
            if r.dkey not in seen:
                seen.add(r.dkey)
                out.append(r.target)
        return out

    def _lookup(self, type_: str) -> _Entry[T]:
        validate_type(type_)
        segs = type_.split(".")
        n = len(segs)
        found: dict[int, _Route[T]] = {}
        visited: set[tuple[int, int]] = set()
        stack: list[tuple[_Node[T], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            state = (id(node), i)
            if state in visited:
                continue
            visited.add(state)
            if node.dstar is not None:
                dstar = node.dstar
                stack.extend((dstar, j) for j in range(i, n + 1))
            if i == n:
                for r in node.routes:
                    found[r.id] = r
                continue
            child = node.children.get(segs[i])
            if child is not None:
                stack.append((child, i + 1))
            if node.star is not None:
                stack.append((node.star, i + 1))
        entry = _Entry(tuple(sorted(found.values(), key=_route_key)))
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[type_] = entry
        return entry

    def routes(self) -> list[RouteInfo[T]]:
        """Every route, in insertion order."""
        return [
            RouteInfo(r.id, r.pattern, r.priority, r.target, r.predicate is not None)
            for r in self._routes.values()
        ]

    @property
    def predicate_errors(self) -> int:
        """How many predicate calls raised (each counted as a non-match)."""
        return self._predicate_errors

    def __len__(self) -> int:
        return len(self._routes)

    def __repr__(self) -> str:
        return f"<Router routes={len(self._routes)} cached_types={len(self._cache)}>"


def _route_key(route: _Route[Any]) -> tuple[Any, ...]:
    return route.key


# ----------------------------------------------------------------------------- bench
_BENCH_ROOTS = ("cluster", "app", "node", "health", "agent", "metrics", "config", "consensus")
_BENCH_WORDS = tuple(
    [
        "member",
        "suspect",
        "alive",
        "dead",
        "alert",
        "critical",
        "warning",
        "info",
        "probe",
        "ack",
        "nack",
        "vote",
        "commit",
        "leader",
        "follower",
        "lease",
        "lock",
        "cpu",
        "memory",
        "disk",
        "net",
        "latency",
        "loss",
        "join",
        "leave",
        "update",
        "request",
        "reply",
        "error",
        "timeout",
        "started",
        "stopped",
    ]
)


def _bench_routes_and_types(
    n_routes: int, n_types: int, rng: random.Random
) -> tuple[list[tuple[str, int]], list[str]]:
    types: set[str] = set()
    while len(types) < n_types:
        depth = rng.randint(2, 5)
        segs = [rng.choice(_BENCH_ROOTS)] + [rng.choice(_BENCH_WORDS) for _ in range(depth - 1)]
        types.add(".".join(segs))
    type_list = sorted(types)
    routes: list[tuple[str, int]] = []
    for _ in range(n_routes):
        segs = rng.choice(type_list).split(".")
        roll = rng.random()
        if roll < 0.35:
            pass  # an exact literal route
        elif roll < 0.65:
            segs = [_STAR if rng.random() < 0.35 and i > 0 else s for i, s in enumerate(segs)]
        elif roll < 0.85:
            segs = [*segs[: rng.randint(1, len(segs) - 1)], _DSTAR]
        else:
            keep = rng.randint(1, len(segs) - 1)
            segs = [_DSTAR, *segs[keep:]] if rng.random() < 0.5 else [segs[0], _DSTAR, segs[-1]]
        routes.append((".".join(segs), rng.randint(-5, 5)))
    return routes, type_list


def bench_router(n_routes: int = 1000, n_matches: int = 200_000, seed: int = 1) -> float:
    """Matches per second over ``n_routes`` mixed-wildcard routes and ~1,000 distinct types.

    Routes and the stream are generated from ``seed``; the timing includes the cold cache
    (first sight of each type) as a live stream would.
    """
    rng = random.Random(seed)
    routes, types = _bench_routes_and_types(n_routes, 1000, rng)
    router: Router[int] = Router()
    for i, (pattern, priority) in enumerate(routes):
        router.add(pattern, i, priority=priority)
    signals = [Signal(type=t) for t in types]
    stream = [rng.choice(signals) for _ in range(n_matches)]
    match = router.match
    start = time.perf_counter()
    for sig in stream:
        match(sig)
    elapsed = time.perf_counter() - start
    return n_matches / elapsed if elapsed > 0 else float("inf")
