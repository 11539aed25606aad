"""Geographic: same zone first, then same region, then anywhere, spilling over when saturated.

Theory of operation: a request says where its client is (``PickRequest.zone`` / ``region``).
The endpoints form up to three *tiers* for it: those in the client's zone, those in the
client's region, and all of them. The tiers are checked in that order (a tier with no
endpoints, or a request without a zone or region, skips that tier; a request with neither goes
straight to "all"). Within a tier an inner strategy picks (default: least connections, P2C);
each zone, each region and the whole set has its own inner strategy instance, built in
``update``, so a pick is a couple of dict lookups plus the inner pick.

Spill-over rule. Requests in flight are counted per endpoint (``on_start`` / ``on_finish``)
and summed per zone, per region and overall, so a tier's *mean in-flight per endpoint* is
O(1) to read. A tier is **saturated** when

    mean_in_flight(tier) >= spill_threshold   and   mean_in_flight(tier) > mean_in_flight(next)

where ``next`` is the next wider tier. The first condition says the local endpoints are
genuinely busy (default 8 requests each); the second that going wider helps -- the wider
tier has room to spare on average. If every tier is equally busy, traffic stays local: sending
it across zones would add latency and relieve nobody.

"In flight" here is ours, counted live, plus other clients' as estimated from each node's
published figure (:func:`~agentcluster.balancing.least_connections.others_inflight`; summed
per tier at ``update``, so reading it stays O(1)). A zone is saturated by everybody's
traffic, not just ours: with only our own counts, a zone kept busy by the other balancers
living there would look idle to each of them, and none would ever spill over. The default
inner strategy (least connections) gets the figures with the endpoints and uses them too.

A saturated tier hands the request to the next one, which *includes* the local endpoints
(zone within region within all), so the inner strategy there still picks a local node if it
happens to be the least loaded. When all of a tier's endpoints are excluded (a retry), the
next tier is tried as well.

Zones and regions are matched by name: a tier "zone a" is every endpoint whose ``zone`` is
``"a"``, whatever its region. Endpoints with an empty zone or region belong to no such tier.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy
from agentcluster.balancing.least_connections import (
    LeastConnections,
    Seen,
    others_inflight,
    published_figures,
)

__all__ = ["DEFAULT_SPILL_THRESHOLD", "Geographic"]

DEFAULT_SPILL_THRESHOLD = 8.0


class _Tier:
    """One zone, one region, or everything: an inner strategy and the in-flight sums."""

    __slots__ = ("inner", "load", "others", "size")

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.size = 0
        self.load = 0  # ours, live
        self.others = 0.0  # other clients', from the published figures (fixed until update)


class Geographic(Strategy):
    """Zone, then region, then anywhere, with an inner strategy per tier (see module doc)."""

    name = "geographic"

    def __init__(
        self,
        spill_threshold: float = DEFAULT_SPILL_THRESHOLD,
        inner: Callable[[], Strategy] = LeastConnections,
    ) -> None:
        if not (spill_threshold >= 0.0 and math.isfinite(spill_threshold)):
            raise ValueError(f"spill_threshold must be finite and >= 0, got {spill_threshold!r}")
        self.spill_threshold = spill_threshold
        self._make_inner = inner
        self._all = _Tier(inner())
        self._zones: dict[str, _Tier] = {}
        self._regions: dict[str, _Tier] = {}
        # node -> (its zone tier, its region tier); None where it has no zone / region
        self._where: dict[str, tuple[_Tier | None, _Tier | None]] = {}
        self._inflight: dict[str, int] = {}
        self._seen: Seen = {}  # for others_inflight
        # Nodes that left with requests in flight: (count, zone, region) until those finish or
        # the node returns with its count (see least_connections.carry_inflight).
        self._ghost: dict[str, tuple[int, str, str]] = {}

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        unique = {ep.node: ep for ep in endpoints}
        for node, count in self._inflight.items():
            if count and node not in unique:
                zone, region = self._where[node]
                self._ghost[node] = (count, self._tier_name(zone), self._tier_name(region))
        by_zone: dict[str, list[Endpoint]] = {}
        by_region: dict[str, list[Endpoint]] = {}
        for node in sorted(unique):
            ep = unique[node]
            if ep.zone:
                by_zone.setdefault(ep.zone, []).append(ep)
            if ep.region:
                by_region.setdefault(ep.region, []).append(ep)
        # Keep the inner strategy of a tier that stays, so its counters survive the update.
        self._zones = self._retier(self._zones, by_zone)
        self._regions = self._retier(self._regions, by_region)
        self._all.inner.update(list(unique.values()))
        self._all.size = len(unique)
        inflight = {
            node: self._inflight.get(node, 0) or self._ghost.pop(node, (0, "", ""))[0]
            for node in unique
        }
        self._inflight = inflight
        nodes = list(unique)
        others, self._seen = others_inflight(
            nodes, published_figures(endpoints), [inflight[n] for n in nodes], self._seen
        )
        self._where = {}
        self._all.load = 0
        self._all.others = 0.0
        for node, estimate in zip(nodes, others, strict=True):
            ep = unique[node]
            zone = self._zones.get(ep.zone) if ep.zone else None
            region = self._regions.get(ep.region) if ep.region else None
            self._where[node] = (zone, region)
            count = inflight[node]
            for tier in (self._all, zone, region):
                if tier is not None:
                    tier.load += count
                    tier.others += estimate

    def _retier(self, old: dict[str, _Tier], groups: dict[str, list[Endpoint]]) -> dict[str, _Tier]:
        tiers: dict[str, _Tier] = {}
        for key in sorted(groups):
            members = groups[key]
            tier = old.get(key)
            if tier is None:
                tier = _Tier(self._make_inner())
            tier.inner.update(members)
            tier.size = len(members)
            tier.load = 0  # recomputed by the caller from the per-node counts
            tier.others = 0.0
            tiers[key] = tier
        return tiers

    def _saturated(self, tier: _Tier, wider: _Tier) -> bool:
        mean = (tier.load + tier.others) / tier.size
        return mean >= self.spill_threshold and mean > (wider.load + wider.others) / wider.size

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        everything = self._all
        if everything.size == 0:
            raise NoEndpoint("no eligible endpoint")
        zone = self._zones.get(request.zone) if request.zone else None
        region = self._regions.get(request.region) if request.region else None
        if zone is not None:
            wider = region if region is not None else everything
            if not self._saturated(zone, wider):
                try:
                    return zone.inner.pick(request, rng, now, exclude)
                except NoEndpoint:
                    pass
        if region is not None and not self._saturated(region, everything):
            try:
                return region.inner.pick(request, rng, now, exclude)
            except NoEndpoint:
                pass
        return everything.inner.pick(request, rng, now, exclude)

    def _finish_ghost(self, node: str, latency: float, ok: bool, now: float) -> None:
        ghost = self._ghost.get(node)
        if ghost is None:
            return
        count, zone, region = ghost
        self._all.inner.on_finish(node, latency, ok, now)  # their own ghosts count down too
        for tier in (self._zones.get(zone), self._regions.get(region)):
            if tier is not None:
                tier.inner.on_finish(node, latency, ok, now)
        if count > 1:
            self._ghost[node] = (count - 1, zone, region)
        else:
            del self._ghost[node]

    def tier_load(self, zone: str = "", region: str = "") -> tuple[int, int] | None:
        """``(in_flight, endpoints)`` of the zone tier (if ``zone``), else the region tier (if
        ``region``), else of all endpoints; None for an unknown zone or region. The count is
        ours only; :meth:`tier_others` has the other clients' share."""
        tier = self._tier(zone, region)
        return None if tier is None else (tier.load, tier.size)

    def tier_others(self, zone: str = "", region: str = "") -> float | None:
        """Other clients' requests in flight in the tier :meth:`tier_load` names (estimated
        from published figures); None for an unknown zone or region."""
        tier = self._tier(zone, region)
        return None if tier is None else tier.others

    def _tier(self, zone: str, region: str) -> _Tier | None:
        if zone:
            return self._zones.get(zone)
        if region:
            return self._regions.get(region)
        return self._all

    def on_start(self, node: str, now: float) -> None:
        where = self._where.get(node)
        if where is None:
            return
        self._inflight[node] += 1
        zone, region = where
        self._all.load += 1
        self._all.inner.on_start(node, now)
        if zone is not None:
            zone.load += 1
            zone.inner.on_start(node, now)
        if region is not None:
            region.load += 1
            region.inner.on_start(node, now)

    def _tier_name(self, tier: _Tier | None) -> str:
        for tiers in (self._zones, self._regions):
            for name, candidate in tiers.items():
                if candidate is tier:
                    return name
        return ""

    def on_finish(self, node: str, latency: float, ok: bool, now: float) -> None:
        where = self._where.get(node)
        if where is None:
            self._finish_ghost(node, latency, ok, now)
            return
        zone, region = where
        self._all.inner.on_finish(node, latency, ok, now)
        if zone is not None:
            zone.inner.on_finish(node, latency, ok, now)
        if region is not None:
            region.inner.on_finish(node, latency, ok, now)
        if self._inflight[node] == 0:
            return  # its count was lost (it left and came back): never go negative
        self._inflight[node] -= 1
        self._all.load -= 1
        if zone is not None:
            zone.load -= 1
        if region is not None:
            region.load -= 1
