"""Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent
Hashing with Bounded Loads", SODA 2018; as in HAProxy's ``hash-balance-factor`` and Vimeo's
deployment).

Theory of operation: nodes own points on a 64-bit hash ring (``vnodes`` points each, scaled by
weight; the points are stable hashes of ``"node#i"``, so a node's points never depend on who
else is there). A key hashes to a point; the pick is the first node clockwise from it whose
in-flight load is below its bound

    ``bound(node) = ceil(c * (total_in_flight + 1) * weight(node) / total_weight)``

(with equal weights: ``ceil(c * (T + 1) / n)``), ``c`` = ``balance_factor``, 1.25 by default
(Vimeo's and HAProxy's common choice: no node carries more than 125% of the average, while
keys stay on their home node as long as it is not overloaded). Because the sum of the bounds
is at least ``c * (T + 1) > T``, some node is always below its bound, so the walk ends; it is
short in practice (a bisect plus a few steps). ``T + 1`` counts the request being placed, so
after ``on_start`` no node is above the bound computed with the new total.

Load comes from :meth:`on_start` / :meth:`on_finish` (this balancer's own in-flight count).
A request without a key starts from a point drawn from the caller's ``rng``. ``exclude`` skips
nodes during the walk. If every non-excluded node is at its bound (only possible when
``exclude`` removes capacity), the least-loaded non-excluded node is chosen.

The nodes' published in-flight figures (``Endpoint.in_flight``: other clients' calls) are left
out on purpose. Keys exist for affinity, and the bound promises only how *this* balancer
spreads its own keys. The figure is node-wide (every capability), up to a report period old
and moves in steps: counting it would push keys off their home nodes whenever other clients'
traffic shifts -- cache misses paid for a stale signal -- and the strategies whose job is to
spread load (least connections, latency aware, adaptive, geographic) already use it.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Sequence
from fractions import Fraction

from agentcluster.balancing._hashing import hash64, hash_signature
from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy

__all__ = ["DEFAULT_BALANCE_FACTOR", "DEFAULT_VNODES", "BoundedLoad"]

DEFAULT_BALANCE_FACTOR = 1.25
DEFAULT_VNODES = 100
_PERSON_RING = b"ac-ring-point"
_PERSON_KEY = b"ac-ring-key"


class BoundedLoad(Strategy):
    """Consistent hashing with bounded loads (see the module docstring)."""

    name = "bounded_load"

    __slots__ = (
        "_c_den",
        "_c_num",
        "_factor",
        "_ghost",
        "_index",
        "_loads",
        "_n",
        "_names",
        "_owners",
        "_point_cache",
        "_points",
        "_shares",
        "_signature",
        "_total",
        "_uniform",
        "_vnodes",
    )

    def __init__(
        self, *, balance_factor: float = DEFAULT_BALANCE_FACTOR, vnodes: int = DEFAULT_VNODES
    ) -> None:
        if not balance_factor > 1.0:
            raise ValueError("balance_factor must be greater than 1")
        if vnodes < 1:
            raise ValueError("vnodes must be at least 1")
        self._factor = balance_factor
        # Exact rational c for the equal-weight bound, so ceil() never rounds up an integer.
        frac = Fraction(balance_factor).limit_denominator(1_000_000)
        self._c_num = frac.numerator
        self._c_den = frac.denominator
        self._vnodes = vnodes
        self._signature: tuple[tuple[str, float], ...] = ()
        self._points: list[int] = []  # sorted ring points
        self._owners: list[int] = []  # the node index owning each point
        self._point_cache: dict[tuple[str, int], list[int]] = {}
        self._names: list[str] = []  # eligible nodes, sorted
        self._index: dict[str, int] = {}
        # bound share per node (c * weight / total weight); used only with unequal weights
        self._shares: list[float] = []
        self._uniform = True
        self._n = 0
        self._loads: list[int] = []  # in flight per eligible node (by index)
        self._ghost: dict[str, int] = {}  # in flight on nodes that are not eligible now
        self._total = 0  # in flight on eligible nodes

    @property
    def balance_factor(self) -> float:
        return self._factor

    def load(self, node: str) -> int:
        """In-flight requests this balancer has on ``node``."""
        k = self._index.get(node)
        return self._ghost.get(node, 0) if k is None else self._loads[k]

    @property
    def total_in_flight(self) -> int:
        """In-flight requests on eligible nodes."""
        return self._total

    def bound(self, node: str, total: int | None = None) -> int:
        """``node``'s load bound when ``total`` requests (default: the current in-flight total
        plus the one being placed) are spread over the eligible nodes."""
        t = self._total + 1 if total is None else total
        if self._uniform:
            return -(-(self._c_num * t) // (self._c_den * self._n)) if self._n else 0
        k = self._index.get(node)
        return 0 if k is None else math.ceil(self._shares[k] * t)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        signature = hash_signature(endpoints)
        if signature == self._signature:
            return
        self._signature = signature
        # Carry in-flight counts over: requests already sent still finish.
        carried = dict(self._ghost)
        for node, k in self._index.items():
            if self._loads[k]:
                carried[node] = self._loads[k]
        names = [node for node, _ in signature]
        self._names = names
        self._index = {node: k for k, node in enumerate(names)}
        self._loads = [carried.pop(node, 0) for node in names]
        self._ghost = carried
        self._total = sum(self._loads)
        self._n = len(names)
        if not names:
            self._points, self._owners, self._shares = [], [], []
            self._uniform = True
            return
        top = max(w for _, w in signature)
        total_weight = sum(w for _, w in signature)
        self._uniform = all(w == top for _, w in signature)
        self._shares = [self._factor * w / total_weight for _, w in signature]
        cache: dict[tuple[str, int], list[int]] = {}
        pairs: list[tuple[int, int]] = []
        for k, (node, weight) in enumerate(signature):
            count = max(1, round(self._vnodes * weight / top))
            points = self._point_cache.get((node, count))
            if points is None:
                points = [hash64(f"{node}#{v}", _PERSON_RING) for v in range(count)]
            cache[(node, count)] = points
            pairs.extend((p, k) for p in points)
        # Only current nodes stay cached: a long-lived balancer must not grow with churn.
        self._point_cache = cache
        pairs.sort()
        self._points = [p for p, _ in pairs]
        self._owners = [k for _, k in pairs]

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        points = self._points
        size = len(points)
        if not size:
            raise NoEndpoint("no eligible endpoint")
        key = request.key
        h = rng.getrandbits(64) if key is None else hash64(key, _PERSON_KEY)
        i = bisect_left(points, h)
        owners = self._owners
        loads = self._loads
        names = self._names
        t = self._total + 1
        if self._uniform:
            cap = -(-(self._c_num * t) // (self._c_den * self._n))
            for _ in range(size):
                if i == size:
                    i = 0
                k = owners[i]
                if loads[k] < cap and (not exclude or names[k] not in exclude):
                    return names[k]
                i += 1
        else:
            shares = self._shares
            for _ in range(size):
                if i == size:
                    i = 0
                k = owners[i]
                # ``load < share * t`` is ``load < ceil(share * t)`` (:meth:`bound`) for an
                # integer load, without a call per step of the walk.
                if loads[k] < shares[k] * t and (not exclude or names[k] not in exclude):
                    return names[k]
                i += 1
        return self._least_loaded(exclude)

    def _least_loaded(self, exclude: frozenset[str]) -> str:
        best = -1
        loads, names = self._loads, self._names
        for k in range(len(names)):
            if names[k] not in exclude and (best < 0 or loads[k] < loads[best]):
                best = k
        if best < 0:
            raise NoEndpoint("every eligible endpoint is excluded")
        return names[best]

    def on_start(self, node: str, now: float) -> None:
        k = self._index.get(node)
        if k is None:
            self._ghost[node] = self._ghost.get(node, 0) + 1
        else:
            self._loads[k] += 1
            self._total += 1

    def on_finish(self, node: str, latency: float, ok: bool, now: float) -> None:
        k = self._index.get(node)
        if k is not None:
            if self._loads[k] > 0:  # a finish we never saw start (e.g. a restart): ignore
                self._loads[k] -= 1
                self._total -= 1
            return
        current = self._ghost.get(node, 0)
        if current > 1:
            self._ghost[node] = current - 1
        elif current == 1:
            del self._ghost[node]  # keep the map the size of what is in flight
