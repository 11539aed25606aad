"""RegistrySync: scenario tests on an in-test network of cores with a simulated clock."""

from __future__ import annotations

import heapq
import random

import msgspec
import pytest

from agentcluster.coordination.registry import AgentEntry
from agentcluster.coordination.registry_sync import (
    Delta,
    Digest,
    Full,
    Pull,
    RegistryEvent,
    RegistrySync,
    SyncConfig,
    SyncDecodeError,
    SyncMessage,
    decode_sync,
    encode_sync,
)

CFG = SyncConfig()
FLUSH, SYNC = CFG.flush_interval, CFG.sync_interval
MAX_DELAY = 0.004


class Net:
    """N cores, a seeded lossy / duplicating / reordering network and a simulated clock.

    Every message is encoded and decoded on its way, so the codec is exercised too.
    """

    def __init__(
        self,
        names: list[str],
        seed: int,
        *,
        loss: float = 0.0,
        dup: float = 0.0,
        config: SyncConfig = CFG,
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.now = 0.0
        self.loss, self.dup, self.config = loss, dup, config
        self.cores: dict[str, RegistrySync] = {}
        self.events: dict[str, list[RegistryEvent]] = {}
        self.queue: list[tuple[float, int, str, str, bytes]] = []
        self.seq = 0
        self.cut: set[frozenset[str]] = set()
        self.epochs = 0
        for n in names:
            self.start(n)
        for a in names:
            for b in names:
                if a != b:
                    self.cores[a].member_up(b, 0.0)

    def start(self, name: str) -> RegistrySync:
        self.epochs += 1
        rng = random.Random(self.seed * 1000 + self.epochs)
        core = RegistrySync(name, 1_000 * self.epochs, rng, self.config, now=self.now)
        self.cores[name] = core
        self.events.setdefault(name, [])
        return core

    def partition(self, left: list[str], right: list[str]) -> None:
        self.cut = {frozenset((a, b)) for a in left for b in right}

    def heal(self) -> None:
        self.cut = set()

    def register(self, node: str, entry: AgentEntry) -> None:
        self.events[node] += self.cores[node].register(entry, self.now)

    def _pump(self) -> None:
        for src, core in self.cores.items():
            for dst, msg in core.ready():
                if dst not in self.cores or frozenset((src, dst)) in self.cut:
                    continue
                data = encode_sync(msg)
                copies = 2 if self.rng.random() < self.dup else 1
                for _ in range(copies):
                    if self.rng.random() < self.loss:
                        continue
                    self.seq += 1
                    at = self.now + self.rng.uniform(0.0005, MAX_DELAY)
                    heapq.heappush(self.queue, (at, self.seq, dst, src, data))

    def run_until(self, t: float) -> None:
        self._pump()
        while True:
            nxt = min([c.next_deadline() for c in self.cores.values()] + [t])
            if self.queue and self.queue[0][0] < nxt:
                nxt = self.queue[0][0]
            if nxt >= t:
                self.now = t
                return
            self.now = nxt
            while self.queue and self.queue[0][0] <= self.now:
                _, _, dst, src, data = heapq.heappop(self.queue)
                if dst in self.cores and frozenset((src, dst)) not in self.cut:
                    self.events[dst] += self.cores[dst].step(src, decode_sync(data), self.now)
            for core in self.cores.values():
                if core.next_deadline() <= self.now:
                    core.tick(self.now)
            self._pump()

    def truth(self) -> list[AgentEntry]:
        return sorted(
            (e for c in self.cores.values() for e in c.local_entries()), key=lambda e: e.id
        )

    def converged(self) -> bool:
        want = self.truth()
        return all(c.index.entries() == want for c in self.cores.values())


def agent(node: str, i: int, **kw: object) -> AgentEntry:
    fields: dict[str, object] = {
        "name": f"a{i}",
        "capabilities": (f"cap-{i % 4}",),
        "resources": {"load": i / 10},
    }
    fields.update(kw)
    return AgentEntry(id=f"{node}/a{i}", node=node, **fields)  # type: ignore[arg-type]


NODES = ["n1", "n2", "n3", "n4", "n5"]


def churn(net: Net, rng: random.Random, rounds: int) -> None:
    """Registrations, updates and removals spread over time on every node."""
    for r in range(rounds):
        for n in NODES:
            core = net.cores[n]
            i = rng.randrange(12)
            if rng.random() < 0.25 and f"{n}/a{i}" in core.index:
                net.events[n] += core.unregister(f"{n}/a{i}", net.now)
            else:
                net.register(n, agent(n, i, resources={"load": rng.random()}))
        net.run_until(net.now + rng.choice([0.001, 0.003, 0.02]) + 0 * r)


def test_lossless_changes_reach_everyone_in_one_hop() -> None:
    net = Net(NODES, seed=1)
    net.run_until(0.1)
    for round in range(5):
        for n in NODES:
            net.register(n, agent(n, round))
        # Bounded convergence: at most one flush window plus one network delay.
        net.run_until(net.now + FLUSH + MAX_DELAY + 1e-6)
        assert net.converged()
    assert all(c.stats.gaps == 0 for c in net.cores.values())
    assert all(len(c.index) == 25 for c in net.cores.values())


@pytest.mark.parametrize(
    ("seed", "loss", "dup"),
    [(1, 0.1, 0.05), (2, 0.2, 0.1), (3, 0.3, 0.0), (4, 0.05, 0.3), (5, 0.25, 0.25)],
)
def test_views_converge_under_loss_duplication_and_reordering(
    seed: int, loss: float, dup: float
) -> None:
    net = Net(NODES, seed=seed, loss=loss, dup=dup)
    churn(net, random.Random(seed), rounds=40)
    end = net.now
    net.run_until(end + FLUSH + 6 * SYNC)
    assert net.converged(), f"not converged {6 * SYNC}s after the last change"
    # Each view's events replay to exactly the final state.
    for n, core in net.cores.items():
        replay: dict[str, AgentEntry] = {}
        for ev in net.events[n]:
            if ev.kind == "unregistered":
                replay.pop(ev.entry.id, None)
            elif ev.kind != "name_conflict":
                replay[ev.entry.id] = ev.entry
        assert sorted(replay.values(), key=lambda e: e.id) == core.index.entries()


def test_partition_heals_by_anti_entropy() -> None:
    net = Net(NODES, seed=7)
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    churn(net, random.Random(7), rounds=20)
    side = net.cores["n1"].index.entries()
    assert {e.node for e in side} == {"n1", "n2"}
    net.heal()
    net.run_until(net.now + FLUSH + 4 * SYNC)
    assert net.converged()


def test_member_down_removes_entries_and_gossip_cannot_resurrect_them() -> None:
    net = Net(["n1", "n2", "n3", "n4"], seed=3)
    for i in range(5):
        net.register("n4", agent("n4", i))
        net.register("n1", agent("n1", i))
    net.run_until(0.5)
    assert net.converged()
    del net.cores["n4"]  # crashed: silent from now on
    # n1 and n2 declare it dead; n3 has not noticed yet and keeps gossiping its entries.
    for n in ("n1", "n2"):
        net.events[n] += net.cores[n].member_down("n4", net.now)
        gone = [e for e in net.events[n] if e.kind == "unregistered" and e.entry.node == "n4"]
        assert len(gone) == 5
    net.run_until(net.now + 6 * SYNC)
    for n in ("n1", "n2"):
        assert "n4" not in net.cores[n].index.nodes()
        assert net.cores[n].stats.tombstoned_dropped > 0
    assert "n4" in net.cores["n3"].index.nodes()
    net.events["n3"] += net.cores["n3"].member_down("n4", net.now)
    net.run_until(net.now + 3 * SYNC)
    assert all("n4" not in c.index.nodes() for c in net.cores.values())
    assert net.converged()


def test_member_down_of_a_never_heard_node_blocks_its_entries_until_member_up() -> None:
    core = RegistrySync("n1", 1, random.Random(1))
    assert core.member_down("n9", 0.0) == []
    full = Full("n9", 5, 1, 0, 1, (agent("n9", 1),))
    assert core.step("n2", full, 0.1) == []
    assert core.stats.tombstoned_dropped == 1
    core.member_up("n9", 0.2)
    events = core.step("n9", full, 0.3)
    assert [e.kind for e in events] == ["registered"]


def test_a_restarted_owner_replaces_its_old_entries() -> None:
    net = Net(["n1", "n2", "n3"], seed=5)
    for i in range(4):
        net.register("n3", agent("n3", i))
    net.run_until(0.5)
    assert net.converged() and len(net.cores["n1"].index) == 4
    # n3 restarts (new epoch, empty) and registers one agent again; the others only hear
    # that it is alive again.
    core = net.start("n3")
    for peer in ("n1", "n2"):
        core.member_up(peer, net.now)
        net.cores[peer].member_up("n3", net.now)
    net.register("n3", agent("n3", 9))
    net.run_until(net.now + 0.1)
    assert net.converged()
    assert [e.id for e in net.cores["n1"].index.entries()] == ["n3/a9"]
    assert net.cores["n1"].owner_state("n3") == (core.epoch, core.version)


def test_a_restart_is_adopted_from_a_digest_alone() -> None:
    # No member_up on the peers, and the restarted node's pushes are lost: the periodic
    # digest exchange alone replaces the old epoch.
    net = Net(["n1", "n2"], seed=6)
    net.register("n2", agent("n2", 1))
    net.run_until(0.5)
    core = net.start("n2")
    core.member_up("n1", net.now)
    core.ready()  # its pushes are lost
    net.run_until(net.now + 3 * SYNC)
    assert net.cores["n1"].index.entries() == []
    assert net.cores["n1"].owner_state("n2") == (core.epoch, 0)


def pair() -> tuple[RegistrySync, RegistrySync]:
    """Two cores that know each other; no digests get in the way of scripted exchanges."""
    quiet = SyncConfig(sync_interval=100.0)
    a = RegistrySync("a", 10, random.Random(1), quiet)
    b = RegistrySync("b", 20, random.Random(2), quiet)
    a.member_up("b", 0.0)
    b.member_up("a", 0.0)
    for src, dst in ((a, b), (b, a)):
        for _, msg in src.ready():
            dst.step(src.node, msg, 0.0)
    for src, dst in ((a, b), (b, a)):
        for _, msg in src.ready():
            dst.step(src.node, msg, 0.0)
    return a, b


def deliver(src: RegistrySync, dst: RegistrySync, now: float) -> list[RegistryEvent]:
    events: list[RegistryEvent] = []
    for to, msg in src.ready():
        assert to == dst.node
        events += dst.step(src.node, decode_sync(encode_sync(msg)), now)
    return events


def test_a_delta_gap_triggers_a_pull_and_repairs() -> None:
    a, b = pair()
    a.register(agent("a", 1), 1.0)
    a.tick(1.0 + FLUSH)
    lost = a.ready()
    assert [type(m) for _, m in lost] == [Delta]
    a.register(agent("a", 2), 1.1)
    a.tick(1.1 + FLUSH)
    assert deliver(a, b, 1.11) == []  # base 1, b is at 0: a gap
    assert b.stats.gaps == 1
    out = b.ready()
    assert [(to, m) for to, m in out] == [("a", Pull("a"))]
    a.step("b", out[0][1], 1.12)
    events = deliver(a, b, 1.13)
    assert [e.kind for e in events] == ["registered", "registered"]
    assert b.index.entries() == a.local_entries()
    assert b.stats.fulls_applied >= 1
    # Now in step again: the next delta applies directly.
    a.register(agent("a", 3), 1.2)
    a.tick(1.2 + FLUSH)
    assert [e.kind for e in deliver(a, b, 1.21)] == ["registered"]
    assert b.owner_state("a") == a.owner_state("a")


def test_untrusted_entries_and_claims_are_dropped() -> None:
    _, b = pair()
    forged = Delta("a", 10, 0, 1, (agent("c", 1), agent("a", 1)), ())
    events = b.step("a", forged, 1.0)
    assert [e.entry.id for e in events] == ["a/a1"]  # the entry not owned by "a" is dropped
    assert b.stats.foreign_dropped == 1
    bad = msgspec.structs.replace(agent("a", 2), resources={"load": float("nan")})
    b.step("a", Delta("a", 10, 1, 2, (bad,), ()), 1.0)
    assert b.stats.invalid_dropped == 1 and "a/a2" not in b.index
    # Nobody may tell b about b's own entries.
    b.register(agent("b", 1), 1.0)
    b.step("a", Full("b", 20, 1, 0, 1, ()), 1.0)
    assert b.stats.own_claims_dropped == 1
    assert [e.id for e in b.index.entries() if e.node == "b"] == ["b/a1"]
    # A stale or replayed delta changes nothing.
    stale = b.stats.stale_dropped
    assert b.step("a", Delta("a", 10, 0, 1, (agent("a", 7),), ()), 1.0) == []
    assert b.stats.stale_dropped == stale + 1


def test_a_peer_holding_a_newer_state_of_ours_makes_us_outrank_it() -> None:
    # We restarted with an epoch below our former one (clock went back).
    _, b = pair()
    b.step("a", Digest({"a": (10, 0), "b": (99, 4)}), 1.0)
    assert b.epoch == 100 and b.stats.epoch_bumps == 1
    fulls = [m for _, m in b.ready() if isinstance(m, Full) and m.owner == "b"]
    assert fulls and all(m.epoch == 100 for m in fulls)


def test_a_split_full_is_applied_atomically() -> None:
    cfg = SyncConfig(max_entries_per_message=3, sync_interval=100.0)
    a = RegistrySync("a", 10, random.Random(1), cfg)
    b = RegistrySync("b", 20, random.Random(2), cfg)
    for i in range(10):
        a.register(agent("a", i), 0.0)
    a.member_up("b", 0.0)
    parts = [m for _, m in a.ready() if isinstance(m, Full)]
    assert [(m.part, m.parts, len(m.entries)) for m in parts] == [
        (0, 4, 3),
        (1, 4, 3),
        (2, 4, 3),
        (3, 4, 1),
    ]
    for m in (parts[3], parts[1], parts[0]):
        assert b.step("a", m, 0.1) == []
        assert len(b.index) == 0  # nothing until the last part is in
    events = b.step("a", parts[2], 0.1)
    assert len(events) == 10 and b.index.entries() == a.local_entries()
    # A pushed change too big for one delta goes out as a (split) Full.
    for i in range(10, 15):
        a.register(agent("a", i), 1.0)
    a.tick(1.0 + FLUSH)
    out = [m for _, m in a.ready()]
    assert out and all(isinstance(m, Full) for m in out)
    for pushed in out:
        b.step("a", pushed, 1.01)
    assert b.index.entries() == a.local_entries()


def test_an_incomplete_assembly_expires() -> None:
    cfg = SyncConfig(max_entries_per_message=2, assembly_timeout=1.0)
    a = RegistrySync("a", 10, random.Random(1), cfg)
    b = RegistrySync("b", 20, random.Random(2), cfg)
    for i in range(4):
        a.register(agent("a", i), 0.0)
    a.member_up("b", 0.0)
    first, _second = [m for _, m in a.ready() if isinstance(m, Full)]
    b.step("a", first, 0.0)
    b.tick(0.5)
    assert len(b._assembly) == 1
    b.tick(1.5)
    assert b._assembly == {}


def conflict_net() -> Net:
    net = Net(NODES, seed=11, loss=0.05)
    net.partition(["n1", "n2"], ["n3", "n4", "n5"])
    net.run_until(0.1)
    # Both sides grant the name while they cannot see each other.
    net.register("n1", agent("n1", 1, name="leader", unique=True, registered_at=10.0))
    net.register("n4", agent("n4", 1, name="leader", unique=True, registered_at=5.0))
    net.run_until(1.0)
    return net


def test_a_name_conflict_resolves_identically_everywhere_and_the_loser_hears_once() -> None:
    net = conflict_net()
    assert net.cores["n2"].index.by_name("leader")[0].node == "n1"
    net.heal()
    net.run_until(net.now + 5 * SYNC)
    assert net.converged()
    for core in net.cores.values():
        assert [e.node for e in core.index.by_name("leader")] == ["n4", "n1"]
    conflicts = {n: [e for e in evs if e.kind == "name_conflict"] for n, evs in net.events.items()}
    assert [(e.entry.id, e.winner and e.winner.id) for e in conflicts["n1"]] == [("n1/a1", "n4/a1")]
    assert all(conflicts[n] == [] for n in NODES if n != "n1")
    # Further churn on the winner does not report the same conflict again.
    net.register(
        "n4", agent("n4", 1, name="leader", unique=True, registered_at=5.0, health="degraded")
    )
    net.run_until(net.now + 2 * SYNC)
    assert len([e for e in net.events["n1"] if e.kind == "name_conflict"]) == 1


def test_registering_a_name_that_a_remote_owner_already_won_reports_at_once() -> None:
    a, b = pair()
    a.register(agent("a", 1, name="x", unique=True, name_token=3), 0.0)
    a.tick(FLUSH)
    deliver(a, b, FLUSH)
    events = b.register(agent("b", 1, name="x", unique=True, name_token=0), 0.1)
    assert [e.kind for e in events] == ["registered", "name_conflict"]
    assert events[1].winner is not None and events[1].winner.node == "a"
    with pytest.raises(ValueError, match="already held by local agent"):
        b.register(agent("b", 2, name="x", unique=True), 0.2)
    with pytest.raises(ValueError, match="belongs to node 'a'"):
        b.register(agent("a", 5), 0.2)


MESSAGES: list[SyncMessage] = [
    Delta("n1", 7, 3, 5, (agent("n1", 1),), ("n1/a0",)),
    Full("n1", 7, 5, 1, 2, (agent("n1", 1), agent("n1", 2))),
    Digest({"n1": (7, 5), "n2": (3, 0)}),
    Pull("n3"),
]


@pytest.mark.parametrize("msg", MESSAGES)
def test_messages_round_trip(msg: SyncMessage) -> None:
    assert decode_sync(encode_sync(msg)) == msg


GARBAGE: list[bytes] = [
    b"",
    b"\xff",
    b"\xc1",
    msgspec.msgpack.encode([1, 2, 3]),
    msgspec.msgpack.encode(["z", "n1"]),  # unknown tag
    msgspec.msgpack.encode(["p", ""]),  # empty owner
    msgspec.msgpack.encode(["d", "n1", -1, 0, 1, [], []]),  # negative epoch
    msgspec.msgpack.encode(["f", "n1", 1, 1, 0, 0, []]),  # zero parts
    msgspec.msgpack.encode(["f", "n1", 1, 1, 0, 1, [["id", "name"]]]),  # truncated entry
    msgspec.msgpack.encode(["g", {"n1": [1]}]),
    encode_sync(MESSAGES[1])[:-3],
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_raises_a_typed_error(data: bytes) -> None:
    with pytest.raises(SyncDecodeError):
        decode_sync(data)


def test_same_seed_same_run() -> None:
    def run() -> list[tuple[str, str, str]]:
        net = Net(NODES, seed=9, loss=0.2, dup=0.1)
        churn(net, random.Random(9), rounds=10)
        net.run_until(net.now + 2 * SYNC)
        return [(n, e.kind, e.entry.id) for n, evs in net.events.items() for e in evs]

    assert run() == run()
