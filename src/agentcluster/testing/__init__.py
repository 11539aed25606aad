"""Testing helpers that ship with agentcluster: virtual time, simulated clocks."""

from agentcluster.clock import SimClock
from agentcluster.testing._virtual_time import VirtualTimeLoop, run_virtual

__all__ = ["SimClock", "VirtualTimeLoop", "run_virtual"]
