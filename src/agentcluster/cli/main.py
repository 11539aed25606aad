"""``agentcluster``: the command line (typer + rich).

Theory of operation: each command is a thin face over the public API. ``up`` (in
:mod:`agentcluster.cli.cluster`) runs N node processes on loopback; ``demo`` runs the agent
runtime alone with the bundled demo agents, printing every bus signal and supervisor event as
it happens, until ``--duration`` elapses or the process gets SIGINT / SIGTERM, then stops
every agent in order. ``bench <name> --json`` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal as os_signal
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

import agentcluster

app = typer.Typer(
    name="agentcluster",
    help="Agent-native clustering: every cluster function is a supervised agent.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(
    help="Benchmarks; each prints one JSON object with --json.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


def _register_cluster_commands() -> None:
    from agentcluster.cli.cluster import members, node_app, up

    app.add_typer(node_app, name="node")
    app.command()(up)
    app.command()(members)


def _register_kv_commands() -> None:
    from agentcluster.cli.kv import kv_app

    app.add_typer(kv_app, name="kv")


def _register_mabeam_commands() -> None:
    from agentcluster.cli.mabeam import agents, consensus_app, health, routes

    app.command()(agents)
    app.command()(health)
    app.command()(routes)
    app.add_typer(consensus_app, name="consensus")


_register_cluster_commands()
_register_kv_commands()
_register_mabeam_commands()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"agentcluster {agentcluster.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """agentcluster command line."""


def _fmt_data(data: Any) -> str:
    if data is None:
        return ""
    text = json.dumps(data, default=str, separators=(",", ":"))
    return text if len(text) <= 80 else text[:77] + "..."


async def _up(duration: float | None, interval: float, console: Console) -> int:
    from agentcluster.agents import Runtime
    from agentcluster.examples.pingpong import start_demo

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (os_signal.SIGINT, os_signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with Runtime("local") as rt:
        sub = rt.bus.subscribe("**", queue_size=4096, overflow="drop_oldest", name="cli-up")

        async def show() -> None:
            async for sig in sub:
                when = sig.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
                style = "red" if "crash" in sig.type or "error" in sig.type else "cyan"
                console.print(
                    f"[dim]{when}[/] [{style}]{sig.type:<34}[/] {sig.source:<22} {_fmt_data(sig.data)}",
                    highlight=False,
                )

        console.print(
            f"[bold]agentcluster {agentcluster.__version__}[/] node [bold]local[/] up; "
            + ("Ctrl-C stops it" if duration is None else f"stopping in {duration:g}s")
        )
        async with asyncio.TaskGroup() as tg:
            shower = tg.create_task(show())
            await start_demo(rt, interval=interval)
            try:
                async with asyncio.timeout(duration):
                    await stop.wait()
            except TimeoutError:
                pass
            table = Table(title="agents at shutdown")
            for col in ("id", "name", "processed", "errors", "mailbox", "supervised"):
                table.add_column(col)
            for info in rt.agents():
                table.add_row(
                    info.id,
                    info.name,
                    str(info.processed),
                    str(info.errors),
                    str(info.mailbox),
                    "yes" if info.supervised else "no",
                )
            restarts = rt.supervisor.count_restarts()
            shower.cancel()
    console.print(table)
    console.print(f"supervisor restarts: {restarts}; stopped cleanly at {datetime.now():%H:%M:%S}")
    return 0


@app.command()
def demo(
    duration: Annotated[
        float | None, typer.Option("--duration", min=0.0, help="Stop after this many seconds.")
    ] = None,
    interval: Annotated[
        float, typer.Option(min=0.01, help="Ping interval of the demo, seconds.")
    ] = 0.5,
    log_level: Annotated[
        str, typer.Option(help="Log level for agentcluster's own logs.")
    ] = "warning",
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Logs as JSON lines.")] = False,
) -> None:
    """Run the agent runtime alone with the bundled demo agents, showing what happens live."""
    from agentcluster.logs import configure_logging

    configure_logging(log_level.upper(), json=json_logs)
    console = Console(highlight=False)
    code = asyncio.run(_up(duration, interval, console))
    raise typer.Exit(code)


def _print_result(result: dict[str, Any], title: str, *, as_json: bool) -> None:
    """A bench result: one JSON object on stdout, or a two-column table."""
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)


@bench_app.command("runtime")
def bench_runtime(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quick: Annotated[bool, typer.Option(help="Smaller workloads (a smoke run).")] = False,
    uvloop: Annotated[bool, typer.Option(help="Run on uvloop (needs the uvloop extra).")] = False,
) -> None:
    """Router, bus, agent call latency, agent start rate and memory per idle agent."""
    from agentcluster.bench.runtime import run

    logging.getLogger("agentcluster").setLevel(logging.ERROR)
    result = run(quick=quick, use_uvloop=uvloop)
    _print_result(result, "bench runtime", as_json=as_json)


@bench_app.command("consensus")
def bench_consensus(
    backend: Annotated[str, typer.Option(help="raft (ours) or etcd (a real etcd).")] = "raft",
    nodes: Annotated[int, typer.Option(help="Cluster size: 3 or 5.")] = 3,
    puts: Annotated[int, typer.Option(min=10, help="Sequential puts timed.")] = 2000,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients (throughput).")] = 16,
    seconds: Annotated[float, typer.Option(min=0.5, help="Throughput run length.")] = 3.0,
    failovers: Annotated[int, typer.Option(min=1, help="Leader kills timed.")] = 10,
    preset: Annotated[str, typer.Option(help="Raft timing preset (raft backend).")] = "lan",
    etcd_tls: Annotated[
        bool,
        typer.Option(
            "--etcd-tls",
            help="etcd backend: members speak TLS and require client certificates.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Put latency, throughput, CAS latency, failover time and lost writes of the store."""
    from agentcluster.bench.consensus import run

    if backend not in ("raft", "etcd") or nodes not in (3, 5):
        typer.echo("error: --backend must be raft or etcd and --nodes 3 or 5", err=True)
        raise typer.Exit(2)
    if etcd_tls and backend != "etcd":
        typer.echo(
            "error: --etcd-tls needs --backend etcd (raft frames are always sealed)", err=True
        )
        raise typer.Exit(2)
    logging.getLogger("agentcluster").setLevel(logging.ERROR)
    try:
        result = run(
            backend, nodes=nodes, puts=puts, clients=clients, seconds=seconds,
            failovers=failovers, preset=preset, etcd_tls=etcd_tls,
        )  # fmt: skip
    except Exception as exc:  # the bench reports, it does not dump a traceback
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_result(result, f"bench consensus ({backend}, {nodes} nodes)", as_json=as_json)


@bench_app.command("coordination")
def bench_coordination(
    nodes: Annotated[
        int, typer.Option(min=1, help="Nodes whose voters take part in proposals.")
    ] = 5,
    cluster_nodes: Annotated[
        int, typer.Option(min=1, help="Real node processes (registry convergence).")
    ] = 10,
    entries: Annotated[int, typer.Option(min=1, help="Registry entries queried.")] = 10_000,
    rounds: Annotated[int, typer.Option(min=1, help="Registry convergence rounds.")] = 30,
    proposals: Annotated[int, typer.Option(min=1, help="Proposals decided.")] = 200,
    locks: Annotated[int, typer.Option(min=1, help="Lock acquisitions timed.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Registry lookup and convergence, consensus decision and lock acquisition times."""
    from agentcluster.bench.coordination import run

    logging.getLogger("agentcluster").setLevel(logging.ERROR)
    try:
        result = run(
            nodes=nodes, cluster_nodes=cluster_nodes, entries=entries, rounds=rounds,
            proposals=proposals, locks=locks,
        )  # fmt: skip
    except Exception as exc:  # the bench reports, it does not dump a traceback
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_result(result, f"bench coordination ({nodes} nodes)", as_json=as_json)


@bench_app.command("lb")
def bench_lb(
    quick: Annotated[bool, typer.Option(help="Fewer picks and simulated requests.")] = False,
    calls: Annotated[int, typer.Option(min=10, help="Calls timed for the overhead.")] = 3000,
    preset: Annotated[
        str,
        typer.Option(
            help="Timing preset of the two nodes in the call-overhead run: local (one host, "
            "the most background work) or lan (the node default)."
        ),
    ] = "local",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Pick times, balance, the slow-node scenario, Maglev disruption, ejection, call overhead."""
    from agentcluster.bench.lb import run
    from agentcluster.membership.config import SwimConfig

    if preset not in SwimConfig.PRESETS:
        typer.echo(
            f"error: --preset must be one of {', '.join(SwimConfig.PRESETS)}, not {preset!r}",
            err=True,
        )
        raise typer.Exit(2)
    logging.getLogger("agentcluster").setLevel(logging.ERROR)
    try:
        result = run(quick=quick, calls=calls, preset=preset)
    except Exception as exc:  # the bench reports, it does not dump a traceback
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_result(result, "bench lb", as_json=as_json)


@bench_app.command("health")
def bench_health(
    checks: Annotated[int, typer.Option(min=10, help="Basic checks timed.")] = 3000,
    decisions: Annotated[int, typer.Option(min=1, help="Quarantine decisions timed.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Basic check latency, anomaly detection quality and delay, quarantine decision time."""
    from agentcluster.bench.health import run

    logging.getLogger("agentcluster").setLevel(logging.ERROR)
    try:
        result = run(checks=checks, decisions=decisions)
    except Exception as exc:  # the bench reports, it does not dump a traceback
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_result(result, "bench health", as_json=as_json)


@bench_app.command("membership")
def bench_membership(
    mode: Annotated[str, typer.Option(help="sim (simulated network) or real (processes).")] = "sim",
    nodes: Annotated[
        int | None, typer.Option(min=2, help="Cluster size (default: 200 sim, 10 real).")
    ] = None,
    duration: Annotated[float, typer.Option(min=10.0, help="Simulated seconds (sim).")] = 600.0,
    seed: Annotated[int, typer.Option(help="Seed of the simulation (sim).")] = 1,
    loss: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Packet loss per link (sim).")
    ] = 0.05,
    laggy: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Share of nodes that stall now and then (sim).")
    ] = 0.10,
    crashes: Annotated[int, typer.Option(min=1, help="Crashes to time (sim).")] = 10,
    trials: Annotated[int, typer.Option(min=1, help="Kill and stall rounds (real).")] = 5,
    preset: Annotated[
        str | None, typer.Option(help="Timing preset (default: lan sim, local real).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Join convergence, crash / stall detection, false positives, steady-state cost."""
    from agentcluster.bench.membership import run_real, run_sim

    logging.getLogger("agentcluster").setLevel(logging.ERROR)
    if mode == "sim":
        result = run_sim(
            nodes or 200, duration=duration, seed=seed, loss=loss, laggy=laggy,
            crashes=crashes, preset=preset or "lan",
        )  # fmt: skip
    elif mode == "real":
        result = run_real(nodes or 10, trials=trials, preset=preset or "local")
    else:
        typer.echo(f"error: --mode must be sim or real, not {mode!r}", err=True)
        raise typer.Exit(2)
    result = {"bench": "membership", "mode": mode, **result}
    _print_result(result, f"bench membership ({mode})", as_json=as_json)
