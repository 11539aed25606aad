"""Capacity aware: shares proportional to free capacity from CPU, memory and network reports.

Theory of operation: each endpoint's load report (``cpu``, ``memory``, ``network``, fractions
of capacity carried with the node's metadata) becomes a score

    score = 1 - (w_cpu * cpu + w_mem * memory + w_net * network)

with the design's default weights 0.4 / 0.3 / 0.3 (configurable; they are checked and
normalised to sum to 1, so the score stays in [0, 1]). The score is floored at ``min_score``
(default 0.02) so that no node is starved completely: a saturated node still receives a
trickle, which keeps its latency and its next reports observable. Each endpoint's share of
picks is proportional to ``score * weight`` (``weight`` carries slow start and relative
size), scheduled smoothly by the EDF scheduler of :mod:`agentcluster.balancing.weighted`:
O(log n) per pick, no bursts. Reports are read in ``update`` only (the LoadBalancer agent calls
it when reports change); picks never recompute a score. Report values outside [0, 1] are
clamped and a garbled (NaN) value counts as fully loaded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy
from agentcluster.balancing.weighted import EdfScheduler, clamp_fraction, endpoint_weight

__all__ = ["CapacityAware"]


class CapacityAware(Strategy):
    """Smooth weighted picks with weights ``capacity score * Endpoint.weight``."""

    name = "capacity_aware"

    def __init__(
        self,
        cpu_weight: float = 0.4,
        memory_weight: float = 0.3,
        network_weight: float = 0.3,
        min_score: float = 0.02,
    ) -> None:
        parts = {"cpu_weight": cpu_weight, "memory_weight": memory_weight}
        parts["network_weight"] = network_weight
        for key, value in parts.items():
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{key} must be finite and >= 0, got {value!r}")
        total = cpu_weight + memory_weight + network_weight
        if total <= 0.0:
            raise ValueError("cpu_weight + memory_weight + network_weight must be > 0")
        if not (0.0 < min_score <= 1.0):
            raise ValueError(f"min_score must be in (0, 1], got {min_score!r}")
        self.cpu_weight = cpu_weight / total
        self.memory_weight = memory_weight / total
        self.network_weight = network_weight / total
        self.min_score = min_score
        self._edf = EdfScheduler()

    def score(self, ep: Endpoint) -> float:
        """The free-capacity score of ``ep`` in [min_score, 1]."""
        used = (
            self.cpu_weight * clamp_fraction(ep.cpu)
            + self.memory_weight * clamp_fraction(ep.memory)
            + self.network_weight * clamp_fraction(ep.network)
        )
        return max(self.min_score, 1.0 - used)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._edf.set([(ep.node, self.score(ep) * endpoint_weight(ep)) for ep in endpoints])

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
