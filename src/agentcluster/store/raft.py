"""The embedded, replicated coordination store: the KV state machine on our Raft.

Theory of operation: every *voter* node runs a :class:`RaftKV` -- a
:class:`~agentcluster.consensus.raft.shell.RaftShell` whose state machine is a
:class:`~agentcluster.store._kv.KVStateMachine`, plus the two driver-side pieces the memory
backend has too: :class:`~agentcluster.store._leases.LeaseTimers` (counted down by the
leader only, reset from the replicated TTLs when a node becomes leader, as etcd does) and a
:class:`~agentcluster.store._watch.WatchHub` fed by the apply loop (every member applies every
entry, so any member serves watches).

Requests are :class:`KvRequest` values executed by the leader (:meth:`RaftKV.serve`):
writes are proposed as encoded commands -- a client's batch of them as one log entry (see
:mod:`agentcluster.store._batch`) -- and answered with the state machine's result once
applied; reads pass a ReadIndex / lease barrier first, so they are linearizable; keep-alives
restart the leader's timer after a barrier; ``events`` (the remote form of a watch) may be
served by any member, long-polling until an event arrives.

:class:`RaftStore` is the :class:`~agentcluster.store.base.Store` a node hands to its users.
It routes each request: to the local member when it leads, else to the leader it last heard
of, else to the voters in turn, following ``not_leader`` hints until the deadline. A write
is retried only when its outcome is certain (``not_leader`` before proposing, or ``dropped``:
replaced by a new leader); when the outcome is unknown it raises
:class:`~agentcluster.store.base.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import msgspec

from agentcluster.clock import Clock
from agentcluster.consensus.raft import Message, RaftConfig, Storage
from agentcluster.consensus.raft.shell import (
    NotLeader,
    OutcomeUnknown,
    ProposalDropped,
    RaftShell,
    ShellConfig,
    Waiter,
)
from agentcluster.store._batch import (
    MAX_BATCH_BYTES,
    MAX_BATCH_COMMANDS,
    BatchCmd,
    BatchWait,
    Group,
    Slot,
    decode_entry,
    encode_batch,
)
from agentcluster.store._checks import (
    check_delete_args,
    check_key,
    check_lease_id,
    check_put_args,
    check_range_args,
    check_ttl,
    check_txn_args,
    check_unicode_key,
    check_watch_args,
)
from agentcluster.store._kv import (
    Command,
    DeleteCmd,
    DeleteResult,
    InvalidCommand,
    KVStateMachine,
    LeaseGrantCmd,
    LeaseRevokeCmd,
    PutCmd,
    PutResult,
    Result,
    RevokeResult,
    TxnCmd,
    checked_command,
    encode_command,
    unwrap,
)
from agentcluster.store._kv_wire import (
    MAX_REPLY_BYTES,
    MAX_WRITE_BYTES,
    KvReply,
    KvRequest,
    NotSent,
    ReplyTooLarge,
    _answer,
    _command_request,
    _cut_events,
    _error_reply,
    _result,
    outcome_reply,
    write_reply,
)
from agentcluster.store._leases import LeaseTimers
from agentcluster.store._watch import WatchHub
from agentcluster.store.base import (
    Compacted,
    Compare,
    KeyValue,
    Lease,
    LeaseNotFound,
    RangeResult,
    Store,
    StoreError,
    StoreUnavailable,
    TxnOp,
    TxnResult,
    WatchEvent,
)

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_WRITE_BYTES",
    "KvClient",
    "KvReply",
    "KvRequest",
    "NotSent",
    "RaftKV",
    "RaftStore",
    "ReplyTooLarge",
]

log = logging.getLogger(__name__)


_enc = msgspec.msgpack.Encoder()
_kv_dec: msgspec.msgpack.Decoder[KeyValue | None] = msgspec.msgpack.Decoder(KeyValue | None)
_range_dec = msgspec.msgpack.Decoder(RangeResult)
_int_dec = msgspec.msgpack.Decoder(int)
_float_dec = msgspec.msgpack.Decoder(float)
_events_dec = msgspec.msgpack.Decoder(list[WatchEvent])

# Routing back-off while no leader is known (an election takes about one election timeout).
_BACKOFF_MIN, _BACKOFF_MAX = 0.005, 0.1
_DECODED_MAX = 1 << 16


class _Machine:
    """The shell's state machine: the KV core plus its watch hub and the leader's timers."""

    def __init__(self, owner: RaftKV) -> None:
        self.kv = KVStateMachine()
        self.owner = owner
        # Commands this member (the leader) decoded when it validated their proposals, by the
        # identity of their bytes: the entry it applies later holds the very same object, so
        # the command is decoded once, not twice. (The bytes are held here, so their id
        # cannot be reused meanwhile; a miss -- a follower, a restart -- just decodes.)
        self._decoded: dict[int, tuple[bytes, Command | BatchCmd]] = {}

    def remember(self, data: bytes, cmd: Command | BatchCmd) -> None:
        decoded = self._decoded
        if len(decoded) >= _DECODED_MAX:
            decoded.clear()  # proposals that were never applied here (a lost leadership)
        decoded[id(data)] = (data, cmd)

    def forget_decoded(self) -> None:
        self._decoded.clear()

    def apply(self, index: int, data: bytes) -> Result | list[Result | Exception]:
        hit = self._decoded.pop(id(data), None) if self._decoded else None
        cmd = hit[1] if hit is not None and hit[0] is data else decode_entry(data)
        events: list[WatchEvent] = []
        if not isinstance(cmd, BatchCmd):
            result: Result | list[Result | Exception] = self._apply(cmd, events)
        else:
            # A client's batch (see agentcluster.store._batch): its commands in order, as if
            # they were entries of their own; one that fails fails alone, identically on every
            # node.
            out: list[Result | Exception] = []
            for one in cmd.cmds:
                try:
                    out.append(self._apply(one, events))
                except Exception as exc:
                    log.exception("state machine failed on a command of entry %d", index)
                    out.append(exc)
            result = out
        # Watchers get an entry's events at once, in revision order (the hub groups them by
        # revision), as for separate entries applied in one turn.
        if events:
            self.owner.hub.publish(events)
        return result

    def _apply(self, cmd: Command, events: list[WatchEvent]) -> Result:
        """Apply ``cmd``, adding its watch events to ``events``; the leader's lease timers
        follow what was applied."""
        kv = self.kv
        result = kv.apply(cmd)
        events += kv.last_events
        owner = self.owner
        if isinstance(cmd, LeaseRevokeCmd):
            owner.timers.forget(cmd.lease_id)
        elif owner.leading and isinstance(result, Lease):
            owner.timers.grant(result.id, result.ttl, owner.clock.now())
            owner.wake_timers()
        return result

    def snapshot(self) -> bytes:
        return self.kv.snapshot()

    def restore(self, data: bytes) -> None:
        self.kv.restore(data)
        self.owner.hub.resync()


class RaftKV:
    """One voter's member of the replicated store; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        voters: Sequence[str],
        *,
        storage: Storage,
        clock: Clock,
        rng: random.Random,
        send: Callable[[Message], None],
        raft_config: RaftConfig | None = None,
        shell_config: ShellConfig | None = None,
        join: bool = False,
        max_watch_queue: int = 1024,
    ) -> None:
        self.clock = clock
        self.timers = LeaseTimers()
        self.machine = _Machine(self)
        self.hub = WatchHub(self.machine.kv, max_queue=max_watch_queue)
        self.leading = False
        self._timer_wake = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self.shell = RaftShell(
            node_id,
            [v for v in voters if v != node_id],
            storage=storage,
            state_machine=self.machine,
            send=send,
            clock=clock,
            rng=rng,
            config=raft_config,
            shell_config=shell_config,
            join=join,
            on_role=self._on_role,
        )

    @property
    def id(self) -> str:
        return self.shell.id

    @property
    def kv(self) -> KVStateMachine:
        return self.machine.kv

    async def start(self, tg: asyncio.TaskGroup) -> None:
        await self.shell.start(tg)
        self._timer_task = tg.create_task(self._expire_leases(), name=f"raft-kv-leases-{self.id}")

    async def hand_over(self, *, timeout: float | None = None) -> bool:
        """If this member leads, transfer leadership to the most up-to-date voter and wait
        until it took over (thesis §3.10): a planned stop then costs the cluster a round trip
        instead of an election timeout. True when someone else leads afterwards."""
        shell = self.shell
        node = shell.node
        if not shell.is_leader:
            return True
        others = [v for v in node.voters if v != node.id]
        if not others:
            return False
        target = max(others, key=node.match_index)
        if not shell.transfer_leadership(target):
            return False
        limit = node.config.election_timeout if timeout is None else timeout
        deadline = self.clock.now() + limit
        while shell.is_leader and self.clock.now() < deadline:
            await self.clock.sleep(node.config.heartbeat_interval / 10)
        return not shell.is_leader

    async def close(self, *, hand_over: bool = False) -> None:
        """Stop this member; with ``hand_over`` a leader first passes leadership on."""
        if hand_over:
            await self.hand_over()
        task, self._timer_task = self._timer_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.shell.close()
        self.hub.close()

    def on_message(self, msg: Message) -> None:
        self.shell.step(msg)

    def wake_timers(self) -> None:
        self._timer_wake.set()

    def _on_role(self, leader: bool) -> None:
        self.leading = leader
        self.machine.forget_decoded()
        # A new leader restarts every lease's TTL (it cannot know how long the old leader
        # had counted); a follower counts nothing.
        self.timers.reset_all(self.kv.leases() if leader else {}, self.clock.now())
        self._timer_wake.set()

    async def _expire_leases(self) -> None:
        clock = self.clock
        while True:
            now = clock.now()
            if self.leading:
                for lease_id in self.timers.expired(now + 1e-6):
                    try:
                        await self.shell.propose(encode_command(LeaseRevokeCmd(lease_id)))
                    except (NotLeader, ProposalDropped, OutcomeUnknown):
                        break  # the next leader restarts the timers and revokes it
            deadline = self.timers.next_deadline() if self.leading else math.inf
            self._timer_wake.clear()
            delay = deadline - clock.now()
            if delay <= 0 and self.leading:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay if math.isfinite(delay) else None):
                    await self._timer_wake.wait()

    # ----------------------------------------------------------------- serving

    async def serve(self, req: KvRequest) -> KvReply:
        """Execute ``req`` here (the leader; ``events`` on any member)."""
        try:
            return await self._serve(req)
        except Exception as exc:
            reply = _error_reply(exc)
            if reply is None:
                raise
            return reply

    def submit_batch(
        self, writes: Sequence[tuple[int, KvRequest]], batch: BatchWait
    ) -> dict[int, KvReply]:
        """Start a client's writes (``(k, request)`` pairs, op ``cmd``) here as few log entries
        as their sizes allow (see :mod:`agentcluster.store._batch`); each outcome goes to
        ``Slot(batch, k)``. Returns, by ``k``, the replies of writes that go no further (not
        the leader: all of them; invalid commands)."""
        shell = self.shell
        if not shell.is_leader or not self.leading:
            leader = shell.leader_id
            reply = KvReply(
                False, error="not_leader", message=str(NotLeader(leader)), leader=leader
            )
            return {k: reply for k, _ in writes}
        refused: dict[int, KvReply] = {}
        cmds: list[Command] = []
        raws: list[bytes] = []
        slots: list[Slot] = []
        size = 0
        for k, req in writes:
            try:
                cmd = checked_command(req.cmd)  # reject garbage before it reaches the log
            except InvalidCommand as exc:
                refused[k] = KvReply(False, error="invalid", message=str(exc))
                continue
            # Within what a follower will decode (the leader applies its own decoded copy,
            # so a batch it could build but they could not read would split the replicas).
            if cmds and (size + len(req.cmd) > MAX_BATCH_BYTES or len(cmds) >= MAX_BATCH_COMMANDS):
                self._propose(cmds, raws, slots, batch)
                cmds, raws, slots, size = [], [], [], 0
            cmds.append(cmd)
            raws.append(req.cmd)
            slots.append(Slot(batch, k))
            size += len(req.cmd)
        if cmds:
            self._propose(cmds, raws, slots, batch)
        return refused

    def _propose(
        self, cmds: list[Command], raws: list[bytes], slots: list[Slot], batch: BatchWait
    ) -> None:
        if len(cmds) == 1:
            cmd: Command | BatchCmd = cmds[0]
            data = raws[0]  # a lone write's entry is its command as the client encoded it
            waiter: Waiter = slots[0]
        else:
            cmd, data = encode_batch(cmds)
            waiter = Group(slots)
        for slot in slots:
            batch.started(slot)
        try:
            self.shell.submit_to(data, waiter)
        except NotLeader as exc:  # the shell closed under us: nothing was appended
            waiter.set_exception(exc)
            return
        self.machine.remember(data, cmd)

    async def _serve(self, req: KvRequest) -> KvReply:
        shell = self.shell
        if req.op == "events":
            return await self._events(req)
        if not shell.is_leader or not self.leading:
            # (``leading`` follows once the new leader restarted its lease timers: until then
            # a keep-alive would find no timer and wrongly report the lease expired.)
            raise NotLeader(shell.leader_id)
        if req.op == "cmd":
            cmd = checked_command(req.cmd)  # reject garbage before it reaches the log
            fut = shell.submit(req.cmd)
            self.machine.remember(req.cmd, cmd)
            return write_reply(await fut)
        await shell.read_barrier()
        kv = self.kv
        if req.op == "get":
            return KvReply(True, _enc.encode(kv.get(req.key)))
        if req.op == "range":
            if req.n < 0:
                raise ValueError("limit must not be negative")
            data = _enc.encode(kv.range(req.key, req.n, req.start))
            if len(data) > MAX_REPLY_BYTES:
                raise ReplyTooLarge(
                    f"a range over {req.key!r} holds {len(data):,} bytes, more than one reply "
                    f"carries ({MAX_REPLY_BYTES:,}): read it in pages -- a limit, then the next "
                    "page from RangeResult.next_start (Store.range_pages does it)"
                )
            return KvReply(True, data)
        if req.op == "rev":
            return KvReply(True, _enc.encode(kv.revision))
        if not shell.is_leader or not self.leading:
            # Deposed while the barrier was out (a vote request in the same turn as the
            # quorum's acks): the lease timers were dropped with the role, so the lease would
            # look expired here while the next leader keeps it alive. The client retries there.
            raise NotLeader(shell.leader_id)
        lease = kv.lease(req.n)
        if lease is None:
            raise LeaseNotFound(f"lease {req.n:x} not found")
        if not self.timers.keepalive(req.n, self.clock.now()):
            self._timer_wake.set()  # past its deadline: the expiry task revokes it
            raise LeaseNotFound(f"lease {req.n:x} expired")
        return KvReply(True, _enc.encode(lease.ttl))

    async def _events(self, req: KvRequest) -> KvReply:
        """Events for ``req.key`` from revision ``req.n`` on, waiting up to ``req.wait`` for a
        first one. ``n`` of the reply is the revision they are complete up to: with no events,
        the client may resume after it (a quiet prefix must not fall behind the history)."""
        kv = self.kv
        start = max(1, req.n)
        events = kv.events_since(start, req.key)
        if not events and req.wait > 0:
            first: WatchEvent | None = None
            closed = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(req.wait, 30.0)):
                    async with self.hub.watch(req.key, start) as stream:
                        first = await anext(stream, None)
                        closed = first is None  # the hub closed: the member stops
            if first is None:
                # The watch saw nothing for the prefix up to now: no need to read a history
                # that other keys' writes may have trimmed meanwhile. (Closing: no promise.)
                return KvReply(True, _enc.encode([]), n=0 if closed else kv.revision)
            try:
                events = kv.events_since(start, req.key)
            except Compacted:
                # Trimmed while we waited: resume at the revision that woke us, still kept.
                return KvReply(True, _enc.encode([]), n=first.revision - 1)
        events = _cut_events(events)
        return KvReply(True, _enc.encode(events), n=events[-1].revision if events else kv.revision)


class KvClient(Store):
    """A :class:`Store` over :class:`KvRequest` / :class:`KvReply`: subclasses decide where a
    request goes (:meth:`request`) and who answers ``events`` long-polls (:meth:`_call_events`).
    """

    poll: float = 5.0
    _clock: Clock
    _closed: bool = False

    @abstractmethod
    async def request(self, req: KvRequest, *, timeout: float | None = None) -> KvReply:
        """Run ``req`` where it can be answered; StoreUnavailable if nobody could."""

    @abstractmethod
    async def _call_events(self, req: KvRequest) -> KvReply:
        """Run an ``events`` long-poll on some member."""

    @staticmethod
    def _check_events(req: KvRequest, reply: KvReply) -> KvReply:
        if reply.error == "compacted":
            raise Compacted(req.n, reply.n)
        if reply.error == "too_large":
            raise ReplyTooLarge(reply.message)
        if not reply.ok:
            raise StoreUnavailable(reply.message or reply.error)
        return reply

    async def _call(self, req: KvRequest) -> KvReply:
        return _answer(req, await self.request(req))

    # ----------------------------------------------------------------- Store

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        check_unicode_key(key)
        return _kv_dec.decode((await self._call(KvRequest("get", key=key))).data)

    async def range(self, prefix: str, *, limit: int = 0, start: str = "") -> RangeResult:
        check_range_args(prefix, limit, start)
        check_unicode_key(prefix)
        check_unicode_key(start)
        reply = await self._call(KvRequest("range", key=prefix, n=limit, start=start))
        result = _range_dec.decode(reply.data)
        if result.kvs and result.kvs[0].key < start:
            # A member older than ``KvRequest.start`` decodes the request without it and
            # answers from the prefix's first key: a pager would read that page for ever.
            raise StoreError("the store member that answered ignores a range's start: upgrade it")
        return result

    async def revision(self) -> int:
        return _int_dec.decode((await self._call(KvRequest("rev"))).data)

    # The writes await request() themselves and check its reply synchronously: a put is
    # the store's hot path, and each coroutine layer costs it about a microsecond.
    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_put_args(key, lease)
        req = _command_request(PutCmd(key, value, lease))
        return unwrap(_result(req, await self.request(req)), PutResult).revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        check_delete_args(key, prefix)
        req = _command_request(DeleteCmd(key, prefix))
        return unwrap(_result(req, await self.request(req)), DeleteResult).deleted

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        check_txn_args(compares, success, failure)
        cmd = TxnCmd(list(compares), list(success), list(failure))
        req = _command_request(cmd)
        return unwrap(_result(req, await self.request(req)), TxnResult)

    async def lease_grant(self, ttl: float) -> Lease:
        check_ttl(ttl)
        req = _command_request(LeaseGrantCmd(float(ttl)))
        return unwrap(_result(req, await self.request(req)), Lease)

    async def lease_keepalive(self, lease_id: int) -> float:
        check_lease_id(lease_id)
        return _float_dec.decode((await self._call(KvRequest("keepalive", n=lease_id))).data)

    async def lease_revoke(self, lease_id: int) -> None:
        check_lease_id(lease_id)
        req = _command_request(LeaseRevokeCmd(lease_id))
        unwrap(_result(req, await self.request(req)), RevokeResult)

    def watch(
        self, prefix: str, *, start_revision: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[WatchEvent]]:
        check_watch_args(prefix, start_revision)
        check_unicode_key(prefix)
        return self._watch(prefix, start_revision)

    @asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        start = start_revision if start_revision > 0 else await self.revision() + 1
        yield self._poll_events(prefix, start)

    async def _poll_events(self, prefix: str, start: int) -> AsyncIterator[WatchEvent]:
        """A remote watch: long-poll ``events`` and resume from the last revision + 1, so a
        lost connection or a new member to ask costs nothing but a retry."""
        nxt = start
        while not self._closed:
            req = KvRequest("events", key=prefix, n=nxt, wait=self.poll)
            try:
                reply = await self._call_events(req)
            except StoreUnavailable:
                if self._closed:
                    return
                await self._clock.sleep(_BACKOFF_MAX)
                continue
            events = _events_dec.decode(reply.data)
            for ev in events:
                if ev.revision >= nxt:
                    yield ev
            # Complete up to reply.n: a quiet prefix moves on too, or it would ask for ever
            # older history until other keys' writes trimmed it (Compacted).
            last = events[-1].revision if events else reply.n
            nxt = max(nxt, last + 1)


Forward = Callable[[str, KvRequest, float], Awaitable[KvReply]]
"""``(voter name, request, timeout) -> reply``; raises on transport failure."""


class RaftStore(KvClient):
    """The store a node hands out: routes requests to the leader (see the module docstring).

    ``local`` is this node's member (None on a node that is not a voter); ``voters`` the
    voter names to try when no leader is known; ``forward`` sends a request to another node.
    """

    def __init__(
        self,
        *,
        local: RaftKV | None,
        voters: Sequence[str],
        forward: Forward,
        clock: Clock,
        timeout: float = 5.0,
        poll: float = 5.0,
    ) -> None:
        if not voters:
            raise ValueError("the raft store needs at least one voter")
        self.local = local
        self.voters = list(voters)
        self._forward = forward
        self._clock = clock
        self.timeout = timeout
        self.poll = poll
        self._leader: str | None = None
        self._next_voter = 0
        self._closed = False

    # ----------------------------------------------------------------- routing

    async def request(self, req: KvRequest, *, timeout: float | None = None) -> KvReply:
        """Run ``req`` on the leader; StoreUnavailable when no certain answer came in time."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        clock = self._clock
        limit = self.timeout if timeout is None else timeout
        deadline = clock.now() + limit
        backoff = _BACKOFF_MIN
        write = req.op == "cmd"
        target = self._leader
        if self.local is not None and self.local.shell.leader_id:
            # A voter follows elections: what it knows now beats the hint of the last reply
            # (a write sent to a deposed leader cut off by a partition has an unknown outcome).
            target = self.local.shell.leader_id
        while True:
            remaining = deadline - clock.now()
            if remaining <= 0:
                raise StoreUnavailable(f"no leader answered within {limit:g} s")
            if target is None:
                target = self._pick()
            try:
                reply = await self._send(target, req, remaining)
            except (OSError, TimeoutError, StoreError) as exc:
                if write and not isinstance(exc, NotSent):
                    self._leader = None
                    raise StoreUnavailable(
                        f"{target}: {exc}; the write's outcome is unknown"
                    ) from exc
                reply = KvReply(False, error="not_leader", message=str(exc))
            if reply.ok or reply.error not in ("not_leader", "dropped"):
                if reply.ok:
                    self._leader = target
                return reply
            if reply.error == "not_leader" and reply.leader and reply.leader != target:
                target = reply.leader
                continue
            self._leader = None
            target = None
            await clock.sleep(min(backoff, max(0.0, deadline - clock.now())))
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _pick(self) -> str:
        if self.local is not None and self.local.shell.leader_id:
            return self.local.shell.leader_id
        voter = self.voters[self._next_voter % len(self.voters)]
        self._next_voter += 1
        return voter

    async def _send(self, target: str, req: KvRequest, timeout: float) -> KvReply:
        local = self.local
        if local is not None and target == local.id:
            async with asyncio.timeout(timeout):
                return await local.serve(req)
        return await self._forward(target, req, timeout)

    @asynccontextmanager
    async def _watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        if self.local is not None:
            async with self.local.hub.watch(prefix, start_revision) as stream:
                yield stream
            return
        async with super()._watch(prefix, start_revision) as stream:
            yield stream

    async def _call_events(self, req: KvRequest) -> KvReply:
        local = self.local
        target = local.id if local is not None else self._pick()
        try:
            reply = await self._send(target, req, self.poll + self.timeout)
        except (OSError, TimeoutError, StoreError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return self._check_events(req, reply)

    async def route(self, req: KvRequest, *, timeout: float | None = None) -> KvReply:
        """Run a request that came from outside (the control API): never raises, a failure
        is an error reply."""
        try:
            if req.op == "events":
                return await self._call_events(req)
            return await self.request(req, timeout=timeout)
        except StoreUnavailable as exc:
            return KvReply(False, error="unavailable", message=str(exc))
        except Exception as exc:
            # A store error is an answer (compacted, too large, ...), with the same reply a
            # member gives: failing the request instead would make the client take this
            # node for dead and try the next (a watch would poll for ever without a word).
            reply = _error_reply(exc)
            if reply is None:
                raise
            return reply

    async def route_many(
        self, reqs: Sequence[KvRequest], *, timeout: float | None = None
    ) -> list[KvReply]:
        """:meth:`route` for each of a client's batch, run concurrently: a reply per request.

        When this node's member leads, the batch's writes are handed to it directly -- one
        Raft batch, one timer for the lot, and no task, timeout context or coroutine chain
        per request (that per-request overhead, not Raft, bounded the leader's throughput).
        Only what the leader could not settle -- reads, ``events``, and writes refused as
        ``not_leader`` or ``dropped`` (certainly not applied, so safe to send again) --
        takes the general path."""
        local = self.local
        limit = self.timeout if timeout is None else timeout
        if local is None or self._closed or not local.shell.is_leader:
            return list(await asyncio.gather(*(self.route(r, timeout=limit) for r in reqs)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        replies: list[KvReply | None] = [None] * len(reqs)
        batch = BatchWait(loop)
        rest = [k for k, req in enumerate(reqs) if req.op != "cmd"]
        writes = [(k, req) for k, req in enumerate(reqs) if req.op == "cmd"]
        for k, refused in local.submit_batch(writes, batch).items():
            replies[k] = refused
        if batch.started_any:
            await batch.wait(deadline)
            for k, outcome in batch.outcomes.items():
                replies[k] = outcome_reply(outcome)
            for slot in batch.late():
                replies[slot.k] = KvReply(
                    False,
                    error="unavailable",
                    message=f"no leader answered within {limit:.1f} s; "
                    "the write's outcome is unknown",
                )
        for k, reply in enumerate(replies):
            if reply is None:
                continue
            if reply.ok:
                self._leader = local.id
            elif reply.error in ("not_leader", "dropped"):
                replies[k] = None  # certainly not applied: route it like any request
                rest.append(k)
        if rest:
            remaining = max(0.0, deadline - loop.time())
            routed = await asyncio.gather(*(self.route(reqs[k], timeout=remaining) for k in rest))
            for k, reply in zip(rest, routed, strict=True):
                replies[k] = reply
        out = [r for r in replies if r is not None]
        assert len(out) == len(reqs)
        return out

    async def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return f"RaftStore(voters={self.voters!r}, leader={self._leader!r})"
