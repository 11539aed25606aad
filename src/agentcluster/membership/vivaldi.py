"""Vivaldi network coordinates (pure core).

Theory of operation: every node holds a :class:`Coordinate` — a point in an ``n``-dimensional
Euclidean space, plus a *height* (the latency of the node's own access link, which no path can
avoid) and an *adjustment* (the node's mean residual, which soaks up what the embedding cannot
express). The estimated round trip between two nodes is::

    rtt(a, b) = |a.vec - b.vec| + a.height + b.height (+ a.adjustment + b.adjustment if > 0)

Each time a probe measures an RTT to a peer (whose coordinate rides on the ack), the node moves
its own point like a mass on a spring (Dabek et al., "Vivaldi: A Decentralized Network
Coordinate System", SIGCOMM 2004): pushed away if the estimate was too short, pulled closer if
too long. The step is scaled by a confidence weight — a node that is unsure of itself (high
``error``) and hears from a confident peer moves a lot; a confident node barely moves for an
unsure peer. Around that core, as in Hashicorp's ``serf/coordinate``:

* a per-peer **median latency filter** over the last few samples drops one-off spikes
  (Ledlie et al., "Network Coordinates in the Wild", NSDI 2007);
* **height vectors** model access-link latency (Dabek et al.);
* an **adjustment** term, the mean of the recent residuals over a window, halved because both
  ends add theirs (Lee et al., "On suitability of Euclidean embedding...", 2010);
* a weak **gravity** toward the origin that keeps the whole system from drifting away as
  every node only ever applies relative forces.

Everything is deterministic given the caller's ``random.Random`` (used only to pick a direction
when two points coincide). Invalid input raises :class:`ValueError` so the caller can count and
drop it; the core's own coordinate is reset if arithmetic ever produced a non-finite value.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from dataclasses import dataclass

import msgspec

__all__ = [
    "Coordinate",
    "Vivaldi",
    "VivaldiConfig",
    "VivaldiStats",
    "estimate_rtt",
    "valid_coordinate",
]

# Below this, distances and weights are treated as zero (avoids dividing by ~0).
_ZERO = 1.0e-6


class Coordinate(msgspec.Struct, frozen=True, array_like=True):
    """A node's network coordinate; travels on the wire inside SWIM acks."""

    vec: tuple[float, ...]  # Euclidean part, 8 dimensions by default
    error: float  # confidence (starts at max_error)
    adjustment: float  # per-node mean adjustment term (Serf's "adjustment")
    height: float  # height vector component (access-link latency)


@dataclass(frozen=True)
class VivaldiConfig:
    """Tuning of the coordinate system; defaults are Serf's, which are tested at scale."""

    # Ledlie et al. saw no accuracy gain beyond ~7 dimensions; 8 keeps Serf compatibility.
    dimensionality: int = 8
    # Error of a coordinate that has seen nothing, and the ceiling error can never exceed, so
    # one wild sample cannot make a node look infinitely unsure.
    max_error: float = 1.5
    # How much one observation can move the node's confidence (c_e in the paper).
    ce: float = 0.25
    # How much one observation can move the node's position (c_c in the paper); 0.25 converges
    # in a few hundred samples without oscillating.
    cc: float = 0.25
    # Residual samples averaged into the adjustment term: long enough to average out noise,
    # short enough to follow a route change within a few probe rounds.
    adjustment_window: int = 20
    # Heights stay strictly positive so the height gradient never vanishes (10 us).
    height_min: float = 10.0e-6
    # Median of the last 3 RTTs per peer: the smallest window that rejects a single outlier.
    latency_filter_size: int = 3
    # Gravity scale (seconds): a point 150 s from the origin feels a unit pull, so gravity only
    # matters against slow drift and never distorts real distances (tens of ms).
    gravity_rho: float = 150.0
    # RTTs above this (seconds) are measurement errors (a stalled process, a clock jump).
    max_rtt: float = 10.0

    def __post_init__(self) -> None:
        if self.dimensionality < 1:
            raise ValueError("dimensionality must be >= 1")
        if self.adjustment_window < 0 or self.latency_filter_size < 1:
            raise ValueError("adjustment_window must be >= 0 and latency_filter_size >= 1")
        if not (self.max_error > 0 and self.ce > 0 and self.cc > 0 and self.gravity_rho > 0):
            raise ValueError("max_error, ce, cc and gravity_rho must be positive")
        if not (self.height_min > 0 and self.max_rtt > 0):
            raise ValueError("height_min and max_rtt must be positive")


@dataclass
class VivaldiStats:
    """Counters for observability."""

    updates: int = 0
    resets: int = 0


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _raw_distance(a: Coordinate, b: Coordinate) -> float:
    return math.dist(a.vec, b.vec) + a.height + b.height


def estimate_rtt(a: Coordinate, b: Coordinate) -> float:
    """Estimated round-trip time between two coordinates, in seconds.

    The adjustments are applied only when the result stays positive: they are mean residuals
    and can be negative, but a negative RTT is meaningless.
    """
    if len(a.vec) != len(b.vec):
        raise ValueError(f"coordinate dimensions differ: {len(a.vec)} != {len(b.vec)}")
    dist = _raw_distance(a, b)
    adjusted = dist + a.adjustment + b.adjustment
    return adjusted if adjusted > 0.0 else dist


def _valid(c: Coordinate, dim: int) -> bool:
    return (
        len(c.vec) == dim
        and all(_finite(x) for x in c.vec)
        and _finite(c.error)
        and c.error >= 0.0
        and _finite(c.adjustment)
        and _finite(c.height)
        and c.height >= 0.0
    )


def valid_coordinate(c: Coordinate, dim: int | None = None) -> bool:
    """Whether ``c`` is usable: finite, non-negative error and height, ``dim`` dimensions (any
    non-zero number when ``dim`` is None). A peer's coordinate is checked before it is kept."""
    return len(c.vec) >= 1 and _valid(c, len(c.vec) if dim is None else dim)


class Vivaldi:
    """One node's coordinate, updated from RTT observations of its peers."""

    def __init__(
        self, config: VivaldiConfig | None = None, rng: random.Random | None = None
    ) -> None:
        self.config = config or VivaldiConfig()
        # A fixed default seed keeps behaviour reproducible when the caller does not care.
        self._rng = rng if rng is not None else random.Random(0)
        self._coord = self._origin_coordinate()
        self._origin = self._coord
        self._samples: dict[str, deque[float]] = {}
        self._residuals = [0.0] * self.config.adjustment_window
        self._residual_index = 0
        self.stats = VivaldiStats()

    def _origin_coordinate(self) -> Coordinate:
        cfg = self.config
        return Coordinate(
            vec=(0.0,) * cfg.dimensionality,
            error=cfg.max_error,
            adjustment=0.0,
            height=cfg.height_min,
        )

    @property
    def coordinate(self) -> Coordinate:
        return self._coord

    def observe(self, peer: str, peer_coord: Coordinate, rtt: float) -> Coordinate:
        """Fold one RTT sample (seconds) to ``peer`` into our coordinate; returns the new one.

        Raises ValueError for a non-finite, negative or too large RTT, or a peer coordinate
        that is malformed or of another dimensionality; the state is untouched then.
        """
        cfg = self.config
        if not (_finite(rtt) and 0.0 <= rtt <= cfg.max_rtt):
            raise ValueError(f"invalid rtt {rtt!r} (must be within [0, {cfg.max_rtt}] s)")
        if not _valid(peer_coord, cfg.dimensionality):
            raise ValueError(f"invalid peer coordinate from {peer!r}: {peer_coord!r}")
        filtered = self._filter(peer, rtt)
        try:
            self._update_position(peer_coord, filtered)
            self._update_adjustment(peer_coord, filtered)
            self._update_gravity()
            healthy = _valid(self._coord, cfg.dimensionality)
        except ArithmeticError:
            healthy = False
        if not healthy:
            # Numerical blow-up: start over rather than spread NaN to every peer.
            self.stats.resets += 1
            self.reset()
        self.stats.updates += 1
        return self._coord

    def forget(self, peer: str) -> None:
        """Drop the latency samples of a peer that left (bounds memory to live peers)."""
        self._samples.pop(peer, None)

    def reset(self) -> None:
        """Back to the origin with maximal error; keeps nothing learned."""
        self._coord = self._origin_coordinate()
        self._samples.clear()
        self._residuals = [0.0] * self.config.adjustment_window
        self._residual_index = 0

    def estimate_rtt(self, peer_coord: Coordinate) -> float:
        """Estimated RTT (seconds) from this node to a peer's coordinate."""
        return estimate_rtt(self._coord, peer_coord)

    # -- internals ---------------------------------------------------------------------------

    def _filter(self, peer: str, rtt: float) -> float:
        window = self._samples.get(peer)
        if window is None:
            window = self._samples[peer] = deque(maxlen=self.config.latency_filter_size)
        window.append(rtt)
        return statistics.median(window)

    def _update_position(self, other: Coordinate, rtt: float) -> None:
        cfg = self.config
        me = self._coord
        rtt = max(rtt, _ZERO)
        dist = estimate_rtt(me, other)
        # Relative error of this sample: the quantity Vivaldi minimises.
        wrongness = abs(dist - rtt) / rtt
        # Trust the side that is more certain: our weight is our share of the total error.
        weight = me.error / max(me.error + other.error, _ZERO)
        error = cfg.ce * weight * wrongness + me.error * (1.0 - cfg.ce * weight)
        error = min(error, cfg.max_error)
        force = cfg.cc * weight * (rtt - dist)
        moved = self._apply_force(me, force, other)
        self._coord = Coordinate(moved.vec, error, moved.adjustment, moved.height)

    def _apply_force(self, me: Coordinate, force: float, other: Coordinate) -> Coordinate:
        """Move ``me`` by ``force`` seconds along the direction away from ``other``.

        The height takes its share of the move in proportion to how much of the distance it
        accounts for, so access-link latency ends up in the heights and not in the plane.
        """
        unit, mag = self._unit_vector(me.vec, other.vec)
        vec = tuple(x + u * force for x, u in zip(me.vec, unit, strict=True))
        height = me.height
        if mag > _ZERO:
            height = (me.height + other.height) * force / mag + me.height
            height = max(height, self.config.height_min)
        return Coordinate(vec, me.error, me.adjustment, height)

    def _unit_vector(
        self, a: tuple[float, ...], b: tuple[float, ...]
    ) -> tuple[tuple[float, ...], float]:
        diff = [x - y for x, y in zip(a, b, strict=True)]
        mag = math.hypot(*diff)
        if mag > _ZERO:
            return tuple(d / mag for d in diff), mag
        # Coincident points (every node starts at the origin): push in a random direction so
        # nodes separate; magnitude 0 tells the caller not to touch the height.
        rnd = [self._rng.random() - 0.5 for _ in diff]
        rmag = math.hypot(*rnd)
        if rmag > _ZERO:
            return tuple(r / rmag for r in rnd), 0.0
        first = [0.0] * len(diff)
        first[0] = 1.0
        return tuple(first), 0.0

    def _update_adjustment(self, other: Coordinate, rtt: float) -> None:
        size = self.config.adjustment_window
        if size == 0:
            return
        # Raw distance: the adjustments themselves must not feed back into their own estimate.
        self._residuals[self._residual_index] = rtt - _raw_distance(self._coord, other)
        self._residual_index = (self._residual_index + 1) % size
        # Halved: the residual of a pair is shared by both ends' adjustments.
        adjustment = math.fsum(self._residuals) / (2.0 * size)
        c = self._coord
        self._coord = Coordinate(c.vec, c.error, adjustment, c.height)

    def _update_gravity(self) -> None:
        c = self._coord
        dist = estimate_rtt(self._origin, c)
        ratio = dist / self.config.gravity_rho
        # A product, not ``**``: on absurd input it saturates to inf (then reset) instead of
        # raising OverflowError.
        force = -(ratio * ratio)
        moved = self._apply_force(c, force, self._origin)
        self._coord = Coordinate(moved.vec, c.error, c.adjustment, moved.height)
