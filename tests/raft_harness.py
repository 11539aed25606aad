"""A deterministic harness for the Raft core, shared by the core and feature tests.

:class:`Cluster` is used both by hand (deliver exactly the messages a scenario needs) and as a
randomized simulation (seeded loss, duplication, reordering, partitions and crashes; a crash
rebuilds the node from its :class:`MemoryStorage`). The "state machine" of each node is the
list of entries it applied; a snapshot's data is that list, msgpack-encoded, so a node restored
from a snapshot is checked exactly like one that applied every entry.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable

import msgspec

from agentcluster.consensus.raft import (
    Entry,
    HardState,
    MemoryStorage,
    Message,
    RaftConfig,
    RaftNode,
    Ready,
)

_entries = msgspec.msgpack.Decoder(list[Entry])

CFG = RaftConfig(election_timeout=1.0, heartbeat_interval=0.1)


class Cluster:
    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        config: RaftConfig = CFG,
        logs: dict[str, MemoryStorage] | None = None,
    ) -> None:
        self.ids = [f"n{i}" for i in range(1, n + 1)]
        self.config = config
        self.rng = random.Random(seed)
        self.now = 0.0
        self.storage = {i: (logs or {}).get(i) or MemoryStorage() for i in self.ids}
        self.nodes: dict[str, RaftNode] = {}
        self.applied: dict[str, list[Entry]] = {}
        self.pending: list[Message] = []
        self.group = dict.fromkeys(self.ids, 0)
        self.leaders: dict[int, str] = {}
        self.committed: dict[int, Entry] = {}
        self.reads: dict[str, list[tuple[int, int]]] = {}
        self.sent_kinds: collections.Counter[str] = collections.Counter()  # by a driver's count
        for i in self.ids:
            self.restart(i)

    # -- node lifecycle
    def restart(self, i: str, *, join: bool = False) -> None:
        rng = random.Random(self.rng.random())
        storage = self.storage.setdefault(i, MemoryStorage())
        self.nodes[i] = RaftNode(
            i, self.ids, config=self.config, rng=rng, now=self.now, storage=storage, join=join
        )
        snap = storage.snapshot
        self.applied[i] = _entries.decode(snap.data) if snap is not None else []
        self.reads.setdefault(i, [])

    def add(self, i: str) -> RaftNode:
        """Start a brand-new node that waits to be added by the leader."""
        self.ids.append(i)
        self.group[i] = 0
        self.restart(i, join=True)
        return self.nodes[i]

    def take_snapshot(self, i: str, keep: int = 0) -> None:
        """Snapshot ``i``'s state machine at its applied index and compact all but ``keep``
        entries before it."""
        node = self.nodes[i]
        index = node.applied_index
        snap = node.snapshot_at(index, msgspec.msgpack.encode(self.applied[i][:index]))
        self.storage[i].save_snapshot(snap)
        through = max(0, index - keep)
        self.storage[i].compact(through)
        node.compact(through)

    def crash(self, i: str) -> None:
        del self.nodes[i]

    def leader(self) -> RaftNode | None:
        live = [n for n in self.nodes.values() if n.state == "leader"]
        return max(live, key=lambda n: n.term) if live else None

    # -- the shell's loop body, plus the safety checks
    def process(self, i: str) -> Ready:
        node = self.nodes[i]
        rd = node.ready()
        if rd.snapshot is not None:
            self.storage[i].save_snapshot(rd.snapshot)
            restored = _entries.decode(rd.snapshot.data)
            assert len(restored) == rd.snapshot.index
            for e in restored:
                seen = self.committed.setdefault(e.index, e)
                assert seen == e, f"snapshot disagrees at {e.index}: {seen} vs {e}"
            self.applied[i] = restored
        self.storage[i].persist(rd.hard_state, rd.entries)
        self.pending.extend(rd.messages)
        for e in rd.committed:
            assert e.index == len(self.applied[i]) + 1, "applied out of order"
            seen = self.committed.setdefault(e.index, e)
            assert seen == e, f"state-machine safety: index {e.index} was {seen}, now {e}"
            self.applied[i].append(e)
        self.reads[i].extend(rd.read_states)
        node.advance(rd)
        self.check_leaders()
        return rd

    def check_leaders(self) -> None:
        for n in self.nodes.values():
            if n.state == "leader":
                other = self.leaders.setdefault(n.term, n.id)
                assert other == n.id, f"two leaders in term {n.term}: {other}, {n.id}"

    def process_all(self) -> None:
        for i in list(self.nodes):
            self.process(i)

    def can_reach(self, src: str, dst: str) -> bool:
        return dst in self.nodes and self.group[src] == self.group[dst]

    # -- manual delivery
    def deliver(self, keep: Callable[[Message], bool] = lambda m: True, rounds: int = 1000) -> None:
        """Deliver (in order) every pending message ``keep`` accepts until quiet."""
        for _ in range(rounds):
            self.process_all()
            if not self.pending:
                return
            batch, self.pending = self.pending, []
            for m in batch:
                if keep(m) and self.can_reach(m.src, m.dst):
                    self.nodes[m.dst].step(m, self.now)
        raise AssertionError("did not quiesce")

    def fire(self, i: str) -> None:
        """Advance the clock to ``i``'s next deadline and tick only ``i``."""
        self.now = max(self.now, self.nodes[i].next_deadline())
        self.nodes[i].tick(self.now)

    def advance_time(self, until: float, keep: Callable[[Message], bool] = lambda m: True) -> None:
        """Tick every live node at its deadlines, delivering messages instantly between."""
        while True:
            due = min(n.next_deadline() for n in self.nodes.values())
            if due > until:
                self.now = until
                return
            self.now = max(self.now, due)
            for n in list(self.nodes.values()):
                if n.next_deadline() <= self.now:
                    n.tick(self.now)
            self.deliver(keep)

    def elect(self, i: str) -> RaftNode:
        self.fire(i)
        self.deliver()
        assert self.nodes[i].state == "leader"
        return self.nodes[i]


def make_storage(
    terms: list[int], term: int, vote: str | None = None, commit: int = 0
) -> MemoryStorage:
    entries = [Entry(t, k, f"e{k}t{t}".encode()) for k, t in enumerate(terms, start=1)]
    return MemoryStorage(HardState(term, vote, commit), entries)


def lone_node(config: RaftConfig = CFG, storage: MemoryStorage | None = None) -> RaftNode:
    return RaftNode(
        "a", ["a", "b", "c"], config=config, rng=random.Random(1), now=0.0, storage=storage
    )
