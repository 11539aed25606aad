"""Lifeguard suspicion timers (LHA-Suspicion): independent confirmations shorten the wait.

Theory of operation: when a member is suspected, we start a timer at ``max``. Each *distinct*
other member that also reports it suspect (a confirmation) brings the timeout down along a
logarithmic curve, reaching ``min`` after ``k`` confirmations::

    timeout(C) = max(min, max - (max - min) * log(C + 1) / log(k + 1))

measured from when the suspicion started (the deadline moves earlier, never resets). A lone
accuser -- which may itself be the unhealthy party -- has to wait the full ``max``; when
several independent witnesses agree, the member is declared dead after ``min``. With ``k == 0``
(too few members to expect any confirmation) the timer runs for ``max``: memberlist uses
``min`` there, which lets a single accuser in a two-node cluster kill a peer that merely
paused. The accuser that started the suspicion is never counted again, so our own gossip
echoing back is harmless.
"""

from __future__ import annotations

import math

__all__ = ["Suspicion", "suspicion_timeout", "suspicion_timeout_for"]


def suspicion_timeout(mult: float, n: int, interval: float) -> float:
    """Lifeguard's minimum: ``mult * max(1, log10(n)) * interval`` (memberlist's formula)."""
    return mult * max(1.0, math.log10(max(1, n))) * interval


def suspicion_timeout_for(confirmations: int, k: int, minimum: float, maximum: float) -> float:
    """Total timeout (from the start of the suspicion) after ``confirmations``."""
    if k < 1:
        # Nobody could confirm (a cluster of two): the lone accuser waits the full maximum.
        return maximum
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0)
    return max(minimum, maximum - frac * (maximum - minimum))


class Suspicion:
    """The suspicion of one member at one incarnation."""

    __slots__ = ("accuser", "accusers", "k", "maximum", "minimum", "start", "token")

    def __init__(
        self, accuser: str, k: int, minimum: float, maximum: float, start: float, token: int
    ) -> None:
        self.accuser = accuser
        self.k = max(0, k)
        self.minimum = minimum
        self.maximum = max(maximum, minimum)
        self.start = start
        # Identifies the timer entry that is current for this suspicion (older heap entries
        # for the same member carry other tokens and are ignored when they pop).
        self.token = token
        # Insertion-ordered: the accusers in the order they were heard.
        self.accusers: dict[str, None] = {accuser: None}

    @property
    def confirmations(self) -> int:
        return len(self.accusers) - 1

    @property
    def deadline(self) -> float:
        timeout = suspicion_timeout_for(self.confirmations, self.k, self.minimum, self.maximum)
        return self.start + timeout

    def confirm(self, accuser: str) -> bool:
        """Count ``accuser`` if new; ``False`` for a duplicate or once ``k`` is reached (then
        the information is not worth re-gossiping either)."""
        if self.confirmations >= self.k or accuser in self.accusers:
            return False
        self.accusers[accuser] = None
        return True
