"""Plain round robin.

Theory of operation: the endpoints are kept sorted by name (so the cycle does not depend on
the order ``update`` received them in) and a cursor walks them. The cursor starts at a random
place, drawn from the caller's ``rng`` on the first pick, so balancers on different nodes do
not all send their first request to the same node; from then on the cycle is exact: ``n``
picks visit each endpoint once. Excluded endpoints are stepped over (at most
``len(exclude)`` steps). On ``update`` the cursor continues from the node it would have
visited next when that node stays; otherwise from the same position modulo the new size.
Weights, load and feedback are ignored (that is the point of this strategy).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy

__all__ = ["RoundRobin"]


class RoundRobin(Strategy):
    """Round robin in node-name order from a random start."""

    name = "round_robin"

    def __init__(self) -> None:
        self._nodes: list[str] = []
        self._next = -1  # -1: not started (the first pick draws a random start)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        nodes = sorted({ep.node for ep in endpoints})
        if self._next >= 0 and self._nodes and nodes:
            # Resume at the node that was due next, or at the first name after it.
            due = self._nodes[self._next % len(self._nodes)]
            self._next = bisect.bisect_left(nodes, due) % len(nodes)
        self._nodes = nodes

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        nodes = self._nodes
        n = len(nodes)
        if n == 0:
            raise NoEndpoint("no eligible endpoint")
        i = self._next
        if i < 0:
            i = rng.randrange(n)
        node = nodes[i % n]
        if exclude:
            for _ in range(n):
                if node not in exclude:
                    break
                i += 1
                node = nodes[i % n]
            else:
                raise NoEndpoint("every endpoint is excluded")
        self._next = (i + 1) % n
        return node
