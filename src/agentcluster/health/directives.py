"""What the HealthMonitor agent asks its node to do (agents decide, the node acts): the
directives of :mod:`agentcluster.clustering.health_monitor`, carried out by
:class:`agentcluster.health.service.HealthService`."""

from __future__ import annotations

from dataclasses import dataclass

from agentcluster.agents import Directive

__all__ = [
    "HEALTH_MONITOR",
    "MONITOR_CAPABILITY",
    "QUARANTINE_TOPIC",
    "ApplyQuarantine",
    "ProposeQuarantine",
    "RunHealthCycle",
    "SetOwnHealth",
    "SetPeerHealth",
]

HEALTH_MONITOR = "health_monitor"  # the agent's id on every node
MONITOR_CAPABILITY = "cluster.health_monitor"  # how monitors find each other in the registry
QUARANTINE_TOPIC = "health.quarantine"  # the topic of quarantine proposals


@dataclass(frozen=True, slots=True)
class RunHealthCycle(Directive):
    """Sample vitals, run the checks that are due, evaluate alert rules, tick the quarantine
    book; the results come back as ``cluster.health.report``."""


@dataclass(frozen=True, slots=True)
class SetOwnHealth(Directive):
    """Publish this node's health status (healthy / degraded / unhealthy)."""

    status: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SetPeerHealth(Directive):
    """This monitor's verdicts on its peers changed: the node's balancer weighs degraded
    peers down and skips unhealthy ones."""

    statuses: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ProposeQuarantine(Directive):
    """Ask every health monitor whether ``node`` should be quarantined (majority rule)."""

    node: str
    reason: str
    evidence: str = ""


@dataclass(frozen=True, slots=True)
class ApplyQuarantine(Directive):
    """The monitors decided: quarantine ``node`` here (recovery checks will release it)."""

    node: str
    reason: str
    decided_by: str = ""
