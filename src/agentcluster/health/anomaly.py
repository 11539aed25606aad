"""Anomaly detectors over metric streams (pure cores: values and times come from the caller).

Theory of operation: each detector keeps an incremental baseline of one metric and judges every
new sample against it; ``observe(value, t)`` returns an :class:`Anomaly` or ``None``. A detector
is ``ready`` once its baseline holds ``min_samples`` samples; before that it never flags (a
baseline of three samples has no meaningful spread). Non-finite samples (a sensor that failed to
read) are dropped and counted in ``dropped``; they never reach a baseline.

* :class:`ZScoreDetector` -- the design's statistical model: ``z = (x - mean) / sd`` over a
  rolling baseline of the last ``window`` samples; flagged when ``|z| >= threshold`` (CPU: 2.5
  sigma over 20 samples, memory: 2 sigma over 15 -- :func:`cpu_detector`,
  :func:`memory_detector`). Two refinements make it usable on real series:

  - ``min_std`` floors the deviation, as the phi-accrual detector does: over a quiet baseline
    the sample deviation can be 0.3 points of CPU, and 2.5 sigma would then alert on a 1-point
    wobble. The floor is the smallest spread worth reasoning about (presets: 5 points of CPU,
    1 point of memory, so the smallest alerting change is 12.5 and 2 points).
  - **Anomalous samples are kept out of the baseline.** A spike does not inflate the spread
    that judges the next sample, and a sustained step is flagged from its first sample for a
    while instead of being absorbed into the mean within a few samples. The price is that a
    genuine new level must be adopted explicitly: flagged samples are held aside, and once
    ``relearn_after`` of them accumulate without ``quiet`` consecutive normal samples in
    between, the baseline is replaced by them (the new normal). So a step is flagged from its
    first sample -- detection delay 0 when the step exceeds the threshold -- and for about
    ``relearn_after`` samples (default: one window) afterwards, then goes quiet. A spike
    followed by ``quiet`` normal samples is forgotten. Presets look upward only
    (``direction="up"``): a falling CPU or memory load is not a health problem.

* :class:`TrendDetector` -- for network metrics: the least-squares slope over the last
  ``window`` samples (sample index as abscissa: the sampler runs at a fixed interval),
  expressed as the relative change across the window, ``slope * (window - 1) / |mean|``; flagged
  when its magnitude reaches ``sensitivity`` (0.3: a 30 % rise or fall within 30 samples).
  Before the fit, samples further than ``clip`` (2) robust deviations (``1.4826 * MAD``) from
  the window's median are winsorised to that bound: an ordinary burst of two samples at the end
  of the window would otherwise tilt the line by a third of its height and read as a trend. A
  ramp spreads its samples evenly, so it loses almost nothing to the clipping, and level shifts
  are kept (half the window on each side of a step is no outlier) and do read as a sustained
  change. A window whose MAD is zero (most samples equal) is fitted unclipped.

* :class:`PercentileDetector` -- for response times: flagged when the value exceeds ``factor``
  times the running ``q``-quantile (2 x p95), the quantile tracked by :class:`P2Quantile` over
  the non-anomalous samples only (outliers must not raise the bar that judges them). P² keeps no
  samples, so the quantile is over the detector's lifetime and there is no relearning: a
  sustained latency regression stays flagged until it ends (the alert layer deduplicates);
  create a fresh detector to accept a new normal.

Severity: a z-score or percentile anomaly is ``critical`` when its score is at least twice the
detector's threshold, else ``warning``; a trend is ``warning`` from twice the sensitivity and
``info`` below (traffic growing is worth knowing, not a fault). :func:`severity_of` turns the
anomalies of a node into its health: any critical -> ``unhealthy``; warnings on
``unhealthy_warnings`` (3) distinct metrics -> ``unhealthy``; any warning -> ``degraded``;
only info or nothing -> ``healthy``.

:class:`MetricMonitor` routes named metrics to fresh detectors (``cpu``, ``memory``,
``network_*``, ``response_time*`` by default) and returns the anomalies of each sample.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Literal, Protocol

import msgspec

from agentcluster.health.stats import P2Quantile, RollingWindow

__all__ = [
    "DEFAULT_ROUTES",
    "Anomaly",
    "AnomalyKind",
    "Detector",
    "Direction",
    "Health",
    "MetricMonitor",
    "PercentileDetector",
    "Severity",
    "TrendDetector",
    "ZScoreDetector",
    "cpu_detector",
    "latency_detector",
    "memory_detector",
    "network_detector",
    "severity_of",
]

AnomalyKind = Literal["zscore", "trend", "percentile"]
Severity = Literal["info", "warning", "critical"]
Health = Literal["healthy", "degraded", "unhealthy"]
Direction = Literal["up", "down", "both"]

# 1.4826 * MAD estimates the standard deviation of normal data, robustly.
_MAD_TO_SD = 1.4826


class Anomaly(msgspec.Struct, frozen=True, kw_only=True):
    """One flagged sample: what was seen, what was expected, and how far off it was."""

    metric: str
    kind: AnomalyKind
    value: float
    # The baseline the value was judged against: mean (zscore), quantile (percentile), or the
    # window mean (trend).
    expected: float
    # z (zscore), value / quantile (percentile), relative change across the window (trend).
    score: float
    severity: Severity
    at: float


class Detector(Protocol):
    """What :class:`MetricMonitor` needs from a detector."""

    @property
    def ready(self) -> bool: ...

    def observe(self, value: float, t: float) -> Anomaly | None: ...


def _positive_int(name: str, v: int) -> int:
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v!r}")
    return v


class ZScoreDetector:
    """Flags samples more than ``threshold`` deviations from a rolling, anomaly-free baseline."""

    __slots__ = (
        "_baseline",
        "_direction",
        "_held",
        "_min_samples",
        "_min_std",
        "_quiet",
        "_quiet_run",
        "_relearn_after",
        "_threshold",
        "dropped",
        "metric",
    )

    def __init__(
        self,
        window: int = 20,
        threshold: float = 2.5,
        min_samples: int = 10,
        *,
        metric: str = "",
        min_std: float = 0.0,
        direction: Direction = "both",
        relearn_after: int | None = None,
        quiet: int = 3,
    ) -> None:
        _positive_int("window", window)
        if not 2 <= min_samples <= window:
            raise ValueError(f"min_samples must be in [2, window], got {min_samples!r}")
        if not threshold > 0.0 or not min_std >= 0.0:
            raise ValueError("threshold must be > 0 and min_std >= 0")
        self.metric = metric
        self._baseline = RollingWindow(window)
        self._threshold = threshold
        self._min_samples = min_samples
        self._min_std = min_std
        self._direction: Direction = direction
        self._relearn_after = _positive_int("relearn_after", relearn_after or window)
        self._quiet = _positive_int("quiet", quiet)
        self._held: deque[float] = deque(maxlen=self._relearn_after)
        self._quiet_run = 0
        self.dropped = 0

    @property
    def ready(self) -> bool:
        return len(self._baseline) >= self._min_samples

    @property
    def threshold(self) -> float:
        return self._threshold

    @property
    def window(self) -> int:
        return self._baseline.size

    @property
    def mean(self) -> float:
        return self._baseline.mean

    @property
    def stdev(self) -> float:
        """The deviation a sample is judged by: the baseline's, floored at ``min_std``."""
        return max(self._baseline.stdev, self._min_std)

    def observe(self, value: float, t: float) -> Anomaly | None:
        if not math.isfinite(value):
            self.dropped += 1
            return None
        base = self._baseline
        if len(base) < self._min_samples:
            base.add(value)
            return None
        mean = base.mean
        sd = max(base.stdev, self._min_std)
        if sd <= 0.0:
            # A perfectly flat baseline and no floor: any change is infinitely many sigmas.
            z = 0.0 if value == mean else math.copysign(math.inf, value - mean)
        else:
            z = (value - mean) / sd
        d = self._direction
        hit = (z >= self._threshold and d != "down") or (z <= -self._threshold and d != "up")
        if not hit:
            base.add(value)
            self._quiet_run += 1
            if self._quiet_run >= self._quiet:
                self._held.clear()
            return None
        self._quiet_run = 0
        self._held.append(value)
        if len(self._held) >= self._relearn_after:
            # The excursion has lasted a full relearning period: it is the new normal.
            base.clear()
            base.extend(self._held)
            self._held.clear()
        sev: Severity = "critical" if abs(z) >= 2.0 * self._threshold else "warning"
        return Anomaly(
            metric=self.metric,
            kind="zscore",
            value=value,
            expected=mean,
            score=z,
            severity=sev,
            at=t,
        )


class TrendDetector:
    """Flags a sustained rise or fall: relative least-squares change across the window."""

    __slots__ = (
        "_clip",
        "_denom",
        "_min_level",
        "_sensitivity",
        "_values",
        "_window",
        "_xs",
        "dropped",
        "metric",
    )

    def __init__(
        self,
        window: int = 30,
        sensitivity: float = 0.3,
        *,
        metric: str = "",
        clip: float = 2.0,
        min_level: float = 1e-9,
    ) -> None:
        if window < 3:
            raise ValueError(f"window must be >= 3, got {window!r}")
        if not sensitivity > 0.0 or not clip > 0.0 or not min_level > 0.0:
            raise ValueError("sensitivity, clip and min_level must be > 0")
        self.metric = metric
        self._window = window
        self._sensitivity = sensitivity
        self._clip = clip
        # Idle links average near zero, where any wobble is a huge relative change; the floor
        # is the level below which relative change stops meaning anything.
        self._min_level = min_level
        self._values = RollingWindow(window)
        # Centred abscissae and their sum of squares are fixed for a full window.
        half = (window - 1) / 2.0
        self._xs = [i - half for i in range(window)]
        self._denom = math.fsum(x * x for x in self._xs)
        self.dropped = 0

    @property
    def ready(self) -> bool:
        return self._values.full

    @property
    def window(self) -> int:
        return self._window

    @property
    def sensitivity(self) -> float:
        return self._sensitivity

    def relative_change(self) -> tuple[float, float]:
        """(relative change across the window, window mean) of the current, full window."""
        ys = list(self._values)
        ordered = sorted(ys)
        mid = len(ordered) // 2
        med = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
        devs = sorted(abs(y - med) for y in ys)
        mad = devs[mid] if len(devs) % 2 else 0.5 * (devs[mid - 1] + devs[mid])
        bound = self._clip * _MAD_TO_SD * mad
        if bound > 0.0:
            lo, hi = med - bound, med + bound
            ys = [lo if y < lo else hi if y > hi else y for y in ys]
        mean = math.fsum(ys) / len(ys)
        slope = math.fsum(x * y for x, y in zip(self._xs, ys, strict=True)) / self._denom
        level = max(abs(mean), self._min_level)
        return slope * (self._window - 1) / level, mean

    def observe(self, value: float, t: float) -> Anomaly | None:
        if not math.isfinite(value):
            self.dropped += 1
            return None
        self._values.add(value)
        if not self._values.full:
            return None
        rel, mean = self.relative_change()
        if abs(rel) < self._sensitivity:
            return None
        sev: Severity = "warning" if abs(rel) >= 2.0 * self._sensitivity else "info"
        return Anomaly(
            metric=self.metric,
            kind="trend",
            value=value,
            expected=mean,
            score=rel,
            severity=sev,
            at=t,
        )


class PercentileDetector:
    """Flags values above ``factor`` times the running ``q``-quantile of normal samples."""

    __slots__ = ("_factor", "_min_samples", "_min_value", "_quantile", "dropped", "metric")

    def __init__(
        self,
        factor: float = 2.0,
        q: float = 0.95,
        min_samples: int = 30,
        *,
        metric: str = "",
        min_value: float = 0.0,
    ) -> None:
        if not factor > 1.0:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        self.metric = metric
        self._factor = factor
        self._quantile = P2Quantile(q)
        self._min_samples = _positive_int("min_samples", min_samples)
        # Sub-millisecond responses doubling is noise, not an incident: an absolute floor.
        self._min_value = min_value
        self.dropped = 0

    @property
    def ready(self) -> bool:
        return self._quantile.count >= self._min_samples

    @property
    def quantile(self) -> float:
        """The running quantile of the normal samples (ValueError before the first one)."""
        return self._quantile.value

    @property
    def factor(self) -> float:
        return self._factor

    @property
    def q(self) -> float:
        return self._quantile.q

    def observe(self, value: float, t: float) -> Anomaly | None:
        if not math.isfinite(value):
            self.dropped += 1
            return None
        qt = self._quantile
        if qt.count < self._min_samples:
            qt.add(value)
            return None
        ref = qt.value
        if value <= self._factor * ref or value <= self._min_value:
            qt.add(value)
            return None
        ratio = value / ref if ref > 0.0 else math.inf
        sev: Severity = "critical" if ratio >= 2.0 * self._factor else "warning"
        return Anomaly(
            metric=self.metric,
            kind="percentile",
            value=value,
            expected=ref,
            score=ratio,
            severity=sev,
            at=t,
        )


def cpu_detector(metric: str = "cpu") -> ZScoreDetector:
    """The design's CPU model: 2.5 sigma over 20 samples (CPU in percent, floor 5 points)."""
    return ZScoreDetector(20, 2.5, 10, metric=metric, min_std=5.0, direction="up")


def memory_detector(metric: str = "memory") -> ZScoreDetector:
    """The design's memory model: 2 sigma over 15 samples (memory in percent, floor 1 point)."""
    return ZScoreDetector(15, 2.0, 8, metric=metric, min_std=1.0, direction="up")


def network_detector(metric: str = "network") -> TrendDetector:
    """The design's network model: a 30 % change across 30 samples."""
    return TrendDetector(30, 0.3, metric=metric)


def latency_detector(metric: str = "response_time") -> PercentileDetector:
    """The design's response-time model: above twice the running p95."""
    return PercentileDetector(2.0, 0.95, 30, metric=metric)


# Route patterns (fnmatch, case-sensitive) to detector factories; first match wins.
DEFAULT_ROUTES: tuple[tuple[str, Callable[[str], Detector]], ...] = (
    ("cpu", cpu_detector),
    ("memory", memory_detector),
    ("network_*", network_detector),
    ("response_time*", latency_detector),
)


class MetricMonitor:
    """Routes named metric samples to per-metric detectors, created on first sight."""

    __slots__ = ("_detectors", "_routes", "_unrouted")

    def __init__(
        self, routes: Iterable[tuple[str, Callable[[str], Detector]]] = DEFAULT_ROUTES
    ) -> None:
        self._routes = tuple(routes)
        self._detectors: dict[str, Detector | None] = {}
        self._unrouted = 0

    @property
    def detectors(self) -> Mapping[str, Detector]:
        return {k: v for k, v in self._detectors.items() if v is not None}

    @property
    def unrouted(self) -> int:
        """Samples of metrics no route matched (ignored)."""
        return self._unrouted

    def detector(self, metric: str) -> Detector | None:
        try:
            return self._detectors[metric]
        except KeyError:
            pass
        det: Detector | None = None
        for pattern, factory in self._routes:
            if fnmatchcase(metric, pattern):
                det = factory(metric)
                break
        self._detectors[metric] = det
        return det

    def observe(self, metric: str, value: float, t: float) -> Anomaly | None:
        det = self.detector(metric)
        if det is None:
            self._unrouted += 1
            return None
        return det.observe(value, t)

    def observe_sample(self, sample: Mapping[str, float], t: float) -> list[Anomaly]:
        """Feed one sample of several metrics; anomalies in the sample's metric order."""
        out: list[Anomaly] = []
        for metric, value in sample.items():
            a = self.observe(metric, value, t)
            if a is not None:
                out.append(a)
        return out


def severity_of(anomalies: Iterable[Anomaly], *, unhealthy_warnings: int = 3) -> Health:
    """A node's health from its current anomalies (rule in the module docstring)."""
    warned: dict[str, None] = {}
    for a in anomalies:
        if a.severity == "critical":
            return "unhealthy"
        if a.severity == "warning":
            warned[a.metric] = None
    if len(warned) >= unhealthy_warnings:
        return "unhealthy"
    return "degraded" if warned else "healthy"
