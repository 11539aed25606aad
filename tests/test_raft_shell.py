"""The asyncio Raft shell, on a tiny in-process network in virtual time: proposals resolve with
the state machine's result and are batched, reads need the leader, membership changes
(learner, promotion, removal of the leader) go through the log, and a proposal replaced by a
new leader fails with ProposalDropped -- certain not to have been applied."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from agentcluster.clock import MonotonicClock
from agentcluster.consensus.raft import (
    AppendEntries,
    ConfChange,
    ConfState,
    DiskStorage,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    RaftConfig,
    Snapshot,
)
from agentcluster.consensus.raft.shell import (
    NotLeader,
    OutcomeUnknown,
    ProposalDropped,
    RaftShell,
    ShellConfig,
)
from agentcluster.testing import wait_until

CFG = RaftConfig(election_timeout=0.3, heartbeat_interval=0.05)


class ListMachine:
    def __init__(self) -> None:
        self.items: list[bytes] = []

    def apply(self, index: int, data: bytes) -> int:
        self.items.append(data)
        return len(self.items)

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(self.items)

    def restore(self, data: bytes) -> None:
        self.items = msgspec.msgpack.decode(data, type=list[bytes])


class Net:
    def __init__(self) -> None:
        self.shells: dict[str, RaftShell] = {}
        self.machines: dict[str, ListMachine] = {}
        self.cut: set[str] = set()
        self.clock = MonotonicClock()
        self.tg = asyncio.TaskGroup()

    def send(self, msg: Message) -> None:
        if msg.src in self.cut or msg.dst in self.cut:
            return
        target = self.shells.get(msg.dst)
        if target is not None:
            asyncio.get_running_loop().call_later(0.0005, target.step, msg)

    async def add(self, name: str, voters: list[str], *, join: bool = False) -> RaftShell:
        machine = ListMachine()
        shell = RaftShell(
            name,
            [v for v in voters if v != name],
            storage=MemoryStorage(),
            state_machine=machine,
            send=self.send,
            clock=self.clock,
            rng=random.Random(name),
            config=CFG,
            join=join,
        )
        self.shells[name] = shell
        self.machines[name] = machine
        await shell.start(self.tg)
        return shell

    def leader(self) -> RaftShell | None:
        leaders = [s for n, s in self.shells.items() if s.is_leader and n not in self.cut]
        return leaders[0] if len(leaders) == 1 else None

    async def elected(self) -> RaftShell:
        await wait_until(lambda: self.leader() is not None, timeout=5.0)
        leader = self.leader()
        assert leader is not None
        return leader

    async def close(self) -> None:
        for shell in self.shells.values():
            await shell.close()


async def cluster(n: int = 3) -> Net:
    net = Net()
    await net.tg.__aenter__()
    names = [f"n{i}" for i in range(1, n + 1)]
    for name in names:
        await net.add(name, names)
    return net


async def done(net: Net) -> None:
    await net.close()
    await net.tg.__aexit__(None, None, None)


@pytest.mark.virtual_time
async def test_concurrent_proposals_resolve_in_order_and_share_batches() -> None:
    net = await cluster()
    try:
        leader = await net.elected()
        results = await asyncio.gather(*(leader.propose(b"%d" % i) for i in range(100)))
        assert sorted(results) == list(range(1, 101))
        assert leader.batches < 20  # 100 proposals, a handful of Readys
        await wait_until(lambda: all(len(m.items) == 100 for m in net.machines.values()))
        assert len({tuple(m.items) for m in net.machines.values()}) == 1
    finally:
        await done(net)


@pytest.mark.virtual_time
async def test_reads_need_the_leader() -> None:
    net = await cluster()
    try:
        leader = await net.elected()
        await leader.propose(b"x")
        await leader.read_barrier()
        follower = next(s for s in net.shells.values() if not s.is_leader)
        with pytest.raises(NotLeader) as exc:
            await follower.read_barrier()
        assert exc.value.leader == leader.id
        with pytest.raises(NotLeader):
            await follower.propose(b"y")
    finally:
        await done(net)


@pytest.mark.virtual_time
async def test_membership_learner_promotion_and_leader_removal() -> None:
    """Thesis §4.1-4.2: a joining server starts empty, is added as a learner, catches up,
    is promoted; removing the leader makes it step down and the rest elect a new one."""
    net = await cluster()
    try:
        leader = await net.elected()
        for i in range(20):
            await leader.propose(b"%d" % i)
        await net.add("n4", [], join=True)
        await leader.change_membership(ConfChange("add_learner", "n4"))
        await wait_until(lambda: len(net.machines["n4"].items) == 20, timeout=5.0)
        assert net.shells["n4"].node.learners == ("n4",)
        await leader.change_membership(ConfChange("add_voter", "n4"))
        assert sorted(leader.node.voters) == ["n1", "n2", "n3", "n4"]
        with pytest.raises(ValueError, match="changes nothing"):
            await leader.change_membership(ConfChange("add_voter", "n4"))
        old = leader.id
        await leader.change_membership(ConfChange("remove", old))
        await wait_until(lambda: not net.shells[old].is_leader, timeout=5.0)
        net.cut.add(old)
        new = await net.elected()
        assert new.id != old
        assert await new.propose(b"after") == 21
        # The removal commits on the new leader with its first entry, if not before.
        assert old not in new.node.voters
    finally:
        await done(net)


@pytest.mark.virtual_time
async def test_replaced_proposal_fails_with_proposal_dropped() -> None:
    """§5.3/§5.4: an entry the isolated leader appended but never committed is overwritten by
    the new leader; its proposer learns it certainly did not take effect."""
    net = await cluster()
    try:
        old = await net.elected()
        await old.propose(b"committed")
        net.cut.add(old.id)
        doomed = asyncio.ensure_future(old.propose(b"doomed"))
        await asyncio.sleep(0.01)  # let it be appended on the isolated leader (noqa: sleep)
        new = await net.elected()
        await new.propose(b"winner")
        net.cut.clear()
        with pytest.raises(ProposalDropped):
            await asyncio.wait_for(doomed, timeout=5.0)
        await wait_until(lambda: net.machines[old.id].items[-1:] == [b"winner"], timeout=5.0)
        assert b"doomed" not in net.machines[old.id].items
    finally:
        await done(net)


class SlowDisk:
    """A DiskStorage whose writes take a while, so a leader's pipelined writes overlap."""

    def __init__(self, inner: DiskStorage, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def persist(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        time.sleep(self.delay)  # the disk is slow, on the writer thread (noqa: sleep)
        self.inner.persist(hard_state, entries)


async def test_leader_pipelines_writes_and_everything_survives_a_restart(tmp_path: Path) -> None:
    """A leader on disk storage does not wait for its own write before the next batch: its
    own copy counts only once written, and after every node restarts from its directory the
    logs agree and hold every acknowledged proposal."""
    net = Net()
    await net.tg.__aenter__()
    names = ["n1", "n2", "n3"]
    disks: dict[str, DiskStorage] = {}

    async def start(name: str) -> None:
        disks[name] = DiskStorage.open(tmp_path / name)
        machine = ListMachine()
        shell = RaftShell(
            name,
            [v for v in names if v != name],
            storage=SlowDisk(disks[name], 0.003),  # type: ignore[arg-type]
            state_machine=machine,
            send=net.send,
            clock=net.clock,
            rng=random.Random(name),
            config=CFG,
            shell_config=ShellConfig(threaded_writes=True),
        )
        net.shells[name], net.machines[name] = shell, machine
        await shell.start(net.tg)

    try:
        for name in names:
            await start(name)
        leader = await net.elected()
        pipelined: list[int] = []
        persisting = leader.node.persisting

        def spy(index: int) -> None:
            pipelined.append(index)
            persisting(index)

        leader.node.persisting = spy  # type: ignore[method-assign]
        results = await asyncio.gather(*(leader.propose(b"%d" % i) for i in range(300)))
        assert sorted(results) == list(range(1, 301))
        assert leader.batches < 150
        assert pipelined, "the leader never wrote in the background"
        await net.close()
        for d in disks.values():
            d.close()
        net.shells.clear()
        for name in names:
            await start(name)
        leader = await net.elected()
        await leader.propose(b"after-restart")
        await wait_until(
            lambda: all(len(m.items) == 301 for m in net.machines.values()), timeout=10
        )
        assert len({tuple(m.items) for m in net.machines.values()}) == 1
        assert sorted(net.machines["n1"].items[:300]) == sorted(b"%d" % i for i in range(300))
    finally:
        await done(net)
        for d in disks.values():
            d.close()


class ThreadSpy:
    """A MemoryStorage that records on which thread each write with entries ran."""

    def __init__(self) -> None:
        self.inner = MemoryStorage()
        self.writes: list[tuple[int, bool]] = []  # (entries, on the loop's thread)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def persist(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        if entries:
            self.writes.append((len(entries), threading.current_thread() is MAIN_THREAD))
        self.inner.persist(hard_state, entries)


MAIN_THREAD = threading.main_thread()


async def test_small_batches_are_written_inline_large_ones_on_the_writer_thread() -> None:
    """``threaded_min_entries``: a write of fewer entries is done on the loop (a thread
    hand-off costs more than the fsync), a larger batch on the writer thread -- and every
    proposal still resolves."""
    net = Net()
    await net.tg.__aenter__()
    names = ["n1", "n2", "n3"]
    spies = {name: ThreadSpy() for name in names}
    for name in names:
        shell = RaftShell(
            name,
            [v for v in names if v != name],
            storage=spies[name],  # type: ignore[arg-type]
            state_machine=ListMachine(),
            send=net.send,
            clock=net.clock,
            rng=random.Random(name),
            config=CFG,
            shell_config=ShellConfig(threaded_writes=True, threaded_min_entries=8),
        )
        net.shells[name] = shell
        await shell.start(net.tg)
    try:
        leader = await net.elected()
        for i in range(5):  # sequential: one entry per write
            await leader.propose(b"s%d" % i)
        results = await asyncio.gather(*(leader.propose(b"b%d" % i) for i in range(64)))
        assert len(set(results)) == 64
        writes = spies[leader.id].writes
        assert all(inline for n, inline in writes if n < 8)
        assert any(n < 8 for n, _ in writes)
        assert any(n >= 8 and not inline for n, inline in writes)
        with pytest.raises(ValueError, match="threaded_min_entries"):
            ShellConfig(threaded_min_entries=0)
    finally:
        await done(net)


class RecordingWaiter:
    """A :class:`~agentcluster.consensus.raft.shell.Waiter` that is not a future."""

    def __init__(self, *, done: bool = False) -> None:
        self.closed = done
        self.outcomes: list[object] = []

    def done(self) -> bool:
        return self.closed

    def set_result(self, result: object, /) -> None:
        self.closed = True
        self.outcomes.append(result)

    def set_exception(self, exception: BaseException, /) -> None:
        self.closed = True
        self.outcomes.append(exception)


@pytest.mark.virtual_time
async def test_submit_to_hands_the_outcome_to_any_waiter_and_skips_a_done_one() -> None:
    """``submit_to``: the applied entry's result goes to the waiter (no future involved); a
    waiter already done when the loop gets to it is skipped -- its data never reaches the
    log -- and a follower's waiter is told NotLeader."""
    net = await cluster()
    try:
        leader = await net.elected()
        kept, gone = RecordingWaiter(), RecordingWaiter(done=True)
        leader.submit_to(b"kept", kept)
        leader.submit_to(b"gone", gone)
        await wait_until(lambda: kept.outcomes != [])
        assert kept.outcomes == [1] and gone.outcomes == []
        await wait_until(lambda: all(m.items == [b"kept"] for m in net.machines.values()))
        follower = next(s for s in net.shells.values() if s is not leader)
        refused = RecordingWaiter()
        follower.submit_to(b"x", refused)
        await wait_until(lambda: refused.outcomes != [])
        assert isinstance(refused.outcomes[0], NotLeader)
    finally:
        await done(net)


@pytest.mark.virtual_time
async def test_the_loop_sleeps_until_the_next_deadline_on_one_timer() -> None:
    """The loop task keeps one timer for the core's next deadline, moved only when that
    comes earlier: an idle leader still heartbeats (its followers keep it), and a wake-up
    between deadlines does not cost a new timer."""
    net = await cluster()
    try:
        leader = await net.elected()
        term = leader.term
        await asyncio.sleep(CFG.election_timeout * 5)  # idle: heartbeats only
        assert leader.is_leader and leader.term == term
        timer = leader._timer
        assert timer is not None
        leader._wake()  # nothing to do: a turn, then the same timer is kept
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert leader._timer is timer
    finally:
        await done(net)


@pytest.mark.virtual_time
async def test_a_sole_voter_persists_its_new_term_before_its_first_appends_leave() -> None:
    # Rule (Raft §5.1 + the leader's early send, thesis §10.2.1): appends may leave before
    # the leader's own write only in a term already on its disk. A sole voter wins its
    # election within one step, so the batch with the new term, its no-op and the proposals
    # of that turn must be durable first: a crash right after sending would otherwise
    # restart it in the old term, win the same term again and write different entries that
    # a learner holding the first ones would take for identical.
    clock = MonotonicClock()
    shells: dict[str, RaftShell] = {}
    seen: list[tuple[int, int, bool]] = []

    def send(msg: Message) -> None:
        leader = shells.get(msg.src)
        first = isinstance(msg, AppendEntries) and any(e.data == b"X" for e in msg.entries)
        if leader is not None and first and not seen:
            stored = leader.storage
            durable = any(e.data == b"X" for e in stored.entries)  # type: ignore[attr-defined]
            seen.append((msg.term, stored.hard_state.term, durable))
        target = shells.get(msg.dst)
        if target is not None:
            asyncio.get_running_loop().call_later(0.0005, target.step, msg)

    base = Snapshot(1, 1, ConfState(("a",), ("b",)), msgspec.msgpack.encode([]))
    for name in ("a", "b"):
        shells[name] = RaftShell(
            name,
            [],
            storage=MemoryStorage(HardState(1), [], base),
            state_machine=ListMachine(),
            send=send,
            clock=clock,
            rng=random.Random(name),
            config=CFG,
        )
    a, b = shells["a"], shells["b"]
    async with asyncio.TaskGroup() as tg:
        await b.start(tg)
        await a.start(tg)
        a.stall(2.0)  # the proposal waits, so it is admitted in the turn of the election
        proposal = a.submit(b"X")
        try:
            await wait_until(lambda: a.is_leader, timeout=5)
            await proposal
            await wait_until(lambda: b.state_machine.items == [b"X"], timeout=5)  # type: ignore[attr-defined]
            ((sent_term, disk_term, durable),) = seen
            assert sent_term == disk_term == 2 and durable
        finally:
            await a.close()
            await b.close()


@pytest.mark.virtual_time
async def test_a_proposal_whose_index_is_reused_is_dropped_not_orphaned() -> None:
    # Rule: a leader cut off with uncommitted proposals, caught up by a snapshot and leading
    # again proposes at those indexes anew; the old proposals' callers get ProposalDropped
    # (or OutcomeUnknown where a snapshot covered them), never silence.
    clock = MonotonicClock()
    shells: dict[str, RaftShell] = {}
    cut: set[str] = set()
    names = ["n1", "n2", "n3"]

    def send(msg: Message) -> None:
        if msg.src in cut or msg.dst in cut:
            return
        target = shells.get(msg.dst)
        if target is not None:
            asyncio.get_running_loop().call_later(0.0005, target.step, msg)

    def leader(among: set[str]) -> RaftShell | None:
        found = [shells[n] for n in among if shells[n].is_leader]
        return found[0] if len(found) == 1 else None

    async with asyncio.TaskGroup() as tg:
        for n in names:
            shells[n] = RaftShell(
                n,
                [v for v in names if v != n],
                storage=MemoryStorage(),
                state_machine=ListMachine(),
                send=send,
                clock=clock,
                rng=random.Random(n),
                config=CFG,
                shell_config=ShellConfig(snapshot_every=1, snapshot_keep=0),
            )
            await shells[n].start(tg)
        try:
            await wait_until(lambda: leader(set(names)) is not None, timeout=5)
            first = leader(set(names))
            assert first is not None
            await first.propose(b"ok")
            cut.add(first.id)
            old = [first.submit(b"P%d" % i) for i in range(5)]  # never committed
            rest = set(names) - {first.id}
            await wait_until(lambda: leader(rest) is not None and not first.is_leader, timeout=5)
            second = leader(rest)
            assert second is not None
            await second.propose(b"m")  # committed, applied, snapshotted, compacted
            cut.clear()  # the first is caught up by a snapshot
            await wait_until(lambda: first.applied_index >= second.applied_index, timeout=5)
            cut.add(second.id)  # the second goes away; the first leads again
            pair = set(names) - {second.id}
            await wait_until(lambda: leader(pair) is not None, timeout=5)
            third = leader(pair)
            assert third is not None
            if third is not first:
                assert third.transfer_leadership(first.id)
                await wait_until(lambda: first.is_leader, timeout=5)
            for i in range(8):
                await first.propose(b"Q%d" % i)
            await wait_until(lambda: all(f.done() for f in old), timeout=5)
            assert all(isinstance(f.exception(), ProposalDropped | OutcomeUnknown) for f in old)
        finally:
            for shell in shells.values():
                await shell.close()
