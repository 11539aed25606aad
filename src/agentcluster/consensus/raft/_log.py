"""The in-memory Raft log and the memory stable storage it is rebuilt from.

Theory of operation: :class:`RaftLog` holds the entries after ``offset`` -- the last index
folded into a snapshot (0 before the first one) -- so index ``i`` lives at
``entries[i - offset - 1]``; the term of ``offset`` is kept when known. It also remembers which suffix
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
from typing import Protocol

from agentcluster.consensus.raft.messages import Entry, HardState, Snapshot

__all__ = ["MemoryStorage", "RaftLog", "Storage"]


class Storage(Protocol):
    """Stable storage for one Raft node (memory here, files in :mod:`.disk`).

    ``entries`` is contiguous; it starts at 1, or anywhere at or before ``snapshot.index + 1``
    once compacted. Every mutating call is durable (synced) when it returns.
    """

    @property
    def hard_state(self) -> HardState: ...

    @property
    def snapshot(self) -> Snapshot | None: ...

    @property
    def entries(self) -> Sequence[Entry]: ...

    def persist(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        """Write ``hard_state`` and append ``entries``; an entry at an index already stored
        replaces it and everything after it. Gaps are an error."""
        ...

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store ``snapshot``. Entries after it are kept when the log holds ``snapshot.index``
        with ``snapshot.term`` (a local snapshot) or starts after it (a repeated snapshot);
        otherwise every entry is discarded (a snapshot received from the leader replaces the
        log). Entries are never kept *before*
        a discarded range: the log stays contiguous."""
        ...

    def compact(self, through: int) -> None:
        """Drop the entries with ``index <= through``; ``through`` may not exceed the
        snapshot's index (the entries would be lost)."""
        ...


class MemoryStorage:
    """Stable storage kept in memory (tests and simulations): survives a node rebuild."""

    __slots__ = ("_entries", "_hard_state", "_snapshot")

    def __init__(
        self,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        snapshot: Snapshot | None = None,
    ) -> None:
        self._hard_state = hard_state if hard_state is not None else HardState()
        self._snapshot = snapshot
        self._entries: list[Entry] = list(entries)
        first = self._entries[0].index if self._entries else 1
        if snapshot is None and first != 1:
            raise ValueError(f"log starts at {first} without a snapshot")
        if snapshot is not None and first > snapshot.index + 1:
            raise ValueError(f"log starts at {first}, after snapshot {snapshot.index} + 1")
        for i, e in enumerate(self._entries, start=first):
            if e.index != i:
                raise ValueError(f"entry at position {i} has index {e.index}")

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def entries(self) -> Sequence[Entry]:
        return self._entries

    def _next_index(self) -> int:
        if self._entries:
            return self._entries[-1].index + 1
        return self._snapshot.index + 1 if self._snapshot is not None else 1

    def persist(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        if entries:
            first = entries[0].index
            nxt = self._next_index()
            if first > nxt:
                raise ValueError(f"gap: storing index {first} when the next is {nxt}")
            base = self._entries[0].index if self._entries else nxt
            if first < base:
                raise ValueError(f"storing index {first} before the log start {base}")
            for k, e in enumerate(entries, start=first):
                if e.index != k:
                    raise ValueError(f"entries not contiguous at {k}: index {e.index}")
            del self._entries[first - base :]
            self._entries.extend(entries)
        if hard_state is not None:
            self._hard_state = hard_state

    def save_snapshot(self, snapshot: Snapshot) -> None:
        base = self._entries[0].index if self._entries else self._next_index()
        pos = snapshot.index - base
        # At or behind a compaction (a second snapshot at the same index) what follows is
        # committed and stays.
        keep = pos < 0 or (pos < len(self._entries) and self._entries[pos].term == snapshot.term)
        if not keep:
            self._entries.clear()
        self._snapshot = snapshot

    def compact(self, through: int) -> None:
        limit = self._snapshot.index if self._snapshot is not None else 0
        if through > limit:
            raise ValueError(f"cannot compact through {through}: snapshot is at {limit}")
        if self._entries:
            base = self._entries[0].index
            del self._entries[: max(0, through - base + 1)]


class RaftLog:
    """Entries after ``offset`` (the last compacted index); ``offset_term`` is its term when
    known (it is when ``offset`` is the snapshot's index), else None."""

    __slots__ = ("entries", "offset", "offset_term", "persisting_to", "unstable_from")

    def __init__(
        self, stored: Sequence[Entry], offset: int = 0, offset_term: int | None = 0
    ) -> None:
        self.entries: list[Entry] = list(stored)
        self.offset = offset
        self.offset_term = offset_term
        self.unstable_from = self.last_index + 1
        # Entries up to here are being written asynchronously (a leader's pipelined write):
        # not stable yet, but not to be handed out again either.
        self.persisting_to = 0

    @property
    def first_index(self) -> int:
        return self.offset + 1

    @property
    def last_index(self) -> int:
        return self.offset + len(self.entries)

    @property
    def last_term(self) -> int:
        if self.entries:
            return self.entries[-1].term
        return self.offset_term if self.offset_term is not None else 0

    @property
    def stable_index(self) -> int:
        return self.unstable_from - 1

    def term(self, index: int) -> int | None:
        """Term at ``index`` (0 for index 0); None when compacted away or beyond the log."""
        if index == self.offset:
            return self.offset_term
        k = index - self.offset
        if 0 < k <= len(self.entries):
            return self.entries[k - 1].term
        return None

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.offset - 1]

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with ``lo <= index < hi`` (``lo`` must not be compacted)."""
        assert lo > self.offset
        return self.entries[lo - self.offset - 1 : hi - self.offset - 1]

    def append(self, entry: Entry) -> None:
        assert entry.index == self.last_index + 1
        self.entries.append(entry)

    def extend_after(self, prev_index: int, entries: Sequence[Entry]) -> None:
        """Append those of ``entries`` -- contiguous from ``prev_index + 1``, which the log
        holds, and agreeing with the log where they overlap -- that lie beyond the last index
        (one list extend instead of an append per entry)."""
        start = self.last_index - prev_index
        assert start >= 0
        if start < len(entries):
            assert entries[start].index == self.last_index + 1
            self.entries.extend(entries[start:])

    def truncate_from(self, index: int) -> None:
        """Drop ``index`` and everything after it (a conflicting suffix, §5.3)."""
        assert index > self.offset
        del self.entries[index - self.offset - 1 :]
        self.unstable_from = min(self.unstable_from, index)
        self.persisting_to = min(self.persisting_to, index - 1)

    def compact(self, through: int) -> None:
        """Forget the entries with ``index <= through`` (they are in a snapshot)."""
        if through <= self.offset:
            return
        self.offset_term = self.term(through)
        del self.entries[: through - self.offset]
        self.offset = through
        self.unstable_from = max(self.unstable_from, through + 1)

    def restore(self, index: int, term: int) -> None:
        """Replace the whole log by a snapshot ending at ``index`` (§7)."""
        self.entries.clear()
        self.offset = index
        self.offset_term = term
        self.unstable_from = index + 1
        self.persisting_to = min(self.persisting_to, index)

    def first_index_of_term(self, index: int) -> int:
        """The first index (not compacted) of the run of entries sharing the term at ``index``."""
        t = self.term(index)
        while index - 1 > self.offset and self.term(index - 1) == t:
            index -= 1
        return index

    def last_index_of_term(self, term: int, at_most: int) -> int | None:
        """The highest index ``<= at_most`` holding ``term`` (terms only grow along the log)."""
        i = min(at_most, self.last_index)
        while i > self.offset:
            t = self.entry(i).term
            if t == term:
                return i
            if t < term:
                return None
            i -= 1
        if i == self.offset and self.offset_term == term:
            return i
        return None

    def unstable(self) -> list[Entry]:
        start = max(self.unstable_from, self.persisting_to + 1)
        return self.entries[start - self.offset - 1 :]

    def stable_to(self, index: int, term: int) -> None:
        if self.term(index) == term:
            self.unstable_from = max(self.unstable_from, index + 1)
