"""Testing helpers that ship with agentcluster: virtual time, simulated clocks."""

from agentcluster.clock import SimClock
from agentcluster.testing._virtual_time import VirtualTimeLoop, advance, run_virtual, wait_until

__all__ = ["SimClock", "VirtualTimeLoop", "advance", "run_virtual", "wait_until"]
