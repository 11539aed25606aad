"""Testing helpers that ship with agentcluster: virtual time, simulated clocks, SimCluster.

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

__all__ = [
    "SimClock",
    "SimCluster",
    "VirtualTimeLoop",
    "advance",
    "eventually",
    "run_virtual",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    if name == "SimCluster":
        from agentcluster.testing.simcluster import SimCluster

        return SimCluster
    raise AttributeError(f"module 'agentcluster.testing' has no attribute {name!r}")
