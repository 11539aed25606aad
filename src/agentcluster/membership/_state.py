"""Plain records of the SWIM core: per-member state, the probe in flight, counters.

Theory of operation: these are the mutable rows behind :class:`~.swim.Swim` -- kept separate
so the protocol module reads as protocol. Nothing here decides anything.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from agentcluster.membership._suspicion import Suspicion
from agentcluster.membership.messages import MemberState, NodeMeta
from agentcluster.membership.vivaldi import Coordinate

__all__ = [
    "DIRECT",
    "INDIRECT",
    "T_LEARN",
    "T_NACK",
    "T_REAP",
    "T_RELAY_END",
    "T_SUSPECT",
    "NodeState",
    "PendingStream",
    "Probe",
    "Relay",
    "SwimStats",
    "Timers",
]

# Probe phases.
DIRECT, INDIRECT = range(2)
# Kinds of timer in the core's heap: a suspicion expiring, a relayed probe owing its requester
# a nack, a relay ending, a dead member to forget, a stranger to sync with.
T_SUSPECT, T_NACK, T_RELAY_END, T_REAP, T_LEARN = range(5)


@dataclass
class SwimStats:
    """Counters; ``packets``/``bytes`` are what the core built, by packet type."""

    probes: int = 0
    probe_failures: int = 0
    acks: int = 0
    nacks_received: int = 0
    nacks_missing: int = 0
    indirect_sent: int = 0
    indirect_handled: int = 0
    acks_relayed: int = 0
    nacks_sent: int = 0
    stream_pings: int = 0
    tcp_only_acks: int = 0
    urgent_probes: int = 0
    suspicions: int = 0
    confirmations: int = 0
    refutations: int = 0
    deaths_declared: int = 0
    gossip_packets: int = 0
    push_pulls: int = 0
    push_pulls_handled: int = 0
    push_pull_failures: int = 0
    join_failures: int = 0
    conflicts: int = 0
    rtt_samples: int = 0
    packets: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class NodeState:
    """What we hold about one member (ourselves included)."""

    __slots__ = (
        "addr",
        "changed_at",
        "coord",
        "incarnation",
        "meta",
        "name",
        "state",
        "suspicion",
        "version",
    )

    def __init__(
        self, name: str, addr: str, state: MemberState, inc: int, meta: NodeMeta, now: float
    ) -> None:
        self.name = name
        self.addr = addr
        self.state: MemberState = state
        self.incarnation = inc
        self.meta = meta
        self.changed_at = now
        self.coord: Coordinate | None = None
        self.suspicion: Suspicion | None = None
        self.version = 0  # bumped on every state change; identifies reap timers


class Probe:
    """The probe round in flight (at most one at a time)."""

    __slots__ = (
        "addr",
        "deadline",
        "helpers",
        "incarnation",
        "interval",
        "nacks",
        "phase",
        "retried",
        "retries_left",
        "sent_at",
        "seq",
        "start",
        "target",
        "timeout",
    )

    def __init__(
        self, seq: int, st: NodeState, now: float, interval: float, timeout: float, retries: int
    ) -> None:
        self.seq = seq
        self.target = st.name
        self.addr = st.addr
        self.incarnation = st.incarnation
        self.start = now
        self.sent_at = now
        self.interval = interval
        self.timeout = timeout
        self.deadline = now + timeout
        self.retries_left = retries
        self.retried = False
        self.phase = DIRECT
        self.helpers: dict[str, None] = {}
        self.nacks: dict[str, None] = {}


@dataclass(slots=True)
class Relay:
    """An indirect ping we are carrying out for a requester."""

    seq: int  # the requester's sequence number
    addr: str  # the requester's address
    target: str
    nack: bool


@dataclass(slots=True)
class PendingStream:
    kind: str  # "join" | "push_pull" | "ping"
    seq: int = 0
    target: str = ""


class Timers:
    """A heap of ``(deadline, kind, key, token)``; entries are never removed, the caller
    checks ``token`` against current state when one pops (lazy cancellation)."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, str | int, int]] = []
        self._seq = 0  # tie-break: equal deadlines pop in push order

    def push(self, at: float, kind: int, key: str | int, token: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, key, token))

    @property
    def next_at(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def pop_due(self, now: float) -> tuple[int, str | int, int] | None:
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, kind, key, token = heapq.heappop(self._heap)
        return kind, key, token
