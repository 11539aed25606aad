"""Smooth weighted round robin by earliest-deadline-first scheduling (as Envoy does).

Theory of operation: every endpoint owns a *deadline* on a virtual time line. A pick takes the
endpoint with the earliest deadline (a binary heap: O(log n)), moves virtual time to that
deadline and pushes the endpoint's next deadline one period ``1 / weight`` further. Over any
stretch of virtual time ``t`` an endpoint is picked ``t * weight`` times, give or take one, and
its picks are spread evenly through the stretch: weights 5:1:1 give ``a b c a a a a``-like
interleavings rather than five ``a`` in a row (no bursts to one node). Ties on a deadline go
to the endpoint that entered the heap first (a sequence number), so equal weights degrade to
plain round robin.

When the weights change (:meth:`EdfScheduler.set`), an endpoint that stays keeps its progress:
the time left until its deadline is rescaled by ``old_weight / new_weight``, so frequent weight
updates (capacity reports) neither reset nor starve anyone. New endpoints get staggered first
deadlines: the i-th of m new ones (in name order) is due after ``(i + 0.5) / m`` of its period.
Starting everyone at one full period would line equal weights up on the same deadlines and
make a heavy endpoint run in long streaks between them (5:1:1 gives runs of six); staggered,
the light ones fall between the heavy one's picks (``a a a b a c a``). Virtual time is rebased
to zero on every ``set`` so the floats never grow without bound.

The scheduler is shared: :class:`WeightedRoundRobin` feeds it ``Endpoint.weight`` (which the
LoadBalancer agent derives from free capacity with :func:`capacity_weight`, as in the design);
``CapacityAware`` feeds it capacity scores times weights.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable, Sequence

from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy

__all__ = [
    "EdfScheduler",
    "WeightedRoundRobin",
    "capacity_weight",
    "clamp_fraction",
    "endpoint_weight",
]

# The smallest share free capacity may give a node: a fully loaded node still gets a trickle,
# so its next load report (and its latency) stays observable.
MIN_FREE_CAPACITY = 0.05


def clamp_fraction(value: float) -> float:
    """A load report as a fraction in [0, 1]; a missing or garbled (NaN) value counts as fully
    loaded, the conservative reading of a report we cannot trust."""
    if value != value:  # NaN
        return 1.0
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def capacity_weight(ep: Endpoint, base: float = 1.0) -> float:
    """Weights from free capacity as in the design: ``base * max(0.05, 1 - max(cpu, memory))``.

    The busier of CPU and memory bounds what a node can still take; the floor keeps a saturated
    node in rotation with a small share instead of dropping it (that is the breakers' job).
    """
    busy = max(clamp_fraction(ep.cpu), clamp_fraction(ep.memory))
    return base * max(MIN_FREE_CAPACITY, 1.0 - busy)


def endpoint_weight(ep: Endpoint) -> float:
    """``ep.weight``, checked: a weight must be a finite number > 0 (the agent computes it, so
    anything else is a bug upstream, reported here with the node's name)."""
    w = ep.weight
    if not (w > 0.0 and math.isfinite(w)):
        raise ValueError(f"endpoint {ep.node!r} has weight {w!r}; weights must be finite and > 0")
    return w


class EdfScheduler:
    """Earliest-deadline-first over named entries with positive weights (see module doc)."""

    __slots__ = ("_heap", "_inv", "_now", "_seq")

    def __init__(self) -> None:
        # (deadline, sequence, node): the sequence breaks deadline ties first-in first-out.
        self._heap: list[tuple[float, int, str]] = []
        self._inv: dict[str, float] = {}  # node -> period (1 / weight)
        self._now = 0.0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, node: object) -> bool:
        return node in self._inv

    def set(self, weights: Iterable[tuple[str, float]]) -> None:
        """Replace the entries (``(node, weight)``, weight > 0); staying entries keep their
        progress, rescaled to their new weight."""
        old_deadline = {node: (deadline, seq) for deadline, seq, node in self._heap}
        old_inv = self._inv
        now = self._now
        staged: list[tuple[float, int, str]] = []
        inv: dict[str, float] = {}
        fresh = self._seq  # above every live sequence: new entries lose ties to old ones
        entries = sorted(dict(weights).items())
        newcomers = sum(1 for node, _ in entries if node not in old_deadline)
        rank = 0
        for node, weight in entries:
            if not (weight > 0.0 and math.isfinite(weight)):
                raise ValueError(f"weight of {node!r} must be finite and > 0, got {weight!r}")
            period = 1.0 / weight
            inv[node] = period
            previous = old_deadline.get(node)
            if previous is None:
                staged.append((period * (rank + 0.5) / newcomers, fresh, node))
                fresh += 1
                rank += 1
            else:
                left = max(0.0, previous[0] - now) * (period / old_inv[node])
                staged.append((left, previous[1], node))
        # Renumber the tie-breakers densely, keeping their order, so they stay small.
        staged.sort()
        self._heap = [(deadline, i, node) for i, (deadline, _, node) in enumerate(staged)]
        self._inv = inv
        self._now = 0.0
        self._seq = len(staged)

    def pick(self, exclude: frozenset[str] = frozenset()) -> str | None:
        """The next entry not in ``exclude`` (advancing its deadline), or None if there is
        none. Skipped (excluded) entries keep their place."""
        heap = self._heap
        if not heap:
            return None
        deadline, _, node = heap[0]
        if exclude and node in exclude:
            return self._pick_excluding(exclude)
        self._now = deadline
        seq = self._seq
        self._seq = seq + 1
        heapq.heapreplace(heap, (deadline + self._inv[node], seq, node))
        return node

    def _pick_excluding(self, exclude: frozenset[str]) -> str | None:
        # Pop excluded entries off the top (at most len(exclude) of them), take the first
        # eligible one, then put the excluded ones back untouched.
        heap = self._heap
        skipped: list[tuple[float, int, str]] = []
        chosen: str | None = None
        while heap:
            entry = heapq.heappop(heap)
            if entry[2] in exclude:
                skipped.append(entry)
                continue
            deadline, _, chosen = entry
            self._now = deadline
            seq = self._seq
            self._seq = seq + 1
            heapq.heappush(heap, (deadline + self._inv[chosen], seq, chosen))
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return chosen


class WeightedRoundRobin(Strategy):
    """Smooth weighted round robin over ``Endpoint.weight`` (EDF; O(log n) per pick)."""

    name = "weighted_round_robin"

    def __init__(self) -> None:
        self._edf = EdfScheduler()

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._edf.set([(ep.node, endpoint_weight(ep)) for ep in endpoints])

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        node = self._edf.pick(exclude)
        if node is None:
            raise NoEndpoint("no eligible endpoint")
        return node
