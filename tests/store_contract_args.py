"""The store contract's refusals: what every backend must refuse, and how.

Theory of operation: :class:`RefusalContract` is a base of
:class:`store_contract.StoreContract`, so every backend runs these too. A request one backend
refuses must be refused by all, with the same exception -- else code tested on the memory
store fails on etcd in production (the rules are in ``agentcluster.store._checks``). Each test
also checks that a refused request left nothing behind. ``carries_surrogate_keys`` is the one
knob: only the etcd backend carries keys that are not valid Unicode text (how it spells keys
another etcd client wrote as bytes that are not UTF-8).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from agentcluster.store import (
    Compare,
    DeleteOp,
    GetOp,
    InvalidCommand,
    PutOp,
    ReplyTooLarge,
    Store,
)
from agentcluster.store.base import MAX_KEY_LENGTH, MAX_LEASE_TTL, MAX_TXN_OPS

MiB = 1 << 20

__all__ = ["RefusalContract"]


class RefusalContract:
    carries_surrogate_keys: bool = False
    ns: str = ""

    def open_store(self) -> AbstractAsyncContextManager[Store]:
        raise NotImplementedError  # StoreContract's

    def key(self, name: str) -> str:
        raise NotImplementedError  # StoreContract's

    async def test_an_empty_key_and_a_negative_start_revision_are_refused(self) -> None:
        # As etcd answers them ("key is not provided"; a watch from before revision 0);
        # "" is a prefix (every key) only where a call takes a prefix.
        async with self.open_store() as store:
            k = self.key("keep")
            await store.put(k, b"1")
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.delete(""),
                lambda: store.get(""),
                lambda: store.put("", b"1"),
                lambda: store.txn([], [GetOp("")]),
                lambda: store.txn([], [DeleteOp("")]),
                lambda: store.txn([], [], [PutOp("", b"1")]),
                lambda: store.txn([Compare("", "version", "==", 0)], []),
            ]
            for call in calls:
                with pytest.raises(InvalidCommand, match="must not be empty"):
                    await call()
            with pytest.raises(InvalidCommand, match="start_revision"):
                async with store.watch(self.key(""), start_revision=-1):
                    pass
            assert (await store.get(k)) is not None  # nothing was deleted

    async def test_a_txn_branch_may_write_a_key_only_once(self) -> None:
        # etcd's rule ("duplicate key given in txn request"), on every backend: refused
        # whole, nothing written, the store still answers.
        async with self.open_store() as store:
            a, b, p = self.key("dup/a"), self.key("dup/b"), self.key("dup/")
            await store.put(a, b"0")
            for ops in (
                [PutOp(a, b"1"), PutOp(a, b"2")],
                [PutOp(a, b"1"), DeleteOp(a)],
                [DeleteOp(a), PutOp(a, b"1")],
                [PutOp(a, b"1"), DeleteOp(p, prefix=True)],
            ):
                with pytest.raises(InvalidCommand):
                    await store.txn([], ops)
                with pytest.raises(InvalidCommand):  # the failure branch is checked too
                    await store.txn([Compare(a, "value", "==", b"never")], [], ops)
            assert (await store.get(a)).value == b"0"  # type: ignore[union-attr]
            fine = await store.txn([], [PutOp(a, b"1"), PutOp(b, b"1"), GetOp(a), GetOp(a)])
            assert fine.succeeded
            split = await store.txn(
                [Compare(a, "value", "==", b"1")], [PutOp(a, b"2")], [DeleteOp(a)]
            )
            assert split.succeeded  # one write per branch is fine
            twice = await store.txn([], [DeleteOp(b), DeleteOp(b), DeleteOp(p, prefix=True)])
            assert twice.succeeded and await store.get(a) is None  # deleting twice is fine

    async def test_keys_over_the_length_limit_are_refused_by_every_call(self) -> None:
        # One rule on every backend (etcd alone would take them): code that runs on the
        # memory store in tests runs on etcd in production, and the other way round.
        async with self.open_store() as store:
            fits = self.key("k").ljust(MAX_KEY_LENGTH, "x")
            long = fits + "x"
            await store.put(fits, b"1")
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.put(long, b"1"),
                lambda: store.get(long),
                lambda: store.delete(long),
                lambda: store.delete(long, prefix=True),
                lambda: store.range(long),
                lambda: store.range(self.key(""), start=long + "x"),  # a start may be 8,193
                lambda: store.txn([], [PutOp(long, b"1")]),
                lambda: store.txn([], [], [DeleteOp(long)]),
                lambda: store.txn([Compare(long, "version", "==", 0)], []),
                lambda: store.txn([], [GetOp(long, prefix=True)]),
            ]
            for call in calls:
                with pytest.raises(InvalidCommand, match="at most 8,192"):
                    await call()
            with pytest.raises(InvalidCommand, match="at most 8,192"):
                async with store.watch(long):
                    pass
            page = await store.range(self.key(""))
            assert [kv.key for kv in page.kvs] == [fits]  # nothing else was written
            assert (await store.get(fits)).value == b"1"  # type: ignore[union-attr]

    async def test_pages_go_past_a_key_of_the_longest_length(self) -> None:
        # next_start after such a key is one character longer than any key: still a start.
        async with self.open_store() as store:
            prefix = self.key("p/")
            longest = prefix + "a" * (MAX_KEY_LENGTH - len(prefix))
            await store.put(longest, b"1")
            await store.put(prefix + "b", b"2")
            first = await store.range(prefix, limit=1)
            assert first.next_start is not None and len(first.next_start) == MAX_KEY_LENGTH + 1
            rest = await store.range(prefix, start=first.next_start)
            assert [kv.key for kv in rest.kvs] == [prefix + "b"]
            pages = [kv.key async for page in store.range_pages(prefix, page=1) for kv in page.kvs]
            assert pages == [longest, prefix + "b"]
            with pytest.raises(InvalidCommand, match="at most 8,192"):
                await store.range(prefix, start=first.next_start + "x")

    async def test_a_compare_against_a_value_of_the_wrong_type_is_refused(self) -> None:
        async with self.open_store() as store:
            k = self.key("k")
            await store.put(k, b"1")
            for cmp in (
                Compare(k, "value", "==", 1),
                Compare(k, "version", "==", b"1"),
                Compare(k, "create", ">", b""),
                Compare(k, "mod", "<", b"9"),
                Compare(k, "lease", "==", b"0"),
            ):
                with pytest.raises(InvalidCommand, match="needs"):
                    await store.txn([cmp], [PutOp(k, b"2")], [PutOp(k, b"3")])
            assert (await store.get(k)).value == b"1"  # type: ignore[union-attr]

    async def test_a_txn_holds_at_most_128_compares_or_operations_per_list(self) -> None:
        # etcd's default --max-txn-ops, counted per list as etcd counts them.
        async with self.open_store() as store:
            k = self.key("k")
            full = await store.txn(
                [Compare(k, "version", "==", 0)] * MAX_TXN_OPS,
                [PutOp(self.key(f"p/{i}"), b"") for i in range(MAX_TXN_OPS)],
                [GetOp(k)] * MAX_TXN_OPS,
            )
            assert full.succeeded and len(full.results) == MAX_TXN_OPS
            one_more = MAX_TXN_OPS + 1
            for compares, success, failure in (
                ([Compare(k, "version", "==", 0)] * one_more, [], []),
                ([], [PutOp(self.key(f"q/{i}"), b"") for i in range(one_more)], []),
                ([], [], [GetOp(k)] * one_more),
            ):
                with pytest.raises(InvalidCommand, match="at most 128"):
                    await store.txn(compares, success, failure)
            assert (await store.range(self.key("q/"))).kvs == []

    async def test_a_write_too_large_to_replicate_is_refused(self) -> None:
        # The embedded store's limit per write (3 MiB: a log entry travels in one frame);
        # etcd's is lower (1.5 MiB).
        async with self.open_store() as store:
            big = self.key("big")
            with pytest.raises(InvalidCommand):
                await store.put(big, b"x" * (3 * MiB + MiB // 2))
            with pytest.raises(InvalidCommand):
                await store.txn([], [PutOp(big, b"x" * (2 * MiB)), PutOp(big + "2", b"x" * MiB)])
            assert (await store.range(big)).kvs == []

    async def test_a_transaction_whose_reads_outgrow_a_reply_is_no_unknown_outcome(self) -> None:
        # Through a node, an answer travels in one frame (4 MiB): a transaction reading more
        # is ReplyTooLarge, as a range is -- and one that wrote says it was applied, never
        # "outcome unknown" (which a caller might answer by writing again). Elsewhere it
        # simply succeeds.
        async with self.open_store() as store:
            for i in range(5):
                await store.put(self.key(f"big/{i}"), bytes([65 + i]) * (MiB - 1024))
            reads = GetOp(self.key("big/"), prefix=True)
            try:
                result = await store.txn([], [reads])
                got = result.results[0]
                assert isinstance(got, list) and [len(kv.value) for kv in got] == [MiB - 1024] * 5
            except ReplyTooLarge:
                pass  # as a range over those keys is, through a node
            written = self.key("written")
            try:
                assert (await store.txn([], [PutOp(written, b"1"), reads])).succeeded
            except ReplyTooLarge as exc:
                assert "the transaction was applied at revision" in str(exc), exc
            assert (await store.get(written)).value == b"1"  # type: ignore[union-attr]

    async def test_a_lease_ttl_out_of_range_is_refused(self) -> None:
        async with self.open_store() as store:
            for ttl in (0, -1.0, math.inf, math.nan, MAX_LEASE_TTL * 1.01, 1e10):
                with pytest.raises(InvalidCommand, match="TTL"):
                    await store.lease_grant(ttl)
            with pytest.raises(TypeError, match="TTL"):
                await store.lease_grant("10")  # type: ignore[arg-type]
            longest = await store.lease_grant(MAX_LEASE_TTL)
            await store.lease_revoke(longest.id)

    async def test_a_lease_id_out_of_range_is_refused(self) -> None:
        # etcd grants positive signed 64-bit ids only; no lease can have another.
        async with self.open_store() as store:
            k = self.key("k")
            for bad in (-1, 2**63, 2**64):
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda bad=bad: store.lease_revoke(bad),  # type: ignore[misc]
                    lambda bad=bad: store.lease_keepalive(bad),  # type: ignore[misc]
                    lambda bad=bad: store.put(k, b"1", lease=bad),  # type: ignore[misc]
                    lambda bad=bad: store.txn([], [PutOp(k, b"1", bad)]),  # type: ignore[misc]
                ]
                for call in calls:
                    with pytest.raises(InvalidCommand, match="64-bit"):
                        await call()
            with pytest.raises(TypeError):
                await store.lease_revoke(1.5)  # type: ignore[arg-type]
            assert await store.get(k) is None

    async def test_range_limits_beyond_64_bits_or_not_an_int_are_refused(self) -> None:
        async with self.open_store() as store:
            with pytest.raises(InvalidCommand, match="below 2"):
                await store.range(self.ns, limit=2**64)
            for limit in (1.5, "2", True):
                with pytest.raises(TypeError, match="limit must be an int"):
                    await store.range(self.ns, limit=limit)  # type: ignore[arg-type]
            with pytest.raises(InvalidCommand, match="out of 64 bits"):
                await store.txn([Compare(self.key("k"), "mod", "<", 2**64)], [])

    async def test_a_key_that_is_not_valid_unicode_text(self) -> None:
        async with self.open_store() as store:
            k = self.key("s\udc80")
            if self.carries_surrogate_keys:
                await store.put(k, b"1")
                assert (await store.get(k)).key == k  # type: ignore[union-attr]
                assert await store.delete(k) == 1
                return
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.put(k, b"1"),
                lambda: store.get(k),
                lambda: store.delete(k),
                lambda: store.range(k),
                lambda: store.txn([], [PutOp(k, b"1")]),
            ]
            for call in calls:
                with pytest.raises(InvalidCommand, match="not valid Unicode text"):
                    await call()
            with pytest.raises(InvalidCommand, match="not valid Unicode text"):
                async with store.watch(k):
                    pass
            assert (await store.range(self.ns)).kvs == []
