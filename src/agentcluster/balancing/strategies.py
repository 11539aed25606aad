"""The strategy registry: balancing strategies by name, for configuration and the bench.

Theory of operation: :data:`STRATEGIES` is a plain dict from a strategy's ``name`` to its
class, the one place that knows every name (session affinity wraps another strategy, so it
is built in code, not by name). :func:`make_strategy` builds one with keyword options and fails with a
clear message (listing the known names) for an unknown one.
"""

from __future__ import annotations

from typing import Any

from agentcluster.balancing.adaptive import Adaptive
from agentcluster.balancing.base import Strategy
from agentcluster.balancing.bounded_load import BoundedLoad
from agentcluster.balancing.capacity_aware import CapacityAware
from agentcluster.balancing.geographic import Geographic
from agentcluster.balancing.latency_aware import PeakEwma
from agentcluster.balancing.least_connections import LeastConnections
from agentcluster.balancing.maglev import Maglev
from agentcluster.balancing.round_robin import RoundRobin
from agentcluster.balancing.weighted import WeightedRoundRobin

__all__ = ["STRATEGIES", "UnknownStrategy", "make_strategy"]


class UnknownStrategy(ValueError):
    """No strategy is registered under that name."""


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        WeightedRoundRobin,
        LeastConnections,
        PeakEwma,
        CapacityAware,
        Geographic,
        Maglev,
        BoundedLoad,
        Adaptive,
    )
}


def make_strategy(name: str, **options: Any) -> Strategy:
    """A new strategy ``name`` built with ``options`` (its constructor's keyword arguments)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        known = ", ".join(sorted(STRATEGIES))
        raise UnknownStrategy(f"unknown balancing strategy {name!r}; known: {known}")
    return cls(**options)
