"""The coordination store: one async interface (:class:`Store`), several backends.

:class:`MemoryStore` runs in one process; a node's ``node.store`` is a
:class:`~agentcluster.store.raft.RaftStore` (the embedded Raft); :class:`RemoteStore` reaches
a cluster's store from outside through a node's control API (imported on first use: it pulls in
the control client); :class:`~agentcluster.store.etcd.EtcdStore` (module ``etcd``, the
``agentcluster[etcd]`` extra) talks to a real etcd. Elections and locks (:class:`Election`,
:class:`Lock`) work on every backend. :class:`KVStateMachine`, the command codec,
:class:`LeaseTimers` and :class:`WatchHub` are the shared pieces backends are built from.
"""

from typing import Any

from agentcluster.store._kv import (
    Command,
    InvalidCommand,
    KVStateMachine,
    decode_command,
    encode_command,
)
from agentcluster.store._leases import LeaseTimers
from agentcluster.store._recipes import Election, Leadership, Lock
from agentcluster.store._watch import WatchHub
from agentcluster.store.base import (
    Compacted,
    Compare,
    DeleteOp,
    GetOp,
    KeyValue,
    Lease,
    LeaseNotFound,
    PutOp,
    RangeResult,
    Store,
    StoreError,
    StoreUnavailable,
    TxnOp,
    TxnResult,
    WatchEvent,
)
from agentcluster.store.memory import MemoryStore
from agentcluster.store.raft import RaftStore, ReplyTooLarge

__all__ = [
    "Command",
    "Compacted",
    "Compare",
    "DeleteOp",
    "Election",
    "GetOp",
    "InvalidCommand",
    "KVStateMachine",
    "KeyValue",
    "Leadership",
    "Lease",
    "LeaseNotFound",
    "LeaseTimers",
    "Lock",
    "MemoryStore",
    "PutOp",
    "RaftStore",
    "RangeResult",
    "RemoteStore",
    "ReplyTooLarge",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TxnOp",
    "TxnResult",
    "WatchEvent",
    "WatchHub",
    "decode_command",
    "encode_command",
]


def __getattr__(name: str) -> Any:
    if name == "RemoteStore":
        from agentcluster.store.remote import RemoteStore

        return RemoteStore
    raise AttributeError(f"module 'agentcluster.store' has no attribute {name!r}")
