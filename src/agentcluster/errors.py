"""The errors a user of the cluster API sees (``agentcluster.Cluster`` and ``cluster.call``).

Theory of operation: every failure of a cluster-level operation is one of these types (or a
coordination-layer error such as :class:`~agentcluster.coordination.registry_service.NameTaken`),
never a bare transport or asyncio exception, so callers can tell "nobody could take it" from
"it timed out" from "the remote agent raised".
"""

from __future__ import annotations

__all__ = [
    "CallError",
    "CallRemoteError",
    "ClusterError",
    "NoCapacity",
    "Rejected",
    "RemoteError",
    "Timeout",
]


class ClusterError(Exception):
    """Base of the cluster API's own errors."""


class RemoteError(ClusterError):
    """The remote side raised; ``remote_type`` names its exception type, the message is its
    message."""

    def __init__(self, message: str, remote_type: str = "") -> None:
        # Not super(): remote twins of other errors derive from classes with other signatures.
        Exception.__init__(self, message)
        self.remote_type = remote_type


class CallError(ClusterError):
    """``cluster.call`` failed; ``attempts`` lists the nodes tried, in order."""

    def __init__(self, message: str, *, attempts: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.attempts = attempts


class NoCapacity(CallError):
    """No node can take the call: no capable agent is registered, or every capable node is
    unreachable, ejected or behind an open breaker."""


class Timeout(CallError, TimeoutError):
    """No reply came: the call's deadline passed, or the connection to the target broke
    after the call was sent. Either way its outcome is unknown -- it may have run."""


class Rejected(CallError):
    """Load was shed: the target (or this node's own limiter) refused the call before running
    it. ``reason`` says why: ``concurrency_limit`` (the node's adaptive concurrency limit) or
    ``overload`` (the agent's mailbox is full)."""

    def __init__(self, message: str, *, reason: str = "", attempts: tuple[str, ...] = ()) -> None:
        super().__init__(message, attempts=attempts)
        self.reason = reason


class CallRemoteError(CallError, RemoteError):
    """The agent that ran the call raised (``remote_type``, message)."""

    def __init__(
        self, message: str, remote_type: str = "", *, attempts: tuple[str, ...] = ()
    ) -> None:
        RemoteError.__init__(self, message, remote_type)
        self.attempts = attempts
