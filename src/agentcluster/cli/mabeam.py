"""``agentcluster agents`` and ``agentcluster consensus history``: the coordination layer from
a shell, through a node's control API (:func:`agentcluster.connect`)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["agents", "consensus_app"]

consensus_app = typer.Typer(help="Proposals and votes among agents.", no_args_is_help=True)

_NodeOpt = Annotated[str, typer.Option(help="HOST:PORT of any node.")]
_KeyOpt = Annotated[
    str | None, typer.Option(help="Cluster keyring file (or $AGENTCLUSTER_KEY_FILE).")
]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the node.")]


def _plain(obj: Any) -> Any:
    """JSON-ready data with every Struct as an object (wire Structs encode as arrays)."""
    if isinstance(obj, msgspec.Struct):
        return {f: _plain(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, list | tuple):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _run(node: str, key_file: str | None, timeout: float, fn: Any) -> Any:
    from agentcluster.cluster import ClusterError, connect
    from agentcluster.coordination.query import QueryError

    async def go() -> Any:
        cluster = connect(node, key_file=key_file, timeout=timeout)
        try:
            return await fn(cluster)
        finally:
            await cluster.close()

    try:
        return asyncio.run(go())
    except (ClusterError, QueryError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def agents(
    node: _NodeOpt,
    capability: Annotated[
        str | None, typer.Option(help="Only agents with this capability.")
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            help='A condition, e.g. "resources.gpu>=1", "health!=unhealthy" (repeatable).'
        ),
    ] = None,
    healthy: Annotated[bool, typer.Option(help="Only healthy agents.")] = False,
    key_file: _KeyOpt = None,
    as_json: _JsonOpt = False,
    timeout: _TimeoutOpt = 5.0,
) -> None:
    """List the agents registered in the cluster (the node's registry view)."""
    conds = list(where or [])
    found = _run(
        node,
        key_file,
        timeout,
        lambda c: c.find(*conds, capability=capability, healthy_only=healthy),
    )
    if as_json:
        typer.echo(json.dumps(_plain(found)))
        return
    table = Table(title=f"{len(found)} agents as seen by {node}")
    for col in ("id", "name", "node", "capabilities", "health", "resources"):
        table.add_column(col)
    for e in found:
        resources = ", ".join(f"{k}={v:g}" for k, v in sorted(e.resources.items()))
        table.add_row(e.id, e.name, e.node, ", ".join(e.capabilities), e.health, resources)
    Console().print(table)


@consensus_app.command("history")
def history(
    node: _NodeOpt,
    limit: Annotated[int, typer.Option(min=1, help="The last this many decisions.")] = 50,
    topic: Annotated[str | None, typer.Option(help="Only decisions on this topic.")] = None,
    key_file: _KeyOpt = None,
    as_json: _JsonOpt = False,
    timeout: _TimeoutOpt = 5.0,
) -> None:
    """The committed decisions of the cluster, oldest first."""
    decisions = _run(
        node, key_file, timeout, lambda c: c.consensus_history(limit=limit, topic=topic)
    )
    if as_json:
        typer.echo(json.dumps(_plain(decisions)))
        return
    table = Table(title=f"{len(decisions)} decisions")
    for col in ("decided", "ref", "topic", "rule", "decision", "yes/no/abstain", "timed out"):
        table.add_column(col)
    for d in decisions:
        o = d.outcome
        table.add_row(
            datetime.fromtimestamp(d.decided_at).strftime("%Y-%m-%d %H:%M:%S"),
            d.ref,
            d.topic,
            d.rule.kind,
            o.decision,
            f"{o.yes}/{o.no}/{o.abstain}",
            ", ".join(o.timed_out),
        )
    Console().print(table)
