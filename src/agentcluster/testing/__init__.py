"""Testing helpers that ship with agentcluster: virtual time, simulated clocks, SimCluster, and a
linearizability checker (:mod:`agentcluster.testing.linearizability`; ``check`` is exported as
``check_linearizability``).

``SimCluster`` is imported on first use: it pulls in the whole node stack, which plain
runtime tests do not need.
"""

from typing import Any

from agentcluster.clock import SimClock
from agentcluster.testing._virtual_time import (
    VirtualTimeLoop,
    advance,
    eventually,
    run_virtual,
    wait_until,
)
from agentcluster.testing.linearizability import (
    UNKNOWN,
    Candidate,
    Cas,
    CompareAndSwap,
    Delete,
    Get,
    HistoryRecorder,
    KeepAlive,
    KVModel,
    LeasePut,
    LeaseRevoke,
    LinearizabilityResult,
    Model,
    Operation,
    PartitionReport,
    Put,
    Read,
    RegisterModel,
    Write,
)
from agentcluster.testing.linearizability import check as check_linearizability

__all__ = [
    "UNKNOWN",
    "Candidate",
    "Cas",
    "CompareAndSwap",
    "Delete",
    "Get",
    "HistoryRecorder",
    "KVModel",
    "KeepAlive",
    "LeasePut",
    "LeaseRevoke",
    "LinearizabilityResult",
    "Model",
    "Operation",
    "PartitionReport",
    "Put",
    "Read",
    "RegisterModel",
    "SimClock",
    "SimCluster",
    "VirtualTimeLoop",
    "Write",
    "advance",
    "check_linearizability",
    "eventually",
    "run_virtual",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    if name == "SimCluster":
        from agentcluster.testing.simcluster import SimCluster

        return SimCluster
    raise AttributeError(f"module 'agentcluster.testing' has no attribute {name!r}")
