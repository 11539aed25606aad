"""``cluster.call`` failures, typed: what an agent raised is its own error whatever its name
(and the call ran: never retried), replies that cannot travel, a connection lost mid-call,
signals too large to send, idempotent deadlines, and the remote client over the control API
(its timeouts, unreachable nodes, and calls queued on its shared connection)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import msgspec
import pytest

from agentcluster.agents import Action, ActionContext, Agent, CallTimeout, MailboxFull, Result
from agentcluster.cluster import Cluster, RemoteCluster, call_error
from agentcluster.config import NodeConfig
from agentcluster.control import (
    MAX_CONTROL_FRAME,
    CallReply,
    ControlReply,
    ControlRequest,
    NodeStream,
)
from agentcluster.errors import CallRemoteError, NoCapacity, Rejected, Timeout
from agentcluster.examples.worker import Echo
from agentcluster.node import Node
from agentcluster.testing import wait_until
from agentcluster.testing.simcluster import SimCluster
from agentcluster.wire import WireCodec

RUNS: list[str] = []  # the agents that ran a _Work call, in order


def _named(name: str) -> Callable[[], Exception]:
    """An exception (a factory of) whose type is called like one of the node's statuses."""
    cls = type(name, (Exception,), {})
    return lambda: cls(f"my own {name}")


# What the agent raises after its work, by the signal's "raise" (the statuses' names: an
# agent's exception may be called anything).
_RAISES: dict[str, Callable[[], Exception]] = {
    # A nested cluster.call that was shed downstream.
    "Rejected": lambda: Rejected("downstream refused", reason="overload"),
    # A cast_nowait to a busy downstream agent.
    "MailboxFull": lambda: MailboxFull("downstream mailbox full"),
    # A nested call to another agent that timed out (well before this call's deadline).
    "CallTimeout": lambda: CallTimeout("downstream got no reply within 0.01s"),
    **{name: _named(name) for name in ("NoAgent", "NotSent", "Timeout", "Lost")},
}


class _Work(Action[msgspec.Struct]):
    """A side effect (the run is recorded), then what the signal asks for."""

    name = "work"

    async def run(self, params: Any, ctx: ActionContext) -> Result:
        RUNS.append(str(ctx.agent_id))
        data = ctx.signal.data if ctx.signal is not None else {}
        if "raise" in data:
            raise _RAISES[data["raise"]]()
        if data.get("big_int"):
            return Result(reply={"n": 2**70})  # msgpack carries 64 bits at most
        if data.get("object"):
            return Result(reply={"o": object()})  # no msgpack type at all
        if "reply_bytes" in data:
            return Result(reply={"pad": "r" * int(data["reply_bytes"])})
        if "error_bytes" in data:
            raise ValueError("e" * int(data["error_bytes"]))
        return Result(reply={"ok": True})


class Worker(Agent):
    name = "worker"
    capabilities: ClassVar[tuple[str, ...]] = ("work",)
    actions = (_Work,)
    routes = (("app.work", "work"),)


async def _spawn(c: SimCluster, agent: type[Agent], cap: str, names: list[str]) -> None:
    await c.wait_until(c.converged, timeout=30)
    for n in names:
        await c.nodes[n].runtime.spawn(agent)
        await Cluster.of(c.nodes[n]).register(agent.name, capabilities=[cap])

    def everywhere() -> bool:
        return all(len(c.nodes[o].registry.index.find_capable(cap)) == len(names) for o in c.live())

    await c.wait_until(everywhere, timeout=10)


# ------------------------------------------------------------------ the agent's own errors
@pytest.mark.virtual_time
@pytest.mark.parametrize("idempotent", [False, True])
@pytest.mark.parametrize("raised", sorted(_RAISES))
async def test_what_the_agent_raised_is_its_error_and_the_call_is_not_run_again(
    raised: str, idempotent: bool
) -> None:
    # Two capable nodes: a call taken for "not run" (or for a node failure, when idempotent)
    # would run again on the other one.
    RUNS.clear()
    async with SimCluster(3, seed=7) as c:
        await _spawn(c, Worker, "work", ["n2", "n3"])
        caller = c.nodes["n1"]
        with pytest.raises(CallRemoteError) as err:
            await Cluster.of(caller).call(
                "work", "app.work", {"raise": raised}, idempotent=idempotent
            )
        assert len(RUNS) == 1, f"the call ran {len(RUNS)} times"
        assert err.value.remote_type == raised
        assert len(err.value.attempts) == 1
        # The agent's answer is no failure of its node's.
        await asyncio.sleep(0)
        assert caller.balancer.decisions[-1].ok


@pytest.mark.virtual_time
async def test_an_agent_error_on_the_callers_own_node_is_its_error_too() -> None:
    RUNS.clear()
    async with SimCluster(1, seed=17) as c:
        # The caller's own agent: the mailbox path, no wire.
        await _spawn(c, Worker, "work", ["n1"])
        with pytest.raises(CallRemoteError) as err:
            await Cluster.of(c.nodes["n1"]).call("work", "app.work", {"raise": "Rejected"})
        assert err.value.remote_type == "Rejected" and RUNS == ["worker"]


def test_a_reply_from_a_node_that_does_not_mark_agent_errors_still_decodes() -> None:
    class OldCallReply(msgspec.Struct, frozen=True, array_like=True, tag="callr", tag_field="t"):
        ok: bool
        data: Any = None
        error_type: str = ""
        error: str = ""
        reason: str = ""

    codec = WireCodec(NodeStream, None)
    old = codec.try_decode(codec.encode(OldCallReply(False, error_type="NoAgent", error="x")))
    assert old == CallReply(False, error_type="NoAgent", error="x", raised=False)
    new = codec.try_decode(codec.encode(CallReply(False, error_type="E", raised=True)))
    assert isinstance(new, CallReply) and new.raised


# ------------------------------------------------------------------ replies that cannot travel
@pytest.mark.virtual_time
@pytest.mark.parametrize(
    ("data", "remote_type"),
    [({"big_int": True}, "OverflowError"), ({"reply_bytes": 5 << 20}, "Oversized")],
)
async def test_a_reply_that_cannot_be_sent_is_the_agents_typed_error(
    data: dict[str, Any], remote_type: str
) -> None:
    RUNS.clear()
    async with SimCluster(3, seed=9) as c:
        await _spawn(c, Worker, "work", ["n2", "n3"])
        with pytest.raises(CallRemoteError) as err:
            # Idempotent: a reply lost with its connection would be run again elsewhere.
            await Cluster.of(c.nodes["n1"]).call("work", "app.work", data, idempotent=True)
        assert err.value.remote_type == remote_type
        assert "not serialisable" in str(err.value)
        assert len(RUNS) == 1
        target = c.nodes[err.value.attempts[0]].calls
        assert (target.served, target.failed) == (0, 1)


@pytest.mark.virtual_time
async def test_a_huge_error_message_arrives_cut() -> None:
    async with SimCluster(2, seed=10) as c:
        await _spawn(c, Worker, "work", ["n2"])
        with pytest.raises(CallRemoteError) as err:
            await Cluster.of(c.nodes["n1"]).call("work", "app.work", {"error_bytes": 5 << 20})
        assert err.value.remote_type == "ValueError"
        message = str(err.value)
        assert 64 << 10 < len(message) < 65 << 10
        assert message.endswith(f"... (cut: {5 << 20:,} characters)")


# ------------------------------------------------------------------ lost connections
@pytest.mark.virtual_time
async def test_a_call_lost_mid_run_is_a_timeout_not_no_capacity() -> None:
    async with SimCluster(2, seed=12) as c:
        await _spawn(c, Echo, "echo", ["n2"])
        c.at(c.clock.now() + 0.5, lambda: c.crash("n2"))
        with pytest.raises(Timeout, match="connection broke after the call was sent") as err:
            await Cluster.of(c.nodes["n1"]).call("echo", "app.echo", {"sleep": 2.0}, timeout=5.0)
        assert "may have run" in str(err.value) and err.value.attempts == ("n2",)
        assert c.clock.now() < 5.0 + 60  # (the crash, not the deadline, ended it)


# ------------------------------------------------------------------ bad input
@pytest.mark.virtual_time
async def test_a_signal_too_large_to_send_is_a_value_error_and_is_not_retried() -> None:
    async with SimCluster(3, seed=13) as c:
        await _spawn(c, Echo, "echo", ["n2", "n3"])
        caller = c.nodes["n1"]
        cluster = Cluster.of(caller)
        balancer = caller.calls.balancer
        await cluster.call("echo", "app.echo", {"warm": 1})
        strategy: Any = balancer._routes["echo"].strategy  # (its in-flight counts)
        await c.wait_until(
            lambda: strategy.inflight("n2") + strategy.inflight("n3") == 0, timeout=5
        )
        picks = balancer.picks
        with pytest.raises(ValueError, match=r"too large to send .*bytes, max_size is 4194304"):
            await cluster.call("echo", "app.echo", {"pad": "y" * (5 << 20)}, idempotent=True)
        assert balancer.picks == picks + 1  # one attempt, not retried on the other node
        assert strategy.inflight("n2") == 0 and strategy.inflight("n3") == 0
        assert (await cluster.call("echo", "app.echo", {"i": 1}))["echo"] == {"i": 1}


# ------------------------------------------------------------------ deadlines
@pytest.mark.virtual_time
async def test_an_idempotent_call_to_the_only_capable_node_gets_its_whole_deadline() -> None:
    async with SimCluster(2, seed=11) as c:
        await _spawn(c, Echo, "echo", ["n2"])
        cluster = Cluster.of(c.nodes["n1"])
        # 1.5 s of work in a 2 s deadline: half of it would not do.
        reply = await cluster.call("echo", "app.echo", {"sleep": 1.5}, timeout=2.0, idempotent=True)
        assert reply["echo"] == {"sleep": 1.5}


@pytest.mark.virtual_time
async def test_an_idempotent_call_keeps_time_for_a_retry_when_another_node_could_take_it() -> None:
    async with SimCluster(3, seed=14) as c:
        await _spawn(c, Echo, "echo", ["n2", "n3"])
        caller = c.nodes["n1"]
        caller.balancer.set_strategy("round_robin", now=c.clock.now())
        c.stall("n2", 30.0)
        c.stall("n3", 30.0)
        t0 = c.clock.now()
        with pytest.raises(Timeout) as err:
            await Cluster.of(caller).call("echo", "app.echo", {}, timeout=2.0, idempotent=True)
        # The first try had half the time; the second went to the other node.
        assert len(err.value.attempts) == 2 and set(err.value.attempts) == {"n2", "n3"}
        assert c.clock.now() - t0 == pytest.approx(2.0, abs=0.1)


# ------------------------------------------------------------------ the remote client
class _FakeNode:
    """A control endpoint answering ``call`` ops as told: ``reply`` (after ``hold`` is set,
    when given), ``error`` (the op failed on the node), ``close`` (no reply) or ``hang``."""

    def __init__(self, mode: str = "reply", hold: asyncio.Event | None = None) -> None:
        self.mode = mode
        self.hold = hold
        self.received: list[dict[str, Any]] = []
        self.codec = WireCodec(NodeStream, None, max_size=MAX_CONTROL_FRAME)
        self.server: asyncio.Server | None = None
        self.addr = ""

    async def start(self) -> _FakeNode:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.addr = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(4), "big")
                req = self.codec.decode(await reader.readexactly(n))
                assert isinstance(req, ControlRequest)
                self.received.append(req.args)
                if self.mode == "close":
                    return
                if self.mode == "hang" or self.hold is not None:
                    await (self.hold or asyncio.Event()).wait()
                if self.mode == "error":
                    reply = ControlReply(ok=False, error="RuntimeError: boom")
                else:
                    reply = ControlReply(ok=True, data={"ok": True, "data": len(self.received)})
                out = self.codec.encode(reply)
                writer.write(len(out).to_bytes(4, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _with_remote(
    node: _FakeNode, test: Callable[[RemoteCluster], Awaitable[None]], *, timeout: float = 0.1
) -> None:
    rc = RemoteCluster([node.addr], keyring=None, timeout=timeout)
    try:
        async with asyncio.timeout(10):  # (a missing deadline fails here, not hangs)
            await test(rc)
    finally:
        await rc.close()
        node.close()


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("hang", Timeout, "did not answer within"),
        ("close", Timeout, "may have run"),
        ("error", CallRemoteError, "boom"),
    ],
)
async def test_a_failed_remote_call_is_a_typed_call_error(
    mode: str, error: type[Exception], match: str
) -> None:
    node = await _FakeNode(mode).start()

    async def test(rc: RemoteCluster) -> None:
        with pytest.raises(error, match=match) as err:
            await rc.call("echo", "app.echo", {}, timeout=0.1)
        if isinstance(err.value, CallRemoteError):
            assert err.value.remote_type == "RuntimeError"

    await _with_remote(node, test)


async def test_a_remote_call_to_an_unreachable_node_is_no_capacity() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    rc = RemoteCluster([addr], keyring=None, timeout=1.0)
    try:
        with pytest.raises(NoCapacity, match="cannot reach"):
            await rc.call("echo", "app.echo", {}, timeout=1.0)
        with pytest.raises(ValueError, match="timeout must be"):
            await rc.call("echo", "app.echo", {}, timeout=float("nan"))
    finally:
        await rc.close()


async def test_a_remote_call_queued_behind_another_gives_up_at_its_own_deadline() -> None:
    hold = asyncio.Event()
    node = await _FakeNode(hold=hold).start()

    async def test(rc: RemoteCluster) -> None:
        slow = asyncio.ensure_future(rc.call("echo", "app.echo", {}, timeout=5.0))
        await wait_until(lambda: len(node.received) == 1)  # it holds the connection
        with pytest.raises(Timeout, match=r"no turn on the connection within 0\.1s"):
            await rc.call("echo", "app.echo", {}, timeout=0.1)
        assert len(node.received) == 1  # it was never sent
        hold.set()
        assert await slow == 1

    await _with_remote(node, test, timeout=1.0)


async def test_a_remote_call_queued_behind_another_sends_the_time_it_has_left() -> None:
    hold = asyncio.Event()
    node = await _FakeNode(hold=hold).start()

    async def test(rc: RemoteCluster) -> None:
        loop = asyncio.get_running_loop()
        slow = asyncio.ensure_future(rc.call("echo", "app.echo", {}, timeout=5.0))
        await wait_until(lambda: len(node.received) == 1)
        queued = asyncio.ensure_future(rc.call("echo", "app.echo", {}, timeout=5.0))
        await wait_until(lambda: rc._client._queued == 1)
        # The queued call has started by now; it waits at least until the slow one ends.
        waiting = loop.time()
        await wait_until(lambda: loop.time() >= waiting + 0.3)
        hold.set()
        assert await slow == 1 and await queued == 2
        sent = node.received[1]["timeout"]
        # What the node got is the caller's deadline less its wait (>= 0.3 s), not all of it.
        assert sent <= 5.0 - 0.3

    await _with_remote(node, test, timeout=1.0)


# ------------------------------------------------------------------ replies the entry node cannot send
@pytest.mark.parametrize(
    ("data", "remote_type"),
    [
        ({"big_int": True}, "OverflowError"),
        ({"object": True}, "TypeError"),
        ({"reply_bytes": 5 << 20}, "Oversized"),
    ],
)
async def test_a_remote_call_whose_reply_the_entry_node_cannot_send_is_the_agents_typed_error(
    data: dict[str, Any], remote_type: str
) -> None:
    # The entry node's own agent takes the call (no wire between them), so the reply is first
    # encoded in the entry node's answer to its client: that failure closed the connection,
    # which the client read as "lost, it may have run" -- a Timeout -- though the agent answered.
    RUNS.clear()
    async with Node(NodeConfig(name="entry", bind="127.0.0.1:0", preset="local")) as node:
        await node.runtime.spawn(Worker)
        await Cluster.of(node).register(Worker.name, capabilities=["work"])
        await wait_until(lambda: bool(node.registry.index.find_capable("work")), timeout=10)
        rc = RemoteCluster([node.addr], keyring=None, timeout=5.0)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(CallRemoteError) as err:
                await rc.call("work", "app.work", data, timeout=5.0, idempotent=True)
            assert loop.time() - started < 2.5  # an answer, not a deadline
            assert err.value.remote_type == remote_type
            assert "reply not serialisable" in str(err.value) and "entry" in str(err.value)
            assert RUNS == ["worker"]
            # The node and the client's connection keep working.
            assert await rc.call("work", "app.work", {}, timeout=5.0) == {"ok": True}
        finally:
            await rc.close()


@pytest.mark.virtual_time
async def test_a_reply_that_fits_the_target_frame_but_not_the_entry_nodes_is_a_typed_error() -> (
    None
):
    # The target sends its reply in a frame that just fits; the entry node's answer wraps the
    # same data with a few more bytes, over the limit.
    RUNS.clear()
    async with SimCluster(2, seed=15) as c:
        await _spawn(c, Worker, "work", ["n2"])
        entry = c.nodes["n1"]
        codec = entry.stream_codec
        probe = codec.max_size - 200
        overhead = len(codec.encode(CallReply(True, data={"pad": "r" * probe}))) - probe
        fits = codec.max_size - overhead - 1
        assert len(codec.encode(CallReply(True, data={"pad": "r" * fits}))) < codec.max_size

        async def control_call(data: dict[str, Any]) -> dict[str, Any]:
            args = {"capability": "work", "signal": {"type": "app.work", "data": data}}
            raw = await entry._on_stream("client:1", codec.encode(ControlRequest("call", args)))
            assert raw is not None
            reply = codec.try_decode(raw)
            assert isinstance(reply, ControlReply) and reply.ok
            out: dict[str, Any] = reply.data
            return out

        out = await control_call({"reply_bytes": fits})
        err = call_error(out)
        assert isinstance(err, CallRemoteError) and err.remote_type == "Oversized"
        assert "reply not serialisable" in str(err) and "n1" in str(err)
        assert RUNS == ["worker"]
        assert (await control_call({}))["data"] == {"ok": True}


@pytest.mark.virtual_time
async def test_any_control_reply_the_node_cannot_send_is_an_error_reply() -> None:
    from agentcluster.control import encode_control_reply

    async with SimCluster(1, seed=16) as c:
        node = c.nodes["n1"]
        codec = node.stream_codec
        for op in ("members", "mabeam"):
            for data in ({"n": 2**70}, "x" * (5 << 20)):
                raw = encode_control_reply(node, ControlRequest(op), ControlReply(True, data))
                reply = codec.try_decode(raw)
                assert isinstance(reply, ControlReply) and not reply.ok
                assert reply.error is not None and "reply not serialisable" in reply.error
