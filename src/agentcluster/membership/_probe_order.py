"""Who to probe next: SWIM's shuffled round robin, and a consistent-hash ring.

Theory of operation: **round robin.** Each pass walks a random permutation of the live members
and is reshuffled when it ends, so every member is probed by every other member once per pass
(SWIM's time-bounded completeness) while the order stays unpredictable. A member that joins
mid-pass is appended and swapped with a random position (O(1), as memberlist does); a member
that dies is skipped when its turn comes and dropped at the next reshuffle -- no O(n) work per
change, O(n) once per pass of n rounds.

**Ring.** Members are also placed on a ring by a stable 64-bit hash of their name (never
Python's randomized ``hash``), the same on every node. Probing one's ring successor gives every
member a fixed predecessor that probes it at a regular interval, which bounds the time until a
crash is first noticed -- n independent round robins only make it exponential. The ring also
names, for any member, its next few successors: the members that go and check a fresh
suspicion of it. Every node computes that from its own view, so all agree up to view skew.

**Roster.** The live members again, as an array with a position index, for O(1) random
choices (indirect helpers, gossip targets) and O(1) removal (swap with the last).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence

__all__ = ["ProbeOrder", "Roster", "ring_key"]


def ring_key(name: str) -> tuple[int, str]:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big"), name


class ProbeOrder:
    def __init__(self, rng: random.Random, self_name: str) -> None:
        self._rng = rng
        self._self_key = ring_key(self_name)
        self._ring: list[tuple[int, str]] = [self._self_key]
        self._order: list[str] = []
        self._in_order: dict[str, None] = {}
        self._index = 0

    # -- membership changes ------------------------------------------------------------------
    def add(self, name: str) -> None:
        """``name`` became live (alive or suspect) and is not ourselves."""
        key = ring_key(name)
        i = bisect.bisect_left(self._ring, key)
        if i == len(self._ring) or self._ring[i] != key:
            self._ring.insert(i, key)
        if name not in self._in_order:
            self._in_order[name] = None
            self._order.append(name)
            last = len(self._order) - 1
            pos = self._rng.randint(0, last)
            self._order[pos], self._order[last] = self._order[last], self._order[pos]

    def remove(self, name: str) -> None:
        """``name`` is dead, left or forgotten (the round robin skips it lazily)."""
        key = ring_key(name)
        i = bisect.bisect_left(self._ring, key)
        if i < len(self._ring) and self._ring[i] == key and key != self._self_key:
            del self._ring[i]

    # -- choices -----------------------------------------------------------------------------
    def next_round_robin(self, live: Sequence[str], probeable: Callable[[str], bool]) -> str | None:
        """The next probeable member of the current pass, reshuffling ``live`` at its end."""
        budget = len(self._order) + len(live) + 2
        while budget > 0:
            budget -= 1
            if self._index >= len(self._order):
                self._order = list(live)
                self._rng.shuffle(self._order)
                self._in_order = dict.fromkeys(self._order)
                self._index = 0
                if not self._order:
                    return None
            name = self._order[self._index]
            self._index += 1
            if probeable(name):
                return name
        return None

    def successor(self) -> str | None:
        """Our ring successor, or ``None`` when we are alone."""
        if len(self._ring) < 2:
            return None
        i = bisect.bisect_right(self._ring, self._self_key) % len(self._ring)
        return self._ring[i][1]

    def successors_of(self, name: str, count: int, skip: Callable[[str], bool]) -> list[str]:
        """Up to ``count`` members following ``name`` on the ring, ``skip``-ped ones excluded
        (``name`` itself is never included)."""
        ring = self._ring
        if count <= 0 or len(ring) < 2:
            return []
        start = bisect.bisect_right(ring, ring_key(name))
        found: list[str] = []
        for step in range(len(ring)):
            other = ring[(start + step) % len(ring)][1]
            if other == name:
                break
            if skip(other):
                continue
            found.append(other)
            if len(found) >= count:
                break
        return found

    def ring_members(self) -> list[str]:
        return [name for _, name in self._ring]


class Roster:
    """The live members other than us (alive or suspect), indexable for O(1) random picks,
    and the recently dead ones (still worth gossiping to: if alive, they refute)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.live: list[str] = []
        self._pos: dict[str, int] = {}
        # Insertion-ordered by time of death, so expiry pops from the front.
        self._dead: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.live)

    def __contains__(self, name: str) -> bool:
        return name in self._pos

    def add(self, name: str) -> bool:
        if name in self._pos:
            return False
        self._pos[name] = len(self.live)
        self.live.append(name)
        self._dead.pop(name, None)
        return True

    def remove(self, name: str, now: float) -> None:
        pos = self._pos.pop(name, None)
        if pos is not None:
            last = self.live.pop()
            if last != name:
                self.live[pos] = last
                self._pos[last] = pos
        self._dead.pop(name, None)
        self._dead[name] = now

    def forget(self, name: str) -> None:
        self._dead.pop(name, None)

    def sample(self, k: int, ok: Callable[[str], bool]) -> list[str]:
        """Up to ``k`` distinct random live members accepted by ``ok``: rejection sampling on
        large rosters (O(k)), a filtered sample on small ones."""
        live, rng = self.live, self._rng
        if k <= 0 or not live:
            return []
        if len(live) <= 4 * k + 8:
            candidates = [name for name in live if ok(name)]
            return rng.sample(candidates, min(k, len(candidates)))
        chosen: dict[str, None] = {}
        for _ in range(8 * k + 16):
            name = live[rng.randrange(len(live))]
            if name not in chosen and ok(name):
                chosen[name] = None
                if len(chosen) == k:
                    break
        return list(chosen)

    def gossip_targets(self, k: int, dead_since: float) -> list[str]:
        """``k`` random members among the live and those dead after ``dead_since``."""
        dead = self._dead
        while dead:
            name, died = next(iter(dead.items()))
            if died >= dead_since:
                break
            del dead[name]
        recent = list(dead)
        total = len(self.live) + len(recent)
        picks = self._rng.sample(range(total), min(k, total))
        n = len(self.live)
        return [self.live[i] if i < n else recent[i - n] for i in picks]
