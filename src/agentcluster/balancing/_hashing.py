"""Stable hashes for the hashing strategies (Maglev, bounded-load rings).

Theory of operation: every balancer in the cluster must map a key to the same node, and a
restarted process must too, so the hash cannot be Python's ``hash()`` (salted per process for
``str``). BLAKE2b with an 8-byte digest is in the standard library, keyed by a short
personalisation string so that the key hash and the backend-name hashes are independent
functions; it costs well under a microsecond for short keys.
"""

from __future__ import annotations

import hashlib

__all__ = ["hash64", "hash64_pair", "next_prime"]

_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


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
