"""The command line, run as a real process (the way the README runs it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import agentcluster

CLI = [sys.executable, "-m", "agentcluster.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"agentcluster {agentcluster.__version__}"


@pytest.mark.slow
def test_demo_runs_and_stops_cleanly_with_duration() -> None:
    started = time.monotonic()
    out = run("demo", "--duration", "3.5", "--interval", "0.2")
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert 3.0 < elapsed < 30
    assert "app.demo.ping" in out.stdout and "app.demo.pong" in out.stdout
    # The flaky agent crashed on its third beat and the supervisor restarted it.
    assert "runtime.supervisor.child_restarted" in out.stdout
    assert "supervisor restarts: 1" in out.stdout
    assert "stopped cleanly" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_stops_cleanly_on_sigterm() -> None:
    proc = subprocess.Popen(
        [*CLI, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:  # wait until the demo is visibly running
            if "app.demo.pong" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped cleanly" in out


def test_demo_rejects_a_negative_duration() -> None:
    out = run("demo", "--duration", "-1")
    assert out.returncode == 2
    assert "duration" in (out.stderr + out.stdout).lower()


@pytest.mark.slow
def test_bench_runtime_prints_one_json_object() -> None:
    out = run("bench", "runtime", "--json", "--quick", timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in (
        "router_matches_per_s",
        "bus_signals_per_s",
        "agent_call_p50_us",
        "agent_call_p99_us",
        "agents_started_per_s",
        "idle_agent_bytes",
    ):
        assert isinstance(result[key], int | float) and result[key] > 0, key
    assert result["agent_call_p50_us"] <= result["agent_call_p99_us"]


def test_cli_module_entry_point_exists() -> None:
    assert os.path.exists(
        os.path.join(os.path.dirname(agentcluster.__file__), "cli", "__main__.py")
    )


@pytest.mark.slow
def test_up_runs_a_multi_node_cluster_with_chaos_and_leaves_no_orphans() -> None:
    out = run(
        "up", "--nodes", "3", "--duration", "12", "--chaos", "--chaos-every", "3", timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "converged in" in out.stdout
    assert "chaos: kill -9" in out.stdout and "chaos: restarted" in out.stdout
    assert "all nodes stopped cleanly" in out.stdout
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert "agentcluster.cli node run --name n3" not in ps.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ("up", "--nodes", "1", "--agent", "agentcluster.examples.voter"),
        ("up", "--nodes", "1", "--agent", "agentcluster.nowhere:Voter"),
        ("node", "run", "--agent", "agentcluster.examples.voter:Nope"),
    ],
)
def test_a_bad_agent_spec_fails_before_anything_starts(argv: tuple[str, ...]) -> None:
    out = run(*argv, timeout=30)
    assert out.returncode == 2
    assert "error:" in out.stderr and "agent" in out.stderr


def test_node_run_refuses_an_unknown_scheduling_policy() -> None:
    out = run("node", "run", "--sched", "fifo", timeout=30)
    assert out.returncode == 2
    assert "--sched must be batch or normal" in out.stderr


def test_bench_lb_refuses_an_unknown_preset_at_once() -> None:
    out = run("bench", "lb", "--preset", "moon", "--json", timeout=60)
    assert out.returncode == 2
    assert "--preset must be one of lan, wan, local, not 'moon'" in out.stderr
    assert out.stdout == ""


def test_bench_consensus_refuses_etcd_tls_for_raft() -> None:
    out = run("bench", "consensus", "--etcd-tls", "--json", timeout=60)
    assert out.returncode == 2
    assert "--etcd-tls needs --backend etcd" in out.stderr
    assert out.stdout == ""


@pytest.mark.slow
def test_bench_consensus_against_etcd_over_tls_prints_every_key() -> None:
    from test_store_etcd import _ensure_etcd

    _ensure_etcd()
    out = run(
        "bench", "consensus", "--backend", "etcd", "--etcd-tls", "--puts", "50",
        "--clients", "4", "--seconds", "0.5", "--failovers", "1", "--json",
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["backend"] == "etcd" and result["etcd_tls"] is True
    for key in ("put_p50_ms", "put_p99_ms", "puts_per_s", "cas_p99_ms", "failover_p99_ms"):
        assert result[key] > 0, key
    assert result["lost_acknowledged_writes"] == 0
