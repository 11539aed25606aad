"""The node's side of health monitoring: it measures, and carries out what the HealthMonitor
agent decides.

Theory of operation: every cycle (the agent's :class:`RunHealthCycle`, once a second by
default) the service samples the node's vitals and event-loop lag, feeds them to the anomaly
detectors and the alert rules, pings every live peer over the transport (the *basic check*:
reachability and round trip), runs the quarantine book's clock -- a quarantined peer's ping is
its recovery check -- and reports to the agent (``cluster.health.report``). The comprehensive,
deep and predictive checks run on their own intervals in a :class:`CheckRunner`.

Alerts become ``cluster.health.alert.<severity>`` signals and go through the escalation matrix
(log, webhook POST with retries, ``cluster.orchestrator.escalation``). Quarantine proposals run
as MABEAM proposals among the health monitors (a quorum of half the monitors plus one must
vote, and a majority of the votes must be yes); an accepted one reaches every node's monitor,
which quarantines the node in its book and publishes ``cluster.health.quarantine.started``
(the load balancer stops routing there); recovery checks release it
(``cluster.health.quarantine.released``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster._background import spawn_owned
from agentcluster.agents import AgentServer
from agentcluster.coordination.voting import quorum
from agentcluster.health._check_runner import CheckResult, CheckRunner
from agentcluster.health.alerts import AlertEngine, AlertRule, BurnRateRule, EscalationMatrix
from agentcluster.health.anomaly import Anomaly, MetricMonitor, severity_of
from agentcluster.health.checks import PingFailed, standard_checks, stream_ping
from agentcluster.health.directives import (
    HEALTH_MONITOR,
    MONITOR_CAPABILITY,
    QUARANTINE_TOPIC,
    ApplyQuarantine,
    ProposeQuarantine,
    RunHealthCycle,
    SetOwnHealth,
    SetPeerHealth,
)
from agentcluster.health.quarantine import QuarantineBook
from agentcluster.health.recovery import Problem, RecoveryContext, RecoveryRunner
from agentcluster.health.sensors import AppHealthTracker, LoopLagSensor, Vitals, VitalsSampler
from agentcluster.health.webhook import WebhookSender
from agentcluster.signals import Signal

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = ["DEFAULT_RULES", "HealthService"]

log = logging.getLogger(__name__)

# Alert rules every node evaluates on its own vitals; the hysteresis bands keep a value that
# hovers around a threshold from flapping.
DEFAULT_RULES = (
    AlertRule("cpu_high", "cpu", ">", 90.0, "warning", for_samples=5, clear_threshold=75.0),
    AlertRule("memory_high", "memory", ">", 90.0, "warning", for_samples=3, clear_threshold=85.0),
    AlertRule("memory_critical", "memory", ">", 97.0, "critical", clear_threshold=93.0),
    AlertRule("disk_full", "disk", ">", 95.0, "critical", clear_threshold=90.0),
    AlertRule("fds_exhausted", "fds", ">", 90.0, "critical", clear_threshold=80.0),
    AlertRule(
        "loop_lag", "loop_lag_ms", ">", 250.0, "warning", for_samples=3, clear_threshold=50.0
    ),
)
# The error budget of the calls this node serves: 99.9 % succeed; the SRE workbook's windows
# page at a 14.4x burn over 1 h and 5 min, and open a ticket at 6x over 6 h and 30 min.
DEFAULT_BURN_RULES = (BurnRateRule("call_error_budget", "calls", 0.999),)
_PINGS_PER_CYCLE = 16  # peers pinged per cycle at most (all of them in smaller clusters)
_PING_TIMEOUT = 0.5  # a basic check that takes longer than this failed
_RECOVERED_RTT = 0.010  # a recovery ping must be at least this fast (the monitor's floor)
_ANOMALY_MEMORY = 10.0  # seconds an anomaly counts towards this node's own status
_HISTORY = 600  # samples kept per metric for the predictive check


class HealthService:
    def __init__(self, node: Node, *, vitals: bool = True) -> None:
        self.node = node
        self.sampler = VitalsSampler(disk_path=node.config.data_dir or "/") if vitals else None
        self.loop_lag = LoopLagSensor(node.clock) if vitals else None
        self.app = AppHealthTracker(node.runtime)
        self.monitor = MetricMonitor()
        self.alerts = AlertEngine(DEFAULT_RULES, DEFAULT_BURN_RULES)
        self._calls_seen = (0, 0)  # (served, failed) at the last cycle
        self.escalation = EscalationMatrix.default(webhook_url=node.config.health_webhook)
        self.webhook = WebhookSender()
        self.book = QuarantineBook()
        self.recovery = RecoveryRunner(clock=node.clock.now)
        self._recovering: set[str] = set()
        self.runner: CheckRunner | None = None
        self.vitals: Vitals | None = None
        self.anomalies: collections.deque[Anomaly] = collections.deque(maxlen=200)
        self.history: dict[str, collections.deque[tuple[float, float]]] = {}
        self.peer_checks: dict[str, dict[str, Any]] = {}
        self.check_results: dict[str, CheckResult] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cycle: asyncio.Task[None] | None = None
        self._seq = 0
        self.cycles = 0
        self.ping_rtts: collections.deque[float] = collections.deque(maxlen=1000)

    # ----------------------------------------------------------------- lifecycle
    def attach(self) -> None:
        rt = self.node.runtime
        rt.register_directive(RunHealthCycle, self._run_cycle)
        rt.register_directive(SetOwnHealth, self._set_own)
        rt.register_directive(ProposeQuarantine, self._propose)
        rt.register_directive(ApplyQuarantine, self._apply)
        rt.register_directive(SetPeerHealth, self._peer_health)

    async def start(self, tg: asyncio.TaskGroup) -> None:
        node = self.node
        with contextlib.suppress(Exception):
            await node.registry.register(HEALTH_MONITOR, capabilities=[MONITOR_CAPABILITY])
        self.webhook.start()
        if self.loop_lag is not None:
            self.loop_lag.start()
        self.runner = CheckRunner(
            standard_checks(
                node,
                preset=node.config.health_preset,
                vitals=(lambda now: self.vitals) if self.sampler is not None else None,
                app=self.app.sample,
                loop_lag=self.loop_lag,
                history=self._history,
                cert_path=node.config.tls_cert or None,
            ),
            clock=node.clock,
            on_result=self._on_check,
        )
        self.runner.start()
        task = tg.create_task(self._forward(), name=f"health-forward:{node.name}")
        self._tasks.add(task)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self.loop_lag is not None:
            await self.loop_lag.stop()
        tasks = list(self._tasks)
        if self._cycle is not None:
            tasks.append(self._cycle)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self.webhook.close()

    def _spawn(self, coro: Any) -> None:
        spawn_owned(self._tasks, coro, log)

    def _history(self) -> dict[str, list[tuple[float, float]]]:
        return {k: list(v) for k, v in self.history.items()}

    def _on_check(self, result: CheckResult) -> None:
        self.check_results[result.name] = result
        if result.kind == "deep" and result.status == "fail":
            agents = result.data.get("agents", {})
            for agent_id, row in agents.items() if isinstance(agents, dict) else ():
                if isinstance(row, dict) and row.get("status") == "fail":
                    kind = "agent_crashed" if row.get("detail") == "not running" else "agent_stuck"
                    self._recover(Problem(self.node.name, kind, agent_id, str(row.get("detail"))))
        if result.status == "fail":
            self._spawn(
                self._publish(
                    Signal(
                        type="cluster.health.check.failed",
                        source=f"/node/{self.node.name}/{HEALTH_MONITOR}",
                        subject=result.name,
                        data=msgspec.to_builtins(result),
                    )
                )
            )

    async def _publish(self, signal: Signal) -> None:
        with contextlib.suppress(Exception):
            await self.node.runtime.bus.publish(signal)

    async def _cast(self, signal: Signal) -> None:
        server = self.node.runtime.get(HEALTH_MONITOR)
        if server is not None:
            with contextlib.suppress(Exception):
                server.cast_nowait(signal)

    async def _forward(self) -> None:
        """Accepted quarantine proposals reach the agent."""
        bus = self.node.runtime.bus
        sub = bus.subscribe(
            "cluster.consensus.decided", queue_size=256, overflow="drop_oldest", name="health"
        )
        try:
            async for signal in sub:
                data = signal.data if isinstance(signal.data, dict) else {}
                if data.get("topic") != QUARANTINE_TOPIC:
                    continue
                outcome = data.get("outcome")
                if not (isinstance(outcome, list | tuple) and outcome[:1] == ["accepted"]):
                    continue
                proposal = data.get("proposal")
                if isinstance(proposal, dict):
                    await self._cast(
                        Signal(
                            type="cluster.health.quarantine_decided",
                            data={**proposal, "decided_by": data.get("ref", "")},
                        )
                    )
        finally:
            bus.unsubscribe(sub)

    # ----------------------------------------------------------------- the cycle
    def _run_cycle(self, server: AgentServer, d: RunHealthCycle) -> None:
        if self._cycle is not None and not self._cycle.done():
            return  # the last cycle's pings are still out: skip rather than pile up
        self._cycle = asyncio.get_running_loop().create_task(self._cycle_once())

    async def _cycle_once(self) -> None:
        node = self.node
        now = node.clock.now()
        self.cycles += 1
        own_status, own_reason = "healthy", ""
        if self.sampler is not None:
            self.vitals = vitals = self.sampler.sample(now)
            metrics = vitals.metrics()
            if self.loop_lag is not None:
                metrics["loop_lag_ms"] = 1000.0 * self.loop_lag.last
            for name in ("memory", "disk", "fds", "cpu"):
                self.history.setdefault(name, collections.deque(maxlen=_HISTORY)).append(
                    (now, metrics[name])
                )
            self.anomalies.extend(self.monitor.observe_sample(metrics, now))
            await self._alerts(metrics, now)
        await self._burn(now)
        recent = [a for a in self.anomalies if now - a.at <= _ANOMALY_MEMORY]
        own_status = severity_of(recent)
        if recent:
            own_reason = ", ".join(sorted({f"{a.metric} {a.kind}" for a in recent}))
        checks = await self._ping_peers()
        for tick_ev in self.book.tick(now):
            if tick_ev.kind == "capped":
                log.warning("quarantined node %s keeps failing its recovery checks", tick_ev.node)
        for check in checks:
            # A quarantined peer's ping is its recovery check (it must also be fast again).
            peer = check["peer"]
            if not self.book.is_quarantined(peer):
                continue
            passed = check["ok"] and check["rtt"] <= _RECOVERED_RTT
            ev = self.book.recovery_result(peer, passed, now)
            if ev is not None and ev.kind == "released":
                await self._publish(
                    Signal(
                        type="cluster.health.quarantine.released",
                        subject=peer,
                        data={"node": peer, "why": "recovery checks passed"},
                    )
                )
        report = {
            "at": now,
            "checks": [{"peer": c["peer"], "ok": c["ok"], "rtt": c["rtt"]} for c in checks],
            "own_status": own_status,
            "own_reason": own_reason,
            "quarantined": self.book.quarantined(),
        }
        await self._cast(Signal(type="cluster.health.report", data=report))

    async def _ping_peers(self) -> list[dict[str, Any]]:
        node = self.node
        peers = [
            m.name
            for m in node.members()
            if m.name != node.name and m.state in ("alive", "suspect")
        ]

        async def one(peer: str) -> dict[str, Any]:
            self._seq += 1
            try:
                rtt = await stream_ping(node, peer, seq=self._seq, timeout=_PING_TIMEOUT)
            except PingFailed as exc:
                out = {"peer": peer, "ok": False, "rtt": 0.0, "error": str(exc)}
            else:
                self.ping_rtts.append(rtt)
                out = {"peer": peer, "ok": True, "rtt": rtt}
            self.peer_checks[peer] = {**out, "at": node.clock.now()}
            return out

        return list(await asyncio.gather(*(one(p) for p in peers)))

    async def _alerts(self, metrics: dict[str, float], now: float) -> None:
        for event in self.alerts.evaluate(self.node.name, metrics, now):
            await self._publish(
                Signal(
                    type=event.signal_type,
                    source=f"/node/{self.node.name}/{HEALTH_MONITOR}",
                    subject=event.alert.rule,
                    data=msgspec.to_builtins(event.alert),
                )
            )
            for action in self.escalation.actions_for(event, now):
                self._escalate(action)
        for action in self.escalation.tick(now, self.alerts.active()):
            self._escalate(action)

    async def _burn(self, now: float) -> None:
        """Feed the calls this node served since the last cycle to the error-budget rules."""
        calls = self.node.calls
        served, failed = calls.served, calls.failed
        good = served - self._calls_seen[0]
        bad = failed - self._calls_seen[1]
        self._calls_seen = (served, failed)
        events = self.alerts.observe_counts(self.node.name, "calls", now, good, good + bad)
        events += self.alerts.tick(now)
        for event in events:
            await self._publish(
                Signal(
                    type=event.signal_type,
                    source=f"/node/{self.node.name}/{HEALTH_MONITOR}",
                    subject=event.alert.rule,
                    data=msgspec.to_builtins(event.alert),
                )
            )
            for action in self.escalation.actions_for(event, now):
                self._escalate(action)

    def _escalate(self, action: Any) -> None:
        if action.kind == "log":
            log.warning("health alert on %s: %s", self.node.name, action.body())
        elif action.kind == "webhook" and action.url:
            self.webhook.submit(action.url, action.body())
        elif action.kind == "signal":
            self._spawn(self._publish(Signal(type=action.signal_type, data=action.body())))

    # ----------------------------------------------------------------- recovery
    def _recover(self, problem: Problem) -> None:
        key = f"{problem.kind}:{problem.agent_id}"
        if key in self._recovering:
            return  # one recovery per problem at a time
        self._recovering.add(key)
        self._spawn(self._run_recovery(key, problem))

    async def _run_recovery(self, key: str, problem: Problem) -> None:
        node = self.node

        async def restart(agent_id: str) -> bool:
            return await node.runtime.restart_agent(agent_id)

        async def drain(_node: str) -> bool:
            await self._set_own(None, SetOwnHealth("unhealthy", "drained for recovery"))
            return True

        async def rejoin() -> bool:
            seeds = [s for s in node.config.seeds if s != node.addr]
            if not seeds:
                return False
            node.membership.join(seeds)
            return True

        try:
            outcome = await self.recovery.recover(
                RecoveryContext(problem, restart_agent=restart, drain_node=drain, rejoin=rejoin)
            )
        finally:
            self._recovering.discard(key)
        if outcome.ok:
            log.warning("recovered %s on %s with %s", problem.kind, node.name, outcome.procedure)
        elif outcome.escalation is not None:
            await self._publish(
                Signal(
                    type=outcome.escalation.signal_type,
                    source=f"/node/{node.name}/{HEALTH_MONITOR}",
                    subject=problem.agent_id or problem.node,
                    data=msgspec.to_builtins(outcome.escalation),
                )
            )

    # ----------------------------------------------------------------- decisions
    async def _set_own(self, server: AgentServer | None, d: SetOwnHealth) -> None:
        node = self.node
        member = node.core.member(node.name)
        tags = dict(member.meta.tags) if member is not None else {}
        tags["health"] = d.status
        try:
            node.update_meta(tags=tags)
        except ValueError as exc:
            log.warning("health status not published: %s", exc)
        await self._publish(
            Signal(
                type="cluster.health.status",
                subject=node.name,
                data={"node": node.name, "status": d.status, "reason": d.reason},
            )
        )

    def _peer_health(self, server: AgentServer, d: SetPeerHealth) -> None:
        self.node.balancer.set_health(dict(d.statuses), self.node.clock.now())

    def _propose(self, server: AgentServer, d: ProposeQuarantine) -> None:
        self._spawn(self.quarantine_node(d.node, d.reason, evidence=d.evidence))

    async def quarantine_node(self, node: str, reason: str, *, evidence: str = "") -> Any:
        """Propose to every health monitor that ``node`` be quarantined; the decision."""
        monitors = [e.id for e in self.node.registry.index.find_capable(MONITOR_CAPABILITY)]
        if not monitors:
            raise ValueError("no health monitors are registered")
        rule = quorum(len(monitors) // 2 + 1, 0.5)
        try:
            return await self.node.consensus.decide(
                monitors,
                {"node": node, "reason": reason, "evidence": evidence},
                rule=rule,
                timeout=2.0,
                topic=QUARANTINE_TOPIC,
            )
        except Exception as exc:
            log.info("quarantine proposal for %s not decided: %s", node, exc)
            raise

    async def _apply(self, server: AgentServer, d: ApplyQuarantine) -> None:
        now = self.node.clock.now()
        # A node cannot run recovery checks on itself: its peers' books hold its quarantine.
        if d.node == self.node.name or self.book.is_quarantined(d.node):
            return
        entry = self.book.quarantine(d.node, d.reason, now, decided_by=d.decided_by)
        log.warning("node %s quarantined (%s) until %.0f", d.node, d.reason, entry.until)
        await self._publish(
            Signal(
                type="cluster.health.quarantine.started",
                subject=d.node,
                data={"node": d.node, "reason": d.reason, "decided_by": d.decided_by},
            )
        )

    async def release_node(self, node: str, why: str = "manual") -> bool:
        """Release ``node`` here (each node's monitor releases on its own recovery checks)."""
        if not self.book.is_quarantined(node):
            return False
        self.book.release(node, self.node.clock.now(), why)
        await self._publish(
            Signal(
                type="cluster.health.quarantine.released",
                subject=node,
                data={"node": node, "why": why},
            )
        )
        return True

    # ----------------------------------------------------------------- visibility
    def snapshot(self) -> dict[str, Any]:
        node = self.node
        server = node.runtime.get(HEALTH_MONITOR)
        state = server.agent.state if server is not None else None
        peers = {}
        if state is not None:
            for name, p in state.peers.items():
                peers[name] = {
                    "status": p.status,
                    "failures": p.failures,
                    "rtt_ms": [round(r * 1000, 3) for r in p.rtts],
                    "last_check": self.peer_checks.get(name, {}),
                }
        now = node.clock.now()
        return {
            "node": node.name,
            "status": state.own if state is not None else "unknown",
            "reason": state.own_reason if state is not None else "",
            "peers": peers,
            "vitals": msgspec.to_builtins(self.vitals) if self.vitals is not None else None,
            "loop_lag": msgspec.to_builtins(self.loop_lag.snapshot())
            if self.loop_lag is not None
            else None,
            "anomalies": [msgspec.to_builtins(a) for a in self.anomalies if now - a.at <= 300.0][
                -50:
            ],
            "alerts": [msgspec.to_builtins(a) for a in self.alerts.active()],
            "quarantine": {
                "active": [msgspec.to_builtins(e) for e in self.book.entries()],
                "history": [msgspec.to_builtins(e) for e in self.book.history()][-50:],
            },
            "checks": {k: msgspec.to_builtins(v) for k, v in sorted(self.check_results.items())},
            "cycles": self.cycles,
        }
