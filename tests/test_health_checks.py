"""Health checks: the runner (concurrency, timeouts, exceptions, intervals), presets, and the
built-in checks against real nodes (SimCluster and loopback), real runtimes and real files."""

from __future__ import annotations

import asyncio
import datetime
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agentcluster.agents import Action, ActionContext, Agent, Reply, Runtime
from agentcluster.config import NodeConfig
from agentcluster.health.checks import (
    CHECK_PRESETS,
    KINDS,
    PROBE_TYPE,
    ApplicationCheck,
    BasicCheck,
    Check,
    CheckContext,
    CheckResult,
    CheckRunner,
    ConnectivityCheck,
    DeepCheck,
    NetworkCheck,
    NodeLike,
    PredictiveCheck,
    ResourcesCheck,
    SecurityCheck,
    ServiceCheck,
    basic_check,
    check_preset,
    standard_checks,
    worst,
)
from agentcluster.health.predict import Prediction
from agentcluster.health.sensors import AppHealth, LoopLagSensor, Vitals
from agentcluster.node import Node
from agentcluster.signals import Signal
from agentcluster.testing import wait_until
from agentcluster.testing.simcluster import SimCluster
from agentcluster.transport.memory import LinkConfig
from agentcluster.wire import Keyring

# --------------------------------------------------------------------------- runner


class Sleepy(Check):
    """Sleeps ``seconds`` (or raises ``error``) and passes; records when it ran."""

    kind = "comprehensive"

    def __init__(
        self, name: str, seconds: float, error: Exception | None = None, **timing: Any
    ) -> None:
        super().__init__(name, **timing)
        self.seconds = seconds
        self.error = error
        self.started: list[float] = []

    async def run(self, ctx: CheckContext) -> CheckResult:
        self.started.append(ctx.now)
        await ctx.clock.sleep(self.seconds)
        if self.error is not None:
            raise self.error
        return self.result("pass", "slept", {"seconds": self.seconds})


@pytest.mark.virtual_time
async def test_checks_run_concurrently() -> None:
    loop = asyncio.get_running_loop()
    a = Sleepy("a", 5.0, timeout=30.0)
    b = Sleepy("b", 4.0, timeout=30.0)
    runner = CheckRunner([a, b])
    t0 = loop.time()
    results = await runner.run_once()
    # Together they take as long as the slowest, not the sum.
    assert loop.time() - t0 == pytest.approx(5.0)
    assert [(r.name, r.status) for r in results] == [("a", "pass"), ("b", "pass")]
    assert [r.latency for r in results] == [pytest.approx(5.0), pytest.approx(4.0)]
    assert results[0].at == t0 and results[0].kind == "comprehensive"
    assert runner.latest["b"].data == {"seconds": 4.0}


@pytest.mark.virtual_time
async def test_a_timed_out_check_fails_and_the_others_do_not_wait_for_it() -> None:
    loop = asyncio.get_running_loop()
    stuck = Sleepy("stuck", 1000.0, timeout=2.5)
    quick = Sleepy("quick", 1.0, timeout=5.0)
    t0 = loop.time()
    results = await CheckRunner([stuck, quick]).run_once()
    assert loop.time() - t0 == pytest.approx(2.5)
    by_name = {r.name: r for r in results}
    assert by_name["stuck"].status == "fail"
    assert by_name["stuck"].detail == "timed out after 2.5s"
    assert by_name["stuck"].latency == pytest.approx(2.5)
    assert by_name["quick"].status == "pass"


class Swallower(Check):
    """Ignores cancellation (a badly written check): still reported as timed out."""

    kind = "deep"

    async def run(self, ctx: CheckContext) -> CheckResult:
        try:
            await ctx.clock.sleep(100.0)
        except asyncio.CancelledError:
            pass
        return self.result("pass")


@pytest.mark.virtual_time
async def test_a_check_that_swallows_its_cancellation_still_times_out() -> None:
    (result,) = await CheckRunner([Swallower("swallow", timeout=1.0)]).run_once()
    assert (result.status, result.detail) == ("fail", "timed out after 1s")
    # The runner's task is not left marked as cancelling.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@pytest.mark.virtual_time
async def test_an_exception_is_a_failure_not_a_crash() -> None:
    seen: list[CheckResult] = []
    boom = Sleepy("boom", 0.5, error=ValueError("broken on purpose"), interval=2.0, timeout=1.0)

    def on_result(r: CheckResult) -> None:
        seen.append(r)
        raise RuntimeError("a broken result handler is logged, not fatal")

    async with CheckRunner([boom], on_result=on_result):
        await wait_until(lambda: len(seen) >= 3, timeout=10)
    assert all(r.status == "fail" for r in seen)
    assert seen[0].detail == "ValueError: broken on purpose"
    assert boom.started[:3] == [0.0, 2.0, 4.0]  # it kept running on schedule


@pytest.mark.virtual_time
async def test_each_check_runs_on_its_own_interval_without_overlapping() -> None:
    fast = Sleepy("fast", 0.1, interval=3.0, timeout=1.0)
    slow = Sleepy("slow", 0.1, interval=5.0, timeout=1.0)
    # Takes longer than its interval: the next run starts when it ends, never two at once.
    long = Sleepy("long", 2.5, interval=1.0, timeout=10.0)
    runner = CheckRunner([fast, slow, long])
    async with runner:
        await asyncio.sleep(15.05)  # virtual time: to just past t=15 (noqa: sleep)
    assert fast.started == pytest.approx([0.0, 3.0, 6.0, 9.0, 12.0, 15.0])
    assert slow.started == pytest.approx([0.0, 5.0, 10.0, 15.0])
    assert long.started == pytest.approx([0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0])
    assert runner.due(1000.0) == ["fast", "slow", "long"]


@pytest.mark.virtual_time
async def test_checks_added_later_and_removed_and_stop_cancels_running_ones() -> None:
    runner = CheckRunner()
    late = Sleepy("late", 0.0, interval=1.0, timeout=1.0)
    forever = Sleepy("forever", 10_000.0, interval=1.0, timeout=20_000.0)
    async with runner:
        await asyncio.sleep(5.0)  # virtual time: to t=5 exactly (noqa: sleep)
        runner.add(late)
        runner.add(forever)
        await asyncio.sleep(2.5)  # virtual time: to t=7.5 (noqa: sleep)
        assert late.started == [5.0, 6.0, 7.0]
        with pytest.raises(ValueError, match="already registered"):
            runner.add(Sleepy("late", 0.0))
        runner.remove("late")
        await asyncio.sleep(3.0)  # virtual time: to t=10.5 (noqa: sleep)
        assert late.started == [5.0, 6.0, 7.0]
    # stop() cancelled and awaited the run still in progress: nothing left behind.
    assert "forever" not in runner.latest
    assert [c.name for c in runner.checks] == ["forever"]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("check:")]


def test_presets() -> None:
    design = check_preset("design")
    # The design's defaults, as written.
    assert design["basic"][0] == 30.0
    assert design["comprehensive"][0] == 300.0
    assert design["predictive"][0] == 600.0
    assert design["deep"][0] == 300.0
    for kind in KINDS:
        lan, local = check_preset("lan")[kind], check_preset("local")[kind]
        assert local[0] <= lan[0] < design[kind][0]
        for interval, timeout in (design[kind], lan, local):
            assert 0 < timeout <= interval
    assert check_preset("lan")["basic"] == (1.0, 0.5)
    check_preset("lan")["basic"] = (9.0, 9.0)  # a copy: the table stays as it is
    assert CHECK_PRESETS["lan"]["basic"] == (1.0, 0.5)
    with pytest.raises(ValueError, match="unknown check preset"):
        check_preset("fast")
    assert (Sleepy("x", 0).interval, Sleepy("x", 0, preset="design").interval) == (30.0, 300.0)
    assert Sleepy("x", 0, preset="local", timeout=0.3).timeout == 0.3
    with pytest.raises(ValueError):
        Sleepy("x", 0, interval=0.0)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [([], "pass"), (["pass", "pass"], "pass"), (["warn", "pass"], "warn"),
     (["pass", "fail", "warn"], "fail")],
)  # fmt: skip
def test_worst(statuses: list[Any], expected: str) -> None:
    assert worst(statuses) == expected


# --------------------------------------------------------------------------- basic


@pytest.mark.virtual_time
async def test_basic_check_in_a_sim_cluster() -> None:
    async with SimCluster(3, seed=11) as c:
        await c.wait_until(c.converged, timeout=30)
        n1 = c.nodes["n1"]
        check = basic_check(n1, "n2", preset="lan")
        runner = CheckRunner([check, basic_check(n1, "nobody")])
        # Every run sends a freshly sealed frame: none of them is dropped as a replay.
        for _ in range(5):
            ok, unknown = await runner.run_once()
            assert ok.status == "pass", ok.detail
            assert ok.data["rtt_ms"] > 0 and ok.kind == "basic" and ok.name == "basic:n2"
            assert (unknown.status, unknown.detail) == ("fail", "nobody is not a member")
        assert c.nodes["n2"].stream_codec.drops.as_dict()["replayed"] == 0
        # A slow link shows in the RTT, above the warning threshold.
        c.set_link("n1", "n3", LinkConfig(delay=0.02))
        c.set_link("n3", "n1", LinkConfig(delay=0.02))
        (slow,) = await CheckRunner([basic_check(n1, "n3", rtt_warn=0.03)]).run_once()
        assert slow.status == "warn" and slow.data["rtt_ms"] == pytest.approx(40.0, abs=1.0)
        # A stalled peer (alive, its loop blocked) does not answer within the budget.
        c.stall("n2", 5.0)
        (stalled,) = await CheckRunner([basic_check(n1, "n2", timeout=0.5)]).run_once()
        assert (stalled.status, stalled.detail) == ("fail", "no reply from n2 within 0.45s")
        # A crashed peer is still a member for a while, but it does not answer.
        await c.crash("n3")
        (gone,) = await CheckRunner([basic_check(n1, "n3")]).run_once()
        assert gone.status == "fail" and "n3" in gone.detail


async def test_basic_check_over_loopback_between_two_real_nodes() -> None:
    key = Keyring.generate()
    cfg = NodeConfig(name="a", bind="127.0.0.1:0", preset="local")
    async with Node(cfg, keyring=key) as a:
        cfg_b = NodeConfig(name="b", bind="127.0.0.1:0", preset="local", seeds=[a.addr])
        async with Node(cfg_b, keyring=key) as b:
            await wait_until(lambda: a.core.member("b") is not None, timeout=10)
            check = basic_check(a, "b", preset="local")
            runner = CheckRunner([check], clock=a.clock)
            rtts = []
            for _ in range(50):
                (r,) = await runner.run_once()
                assert r.status == "pass", r.detail
                rtts.append(r.data["rtt_ms"])
            assert min(rtts) > 0
            assert b.stream_codec.drops.total == 0
        # b is gone: connection refused is a clear failure, well within the timeout.
        (r,) = await runner.run_once()
        assert r.status == "fail" and r.latency < check.timeout


# --------------------------------------------------------------------------- comprehensive


@pytest.mark.virtual_time
async def test_connectivity_and_network_checks_in_a_sim_cluster() -> None:
    async with SimCluster(4, seed=5) as c:
        await c.wait_until(c.converged, timeout=30)
        n1 = c.nodes["n1"]
        conn, net = ConnectivityCheck(n1), NetworkCheck(n1, pings=4)
        runner = CheckRunner([conn, net])
        ok_conn, ok_net = await runner.run_once()
        assert ok_conn.status == "pass" and ok_conn.data["fraction"] == 1.0
        assert ok_conn.data["probed"] == 3
        assert ok_net.status == "pass" and ok_net.data["loss"] == 0.0
        assert ok_net.data["sent"] == 12 and ok_net.data["rtt_p99_ms"] < 5.0
        # n1 cannot reach n4, but n4 stays alive (others vouch for it through indirect probes).
        c.partition(["n1"], ["n4"])
        bad_conn, bad_net = await runner.run_once()
        assert bad_conn.status == "warn"
        assert bad_conn.data["unreachable"] == ["n4"]
        assert bad_conn.data["fraction"] == pytest.approx(2 / 3, abs=1e-3)
        assert bad_net.status == "fail"  # a third of the pings lost
        assert bad_net.data["per_peer_loss"] == {"n2": 0.0, "n3": 0.0, "n4": 1.0}
        # Most peers unreachable: a failure.
        c.heal()
        c.partition(["n1"], ["n2", "n3", "n4"])
        worst_conn, _ = await runner.run_once()
        assert worst_conn.status == "fail" and worst_conn.data["fraction"] == 0.0


@pytest.mark.virtual_time
async def test_network_check_flags_slow_links() -> None:
    async with SimCluster(3, seed=2) as c:
        await c.wait_until(c.converged, timeout=30)
        for a, b in (("n1", "n2"), ("n2", "n1")):
            c.set_link(a, b, LinkConfig(delay=0.04))
        (r,) = await CheckRunner([NetworkCheck(c.nodes["n1"], pings=3)]).run_once()
        assert r.status == "warn" and "RTT p99" in r.detail
        assert r.data["rtt_p99_ms"] == pytest.approx(80.0, abs=2.0)
        assert r.data["rtt_p50_ms"] < 5.0


def test_peer_window_rotates_over_a_large_cluster() -> None:
    members = [SimpleNamespace(name=f"p{i:02d}", state="alive") for i in range(10)]
    members.append(SimpleNamespace(name="dead", state="dead"))
    node = SimpleNamespace(name="p00", core=SimpleNamespace(members=lambda: members))
    check = ConnectivityCheck(cast(NodeLike, node), max_peers=4)
    picks = [check.pinger.peers() for _ in range(3)]
    assert picks[0] == (["p01", "p02", "p03", "p04"], 9)
    assert picks[1] == (["p05", "p06", "p07", "p08"], 9)
    assert picks[2] == (["p09", "p01", "p02", "p03"], 9)


def app(**overrides: Any) -> AppHealth:
    base: dict[str, Any] = dict(
        at=0.0, interval=30.0, agents=[], running=3, down=[], mailbox_total=0,
        max_mailbox_fill=0.0, processed=100, errors=0, error_rate=0.0, restarts=0,
        new_restarts=0,
    )  # fmt: skip
    base.update(overrides)
    return AppHealth(**base)


def agent_row(id: str, mailbox: int, size: int) -> Any:
    from agentcluster.health.sensors import AgentHealth

    return AgentHealth(
        id=id, name="w", running=True, mailbox=mailbox, mailbox_size=size, processed=0,
        errors=0, restarts=0, supervised=True, error_rate=0.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("health", "status", "words"),
    [
        (app(), "pass", "3 agents running"),
        (app(down=["x"]), "fail", "agents down: x"),
        (app(processed=90, errors=10, error_rate=0.1), "warn", "error rate 10.0%"),
        (app(processed=60, errors=40, error_rate=0.4), "fail", "error rate 40.0%"),
        # Too few messages for a rate to mean anything.
        (app(processed=1, errors=2, error_rate=0.67), "pass", "3 agents running"),
        (app(agents=[agent_row("q", 9, 10)]), "warn", "mailboxes over 80%: q"),
        (app(agents=[agent_row("q", 10, 10)]), "fail", "full mailboxes: q"),
        (app(new_restarts=2, restarts=2), "warn", "2 agent restarts"),
    ],
)
async def test_application_check(health: AppHealth, status: str, words: str) -> None:
    (r,) = await CheckRunner([ApplicationCheck(lambda now: health)]).run_once()
    assert r.status == status
    assert words in r.detail


def vitals(**overrides: Any) -> Vitals:
    base: dict[str, Any] = dict(
        at=0.0, interval=1.0, cpu_system=0.2, cpu_process=0.05, cpu_process_cores=0.2,
        cpu_count=4, memory_used=0.5, memory_total=1 << 30, process_rss=1 << 26,
        disk_used=0.4, disk_path="/", net_bytes_in_per_s=0.0, net_bytes_out_per_s=0.0,
        net_errors=0, net_drops=0, open_fds=100, fd_limit=1024, fd_used=100 / 1024,
    )  # fmt: skip
    base.update(overrides)
    return Vitals(**base)


@pytest.mark.parametrize(
    ("v", "status", "words"),
    [
        (vitals(), "pass", "resources within thresholds"),
        (vitals(cpu_system=0.9), "warn", "cpu 90%"),
        (vitals(cpu_system=0.99), "fail", "cpu 99%"),
        (vitals(cpu_system=0.99, interval=0.0), "pass", "within"),  # no CPU reading yet
        (vitals(memory_used=0.96), "fail", "memory 96%"),
        (vitals(disk_used=0.9), "warn", "disk 90%"),
        (vitals(fd_used=0.85), "warn", "fds 85%"),
        (vitals(fd_used=0.99, fd_limit=0), "pass", "within"),  # unlimited
        (vitals(cpu_system=0.9, disk_used=0.97), "fail", "cpu 90%; disk 97%"),
    ],
)
async def test_resources_check(v: Vitals, status: str, words: str) -> None:
    (r,) = await CheckRunner([ResourcesCheck(lambda now: v)]).run_once()
    assert r.status == status
    assert words in r.detail


async def test_resources_check_reads_the_loop_lag() -> None:
    lag = LoopLagSensor()
    check = ResourcesCheck(lambda now: vitals(), loop_lag=lag)
    lag.record(0.2)
    (r,) = await CheckRunner([check]).run_once()
    assert r.status == "warn" and r.data["loop_lag_p99_ms"] == 200.0
    lag.record(1.5)
    (r,) = await CheckRunner([check]).run_once()
    assert r.status == "fail" and "event-loop lag" in r.detail
    (r,) = await CheckRunner([ResourcesCheck(lambda now: None)]).run_once()
    assert r.status == "pass" and r.detail == "no vitals yet"


@pytest.mark.virtual_time
async def test_service_check_reads_the_store_and_the_registry() -> None:
    async with SimCluster(3, seed=4, store_voters=3) as c:
        await c.wait_until(c.converged, timeout=30)
        n1 = c.nodes["n1"]
        await c.wait_until(lambda: len(n1.registry.index) > 0, timeout=30)
        (r,) = await CheckRunner([ServiceCheck(n1, timeout=5.0)]).run_once()
        assert r.status == "pass", r.detail
        assert r.data["store"] is True and r.data["store_read_ms"] >= 0
        assert r.data["registry_entries"] >= 1
        # Without a quorum the read cannot be answered: a failure within the budget, and the
        # registry is still reported.
        await c.crash("n2")
        await c.crash("n3")
        (r,) = await CheckRunner([ServiceCheck(n1, timeout=5.0)]).run_once()
        assert r.status == "fail" and "store" in r.detail
        assert r.latency < 5.0 and r.data["registry_entries"] >= 1


async def test_service_check_without_a_store_and_with_an_empty_registry() -> None:
    node = SimpleNamespace(store_host=None, registry=SimpleNamespace(index=[]))
    (r,) = await CheckRunner([ServiceCheck(cast(NodeLike, node))]).run_once()
    assert r.status == "warn" and r.detail == "the agent registry is empty"
    assert r.data == {"store": False, "registry_entries": 0}


# --------------------------------------------------------------------------- security


def make_cert(path: Path, *, not_before_days: float, not_after_days: float) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=not_before_days))
        .not_valid_after(now + datetime.timedelta(days=not_after_days))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def fake_node(keyring: Keyring | None, key_file: str = "") -> NodeLike:
    return cast(NodeLike, SimpleNamespace(keyring=keyring, config=NodeConfig(key_file=key_file)))


@pytest.mark.parametrize(
    ("key_age_days", "cert", "status", "words"),
    [
        (1, None, "pass", "no security finding"),
        (200, None, "warn", "key file is 200 days old: rotate the cluster key"),
        (1, (-1, 365), "pass", "no security finding"),
        (1, (-300, 10), "warn", "expires in 10.0 days"),
        (1, (-300, -3), "fail", "expired 3 days ago"),
        (1, (2, 300), "fail", "is not valid yet"),
        (200, (-300, -3), "fail", "days old: rotate the cluster key; TLS certificate"),
    ],
)
async def test_security_check_key_age_and_certificates(
    tmp_path: Path, key_age_days: int, cert: tuple[int, int] | None, status: str, words: str
) -> None:
    key_file = tmp_path / "cluster.key"
    Keyring.generate().to_file(key_file)
    old = time.time() - key_age_days * 86400 - 60
    os.utime(key_file, (old, old))
    cert_path = None
    if cert is not None:
        cert_path = str(tmp_path / "node.pem")
        make_cert(Path(cert_path), not_before_days=cert[0], not_after_days=cert[1])
    check = SecurityCheck(
        fake_node(Keyring.from_file(key_file), str(key_file)), cert_path=cert_path
    )
    (r,) = await CheckRunner([check]).run_once()
    assert r.status == status, r.detail
    assert words in r.detail
    assert r.data["key_age_days"] == pytest.approx(key_age_days, abs=0.01)


async def test_security_check_bad_certificate_and_missing_key_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    node = fake_node(Keyring.generate(), str(tmp_path / "gone.key"))
    (r,) = await CheckRunner([SecurityCheck(node, cert_path=str(junk))]).run_once()
    assert r.status == "fail"
    assert "cannot stat key file" in r.detail and "cannot read TLS certificate" in r.detail


async def test_a_real_node_without_a_keyring_fails_the_security_check() -> None:
    async with Node(NodeConfig(name="open", bind="127.0.0.1:0", preset="local")) as node:
        (r,) = await CheckRunner([SecurityCheck(node)]).run_once()
    assert r.status == "fail"
    assert "anyone who can reach this port can control the node" in r.detail


# --------------------------------------------------------------------------- deep


class SlowParams(msgspec.Struct):
    seconds: float = 0.0


class Slow(Action[SlowParams]):
    name = "slow"

    async def run(self, params: SlowParams, ctx: ActionContext) -> Reply:
        await ctx.clock.sleep(params.seconds)
        return Reply("ok")


class Pong(Action[msgspec.Struct]):
    name = "pong"

    def run(self, params: Any, ctx: ActionContext) -> Reply:
        return Reply("pong")


class Probed(Agent):
    name = "probed"
    actions = (Pong,)
    routes = ((PROBE_TYPE, "pong"),)


class Plain(Agent):
    name = "plain"
    actions = (Slow,)
    routes = (("test.slow", "slow"),)


class CatchAll(Agent):
    """Routes everything: must not be sent probes (they would run its action)."""

    name = "catch_all"
    actions = (Slow,)
    routes = (("**", "slow"),)


def slow(seconds: float) -> Signal:
    return Signal(type="test.slow", data={"seconds": seconds})


@pytest.mark.virtual_time
async def test_deep_check_probes_every_agent() -> None:
    async with Runtime("n1") as rt:
        probed = await rt.spawn(Probed)
        await rt.spawn(Plain, id="idle")
        await rt.spawn(Plain, id="stuck")
        await rt.spawn(Plain, id="busy")
        await rt.spawn(Plain, id="flowing")
        catch_all = await rt.spawn(CatchAll)
        await rt.cast("stuck", slow(100.0))
        await rt.cast("stuck", slow(0.0))  # queued behind a 100 s action
        await rt.cast("busy", slow(100.0))  # busy, nothing queued
        for _ in range(5):  # a queue that drains: 0.2 s per message
            await rt.cast("flowing", slow(0.2))
        check = DeepCheck(rt, probe_timeout=1.0, timeout=5.0)
        (r,) = await CheckRunner([check]).run_once()
        agents = r.data["agents"]
        assert agents["probed"]["status"] == "pass"
        assert agents["probed"]["detail"] == "answered the probe"
        assert probed.processed == 1  # the probe went through its mailbox
        assert agents["idle"] == {"status": "pass", "detail": "idle", "ms": 0.0}
        assert agents["flowing"]["status"] == "pass"
        assert agents["flowing"]["detail"] == "making progress"
        assert agents["stuck"]["status"] == "fail"
        assert agents["stuck"]["detail"] == "no progress in 1s with 1 queued"
        assert agents["busy"]["status"] == "warn"
        assert agents["catch_all"]["detail"] == "idle"
        assert catch_all.processed == 0 and catch_all.errors == 0
        assert r.status == "fail" and r.latency == pytest.approx(1.0)
        assert "stuck: no progress" in r.detail and "busy: busy on one message" in r.detail


@pytest.mark.virtual_time
async def test_deep_check_fails_an_agent_that_does_not_answer_its_probe() -> None:
    class SlowProbe(Agent):
        name = "slow_probe"
        actions = (Slow,)
        routes = ((PROBE_TYPE, "slow"),)

    async with Runtime("n1") as rt:
        await rt.spawn(SlowProbe)
        await rt.cast("slow_probe", Signal(type=PROBE_TYPE, data={"seconds": 50.0}))
        (r,) = await CheckRunner([DeepCheck(rt, probe_timeout=0.5)]).run_once()
        assert r.status == "fail" and "CallTimeout" in r.detail


# --------------------------------------------------------------------------- predictive


def prediction(kind: Any, metric: str, eta: float, confidence: float) -> Prediction:
    return Prediction(
        kind=kind, metric=metric, eta_seconds=eta, confidence=confidence, detail="",
        threshold=100.0, rate=0.1,
    )  # fmt: skip


def fake_predictor(predictions: list[Prediction]) -> Any:
    def predict(history: Mapping[str, Sequence[tuple[float, float]]]) -> list[Prediction]:
        assert all(len(v) >= 10 for v in history.values())
        return predictions

    return predict


SERIES = {"memory": [(float(t), 50.0 + t) for t in range(20)]}


@pytest.mark.parametrize(
    ("predictions", "status", "words"),
    [
        ([], "pass", "0 predictions"),
        ([prediction("resource_exhaustion", "memory", 300.0, 0.9)], "fail",
         "resource_exhaustion of memory in 300s (90% sure)"),
        ([prediction("resource_exhaustion", "disk", 1800.0, 0.9)], "warn", "disk in 1800s"),
        ([prediction("failure", "error_rate", 7200.0, 0.9)], "pass", "1 predictions"),
        ([prediction("failure", "error_rate", 60.0, 0.3)], "pass", "none within"),
    ],
)  # fmt: skip
async def test_predictive_check(predictions: list[Prediction], status: str, words: str) -> None:
    check = PredictiveCheck(lambda: SERIES, predictor=fake_predictor(predictions))
    (r,) = await CheckRunner([check]).run_once()
    assert r.status == status and words in r.detail
    assert [p["metric"] for p in r.data["predictions"]] == [p.metric for p in predictions]


async def test_predictive_check_combines_confidences_with_the_design_rule() -> None:
    preds = [prediction("failure", "error_rate", 7200.0, c) for c in (0.9, 0.5)]
    check = PredictiveCheck(lambda: SERIES, predictor=fake_predictor(preds))
    (r,) = await CheckRunner([check]).run_once()
    # mean 0.7, population variance 0.04: 0.7 - 0.02.
    assert r.data["combined_confidence"] == pytest.approx(0.68)


async def test_predictive_check_needs_ten_samples() -> None:
    short = {"memory": SERIES["memory"][:9]}
    check = PredictiveCheck(lambda: short, predictor=fake_predictor([]))
    (r,) = await CheckRunner([check]).run_once()
    assert r.status == "pass" and "not enough history" in r.detail


@pytest.mark.parametrize(
    ("rate", "status"),
    [(0.02, "warn"), (0.1, "fail"), (0.0, "pass")],
)
async def test_predictive_check_on_a_leaking_memory_series(rate: float, status: str) -> None:
    # Memory in percent, sampled every 5 s for 5 minutes from 60 %, leaking ``rate`` points
    # per second, with a little deterministic noise.
    noise = [0.3, -0.2, 0.1, -0.3, 0.2, 0.0]
    leak = {
        "memory": [
            (float(t), 60.0 + rate * t + noise[i % 6]) for i, t in enumerate(range(0, 300, 5))
        ]
    }
    (r,) = await CheckRunner([PredictiveCheck(lambda: leak)]).run_once()
    assert r.status == status, r.detail
    rows = r.data["predictions"]
    if rate == 0.0:  # flat: nothing to predict
        assert rows == [] and r.data["combined_confidence"] == 0.0
        return
    (row,) = rows
    assert row["kind"] == "resource_exhaustion" and row["metric"] == "memory"
    truth = (100.0 - 60.0 - rate * 295) / rate  # seconds from the last sample to 100 %
    assert row["eta_seconds"] == pytest.approx(truth, rel=0.05)
    assert row["confidence"] > 0.8
    assert r.data["combined_confidence"] == pytest.approx(row["confidence"], abs=1e-4)


# --------------------------------------------------------------------------- the full set


@pytest.mark.virtual_time
async def test_standard_checks_on_a_sim_node() -> None:
    async with SimCluster(3, seed=9) as c:
        await c.wait_until(c.converged, timeout=30)
        n1 = c.nodes["n1"]
        checks = standard_checks(n1, preset="lan", peers=["n2", "n3"])
        assert [type(k) for k in checks[:2]] == [BasicCheck, BasicCheck]
        results = await CheckRunner(checks).run_once()
        by_name = {r.name: r for r in results}
        assert set(by_name) == {
            "basic:n2", "basic:n3", "connectivity", "network", "services", "security", "agents",
        }  # fmt: skip
        assert all(r.status == "pass" for r in results), [
            (r.name, r.detail) for r in results if r.status != "pass"
        ]
