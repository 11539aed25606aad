"""Incremental statistics for health baselines (pure, allocation-light).

Theory of operation: a health baseline is fed one sample at a time, forever, so every summary
here is updated in O(1) per sample and never re-reads history except to cancel rounding drift.

* :class:`Welford` -- count, mean and variance by Welford's update (numerically stable: it never
  subtracts two large sums). Unbounded by default. With ``window=N`` it keeps the last N samples
  in a ring buffer and *removes* the evicted sample with the exact inverse of the update
  (``mean' = (n*mean - x) / (n - 1)``, ``M2' = M2 - (x - mean')(x - mean)``). Inverse updates
  accumulate rounding error, so after every N evictions the sums are recomputed from the buffer
  with a two-pass formula: O(N) once per N samples, amortised O(1), and the drift never spans
  more than one window.
* :class:`RollingWindow` -- the last N samples in order, with O(1) mean and variance from
  *shifted* running sums ``S1 = sum(x - K)``, ``S2 = sum((x - K)^2)``. The shift ``K`` (the mean
  at the last recomputation) keeps the sums small so ``S2 - S1^2/n`` does not cancel
  catastrophically; the sums are rebuilt every N evictions, like the windowed Welford. It is
  cheaper per sample than Welford (no division) and also hands out the samples themselves
  (detectors re-baseline from them, the trend detector fits a line through them).
* :class:`Ewma` -- exponentially weighted mean and variance (Finch 2009, "Incremental calculation
  of weighted mean and variance"): ``diff = x - m; m += a*diff; v = (1-a)(v + a*diff^2)``. Set
  by ``alpha`` or by a half-life in samples (``alpha = 1 - 2^(-1/halflife)``).
* :class:`P2Quantile` -- Jain & Chlamtac's P² algorithm (CACM 1985): five markers whose heights
  track the min, q/2, q, (1+q)/2 quantiles and the max; each sample moves marker positions and
  adjusts heights by piecewise-parabolic interpolation. O(1) memory and time, no sample storage.
  Below five samples the quantile is computed exactly (linear interpolation between order
  statistics at rank ``(n-1)q``, numpy's default), so small counts are not approximations.

Variances are sample variances (``n - 1`` denominator) unless named ``population_variance``;
with fewer than two samples they are 0.0, and the mean of no samples is 0.0 -- ``count`` tells
the caller whether a figure means anything. Non-finite inputs raise :class:`ValueError`: a NaN
would poison every later figure silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

__all__ = ["Ewma", "P2Quantile", "RollingWindow", "Welford", "exact_quantile"]


def _check(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(f"sample must be a finite number, got {x!r}")
    return float(x)


def exact_quantile(values: Iterable[float], q: float) -> float:
    """The q-quantile of ``values`` by linear interpolation at rank ``(n-1)q`` (numpy's default)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q!r}")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no samples")
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Welford:
    """Running count / mean / variance; optionally over a sliding window of the last N samples."""

    __slots__ = ("_buf", "_evictions", "_head", "_m2", "_mean", "_n", "_window")

    def __init__(self, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window!r}")
        self._window = window
        self._buf: list[float] = []
        self._head = 0  # index of the oldest sample once the buffer is full
        self._evictions = 0
        self._n = 0
        self._mean = 0.0
        self._m2 = 0.0

    @property
    def window(self) -> int | None:
        return self._window

    @property
    def count(self) -> int:
        return self._n

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def variance(self) -> float:
        return self._m2 / (self._n - 1) if self._n > 1 else 0.0

    @property
    def population_variance(self) -> float:
        return self._m2 / self._n if self._n > 0 else 0.0

    @property
    def stdev(self) -> float:
        return math.sqrt(self.variance)

    def add(self, x: float) -> None:
        x = _check(x)
        w = self._window
        if w is not None:
            if len(self._buf) < w:
                self._buf.append(x)
            else:
                old = self._buf[self._head]
                self._buf[self._head] = x
                self._head = (self._head + 1) % w
                self._remove(old)
                self._evictions += 1
                if self._evictions >= w:
                    self._recompute()
                    return
        self._n += 1
        delta = x - self._mean
        self._mean += delta / self._n
        self._m2 += delta * (x - self._mean)

    def _remove(self, x: float) -> None:
        n = self._n - 1
        if n == 0:
            self._n, self._mean, self._m2 = 0, 0.0, 0.0
            return
        new_mean = (self._n * self._mean - x) / n
        # Rounding can push M2 a hair below zero when the window holds near-equal samples.
        self._m2 = max(0.0, self._m2 - (x - new_mean) * (x - self._mean))
        self._mean = new_mean
        self._n = n

    def _recompute(self) -> None:
        """Exact two-pass statistics of the buffer (which already holds the newest sample)."""
        self._evictions = 0
        buf = self._buf
        self._n = len(buf)
        mean = math.fsum(buf) / self._n
        self._mean = mean
        self._m2 = math.fsum((v - mean) ** 2 for v in buf)

    def values(self) -> list[float]:
        """The windowed samples, oldest first (empty when unbounded: nothing is stored)."""
        return self._buf[self._head :] + self._buf[: self._head]

    def clear(self) -> None:
        self._buf.clear()
        self._head = self._evictions = self._n = 0
        self._mean = self._m2 = 0.0


class RollingWindow:
    """The last ``n`` samples, oldest first, with O(1) mean and variance."""

    __slots__ = ("_buf", "_evictions", "_head", "_k", "_n", "_s1", "_s2")

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"window size must be >= 1, got {n!r}")
        self._n = n
        self._buf: list[float] = []
        self._head = 0
        self._evictions = 0
        self._k = 0.0
        self._s1 = 0.0
        self._s2 = 0.0

    @property
    def size(self) -> int:
        return self._n

    @property
    def full(self) -> bool:
        return len(self._buf) == self._n

    def __len__(self) -> int:
        return len(self._buf)

    def __iter__(self) -> Iterator[float]:
        buf, head = self._buf, self._head
        yield from buf[head:]
        yield from buf[:head]

    @property
    def last(self) -> float:
        if not self._buf:
            raise IndexError("empty window")
        return self._buf[self._head - 1]

    @property
    def mean(self) -> float:
        m = len(self._buf)
        return self._k + self._s1 / m if m else 0.0

    @property
    def variance(self) -> float:
        m = len(self._buf)
        if m < 2:
            return 0.0
        return max(0.0, (self._s2 - self._s1 * self._s1 / m) / (m - 1))

    @property
    def stdev(self) -> float:
        return math.sqrt(self.variance)

    def add(self, x: float) -> float | None:
        """Append ``x``; return the sample it evicted, if the window was full."""
        x = _check(x)
        buf = self._buf
        if not buf:
            self._k = x  # shift by the first sample: sums start at zero
        d = x - self._k
        if len(buf) < self._n:
            buf.append(x)
            self._s1 += d
            self._s2 += d * d
            return None
        old = buf[self._head]
        buf[self._head] = x
        self._head = (self._head + 1) % self._n
        od = old - self._k
        self._s1 += d - od
        self._s2 += d * d - od * od
        self._evictions += 1
        if self._evictions >= self._n:
            self._rebuild()
        return old

    def extend(self, xs: Iterable[float]) -> None:
        for x in xs:
            self.add(x)

    def _rebuild(self) -> None:
        self._evictions = 0
        buf = self._buf
        k = math.fsum(buf) / len(buf)
        self._k = k
        self._s1 = math.fsum(v - k for v in buf)
        self._s2 = math.fsum((v - k) ** 2 for v in buf)

    def clear(self) -> None:
        self._buf.clear()
        self._head = self._evictions = 0
        self._k = self._s1 = self._s2 = 0.0


class Ewma:
    """Exponentially weighted moving mean and variance."""

    __slots__ = ("_alpha", "_count", "_mean", "_var")

    def __init__(self, alpha: float | None = None, *, halflife: float | None = None) -> None:
        if (alpha is None) == (halflife is None):
            raise ValueError("give exactly one of alpha or halflife")
        if halflife is not None:
            if not halflife > 0.0:
                raise ValueError(f"halflife must be > 0, got {halflife!r}")
            alpha = 1.0 - 2.0 ** (-1.0 / halflife)
        assert alpha is not None
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self._alpha = alpha
        self._count = 0
        self._mean = 0.0
        self._var = 0.0

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def count(self) -> int:
        return self._count

    @property
    def value(self) -> float:
        return self._mean

    @property
    def variance(self) -> float:
        return self._var

    @property
    def stdev(self) -> float:
        return math.sqrt(self._var)

    def add(self, x: float) -> None:
        x = _check(x)
        self._count += 1
        if self._count == 1:
            self._mean = x  # the first sample is the best estimate; no bias toward zero
            return
        a = self._alpha
        diff = x - self._mean
        incr = a * diff
        self._mean += incr
        self._var = (1.0 - a) * (self._var + diff * incr)


# Desired-position increments of the five P² markers for quantile q.
def _p2_increments(q: float) -> tuple[float, float, float, float, float]:
    return (0.0, q / 2.0, q, (1.0 + q) / 2.0, 1.0)


class P2Quantile:
    """Streaming estimate of the q-quantile in O(1) memory (P² algorithm)."""

    __slots__ = ("_count", "_dn", "_heights", "_npos", "_pos", "_q")

    def __init__(self, q: float) -> None:
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {q!r}")
        self._q = q
        self._count = 0
        self._heights: list[float] = []  # the first 5 samples, then the 5 marker heights
        self._pos = [1, 2, 3, 4, 5]  # actual marker positions (1-based ranks)
        self._npos = [1.0, 1.0 + 2.0 * q, 1.0 + 4.0 * q, 3.0 + 2.0 * q, 5.0]  # desired ones
        self._dn = _p2_increments(q)

    @property
    def q(self) -> float:
        return self._q

    @property
    def count(self) -> int:
        return self._count

    @property
    def value(self) -> float:
        if self._count == 0:
            raise ValueError("quantile of no samples")
        if self._count < 5:
            return exact_quantile(self._heights, self._q)
        return self._heights[2]

    def add(self, x: float) -> None:
        x = _check(x)
        self._count += 1
        h = self._heights
        if self._count <= 5:
            h.append(x)
            if self._count == 5:
                h.sort()
            return
        # Find the cell k with h[k] <= x < h[k+1], stretching the extremes if needed.
        if x < h[0]:
            h[0] = x
            k = 0
        elif x >= h[4]:
            h[4] = x
            k = 3
        else:
            k = 0
            while x >= h[k + 1]:
                k += 1
        pos, npos, dn = self._pos, self._npos, self._dn
        for i in range(k + 1, 5):
            pos[i] += 1
        for i in range(5):
            npos[i] += dn[i]
        for i in (1, 2, 3):
            d = npos[i] - pos[i]
            if (d >= 1.0 and pos[i + 1] - pos[i] > 1) or (d <= -1.0 and pos[i - 1] - pos[i] < -1):
                s = 1 if d > 0 else -1
                cand = self._parabolic(i, s)
                if not h[i - 1] < cand < h[i + 1]:
                    cand = h[i] + s * (h[i + s] - h[i]) / (pos[i + s] - pos[i])
                h[i] = cand
                pos[i] += s

    def _parabolic(self, i: int, s: int) -> float:
        h, n = self._heights, self._pos
        return h[i] + s / (n[i + 1] - n[i - 1]) * (
            (n[i] - n[i - 1] + s) * (h[i + 1] - h[i]) / (n[i + 1] - n[i])
            + (n[i + 1] - n[i] - s) * (h[i] - h[i - 1]) / (n[i] - n[i - 1])
        )
