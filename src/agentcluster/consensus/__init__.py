"""Consensus: the embedded Raft implementation (:mod:`agentcluster.consensus.raft`)."""

from agentcluster.consensus import raft

__all__ = ["raft"]
