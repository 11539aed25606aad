"""Recovery procedures: order, per-procedure timeouts, attempt budgets, escalation to a human."""

from __future__ import annotations

import asyncio

import pytest

from agentcluster.health.recovery import (
    DrainNode,
    ManualInterventionRequired,
    Problem,
    RecoveryContext,
    RecoveryPlanner,
    RecoveryProcedure,
    RecoveryResult,
    RecoveryRunner,
    Rejoin,
    RestartAgent,
)


class Scripted:
    """A procedure that does what it is told: ok, fail, raise or hang."""

    def __init__(self, name: str, behaviour: str, kinds: tuple[str, ...] = ("x",)) -> None:
        self._name = name
        self.behaviour = behaviour
        self.kinds = kinds
        self.runs = 0

    @property
    def name(self) -> str:
        return self._name

    def applies_to(self, problem: Problem) -> bool:
        return problem.kind in self.kinds

    async def run(self, ctx: RecoveryContext) -> RecoveryResult:
        self.runs += 1
        if self.behaviour == "raise":
            raise RuntimeError("boom")
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        return RecoveryResult(self.behaviour == "ok", self.behaviour)


PROBLEM = Problem("n1", "x", agent_id="a1")


@pytest.mark.parametrize(
    ("behaviours", "ran", "outcomes", "ok"),
    [
        (["ok", "ok"], ["p0"], ["ok"], True),
        (["fail", "ok", "ok"], ["p0", "p1"], ["failed", "ok"], True),
        (["raise", "fail", "ok"], ["p0", "p1", "p2"], ["error", "failed", "ok"], True),
        (["fail", "raise"], ["p0", "p1"], ["failed", "error"], False),
    ],
)
async def test_procedures_run_in_order_until_one_succeeds(
    behaviours: list[str], ran: list[str], outcomes: list[str], ok: bool
) -> None:
    procs = [Scripted(f"p{i}", b) for i, b in enumerate(behaviours)]
    runner = RecoveryRunner(procs, clock=lambda: 0.0)
    out = await runner.recover(RecoveryContext(PROBLEM))
    assert [a.procedure for a in out.attempts] == ran
    assert [a.outcome for a in out.attempts] == outcomes
    assert out.ok is ok and [p.runs for p in procs] == [1 if p.name in ran else 0 for p in procs]
    assert out.procedure == (ran[-1] if ok else "")
    assert (out.escalation is None) is ok
    if not ok:
        assert out.escalation is not None
        assert out.escalation.reason == f"all {len(ran)} recovery procedures failed"
        assert out.escalation.attempts == out.attempts
        assert out.escalation.signal_type == "cluster.orchestrator.escalation"
        with pytest.raises(ManualInterventionRequired) as info:
            out.raise_if_escalated()
        assert info.value.escalation is out.escalation
        assert runner.escalations() == [out.escalation]
    assert runner.history() == list(out.attempts)


@pytest.mark.virtual_time
async def test_a_hanging_procedure_times_out_and_the_next_one_runs() -> None:
    hang, ok = Scripted("hang", "hang"), Scripted("ok", "ok")
    runner = RecoveryRunner([hang, ok], timeout=30.0, timeouts={"hang": 5.0})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await runner.recover(RecoveryContext(PROBLEM))
    assert out.ok and [a.outcome for a in out.attempts] == ["timeout", "ok"]
    first = out.attempts[0]
    assert first.finished - first.started == pytest.approx(5.0)
    assert loop.time() - t0 == pytest.approx(5.0)
    assert first.detail == "no result within 5 s"


@pytest.mark.virtual_time
async def test_all_hanging_escalates_after_each_timeout() -> None:
    runner = RecoveryRunner([Scripted("a", "hang"), Scripted("b", "hang")], timeout=2.0)
    out = await runner.recover(RecoveryContext(PROBLEM))
    assert not out.ok and [a.outcome for a in out.attempts] == ["timeout", "timeout"]
    assert out.escalation is not None and out.escalation.at - out.attempts[0].started == 4.0


async def test_no_applicable_procedure_escalates_at_once() -> None:
    runner = RecoveryRunner([Scripted("p", "ok", kinds=("other",))], clock=lambda: 7.0)
    out = await runner.recover(RecoveryContext(PROBLEM))
    assert out.attempts == () and out.escalation is not None
    assert (out.escalation.reason, out.escalation.at) == ("no recovery procedure applies", 7.0)


def test_planner_attempt_budget_per_problem_and_procedure() -> None:
    procs: list[RecoveryProcedure] = [Scripted("a", "ok"), Scripted("b", "ok")]
    planner = RecoveryPlanner(procs, max_attempts=2, period=60.0)
    assert planner.plan(PROBLEM, 0.0).steps == ("a", "b")
    planner.record(PROBLEM, "a", 0.0)
    planner.record(PROBLEM, "a", 10.0)
    plan = planner.plan(PROBLEM, 20.0)
    assert plan.steps == ("b",) and plan.skipped == (("a", "ran 2 times in 60 s"),)
    # another agent on the same node is another problem with its own budget
    assert planner.plan(Problem("n1", "x", agent_id="a2"), 20.0).steps == ("a", "b")
    planner.record(PROBLEM, "b", 20.0)
    planner.record(PROBLEM, "b", 21.0)
    plan = planner.plan(PROBLEM, 30.0)
    assert plan.steps == () and plan.escalate == "attempt budget exhausted"
    assert planner.plan(PROBLEM, 60.0).steps == ("a",)  # the first run of a left the window
    assert planner.plan(PROBLEM, 81.0).steps == ("a", "b")
    with pytest.raises(ValueError):
        RecoveryPlanner([Scripted("a", "ok"), Scripted("a", "ok")])


async def test_runner_escalates_when_the_budget_is_spent() -> None:
    now = [0.0]
    proc = Scripted("restart", "ok")
    runner = RecoveryRunner(
        planner=RecoveryPlanner([proc], max_attempts=2, period=100.0), clock=lambda: now[0]
    )
    for t in (0.0, 10.0):
        now[0] = t
        assert (await runner.recover(RecoveryContext(PROBLEM))).ok
    now[0] = 20.0
    out = await runner.recover(RecoveryContext(PROBLEM))
    assert out.escalation is not None and out.escalation.reason == "attempt budget exhausted"
    assert proc.runs == 2


@pytest.mark.parametrize(
    ("problem", "applies"),
    [
        (Problem("n1", "agent_crashed", agent_id="a"), ["restart_agent"]),
        (Problem("n1", "agent_crashed"), []),  # no agent named: nothing to restart
        (Problem("n1", "agent_stuck", agent_id="a"), ["restart_agent"]),
        (Problem("n1", "node_degraded"), ["drain_node"]),
        (Problem("n1", "resource_exhaustion"), ["drain_node"]),
        (Problem("n1", "membership_stale"), ["rejoin"]),
        (Problem("n1", "disk_on_fire"), []),
    ],
)
def test_builtin_procedures_apply_to(problem: Problem, applies: list[str]) -> None:
    procs: list[RecoveryProcedure] = [RestartAgent(), DrainNode(), Rejoin()]
    assert all(isinstance(p, RecoveryProcedure) for p in procs)
    assert RecoveryPlanner(procs).plan(problem, 0.0).steps == tuple(applies)


async def test_builtin_procedures_call_their_callbacks() -> None:
    calls: list[tuple[str, str]] = []

    async def restart(agent_id: str) -> bool:
        calls.append(("restart", agent_id))
        return False

    async def drain(node: str) -> bool:
        calls.append(("drain", node))
        return True

    async def rejoin() -> bool:
        calls.append(("rejoin", ""))
        return True

    # the agent will not restart: draining the node is the fallback
    problem = Problem("n1", "agent_crashed", agent_id="worker-3")
    runner = RecoveryRunner(
        [RestartAgent(), DrainNode(kinds={"agent_crashed"}), Rejoin()], clock=lambda: 0.0
    )
    out = await runner.recover(RecoveryContext(problem, restart, drain, rejoin))
    assert calls == [("restart", "worker-3"), ("drain", "n1")]
    assert [(a.procedure, a.outcome) for a in out.attempts] == [
        ("restart_agent", "failed"),
        ("drain_node", "ok"),
    ]
    assert out.attempts[0].detail == "restart of worker-3 refused"
    rejoined = await runner.recover(RecoveryContext(Problem("n1", "isolated"), rejoin=rejoin))
    assert rejoined.ok and calls[-1] == ("rejoin", "")
    # no callback here: the procedure fails cleanly and recovery escalates
    bare = await runner.recover(RecoveryContext(Problem("n2", "isolated")))
    assert bare.attempts[0].detail == "no way to rejoin here" and bare.escalation is not None


async def test_history_is_bounded() -> None:
    runner = RecoveryRunner([Scripted("p", "fail")], history=3, clock=lambda: 0.0)
    runner.planner = RecoveryPlanner([Scripted("p", "fail")], max_attempts=100)
    for _ in range(5):
        await runner.recover(RecoveryContext(PROBLEM))
    assert len(runner.history()) == 3 and len(runner.escalations()) == 3
