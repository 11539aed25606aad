"""Quarantine bookkeeping and the observer-side vote rule (pure core).

Theory of operation. Every node's HealthMonitor holds one :class:`QuarantineBook`: its copy of
the cluster-wide quarantine view. Quarantines are *decided* elsewhere -- a majority proposal
among all health monitors -- and every monitor applies the decision with :meth:`quarantine`,
which is idempotent, so all books converge on the same entries.

* **Proposing.** :meth:`QuarantineBook.propose_reason` turns a local suspicion into a
  :class:`QuarantineProposal` (node, reason, evidence, the duration that reason carries).
* **Voting.** :func:`vote_on` is what each monitor answers: ``yes`` only if its *own* recent
  checks of that node agree (at least ``min_bad`` of its last ``window`` checks failed or were
  degraded), ``no`` if its latest check passed, ``abstain`` if it has no data or its data are
  inconclusive. A single degraded observer sees every peer failing and proposes them all, but
  the healthy majority's own checks pass, they vote ``no``, and nobody is evicted.
* **Durations** depend on the reason (:data:`DEFAULT_DURATIONS`): ``unresponsive`` 60 s,
  ``degraded`` 300 s, ``flapping`` 600 s, ``manual`` until released; any other reason gets
  ``default_duration``. A quarantined node stays a member; the load balancer stops routing to
  it (:meth:`is_quarantined` is a dict lookup, :meth:`quarantined` a cached sorted list).
* **Recovery.** When the minimum duration has elapsed, :meth:`tick` reports ``recovery_due``
  (once per expiry) and the monitor starts recovery checks. :meth:`recovery_result` counts
  consecutive passes and releases the node after ``recovery_passes`` of them. A failing check
  resets the count and extends the quarantine by ``extension`` x the reason's duration, up to
  ``max_factor`` x that duration in total; when the cap is hit a single ``capped`` event tells
  the monitor to escalate to manual intervention (checks continue and can still release it).
  Results that arrive before expiry are ignored: the node is not under test yet. A ``manual``
  quarantine is only ended by :meth:`release`.
* **History.** Released entries (reason, since, until, released_at, why) go into a bounded
  history, oldest first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import msgspec

__all__ = [
    "BAD_RESULTS",
    "DEFAULT_DURATIONS",
    "GOOD_RESULTS",
    "QuarantineBook",
    "QuarantineConfig",
    "QuarantineEntry",
    "QuarantineEvent",
    "QuarantineProposal",
    "Vote",
    "vote_on",
]

Vote = Literal["yes", "no", "abstain"]

DEFAULT_DURATIONS: dict[str, float | None] = {
    "unresponsive": 60.0,
    "degraded": 300.0,
    "flapping": 600.0,
    "manual": None,  # until released by hand
}

# Check outcomes as the checks report them; anything else (e.g. "unknown") carries no weight.
GOOD_RESULTS = frozenset({"healthy", "ok", "pass", "passed", "up"})
BAD_RESULTS = frozenset(
    {"degraded", "failed", "fail", "unhealthy", "unreachable", "timeout", "critical", "down"}
)


class QuarantineConfig(msgspec.Struct, frozen=True):
    """Tunables; ``durations`` maps a reason to its minimum duration (None: until released)."""

    durations: dict[str, float | None] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_DURATIONS)
    )
    default_duration: float = 300.0
    recovery_passes: int = 3
    extension: float = 0.5
    max_factor: float = 4.0
    history: int = 256
    vote_window: int = 3
    vote_min_bad: int = 2

    def __post_init__(self) -> None:
        if self.recovery_passes < 1:
            raise ValueError("recovery_passes must be >= 1")
        if self.default_duration <= 0.0 or self.extension < 0.0 or self.max_factor < 1.0:
            raise ValueError("default_duration > 0, extension >= 0 and max_factor >= 1 needed")
        if not 1 <= self.vote_min_bad <= self.vote_window:
            raise ValueError("need 1 <= vote_min_bad <= vote_window")
        for reason, d in self.durations.items():
            if d is not None and d <= 0.0:
                raise ValueError(f"duration of {reason!r} must be positive")

    def duration(self, reason: str) -> float | None:
        return self.durations.get(reason, self.default_duration)


class QuarantineProposal(msgspec.Struct, frozen=True):
    """What a monitor puts to the vote."""

    node: str
    reason: str
    evidence: str = ""
    duration: float | None = None


class QuarantineEntry(msgspec.Struct, frozen=True):
    """One quarantine (a persisted record). ``until`` is the earliest release (None: manual);
    ``released_at`` is None while it lasts."""

    node: str
    reason: str
    since: float
    until: float | None
    decided_by: str = ""
    evidence: str = ""
    extensions: int = 0
    passes: int = 0
    released_at: float | None = None
    why: str = ""


class QuarantineEvent(msgspec.Struct, frozen=True):
    """``recovery_due``: start recovery checks; ``extended``: a check failed; ``capped``: it
    cannot be extended further (escalate); ``released``: the node is back."""

    kind: Literal["recovery_due", "extended", "capped", "released"]
    node: str
    entry: QuarantineEntry


class _Live:
    __slots__ = ("capped", "due_reported", "entry")

    def __init__(self, entry: QuarantineEntry) -> None:
        self.entry = entry
        self.due_reported = False
        self.capped = False


class QuarantineBook:
    """The quarantine view of one monitor (pure: every method that needs time takes ``now``)."""

    def __init__(self, config: QuarantineConfig | None = None) -> None:
        self.config = config if config is not None else QuarantineConfig()
        self._live: dict[str, _Live] = {}
        self._history: deque[QuarantineEntry] = deque(maxlen=self.config.history)
        self._sorted: list[str] | None = []

    # -- decisions
    def propose_reason(
        self, node: str, reason: str, evidence: str = ""
    ) -> QuarantineProposal | None:
        """A proposal to put to the monitors, or None if ``node`` is already quarantined."""
        if not node or not reason:
            raise ValueError("a proposal needs a node and a reason")
        if node in self._live:
            return None
        return QuarantineProposal(node, reason, evidence, self.config.duration(reason))

    def quarantine(
        self, node: str, reason: str, now: float, decided_by: str = "", evidence: str = ""
    ) -> QuarantineEntry:
        """Apply a decision. Idempotent: a node already quarantined keeps its entry (every
        monitor applies the same committed decision, some of them more than once); only a
        ``manual`` decision changes an existing entry, turning it into a manual hold."""
        live = self._live.get(node)
        if live is not None:
            if reason == "manual" and live.entry.until is not None:
                # An operator's hold outranks an automatic one: it no longer expires.
                live.entry = msgspec.structs.replace(live.entry, reason=reason, until=None)
            return live.entry
        duration = self.config.duration(reason)
        entry = QuarantineEntry(
            node=node,
            reason=reason,
            since=now,
            until=None if duration is None else now + duration,
            decided_by=decided_by,
            evidence=evidence,
        )
        self._live[node] = _Live(entry)
        self._sorted = None
        return entry

    def release(self, node: str, now: float, why: str = "released") -> QuarantineEntry | None:
        """End a quarantine (by hand, or by a committed decision); None if not quarantined."""
        live = self._live.pop(node, None)
        if live is None:
            return None
        self._sorted = None
        entry = msgspec.structs.replace(live.entry, released_at=now, why=why)
        self._history.append(entry)
        return entry

    # -- recovery
    def tick(self, now: float) -> list[QuarantineEvent]:
        """``recovery_due`` once for every quarantine whose minimum duration ran out."""
        events: list[QuarantineEvent] = []
        for node, live in self._live.items():
            until = live.entry.until
            if until is not None and now >= until and not live.due_reported:
                live.due_reported = True
                events.append(QuarantineEvent("recovery_due", node, live.entry))
        return events

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to report (None: nothing pending)."""
        pending = [
            lv.entry.until
            for lv in self._live.values()
            if lv.entry.until is not None and not lv.due_reported
        ]
        return min(pending) if pending else None

    def recovery_result(self, node: str, passed: bool, now: float) -> QuarantineEvent | None:
        """Fold one recovery check of ``node`` in; returns what changed, if anything."""
        live = self._live.get(node)
        if live is None:
            return None
        entry = live.entry
        if entry.until is None or now < entry.until:
            return None  # manual, or still serving its minimum time: not under test
        cfg = self.config
        if passed:
            entry = live.entry = msgspec.structs.replace(entry, passes=entry.passes + 1)
            if entry.passes >= cfg.recovery_passes:
                released = self.release(node, now, f"{entry.passes} recovery checks passed")
                assert released is not None
                return QuarantineEvent("released", node, released)
            return None
        base = cfg.duration(entry.reason) or cfg.default_duration
        cap = entry.since + base * cfg.max_factor
        new_until = min(cap, now + base * cfg.extension)
        if new_until <= now:
            live.entry = msgspec.structs.replace(entry, passes=0)
            if live.capped:
                return None
            live.capped = True
            return QuarantineEvent("capped", node, live.entry)
        live.entry = msgspec.structs.replace(
            entry, passes=0, until=new_until, extensions=entry.extensions + 1
        )
        live.due_reported = False
        return QuarantineEvent("extended", node, live.entry)

    # -- queries
    def is_quarantined(self, node: str) -> bool:
        return node in self._live

    def quarantined(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self._live)
        return list(self._sorted)

    def entry(self, node: str) -> QuarantineEntry | None:
        live = self._live.get(node)
        return None if live is None else live.entry

    def entries(self) -> list[QuarantineEntry]:
        return [self._live[n].entry for n in sorted(self._live)]

    def history(self) -> list[QuarantineEntry]:
        return list(self._history)

    def load(self, entries: Iterable[QuarantineEntry]) -> None:
        """Adopt another monitor's current entries (a monitor that starts late catches up);
        entries already here are kept."""
        for e in entries:
            if e.released_at is None and e.node not in self._live:
                self._live[e.node] = _Live(e)
                self._sorted = None

    # -- voting
    def vote_on(
        self, node: str, own_view: Sequence[str | bool] | Mapping[str, Sequence[str | bool]]
    ) -> Vote:
        """This monitor's answer to a proposal to quarantine ``node``; see :func:`vote_on`.
        ``own_view`` is its recent check results of ``node`` (oldest first), or a mapping
        from node to such results."""
        if isinstance(own_view, Mapping):
            own_view = own_view.get(node, ())
        return vote_on(own_view, window=self.config.vote_window, min_bad=self.config.vote_min_bad)


def vote_on(results: Sequence[str | bool], *, window: int = 3, min_bad: int = 2) -> Vote:
    """``yes`` if at least ``min_bad`` of the last ``window`` known results are bad, else
    ``no`` if the latest known result passed, else ``abstain`` (no data, or too little to
    tell). A result is a bool (True: passed) or a status string (:data:`GOOD_RESULTS`,
    :data:`BAD_RESULTS`; others are ignored)."""
    known: list[bool] = []
    for r in reversed(results):
        if isinstance(r, bool):
            known.append(r)
        elif r in GOOD_RESULTS:
            known.append(True)
        elif r in BAD_RESULTS:
            known.append(False)
        else:
            continue
        if len(known) == window:
            break
    if not known:
        return "abstain"
    bad = sum(1 for ok in known if not ok)
    if bad >= min_bad:
        return "yes"
    return "no" if known[0] else "abstain"
