"""The piggyback queue: gossip entries, each sent a limited number of times.

Theory of operation: every change a node learns (a member alive, suspect, dead) is queued once
per member -- a newer entry about the same member *replaces* the older one, which is stale by
definition. Each time an entry is put in an outgoing packet its transmit count goes up; at the
limit (``retransmit_mult * ceil(log10(n + 1))``, computed by the caller as n changes) it is
dropped. Packing takes the least-transmitted entries first -- the freshest news travels
first -- and, within the same count, the most recently queued or moved. Entries are kept in
one insertion-ordered dict per transmit count, so queueing, replacing and taking are O(1) per
entry and packing a packet never looks at more than a bounded number of entries.

:class:`Outbox` builds each outgoing packet: the message, then entries from the queue until
the msgpack encoding would exceed the packet budget. Sizes are exact, not estimated: each
entry's encoded size is measured once when queued, and msgpack encodes an array as a header
followed by its elements, so the packet's size is the sum of its parts.
"""

from __future__ import annotations

import math

import msgspec

from agentcluster.membership._state import SwimStats
from agentcluster.membership.messages import (
    Ack,
    Gossip,
    GossipEntry,
    IndirectPing,
    Message,
    Nack,
    Ping,
    encoded_size,
)

__all__ = ["PACKET_KINDS", "BroadcastQueue", "Outbox", "retransmit_limit"]

# The smallest gossip entry encodes to ~8 bytes; below that nothing more can fit.
_MIN_ENTRY = 8
# Entries examined per packet at most: keeps packing O(1) even with a huge backlog.
_MAX_SCAN = 128
# The largest retransmit boost an entry can get.
MAX_BOOST = 2


def retransmit_limit(mult: int, n: int) -> int:
    """memberlist's ``retransmitMult * ceil(log10(n + 1))``, with the log factor floored at 2.

    A node misses an entry with probability ~exp(-limit) (it is one of n targets of about
    n * limit random sends), so the cluster misses it with ~n * exp(-limit). memberlist's
    factor is 1 below ten members: 4 sends, a 2 % miss per node, which in a small cluster
    shows up as a join or a death some member does not hear of. The floor costs nothing in
    large clusters and a few packets in small ones."""
    scale = max(2, math.ceil(math.log10(max(1, n) + 1)))
    return max(1, mult * scale)


class _Entry:
    __slots__ = ("active", "boost", "key", "msg", "size", "transmits")

    def __init__(self, key: str, msg: GossipEntry, size: int, boost: int, active: bool) -> None:
        self.key = key
        self.msg = msg
        self.size = size
        self.boost = boost
        self.active = active
        self.transmits = 0


class BroadcastQueue:
    """Pending gossip entries keyed by member name."""

    def __init__(self, max_entries: int = 8192) -> None:
        self._tiers: list[dict[str, _Entry]] = [{}]
        self._by_key: dict[str, _Entry] = {}
        self._max_entries = max_entries
        self.dropped = 0
        # Entries worth dedicated gossip packets; the others only ride on packets that are
        # sent anyway.
        self.active = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> GossipEntry | None:
        entry = self._by_key.get(key)
        return None if entry is None else entry.msg

    def transmits(self, key: str) -> int | None:
        entry = self._by_key.get(key)
        return None if entry is None else entry.transmits

    def queue(self, key: str, msg: GossipEntry, *, boost: int = 1, active: bool = True) -> None:
        """Queue ``msg`` about member ``key``, replacing what was queued about it. A
        ``boost`` of k sends it k times the normal limit (for news everyone must get); a
        passive entry (``active=False``) is only piggybacked, never a reason to gossip."""
        old = self._by_key.get(key)
        if old is not None:
            self._remove(old)
        entry = _Entry(key, msg, encoded_size(msg), max(1, min(boost, MAX_BOOST)), active)
        self._by_key[key] = entry
        self._tiers[0][key] = entry
        self.active += active
        if len(self._by_key) > self._max_entries:
            self._evict()

    def _remove(self, entry: _Entry) -> None:
        del self._tiers[entry.transmits][entry.key]
        del self._by_key[entry.key]
        self.active -= entry.active

    def _evict(self) -> None:
        # Over capacity (a storm of changes): drop the most transmitted, oldest entries.
        for tier in reversed(self._tiers):
            while tier and len(self._by_key) > self._max_entries:
                self._remove(tier[next(iter(tier))])
                self.dropped += 1

    def take(
        self, budget: int, limit: int, skip: str | None = None
    ) -> tuple[list[GossipEntry], int]:
        """Entries whose encoded sizes add up to at most ``budget`` bytes (returned with that
        sum), each counted as transmitted once more and dropped once sent ``limit`` times.
        ``skip`` names a member whose entry must not be taken (the caller sends a newer one)."""
        if not self._by_key or budget < _MIN_ENTRY:
            return [], 0
        self._trim(limit)
        chosen: list[_Entry] = []
        free = budget
        scanned = 0
        for tier in self._tiers:
            if not tier:
                continue
            for key in reversed(tier):
                entry = tier[key]
                scanned += 1
                if entry.size <= free and key != skip:
                    chosen.append(entry)
                    free -= entry.size
                if free < _MIN_ENTRY or scanned >= _MAX_SCAN:
                    break
            if free < _MIN_ENTRY or scanned >= _MAX_SCAN:
                break
        for entry in chosen:
            if entry.transmits + 1 >= limit * entry.boost:
                self._remove(entry)
                continue
            del self._tiers[entry.transmits][entry.key]
            entry.transmits += 1
            if entry.transmits == len(self._tiers):
                self._tiers.append({})
            self._tiers[entry.transmits][entry.key] = entry
        return [entry.msg for entry in chosen], budget - free

    def _trim(self, limit: int) -> None:
        # The limit shrinks when members die; entries already sent that often are done.
        while len(self._tiers) > max(1, limit * MAX_BOOST):
            for entry in list(self._tiers[-1].values()):
                self._remove(entry)
            self._tiers.pop()

    def clear(self) -> None:
        self._tiers = [{}]
        self._by_key.clear()
        self.active = 0


PACKET_KINDS: dict[type, str] = {
    Ping: "ping",
    IndirectPing: "indirect_ping",
    Ack: "ack",
    Nack: "nack",
    Gossip: "gossip",
}


class Outbox:
    """Builds outgoing packets: the message plus as much queued gossip as fits the budget."""

    def __init__(self, queue: BroadcastQueue, budget: int, mult: int, stats: SwimStats) -> None:
        self.queue = queue
        self.budget = budget
        self.mult = mult
        self.stats = stats
        self.packets: list[tuple[str, Message]] = []

    def send(
        self,
        addr: str,
        msg: Message,
        n: int,
        *,
        first: GossipEntry | None = None,
        need_gossip: bool = False,
    ) -> bool:
        """Queue ``msg`` for ``addr`` (``n`` live members set the retransmit limit); ``first``
        goes in front of the piggyback. With ``need_gossip``, nothing is sent when there is
        no gossip to carry. Returns whether a packet was queued."""
        base = encoded_size(msg)
        # Reserve 2 bytes: the gossip array header grows from 1 to 3 bytes past 15 entries.
        head = base + 2
        entries: list[GossipEntry] = []
        if first is not None:
            entries.append(first)
            head += encoded_size(first)
        skip = first.name if first is not None else None
        taken, used = self.queue.take(self.budget - head, retransmit_limit(self.mult, n), skip)
        entries.extend(taken)
        if not entries and need_gossip:
            return False
        size = base
        if entries:
            msg = msgspec.structs.replace(msg, gossip=tuple(entries))
            size = head - 2 + used + (2 if len(entries) > 15 else 0)
        kind = PACKET_KINDS[type(msg)]
        stats = self.stats
        stats.packets[kind] = stats.packets.get(kind, 0) + 1
        stats.bytes[kind] = stats.bytes.get(kind, 0) + size
        self.packets.append((addr, msg))
        return True

    def drain(self) -> list[tuple[str, Message]]:
        out, self.packets = self.packets, []
        return out
