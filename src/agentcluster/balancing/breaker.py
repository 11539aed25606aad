"""Per-node circuit breakers (pure core).

Theory of operation: a breaker stops the balancer from sending work to a node that is failing,
so the node gets room to recover and callers fail over at once instead of waiting for timeouts.
Each node has a three-state machine:

* **closed** -- traffic flows; outcomes are tallied. The breaker *opens* on either trigger:
  ``consecutive_failures`` failures in a row (a hard-down node trips it within a handful of
  calls), or a failure *rate* of at least ``failure_rate`` over the last ``window`` seconds once
  that window holds ``min_requests`` outcomes (a node failing every other call never produces a
  long streak, but is just as unhealthy).
* **open** -- no traffic for an open time of ``base_open * 2**(k-1)`` for the k-th consecutive
  opening, capped, with +/- ``jitter`` drawn from the caller's ``random.Random`` so that many
  balancers that saw the same outage do not all probe the node in the same instant.
* **half_open** -- up to ``half_open_probes`` requests are let through as probes. If all of them
  succeed the breaker closes and the backoff resets; the first failure re-opens it for longer.

The cap is a hard bound: the nominal open time is limited to ``max_open / (1 + jitter)`` before
jitter is applied, so the jitter stays symmetric and no open period exceeds ``max_open``.

The failure-rate window is a ring of ``buckets`` time buckets (as in Hystrix and
resilience4j): recording is O(1), and the rate is only summed (O(buckets)) on a failure,
because a success can never open the breaker.

Outcomes that arrive while the breaker is open, or in half-open without a probe outstanding,
are late replies of requests sent before the breaker opened: they say nothing about the node's
state *now*, so they are ignored. A probe that never completes must be recorded as a failure by
the caller when its deadline passes, otherwise the half-open breaker waits for it forever; one
abandoned without an outcome (the caller was cancelled) is handed back with
:meth:`CircuitBreaker.release`, so its slot goes to the next request.

The open -> half_open transition is a timer: :meth:`CircuitBreaker.state` and
:meth:`CircuitBreaker.allow` apply it lazily, and :meth:`Breakers.tick` reports it (with
:meth:`Breakers.next_deadline` saying when to call it) so the balancer can put the node back
among the eligible endpoints.

Typical use by the balancer: endpoints whose breaker is :attr:`BreakerState.OPEN` are not
eligible; after the strategy picks a node, :meth:`CircuitBreaker.allow` is asked (it consumes a
half-open probe) and a refused node is excluded and the pick retried.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

__all__ = ["BreakerConfig", "BreakerState", "Breakers", "CircuitBreaker", "StateChange"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class StateChange(msgspec.Struct, frozen=True):
    """A breaker moved from ``old`` to ``new`` at ``at``; ``until`` is the end of an open
    period (0.0 otherwise)."""

    node: str
    old: BreakerState
    new: BreakerState
    at: float
    reason: str
    until: float = 0.0


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Breaker tuning; times in seconds."""

    # Five failures in a row is Envoy's and Finagle's default for "this node is down": few
    # enough that a dead node is cut off within ~50 ms at 100 rps, many enough that one or two
    # unlucky timeouts do not take a healthy node out.
    consecutive_failures: int = 5
    # Ten seconds of history smooths bursts while still reacting within one window.
    window: float = 10.0
    # Failing half the calls is never "mostly fine"; below that, retries absorb the errors.
    failure_rate: float = 0.5
    # A rate over fewer than 20 outcomes is noise (3 of 5 failing is 60 %); resilience4j and
    # Hystrix use the same order of minimum volume.
    min_requests: int = 20
    # First open period: long enough for a restart or a GC pause to clear, short enough that a
    # blip costs little capacity.
    base_open: float = 1.0
    # Doubling stops at a minute: a node that comes back is found again within a minute.
    max_open: float = 60.0
    # +/- 20 % spreads the probes of many balancers without making the backoff unpredictable.
    jitter: float = 0.2
    # Three successes in a row are good evidence of recovery (one could be luck) while a single
    # failure still re-opens the breaker quickly.
    half_open_probes: int = 3
    # Ten buckets give the window a 10 % resolution.
    buckets: int = 10

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.min_requests < 1 or self.half_open_probes < 1:
            raise ValueError("consecutive_failures, min_requests and half_open_probes must be >= 1")
        if not (self.window > 0.0 and self.base_open > 0.0 and self.max_open >= self.base_open):
            raise ValueError("need window > 0 and 0 < base_open <= max_open")
        if not (0.0 < self.failure_rate <= 1.0 and 0.0 <= self.jitter < 1.0):
            raise ValueError("need 0 < failure_rate <= 1 and 0 <= jitter < 1")
        if self.buckets < 1:
            raise ValueError("buckets must be >= 1")


_DEFAULT = BreakerConfig()


class CircuitBreaker:
    """The breaker of one node (see the module docstring)."""

    __slots__ = (
        "_bucket_width",
        "_consecutive",
        "_epochs",
        "_fails",
        "_generation",
        "_open_until",
        "_probe_ok",
        "_probes_in_flight",
        "_probes_issued",
        "_rng",
        "_state",
        "_totals",
        "config",
        "last_ticket",
        "node",
        "openings",
    )

    def __init__(self, node: str, rng: random.Random, config: BreakerConfig = _DEFAULT) -> None:
        self.node = node
        self.config = config
        self._rng = rng
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        # Consecutive openings without a successful close: the exponent of the backoff.
        self.openings = 0
        self._open_until = 0.0
        self._probes_issued = 0
        self._probes_in_flight = 0
        self._probe_ok = 0
        # Each half-open period has a number; a probe's ticket is it (0: not a probe). An
        # outcome or a cancellation then counts only for the probes of the period it belongs
        # to -- not a request let through while closed, nor a probe of an earlier period.
        self._generation = 0
        self.last_ticket = 0  # the ticket of the request the last allow() let through
        n = config.buckets
        self._bucket_width = config.window / n
        self._epochs = [-1] * n
        self._totals = [0] * n
        self._fails = [0] * n

    # -- queries -------------------------------------------------------------------------------

    def state(self, now: float) -> BreakerState:
        """The state at ``now`` (an expired open period reads as half_open)."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def open_until(self) -> float:
        """End of the current open period (meaningful while open)."""
        return self._open_until

    def window_counts(self, now: float) -> tuple[int, int]:
        """(requests, failures) in the sliding window ending at ``now``."""
        oldest = int(now / self._bucket_width) - self.config.buckets
        total = fails = 0
        for i, epoch in enumerate(self._epochs):
            if epoch > oldest:
                total += self._totals[i]
                fails += self._fails[i]
        return total, fails

    def snapshot(self, now: float) -> dict[str, Any]:
        """Plain data for ``agentcluster routes``."""
        state = self.state(now)
        total, fails = self.window_counts(now)
        return {
            "node": self.node,
            "state": state.value,
            "consecutive_failures": self._consecutive,
            "window_requests": total,
            "window_failures": fails,
            "openings": self.openings,
            "open_until": self._open_until if state is BreakerState.OPEN else None,
            "probes_left": (
                self.config.half_open_probes - self._probes_issued
                if state is BreakerState.HALF_OPEN
                else None
            ),
        }

    # -- transitions ---------------------------------------------------------------------------

    def tick(self, now: float) -> StateChange | None:
        """Apply the open -> half_open timer; the change, if one happened."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._enter_half_open()
            return StateChange(
                self.node, BreakerState.OPEN, BreakerState.HALF_OPEN, now, "open_time_elapsed"
            )
        return None

    def allow(self, now: float) -> bool:
        """May a request be sent now? In half-open this consumes one of the probes, and
        :attr:`last_ticket` names it (pass it to :meth:`record` / :meth:`release`)."""
        self.last_ticket = 0
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._open_until:
                return False
            self._enter_half_open()
        if self._probes_issued < self.config.half_open_probes:
            self._probes_issued += 1
            self._probes_in_flight += 1
            self.last_ticket = self._generation
            return True
        return False

    def record(self, ok: bool, now: float, ticket: int | None = None) -> StateChange | None:
        """Record an outcome; the state change it caused, if any. ``ticket`` (from
        :attr:`last_ticket` when the request was allowed) tells a probe of this half-open
        period from anything else; None: any outcome in half-open counts as a probe's."""
        state = self._state
        if state is BreakerState.CLOSED:
            return self._record_closed(ok, now)
        if state is BreakerState.OPEN:
            if now < self._open_until:
                return None  # a late reply from before the breaker opened
            self._enter_half_open()
        if self._probes_in_flight == 0 or (ticket is not None and ticket != self._generation):
            return None  # not one of this period's probes: a late reply
        self._probes_in_flight -= 1
        if not ok:
            return self._open(now, BreakerState.HALF_OPEN, "probe_failed")
        self._probe_ok += 1
        if self._probe_ok >= self.config.half_open_probes:
            self._reset_closed()
            return StateChange(
                self.node, BreakerState.HALF_OPEN, BreakerState.CLOSED, now, "probes_ok"
            )
        return None

    def release(self, ticket: int | None = None) -> None:
        """A request :meth:`allow` let through was abandoned without an outcome (its caller was
        cancelled): in half-open its probe slot is free again -- if it held one of this
        period's (``ticket``; None: assume it did). It says nothing about the node."""
        if ticket is not None and (ticket == 0 or ticket != self._generation):
            return  # let through while closed, or a probe of an earlier period
        if self._state is BreakerState.HALF_OPEN and self._probes_in_flight > 0:
            self._probes_in_flight -= 1
            self._probes_issued -= 1

    def reset(self) -> None:
        """Forget everything (a node that left and rejoined under the same name)."""
        self._reset_closed()

    def _record_closed(self, ok: bool, now: float) -> StateChange | None:
        idx = int(now / self._bucket_width)
        slot = idx % self.config.buckets
        if self._epochs[slot] != idx:
            self._epochs[slot] = idx
            self._totals[slot] = 0
            self._fails[slot] = 0
        self._totals[slot] += 1
        if ok:
            self._consecutive = 0
            return None
        self._fails[slot] += 1
        self._consecutive += 1
        cfg = self.config
        if self._consecutive >= cfg.consecutive_failures:
            return self._open(now, BreakerState.CLOSED, "consecutive_failures")
        total, fails = self.window_counts(now)
        if total >= cfg.min_requests and fails >= cfg.failure_rate * total:
            return self._open(now, BreakerState.CLOSED, "failure_rate")
        return None

    def _open(self, now: float, old: BreakerState, reason: str) -> StateChange:
        cfg = self.config
        self.openings += 1
        # 2**k overflows a float long after it passes the cap; stop the exponent early.
        nominal = cfg.base_open * 2.0 ** min(self.openings - 1, 62)
        nominal = min(nominal, cfg.max_open / (1.0 + cfg.jitter))
        duration = nominal * self._rng.uniform(1.0 - cfg.jitter, 1.0 + cfg.jitter)
        self._state = BreakerState.OPEN
        self._open_until = now + min(duration, cfg.max_open)
        self._consecutive = 0
        self._probes_issued = self._probes_in_flight = self._probe_ok = 0
        return StateChange(self.node, old, BreakerState.OPEN, now, reason, self._open_until)

    def _enter_half_open(self) -> None:
        self._state = BreakerState.HALF_OPEN
        self._generation += 1
        self._probes_issued = self._probes_in_flight = self._probe_ok = 0

    def _reset_closed(self) -> None:
        self._state = BreakerState.CLOSED
        self.openings = 0
        self._consecutive = 0
        self._open_until = 0.0
        self._probes_issued = self._probes_in_flight = self._probe_ok = 0
        n = self.config.buckets
        self._epochs = [-1] * n
        self._totals = [0] * n
        self._fails = [0] * n


class Breakers:
    """One :class:`CircuitBreaker` per node, created on first use."""

    __slots__ = ("_breakers", "_rng", "config")

    def __init__(self, rng: random.Random, config: BreakerConfig = _DEFAULT) -> None:
        self.config = config
        self._rng = rng
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, node: str) -> CircuitBreaker:
        breaker = self._breakers.get(node)
        if breaker is None:
            breaker = self._breakers[node] = CircuitBreaker(node, self._rng, self.config)
        return breaker

    def __contains__(self, node: object) -> bool:
        return node in self._breakers

    def __len__(self) -> int:
        return len(self._breakers)

    def remove(self, node: str) -> None:
        self._breakers.pop(node, None)

    def allow(self, node: str, now: float) -> bool:
        breaker = self._breakers.get(node)
        return True if breaker is None else breaker.allow(now)

    def record(
        self, node: str, ok: bool, now: float, ticket: int | None = None
    ) -> StateChange | None:
        return self.get(node).record(ok, now, ticket)

    def release(self, node: str, ticket: int | None = None) -> None:
        breaker = self._breakers.get(node)
        if breaker is not None:
            breaker.release(ticket)

    def ticket(self, node: str) -> int:
        """The probe ticket of the request the node's breaker last let through (0: none)."""
        breaker = self._breakers.get(node)
        return 0 if breaker is None else breaker.last_ticket

    def state(self, node: str, now: float) -> BreakerState:
        breaker = self._breakers.get(node)
        return BreakerState.CLOSED if breaker is None else breaker.state(now)

    def eligible(self, node: str, now: float) -> bool:
        """Closed or half-open: the node may be offered to the strategy."""
        breaker = self._breakers.get(node)
        return breaker is None or breaker.state(now) is not BreakerState.OPEN

    def open_nodes(self, now: float) -> list[str]:
        """Nodes whose breaker is open at ``now``, sorted."""
        return sorted(
            node for node, b in self._breakers.items() if b.state(now) is BreakerState.OPEN
        )

    def tick(self, now: float) -> list[StateChange]:
        """Apply due open -> half_open timers (nodes in insertion order)."""
        changes: list[StateChange] = []
        for breaker in self._breakers.values():
            change = breaker.tick(now)
            if change is not None:
                changes.append(change)
        return changes

    def next_deadline(self) -> float | None:
        """The earliest end of an open period, or None when no breaker is open."""
        deadline: float | None = None
        for breaker in self._breakers.values():
            if breaker._state is BreakerState.OPEN and (
                deadline is None or breaker._open_until < deadline
            ):
                deadline = breaker._open_until
        return deadline

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Every breaker's snapshot, sorted by node."""
        return [self._breakers[node].snapshot(now) for node in sorted(self._breakers)]
