"""Adaptive balancing: a per-endpoint cost learned from recent outcomes.

Theory of operation: every endpoint carries three things learned from :meth:`on_start` /
:meth:`on_finish`: requests in flight, a peak-EWMA of observed latency (queueing included),
and an EWMA of its error rate. They blend into one expected cost

    ``cost = latency_estimate * (in_flight + phantoms + 1) / weight * (1 + error_weight * error_rate)``

-- the latency a new request should expect behind the ones already queued there, scaled down
for bigger nodes and up for nodes that have been failing. ``in_flight`` is ours, counted live,
plus other clients' as estimated from the node's published figure
(:func:`~agentcluster.balancing.least_connections.others_inflight`), for the reason given in
:mod:`~agentcluster.balancing.latency_aware`: a node we have not measured lately would
otherwise look cheapest however busy other clients keep it. A pick takes the cheapest endpoint:
an exact scan up to ``scan_limit`` endpoints (16 by default, a couple of microseconds), the
cheaper of two random ones (P2C) above that, which keeps the pick O(1) at 1,000 nodes.

Why a blended score rather than a bandit over base strategies: a bandit learns which
*strategy* did well, so it must keep sending some traffic through the bad arms (round robin
keeps feeding a slow node) and can only be as good as its best arm. The blended score goes for
what the arms approximate -- the expected latency of *this* request on *that* node -- and
uses every finished request as evidence about one node, not about a strategy. The exact scan
for small clusters is what lets it beat P2C peak-EWMA in the slow-node scenario: P2C sometimes
has to choose between two busy nodes while an idle one sits elsewhere.

Learning rules (continuous time, so they do not depend on the request rate):

* Latency: a sample above the estimate replaces it at once (a node that turns slow is avoided
  on its first slow answer); a lower one pulls it down with weight ``1 - exp(-dt / decay)``
  (``decay`` = 10 s by default), so one lucky fast answer does not clear a slow node.
* Errors: ``error_rate`` moves towards 1 (failure) or 0 (success) the same way with
  ``error_decay`` (10 s), and a failure is also a latency sample of at least
  ``error_penalty`` (1 s): a node that fails fast must not look like the fastest node. Under
  load that is not enough (healthy nodes with queues cost more than 1 s, and a black hole never
  has anything in flight), so a failure also counts as a *phantom* request in flight that
  fades with ``error_decay``, as in :mod:`~agentcluster.balancing.latency_aware`: a node
  failing f requests a second carries ~f * ``error_decay`` of them and stops being picked.
* Idle decay: an endpoint with nothing in flight has its estimate read as
  ``estimate * exp(-idle / decay)``, so a node shunned for being slow is probed again after a
  few seconds instead of never; a node with requests in flight does not decay (silence from a
  busy node means its requests are slow).
* A new endpoint starts at the mean estimate of the measured ones (``initial_latency`` when
  none is measured): probed at once, not flooded before its first answer comes back.

Ties (equal cost) go to the first endpoint from a scan start drawn from the caller's ``rng``,
so equal nodes share traffic and a run replays from its seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy
from agentcluster.balancing.latency_aware import positive
from agentcluster.balancing.least_connections import Seen, others_inflight, published_figures

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_ERROR_PENALTY",
    "DEFAULT_ERROR_WEIGHT",
    "DEFAULT_INITIAL_LATENCY",
    "DEFAULT_SCAN_LIMIT",
    "Adaptive",
]

DEFAULT_DECAY = 10.0
DEFAULT_ERROR_PENALTY = 1.0
DEFAULT_ERROR_WEIGHT = 4.0
DEFAULT_INITIAL_LATENCY = 0.05
DEFAULT_SCAN_LIMIT = 16


class _Stats:
    """What the balancer has learned about one node (kept across updates)."""

    __slots__ = (
        "errors",
        "estimate",
        "inflight",
        "inv_weight",
        "measured",
        "others",
        "phantom",
        "phantom_at",
        "stamp",
    )

    def __init__(self, estimate: float, stamp: float) -> None:
        self.estimate = estimate
        self.stamp = stamp  # time of the last sample (or of joining)
        self.measured = False  # False while ``estimate`` is only the prior
        self.errors = 0.0
        self.inflight = 0
        self.others = 0.0  # other clients' requests in flight there (published, estimated)
        self.inv_weight = 1.0
        self.phantom = 0.0  # failures still counted in flight, as of ``phantom_at``
        self.phantom_at = 0.0


class Adaptive(Strategy):
    """Cheapest expected latency, learned from outcomes (see the module docstring)."""

    name = "adaptive"

    __slots__ = (
        "_err_weight",
        "_initial",
        "_inv_decay",
        "_inv_err_decay",
        "_known",
        "_nodes",
        "_now",
        "_penalty",
        "_scan_limit",
        "_seen",
        "_stats",
    )

    def __init__(
        self,
        *,
        decay: float = DEFAULT_DECAY,
        error_decay: float = DEFAULT_DECAY,
        error_penalty: float = DEFAULT_ERROR_PENALTY,
        error_weight: float = DEFAULT_ERROR_WEIGHT,
        initial_latency: float = DEFAULT_INITIAL_LATENCY,
        scan_limit: int = DEFAULT_SCAN_LIMIT,
    ) -> None:
        self._inv_decay = 1.0 / positive("decay", decay)
        self._inv_err_decay = 1.0 / positive("error_decay", error_decay)
        self._penalty = positive("error_penalty", error_penalty)
        if not (error_weight >= 0.0 and math.isfinite(error_weight)):
            raise ValueError(f"error_weight must be finite and >= 0, got {error_weight!r}")
        self._err_weight = error_weight
        self._initial = positive("initial_latency", initial_latency)
        if scan_limit < 2:
            raise ValueError("scan_limit must be at least 2")
        self._scan_limit = scan_limit
        self._known: dict[str, _Stats] = {}  # every node seen, eligible or not
        self._stats: list[_Stats] = []  # the eligible ones, by node name
        self._nodes: list[str] = []
        self._seen: Seen = {}  # for others_inflight
        self._now = 0.0  # the latest time seen, to stamp nodes that join

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        weights = {e.node: e.weight for e in endpoints if e.weight > 0}
        nodes = sorted(weights)
        known = self._known
        measured = [s.estimate for s in known.values() if s.measured]
        prior = sum(measured) / len(measured) if measured else self._initial
        stats: list[_Stats] = []
        for node in nodes:
            entry = known.get(node)
            if entry is None:
                entry = known[node] = _Stats(prior, self._now)
            entry.inv_weight = 1.0 / weights[node]
            stats.append(entry)
        others, self._seen = others_inflight(
            nodes, published_figures(endpoints), [s.inflight for s in stats], self._seen
        )
        for entry, estimate in zip(stats, others, strict=True):
            entry.others = estimate
        # Forget nodes that left with nothing in flight: churn must not grow the map forever.
        eligible = set(nodes)
        for node in [n for n, s in known.items() if n not in eligible and not s.inflight]:
            del known[node]
        self._nodes = nodes
        self._stats = stats

    def cost(self, node: str, now: float) -> float:
        """The cost a pick at ``now`` would compare for ``node`` (inf if unknown)."""
        entry = self._known.get(node)
        return math.inf if entry is None else self._cost(entry, now)

    def estimate(self, node: str) -> float | None:
        """The latency estimate for ``node`` (seconds, no idle decay); None if unknown."""
        entry = self._known.get(node)
        return None if entry is None else entry.estimate

    def error_rate(self, node: str) -> float | None:
        """The error-rate EWMA for ``node`` (0..1); None if unknown."""
        entry = self._known.get(node)
        return None if entry is None else entry.errors

    def _phantoms(self, s: _Stats, now: float) -> float:
        dt = now - s.phantom_at
        left = s.phantom * math.exp(-dt * self._inv_err_decay) if dt > 0.0 else s.phantom
        if left < 0.01:  # faded: back to the plain cost
            s.phantom = 0.0
            return 0.0
        return left

    def _cost(self, s: _Stats, now: float) -> float:
        pending = s.inflight
        queue = pending + s.others + 1 + (self._phantoms(s, now) if s.phantom else 0.0)
        if pending:
            base = s.estimate * queue
        else:
            idle = now - s.stamp
            base = s.estimate * math.exp(-idle * self._inv_decay) if idle > 0.0 else s.estimate
            base *= queue
        if s.errors:
            base *= 1.0 + self._err_weight * s.errors
        return base * s.inv_weight

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        stats = self._stats
        n = len(stats)
        if n == 0:
            raise NoEndpoint("no eligible endpoint")
        nodes = self._nodes
        cost = self._cost
        if n <= self._scan_limit:
            start = int(rng.random() * n)
            best = -1
            best_cost = math.inf
            for step in range(n):
                k = start + step
                if k >= n:
                    k -= n
                if exclude and nodes[k] in exclude:
                    continue
                c = cost(stats[k], now)
                if c < best_cost or best < 0:
                    best, best_cost = k, c
            if best < 0:
                raise NoEndpoint("every eligible endpoint is excluded")
            return nodes[best]
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        if exclude and (nodes[i] in exclude or nodes[j] in exclude):
            return self._pick_excluding(rng, now, exclude)
        return nodes[i] if cost(stats[i], now) <= cost(stats[j], now) else nodes[j]

    def _pick_excluding(self, rng: random.Random, now: float, exclude: frozenset[str]) -> str:
        nodes = self._nodes
        allowed = [k for k in range(len(nodes)) if nodes[k] not in exclude]
        if not allowed:
            raise NoEndpoint("every eligible endpoint is excluded")
        if len(allowed) == 1:
            return nodes[allowed[0]]
        a = int(rng.random() * len(allowed))
        b = int(rng.random() * (len(allowed) - 1))
        if b >= a:
            b += 1
        i, j = allowed[a], allowed[b]
        stats = self._stats
        return nodes[i] if self._cost(stats[i], now) <= self._cost(stats[j], now) else nodes[j]

    def on_start(self, node: str, now: float) -> None:
        entry = self._known.get(node)
        if entry is not None:
            entry.inflight += 1
        if now > self._now:
            self._now = now

    def on_finish(self, node: str, latency: float, ok: bool, now: float) -> None:
        if now > self._now:
            self._now = now
        s = self._known.get(node)
        if s is None:
            return
        if s.inflight > 0:
            s.inflight -= 1
        # A garbled latency (NaN, negative, infinite) would poison the estimate: an error.
        if not 0.0 <= latency < math.inf:
            latency, ok = self._penalty, False
        dt = now - s.stamp
        if not ok:
            if latency < self._penalty:
                latency = self._penalty
            w = math.exp(-dt * self._inv_err_decay) if dt > 0.0 else 1.0
            s.errors = s.errors * w + (1.0 - w)
            s.phantom = (self._phantoms(s, now) if s.phantom else 0.0) + 1.0
            s.phantom_at = now
        elif s.errors:
            w = math.exp(-dt * self._inv_err_decay) if dt > 0.0 else 1.0
            s.errors *= w
            if s.errors < 1e-6:
                s.errors = 0.0
        if not s.measured or latency >= s.estimate:
            s.estimate = latency
            s.measured = True
        else:
            w = math.exp(-dt * self._inv_decay) if dt > 0.0 else 1.0
            s.estimate = s.estimate * w + latency * (1.0 - w)
        s.stamp = now
