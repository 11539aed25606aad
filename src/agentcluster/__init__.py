"""agentcluster: agent-native clustering for Python.

Every cluster-management function is an agent — actions, sensors and signal routes, running
under supervision on every node. This package's public API is exactly ``__all__``; anything
else (underscored modules, subpackage internals) may change without notice.
"""

from typing import TYPE_CHECKING, Any

from agentcluster.agents import (
    Action,
    ActionContext,
    ActionError,
    ActionTimeout,
    ActionValidationError,
    Agent,
    AgentCrashed,
    AgentError,
    AgentServer,
    AgentStopped,
    BusSensor,
    CallTimeout,
    Cancel,
    CheckpointError,
    ChildSpec,
    Directive,
    Emit,
    ErrorPolicy,
    EventSensor,
    Every,
    HeartbeatSensor,
    Instruction,
    MailboxFull,
    PeriodicSensor,
    Reply,
    Result,
    RetryableError,
    Route,
    Runtime,
    Schedule,
    Send,
    Sensor,
    Skill,
    SpawnAgent,
    StartSensor,
    Step,
    Stop,
    StopAgent,
    StopSensor,
    Supervisor,
    SupervisorEscalation,
    UnknownAgent,
    Workflow,
    WorkflowError,
    acmd,
    action,
    cmd,
    execute,
    run_chain,
    run_parallel,
)
from agentcluster.clock import Clock, MonotonicClock, SimClock
from agentcluster.logs import configure_logging
from agentcluster.signals import (
    Bus,
    Correlation,
    Router,
    Signal,
    SignalError,
    Subscription,
    from_cloudevent,
    to_cloudevent,
)

if TYPE_CHECKING:  # the lazily imported names below, for type checkers
    from agentcluster.cluster import (
        Cluster,
        ClusterError,
        NodeCluster,
        RemoteCluster,
        RemoteError,
        connect,
        elect_by,
    )
    from agentcluster.coordination.consensus_service import ConsensusError, ConsensusTimeout
    from agentcluster.coordination.proposals import Decision, VoteAction, VoteRequest
    from agentcluster.coordination.query import Cond
    from agentcluster.coordination.registry import AgentEntry
    from agentcluster.coordination.registry_service import NameTaken, RegistryError
    from agentcluster.coordination.voting import Rule
    from agentcluster.errors import CallError, CallRemoteError, NoCapacity, Rejected, Timeout
    from agentcluster.node import Node

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActionContext",
    "ActionError",
    "ActionTimeout",
    "ActionValidationError",
    "Agent",
    "AgentCrashed",
    "AgentEntry",
    "AgentError",
    "AgentServer",
    "AgentStopped",
    "Bus",
    "BusSensor",
    "CallError",
    "CallRemoteError",
    "CallTimeout",
    "Cancel",
    "CheckpointError",
    "ChildSpec",
    "Clock",
    "Cluster",
    "ClusterError",
    "Cond",
    "ConsensusError",
    "ConsensusTimeout",
    "Correlation",
    "Decision",
    "Directive",
    "Emit",
    "ErrorPolicy",
    "EventSensor",
    "Every",
    "HeartbeatSensor",
    "Instruction",
    "MailboxFull",
    "MonotonicClock",
    "NameTaken",
    "NoCapacity",
    "Node",
    "NodeCluster",
    "PeriodicSensor",
    "RegistryError",
    "Rejected",
    "RemoteCluster",
    "RemoteError",
    "Reply",
    "Result",
    "RetryableError",
    "Route",
    "Router",
    "Rule",
    "Runtime",
    "Schedule",
    "Send",
    "Sensor",
    "Signal",
    "SignalError",
    "SimClock",
    "Skill",
    "SpawnAgent",
    "StartSensor",
    "Step",
    "Stop",
    "StopAgent",
    "StopSensor",
    "Subscription",
    "Supervisor",
    "SupervisorEscalation",
    "Timeout",
    "UnknownAgent",
    "VoteAction",
    "VoteRequest",
    "Workflow",
    "WorkflowError",
    "__version__",
    "acmd",
    "action",
    "cmd",
    "configure_logging",
    "connect",
    "elect_by",
    "execute",
    "from_cloudevent",
    "run_chain",
    "run_parallel",
    "to_cloudevent",
]

# The cluster-level API pulls in the whole node stack (transport, membership, Raft): imported
# on first use, so ``import agentcluster`` stays light for programs that only run agents.
_LAZY = {
    "AgentEntry": "agentcluster.coordination.registry",
    "CallError": "agentcluster.errors",
    "CallRemoteError": "agentcluster.errors",
    "Cluster": "agentcluster.cluster",
    "ClusterError": "agentcluster.errors",
    "Cond": "agentcluster.coordination.query",
    "ConsensusError": "agentcluster.coordination.consensus_service",
    "ConsensusTimeout": "agentcluster.coordination.consensus_service",
    "Decision": "agentcluster.coordination.proposals",
    "NameTaken": "agentcluster.coordination.registry_service",
    "NoCapacity": "agentcluster.errors",
    "Node": "agentcluster.node",
    "NodeCluster": "agentcluster.cluster",
    "RegistryError": "agentcluster.coordination.registry_service",
    "Rejected": "agentcluster.errors",
    "RemoteCluster": "agentcluster.cluster",
    "RemoteError": "agentcluster.errors",
    "Rule": "agentcluster.coordination.voting",
    "Timeout": "agentcluster.errors",
    "VoteAction": "agentcluster.coordination.proposals",
    "VoteRequest": "agentcluster.coordination.proposals",
    "connect": "agentcluster.cluster",
    "elect_by": "agentcluster.cluster",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agentcluster' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
