"""Raft consensus as a sans-I/O core: see :mod:`agentcluster.consensus.raft.core`."""

from agentcluster.consensus.raft._log import MemoryStorage, Storage
from agentcluster.consensus.raft.core import RaftConfig, RaftNode, RaftState
from agentcluster.consensus.raft.disk import DiskStorage, StorageCorruption, StorageLocked
from agentcluster.consensus.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    ConfChange,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    InstallSnapshot,
    Message,
    Ready,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    SnapshotChunk,
    SnapshotChunkAck,
    TimeoutNow,
    decode_message,
    encode_message,
)

__all__ = [
    "AppendEntries",
    "AppendEntriesResponse",
    "ConfChange",
    "ConfState",
    "DiskStorage",
    "Entry",
    "EntryKind",
    "HardState",
    "InstallSnapshot",
    "MemoryStorage",
    "Message",
    "RaftConfig",
    "RaftNode",
    "RaftState",
    "Ready",
    "RequestVote",
    "RequestVoteResponse",
    "Snapshot",
    "SnapshotChunk",
    "SnapshotChunkAck",
    "Storage",
    "StorageCorruption",
    "StorageLocked",
    "TimeoutNow",
    "decode_message",
    "encode_message",
]
