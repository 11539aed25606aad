"""Lifeguard local health awareness (LHA-Probe).

Theory of operation: a node cannot tell from one failed probe whether the peer is dead or
whether *it* is the sick one (its CPU starved, its packets dropped, its event loop blocked).
Lifeguard keeps a small saturating counter, the *local health multiplier*: it rises on evidence
that we are unhealthy -- a probe that failed, an indirect helper whose nack never came back,
having to refute a suspicion of ourselves -- and falls by one on every successful probe. The
node's own probe interval and probe timeout are multiplied by ``score + 1``, so an unhealthy
node slows down and waits longer instead of accusing healthy peers.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    """A score in ``[0, max_multiplier - 1]``; 0 is healthy."""

    __slots__ = ("_max", "score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be >= 1")
        self._max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> int:
        """Add ``delta`` (saturating at both ends); returns the new score."""
        self.score = min(self._max - 1, max(0, self.score + delta))
        return self.score

    @property
    def multiplier(self) -> int:
        return self.score + 1

    def scale(self, seconds: float) -> float:
        """``seconds`` stretched by the current health: ``seconds * (score + 1)``."""
        return seconds * (self.score + 1)
