"""The etcd backend: :class:`~agentcluster.store.base.Store` over a real etcd v3 cluster.

Theory of operation: the client speaks etcd's v3 gRPC API through ``grpc.aio`` with the
generated stubs and messages that the ``aetcd`` package ships (``aetcd.rpc``); aetcd's own
``Client`` is not used, since it talks to one endpoint and its watcher neither resumes nor
reports compaction the way :class:`~agentcluster.store.base.Store` promises. Install with the
``etcd`` extra (``pip install 'agentcluster[etcd]'``).

**Endpoints and failover.** One channel per endpoint; every call goes to the *current*
endpoint and, when that fails with a transport-level error, the current endpoint moves on to
the next one (round robin). Each method has one overall deadline (``timeout`` of
:meth:`EtcdStore.connect`); within it a call is retried on the next endpoint only when that
cannot apply an operation twice:

* reads (get, range, revision, a transaction without writes) and keep-alives / revokes are
  retried on any transient error;
* writes (put, delete, a transaction with writes, lease grant) are retried only when the
  request provably never reached etcd's state machine: the connection could not be made
  (``failed to connect to all addresses``), or the member refused it up front because it
  has no leader (``etcdserver: no leader``; every call carries etcd's ``hasleader``
  metadata so an isolated member answers that at once instead of hanging) or is overloaded.
  Any other failure of a write (connection reset mid-call, ``request timed out``, deadline)
  raises :class:`StoreUnavailable`: the write may or may not have happened.

After a cycle over all endpoints fails, the client backs off 50 ms, doubling up to 500 ms.

**Mapping.** Keys are ``str`` encoded as UTF-8 (``surrogateescape``, so keys written by other
clients round-trip); a prefix is the range ``[prefix, prefix with its last byte + 1)``, and
the empty prefix is the whole key space (``[\\0, \\0)`` in etcd's notation). etcd's revision,
create/mod revision, version and lease map one to one. Compare targets value / version /
create / mod / lease map to etcd's; note etcd's rule that *any* comparison of the value of a
missing key is false. gRPC ``NOT_FOUND`` "lease not found" is :class:`LeaseNotFound`,
``INVALID_ARGUMENT`` a :class:`ValueError`, ``UNAVAILABLE`` / ``DEADLINE_EXCEEDED`` (after
retries) :class:`StoreUnavailable`.

**Leases.** etcd's TTLs are whole seconds: ``lease_grant(ttl)`` asks for ``ceil(ttl)``
(at least 1) and returns the TTL etcd granted, which may be longer: etcd raises every TTL to
its minimum, 1.5 election timeouts rounded up (2 s with the default 1000 ms election timeout).
etcd's lessor checks for expiry every 500 ms, so a lease ends up to half a second after its
TTL. A keep-alive is one round trip on a short-lived ``LeaseKeepAlive`` stream.

**Watches.** Each :meth:`EtcdStore.watch` owns one gRPC watch stream and a task that feeds
an unbounded queue. ``__aenter__`` returns once etcd confirmed the watch (so every write
after it is seen). The task remembers ``next`` = last delivered revision + 1 (or, for a
watch "from now on", the store revision at creation + 1); when the stream breaks -- the
member died, or cancelled the watch because it lost its leader -- it re-creates the watch on
the next endpoint with ``start_revision = next`` and drops anything below ``next``, so no
event is missed or repeated. All events of one revision (a transaction) arrive in one
response, which is what makes ``next`` a safe resume point. A start revision older than
etcd's compaction raises :class:`Compacted` from the iterator; so does a resume point that
was compacted while the watch was reconnecting. If no endpoint takes the watch back within
``timeout``, the iterator raises :class:`StoreUnavailable`.

TLS and authentication are not supported: endpoints are ``host:port`` or ``http://host:port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

try:
    import grpc
    from aetcd import rpc
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the etcd store backend needs the 'etcd' extra: pip install 'agentcluster[etcd]' "
        "(it brings aetcd, grpcio and protobuf)"
    ) from exc

from agentcluster.store.base import (
    Compacted,
    Compare,
    DeleteOp,
    GetOp,
    KeyValue,
    Lease,
    LeaseNotFound,
    PutOp,
    RangeResult,
    Store,
    StoreError,
    StoreUnavailable,
    TxnOp,
    TxnResult,
    WatchEvent,
)

__all__ = ["EtcdStore"]

T = TypeVar("T")

# etcd's clientv3 sets this on requests that must fail fast on a member without a leader.
_METADATA = (("hasleader", "true"),)

_CHANNEL_OPTIONS = [
    # A restarted member becomes usable again quickly (gRPC's default first backoff is 1 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Pings find a hung (stopped, partitioned) member under a quiet watch stream; etcd's
    # server refuses pings more often than every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]

# Failures that prove the request was not applied: safe to send again, writes included.
_UNSENT_PREFIXES = ("failed to connect to all addresses",)
_UNSENT_DETAILS = frozenset({"etcdserver: no leader", "etcdserver: too many requests"})

_TARGETS: dict[str, tuple[int, str]] = {
    "value": (rpc.Compare.VALUE, "value"),
    "version": (rpc.Compare.VERSION, "version"),
    "create": (rpc.Compare.CREATE, "create_revision"),
    "mod": (rpc.Compare.MOD, "mod_revision"),
    "lease": (rpc.Compare.LEASE, "lease"),
}
_RESULTS: dict[str, int] = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def _b(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def _s(key: bytes) -> str:
    return bytes(key).decode("utf-8", "surrogateescape")


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """``(key, range_end)`` covering every key that starts with ``prefix``."""
    key = _b(prefix)
    if not key:
        return b"\0", b"\0"
    end = bytearray(key)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return key, bytes(end[: i + 1])
    return key, b"\0"  # all 0xff: every key from ``key`` on


def _key_range(key: str, prefix: bool) -> tuple[bytes, bytes]:
    return _prefix_range(key) if prefix else (_b(key), b"")


def _kv(kv: Any) -> KeyValue:
    return KeyValue(
        key=_s(kv.key),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def _event(ev: Any, has_prev: bool) -> WatchEvent:
    prev = _kv(ev.prev_kv) if has_prev and ev.HasField("prev_kv") else None
    if ev.type == rpc.Event.DELETE:
        return WatchEvent(type="delete", kv=_kv(ev.kv), prev=prev)
    return WatchEvent(type="put", kv=_kv(ev.kv), prev=prev)


def _compare(cmp: Compare) -> Any:
    target, field = _TARGETS[cmp.target]
    msg = rpc.Compare(key=_b(cmp.key), target=target, result=_RESULTS[cmp.op])
    if cmp.target == "value":
        if not isinstance(cmp.value, bytes):
            raise TypeError(f"a value comparison needs bytes, got {type(cmp.value).__name__}")
    elif isinstance(cmp.value, bytes):
        raise TypeError(f"a {cmp.target} comparison needs an int, got bytes")
    setattr(msg, field, cmp.value)
    return msg


def _request_op(op: TxnOp) -> Any:
    if isinstance(op, PutOp):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=_b(op.key), value=op.value, lease=op.lease)
        )
    key, end = _key_range(op.key, op.prefix)
    if isinstance(op, DeleteOp):
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=end))
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=end))


def _op_result(resp: Any, revision: int) -> int | list[KeyValue]:
    which = resp.WhichOneof("response")
    if which == "response_put":
        return revision  # every write of a transaction happens at the transaction's revision
    if which == "response_delete_range":
        return int(resp.response_delete_range.deleted)
    if which == "response_range":
        return [_kv(kv) for kv in resp.response_range.kvs]
    raise StoreError(f"etcd answered a transaction operation with {which!r}")


def _details(err: Any) -> str:
    return str(err.details() or "")


def _unsent(err: Any) -> bool:
    details = _details(err)
    return details.startswith(_UNSENT_PREFIXES) or details in _UNSENT_DETAILS


def _permanent(err: Any) -> Exception | None:
    """The error to raise as is for a failure that another endpoint would not fix."""
    code, details = err.code(), _details(err)
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFound(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(f"etcd rejected the request: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details not in _UNSENT_DETAILS:
        return StoreError(f"etcd: {details}")  # e.g. "database space exceeded"
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ):
        return None
    return StoreError(f"etcd: {code.name}: {details}")


class _Endpoint:
    def __init__(self, target: str) -> None:
        self.target = target
        self.channel: Any = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.kv: Any = rpc.KVStub(self.channel)
        self.lease: Any = rpc.LeaseStub(self.channel)
        self.watch: Any = rpc.WatchStub(self.channel)


def _target(endpoint: str) -> str:
    endpoint = endpoint.strip()
    if endpoint.startswith("https://"):
        raise ValueError(f"TLS endpoints are not supported by the etcd backend: {endpoint!r}")
    endpoint = endpoint.removeprefix("http://").rstrip("/")
    if not endpoint:
        raise ValueError("empty etcd endpoint")
    return endpoint


class EtcdStore(Store):
    """A :class:`Store` over an etcd v3 cluster (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0) -> None:
        """Prefer :meth:`connect`, which also checks that the cluster answers."""
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        targets = [_target(e) for e in endpoints]
        if not targets:
            raise ValueError("the etcd backend needs at least one endpoint")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._timeout = timeout
        # Reads give up on one member after half the budget, so a hung member leaves time to
        # ask another; writes keep the whole budget (a retry is not theirs to make).
        self._read_attempt = max(0.5, timeout / 2)
        self._endpoints = [_Endpoint(t) for t in targets]
        self._current = 0
        self._closed = False
        self._watches: dict[int, _Watch] = {}

    @classmethod
    async def connect(cls, endpoints: Sequence[str], *, timeout: float = 5.0) -> EtcdStore:
        """A store over ``endpoints``; raises :class:`StoreUnavailable` when none answers a
        linearizable read within ``timeout``."""
        store = cls(endpoints, timeout=timeout)
        try:
            await store.revision()
        except BaseException:
            await store.close()
            raise
        return store

    async def __aenter__(self) -> EtcdStore:
        return self

    @property
    def endpoints(self) -> list[str]:
        return [ep.target for ep in self._endpoints]

    @property
    def current_endpoint(self) -> str:
        """The endpoint the next call goes to first."""
        return self._endpoints[self._current].target

    def _failover(self, index: int) -> None:
        # Only the first of several concurrent failures on one endpoint moves the cursor.
        if self._current == index:
            self._current = (index + 1) % len(self._endpoints)

    async def _call(
        self,
        what: str,
        attempt: Callable[[_Endpoint, float], Awaitable[T]],
        *,
        idempotent: bool,
    ) -> T:
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        delay = 0.05
        failures = 0
        reason = "no endpoint answered"
        while True:
            index = self._current
            endpoint = self._endpoints[index]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StoreUnavailable(f"{reason} (gave up after {self._timeout} s)")
            per_try = min(remaining, self._read_attempt) if idempotent else remaining
            try:
                return await attempt(endpoint, per_try)
            except grpc.aio.AioRpcError as err:
                permanent = _permanent(err)
                if permanent is not None:
                    raise permanent from err
                if self._closed:
                    raise StoreUnavailable("the etcd store is closed") from err
                self._failover(index)
                reason = f"{what} via {endpoint.target}: {err.code().name}: {_details(err)}"
                if not (idempotent or _unsent(err)):
                    raise StoreUnavailable(
                        f"{reason} (the write may or may not have happened)"
                    ) from err
            failures += 1
            if failures % len(self._endpoints) == 0:
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, 0.5)

    # -- key-value ---------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        request = rpc.RangeRequest(key=_b(key))

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Range(request, timeout=timeout, metadata=_METADATA)

        resp = await self._call("get", attempt, idempotent=True)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def range(self, prefix: str, *, limit: int = 0) -> RangeResult:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        key, end = _prefix_range(prefix)
        request = rpc.RangeRequest(key=key, range_end=end, limit=limit)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Range(request, timeout=timeout, metadata=_METADATA)

        resp = await self._call("range", attempt, idempotent=True)
        return RangeResult(
            kvs=[_kv(kv) for kv in resp.kvs],
            revision=int(resp.header.revision),
            more=bool(resp.more),
        )

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        request = rpc.PutRequest(key=_b(key), value=bytes(value), lease=lease)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Put(request, timeout=timeout, metadata=_METADATA)

        resp = await self._call("put", attempt, idempotent=False)
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        start, end = _key_range(key, prefix)
        request = rpc.DeleteRangeRequest(key=start, range_end=end)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.DeleteRange(request, timeout=timeout, metadata=_METADATA)

        resp = await self._call("delete", attempt, idempotent=False)
        return int(resp.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        request = rpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_request_op(op) for op in success],
            failure=[_request_op(op) for op in failure],
        )
        read_only = all(isinstance(op, GetOp) for op in (*success, *failure))

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Txn(request, timeout=timeout, metadata=_METADATA)

        resp = await self._call("txn", attempt, idempotent=read_only)
        revision = int(resp.header.revision)
        return TxnResult(
            succeeded=bool(resp.succeeded),
            revision=revision,
            results=[_op_result(r, revision) for r in resp.responses],
        )

    async def revision(self) -> int:
        # A linearizable count-only read of one key: etcd answers with the store revision.
        request = rpc.RangeRequest(key=b"\0", count_only=True)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Range(request, timeout=timeout, metadata=_METADATA)

        resp = await self._call("revision", attempt, idempotent=True)
        return int(resp.header.revision)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Drop the history before ``revision`` (etcd-specific; watches from older revisions
        then raise :class:`Compacted`)."""
        request = rpc.CompactionRequest(revision=revision, physical=physical)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Compact(request, timeout=timeout, metadata=_METADATA)

        try:
            await self._call("compact", attempt, idempotent=True)
        except StoreError as exc:
            # Compacting to a revision compacted already is what a retry can run into.
            if "compacted" not in str(exc):
                raise

    # -- leases ------------------------------------------------------------------------------

    async def lease_grant(self, ttl: float) -> Lease:
        if not ttl > 0:
            raise ValueError(f"a lease TTL must be positive, got {ttl}")
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.lease.LeaseGrant(request, timeout=timeout, metadata=_METADATA)

        resp = await self._call("lease grant", attempt, idempotent=False)
        if resp.error:
            raise StoreError(f"etcd refused the lease: {resp.error}")
        return Lease(id=int(resp.ID), ttl=float(resp.TTL))

    async def lease_keepalive(self, lease_id: int) -> float:
        request = rpc.LeaseKeepAliveRequest(ID=lease_id)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            call = ep.lease.LeaseKeepAlive(iter([request]), timeout=timeout, metadata=_METADATA)
            try:
                async for resp in call:
                    return resp
            finally:
                call.cancel()
            raise StoreUnavailable(f"keep-alive stream to {ep.target} closed without answer")

        resp = await self._call("lease keep-alive", attempt, idempotent=True)
        if resp.TTL <= 0:  # etcd's answer for a lease it does not know
            raise LeaseNotFound(f"lease {lease_id:x} not found")
        return float(resp.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease_id)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.lease.LeaseRevoke(request, timeout=timeout, metadata=_METADATA)

        # A retried revoke may find the lease gone already: that is the goal, not an error.
        with contextlib.suppress(LeaseNotFound):
            await self._call("lease revoke", attempt, idempotent=True)

    # -- watches -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(
        self, prefix: str, *, start_revision: int = 0
    ) -> AsyncIterator[AsyncIterator[WatchEvent]]:
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        if start_revision < 0:
            raise ValueError(f"start_revision must be >= 0, got {start_revision}")
        watch = _Watch(self, prefix, start_revision)
        self._watches[id(watch)] = watch
        try:
            await watch.start()
            yield watch
        finally:
            self._watches.pop(id(watch), None)
            await watch.stop()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches.values()):
            await watch.stop()
        self._watches.clear()
        for ep in self._endpoints:
            await ep.channel.close()


class _Watch:
    """One watch: a task that keeps a gRPC watch stream alive and feeds a queue."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._key, self._range_end = _prefix_range(prefix)
        self._next = start_revision  # 0 until etcd tells us the revision of "now"
        # None marks the end: the watch was closed (by its context or by the store).
        self._queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._ended = False
        self._created: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._healthy_since: float | None = None  # when the current stream was confirmed
        self._cancel_reason: str | None = None  # why etcd cancelled the current stream

    async def start(self) -> None:
        self._task = asyncio.create_task(self._main(), name=f"etcd-watch {self._prefix!r}")
        await asyncio.shield(self._created)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._queue.put_nowait(None)

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        if self._error is not None:
            raise self._error
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def _fail(self, error: BaseException) -> None:
        if not self._created.done():
            self._created.set_exception(error)
        else:
            self._queue.put_nowait(error)

    async def _main(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug must reach the consumer, not vanish with the task
            self._fail(exc)

    async def _run(self) -> None:
        store = self._store
        loop = asyncio.get_running_loop()
        broken_since = loop.time()
        delay = 0.05
        failures = 0
        while True:
            index = store._current
            endpoint = store._endpoints[index]
            self._healthy_since = None
            self._cancel_reason = None
            try:
                reason = await self._stream(endpoint)
            except grpc.aio.AioRpcError as err:
                permanent = _permanent(err)
                if permanent is not None:
                    self._fail(permanent)
                    return
                reason = f"{err.code().name}: {_details(err)}"
            except StoreError as exc:  # Compacted, or a watch etcd refused
                self._fail(exc)
                return
            store._failover(index)
            if self._healthy_since is not None:  # the stream worked: a fresh failure budget
                broken_since, delay, failures = loop.time(), 0.05, 0
            if loop.time() - broken_since >= store._timeout:
                self._fail(
                    StoreUnavailable(
                        f"watch on {self._prefix!r} lost and not re-established within "
                        f"{store._timeout} s (last: {endpoint.target}: {reason})"
                    )
                )
                return
            failures += 1
            if failures % len(store._endpoints) == 0:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _requests(self, create: Any) -> AsyncIterator[Any]:
        yield create
        # Hold the sending side open: the stream lives until we cancel it.
        await asyncio.Event().wait()

    async def _stream(self, endpoint: _Endpoint) -> str:
        """Run one watch stream until it breaks; returns why (or raises)."""
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=self._key,
                range_end=self._range_end,
                start_revision=self._next,
                prev_kv=True,
            )
        )
        call = endpoint.watch.Watch(self._requests(create), metadata=_METADATA)
        try:
            # A member that takes the stream but never confirms the watch (hung, stopped)
            # is given up after a read's budget; once confirmed, the stream may idle forever.
            async with asyncio.timeout(self._store._read_attempt) as confirm:
                async for resp in call:
                    if self._handle(resp, endpoint.target):
                        confirm.reschedule(None)
                    if self._cancel_reason is not None:
                        return self._cancel_reason
            return f"stream from {endpoint.target} ended"
        except TimeoutError:
            return f"{endpoint.target} did not confirm the watch in time"
        finally:
            call.cancel()

    def _handle(self, resp: Any, target: str) -> bool:
        """Take one watch response; True once the watch is confirmed."""
        if resp.compact_revision:
            raise Compacted(self._next, int(resp.compact_revision))
        if resp.created:
            if resp.canceled:
                raise StoreError(f"etcd refused the watch: {resp.cancel_reason}")
            if self._next == 0:
                self._next = int(resp.header.revision) + 1
            self._healthy_since = asyncio.get_running_loop().time()
            if not self._created.done():
                self._created.set_result(None)
            return True
        if resp.canceled:
            self._cancel_reason = f"cancelled by {target}: {resp.cancel_reason or 'no reason'}"
            return False
        floor = self._next
        top = floor - 1
        for ev in resp.events:
            revision = int(ev.kv.mod_revision)
            if revision >= floor:
                self._queue.put_nowait(_event(ev, has_prev=True))
                top = max(top, revision)
        self._next = top + 1
        return self._healthy_since is not None
