"""The asyncio shell around :class:`RaftNode`: one task that feeds the core and does its I/O.

Theory of operation: everything that reaches the core -- messages from peers, proposals,
read requests, membership changes -- is queued and the loop task woken. One loop turn steps
every queued message, appends every queued proposal (so concurrent proposals share one
Ready: one fsync, one AppendEntries per follower -- this is the batching), ticks the core when
its deadline passed, then handles the Ready in the contract's order: save a received
snapshot and restore the state machine from it, persist hard state + entries (synced), send
the messages, apply the committed entries, advance -- except that a leader sends its appends
before its write and a follower applies before its write (see the comments in ``_turn``).
The loop then sleeps until the core's next deadline or the next wake-up.

Proposals resolve when their entry is applied: with the state machine's result if the entry
at that index is still the one proposed (same term), or with :class:`ProposalDropped` when a
new leader replaced it -- then it is certain the proposal did not take effect. A caller that
times out first cannot know; that is what ``StoreUnavailable`` tells clients upstream.

Reads (:meth:`RaftShell.read_barrier`) go through ReadIndex / the leader lease: they resolve
once the state machine has applied the read index, after which reading the local state
machine is linearizable. A leader that steps down fails its pending reads with
:class:`NotLeader`.

Snapshots: every ``snapshot_every`` applied entries the shell snapshots the state machine,
stores it, and compacts all but ``snapshot_keep`` entries, so slow followers within that
window still catch up from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from agentcluster.clock import Clock, call_at
from agentcluster.consensus.raft._log import Storage
from agentcluster.consensus.raft.core import RaftConfig, RaftNode
from agentcluster.consensus.raft.messages import ConfChange, ConfState, Entry, HardState, Message

__all__ = [
    "NotLeader",
    "OutcomeUnknown",
    "ProposalDropped",
    "RaftShell",
    "ShellConfig",
    "StateMachine",
    "Waiter",
]

log = logging.getLogger(__name__)


class StateMachine(Protocol):
    def apply(self, index: int, data: bytes) -> Any:
        """Apply one committed entry; the return value resolves the proposal."""
        ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class Waiter(Protocol):
    """What a proposal's outcome is handed to: an :class:`asyncio.Future`, or any object with
    these three methods (a client's batch resolves many proposals into one wake-up this way,
    instead of paying a future, and a loop callback per future, for each)."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class NotLeader(Exception):
    """This node cannot serve the request; ``leader`` is who can (None: unknown)."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class ProposalDropped(Exception):
    """The proposal's entry was replaced by a new leader: it certainly did not take effect."""


class OutcomeUnknown(Exception):
    """The proposal was appended but this node cannot tell whether it took effect (the shell
    closed, or a snapshot covered its index)."""


@dataclass(frozen=True, slots=True)
class ShellConfig:
    snapshot_every: int = 10_000  # applied entries between two snapshots
    snapshot_keep: int = 1_000  # entries kept behind a snapshot for slow followers
    max_batch: int = 4_096  # proposals appended per loop turn (bounds one Ready)
    # Write to storage on a thread, so the loop keeps receiving during an fsync (for disk
    # storage; never with a simulated clock, whose time must not move during a real write).
    threaded_writes: bool = False
    # ... but only batches of at least this many entries: a smaller write is done inline,
    # since handing it to the thread and back (a queue, a lock, a wake-up of the loop
    # through its self-pipe) costs more CPU than the fdatasync blocks the loop.
    threaded_min_entries: int = 64

    def __post_init__(self) -> None:
        if (
            self.snapshot_every < 1
            or self.snapshot_keep < 0
            or self.max_batch < 1
            or self.threaded_min_entries < 1
        ):
            raise ValueError(
                "snapshot_every, max_batch and threaded_min_entries must be >= 1, "
                "snapshot_keep >= 0"
            )


class RaftShell:
    def __init__(
        self,
        node_id: str,
        peers: Sequence[str],
        *,
        storage: Storage,
        state_machine: StateMachine,
        send: Callable[[Message], None],
        clock: Clock,
        rng: random.Random,
        config: RaftConfig | None = None,
        shell_config: ShellConfig | None = None,
        join: bool = False,
        on_conf: Callable[[ConfState], None] | None = None,
        on_role: Callable[[bool], None] | None = None,
    ) -> None:
        self.storage = storage
        self.state_machine = state_machine
        self.clock = clock
        self.shell_config = shell_config or ShellConfig()
        self._send = send
        self._on_conf = on_conf
        self._on_role = on_role
        snap = storage.snapshot
        if snap is not None:
            state_machine.restore(snap.data)
        self.node = RaftNode(
            node_id,
            peers,
            config=config or RaftConfig(),
            rng=rng,
            now=clock.now(),
            storage=storage,
            join=join,
        )
        self._last_snapshot = snap.index if snap is not None else 0
        self._inbox: deque[Message] = deque()
        self._proposals: deque[tuple[bytes, Waiter]] = deque()
        self._confs: deque[tuple[ConfChange, asyncio.Future[Any]]] = deque()
        self._waiting: dict[int, tuple[int, Waiter]] = {}
        self._read_requests: deque[asyncio.Future[None]] = deque()
        self._reads: dict[int, asyncio.Future[None]] = {}
        self._read_ready: list[tuple[int, asyncio.Future[None]]] = []
        self._next_read = 0
        # Waking the loop task: a flag plus the bare future it sleeps on, and one timer for
        # the core's next deadline that is moved only when that deadline comes earlier (an
        # Event, a fresh timer and a cancel on every wait cost more than a whole idle turn).
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.Handle | None = None
        self._timer_when = math.inf  # when the armed timer fires (uvloop's handles may not say)
        self._timer_at = math.inf
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._was_leader = False
        self._stalled_until = -math.inf
        self._write_tail: asyncio.Future[None] | None = None
        self._write_failed: BaseException | None = None
        self._writer = (
            ThreadPoolExecutor(1, thread_name_prefix=f"raft-{node_id}-wal")
            if self.shell_config.threaded_writes
            else None
        )
        self.applied_entries = 0
        self.snapshots_installed = 0
        self.batches = 0

    # ----------------------------------------------------------------- state

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def is_leader(self) -> bool:
        return self.node.state == "leader"

    @property
    def leader_id(self) -> str | None:
        return self.node.leader_id

    @property
    def term(self) -> int:
        return self.node.term

    @property
    def applied_index(self) -> int:
        return self.node.applied_index

    # ----------------------------------------------------------------- lifecycle

    async def start(self, tg: asyncio.TaskGroup) -> None:
        if self._task is not None:
            raise RuntimeError("already started")
        self._task = tg.create_task(self._run(), name=f"raft-{self.id}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(NotLeader(None))
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    # ----------------------------------------------------------------- inputs

    def step(self, msg: Message) -> None:
        """A message from a peer (the transport has already decoded and authenticated it)."""
        if self._closed:
            return
        self._inbox.append(msg)
        self._wake()

    async def propose(self, data: bytes) -> Any:
        """Replicate ``data``; the state machine's result once applied. Raises NotLeader
        (nothing happened) or ProposalDropped (certainly not applied). Cancel the await for a
        deadline -- the entry may still commit."""
        return await self.submit(data)

    def submit(self, data: bytes) -> asyncio.Future[Any]:
        """:meth:`propose` without the coroutine: the future it awaits. A caller with many
        proposals (a client's batch) submits them all and waits once, instead of paying a
        task per proposal; cancelling the future abandons the wait as cancelling
        :meth:`propose` does."""
        fut = self._new_future()
        self._proposals.append((data, fut))
        self._wake()
        return fut

    def submit_to(self, data: bytes, waiter: Waiter) -> None:
        """:meth:`submit` with the outcome handed to ``waiter`` (see :class:`Waiter`); a
        waiter that is done before the entry is appended or applied is skipped, as a
        cancelled future is. Raises NotLeader when the shell is closed."""
        if self._closed:
            raise NotLeader(None)
        self._proposals.append((data, waiter))
        self._wake()

    async def read_barrier(self) -> None:
        """Return once a linearizable read of the local state machine is possible."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            raise NotLeader(None)
        self._read_requests.append(fut)
        self._wake()
        await fut

    async def change_membership(self, change: ConfChange) -> int:
        """Propose a single-server change; the entry's index once it is committed."""
        fut = self._new_future()
        self._confs.append((change, fut))
        self._wake()
        result: int = await fut
        return result

    def transfer_leadership(self, target: str) -> bool:
        ok = self.node.transfer_leadership(target, self.clock.now())
        self._wake()
        return ok

    def _new_future(self) -> asyncio.Future[Any]:
        if self._closed:
            raise NotLeader(None)
        return asyncio.get_running_loop().create_future()

    # ----------------------------------------------------------------- the loop

    def stall(self, seconds: float) -> None:
        """Emulate a frozen process (SIGSTOP) for ``seconds``: the loop does nothing, and
        messages queue up until it runs again."""
        self._stalled_until = max(self._stalled_until, self.clock.now() + seconds)
        self._wake()

    def _wake(self) -> None:
        """Make the loop task run a turn soon (callable from any callback on the loop)."""
        if self._woken:
            return
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        at = self._timer_at
        if at == math.inf:
            return  # no deadline any more: the next wait arms a timer again
        loop = asyncio.get_running_loop()
        if loop.time() < at:
            self._timer = call_at(loop, at, self._on_timer)  # the deadline moved later
            self._timer_when = at
            return
        self._wake()

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        """Wake the loop at loop time ``at`` (inf: no timed wake-up). The armed timer only ever
        fires at or before ``at``; firing early re-arms it for the rest (see :meth:`_on_timer`)."""
        self._timer_at = at
        timer = self._timer
        if at != math.inf and (timer is None or self._timer_when > at):
            if timer is not None:
                timer.cancel()
            self._timer = call_at(loop, at, self._on_timer)
            self._timer_when = at

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._loop(loop)
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def _loop(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._closed:
            pause = self._stalled_until - self.clock.now()
            if pause > 0:
                await self.clock.sleep(pause)
                continue
            # Cleared before the turn: a wake-up during it (a write completing, a message
            # arriving while the turn awaits) makes the next turn start at once.
            self._woken = False
            try:
                if self._write_failed is not None:
                    raise self._write_failed
                await self._turn()
            except Exception:
                # Storage failing to sync is fatal for safety: stop serving, loudly.
                log.exception("raft node %s stopped: its loop failed", self.id)
                self._closed = True
                self._fail_all(NotLeader(None))
                raise
            if self._inbox or self._proposals or self._read_requests or self._confs:
                continue
            delay = self.node.next_deadline() - self.clock.now()
            if delay <= 0:
                await asyncio.sleep(0)
                continue
            if self._woken:
                continue
            self._arm(loop, loop.time() + delay if math.isfinite(delay) else math.inf)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def _turn(self) -> None:
        node = self.node
        now = self.clock.now()
        inbox = self._inbox
        while inbox:
            node.step(inbox.popleft(), now)
        if now >= node.next_deadline():
            node.tick(now)
        self._admit(now)
        rd = node.ready()
        if rd.empty:
            self._check_role()
            return
        if rd.snapshot is not None:
            await self._drain()
            self.storage.save_snapshot(rd.snapshot)
            self.state_machine.restore(rd.snapshot.data)
            self.snapshots_installed += 1
            self._last_snapshot = rd.snapshot.index
            self._fail_waiting_upto(rd.snapshot.index)
        send = self._send
        hs = rd.hard_state
        stored = self.storage.hard_state
        # A leader's messages are appends (and snapshots, TimeoutNow): they promise nothing
        # about its own disk, since it counts itself only after persisting -- so they leave
        # before its write and the follower's fsync overlaps the leader's (thesis §10.2.1).
        # Not in the turn it took a new term, though (a single voter wins its election within
        # one step): appends in a term not yet on disk could, after a crash, meet different
        # entries the restarted node writes under the same term, and look identical to them.
        early = (
            node.state == "leader"
            and rd.snapshot is None
            and (hs is None or (hs.term, hs.vote) == (stored.term, stored.vote))
        )
        if early:
            for m in rd.messages:
                send(m)
        else:
            # A follower applies what is committed before it writes and acknowledges the new
            # entries: committed entries are durable on a quorum already, so applying them
            # ahead of the local write is safe, and the work then overlaps the leader's own
            # fsync instead of competing with the leader for a CPU just when the
            # acknowledgement reaches it (2-core bench: 3-6 % more puts per second).
            for e in rd.committed:
                self._apply(e)
        # Only entries, term and vote need a sync; a commit index alone is re-learned from
        # the leader after a restart, so it rides along with the next write (as etcd does).
        pipelined = False
        if rd.entries or (hs is not None and (hs.term, hs.vote) != (stored.term, stored.vote)):
            state = HardState(node.term, node.vote, node.commit_index)
            threaded = (
                self._writer is not None
                and len(rd.entries) >= self.shell_config.threaded_min_entries
            )
            if early and threaded:
                # A leader under load does not wait for its own write: its appends are out,
                # it counts its own copy once the write completes (:meth:`_written`), and the
                # next batch is appended, sent and written behind this one meanwhile -- writes
                # stay in order on the one writer thread.
                last = rd.entries[-1]
                node.persisting(last.index)
                write = asyncio.get_running_loop().run_in_executor(
                    self._writer, self.storage.persist, state, rd.entries
                )
                write.add_done_callback(functools.partial(self._written, last.index, last.term))
                self._write_tail = write
                pipelined = True
            elif threaded:
                await self._drain()
                # Under load (a batch of entries), the write runs on the writer thread while
                # this loop keeps receiving: what arrives meanwhile forms the next, larger
                # batch (group commit). Nothing touches the core until the write is done. A
                # smaller write is done inline (``threaded_min_entries``): the hand-off to the
                # thread and back would cost more than it saves.
                await asyncio.get_running_loop().run_in_executor(
                    self._writer, self.storage.persist, state, rd.entries
                )
            else:
                await self._drain()
                self.storage.persist(state, rd.entries)
            if rd.entries:
                self.batches += 1
        if not early:
            for m in rd.messages:
                send(m)
        if early:
            for e in rd.committed:
                self._apply(e)
        for rid, index in rd.read_states:
            fut = self._reads.pop(rid, None)
            if fut is not None:
                self._read_ready.append((index, fut))
        node.advance(msgspec.structs.replace(rd, entries=[]) if pipelined else rd)
        if rd.conf is not None and self._on_conf is not None:
            self._on_conf(rd.conf)
        self._release_reads()
        self._check_role()
        await self._maybe_snapshot()

    async def _drain(self) -> None:
        """Wait for the background write in flight, if any: storage is touched in order."""
        tail = self._write_tail
        if tail is not None and not tail.done():
            await tail
        self._write_tail = None

    def _written(self, index: int, term: int, write: asyncio.Future[None]) -> None:
        if write.cancelled():
            return
        exc = write.exception()
        if exc is not None:
            self._write_failed = exc
        else:
            self.node.persisted(index, term)
        self._wake()

    def _admit(self, now: float) -> None:
        node = self.node
        props = self._proposals
        n = 0
        while props and n < self.shell_config.max_batch:
            data, fut = props.popleft()
            n += 1
            if fut.done():
                continue
            index = node.propose(data, now)
            if index is None:
                fut.set_exception(NotLeader(node.leader_id))
            else:
                self._wait(index, fut)
        while self._confs:
            change, fut = self._confs.popleft()
            if fut.done():
                continue
            try:
                index = node.propose_conf_change(change, now)
            except ValueError as exc:
                fut.set_exception(exc)
                continue
            if index is None:
                fut.set_exception(
                    RuntimeError("a membership change is in progress; retry when it commits")
                    if self.is_leader
                    else NotLeader(node.leader_id)
                )
            else:
                self._wait(index, fut)
        while self._read_requests:
            fut = self._read_requests.popleft()
            if fut.done():
                continue
            self._next_read += 1
            if node.read_index(self._next_read, now):
                self._reads[self._next_read] = fut
            else:
                fut.set_exception(NotLeader(node.leader_id))
        if n and props:
            self._wake()

    def _apply(self, e: Entry) -> None:
        result: Any = None
        if e.kind == "normal":
            try:
                result = self.state_machine.apply(e.index, e.data)
            except Exception as exc:
                # A deterministic state machine fails the same way on every node: the entry
                # is a no-op everywhere, and its proposer gets the error.
                log.exception("state machine failed on entry %d", e.index)
                result = exc
            self.applied_entries += 1
        elif e.kind == "conf":
            result = e.index
        waiting = self._waiting.pop(e.index, None)
        if waiting is None:
            return
        term, fut = waiting
        if fut.done():
            return
        if term != e.term:
            fut.set_exception(ProposalDropped(f"entry {e.index} was replaced by a new leader"))
        elif isinstance(result, Exception):
            fut.set_exception(result)
        else:
            fut.set_result(result)

    def _release_reads(self) -> None:
        if not self._read_ready:
            return
        applied = self.node.applied_index
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for index, fut in self._read_ready:
            if index <= applied:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((index, fut))
        self._read_ready = keep

    def _check_role(self) -> None:
        leader = self.is_leader
        if leader == self._was_leader:
            return
        self._was_leader = leader
        if not leader:
            for fut in self._reads.values():
                if not fut.done():
                    fut.set_exception(NotLeader(self.node.leader_id))
            self._reads.clear()
        if self._on_role is not None:
            self._on_role(leader)

    async def _maybe_snapshot(self) -> None:
        cfg = self.shell_config
        applied = self.node.applied_index
        if applied - self._last_snapshot < cfg.snapshot_every:
            return
        await self._drain()
        snap = self.node.snapshot_at(applied, self.state_machine.snapshot())
        self.storage.save_snapshot(snap)
        through = max(self.node.log.offset, applied - cfg.snapshot_keep)
        self.storage.compact(through)
        self.node.compact(through)
        self._last_snapshot = applied

    def _wait(self, index: int, fut: Waiter) -> None:
        """``fut`` waits for the entry just appended at ``index``. A proposal of an earlier term
        still waiting there lost its entry: this node leads with ``index`` free in its log, so
        that entry was never committed and never will be."""
        old = self._waiting.get(index)
        if old is not None and not old[1].done():
            old[1].set_exception(ProposalDropped(f"entry {index} was replaced by a new leader"))
        self._waiting[index] = (self.node.term, fut)

    def _fail_waiting_upto(self, index: int) -> None:
        """Proposals at or below a restored snapshot's index: the snapshot holds their effect
        or not, but not which entry was which."""
        for i in [i for i in self._waiting if i <= index]:
            _, fut = self._waiting.pop(i)
            if not fut.done():
                fut.set_exception(OutcomeUnknown(f"entry {i} was covered by a snapshot"))

    def _fail_all(self, exc: Exception) -> None:
        for _, fut in self._proposals:
            if not fut.done():
                fut.set_exception(exc)
        self._proposals.clear()
        for _, fut in self._confs:
            if not fut.done():
                fut.set_exception(exc)
        self._confs.clear()
        for index, (_, fut) in self._waiting.items():
            if not fut.done():
                fut.set_exception(OutcomeUnknown(f"entry {index}: the raft node stopped"))
        self._waiting.clear()
        for fut in [*self._read_requests, *self._reads.values()]:
            if not fut.done():
                fut.set_exception(exc)
        for _, fut in self._read_ready:
            if not fut.done():
                fut.set_exception(exc)
        self._read_requests.clear()
        self._reads.clear()
        self._read_ready.clear()
