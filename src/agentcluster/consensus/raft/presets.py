"""Named Raft timing presets, matched to the membership presets of the same name.

Theory of operation: the election timeout bounds failover (a follower notices a dead leader
between one and two timeouts after the last heartbeat, then one pre-vote and one vote round
trip elect the next), and must stay well above heartbeat interval + round-trip time + an fsync,
or a healthy leader gets deposed. The heartbeat interval also paces ReadIndex confirmations
when the lease has lapsed. ``commit_delay`` lets a new commit index ride on the next append
for a moment instead of costing an extra message on every write's critical path.
"""

from __future__ import annotations

from agentcluster.consensus.raft.core import RaftConfig

__all__ = ["RAFT_PRESETS", "raft_preset"]

RAFT_PRESETS: dict[str, RaftConfig] = {
    # One host (tests, `agentcluster up`): loopback RTT ~0.1 ms; 200 ms still rides out a
    # busy 2-core machine's scheduling hiccups. Failover in 0.2-0.4 s.
    "local": RaftConfig(election_timeout=0.2, heartbeat_interval=0.03, commit_delay=0.002),
    # A data centre: RTT < 1 ms, fsync ~0.1-2 ms. Failover in 0.3-0.6 s (etcd's defaults,
    # 1 s / 100 ms, fail over in 1-2 s).
    "lan": RaftConfig(election_timeout=0.3, heartbeat_interval=0.05, commit_delay=0.002),
    # Across regions: RTT up to ~200 ms; etcd's tuning guide suggests ~10x RTT for elections.
    "wan": RaftConfig(election_timeout=2.0, heartbeat_interval=0.25, commit_delay=0.01),
}


def raft_preset(name: str) -> RaftConfig:
    try:
        return RAFT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown raft preset {name!r}; one of {sorted(RAFT_PRESETS)}") from None
