"""Jepsen-style runs of the raft store on a simulated cluster, checked for linearizability.

One run (:func:`run`) starts a :class:`~agentcluster.testing.SimCluster` whose first ``voters``
nodes hold the Raft log (plus one node that is no voter, so requests are also forwarded), on
links with loss, duplication and reordering. Concurrent clients issue random puts, gets,
compare-and-sets and deletes on a few keys, plus leased writes, through random live nodes,
while a nemesis crashes and restarts voters, isolates the leader, splits the cluster, drops
traffic one way, stalls nodes -- then everything heals and every key is read once more.

What is checked:

* the recorded history is linearizable (:func:`agentcluster.testing.linearizability.check`
  with the key-value model; a request that timed out or met an unavailable store is an
  operation of *unknown* outcome, a failed read is dropped) -- this covers "no acknowledged
  write is lost" (the final reads are in the history) and "no stale read" (a deposed leader
  answering a read would be a violation);
* at most one leader per term, sampled every few milliseconds on every member;
* fencing: a client whose lock lease expired while it was stalled is rejected by the fenced
  write, and the lock's next holder has a larger token.

``python tests/jepsen_harness.py --seeds 0-2000 --voters 3`` runs a longer sweep (``make
jepsen``); the test module runs 300 seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agentcluster.clock import Clock
from agentcluster.store import Compare, GetOp, PutOp, Store, StoreError, StoreUnavailable
from agentcluster.testing import SimCluster, run_virtual
from agentcluster.testing.linearizability import (
    Cas,
    Delete,
    Get,
    HistoryRecorder,
    KVModel,
    LinearizabilityResult,
    Put,
    check,
)
from agentcluster.transport.memory import LinkConfig

KEYS = ("a", "b", "c")
OP_TIMEOUT = 1.0


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

    @property
    def ok(self) -> bool:
        return self.check.ok


class Nemesis:
    def __init__(self, c: SimCluster, rng: random.Random, voters: list[str]) -> None:
        self.c = c
        self.rng = rng
        self.voters = voters
        self.log: list[str] = []

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
            if leader is not None:
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
            victim = rng.choice(live)
            seconds = rng.uniform(0.2, 1.0)
            self.log.append(f"{now} stall {victim} {seconds:.2f}s")
            c.stall(victim, seconds)
        else:
            self.log.append(f"{now} heal")
            c.heal()

    async def heal_all(self) -> None:
        self.c.heal()
        for v in self.voters:
            if v in self.c.crashed:
                await self.c.restart(v)
        self.log.append(f"{round(self.c.clock.now(), 3)} heal all")


async def client(
    cid: int,
    pick: Callable[[random.Random], Store],
    clock: Clock,
    rec: HistoryRecorder,
    rng: random.Random,
    until: float,
    counter: list[int],
) -> None:
    """One client: random operations on :data:`KEYS` through ``pick(rng)`` (a store of a
    random live node), recorded in ``rec``; values are unique, so the checker can tell every
    write apart. Used on the simulated raft store and on a real etcd cluster alike."""
    while clock.now() < until:
        store = pick(rng)
        key = rng.choice(KEYS)
        roll = rng.random()
        counter[0] += 1
        value = f"{cid}-{counter[0]}"
        if roll < 0.35:
            op: object = Put(key, value)
        elif roll < 0.7:
            op = Get(key)
        elif roll < 0.9:
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
    nemesis = Nemesis(c, random.Random(seed ^ 0xBAD), names)
    counter = [0]
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
            while c.clock.now() < until:
                await c.clock.sleep(rng.uniform(0.3, 1.2))
                if c.clock.now() < until:
                    await nemesis.step()
            await nemesis.heal_all()
        # Quiet: every key read once more through a voter, after the cluster settled.
        await c.run_for(1.0)
        store = c.nodes[names[0]].store
        for key in KEYS:
            h = rec.invoke("final", Get(key), c.clock.now())
            kv = await store.get(key)
            rec.ok(h, None if kv is None else kv.value.decode(), c.clock.now())
        fenced = await _fencing(c, rng) if seed % 3 == 0 else False
    finally:
        await c.stop()
    history = rec.history()
    result = check(history, KVModel(), timeout=30.0)
    unknown = sum(1 for op in history if op.ret == math.inf)
    return RunResult(seed, voters, len(history), unknown, result, leaders, fenced, nemesis.log)


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
            print(f"seed {seed}: NOT LINEARIZABLE\n{res.check.report()}\nfaults: {res.faults}")
        elif seed % 50 == 0:
            print(
                f"seed {seed}: ok ({res.ops} ops, {res.unknown} unknown, {len(res.leaders)} terms)"
            )
    print(f"{failures} failures, {time.monotonic() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
