"""Automatic recovery procedures, tried in order, escalating to a human when they all fail.

Theory of operation. A :class:`Problem` names what is wrong (``kind``) and where (``node``,
optionally ``agent_id``). A :class:`RecoveryProcedure` says whether it ``applies_to`` a problem
and ``run`` s against a :class:`RecoveryContext`, which carries the callbacks that actually act
(restart an agent, drain a node, leave and rejoin membership): procedures decide nothing about
the cluster themselves, so they are trivially testable with fake callbacks. Built-ins:

* :class:`RestartAgent` -- agent-level problems (crashed, unhealthy, stuck) with an agent id;
* :class:`DrainNode` -- node-level degradation: weight 0 in the load balancer / quarantine;
* :class:`Rejoin` -- membership trouble: leave and rejoin (a fresh incarnation, fresh state).

The decision part is pure and separate: :class:`RecoveryPlanner` takes ``now`` and returns a
:class:`RecoveryPlan` -- the applicable procedures in order, minus any that already ran
``max_attempts`` times for the same problem within ``period`` seconds (the restart-intensity
idea of OTP supervisors: a procedure that keeps "succeeding" while the problem keeps coming
back is not a fix), plus the reason to escalate when nothing is left.

:class:`RecoveryRunner` is the asyncio shell: it runs the plan's procedures one after another,
each under its own timeout, stops at the first success, records every
:class:`RecoveryAttempt` (bounded history) and, when all fail or none applies, returns an
:class:`Escalation` -- a request for manual intervention, which the HealthMonitor turns into a
``cluster.orchestrator.escalation`` signal (or raise it: :meth:`RecoveryOutcome.raise_if_escalated`).
A procedure that raises is a failed attempt, never a crash of the monitor.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import msgspec

__all__ = [
    "AGENT_PROBLEMS",
    "MEMBERSHIP_PROBLEMS",
    "NODE_PROBLEMS",
    "DrainNode",
    "Escalation",
    "ManualInterventionRequired",
    "Problem",
    "RecoveryAttempt",
    "RecoveryContext",
    "RecoveryOutcome",
    "RecoveryPlan",
    "RecoveryPlanner",
    "RecoveryProcedure",
    "RecoveryResult",
    "RecoveryRunner",
    "Rejoin",
    "RestartAgent",
]

log = logging.getLogger(__name__)

AGENT_PROBLEMS = frozenset({"agent_crashed", "agent_unhealthy", "agent_stuck"})
NODE_PROBLEMS = frozenset({"node_degraded", "node_overloaded", "resource_exhaustion"})
MEMBERSHIP_PROBLEMS = frozenset({"membership_stale", "isolated", "partition_healed"})
ESCALATION_SIGNAL = "cluster.orchestrator.escalation"


class Problem(msgspec.Struct, frozen=True):
    """Something recovery should fix."""

    node: str
    kind: str
    agent_id: str = ""
    detail: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.node, self.kind, self.agent_id)


class RecoveryResult(msgspec.Struct, frozen=True):
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RecoveryContext:
    """The problem and the callbacks that act on the cluster (None: not available here).
    Each callback returns True when the action was carried out."""

    problem: Problem
    restart_agent: Callable[[str], Awaitable[bool]] | None = None
    drain_node: Callable[[str], Awaitable[bool]] | None = None
    rejoin: Callable[[], Awaitable[bool]] | None = None


@runtime_checkable
class RecoveryProcedure(Protocol):
    """A pluggable recovery step."""

    @property
    def name(self) -> str: ...

    def applies_to(self, problem: Problem) -> bool: ...

    async def run(self, ctx: RecoveryContext) -> RecoveryResult: ...


class RestartAgent:
    """Restart the agent the problem names."""

    def __init__(self, kinds: Iterable[str] = AGENT_PROBLEMS) -> None:
        self._kinds = frozenset(kinds)

    @property
    def name(self) -> str:
        return "restart_agent"

    def applies_to(self, problem: Problem) -> bool:
        return problem.kind in self._kinds and bool(problem.agent_id)

    async def run(self, ctx: RecoveryContext) -> RecoveryResult:
        if ctx.restart_agent is None:
            return RecoveryResult(False, "no way to restart agents here")
        ok = await ctx.restart_agent(ctx.problem.agent_id)
        return RecoveryResult(
            ok, f"restart of {ctx.problem.agent_id} {'done' if ok else 'refused'}"
        )


class DrainNode:
    """Take the node out of traffic (load-balancer weight 0 / quarantine) so it can recover."""

    def __init__(self, kinds: Iterable[str] = NODE_PROBLEMS) -> None:
        self._kinds = frozenset(kinds)

    @property
    def name(self) -> str:
        return "drain_node"

    def applies_to(self, problem: Problem) -> bool:
        return problem.kind in self._kinds

    async def run(self, ctx: RecoveryContext) -> RecoveryResult:
        if ctx.drain_node is None:
            return RecoveryResult(False, "no way to drain nodes here")
        ok = await ctx.drain_node(ctx.problem.node)
        return RecoveryResult(ok, f"drain of {ctx.problem.node} {'done' if ok else 'refused'}")


class Rejoin:
    """Leave and rejoin membership (only meaningful on the node itself)."""

    def __init__(self, kinds: Iterable[str] = MEMBERSHIP_PROBLEMS) -> None:
        self._kinds = frozenset(kinds)

    @property
    def name(self) -> str:
        return "rejoin"

    def applies_to(self, problem: Problem) -> bool:
        return problem.kind in self._kinds

    async def run(self, ctx: RecoveryContext) -> RecoveryResult:
        if ctx.rejoin is None:
            return RecoveryResult(False, "no way to rejoin here")
        ok = await ctx.rejoin()
        return RecoveryResult(ok, "rejoined" if ok else "rejoin refused")


class RecoveryAttempt(msgspec.Struct, frozen=True):
    """One run of one procedure."""

    procedure: str
    problem: Problem
    outcome: Literal["ok", "failed", "timeout", "error"]
    started: float
    finished: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class Escalation(msgspec.Struct, frozen=True):
    """Automatic recovery gave up: a human must look at ``problem``."""

    problem: Problem
    reason: str
    at: float
    attempts: tuple[RecoveryAttempt, ...] = ()
    signal_type: str = ESCALATION_SIGNAL


class ManualInterventionRequired(Exception):
    def __init__(self, escalation: Escalation) -> None:
        super().__init__(
            f"{escalation.problem.kind} on {escalation.problem.node}: {escalation.reason}"
        )
        self.escalation = escalation


class RecoveryOutcome(msgspec.Struct, frozen=True):
    problem: Problem
    ok: bool
    attempts: tuple[RecoveryAttempt, ...] = ()
    escalation: Escalation | None = None

    @property
    def procedure(self) -> str:
        """The procedure that fixed it ("" if none did)."""
        return self.attempts[-1].procedure if self.ok and self.attempts else ""

    def raise_if_escalated(self) -> None:
        if self.escalation is not None:
            raise ManualInterventionRequired(self.escalation)


class RecoveryPlan(msgspec.Struct, frozen=True):
    """Procedures to try, in order; ``skipped`` are (name, why); ``escalate`` is set when the
    plan is empty."""

    steps: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    escalate: str = ""


class RecoveryPlanner:
    """Which procedures to try for a problem, with a per-(problem, procedure) attempt budget.
    Pure: takes ``now``."""

    def __init__(
        self,
        procedures: Sequence[RecoveryProcedure],
        *,
        max_attempts: int = 3,
        period: float = 600.0,
    ) -> None:
        if max_attempts < 1 or period <= 0.0:
            raise ValueError("max_attempts and period must be positive")
        names = [p.name for p in procedures]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate procedure names in {names}")
        self.procedures: dict[str, RecoveryProcedure] = {p.name: p for p in procedures}
        self._max = max_attempts
        self._period = period
        self._runs: dict[tuple[str, str, str, str], deque[float]] = {}

    def plan(self, problem: Problem, now: float) -> RecoveryPlan:
        steps: list[str] = []
        skipped: list[tuple[str, str]] = []
        for name, proc in self.procedures.items():
            if not proc.applies_to(problem):
                continue
            if self._recent(problem, name, now) >= self._max:
                skipped.append((name, f"ran {self._max} times in {self._period:g} s"))
            else:
                steps.append(name)
        if steps:
            return RecoveryPlan(tuple(steps), tuple(skipped))
        why = "attempt budget exhausted" if skipped else "no recovery procedure applies"
        return RecoveryPlan((), tuple(skipped), why)

    def record(self, problem: Problem, procedure: str, now: float) -> None:
        """Count a run of ``procedure`` for ``problem`` (successful or not)."""
        runs = self._runs.setdefault((*problem.key, procedure), deque())
        runs.append(now)
        self._trim(runs, now)

    def _recent(self, problem: Problem, procedure: str, now: float) -> int:
        runs = self._runs.get((*problem.key, procedure))
        if runs is None:
            return 0
        self._trim(runs, now)
        if not runs:
            del self._runs[(*problem.key, procedure)]
            return 0
        return len(runs)

    def _trim(self, runs: deque[float], now: float) -> None:
        horizon = now - self._period
        while runs and runs[0] <= horizon:
            runs.popleft()


class RecoveryRunner:
    """Runs the planner's procedures, each under a timeout; escalates when none fixes it."""

    def __init__(
        self,
        procedures: Sequence[RecoveryProcedure] | None = None,
        *,
        timeout: float = 30.0,
        timeouts: Mapping[str, float] | None = None,
        planner: RecoveryPlanner | None = None,
        clock: Callable[[], float] | None = None,
        history: int = 256,
    ) -> None:
        if planner is None:
            if procedures is None:
                procedures = (RestartAgent(), DrainNode(), Rejoin())
            planner = RecoveryPlanner(procedures)
        elif procedures is not None:
            raise ValueError("pass procedures or a planner, not both")
        if timeout <= 0.0:
            raise ValueError("timeout must be positive")
        self.planner = planner
        self._timeout = timeout
        self._timeouts = dict(timeouts or {})
        self._clock = clock
        self._history: deque[RecoveryAttempt] = deque(maxlen=history)
        self._escalations: deque[Escalation] = deque(maxlen=history)

    async def recover(self, ctx: RecoveryContext) -> RecoveryOutcome:
        """Try the applicable procedures in order until one succeeds."""
        problem = ctx.problem
        plan = self.planner.plan(problem, self._now())
        attempts: list[RecoveryAttempt] = []
        for name in plan.steps:
            attempt = await self._run(self.planner.procedures[name], ctx)
            attempts.append(attempt)
            self._history.append(attempt)
            if attempt.ok:
                return RecoveryOutcome(problem, True, tuple(attempts))
        reason = plan.escalate or f"all {len(attempts)} recovery procedures failed"
        esc = Escalation(problem, reason, self._now(), tuple(attempts))
        self._escalations.append(esc)
        log.warning("recovery of %s on %s escalated: %s", problem.kind, problem.node, reason)
        return RecoveryOutcome(problem, False, tuple(attempts), esc)

    def history(self) -> list[RecoveryAttempt]:
        return list(self._history)

    def escalations(self) -> list[Escalation]:
        return list(self._escalations)

    async def _run(self, proc: RecoveryProcedure, ctx: RecoveryContext) -> RecoveryAttempt:
        name = proc.name
        started = self._now()
        self.planner.record(ctx.problem, name, started)
        outcome: Literal["ok", "failed", "timeout", "error"]
        try:
            async with asyncio.timeout(self._timeouts.get(name, self._timeout)):
                result = await proc.run(ctx)
        except TimeoutError:
            outcome, detail = (
                "timeout",
                f"no result within {self._timeouts.get(name, self._timeout):g} s",
            )
        except Exception as e:  # a broken procedure is a failed attempt, not a dead monitor
            log.exception("recovery procedure %s raised", name)
            outcome, detail = "error", f"{type(e).__name__}: {e}"
        else:
            outcome, detail = ("ok" if result.ok else "failed"), result.detail
        return RecoveryAttempt(name, ctx.problem, outcome, started, self._now(), detail)

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()
