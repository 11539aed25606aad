"""Cluster commands: ``node run``, ``members`` and the multi-node ``up``.

Theory of operation: ``node run`` is one node process (config from flags, ``--config`` TOML
and ``AGENTCLUSTER_*`` variables); SIGTERM or Ctrl-C makes it leave gracefully, SIGKILL is a
crash. ``members`` asks a node's control API for its view. ``up`` launches a
:class:`~agentcluster.launcher.LocalCluster` on loopback, waits for convergence, then renders
a live members table (as seen by the first running node) and a log of state changes;
``--chaos`` kills a random node every ``--chaos-every`` seconds or so (jittered) and restarts
it a little later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal as os_signal
import time
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

T = TypeVar("T")

node_app = typer.Typer(help="Run a cluster node.", no_args_is_help=True)


def _keyring(key_file: str | None) -> Any:
    from agentcluster.wire import Keyring

    path = key_file or os.environ.get("AGENTCLUSTER_KEY_FILE")
    return Keyring.from_file(path) if path else None


@node_app.command("run")
def node_run(
    name: Annotated[str | None, typer.Option(help="Node name (unique in the cluster).")] = None,
    bind: Annotated[str | None, typer.Option(help="HOST:PORT for UDP and TCP.")] = None,
    seed: Annotated[list[str] | None, typer.Option(help="Seed HOST:PORT (repeatable).")] = None,
    zone: Annotated[str | None, typer.Option(help="Zone of this node.")] = None,
    region: Annotated[str | None, typer.Option(help="Region of this node.")] = None,
    key_file: Annotated[str | None, typer.Option(help="Cluster keyring file.")] = None,
    preset: Annotated[str | None, typer.Option(help="Timing preset: local, lan, wan.")] = None,
    config: Annotated[str | None, typer.Option(help="TOML config file.")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Logs as JSON lines.")] = False,
    store_voter: Annotated[
        list[str] | None,
        typer.Option(help="Name of a coordination-store voter (repeatable; 3 or 5 in all)."),
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="Directory for this voter's Raft log and snapshots.")
    ] = None,
    fsync: Annotated[
        bool | None, typer.Option("--fsync/--no-fsync", help="Sync Raft writes to disk.")
    ] = None,
    snapshot_every: Annotated[
        int | None, typer.Option(help="Applied store entries between two snapshots.")
    ] = None,
    uvloop: Annotated[
        bool, typer.Option("--uvloop/--no-uvloop", help="Run on uvloop when it is installed.")
    ] = True,
    agent: Annotated[
        list[str] | None,
        typer.Option(help="A user agent to start and register, MODULE:CLASS (repeatable)."),
    ] = None,
    gc_young: Annotated[
        int,
        typer.Option(
            min=0,
            help="Young-generation GC threshold once the node is up (start-up objects are "
            "frozen too); 0 keeps CPython's defaults. See agentcluster.tuning.",
        ),
    ] = 20_000,
    sched: Annotated[
        str,
        typer.Option(
            help="CPU scheduling policy once the node is up: batch (no wake-up preemption) "
            "or normal. See agentcluster.tuning.",
        ),
    ] = "batch",
) -> None:
    """Run one node until SIGTERM / Ctrl-C (then it leaves the cluster gracefully)."""
    from agentcluster.config import ConfigError, load_config
    from agentcluster.logs import configure_logging

    configure_logging(log_level.upper(), json=json_logs)
    overrides = {
        "name": name, "bind": bind, "seeds": seed or None, "zone": zone, "region": region,
        "key_file": key_file, "preset": preset, "store_voters": store_voter or None,
        "data_dir": data_dir, "fsync": fsync, "snapshot_every": snapshot_every,
        "agents": agent or None,
    }  # fmt: skip
    try:
        cfg = load_config(config, overrides=overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _check_agents(cfg.agents)
    if sched not in ("batch", "normal"):
        typer.echo(f"error: --sched must be batch or normal, not {sched!r}", err=True)
        raise typer.Exit(2)
    run_loop(_run_node(cfg, gc_young=gc_young, sched=sched), uvloop=uvloop)


def _check_agents(specs: list[str]) -> None:
    """Fail before starting anything when an agent cannot be loaded."""
    from agentcluster.node import load_agent_class

    for spec in specs:
        try:
            load_agent_class(spec)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


def run_loop(main: Coroutine[Any, Any, T], *, uvloop: bool = True) -> T:
    """Run ``main`` on uvloop when asked and installed (about 1.5x the messages per CPU
    second of the default loop), else on asyncio's own loop."""
    if uvloop:
        try:
            import uvloop as _uvloop
        except ImportError:
            pass
        else:
            return _uvloop.run(main)
    return asyncio.run(main)


async def _run_node(cfg: Any, *, gc_young: int = 0, sched: str = "normal") -> None:
    from agentcluster import tuning
    from agentcluster.node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (os_signal.SIGINT, os_signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Node(cfg) as node:
        # Now that everything the node needs exists (see agentcluster.tuning).
        if gc_young:
            tuning.tune_gc(young=gc_young)
        tuning.tune_scheduler("batch" if sched == "batch" else "normal")
        await stop.wait()
        await node.stop(leave=True)


def _members_table(rows: list[dict[str, Any]], title: str, now: float | None = None) -> Table:
    table = Table(title=title, expand=False)
    for col in ("name", "addr", "state", "inc", "zone", "rtt ms", "last change"):
        table.add_column(col, justify="right" if col in ("inc", "rtt ms") else "left")
    now = time.time() if now is None else now
    styles = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}
    for m in rows:
        rtt = "" if m.get("rtt_ms") is None else f"{m['rtt_ms']:.2f}"
        ago = now - m["changed_at"]
        table.add_row(
            m["name"], m["addr"], Text(m["state"], style=styles.get(m["state"], "")),
            str(m["incarnation"]), m.get("zone", ""), rtt, f"{ago:5.1f}s ago",
        )  # fmt: skip
    return table


def members(
    node: Annotated[str, typer.Option(help="HOST:PORT of any node.")],
    key_file: Annotated[str | None, typer.Option(help="Cluster keyring file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the node.")] = 5.0,
) -> None:
    """Print a node's view of the cluster."""
    from agentcluster.control import ControlError, request

    try:
        rows = asyncio.run(request(node, "members", keyring=_keyring(key_file), timeout=timeout))
    except ControlError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(rows))
        return
    Console().print(_members_table(rows, f"members as seen by {node}"))


async def _up(
    n: int,
    duration: float | None,
    chaos: float | None,
    preset: str,
    console: Console,
    agents: list[str] | None = None,
) -> int:
    from agentcluster.launcher import LocalCluster

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (os_signal.SIGINT, os_signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    rng = random.Random()
    log: list[str] = []
    last: dict[str, str] = {}
    async with LocalCluster(n, preset=preset, agents=agents or ()) as cluster:
        console.print(f"started {n} nodes on loopback (logs in {cluster.workdir}); converging ...")
        console.print(
            f"cluster key: {cluster.key_file} -- try: agentcluster kv put greeting hello "
            f"--node {cluster.nodes[0].addr} --key-file {cluster.key_file}",
            soft_wrap=True,  # one line, so it can be copied as is
            highlight=False,
        )
        if agents:
            console.print(
                f"agents: {', '.join(agents)} on every node -- try: agentcluster agents "
                f"--node {cluster.nodes[0].addr} --key-file {cluster.key_file}",
                soft_wrap=True,
                highlight=False,
            )
        try:
            took = await cluster.wait_converged(timeout=60)
            console.print(f"converged in {took:.2f}s")
        except TimeoutError:
            console.print("[red]the cluster did not converge within 60 s; showing what it sees[/]")
        deadline = None if duration is None else loop.time() + duration
        every = chaos or 15.0
        next_chaos = loop.time() + rng.uniform(0.5, 1.0) * every
        revive: dict[str, float] = {}

        async def store_line() -> Text | None:
            # Each running voter's own view; the highest term with a leader wins, so a
            # deposed leader that has not heard of the new term yet is not shown.
            voters = [p for p in cluster.nodes if p.name in cluster.store_voters and p.running]
            if not voters:
                return None
            views = await asyncio.gather(
                *(cluster.ask(p.name, "stats", timeout=1.0) for p in voters),
                return_exceptions=True,
            )
            stores = [v["store"] for v in views if isinstance(v, dict) and v.get("store")]
            led = [s for s in stores if s.get("leader")]
            if not led:
                return Text("store: no leader (election in progress)", style="yellow")
            best = max(led, key=lambda s: (s["term"], s["commit_index"]))
            return Text(
                f"store: leader {best['leader']} · term {best['term']} · "
                f"revision {best['revision']} · keys {best['keys']} · "
                f"{len(stores)}/{len(cluster.store_voters)} voters answering",
                style="bold",
            )

        def render(rows: list[dict[str, Any]] | None, observer: str, store: Text | None) -> Group:
            table = (
                _members_table(rows, f"members as seen by {observer}")
                if rows is not None
                else Text("no node answered")
            )
            footer = Text("\n".join(log[-8:]) or "no changes yet", style="dim")
            hint = "Ctrl-C stops every node" + ("; chaos on" if chaos else "") + "\n"
            parts = (table,) if store is None else (table, store)
            return Group(*parts, footer, Text(hint, style="italic"))

        with Live(render(None, "-", None), console=console, refresh_per_second=4) as live:
            while not stop.is_set() and (deadline is None or loop.time() < deadline):
                observer = next((p for p in cluster.nodes if p.running), None)
                rows = None
                if observer is not None:
                    with contextlib.suppress(Exception):
                        rows = await cluster.ask(observer.name, "members", timeout=1.0)
                for m in rows or []:
                    # State changes only: metadata updates (load reports, health) also raise
                    # the incarnation, and are not news here.
                    key = m["state"]
                    if last.get(m["name"]) != key:
                        stamp = time.strftime("%H:%M:%S")
                        log.append(
                            f"{stamp} {m['name']}: {m['state']} (incarnation {m['incarnation']})"
                        )
                        last[m["name"]] = key
                live.update(render(rows, observer.name if observer else "-", await store_line()))
                now = loop.time()
                if chaos and now >= next_chaos:
                    victims = [p for p in cluster.nodes[1:] if p.running]
                    if victims:
                        victim = rng.choice(victims)
                        await cluster.kill(victim.name)
                        log.append(f"{time.strftime('%H:%M:%S')} chaos: kill -9 {victim.name}")
                        revive[victim.name] = now + rng.uniform(0.3, 0.5) * every
                    next_chaos = now + rng.uniform(0.7, 1.3) * every
                for name, at in list(revive.items()):
                    if now >= at:
                        await cluster.spawn(cluster.node(name))
                        log.append(f"{time.strftime('%H:%M:%S')} chaos: restarted {name}")
                        del revive[name]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await stop.wait()
        console.print("stopping every node (graceful leave) ...")
    console.print("all nodes stopped cleanly")
    return 0


def up(
    nodes: Annotated[
        int, typer.Option("--nodes", min=1, max=64, help="How many node processes.")
    ] = 5,
    duration: Annotated[
        float | None, typer.Option("--duration", min=0.0, help="Stop after this many seconds.")
    ] = None,
    chaos: Annotated[
        bool, typer.Option("--chaos", help="Kill -9 a random node now and then, then restart it.")
    ] = False,
    chaos_every: Annotated[
        float, typer.Option(min=1.0, help="Mean seconds between chaos kills.")
    ] = 15.0,
    preset: Annotated[str, typer.Option(help="Membership timing preset.")] = "local",
    agent: Annotated[
        list[str] | None,
        typer.Option(
            help="A user agent every node starts and registers, MODULE:CLASS (repeatable; "
            "e.g. agentcluster.examples.voter:Voter)."
        ),
    ] = None,
) -> None:
    """Run a local cluster of N node processes on loopback with a live members view."""
    _check_agents(agent or [])
    console = Console(highlight=False)
    raise typer.Exit(
        asyncio.run(
            _up(nodes, duration, chaos_every if chaos else None, preset, console, agent or [])
        )
    )
