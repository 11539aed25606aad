"""The node control API: authenticated request/reply over the node's own stream port.

Theory of operation: a control request is a msgspec Struct sealed with the cluster keyring,
sent as one framed request on a TCP connection to the node's port; the node answers with one
:class:`ControlReply`. There is no separate listener and no separate credential: whoever holds
the cluster key may ask, nobody else can (the frame does not authenticate and is dropped).
Operations: ``members``, ``agents``, ``health``, ``stats``, ``leave``, ``kv`` (a
coordination-store request, or a batch of them, routed to the Raft leader -- see
:mod:`agentcluster.store.remote`) and ``mabeam`` (registry queries, registrations and
proposals -- see :mod:`agentcluster.coordination._control`).

:func:`request` is the one-off client side, used by ``agentcluster members`` and by the local
cluster launcher (``agentcluster up``) to watch its nodes; :class:`ControlClient` keeps its
connection for further requests (the store client uses it).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from agentcluster.clock import Deadline
from agentcluster.membership.messages import StreamMessage
from agentcluster.signals import Signal
from agentcluster.store._batch import MAX_BATCH_COMMANDS
from agentcluster.store._kv import decode_result
from agentcluster.store._kv_wire import applied_too_large
from agentcluster.store.raft import KvReply, KvRequest
from agentcluster.transport.base import parse_addr
from agentcluster.wire import Keyring, WireCodec

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = [
    "MAX_CONTROL_FRAME",
    "AgentEnvelope",
    "CallReply",
    "CallRequest",
    "ControlClient",
    "ControlError",
    "ControlReply",
    "ControlRequest",
    "NodeStream",
    "encode_control_reply",
    "handle_control",
    "request",
]

log = logging.getLogger(__name__)

OPS = ("members", "agents", "health", "stats", "leave", "kv", "mabeam", "call", "routes")

MAX_CONTROL_FRAME = 4 << 20
"""The largest control frame, request or reply (as the node's stream codec allows)."""
_MAX_ERROR = 64 << 10  # characters of an error message in a reply (as calls.py cuts them)


class ControlRequest(msgspec.Struct, frozen=True, array_like=True, tag="ctl", tag_field="t"):
    op: str
    args: dict[str, Any] = {}


class ControlReply(msgspec.Struct, frozen=True, array_like=True, tag="ctlr", tag_field="t"):
    ok: bool
    data: Any = None
    error: str | None = None


class AgentEnvelope(msgspec.Struct, frozen=True, array_like=True, tag="send", tag_field="t"):
    """A signal for an agent on the receiving node (the ``Send`` directive across nodes)."""

    agent: str
    signal: Signal


class CallRequest(msgspec.Struct, frozen=True, array_like=True, tag="call", tag_field="t"):
    """``cluster.call``: run ``signal`` on an agent with ``capability`` on the receiving node
    (``agent``: that agent id, as the caller's registry named it) and answer within
    ``timeout`` seconds."""

    capability: str
    signal: Signal
    timeout: float
    agent: str | None = None


class CallReply(msgspec.Struct, frozen=True, array_like=True, tag="callr", tag_field="t"):
    """``raised``: the agent raised (or its reply could not be sent): ``error_type`` is the
    type name of its exception, whatever that is called -- the call ran. Otherwise
    ``error_type`` is "" on success or the node's own status: ``NoAgent`` / ``Rejected`` (not
    run: safe to retry anywhere; ``reason`` a
    :class:`~agentcluster.balancing.limits.RejectReason`), ``Timeout``. (``raised`` comes last
    and defaults to false: frames of nodes that do not send it still decode.)"""

    ok: bool
    data: Any = None
    error_type: str = ""
    error: str = ""
    reason: str = ""
    raised: bool = False


NodeStream = StreamMessage | ControlRequest | ControlReply | AgentEnvelope | CallRequest | CallReply


class ControlError(Exception):
    """The node could not be reached, rejected the request, or answered with an error.
    ``not_sent``: the node never saw the request (the connection could not be opened, or the
    request's time passed before its turn on the connection); ``timed_out``: the deadline
    passed (sent or not); ``answered``: the node answered, with an error. None of them: the
    connection broke or the answer was unreadable -- the request may have been carried out."""

    def __init__(
        self,
        message: str,
        *,
        not_sent: bool = False,
        timed_out: bool = False,
        answered: bool = False,
    ) -> None:
        super().__init__(message)
        self.not_sent = not_sent
        self.timed_out = timed_out
        self.answered = answered


def _members(node: Node) -> list[dict[str, Any]]:
    out = []
    for m in sorted(node.members(), key=lambda m: m.name):
        rtt = None if m.name == node.name else node.core.estimate_rtt(m.name)
        out.append(
            {
                "name": m.name,
                "addr": m.addr,
                "state": m.state,
                "incarnation": m.incarnation,
                "zone": m.meta.zone,
                "region": m.meta.region,
                "capabilities": list(m.meta.capabilities),
                "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
                "changed_at": round(node.wall_of(m.state_changed_at), 3),
            }
        )
    return out


def _health(node: Node) -> dict[str, Any]:
    now = node.clock.now()
    agents: dict[str, dict[str, Any]] = {}
    for name in (
        "failure_detector",
        "node_discovery",
        "consensus_coordinator",
        "load_balancer",
        "health_monitor",
    ):
        server = node.runtime.get(name)
        if server is None:
            agents[name] = {"status": "down"}
            continue
        health = server.agent.skill_states.get("cluster")
        last = getattr(health, "last_heartbeat", 0.0)
        agents[name] = {
            "status": getattr(health, "status", "unknown"),
            "heartbeats": getattr(health, "heartbeats", 0),
            "last_heartbeat_age_s": None if not last else round(now - last, 3),
            "mailbox": server.mailbox_depth,
            "errors": server.errors,
        }
    fd = node.runtime.get("failure_detector")
    deaths = getattr(fd.agent.state, "deaths", 0) if fd is not None else 0
    return {
        "node": node.name,
        "health_score": node.core.health_score(),
        "deaths_seen": deaths,
        "agents": agents,
        **node.health.snapshot(),
    }


_kv_req_dec = msgspec.msgpack.Decoder(KvRequest)
_kv_enc = msgspec.msgpack.Encoder()


async def _kv(node: Node, args: dict[str, Any]) -> ControlReply:
    """A coordination-store request (see :mod:`agentcluster.store.remote`)."""
    host = node.store_host
    if host is None:
        return ControlReply(ok=False, error=f"node {node.name} has no coordination store")
    raw = args.get("req")
    many = args.get("reqs")
    timeout = args.get("timeout", 5.0)
    # NaN would pass the clamp below (min and max keep it) and the request would then never
    # reach its deadline: the node would retry it for ever.
    if not isinstance(timeout, int | float) or not math.isfinite(timeout):
        return ControlReply(
            ok=False, error=f"kv: 'timeout' must be a finite number, not {timeout!r}"
        )
    timeout = min(max(float(timeout), 0.001), 60.0)
    if (
        isinstance(many, list)
        and len(many) <= MAX_BATCH_COMMANDS
        and all(isinstance(r, bytes) for r in many)
    ):
        # A client's batch: run concurrently, so the leader proposes them together (and,
        # when this node leads, without a task per request: see RaftStore.route_many).
        try:
            reqs = [_kv_req_dec.decode(r) for r in many]
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            return ControlReply(ok=False, error=f"kv: malformed request: {exc}")
        replies = _fit_replies(reqs, await host.store.route_many(reqs, timeout=timeout))
        return ControlReply(ok=True, data=_kv_enc.encode(replies))
    if not isinstance(raw, bytes):
        return ControlReply(ok=False, error="kv: args need 'req' (bytes) or 'reqs' (a list)")
    try:
        req = _kv_req_dec.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return ControlReply(ok=False, error=f"kv: malformed request: {exc}")
    reply = await host.store.route(req, timeout=timeout)
    return ControlReply(ok=True, data=_kv_enc.encode(reply))


# A batch's replies go back in one frame; this leaves room for the frame's own envelope.
_REPLIES_BUDGET = MAX_CONTROL_FRAME - (64 << 10)


def _fit_replies(reqs: list[KvRequest], replies: list[KvReply]) -> list[KvReply]:
    """``replies`` as one frame can carry them: when they do not fit together, the largest
    answers to reads become ``too_large`` errors, ``n=1`` when they came with others -- sent
    alone they may fit, and the client resends them so
    (:class:`~agentcluster.store.remote.RemoteStore`). Writes keep their answers (a few bytes):
    a write must not be reported unknown for its neighbours' sake -- unless a transaction's
    reads make its answer big, which then becomes a ``too_large`` error that says the write
    was applied (a write is never resent)."""
    sizes = [_reply_size(r) for r in replies]
    total = sum(sizes)
    if total <= _REPLIES_BUDGET:
        return replies
    out = list(replies)
    for i in sorted(range(len(out)), key=sizes.__getitem__, reverse=True):
        if total <= _REPLIES_BUDGET:
            break
        reply = out[i]
        if reqs[i].op == "cmd":
            # Shedding a write's answer smaller than the message that replaces it gains nothing.
            if not reply.ok or sizes[i] < _SMALLEST_SHED:
                continue
            room = "one reply with the others of its batch"
            out[i] = applied_too_large(decode_result(reply.data), len(reply.data), room)
        else:
            out[i] = KvReply(
                False,
                error="too_large",
                message=f"an answer of {len(reply.data):,} bytes does not fit in one reply "
                + ("with the others of its batch" if len(out) > 1 else f"({_REPLIES_BUDGET:,})"),
                n=1 if len(out) > 1 else 0,
            )
        total += _reply_size(out[i]) - sizes[i]
    return out


_SMALLEST_SHED = 1 << 10


def _reply_size(reply: KvReply) -> int:
    return len(reply.data) + len(reply.message) + 64


async def _health_op(node: Node, args: dict[str, Any]) -> ControlReply:
    """The health view, or an action: ``quarantine`` (a proposal to every health monitor;
    returns the decision) or ``release`` (this node's quarantine of a peer)."""
    action = args.get("action")
    if action is None:
        return ControlReply(ok=True, data=_health(node))
    target, reason = args.get("node"), args.get("reason", "manual")
    if not isinstance(target, str) or not isinstance(reason, str):
        return ControlReply(ok=False, error="health: 'node' and 'reason' must be strings")
    if action == "quarantine":
        decision = await node.health.quarantine_node(target, reason)
        return ControlReply(ok=True, data=msgspec.to_builtins(decision))
    if action == "release":
        return ControlReply(ok=True, data=await node.health.release_node(target))
    return ControlReply(ok=False, error=f"health: unknown action {action!r} (quarantine, release)")


async def _call(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    """``cluster.call`` for a remote client: the outcome, typed, as data."""
    from agentcluster.errors import CallError, CallRemoteError, Rejected

    capability = args.get("capability")
    timeout = args.get("timeout", 5.0)
    key = args.get("key")
    if not isinstance(capability, str) or not isinstance(timeout, int | float):
        return {"ok": False, "error_type": "ValueError", "error": "call: bad arguments"}
    if not math.isfinite(timeout):  # NaN passes the clamp below: a call without a deadline
        return {
            "ok": False,
            "error_type": "ValueError",
            "error": f"call: 'timeout' must be a finite number, not {timeout!r}",
        }
    if key is not None and not isinstance(key, str):
        return {"ok": False, "error_type": "ValueError", "error": "call: 'key' must be a string"}
    try:
        signal = msgspec.convert(args.get("signal"), Signal)
    except msgspec.ValidationError as exc:
        return {"ok": False, "error_type": "ValueError", "error": f"call: bad signal: {exc}"}
    try:
        data = await node.calls.call(
            capability,
            signal,
            timeout=min(max(float(timeout), 0.001), 300.0),
            key=key,
            idempotent=bool(args.get("idempotent", False)),
        )
    except CallError as exc:
        out: dict[str, Any] = {
            "ok": False,
            "error_type": type(exc).__name__,
            "error": str(exc),
            "attempts": list(exc.attempts),
        }
        if isinstance(exc, CallRemoteError):
            out["error_type"] = "CallRemoteError"
            out["remote_type"] = exc.remote_type
        if isinstance(exc, Rejected):
            out["reason"] = exc.reason
        return out
    except ValueError as exc:
        return {"ok": False, "error_type": "ValueError", "error": str(exc)}
    return {"ok": True, "data": data}


def _non_finite(op: str, args: dict[str, Any]) -> str | None:
    """An error for the first parameter that is NaN or infinite, else None. The ops' float
    parameters are timeouts, waits, durations and prices: NaN slips through their clamps
    and range checks (every comparison with it is false), and a deadline at NaN never
    comes -- a client could pin the node on its request. ``mabeam`` arguments are checked
    all the way down (and refused when nested too deep): proposals, metadata and conditions
    are kept, compared and shown to others; a ``call``'s signal is its agent's business."""
    if op == "mabeam":
        from agentcluster.coordination._finite import non_finite

        for key, value in args.items():
            bad = non_finite(value, key)
            if bad is not None:
                return f"{op}: {bad}"
        return None
    for key, value in args.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{op}: {key!r} must be a finite number, not {value!r}"
    return None


async def handle_control(node: Node, req: ControlRequest) -> ControlReply:
    bad = _non_finite(req.op, req.args)
    if bad is not None:
        return ControlReply(ok=False, error=bad)
    try:
        if req.op == "members":
            return ControlReply(ok=True, data=_members(node))
        if req.op == "agents":
            return ControlReply(
                ok=True, data=[msgspec.to_builtins(a) for a in node.runtime.agents()]
            )
        if req.op == "health":
            return await _health_op(node, req.args)
        if req.op == "stats":
            return ControlReply(ok=True, data=node.stats())
        if req.op == "leave":
            node.membership.leave()
            return ControlReply(ok=True, data={"leaving": node.name})
        if req.op == "kv":
            return await _kv(node, req.args)
        if req.op == "call":
            return ControlReply(ok=True, data=await _call(node, req.args))
        if req.op == "routes":
            n = req.args.get("decisions", 50)
            if not isinstance(n, int) or isinstance(n, bool):
                return ControlReply(ok=False, error=f"routes: 'decisions' must be an int: {n!r}")
            # Never more than the balancer keeps; a huge count would only copy them all.
            n = max(0, min(n, node.balancer.decisions.maxlen or 0))
            return ControlReply(ok=True, data=node.balancer.snapshot(node.clock.now(), decisions=n))
        if req.op == "mabeam":
            from agentcluster.coordination._control import handle_mabeam

            try:
                return ControlReply(ok=True, data=await handle_mabeam(node, req.args))
            except ValueError as exc:  # bad arguments, a bad query or rule: the caller's error
                return ControlReply(ok=False, error=f"{type(exc).__name__}: {exc}")
        return ControlReply(ok=False, error=f"unknown op {req.op!r}; known: {', '.join(OPS)}")
    except Exception as exc:
        log.exception("control op %s failed", req.op)
        return ControlReply(ok=False, error=f"{type(exc).__name__}: {exc}")


def encode_control_reply(node: Node, req: ControlRequest, reply: ControlReply) -> bytes:
    """The sealed frame for ``reply``. One the node cannot send -- data msgpack cannot carry
    (TypeError, OverflowError) or a frame over the limit (Oversized) -- becomes an error the
    client reads, instead of a handler failure that closes the connection: a client must
    take a closed connection for "lost, it may have run", so a ``call`` whose agent answered
    (on this node, in place: its reply was never encoded; or on another node, in a frame
    that fit without this answer's envelope) read as a Timeout."""
    codec = node.stream_codec
    try:
        return codec.encode(reply)
    except Exception as exc:  # whatever the encoder raises: the connection must answer
        kind = type(exc).__name__
        data = reply.data
        if req.op == "call" and reply.ok and isinstance(data, dict) and data.get("ok"):
            # The agent's answer that could not travel, as when its own node cannot send it
            # (CallService.encode_reply): the agent's typed error, and the call ran.
            message = f"{node.name}: {kind}: reply not serialisable on the entry node: {exc}"
            out = {
                "ok": False,
                "error_type": "CallRemoteError",
                "remote_type": kind,
                "error": _cut(message),
                "attempts": [],
            }
            failed = ControlReply(ok=True, data=out)
        else:
            failed = ControlReply(ok=False, error=_cut(f"{kind}: reply not serialisable: {exc}"))
        try:
            return codec.encode(failed)
        except Exception:  # (a message that is no valid UTF-8, say): still an answer
            return codec.encode(ControlReply(ok=False, error=f"{kind}: reply not serialisable"))


def _cut(message: str) -> str:
    """``message``, cut to what an error reply carries (the frame has a size limit)."""
    if len(message) <= _MAX_ERROR:
        return message
    return f"{message[:_MAX_ERROR]}... (cut: {len(message):,} characters)"


class _ReplyProtocol(asyncio.Protocol):
    """The client end of a control connection: cuts the byte stream into length-prefixed
    reply frames and hands each to the call waiting for it. (A protocol instead of a
    StreamReader: the reply resolves the caller's future straight from ``data_received``,
    with no reader coroutines, drain or timeout context per call.)"""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.lost = False
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport, but are one.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if len(buf) < 4:
            return
        length = int.from_bytes(buf[:4], "big")
        if length > MAX_CONTROL_FRAME:
            self._fail(ControlError(f"sent an oversized reply ({length} bytes)"))
            return
        if len(buf) < 4 + length:
            return
        raw = bytes(buf[4 : 4 + length])
        del buf[: 4 + length]
        waiter, self.waiter = self.waiter, None
        if buf or waiter is None or waiter.done():
            # One request at a time: a reply nobody waits for, or more than one, is a
            # protocol violation -- the connection cannot be trusted any more.
            self._fail(ControlError("sent an unexpected reply"))
            return
        waiter.set_result(raw)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(asyncio.IncompleteReadError(bytes(self._buf), None))

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class ControlClient:
    """A connection to one node's control API, kept open for further requests (one at a
    time; concurrent callers queue, within their deadlines). Any failure closes it; the next
    call reconnects."""

    def __init__(self, addr: str, *, keyring: Keyring | None, timeout: float = 5.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self._host, self._port = parse_addr(addr)
        self._codec = WireCodec(NodeStream, keyring, max_size=MAX_CONTROL_FRAME)
        self._proto: _ReplyProtocol | None = None
        self._lock = asyncio.Lock()
        self._queued = 0  # callers waiting for the lock (each under its own deadline)
        self._timer: Deadline | None = None  # fails the waiting call's reply when it is late

    async def call(
        self,
        op: str,
        args: dict[str, Any] | Callable[[float], dict[str, Any]] | None = None,
        *,
        timeout: float | None = None,
        slack: float = 0.0,
    ) -> Any:
        """Ask for ``op``; the reply's data, or ControlError. The request must leave within
        ``timeout`` seconds of this call -- its wait for the connection (other callers'
        requests ahead, a reconnect) included -- and the reply come within ``slack`` more.
        ``args`` may be a function of the seconds left of ``timeout`` when the request
        leaves: a request that carries its own deadline gets what is left of it, not the
        time already spent waiting. A frame over the size limit raises the codec's
        ``Oversized`` (nothing is sent)."""
        timeout = self.timeout if timeout is None else timeout
        addr = self.addr
        loop = asyncio.get_running_loop()
        # The caller's deadline starts now, not when its turn on the connection comes.
        send_by = loop.time() + timeout
        frame = None
        if not callable(args):
            frame = self._codec.encode(ControlRequest(op=op, args=args or {}))
        lock = self._lock
        if lock.locked() or self._queued:
            self._queued += 1
            try:
                async with asyncio.timeout_at(send_by):
                    await lock.acquire()
            except TimeoutError:
                raise ControlError(
                    f"{addr}: no turn on the connection within {timeout}s "
                    "(busy with earlier requests); not sent",
                    not_sent=True,
                    timed_out=True,
                ) from None
            finally:
                self._queued -= 1
        else:
            # Free with nobody queued: acquired at once (no timeout context on the usual
            # path). A released lock with a waiter still to wake counts as queued above.
            await lock.acquire()
        try:
            proto = await self._connected(send_by, timeout)
            left = send_by - loop.time()
            if left <= 0:
                raise ControlError(
                    f"{addr}: connected after the {timeout}s deadline; not sent",
                    not_sent=True,
                    timed_out=True,
                )
            if frame is None:
                assert callable(args)
                frame = self._codec.encode(ControlRequest(op=op, args=args(left)))
            raw = await self._exchange(proto, frame, send_by + slack, timeout + slack)
        finally:
            lock.release()
        reply = self._codec.try_decode(raw)
        if not isinstance(reply, ControlReply):
            await self.close()
            raise ControlError(f"{addr} sent a reply that does not authenticate or parse")
        if not reply.ok:
            raise ControlError(f"{addr}: {reply.error}", answered=True)
        return reply.data

    async def _connected(self, deadline: float, timeout: float) -> _ReplyProtocol:
        """The open connection, opened now if need be (by ``deadline``); the caller holds the
        lock. Failing, the request was not sent."""
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                _, proto = await loop.create_connection(_ReplyProtocol, self._host, self._port)
        except TimeoutError:
            await self.close()
            raise ControlError(
                f"cannot reach {self.addr} within {timeout}s", not_sent=True, timed_out=True
            ) from None
        except OSError as exc:
            await self.close()
            raise ControlError(
                f"cannot reach {self.addr}: {exc.strerror or exc}", not_sent=True
            ) from None
        self._proto = proto
        return proto

    async def _exchange(
        self, proto: _ReplyProtocol, frame: bytes, deadline: float, waited: float
    ) -> bytes:
        """Send ``frame`` and wait for its reply until ``deadline``; the caller holds the lock.
        ``waited``: the seconds the caller allowed, for the message."""
        addr = self.addr
        loop = asyncio.get_running_loop()
        try:
            transport = proto.transport
            assert transport is not None
            # The client's one timer fails the reply's future when it is late (no timeout
            # context, no cancellation of the caller's task to undo, no timer per call).
            waiter: asyncio.Future[bytes] = loop.create_future()
            proto.waiter = waiter
            timer = self._timer
            if timer is None:
                timer = self._timer = Deadline(loop, self._expire)
            timer.set(deadline)
            try:
                transport.write(len(frame).to_bytes(4, "big") + frame)
                return await waiter
            finally:
                timer.clear()
        except TimeoutError:
            await self.close()
            raise ControlError(f"{addr} did not answer within {waited}s", timed_out=True) from None
        except asyncio.IncompleteReadError:
            await self.close()
            raise ControlError(
                f"{addr} closed the connection without a reply (wrong cluster key?)"
            ) from None
        except ControlError as exc:
            await self.close()
            raise ControlError(f"{addr} {exc}") from None
        except OSError as exc:
            await self.close()
            raise ControlError(f"cannot reach {addr}: {exc.strerror or exc}") from None
        except BaseException:
            await self.close()
            raise

    def _expire(self) -> None:
        proto = self._proto
        waiter = proto.waiter if proto is not None else None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()


async def request(
    addr: str,
    op: str,
    *,
    keyring: Keyring | None,
    args: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> Any:
    """Ask the node at ``addr`` for ``op`` over a one-off connection; returns the reply's
    data or raises ControlError."""
    client = ControlClient(addr, keyring=keyring, timeout=timeout)
    try:
        return await client.call(op, args)
    finally:
        await client.close()
