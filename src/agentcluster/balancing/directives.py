"""What the LoadBalancer agent asks its node to do (agents decide, the node acts): the
directives of :mod:`agentcluster.clustering.load_balancer`, carried out by
:class:`agentcluster.balancing.service.BalancerService`."""

from __future__ import annotations

from dataclasses import dataclass

from agentcluster.agents import Directive

__all__ = [
    "SURGE_TOPIC",
    "BalancerTick",
    "ProposeSurge",
    "ReportLoad",
    "SetQuarantined",
    "SetStrategy",
]

SURGE_TOPIC = "lb.surge"  # the topic of the balancers' surge proposals


@dataclass(frozen=True, slots=True)
class BalancerTick(Directive):
    """Run the balancer's periodic work now."""


@dataclass(frozen=True, slots=True)
class ReportLoad(Directive):
    """Publish this node's load in its membership metadata."""


@dataclass(frozen=True, slots=True)
class SetStrategy(Directive):
    """Route with strategy ``name`` (every capability without its own strategy)."""

    name: str


@dataclass(frozen=True, slots=True)
class SetQuarantined(Directive):
    """These nodes get no traffic (they stay members)."""

    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProposeSurge(Directive):
    """Ask the other balancers to switch to ``strategy`` for the surge."""

    strategy: str
