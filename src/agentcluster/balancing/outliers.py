"""Outlier detection and ejection (pure core, after Envoy's outlier detection).

Theory of operation: where a circuit breaker asks "is this node failing?", outlier detection
asks "is this node worse than its peers?" and takes it out of rotation for a while. Three
detectors feed one ejection mechanism:

* **consecutive errors** -- the ``consecutive_errors``-th failure in a row ejects the node at
  once, on the :meth:`OutlierDetector.record` call that sees it. At 100 rps a node that starts
  failing every call is out after 5 failures, ~40-50 ms (see :func:`eject_time_scenario`).
* **success rate** -- every ``interval`` seconds (:meth:`OutlierDetector.tick`), among nodes with
  at least ``min_requests`` outcomes in the interval, and only when there are ``min_hosts`` such
  nodes, a node whose success rate is below ``mean - stdev_factor * stdev`` is ejected (1.9
  standard deviations is Envoy's default: about 3 % of a normal population, so a healthy
  cluster rarely loses a node to noise) -- and below ``success_rate_floor`` (95 %): when every
  peer is perfect the stdev is tiny, and one failure in 50 calls is not a sick node.
* **latency** -- in the same pass, a node whose mean latency over the interval exceeds
  ``latency_factor`` times the cluster median (and the absolute ``latency_floor``) is ejected;
  the median, unlike the mean, is not dragged up by the slow node itself. Mean rather than p50
  keeps the per-request cost at one addition; the minimum volume tames its sensitivity to a few
  slow calls. Needs ``latency_min_hosts`` nodes with enough volume (a median of three already
  tolerates one bad node).

**Ejection cap.** With ``n`` known nodes at most ``max_ejected(n)`` may be ejected at a time::

    max_ejected(n) = min(n - 1, floor(n * pct / 100))   (0 when n < 2)

that is: the share ``pct`` is never exceeded, in small clusters too, and the last node is never
ejected (ejecting every node routes nowhere; panic mode is the tool for "everything looks
bad"). The default share is 50 % -- one node of two or three, where one bad node hurts most
(Envoy's 10 % would forbid any ejection under ten nodes, or, with Envoy's "at least one" rule,
take 50 % of a two-node cluster while claiming 10 %), five of ten; beyond half the cluster the
balancer's panic mode (also at 50 %) takes over anyway. ``pct = 0`` turns ejection off. With
the default: n = 1 -> 0, n = 2 -> 1, n = 3 -> 1, n = 10 -> 5, n = 25 -> 12. The bound holds at
all times: an ejection that would exceed it is skipped and counted (``skipped_cap``); when
several nodes qualify in one pass the worst go first (lowest success rate, highest latency; ties
by name); and when nodes leave so that the cap falls below the number ejected, the nodes due
back soonest return at once (:meth:`OutlierDetector.remove`).

**Ejection time** is ``base_ejection * k`` for the node's k-th ejection, capped at
``max_ejection``, with +/- ``jitter`` from the caller's rng so returns are spread out; like the
breaker, the nominal time is capped at ``max_ejection / (1 + jitter)`` so the jittered time
never exceeds the cap. As in Envoy, ``k`` decays by one for every interval the node spends in
rotation, so a node that failed once long ago starts again from ``base_ejection``.

Outcomes of an ejected node (replies still in flight when it was ejected) are ignored, and its
counters restart when it returns. Returns happen lazily in :meth:`~OutlierDetector.record` and
:meth:`~OutlierDetector.tick`; :meth:`~OutlierDetector.next_deadline` says when to tick.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = [
    "OutlierConfig",
    "OutlierDetector",
    "OutlierEvent",
    "eject_time_scenario",
    "max_ejected",
]


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Outlier detection tuning; times in seconds."""

    # Envoy's default: a streak of five is far beyond what independent errors produce at any
    # sane error rate (0.05**5 ~ 3e-7), yet cuts a dead node off in 5 calls.
    consecutive_errors: int = 5
    # Envoy's default analysis period: enough volume per node for a rate to mean something.
    interval: float = 10.0
    # First ejection lasts 30 s (Envoy's default), each further one 30 s more ...
    base_ejection: float = 30.0
    # ... up to five minutes (Envoy's max_ejection_time), so a flapping node is still retried.
    max_ejection: float = 300.0
    # Spread returns of nodes ejected together (a shared dependency failed) by +/- 20 %.
    jitter: float = 0.2
    # Half the cluster at most (one node of two or three): see the module docstring.
    max_ejection_percent: float = 50.0
    # Envoy's default (1900 / 1000).
    stdev_factor: float = 1.9
    # 50 outcomes per interval: a node at 5 rps qualifies (Envoy's 100 needs 10 rps), and the
    # standard error of a 95 % success rate over 50 calls is ~3 %, small against the gaps
    # stdev_factor looks for.
    min_requests: int = 50
    # Envoy's default: mean and stdev over fewer hosts are too easily dominated by one of them.
    min_hosts: int = 5
    # A success rate of 95 % or more is never an outlier (the design's error-rate threshold is
    # 5 %): against perfect peers the stdev is tiny, and Envoy's pure rule would eject a node
    # for a single failure in 50 calls.
    success_rate_floor: float = 0.95
    # 3x the median latency is far outside normal spread between identical nodes.
    latency_factor: float = 3.0
    # Latencies under 5 ms are not worth an ejection even at 3x the median (sub-ms noise).
    latency_floor: float = 0.005
    # A median of three is robust to one slow node.
    latency_min_hosts: int = 3

    def __post_init__(self) -> None:
        if self.consecutive_errors < 1 or self.min_requests < 1:
            raise ValueError("consecutive_errors and min_requests must be >= 1")
        if self.min_hosts < 2 or self.latency_min_hosts < 2:
            raise ValueError("min_hosts and latency_min_hosts must be >= 2")
        if not (self.interval > 0.0 and 0.0 < self.base_ejection <= self.max_ejection):
            raise ValueError("need interval > 0 and 0 < base_ejection <= max_ejection")
        if not (0.0 <= self.jitter < 1.0 and 0.0 <= self.max_ejection_percent <= 100.0):
            raise ValueError("need 0 <= jitter < 1 and 0 <= max_ejection_percent <= 100")
        if not 0.0 <= self.success_rate_floor <= 1.0:
            raise ValueError("need 0 <= success_rate_floor <= 1")
        if not (self.stdev_factor > 0.0 and self.latency_factor > 1.0):
            raise ValueError("need stdev_factor > 0 and latency_factor > 1")


_DEFAULT = OutlierConfig()


class OutlierEvent(msgspec.Struct, frozen=True):
    """``kind`` is "eject" (with ``reason`` and ``until``) or "return"."""

    node: str
    kind: str
    reason: str
    at: float
    until: float = 0.0
    times: int = 0  # the node's ejection multiplier after this event


def max_ejected(n: int, percent: float) -> int:
    """How many of ``n`` known nodes may be ejected at once (module docstring)."""
    if n < 2:
        return 0
    # A tiny epsilon so 10 % of 30 nodes is 3, not 2.9999999999999996 -> 2.
    by_percent = math.floor(n * percent / 100.0 + 1e-9)
    return min(n - 1, by_percent)


class _Host:
    __slots__ = (
        "consecutive",
        "ejected_until",
        "latency_sum",
        "ok",
        "returned_at",
        "times",
        "total",
    )

    def __init__(self) -> None:
        self.consecutive = 0
        self.ok = 0
        self.total = 0
        self.latency_sum = 0.0
        self.times = 0
        self.ejected_until = 0.0  # 0.0: in rotation
        self.returned_at = -math.inf

    def clear_interval(self) -> None:
        self.ok = 0
        self.total = 0
        self.latency_sum = 0.0


class OutlierDetector:
    """Ejects nodes that fail in a row or are outliers against the cluster."""

    __slots__ = (
        "_earliest_return",
        "_ejected",
        "_hosts",
        "_next_analysis",
        "_pending_returns",
        "_rng",
        "config",
        "skipped_cap",
        "total_ejections",
    )

    def __init__(
        self, rng: random.Random, config: OutlierConfig = _DEFAULT, now: float = 0.0
    ) -> None:
        self.config = config
        self._rng = rng
        self._hosts: dict[str, _Host] = {}
        self._ejected: dict[str, float] = {}  # node -> ejected until
        self._earliest_return = math.inf
        self._next_analysis = now + config.interval
        # Returns applied inside record(), reported by the next tick().
        self._pending_returns: list[OutlierEvent] = []
        self.skipped_cap = 0
        self.total_ejections = 0

    # -- membership ----------------------------------------------------------------------------

    def add(self, node: str) -> None:
        if node not in self._hosts:
            self._hosts[node] = _Host()

    def remove(self, node: str, now: float) -> None:
        """Forget ``node``. With fewer nodes the cap may fall below the number ejected: the
        nodes due back soonest then return at ``now`` (reported by the next :meth:`tick`)."""
        self._hosts.pop(node, None)
        if self._ejected.pop(node, None) is not None:
            self._recompute_earliest()
        excess = len(self._ejected) - self.max_ejected()
        if excess > 0:
            soonest = sorted(self._ejected, key=lambda n: (self._ejected[n], n))[:excess]
            self._pending_returns.extend(self._return(soonest, now, "cap_shrank"))

    def __contains__(self, node: object) -> bool:
        return node in self._hosts

    def __len__(self) -> int:
        return len(self._hosts)

    # -- queries -------------------------------------------------------------------------------

    def is_ejected(self, node: str) -> bool:
        """Ejected as of the last :meth:`record` / :meth:`tick` (returns are applied there)."""
        return node in self._ejected

    def ejected(self) -> list[str]:
        return sorted(self._ejected)

    def max_ejected(self) -> int:
        return max_ejected(len(self._hosts), self.config.max_ejection_percent)

    def next_deadline(self) -> float:
        """When :meth:`tick` next has work: an analysis pass or a return."""
        return min(self._next_analysis, self._earliest_return)

    def snapshot(self) -> list[dict[str, Any]]:
        """Plain data for ``agentcluster routes``, sorted by node."""
        out: list[dict[str, Any]] = []
        for node in sorted(self._hosts):
            h = self._hosts[node]
            out.append(
                {
                    "node": node,
                    "ejected": node in self._ejected,
                    "ejected_until": self._ejected.get(node),
                    "times": h.times,
                    "consecutive_errors": h.consecutive,
                    "interval_requests": h.total,
                    "interval_success_rate": (h.ok / h.total) if h.total else None,
                }
            )
        return out

    # -- inputs --------------------------------------------------------------------------------

    def record(self, node: str, ok: bool, latency: float, now: float) -> OutlierEvent | None:
        """Record one outcome; an ejection by consecutive errors, if this caused one.

        Returns due at ``now`` are applied first but not reported here: :meth:`tick` reports
        them (the caller ticks on :meth:`next_deadline`)."""
        if now >= self._earliest_return:
            self._pending_returns.extend(self._release(now))
        host = self._hosts.get(node)
        if host is None or node in self._ejected:
            return None
        host.total += 1
        host.latency_sum += latency
        if ok:
            host.ok += 1
            host.consecutive = 0
            return None
        host.consecutive += 1
        if host.consecutive < self.config.consecutive_errors:
            return None
        host.consecutive = 0
        return self._eject(node, host, "consecutive_errors", now)

    def tick(self, now: float) -> list[OutlierEvent]:
        """Returns due at ``now`` and, once per ``interval``, the outlier analysis."""
        events = self._pending_returns
        self._pending_returns = []
        if now >= self._earliest_return:
            events.extend(self._release(now))
        if now >= self._next_analysis:
            events.extend(self._analyse(now))
            # Skip missed periods rather than running a burst of empty analyses after a pause.
            periods = math.floor((now - self._next_analysis) / self.config.interval) + 1
            self._next_analysis += periods * self.config.interval
        return events

    # -- internals -----------------------------------------------------------------------------

    def _eject(self, node: str, host: _Host, reason: str, now: float) -> OutlierEvent | None:
        cfg = self.config
        if len(self._ejected) >= self.max_ejected():
            self.skipped_cap += 1
            return None
        host.times += 1
        nominal = min(cfg.base_ejection * host.times, cfg.max_ejection / (1.0 + cfg.jitter))
        duration = nominal * self._rng.uniform(1.0 - cfg.jitter, 1.0 + cfg.jitter)
        until = now + min(duration, cfg.max_ejection)
        host.ejected_until = until
        self._ejected[node] = until
        if until < self._earliest_return:
            self._earliest_return = until
        self.total_ejections += 1
        return OutlierEvent(node, "eject", reason, now, until, host.times)

    def _release(self, now: float) -> list[OutlierEvent]:
        due = sorted(node for node, until in self._ejected.items() if until <= now)
        return self._return(due, now, "ejection_elapsed")

    def _return(self, nodes: list[str], now: float, reason: str) -> list[OutlierEvent]:
        events: list[OutlierEvent] = []
        for node in nodes:
            del self._ejected[node]
            host = self._hosts[node]
            host.ejected_until = 0.0
            host.returned_at = now
            host.consecutive = 0
            host.clear_interval()
            events.append(OutlierEvent(node, "return", reason, now, 0.0, host.times))
        self._recompute_earliest()
        return events

    def _recompute_earliest(self) -> None:
        self._earliest_return = min(self._ejected.values(), default=math.inf)

    def _analyse(self, now: float) -> list[OutlierEvent]:
        cfg = self.config
        volume: list[tuple[str, _Host]] = [
            (node, h)
            for node, h in self._hosts.items()
            if node not in self._ejected and h.total >= cfg.min_requests
        ]
        events: list[OutlierEvent] = []
        if len(volume) >= cfg.min_hosts:
            rates = [h.ok / h.total for _, h in volume]
            mean = sum(rates) / len(rates)
            stdev = math.sqrt(sum((r - mean) ** 2 for r in rates) / len(rates))
            limit = min(mean - cfg.stdev_factor * stdev, cfg.success_rate_floor)
            worst = sorted(
                (rate, node) for rate, (node, _) in zip(rates, volume, strict=True) if rate < limit
            )
            for _, node in worst:
                event = self._eject(node, self._hosts[node], "success_rate", now)
                if event is not None:
                    events.append(event)
        candidates = [(node, h) for node, h in volume if node not in self._ejected]
        if len(candidates) >= cfg.latency_min_hosts:
            means = sorted(h.latency_sum / h.total for _, h in candidates)
            mid = len(means) // 2
            median = means[mid] if len(means) % 2 else (means[mid - 1] + means[mid]) / 2.0
            limit = max(cfg.latency_factor * median, cfg.latency_floor)
            slow = sorted(
                (-(h.latency_sum / h.total), node)
                for node, h in candidates
                if h.latency_sum / h.total > limit
            )
            for _, node in slow:
                event = self._eject(node, self._hosts[node], "latency", now)
                if event is not None:
                    events.append(event)
        since = now - cfg.interval
        for node, h in self._hosts.items():
            # Envoy's decay: every full interval in rotation forgives one past ejection.
            if h.times > 0 and node not in self._ejected and h.returned_at <= since:
                h.times -= 1
            h.clear_interval()
        return events


def eject_time_scenario(rps: float = 100.0, seed: int = 0, nodes: int = 10) -> dict[str, float]:
    """Bench scenario: a node receiving ``rps`` requests per second starts failing every call.

    Requests arrive evenly spaced with +/- 10 % jitter (from ``seed``); the node is healthy for
    one second, then fails from a random instant on. Reports the time from that instant to its
    ejection and the number of failed calls it took."""
    rng = random.Random(seed)
    detector = OutlierDetector(random.Random(seed + 1))
    names = [f"n{i}" for i in range(nodes)]
    for name in names:
        detector.add(name)
    victim = names[0]
    gap = 1.0 / rps
    fail_from = 1.0 + rng.uniform(0.0, gap)
    t = 0.0
    failures = 0
    while t < fail_from + 10.0:
        t += gap * rng.uniform(0.9, 1.1)
        if t >= detector.next_deadline():
            detector.tick(t)
        failing = t >= fail_from
        event = detector.record(victim, not failing, 0.001, t)
        failures += failing
        if event is not None and event.kind == "eject":
            return {
                "eject_time_ms": (t - fail_from) * 1000.0,
                "eject_failures": float(failures),
                "rps": rps,
            }
    raise RuntimeError("the failing node was never ejected")
