"""The coordination store: one async interface (:class:`Store`), several backends.

:class:`MemoryStore` runs in one process; elections and locks (:class:`Election`,
:class:`Lock`) work on every backend. :class:`KVStateMachine`, the command codec,
:class:`LeaseTimers` and :class:`WatchHub` are the shared pieces backends are built from.
"""

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
    "RangeResult",
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
