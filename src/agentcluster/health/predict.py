"""Predictive health analysis: trend extrapolation over metric histories (pure core).

Theory of operation: a metric heading for a limit -- memory toward 100 %, a disk filling up,
file descriptors toward the process limit, the error rate toward "failing", latency toward
twice its usual level -- is extrapolated with an ordinary least-squares line
``value = slope * t + intercept`` through its recent ``(t, value)`` samples, and the time at which
that line crosses the limit is the prediction's ``eta_seconds`` (counted from ``now``, by default
the last sample's time; 0 when the fitted line is already past the limit). Limits are ceilings
approached by rising series unless a rule says ``rising=False`` (a floor, such as free space).

A prediction needs at least :data:`MIN_SAMPLES` (10) samples, a slope pointing at the limit, and
a line that explains the data (``r2 >= min_r2``, 0.5 by default): a flat, noisy series has a
random small slope whose extrapolation would land somewhere in the next decade, so it predicts
nothing. Predictions further away than ``horizon`` are dropped too.

**Confidence** (0..1) is the goodness of fit discounted for few samples::

    confidence = r2 * n / (n + 5)

so ten perfectly linear samples give 0.67, thirty give 0.86 and a hundred 0.95: a line through
ten points can be a coincidence of a short window, one through a hundred rarely is.

:func:`combined_confidence` merges the confidences of several predictions with the design's
rule, ``mean - variance / 2`` (population variance), clamped to [0, 1]: agreeing predictors keep
their mean; disagreement costs confidence. No confidences combine to 0.

:func:`predict` applies a table of :class:`PredictRule` (metric pattern, kind, limit) to a history
of many metrics. The defaults: ``memory``, ``disk*`` and ``fds`` in percent of their capacity
reaching 100 (``resource_exhaustion``); ``error_rate`` as a fraction reaching 0.5 -- half the
calls failing (``failure``); ``response_time*`` reaching twice its baseline, the median of the
first ten samples of the history (``performance_degradation``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

import msgspec

from agentcluster.health.stats import exact_quantile

__all__ = [
    "DEFAULT_RULES",
    "MIN_SAMPLES",
    "PredictRule",
    "Prediction",
    "PredictionKind",
    "combined_confidence",
    "linear_fit",
    "predict",
    "time_to_threshold",
]

PredictionKind = Literal["failure", "performance_degradation", "resource_exhaustion"]

# The design's minimum history for a predictive check.
MIN_SAMPLES = 10
# Sample-count discount: confidence = r2 * n / (n + _N_HALF); half weight at five samples.
_N_HALF = 5.0


class Prediction(msgspec.Struct, frozen=True, kw_only=True):
    """A metric expected to reach ``threshold`` in ``eta_seconds``, with a confidence in 0..1."""

    kind: PredictionKind
    metric: str
    eta_seconds: float
    confidence: float
    detail: str
    threshold: float
    # Fitted rate of change, in metric units per second.
    rate: float


def linear_fit(ts: Sequence[float], values: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``(slope, intercept, r2)`` of ``values`` against ``ts``.

    r2 is 0 when the values are constant: there is no variance to explain, and a flat series
    carries no evidence of a trend.
    """
    n = len(ts)
    if n != len(values):
        raise ValueError(f"{n} times but {len(values)} values")
    if n < 2:
        raise ValueError("a line needs at least two samples")
    if not all(map(math.isfinite, ts)) or not all(map(math.isfinite, values)):
        raise ValueError("times and values must be finite")
    # Centre both axes first: epoch-sized times squared would lose every significant digit.
    mt = math.fsum(ts) / n
    mv = math.fsum(values) / n
    sxx = math.fsum((t - mt) ** 2 for t in ts)
    if sxx == 0.0:
        raise ValueError("all samples share one time: the slope is undefined")
    sxy = math.fsum((t - mt) * (v - mv) for t, v in zip(ts, values, strict=True))
    syy = math.fsum((v - mv) ** 2 for v in values)
    slope = sxy / sxx
    intercept = mv - slope * mt
    r2 = 0.0 if syy == 0.0 else min(1.0, sxy * sxy / (sxx * syy))
    return slope, intercept, r2


def _confidence(r2: float, n: int) -> float:
    return max(0.0, min(1.0, r2 * n / (n + _N_HALF)))


def time_to_threshold(
    ts: Sequence[float],
    values: Sequence[float],
    threshold: float,
    *,
    metric: str = "",
    kind: PredictionKind = "resource_exhaustion",
    now: float | None = None,
    min_r2: float = 0.5,
    horizon: float | None = None,
    rising: bool = True,
) -> Prediction | None:
    """When the fitted line through ``(ts, values)`` reaches ``threshold``; None if it won't.

    ``rising``: the limit is a ceiling approached by a rising series (memory used); otherwise
    a floor approached by a falling one (free space). A line already past the limit and still
    heading that way gives ``eta_seconds == 0``.
    """
    n = len(ts)
    if n < MIN_SAMPLES:
        return None
    slope, intercept, r2 = linear_fit(ts, values)
    if r2 < min_r2 or (slope <= 0.0 if rising else slope >= 0.0):
        return None
    at = max(ts) if now is None else now
    fitted = slope * at + intercept
    # Past the limit already: gap and slope have opposite signs and the quotient is negative.
    eta = max(0.0, (threshold - fitted) / slope)
    if horizon is not None and eta > horizon:
        return None
    conf = _confidence(r2, n)
    detail = (
        f"{metric or 'metric'} at {fitted:.4g} moving {slope * 3600.0:+.4g}/h "
        f"reaches {threshold:.4g} in {eta:.0f} s (r2={r2:.3f}, n={n})"
    )
    return Prediction(
        kind=kind,
        metric=metric,
        eta_seconds=eta,
        confidence=conf,
        detail=detail,
        threshold=threshold,
        rate=slope,
    )


def combined_confidence(confidences: Iterable[float]) -> float:
    """The design's rule: mean minus half the (population) variance, clamped to [0, 1]."""
    cs = list(confidences)
    if not cs:
        return 0.0
    mean = math.fsum(cs) / len(cs)
    var = math.fsum((c - mean) ** 2 for c in cs) / len(cs)
    return max(0.0, min(1.0, mean - var / 2.0))


@dataclass(frozen=True, slots=True)
class PredictRule:
    """Metrics matching ``pattern`` (fnmatch) are predicted to reach ``threshold``.

    With ``relative`` the threshold is a multiple of the metric's baseline: the median of the
    first :data:`MIN_SAMPLES` samples of its history.
    """

    pattern: str
    kind: PredictionKind
    threshold: float
    relative: bool = False
    # A ceiling approached from below (True) or a floor approached from above.
    rising: bool = True
    # Predictions further than this (seconds) are not actionable; None keeps them all.
    horizon: float | None = 7 * 86400.0


DEFAULT_RULES: tuple[PredictRule, ...] = (
    PredictRule("memory", "resource_exhaustion", 100.0),
    PredictRule("disk*", "resource_exhaustion", 100.0),
    PredictRule("fds", "resource_exhaustion", 100.0),
    PredictRule("error_rate", "failure", 0.5),
    PredictRule("response_time*", "performance_degradation", 2.0, relative=True),
)


def predict(
    history: Mapping[str, Sequence[tuple[float, float]]],
    *,
    rules: Sequence[PredictRule] = DEFAULT_RULES,
    now: float | None = None,
    min_r2: float = 0.5,
) -> list[Prediction]:
    """Predictions for every metric of ``history`` that a rule covers (first match wins).

    Metrics are visited in sorted order, so the output is deterministic; samples of a metric
    may come in any time order.
    """
    out: list[Prediction] = []
    for metric in sorted(history):
        samples = history[metric]
        if len(samples) < MIN_SAMPLES:
            continue
        rule = next((r for r in rules if fnmatchcase(metric, r.pattern)), None)
        if rule is None:
            continue
        ordered = sorted(samples)
        ts = [t for t, _ in ordered]
        vs = [v for _, v in ordered]
        threshold = rule.threshold
        if rule.relative:
            base = exact_quantile(vs[:MIN_SAMPLES], 0.5)
            if not base > 0.0:
                continue
            threshold *= base
        p = time_to_threshold(
            ts,
            vs,
            threshold,
            metric=metric,
            kind=rule.kind,
            now=now,
            min_r2=min_r2,
            horizon=rule.horizon,
            rising=rule.rising,
        )
        if p is not None:
            out.append(p)
    return out
