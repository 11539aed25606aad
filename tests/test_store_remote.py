"""RemoteStore's request batching (:class:`agentcluster.store.remote._Batcher`), against fake
control connections: a lone caller sends its own request, callers ready in the same loop turn
leave together as one call, and requests arriving while calls are in flight form the next call
on another connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from agentcluster.control import ControlError
from agentcluster.store.raft import KvReply, KvRequest
from agentcluster.store.remote import _Batcher
from agentcluster.testing import wait_until

_enc = msgspec.msgpack.Encoder()
_req_dec = msgspec.msgpack.Decoder(KvRequest)


class FakeConnection:
    """Answers every request of a ``kv`` call with its own key; ``gate`` holds calls back."""

    def __init__(self, calls: list[tuple[int, list[str]]], k: int) -> None:
        self.addr = "127.0.0.1:1"
        self.calls = calls
        self.k = k
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def call(self, op: str, args: dict[str, Any], *, timeout: float) -> bytes:
        keys = [_req_dec.decode(r).key for r in args["reqs"]]
        self.calls.append((self.k, keys))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ControlError("connection reset")
        return _enc.encode([KvReply(True, k.encode()) for k in keys])

    async def close(self) -> None:
        pass


def batcher(n: int = 4) -> tuple[_Batcher, list[FakeConnection], list[tuple[int, list[str]]]]:
    calls: list[tuple[int, list[str]]] = []
    conns = [FakeConnection(calls, k) for k in range(n)]
    return _Batcher(conns), conns, calls  # type: ignore[arg-type]


async def put(b: _Batcher, key: str) -> bytes:
    return (await b.submit(KvRequest("get", key=key), 5.0)).data


async def test_a_lone_caller_sends_its_request_itself_on_the_first_connection() -> None:
    b, _, calls = batcher()
    for i in range(3):
        assert await put(b, f"k{i}") == b"k%d" % i
    assert calls == [(0, ["k0"]), (0, ["k1"]), (0, ["k2"])]
    await b.close()


async def test_callers_ready_in_the_same_turn_leave_as_one_call() -> None:
    b, _, calls = batcher()
    keys = [f"k{i}" for i in range(16)]
    replies = await asyncio.gather(*(put(b, k) for k in keys))
    assert replies == [k.encode() for k in keys]
    assert len(calls) == 1 and calls[0][1] == keys
    # Closed-loop clients woken by one batch's replies stay one batch.
    replies = await asyncio.gather(*(put(b, k) for k in keys))
    assert len(calls) == 2 and calls[1][1] == keys
    await b.close()


async def test_a_lone_caller_after_batches_sends_its_own_request_again() -> None:
    # Once the batches' workers are done -- one of them failed -- nothing counts as in
    # flight: a sequential caller is back to sending on the first connection itself.
    b, conns, calls = batcher()
    keys = [f"k{i}" for i in range(8)]
    await asyncio.gather(*(put(b, k) for k in keys))
    for c in conns[1:]:
        c.fail = True
    results = await asyncio.gather(*(put(b, k) for k in keys), return_exceptions=True)
    assert all(isinstance(r, ControlError) for r in results)
    assert [k for k, _ in calls] == [1, 1]
    assert await put(b, "alone") == b"alone"
    assert calls[-1] == (0, ["alone"])
    await b.close()


async def test_requests_arriving_during_a_call_form_the_next_one_on_another_connection() -> None:
    b, conns, calls = batcher()
    for c in conns:
        c.gate = asyncio.Event()
    first = [asyncio.ensure_future(put(b, f"a{i}")) for i in range(4)]
    await wait_until(lambda: len(calls) == 1, timeout=2)
    second = [asyncio.ensure_future(put(b, f"b{i}")) for i in range(3)]
    await wait_until(lambda: len(calls) == 2, timeout=2)
    assert [keys for _, keys in calls] == [["a0", "a1", "a2", "a3"], ["b0", "b1", "b2"]]
    assert calls[0][0] != calls[1][0]  # two calls in flight, on two connections
    for c in conns:
        assert c.gate is not None
        c.gate.set()
    assert await asyncio.gather(*first, *second) == [
        b"a0", b"a1", b"a2", b"a3", b"b0", b"b1", b"b2",
    ]  # fmt: skip
    await b.close()


async def test_a_caller_cancelled_before_its_request_left_is_never_sent() -> None:
    b, _, calls = batcher()
    task = asyncio.ensure_future(put(b, "gone"))
    await asyncio.sleep(0)  # the caller is in its one-turn yield
    task.cancel()
    assert await put(b, "kept") == b"kept"
    await asyncio.sleep(0)
    assert task.cancelled()
    assert [keys for _, keys in calls] == [["kept"]]
    await b.close()


async def _control_server(
    codec: Any,
    *,
    close_after_reply: bool = False,
    oversized: bool = False,
    hold: asyncio.Event | None = None,
) -> tuple[asyncio.Server, str]:
    """A control API that answers each request with its op (``hold``: "slow" waits for it)."""
    from agentcluster.control import ControlReply

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                req = codec.decode(await reader.readexactly(size))
                if hold is not None and req.op == "slow":
                    await hold.wait()
                if oversized:
                    writer.write((64 << 20).to_bytes(4, "big"))
                else:
                    reply = codec.encode(ControlReply(ok=True, data=req.op))
                    writer.write(len(reply).to_bytes(4, "big") + reply)
                await writer.drain()
                if close_after_reply:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def test_control_client_reconnects_after_the_node_closed_an_idle_connection() -> None:
    """ControlClient keeps its connection; when the node closed it meanwhile (its idle
    timeout), the next call notices before sending and opens a new one -- the request is
    not lost to a dead socket. A reply announcing more than the size limit is an error."""
    from agentcluster.control import ControlClient, ControlError, NodeStream
    from agentcluster.wire import Keyring, WireCodec

    keyring = Keyring.generate()
    server, addr = await _control_server(
        WireCodec(NodeStream, keyring, max_size=1 << 20), close_after_reply=True
    )
    client = ControlClient(addr, keyring=keyring, timeout=2.0)
    try:
        assert await client.call("first") == "first"
        # The server closes the connection after its reply; wait until the client saw it.
        await wait_until(lambda: client._proto is not None and client._proto.lost, timeout=2)
        assert await client.call("second") == "second"
    finally:
        await client.close()
        server.close()
    server, addr = await _control_server(
        WireCodec(NodeStream, keyring, max_size=1 << 20), oversized=True
    )
    client = ControlClient(addr, keyring=keyring, timeout=2.0)
    try:
        try:
            await client.call("big")
        except ControlError as exc:
            assert "oversized" in str(exc) and addr in str(exc)
        else:
            raise AssertionError("an oversized reply must fail the call")
    finally:
        await client.close()
        server.close()


async def test_a_control_call_times_out_alone() -> None:
    """A call past its timeout fails (and drops the connection); a call answered in time
    leaves nothing behind that could fail a later one."""
    from agentcluster.control import ControlClient, ControlError, NodeStream
    from agentcluster.wire import Keyring, WireCodec

    keyring = Keyring.generate()
    hold = asyncio.Event()
    server, addr = await _control_server(
        WireCodec(NodeStream, keyring, max_size=1 << 20), hold=hold
    )
    client = ControlClient(addr, keyring=keyring, timeout=2.0)
    try:
        assert await client.call("quick", timeout=0.1) == "quick"
        timer = client._timer
        assert timer is not None
        # The timer armed for that call fires with no call waiting, and fails nothing.
        await wait_until(lambda: timer._handle is None, timeout=5)
        assert await client.call("again", timeout=5.0) == "again"
        started = time.monotonic()
        with pytest.raises(ControlError, match=r"did not answer within 0\.2s"):
            async with asyncio.timeout(5):  # (a missing deadline fails here, not hangs)
                await client.call("slow", timeout=0.2)
        assert 0.15 < time.monotonic() - started < 2
        hold.set()
        assert await client.call("after") == "after"  # on a new connection
    finally:
        await client.close()
        server.close()


async def test_a_watch_whose_store_is_closed_mid_poll_ends_at_once() -> None:
    from agentcluster.clock import MonotonicClock
    from agentcluster.store.remote import RemoteStore

    class NoSleep(MonotonicClock):
        async def sleep(self, seconds: float) -> None:
            raise AssertionError(f"a closed store's watch backed off for {seconds} s")

    class Poller:
        """A long-poll that ends, failed, when its connection is closed."""

        def __init__(self) -> None:
            self.polling = asyncio.Event()
            self.closed = asyncio.Event()

        async def call(self, op: str, args: dict[str, Any], *, timeout: float) -> bytes:
            self.polling.set()
            await self.closed.wait()
            raise ControlError("connection closed", not_sent=True)

        async def close(self) -> None:
            self.closed.set()

    store = RemoteStore(["127.0.0.1:1"], keyring=None, timeout=0.5, clock=NoSleep())
    poller = store._pollers["127.0.0.1:1"] = Poller()  # type: ignore[assignment]
    async with store.watch("k/", start_revision=5) as events:

        async def drain() -> list[Any]:
            return [ev async for ev in events]

        task = asyncio.ensure_future(drain())
        await asyncio.wait_for(poller.polling.wait(), 2)
        await store.close()
        assert await asyncio.wait_for(task, 2) == []
