"""Stable hashes for the hashing strategies (Maglev, bounded-load rings).

Theory of operation: every balancer in the cluster must map a key to the same node, and a
restarted process must too, so the hash cannot be Python's ``hash()`` (salted per process for
``str``). BLAKE2b with an 8-byte digest is in the standard library, keyed by a short
personalisation string so that the key hash and the backend-name hashes are independent
functions; it costs well under a microsecond for short keys.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from agentcluster.balancing.base import Endpoint

__all__ = ["hash64", "hash64_pair", "hash_signature", "next_prime"]

_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


def hash_signature(endpoints: Sequence[Endpoint]) -> tuple[tuple[str, float], ...]:
    """The ``(node, weight)`` pairs a hashing table is built from, sorted by name (the table
    must not depend on the order nodes arrive in). A name given twice counts once, with its
    last weight (as the balancer's own map keeps it); a weight <= 0 takes the node out (drained);
    NaN or an infinite weight is a bug upstream: ValueError naming the node."""
    weights: dict[str, float] = {}
    for e in endpoints:
        w = e.weight
        if math.isnan(w) or math.isinf(w):
            raise ValueError(f"endpoint {e.node!r} has weight {w!r}; weights must be finite")
        weights[e.node] = w
    return tuple(sorted((node, w) for node, w in weights.items() if w > 0))


def hash64(text: str, person: bytes = b"") -> int:
    """A stable unsigned 64-bit hash of ``text`` (``person``: up to 16 bytes, a domain tag)."""
    return _from_bytes(_blake2b(text.encode(), digest_size=8, person=person).digest(), "little")


def hash64_pair(text: str, person: bytes = b"") -> tuple[int, int]:
    """Two independent stable 64-bit hashes of ``text`` (one 16-byte digest, split)."""
    digest = _blake2b(text.encode(), digest_size=16, person=person).digest()
    return _from_bytes(digest[:8], "little"), _from_bytes(digest[8:], "little")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_prime(n: int) -> int:
    """The smallest prime ``>= n``."""
    candidate = max(2, n)
    while not _is_prime(candidate):
        candidate += 1
    return candidate
