"""Alerts: threshold and burn-rate rules, deduplication, hysteresis, escalation, webhooks.

Theory of operation. Everything but :class:`WebhookSender` is a pure core that takes ``now``.

* :class:`AlertRule` compares one metric with a threshold. It fires after ``for_samples``
  consecutive breaching samples and resolves only after ``clear_samples`` consecutive samples
  past ``clear_threshold`` (which lies on the healthy side of ``threshold``). The gap between the
  two thresholds is the hysteresis band: a value oscillating around ``threshold`` stays inside
  it, so it fires once and does not resolve until it really falls back -- no flapping.
* :class:`BurnRateRule` is the multi-window, multi-burn-rate error-budget alert of the Google
  SRE workbook (ch. 5): the burn rate is ``error_ratio / (1 - slo)``; a pair fires when the
  burn rate exceeds its factor over *both* its long window (enough budget is really gone) and
  its short window (it is still happening, so the alert resets quickly once it stops). Counts
  go into a ring of time buckets with one running sum per window, so recording is O(1) and the
  windows slide incrementally (amortised O(1) per bucket crossed).
* :class:`AlertEngine` keeps at most one active :class:`Alert` per (rule, node): breaching again
  while active only updates it (value, ``last_seen``, ``count``) -- that is the deduplication.
  It returns :class:`AlertEvent` s (``fired`` / ``resolved``); the agent turns them into signals
  ``cluster.health.alert.<severity>`` (see :attr:`AlertEvent.signal_type`). A burn-rate alert
  whose severity rises (ticket -> page) fires again under the same id with the new severity;
  it never falls back until resolved. Resolved alerts go into a bounded history.
* :class:`EscalationMatrix` maps an event (severity, dedup count, age) to :class:`Action` s:
  ``log``, ``webhook`` (URL) or ``signal`` (``cluster.orchestrator.escalation``), and repeats
  the actions of unresolved alerts of chosen severities every ``reescalate_after`` seconds.
* :class:`WebhookSender` is the only I/O: it POSTs JSON over HTTP/1.1 (stdlib asyncio streams,
  TLS for https), with a per-attempt timeout, retries with jittered exponential backoff (seeded
  rng, injectable sleep) and a bounded queue. It never raises into its caller: failures are
  logged and counted in :class:`WebhookStats`. It lives in :mod:`agentcluster.health.webhook`
  (to keep this file short) and is re-exported here.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from agentcluster.health.webhook import WebhookSender, WebhookStats, backoff_delay

__all__ = [
    "ESCALATION_SIGNAL",
    "SRE_WINDOWS",
    "Action",
    "Alert",
    "AlertEngine",
    "AlertEvent",
    "AlertRule",
    "BurnRateRule",
    "BurnRateTracker",
    "BurnWindow",
    "EscalationMatrix",
    "EscalationStep",
    "WebhookSender",
    "WebhookStats",
    "backoff_delay",
]

log = logging.getLogger(__name__)

Comparison = Literal[">", "<", ">=", "<="]
Severity = Literal["critical", "warning", "info"]
ActionKind = Literal["log", "webhook", "signal"]

ESCALATION_SIGNAL = "cluster.orchestrator.escalation"
_SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
# (fire test, clear test): clearing is "no longer past clear_threshold" in the rule's direction.
_OPS: dict[str, tuple[Callable[[float, float], bool], Callable[[float, float], bool]]] = {
    ">": (operator.gt, operator.le),
    ">=": (operator.ge, operator.lt),
    "<": (operator.lt, operator.ge),
    "<=": (operator.le, operator.gt),
}


# ------------------------------------------------------------------------------------ rules
class AlertRule(msgspec.Struct, frozen=True):
    """``metric <comparison> threshold`` for ``for_samples`` samples in a row fires; the value
    past ``clear_threshold`` (default: ``threshold``) for ``clear_samples`` in a row resolves."""

    name: str
    metric: str
    comparison: Comparison
    threshold: float
    severity: Severity = "warning"
    for_samples: int = 1
    clear_threshold: float | None = None
    clear_samples: int = 1
    labels: dict[str, str] = {}

    def __post_init__(self) -> None:
        if not self.name or not self.metric:
            raise ValueError("an alert rule needs a name and a metric")
        if self.comparison not in _OPS:
            raise ValueError(f"unknown comparison {self.comparison!r}")
        if self.for_samples < 1 or self.clear_samples < 1:
            raise ValueError("for_samples and clear_samples must be >= 1")
        if not math.isfinite(self.threshold):
            raise ValueError("threshold must be finite")
        clear = self.clear_threshold
        if clear is not None:
            upward = self.comparison in (">", ">=")
            if not math.isfinite(clear) or (
                clear > self.threshold if upward else clear < self.threshold
            ):
                raise ValueError(
                    f"rule {self.name!r}: clear_threshold must be on the healthy side of threshold"
                )

    @property
    def clear_at(self) -> float:
        return self.threshold if self.clear_threshold is None else self.clear_threshold


class BurnWindow(msgspec.Struct, frozen=True):
    """Fire at ``severity`` when the burn rate exceeds ``burn_rate`` over both windows."""

    long: float
    short: float
    burn_rate: float
    severity: Severity


# The SRE workbook's page and ticket pairs for a 30-day budget (2 % in 1 h, 5 % in 6 h).
SRE_WINDOWS: tuple[BurnWindow, ...] = (
    BurnWindow(long=3600.0, short=300.0, burn_rate=14.4, severity="critical"),
    BurnWindow(long=21600.0, short=1800.0, burn_rate=6.0, severity="warning"),
)


class BurnRateRule(msgspec.Struct, frozen=True):
    """Error-budget burn over (good, total) counts of ``metric``; ``slo`` is e.g. 0.999.

    ``bucket`` is the time resolution of the windows (0: a tenth of the shortest window);
    ``min_events`` keeps a handful of requests from paging (long-window total below it never
    fires)."""

    name: str
    metric: str
    slo: float
    windows: tuple[BurnWindow, ...] = SRE_WINDOWS
    bucket: float = 0.0
    min_events: int = 1
    labels: dict[str, str] = {}

    def __post_init__(self) -> None:
        if not self.name or not self.metric:
            raise ValueError("a burn-rate rule needs a name and a metric")
        if not 0.0 < self.slo < 1.0:
            raise ValueError("slo must be in (0, 1)")
        if not self.windows:
            raise ValueError("a burn-rate rule needs at least one window pair")
        for w in self.windows:
            if not (0.0 < w.short <= w.long and w.burn_rate > 0.0):
                raise ValueError(f"rule {self.name!r}: bad window {w!r}")
        if self.bucket < 0.0 or (self.bucket > 0.0 and self.bucket > self.resolution_limit()):
            raise ValueError("bucket must be positive and no longer than the shortest window")

    def resolution_limit(self) -> float:
        return min(w.short for w in self.windows)

    def bucket_seconds(self) -> float:
        return self.bucket if self.bucket > 0.0 else self.resolution_limit() / 10.0

    @classmethod
    def sre(
        cls, name: str, metric: str, slo: float, *, scale: float = 1.0, min_events: int = 1
    ) -> BurnRateRule:
        """The workbook's page/ticket pairs with every window multiplied by ``scale`` (tests use
        a small scale to run hours of budget in seconds)."""
        windows = tuple(
            BurnWindow(
                long=w.long * scale,
                short=w.short * scale,
                burn_rate=w.burn_rate,
                severity=w.severity,
            )
            for w in SRE_WINDOWS
        )
        return cls(name=name, metric=metric, slo=slo, windows=windows, min_events=min_events)


class BurnRateTracker:
    """Sliding sums of (bad, total) over each distinct window length of one rule (pure).

    Buckets live in a ring sized for the longest window; each window keeps a running sum and
    the index of its oldest bucket, and subtracts buckets as they slide out. Observations older
    than the current bucket are counted in the current one (late data is rare and the error it
    causes is at most one bucket)."""

    __slots__ = (
        "_bad",
        "_bucket",
        "_cur",
        "_edge",
        "_k",
        "_lengths",
        "_n",
        "_ring_bad",
        "_ring_idx",
        "_ring_total",
        "_total",
    )

    def __init__(self, rule: BurnRateRule) -> None:
        self._bucket = rule.bucket_seconds()
        lengths = sorted({x for w in rule.windows for x in (w.long, w.short)})
        self._lengths: dict[float, int] = {x: i for i, x in enumerate(lengths)}
        self._k = [max(1, math.ceil(x / self._bucket - 1e-9)) for x in lengths]
        self._n = max(self._k)
        self._ring_idx = [-1] * self._n
        self._ring_bad = [0] * self._n
        self._ring_total = [0] * self._n
        self._bad = [0] * len(lengths)
        self._total = [0] * len(lengths)
        self._edge = [0] * len(lengths)
        self._cur: int | None = None

    def observe(self, t: float, good: int, total: int) -> None:
        if total < 0 or good < 0 or good > total:
            raise ValueError(f"bad counts good={good} total={total}")
        idx = self._advance(t)
        bad = total - good
        slot = idx % self._n
        if self._ring_idx[slot] != idx:
            self._ring_idx[slot] = idx
            self._ring_bad[slot] = 0
            self._ring_total[slot] = 0
        self._ring_bad[slot] += bad
        self._ring_total[slot] += total
        for i in range(len(self._k)):
            self._bad[i] += bad
            self._total[i] += total

    def counts(self, window: float, now: float) -> tuple[int, int]:
        """(bad, total) over ``window`` (one of the rule's lengths) ending at ``now``."""
        self._advance(now)
        i = self._lengths[window]
        return self._bad[i], self._total[i]

    def _advance(self, t: float) -> int:
        if not math.isfinite(t):
            raise ValueError("time must be finite")
        idx = math.floor(t / self._bucket)
        cur = self._cur
        if cur is None:
            self._cur = idx
            self._edge = [idx - k + 1 for k in self._k]
            return idx
        if idx <= cur:
            return cur
        for i, k in enumerate(self._k):
            new_edge = idx - k + 1
            e = self._edge[i]
            if new_edge > cur:
                # Every recorded bucket slid out of this window.
                self._bad[i] = 0
                self._total[i] = 0
            else:
                while e < new_edge:
                    slot = e % self._n
                    if self._ring_idx[slot] == e:
                        self._bad[i] -= self._ring_bad[slot]
                        self._total[i] -= self._ring_total[slot]
                    e += 1
            self._edge[i] = new_edge
        self._cur = idx
        return idx


# ----------------------------------------------------------------------------------- alerts
class Alert(msgspec.Struct, frozen=True):
    """One alert of ``rule`` about ``node``; ``count`` is how many breaching samples it has
    absorbed (deduplicated) since it fired; ``resolved_at`` is 0.0 while active."""

    id: str
    rule: str
    node: str
    severity: Severity
    value: float
    since: float
    last_seen: float
    count: int
    labels: dict[str, str] = {}
    resolved_at: float = 0.0


class AlertEvent(msgspec.Struct, frozen=True):
    kind: Literal["fired", "resolved"]
    alert: Alert

    @property
    def signal_type(self) -> str:
        """The signal the agent emits for this event."""
        if self.kind == "fired":
            return f"cluster.health.alert.{self.alert.severity}"
        return "cluster.health.alert.resolved"


class _Track:
    """Per (rule, node) state; mutable so a deduplicated sample allocates nothing."""

    __slots__ = ("alert_id", "breach", "clear", "count", "last_seen", "severity", "since", "value")

    def __init__(self) -> None:
        self.breach = 0
        self.clear = 0
        self.alert_id = ""  # "" while no alert is active
        self.severity: Severity = "info"
        self.value = 0.0
        self.since = 0.0
        self.last_seen = 0.0
        self.count = 0


class AlertEngine:
    """Evaluates rules per node; one active alert per (rule, node). Pure: takes ``now``."""

    def __init__(
        self,
        rules: Sequence[AlertRule] = (),
        burn_rules: Sequence[BurnRateRule] = (),
        *,
        history: int = 256,
    ) -> None:
        self._rules: dict[str, AlertRule] = {}
        self._by_metric: dict[str, list[AlertRule]] = {}
        self._burn: dict[str, BurnRateRule] = {}
        self._burn_by_metric: dict[str, list[BurnRateRule]] = {}
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._burn_trackers: dict[tuple[str, str], BurnRateTracker] = {}
        self._history: deque[Alert] = deque(maxlen=history)
        self._seq = 0
        for rule in rules:
            self.add_rule(rule)
        for brule in burn_rules:
            self.add_rule(brule)

    # -- configuration
    def add_rule(self, rule: AlertRule | BurnRateRule) -> None:
        if rule.name in self._rules or rule.name in self._burn:
            raise ValueError(f"duplicate rule name {rule.name!r}")
        if isinstance(rule, AlertRule):
            self._rules[rule.name] = rule
            self._by_metric.setdefault(rule.metric, []).append(rule)
        else:
            self._burn[rule.name] = rule
            self._burn_by_metric.setdefault(rule.metric, []).append(rule)

    def remove_rule(self, name: str, now: float) -> list[AlertEvent]:
        """Drop a rule; its active alerts resolve."""
        rule = self._rules.pop(name, None)
        brule = self._burn.pop(name, None)
        if rule is not None:
            self._by_metric[rule.metric].remove(rule)
        if brule is not None:
            self._burn_by_metric[brule.metric].remove(brule)
            for key in [k for k in self._burn_trackers if k[0] == name]:
                del self._burn_trackers[key]
        events: list[AlertEvent] = []
        for key in [k for k in self._tracks if k[0] == name]:
            tr = self._tracks.pop(key)
            if tr.alert_id:
                events.append(self._resolve(key, tr, now))
        return events

    def forget_node(self, node: str, now: float) -> list[AlertEvent]:
        """A node left: resolve its alerts and free its state."""
        events: list[AlertEvent] = []
        for key in [k for k in self._tracks if k[1] == node]:
            tr = self._tracks.pop(key)
            if tr.alert_id:
                events.append(self._resolve(key, tr, now))
        for key in [k for k in self._burn_trackers if k[1] == node]:
            del self._burn_trackers[key]
        return events

    # -- threshold rules
    def evaluate(self, node: str, metrics: Mapping[str, float], now: float) -> list[AlertEvent]:
        """Feed one sample of ``metrics`` for ``node``; metrics without a rule are ignored, and
        non-finite values are skipped (a NaN must neither fire nor clear an alert)."""
        events: list[AlertEvent] = []
        by_metric = self._by_metric
        for metric, value in metrics.items():
            rules = by_metric.get(metric)
            if not rules:
                continue
            value = float(value)
            if not math.isfinite(value):
                continue
            for rule in rules:
                fire, clear = _OPS[rule.comparison]
                key = (rule.name, node)
                tr = self._tracks.get(key)
                if tr is None:
                    tr = self._tracks[key] = _Track()
                if not tr.alert_id:
                    if fire(value, rule.threshold):
                        tr.breach += 1
                        if tr.breach >= rule.for_samples:
                            self._fire(key, tr, rule.severity, value, now)
                            events.append(AlertEvent("fired", self._snapshot(key, tr)))
                    else:
                        tr.breach = 0
                    continue
                tr.value = value
                tr.last_seen = now
                if clear(value, rule.clear_at):
                    tr.clear += 1
                    if tr.clear >= rule.clear_samples:
                        events.append(self._resolve(key, tr, now))
                else:
                    tr.clear = 0
                    if fire(value, rule.threshold):
                        tr.count += 1
        return events

    # -- burn-rate rules
    def observe_counts(
        self, node: str, metric: str, now: float, good: int, total: int
    ) -> list[AlertEvent]:
        """Record ``good`` of ``total`` events of ``metric`` on ``node`` since the previous call
        (deltas, not cumulative counters) and evaluate that node's burn-rate rules."""
        events: list[AlertEvent] = []
        for rule in self._burn_by_metric.get(metric, ()):
            key = (rule.name, node)
            tracker = self._burn_trackers.get(key)
            if tracker is None:
                tracker = self._burn_trackers[key] = BurnRateTracker(rule)
            tracker.observe(now, good, total)
            ev = self._evaluate_burn(rule, key, tracker, now)
            if ev is not None:
                events.append(ev)
        return events

    def tick(self, now: float) -> list[AlertEvent]:
        """Slide every burn-rate window to ``now``: alerts resolve when errors stop, even if no
        more counts arrive."""
        events: list[AlertEvent] = []
        for key, tracker in self._burn_trackers.items():
            ev = self._evaluate_burn(self._burn[key[0]], key, tracker, now)
            if ev is not None:
                events.append(ev)
        return events

    def burn_rates(self, rule_name: str, node: str, now: float) -> list[tuple[float, float]]:
        """(long, short) burn rates per window pair of a rule, for display."""
        rule = self._burn[rule_name]
        tracker = self._burn_trackers.get((rule_name, node))
        if tracker is None:
            return [(0.0, 0.0) for _ in rule.windows]
        return [
            (_burn(tracker, w.long, now, rule.slo), _burn(tracker, w.short, now, rule.slo))
            for w in rule.windows
        ]

    def _evaluate_burn(
        self, rule: BurnRateRule, key: tuple[str, str], tracker: BurnRateTracker, now: float
    ) -> AlertEvent | None:
        best: BurnWindow | None = None
        best_rate = 0.0
        for w in rule.windows:
            bad, total = tracker.counts(w.long, now)
            if total < rule.min_events or total == 0:
                continue
            long_rate = bad / total / (1.0 - rule.slo)
            if long_rate <= w.burn_rate:
                continue
            if _burn(tracker, w.short, now, rule.slo) <= w.burn_rate:
                continue
            if best is None or _SEVERITY_RANK[w.severity] > _SEVERITY_RANK[best.severity]:
                best, best_rate = w, long_rate
        tr = self._tracks.get(key)
        if best is None:
            if tr is not None and tr.alert_id:
                return self._resolve(key, tr, now)
            return None
        if tr is None:
            tr = self._tracks[key] = _Track()
        if not tr.alert_id:
            self._fire(key, tr, best.severity, best_rate, now)
            return AlertEvent("fired", self._snapshot(key, tr))
        tr.value = best_rate
        tr.last_seen = now
        tr.count += 1
        if _SEVERITY_RANK[best.severity] > _SEVERITY_RANK[tr.severity]:
            tr.severity = best.severity
            return AlertEvent("fired", self._snapshot(key, tr))
        return None

    # -- queries
    def active(self) -> list[Alert]:
        return [self._snapshot(k, tr) for k, tr in self._tracks.items() if tr.alert_id]

    def active_for(self, node: str) -> list[Alert]:
        return [
            self._snapshot(k, tr) for k, tr in self._tracks.items() if tr.alert_id and k[1] == node
        ]

    def history(self) -> list[Alert]:
        """Resolved alerts, oldest first (bounded)."""
        return list(self._history)

    # -- internals
    def _fire(
        self, key: tuple[str, str], tr: _Track, severity: Severity, value: float, now: float
    ) -> None:
        self._seq += 1
        tr.alert_id = f"{key[0]}@{key[1]}#{self._seq}"
        tr.severity = severity
        tr.value = value
        tr.since = now
        tr.last_seen = now
        tr.count = 1
        tr.breach = 0
        tr.clear = 0

    def _resolve(self, key: tuple[str, str], tr: _Track, now: float) -> AlertEvent:
        alert = self._snapshot(key, tr, resolved_at=now)
        self._history.append(alert)
        tr.alert_id = ""
        tr.breach = 0
        tr.clear = 0
        return AlertEvent("resolved", alert)

    def _snapshot(self, key: tuple[str, str], tr: _Track, resolved_at: float = 0.0) -> Alert:
        rule = self._rules.get(key[0]) or self._burn.get(key[0])
        labels = dict(rule.labels) if rule is not None else {}
        return Alert(
            id=tr.alert_id,
            rule=key[0],
            node=key[1],
            severity=tr.severity,
            value=tr.value,
            since=tr.since,
            last_seen=tr.last_seen,
            count=tr.count,
            labels=labels,
            resolved_at=resolved_at,
        )


def _burn(tracker: BurnRateTracker, window: float, now: float, slo: float) -> float:
    bad, total = tracker.counts(window, now)
    return bad / total / (1.0 - slo) if total else 0.0


# ------------------------------------------------------------------------------- escalation
class EscalationStep(msgspec.Struct, frozen=True):
    """Do ``action`` for alerts of ``severity`` once they have absorbed ``min_count`` samples
    and are ``min_age`` seconds old; ``on_resolve`` also does it when they resolve."""

    severity: Severity
    action: ActionKind
    url: str = ""
    min_count: int = 1
    min_age: float = 0.0
    on_resolve: bool = False

    def __post_init__(self) -> None:
        if self.action == "webhook" and not self.url:
            raise ValueError("a webhook step needs a url")


class Action(msgspec.Struct, frozen=True):
    """Something to do about an alert. ``event`` is why: the alert ``fired``, a delayed step
    became due (``escalated``), it is still unresolved (``reescalated``, ``level`` >= 1), or it
    ``resolved``."""

    kind: ActionKind
    event: Literal["fired", "escalated", "reescalated", "resolved"]
    alert: Alert
    url: str = ""
    signal_type: str = ""
    level: int = 0

    def body(self) -> bytes:
        """The JSON document a webhook receives (also the signal's data)."""
        return msgspec.json.encode({"event": self.event, "level": self.level, "alert": self.alert})


class _EscState:
    __slots__ = ("done", "last", "level")

    def __init__(self, now: float) -> None:
        self.done: set[int] = set()
        self.last = now
        self.level = 0


class EscalationMatrix:
    """Severity (and count / age) -> actions, with re-escalation of unresolved alerts (pure)."""

    def __init__(
        self,
        steps: Sequence[EscalationStep],
        *,
        reescalate_after: float = 300.0,
        reescalate: Sequence[Severity] = ("critical",),
        max_reescalations: int = 0,
    ) -> None:
        if reescalate_after <= 0.0:
            raise ValueError("reescalate_after must be positive")
        self._steps = tuple(steps)
        self._reescalate_after = reescalate_after
        self._reescalate = frozenset(reescalate)
        self._max = max_reescalations
        self._state: dict[str, _EscState] = {}

    @classmethod
    def default(cls, webhook_url: str = "", **kwargs: Any) -> EscalationMatrix:
        """info and warning are logged; critical is logged, signalled to the orchestrator and
        (with a url) POSTed, and re-escalated every 5 minutes until resolved."""
        steps = [
            EscalationStep("info", "log"),
            EscalationStep("warning", "log", on_resolve=True),
            EscalationStep("critical", "log", on_resolve=True),
            EscalationStep("critical", "signal"),
        ]
        if webhook_url:
            steps.append(EscalationStep("critical", "webhook", url=webhook_url, on_resolve=True))
        return cls(steps, **kwargs)

    def actions_for(self, event: AlertEvent, now: float) -> list[Action]:
        alert = event.alert
        if event.kind == "resolved":
            state = self._state.pop(alert.id, None)
            return [
                self._action(s, "resolved", alert, 0 if state is None else state.level)
                for i, s in enumerate(self._steps)
                if s.on_resolve
                and s.severity == alert.severity
                and (state is None or i in state.done)
            ]
        state = self._state.get(alert.id)
        if state is None:
            state = self._state[alert.id] = _EscState(now)
        return self._due(alert, state, now, "fired")

    def tick(self, now: float, active: Iterable[Alert]) -> list[Action]:
        """Delayed steps that became due and re-escalations of ``active`` alerts."""
        out: list[Action] = []
        for alert in active:
            state = self._state.get(alert.id)
            if state is None:
                state = self._state[alert.id] = _EscState(now)
                out.extend(self._due(alert, state, now, "fired"))
                continue
            out.extend(self._due(alert, state, now, "escalated"))
            if (
                alert.severity in self._reescalate
                and now - state.last >= self._reescalate_after
                and (self._max == 0 or state.level < self._max)
            ):
                state.level += 1
                state.last = now
                out.extend(
                    self._action(s, "reescalated", alert, state.level)
                    for i, s in enumerate(self._steps)
                    if i in state.done and s.severity == alert.severity
                )
        return out

    def forget(self, alert_id: str) -> None:
        self._state.pop(alert_id, None)

    def _due(
        self,
        alert: Alert,
        state: _EscState,
        now: float,
        event: Literal["fired", "escalated"],
    ) -> list[Action]:
        out: list[Action] = []
        age = now - alert.since
        for i, s in enumerate(self._steps):
            if (
                i not in state.done
                and s.severity == alert.severity
                and alert.count >= s.min_count
                and age >= s.min_age
            ):
                state.done.add(i)
                state.last = now
                out.append(self._action(s, event, alert, state.level))
        return out

    @staticmethod
    def _action(step: EscalationStep, event: Any, alert: Alert, level: int) -> Action:
        return Action(
            kind=step.action,
            event=event,
            alert=alert,
            url=step.url,
            signal_type=ESCALATION_SIGNAL if step.action == "signal" else "",
            level=level,
        )
