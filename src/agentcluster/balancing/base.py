"""What every balancing strategy shares: endpoints, requests, the strategy interface.

Theory of operation: a strategy is a pure core. The LoadBalancer agent decides *which*
endpoints are eligible (alive, not quarantined, breaker not open, not ejected, slow-start
weights) and hands them to the strategy with :meth:`Strategy.update` whenever that set or its
weights change -- rarely, compared with picks. :meth:`Strategy.pick` then answers from tables
built in ``update``, in O(1) or O(log n): it is a function call on the hot path of every
request, never a mailbox, and must stay allocation-light.

Feedback flows back through :meth:`Strategy.on_start` (a request was sent to a node) and
:meth:`Strategy.on_finish` (it completed, with its latency and outcome), which stateful
strategies (least connections, peak EWMA, adaptive) use; stateless ones ignore them.

Those hooks count only the requests *this* balancer sent. What other clients send a node
arrives as ``Endpoint.in_flight``, the node's own count of the calls it serves, published in
its membership metadata: complete but stale (up to a report period, 5 s, plus gossip).
:func:`published_inflight` turns a peer's figure into a safe number; how it is combined with
the live counts, without counting our own calls twice, is
:func:`~agentcluster.balancing.least_connections.others_inflight`.

Nothing here reads a clock or the global ``random``: ``now`` and a seeded ``random.Random``
come from the caller, so a simulation replays exactly.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import msgspec

__all__ = [
    "EMPTY_REQUEST",
    "Endpoint",
    "NoEndpoint",
    "PickRequest",
    "Strategy",
    "published_inflight",
    "published_report",
]


class NoEndpoint(Exception):
    """No eligible endpoint (empty set, or every one excluded)."""


class Endpoint(msgspec.Struct, frozen=True):
    """One node as the balancer sees it."""

    node: str
    weight: float = 1.0  # relative capacity (> 0); slow start and capacity scores scale it
    zone: str = ""
    region: str = ""
    # Load reports carried with the node's metadata, as fractions of capacity (0..1).
    cpu: float = 0.0
    memory: float = 0.0
    network: float = 0.0
    # Calls the node is serving, as it last reported itself: every client's, ours included,
    # and stale by up to a report period (see the module doc). Counted per node, not per
    # capability: the calls share its CPU whichever agent serves them.
    in_flight: float = 0.0
    # Which of the node's load reports ``in_flight`` comes from (a counter it bumps per
    # report): a new report re-bases what is ours in the figure even when the figure itself
    # is unchanged -- the calls behind one total may have changed hands.
    load_report: int = 0


def published_inflight(value: object) -> float:
    """A peer's published in-flight figure as a count >= 0. It comes from another node's
    metadata, so anything but a finite number >= 0 (NaN, infinity, a negative, a string, a
    bool, an int too large for a float) reads as 0: a garbled report must neither crash
    routing nor make a node look infinitely busy -- the live counts still hold it back."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        figure = float(value)
    except OverflowError:
        return 0.0
    return figure if 0.0 <= figure < math.inf else 0.0


def published_report(value: object) -> int:
    """A peer's published load-report number as an int >= 0; anything else reads as 0."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        return 0
    return value


class PickRequest(msgspec.Struct, frozen=True):
    """What a pick may depend on: a key (sticky sessions, hashing) and where the client is."""

    key: str | None = None
    zone: str = ""
    region: str = ""


EMPTY_REQUEST = PickRequest()


class Strategy(ABC):
    """A balancing strategy (pure; see the module docstring)."""

    name: ClassVar[str]

    @abstractmethod
    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the eligible endpoints (order is irrelevant; node names are unique)."""

    @abstractmethod
    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        """The node to send ``request`` to; never one in ``exclude`` (a retry's earlier
        attempts). Raises :class:`NoEndpoint` when nothing is eligible."""

    def on_start(self, node: str, now: float) -> None:  # noqa: B027 - optional hook
        """A request was sent to ``node``."""

    def on_finish(self, node: str, latency: float, ok: bool, now: float) -> None:  # noqa: B027
        """A request to ``node`` completed after ``latency`` seconds; ``ok`` False for an
        error or timeout."""
