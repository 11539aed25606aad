"""The health-check framework: results, checks, timing presets and the runner.

Theory of operation: a :class:`Check` has a name, a kind (``basic``, ``comprehensive``,
``deep``, ``predictive``), an interval and a timeout, and one coroutine, ``run(ctx)``, that
returns a :class:`CheckResult` (``pass`` / ``warn`` / ``fail`` with a detail and a data dict).
The :class:`CheckRunner` owns the scheduling: one scheduler task wakes at the earliest due
check and launches every due check in its own task, so checks run **concurrently** and a slow
one delays nobody. Each run is bounded by its check's timeout, enforced with a timer on the
runner's clock that cancels the run (a timed-out check is a ``fail`` "timed out after Xs"); a
check that raises is a ``fail`` naming the error -- a broken check never takes the runner
down. A check never runs twice at once: its next run is due ``interval`` after the previous
one started (or at once, if that run took longer). Results go to ``on_result`` and
``latest``; ``latency`` and ``at`` (``clock.now()`` at the start) are stamped by the runner.
Every task (the scheduler, each run, each ``run_once``) is owned by the runner and cancelled
and awaited by ``stop()``.

:func:`check_preset` gives the (interval, timeout) per kind: ``design`` (the design's
defaults), ``lan`` (ours for a data centre) and ``local`` (tests and one-host clusters).
The built-in checks live in :mod:`agentcluster.health.checks`, which re-exports all of this.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypedDict, Unpack

import msgspec

from agentcluster.clock import Clock, MonotonicClock, TimerHandle

__all__ = [
    "CHECK_PRESETS",
    "KINDS",
    "Check",
    "CheckContext",
    "CheckResult",
    "CheckRunner",
    "Findings",
    "Kind",
    "ResultSink",
    "Status",
    "Timing",
    "check_preset",
    "worst",
]

log = logging.getLogger(__name__)

Kind = Literal["basic", "comprehensive", "deep", "predictive"]
Status = Literal["pass", "warn", "fail"]
KINDS: tuple[Kind, ...] = ("basic", "comprehensive", "deep", "predictive")
_RANK: dict[Status, int] = {"pass": 0, "warn": 1, "fail": 2}

# --------------------------------------------------------------------------- presets
# (interval, timeout) in seconds per kind.
CHECK_PRESETS: dict[str, dict[Kind, tuple[float, float]]] = {
    # The design document's defaults, kept as written. Its timeouts are not given; these
    # leave a check most of a WAN round trip budget without letting one hang for minutes.
    "design": {
        "basic": (30.0, 5.0),  # design: basic every 30 s
        "comprehensive": (300.0, 60.0),  # design: comprehensive every 300 s
        "deep": (300.0, 60.0),  # design: deep probes on the comprehensive cadence
        "predictive": (600.0, 30.0),  # design: predictive every 600 s
    },
    # Ours for a data centre. SWIM already probes every ~0.5 s; a 1 s basic check costs one
    # small TCP exchange per peer and lets quarantine decisions see a fresh RTT. 0.5 s is two
    # orders of magnitude above a LAN round trip, so a timeout means a stalled peer.
    "lan": {
        "basic": (1.0, 0.5),
        # Every 30 s: a degraded node is flagged within a minute, at a few pings per peer.
        "comprehensive": (30.0, 10.0),
        # Agent probes are local and cheap; same cadence as comprehensive.
        "deep": (30.0, 5.0),
        # Trends need samples more than frequency: once a minute over a 1 s history is plenty.
        "predictive": (60.0, 5.0),
    },
    # One host (tests, laptop clusters): loopback RTTs are ~0.1 ms, so everything is faster.
    "local": {
        "basic": (0.2, 0.1),
        "comprehensive": (2.0, 1.0),
        "deep": (2.0, 1.0),
        "predictive": (5.0, 1.0),
    },
}


def check_preset(name: str) -> dict[Kind, tuple[float, float]]:
    """The (interval, timeout) of every kind in preset ``name`` (a copy)."""
    try:
        return dict(CHECK_PRESETS[name])
    except KeyError:
        raise ValueError(
            f"unknown check preset {name!r}; choose one of {', '.join(CHECK_PRESETS)}"
        ) from None


def worst(statuses: Iterable[Status]) -> Status:
    out: Status = "pass"
    for s in statuses:
        if _RANK[s] > _RANK[out]:
            out = s
    return out


# --------------------------------------------------------------------------- framework


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: Kind
    status: Status
    # Seconds the check took (stamped by the runner).
    latency: float = 0.0
    detail: str = ""
    data: dict[str, Any] = {}
    # clock.now() when the check started (stamped by the runner).
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class CheckContext:
    clock: Clock
    now: float
    # The run's budget: inner operations should finish well within it.
    timeout: float


class Timing(TypedDict, total=False):
    """A check's timing options: each missing one comes from ``preset`` (default ``lan``)."""

    interval: float
    timeout: float
    preset: str


class Check(ABC):
    """Subclass and implement :meth:`run`; ``interval`` / ``timeout`` default to the preset."""

    kind: ClassVar[Kind]

    def __init__(self, name: str, **timing: Unpack[Timing]) -> None:
        default_interval, default_timeout = check_preset(timing.get("preset", "lan"))[self.kind]
        self.name = name
        self.interval = timing.get("interval", default_interval)
        self.timeout = timing.get("timeout", default_timeout)
        if not self.interval > 0 or not self.timeout > 0:
            raise ValueError(f"check {name!r}: interval and timeout must be > 0")

    @abstractmethod
    async def run(self, ctx: CheckContext) -> CheckResult: ...

    def result(
        self, status: Status, detail: str = "", data: dict[str, Any] | None = None
    ) -> CheckResult:
        return CheckResult(
            name=self.name, kind=self.kind, status=status, detail=detail, data=data or {}
        )


class Findings:
    """What a check found, graded; the result's status is the worst finding."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[Status, str]] = []

    def add(self, status: Status, text: str) -> None:
        self.items.append((status, text))

    def grade(self, value: float, limits: tuple[float, float], text: str) -> None:
        """A finding when ``value`` reaches ``limits`` (warn, fail)."""
        if value >= limits[1]:
            self.items.append(("fail", text))
        elif value >= limits[0]:
            self.items.append(("warn", text))

    def result(self, check: Check, ok: str, data: dict[str, Any]) -> CheckResult:
        detail = "; ".join(text for _, text in self.items) or ok
        return check.result(worst(s for s, _ in self.items), detail, data)


ResultSink = Callable[[CheckResult], object]


class _Slot:
    __slots__ = ("check", "next_at", "task")

    def __init__(self, check: Check, next_at: float) -> None:
        self.check = check
        self.next_at = next_at
        self.task: asyncio.Task[CheckResult] | None = None


class CheckRunner:
    """Runs checks on their intervals, concurrently, with timeouts. ``start()`` /
    ``await stop()`` or ``async with``; ``await run_once()`` runs checks now."""

    def __init__(
        self,
        checks: Iterable[Check] = (),
        *,
        clock: Clock | None = None,
        on_result: ResultSink | None = None,
    ) -> None:
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.on_result = on_result
        self.latest: dict[str, CheckResult] = {}
        self.runs = 0
        self._slots: dict[str, _Slot] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._oneshots: set[asyncio.Task[CheckResult]] = set()
        for check in checks:
            self.add(check)

    # ------------------------------------------------------------------ membership
    def add(self, check: Check) -> None:
        """Add a check, first due at once."""
        if check.name in self._slots:
            raise ValueError(f"a check named {check.name!r} is already registered")
        self._slots[check.name] = _Slot(check, self.clock.now())
        self._wake.set()

    def remove(self, name: str) -> None:
        slot = self._slots.pop(name, None)
        if slot is not None and slot.task is not None:
            # Still owned until it is gone: stop() awaits it with the one-shot runs.
            self._own(slot.task)
            slot.task.cancel()

    def _own(self, task: asyncio.Task[CheckResult]) -> None:
        self._oneshots.add(task)
        task.add_done_callback(self._oneshots.discard)

    @property
    def checks(self) -> list[Check]:
        return [s.check for s in self._slots.values()]

    def due(self, now: float) -> list[str]:
        """Names of the checks due at ``now`` and not already running."""
        return [n for n, s in self._slots.items() if s.task is None and s.next_at <= now]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.get_running_loop().create_task(
                self._schedule(), name="health-checks"
            )

    async def stop(self) -> None:
        tasks: list[asyncio.Task[Any]] = []
        if self._scheduler is not None:
            tasks.append(self._scheduler)
            self._scheduler = None
        for slot in self._slots.values():
            if slot.task is not None:
                tasks.append(slot.task)
        tasks.extend(self._oneshots)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> CheckRunner:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ running
    async def _schedule(self) -> None:
        clock = self.clock
        while True:
            now = clock.now()
            for name in self.due(now):
                self._launch(self._slots[name], now)
            waiting = [s.next_at for s in self._slots.values() if s.task is None]
            self._wake.clear()
            timer: TimerHandle | None = None
            if waiting:
                timer = clock.call_later(max(0.0, min(waiting) - now), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    def _launch(self, slot: _Slot, now: float) -> None:
        slot.next_at = now + slot.check.interval
        task = asyncio.get_running_loop().create_task(
            self._execute(slot.check), name=f"check:{slot.check.name}"
        )
        slot.task = task
        task.add_done_callback(functools.partial(self._finished, slot))

    def _finished(self, slot: _Slot, _task: asyncio.Task[CheckResult]) -> None:
        slot.task = None
        # A run longer than the interval: the next one starts right away, not in a burst.
        slot.next_at = max(slot.next_at, self.clock.now())
        self._wake.set()

    async def run_once(self, kinds: Iterable[Kind] | None = None) -> list[CheckResult]:
        """Run the checks (of these kinds) now, concurrently; results in registration order."""
        wanted = None if kinds is None else set(kinds)
        loop = asyncio.get_running_loop()
        tasks = []
        for slot in self._slots.values():
            if wanted is None or slot.check.kind in wanted:
                task = loop.create_task(self._execute(slot.check))
                self._own(task)
                tasks.append(task)
        return list(await asyncio.gather(*tasks))

    async def _execute(self, check: Check) -> CheckResult:
        """Run one check in the current task (its own), never raising but for cancellation."""
        clock = self.clock
        start = clock.now()
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = clock.call_later(check.timeout, expire)
        try:
            try:
                result = await check.run(CheckContext(clock, start, check.timeout))
            finally:
                timer.cancel()
            if expired:  # the check swallowed the cancellation: still a timeout
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel()
            result = check.result("fail", f"timed out after {check.timeout:g}s")
        except Exception as exc:
            log.debug("check %s raised", check.name, exc_info=True)
            result = check.result("fail", f"{type(exc).__name__}: {exc}")
        result = msgspec.structs.replace(result, latency=clock.now() - start, at=start)
        self.runs += 1
        self.latest[check.name] = result
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:
                log.exception("health check result handler failed on %s", check.name)
        return result
