"""The node's side of consensus: it carries out what the ConsensusCoordinator decides.

Theory of operation: :meth:`ConsensusService.start` validates a proposal, registers a waiter
and hands the proposal to the local coordinator agent (``cluster.consensus.propose``). The
agent answers with directives this service executes: :class:`RequestVotes` (vote requests
sent concurrently, so one unreachable participant holds up nobody), :class:`CommitDecision`
(a store transaction that creates ``mabeam/consensus/<ref>`` only if it is absent, retried
while the store is unavailable; whatever the store then holds -- ours or a racing
coordinator's -- goes back to the agent and to the waiters) and :class:`BroadcastDecision`
(``cluster.consensus.decided`` to every other node's coordinator).

:meth:`result` waits for a proposal started here, or watches the store for one started
elsewhere; :meth:`history` reads the committed decisions from the store (the cluster-wide,
durable history; each coordinator agent also keeps the last ones it saw in its state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster._background import spawn_owned
from agentcluster.agents import AgentServer
from agentcluster.coordination._finite import non_finite_value
from agentcluster.coordination.proposals import (
    CONSENSUS_PREFIX,
    COORDINATOR,
    BroadcastDecision,
    CommitDecision,
    Decision,
    ProposalSpec,
    RequestVotes,
    split_participant,
)
from agentcluster.coordination.voting import Rule, Tally, majority
from agentcluster.signals import Signal
from agentcluster.signals._signal import new_id
from agentcluster.store.base import Compare, GetOp, PutOp, Store, StoreError

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = ["ConsensusError", "ConsensusService", "ConsensusTimeout"]

log = logging.getLogger(__name__)

_COMMIT_GRACE = 10.0  # how long past its deadline a decision may take to reach the store
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Decision)


class ConsensusError(Exception):
    """A proposal could not be started or its decision could not be committed."""


class ConsensusTimeout(ConsensusError, TimeoutError):
    """No committed decision within the time asked for."""


def encode_decision(d: Decision) -> bytes:
    return _enc.encode(d)


def decode_decision(raw: bytes, revision: int) -> Decision:
    return msgspec.structs.replace(_dec.decode(raw), revision=revision)


class ConsensusService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._waiters: dict[str, list[asyncio.Future[Decision]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.vote_requests_failed = 0
        self.commits = 0
        self.commits_adopted = 0  # a racing coordinator committed first

    def attach(self) -> None:
        rt = self.node.runtime
        rt.register_directive(RequestVotes, self._request_votes)
        rt.register_directive(CommitDecision, self._commit)
        rt.register_directive(BroadcastDecision, self._broadcast)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(ConsensusError(f"node {self.node.name} stopped"))
        self._waiters.clear()

    def _spawn(self, coro: Any) -> None:
        spawn_owned(self._tasks, coro, log)

    def _store(self) -> Store:
        if self.node.store_host is None:
            raise ConsensusError(
                "consensus commits through the coordination store: configure store_voters"
            )
        return self.node.store

    # ----------------------------------------------------------------- the API
    async def start(
        self,
        participants: Sequence[str],
        proposal: Any,
        *,
        rule: Rule | None = None,
        timeout: float = 5.0,
        topic: str = "",
        ref: str | None = None,
    ) -> str:
        """Open a proposal; returns its reference. ``ref`` lets several coordinators run one
        proposal (they agree on a single outcome)."""
        self._store()
        rule = rule if rule is not None else majority()
        parts = list(participants)
        try:
            for p in parts:
                split_participant(p)
            Tally(parts, rule)
        except ValueError as exc:
            raise ConsensusError(str(exc)) from None
        # A NaN would live on in the committed decision: no comparison with it holds, and
        # the history's JSON is invalid. Deep nesting is refused too (see _finite).
        bad = non_finite_value(proposal, "proposal")
        if bad is not None:
            raise ConsensusError(bad)
        try:
            _enc.encode(proposal)
        except TypeError as exc:
            raise ConsensusError(f"the proposal cannot be serialised: {exc}") from None
        if not 0 < timeout <= 3600:
            raise ConsensusError(f"timeout must be in (0, 3600] seconds, not {timeout}")
        ref = ref if ref is not None else new_id()
        spec = ProposalSpec(ref, parts, proposal, rule, timeout, self.node.name, topic)
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ref, []).append(fut)
        signal = Signal(type="cluster.consensus.propose", data=msgspec.to_builtins(spec))
        try:
            await self.node.runtime.cast(COORDINATOR, signal, timeout=timeout)
        except Exception as exc:
            self._drop_waiter(ref, fut)
            raise ConsensusError(f"the consensus coordinator refused the proposal: {exc}") from exc
        return ref

    async def result(self, ref: str, *, timeout: float | None = None) -> Decision:
        """The committed decision of ``ref`` (waits for it)."""
        futs = self._waiters.get(ref)
        try:
            async with asyncio.timeout(timeout):
                if futs:
                    return await asyncio.shield(futs[0])
                return await self._await_store(ref)
        except TimeoutError:
            raise ConsensusTimeout(f"no decision for proposal {ref} within {timeout}s") from None

    async def decide(
        self,
        participants: Sequence[str],
        proposal: Any,
        *,
        rule: Rule | None = None,
        timeout: float = 5.0,
        topic: str = "",
        ref: str | None = None,
    ) -> Decision:
        """Start a proposal and wait for its committed decision."""
        ref = await self.start(
            participants, proposal, rule=rule, timeout=timeout, topic=topic, ref=ref
        )
        return await self.result(ref, timeout=timeout + _COMMIT_GRACE)

    async def lookup(self, ref: str) -> Decision | None:
        kv = await self._store().get(CONSENSUS_PREFIX + ref)
        return None if kv is None else decode_decision(kv.value, kv.create_revision)

    async def history(self, *, limit: int = 100, topic: str | None = None) -> list[Decision]:
        """Committed decisions, oldest first (refs are time-ordered), the last ``limit``."""
        res = await self._store().range(CONSENSUS_PREFIX)
        out = []
        for kv in res.kvs:
            try:
                d = decode_decision(kv.value, kv.create_revision)
            except msgspec.DecodeError:
                log.warning("undecodable decision record %s skipped", kv.key)
                continue
            if topic is None or d.topic == topic:
                out.append(d)
        return out[-limit:] if limit > 0 else out

    async def _await_store(self, ref: str) -> Decision:
        store = self._store()
        key = CONSENSUS_PREFIX + ref
        rev = await store.revision()
        kv = await store.get(key)
        if kv is not None:
            return decode_decision(kv.value, kv.create_revision)
        async with store.watch(key, start_revision=rev + 1) as events:
            async for ev in events:
                if ev.type == "put" and ev.kv.key == key:
                    return decode_decision(ev.kv.value, ev.kv.create_revision)
        raise ConsensusError(f"the watch on {key} ended")

    def _drop_waiter(self, ref: str, fut: asyncio.Future[Decision]) -> None:
        futs = self._waiters.get(ref, [])
        if fut in futs:
            futs.remove(fut)
        if not futs:
            self._waiters.pop(ref, None)

    def _resolve(self, ref: str, decision: Decision | None, error: Exception | None) -> None:
        for fut in self._waiters.pop(ref, []):
            if fut.done():
                continue
            if decision is not None:
                fut.set_result(decision)
            elif error is not None:
                fut.set_exception(error)

    # ----------------------------------------------------------------- directives
    def _request_votes(self, server: AgentServer, d: RequestVotes) -> None:
        for send in d.sends:
            self._spawn(self._send_one(send.agent, send.signal, send.node))

    async def _send_one(self, agent: str, signal: Signal, node: str | None) -> None:
        try:
            await self.node.runtime.send(agent, signal, node=node)
        except Exception as exc:
            # The participant cannot be asked (its node is down, the agent is gone): it will
            # be counted as timed out at the deadline.
            self.vote_requests_failed += 1
            log.info("vote request to %s on %s failed: %s", agent, node, exc)

    def _commit(self, server: AgentServer, d: CommitDecision) -> None:
        self._spawn(self._commit_task(d.decision))

    async def _commit_task(self, decision: Decision) -> None:
        key = CONSENSUS_PREFIX + decision.ref
        value = encode_decision(decision)
        clock = self.node.clock
        deadline = clock.now() + _COMMIT_GRACE
        delay = 0.02
        committed: Decision | None = None
        error: Exception | None = None
        while committed is None:
            try:
                store = self._store()
                async with asyncio.timeout(max(0.1, deadline - clock.now())):
                    res = await store.txn(
                        [Compare(key, "create", "==", 0)], [PutOp(key, value)], [GetOp(key)]
                    )
            except ConsensusError as exc:
                error = exc
                break
            except (StoreError, TimeoutError) as exc:
                if clock.now() + delay >= deadline:
                    error = ConsensusError(f"could not commit proposal {decision.ref}: {exc}")
                    break
                await clock.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if res.succeeded:
                self.commits += 1
                committed = msgspec.structs.replace(decision, revision=res.revision)
            else:
                kvs = res.results[0]
                assert isinstance(kvs, list) and kvs
                self.commits_adopted += 1
                committed = decode_decision(kvs[0].value, kvs[0].create_revision)
        rt = self.node.runtime
        if committed is not None:
            signal = Signal(type="cluster.consensus.committed", data=msgspec.to_builtins(committed))
        else:
            log.warning("proposal %s abandoned: %s", decision.ref, error)
            signal = Signal(type="cluster.consensus.abandoned", data={"ref": decision.ref})
        with contextlib.suppress(Exception):
            await rt.cast(COORDINATOR, signal, timeout=5.0)
        self._resolve(decision.ref, committed, error)

    def _broadcast(self, server: AgentServer, d: BroadcastDecision) -> None:
        signal = Signal(
            type="cluster.consensus.decided",
            source=f"/node/{self.node.name}/{COORDINATOR}",
            subject=d.decision.ref,
            data=msgspec.to_builtins(d.decision),
        )
        for m in self.node.members():
            if m.name != self.node.name and m.state in ("alive", "suspect"):
                self._spawn(self._send_one(COORDINATOR, signal, m.name))

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": len(self._waiters),
            "commits": self.commits,
            "commits_adopted": self.commits_adopted,
            "vote_requests_failed": self.vote_requests_failed,
        }
