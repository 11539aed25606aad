"""Admission and load signals: adaptive concurrency, surge detection, adaptive thresholds.

Theory of operation -- **adaptive concurrency** (:class:`AdaptiveConcurrency`). A fixed
concurrency limit is either too low (idle capacity) or too high (queues, then timeouts). Like
Netflix's concurrency-limits, the limit is learned from latency: when more requests are in
flight than the server can work on at once, the surplus waits in a queue and the round-trip
time grows in proportion. Per window of samples (``window`` seconds and at least
``window_samples`` successful replies or drops, below) we take the mean RTT of the successful
replies as the *short* RTT and update the limit with Gradient2's rule::

    gradient = clamp(tolerance * long_rtt / short_rtt, 0.5, 1.0)
    target   = limit * gradient + queue_size
    limit    = (1 - smoothing) * limit + smoothing * target      (then min_limit..max_limit)

One deliberate difference from Gradient2: the *long* RTT -- the no-queueing baseline -- is not
an exponential average of the samples but is *measured*, as Envoy's adaptive-concurrency filter
does: at start and then every ``probe_interval`` seconds (jittered from the caller's rng), the
limit is pinned to ``probe_limit`` for as long as it takes to collect ``probe_samples`` replies
of requests admitted after every older request had finished; their mean RTT is the baseline
until the next probe (a normal window that is faster still lowers it). An average follows the
very queueing delay it is meant to measure: under steady overload it creeps up behind the short
RTT, the gradient returns to 1, and the limit grows by ``queue_size`` per window (with
Gradient2's 600-sample average it only stops ~30-fold past the real concurrency; a windowed
minimum drifts the same way, only slower -- both were tried in the simulator of
``tests/test_lb_limits.py``). A probe costs little: at 4 in flight the ``probe_samples``
replies arrive within ~12 service times, once a minute. With a server that works on ``C``
requests at once, saturated, short/long = limit / C, so the fixed point is
``limit = tolerance * C + queue_size`` -- a little above ``C``: the tolerated queue. Beyond it,
:meth:`AdaptiveConcurrency.acquire` returns None and the caller sheds the request with
:class:`agentcluster.errors.Rejected`. The limit does not grow while fewer than half of it were
in use (no demand, no evidence).

Failures are told apart by latency. A failure that took longer than ``2 * tolerance`` times the
baseline -- the latency at which the gradient already cuts hardest -- is a *drop*: a timeout,
or a server too slow to answer. Any faster failure is the agent's answer and is ignored (it
would make the server look fast; breakers and outlier ejection deal with errors). Drops count
towards closing a window, so a node where every call times out still closes windows (it has no
successful reply to time); a window in which drops are at least half of the calls cuts the limit
by Gradient2's hardest step (gradient 0.5, ``limit *= 1 - smoothing / 2``) without the
``queue_size`` headroom, down to ``min_limit``: with every call timing out there is no queue to
fill. A minority of drops among successful replies is ignored -- those replies' RTT says whether
work queues, and a few calls that hang are the breakers' business, not a reason to shed the
rest. A probe still measures successful replies only.

**Surges** (:class:`SurgeDetector`): arrivals are counted in ``bucket``-second buckets; the
short rate is the mean over the last ``short_buckets`` buckets and the baseline an EWMA of the
bucket rates (``baseline_halflife``). A surge starts when the short rate exceeds ``factor``
times the baseline (and ``min_rate``, so 3 requests after 1 is no surge) and ends after the
short rate stayed at or below ``end_factor`` times the baseline (or below ``min_rate``) for
``end_hold`` buckets -- two thresholds and a hold time, so a rate hovering at the edge does not
flap; "at or below", so that silence ends a surge even over a zero baseline. The baseline is
frozen during a surge (it would otherwise absorb the surge and end it) and is only trusted after
``warmup`` seconds of history. A frozen baseline would make a lasting step in traffic (20 rps,
then 60 rps for hours) a surge that never ends, hiding every later one; so a surge that is still
on after ``max_duration`` seconds is the traffic's new level: it ends, and its short rate
becomes the baseline.

**Adaptive thresholds** (:class:`AdaptiveThresholds`): the design's defaults (cpu 0.8, memory
0.85, connections 0.9, response time 1000 ms, error rate 0.05) are the starting thresholds and
the floors. Each metric learns the node's normal from *every* report: a level (an exponentially
weighted mean, old history fading with ``halflife`` reports; a plain mean over the first
``min_samples``) and a spread (the same average of the absolute deviation from the level, times
sqrt(pi / 2) to read as a standard deviation for Gaussian jitter -- linear in a deviation, so one
wild report moves it little, where a variance grows with its square). Once ``min_samples`` were
seen the threshold is ``min(ceiling, max(default, level + max(k * spread, min_margin * level)))``.
A node whose *normal* CPU is 0.85 +/- 0.02 thus breaches for its first ``min_samples`` reports,
then its threshold settles near 0.89, and a spike above that still breaches; ``min_margin`` keeps
a metric without jitter out of breach at its own level.

Breaching reports are learned too -- otherwise a normal above the default could never be learned
-- so a sustained change becomes the new normal: a step from 0.5 to a steady 0.9 breaches for
~170 reports (a third of ``halflife``). The step is a deviation from the lagging level, so it
also widens the spread, which then narrows with ``halflife``: for a few thousand reports after a
large step the threshold sits high, up to its ceiling. (Capping each learned deviation at the
current margin was tried: the margin still compounds up to the ceiling, and the step breaches
three times as long.) What keeps a sustained overload from ever becoming normal is the
ceiling: a report is learned as at most its ceiling -- no normal lies beyond it, and one absurd
report must not drag the level -- so a value at or above the ceiling always breaches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

__all__ = [
    "DEFAULT_THRESHOLDS",
    "AdaptiveConcurrency",
    "AdaptiveThresholds",
    "ConcurrencyConfig",
    "RejectReason",
    "SurgeConfig",
    "SurgeDetector",
    "SurgeEvent",
    "ThresholdSpec",
    "Ticket",
]


class RejectReason(StrEnum):
    """Why a node shed a call (:attr:`agentcluster.errors.Rejected.reason`)."""

    CONCURRENCY_LIMIT = "concurrency_limit"  # the node's adaptive concurrency limit is reached
    OVERLOAD = "overload"  # the agent's mailbox is full: it cannot queue another call


# -- adaptive concurrency ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConcurrencyConfig:
    # Netflix's initial limit: enough parallelism for a typical service before anything is known.
    initial_limit: float = 20.0
    # Never throttle below a few in flight: a limit of 1 serialises the node.
    min_limit: float = 4.0
    max_limit: float = 1000.0
    # Gradient2's default: each window moves the limit a fifth of the way to its target.
    smoothing: float = 0.2
    # Latency inflation accepted before the limit shrinks. Netflix uses 1.5 against an averaged
    # baseline; against a measured no-load baseline 1.2 absorbs ordinary jitter and keeps the
    # equilibrium close to the true concurrency (limit = 1.2 C + queue_size).
    tolerance: float = 1.2
    # Gradient2's default headroom: lets the limit probe upwards by a few requests per window.
    queue_size: float = 4.0
    # One window per second (Netflix's window) with at least 10 samples to average.
    window: float = 1.0
    window_samples: int = 10
    # Baseline probes: concurrency pinned to probe_limit (Envoy's min_concurrency is 3) until
    # probe_samples replies were measured (the mean of 50 has a ~14 % standard error even for
    # exponential service times), every probe_interval s +/- probe_jitter (Envoy: 60 s, 15 %).
    probe_limit: int = 4
    probe_samples: int = 50
    probe_interval: float = 60.0
    probe_jitter: float = 0.15

    def __post_init__(self) -> None:
        if not 1.0 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("need 1 <= min_limit <= initial_limit <= max_limit")
        if not (0.0 < self.smoothing <= 1.0 and self.tolerance >= 1.0 and self.queue_size >= 0):
            raise ValueError("need 0 < smoothing <= 1, tolerance >= 1, queue_size >= 0")
        if self.window <= 0.0 or self.window_samples < 1:
            raise ValueError("need window > 0 and window_samples >= 1")
        if self.probe_limit < 1 or self.probe_samples < 1 or self.probe_interval <= 0.0:
            raise ValueError("need probe_limit >= 1, probe_samples >= 1, probe_interval > 0")
        if not 0.0 <= self.probe_jitter < 1.0:
            raise ValueError("need 0 <= probe_jitter < 1")


class Ticket:
    """Proof of admission; hand it back to :meth:`AdaptiveConcurrency.release` exactly once."""

    __slots__ = ("clean", "epoch", "released", "start")

    def __init__(self, start: float, epoch: int, clean: bool) -> None:
        self.start = start
        self.epoch = epoch
        # Admitted during a probe after every older request had finished: its RTT has no
        # queueing of ours in it.
        self.clean = clean
        self.released = False


class AdaptiveConcurrency:
    """A Gradient2-style concurrency limiter with a probed baseline (module docstring)."""

    __slots__ = (
        "_drop_sum",
        "_drops",
        "_epoch",
        "_estimate",
        "_max_in_flight",
        "_next_probe",
        "_probe_n",
        "_probe_sum",
        "_rng",
        "_rtt_sum",
        "_samples",
        "_stale",
        "_window_start",
        "accepted",
        "config",
        "in_flight",
        "long_rtt",
        "probes",
        "probing",
        "shed",
        "short_rtt",
    )

    def __init__(
        self,
        config: ConcurrencyConfig | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        self.config = config = config or ConcurrencyConfig()
        # Jitters the probe schedule so balancers sharing a backend do not all pin together;
        # without an rng the schedule is exact.
        self._rng = rng
        self._estimate = config.initial_limit
        self.in_flight = 0
        self.accepted = 0
        self.shed = 0
        self.probes = 0
        self._window_start = now
        self._samples = 0
        self._rtt_sum = 0.0
        self._drops = 0
        self._drop_sum = 0.0
        self._max_in_flight = 0
        self.short_rtt = 0.0
        self.long_rtt = 0.0  # 0.0 until the first probe completes
        self._epoch = 0
        self._stale = 0
        self._probe_n = 0
        self._probe_sum = 0.0
        self._next_probe = now
        self.probing = False
        self._start_probe(now)

    @property
    def limit(self) -> int:
        """Requests admitted at once right now (pinned during a baseline probe)."""
        return self.config.probe_limit if self.probing else int(self._estimate)

    @property
    def estimate(self) -> float:
        """The learned limit, unrounded (kept through probes)."""
        return self._estimate

    def acquire(self, now: float) -> Ticket | None:
        """Admit a request (a ticket) or refuse it (None: shed -- the call path answers with :class:`agentcluster.errors.Rejected`)."""
        if self.probing:
            if self.in_flight >= self.config.probe_limit:
                self.shed += 1
                return None
            self.in_flight += 1
            self.accepted += 1
            return Ticket(now, self._epoch, self._stale == 0)
        if self.in_flight >= int(self._estimate):
            self.shed += 1
            return None
        self.in_flight += 1
        self.accepted += 1
        if self.in_flight > self._max_in_flight:
            self._max_in_flight = self.in_flight
        return Ticket(now, self._epoch, False)

    def release(self, ticket: Ticket, latency: float, ok: bool, now: float) -> None:
        """The admitted request finished after ``latency`` seconds (``ok`` False: failed)."""
        if ticket.released:
            raise ValueError("ticket released twice")
        ticket.released = True
        self.in_flight -= 1
        if ticket.epoch != self._epoch:
            self._stale -= 1
        if self.probing:
            if ok and ticket.clean and ticket.epoch == self._epoch and latency > 0.0:
                self._probe_n += 1
                self._probe_sum += latency
                if self._probe_n >= self.config.probe_samples:
                    self._end_probe(now)
            return
        cfg = self.config
        if ok:
            if latency > 0.0:
                self._samples += 1
                self._rtt_sum += latency
        elif latency > 2.0 * cfg.tolerance * self.long_rtt:
            # Far slower than the baseline: a timeout or a server too slow to answer, not the
            # agent's answer (module docstring). long_rtt > 0: a probe has completed.
            self._drops += 1
            self._drop_sum += latency
        if self._samples + self._drops >= cfg.window_samples and (
            now - self._window_start >= cfg.window
        ):
            self._close_window(now)
            if now >= self._next_probe:
                self._start_probe(now)

    def _new_epoch(self) -> None:
        self._epoch += 1
        self._stale = self.in_flight  # every request in flight now belongs to an older epoch

    def _start_probe(self, now: float) -> None:
        self.probing = True
        self._probe_n = 0
        self._probe_sum = 0.0
        self._new_epoch()

    def _end_probe(self, now: float) -> None:
        cfg = self.config
        self.long_rtt = self._probe_sum / self._probe_n
        self.probing = False
        self.probes += 1
        self._new_epoch()
        jitter = 1.0 if self._rng is None else self._rng.uniform(1.0, 1.0 + cfg.probe_jitter)
        self._next_probe = now + cfg.probe_interval * jitter
        self._window_start = now
        self._samples = 0
        self._rtt_sum = 0.0
        self._drops = 0
        self._drop_sum = 0.0
        self._max_in_flight = self.in_flight

    def _close_window(self, now: float) -> None:
        cfg = self.config
        samples, rtt_sum = self._samples, self._rtt_sum
        drops, drop_sum = self._drops, self._drop_sum
        busy = self._max_in_flight
        self._window_start = now
        self._samples = 0
        self._rtt_sum = 0.0
        self._drops = 0
        self._drop_sum = 0.0
        self._max_in_flight = self.in_flight
        if drops >= samples:  # drops > 0 here: a window holds at least one call
            # Mostly timeouts: no queue to fill, so no queue_size headroom either.
            self.short_rtt = (rtt_sum + drop_sum) / (samples + drops)
            self._estimate = max(cfg.min_limit, self._estimate * (1.0 - cfg.smoothing / 2.0))
            return
        short = rtt_sum / samples
        self.short_rtt = short
        if short < self.long_rtt:
            self.long_rtt = short  # a faster window than the probe: the probe was unlucky
        gradient = max(0.5, min(1.0, cfg.tolerance * self.long_rtt / short))
        if gradient >= 1.0 and busy < self._estimate / 2.0:
            return  # app-limited: no evidence that more concurrency would be served
        target = self._estimate * gradient + cfg.queue_size
        estimate = (1.0 - cfg.smoothing) * self._estimate + cfg.smoothing * target
        self._estimate = max(cfg.min_limit, min(cfg.max_limit, estimate))

    def snapshot(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "estimate": self._estimate,
            "probing": self.probing,
            "in_flight": self.in_flight,
            "accepted": self.accepted,
            "shed": self.shed,
            "short_rtt": self.short_rtt,
            "long_rtt": self.long_rtt,
        }


# -- surge detection ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SurgeConfig:
    # One-second buckets: the resolution at which a surge can be seen.
    bucket: float = 1.0
    # The short window (5 s) ignores a single bursty second but reacts within seconds.
    short_buckets: int = 5
    # The baseline halves its memory every 5 minutes: diurnal drift is followed, surges are not.
    baseline_halflife: float = 300.0
    # A surge is double the usual rate (the design's "surge" is a sharp rise, not growth).
    factor: float = 2.0
    # ... and lasts until the rate is back under 1.5x for end_hold buckets (hysteresis).
    end_factor: float = 1.5
    end_hold: int = 5
    # Below 10 rps a doubling is not worth re-planning the cluster for.
    min_rate: float = 10.0
    # Half a minute of history before the baseline is trusted.
    warmup: float = 30.0
    # A surge still on after five minutes (the baseline's half-life) is the new normal.
    max_duration: float = 300.0

    def __post_init__(self) -> None:
        if not (self.bucket > 0.0 and self.short_buckets >= 1 and self.end_hold >= 1):
            raise ValueError("need bucket > 0, short_buckets >= 1 and end_hold >= 1")
        if not 1.0 <= self.end_factor <= self.factor:
            raise ValueError("need 1 <= end_factor <= factor")
        if self.baseline_halflife <= 0.0 or self.min_rate < 0.0 or self.warmup < 0.0:
            raise ValueError("need baseline_halflife > 0, min_rate >= 0 and warmup >= 0")
        if self.max_duration <= 0.0:
            raise ValueError("need max_duration > 0")


class SurgeEvent(msgspec.Struct, frozen=True):
    kind: str  # "start" or "end"
    at: float
    short_rate: float
    baseline: float


class SurgeDetector:
    """Request-rate surge detection with hysteresis (see the module docstring)."""

    __slots__ = (
        "_alpha",
        "_bucket_end",
        "_buckets_seen",
        "_calm",
        "_count",
        "_events",
        "_ring",
        "_ring_sum",
        "_since",
        "_slot",
        "active",
        "baseline",
        "config",
        "short_rate",
    )

    def __init__(self, config: SurgeConfig | None = None, now: float = 0.0) -> None:
        self.config = config = config or SurgeConfig()
        self._alpha = 1.0 - 0.5 ** (config.bucket / config.baseline_halflife)
        self._bucket_end = now + config.bucket
        self._count = 0
        self._ring = [0] * config.short_buckets
        self._ring_sum = 0
        self._slot = 0
        self._buckets_seen = 0
        self._calm = 0
        self._since = now  # when the current surge started
        self._events: list[SurgeEvent] = []
        self.active = False
        self.baseline = 0.0
        self.short_rate = 0.0

    def record(self, now: float, n: int = 1) -> None:
        """``n`` requests arrived at ``now``."""
        if now >= self._bucket_end:
            self._roll(now)
        self._count += n

    def tick(self, now: float) -> list[SurgeEvent]:
        """Close due buckets; every start/end event since the last tick, oldest first."""
        if now >= self._bucket_end:
            self._roll(now)
        events, self._events = self._events, []
        return events

    def _roll(self, now: float) -> None:
        cfg = self.config
        elapsed = math.floor((now - self._bucket_end) / cfg.bucket) + 1
        # After a long silence only the last few empty buckets can change the verdict; the
        # baseline decays through the others in closed form.
        explicit = min(elapsed, cfg.short_buckets + cfg.end_hold + 1)
        skipped = elapsed - explicit
        end = self._bucket_end
        self._close_bucket(self._count, end)
        for _ in range(explicit - 1):
            end += cfg.bucket
            self._close_bucket(0, end)
        if skipped:
            # The ring is all zeros by now (explicit > short_buckets), and a surge has ended.
            self._buckets_seen += skipped
            if not self.active:
                self.baseline *= (1.0 - self._alpha) ** skipped
        self._count = 0
        self._bucket_end = end + (skipped + 1) * cfg.bucket

    def _close_bucket(self, count: int, at: float) -> None:
        cfg = self.config
        self._ring_sum += count - self._ring[self._slot]
        self._ring[self._slot] = count
        self._slot = (self._slot + 1) % cfg.short_buckets
        self._buckets_seen += 1
        rate = count / cfg.bucket
        filled = min(self._buckets_seen, cfg.short_buckets)
        self.short_rate = self._ring_sum / (filled * cfg.bucket)
        warm = self._buckets_seen * cfg.bucket >= cfg.warmup
        if not self.active:
            if (
                warm
                and self.short_rate >= cfg.min_rate
                and (self.short_rate > cfg.factor * self.baseline)
            ):
                self.active = True
                self._calm = 0
                self._since = at
                self._events.append(SurgeEvent("start", at, self.short_rate, self.baseline))
                return
            if self._buckets_seen == 1:
                self.baseline = rate
            elif self._buckets_seen * cfg.bucket <= cfg.warmup:
                # A plain running mean while warming up: an EWMA from zero would lag for minutes.
                self.baseline += (rate - self.baseline) / self._buckets_seen
            else:
                self.baseline += self._alpha * (rate - self.baseline)
            return
        if self.short_rate <= cfg.end_factor * self.baseline or self.short_rate < cfg.min_rate:
            self._calm += 1
            if self._calm >= cfg.end_hold:
                self.active = False
                self._events.append(SurgeEvent("end", at, self.short_rate, self.baseline))
            return
        self._calm = 0
        if at - self._since >= cfg.max_duration:
            # Settled at a new level rather than surging: adopt it, so later surges are
            # measured against it.
            self.baseline = self.short_rate
            self.active = False
            self._events.append(SurgeEvent("end", at, self.short_rate, self.baseline))


# -- adaptive thresholds -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThresholdSpec:
    default: float  # the design's value: the threshold never adapts below it
    ceiling: float  # and never above this


DEFAULT_THRESHOLDS: dict[str, ThresholdSpec] = {
    # Fractions of capacity; ceilings leave a last margin before saturation.
    "cpu": ThresholdSpec(0.8, 0.95),
    "memory": ThresholdSpec(0.85, 0.95),
    "connections": ThresholdSpec(0.9, 0.98),
    # A node normally at 2 s is allowed its normal, but 10 s is never normal.
    "response_time_ms": ThresholdSpec(1000.0, 10000.0),
    # A node that normally fails a quarter of its calls is broken, whatever its history.
    "error_rate": ThresholdSpec(0.05, 0.25),
}


# A Gaussian's standard deviation over its mean absolute deviation.
_SIGMA_PER_MAD = math.sqrt(math.pi / 2.0)


class _Stat:
    __slots__ = ("dev", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0  # the level
        self.dev = 0.0  # mean absolute deviation from the level


class AdaptiveThresholds:
    """Per-metric thresholds that start at the design's defaults and follow a node's sustained
    normal, between the defaults and the ceilings (module docstring)."""

    __slots__ = ("_alpha", "_stats", "_thresholds", "k", "min_margin", "min_samples", "specs")

    def __init__(
        self,
        specs: Mapping[str, ThresholdSpec] | None = None,
        k: float = 3.0,
        halflife: float = 500.0,
        min_samples: int = 30,
        min_margin: float = 0.02,
    ) -> None:
        # k = 3: a normal node exceeds mean + 3 sigma in ~0.1 % of samples.
        # halflife = 500 samples: at one load report every 2 s, about a quarter of an hour.
        # min_samples = 30: a spread from fewer samples is too unstable to raise a threshold.
        # min_margin = 2 %: a metric without jitter (a steady error rate) has no spread, and its
        # own level must not be a breach.
        if k <= 0.0 or halflife <= 0.0 or min_samples < 2 or min_margin < 0.0:
            raise ValueError("need k > 0, halflife > 0, min_samples >= 2 and min_margin >= 0")
        self.specs = dict(DEFAULT_THRESHOLDS if specs is None else specs)
        for name, spec in self.specs.items():
            if spec.ceiling < spec.default:
                raise ValueError(f"{name}: ceiling below default")
        self.k = k
        self.min_margin = min_margin
        self.min_samples = min_samples
        self._alpha = 1.0 - 0.5 ** (1.0 / halflife)
        self._stats = {name: _Stat() for name in self.specs}
        self._thresholds = {name: spec.default for name, spec in self.specs.items()}

    def threshold(self, name: str) -> float:
        return self._thresholds[name]

    def thresholds(self) -> dict[str, float]:
        return dict(self._thresholds)

    def breached(self, metrics: Mapping[str, float]) -> list[str]:
        """Names of the known metrics in ``metrics`` at or above their threshold, in spec order."""
        out: list[str] = []
        for name, limit in self._thresholds.items():
            value = metrics.get(name)
            if value is not None and value >= limit:
                out.append(name)
        return out

    def observe(self, metrics: Mapping[str, float]) -> list[str]:
        """Check ``metrics`` against the thresholds, then learn from them; the breached names.

        Unknown names and non-finite values are ignored (bad reports must not poison the
        baseline)."""
        breached: list[str] = []
        alpha = self._alpha
        for name, stat in self._stats.items():
            value = metrics.get(name)
            if value is None or not math.isfinite(value):
                continue
            if value >= self._thresholds[name]:
                breached.append(name)
            spec = self.specs[name]
            # No normal lies beyond the ceiling, and one absurd report must not drag the level.
            value = min(value, spec.ceiling)
            stat.n += 1
            if stat.n == 1:
                stat.mean = value
                stat.dev = 0.0
                continue
            # Plain means while warming up, so the first samples are weighted equally.
            warming = stat.n <= self.min_samples
            deviation = abs(value - stat.mean)
            stat.mean += (value - stat.mean) * (1.0 / stat.n if warming else alpha)
            stat.dev += (deviation - stat.dev) * (1.0 / (stat.n - 1) if warming else alpha)
            if stat.n >= self.min_samples:
                spread = _SIGMA_PER_MAD * stat.dev
                margin = max(self.k * spread, self.min_margin * abs(stat.mean))
                self._thresholds[name] = min(spec.ceiling, max(spec.default, stat.mean + margin))
        return breached

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "threshold": self._thresholds[name],
                "mean": stat.mean,
                "stdev": _SIGMA_PER_MAD * stat.dev,
                "samples": float(stat.n),
            }
            for name, stat in self._stats.items()
        }
