"""The Balancer: one node's routing data plane, as a pure core.

Theory of operation: for every capability the balancer keeps the *known* endpoints (nodes
hosting a capable agent, from the registry and membership) and a strategy instance fed with
the *eligible* ones. Eligibility is decided here, per node, for all capabilities at once:

* not quarantined (the HealthMonitors' decision: the node stays a member but gets nothing),
  and not judged unhealthy by this node's own monitor (a degraded one is weighed down);
* not ejected by outlier detection (consecutive errors at once, success-rate and latency
  outliers every interval; never more than the ejection cap, never the last node);
* its circuit breaker is not open (a half-open breaker admits its probes only);
* weights scaled by slow start for nodes that joined or came back.

When fewer than ``panic_threshold`` of the known nodes are eligible the balancer panics:
it routes to every known, non-quarantined node, open breakers included -- better to spread load
over a cluster whose health checks may be wrong than to crush the few "healthy" survivors
(Envoy's panic mode). A node coming back -- its breaker closes after its probes, its ejection
ends -- ramps up through slow start like a new one.

Eligibility changes rarely (a breaker trips, a node is ejected, a ramp step), so strategies
are rebuilt then, and a pick stays a function call on prebuilt tables: the strategy's pick
plus one breaker check. Outcomes (:meth:`finished`) feed the strategy, the node's breaker and
the outlier detector; the last ``decisions`` routing decisions are kept for inspection
(``agentcluster routes``). Nothing here reads a clock or the global ``random``.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from agentcluster.balancing.base import (
    Endpoint,
    NoEndpoint,
    PickRequest,
    Strategy,
    published_inflight,
)
from agentcluster.balancing.breaker import BreakerConfig, Breakers, BreakerState
from agentcluster.balancing.limits import SurgeDetector
from agentcluster.balancing.outliers import OutlierConfig, OutlierDetector
from agentcluster.balancing.panic import PanicGate, SlowStart
from agentcluster.balancing.strategies import make_strategy

__all__ = ["Balancer", "RouteDecision"]

_DEGRADED = 0.1  # weight factor of a peer this node's health monitor judges degraded
_PICK_TRIES = 4  # re-picks when a half-open breaker has no probe left for the picked node


class RouteDecision(msgspec.Struct, frozen=True, array_like=True):
    at: float
    capability: str
    node: str  # "" when nothing could be picked
    strategy: str
    ok: bool
    latency: float  # seconds (0 when nothing was picked)
    attempt: int = 1


class _Route:
    __slots__ = ("capability", "eligible", "known", "panic", "strategy", "strategy_name")

    def __init__(self, capability: str, strategy_name: str, strategy: Strategy) -> None:
        self.capability = capability
        self.known: dict[str, Endpoint] = {}
        self.eligible: tuple[str, ...] = ()
        self.strategy_name = strategy_name
        self.strategy = strategy
        self.panic = PanicGate(0.5)


class Balancer:
    def __init__(
        self,
        *,
        rng: random.Random,
        now: float = 0.0,
        strategy: str = "latency_aware",
        breaker: BreakerConfig | None = None,
        outliers: OutlierConfig | None = None,
        panic_threshold: float = 0.5,
        slow_start: float = 30.0,
        decisions: int = 1_000,
    ) -> None:
        make_strategy(strategy)  # fail early on an unknown name
        self.rng = rng
        self.strategy = strategy
        self.panic_threshold = panic_threshold
        self.breakers = Breakers(rng, breaker or BreakerConfig())
        self.outliers = OutlierDetector(rng, outliers or OutlierConfig(), now)
        self.slow_start = SlowStart(window=slow_start)
        self.surge = SurgeDetector(now=now)
        self.quarantined: frozenset[str] = frozenset()
        # This node's HealthMonitor's view of its peers: degraded ones are weighed down,
        # unhealthy ones get nothing (like quarantined ones, but without a cluster decision).
        self.health: dict[str, str] = {}
        self.decisions: collections.deque[RouteDecision] = collections.deque(maxlen=decisions)
        self._routes: dict[str, _Route] = {}
        self._overrides: dict[str, str] = {}  # capability -> strategy name
        self._seen: set[str] = set()
        self._ramping: set[str] = set()
        self._users: dict[str, int] = {}  # node -> capabilities routing to it
        self.picks = 0
        self.no_endpoint = 0

    # ----------------------------------------------------------------- configuration
    def _route(self, capability: str) -> _Route:
        route = self._routes.get(capability)
        if route is None:
            name = self._overrides.get(capability, self.strategy)
            route = self._routes[capability] = _Route(capability, name, make_strategy(name))
            route.panic = PanicGate(self.panic_threshold)
        return route

    def set_strategy(self, name: str, *, capability: str | None = None, now: float) -> None:
        """Route with ``name`` (every capability without an override, or just one)."""
        make_strategy(name)
        if capability is None:
            self.strategy = name
            targets = [c for c in self._routes if c not in self._overrides]
        else:
            self._overrides[capability] = name
            targets = [capability] if capability in self._routes else []
        for cap in targets:
            route = self._routes[cap]
            if route.strategy_name != name:
                route.strategy_name = name
                route.strategy = make_strategy(name)
                self._rebuild(route, now)

    def set_endpoints(self, capability: str, endpoints: Sequence[Endpoint], now: float) -> None:
        """The nodes hosting a capable agent (alive members), with their weights and load."""
        route = self._route(capability)
        new = {ep.node: ep for ep in endpoints}
        for node in route.known.keys() - new.keys():
            self._release(node, now)
        for node in new.keys() - route.known.keys():
            self._users[node] = self._users.get(node, 0) + 1
            self.outliers.add(node)
            if node in self._seen:
                continue
            self._seen.add(node)
            if self.picks:  # nodes known from the start need no ramp
                self.slow_start.mark_new(node, now)
                self._ramping.add(node)
        route.known = new
        self._rebuild(route, now)

    def _release(self, node: str, now: float) -> None:
        left = self._users.get(node, 0) - 1
        if left > 0:
            self._users[node] = left
            return
        self._users.pop(node, None)
        self.outliers.remove(node, now)
        self.breakers.remove(node)
        # A node that leaves and comes back ramps up again.
        self._seen.discard(node)

    def set_health(self, statuses: dict[str, str], now: float) -> None:
        """The local health monitor's verdicts (node -> healthy / degraded / unhealthy)."""
        changed = {n for n in statuses.keys() | self.health.keys()
                   if statuses.get(n) != self.health.get(n)}  # fmt: skip
        self.health = dict(statuses)
        if changed:
            self._rebuild_nodes(changed, now)

    def set_quarantined(self, nodes: Sequence[str], now: float) -> None:
        self.quarantined = frozenset(nodes)
        for route in self._routes.values():
            self._rebuild(route, now)

    # ----------------------------------------------------------------- eligibility
    def _rebuild(self, route: _Route, now: float) -> None:
        health = self.health
        candidates = [
            ep
            for n, ep in route.known.items()
            if n not in self.quarantined and health.get(n) != "unhealthy"
        ]
        eligible = [
            ep
            for ep in candidates
            if not self.outliers.is_ejected(ep.node) and self.breakers.eligible(ep.node, now)
        ]
        chosen = route.panic.route_set(eligible, candidates)
        factor = self.slow_start.factor

        def scale(ep: Endpoint) -> float:
            f = factor(ep.node, now)
            return f * _DEGRADED if health.get(ep.node) == "degraded" else f

        weighted = [
            ep if (f := scale(ep)) == 1.0 else msgspec.structs.replace(ep, weight=ep.weight * f)
            for ep in chosen
        ]
        route.eligible = tuple(sorted(ep.node for ep in weighted))
        route.strategy.update(weighted)

    def _rebuild_nodes(self, nodes: set[str], now: float) -> None:
        for route in self._routes.values():
            if not nodes.isdisjoint(route.known):
                self._rebuild(route, now)

    # ----------------------------------------------------------------- the hot path
    def eligible(self, capability: str) -> tuple[str, ...]:
        """The nodes a pick for ``capability`` may return now (sorted; read-only)."""
        route = self._routes.get(capability)
        return route.eligible if route is not None else ()

    def pick(
        self,
        capability: str,
        request: PickRequest,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        """The node for one attempt of a call; raises :class:`NoEndpoint`."""
        route = self._routes.get(capability)
        if route is None or not route.eligible:
            self.no_endpoint += 1
            self.decisions.append(RouteDecision(now, capability, "", "", False, 0.0))
            raise NoEndpoint(f"no eligible node for {capability!r}")
        breakers = self.breakers
        for _ in range(_PICK_TRIES):
            node = route.strategy.pick(request, self.rng, now, exclude)
            # In panic, health is ignored: breakers included, or panic would route nowhere.
            if breakers.allow(node, now) or route.panic.active:
                self.picks += 1
                self.surge.record(now)
                return node
            exclude = exclude | {node}  # half-open with its probes out: try another
        self.no_endpoint += 1
        raise NoEndpoint(f"every eligible node for {capability!r} is probing its breaker")

    def started(self, capability: str, node: str, now: float) -> None:
        route = self._routes.get(capability)
        if route is not None:
            route.strategy.on_start(node, now)

    def probe_ticket(self, node: str) -> int:
        """Right after :meth:`pick` returned ``node``: the ticket of the half-open probe it
        took (0: none), for :meth:`finished` / :meth:`abandoned` to count only real probes."""
        return self.breakers.ticket(node)

    def abandoned(
        self,
        capability: str,
        node: str,
        elapsed: float,
        now: float,
        ticket: int | None = None,
    ) -> None:
        """An attempt ended without an outcome (its caller was cancelled, or it failed before
        leaving): it is no longer in flight, and a half-open probe slot it held is free again.
        Breakers and outlier detection learn nothing; the strategy sees a success after
        ``elapsed`` -- a lower bound of the latency, so a node slow enough to make callers give
        up still looks slow."""
        route = self._routes.get(capability)
        if route is not None:
            route.strategy.on_finish(node, elapsed, True, now)
        self.breakers.release(node, ticket)

    def finished(
        self,
        capability: str,
        node: str,
        latency: float,
        ok: bool,
        now: float,
        *,
        attempt: int = 1,
        ticket: int | None = None,
    ) -> list[dict[str, Any]]:
        """An attempt completed; returns events (breaker changes, ejections) if any.
        ``ticket``: :meth:`probe_ticket` at the pick (None: not known)."""
        route = self._routes.get(capability)
        name = ""
        if route is not None:
            route.strategy.on_finish(node, latency, ok, now)
            name = route.strategy_name
        self.decisions.append(RouteDecision(now, capability, node, name, ok, latency, attempt))
        events: list[dict[str, Any]] = []
        change = self.breakers.record(node, ok, now, ticket)
        if change is not None:
            events.append({"kind": "breaker", **msgspec.to_builtins(change)})
            if change.new is BreakerState.CLOSED:
                self._ramp(node, now)
        ejection = self.outliers.record(node, ok, latency, now)
        if ejection is not None:
            events.append({"kind": ejection.kind, **msgspec.to_builtins(ejection)})
        if events:
            self._rebuild_nodes({node}, now)
        return events

    # ----------------------------------------------------------------- periodic work
    def tick(self, now: float) -> list[dict[str, Any]]:
        """Breaker timers, outlier analysis and returns, slow-start steps, surges."""
        events: list[dict[str, Any]] = []
        touched: set[str] = set()
        for change in self.breakers.tick(now):
            touched.add(change.node)
            events.append({"kind": "breaker", **msgspec.to_builtins(change)})
        for ev in self.outliers.tick(now):
            touched.add(ev.node)
            events.append({"kind": ev.kind, **msgspec.to_builtins(ev)})
            if ev.kind == "return":
                self._ramp(ev.node, now)
        # Nodes still ramping get their next weight; those whose ramp just ended, their full one.
        ramping = set(self.slow_start.ramping(now))
        touched |= ramping | self._ramping
        self._ramping = ramping
        if touched:
            self._rebuild_nodes(touched, now)
        for surge in self.surge.tick(now):
            events.append({**msgspec.to_builtins(surge), "kind": f"surge_{surge.kind}"})
        return events

    def _ramp(self, node: str, now: float) -> None:
        """``node`` comes back into rotation: slow start, as for a new node."""
        self.slow_start.mark_new(node, now)
        self._ramping.add(node)

    # ----------------------------------------------------------------- visibility
    def snapshot(self, now: float, *, decisions: int = 50) -> dict[str, Any]:
        """The routing view (``agentcluster routes``); ``decisions`` is how many of the kept
        routing decisions to include, the newest."""

        def finite(x: float) -> float | None:
            # A peer's load report may be garbled (NaN, inf): None, not a number JSON
            # cannot carry.
            return x if math.isfinite(x) else None

        nodes: dict[str, dict[str, Any]] = {}
        for route in self._routes.values():
            for name, ep in route.known.items():
                # The weight the strategy gets (as _rebuild scales it): slow start, and this
                # node's own monitor's degraded verdict.
                f = self.slow_start.factor(name, now)
                if self.health.get(name) == "degraded":
                    f *= _DEGRADED
                entry = nodes.get(name)
                if entry is not None and ep.load_report > entry["load_report"]:
                    # Routes refresh when their capability is called: show the newest report
                    # any of them holds.
                    entry["cpu"], entry["memory"] = finite(ep.cpu), finite(ep.memory)
                    entry["in_flight"] = published_inflight(ep.in_flight)
                    entry["load_report"] = ep.load_report
                entry = nodes.setdefault(
                    name,
                    {
                        "node": name,
                        "zone": ep.zone,
                        "weight": round(ep.weight * f, 4),
                        "cpu": finite(ep.cpu),
                        "memory": finite(ep.memory),
                        # As the node last published it (every client's calls, stale) and
                        # as the strategies read it: a garbled figure is 0.
                        "in_flight": published_inflight(ep.in_flight),
                        "load_report": ep.load_report,
                        "breaker": str(self.breakers.state(name, now))
                        if name in self.breakers
                        else str(BreakerState.CLOSED),
                        "ejected": self.outliers.is_ejected(name),
                        "quarantined": name in self.quarantined,
                        "capabilities": [],
                    },
                )
                entry["capabilities"].append(route.capability)
        recent = list(self.decisions)[-decisions:] if decisions > 0 else []
        return {
            "strategy": self.strategy,
            "overrides": dict(self._overrides),
            "capabilities": {
                cap: {
                    "strategy": r.strategy_name,
                    "known": sorted(r.known),
                    "eligible": list(r.eligible),
                    "panic": r.panic.active,
                }
                for cap, r in sorted(self._routes.items())
            },
            "nodes": [nodes[n] for n in sorted(nodes)],
            "breakers": self.breakers.snapshot(now),
            "outliers": self.outliers.snapshot(),
            "surge": {"active": self.surge.active, "baseline": self.surge.baseline},
            "picks": self.picks,
            "no_endpoint": self.no_endpoint,
            "decisions": [msgspec.structs.asdict(d) for d in recent],
        }
