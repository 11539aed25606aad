"""Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
Load Balancer", NSDI 2016).

Theory of operation: each backend gets a permutation of the lookup-table slots from two stable
hashes of its name (``offset`` and ``skip``; with a prime table size every skip visits every
slot). Backends then take turns claiming the next free slot of their own permutation until
the table is full. Because each backend's preference order depends only on its own name, a
membership change disturbs few slots: removing 1 of N backends moves about 1/N of the keys
(those it owned) plus a small extra share. A key is hashed once and read from the table, so a
pick is O(1): one BLAKE2b digest and one list index.

Table size: a prime ``>= 100 * n`` (the paper keeps ``M > 100 N`` so that each backend's share
stays within about 1% of fair), taken from a ladder ``next_prime(min_table_size * 2**k)``
(65,537 by default, the paper's small table). The size changes only when the node count crosses
a rung (up) or falls below a quarter of it (down): a size change remaps nearly every key, so it
must not happen on every membership change of a large cluster. Weights use proportional
filling turns (as Envoy does): a backend with half the largest weight claims a slot every
second round, so table shares follow weights.

Building the table is the costly part (``M ln M`` probes in the paper's loop: the last free
slots are found by long walks). This module runs the paper's loop until ``sqrt(M)``-ish slots
remain, then finishes with an equivalent exact rule: a backend's next slot is the free slot
earliest in its permutation, found from the slot's position ``(slot - offset) * skip^-1 mod M``.
Both give the paper's table (a test checks it against the plain loop); the switch removes the
long walks. Unchanged endpoints (same names and weights) skip the rebuild.

Picks: a request with a key reads ``table[hash(key) % M]``. A request without a key draws a
slot from the caller's seeded ``rng`` (so it still follows the weights and replays from the
seed). ``exclude`` (a retry's earlier attempts) walks forward to the next slot whose backend is
not excluded, which is itself a consistent choice per key.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence

from agentcluster.balancing._hashing import hash64, hash64_pair, hash_signature, next_prime
from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy

__all__ = ["DEFAULT_TABLE_SIZE", "Maglev", "build_table", "maglev_keys_moved_on_remove"]

DEFAULT_TABLE_SIZE = 65_537
_PERSON_NODE = b"ac-maglev-node"
_PERSON_KEY = b"ac-maglev-key"


def _turns(ratios: list[float]) -> Iterator[int]:
    """Backend indexes in filling-turn order, forever.

    ``ratios[i]`` is weight / max weight (in (0, 1]). Backend ``i`` takes its k-th turn (from 0)
    in the first round ``t`` with ``t * ratio >= k``; within a round, lower indexes go first
    (Envoy's order).
    """
    if all(r == 1.0 for r in ratios):
        return itertools.cycle(range(len(ratios)))
    return _weighted_turns(ratios)


def _weighted_turns(ratios: list[float]) -> Iterator[int]:
    # Full-weight backends are in every round; only the others are scheduled one by one (the
    # common case is slow start: a few light nodes among many full ones).
    full = [i for i, r in enumerate(ratios) if r >= 1.0]
    buckets: dict[int, list[int]] = {0: [i for i, r in enumerate(ratios) if r < 1.0]}
    counts = [0] * len(ratios)
    rnd = 0
    while True:
        extra = buckets.pop(rnd, None)
        if extra is None:
            if not full:
                rnd = min(buckets)
                continue
            yield from full
        else:
            for i in extra:
                k = counts[i] = counts[i] + 1
                r = ratios[i]
                # The first round t with t * r >= k (Envoy's test, in the same float
                # arithmetic, so a k / r that rounds up past an integer cannot skip a round).
                t = math.ceil(k / r)
                if (t - 1) * r >= k:
                    t -= 1
                elif t * r < k:
                    t += 1
                buckets.setdefault(t, []).append(i)
            yield from sorted(full + extra) if full else sorted(extra)
        rnd += 1


def build_table(names: Sequence[str], weights: Sequence[float], size: int) -> list[int]:
    """The Maglev lookup table: ``size`` (a prime) slots, each the index of a backend in
    ``names``. Weights must be positive."""
    n = len(names)
    if n == 0:
        return []
    offsets: list[int] = []
    skips: list[int] = []
    for name in names:
        h1, h2 = hash64_pair(name, _PERSON_NODE)
        offsets.append(h1 % size)
        skips.append(h2 % (size - 1) + 1)
    top = max(weights)
    turns = _turns([w / top for w in weights])
    owner = [-1] * size
    cursor = offsets[:]  # the next slot of each backend's permutation to try
    # The probing loop's cost per claim is about size / free; the exact tail rule's is `free`.
    # They meet near sqrt(size) (measured: the build is fastest there).
    tail = min(size, math.isqrt(size))
    free = size
    pending = -1
    for i in turns:
        if free <= tail:
            pending = i
            break
        c = cursor[i]
        skip = skips[i]
        while owner[c] >= 0:
            c = (c + skip) % size
        owner[c] = i
        cursor[i] = (c + skip) % size
        free -= 1
    empty: list[int] = []
    slot = -1
    for _ in range(free):  # list.index scans in C: cheaper than a comprehension over the table
        slot = owner.index(-1, slot + 1)
        empty.append(slot)
    while empty:
        i = pending if pending >= 0 else next(turns)
        pending = -1
        inv = pow(skips[i], -1, size)
        base = (-offsets[i] * inv) % size
        # Every slot before cursor[i] in i's permutation is taken, so the free slot with the
        # smallest permutation position, (slot - offset) * skip^-1 mod size, is exactly where
        # the paper's walk would stop.
        positions = [(s * inv + base) % size for s in empty]
        owner[empty.pop(positions.index(min(positions)))] = i
    return owner


class Maglev(Strategy):
    """Maglev consistent hashing on ``request.key`` (see the module docstring)."""

    name = "maglev"

    __slots__ = ("_min_size", "_names", "_nodes", "_signature", "_size", "_table")

    def __init__(self, *, min_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        if min_table_size < 2:
            raise ValueError("min_table_size must be at least 2")
        self._min_size = min_table_size
        self._signature: tuple[tuple[str, float], ...] = ()
        self._table: list[str] = []
        self._names: tuple[str, ...] = ()
        self._nodes: frozenset[str] = frozenset()
        self._size = 0

    @property
    def table_size(self) -> int:
        """Slots in the current table (0 when there is no endpoint)."""
        return self._size

    @property
    def table(self) -> Sequence[str]:
        """The lookup table (slot -> node); read-only by contract."""
        return self._table

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        signature = hash_signature(endpoints)
        if signature == self._signature and self._table:
            return
        self._signature = signature
        names = [s[0] for s in signature]
        self._names = tuple(names)
        self._nodes = frozenset(names)
        if not names:
            self._table, self._size = [], 0
            return
        size = self._table_size_for(len(names))
        owner = build_table(names, [s[1] for s in signature], size)
        self._table = list(map(names.__getitem__, owner))
        self._size = size

    def _table_size_for(self, n: int) -> int:
        need = 100 * n
        rung = self._min_size
        while rung < need:
            rung *= 2
        current = self._size
        if current >= need and current <= 4 * rung:
            return current
        return next_prime(rung)

    def slot_of(self, key: str) -> int:
        """The table slot ``key`` hashes to (raises :class:`NoEndpoint` on an empty table)."""
        if not self._size:
            raise NoEndpoint("no eligible endpoint")
        return hash64(key, _PERSON_KEY) % self._size

    def pick(
        self,
        request: PickRequest,
        rng: random.Random,
        now: float,
        exclude: frozenset[str] = frozenset(),
    ) -> str:
        size = self._size
        if not size:
            raise NoEndpoint("no eligible endpoint")
        key = request.key
        slot = (rng.getrandbits(64) if key is None else hash64(key, _PERSON_KEY)) % size
        node = self._table[slot]
        if not exclude or node not in exclude:
            return node
        return self._walk(slot, exclude)

    def _walk(self, slot: int, exclude: frozenset[str]) -> str:
        if self._nodes <= exclude:
            raise NoEndpoint("every eligible endpoint is excluded")
        table = self._table
        size = self._size
        while True:
            slot += 1
            if slot == size:
                slot = 0
            node = table[slot]
            if node not in exclude:
                return node


def maglev_keys_moved_on_remove(n: int = 100, keys: int = 100_000, seed: int = 1) -> float:
    """The share of ``keys`` random keys whose node changes when one of ``n`` equal backends
    (chosen from ``seed``) is removed. Maglev's promise: about 1/n, at most 1/n + 1%."""
    if n < 2:
        raise ValueError("need at least two backends")
    rng = random.Random(seed)
    nodes = [f"node-{i:04d}" for i in range(n)]
    before = Maglev()
    before.update([Endpoint(node=name) for name in nodes])
    gone = nodes[rng.randrange(n)]
    after = Maglev()
    after.update([Endpoint(node=name) for name in nodes if name != gone])
    old_table, new_table = before.table, after.table
    old_size, new_size = before.table_size, after.table_size
    moved = 0
    for _ in range(keys):
        h = hash64(f"key-{rng.getrandbits(64):016x}", _PERSON_KEY)
        if old_table[h % old_size] != new_table[h % new_size]:
            moved += 1
    return moved / keys
