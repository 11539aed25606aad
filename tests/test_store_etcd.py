"""The etcd store backend against a real 3-member etcd cluster on loopback.

Every test here starts real ``etcd`` processes (Debian's ``etcd-server``), so all are marked
``slow``. The shared cluster serves the store contract and the tests that break nothing; a
test that kills members gets a cluster of its own (one starts in about 0.3 s). When etcd is
missing, the fixture installs it with ``scripts/ci-system-deps.sh`` if it runs as root and
otherwise fails naming the package: these tests are never skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from agentcluster.store._etcd_cluster import EtcdCluster, EtcdNotInstalled
from agentcluster.store.base import (
    Compacted,
    InvalidCommand,
    LeaseNotFound,
    PutOp,
    Store,
    StoreUnavailable,
    WatchEvent,
)
from agentcluster.store.etcd import EtcdStore
from agentcluster.testing import eventually, wait_until
from store_contract import StoreContract

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEPS_SCRIPT = ROOT / "scripts" / "ci-system-deps.sh"


def _ensure_etcd() -> None:
    if shutil.which("etcd") is not None:
        return
    if os.geteuid() == 0:
        subprocess.run(["bash", str(DEPS_SCRIPT)], check=False, timeout=600)
    if shutil.which("etcd") is None:
        pytest.fail(
            "the etcd binary is missing: install Debian's etcd-server package "
            f"(run {DEPS_SCRIPT.relative_to(ROOT)} as root)"
        )


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    _ensure_etcd()
    cluster = EtcdCluster(3)
    asyncio.run(cluster.start())
    try:
        yield cluster
    finally:
        asyncio.run(cluster.stop())


@asynccontextmanager
async def fresh_cluster() -> AsyncIterator[EtcdCluster]:
    _ensure_etcd()
    async with EtcdCluster(3) as cluster:
        yield cluster


class TestEtcdStore(StoreContract):
    """The whole store contract, on the shared 3-member cluster."""

    carries_surrogate_keys = True
    short_ttl = 2.0  # etcd's minimum TTL with a 1000 ms election timeout
    lock_ttl = 3.0
    settle_timeout = 10.0  # etcd checks lease expiry every 500 ms

    @pytest.fixture(autouse=True)
    def _use_cluster(self, etcd_cluster: EtcdCluster) -> None:
        self.endpoints = etcd_cluster.endpoints

    async def make_store(self) -> Store:
        return await EtcdStore.connect(self.endpoints)


async def _endpoints_starting_with(cluster: EtcdCluster, *, leader: bool) -> list[str]:
    """The cluster's endpoints, the leader's (or a follower's) first."""
    lead = await cluster.leader()
    first = lead if leader else next(m for m in cluster.members if m is not lead)
    return [first.endpoint] + [m.endpoint for m in cluster.members if m is not first]


async def _next_events(
    events: AsyncIterator[WatchEvent], n: int, timeout: float = 10.0
) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await anext(events))
    return out


# -- the harness --------------------------------------------------------------------------


def test_missing_binary_names_the_package_and_the_script() -> None:
    with pytest.raises(EtcdNotInstalled) as info:
        EtcdCluster(1, binary="etcd-that-does-not-exist")
    assert "etcd-server" in str(info.value)
    assert "scripts/ci-system-deps.sh" in str(info.value)


async def test_cluster_members_die_with_a_killed_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: SIGKILL the process that started etcd, and etcd goes too."""
    _ensure_etcd()
    script = textwrap.dedent(
        """
        import asyncio, sys
        from agentcluster.store._etcd_cluster import EtcdCluster

        async def main():
            cluster = await EtcdCluster(1, workdir=sys.argv[1]).start()
            print(" ".join(str(m.proc.pid) for m in cluster.members), flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert parent.stdout is not None
    async with asyncio.timeout(30):
        line = await parent.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert pids and all(_alive(pid) for pid in pids)
    parent.kill()
    await parent.wait()
    await wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped by init


async def test_harness_kill_and_restart_keep_data() -> None:
    async with fresh_cluster() as cluster:
        assert len(cluster.endpoints) == 3 and len(set(cluster.endpoints)) == 3
        async with await EtcdStore.connect(cluster.endpoints) as store:
            rev = await store.put("harness/k", b"v")
            victim = cluster.members[0]
            await cluster.kill(victim.name)
            assert not victim.running
            assert not await cluster.healthy(victim.name)
            await cluster.restart(victim.name)
            assert victim.running and victim.restarts == 1
        # The restarted member serves the write it had before the crash, from its own disk.
        async with await EtcdStore.connect([victim.endpoint]) as alone:
            kv = await alone.get("harness/k")
            assert kv is not None and kv.mod_revision == rev
    assert all(m.proc is not None and m.proc.poll() is not None for m in cluster.members)


# -- client behaviour on the shared cluster ------------------------------------------------


async def test_connect_fails_fast_when_nothing_listens() -> None:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await EtcdStore.connect(["127.0.0.1:1", "http://127.0.0.1:2"], timeout=1.0)
    assert time.monotonic() - start < 3.0


async def test_endpoint_forms_and_validation(etcd_cluster: EtcdCluster) -> None:
    urls = [m.client_url for m in etcd_cluster.members]
    async with await EtcdStore.connect(urls) as store:
        assert store.endpoints == etcd_cluster.endpoints
        with pytest.raises(InvalidCommand, match="must not be empty"):
            await store.put("", b"x")  # refused before it is sent, as on every backend
        # etcd's own refusals (invalid arguments) are InvalidCommand too.
        with pytest.raises(InvalidCommand, match=r"etcd rejected the request: .*too large"):
            await store.put("big", b"x" * (1600 << 10))
        assert await store.get("big") is None
    with pytest.raises(ValueError, match="mix http:// and https://"):
        EtcdStore([urls[0], "https://127.0.0.1:2379"])
    with pytest.raises(ValueError, match="at least one endpoint"):
        EtcdStore([])


async def test_lease_ttl_is_whole_seconds_rounded_up(etcd_cluster: EtcdCluster) -> None:
    async with await EtcdStore.connect(etcd_cluster.endpoints) as store:
        short = await store.lease_grant(0.2)
        odd = await store.lease_grant(2.5)
        try:
            # etcd raises a TTL to its minimum (2 s with a 1000 ms election timeout).
            assert short.ttl == 2.0
            assert odd.ttl == 3.0
            assert await store.lease_keepalive(odd.id) == 3.0
        finally:
            await store.lease_revoke(short.id)
            await store.lease_revoke(odd.id)
        with pytest.raises(LeaseNotFound):
            await store.lease_keepalive(short.id)
        with pytest.raises(LeaseNotFound):
            await store.put("lease-ttl/k", b"v", lease=short.id)


async def test_utf8_keys_and_prefix_ranges(etcd_cluster: EtcdCluster) -> None:
    async with await EtcdStore.connect(etcd_cluster.endpoints) as store:
        for key in ("utf/é", "utf/éa", "utf/f", "utf0", "utf/ÿ/x"):
            await store.put(key, key.encode())
        got = await store.range("utf/é")
        assert [kv.key for kv in got.kvs] == ["utf/é", "utf/éa"]
        assert [kv.key for kv in (await store.range("utf/")).kvs] == [
            "utf/f",
            "utf/é",
            "utf/éa",
            "utf/ÿ/x",
        ]
        assert await store.delete("utf/", prefix=True) == 4
        assert (await store.get("utf0")) is not None


async def test_a_page_over_the_clients_receive_limit_is_read_in_smaller_pages(
    etcd_cluster: EtcdCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client takes answers up to 256 MiB; lowered to 1 MiB here so that 2 MiB of values
    # cross it. An answer over it must read as ReplyTooLarge (page it), not a bare failure:
    # range_pages then halves the page instead of giving up on the listing.
    from agentcluster.store import ReplyTooLarge
    from agentcluster.store import etcd as etcd_module

    options = [o for o in etcd_module._CHANNEL_OPTIONS if o[0] != "grpc.max_receive_message_length"]
    monkeypatch.setattr(
        etcd_module, "_CHANNEL_OPTIONS", [*options, ("grpc.max_receive_message_length", 1 << 20)]
    )
    async with await EtcdStore.connect(etcd_cluster.endpoints) as store:
        for i in range(5):
            await store.put(f"bigpage/{i}", b"x" * (400 << 10))
        try:
            with pytest.raises(ReplyTooLarge, match="page"):
                await store.range("bigpage/")
            pages = [page async for page in store.range_pages("bigpage/")]
            keys = [kv.key for page in pages for kv in page.kvs]
            assert keys == [f"bigpage/{i}" for i in range(5)]
            assert all(len(kv.value) == 400 << 10 for page in pages for kv in page.kvs)
        finally:
            await store.delete("bigpage/", prefix=True)


async def test_watch_from_a_compacted_revision_raises_compacted(
    etcd_cluster: EtcdCluster,
) -> None:
    async with await EtcdStore.connect(etcd_cluster.endpoints) as store:
        first = await store.put("compact/a", b"1")
        await store.put("compact/a", b"2")
        last = await store.put("compact/a", b"3")
        await store.compact(last)
        async with store.watch("compact/", start_revision=first) as events:
            with pytest.raises(Compacted) as info:
                await anext(events)
        assert info.value.requested == first
        assert info.value.oldest == last
        # History from the compaction point on is still there.
        async with store.watch("compact/", start_revision=last) as events:
            (event,) = await _next_events(events, 1)
            assert event.kv.value == b"3" and event.revision == last


async def test_close_ends_open_watches(etcd_cluster: EtcdCluster) -> None:
    store = await EtcdStore.connect(etcd_cluster.endpoints)
    async with store.watch("closing/") as events:
        waiter = asyncio.ensure_future(anext(events))
        await store.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiter, 5.0)
    with pytest.raises(StoreUnavailable):
        await store.get("closing/x")


# -- failover -------------------------------------------------------------------------------


async def test_failover_when_the_clients_member_dies() -> None:
    """kill -9 the member the client talks to: every later call succeeds through the others."""
    async with fresh_cluster() as cluster:
        endpoints = await _endpoints_starting_with(cluster, leader=False)
        async with await EtcdStore.connect(endpoints) as store:
            before = await store.put("fo/before", b"1")
            assert store.current_endpoint == endpoints[0]
            await cluster.kill(endpoints[0])
            # Until the client's connection has seen the member's socket close, a put goes
            # out on it and fails as "Stream removed": its outcome unknown, so (rightly) an
            # error for a write. Once it has, calls fail over before anything is sent.
            channel = store._endpoints[0].channel
            await wait_until(
                lambda: channel.get_state() != grpc.ChannelConnectivity.READY, timeout=10
            )
            revisions = [await store.put(f"fo/{i:02d}", b"x") for i in range(20)]
            assert revisions == sorted(revisions) and revisions[0] > before
            assert store.current_endpoint != endpoints[0]
            assert len((await store.range("fo/")).kvs) == 21
            assert (await store.txn([], [PutOp("fo/txn", b"t")])).succeeded
            lease = await store.lease_grant(5)
            assert await store.lease_keepalive(lease.id) == 5.0
            await store.lease_revoke(lease.id)


async def test_leader_kill_loses_no_acknowledged_write() -> None:
    """kill -9 the leader the client talks to: writes resume after the election, and every
    write that was acknowledged is there afterwards."""
    async with fresh_cluster() as cluster:
        endpoints = await _endpoints_starting_with(cluster, leader=True)
        async with await EtcdStore.connect(endpoints, timeout=2.0) as store:
            acked: dict[str, int] = {}
            for i in range(10):
                acked[f"lk/{i:03d}"] = await store.put(f"lk/{i:03d}", b"x")
            await cluster.kill(endpoints[0])
            killed_at = time.monotonic()
            first_ok: float | None = None
            i = 10
            while len(acked) < 40:
                key = f"lk/{i:03d}"
                i += 1
                try:
                    acked[key] = await store.put(key, b"x")
                except StoreUnavailable:
                    continue  # outcome unknown: not counted as acknowledged
                if first_ok is None:
                    first_ok = time.monotonic() - killed_at
            assert first_ok is not None and first_ok < 10.0
            kvs = {kv.key: kv for kv in (await store.range("lk/")).kvs}
            for key, revision in acked.items():
                assert key in kvs and kvs[key].mod_revision == revision


async def test_calls_raise_unavailable_without_quorum_and_recover() -> None:
    async with (
        fresh_cluster() as cluster,
        await EtcdStore.connect(cluster.endpoints, timeout=1.5) as store,
    ):
        await store.put("q/a", b"1")
        await cluster.kill(1)
        await cluster.kill(2)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.put("q/b", b"2")
        with pytest.raises(StoreUnavailable):
            await store.get("q/a")
        assert time.monotonic() - start < 6.0
        await cluster.restart(1)
        await eventually(lambda: _put_ok(store, "q/c"), timeout=15.0)
        kv = await store.get("q/c")
        assert kv is not None and kv.value == b"3"


async def _put_ok(store: EtcdStore, key: str) -> bool:
    try:
        await store.put(key, b"3")
    except StoreUnavailable:
        return False
    return True


# -- watches across a member kill ------------------------------------------------------------


@pytest.mark.parametrize("victim", ["follower", "leader"])
async def test_watch_survives_the_kill_of_its_member(victim: str) -> None:
    """Write N keys across the kill of the watcher's member: the watcher sees all N, each
    exactly once, in revision order, and then the next write (nothing repeated between)."""
    n = 40
    async with fresh_cluster() as cluster:
        watch_endpoints = await _endpoints_starting_with(cluster, leader=victim == "leader")
        write_endpoints = watch_endpoints[1:] + watch_endpoints[:1]
        async with (
            await EtcdStore.connect(watch_endpoints) as watcher,
            # A write stuck on a follower of the dead leader is given up after 2 s.
            await EtcdStore.connect(write_endpoints, timeout=2.0) as writer,
            watcher.watch("ws/") as events,
        ):
            for i in range(n // 2):
                await writer.put(f"ws/{i:03d}", b"v")
            await cluster.kill(watch_endpoints[0])
            for i in range(n // 2, n):
                await _create_once(writer, f"ws/{i:03d}")
            await _create_once(writer, "ws/marker")
            got = await _next_events(events, n + 1, timeout=20.0)
        assert [e.kv.key for e in got] == [f"ws/{i:03d}" for i in range(n)] + ["ws/marker"]
        revisions = [e.revision for e in got]
        assert revisions == sorted(set(revisions))
        assert all(e.type == "put" for e in got)


async def _create_once(store: EtcdStore, key: str) -> None:
    """Create ``key`` exactly once even when a try's outcome is unknown (create-only CAS)."""
    async with asyncio.timeout(20):
        while True:
            try:
                result = await store.cas(key, b"v", expected_revision=0)
            except StoreUnavailable:
                continue
            assert result.succeeded or result.results[0], f"{key} neither created nor there"
            return
