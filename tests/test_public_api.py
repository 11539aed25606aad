"""The public API is exactly ``__all__``, every name in it resolves, and it is documented."""

from __future__ import annotations

import importlib
import pathlib
import re

import agentcluster

# The contract: changing the public surface means changing this list on purpose.
EXPECTED = {
    "Action", "ActionContext", "ActionError", "ActionTimeout", "ActionValidationError", "Agent",
    "AgentCrashed", "AgentError", "AgentServer", "AgentStopped", "Bus", "BusSensor",
    "CallTimeout", "Cancel", "CheckpointError", "ChildSpec", "Clock", "Correlation", "Directive",
    "Emit", "ErrorPolicy", "EventSensor", "Every", "HeartbeatSensor", "Instruction",
    "MailboxFull", "MonotonicClock", "PeriodicSensor", "Reply", "Result", "RetryableError",
    "Route", "Router", "Runtime", "Schedule", "Send", "Sensor", "Signal", "SignalError",
    "SimClock", "Skill", "SpawnAgent", "StartSensor", "Step", "Stop", "StopAgent", "StopSensor",
    "Subscription", "Supervisor", "SupervisorEscalation", "UnknownAgent", "Workflow",
    "WorkflowError", "__version__", "acmd", "action", "cmd", "configure_logging", "execute",
    "from_cloudevent", "run_chain", "run_parallel", "to_cloudevent",
    # The cluster-level API (issue 5), imported lazily on first use.
    "AgentEntry", "Cluster", "ClusterError", "Cond", "ConsensusError", "ConsensusTimeout",
    "Decision", "NameTaken", "Node", "NodeCluster", "RegistryError", "RemoteCluster",
    "RemoteError", "Rule", "VoteAction", "VoteRequest", "connect", "elect_by",
    # cluster.call (issue 6)
    "CallError", "CallRemoteError", "NoCapacity", "Rejected", "Timeout",
}  # fmt: skip


def test_import_stays_light() -> None:
    """``import agentcluster`` must not pull in the node stack (transport, Raft): programs
    that only run agents pay for what they use."""
    import subprocess
    import sys

    code = "import sys, agentcluster; print('agentcluster.node' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_all_matches_the_contract() -> None:
    assert set(agentcluster.__all__) == EXPECTED
    assert len(agentcluster.__all__) == len(EXPECTED), "duplicates in __all__"


def test_every_public_name_resolves() -> None:
    for name in agentcluster.__all__:
        assert getattr(agentcluster, name) is not None, name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from agentcluster import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(agentcluster.__all__)


def test_subpackages_declare_all_and_it_resolves() -> None:
    for module in (
        "agentcluster.signals",
        "agentcluster.agents",
        "agentcluster.testing",
        "agentcluster.store",
        "agentcluster.consensus.raft",
        "agentcluster.coordination",
        "agentcluster.balancing",
        "agentcluster.health",
    ):
        mod = importlib.import_module(module)
        for name in mod.__all__:
            assert hasattr(mod, name), f"{module}.{name}"


def test_version_matches_pyproject() -> None:
    pyproject = pathlib.Path(__file__).parents[1] / "pyproject.toml"
    match = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M)
    assert match is not None and match.group(1) == agentcluster.__version__


def test_py_typed_marker_ships() -> None:
    assert (pathlib.Path(agentcluster.__file__).parent / "py.typed").exists()
