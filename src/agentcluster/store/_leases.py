"""Lease deadlines, kept by the driver of a store rather than in its replicated state.

Theory of operation: the replicated state (:class:`~agentcluster.store._kv.KVStateMachine`)
knows each lease's id and TTL, but not when it expires -- replicas' clocks disagree, so, as in
etcd, only the current leader (or the single memory store) counts TTLs down. :class:`LeaseTimers`
is that countdown as a pure core: it is told ``now`` on every call and answers which leases
are due, so the driver can propose their revocation.

* :meth:`~LeaseTimers.grant` and :meth:`~LeaseTimers.keepalive` set a lease's deadline to
  ``now + ttl``; a keep-alive that arrives at or after the deadline is refused (the lease is
  already dead even if its revocation has not been applied yet).
* :meth:`~LeaseTimers.expired` reports due leases (sorted, so the revocations a driver proposes
  are deterministic) and postpones each report by ``retry_interval``: a driver whose revocation
  is still in flight is not asked again at once, but is asked again if the revocation got lost.
  The driver calls :meth:`~LeaseTimers.forget` once a revocation is applied.
* :meth:`~LeaseTimers.reset_all` is what a new leader does on promotion: every lease of the
  replicated state restarts its full TTL from ``now`` (a lease never expires early because its
  old leader's timer was lost; at worst it lives one TTL longer).

Deadlines sit in a heap with lazy deletion, so every call is ``O(log n)`` amortized.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

__all__ = ["LeaseTimers"]


class LeaseTimers:
    """TTL countdown of leases; see the module docstring."""

    def __init__(self, *, retry_interval: float = 1.0) -> None:
        if not retry_interval > 0:
            raise ValueError("retry_interval must be positive")
        self.retry_interval = retry_interval
        self._ttl: dict[int, float] = {}
        self._deadline: dict[int, float] = {}  # when the lease dies
        self._due: dict[int, float] = {}  # when to report it next (its deadline, or a retry)
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._ttl)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._ttl

    def ttl(self, lease_id: int) -> float | None:
        return self._ttl.get(lease_id)

    def deadline(self, lease_id: int) -> float | None:
        """When the lease expires (None: unknown lease)."""
        return self._deadline.get(lease_id)

    def grant(self, lease_id: int, ttl: float, now: float) -> None:
        """Start (or restart) counting ``lease_id`` down from ``now``."""
        if not ttl > 0:
            raise ValueError(f"lease ttl must be positive, not {ttl!r}")
        self._ttl[lease_id] = ttl
        self._schedule(lease_id, now + ttl)

    def keepalive(self, lease_id: int, now: float) -> bool:
        """Restart the TTL; False when the lease is unknown or already expired."""
        ttl = self._ttl.get(lease_id)
        if ttl is None or now >= self._deadline[lease_id]:
            return False
        self._schedule(lease_id, now + ttl)
        return True

    def forget(self, lease_id: int) -> None:
        """Stop tracking the lease (revoked, or its revocation applied)."""
        self._ttl.pop(lease_id, None)
        self._deadline.pop(lease_id, None)
        self._due.pop(lease_id, None)

    def expired(self, now: float) -> list[int]:
        """Leases whose deadline is <= ``now`` and not reported in the last retry interval."""
        found: list[int] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, lease_id = heapq.heappop(heap)
            if self._due.get(lease_id) != due:
                continue  # superseded by a keep-alive, a report or a forget
            found.append(lease_id)
        for lease_id in found:
            self._due[lease_id] = now + self.retry_interval
            heapq.heappush(heap, (now + self.retry_interval, lease_id))
        found.sort()
        return found

    def next_deadline(self) -> float:
        """When :meth:`expired` will next have something to say (``math.inf``: never)."""
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def reset_all(self, leases: Mapping[int, float], now: float) -> None:
        """Track exactly ``leases`` (id -> ttl), each with a full TTL from ``now``."""
        self._ttl = {}
        self._deadline = {}
        self._due = {}
        self._heap = []
        for lease_id in sorted(leases):
            self.grant(lease_id, leases[lease_id], now)

    def _schedule(self, lease_id: int, deadline: float) -> None:
        self._deadline[lease_id] = deadline
        self._due[lease_id] = deadline
        heapq.heappush(self._heap, (deadline, lease_id))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._due):
            # Keep-alives leave stale entries behind; rebuild before they pile up.
            self._heap = [(due, i) for i, due in self._due.items()]
            heapq.heapify(self._heap)
