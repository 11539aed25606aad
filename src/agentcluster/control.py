"""The node control API: authenticated request/reply over the node's own stream port.

Theory of operation: a control request is a msgspec Struct sealed with the cluster keyring,
sent as one framed request on a TCP connection to the node's port; the node answers with one
:class:`ControlReply`. There is no separate listener and no separate credential: whoever holds
the cluster key may ask, nobody else can (the frame does not authenticate and is dropped).
Operations: ``members``, ``agents``, ``health``, ``stats``, ``leave``.

:func:`request` is the client side, used by ``agentcluster members`` and by the local cluster
launcher (``agentcluster up``) to watch its nodes.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster.membership.messages import StreamMessage
from agentcluster.signals import Signal
from agentcluster.transport.base import parse_addr
from agentcluster.wire import Keyring, WireCodec

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = [
    "AgentEnvelope",
    "ControlError",
    "ControlReply",
    "ControlRequest",
    "NodeStream",
    "handle_control",
    "request",
]

log = logging.getLogger(__name__)

OPS = ("members", "agents", "health", "stats", "leave")


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


NodeStream = StreamMessage | ControlRequest | ControlReply | AgentEnvelope


class ControlError(Exception):
    """The node could not be reached, rejected the request, or answered with an error."""


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
    for name in ("failure_detector", "node_discovery"):
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
        return ControlReply(ok=False, error=f"unknown op {req.op!r}; known: {', '.join(OPS)}")
    except Exception as exc:
        log.exception("control op %s failed", req.op)
        return ControlReply(ok=False, error=f"{type(exc).__name__}: {exc}")


async def request(
    addr: str,
    op: str,
    *,
    keyring: Keyring | None,
    args: dict[str, Any] | None = None,
    timeout: float = 5.0,
) -> Any:
    """Ask the node at ``addr`` for ``op``; returns the reply's data or raises ControlError."""
    codec = WireCodec(NodeStream, keyring, max_size=4 << 20)
    host, port = parse_addr(addr)
    frame = codec.encode(ControlRequest(op=op, args=args or {}))
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(struct.pack(">I", len(frame)) + frame)
                await writer.drain()
                header = await reader.readexactly(4)
                (length,) = struct.unpack(">I", header)
                if length > 4 << 20:
                    raise ControlError(f"{addr} sent an oversized reply ({length} bytes)")
                raw = await reader.readexactly(length)
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
    except TimeoutError:
        raise ControlError(f"{addr} did not answer within {timeout}s") from None
    except asyncio.IncompleteReadError:
        raise ControlError(
            f"{addr} closed the connection without a reply (wrong cluster key?)"
        ) from None
    except OSError as exc:
        raise ControlError(f"cannot reach {addr}: {exc.strerror or exc}") from None
    reply = codec.try_decode(raw)
    if not isinstance(reply, ControlReply):
        raise ControlError(f"{addr} sent a reply that does not authenticate or parse")
    if not reply.ok:
        raise ControlError(f"{addr}: {reply.error}")
    return reply.data
