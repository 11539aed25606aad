"""The node's side of load balancing: it carries out what the LoadBalancer agent decides.

Theory of operation: the :class:`Balancer` core is the data plane the call path uses
directly. This shell executes the agent's directives -- a periodic :class:`BalancerTick`
(whose events -- breaker changes, ejections, surges, this node's load crossing its adaptive
thresholds -- go back to the agent as ``cluster.lb.events`` and onto the bus as
``cluster.lb.<kind>``), :class:`SetStrategy`, :class:`SetQuarantined`, :class:`ReportLoad`
(CPU and memory from psutil, calls in flight, published in the node's membership metadata
when they moved enough to matter) and :class:`ProposeSurge` (a majority proposal among the
balancers registered with the ``cluster.load_balancer`` capability) -- and forwards the bus
signals the agent cares about: accepted surge proposals and quarantine decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from agentcluster._background import spawn_owned
from agentcluster.agents import AgentServer
from agentcluster.balancing.balancer import Balancer
from agentcluster.balancing.directives import (
    SURGE_TOPIC,
    BalancerTick,
    ProposeSurge,
    ReportLoad,
    SetQuarantined,
    SetStrategy,
)
from agentcluster.balancing.limits import AdaptiveThresholds
from agentcluster.signals import Signal

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = ["LB_AGENT", "LB_CAPABILITY", "BalancerService"]

log = logging.getLogger(__name__)

LB_AGENT = "load_balancer"
LB_CAPABILITY = "cluster.load_balancer"
# A load report is re-published when CPU or memory moved by this much, or in-flight calls by
# this many: smaller moves are noise not worth a gossip round.
_LOAD_DELTA = 0.05
_IN_FLIGHT_DELTA = 2
# ... and when in-flight calls reach 0 or leave it (an idle node must not look busy to every
# balancer until its CPU moves), and after this many unpublished reports in any case: a
# balancer re-bases its estimate of other clients' calls on each new report, so none
# outlives this many report periods (6 x 5 s with the defaults).
_REPUBLISH_AFTER = 6


def _psutil_load() -> tuple[float, float]:
    """This host's CPU (since the last call) and memory use, as fractions."""
    return psutil.cpu_percent(interval=None) / 100.0, psutil.virtual_memory().percent / 100.0


class BalancerService:
    def __init__(
        self,
        node: Node,
        balancer: Balancer,
        *,
        load_probe: Callable[[], tuple[float, float]] | None = None,
    ) -> None:
        self.node = node
        self.balancer = balancer
        self.load_probe = load_probe if load_probe is not None else _psutil_load
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._last_report: dict[str, float] = {}
        self._reports = 0  # load reports published (their number goes out with each)
        self._unpublished = 0  # reports since the last one published
        # The design's thresholds (cpu 0.8, memory 0.85, connections 0.9, response time
        # 1000 ms, error rate 0.05), following this node's normal where it is higher (up to
        # each metric's ceiling).
        self.thresholds = AdaptiveThresholds()
        self._breached: set[str] = set()
        self.surge_proposals = 0

    def attach(self) -> None:
        rt = self.node.runtime
        rt.register_directive(BalancerTick, self._tick)
        rt.register_directive(SetStrategy, self._set_strategy)
        rt.register_directive(SetQuarantined, self._set_quarantined)
        rt.register_directive(ReportLoad, self._report_load)
        rt.register_directive(ProposeSurge, self._propose_surge)

    async def start(self, tg: asyncio.TaskGroup) -> None:
        """Register the balancer agent and forward the bus signals it listens to."""
        with contextlib.suppress(Exception):
            await self.node.registry.register(LB_AGENT, capabilities=[LB_CAPABILITY])
        task = tg.create_task(self._forward(), name=f"lb-forward:{self.node.name}")
        self._tasks.add(task)

    async def close(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def publish_soon(self, events: list[dict[str, Any]]) -> None:
        """:meth:`publish` from a plain callback, on a task this service owns (none once
        it is closed)."""
        if self._closed:
            return
        self._spawn(self.publish(events))

    def _spawn(self, coro: Any) -> None:
        spawn_owned(self._tasks, coro, log)

    async def _forward(self) -> None:
        bus = self.node.runtime.bus
        sub = bus.subscribe("cluster.**", queue_size=1024, overflow="drop_oldest", name="lb")
        try:
            async for signal in sub:
                t = signal.type
                if t == "cluster.consensus.decided":
                    data = signal.data if isinstance(signal.data, dict) else {}
                    outcome = data.get("outcome")
                    accepted = isinstance(outcome, list | tuple) and outcome[:1] == ["accepted"]
                    if data.get("topic") == SURGE_TOPIC and accepted:
                        await self._cast(Signal(type="cluster.lb.surge_decided", data={}))
                elif t.startswith("cluster.health.quarantine."):
                    await self._cast(signal)
        finally:
            bus.unsubscribe(sub)

    async def _cast(self, signal: Signal) -> None:
        server = self.node.runtime.get(LB_AGENT)
        if server is not None:
            with contextlib.suppress(Exception):
                server.cast_nowait(signal)

    # ----------------------------------------------------------------- directives
    async def _tick(self, server: AgentServer, d: BalancerTick) -> None:
        now = self.node.clock.now()
        events = self.balancer.tick(now)
        breached = set(self.thresholds.observe(self._own_metrics(now)))
        for name in sorted(breached - self._breached):
            limit = round(self.thresholds.threshold(name), 4)
            events.append({"kind": "threshold", "metric": name, "threshold": limit, "at": now})
        for name in sorted(self._breached - breached):
            events.append({"kind": "threshold_cleared", "metric": name, "at": now})
        self._breached = breached
        if events:
            await self.publish(events)

    def _own_metrics(self, now: float) -> dict[str, float]:
        """This node's load, in the adaptive thresholds' terms: CPU and memory fractions, the
        share of its concurrency limit in use, and the latency and error rate of the calls it
        sent in the last ten seconds."""
        calls = self.node.calls
        recent = [d for d in self.balancer.decisions if now - d.at <= 10.0 and d.node]
        metrics = {
            "cpu": self._last_report.get("cpu", 0.0),
            "memory": self._last_report.get("memory", 0.0),
            "connections": calls.in_flight / max(1, calls.limiter.limit),
        }
        if recent:
            metrics["response_time_ms"] = 1000.0 * sum(d.latency for d in recent) / len(recent)
            metrics["error_rate"] = sum(not d.ok for d in recent) / len(recent)
        return metrics

    async def publish(self, events: list[dict[str, Any]]) -> None:
        """Balancer events: to the agent (one batch) and onto the bus (one signal each)."""
        await self._cast(Signal(type="cluster.lb.events", data={"events": events}))
        bus = self.node.runtime.bus
        for ev in events:
            kind = str(ev.get("kind", "event"))
            await bus.publish(
                Signal(
                    type=f"cluster.lb.{kind}",
                    source=f"/node/{self.node.name}/{LB_AGENT}",
                    subject=str(ev.get("node", "")) or None,
                    data=ev,
                )
            )

    def _set_strategy(self, server: AgentServer, d: SetStrategy) -> None:
        self.balancer.set_strategy(d.name, now=self.node.clock.now())
        log.info("node %s routes with %s", self.node.name, d.name)

    def _set_quarantined(self, server: AgentServer, d: SetQuarantined) -> None:
        self.balancer.set_quarantined(d.nodes, self.node.clock.now())

    def _report_load(self, server: AgentServer, d: ReportLoad) -> None:
        cpu, memory = self.load_probe()
        report = {
            "cpu": round(cpu, 3),
            "memory": round(memory, 3),
            "in_flight": float(self.node.calls.in_flight),
        }
        last = self._last_report
        moved = (
            not last
            or abs(report["cpu"] - last.get("cpu", 0.0)) >= _LOAD_DELTA
            or abs(report["memory"] - last.get("memory", 0.0)) >= _LOAD_DELTA
            or abs(report["in_flight"] - last.get("in_flight", 0.0)) >= _IN_FLIGHT_DELTA
            or (report["in_flight"] == 0) != (last.get("in_flight", 0.0) == 0)
        )
        self._unpublished += 1
        if not moved and self._unpublished < _REPUBLISH_AFTER:
            return
        self._unpublished = 0
        self._last_report = report
        self._reports += 1
        member = self.node.core.member(self.node.name)
        capacity = dict(member.meta.capacity) if member is not None else {}
        capacity.update(report)
        capacity["load_report"] = self._reports
        try:
            self.node.update_meta(capacity=capacity)
        except ValueError as exc:  # metadata over its size limit: keep the old report
            log.warning("load report not published: %s", exc)

    def _propose_surge(self, server: AgentServer, d: ProposeSurge) -> None:
        peers = [e.id for e in self.node.registry.index.find_capable(LB_CAPABILITY)]
        if len(peers) < 2:
            return  # alone: the local switch is all there is to do
        self.surge_proposals += 1
        self._spawn(self._run_proposal(peers, d.strategy))

    async def _run_proposal(self, peers: list[str], strategy: str) -> None:
        try:
            await self.node.consensus.decide(
                peers, {"strategy": strategy}, timeout=2.0, topic=SURGE_TOPIC
            )
        except Exception as exc:  # no store, a timeout: the local switch still stands
            log.info("surge proposal not decided: %s", exc)
