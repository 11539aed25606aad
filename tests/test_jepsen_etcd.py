"""The Jepsen client workload of ``jepsen_harness`` against a real 3-member etcd cluster:
concurrent puts, gets, compare-and-sets, deletes and lease operations while one member is killed with SIGKILL
and restarted; the history must be linearizable (etcd is the reference the raft store is
compared with)."""

from __future__ import annotations

import asyncio
import random

import pytest

from agentcluster.clock import MonotonicClock
from agentcluster.store import Store
from agentcluster.store.etcd import EtcdStore
from agentcluster.testing.linearizability import (
    Get,
    HistoryRecorder,
    KVModel,
    LeasePut,
    LeaseRevoke,
    check,
)
from jepsen_harness import ALL_KEYS, client
from test_store_etcd import fresh_cluster

pytestmark = pytest.mark.slow


async def test_etcd_history_is_linearizable_across_a_member_kill() -> None:
    clock = MonotonicClock()
    rng = random.Random(7)
    rec = HistoryRecorder()
    counter = [0]
    async with fresh_cluster() as cluster:
        stores = [await EtcdStore.connect([ep], timeout=1.0) for ep in cluster.endpoints]
        everywhere = await EtcdStore.connect(cluster.endpoints, timeout=5.0)
        try:
            live = [0, 1, 2]

            def pick(r: random.Random) -> Store:
                return stores[r.choice(live)]

            until = clock.now() + 6.0
            async with asyncio.TaskGroup() as tg:
                for cid in range(3):
                    crng = random.Random(rng.random())
                    tg.create_task(client(cid, pick, clock, rec, crng, until, counter))
                await clock.sleep(2.0)  # let the workload run before the fault (noqa: sleep)
                victim = await cluster.leader()
                index = cluster.endpoints.index(victim.endpoint)
                live.remove(index)
                await cluster.kill(victim.name)
                await clock.sleep(2.0)  # the fault lasts a while (noqa: sleep)
                await cluster.restart(victim.name)
                await cluster.wait_healthy()
                live.append(index)
            for key in ALL_KEYS:
                h = rec.invoke("final", Get(key), clock.now())
                kv = await everywhere.get(key)
                rec.ok(h, None if kv is None else kv.value.decode(), clock.now())
        finally:
            for s in [*stores, everywhere]:
                await s.close()
    history = rec.history()
    assert len(history) > 100
    leased = [op for op in history if isinstance(op.input, LeasePut) and op.output is True]
    revoked = [op for op in history if isinstance(op.input, LeaseRevoke)]
    assert leased and revoked, "the workload ran no lease operations"
    result = check(history, KVModel(), timeout=60.0)
    assert result.ok, result.report()
