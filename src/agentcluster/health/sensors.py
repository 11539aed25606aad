"""Health sensors: node vitals, event-loop lag and application health.

Theory of operation: three independent readers, each cheap enough to run every second.

* :class:`VitalsSampler` reads the host and the process through a :class:`VitalsSource`
  (:class:`PsutilSource` in production, a fake in tests) and turns cumulative counters into
  rates: CPU busy fractions come from ``cpu_times`` deltas between two samples, network
  throughput and error counts from ``net_io_counters`` deltas. Computing the deltas here,
  instead of calling ``psutil.cpu_percent(None)``, keeps this sampler independent of every other
  caller of psutil's process-wide "since the last call" state (the load balancer's load report
  uses it). The first sample has no previous one: its ``interval`` is 0 and its rates are 0.
  A counter that goes backwards (an interface removed, a wrap) counts as no traffic.
* :class:`LoopLagSensor` owns one task that sleeps ``interval`` on the node's clock and
  records how late it woke up: on a healthy loop that is a fraction of a millisecond, on a
  loop blocked by a CPU-bound callback it is the length of the block. The next wake-up is
  scheduled from when the task actually ran, so one long block gives one large sample, not a
  burst of catch-up ticks. The last ``window`` samples give the recent max and p99.
* :class:`AppHealthTracker` reads the agent runtime: every agent's running state, mailbox
  depth and size, processed and error counters, and restart counts from the supervisor tree
  (supervised children that are not running are reported as down). Error rates are computed
  from the counters' deltas since the previous sample (an agent restarted by its supervisor
  starts its counters from zero again; that is treated as a reset, not a negative rate).
  :func:`app_health` is the stateless form: rates over each agent's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections import deque
from typing import NamedTuple, Protocol

import msgspec
import psutil

from agentcluster.agents import Runtime
from agentcluster.agents.supervisor import ChildInfo, Supervisor
from agentcluster.clock import Clock, MonotonicClock

__all__ = [
    "AgentHealth",
    "AppHealth",
    "AppHealthTracker",
    "CpuTimes",
    "LoopLag",
    "LoopLagSensor",
    "NetCounters",
    "PsutilSource",
    "Vitals",
    "VitalsSampler",
    "VitalsSource",
    "app_health",
]


# --------------------------------------------------------------------------- vitals


class CpuTimes(NamedTuple):
    """Cumulative CPU seconds of the whole host: busy and total (busy + idle)."""

    busy: float
    total: float


class NetCounters(NamedTuple):
    """Cumulative network counters of the host (all interfaces)."""

    bytes_sent: int
    bytes_recv: int
    errin: int
    errout: int
    dropin: int
    dropout: int


class VitalsSource(Protocol):
    """What :class:`VitalsSampler` reads; psutil-shaped, narrowed to what a sample needs."""

    def cpu_times(self) -> CpuTimes: ...

    def cpu_count(self) -> int: ...

    def process_cpu_seconds(self) -> float: ...

    def memory(self) -> tuple[int, int]:
        """(used, total) bytes, where used = total - available."""
        ...

    def process_rss(self) -> int: ...

    def disk_usage(self, path: str) -> tuple[int, int]:
        """(used, capacity) bytes of the filesystem holding ``path``."""
        ...

    def net_counters(self) -> NetCounters: ...

    def open_fds(self) -> int: ...

    def fd_limit(self) -> int:
        """The soft limit on open file descriptors; 0 when unlimited or unknown."""
        ...


class PsutilSource:
    """The real host, through psutil (and ``resource`` for the descriptor limit)."""

    def __init__(self, pid: int | None = None) -> None:
        self._proc = psutil.Process(pid)
        self._cpus = psutil.cpu_count() or 1

    def cpu_times(self) -> CpuTimes:
        t = psutil.cpu_times()
        values = t._asdict()
        # On Linux guest time is already inside user/nice: counting it again would inflate
        # the total (psutil's own cpu_percent subtracts it the same way).
        total = sum(values.values()) - values.get("guest", 0.0) - values.get("guest_nice", 0.0)
        idle = values.get("idle", 0.0) + values.get("iowait", 0.0)
        return CpuTimes(busy=total - idle, total=total)

    def cpu_count(self) -> int:
        return self._cpus

    def process_cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def memory(self) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return int(vm.total - vm.available), int(vm.total)

    def process_rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def disk_usage(self, path: str) -> tuple[int, int]:
        du = psutil.disk_usage(path)
        # used / (used + free) is what df reports: blocks reserved for root are not usable.
        return int(du.used), int(du.used + du.free)

    def net_counters(self) -> NetCounters:
        n = psutil.net_io_counters()
        if n is None:  # a host without network interfaces
            return NetCounters(0, 0, 0, 0, 0, 0)
        return NetCounters(n.bytes_sent, n.bytes_recv, n.errin, n.errout, n.dropin, n.dropout)

    def open_fds(self) -> int:
        try:
            return int(self._proc.num_fds())
        except (AttributeError, psutil.Error):
            return 0

    def fd_limit(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return 0 if soft == resource.RLIM_INFINITY else int(soft)


class Vitals(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of the host and this process. Fractions are in [0, 1]."""

    at: float
    # Seconds the rates cover (0 on the sampler's first sample: no rates yet).
    interval: float
    cpu_system: float
    # This process as a fraction of the whole host, and in cores (1.0 = one core saturated).
    cpu_process: float
    cpu_process_cores: float
    cpu_count: int
    memory_used: float
    memory_total: int
    process_rss: int
    disk_used: float
    disk_path: str
    net_bytes_in_per_s: float
    net_bytes_out_per_s: float
    # Errors and drops on all interfaces since the previous sample.
    net_errors: int
    net_drops: int
    open_fds: int
    fd_limit: int
    fd_used: float

    def metrics(self) -> dict[str, float]:
        """The readings as named metrics, for baselines and predictions: shares in percent
        (the anomaly detectors' floors and the exhaustion rules' limit of 100 are in points),
        rates per second."""
        return {
            "cpu": 100.0 * self.cpu_system,
            "cpu_process": 100.0 * self.cpu_process,
            "memory": 100.0 * self.memory_used,
            "process_rss": float(self.process_rss),
            "disk": 100.0 * self.disk_used,
            "network_in": self.net_bytes_in_per_s,
            "network_out": self.net_bytes_out_per_s,
            "network_errors": float(self.net_errors),
            "fds": 100.0 * self.fd_used,
        }


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (a data dir may not exist yet)."""
    p = os.path.abspath(path or "/")
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else 0.0


def _fraction(num: float, den: float) -> float:
    if den <= 0:
        return 0.0
    return min(1.0, max(0.0, num / den))


class VitalsSampler:
    """``sample(now) -> Vitals``; rates are over the time since the previous sample."""

    def __init__(self, source: VitalsSource | None = None, *, disk_path: str = "/") -> None:
        self.source: VitalsSource = source if source is not None else PsutilSource()
        self.disk_path = disk_path or "/"
        self._prev_at: float | None = None
        self._prev_cpu = CpuTimes(0.0, 0.0)
        self._prev_proc = 0.0
        self._prev_net = NetCounters(0, 0, 0, 0, 0, 0)
        self.samples = 0

    def sample(self, now: float) -> Vitals:
        src = self.source
        cpu = src.cpu_times()
        proc = src.process_cpu_seconds()
        net = src.net_counters()
        cpus = max(1, src.cpu_count())
        mem_used, mem_total = src.memory()
        path = _existing(self.disk_path)
        disk_used, disk_cap = src.disk_usage(path)
        fds = src.open_fds()
        limit = src.fd_limit()
        prev_at = self._prev_at
        interval = 0.0 if prev_at is None else max(0.0, now - prev_at)
        if interval > 0:
            pc, pn = self._prev_cpu, self._prev_net
            cpu_system = _fraction(_delta(cpu.busy, pc.busy), _delta(cpu.total, pc.total))
            cores = _delta(proc, self._prev_proc) / interval
            bytes_in = _delta(net.bytes_recv, pn.bytes_recv) / interval
            bytes_out = _delta(net.bytes_sent, pn.bytes_sent) / interval
            errors = int(_delta(net.errin, pn.errin) + _delta(net.errout, pn.errout))
            drops = int(_delta(net.dropin, pn.dropin) + _delta(net.dropout, pn.dropout))
        else:
            cpu_system = cores = bytes_in = bytes_out = 0.0
            errors = drops = 0
        self._prev_at = now
        self._prev_cpu, self._prev_proc, self._prev_net = cpu, proc, net
        self.samples += 1
        return Vitals(
            at=now,
            interval=interval,
            cpu_system=cpu_system,
            cpu_process=min(1.0, cores / cpus),
            cpu_process_cores=cores,
            cpu_count=cpus,
            memory_used=_fraction(mem_used, mem_total),
            memory_total=mem_total,
            process_rss=src.process_rss(),
            disk_used=_fraction(disk_used, disk_cap),
            disk_path=path,
            net_bytes_in_per_s=bytes_in,
            net_bytes_out_per_s=bytes_out,
            net_errors=errors,
            net_drops=drops,
            open_fds=fds,
            fd_limit=limit,
            fd_used=_fraction(fds, limit),
        )


# --------------------------------------------------------------------------- loop lag


class LoopLag(msgspec.Struct, frozen=True):
    """Recent event-loop lag, in seconds."""

    last: float
    max: float
    p99: float
    mean: float
    samples: int
    interval: float


class LoopLagSensor:
    """Measures how late the event loop runs a timer. ``start()`` / ``await stop()``, or
    ``async with``. ``interval``: seconds between measurements; ``window``: samples kept."""

    def __init__(
        self, clock: Clock | None = None, *, interval: float = 0.1, window: int = 600
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.interval = interval
        self._lags: deque[float] = deque(maxlen=window)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.running:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> LoopLagSensor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        clock = self.clock
        while True:
            due = clock.now() + self.interval
            await clock.sleep(self.interval)
            self._lags.append(max(0.0, clock.now() - due))

    def record(self, lag: float) -> None:
        """Add a measurement taken elsewhere (also how tests feed exact values)."""
        self._lags.append(max(0.0, lag))

    @property
    def last(self) -> float:
        return self._lags[-1] if self._lags else 0.0

    def snapshot(self) -> LoopLag:
        lags = self._lags
        if not lags:
            return LoopLag(0.0, 0.0, 0.0, 0.0, 0, self.interval)
        ordered = sorted(lags)
        # Nearest-rank p99: with fewer than 100 samples it is the maximum, on purpose (a
        # single long block in a short window is exactly what we want to see).
        rank = max(0, -(-99 * len(ordered) // 100) - 1)
        return LoopLag(
            last=lags[-1],
            max=ordered[-1],
            p99=ordered[rank],
            mean=sum(ordered) / len(ordered),
            samples=len(ordered),
            interval=self.interval,
        )


# --------------------------------------------------------------------------- application


class AgentHealth(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    running: bool
    mailbox: int
    mailbox_size: int
    processed: int
    errors: int
    restarts: int
    supervised: bool
    # Failed / handled messages since the previous sample (lifetime for app_health()).
    error_rate: float


class AppHealth(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    # Seconds since the previous sample (0: the first; deltas then cover each lifetime).
    interval: float
    agents: list[AgentHealth]
    running: int
    down: list[str]
    mailbox_total: int
    # The fullest mailbox, as a fraction of its size.
    max_mailbox_fill: float
    processed: int
    errors: int
    error_rate: float
    restarts: int
    # Restarts since the previous sample.
    new_restarts: int

    def fills(self, at_least: float) -> list[str]:
        """Ids of the agents whose mailbox is at least this fraction full."""
        return [
            a.id
            for a in self.agents
            if a.running and a.mailbox_size > 0 and a.mailbox / a.mailbox_size >= at_least
        ]


def _supervised(sup: Supervisor, into: dict[str, ChildInfo]) -> None:
    for info in sup.which_children():
        if isinstance(info.child, Supervisor):
            _supervised(info.child, into)
        else:
            into[info.id] = info


def _rate(errors: int, processed: int) -> float:
    # A failed message does not count as processed, so handled = processed + errors; a failing
    # directive counts in both, hence the clamp.
    handled = processed + errors
    return min(1.0, errors / handled) if handled > 0 else 0.0


def _counter_delta(new: int, old: int) -> int:
    # A restarted agent is a fresh server counting from zero again.
    return new - old if new >= old else new


class AppHealthTracker:
    """``sample(now) -> AppHealth`` for one runtime, with rates since the previous sample."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._prev: dict[str, tuple[int, int, int]] = {}
        self._prev_at: float | None = None

    def sample(self, now: float) -> AppHealth:
        rt = self.runtime
        sup_rows: dict[str, ChildInfo] = {}
        if rt.supervisor.running:
            _supervised(rt.supervisor, sup_rows)
        prev = self._prev
        seen: dict[str, tuple[int, int, int]] = {}
        agents: list[AgentHealth] = []
        d_proc = d_err = d_restarts = total_restarts = mailbox_total = 0
        max_fill = 0.0
        for info in rt.agents():
            server = rt.get(info.id)
            size = server.mailbox_size if server is not None else 0
            row = sup_rows.get(info.id)
            restarts = row.restarts if row is not None else 0
            p_proc, p_err, p_rst = prev.get(info.id, (0, 0, 0))
            dp = _counter_delta(info.processed, p_proc)
            de = _counter_delta(info.errors, p_err)
            dr = _counter_delta(restarts, p_rst)
            seen[info.id] = (info.processed, info.errors, restarts)
            d_proc += dp
            d_err += de
            d_restarts += dr
            total_restarts += restarts
            mailbox_total += info.mailbox
            if size > 0:
                max_fill = max(max_fill, info.mailbox / size)
            agents.append(
                AgentHealth(
                    id=info.id,
                    name=info.name,
                    running=info.running,
                    mailbox=info.mailbox,
                    mailbox_size=size,
                    processed=info.processed,
                    errors=info.errors,
                    restarts=restarts,
                    supervised=info.supervised,
                    error_rate=_rate(de, dp),
                )
            )
        down: list[str] = []
        for child_id, row in sup_rows.items():
            if child_id in seen:
                continue
            # A supervised child with no running server: crashed and being restarted, or
            # given up on. Its restart count survives; its message counters died with it.
            down.append(child_id)
            _, _, p_rst = prev.get(child_id, (0, 0, 0))
            d_restarts += _counter_delta(row.restarts, p_rst)
            total_restarts += row.restarts
            seen[child_id] = (0, 0, row.restarts)
            agents.append(
                AgentHealth(
                    id=child_id,
                    name=child_id,
                    running=False,
                    mailbox=0,
                    mailbox_size=0,
                    processed=0,
                    errors=0,
                    restarts=row.restarts,
                    supervised=True,
                    error_rate=0.0,
                )
            )
        down.extend(a.id for a in agents if not a.running and a.id not in sup_rows)
        interval = 0.0 if self._prev_at is None else max(0.0, now - self._prev_at)
        self._prev = seen
        self._prev_at = now
        return AppHealth(
            at=now,
            interval=interval,
            agents=agents,
            running=sum(1 for a in agents if a.running),
            down=down,
            mailbox_total=mailbox_total,
            max_mailbox_fill=max_fill,
            processed=d_proc,
            errors=d_err,
            error_rate=_rate(d_err, d_proc),
            restarts=total_restarts,
            new_restarts=d_restarts,
        )


def app_health(runtime: Runtime, *, now: float = 0.0) -> AppHealth:
    """The runtime's application health, with error rates over each agent's lifetime."""
    return AppHealthTracker(runtime).sample(now)
