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
import struct
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster.membership.messages import StreamMessage
from agentcluster.signals import Signal
from agentcluster.store.raft import KvRequest
from agentcluster.transport.base import parse_addr
from agentcluster.wire import Keyring, WireCodec

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = [
    "AgentEnvelope",
    "CallReply",
    "CallRequest",
    "ControlClient",
    "ControlError",
    "ControlReply",
    "ControlRequest",
    "NodeStream",
    "handle_control",
    "request",
]

log = logging.getLogger(__name__)

OPS = ("members", "agents", "health", "stats", "leave", "kv", "mabeam", "call", "routes")


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
    """``error_type``: "" on success; ``NoAgent`` / ``Rejected`` (not run: safe to retry
    anywhere), ``Timeout``, or the type name of what the agent raised."""

    ok: bool
    data: Any = None
    error_type: str = ""
    error: str = ""


NodeStream = StreamMessage | ControlRequest | ControlReply | AgentEnvelope | CallRequest | CallReply


class ControlError(Exception):
    """The node could not be reached, rejected the request, or answered with an error.
    ``not_sent``: the connection could not even be opened (the node never saw the request)."""

    def __init__(self, message: str, *, not_sent: bool = False) -> None:
        super().__init__(message)
        self.not_sent = not_sent


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
    for name in ("failure_detector", "node_discovery", "consensus_coordinator"):
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
    if not isinstance(timeout, int | float):
        return ControlReply(ok=False, error="kv: 'timeout' must be a number")
    timeout = min(max(float(timeout), 0.001), 60.0)
    if isinstance(many, list) and all(isinstance(r, bytes) for r in many) and len(many) <= 4096:
        # A client's batch: run concurrently, so the leader proposes them together (and,
        # when this node leads, without a task per request: see RaftStore.route_many).
        try:
            reqs = [_kv_req_dec.decode(r) for r in many]
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            return ControlReply(ok=False, error=f"kv: malformed request: {exc}")
        replies = await host.store.route_many(reqs, timeout=timeout)
        return ControlReply(ok=True, data=_kv_enc.encode(replies))
    if not isinstance(raw, bytes):
        return ControlReply(ok=False, error="kv: args need 'req' (bytes) or 'reqs' (a list)")
    try:
        req = _kv_req_dec.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        return ControlReply(ok=False, error=f"kv: malformed request: {exc}")
    reply = await host.store.route(req, timeout=timeout)
    return ControlReply(ok=True, data=_kv_enc.encode(reply))


async def _call(node: Node, args: dict[str, Any]) -> dict[str, Any]:
    """``cluster.call`` for a remote client: the outcome, typed, as data."""
    from agentcluster.errors import CallError, CallRemoteError, Rejected

    capability = args.get("capability")
    timeout = args.get("timeout", 5.0)
    key = args.get("key")
    if not isinstance(capability, str) or not isinstance(timeout, int | float):
        return {"ok": False, "error_type": "ValueError", "error": "call: bad arguments"}
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


async def handle_control(node: Node, req: ControlRequest) -> ControlReply:
    try:
        if req.op == "members":
            return ControlReply(ok=True, data=_members(node))
        if req.op == "agents":
            return ControlReply(
                ok=True, data=[msgspec.to_builtins(a) for a in node.runtime.agents()]
            )
        if req.op == "health":
            return ControlReply(ok=True, data=_health(node))
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
            return ControlReply(ok=True, data=node.balancer.snapshot(node.clock.now()))
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


class ControlClient:
    """A connection to one node's control API, kept open for further requests (one at a
    time; concurrent callers queue on a lock). Any failure closes it; the next call
    reconnects."""

    def __init__(self, addr: str, *, keyring: Keyring | None, timeout: float = 5.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self._host, self._port = parse_addr(addr)
        self._codec = WireCodec(NodeStream, keyring, max_size=4 << 20)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def call(
        self, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Ask for ``op``; the reply's data, or ControlError."""
        timeout = self.timeout if timeout is None else timeout
        addr = self.addr
        frame = self._codec.encode(ControlRequest(op=op, args=args or {}))
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    if self._writer is None:
                        try:
                            conn = await asyncio.open_connection(self._host, self._port)
                        except OSError as exc:
                            raise ControlError(
                                f"cannot reach {addr}: {exc.strerror or exc}", not_sent=True
                            ) from None
                        self._reader, self._writer = conn
                    reader, writer = self._reader, self._writer
                    assert reader is not None
                    writer.write(struct.pack(">I", len(frame)) + frame)
                    await writer.drain()
                    (length,) = struct.unpack(">I", await reader.readexactly(4))
                    if length > 4 << 20:
                        raise ControlError(f"{addr} sent an oversized reply ({length} bytes)")
                    raw = await reader.readexactly(length)
            except TimeoutError:
                await self.close()
                raise ControlError(f"{addr} did not answer within {timeout}s") from None
            except asyncio.IncompleteReadError:
                await self.close()
                raise ControlError(
                    f"{addr} closed the connection without a reply (wrong cluster key?)"
                ) from None
            except OSError as exc:
                await self.close()
                raise ControlError(f"cannot reach {addr}: {exc.strerror or exc}") from None
            except BaseException:
                await self.close()
                raise
        reply = self._codec.try_decode(raw)
        if not isinstance(reply, ControlReply):
            await self.close()
            raise ControlError(f"{addr} sent a reply that does not authenticate or parse")
        if not reply.ok:
            raise ControlError(f"{addr}: {reply.error}")
        return reply.data

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


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
