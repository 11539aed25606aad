"""The ``mabeam`` control op: the coordination layer for clients outside the node.

Theory of operation: :class:`agentcluster.RemoteCluster` (``agentcluster.connect``) sends
``ControlRequest(op="mabeam", args={"fn": <name>, ...})``; this module validates the
arguments and runs the function against the node's registry and consensus service. Store
primitives (locks, elections, barriers, semaphores) need no op here: a remote client runs the
same recipes over :class:`~agentcluster.store.remote.RemoteStore`.

``watch`` is a long poll over the node bus's journal: signals matching a pattern after a
signal id, waiting up to ``wait`` seconds for the first one -- a client that reconnects with
the last id it saw misses nothing the journal still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster.coordination.query import Cond, QueryError, parse_cond
from agentcluster.coordination.voting import Rule, parse_rule
from agentcluster.signals.bus import SignalNotFound

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = ["MabeamArgError", "handle_mabeam"]

_MAX_WAIT = 30.0
_MAX_WATCH_BATCH = 1_000


class MabeamArgError(ValueError):
    """A ``mabeam`` request with missing or ill-typed arguments."""


def _arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in args:
        if default is ...:
            raise MabeamArgError(f"mabeam: missing argument {name!r}")
        return default
    value = args[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise MabeamArgError(f"mabeam: argument {name!r} has the wrong type")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def conds_from(raw: Any) -> list[Cond]:
    """Conditions from strings (``"resources.gpu>=1"``) or ``[field, op, value]`` triples."""
    if not isinstance(raw, list):
        raise MabeamArgError("mabeam: 'where' must be a list of conditions")
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append(parse_cond(item))
        else:
            try:
                out.append(msgspec.convert(item, Cond))
            except msgspec.ValidationError as exc:
                raise QueryError(f"bad condition {item!r}: {exc}") from None
    return out


def rule_from(raw: Any) -> Rule:
    if isinstance(raw, str):
        return parse_rule(raw)
    try:
        rule = msgspec.convert(raw, Rule)
    except msgspec.ValidationError as exc:
        raise MabeamArgError(f"mabeam: bad rule {raw!r}: {exc}") from None
    rule.validate()
    return rule


async def _find(node: Node, args: dict[str, Any]) -> Any:
    conds = conds_from(args.get("where", []))
    limit = _arg(args, "limit", int, 0)
    order_by = _arg(args, "order_by", (str, type(None)), None)
    descending = _arg(args, "descending", bool, False)
    found = node.registry.index.query(conds, limit=limit, order_by=order_by, descending=descending)
    return [msgspec.to_builtins(e) for e in found]


async def _summary(node: Node, args: dict[str, Any]) -> Any:
    return node.registry.index.summary()


async def _register(node: Node, args: dict[str, Any]) -> Any:
    entry = await node.registry.register(
        _arg(args, "agent", str),
        capabilities=_arg(args, "capabilities", list, []),
        resources=_arg(args, "resources", dict, {}),
        metadata=_arg(args, "metadata", dict, {}),
        health=_arg(args, "health", str, "healthy"),
        unique=_arg(args, "unique", bool, False),
        name=_arg(args, "name", (str, type(None)), None),
    )
    return msgspec.to_builtins(entry)


async def _unregister(node: Node, args: dict[str, Any]) -> Any:
    return await node.registry.unregister(_arg(args, "id", str))


async def _consensus_start(node: Node, args: dict[str, Any]) -> Any:
    return await node.consensus.start(
        _arg(args, "participants", list),
        args.get("proposal"),
        rule=rule_from(args.get("rule", "majority")),
        timeout=float(_arg(args, "timeout", (int, float), 5.0)),
        topic=_arg(args, "topic", str, ""),
        ref=_arg(args, "ref", (str, type(None)), None),
    )


async def _consensus_result(node: Node, args: dict[str, Any]) -> Any:
    wait = min(float(_arg(args, "wait", (int, float), 5.0)), _MAX_WAIT)
    decision = await node.consensus.result(_arg(args, "ref", str), timeout=wait)
    return msgspec.to_builtins(decision)


async def _consensus_history(node: Node, args: dict[str, Any]) -> Any:
    decisions = await node.consensus.history(
        limit=_arg(args, "limit", int, 100), topic=_arg(args, "topic", (str, type(None)), None)
    )
    return [msgspec.to_builtins(d) for d in decisions]


async def _auction(node: Node, args: dict[str, Any]) -> Any:
    duration = float(_arg(args, "duration", (int, float), 2.0))
    ref = await node.auctions.start(
        _arg(args, "bidders", list),
        _arg(args, "item", str),
        kind=_arg(args, "kind", str, "vickrey"),
        duration=duration,
        reserve=float(_arg(args, "reserve", (int, float), 0.0)),
        start_price=float(_arg(args, "start_price", (int, float), 0.0)),
        min_increment=float(_arg(args, "min_increment", (int, float), 1.0)),
        step=float(_arg(args, "step", (int, float), 1.0)),
        step_interval=float(_arg(args, "step_interval", (int, float), 0.1)),
    )
    outcome = await node.auctions.result(ref, timeout=duration + 15.0)
    return msgspec.to_builtins(outcome)


async def _watch(node: Node, args: dict[str, Any]) -> Any:
    pattern = _arg(args, "pattern", str, "cluster.**")
    after = _arg(args, "after", (str, type(None)), None)
    wait = min(float(_arg(args, "wait", (int, float), 5.0)), _MAX_WAIT)
    bus = node.runtime.bus
    # Subscribe before reading the journal: a signal published in between is then either in
    # the journal read or in the subscription, never in neither.
    sub = bus.subscribe(pattern, queue_size=_MAX_WATCH_BATCH, overflow="drop_oldest")
    try:
        try:
            found = bus.replay(since_id=after, pattern=pattern) if after else []
        except SignalNotFound:
            # The journal no longer holds the client's last id: start from what it holds.
            found = bus.replay(pattern=pattern)
        if not found and wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    found.append(await sub.get())
            while sub.qsize() and len(found) < _MAX_WATCH_BATCH:
                found.append(await sub.get())
    finally:
        bus.unsubscribe(sub)
    return [msgspec.to_builtins(s) for s in found[:_MAX_WATCH_BATCH]]


_FNS: dict[str, Callable[[Node, dict[str, Any]], Coroutine[Any, Any, Any]]] = {
    "find": _find,
    "summary": _summary,
    "register": _register,
    "unregister": _unregister,
    "consensus_start": _consensus_start,
    "consensus_result": _consensus_result,
    "consensus_history": _consensus_history,
    "watch": _watch,
    "auction": _auction,
}


async def handle_mabeam(node: Node, args: dict[str, Any]) -> Any:
    """Run one ``mabeam`` function; raises ValueError subclasses for bad requests."""
    fn = args.get("fn")
    handler = _FNS.get(fn) if isinstance(fn, str) else None
    if handler is None:
        raise MabeamArgError(f"mabeam: unknown fn {fn!r}; known: {', '.join(sorted(_FNS))}")
    return await handler(node, args)
