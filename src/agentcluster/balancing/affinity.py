"""Session affinity: a request with a key sticks to the node it got first.

Theory of operation: a map ``key -> (node, last use)`` in least-recently-used order wraps any
inner :class:`Strategy`. A keyed request goes to its remembered node while that node is still
eligible (in the last :meth:`update`), not in the request's ``exclude``, and the entry has not
been idle longer than ``ttl`` (300 s by default; every use refreshes it). Otherwise the inner
strategy picks (with the same request, so a hashing inner strategy such as Maglev keeps its own
key consistency) and the map remembers the new node: a session whose node left, or whose node
failed a retry, moves once and then sticks to its new home. Requests without a key go straight
to the inner strategy.

The map is bounded (``max_sessions``, 100,000 by default): the least recently used entry is
evicted first. Because idle expiry and LRU order agree (the oldest use is at the front when
``now`` does not go backwards), each insertion also drops a few expired entries from the
front, so the map does not keep dead sessions until it is full. Time comes from the caller's
``now``; nothing here reads a clock.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from agentcluster.balancing.base import Endpoint, PickRequest, Strategy

__all__ = ["DEFAULT_MAX_SESSIONS", "DEFAULT_SESSION_TTL", "SessionAffinity"]

DEFAULT_SESSION_TTL = 300.0
DEFAULT_MAX_SESSIONS = 100_000
_PURGE_PER_INSERT = 8  # bounded work per pick; expired entries drain over a few inserts


class _Session:
    __slots__ = ("last", "node")

    def __init__(self, node: str, last: float) -> None:
        self.node = node
        self.last = last


class SessionAffinity(Strategy):
    """Sticky sessions over an inner strategy (see the module docstring)."""

    name = "session_affinity"

    __slots__ = ("_eligible", "_inner", "_max", "_sessions", "_ttl")

    def __init__(
        self,
        inner: Strategy,
        *,
        ttl: float = DEFAULT_SESSION_TTL,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self._inner = inner
        self._ttl = ttl
        self._max = max_sessions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._eligible: frozenset[str] = frozenset()

    @property
    def inner(self) -> Strategy:
        return self._inner

    def __len__(self) -> int:
        return len(self._sessions)

    def session(self, key: str, now: float) -> str | None:
        """The node ``key`` is bound to, or None (no entry, or expired); does not refresh."""
        entry = self._sessions.get(key)
        if entry is None or now - entry.last > self._ttl:
            return None
        return entry.node

    def forget(self, key: str) -> None:
        """Drop ``key``'s binding (e.g. the session ended)."""
        self._sessions.pop(key, None)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._eligible = frozenset(e.node for e in endpoints)
        self._inner.update(endpoints)

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        key = request.key
        if key is None:
            return self._inner.pick(request, rng, now, exclude)
        sessions = self._sessions
        entry = sessions.get(key)
        if entry is not None:
            node = entry.node
            if (
                now - entry.last <= self._ttl
                and node in self._eligible
                and (not exclude or node not in exclude)
            ):
                entry.last = now
                sessions.move_to_end(key)
                return node
        node = self._inner.pick(request, rng, now, exclude)
        if entry is not None:
            entry.node = node
            entry.last = now
            sessions.move_to_end(key)
            return node
        sessions[key] = _Session(node, now)
        self._trim(now)
        return node

    def _trim(self, now: float) -> None:
        sessions = self._sessions
        while len(sessions) > self._max:
            sessions.popitem(last=False)
        ttl = self._ttl
        for _ in range(_PURGE_PER_INSERT):
            oldest = next(iter(sessions.values()))
            if now - oldest.last <= ttl:
                break
            sessions.popitem(last=False)

    def on_start(self, node: str, now: float) -> None:
        self._inner.on_start(node, now)

    def on_finish(self, node: str, latency: float, ok: bool, now: float) -> None:
        self._inner.on_finish(node, latency, ok, now)
