"""``cluster.call``: route a signal to an agent with a capability, anywhere in the cluster.

Theory of operation: a call finds the nodes hosting a capable, not-unhealthy agent in the
local registry view, asks the node's :class:`~agentcluster.balancing.balancer.Balancer` for
one (a function call on tables the balancer keeps; no mailbox on the hot path), and sends a
:class:`~agentcluster.control.CallRequest` over the transport (or runs it in place when the
pick is this node). The target runs the signal as a ``call`` on a local capable agent and
answers with a :class:`~agentcluster.control.CallReply`: the agent's reply, or a typed
failure.

Deadlines propagate: every attempt carries the time the caller still waits (an idempotent
call's attempt half of it when another node could take a retry), and the target gives its
agent no more than that. Retries go to *another* node (earlier attempts are
excluded from the pick) and only when that is safe -- the target certainly did not run the
call (it could not be reached, had no capable agent, or shed the load), or the caller said
the call is ``idempotent`` -- and only while the :class:`RetryBudget` allows, so a failing
cluster is not hammered by retry storms. Every outcome (latency, success) goes back to the
balancer, which feeds its strategies, breakers and outlier detection.

What the target says about itself (no agent, shed, too late) and what its agent raised are
told apart on the wire (``CallReply.raised``), never by an exception's type name: an agent
may raise anything, :class:`Rejected` from a nested call included, after doing its work.

Errors (:mod:`agentcluster.errors`): :class:`NoCapacity` (nobody can take it),
:class:`Timeout` (no reply: the deadline passed or the connection broke; it may have run),
:class:`Rejected` (load shed), :class:`CallRemoteError` (the agent raised, or its reply could
not travel: its type name and message). A signal too large to send is a ``ValueError``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from typing import TYPE_CHECKING, Any

from agentcluster.agents import AgentError, CallTimeout
from agentcluster.agents.runtime import UnknownAgent
from agentcluster.balancing.base import (
    Endpoint,
    NoEndpoint,
    PickRequest,
    published_inflight,
    published_report,
)
from agentcluster.balancing.limits import AdaptiveConcurrency, RejectReason
from agentcluster.control import CallReply, CallRequest
from agentcluster.errors import CallRemoteError, NoCapacity, Rejected, Timeout
from agentcluster.signals import Signal
from agentcluster.transport.base import ConnectFailed, TransportError
from agentcluster.wire import Oversized

if TYPE_CHECKING:
    from agentcluster.agents.server import AgentServer
    from agentcluster.balancing.balancer import Balancer
    from agentcluster.node import Node

__all__ = ["MAX_CALL_TIMEOUT", "CallService", "RetryBudget"]

log = logging.getLogger(__name__)

_DEGRADED_WEIGHT = 0.25  # weight factor of a node whose HealthMonitor reports it degraded
MAX_CALL_TIMEOUT = 300.0
"""The longest a call may take (seconds): a node will not hold an agent's run longer, so a
longer deadline is refused up front rather than cut short after the work is done."""
_MIN_TRY = 0.05  # below twice this, an idempotent call's last try gets all the time left
# The node's own statuses (``CallReply.raised`` false) that count against it (breakers,
# outlier ejection, latency). What an agent raised never does, whatever its type name.
_NODE_FAILURES = frozenset({"NotSent", "Timeout", "Rejected", "NoAgent", "Lost"})
# The node's own statuses after which it certainly did not run the call.
_NOT_RUN = frozenset({"NoAgent", "Rejected", "NotSent"})
# Statuses after which the call may have run: retried only when the caller says it may be.
_UNKNOWN = frozenset({"Timeout", "Lost"})
# An agent's error message travels cut to this many characters: a frame is 4 MiB at most,
# and a message is for a human (64 Ki characters are 256 KiB at most in UTF-8).
_MAX_ERROR = 64 << 10


_NOBODY: frozenset[str] = frozenset()


class RetryBudget:
    """Retries allowed as a share of recent requests (Finagle's retry budget), with a floor
    for quiet callers: a retry is allowed while retries in the last ``window`` stay within
    ``ratio`` of the requests in it, *or* while retries in the last second stay under
    ``min_per_s``. So at most the larger of the two limits, never their sum, and the floor
    is a rate: a burst of failures cannot spend ``window`` seconds of it at once (Finagle
    keeps a reserve of ``min_per_s * window`` tokens, which a burst can take in one go,
    doubling the load on a failing service). Pure: the caller passes ``now``."""

    def __init__(self, *, ratio: float = 0.2, min_per_s: float = 10.0, window: float = 10.0):
        if not 0 <= ratio <= 1 or min_per_s < 0 or window <= 0:
            raise ValueError("retry budget: ratio in [0, 1], min_per_s >= 0, window > 0")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window = window
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()
        self._last_second: collections.deque[float] = collections.deque()  # retries in it
        self.refused = 0

    def _trim(self, now: float) -> None:
        cutoff = now - self.window
        for q in (self._requests, self._retries):
            while q and q[0] < cutoff:
                q.popleft()
        recent = self._last_second
        while recent and recent[0] <= now - 1.0:
            recent.popleft()

    def request(self, now: float) -> None:
        self._requests.append(now)
        if len(self._requests) > 100_000:  # bound memory under a flood; the ratio survives
            self._requests.popleft()

    def can_retry(self, now: float) -> bool:
        """Whether a retry now would be allowed (nothing is spent)."""
        self._trim(now)
        return (
            len(self._retries) + 1 <= self.ratio * len(self._requests)
            or len(self._last_second) + 1 <= self.min_per_s
        )

    def try_retry(self, now: float) -> bool:
        if not self.can_retry(now):
            self.refused += 1
            return False
        self._retries.append(now)
        self._last_second.append(now)
        if len(self._retries) > 100_000:
            self._retries.popleft()
        return True


class CallService:
    """One node's call path: client side (:meth:`call`) and server side (:meth:`serve`)."""

    def __init__(self, node: Node, balancer: Balancer) -> None:
        self.node = node
        self.balancer = balancer
        self.budget = RetryBudget()
        self._versions: dict[str, tuple[int, int, int]] = {}
        # capability -> (registry version, the local agent that served it last)
        self._local: dict[str, tuple[int, AgentServer]] = {}
        self.served = 0
        self.failed = 0  # calls this node ran whose agent failed or timed out
        self.shed = 0
        self.in_flight = 0  # calls this node is serving now (its load report)
        # Serving side: admit what the node can run without queueing up (Gradient2).
        self.limiter = AdaptiveConcurrency(
            rng=random.Random(node.rng.random()), now=node.clock.now()
        )

    # ----------------------------------------------------------------- endpoints
    def _refresh(self, capability: str, now: float) -> None:
        """Give the balancer the nodes hosting a capable agent, when the registry, the
        membership or this node's own metadata changed since the last call for this
        capability."""
        node = self.node
        index = node.registry.index
        # The node's own metadata (its load report, its health tag) changes without a local
        # membership event, so the key holds our incarnation too: the core bumps it when it
        # applies each update (not when one is asked for while stalled), and it is an int read
        # on the call path. (A refutation bumps it as well: one spare rebuild, rarely.)
        version = (
            index.capability_version(capability),
            node.membership_version,
            node.core.incarnation,
        )
        if self._versions.get(capability) == version:
            return
        self._versions[capability] = version
        per_node: dict[str, int] = {}
        for e in index.find_capable(capability, healthy_only=False):
            if e.health != "unhealthy":
                per_node[e.node] = per_node.get(e.node, 0) + 1
        endpoints = []
        for name, agents in per_node.items():
            m = node.core.member(name)
            if m is None or m.state not in ("alive", "suspect"):
                continue
            health = m.meta.tags.get("health", "healthy")
            if health == "unhealthy":
                continue  # its own monitor says it cannot serve
            cap = m.meta.capacity
            endpoints.append(
                Endpoint(
                    name,
                    # A node that reports itself degraded keeps a trickle of traffic (so its
                    # recovery shows) but far less than its share.
                    weight=float(agents) * (_DEGRADED_WEIGHT if health == "degraded" else 1.0),
                    zone=m.meta.zone,
                    region=m.meta.region,
                    cpu=cap.get("cpu", 0.0),
                    memory=cap.get("memory", 0.0),
                    network=cap.get("network", 0.0),
                    # Every client's calls, from the node's own report: the balancer's live
                    # counts cover only ours. A peer's garbled figure reads as 0.
                    in_flight=published_inflight(cap.get("in_flight", 0.0)),
                    load_report=published_report(cap.get("load_report", 0)),
                )
            )
        self.balancer.set_endpoints(capability, endpoints, now)

    # ----------------------------------------------------------------- client side
    async def call(
        self,
        capability: str,
        signal: Signal,
        *,
        timeout: float = 5.0,
        key: str | None = None,
        idempotent: bool = False,
        zone: str | None = None,
        region: str | None = None,
    ) -> Any:
        if not 0 < timeout <= MAX_CALL_TIMEOUT:
            raise ValueError(
                f"timeout must be > 0 and <= {MAX_CALL_TIMEOUT:g} seconds, not {timeout}"
            )
        clock = self.node.clock
        now = clock.now()
        deadline = now + timeout
        self._refresh(capability, now)
        config = self.node.config  # this node's location is in its configuration
        request = PickRequest(
            key,
            zone if zone is not None else config.zone,
            region if region is not None else config.region,
        )
        self.budget.request(now)
        tried: list[str] = []
        last: Exception | None = None
        while True:  # ``now``: when this attempt starts
            left = deadline - now
            if left <= 0:
                raise Timeout(
                    f"call to {capability!r} timed out after {timeout}s", attempts=tuple(tried)
                )
            try:
                target = self.balancer.pick(
                    capability, request, now, frozenset(tried) if tried else _NOBODY
                )
            except NoEndpoint:
                if last is not None:
                    raise last from None
                raise NoCapacity(
                    f"no node can take a call for {capability!r}", attempts=tuple(tried)
                ) from None
            ticket = self.balancer.probe_ticket(target)  # (before any await)
            tried.append(target)
            self.balancer.started(capability, target, now)
            # An idempotent call keeps half its time for a retry elsewhere (a per-try timeout,
            # as Envoy's): one stalled node must not eat the whole deadline. With no other
            # node to retry on, the half kept back would only make it fail early.
            budget = left
            if (
                idempotent
                and left > 2 * _MIN_TRY
                and self._another(capability, tried)
                and self.budget.can_retry(now)
            ):
                budget = left / 2
            try:
                reply = await self._attempt(target, capability, signal, budget)
            except BaseException:
                # Cancelled, or the request could not even be built: no outcome to record,
                # but the attempt must not stay in flight (nor keep a half-open probe slot).
                done = clock.now()
                self.balancer.abandoned(capability, target, done - now, done, ticket)
                raise
            done = clock.now()
            if reply.ok:
                # The caller has its answer now; the balancer records it on the next loop turn
                # (one callback, off the caller's path: bench lb measured the call's median
                # 0.06-0.1 of a round trip lower). A pick made before then -- the caller's
                # next call, without an await between -- still counts this one in flight.
                asyncio.get_running_loop().call_soon(
                    self._succeeded, capability, target, done - now, done, len(tried), ticket
                )
                return reply.data
            # An error the agent raised is the agent's answer, not the node's failure, and
            # it ran: never retried. Only the node's own statuses say "not run".
            kind = reply.error_type
            raised = reply.raised
            ok = raised or kind not in _NODE_FAILURES
            events = self.balancer.finished(
                capability, target, done - now, ok, done, attempt=len(tried), ticket=ticket
            )
            if events:  # a breaker tripped, a node was ejected: the rest of the node hears it
                # (off the caller's path: a slow bus subscriber must not hold up the call,
                # nor turn its typed error into the bus's QueueFull)
                self.node.lb.publish_soon(events)
            err = _error(capability, target, reply, tuple(tried))
            safe = not raised and (kind in _NOT_RUN or (idempotent and kind in _UNKNOWN))
            if not safe or not self.budget.try_retry(done):
                raise err
            last = err
            now = clock.now()

    def _another(self, capability: str, tried: list[str]) -> bool:
        """Whether a node not tried yet is eligible for ``capability`` (could take a retry)."""
        return any(n not in tried for n in self.balancer.eligible(capability))

    def _succeeded(
        self, capability: str, target: str, latency: float, now: float, attempt: int, ticket: int
    ) -> None:
        events = self.balancer.finished(
            capability, target, latency, True, now, attempt=attempt, ticket=ticket
        )
        if events:  # a half-open breaker closed on this probe: the rest of the node hears it
            self.node.lb.publish_soon(events)

    async def _attempt(
        self, target: str, capability: str, signal: Signal, left: float
    ) -> CallReply:
        node = self.node
        if target == node.name:
            # Through the mailbox: a direct run could take the caller's own task down with
            # the agent (see AgentServer.call_direct).
            return await self.serve(CallRequest(capability, signal, left), direct=False)
        addr = node.core.addr_of(target)
        if addr is None:
            return CallReply(False, error_type="NotSent", error=f"{target} is not a member")
        try:
            frame = node.stream_codec.encode(CallRequest(capability, signal, left))
        except Oversized as exc:
            # The caller's input, the same on any node: no retry (the caller's handler of
            # exceptions from here hands the attempt back to the balancer).
            raise ValueError(
                f"call to {capability!r}: the signal is too large to send ({exc})"
            ) from None
        try:
            raw = await node.transport.request(addr, frame, timeout=left)
        except ConnectFailed as exc:
            return CallReply(False, error_type="NotSent", error=str(exc))
        except TimeoutError:
            return CallReply(False, error_type="Timeout", error=f"{target} did not answer")
        except (TransportError, OSError) as exc:
            # The connection broke mid-call: it may or may not have run.
            return CallReply(False, error_type="Lost", error=f"{target}: {exc}")
        reply = node.stream_codec.try_decode(raw)
        if not isinstance(reply, CallReply):
            return CallReply(False, error_type="Lost", error=f"{target} sent no valid reply")
        return reply

    # ----------------------------------------------------------------- server side
    async def serve(self, req: CallRequest, *, direct: bool = True) -> CallReply:
        """Run a call on a local agent; ``direct``: on this task when the agent is idle
        (this task serves the one request: a connection's, see AgentServer.call_direct)."""
        node = self.node
        if req.agent is None:
            server = self._local_server(req.capability)
            if server is None:
                return CallReply(
                    False, error_type="NoAgent", error=f"no {req.capability!r} agent on {node.name}"
                )
        else:  # the agent the caller's registry named
            try:
                server = node.runtime.lookup(req.agent)
            except UnknownAgent as exc:
                return CallReply(False, error_type="NoAgent", error=str(exc))
            except AgentError as exc:  # a name several agents share (the node's answer)
                return CallReply(False, error_type=type(exc).__name__, error=str(exc))
        timeout = min(max(req.timeout, 0.001), MAX_CALL_TIMEOUT)
        if server.mailbox_depth >= server.mailbox_size:
            # Shed at once rather than wait for room: the caller can go elsewhere now.
            self.shed += 1
            return CallReply(
                False,
                error_type="Rejected",
                error=f"agent {server.id!r} on {node.name} has a full mailbox "
                f"({server.mailbox_size})",
                reason=RejectReason.OVERLOAD,
            )
        clock = node.clock
        started = clock.now()
        ticket = self.limiter.acquire(started)
        if ticket is None:
            self.shed += 1
            return CallReply(
                False,
                error_type="Rejected",
                error=f"{node.name} is at its concurrency limit ({self.limiter.limit})",
                reason=RejectReason.CONCURRENCY_LIMIT,
            )
        self.in_flight += 1
        ok = False
        try:
            if direct:  # no mailbox hand-over on the hot path
                data = await server.call_direct(req.signal, timeout=timeout)
            else:
                data = await server.call(req.signal, timeout=timeout)
            ok = True
        # (No MailboxFull here: server.call waits for room, and a full mailbox was shed
        # above; one arriving here is the agent's own -- a cast to a busy downstream agent
        # after it did its work -- and goes back as what the agent raised.)
        except CallTimeout as exc:
            self.failed += 1
            if clock.now() - started < timeout * 0.999:
                # Not this call's deadline (its timer fires only once ``timeout`` passed):
                # a nested call of the agent's own timed out, and the agent raised that.
                return _raised(exc)
            return _late(server.id, node.name, timeout)
        except Exception as exc:
            self.failed += 1
            # Action failures may arrive wrapped; the user wants the agent's own error.
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            return _raised(cause)
        finally:
            self.in_flight -= 1
            now = clock.now()
            self.limiter.release(ticket, now - started, ok, now)
        if now - started > timeout:
            # A direct run is not interrupted at the deadline; its caller has given up.
            self.failed += 1
            return _late(server.id, node.name, timeout)
        self.served += 1
        return CallReply(True, data=data)

    def encode_reply(self, reply: CallReply) -> bytes:
        """The sealed frame for ``reply``; a reply the agent made unsendable -- a type msgpack
        cannot carry (TypeError), an int beyond 64 bits (OverflowError), a frame over the
        codec's limit (Oversized) -- becomes the agent's typed error instead of a dropped
        connection, which the caller could only read as "lost" (it may not have run)."""
        codec = self.node.stream_codec
        try:
            return codec.encode(reply)
        except Exception as exc:  # whatever the encoder raises: the connection must answer
            if reply.ok:  # counted as served; its caller gets an error instead
                self.served -= 1
                self.failed += 1
            error = _cut(f"reply not serialisable: {exc}")
            return codec.encode(
                CallReply(False, error_type=type(exc).__name__, error=error, raised=True)
            )

    def stats(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "failed": self.failed,
            "shed": self.shed,
            "in_flight": self.in_flight,
            "retries_refused": self.budget.refused,
            "limit": self.limiter.limit,
        }

    def _local_server(self, capability: str) -> AgentServer | None:
        """The running local agent that takes calls for ``capability``; cached per registry
        version, and only while that very server is still the one running (a restarted
        agent is a new server)."""
        node = self.node
        index = node.registry.index
        version = index.capability_version(capability)
        cached = self._local.get(capability)
        runtime = node.runtime
        if cached is not None and cached[0] == version:
            server = cached[1]
            if runtime.get_id(server.id) is server:
                return server
        for e in index.find_capable(capability, healthy_only=False):
            if e.node == node.name and e.health != "unhealthy":
                found = runtime.get_id(e.id.split("/", 1)[1])
                if found is not None:
                    self._local[capability] = (version, found)
                    return found
        return None


def _cut(message: str) -> str:
    """``message``, cut to what an error reply carries (a frame has a size limit)."""
    if len(message) <= _MAX_ERROR:
        return message
    return f"{message[:_MAX_ERROR]}... (cut: {len(message):,} characters)"


def _raised(exc: BaseException) -> CallReply:
    """The reply telling the caller what the agent raised (marked as the agent's own)."""
    return CallReply(False, error_type=type(exc).__name__, error=_cut(str(exc)), raised=True)


def _late(agent: str, node: str, timeout: float) -> CallReply:
    return CallReply(False, error_type="Timeout", error=f"{agent} on {node} took over {timeout}s")


def _error(capability: str, target: str, reply: CallReply, tried: tuple[str, ...]) -> Exception:
    kind = reply.error_type
    if reply.raised:  # the agent's own error, whatever it is called
        return CallRemoteError(f"{target}: {kind}: {reply.error}", kind, attempts=tried)
    if kind == "Rejected":
        return Rejected(
            f"{target} refused the call: {reply.error}",
            reason=reply.reason or RejectReason.OVERLOAD,
            attempts=tried,
        )
    if kind == "Timeout":
        return Timeout(f"call to {capability!r} on {target}: {reply.error}", attempts=tried)
    if kind == "Lost":
        # Timeout, not a type of its own: what a caller decides on is whether the call may
        # have run, and Timeout is the outcome documented as "it may have run" -- code that
        # handles it (a retry of an idempotent call, a check of the effect) is right here too.
        # Not NoCapacity, which says no node could take it: this one did.
        return Timeout(
            f"call to {capability!r} on {target}: the connection broke after the call was "
            f"sent, it may have run ({reply.error})",
            attempts=tried,
        )
    if kind in ("NoAgent", "NotSent"):
        return NoCapacity(
            f"call to {capability!r} on {target} failed: {reply.error}", attempts=tried
        )
    return CallRemoteError(f"{target}: {kind}: {reply.error}", kind, attempts=tried)
