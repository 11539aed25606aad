"""Watch streams over a store's applied history: replay, then live, nothing lost or repeated.

Theory of operation: a :class:`WatchHub` sits beside a state machine that keeps a watch
history (:class:`~agentcluster.store._kv.KVStateMachine`, the :class:`WatchSource`). The
driver applies commands to the machine and then hands the events they produced to
:meth:`WatchHub.publish`; the hub copies them into the queue of every watcher whose prefix
matches.

Each watcher remembers ``next_rev``, the first revision it has not queued yet:

* **Replay then live, no gap, no duplicate.** A watcher reads the history and is registered
  in one synchronous step, so an event is either in what it read or in what is published
  afterwards; published events below ``next_rev`` are dropped as already replayed. This also
  covers a driver that publishes some time after applying.
* **Bounded memory, no error for a slow reader.** Live events queue up to ``max_queue``; a
  revision that would overflow the queue is not queued and the watcher becomes *unsynced*
  (it stops receiving live events). When its reader has drained the queue, the watcher
  catches up from the machine's history from ``next_rev`` and becomes live again -- etcd's
  synced / unsynced watchers. A whole revision is queued or none of it.
* **Errors.** Only history the machine no longer has ends a stream: the reader gets
  :class:`~agentcluster.store.base.Compacted` after the events before the gap, and can start
  over from a fresh read. :meth:`WatchHub.resync` makes every watcher catch up from history
  (the driver calls it after restoring a snapshot, when events arrived without a publish).
* :meth:`WatchHub.close` ends every stream (iteration stops); later watches raise
  :class:`~agentcluster.store.base.StoreUnavailable`.

Everything runs on one event loop; :meth:`publish` never awaits.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from agentcluster.store.base import Compacted, StoreUnavailable, WatchEvent

__all__ = ["WatchHub", "WatchSource"]


class WatchSource(Protocol):
    """What a hub reads the history from."""

    @property
    def revision(self) -> int: ...

    def events_since(self, revision: int, prefix: str = "") -> list[WatchEvent]: ...


class _Watcher:
    __slots__ = ("closed", "error", "next_rev", "prefix", "queue", "synced", "wake")

    def __init__(self, prefix: str, next_rev: int) -> None:
        self.prefix = prefix
        self.next_rev = next_rev
        self.queue: deque[WatchEvent] = deque()
        self.synced = False
        self.closed = False
        self.error: Compacted | None = None
        self.wake = asyncio.Event()


class _Stream(AsyncIterator[WatchEvent]):
    __slots__ = ("_hub", "_watcher")

    def __init__(self, hub: WatchHub, watcher: _Watcher) -> None:
        self._hub = hub
        self._watcher = watcher

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> WatchEvent:
        w = self._watcher
        while True:
            if w.queue:
                return w.queue.popleft()
            if w.error is not None:
                raise w.error
            if w.closed:
                raise StopAsyncIteration
            if not w.synced:
                self._hub._catch_up(w)
                continue
            w.wake.clear()
            await w.wake.wait()


class WatchHub:
    """Fans applied events out to watchers; see the module docstring."""

    def __init__(self, source: WatchSource, *, max_queue: int = 1024) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._source = source
        self._max_queue = max_queue
        self._watchers: dict[int, _Watcher] = {}  # insertion-ordered: deterministic fan-out
        self._ids = itertools.count()
        self._closed = False

    def __len__(self) -> int:
        return len(self._watchers)

    @asynccontextmanager
    async def watch(self, prefix: str, start_revision: int = 0) -> AsyncIterator[_Stream]:
        """Events under ``prefix`` from ``start_revision`` (0: from the next revision) on.

        If that history is gone, the stream's first ``anext`` raises :class:`Compacted` (as
        etcd's, which learns of a compaction only from its stream: code that catches it inside
        the ``async with`` works on every backend). Raises :class:`StoreUnavailable` on entry
        if the hub is closed.
        """
        if self._closed:
            raise StoreUnavailable("the store is closed")
        current = self._source.revision
        watcher = _Watcher(prefix, start_revision if start_revision > 0 else current + 1)
        if watcher.next_rev > current:
            watcher.synced = True  # nothing to replay: live from here on
        else:
            self._catch_up(watcher)  # a Compacted waits in ``watcher.error`` for the reader
        key = next(self._ids)
        self._watchers[key] = watcher
        try:
            yield _Stream(self, watcher)
        finally:
            self._watchers.pop(key, None)
            watcher.closed = True
            watcher.wake.set()  # a reader in another task must not wait forever

    def publish(self, events: Sequence[WatchEvent]) -> None:
        """Hand the events of applied revisions (in revision order) to the watchers."""
        if not events or not self._watchers:
            return
        groups: list[tuple[int, int, int]] = []  # (revision, start, end) slices of ``events``
        start = 0
        for i in range(1, len(events) + 1):
            if i == len(events) or events[i].revision != events[start].revision:
                groups.append((events[start].revision, start, i))
                start = i
        for watcher in self._watchers.values():
            if watcher.synced and not watcher.closed:
                self._deliver(watcher, events, groups)

    def resync(self) -> None:
        """Make every watcher catch up from history before it takes live events again."""
        for watcher in self._watchers.values():
            watcher.synced = False
            watcher.wake.set()

    def close(self) -> None:
        """End every stream; later :meth:`watch` calls raise :class:`StoreUnavailable`."""
        self._closed = True
        for watcher in self._watchers.values():
            watcher.closed = True
            watcher.wake.set()
        self._watchers.clear()

    def _deliver(
        self, w: _Watcher, events: Sequence[WatchEvent], groups: list[tuple[int, int, int]]
    ) -> None:
        queued = False
        for revision, start, end in groups:
            if revision < w.next_rev:
                continue  # already replayed from history
            matching = [e for e in events[start:end] if e.kv.key.startswith(w.prefix)]
            if len(w.queue) + len(matching) > self._max_queue:
                w.synced = False  # the reader is behind: it catches up from history later
                break
            w.queue.extend(matching)
            w.next_rev = revision + 1
            queued = queued or bool(matching)
        if queued or not w.synced:
            w.wake.set()

    def _catch_up(self, w: _Watcher) -> None:
        """Queue what the history holds from ``next_rev`` on, and go live (synchronously, so no
        event can slip between the read and the next publish)."""
        try:
            events = self._source.events_since(w.next_rev, w.prefix)
        except Compacted as exc:
            w.error = exc
            return
        w.queue.extend(events)
        w.next_rev = max(w.next_rev, self._source.revision + 1)
        w.synced = True
