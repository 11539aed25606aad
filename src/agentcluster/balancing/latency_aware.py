"""Latency aware: power of two choices over a peak-EWMA latency cost (Finagle, linkerd, tower).

Theory of operation: each endpoint keeps a latency estimate ``ewma`` (seconds) and a count of
requests in flight. Its cost is ``ewma * (in_flight + 1) / weight``: the latency a new request
should expect if it queues behind the ones already there, scaled down for bigger nodes (so
slow start and capacity weights still apply). A pick draws two distinct endpoints at random
and takes the cheaper one (ties: higher weight, then smaller name); with few endpoints
(``full_scan_below``, default 8) it scans them all, as least connections does.

The estimate is a *peak* EWMA in continuous time. A sample ``r`` observed ``dt`` seconds
after the previous one:

* if ``r`` is higher than the estimate, the estimate jumps to ``r`` at once (a node that turns
  slow is avoided on its first slow answer, not after a dozen);
* otherwise it moves towards ``r`` with weight ``1 - exp(-dt / decay)``: recovery is judged
  over ``decay`` seconds of evidence (default 10 s, the time constant Finagle and linkerd use),
  however many requests that is, so one fast answer does not wipe out a recent stall.

Errors are samples too: a failed request counts as ``max(latency, error_penalty)`` (default
1 s), so a node that fails fast -- the classic black hole, answering every call with an
instant error -- looks slow instead of looking like the fastest node in the cluster. That
alone is not enough under load: a healthy node with ten requests queued at 0.2 s costs 2.2 s,
more than a black hole's 1 s, and the black hole never has anything in flight. So a failure
also stays *in flight* after it returned, as a phantom request that fades with the same time
constant (``phantoms``): a node failing f requests a second carries ~f * ``decay`` phantoms,
its cost climbs until it stops being picked, and it is probed again as they fade. A node
that fails now and then carries a phantom or two, like a slightly busier node.

An *idle* endpoint's estimate decays towards zero between samples with the same time constant
(as Finagle and tower read it): a node that stopped getting traffic because it was slow is
probed again after a few ``decay`` periods instead of being shunned forever. An endpoint with
requests in flight does not decay: silence from a busy node means its requests are slow, and a
node that hangs must never start to look fast.

The requests in flight are ``own + others``: ours, counted live, plus other clients' as
estimated from the node's published figure
(:func:`~agentcluster.balancing.least_connections.others_inflight`). The latency estimate
already carries other clients' queueing -- but only from answers we got, and not at all for a
node we have not measured, or have not used for a while (its estimate decayed): without the
figure such a node looks cheapest and takes a burst from us before the first slow answer
comes back. The cost counts queued requests alike whoever sent them, as it already does for
ours (whose queueing is in the estimate too). Only our own requests stop the idle decay:
silence means something only about requests we are waiting for.

A fresh endpoint starts from a prior, replaced outright by its first real sample. The default
prior is an EWMA of the latest samples of every endpoint (0.1 s before the first one), read at
pick time: the new node costs what an average answer costs right now, so it is probed at once
and takes requests until its in-flight count is about the others' -- probed, not flooded. A
fixed ``initial_latency`` overrides that.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy
from agentcluster.balancing.least_connections import (
    DEFAULT_FULL_SCAN_BELOW,
    Seen,
    carry_inflight,
    draw_two,
    ghost_finished,
    others_inflight,
    published_figures,
)
from agentcluster.balancing.weighted import endpoint_weight

__all__ = [
    "DEFAULT_DECAY",
    "DEFAULT_ERROR_PENALTY",
    "DEFAULT_INITIAL_LATENCY",
    "PeakEwma",
    "positive",
]

DEFAULT_DECAY = 10.0
DEFAULT_ERROR_PENALTY = 1.0
DEFAULT_INITIAL_LATENCY = 0.1  # the prior when no endpoint has been measured yet
_PRIOR_ALPHA = 0.1  # the prior is an EWMA over the last ~10 samples of any endpoint
_OPTIMISM = 0.9  # an unmeasured endpoint looks this much cheaper than the prior


def positive(name: str, value: float) -> float:
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


class PeakEwma(Strategy):
    """P2C over ``peak_ewma_latency * (in_flight + 1) / weight`` (see the module doc)."""

    name = "latency_aware"

    def __init__(
        self,
        decay: float = DEFAULT_DECAY,
        initial_latency: float | None = None,
        error_penalty: float = DEFAULT_ERROR_PENALTY,
        full_scan_below: int = DEFAULT_FULL_SCAN_BELOW,
    ) -> None:
        self._inv_decay = 1.0 / positive("decay", decay)
        self._initial = (
            None if initial_latency is None else positive("initial_latency", initial_latency)
        )
        self._penalty = positive("error_penalty", error_penalty)
        if full_scan_below < 0:
            raise ValueError(f"full_scan_below must be >= 0, got {full_scan_below}")
        self._full_scan_below = full_scan_below
        # Parallel lists indexed like ``_nodes`` (sorted names): cheaper than an object each.
        self._nodes: list[str] = []
        self._index: dict[str, int] = {}
        self._inv_weight: list[float] = []
        self._ewma: list[float] = []
        self._stamp: list[float] = []  # time of the last sample; NaN: not seen yet
        self._measured: list[bool] = []  # False while ``_ewma`` is still the prior
        self._inflight: list[int] = []
        self._others: list[float] = []  # other clients' in flight (others_inflight)
        self._seen: Seen = {}
        # Failures still counted in flight (module doc), as of ``_phantom_at``; 0.0: none.
        self._phantom: list[float] = []
        self._phantom_at: list[float] = []
        self._ghost: dict[str, int] = {}  # in flight to nodes not in the set (carry_inflight)
        self._prior = DEFAULT_INITIAL_LATENCY if initial_latency is None else initial_latency
        self._samples = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        by_node = {ep.node: endpoint_weight(ep) for ep in endpoints}
        nodes = sorted(by_node)
        prior = self._initial
        if prior is None:
            measured = [e for e, m in zip(self._ewma, self._measured, strict=True) if m]
            prior = sum(measured) / len(measured) if measured else DEFAULT_INITIAL_LATENCY
        old = self._index
        ewma: list[float] = []
        stamp: list[float] = []
        flags: list[bool] = []
        phantom: list[float] = []
        phantom_at: list[float] = []
        for node in nodes:
            k = old.get(node)
            if k is None:
                ewma.append(prior)
                stamp.append(math.nan)
                flags.append(False)
                phantom.append(0.0)
                phantom_at.append(0.0)
            else:
                ewma.append(self._ewma[k])
                stamp.append(self._stamp[k])
                flags.append(self._measured[k])
                phantom.append(self._phantom[k])
                phantom_at.append(self._phantom_at[k])
        self._phantom, self._phantom_at = phantom, phantom_at
        inflight, self._ghost = carry_inflight(old, self._inflight, self._ghost, nodes)
        self._others, self._seen = others_inflight(
            nodes, published_figures(endpoints), inflight, self._seen
        )
        self._nodes = nodes
        self._index = {node: i for i, node in enumerate(nodes)}
        self._inv_weight = [1.0 / by_node[node] for node in nodes]
        self._ewma, self._stamp, self._measured, self._inflight = ewma, stamp, flags, inflight

    def _cost(self, i: int, now: float) -> float:
        pending = self._inflight[i]
        # Queue factor: the requests in flight (ours and other clients'), the phantoms of
        # recent failures, this one.
        queue = (
            pending + self._others[i] + 1 + (self._phantoms(i, now) if self._phantom[i] else 0.0)
        )
        if not self._measured[i] and self._initial is None:
            # Not measured yet: it costs what the cluster's answers cost right now (a prior
            # fixed at update time goes stale: a new node would be shunned, or flooded), a
            # little less, so it is tried before equal measured nodes; one request in flight
            # already doubles its cost, so it is probed, not flooded.
            return _OPTIMISM * self._prior * queue * self._inv_weight[i]
        if pending:
            return self._ewma[i] * queue * self._inv_weight[i]
        dt = now - self._stamp[i]
        if dt > 0.0:
            return self._ewma[i] * math.exp(-dt * self._inv_decay) * queue * self._inv_weight[i]
        if dt != dt:  # never seen: the idle decay starts now
            self._stamp[i] = now
        return self._ewma[i] * queue * self._inv_weight[i]

    def _phantoms(self, i: int, now: float) -> float:
        """Recent failures of endpoint ``i`` still counted in flight at ``now``."""
        dt = now - self._phantom_at[i]
        left = self._phantom[i] * math.exp(-dt * self._inv_decay) if dt > 0.0 else self._phantom[i]
        if left < 0.01:  # faded: back to the plain cost (and its fast path)
            self._phantom[i] = 0.0
            return 0.0
        return left

    def cost(self, node: str, now: float) -> float:
        """The cost a pick at ``now`` compares for ``node`` (inf for an unknown node)."""
        i = self._index.get(node)
        return math.inf if i is None else self._cost(i, now)

    def estimate(self, node: str) -> float | None:
        """The latency estimate (seconds) for ``node``, without idle decay; None if unknown."""
        i = self._index.get(node)
        return None if i is None else self._ewma[i]

    def inflight(self, node: str) -> int:
        """Requests in flight to ``node`` as counted here (0 for an unknown node)."""
        i = self._index.get(node)
        return 0 if i is None else self._inflight[i]

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        nodes = self._nodes
        if len(nodes) <= self._full_scan_below:
            return self._scan(now, exclude, rng.randrange(len(nodes)) if nodes else 0)
        i, j = draw_two(nodes, rng, exclude)
        if j < 0:
            return nodes[i]
        ci, cj = self._cost(i, now), self._cost(j, now)
        if ci != cj:
            return nodes[i] if ci < cj else nodes[j]
        wi, wj = self._inv_weight[i], self._inv_weight[j]
        if wi != wj:
            return nodes[i] if wi < wj else nodes[j]
        return nodes[i]  # i is a random draw: a random tie-break, so equals share the load

    def _scan(self, now: float, exclude: frozenset[str], start: int) -> str:
        nodes = self._nodes
        best = -1
        best_cost = math.inf
        n = len(nodes)
        # From a random start, so exact ties (equal estimates) do not all go to one node.
        for step in range(n):
            k = (start + step) % n
            if exclude and nodes[k] in exclude:
                continue
            c = self._cost(k, now)
            if (
                best < 0
                or c < best_cost
                or (c == best_cost and self._inv_weight[k] < self._inv_weight[best])
            ):
                best, best_cost = k, c
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
            return
        if self._inflight[i] > 0:
            self._inflight[i] -= 1
        # A garbled latency (NaN, negative, infinite) would poison the estimate for good: count
        # it as an error instead.
        garbled = not 0.0 <= latency < math.inf
        sample = self._penalty if garbled else latency
        if garbled or not ok:
            if sample < self._penalty:
                sample = self._penalty
            self._phantom[i] = (self._phantoms(i, now) if self._phantom[i] else 0.0) + 1.0
            self._phantom_at[i] = now
        self._observe(i, sample, now)

    def _observe(self, i: int, sample: float, now: float) -> None:
        # The prior for unmeasured endpoints follows recent samples cluster-wide (the first
        # sample replaces the default outright, as it does for an endpoint's own estimate).
        if self._samples:
            self._prior += _PRIOR_ALPHA * (sample - self._prior)
        else:
            self._prior = sample
        self._samples += 1
        current = self._ewma[i]
        if not self._measured[i] or sample >= current:
            self._ewma[i] = sample
            self._measured[i] = True
        else:
            dt = now - self._stamp[i]
            w = math.exp(-dt * self._inv_decay) if dt > 0.0 else 1.0
            self._ewma[i] = current * w + sample * (1.0 - w)
        self._stamp[i] = now
