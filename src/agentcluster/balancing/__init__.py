"""Load balancing: strategies, breakers, outlier ejection, panic mode, slow start and limits,
all pure cores, and the :class:`Balancer` that combines them for the call path.

Theory of operation: a strategy (one module each, behind :class:`Strategy`) picks among the
endpoints the balancer found eligible; the balancer decides eligibility per node (quarantine,
outlier ejection, circuit breakers, panic mode, slow-start weights) and feeds outcomes back.
The LoadBalancer agent (:mod:`agentcluster.clustering.load_balancer`) runs the control
plane; :mod:`agentcluster.calls` is the data plane users reach through ``cluster.call``.
"""

from agentcluster.balancing.adaptive import Adaptive
from agentcluster.balancing.affinity import SessionAffinity
from agentcluster.balancing.balancer import Balancer, RouteDecision
from agentcluster.balancing.base import Endpoint, NoEndpoint, PickRequest, Strategy
from agentcluster.balancing.bounded_load import BoundedLoad
from agentcluster.balancing.breaker import BreakerConfig, Breakers, BreakerState, CircuitBreaker
from agentcluster.balancing.capacity_aware import CapacityAware
from agentcluster.balancing.geographic import Geographic
from agentcluster.balancing.latency_aware import PeakEwma
from agentcluster.balancing.least_connections import LeastConnections
from agentcluster.balancing.limits import (
    AdaptiveConcurrency,
    AdaptiveThresholds,
    ConcurrencyConfig,
    SurgeConfig,
    SurgeDetector,
)
from agentcluster.balancing.maglev import Maglev
from agentcluster.balancing.outliers import OutlierConfig, OutlierDetector
from agentcluster.balancing.panic import PanicGate, SlowStart
from agentcluster.balancing.round_robin import RoundRobin
from agentcluster.balancing.strategies import STRATEGIES, UnknownStrategy, make_strategy
from agentcluster.balancing.weighted import WeightedRoundRobin, capacity_weight

__all__ = [
    "STRATEGIES",
    "Adaptive",
    "AdaptiveConcurrency",
    "AdaptiveThresholds",
    "Balancer",
    "BoundedLoad",
    "BreakerConfig",
    "BreakerState",
    "Breakers",
    "CapacityAware",
    "CircuitBreaker",
    "ConcurrencyConfig",
    "Endpoint",
    "Geographic",
    "LeastConnections",
    "Maglev",
    "NoEndpoint",
    "OutlierConfig",
    "OutlierDetector",
    "PanicGate",
    "PeakEwma",
    "PickRequest",
    "RoundRobin",
    "RouteDecision",
    "SessionAffinity",
    "SlowStart",
    "Strategy",
    "SurgeConfig",
    "SurgeDetector",
    "UnknownStrategy",
    "WeightedRoundRobin",
    "capacity_weight",
    "make_strategy",
]
