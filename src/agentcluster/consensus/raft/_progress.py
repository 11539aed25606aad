"""Per-follower replication progress and the configuration bookkeeping of a Raft leader.

Theory of operation: a leader keeps one :class:`Progress` per other member (voters and
learners). ``probe`` sends one AppendEntries at a time until the follower's position is known;
``replicate`` streams batches optimistically with at most ``max_inflight`` unacknowledged;
``snapshot`` waits for an InstallSnapshot to be acknowledged (and falls back to probing after
an election timeout without an answer). ``acked_seq`` is the latest heartbeat round the
follower answered: rounds confirm leadership for ReadIndex and time the leader lease.

:func:`apply_conf_change` is the pure rule for single-server changes (thesis §4.1): add a
voter (or promote a learner), add a learner, remove a member.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from agentcluster.consensus.raft.messages import ConfChange, ConfState, Snapshot

__all__ = ["Progress", "apply_conf_change"]


@dataclass(slots=True)
class Progress:
    match: int
    next: int
    state: Literal["probe", "replicate", "snapshot"] = "probe"
    probe_sent: bool = False
    inflight: deque[int] = field(default_factory=deque)
    recent_active: bool = False
    acked_seq: int = 0
    snapshot_ticks: int = 0
    commit_sent: int = 0  # the commit index the last message to this peer carried
    # A chunked snapshot transfer (see _snap): the snapshot being sent, and the offset of the
    # one piece in flight (only its answer moves the transfer on).
    snap: Snapshot | None = None
    snap_offset: int = -1

    def become_probe(self) -> None:
        self.state = "probe"
        self.probe_sent = False
        self.inflight.clear()
        self.snapshot_ticks = 0
        self.snap = None
        self.snap_offset = -1


def apply_conf_change(conf: ConfState, change: ConfChange) -> ConfState:
    """The configuration after ``change``; a change that changes nothing returns ``conf``."""
    voters = list(conf.voters)
    learners = list(conf.learners)
    node = change.node
    if change.op == "add_voter":
        if node in voters:
            return conf
        if node in learners:
            learners.remove(node)
        voters.append(node)
    elif change.op == "add_learner":
        if node in voters or node in learners:
            return conf
        learners.append(node)
    else:
        if node not in voters and node not in learners:
            return conf
        if node in voters:
            voters.remove(node)
        else:
            learners.remove(node)
    return ConfState(tuple(voters), tuple(learners))
