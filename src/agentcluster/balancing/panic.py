"""Panic routing and slow start (pure cores, after Envoy's load balancer).

Theory of operation -- **panic mode**. The gates (liveness, quarantine, breakers, outlier
ejection) each remove nodes that look bad. When most of the cluster looks bad at once, the
likelier story is that the *judgement* is wrong -- a shared dependency blipped, a network
hiccup tripped every breaker, a deploy slowed everyone -- and concentrating all traffic on the
few nodes still "healthy" would overload them and turn a partial outage into a full one.
Envoy's answer, used here: when the healthy fraction (eligible / known) falls below
``threshold`` (50 % by default, Envoy's default), route to *all* known nodes, ignoring health;
some requests fail, but the load stays spread and the survivors survive. With no known nodes
there is nothing to panic about; with known nodes but none eligible the gate always panics,
which beats refusing every call. ``threshold = 0`` disables panic mode.

**Slow start.** A node that joins or returns (after an ejection or an open breaker) has cold
caches, JIT, connection pools; given its full share at once it answers slowly or falls over
again. For ``window`` seconds after :meth:`SlowStart.mark_new` its weight is scaled by Envoy's
factor::

    factor = max(min_weight, time_factor ** (1 / aggression)),  time_factor = elapsed / window

``aggression = 1`` ramps linearly; larger values ramp faster early (1/aggression < 1),
smaller values hold the weight low for longer. ``min_weight`` (10 %) makes sure the node
still gets some traffic from the start, so it warms up at all. Weights change continuously
while a node ramps, and strategies rebuild their tables only on ``update``: the balancer should
re-publish weights every :attr:`SlowStart.refresh` seconds while :meth:`SlowStart.ramping`
is non-empty (the factor is piecewise constant between refreshes, which is what any table
needs anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["PanicGate", "SlowStart"]

T = TypeVar("T")


class PanicGate:
    """Decides whether to ignore health and route to every known node."""

    __slots__ = ("active", "threshold", "transitions")

    def __init__(self, threshold: float = 0.5) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be within [0, 1]")
        self.threshold = threshold
        self.active = False
        # Entries into and exits from panic, for visibility (flapping shows up here).
        self.transitions = 0

    def check(self, healthy: int, total: int) -> bool:
        """Update and return the panic state for ``healthy`` eligible of ``total`` known."""
        panic = total > 0 and healthy < self.threshold * total
        if panic != self.active:
            self.active = panic
            self.transitions += 1
        return panic

    def route_set(self, eligible: Sequence[T], known: Sequence[T]) -> Sequence[T]:
        """The set to balance over: ``known`` in panic, ``eligible`` otherwise."""
        return known if self.check(len(eligible), len(known)) else eligible


class SlowStart:
    """Ramps the weight of new and returning nodes up over ``window`` seconds."""

    __slots__ = ("_since", "aggression", "min_weight", "refresh", "window")

    def __init__(
        self,
        window: float = 30.0,
        aggression: float = 1.0,
        min_weight: float = 0.1,
        refresh: float = 1.0,
    ) -> None:
        # 30 s covers a JIT / cache / connection-pool warm-up of a typical Python service
        # without leaving capacity idle for minutes; 0 disables slow start.
        if window < 0.0 or aggression <= 0.0 or not 0.0 < min_weight <= 1.0 or refresh <= 0.0:
            raise ValueError("need window >= 0, aggression > 0, 0 < min_weight <= 1, refresh > 0")
        self.window = window
        self.aggression = aggression
        self.min_weight = min_weight
        # Re-publish weights once a second while ramping: 30 steps over the default window.
        self.refresh = refresh
        self._since: dict[str, float] = {}

    def mark_new(self, node: str, now: float) -> None:
        """``node`` joined or returned at ``now``: (re)start its ramp."""
        if self.window > 0.0:
            self._since[node] = now

    def forget(self, node: str) -> None:
        self._since.pop(node, None)

    def factor(self, node: str, now: float) -> float:
        """The multiplier of ``node``'s weight at ``now`` (1.0 once ramped)."""
        since = self._since.get(node)
        if since is None:
            return 1.0
        elapsed = now - since
        if elapsed >= self.window:
            # Ramp over: drop the entry so the hot path stays one failed dict lookup.
            del self._since[node]
            return 1.0
        time_factor = max(elapsed, 0.0) / self.window
        return max(self.min_weight, math.pow(time_factor, 1.0 / self.aggression))

    def weight(self, node: str, base: float, now: float) -> float:
        return base * self.factor(node, now)

    def ramping(self, now: float) -> list[str]:
        """Nodes still in slow start at ``now``, sorted; finished ones are forgotten."""
        done = [node for node, since in self._since.items() if now - since >= self.window]
        for node in done:
            del self._since[node]
        return sorted(self._since)

    def next_deadline(self, now: float) -> float | None:
        """When weights should next be re-published, or None when nothing ramps."""
        if not self.ramping(now):
            return None
        end = min(self._since.values()) + self.window
        return min(now + self.refresh, end)
