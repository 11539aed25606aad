"""The coordination store from outside the cluster: over a node's authenticated control API.

Theory of operation: :class:`RemoteStore` sends each :class:`~agentcluster.store.raft.KvRequest`
to an *entry node* as a ``kv`` control request (sealed with the cluster keyring); the entry node
runs it through its own :class:`~agentcluster.store.raft.RaftStore`, which routes it to the
Raft leader, and returns the :class:`~agentcluster.store.raft.KvReply`. Several entry nodes may
be given: when one cannot be reached, the next is tried -- for a write only if the request
certainly never left (connection refused), since otherwise its outcome is unknown. Watches are
``events`` long-polls that resume from the last revision seen + 1, so a reconnect (or another
entry node) misses nothing. ``agentcluster kv`` and the consensus bench use this client.

Concurrent requests to one entry node are *batched*: the requests that arrive while the
node's connections are busy queue up and leave together in the next call, which the node runs
concurrently -- so the leader proposes them in one Raft batch (one fsync, one append per
follower) and one round trip carries them all; up to four calls are in flight, so batches
pipeline. A single sequential caller pays one loop turn for it (see :class:`_Batcher`).
Watches' long-polls use a connection of their own, so they never hold a batch back.

A call is one control frame (:data:`~agentcluster.control.MAX_CONTROL_FRAME`): a batch is cut
where the next request would overflow it, and a request too large to travel even alone is
refused before anything is sent (:class:`~agentcluster.store._kv.InvalidCommand`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Sequence

import msgspec

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.control import MAX_CONTROL_FRAME, ControlClient, ControlError
from agentcluster.store._kv import InvalidCommand
from agentcluster.store.base import StoreUnavailable
from agentcluster.store.raft import MAX_WRITE_BYTES, KvClient, KvReply, KvRequest
from agentcluster.wire import Keyring

__all__ = ["MAX_REQUEST_BYTES", "RemoteStore"]

_req_enc = msgspec.msgpack.Encoder()
_reply_dec = msgspec.msgpack.Decoder(KvReply)
_replies_dec = msgspec.msgpack.Decoder(list[KvReply])
_MAX_BATCH = 256
_PIPELINE = 4  # calls in flight per entry node (connections are opened only when needed)
# What a ``kv`` call's frame adds to its requests' bytes: the frame header and tag, the
# envelope, the list header (73 bytes in all today, with room to spare), and per request the
# header of its msgpack bin.
_FRAME_OVERHEAD = 256
_PER_REQUEST = 5
_MAX_CALL_BYTES = MAX_CONTROL_FRAME - _FRAME_OVERHEAD
MAX_REQUEST_BYTES = _MAX_CALL_BYTES - _PER_REQUEST
"""The largest encoded request a :class:`RemoteStore` can send (a write is further limited
to :data:`~agentcluster.store.raft.MAX_WRITE_BYTES` by the store itself)."""


def _encode(req: KvRequest) -> bytes:
    """``req`` as a ``kv`` call carries it, or InvalidCommand: it cannot travel (a number
    beyond 64 bits, or too large for a control frame even alone)."""
    try:
        raw = _req_enc.encode(req)
    except OverflowError as exc:
        raise InvalidCommand(f"the store request does not encode: {exc}") from None
    if len(raw) > MAX_REQUEST_BYTES:
        raise InvalidCommand(
            f"a store request of {len(raw):,} bytes exceeds the limit of "
            f"{MAX_REQUEST_BYTES:,} bytes per request to an entry node (a write may be at "
            f"most {MAX_WRITE_BYTES:,} bytes)"
        )
    return raw


def _take_batch(
    queue: list[tuple[bytes, float, asyncio.Future[KvReply]]],
) -> tuple[list[tuple[bytes, float, asyncio.Future[KvReply]]], int]:
    """The live requests at the head of ``queue`` that fit one call, and how many queue
    entries they used up (cancelled ones included). Never empty while a live request is
    queued: every request fits a call alone (see :func:`_encode`)."""
    batch: list[tuple[bytes, float, asyncio.Future[KvReply]]] = []
    size = 0
    taken = 0
    for entry in queue:
        if entry[2].done():  # its caller was cancelled: not sent
            taken += 1
            continue
        cost = len(entry[0]) + _PER_REQUEST
        if batch and (len(batch) == _MAX_BATCH or size + cost > _MAX_CALL_BYTES):
            break
        batch.append(entry)
        size += cost
        taken += 1
    return batch, taken


async def _call(client: ControlClient, reqs: list[bytes], timeout: float) -> list[KvReply]:
    """One ``kv`` call carrying ``reqs``; a reply per request, or ControlError /
    StoreUnavailable (a malformed answer)."""
    raw = await client.call("kv", {"reqs": reqs, "timeout": timeout}, timeout=timeout + 1)
    try:
        replies = _replies_dec.decode(raw) if isinstance(raw, bytes) else None
    except (msgspec.DecodeError, UnicodeDecodeError):
        replies = None
    if replies is None or len(replies) != len(reqs):
        raise StoreUnavailable(f"{client.addr} sent a malformed store reply")
    return replies


def _fail(batch: list[tuple[bytes, float, asyncio.Future[KvReply]]], exc: BaseException) -> None:
    for _, _, f in batch:
        if not f.done():
            f.set_exception(exc)


class _Batcher:
    """Coalesces concurrent requests to one entry node into ``kv`` calls, with up to
    ``len(clients)`` calls in flight (one per connection): while one batch commits, the next
    one forms and is already on its way -- Raft pipelines them.

    A caller that finds nothing queued and nothing in flight yields once before sending, so
    that every caller ready in the same loop turn (say, the clients a batch's replies just
    woke) joins it: they leave together as one call, one Raft batch. Still alone after that
    yield, it sends its request itself on the first connection (no hand-off to a worker: a
    sequential client pays one loop turn, not a task). Otherwise one worker task takes the
    whole queue."""

    def __init__(self, clients: Sequence[ControlClient]) -> None:
        self.clients = list(clients)
        self.addr = self.clients[0].addr
        self._queue: list[tuple[bytes, float, asyncio.Future[KvReply]]] = []
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._running = 0  # workers started and not finished (a count: checked per request)
        self._inline = False  # a caller is sending on clients[0] itself
        self._starting = False  # a worker was started and has not taken the queue yet

    def submit(self, req: KvRequest, timeout: float) -> Awaitable[KvReply]:
        """The reply to ``req``, to await: a future a worker resolves or, for a caller that
        may be alone, a coroutine (a plain function, so that a queued request -- every one
        under load -- costs no coroutine frame of its own)."""
        raw = _encode(req)  # before queueing: a request that cannot travel fails alone
        fut: asyncio.Future[KvReply] = asyncio.get_running_loop().create_future()
        entry = (raw, timeout, fut)
        queue = self._queue
        queue.append(entry)
        if len(queue) == 1 and not self._inline and not self._running:
            return self._first(entry)
        self._kick()
        return fut

    async def _first(self, entry: tuple[bytes, float, asyncio.Future[KvReply]]) -> KvReply:
        fut = entry[2]
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            fut.cancel()  # a worker skips it
            raise
        if self._queue == [entry] and not self._inline and not self._running:
            self._queue = []
            self._inline = True
            try:
                (reply,) = await _call(self.clients[0], [entry[0]], entry[1])
            finally:
                self._inline = False
                fut.cancel()  # never awaited: the reply came straight back
                if self._queue:
                    self._kick()  # callers that queued behind this one
            return reply
        self._kick()
        return await fut

    def _kick(self) -> None:
        """Start a worker on an idle connection, unless one is about to take the queue."""
        if self._starting or not self._queue:
            return
        # Batches use the connections after the first (all of them if there is just one).
        first = 1 if len(self.clients) > 1 else 0
        for k, client in enumerate(self.clients[first:], start=first):
            task = self._workers.get(k)
            if task is None or task.done():
                self._starting = True
                self._running += 1
                self._workers[k] = asyncio.get_running_loop().create_task(self._send_all(client))
                return

    async def _send_all(self, client: ControlClient) -> None:
        self._starting = False
        try:
            while self._queue:
                live, taken = _take_batch(self._queue)
                self._queue = self._queue[taken:]
                if not live:
                    continue
                if self._queue:
                    self._kick()  # more than one call's worth: another connection takes the rest
                timeout = max(t for _, t, _ in live)
                try:
                    replies = await _call(client, [r for r, _, _ in live], timeout)
                except (ControlError, StoreUnavailable) as exc:
                    _fail(live, exc)
                    continue
                except asyncio.CancelledError:
                    _fail(live, StoreUnavailable("the store is closed"))
                    raise
                except Exception as exc:
                    # Whatever went wrong, its callers must hear of it: a future left pending
                    # hangs its caller for good. The requests may have left: outcome unknown.
                    error = StoreUnavailable(f"{self.addr}: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                    _fail(live, error)
                    continue
                for (_, _, f), reply in zip(live, replies, strict=True):
                    if not f.done():
                        f.set_result(reply)
        finally:
            self._running -= 1

    async def close(self) -> None:
        workers, self._workers = list(self._workers.values()), {}
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._running = 0  # a worker cancelled before it started never counted itself out
        for _, _, f in self._queue:
            if not f.done():
                f.set_exception(StoreUnavailable("the store is closed"))
        self._queue.clear()
        for client in self.clients:
            await client.close()


def _check_seconds(what: str, value: float) -> None:
    # The node refuses a timeout that is no deadline (NaN, infinite) and stretches one of
    # zero: either would be a surprise found late, far from the caller's mistake.
    if not 0.0 < value < math.inf:
        raise ValueError(f"{what} must be a finite number of seconds > 0, not {value!r}")


class RemoteStore(KvClient):
    def __init__(
        self,
        nodes: Sequence[str],
        *,
        keyring: Keyring | None,
        timeout: float = 5.0,
        poll: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("RemoteStore needs at least one node address")
        _check_seconds("timeout", timeout)
        if not 0.0 <= poll < math.inf:
            raise ValueError(f"poll must be a finite number of seconds >= 0, not {poll!r}")
        self.nodes = list(nodes)
        self.keyring = keyring
        self.timeout = timeout
        self.poll = poll
        self._clock = clock or MonotonicClock()
        self._closed = False
        self._current = 0
        # Persistent connections per entry node (a TCP handshake per request would cost more
        # than the write itself on a LAN): one for batched requests, one for watch polls.
        self._batchers = {
            a: _Batcher(
                [ControlClient(a, keyring=keyring, timeout=timeout) for _ in range(_PIPELINE)]
            )
            for a in nodes
        }
        self._pollers = {a: ControlClient(a, keyring=keyring, timeout=timeout) for a in nodes}

    async def request(self, req: KvRequest, *, timeout: float | None = None) -> KvReply:
        # One coroutine from here to the batcher: every put passes through it.
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if timeout is None:
            timeout = self.timeout
        else:
            _check_seconds("timeout", timeout)
        write = req.op == "cmd"
        last: Exception | None = None
        for k in range(len(self.nodes)):
            addr = self.nodes[(self._current + k) % len(self.nodes)]
            try:
                if req.op == "events":
                    raw = await self._pollers[addr].call(
                        "kv", {"req": _encode(req), "timeout": timeout}, timeout=timeout + 1
                    )
                    if not isinstance(raw, bytes):
                        raise StoreUnavailable(f"{addr} sent a malformed store reply")
                    reply = _reply_dec.decode(raw)
                else:
                    batcher = self._batchers[addr]
                    reply = await batcher.submit(req, timeout)
                    if reply.error == "too_large" and reply.n == 1 and not write:
                        # Too large only with the rest of its batch: a read, so ask again
                        # alone (a write is never resent: it may have been applied).
                        (reply,) = await _call(batcher.clients[0], [_encode(req)], timeout)
            except ControlError as exc:
                last = exc
                if write and not exc.not_sent:
                    raise StoreUnavailable(
                        f"{addr}: {exc}; the write's outcome is unknown"
                    ) from exc
                continue
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise StoreUnavailable(f"{addr} sent a malformed store reply: {exc}") from exc
            self._current = (self._current + k) % len(self.nodes)
            return reply
        raise StoreUnavailable(f"no entry node answered: {last}")

    async def _call_events(self, req: KvRequest) -> KvReply:
        reply = await self.request(req, timeout=self.poll + self.timeout)
        return self._check_events(req, reply)

    async def close(self) -> None:
        self._closed = True
        for batcher in self._batchers.values():
            await batcher.close()
        for client in self._pollers.values():
            await client.close()

    def __repr__(self) -> str:
        return f"RemoteStore(nodes={self.nodes!r})"
