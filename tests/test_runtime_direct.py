"""``AgentServer.call_direct``: a message for an idle agent runs on the caller's task, with the
same one-at-a-time order, error policy, stop and crash semantics as the agent's own task."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import msgspec
import pytest

from agentcluster.agents import (
    Action,
    ActionContext,
    Agent,
    AgentStopped,
    ErrorPolicy,
    Instruction,
    Reply,
    Result,
    Runtime,
    Stop,
)
from agentcluster.logs import agent_id_var
from agentcluster.signals import Signal
from agentcluster.testing import wait_until as until


class Seen(msgspec.Struct):
    seen: list[str] = msgspec.field(default_factory=list)


class Note(Action[msgspec.Struct]):
    name = "note"

    def run(self, params: Any, ctx: ActionContext) -> Result:
        assert ctx.signal is not None
        seen = [*ctx.state.seen, ctx.signal.type]
        return Result(state=Seen(seen), reply=seen)


class WhereParams(msgspec.Struct):
    seconds: float = 0.0


class Where(Action[WhereParams]):
    """Replies with the task it ran on and the agent id the logs would show."""

    name = "where"

    async def run(self, params: WhereParams, ctx: ActionContext) -> Reply:
        if params.seconds:
            await ctx.clock.sleep(params.seconds)
        return Reply((asyncio.current_task(), agent_id_var.get()))


class Fail(Action[msgspec.Struct]):
    name = "fail"

    def run(self, params: Any, ctx: ActionContext) -> None:
        raise ValueError("failing on purpose")


class Quit(Action[msgspec.Struct]):
    name = "quit"

    def run(self, params: Any, ctx: ActionContext) -> Result:
        return Result(reply="bye", directives=[Stop()])


class Worker(Agent):
    name = "worker"
    State = Seen
    actions = (Note, Where, Fail, Quit)
    routes = (("test.note.**", "note"), ("test.fail", "fail"), ("test.quit", "quit"))


async def test_an_idle_agent_runs_the_message_on_the_callers_task() -> None:
    async with Runtime("n1") as rt:
        server = await rt.spawn(Worker)
        await until(lambda: server.idle)
        task, agent_id = await rt.call_direct("worker", Instruction("where"), timeout=5.0)
        assert task is asyncio.current_task()
        assert agent_id == "worker"  # the logs still name the agent
        assert agent_id_var.get() is None  # and the caller's context is left as it was
        assert await server.call_direct(Signal(type="test.note.a"), timeout=5.0) == ["test.note.a"]
        assert server.processed == 2 and server.idle
        # Through the mailbox, the agent's own task runs it.
        task, _ = await server.call(Instruction("where"))
        assert task is not asyncio.current_task()


@pytest.mark.virtual_time
async def test_messages_arriving_during_a_direct_run_wait_their_turn() -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Worker)
        await until(lambda: server.idle)
        slow = asyncio.create_task(
            server.call_direct(Instruction("where", {"seconds": 5}), timeout=10)
        )
        await until(lambda: not server.idle)
        assert slow.done() is False
        # A second direct call and a cast both queue behind the running one, in order.
        second = asyncio.create_task(server.call_direct(Signal(type="test.note.b"), timeout=10))
        await until(lambda: server.mailbox_depth == 1)
        server.cast_nowait(Signal(type="test.note.c"))
        server.cast_nowait(Signal(type="test.note.d"))
        await asyncio.sleep(1)  # virtual time: the slow action still runs (noqa: sleep)
        assert server.mailbox_depth == 3 and server.agent.state.seen == []
        task, _ = await slow
        assert task is slow  # it ran on its caller's task
        assert await second == ["test.note.b"]
        await until(lambda: len(server.agent.state.seen) == 3)
        assert server.agent.state.seen == ["test.note.b", "test.note.c", "test.note.d"]


@pytest.mark.virtual_time
async def test_the_callers_deadline_does_not_cut_a_direct_run_short() -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Worker)
        await until(lambda: server.idle)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await server.call_direct(Instruction("where", {"seconds": 3}), timeout=1.0)
        assert loop.time() - t0 == pytest.approx(3.0)  # the serving side reports it as late


async def test_a_failing_action_raises_to_the_caller_and_the_agent_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Worker)
        await until(lambda: server.idle)
        with (
            caplog.at_level(logging.ERROR, logger="agentcluster"),
            pytest.raises(ValueError, match="on purpose"),
        ):
            await server.call_direct(Signal(type="test.fail"), timeout=5.0)
        assert server.errors == 1 and server.running
        assert any("failing on purpose" in r.getMessage() for r in caplog.records)
        assert await server.call_direct(Signal(type="test.note.x"), timeout=5.0) == ["test.note.x"]


@pytest.mark.virtual_time
async def test_a_crash_in_a_direct_run_ends_the_agent_and_its_supervisor_restarts_it() -> None:
    async with Runtime() as rt:
        first = await rt.spawn(Worker, error_policy=ErrorPolicy(on_error="stop"))
        await first.call_direct(Signal(type="test.note.before"), timeout=5.0)
        await until(lambda: first.idle)
        with pytest.raises(ValueError, match="on purpose"):
            await first.call_direct(Signal(type="test.fail"), timeout=5.0)
        reason = await first.wait()
        assert reason is not None and "failing on purpose" in str(reason)
        await until(lambda: rt.get("worker") not in (None, first))
        assert rt.lookup("worker").agent.state.seen == []  # restarted from the initial state
        assert rt.supervisor.count_restarts() == 1
        with pytest.raises(AgentStopped):
            await first.call_direct(Signal(type="test.note.late"), timeout=5.0)


async def test_a_stop_directive_in_a_direct_run_stops_the_agent_normally() -> None:
    async with Runtime() as rt:
        server = await rt.spawn(Worker, restart="transient")
        await until(lambda: server.idle)
        assert await server.call_direct(Signal(type="test.quit"), timeout=5.0) == "bye"
        assert await server.wait() is None
        await until(lambda: rt.get("worker") is None)


async def _busy_direct_run(
    rt: Runtime, restart: Literal["transient", "temporary"], seconds: float
) -> tuple[Any, asyncio.Task[Any]]:
    """A worker and a task serving one call that runs on it directly for ``seconds``."""
    server = await rt.spawn(Worker, restart=restart)
    await until(lambda: server.idle)
    run = asyncio.create_task(
        server.call_direct(Instruction("where", {"seconds": seconds}), timeout=5)
    )
    await until(lambda: not server.idle)
    return server, run


@pytest.mark.virtual_time
async def test_a_stop_requested_during_a_direct_run_takes_effect_after_it() -> None:
    async with Runtime() as rt:
        server, run = await _busy_direct_run(rt, "transient", 2)
        stopping = asyncio.create_task(server.stop())
        await until(lambda: server._stopping)
        assert server.running and not run.done()
        task, _ = await run  # the running message finishes
        assert task is run
        await stopping
        assert not server.running and await server.wait() is None


@pytest.mark.virtual_time
async def test_an_agent_that_ends_during_a_direct_run_takes_the_run_with_it() -> None:
    async with Runtime() as rt:
        # A connection's task serving one call, stuck in the action.
        server, run = await _busy_direct_run(rt, "temporary", 600)
        await server.stop(timeout=1.0)  # the run outlasts the stop: the agent is cancelled
        assert not server.running
        await until(run.done)
        assert run.cancelled()
