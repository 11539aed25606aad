"""How the etcd backend reads etcd's errors: which refusals a retry, another endpoint or a new
auth token can fix, and which are final (see :mod:`agentcluster.store.etcd`).

Theory of operation: pure functions of a gRPC error's status code and details text, no I/O.
etcd 3.4 says most of what matters only in the details ("etcdserver: no leader", "etcdserver:
invalid auth token"), so those texts are matched exactly; the status code decides the rest.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from agentcluster.store.base import InvalidCommand, LeaseNotFound, ReplyTooLarge, StoreError

__all__ = [
    "AUTH_OFF",
    "NO_TOKEN",
    "RENEWALS_PER_CALL",
    "STALE_TOKEN",
    "EtcdAuthError",
    "consume",
    "detail_text",
    "final_error",
    "unsent",
]

# Refusals of the token (not of the user): etcd checks the token before a request reaches its
# log, and the auth store's revision when it applies one -- refused either way, not applied.
STALE_TOKEN = frozenset(
    {"etcdserver: invalid auth token", "etcdserver: revision of auth store is old"}
)
NO_TOKEN = "etcdserver: user name is empty"  # authentication is on and the call had no token
AUTH_OFF = "etcdserver: authentication is not enabled"
RENEWALS_PER_CALL = 3  # a token refused again right after a renewal is not a stale one


class EtcdAuthError(StoreError):
    """etcd refused the credentials, the token or the user's permission (see the module
    docstring); another endpoint would not change that."""


# Failures that prove the request was not applied: safe to send again, writes included.
_UNSENT_PREFIXES = ("failed to connect to all addresses",)
_UNSENT_DETAILS = frozenset({"etcdserver: no leader", "etcdserver: too many requests"})
_TOO_LARGE = "Received message larger than max"  # gRPC's words for its receive limit
# The same limit on etcd's side (its --max-request-bytes + gRPC's framing): our request.
_REQUEST_TOO_LARGE = "grpc: received message larger than max"


def consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def detail_text(err: Any) -> str:
    return str(err.details() or "")


def unsent(err: Any) -> bool:
    text = detail_text(err)
    return text.startswith(_UNSENT_PREFIXES) or text in _UNSENT_DETAILS


def final_error(err: Any) -> Exception | None:
    """The error to raise as is for a failure that another endpoint would not fix."""
    code, details = err.code(), detail_text(err)
    if details.startswith("etcdserver: authentication failed"):
        return EtcdAuthError(f"etcd refused the credentials: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return EtcdAuthError(f"etcd denied the request: {details}")
    if details == NO_TOKEN:
        return EtcdAuthError(
            "etcd has authentication on: connect with user= and password= "
            f"(etcd answered: {details})"
        )
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFound(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # InvalidCommand is a ValueError too, and what the other backends raise for a refusal.
        return InvalidCommand(f"etcd rejected the request: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(_REQUEST_TOO_LARGE):
        return InvalidCommand(
            f"etcd refused a request that large ({details}): it takes up to its "
            "--max-request-bytes, 1.5 MiB by default"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details:
        # The answer is over the client's receive limit (256 MiB): another endpoint would
        # send the same; a smaller page would not.
        return ReplyTooLarge(
            f"etcd's answer is larger than this client takes ({details}): read it in pages "
            "(limit and start, or Store.range_pages)"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details not in _UNSENT_DETAILS:
        return StoreError(f"etcd: {details}")  # e.g. "database space exceeded"
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ):
        return None
    return StoreError(f"etcd: {code.name}: {details}")
