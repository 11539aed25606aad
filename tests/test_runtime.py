"""The runtime: agent servers, mailboxes, call/cast, error policies, directives, supervision."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from agentcluster.agents import (
    Action,
    ActionContext,
    Agent,
    AgentError,
    AgentServer,
    AgentStopped,
    CallTimeout,
    Cancel,
    Directive,
    Emit,
    ErrorPolicy,
    Instruction,
    MailboxFull,
    Reply,
    Result,
    Route,
    Runtime,
    Schedule,
    Send,
    SpawnAgent,
    StartSensor,
    Stop,
    StopAgent,
    StopSensor,
    UnknownAgent,
)
from agentcluster.agents.sensors import HeartbeatSensor
from agentcluster.signals import Signal
from agentcluster.testing import advance
from agentcluster.testing import wait_until as until


class Log(msgspec.Struct):
    seen: list[str] = msgspec.field(default_factory=list)
    at: list[float] = msgspec.field(default_factory=list)


class Note(Action[msgspec.Struct]):
    name = "note"

    def run(self, params: Any, ctx: ActionContext) -> dict[str, Any]:
        assert ctx.signal is not None
        return {"seen": [*ctx.state.seen, ctx.signal.type], "at": [*ctx.state.at, ctx.clock.now()]}


class SlowParams(msgspec.Struct):
    seconds: float = 1.0


class Slow(Action[SlowParams]):
    name = "slow"

    async def run(self, params: SlowParams, ctx: ActionContext) -> Reply:
        await ctx.clock.sleep(params.seconds)
        return Reply("slept")


class Fail(Action[msgspec.Struct]):
    name = "fail"

    def run(self, params: Any, ctx: ActionContext) -> None:
        raise ValueError("failing on purpose")


class DoParams(msgspec.Struct):
    directives: list[Any] = msgspec.field(default_factory=list)


class Do(Action[msgspec.Struct]):
    """Returns whatever directives the test put in the instruction's params."""

    name = "do"

    def run(self, params: Any, ctx: ActionContext) -> Result:
        return Result(directives=ctx.extra.get("directives", []))


class Echo(Action[msgspec.Struct]):
    name = "echo"

    def run(self, params: Any, ctx: ActionContext) -> Reply:
        return Reply(ctx.signal.data if ctx.signal is not None else None)


class Recorder(Agent):
    name = "recorder"
    State = Log
    actions = (Note, Slow, Fail, Echo)
    routes = (
        ("test.note.**", "note"),
        Route("test.echo", "echo", params=lambda s: None),
        ("test.fail", "fail"),
    )


# Directives that cannot be expressed as params are smuggled through this registry: the
# action reads them from a class attribute set by the test.
@dataclass
class Script:
    directives: list[Directive]


class Scripted(Action[msgspec.Struct]):
    name = "scripted"
    script: Script = Script([])

    def run(self, params: Any, ctx: ActionContext) -> Result:
        return Result(directives=list(Scripted.script.directives))


class Director(Agent):
    name = "director"
    State = Log
    actions = (Scripted, Note)
    routes = (("test.go", "scripted"), ("test.note.**", "note"))


def script(*directives: Directive) -> None:
    Scripted.script = Script(list(directives))


async def test_call_and_cast() -> None:
    async with Runtime("n1") as rt:
        server = await rt.spawn(Recorder)
        assert await rt.call("recorder", Signal(type="test.echo", data=42)) == 42
        state = await server.call(Signal(type="test.note.a"))
        assert state.seen == ["test.note.a"]
        await rt.cast("recorder", Signal(type="test.note.b"))
        await until(lambda: server.agent.state.seen == ["test.note.a", "test.note.b"])
        assert [i.id for i in rt.agents()] == ["recorder"]
        with pytest.raises(UnknownAgent, match="nobody"):
            await rt.call("nobody", Signal(type="test.echo"))


@pytest.mark.virtual_time
async def test_call_timeout() -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Recorder)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(CallTimeout, match="within 2"):
            await server.call(Instruction("slow", {"seconds": 10}), timeout=2.0)
        assert loop.time() - t0 == pytest.approx(2.0)
        # The server finishes the slow instruction and goes on serving.
        assert await server.call(Instruction("slow", {"seconds": 1}), timeout=20) == "slept"


@pytest.mark.virtual_time
async def test_a_call_that_expires_in_the_mailbox_is_never_run() -> None:
    async with Runtime(mailbox_size=2) as rt:
        server = await rt.spawn(Recorder)
        loop = asyncio.get_running_loop()
        await server.cast(Instruction("slow", {"seconds": 5}))
        await until(lambda: server.mailbox_depth == 0)  # the agent is busy for 5 s
        t0 = loop.time()
        with pytest.raises(CallTimeout, match="within 1"):
            await server.call(Signal(type="test.note.expired"), timeout=1.0)
        assert loop.time() - t0 == pytest.approx(1.0)
        assert server.mailbox_depth == 1  # still queued, but its caller is gone
        # A full mailbox: the wait for room counts against the call's timeout too.
        server.cast_nowait(Signal(type="test.note.a"))
        t0 = loop.time()
        with pytest.raises(CallTimeout, match="within 1"):
            await server.call(Signal(type="test.note.c"), timeout=1.0)
        assert loop.time() - t0 == pytest.approx(1.0)
        assert await server.call(Signal(type="test.echo", data=7), timeout=10.0) == 7
        assert server.agent.state.seen == ["test.note.a"]


@pytest.mark.virtual_time
async def test_mailbox_overflow_and_backpressure() -> None:
    async with Runtime(mailbox_size=2) as rt:
        server = await rt.spawn(Recorder)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await server.cast(Instruction("slow", {"seconds": 5}))
        await until(lambda: server.mailbox_depth == 0)  # taken: the agent is busy for 5 s
        server.cast_nowait(Signal(type="test.note.1"))
        server.cast_nowait(Signal(type="test.note.2"))
        with pytest.raises(MailboxFull, match="is full"):
            server.cast_nowait(Signal(type="test.note.3"))
        t0 = loop.time()
        with pytest.raises(MailboxFull, match="stayed full"):
            await server.cast(Signal(type="test.note.3"), timeout=1.0)
        assert loop.time() - t0 == pytest.approx(1.0)
        # With a longer timeout, backpressure: the cast waits until the slow action is done.
        await server.cast(Signal(type="test.note.3"), timeout=10.0)
        assert loop.time() - start == pytest.approx(5.0)
        await until(lambda: len(server.agent.state.seen) == 3)
        assert server.agent.state.seen == ["test.note.1", "test.note.2", "test.note.3"]


async def test_error_policy_log_keeps_going(caplog: pytest.LogCaptureFixture) -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Recorder)
        with (
            caplog.at_level(logging.ERROR, logger="agentcluster"),
            pytest.raises(ValueError, match="on purpose"),
        ):
            await server.call(Signal(type="test.fail"))
        assert server.errors == 1 and server.running
        assert any("failing on purpose" in r.getMessage() for r in caplog.records)
        assert await server.call(Signal(type="test.echo", data=1)) == 1


async def test_error_policy_emit_publishes_agent_error() -> None:
    async with Runtime() as rt:
        sub = rt.bus.subscribe("agent.error")
        server = await rt.spawn(Recorder, error_policy=ErrorPolicy(on_error="emit"))
        failing = Signal(type="test.fail")
        await server.cast(failing)
        err = await asyncio.wait_for(sub.get(), 5)
        assert err.data["agent"] == "recorder"
        assert err.data["error_type"] == "ValueError"
        assert err.data["signal_id"] == failing.id


@pytest.mark.virtual_time
async def test_error_policy_stop_crashes_and_supervisor_restarts() -> None:
    async with Runtime() as rt:
        first = await rt.spawn(Recorder, error_policy=ErrorPolicy(on_error="stop"))
        await first.call(Signal(type="test.note.before"))
        await first.cast(Signal(type="test.fail"))
        reason = await first.wait()
        assert reason is not None and "failing on purpose" in str(reason)
        await until(lambda: rt.get("recorder") not in (None, first))
        second = rt.lookup("recorder")
        assert second.agent.state.seen == []  # restarted from the initial state
        assert rt.supervisor.count_restarts() == 1


@pytest.mark.virtual_time
async def test_max_errors_then_restart_intensity_escalates() -> None:
    async with Runtime(max_restarts=1, max_seconds=10) as rt:
        policy = ErrorPolicy(on_error="log", max_errors=2)
        server = await rt.spawn(Recorder, error_policy=policy)
        await server.cast(Signal(type="test.fail"))
        assert server.running
        await server.cast(Signal(type="test.fail"))
        assert await server.wait() is not None  # second error: crash
        await until(lambda: rt.get("recorder") not in (None, server))
        again = rt.lookup("recorder")
        await again.cast(Signal(type="test.fail"))
        await again.cast(Signal(type="test.fail"))
        assert await again.wait() is not None
        # Two restarts within 10 s exceed max_restarts=1: the root supervisor gives up.
        reason = await rt.supervisor.wait()
        assert reason is not None and "recorder" in str(reason)


@pytest.mark.virtual_time
async def test_transient_agent_is_not_restarted_after_normal_stop() -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Director, restart="transient")
        script(Stop())
        await server.call(Signal(type="test.go"))
        assert await server.wait() is None
        await advance(1)
        assert rt.get("director") is None


@pytest.mark.virtual_time
async def test_schedule_and_cancel_in_virtual_time() -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Director)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        script(
            Schedule(30.0, Signal(type="test.note.late"), key="late"),
            Schedule(10.0, Signal(type="test.note.early")),
            Schedule(20.0, Signal(type="test.note.cancelled"), key="c"),
        )
        await server.call(Signal(type="test.go"))
        assert sorted(server.timers) == ["_timer1", "c", "late"]
        script(Cancel("c"), Schedule(40.0, Signal(type="test.note.replaced"), key="late"))
        await server.call(Signal(type="test.go"))
        await until(lambda: len(server.agent.state.seen) == 2, timeout=100)
        assert server.agent.state.seen == ["test.note.early", "test.note.replaced"]
        assert [round(t - t0, 6) for t in server.agent.state.at] == [10.0, 40.0]
        assert server.timers == []


async def test_emit_send_spawn_stop_directives() -> None:
    async with Runtime("n1") as rt:
        bus_sub = rt.bus.subscribe("test.note.**")
        director = await rt.spawn(Director)
        await rt.spawn(Recorder)
        script(
            Emit(Signal(type="test.note.bus")),
            Emit(Signal(type="test.note.direct"), to="recorder"),
            Send("recorder", Signal(type="test.note.sent")),
            Send("recorder", Signal(type="test.note.sent-local"), node="n1"),
            SpawnAgent(Recorder, id="child"),
        )
        await director.call(Signal(type="test.go"))
        assert (await asyncio.wait_for(bus_sub.get(), 5)).type == "test.note.bus"
        recorder = rt.lookup("recorder")
        await until(lambda: len(recorder.agent.state.seen) == 3)
        assert recorder.agent.state.seen == [
            "test.note.direct",
            "test.note.sent",
            "test.note.sent-local",
        ]
        child = rt.lookup("child")
        assert child.parent is director
        # A linked child stops with its parent, and a stopped agent leaves the table.
        script(StopAgent("recorder"))
        await director.call(Signal(type="test.go"))
        assert [a.id for a in rt.agents()] == ["director", "child"]
        assert rt.get("recorder") is child  # by name: the only running Recorder now
        await rt.stop_agent("director")
        assert rt.get("child") is None and rt.get("director") is None
        with pytest.raises(AgentStopped):
            await director.call(Signal(type="test.go"))


async def test_send_to_another_node_uses_the_remote_sender() -> None:
    sent: list[tuple[str, str, str]] = []

    async def remote(node: str, agent: str, signal: Signal) -> None:
        sent.append((node, agent, signal.type))

    async with Runtime("n1") as rt:
        director = await rt.spawn(Director, error_policy=ErrorPolicy(on_error="emit"))
        errors = rt.bus.subscribe("agent.error")
        script(Send("worker", Signal(type="test.remote"), node="n2"))
        await director.call(Signal(type="test.go"))
        err = await asyncio.wait_for(errors.get(), 5)
        assert "no transport" in err.data["message"]
        rt.remote_sender = remote
        await director.call(Signal(type="test.go"))
        assert sent == [("n2", "worker", "test.remote")]


@dataclass(frozen=True, slots=True)
class Shout(Directive):
    text: str


async def test_custom_directive() -> None:
    heard: list[tuple[str, str]] = []
    async with Runtime() as rt:
        rt.register_directive(Shout, lambda server, d: heard.append((server.id, d.text)))
        director = await rt.spawn(Director)
        script(Shout("hello"))
        await director.call(Signal(type="test.go"))
        assert heard == [("director", "hello")]
        with pytest.raises(TypeError):
            rt.register_directive(int, lambda s, d: None)  # type: ignore[arg-type]


async def test_unknown_custom_directive_is_an_agent_error(caplog: pytest.LogCaptureFixture) -> None:
    @dataclass(frozen=True, slots=True)
    class Unknown(Directive):
        pass

    async with Runtime() as rt:
        director = await rt.spawn(Director)
        script(Unknown())
        with caplog.at_level(logging.ERROR, logger="agentcluster"):
            await director.call(Signal(type="test.go"))
        assert director.errors == 1 and director.running
        assert any("no executor for directive Unknown" in r.getMessage() for r in caplog.records)


@pytest.mark.virtual_time
async def test_sensor_directives() -> None:
    async with Runtime() as rt:
        director = await rt.spawn(Director)
        script(StartSensor(HeartbeatSensor(5.0), key="hb"))
        await director.call(Signal(type="test.go"))
        assert director.sensors == ["hb"]

        class Beats(Agent):
            name = "beats"
            State = Log
            actions = (Note,)
            routes = (("agent.heartbeat", "note"),)

        beats = await rt.spawn(Beats)
        beats._start_sensor("hb", HeartbeatSensor(5.0))
        await until(lambda: len(beats.agent.state.seen) == 3, timeout=20)
        assert beats.agent.state.at == [pytest.approx(x, abs=1e-6) for x in (5.0, 10.0, 15.0)]
        script(StopSensor("hb"))
        await director.call(Signal(type="test.go"))
        await until(lambda: director.sensors == [])


async def test_duplicate_ids_and_names() -> None:
    async with Runtime() as rt:
        await rt.spawn(Recorder)
        with pytest.raises(AgentError, match="already running"):
            await rt.spawn(Recorder)
        await rt.spawn(Recorder, id="r2")
        assert {s.id for s in rt.find("recorder")} == {"recorder", "r2"}
        assert rt.get("r2") is not None


async def test_runtime_must_be_entered() -> None:
    rt = Runtime()
    with pytest.raises(AgentError, match="not running"):
        await rt.spawn(Recorder, restart=None)


async def test_shutdown_stops_agents_in_reverse_order() -> None:
    stopped: list[str] = []

    class Tracked(Agent):
        name = "tracked"

    async with Runtime() as rt:
        servers: list[AgentServer] = [await rt.spawn(Tracked, id=f"t{i}") for i in range(3)]
        for s in servers:
            orig = s.stop

            async def stop(timeout: float = 5.0, _orig: Any = orig, _id: str = s.id) -> None:
                stopped.append(_id)
                await _orig(timeout)

            s.stop = stop  # type: ignore[method-assign]
    assert stopped == ["t2", "t1", "t0"]
    assert all(not s.running for s in servers)


@pytest.mark.virtual_time
async def test_agent_subtree_one_for_all_restarts_its_siblings() -> None:
    async with Runtime("n1") as rt:
        events = rt.bus.subscribe("runtime.supervisor.child_restarted")
        policy = ErrorPolicy(on_error="stop")
        await rt.start_supervisor(
            "pipeline",
            [rt.agent_spec(Recorder, id=f"stage{i}", error_policy=policy) for i in range(3)],
            strategy="one_for_all",
        )
        before = {i: rt.lookup(f"stage{i}") for i in range(3)}
        await before[0].call(Signal(type="test.note.x"))
        await before[1].cast(Signal(type="test.fail"))
        await until(lambda: all(rt.get(f"stage{i}") not in (None, before[i]) for i in range(3)))
        assert all(rt.lookup(f"stage{i}").agent.state.seen == [] for i in range(3))
        assert rt.subtree("pipeline").count_restarts() == 1
        restarted = {(await events.get()).subject for _ in range(3)}
        assert restarted == {"stage0", "stage1", "stage2"}
        # Stopping one agent of the subtree for good: it is not restarted, siblings keep running.
        await rt.stop_agent("stage2")
        await advance(1)
        assert rt.get("stage2") is None
        assert rt.get("stage0") is not None and rt.get("stage1") is not None
        with pytest.raises(LookupError, match="nope"):
            rt.subtree("nope")
