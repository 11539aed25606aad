"""Agent definitions, the pure ``cmd``, hooks, skills and checkpoints (synchronous tables)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from agentcluster.agents import (
    Action,
    ActionContext,
    ActionValidationError,
    Agent,
    AgentDefinitionError,
    AgentError,
    CheckpointError,
    Emit,
    Every,
    Instruction,
    NoRoute,
    Reply,
    Result,
    Route,
    Schedule,
    Skill,
    SkillError,
    UnknownAction,
    acmd,
    cmd,
)
from agentcluster.agents.agent import run_cmd
from agentcluster.signals import Signal


class CounterState(msgspec.Struct, frozen=True):
    count: int = 0
    label: str = "c"


class AddParams(msgspec.Struct):
    by: int = 1


class Add(Action[AddParams]):
    name = "add"

    def run(self, params: AddParams, ctx: ActionContext) -> dict[str, Any]:
        return {"count": ctx.state.count + params.by}


class Replace(Action[AddParams]):
    name = "replace"

    def run(self, params: AddParams, ctx: ActionContext) -> CounterState:
        return CounterState(count=params.by, label="replaced")


class Announce(Action[AddParams]):
    name = "announce"

    def run(self, params: AddParams, ctx: ActionContext) -> Result:
        sig = Signal(type="app.counter.announced", data={"count": ctx.state.count})
        return Result(directives=[Emit(sig)], reply=ctx.state.count)


class OnlyDirectives(Action[AddParams]):
    name = "only_directives"

    def run(self, params: AddParams, ctx: ActionContext) -> list[Schedule]:
        return [Schedule(1.0, Signal(type="app.counter.tick"), key="t")]


class Boom(Action[AddParams]):
    name = "boom"

    def run(self, params: AddParams, ctx: ActionContext) -> None:
        raise RuntimeError("boom")


class BadUpdate(Action[AddParams]):
    name = "bad_update"

    def run(self, params: AddParams, ctx: ActionContext) -> dict[str, Any]:
        return {"nope": 1}


class WrongType(Action[AddParams]):
    name = "wrong_type"

    def run(self, params: AddParams, ctx: ActionContext) -> dict[str, Any]:
        return {"count": "many"}


class AsyncAdd(Action[AddParams]):
    name = "async_add"

    async def run(self, params: AddParams, ctx: ActionContext) -> dict[str, Any]:
        return {"count": ctx.state.count + params.by}


class Counter(Agent):
    name = "counter"
    description = "counts"
    State = CounterState
    actions = (Add, Replace, Announce, OnlyDirectives, Boom, BadUpdate, WrongType, AsyncAdd)
    routes = (
        ("app.counter.add", "add"),
        Route("app.counter.*", "announce", priority=-10),
        Route("app.counter.big", "replace", predicate=lambda s: (s.data or {}).get("by", 0) > 100),
        Route("app.counter.inc", "add", params=lambda s: {"by": 1}),
    )


def test_definition_defaults() -> None:
    agent = Counter()
    assert agent.id == "counter"
    assert agent.state == CounterState()
    assert Counter(id="c2", state={"count": 5}).state.count == 5


@pytest.mark.parametrize(
    ("instruction", "expected_count", "expected_directives"),
    [
        (Instruction("add", {"by": 3}), 3, []),
        (Instruction(Add, AddParams(by=2)), 2, []),
        ("add", 1, []),
        (Add, 1, []),
        (Instruction("replace", {"by": 9}), 9, []),
        (Signal(type="app.counter.add", data={"by": 4}), 4, []),
        (Signal(type="app.counter.inc", data={"ignored": True}), 1, []),
        (Signal(type="app.counter.big", data={"by": 500}), 500, []),
        (Signal(type="app.counter.big", data={"by": 5}), 0, [Emit, Reply]),  # predicate fails
        (Signal(type="app.counter.other"), 0, [Emit, Reply]),
        (Instruction("only_directives"), 0, [Schedule]),
    ],
)
def test_cmd_table(instruction: Any, expected_count: int, expected_directives: list[type]) -> None:
    agent = Counter()
    state, directives = cmd(agent, instruction)
    assert state.count == expected_count
    assert [type(d) for d in directives] == expected_directives
    assert agent.state == CounterState()  # pure: the input value is untouched


@pytest.mark.parametrize(
    ("instruction", "error", "fragment"),
    [
        (Instruction("nope"), UnknownAction, "no action 'nope'"),
        (Signal(type="app.other.thing"), NoRoute, "no route"),
        (Instruction("add", {"by": "x"}), ActionValidationError, "by"),
        (Instruction("bad_update"), AgentError, "no field"),
        (Instruction("wrong_type"), AgentError, "invalid state update"),
        (Instruction("async_add"), AgentError, "async"),
        (Instruction("boom"), RuntimeError, "boom"),
        (42, AgentError, "not an instruction"),
    ],
)
def test_cmd_errors(instruction: Any, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        cmd(Counter(), instruction)


async def test_acmd_runs_async_actions() -> None:
    state, directives = await acmd(Counter(), Instruction("async_add", {"by": 7}))
    assert state.count == 7 and directives == []


class Hooked(Agent):
    name = "hooked"
    State = CounterState
    actions = (Add, Boom)

    def on_before_cmd(self, instruction: Instruction) -> Instruction:
        if instruction.action == "add" and isinstance(instruction.params, dict):
            return Instruction("add", {"by": instruction.params["by"] * 10})
        return instruction

    def on_after_cmd(
        self, instruction: Instruction, state: Any, directives: list[Any]
    ) -> tuple[Any, list[Any]]:
        return msgspec.structs.replace(state, label="after"), [*directives, Reply("hooked")]

    def on_error(self, instruction: Instruction, error: BaseException) -> Result | None:
        return Result(state={"label": f"recovered:{error}"})


def test_hooks() -> None:
    state, directives = cmd(Hooked(), Instruction("add", {"by": 2}))
    assert state == CounterState(count=20, label="after")
    assert directives == [Reply("hooked")]
    state, _ = cmd(Hooked(), Instruction("boom"))
    assert state.label == "after"  # on_error recovered, then on_after_cmd ran
    state2, _ = cmd(Hooked(), "boom")
    assert state2.count == 0


class BeatState(msgspec.Struct, frozen=True):
    beats: int = 0


class BeatConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    interval: float = 1.0


class Beat(Action[msgspec.Struct]):
    name = "beat"

    def run(self, params: Any, ctx: ActionContext) -> BeatState:
        return BeatState(beats=ctx.state.beats + 1)


class Beats(Skill):
    name = "beats"
    Config = BeatConfig
    State = BeatState
    actions = (Beat,)
    routes = (("skill.beat", "beat"),)

    def schedules(self) -> list[Every]:
        return [Every(self.config.interval, "skill.beat")]


class WithSkill(Agent):
    name = "with_skill"
    State = CounterState
    actions = (Add,)
    skills = (Beats({"interval": 2.0}), Beats(state_key="other"))


def test_skill_state_is_namespaced() -> None:
    agent = WithSkill()
    assert agent.skill_states == {"beats": BeatState(), "other": BeatState()}
    new, _ = run_cmd(agent, Signal(type="skill.beat"))
    assert new.skill_states["beats"] == BeatState(beats=1)
    assert new.state == CounterState()
    new2, _ = run_cmd(new, Instruction("add"))
    assert new2.state.count == 1 and new2.skill_states["beats"].beats == 1
    assert WithSkill.skills[0].schedules() == [Every(2.0, "skill.beat")]
    assert Beats.config_schema()["properties"]["interval"]["type"] == "number"


def test_skill_config_errors() -> None:
    with pytest.raises(SkillError, match="invalid config"):
        Beats({"interval": "soon"})
    with pytest.raises(SkillError, match="invalid config"):
        Beats({"unknown": 1})
    with pytest.raises(SkillError, match="state key"):
        Beats(state_key="Bad Key")
    with pytest.raises(SkillError, match="interval"):
        Every(0, "x.y")


def test_definition_errors() -> None:
    with pytest.raises(AgentDefinitionError, match="unknown action"):

        class _A(Agent):
            routes = (("a.b", "missing"),)

    with pytest.raises(AgentDefinitionError, match="name"):

        class _B(Agent):
            name = "Bad Name"

    with pytest.raises(AgentDefinitionError, match="State"):

        class _C(Agent):
            State = dict  # type: ignore[assignment]

    with pytest.raises(AgentDefinitionError, match=r"a\.\*\*x"):

        class _D(Agent):
            actions = (Add,)
            routes = (("a.**x", "add"),)

    with pytest.raises(AgentDefinitionError, match="two skills"):

        class _E(Agent):
            skills = (Beats(), Beats())


def test_checkpoint_round_trip_and_mismatch() -> None:
    agent, _ = run_cmd(WithSkill(id="w1"), Signal(type="skill.beat"))
    agent, _ = run_cmd(agent, Instruction("add", {"by": 41}))
    blob = agent.checkpoint()
    back = WithSkill.restore(blob)
    assert back.id == "w1"
    assert back.state == agent.state and back.skill_states == agent.skill_states

    with pytest.raises(CheckpointError, match="cannot restore into 'counter'"):
        Counter.restore(blob)

    class Other(Agent):
        name = "with_skill"  # same name, different schema

        class State(msgspec.Struct):
            count: str = ""

        skills = (Beats(), Beats(state_key="other"))

    with pytest.raises(CheckpointError, match="does not match"):
        Other.restore(blob)
    with pytest.raises(CheckpointError, match="not an agent checkpoint"):
        WithSkill.restore(b"\x00garbage")


def test_an_action_without_run_cannot_be_used() -> None:
    class NoRun(Action[AddParams]):
        name = "no_run"

    class Broken(Agent):
        name = "broken"
        actions = (NoRun,)

    with pytest.raises(TypeError, match="abstract"):
        cmd(Broken(), "no_run")
