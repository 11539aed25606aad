"""Raft consensus as a sans-I/O core: see :mod:`agentcluster.consensus.raft.core`."""

from agentcluster.consensus.raft._log import MemoryStorage
from agentcluster.consensus.raft.core import RaftConfig, RaftNode, RaftState
from agentcluster.consensus.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    Message,
    Ready,
    RequestVote,
    RequestVoteResponse,
    decode_message,
    encode_message,
)

__all__ = [
    "AppendEntries",
    "AppendEntriesResponse",
    "Entry",
    "EntryKind",
    "HardState",
    "MemoryStorage",
    "Message",
    "RaftConfig",
    "RaftNode",
    "RaftState",
    "Ready",
    "RequestVote",
    "RequestVoteResponse",
    "decode_message",
    "encode_message",
]
