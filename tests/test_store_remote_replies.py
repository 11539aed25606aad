"""Replies of the store's ``kv`` requests stay within a frame: event batches are cut by size at
revision boundaries, a range too large for one reply is a clear error and is read in pages, and a remote watch on a
quiet prefix keeps up with the history (real in-process node on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from agentcluster.config import NodeConfig
from agentcluster.control import _fit_replies
from agentcluster.node import Node
from agentcluster.store._kv_wire import (
    MAX_REPLY_BYTES,
    KvReply,
    KvRequest,
    ReplyTooLarge,
    _cut_events,
)
from agentcluster.store.base import KeyValue, WatchEvent
from agentcluster.store.remote import RemoteStore
from agentcluster.testing import wait_until

KiB = 1 << 10


def _ev(revision: int, size: int, key: str = "k") -> WatchEvent:
    return WatchEvent("put", KeyValue(key, b"x" * size, revision, revision, 1))


@pytest.mark.parametrize(
    ("rule", "events", "kept"),
    [
        ("small batches go whole", [_ev(r, 10) for r in range(1, 6)], 5),
        (
            "cut once 1 MiB is reached, at a revision boundary",
            [_ev(r, 300 * KiB) for r in range(1, 9)],
            4,
        ),
        (
            "a revision is never split",
            [_ev(1, 600 * KiB), _ev(2, 300 * KiB, "a"), _ev(2, 300 * KiB, "b"), _ev(3, 10)],
            3,
        ),
        ("one big revision goes alone", [_ev(1, 3000 * KiB), _ev(2, 10)], 1),
        ("never past a frame: the big one waits", [_ev(1, 900 * KiB), _ev(2, 3500 * KiB)], 1),
        ("at most 1,000 events", [_ev(r, 1) for r in range(1, 1500)], 1000),
    ],
)
def test_event_batches_are_cut_by_count_and_size(
    rule: str, events: list[WatchEvent], kept: int
) -> None:
    assert _cut_events(events) == events[:kept], rule


def test_a_revision_too_large_for_a_reply_is_refused_by_name() -> None:
    events = [_ev(7, 2 * MAX_REPLY_BYTES // 3, "a"), _ev(7, 2 * MAX_REPLY_BYTES // 3, "b")]
    with pytest.raises(ReplyTooLarge, match="revision 7"):
        _cut_events(events)


@contextlib.asynccontextmanager
async def one_node() -> AsyncIterator[Node]:
    node = Node(
        NodeConfig(name="n1", bind="127.0.0.1:0", store_voters=["n1"], preset="local"),
        vitals=False,
    )
    await node.start()
    try:
        host = node.store_host
        assert host is not None and host.member is not None
        member = host.member
        await wait_until(lambda: member.shell.is_leader and member.leading, timeout=10)
        yield node
    finally:
        await node.stop(leave=False)


async def test_a_remote_watch_on_a_quiet_prefix_keeps_up_with_the_history() -> None:
    # Its empty long-polls say up to which revision they are complete; resuming after it,
    # the watch never asks for history that writes elsewhere have trimmed (Compacted).
    async with one_node() as node:
        member = node.store_host.member  # type: ignore[union-attr]
        member.kv.max_events = 8
        store = RemoteStore([node.addr], keyring=None, timeout=2.0, poll=0.05)
        try:
            seen: list[str] = []

            async def watch() -> None:
                async with store.watch("q/") as events:
                    async for ev in events:
                        seen.append(ev.kv.key)
                        return

            task = asyncio.create_task(watch())
            for i in range(40):  # far more than the 8 revisions of history kept
                await store.put(f"other/{i}", b"x")
            await store.put("q/x", b"1")
            await asyncio.wait_for(task, 10)
            assert seen == ["q/x"]
        finally:
            await store.close()


async def test_a_remote_watch_replays_megabytes_of_history() -> None:
    async with one_node() as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0, poll=0.05)
        try:
            start = await store.revision() + 1
            for i in range(0, 160, 40):  # 160 x 32 KiB: 5 MiB, over a frame
                await asyncio.gather(
                    *(store.put(f"w/{j}", b"x" * (32 * KiB)) for j in range(i, i + 40))
                )
            seen: list[int] = []

            async def watch() -> None:
                async with store.watch("w/", start_revision=start) as events:
                    async for ev in events:
                        seen.append(ev.revision)
                        if len(seen) == 160:
                            return

            await asyncio.wait_for(watch(), 20)
            assert seen == sorted(set(seen))
        finally:
            await store.close()


async def test_a_range_too_large_for_a_reply_is_a_clear_error() -> None:
    async with one_node() as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0)
        try:
            for key in ("r/a", "r/b"):
                await store.put(key, b"x" * (2500 * KiB))
            with pytest.raises(ReplyTooLarge, match="read it in pages"):
                await store.range("r/")
            assert [kv.key for kv in (await store.range("r/", limit=1)).kvs] == ["r/a"]
            assert (await store.get("r/b")) is not None  # the node is fine
        finally:
            await store.close()


async def test_a_range_too_large_for_a_reply_is_read_in_pages() -> None:
    # Two pages of one 2.5 MiB key each: range_pages asks for both keys, is refused, asks
    # for one, then for the next one from where the first page ended.
    async with one_node() as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0)
        try:
            for key in ("r/a", "r/b", "s"):
                await store.put(key, b"x" * (2500 * KiB))
            pages = [page async for page in store.range_pages("r/", page=2)]
            assert [[kv.key for kv in page.kvs] for page in pages] == [["r/a"], ["r/b"]]
            assert [page.more for page in pages] == [True, False]
            assert len(pages[1].kvs[0].value) == 2500 * KiB
        finally:
            await store.close()


def test_replies_too_large_together_turn_the_largest_reads_into_errors() -> None:
    reqs = [KvRequest("get", key="a"), KvRequest("cmd", b"w"), KvRequest("get", key="b")]
    big = KvReply(True, b"x" * (2500 * KiB))
    fitted = _fit_replies(reqs, [big, KvReply(True, b"rev"), big])
    assert fitted[1] == KvReply(True, b"rev")  # the write keeps its answer
    assert [r.ok for r in fitted].count(False) == 1
    refused = next(r for r in fitted if not r.ok)
    assert (refused.error, refused.n) == ("too_large", 1) and "with the others" in refused.message
    assert _fit_replies(reqs[:1], [big]) == [big]  # one that fits alone is left alone


async def test_a_write_batched_with_big_reads_keeps_its_answer_and_the_reads_theirs() -> None:
    # Two 2.5 MiB reads and a put, sent together: their replies do not fit in one frame. The
    # put is answered (not "outcome unknown"), and the reads are resent alone and answered.
    async with one_node() as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0)
        try:
            for key in ("b/1", "b/2"):
                await store.put(key, b"x" * (2500 * KiB))
            one, two, rev = await asyncio.gather(
                store.get("b/1"), store.get("b/2"), store.put("small", b"v")
            )
            assert one is not None and two is not None and len(one.value) == 2500 * KiB
            assert rev > 0 and (await store.get("small")) is not None
        finally:
            await store.close()


def test_a_revision_too_large_with_its_previous_values_goes_without_them() -> None:
    # An overwrite carries the old value too: each write fits, the event with both may not.
    old = KeyValue("k", b"a" * (MAX_REPLY_BYTES * 3 // 5), 1, 1, 1)
    new = KeyValue("k", b"b" * (MAX_REPLY_BYTES * 3 // 5), 1, 2, 2)
    events = [WatchEvent("put", new, old), _ev(3, 10)]
    assert _cut_events(events) == [WatchEvent("put", new, None)]


async def test_a_remote_watch_passes_an_overwrite_of_a_big_value() -> None:
    async with one_node() as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0, poll=0.05)
        try:
            big = MAX_REPLY_BYTES * 3 // 5
            r1 = await store.put("bw/k", b"a" * big)
            r2 = await store.put("bw/k", b"b" * big)
            r3 = await store.put("bw/small", b"after")
            seen: list[tuple[int, bool]] = []

            async def watch() -> None:
                async with store.watch("bw/", start_revision=r1) as events:
                    async for ev in events:
                        seen.append((ev.revision, ev.prev is not None))
                        if ev.revision == r3:
                            return

            await asyncio.wait_for(watch(), 20)
            assert seen == [(r1, False), (r2, False), (r3, False)]
        finally:
            await store.close()


async def test_a_remote_watch_too_large_to_serve_fails_by_name_instead_of_stalling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The member's ReplyTooLarge is an answer: the entry node must pass it on, not fail
    # the request (the client took that for a dead node and polled again, for ever).
    from agentcluster.store import raft as raft_module

    def too_large(events: list[WatchEvent]) -> list[WatchEvent]:
        raise ReplyTooLarge("revision 2 holds more than a reply of events")

    async with one_node() as node:
        store = RemoteStore([node.addr], keyring=None, timeout=5.0, poll=0.05)
        try:
            first = await store.put("tl/a", b"1")
            monkeypatch.setattr(raft_module, "_cut_events", too_large)
            await store.put("tl/b", b"2")

            async def watch() -> None:
                async with store.watch("tl/", start_revision=first) as events:
                    async for _ in events:
                        pass

            with pytest.raises(ReplyTooLarge, match="revision 2"):
                await asyncio.wait_for(watch(), 10)
        finally:
            await store.close()
