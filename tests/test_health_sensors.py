"""Health sensors: vitals from a fake source (deltas, fractions), the real psutil source,
event-loop lag under a deliberately blocked loop, application health from a real runtime."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agentcluster.agents import Action, ActionContext, Agent, ErrorPolicy, Reply, Runtime
from agentcluster.health.sensors import (
    AppHealthTracker,
    CpuTimes,
    LoopLagSensor,
    NetCounters,
    PsutilSource,
    VitalsSampler,
    app_health,
)
from agentcluster.signals import Signal
from agentcluster.testing import wait_until

# --------------------------------------------------------------------------- vitals


@dataclass
class FakeSource:
    busy: float = 0.0
    total: float = 0.0
    proc: float = 0.0
    cpus: int = 4
    mem: tuple[int, int] = (4, 16)
    rss: int = 1000
    disk: tuple[int, int] = (30, 100)
    net: NetCounters = field(default_factory=lambda: NetCounters(0, 0, 0, 0, 0, 0))
    fds: int = 10
    limit: int = 1024
    disk_paths: list[str] = field(default_factory=list)

    def cpu_times(self) -> CpuTimes:
        return CpuTimes(self.busy, self.total)

    def cpu_count(self) -> int:
        return self.cpus

    def process_cpu_seconds(self) -> float:
        return self.proc

    def memory(self) -> tuple[int, int]:
        return self.mem

    def process_rss(self) -> int:
        return self.rss

    def disk_usage(self, path: str) -> tuple[int, int]:
        self.disk_paths.append(path)
        return self.disk

    def net_counters(self) -> NetCounters:
        return self.net

    def open_fds(self) -> int:
        return self.fds

    def fd_limit(self) -> int:
        return self.limit


def test_first_sample_has_levels_but_no_rates() -> None:
    src = FakeSource(busy=500.0, total=1000.0, proc=50.0, net=NetCounters(10**6, 10**6, 3, 3, 1, 1))
    v = VitalsSampler(src).sample(100.0)
    # Levels are read at once; rates need a previous sample (never "since boot" averages).
    assert v.interval == 0.0
    assert (v.cpu_system, v.cpu_process, v.net_bytes_in_per_s, v.net_errors) == (0.0, 0.0, 0.0, 0)
    assert v.memory_used == pytest.approx(0.25)
    assert v.disk_used == pytest.approx(0.3)
    assert v.fd_used == pytest.approx(10 / 1024)
    assert (v.memory_total, v.process_rss, v.open_fds, v.fd_limit) == (16, 1000, 10, 1024)


@pytest.mark.parametrize(
    ("busy", "total", "proc", "expected_system", "expected_cores"),
    [
        (30.0, 40.0, 2.0, 0.75, 1.0),  # 30 of 40 CPU-seconds busy; 2 s of CPU in 2 s
        (0.0, 40.0, 0.0, 0.0, 0.0),  # idle host
        (40.0, 40.0, 8.0, 1.0, 4.0),  # saturated: 4 cores of the 4
        (-5.0, 40.0, -1.0, 0.0, 0.0),  # counters went backwards (reset): no usage, not < 0
    ],
)
def test_cpu_fractions_come_from_deltas(
    busy: float, total: float, proc: float, expected_system: float, expected_cores: float
) -> None:
    src = FakeSource(busy=100.0, total=400.0, proc=10.0, cpus=4)
    sampler = VitalsSampler(src)
    sampler.sample(10.0)
    src.busy += busy
    src.total += total
    src.proc += proc
    v = sampler.sample(12.0)
    assert v.interval == pytest.approx(2.0)
    assert v.cpu_system == pytest.approx(expected_system)
    assert v.cpu_process_cores == pytest.approx(expected_cores)
    assert v.cpu_process == pytest.approx(min(1.0, expected_cores / 4))


def test_network_rates_and_error_deltas() -> None:
    src = FakeSource(net=NetCounters(1000, 5000, 1, 2, 3, 4))
    sampler = VitalsSampler(src)
    sampler.sample(0.0)
    src.net = NetCounters(3000, 9000, 2, 4, 3, 10)
    v = sampler.sample(2.0)
    assert v.net_bytes_out_per_s == pytest.approx(1000.0)
    assert v.net_bytes_in_per_s == pytest.approx(2000.0)
    assert v.net_errors == 3  # (2 - 1) + (4 - 2): only the new ones
    assert v.net_drops == 6
    # The next sample only counts what happened since this one.
    v = sampler.sample(3.0)
    assert (v.net_bytes_in_per_s, v.net_errors, v.net_drops) == (0.0, 0, 0)
    # An interface going away makes counters drop: that is no traffic, not negative traffic.
    src.net = NetCounters(0, 0, 0, 0, 0, 0)
    v = sampler.sample(4.0)
    assert (v.net_bytes_in_per_s, v.net_bytes_out_per_s, v.net_errors) == (0.0, 0.0, 0)


def test_fractions_are_clamped_and_unlimited_fds_are_zero() -> None:
    src = FakeSource(mem=(20, 16), disk=(5, 0), fds=50, limit=0)
    v = VitalsSampler(src).sample(0.0)
    assert v.memory_used == 1.0
    assert v.disk_used == 0.0
    assert v.fd_used == 0.0 and v.fd_limit == 0


def test_disk_path_falls_back_to_the_nearest_existing_directory(tmp_path: Path) -> None:
    src = FakeSource()
    v = VitalsSampler(src, disk_path=str(tmp_path / "not" / "yet")).sample(0.0)
    assert src.disk_paths == [str(tmp_path)]
    assert v.disk_path == str(tmp_path)


def test_metrics_names_what_baselines_are_fed() -> None:
    src = FakeSource(busy=0.0, total=0.0)
    sampler = VitalsSampler(src)
    sampler.sample(0.0)
    src.busy, src.total = 10.0, 20.0
    m = sampler.sample(1.0).metrics()
    # Percent: what the anomaly detectors and the exhaustion predictions expect.
    assert m["cpu"] == pytest.approx(50.0)
    assert m["memory"] == pytest.approx(25.0)
    assert m["disk"] == pytest.approx(30.0)
    assert set(m) >= {"cpu", "memory", "disk", "network_in", "network_out", "fds"}


def test_real_psutil_source_reads_this_host(tmp_path: Path) -> None:
    sampler = VitalsSampler(PsutilSource(), disk_path=str(tmp_path))
    sampler.sample(time.monotonic())
    end = time.monotonic() + 0.05
    while time.monotonic() < end:  # burn a little CPU so the process reading is not zero
        sum(range(1000))
    v = sampler.sample(time.monotonic())
    assert v.interval > 0
    for fraction in (v.cpu_system, v.cpu_process, v.memory_used, v.disk_used, v.fd_used):
        assert 0.0 <= fraction <= 1.0
    assert v.cpu_process_cores > 0
    assert v.memory_total > 0 and v.process_rss > 0
    assert v.open_fds > 0 and v.fd_limit >= 0
    assert msgspec.json.decode(msgspec.json.encode(v), type=type(v)) == v


# --------------------------------------------------------------------------- loop lag


async def test_loop_lag_sees_a_blocked_loop() -> None:
    async with LoopLagSensor(interval=0.01) as lag:
        await wait_until(lambda: lag.snapshot().samples >= 3, timeout=5)
        assert lag.snapshot().max < 0.15  # an idle loop is on time
        # Block the loop on purpose with CPU work (a sleep would yield to the loop).
        end = time.monotonic() + 0.25
        while time.monotonic() < end:
            pass
        await wait_until(lambda: lag.snapshot().max >= 0.2, timeout=5)
        snap = lag.snapshot()
        assert snap.p99 >= 0.2  # few samples: the p99 is the block itself
        assert snap.max < 1.0
    assert not lag.running


@pytest.mark.parametrize(
    ("lags", "p99", "maximum"),
    [
        ([], 0.0, 0.0),
        ([0.001], 0.001, 0.001),
        ([0.001] * 99 + [0.5], 0.001, 0.5),  # one outlier in 100 is above the p99
        ([0.001] * 98 + [0.4, 0.5], 0.4, 0.5),
        ([0.002] * 10 + [0.3], 0.3, 0.3),  # short window: the p99 is the worst
    ],
)
def test_loop_lag_percentiles(lags: list[float], p99: float, maximum: float) -> None:
    sensor = LoopLagSensor(interval=0.1, window=100)
    for lag in lags:
        sensor.record(lag)
    snap = sensor.snapshot()
    assert (snap.p99, snap.max, snap.samples) == (p99, maximum, len(lags))


def test_loop_lag_window_keeps_the_recent_samples() -> None:
    sensor = LoopLagSensor(window=3)
    for lag in (0.9, 0.1, 0.1, 0.1):
        sensor.record(lag)
    assert sensor.snapshot().max == 0.1
    with pytest.raises(ValueError):
        LoopLagSensor(interval=0)


# --------------------------------------------------------------------------- application


class WorkParams(msgspec.Struct):
    fail: bool = False
    seconds: float = 0.0


class Work(Action[WorkParams]):
    name = "work"

    async def run(self, params: WorkParams, ctx: ActionContext) -> Reply:
        if params.seconds:
            await ctx.clock.sleep(params.seconds)
        if params.fail:
            raise RuntimeError("failing on purpose")
        return Reply("done")


class Worker(Agent):
    name = "worker"
    actions = (Work,)
    routes = (("test.work", "work"),)


def work(fail: bool = False, seconds: float = 0.0) -> Signal:
    return Signal(type="test.work", data={"fail": fail, "seconds": seconds})


async def cast_all(rt: Runtime, agent: str, signals: list[Signal]) -> None:
    for s in signals:
        await rt.cast(agent, s)


@pytest.mark.virtual_time
async def test_app_health_from_a_runtime_with_an_erroring_agent() -> None:
    async with Runtime("n1", mailbox_size=4) as rt:
        good = await rt.spawn(Worker, id="good")
        bad = await rt.spawn(Worker, id="bad")
        await cast_all(rt, "good", [work() for _ in range(10)])
        await cast_all(rt, "bad", [work(fail=i % 2 == 0) for i in range(10)])
        await wait_until(lambda: good.processed == 10 and bad.processed + bad.errors == 10)
        h = app_health(rt, now=5.0)
        by_id: dict[str, Any] = {a.id: a for a in h.agents}
        assert by_id["good"].error_rate == 0.0
        assert by_id["bad"].error_rate == pytest.approx(0.5)
        assert (by_id["bad"].errors, by_id["bad"].processed) == (5, 5)
        assert (h.processed, h.errors) == (15, 5)
        assert h.error_rate == pytest.approx(5 / 20)
        assert h.down == [] and h.running == 2
        assert by_id["good"].mailbox_size == 4 and by_id["good"].supervised

        # The tracker reports rates over the interval since its previous sample.
        tracker = AppHealthTracker(rt)
        first = tracker.sample(10.0)
        assert first.interval == 0.0 and first.errors == 5
        await cast_all(rt, "bad", [work() for _ in range(4)])
        await wait_until(lambda: bad.processed == 9)
        second = tracker.sample(20.0)
        assert second.interval == pytest.approx(10.0)
        assert (second.processed, second.errors, second.error_rate) == (4, 0, 0.0)

        # A busy agent's queue: one message in progress, three waiting in a mailbox of 4.
        await cast_all(rt, "good", [work(seconds=30.0)] + [work() for _ in range(3)])
        await wait_until(lambda: good.mailbox_depth == 3)
        busy = tracker.sample(21.0)
        assert busy.max_mailbox_fill == pytest.approx(0.75)
        assert busy.fills(0.75) == ["good"] and busy.fills(0.8) == []
        assert busy.mailbox_total == 3


@pytest.mark.virtual_time
async def test_restarts_and_down_agents_come_from_the_supervisor_tree() -> None:
    async with Runtime("n1", max_restarts=10) as rt:
        crashy = await rt.spawn(Worker, id="crashy", error_policy=ErrorPolicy(on_error="stop"))
        tracker = AppHealthTracker(rt)
        await cast_all(rt, "crashy", [work() for _ in range(3)])
        await wait_until(lambda: crashy.processed == 3)
        before = tracker.sample(1.0)
        assert before.restarts == 0 and before.processed == 3
        await rt.cast("crashy", work(fail=True))
        await wait_until(lambda: (s := rt.get("crashy")) is not None and s is not crashy)
        after = tracker.sample(2.0)
        row = next(a for a in after.agents if a.id == "crashy")
        assert row.restarts == 1 and after.new_restarts == 1
        # The new server counts from zero: a reset, not a negative delta.
        assert row.processed == 0 and after.processed == 0 and after.error_rate == 0.0
        assert tracker.sample(3.0).new_restarts == 0

        # A supervised child that is not running is reported as down.
        await rt.supervisor.terminate_child("crashy")
        down = tracker.sample(4.0)
        assert down.down == ["crashy"]
        assert next(a for a in down.agents if a.id == "crashy").running is False


@pytest.mark.virtual_time
async def test_subtree_agents_are_found_with_their_restart_counts() -> None:
    async with Runtime("n1") as rt:
        await rt.start_supervisor("sub", [rt.agent_spec(Worker, id="inner")])
        h = app_health(rt)
        row = next(a for a in h.agents if a.id == "inner")
        assert row.running and row.restarts == 0 and row.supervised
        assert h.down == []
