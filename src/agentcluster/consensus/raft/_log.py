"""The in-memory Raft log and the memory stable storage it is rebuilt from.

Theory of operation: :class:`RaftLog` holds every entry (there are no snapshots yet, so index
``i`` lives at ``entries[i - 1]`` and the term of index 0 is 0). It also remembers which suffix
is *unstable* -- not yet handed to stable storage: ``unstable_from`` is the lowest index whose
entry may differ from what storage holds. Appending moves nothing; truncating a conflicting
suffix lowers ``unstable_from``; the shell confirming a persisted batch raises it again -- but
only if the last persisted entry is still in the log with the same term. That check makes it
safe to keep stepping the node while a batch is being written: two entries with the same index
and term are the same entry with the same prefix (Log Matching, §5.3), so a confirmation that
still matches covers everything before it.

:class:`MemoryStorage` is what a crash leaves behind: the hard state and the log the shell
persisted. A node is rebuilt from it after a crash.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentcluster.consensus.raft.messages import Entry, HardState

__all__ = ["MemoryStorage", "RaftLog"]


class MemoryStorage:
    """Stable storage kept in memory (tests and simulations): survives a node rebuild."""

    __slots__ = ("entries", "hard_state")

    def __init__(self, hard_state: HardState | None = None, entries: Sequence[Entry] = ()) -> None:
        self.hard_state = hard_state if hard_state is not None else HardState()
        self.entries: list[Entry] = list(entries)
        for i, e in enumerate(self.entries, start=1):
            if e.index != i:
                raise ValueError(f"entry at position {i} has index {e.index}")

    def persist(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        """Write a Ready's durable part: ``entries`` replace any stored suffix they overlap."""
        if hard_state is not None:
            self.hard_state = hard_state
        if entries:
            first = entries[0].index
            if first > len(self.entries) + 1:
                raise ValueError(f"gap: storing index {first} after {len(self.entries)}")
            del self.entries[first - 1 :]
            self.entries.extend(entries)


class RaftLog:
    __slots__ = ("entries", "unstable_from")

    def __init__(self, stored: Sequence[Entry]) -> None:
        self.entries: list[Entry] = list(stored)
        self.unstable_from = len(self.entries) + 1

    @property
    def last_index(self) -> int:
        return len(self.entries)

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else 0

    @property
    def stable_index(self) -> int:
        return self.unstable_from - 1

    def term(self, index: int) -> int | None:
        """Term at ``index`` (0 for index 0), None when the log is shorter."""
        if index == 0:
            return 0
        if 0 < index <= len(self.entries):
            return self.entries[index - 1].term
        return None

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with ``lo <= index < hi``."""
        return self.entries[lo - 1 : hi - 1]

    def append(self, entry: Entry) -> None:
        assert entry.index == len(self.entries) + 1
        self.entries.append(entry)

    def truncate_from(self, index: int) -> None:
        """Drop ``index`` and everything after it (a conflicting suffix, §5.3)."""
        del self.entries[index - 1 :]
        self.unstable_from = min(self.unstable_from, index)

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries sharing the term at ``index``."""
        t = self.entries[index - 1].term
        while index > 1 and self.entries[index - 2].term == t:
            index -= 1
        return index

    def last_index_of_term(self, term: int, at_most: int) -> int | None:
        """The highest index ``<= at_most`` holding ``term`` (terms only grow along the log)."""
        i = min(at_most, len(self.entries))
        while i > 0:
            t = self.entries[i - 1].term
            if t == term:
                return i
            if t < term:
                return None
            i -= 1
        return None

    def unstable(self) -> list[Entry]:
        return self.entries[self.unstable_from - 1 :]

    def stable_to(self, index: int, term: int) -> None:
        if self.term(index) == term:
            self.unstable_from = max(self.unstable_from, index + 1)
