"""A file of peer addresses, re-read when it changes and watchable.

Theory of operation: one address per line (``"host"``, ``"host:port"``, ``"[v6]:port"``), blank
lines ignored, ``#`` starting a comment (whole-line or trailing). Anything can write the file —
a configuration-management run, a cloud inventory script, a Kubernetes ConfigMap mount (which
swaps the file by renaming a symlink, hence the inode in the change test).

The file is parsed only when its signature (inode, device, size, mtime in ns) differs from the
last parse; the parsed seeds are then resolved every round exactly like static seeds (so host
names in the file are re-resolved each time). Bad lines are skipped and reported as a partial
error with their line numbers; the good ones still count. A missing or unreadable file gives no
candidates and a recorded error, never an exception out of :func:`discover_all`, and is looked
for again on the next round.

:meth:`AddressFile.watch` is an async iterator that yields the current candidate list first and
then a new one every time the file's signature changes, polling every ``poll_interval`` through
a :class:`~agentcluster.clock.Clock` (so a test drives it in virtual time). Polling is used
rather than inotify because it works the same everywhere (containers, network file systems,
symlink swaps) and costs one ``stat`` per second. The file is small, so it is read inline.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.discovery.base import DEFAULT_PORT, Candidate, Strategy, parse_addr
from agentcluster.discovery.static import Resolve, resolve_seeds, system_resolve

__all__ = ["AddressFile", "parse_address_lines"]

_Signature = tuple[int, int, int, int]


def parse_address_lines(
    text: str, default_port: int = DEFAULT_PORT
) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Parse a file's text into ``(text, host, port)`` seeds and per-line error messages."""
    seeds: list[tuple[str, str, int]] = []
    errors: list[str] = []
    seen: set[tuple[str, int]] = set()  # membership only; order comes from the file
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            host, port = parse_addr(line, default_port)
        except ValueError as exc:
            errors.append(f"line {lineno}: {exc}")
            continue
        if (host, port) not in seen:
            seen.add((host, port))
            seeds.append((line, host, port))
    return seeds, errors


class AddressFile(Strategy):
    """Peers listed in a text file, one address per line."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        default_port: int = DEFAULT_PORT,
        poll_interval: float = 1.0,
        clock: Clock | None = None,
        resolve: Resolve | None = None,
        label: str | None = None,
    ) -> None:
        if not 1 <= default_port <= 65535:
            raise ValueError(f"default_port out of range: {default_port}")
        if not poll_interval > 0:
            raise ValueError("poll_interval must be positive")
        self.path = Path(path)
        self.default_port = default_port
        self.poll_interval = poll_interval
        self.name = label or f"file:{self.path}"
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._resolve = resolve or system_resolve
        self._signature: _Signature | None = None
        self._seeds: list[tuple[str, str, int]] = []
        self._parse_errors: list[str] = []
        self.reads = 0  # how many times the file was actually parsed

    def _stat(self) -> _Signature | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> str | None:
        """Re-parse if the file changed; returns why the file could not be used, if so."""
        sig = self._stat()
        if sig is None:
            self._signature = None
            self._seeds, self._parse_errors = [], []
            return f"{self.path}: no such file"
        if sig == self._signature:
            return None
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            # Forget the signature so the next round tries again.
            self._signature = None
            self._seeds, self._parse_errors = [], []
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            return f"{self.path}: {reason}"
        self._signature = sig
        self._seeds, self._parse_errors = parse_address_lines(text, self.default_port)
        self.reads += 1
        return None

    async def discover(self) -> list[Candidate]:
        problem = self._refresh()
        problems = [problem] if problem is not None else list(self._parse_errors)
        found: list[Candidate] = []
        if self._seeds:
            found, resolve_errors = await resolve_seeds(self._seeds, self.name, self._resolve)
            problems.extend(resolve_errors)
        self.last_error = "; ".join(problems) if problems else None
        return found

    async def watch(self) -> AsyncIterator[list[Candidate]]:
        """Yield the candidates now, then again after every change of the file."""
        last: _Signature | bool | None = False  # False: nothing yielded yet
        while True:
            sig = self._stat()
            if sig != last:
                last = sig
                yield await self.discover()
            await self._clock.sleep(self.poll_interval)
