"""Jepsen-style runs of the raft store on a simulated cluster, checked for linearizability.

One run (:func:`run`) starts a :class:`~agentcluster.testing.SimCluster` whose first ``voters``
nodes hold the Raft log (plus one node that is no voter, so requests are also forwarded), on
links with loss, duplication and reordering. Concurrent clients issue random puts, gets,
compare-and-sets and deletes on a few keys, plus leased writes, keep-alives and revocations
of each client's own leases (a revocation removes its keys at once), through random live nodes;
two lock clients contend for one lock and write fenced by their token. Meanwhile a nemesis
crashes and restarts voters, isolates the leader, splits the cluster (now and then flapping:
a split that comes and goes every few hundred milliseconds), drops traffic one way,
stalls nodes, and freezes and cuts off the leader while a probe writes through the rest and
reads back through the old leader -- then everything heals and every key is read once more.

What is checked:

* the recorded history is linearizable (:func:`agentcluster.testing.linearizability.check`
  with the key-value model, leases included; a request that timed out or met an unavailable
  store is an operation of *unknown* outcome, a failed read is dropped) -- this covers "no
  acknowledged write is lost" (the final reads are in the history) and "a deposed leader
  never serves a stale read" (the probe's reads through it come after writes it cannot know);
* at most one leader per term, sampled every few milliseconds on every member;
* fencing, under the nemesis: no fenced write is taken from a holder once a later holder
  (a larger token) had acquired the lock before the write was called -- holders freeze past
  their lease now and then to provoke it (:class:`FencingLog`); and, after the heal, a
  holder whose lease expired is refused while the next holder's token is larger.

``python tests/jepsen_harness.py --seeds 0-2000 --voters 3`` runs a longer sweep (``make
jepsen``); the test module runs 300 seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentcluster.clock import Clock
from agentcluster.store import (
    Compare,
    GetOp,
    LeaseNotFound,
    Lock,
    PutOp,
    Store,
    StoreError,
    StoreUnavailable,
)
from agentcluster.testing import SimCluster, run_virtual
from agentcluster.testing.linearizability import (
    Cas,
    Delete,
    Get,
    HistoryRecorder,
    KeepAlive,
    KVModel,
    LeasePut,
    LeaseRevoke,
    LinearizabilityResult,
    Put,
    check,
)
from agentcluster.transport.memory import LinkConfig

# Plain keys; leased writes go to LEASE_KEYS (plain operations too), so one revocation's
# effect on several keys is checked while the plain keys stay small partitions of their own.
KEYS = ("a", "b", "c")
LEASE_KEYS = ("l1", "l2")
ALL_KEYS = KEYS + LEASE_KEYS
OP_TIMEOUT = 1.0
# Longer than any run: the model has no clock, so a lease must end only by revocation here
# (expiry is what the fencing scenario checks).
LEASE_TTL = 120.0


@dataclass
class RunResult:
    seed: int
    voters: int
    ops: int
    unknown: int
    check: LinearizabilityResult
    leaders: dict[int, str] = field(default_factory=dict)
    fencing_checked: bool = False
    faults: list[str] = field(default_factory=list)
    lease_ops: int = 0  # lease puts, keep-alives and revocations that returned
    probe_writes: int = 0  # writes acknowledged by the rest while a probe's leader was cut off
    fencing: FencingLog | None = None  # the lock clients' log, under the nemesis

    @property
    def ok(self) -> bool:
        return self.check.ok and not self.fencing_violations

    @property
    def fencing_violations(self) -> list[str]:
        return [] if self.fencing is None else self.fencing.violations()

    def report(self) -> str:
        lines = [self.check.report(), *self.fencing_violations]
        return "\n".join([*lines, f"faults: {self.faults}"])


PROBE_KEY = "probe"
# A probe lasts past the longest a cut-off leader may go on believing it leads (its
# check-quorum round, up to two election timeouts of 1 s) and past the rest's election of a
# new leader (up to two election timeouts after the last heartbeat, plus a vote).
PROBE_SECONDS = 4.0
PROBE_PUT_TIMEOUT = 0.3


async def stale_read_probe(
    c: SimCluster, rec: HistoryRecorder, cid: str, old: str, rng: random.Random, until: float
) -> None:
    """Reads through a leader that was just cut off (or frozen), after writes it cannot know
    of were acknowledged by the rest: a node that still serves reads from its own state --
    a lease trusted for too long, a deposed leader's stale answer -- returns the value before
    the write, and the history is no longer linearizable. Without this, few client reads
    happen to reach the old leader in the short window where it would be wrong."""
    n = 0
    while c.clock.now() < until:
        n += 1
        others = [x for x in c.names if x != old and x not in c.crashed]
        if not others or old in c.crashed:
            return
        value = f"{cid}-{n}"  # unique across probes too: the checker tells writes apart by value
        h = rec.invoke(cid, Put(PROBE_KEY, value), c.clock.now())
        try:
            async with asyncio.timeout(PROBE_PUT_TIMEOUT):
                await c.nodes[rng.choice(others)].store.put(PROBE_KEY, value.encode())
        except (TimeoutError, StoreError):
            rec.unknown(h, c.clock.now())
            continue
        rec.ok(h, None, c.clock.now())
        g = rec.invoke(cid, Get(PROBE_KEY), c.clock.now())
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                kv = await c.nodes[old].store.get(PROBE_KEY)
        except (TimeoutError, StoreError):
            rec.fail(g, c.clock.now())
            continue
        rec.ok(g, None if kv is None else kv.value.decode(), c.clock.now())
        await c.clock.sleep(0.05)


class Nemesis:
    def __init__(
        self, c: SimCluster, rng: random.Random, voters: list[str], rec: HistoryRecorder
    ) -> None:
        self.c = c
        self.rng = rng
        self.voters = voters
        self.rec = rec
        self.log: list[str] = []

    def _others_can_elect(self, leader: str) -> bool:
        up = [v for v in self.voters if v != leader and v not in self.c.crashed]
        return len(up) > len(self.voters) // 2

    async def _probe(self, old: str, seconds: float = PROBE_SECONDS) -> None:
        """Hold the fault just made while :func:`stale_read_probe` runs (no other fault
        meanwhile: a heal would end the window the probe looks into)."""
        until = self.c.clock.now() + seconds
        cid = f"probe-{len(self.log)}"
        await stale_read_probe(self.c, self.rec, cid, old, self.rng, until)

    def leader(self) -> str | None:
        for name in self.voters:
            node = self.c.nodes.get(name)
            if name in self.c.crashed or node is None or node.store_host is None:
                continue
            member = node.store_host.member
            if member is not None and member.shell.is_leader:
                return name
        return None

    async def step(self) -> None:
        c, rng = self.c, self.rng
        crashed = [v for v in self.voters if v in c.crashed]
        roll = rng.random()
        now = round(c.clock.now(), 3)
        if roll < 0.2 and len(crashed) < (len(self.voters) - 1) // 2:
            victim = rng.choice([v for v in self.voters if v not in c.crashed])
            self.log.append(f"{now} crash {victim}")
            await c.crash(victim)
        elif roll < 0.35 and crashed:
            victim = rng.choice(crashed)
            self.log.append(f"{now} restart {victim}")
            await c.restart(victim)
        elif roll < 0.5:
            leader = self.leader()
            if leader is not None and self._others_can_elect(leader) and rng.random() < 0.5:
                # Only the leader cut off (earlier faults healed), so the rest elect another
                # while the probe reads through the old one.
                self.log.append(f"{now} heal, isolate leader {leader} and probe")
                c.heal()
                c.partition([leader], [n for n in c.names if n != leader])
                await self._probe(leader)
            elif leader is not None:
                self.log.append(f"{now} isolate leader {leader}")
                c.partition([leader], [n for n in c.names if n != leader])
        elif roll < 0.6:
            side = [n for n in c.names if rng.random() < 0.5]
            self.log.append(f"{now} partition {side}")
            c.partition(side, [n for n in c.names if n not in side])
        elif roll < 0.7:
            src = rng.choice(c.names)
            dst = [n for n in c.names if n != src and rng.random() < 0.5]
            self.log.append(f"{now} one-way {src} -> {dst}")
            c.drop_one_way([src], dst)
        elif roll < 0.8:
            live = [n for n in c.names if n not in c.crashed]
            leader = self.leader()
            if leader is not None and self._others_can_elect(leader) and rng.random() < 0.5:
                # The leader frozen long enough for the rest to elect another (a GC pause, a
                # stopped VM): the classic way a leader is deposed without knowing it. Cut
                # off as well, so nothing from the new term reaches it before the reads that
                # waited out the freeze: it must not trust its old lease for them.
                seconds = rng.uniform(2.5, 3.5)
                self.log.append(f"{now} heal, stall and isolate leader {leader} {seconds:.2f}s")
                c.heal()
                c.partition([leader], [n for n in c.names if n != leader])
                c.stall(leader, seconds)
                await self._probe(leader, seconds + 0.5)
            else:
                victim = rng.choice(live)
                seconds = rng.uniform(0.2, 1.0)
                self.log.append(f"{now} stall {victim} {seconds:.2f}s")
                c.stall(victim, seconds)
        elif roll < 0.87:
            await self._flap(rng.uniform(1.0, 2.5))
        else:
            self.log.append(f"{now} heal")
            c.heal()

    async def _flap(self, seconds: float) -> None:
        """A flapping network: a random split that comes and goes every 50-250 ms, so
        elections start, fail and restart, and messages of one term arrive in the next."""
        c, rng = self.c, self.rng
        until = c.clock.now() + seconds
        self.log.append(f"{round(c.clock.now(), 3)} flap {seconds:.2f}s")
        while c.clock.now() < until:
            side = [n for n in c.names if rng.random() < 0.5]
            c.heal()
            if rng.random() < 0.7:
                c.partition(side, [n for n in c.names if n not in side])
            await c.clock.sleep(rng.uniform(0.05, 0.25))
        c.heal()

    async def heal_all(self) -> None:
        self.c.heal()
        for v in self.voters:
            if v in self.c.crashed:
                await self.c.restart(v)
        self.log.append(f"{round(self.c.clock.now(), 3)} heal all")


class _Leases:
    """A client's lease: granted when it needs one, dropped once it revoked it; the revoked
    ones are kept to name now and then (the store must refuse them)."""

    def __init__(self) -> None:
        self.current: int | None = None
        self.revoked: list[int] = []
        self.keys: list[str] = []  # written with the current lease

    def pick(self, rng: random.Random) -> int | None:
        if self.revoked and rng.random() < 0.15:
            return rng.choice(self.revoked)
        return self.current


async def _lease_op(
    cid: int,
    store: Store,
    clock: Clock,
    rec: HistoryRecorder,
    rng: random.Random,
    leases: _Leases,
    value: str,
) -> None:
    if leases.current is None:
        # The grant itself is not part of the model: a lease exists from its grant's reply
        # on, and one whose grant went unanswered is never named.
        with contextlib.suppress(TimeoutError, StoreUnavailable):
            async with asyncio.timeout(OP_TIMEOUT):
                leases.current = (await store.lease_grant(LEASE_TTL)).id
        return
    lease = leases.pick(rng)
    assert lease is not None
    roll = rng.random()
    if roll < 0.6:
        key = rng.choice(LEASE_KEYS)
        op: object = LeasePut(key, value, lease)
    elif roll < 0.8:
        op = KeepAlive(lease)
    else:
        op = LeaseRevoke(lease)
    h = rec.invoke(cid, op, clock.now())
    try:
        async with asyncio.timeout(OP_TIMEOUT):
            if isinstance(op, LeasePut):
                try:
                    await store.put(op.key, value.encode(), lease=lease)
                    rec.ok(h, True, clock.now())
                    if lease == leases.current:
                        leases.keys.append(op.key)
                except LeaseNotFound:
                    rec.ok(h, False, clock.now())
            elif isinstance(op, KeepAlive):
                try:
                    await store.lease_keepalive(lease)
                    rec.ok(h, True, clock.now())
                except LeaseNotFound:
                    rec.ok(h, False, clock.now())
            else:
                await store.lease_revoke(lease)
                rec.ok(h, None, clock.now())
    except (TimeoutError, StoreUnavailable):
        if isinstance(op, KeepAlive):
            rec.fail(h, clock.now())  # a keep-alive changes nothing the model sees
        else:
            rec.unknown(h, clock.now())
    if isinstance(op, LeaseRevoke) and lease == leases.current:
        # Revoked, or perhaps (unknown outcome): either way a new lease from here on.
        leases.revoked.append(lease)
        leases.current = None
        # Look at once: a key the revocation should have removed is most visible now.
        await _get(cid, store, clock, rec, rng.choice(leases.keys or LEASE_KEYS))
        leases.keys = []


async def _get(cid: int, store: Store, clock: Clock, rec: HistoryRecorder, key: str) -> None:
    h = rec.invoke(cid, Get(key), clock.now())
    try:
        async with asyncio.timeout(OP_TIMEOUT):
            kv = await store.get(key)
    except (TimeoutError, StoreUnavailable):
        rec.fail(h, clock.now())  # a read that did not answer changed nothing
    else:
        rec.ok(h, None if kv is None else kv.value.decode(), clock.now())


async def client(
    cid: int,
    pick: Callable[[random.Random], Store],
    clock: Clock,
    rec: HistoryRecorder,
    rng: random.Random,
    until: float,
    counter: list[int],
) -> None:
    """One client: random operations on :data:`ALL_KEYS` and on its own leases through
    ``pick(rng)`` (a store of a random live node), recorded in ``rec``; values are unique, so
    the checker can tell every write apart. Used on the simulated raft store and on a real
    etcd cluster alike."""
    leases = _Leases()
    while clock.now() < until:
        store = pick(rng)
        key = rng.choice(ALL_KEYS)
        roll = rng.random()
        counter[0] += 1
        value = f"{cid}-{counter[0]}"
        if roll >= 0.82:
            await _lease_op(cid, store, clock, rec, rng, leases, value)
            await clock.sleep(rng.uniform(0.0, 0.05))
            continue
        if roll < 0.3:
            op: object = Put(key, value)
        elif roll < 0.6:
            op = Get(key)
        elif roll < 0.75:
            op = Cas(
                key,
                rng.choice([None, f"{rng.randrange(3)}-{rng.randrange(counter[0] + 1)}"]),
                value,
            )
        else:
            op = Delete(key)
        h = rec.invoke(cid, op, clock.now())
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                if isinstance(op, Put):
                    await store.put(key, value.encode())
                    rec.ok(h, None, clock.now())
                elif isinstance(op, Get):
                    kv = await store.get(key)
                    rec.ok(h, None if kv is None else kv.value.decode(), clock.now())
                elif isinstance(op, Cas):
                    if op.expected is None:
                        cmp = Compare(key, "version", "==", 0)
                    else:
                        cmp = Compare(key, "value", "==", str(op.expected).encode())
                    res = await store.txn([cmp], [PutOp(key, value.encode())], [GetOp(key)])
                    rec.ok(h, res.succeeded, clock.now())
                else:
                    deleted = await store.delete(key)
                    rec.ok(h, deleted, clock.now())
        except (TimeoutError, StoreUnavailable):
            if isinstance(op, Get):
                rec.fail(h, clock.now())  # a read that did not answer changed nothing
            else:
                rec.unknown(h, clock.now())
        await clock.sleep(rng.uniform(0.0, 0.05))


async def _watch_leaders(
    c: SimCluster, voters: list[str], leaders: dict[int, str], until: float
) -> None:
    while c.clock.now() < until:
        for name in voters:
            node = c.nodes.get(name)
            if name in c.crashed or node is None or node.store_host is None:
                continue
            member = node.store_host.member
            if member is None or not member.shell.is_leader:
                continue
            term = member.shell.term
            other = leaders.setdefault(term, name)
            assert other == name, f"two leaders in term {term}: {other} and {name}"
        await c.clock.sleep(0.005)


LOCK_NAME = "jepsen-lock"
LOCK_TTL = 0.5
FENCED_KEY = "fenced"


@dataclass
class FencingLog:
    """What the lock clients saw: each acquisition's token and when it returned, each fenced
    write's token, when it was called and whether the store took it (unknown ones are left
    out: they prove nothing either way)."""

    acquired: list[tuple[int, float]] = field(default_factory=list)
    writes: list[tuple[int, float, bool]] = field(default_factory=list)
    frozen: int = 0  # holders that froze past their TTL and then tried to write

    def violations(self) -> list[str]:
        """Fenced writes the store took although a later holder (a larger token) had
        acquired the lock before the write was called: a holder whose lease expired was not
        fenced off."""
        out = []
        for token, called, ok in self.writes:
            if not ok:
                continue
            newer = [(t, at) for t, at in self.acquired if t > token and at < called]
            if newer:
                t, at = min(newer, key=lambda x: x[1])
                out.append(
                    f"a write fenced by token {token} was taken at {called:.3f}, after token "
                    f"{t} was acquired at {at:.3f}"
                )
        return out

    @property
    def refused(self) -> int:
        return sum(not ok for _, _, ok in self.writes)


async def lock_client(
    pick: Callable[[random.Random], Store],
    clock: Clock,
    rng: random.Random,
    until: float,
    log: FencingLog,
) -> None:
    """Contends for one lock through random live nodes while the nemesis runs. A holder
    writes :data:`FENCED_KEY` fenced by its token; now and then it freezes -- its keep-alive
    stops, as in a long pause -- for several TTLs, then writes again as if it still held
    the lock. The store must refuse that write once another holder has acquired."""
    n = 0
    while clock.now() < until:
        lock = Lock(pick(rng), LOCK_NAME, ttl=LOCK_TTL, clock=clock)
        try:
            async with asyncio.timeout(2.0):
                token = await lock.acquire()
        except (TimeoutError, StoreError):
            await lock.release()
            continue
        log.acquired.append((token, clock.now()))
        try:
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.3:
                    keeper = lock._keeper  # the pause: no keep-alive from here on
                    if keeper is not None:
                        keeper.cancel()
                    log.frozen += 1
                    await clock.sleep(rng.uniform(3, 6) * LOCK_TTL)
                n += 1
                called = clock.now()
                try:
                    async with asyncio.timeout(OP_TIMEOUT):
                        ok = await lock.fenced_put(FENCED_KEY, f"{token}-{n}".encode())
                except (TimeoutError, StoreError):
                    continue
                log.writes.append((token, called, ok))
                await clock.sleep(rng.uniform(0.0, 0.1))
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OP_TIMEOUT):
                    await lock.release()


async def _fencing(c: SimCluster, rng: random.Random) -> bool:
    """A holder stalls past its lock lease; the next holder gets a larger token; the stalled
    holder's fenced write is rejected. Returns whether the scenario could be run (it needs a
    store that answers)."""
    store = c.nodes[c.names[-1]].store
    try:
        lease = await store.lease_grant(0.5)
        key = "lock/fence"
        res = await store.txn(
            [Compare(key, "version", "==", 0)], [PutOp(key, b"a", lease.id)], [GetOp(key)]
        )
        if not res.succeeded:
            return False
        kv = await store.get(key)
        assert kv is not None
        token_a = kv.create_revision
        # Holder A "stalls": no keep-alives. Its lease runs out; B takes the lock.
        deadline = c.clock.now() + 10.0
        while (await store.get(key)) is not None:
            assert c.clock.now() < deadline, "an expired lease kept its key"
            await c.clock.sleep(0.1)
        async with store.lock("fence-b", ttl=2.0) as lock_b:
            lease_b = await store.lease_grant(5.0)
            res = await store.txn(
                [Compare(key, "version", "==", 0)], [PutOp(key, b"b", lease_b.id)], [GetOp(key)]
            )
            assert res.succeeded
            kv = await store.get(key)
            assert kv is not None and kv.create_revision > token_a
            stale = await store.txn(
                [Compare(key, "create", "==", token_a)], [PutOp("guarded", b"from-a")]
            )
            assert not stale.succeeded, "a holder with an expired lease was not fenced off"
            assert await store.get("guarded") is None
            assert lock_b.token > 0
            await store.lease_revoke(lease_b.id)
        return True
    except (StoreError, TimeoutError):
        return False


async def run(seed: int, voters: int = 3, *, chaos: float = 6.0) -> RunResult:
    rng = random.Random(seed)
    link = LinkConfig(delay=0.0005, jitter=0.002, loss=0.03, duplicate=0.02, reorder=0.05)
    c = SimCluster(
        voters + 1, seed=seed, store_voters=voters, link=link, snapshot_every=64, record=False
    )
    await c.start()
    names = list(c.store_voters)
    leaders: dict[int, str] = {}
    rec = HistoryRecorder()
    nemesis = Nemesis(c, random.Random(seed ^ 0xBAD), names, rec)
    counter = [0]
    fencing = FencingLog()
    try:
        await c.run_for(1.0)
        start = c.clock.now()
        until = start + chaos
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_watch_leaders(c, names, leaders, until + 5.0))

            def pick(r: random.Random) -> Store:
                return c.nodes[r.choice([n for n in c.names if n not in c.crashed])].store

            for cid in range(3):
                crng = random.Random(rng.random())
                tg.create_task(client(cid, pick, c.clock, rec, crng, until, counter))
            for _ in range(2):
                lrng = random.Random(rng.random())
                tg.create_task(lock_client(pick, c.clock, lrng, until, fencing))
            while c.clock.now() < until:
                await c.clock.sleep(rng.uniform(0.3, 1.2))
                if c.clock.now() < until:
                    await nemesis.step()
            await nemesis.heal_all()
        # Quiet: every key read once more through a voter, after the cluster settled.
        await c.run_for(1.0)
        store = c.nodes[names[0]].store
        for key in (*ALL_KEYS, PROBE_KEY):
            h = rec.invoke("final", Get(key), c.clock.now())
            kv = await store.get(key)
            rec.ok(h, None if kv is None else kv.value.decode(), c.clock.now())
        fenced = await _fencing(c, rng) if seed % 3 == 0 else False
    finally:
        await c.stop()
    history = rec.history()
    result = check(history, KVModel(), timeout=30.0)
    unknown = sum(1 for op in history if op.ret == math.inf)
    known = [op for op in history if op.ret != math.inf]
    return RunResult(
        seed,
        voters,
        len(history),
        unknown,
        result,
        leaders,
        fenced,
        nemesis.log,
        lease_ops=sum(isinstance(op.input, LeasePut | KeepAlive | LeaseRevoke) for op in known),
        probe_writes=sum(
            str(op.client).startswith("probe") and isinstance(op.input, Put) for op in known
        ),
        fencing=fencing,
    )


def run_seed(seed: int, voters: int = 3) -> RunResult:
    return run_virtual(run(seed, voters))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-300", help="a range like 0-2000")
    parser.add_argument("--voters", type=int, choices=(3, 5), default=3)
    args = parser.parse_args(argv)
    lo, _, hi = args.seeds.partition("-")
    failures = 0
    t0 = time.monotonic()
    for seed in range(int(lo), int(hi or int(lo) + 1)):
        res = run_seed(seed, args.voters)
        if not res.ok:
            failures += 1
            print(f"seed {seed}: FAILED\n{res.report()}")
        elif seed % 50 == 0:
            print(
                f"seed {seed}: ok ({res.ops} ops, {res.unknown} unknown, {len(res.leaders)} terms)"
            )
    print(f"{failures} failures, {time.monotonic() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
