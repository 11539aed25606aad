"""Phi-accrual failure detector (pure core).

Theory of operation: instead of a yes/no timeout, a phi-accrual detector (Hayashibara et al.,
"The phi Accrual Failure Detector", SRDS 2004) outputs a *suspicion level* that grows
continuously with the time since the last heartbeat:

    phi(now) = -log10(P(the next heartbeat arrives later than now))

where the distribution of heartbeat inter-arrival times is learned from a sliding window of
recent intervals. ``phi = 1`` means a 10 % chance that a heartbeat is still coming, ``phi = 8``
about one in 10^8 — the caller picks a threshold that matches the cost of a wrong verdict.

As in Akka's implementation, the inter-arrival times are modelled as a normal distribution
(mean and standard deviation of the window) and the tail probability uses the logistic
approximation of the normal CDF (``1 / (1 + exp(-y (1.5976 + 0.070566 y^2)))``, error < 1.4e-4),
which also gives a closed form for the logarithm. Three knobs make it usable on real networks:

* ``min_std`` floors the deviation: perfectly regular heartbeats (a simulation, a quiet LAN)
  would otherwise give a zero deviation and a phi that jumps from 0 to huge on a 1 ms delay;
* ``acceptable_pause`` is added to the mean, to tolerate known pauses (a GC, a slow event loop)
  without lowering the threshold;
* ``first_interval`` bootstraps the window at the first heartbeat (two samples at
  ``first_interval`` +/- a quarter), so a peer that says hello once and dies is still detected.

Phi is 0.0 before the first heartbeat (nothing is known, so nothing is suspected — Akka treats
such peers as healthy too), and from the first heartbeat on it is a non-decreasing function of
``now`` until the next heartbeat. It is computed in log space, so it never overflows, and it is
capped at :data:`MAX_PHI`: never inf or NaN. An interval that ends a period in which the peer
was already considered failed is not added to the window: one long outage would otherwise
inflate the mean and blind the detector for the next hundred heartbeats.

The core takes ``now`` from the caller; it never reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["MAX_PHI", "PhiAccrual", "PhiConfig", "PhiRegistry", "phi_value"]

# 10^-1000 is far past any sensible threshold; a cap keeps the value printable and comparable.
MAX_PHI = 1000.0

# Coefficients of the logistic approximation of the standard normal CDF (Bowling et al. 2009).
_A = 1.5976
_B = 0.070566
_LN10 = math.log(10.0)


@dataclass(frozen=True)
class PhiConfig:
    """Tuning of a phi-accrual detector; times in seconds."""

    # Intervals kept: ~100 heartbeats adapt to a changed network within a couple of minutes at
    # 1 Hz while averaging out jitter.
    window: int = 100
    # Floor of the standard deviation (50 ms): loopback and simulated links are so regular that
    # the measured deviation is ~0, which would make phi a step function of the delay.
    min_std: float = 0.05
    # Extra pause tolerated on top of the mean; 0 by default because SWIM's suspicion already
    # absorbs pauses, and phi here is an advisory score.
    acceptable_pause: float = 0.0
    # Expected interval before any has been measured: the SWIM probe interval of the LAN preset.
    first_interval: float = 1.0
    # Phi above which the peer counts as failed; intervals ending such a gap are not learned.
    threshold: float = 8.0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError("window must hold at least 2 intervals")
        if not (self.min_std > 0.0 and self.first_interval > 0.0):
            raise ValueError("min_std and first_interval must be positive")
        if not (self.acceptable_pause >= 0.0 and self.threshold > 0.0):
            raise ValueError("acceptable_pause must be >= 0 and threshold > 0")


def _softplus(x: float) -> float:
    """log(1 + e^x) without overflow for large |x|."""
    if x > 0.0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


def phi_value(elapsed: float, mean: float, std: float) -> float:
    """Phi for ``elapsed`` seconds since the last heartbeat under N(mean, std).

    With ``y = (elapsed - mean) / std`` and the logistic CDF, P(later) = 1 / (1 + e^z) with
    ``z = y (A + B y^2)``, so phi = log10(1 + e^z) = softplus(z) / ln 10: no exp of a large
    number is ever taken, and z is non-decreasing in ``elapsed``.
    """
    y = (elapsed - mean) / std
    z = y * (_A + _B * y * y)
    if math.isnan(z):
        return MAX_PHI
    return min(_softplus(z) / _LN10, MAX_PHI)


class PhiAccrual:
    """Suspicion level of one peer from its heartbeat arrival times."""

    __slots__ = ("_intervals", "_last", "_mean", "_std", "config")

    def __init__(self, config: PhiConfig | None = None) -> None:
        self.config = config or PhiConfig()
        self._intervals: deque[float] = deque(maxlen=self.config.window)
        self._last: float | None = None
        self._mean = 0.0
        self._std = 0.0

    @property
    def last_heartbeat(self) -> float | None:
        return self._last

    @property
    def intervals(self) -> tuple[float, ...]:
        """The learned inter-arrival times, oldest first (at most ``config.window``)."""
        return tuple(self._intervals)

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def std(self) -> float:
        """Standard deviation used by phi (already floored at ``min_std``)."""
        return self._std

    def heartbeat(self, now: float) -> None:
        """Record a heartbeat (or any sign of life) received at ``now``."""
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        cfg = self.config
        if self._last is None:
            quarter = cfg.first_interval / 4.0
            self._intervals.append(cfg.first_interval - quarter)
            self._intervals.append(cfg.first_interval + quarter)
        elif self.phi(now) < cfg.threshold:
            # Out-of-order callers (now < last) contribute a zero interval, not a negative one.
            self._intervals.append(max(0.0, now - self._last))
        self._last = now if self._last is None else max(self._last, now)
        self._refresh()

    def _refresh(self) -> None:
        n = len(self._intervals)
        mean = math.fsum(self._intervals) / n
        var = math.fsum((x - mean) ** 2 for x in self._intervals) / n
        self._mean = mean
        self._std = max(math.sqrt(var), self.config.min_std)

    def phi(self, now: float) -> float:
        """Suspicion at ``now``: 0.0 before the first heartbeat, then in [0, MAX_PHI]."""
        if self._last is None:
            return 0.0
        if math.isnan(now):
            raise ValueError("now must not be NaN")
        return phi_value(now - self._last, self._mean + self.config.acceptable_pause, self._std)

    def available(self, now: float, threshold: float | None = None) -> bool:
        """Whether the peer is considered alive (phi below ``threshold``, default config's)."""
        limit = self.config.threshold if threshold is None else threshold
        return self.phi(now) < limit


class PhiRegistry:
    """One :class:`PhiAccrual` per peer, created on the peer's first heartbeat.

    Iteration and :meth:`scores` follow first-heartbeat order (a dict), never hash order, so
    anything driven by them is reproducible.
    """

    __slots__ = ("_detectors", "config")

    def __init__(self, config: PhiConfig | None = None) -> None:
        self.config = config or PhiConfig()
        self._detectors: dict[str, PhiAccrual] = {}

    def heartbeat(self, peer: str, now: float) -> None:
        detector = self._detectors.get(peer)
        if detector is None:
            detector = self._detectors[peer] = PhiAccrual(self.config)
        detector.heartbeat(now)

    def phi(self, peer: str, now: float) -> float:
        """Suspicion of ``peer``; 0.0 for a peer never heard from (or removed)."""
        detector = self._detectors.get(peer)
        return 0.0 if detector is None else detector.phi(now)

    def available(self, peer: str, now: float, threshold: float | None = None) -> bool:
        detector = self._detectors.get(peer)
        return True if detector is None else detector.available(now, threshold)

    def remove(self, peer: str) -> None:
        self._detectors.pop(peer, None)

    def get(self, peer: str) -> PhiAccrual | None:
        return self._detectors.get(peer)

    def scores(self, now: float) -> dict[str, float]:
        return {peer: d.phi(now) for peer, d in self._detectors.items()}

    def __contains__(self, peer: object) -> bool:
        return peer in self._detectors

    def __len__(self) -> int:
        return len(self._detectors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._detectors)
