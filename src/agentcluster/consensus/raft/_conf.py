"""Membership changes for :class:`~agentcluster.consensus.raft.core.RaftNode` (a mixin that
keeps ``core.py`` readable).

Theory of operation: single-server changes (Raft thesis §4.1): a change is a ``conf`` log
entry carrying the whole resulting configuration; a node adopts it when the entry commits (as
etcd's raft does), remembers recent configurations by index (a snapshot records the one at its
index), and a leader accepts one change at a time, only after committing an entry of its own
term and never during a leadership transfer. Learners replicate but neither vote nor count
for commits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from agentcluster.consensus.raft._progress import Progress, apply_conf_change
from agentcluster.consensus.raft.messages import (
    ConfChange,
    ConfState,
    Entry,
    decode_conf_change,
    encode_conf_change,
)

if TYPE_CHECKING:
    from agentcluster.consensus.raft._log import RaftLog
    from agentcluster.consensus.raft.core import RaftState

__all__ = ["ConfMixin"]


class ConfMixin:
    id: str
    state: RaftState
    term: int
    commit_index: int
    log: RaftLog
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    dropped: int
    _progress: dict[str, Progress]
    _transferee: str | None
    _conf_history: list[tuple[int, ConfState]]
    _conf_changed: bool
    _pending_conf_index: int

    if TYPE_CHECKING:  # provided by ReadsMixin (declared only: must not shadow it)

        def _abort_transfer(self) -> None: ...

    @property
    def peers(self) -> list[str]:
        """Every other member, voters first."""
        return [p for p in (*self.voters, *self.learners) if p != self.id]

    @property
    def conf(self) -> ConfState:
        return ConfState(self.voters, self.learners)

    def _set_conf(self, conf: ConfState, index: int, *, notify: bool = True) -> None:
        self.voters, self.learners = conf.voters, conf.learners
        self._conf_history.append((index, conf))
        del self._conf_history[:-64]
        self._conf_changed = notify
        if self.state != "leader":
            return
        members = self.peers
        for p in members:
            if p not in self._progress:
                self._progress[p] = Progress(match=0, next=self.log.last_index + 1)
        for p in [p for p in self._progress if p not in members]:
            del self._progress[p]
        if self._transferee is not None and self._transferee not in self.voters:
            self._abort_transfer()

    def _apply_conf_entry(self, entry: Entry) -> None:
        try:
            change = decode_conf_change(entry.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.dropped += 1  # only a corrupt leader writes one; the entry stays a no-op
            return
        conf = change.result if change.result is not None else apply_conf_change(self.conf, change)
        self._set_conf(conf, entry.index)

    def _conf_at(self, index: int) -> ConfState:
        for at, conf in reversed(self._conf_history):
            if at <= index:
                return conf
        raise ValueError(f"configuration at {index} is no longer known")

    def propose_conf_change(self, change: ConfChange, now: float) -> int | None:
        """Append a single-server membership change; its index, or None when this node is
        not a leader that may change the configuration now (one change at a time, after the
        leader committed an entry of its term, not during a leadership transfer)."""
        if (
            self.state != "leader"
            or self._transferee is not None
            or self._pending_conf_index > self.commit_index
            or self.log.term(self.commit_index) != self.term
        ):
            return None
        result = apply_conf_change(self.conf, change)
        if result == self.conf:
            raise ValueError(f"{change.op} {change.node!r} changes nothing in {self.conf}")
        if not result.voters:
            raise ValueError("cannot remove the last voter")
        index = self.log.last_index + 1
        data = encode_conf_change(ConfChange(change.op, change.node, result))
        self.log.append(Entry(self.term, index, data, "conf"))
        self._pending_conf_index = index
        return index
