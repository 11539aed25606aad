"""Least connections: power of two choices on in-flight requests, full scan for small sets.

Theory of operation: the strategy counts requests in flight per endpoint from ``on_start`` /
``on_finish``. With more than ``full_scan_below`` endpoints a pick draws two distinct endpoints
at random and takes the one with fewer requests in flight (Mitzenmacher's "power of two
choices": the maximum load exceeds the mean by only O(log log n), against O(log n / log log n)
for one random choice, at O(1) cost and without every balancer herding onto the same
momentarily least-loaded node). Ties go to the higher weight, then to the smaller name, so a
pick is a pure function of the state and the ``rng`` draws.

With few endpoints (default: 8 or fewer) a full scan costs about as much as the two random
draws (each ``randrange`` is a few hundred nanoseconds; eight comparisons are less) and gives
the true minimum; two random choices among three or four endpoints miss the best one often
enough to matter.

Weights only break ties here: in-flight counts correct themselves (a node that is given more
than it can take keeps its requests longer and stops winning comparisons), and slow start is
applied by the LoadBalancer agent through which endpoints it offers.

The load compared is ``own + others``: the requests this balancer has in flight there (exact
and fresh) plus other clients' requests, estimated from the node's own published figure
(``Endpoint.in_flight``) by :func:`others_inflight`. A node kept busy by other clients thus
loses comparisons even when this balancer has sent it nothing. Ties on that load go to the
higher weight, as before.

Excluded endpoints (a retry's earlier attempts) are handled without touching all ``n``: up to
four random draws per candidate, then, only if those all hit excluded nodes, one scan of the
eligible ones. :func:`draw_two` implements that and is shared with the peak-EWMA strategy.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from agentcluster.balancing.base import (
    Endpoint,
    NoEndpoint,
    PickRequest,
    Strategy,
    published_inflight,
)
from agentcluster.balancing.weighted import endpoint_weight

__all__ = [
    "DEFAULT_FULL_SCAN_BELOW",
    "LeastConnections",
    "Seen",
    "draw_two",
    "others_inflight",
    "published_figures",
]

DEFAULT_FULL_SCAN_BELOW = 8
_INF = float("inf")
_DRAWS = 4  # random draws per candidate before falling back to a scan when excluding


def draw_two(nodes: Sequence[str], rng: random.Random, exclude: frozenset[str]) -> tuple[int, int]:
    """Two distinct random indexes into ``nodes`` whose names are not in ``exclude``; the
    second is -1 when only one node is eligible. Raises :class:`NoEndpoint` when none is."""
    n = len(nodes)
    if n == 0:
        raise NoEndpoint("no eligible endpoint")
    if not exclude:
        if n == 1:
            return 0, -1
        i = rng.randrange(n)
        j = rng.randrange(n - 1)
        return i, j + 1 if j >= i else j
    i = -1
    for _ in range(_DRAWS):
        k = rng.randrange(n)
        if nodes[k] not in exclude:
            i = k
            break
    if i >= 0:
        for _ in range(_DRAWS):
            k = rng.randrange(n)
            if k != i and nodes[k] not in exclude:
                return i, k
    # Most nodes are excluded (or we were unlucky): choose among the eligible ones.
    eligible = [k for k in range(n) if nodes[k] not in exclude]
    if not eligible:
        raise NoEndpoint("every endpoint is excluded")
    if len(eligible) == 1:
        return eligible[0], -1
    a = rng.randrange(len(eligible))
    b = rng.randrange(len(eligible) - 1)
    return eligible[a], eligible[b + 1 if b >= a else b]


def carry_inflight(
    old_index: dict[str, int], old: list[int], ghost: dict[str, int], nodes: list[str]
) -> tuple[list[int], dict[str, int]]:
    """The in-flight counts of ``nodes`` after an update, and the new ``ghost`` map: a node that
    stays keeps its count; one that leaves with requests in flight (its breaker opened, it was
    ejected) keeps them aside until they finish or it comes back -- else it would return
    looking idle while its old requests are still running, and win every pick."""
    carried = dict(ghost)
    for node, k in old_index.items():
        if old[k]:
            carried[node] = old[k]
    return [carried.pop(node, 0) for node in nodes], carried


Seen = dict[str, tuple[float, int, float]]
"""What :func:`others_inflight` remembers per node: ``(figure, report, estimate)``."""


def published_figures(endpoints: Sequence[Endpoint]) -> dict[str, tuple[float, int]]:
    """Each endpoint's published in-flight figure (checked) and the number of the report it
    comes from, for those that publish a figure."""
    out: dict[str, tuple[float, int]] = {}
    for ep in endpoints:
        f = ep.in_flight
        if f.__class__ is float:  # the usual case, checked inline: this runs per update
            if 0.0 < f < _INF:
                out[ep.node] = (f, ep.load_report)
        elif g := published_inflight(f):
            out[ep.node] = (g, ep.load_report)
    return out


def others_inflight(
    nodes: Sequence[str],
    published: Mapping[str, tuple[float, int]],
    own: Sequence[int],
    seen: Mapping[str, tuple[float, int, float]],
) -> tuple[list[float], Seen]:
    """Other clients' requests in flight on each of ``nodes`` (``own``: this balancer's live
    counts, aligned with ``nodes``; ``published``: the nodes' figures and report numbers),
    and the new ``seen`` map, to pass back at the next update.

    Strategies compare ``own + others``. A node's figure counts our own calls too, as they
    were when it reported -- a number we cannot know -- so ``others`` is the figure minus our
    count when the report *arrives* (never below 0): our count has moved since the report by
    at most a report period's worth of our own churn, which bounds the error. The estimate is
    then kept until the node's next report: subtracting a later count from the same report
    would turn our finished calls into phantom load (10 published, all ours, all finished
    since: 10 "other" calls that do not exist). A new report re-bases it even when its figure
    is the same, since the calls behind one total may have changed hands (ours finished,
    another client's took their place); a node re-reports at least every few periods, so no
    estimate outlives that. A node that reports nothing has no others.

    Why not ``max(own, published)``: while the figure is above our count, our own sends to
    the node would not move its load for a whole report period, so P2C would lose the fresh
    feedback that keeps it from herding onto whichever node reported lowest; and once our
    count passed the figure, the other clients' calls would drop out of the comparison. With
    ``own + others`` our sends count at once and theirs are never forgotten."""
    others: list[float] = []
    kept: Seen = {}
    for node, mine in zip(nodes, own, strict=True):
        pub = published.get(node)
        if pub is None:
            others.append(0.0)
            continue
        figure, report = pub
        before = seen.get(node)
        if before is not None and before[0] == figure and before[1] == report:
            estimate = before[2]
        else:
            estimate = figure - mine if figure > mine else 0.0
        others.append(estimate)
        kept[node] = (figure, report, estimate)
    return others, kept


def ghost_finished(ghost: dict[str, int], node: str) -> None:
    """A request to ``node``, which is not in the set now, finished."""
    left = ghost.get(node, 0) - 1
    if left > 0:
        ghost[node] = left
    else:
        ghost.pop(node, None)  # never negative; the map stays the size of what is in flight


class LeastConnections(Strategy):
    """Fewest requests in flight: P2C above ``full_scan_below`` endpoints, a scan below."""

    name = "least_connections"

    def __init__(self, full_scan_below: int = DEFAULT_FULL_SCAN_BELOW) -> None:
        if full_scan_below < 0:
            raise ValueError(f"full_scan_below must be >= 0, got {full_scan_below}")
        self._full_scan_below = full_scan_below
        self._nodes: list[str] = []  # sorted by name
        self._weights: list[float] = []
        self._inflight: list[int] = []
        self._others: list[float] = []  # other clients' in flight (others_inflight)
        self._seen: Seen = {}
        self._index: dict[str, int] = {}
        self._ghost: dict[str, int] = {}  # in flight to nodes not in the set (carry_inflight)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        by_node = {ep.node: endpoint_weight(ep) for ep in endpoints}
        nodes = sorted(by_node)
        self._inflight, self._ghost = carry_inflight(
            self._index, self._inflight, self._ghost, nodes
        )
        self._others, self._seen = others_inflight(
            nodes, published_figures(endpoints), self._inflight, self._seen
        )
        self._nodes = nodes
        self._weights = [by_node[node] for node in nodes]
        self._index = {node: i for i, node in enumerate(nodes)}

    def inflight(self, node: str) -> int:
        """Requests in flight to ``node`` as counted here (0 for an unknown node)."""
        i = self._index.get(node)
        return 0 if i is None else self._inflight[i]

    def load(self, node: str) -> float:
        """The load a pick compares for ``node``: ours in flight plus other clients' (0 for
        an unknown node)."""
        i = self._index.get(node)
        return 0.0 if i is None else self._inflight[i] + self._others[i]

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        nodes = self._nodes
        if len(nodes) <= self._full_scan_below:
            return self._scan(exclude, rng.randrange(len(nodes)) if nodes else 0)
        i, j = draw_two(nodes, rng, exclude)
        if j < 0:
            return nodes[i]
        own, others = self._inflight, self._others
        li, lj = own[i] + others[i], own[j] + others[j]
        if li != lj:
            return nodes[i] if li < lj else nodes[j]
        wi, wj = self._weights[i], self._weights[j]
        if wi != wj:
            return nodes[i] if wi > wj else nodes[j]
        return nodes[i]  # i is a random draw: a random tie-break, so equals share the load

    def _scan(self, exclude: frozenset[str], start: int) -> str:
        nodes, own, others, weights = self._nodes, self._inflight, self._others, self._weights
        best = -1
        best_load = 0.0
        n = len(nodes)
        # From a random start, so exact ties (an idle cluster) do not all go to one node.
        for step in range(n):
            k = (start + step) % n
            if exclude and nodes[k] in exclude:
                continue
            load = own[k] + others[k]
            if best < 0 or load < best_load or (load == best_load and weights[k] > weights[best]):
                best, best_load = k, load
        if best < 0:
            raise NoEndpoint("no eligible endpoint" if not nodes else "every endpoint is excluded")
        return nodes[best]

    def on_start(self, node: str, now: float) -> None:
        i = self._index.get(node)
        if i is not None:
            self._inflight[i] += 1

    def on_finish(self, node: str, latency: float, ok: bool, now: float) -> None:
        i = self._index.get(node)
        if i is None:
            ghost_finished(self._ghost, node)
        elif self._inflight[i] > 0:  # a finish we never saw start (a restart): never negative
            self._inflight[i] -= 1
