"""``agentcluster agents``, ``agentcluster consensus history`` and ``agentcluster routes``: the
coordination layer and the load balancer from a shell, through a node's control API
(:func:`agentcluster.connect`)."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["agents", "consensus_app", "health", "routes"]

consensus_app = typer.Typer(help="Proposals and votes among agents.", no_args_is_help=True)

_NodeOpt = Annotated[str, typer.Option(help="HOST:PORT of any node.")]
_KeyOpt = Annotated[
    str | None, typer.Option(help="Cluster keyring file (or $AGENTCLUSTER_KEY_FILE).")
]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the node.")]


def _plain(obj: Any) -> Any:
    """JSON-ready data with every Struct as an object (wire Structs encode as arrays); a
    NaN or infinity (kept by a node from before they were refused) is null, so the output
    stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
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


def routes(
    node: _NodeOpt,
    decisions: Annotated[int, typer.Option(min=0, help="Recent decisions to show.")] = 20,
    key_file: _KeyOpt = None,
    as_json: _JsonOpt = False,
    timeout: _TimeoutOpt = 5.0,
) -> None:
    """A node's routing view: per-node weights, breakers, ejections, recent decisions."""
    import math

    view = _run(node, key_file, timeout, lambda c: c.routes(decisions=decisions))

    def finite(obj: Any) -> Any:
        # A peer's garbled load report (NaN, inf) must not make the output invalid JSON;
        # the node nulls cpu and memory itself, this also covers one that does not yet.
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else None
        if isinstance(obj, dict):
            return {k: finite(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [finite(v) for v in obj]
        return obj

    view = finite(view)
    if as_json:
        typer.echo(json.dumps(view, allow_nan=False))
        return
    console = Console()
    caps = Table(title=f"routes of {node} (default strategy {view['strategy']})")
    for col in ("capability", "strategy", "eligible", "known", "panic"):
        caps.add_column(col)
    for cap, r in view["capabilities"].items():
        caps.add_row(
            cap, r["strategy"], ", ".join(r["eligible"]), ", ".join(r["known"]), str(r["panic"])
        )
    console.print(caps)

    def num(x: float | None) -> str:
        return "?" if x is None else f"{x:.2f}"

    nodes = Table(title="nodes")
    cols = ("node", "zone", "weight", "cpu", "memory", "in_flight", "breaker", "ejected",
            "quarantined")  # fmt: skip
    for col in cols:
        nodes.add_column(col)
    for n in view["nodes"]:
        # in_flight: the calls the node last said it serves, every client's (older nodes
        # do not send it).
        in_flight = n.get("in_flight")
        nodes.add_row(
            n["node"], n["zone"], f"{n['weight']:g}", num(n["cpu"]), num(n["memory"]),
            "?" if in_flight is None else f"{in_flight:g}",
            n["breaker"], "yes" if n["ejected"] else "", "yes" if n["quarantined"] else "",
        )  # fmt: skip
    console.print(nodes)
    recent = view["decisions"][-decisions:] if decisions else []
    if recent:
        dec = Table(title=f"last {len(recent)} decisions")
        for col in ("capability", "node", "strategy", "ok", "latency ms", "attempt"):
            dec.add_column(col)
        for d in recent:
            dec.add_row(
                d["capability"], d["node"] or "(none)", d["strategy"], "yes" if d["ok"] else "no",
                f"{d['latency'] * 1000:.2f}", str(d["attempt"]),
            )  # fmt: skip
        console.print(dec)


def health(
    node: _NodeOpt,
    key_file: _KeyOpt = None,
    as_json: _JsonOpt = False,
    timeout: _TimeoutOpt = 5.0,
) -> None:
    """A node's health view: its status, vitals, anomalies, alerts, its peers' health and the
    quarantine."""
    from agentcluster.cli.cluster import _keyring
    from agentcluster.control import ControlError, request

    try:
        view = asyncio.run(request(node, "health", keyring=_keyring(key_file), timeout=timeout))
    except ControlError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(view))
        return
    console = Console()
    console.print(
        f"[bold]{view['node']}[/]: {view.get('status', 'unknown')}"
        + (f" ({view['reason']})" if view.get("reason") else "")
    )
    vitals = view.get("vitals")
    if vitals:
        console.print(
            f"cpu {vitals['cpu_system']:.0%}  memory {vitals['memory_used']:.0%}  "
            f"disk {vitals['disk_used']:.0%}  fds {vitals['open_fds']}/{vitals['fd_limit']}  "
            f"net in {vitals['net_bytes_in_per_s'] / 1e3:.1f} kB/s "
            f"out {vitals['net_bytes_out_per_s'] / 1e3:.1f} kB/s"
        )
    peers = Table(title="peers")
    for col in ("peer", "status", "failures", "rtt ms (recent)"):
        peers.add_column(col)
    for name, p in sorted(view.get("peers", {}).items()):
        peers.add_row(
            name, p["status"], str(p["failures"]), ", ".join(f"{r:.2f}" for r in p["rtt_ms"])
        )
    console.print(peers)
    for title, rows, cols in (
        (
            "anomalies",
            view.get("anomalies", []),
            ("metric", "kind", "severity", "value", "expected"),
        ),
        ("alerts", view.get("alerts", []), ("rule", "severity", "value", "count")),
        (
            "quarantined",
            view.get("quarantine", {}).get("active", []),
            ("node", "reason", "since", "until"),
        ),
    ):
        table = Table(title=f"{title} ({len(rows)})")
        for col in cols:
            table.add_column(col)
        for row in rows:
            item = row if isinstance(row, dict) else {}
            table.add_row(*(str(item.get(c, "")) for c in cols))
        console.print(table)
    checks = Table(title="checks")
    for col in ("check", "kind", "status", "detail"):
        checks.add_column(col)
    for name, r in view.get("checks", {}).items():
        checks.add_row(name, r["kind"], r["status"], r["detail"])
    console.print(checks)
