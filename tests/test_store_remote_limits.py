"""What the coordination store's remote path refuses, and how: requests larger than a control
frame, numbers that cannot be encoded, non-finite timeouts -- each a clear error for its
caller, never a hung caller, a traceback or a node busy on a request for ever."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from agentcluster.cli.main import app
from agentcluster.config import NodeConfig
from agentcluster.control import (
    _REPLIES_BUDGET,
    MAX_CONTROL_FRAME,
    ControlClient,
    ControlError,
    ControlRequest,
    NodeStream,
    _fit_replies,
    handle_control,
)
from agentcluster.node import Node
from agentcluster.store._kv import InvalidCommand, encode_result
from agentcluster.store.base import (
    GetOp,
    KeyValue,
    PutOp,
    ReplyTooLarge,
    StoreUnavailable,
    TxnResult,
)
from agentcluster.store.raft import KvReply, KvRequest
from agentcluster.store.remote import MAX_REQUEST_BYTES, RemoteStore, _Batcher
from agentcluster.testing import wait_until
from agentcluster.wire import Keyring, WireCodec

MiB = 1 << 20
_enc = msgspec.msgpack.Encoder()
_req_dec = msgspec.msgpack.Decoder(KvRequest)


class FramedConnection:
    """Seals each ``kv`` call into a frame as ControlClient does (so a call over the frame
    limit fails as it would on the wire) and answers every request with its key's length."""

    def __init__(self, calls: list[list[int]]) -> None:
        self.addr = "127.0.0.1:1"
        self.calls = calls
        self.codec = WireCodec(NodeStream, Keyring.generate(), max_size=MAX_CONTROL_FRAME)
        self.error: Exception | None = None

    async def call(self, op: str, args: dict[str, Any], *, timeout: float) -> bytes:
        self.codec.encode(ControlRequest(op=op, args=args))
        reqs = [_req_dec.decode(r) for r in args["reqs"]]
        self.calls.append([len(r.key) for r in reqs])
        await asyncio.sleep(0)  # the reply comes back in a later turn, as over a socket
        if self.error is not None:
            raise self.error
        return _enc.encode([KvReply(True, str(len(r.key)).encode()) for r in reqs])

    async def close(self) -> None:
        pass


def framed_batcher() -> tuple[_Batcher, list[FramedConnection], list[list[int]]]:
    calls: list[list[int]] = []
    conns = [FramedConnection(calls) for _ in range(4)]
    return _Batcher(conns), conns, calls  # type: ignore[arg-type]


async def get(b: _Batcher, size: int) -> bytes:
    return (await b.submit(KvRequest("get", key="k" * size), 5.0)).data


# ----------------------------------------------------------------- batches and the frame limit


async def test_concurrent_requests_over_one_frame_in_all_leave_in_several_calls() -> None:
    b, _, calls = framed_batcher()
    big = 3 * MiB // 2  # three of them fill more than a frame, two do not
    sizes = [big, big, big, 10, 20]
    try:
        async with asyncio.timeout(10):  # (a dead batch worker fails here, not hangs)
            replies = await asyncio.gather(*(get(b, n) for n in sizes))
    finally:
        await b.close()
    assert replies == [str(n).encode() for n in sizes]
    # Each call stayed under the frame limit, and the requests still travelled together as
    # far as it allows: the first call is full, the second carries the rest.
    assert calls == [[big, big], [big, 10, 20]]


async def test_an_unexpected_error_in_a_batch_fails_its_callers() -> None:
    b, conns, calls = framed_batcher()
    for c in conns:
        c.error = RuntimeError("boom")
    try:
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                *(get(b, n) for n in range(1, 5)), return_exceptions=True
            )
        assert len(calls) == 1
        assert all(isinstance(r, StoreUnavailable) and "boom" in str(r) for r in results), results
        # The batcher lives on: the next requests are sent.
        for c in conns:
            c.error = None
        async with asyncio.timeout(10):
            assert list(await asyncio.gather(get(b, 1), get(b, 2))) == [b"1", b"2"]
    finally:
        await b.close()


async def test_a_request_larger_than_a_frame_is_refused_before_it_is_sent() -> None:
    # The entry node does not exist: a request that left would fail as unreachable.
    store = RemoteStore(["127.0.0.1:1"], keyring=Keyring.generate(), timeout=0.5)
    try:
        # A write: the store's own limit per write, before the frame's.
        with pytest.raises(InvalidCommand, match=r"a write of 5,2\d\d,\d\d\d bytes exceeds"):
            await store.put("k", b"v" * (5 * MiB))
        with pytest.raises(InvalidCommand, match="a write of"):
            await store.txn([], [PutOp("a", b"v" * (3 * MiB)), PutOp("b", b"v" * (3 * MiB))])
        # Any request: the frame's limit (no public call makes one that large any more).
        with pytest.raises(InvalidCommand, match=r"request of 5,2\d\d,\d\d\d bytes") as info:
            await store.request(KvRequest("cmd", b"v" * (5 * MiB)))
        assert f"limit of {MAX_REQUEST_BYTES:,} bytes" in str(info.value)
        with pytest.raises(InvalidCommand, match="keys are at most"):
            await store.get("k" * (5 * MiB))
        with pytest.raises(InvalidCommand, match="below 2"):
            await store.range("", limit=10**20)
        with pytest.raises(InvalidCommand, match="below 2"):
            async with store.watch("", start_revision=2**64) as events:
                await anext(events)
        with pytest.raises(InvalidCommand, match="does not encode"):
            await store.request(KvRequest("rev", n=2**64))
        # Just under the limit it travels (and meets the missing node).
        with pytest.raises(StoreUnavailable, match="cannot reach"):
            await store.put("k", b"v" * (3 * MiB - 1024))
    finally:
        await store.close()


@pytest.mark.parametrize("timeout", [math.nan, math.inf, 0.0, -1.0])
async def test_a_remote_store_refuses_a_timeout_that_is_no_deadline(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
        RemoteStore(["127.0.0.1:1"], keyring=None, timeout=timeout)
    store = RemoteStore(["127.0.0.1:1"], keyring=None, timeout=0.5)
    try:
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            await store.request(KvRequest("get", key="k"), timeout=timeout)
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def one_node(voters: list[str], *, leader: bool) -> AsyncIterator[Node]:
    node = Node(
        NodeConfig(name="n1", bind="127.0.0.1:0", store_voters=voters, preset="local"),
        vitals=False,
    )
    await node.start()
    try:
        assert node.store_host is not None
        member = node.store_host.member
        assert member is not None
        if leader:
            await wait_until(lambda: member.shell.is_leader and member.leading, timeout=10)
        yield node
    finally:
        await node.stop(leave=False)


async def test_concurrent_writes_that_fit_alone_but_not_together_all_succeed() -> None:
    async with one_node(["n1"], leader=True) as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0)
        try:
            big = b"v" * (5 * MiB // 2)  # within the store's write limit; two exceed a frame
            async with asyncio.timeout(20):
                revs = await asyncio.gather(store.put("a", big), store.put("b", big))
            assert sorted(revs) == [1, 2]
            for key in ("a", "b"):
                kv = await store.get(key)
                assert kv is not None and kv.value == big
        finally:
            await store.close()


async def test_transactions_whose_reads_outgrow_a_reply_say_they_were_applied() -> None:
    # Through an entry node each answer travels in one frame: a transaction reading ~5 MiB
    # cannot answer, but the client must learn that its write happened (never "unknown",
    # which a caller might answer by writing again) -- alone, and batched with another.
    async with one_node(["n1"], leader=True) as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0)
        try:
            for i in range(5):
                await store.put(f"big/{i}", b"v" * (MiB - 1024))
            reads = GetOp("big/", prefix=True)
            async with asyncio.timeout(20):
                with pytest.raises(ReplyTooLarge, match="applied at revision 6"):
                    await store.txn([], [PutOp("w/0", b"1"), reads])
                both = await asyncio.gather(
                    store.txn([], [PutOp("w/1", b"1"), reads]),
                    store.txn([], [PutOp("w/2", b"1"), reads]),
                    return_exceptions=True,
                )
            assert all(isinstance(r, ReplyTooLarge) for r in both), both
            assert all("the transaction was applied at revision" in str(r) for r in both)
            for key in ("w/0", "w/1", "w/2"):
                kv = await store.get(key)
                assert kv is not None and kv.version == 1  # applied, and once
        finally:
            await store.close()


def test_a_batch_of_mid_sized_write_answers_is_cut_to_fit_one_frame() -> None:
    # 80 transactions, each reading ~60 KiB: none is big alone, together they outgrow it.
    kv = KeyValue("big", b"v" * (60 << 10), 1, 1, 1, 0)
    data = encode_result(TxnResult(True, 2, [2, [kv]]))
    reqs = [KvRequest("cmd", b"x") for _ in range(80)] + [KvRequest("get", key="k")]
    replies = [KvReply(True, data) for _ in range(80)] + [KvReply(True, b"\xc0")]
    out = _fit_replies(reqs, replies)
    assert sum(len(r.data) + len(r.message) + 64 for r in out) <= _REPLIES_BUDGET
    cut = [r for r in out[:80] if not r.ok]
    assert cut and all(r.error == "too_large" and "was applied" in r.message for r in cut)
    assert out[80].ok  # a small read keeps its answer
    small = [KvReply(True, encode_result(TxnResult(True, 3, [3])))] * 3
    assert _fit_replies(reqs[:3], small) == small


async def test_batched_transactions_with_mid_sized_reads_never_hear_unknown() -> None:
    async with one_node(["n1"], leader=True) as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0)
        try:
            await store.put("big", b"v" * (60 << 10))
            async with asyncio.timeout(30):
                results = await asyncio.gather(
                    *(store.txn([], [PutOp(f"w/{i}", b"1"), GetOp("big")]) for i in range(80)),
                    return_exceptions=True,
                )
            for r in results:
                if isinstance(r, BaseException):
                    assert isinstance(r, ReplyTooLarge) and "was applied" in str(r), r
                else:
                    assert r.succeeded
            assert any(not isinstance(r, BaseException) for r in results)
            page = await store.range("w/")
            assert len(page.kvs) == 80 and all(kv.version == 1 for kv in page.kvs)
        finally:
            await store.close()


# ----------------------------------------------------------------- non-finite control arguments


class _Routes:
    """The store of a fake node: records what it was asked to run."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    async def route(self, req: KvRequest, *, timeout: float) -> KvReply:
        self.timeouts.append(timeout)
        return KvReply(True)

    async def route_many(self, reqs: list[KvRequest], *, timeout: float) -> list[KvReply]:
        self.timeouts.append(timeout)
        return [KvReply(True) for _ in reqs]


class _FakeNode:
    def __init__(self) -> None:
        self.routes = _Routes()
        self.store_host = self
        self.store = self.routes


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("kv", {"req": _enc.encode(KvRequest("get", key="a"))}),
        ("kv", {"reqs": [_enc.encode(KvRequest("get", key="a"))]}),
        ("call", {"capability": "echo", "signal": {"type": "x"}}),
    ],
)
async def test_a_non_finite_timeout_is_refused_before_anything_runs(
    op: str, args: dict[str, Any], value: float
) -> None:
    node = _FakeNode()
    reply = await handle_control(node, ControlRequest(op, {**args, "timeout": value}))  # type: ignore[arg-type]
    assert not reply.ok
    assert reply.error == f"{op}: 'timeout' must be a finite number, not {value!r}"
    assert node.routes.timeouts == []
    # A finite timeout still reaches the store, clamped.
    if op == "kv":
        reply = await handle_control(node, ControlRequest(op, {**args, "timeout": 1e9}))  # type: ignore[arg-type]
        assert reply.ok and node.routes.timeouts == [60.0]


@pytest.mark.parametrize("arg", ["wait", "timeout", "duration", "step_interval", "reserve"])
async def test_a_non_finite_mabeam_parameter_is_refused(arg: str) -> None:
    args = {"action": "consensus_result", "ref": "r", arg: math.nan}
    reply = await handle_control(_FakeNode(), ControlRequest("mabeam", args))  # type: ignore[arg-type]
    assert not reply.ok and reply.error == f"mabeam: {arg!r} must be a finite number, not nan"


async def test_a_kv_request_with_a_nan_timeout_gets_an_error_at_once_without_a_leader() -> None:
    # No leader can be elected (the other voter does not exist): a request that reached the
    # store would retry until its timeout -- for ever, were it NaN.
    async with one_node(["n1", "ghost"], leader=False) as node:
        client = ControlClient(node.addr, keyring=None, timeout=5.0)
        try:
            req = _enc.encode(KvRequest("get", key="a"))
            raw = await client.call("kv", {"req": req, "timeout": 0.2}, timeout=5.0)
            assert msgspec.msgpack.decode(raw, type=KvReply).error == "unavailable"
            with pytest.raises(ControlError, match="'timeout' must be a finite number"):
                await client.call("kv", {"req": req, "timeout": math.nan}, timeout=3.0)
            stats = await client.call("stats", timeout=3.0)  # the node still answers
            assert stats["node"] == "n1"
        finally:
            await client.close()


# ----------------------------------------------------------------- the command line


def _kv(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["kv", *args, "--node", "127.0.0.1:1"], env={"AGENTCLUSTER_KEY_FILE": None}
    )
    # Anything but a deliberate exit is a crash the user would see as a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.stderr


def test_a_value_too_large_to_send_is_an_error_line(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"v" * (5 * MiB))
    code, err = _kv("put", "k", "--file", str(big))
    assert code == 1
    assert err.startswith("error: a write of 5,2") and "bytes per write" in err


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("put", "k", "v", "--lease", "f" * 20), "--lease"),
        (("put", "k", "v", "--lease", "8" + "0" * 15), "--lease"),  # 2**63
        (("lease", "revoke", "f" * 20), "ID"),
        (("range", "", "--limit", str(10**20)), "--limit"),
        (("range", "", "--limit", str(2**63)), "--limit"),
        (("watch", "", "--from-revision", str(10**20)), "--from-revision"),
        (("get", "k", "--timeout", "inf"), "--timeout"),
        (("lease", "grant", "inf"), "'ttl'"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(args: tuple[str, ...], names: str) -> None:
    code, err = _kv(*args)
    assert code == 2, err
    assert names in err, err
