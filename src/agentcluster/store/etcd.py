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
the empty prefix is the whole key space (``[\\0, \\0)`` in etcd's notation); a range's
``start`` moves the range's first key up (etcd's ``key`` is inclusive, as ours is), and one
past the end gives etcd an empty range, answered at the current revision. etcd's revision,
create/mod revision, version and lease map one to one. Compare targets value / version /
create / mod / lease map to etcd's; note etcd's rule that *any* comparison of the value of a
missing key is false. gRPC ``NOT_FOUND`` "lease not found" is :class:`LeaseNotFound`,
``INVALID_ARGUMENT`` a :class:`ValueError`, ``UNAVAILABLE`` / ``DEADLINE_EXCEEDED`` (after
retries) :class:`StoreUnavailable`.

**Reply size.** This client takes answers of up to 256 MiB; a range over more is
:class:`~agentcluster.store.base.ReplyTooLarge` (read it in pages: ``Store.range_pages``).

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

**TLS and authentication.** Endpoints are ``host:port``, ``http://host:port`` or
``https://host:port`` (see :mod:`agentcluster.store._etcd_conn` for the rules). TLS takes
a CA file (else the system's roots), a client certificate and key for a cluster started with
``--client-cert-auth``, and ``server_name`` when the endpoints are addresses the server's
certificate does not name. With ``user`` and ``password`` the store authenticates once when it
connects and sends etcd's token with every call and stream. etcd forgets a token (its TTL,
``--auth-token-ttl``, runs out while the client is idle; a member restarts; the user's
password changes; with JWT tokens, which carry the auth store's revision, any change to users
or roles): a call refused for its token -- before anything was applied, so a write is safe
to send again -- authenticates anew and goes again; concurrent calls share one renewal and
its outcome, each waiting within its own deadline. A watch that a member cancels as it is
created ("invalid auth token", "revision of auth store is old", or "permission denied",
which is also etcd's word for a missing token) renews its token and re-creates itself; a
denial again with a fresh token raises :class:`EtcdAuthError`, as do
wrong credentials, a request the user has no permission for, and a cluster with
authentication on when the store has no credentials. Credentials against a cluster without
authentication are accepted and unused, as etcd's own client does, until a call is refused
for want of a token: then the store authenticates.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack

try:
    import grpc
    from aetcd import rpc
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the etcd store backend needs the 'etcd' extra: pip install 'agentcluster[etcd]' "
        "(it brings aetcd, grpcio and protobuf)"
    ) from exc

from agentcluster.store._checks import (
    check_delete_args,
    check_key,
    check_lease_id,
    check_put_args,
    check_range_args,
    check_ttl,
    check_txn_args,
    check_watch_args,
)
from agentcluster.store._etcd_conn import plan
from agentcluster.store._etcd_errors import (
    AUTH_OFF,
    NO_TOKEN,
    RENEWALS_PER_CALL,
    STALE_TOKEN,
    EtcdAuthError,
    consume,
    detail_text,
    final_error,
    unsent,
)
from agentcluster.store._etcd_map import (
    compare_msg,
    event_of,
    key_bytes,
    key_range,
    kv_of,
    op_result,
    prefix_range,
    request_op,
)
from agentcluster.store.base import (
    Compacted,
    Compare,
    GetOp,
    KeyValue,
    Lease,
    LeaseNotFound,
    RangeResult,
    Store,
    StoreError,
    StoreUnavailable,
    TxnOp,
    TxnResult,
    WatchEvent,
)

__all__ = ["EtcdAuthError", "EtcdOptions", "EtcdStore"]

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


class EtcdOptions(TypedDict, total=False):
    """The security options of :class:`EtcdStore` and :meth:`EtcdStore.connect`."""

    ca_file: str | Path | None
    cert_file: str | Path | None
    key_file: str | Path | None
    server_name: str | None
    user: str | None
    password: str | None


class _Endpoint:
    def __init__(self, target: str, credentials: Any, options: list[tuple[str, Any]]) -> None:
        self.target = target
        if credentials is None:
            self.channel: Any = grpc.aio.insecure_channel(target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.kv: Any = rpc.KVStub(self.channel)
        self.lease: Any = rpc.LeaseStub(self.channel)
        self.watch: Any = rpc.WatchStub(self.channel)
        self.auth: Any = rpc.AuthStub(self.channel)


class EtcdStore(Store):
    """A :class:`Store` over an etcd v3 cluster (see the module docstring)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        """Prefer :meth:`connect`, which also authenticates and checks that the cluster
        answers. ValueError for inconsistent or unreadable TLS options (see the module
        docstring) or a user without a password."""
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if (user is None) != (password is None):
            raise ValueError("etcd authentication needs both user and password")
        if user == "":
            raise ValueError("the etcd user name is empty")
        conn = plan(
            endpoints,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name=server_name,
            base_options=_CHANNEL_OPTIONS,
        )
        self.tls = conn.tls
        self._user = user
        self._password = password
        self._token: str | None = None
        self._metadata: tuple[tuple[str, str], ...] = _METADATA
        self._renewal: asyncio.Task[None] | None = None  # the one authentication under way
        self.authentications = 0  # tokens obtained (the first one included)
        self._timeout = timeout
        # Reads give up on one member after half the budget, so a hung member leaves time to
        # ask another; writes keep the whole budget (a retry is not theirs to make).
        self._read_attempt = max(0.5, timeout / 2)
        self._endpoints = [_Endpoint(t, conn.credentials, conn.options) for t in conn.targets]
        self._current = 0
        self._closed = False
        self._watches: dict[int, _Watch] = {}

    @classmethod
    async def connect(
        cls, endpoints: Sequence[str], *, timeout: float = 5.0, **options: Unpack[EtcdOptions]
    ) -> EtcdStore:
        """A store over ``endpoints`` (the options as for the constructor); raises
        :class:`StoreUnavailable` when no member answers within ``timeout`` -- a
        linearizable read, or, with credentials, the authentication (which etcd commits
        through its log, so a quorum answered; the user may not be allowed to read) -- and
        :class:`EtcdAuthError` when etcd refuses the credentials."""
        store = cls(endpoints, timeout=timeout, **options)
        try:
            if store._user is not None:
                await store._authenticate()
            if store._token is None:
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

    # -- authentication ----------------------------------------------------------------------

    async def _authenticate(self) -> None:
        """Get a token for the store's user (none when etcd has authentication off)."""
        assert self._user is not None and self._password is not None
        request = rpc.AuthenticateRequest(name=self._user, password=self._password)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.auth.Authenticate(request, timeout=timeout, metadata=_METADATA)

        try:
            resp = await self._call("authenticate", attempt, idempotent=True, renew=False)
        except StoreError as exc:
            if AUTH_OFF not in str(exc):
                raise
            token = None
        else:
            token = str(resp.token)
            self.authentications += 1
        self._token = token
        self._metadata = _METADATA if token is None else (*_METADATA, ("token", token))

    async def _renew(self, stale: str | None, err: Any, deadline: float) -> None:
        """A new token, unless one replaced ``stale`` already. Every caller that finds the
        same stale token shares one authentication and its outcome (a failure included);
        each waits for it until its own ``deadline`` (loop time) at most, then raises
        :class:`StoreUnavailable`."""
        if self._user is None:
            raise EtcdAuthError(
                "etcd has authentication on: connect with user= and password= "
                f"(etcd answered: {detail_text(err)})"
            ) from err
        if self._token != stale:
            return
        task = self._renewal
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._authenticate(), name="etcd-authenticate"
            )
            # Its outcome is read by the waiters; one that none waited for is not "lost".
            task.add_done_callback(consume)
            self._renewal = task
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(task)
        except TimeoutError:
            raise StoreUnavailable(
                f"no new etcd auth token in time (etcd answered: {detail_text(err)})"
            ) from err

    def _refused_token(self, err: Any, token: str | None) -> bool:
        """Whether ``err`` refused the call for its token (or, from a store that has
        credentials but no token yet -- etcd had authentication off when it connected -- for
        having none), so that a new token may be worth a try."""
        details = detail_text(err)
        if details in STALE_TOKEN:
            return True
        return (
            token is None
            and self._user is not None
            and (details == NO_TOKEN or err.code() == grpc.StatusCode.PERMISSION_DENIED)
        )

    def _hint(self, error: Exception) -> Exception:
        """``error``, saying so when a refusal may just be the missing credentials."""
        if isinstance(error, EtcdAuthError) and self._user is None and "user=" not in str(error):
            hint = "this store has no credentials: connect with user= and password="
            return EtcdAuthError(f"{error} ({hint})")
        return error

    async def _call(
        self,
        what: str,
        attempt: Callable[[_Endpoint, float], Awaitable[T]],
        *,
        idempotent: bool,
        renew: bool = True,
    ) -> T:
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        delay = 0.05
        failures = 0
        renewals = 0
        reason = "no endpoint answered"
        while True:
            index = self._current
            endpoint = self._endpoints[index]
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StoreUnavailable(f"{reason} (gave up after {self._timeout} s)")
            per_try = min(remaining, self._read_attempt) if idempotent else remaining
            token = self._token
            try:
                return await attempt(endpoint, per_try)
            except grpc.aio.AioRpcError as err:
                if renew and self._refused_token(err, token):
                    # Refused before it took effect: any request may go again, with a new token.
                    if renewals >= RENEWALS_PER_CALL:
                        raise EtcdAuthError(
                            f"{what}: etcd kept refusing fresh tokens: {detail_text(err)}"
                        ) from err
                    renewals += 1
                    await self._renew(token, err, deadline)
                    continue
                permanent = final_error(err)
                if permanent is not None:
                    raise self._hint(permanent) from err
                if self._closed:
                    raise StoreUnavailable("the etcd store is closed") from err
                self._failover(index)
                reason = f"{what} via {endpoint.target}: {err.code().name}: {detail_text(err)}"
                if not (idempotent or unsent(err)):
                    raise StoreUnavailable(
                        f"{reason} (the write may or may not have happened)"
                    ) from err
            failures += 1
            if failures % len(self._endpoints) == 0:
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, 0.5)

    # -- key-value ---------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        request = rpc.RangeRequest(key=key_bytes(key))

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Range(request, timeout=timeout, metadata=self._metadata)

        resp = await self._call("get", attempt, idempotent=True)
        return kv_of(resp.kvs[0]) if resp.kvs else None

    async def range(self, prefix: str, *, limit: int = 0, start: str = "") -> RangeResult:
        check_range_args(prefix, limit, start)
        key, end = prefix_range(prefix, start)
        request = rpc.RangeRequest(key=key, range_end=end, limit=limit)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Range(request, timeout=timeout, metadata=self._metadata)

        resp = await self._call("range", attempt, idempotent=True)
        return RangeResult(
            kvs=[kv_of(kv) for kv in resp.kvs],
            revision=int(resp.header.revision),
            more=bool(resp.more),
        )

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_put_args(key, lease)
        request = rpc.PutRequest(key=key_bytes(key), value=bytes(value), lease=lease)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Put(request, timeout=timeout, metadata=self._metadata)

        resp = await self._call("put", attempt, idempotent=False)
        return int(resp.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        check_delete_args(key, prefix)
        start, end = key_range(key, prefix)
        request = rpc.DeleteRangeRequest(key=start, range_end=end)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.DeleteRange(request, timeout=timeout, metadata=self._metadata)

        resp = await self._call("delete", attempt, idempotent=False)
        return int(resp.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        check_txn_args(compares, success, failure)
        request = rpc.TxnRequest(
            compare=[compare_msg(c) for c in compares],
            success=[request_op(op) for op in success],
            failure=[request_op(op) for op in failure],
        )
        read_only = all(isinstance(op, GetOp) for op in (*success, *failure))

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Txn(request, timeout=timeout, metadata=self._metadata)

        resp = await self._call("txn", attempt, idempotent=read_only)
        revision = int(resp.header.revision)
        return TxnResult(
            succeeded=bool(resp.succeeded),
            revision=revision,
            results=[op_result(r, revision) for r in resp.responses],
        )

    async def revision(self) -> int:
        # A linearizable count-only read of one key: etcd answers with the store revision.
        # (With authentication on, the user needs read permission on that key, "\0".)
        request = rpc.RangeRequest(key=b"\0", count_only=True)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Range(request, timeout=timeout, metadata=self._metadata)

        resp = await self._call("revision", attempt, idempotent=True)
        return int(resp.header.revision)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        """Drop the history before ``revision`` (etcd-specific; watches from older revisions
        then raise :class:`Compacted`)."""
        request = rpc.CompactionRequest(revision=revision, physical=physical)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.kv.Compact(request, timeout=timeout, metadata=self._metadata)

        try:
            await self._call("compact", attempt, idempotent=True)
        except StoreError as exc:
            # Compacting to a revision compacted already is what a retry can run into.
            if "compacted" not in str(exc):
                raise

    # -- leases ------------------------------------------------------------------------------

    async def lease_grant(self, ttl: float) -> Lease:
        check_ttl(ttl)
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.lease.LeaseGrant(request, timeout=timeout, metadata=self._metadata)

        resp = await self._call("lease grant", attempt, idempotent=False)
        if resp.error:
            raise StoreError(f"etcd refused the lease: {resp.error}")
        return Lease(id=int(resp.ID), ttl=float(resp.TTL))

    async def lease_keepalive(self, lease_id: int) -> float:
        check_lease_id(lease_id)
        request = rpc.LeaseKeepAliveRequest(ID=lease_id)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            call = ep.lease.LeaseKeepAlive(
                iter([request]), timeout=timeout, metadata=self._metadata
            )
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
        check_lease_id(lease_id)
        request = rpc.LeaseRevokeRequest(ID=lease_id)

        async def attempt(ep: _Endpoint, timeout: float) -> Any:
            return await ep.lease.LeaseRevoke(request, timeout=timeout, metadata=self._metadata)

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
        check_watch_args(prefix, start_revision)
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
        renewal, self._renewal = self._renewal, None
        if renewal is not None and not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewal
        for ep in self._endpoints:
            await ep.channel.close()


class _WatchDenied(EtcdAuthError):
    """etcd cancelled a watch as it was created: for its token (``stale``), or for want of
    permission -- which is also etcd's answer to a watch that carries no token."""

    def __init__(self, message: str, *, stale: bool) -> None:
        super().__init__(message)
        self.stale = stale


class _Watch:
    """One watch: a task that keeps a gRPC watch stream alive and feeds a queue."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._key, self._range_end = prefix_range(prefix)
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
        renewals = 0  # token renewals since the stream last worked
        while True:
            index = store._current
            endpoint = store._endpoints[index]
            self._healthy_since = None
            self._cancel_reason = None
            token = store._token
            try:
                reason = await self._stream(endpoint)
            except (grpc.aio.AioRpcError, _WatchDenied) as err:
                if isinstance(err, _WatchDenied):
                    # A denial gets one fresh token, in case the old one was the problem.
                    renewable, limit = True, RENEWALS_PER_CALL if err.stale else 1
                else:
                    renewable, limit = detail_text(err) in STALE_TOKEN, RENEWALS_PER_CALL
                if renewable and store._user is not None and renewals < limit:
                    try:
                        await store._renew(token, err, broken_since + store._timeout)
                    except StoreUnavailable as exc:
                        # No token to be had now: an outage, handled as any broken stream
                        # (next endpoint, back-off, and the watch's own deadline) below.
                        reason = str(exc)
                    except StoreError as exc:  # the credentials themselves were refused
                        self._fail(exc)
                        return
                    else:
                        renewals += 1
                        continue
                elif isinstance(err, _WatchDenied):
                    self._fail(store._hint(err))
                    return
                else:
                    permanent = final_error(err)
                    if permanent is not None:
                        self._fail(store._hint(permanent))
                        return
                    reason = f"{err.code().name}: {detail_text(err)}"
            except StoreError as exc:  # Compacted, or a watch etcd refused
                self._fail(exc)
                return
            store._failover(index)
            if self._healthy_since is not None:  # the stream worked: a fresh failure budget
                broken_since, delay, failures, renewals = loop.time(), 0.05, 0, 0
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
        call = endpoint.watch.Watch(self._requests(create), metadata=self._store._metadata)
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
                reason = resp.cancel_reason
                stale = any(text.removeprefix("etcdserver: ") in reason for text in STALE_TOKEN)
                if stale or "permission denied" in reason:
                    raise _WatchDenied(
                        f"etcd refused the watch on {self._prefix!r}: {reason}", stale=stale
                    )
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
                self._queue.put_nowait(event_of(ev, has_prev=True))
                top = max(top, revision)
        self._next = top + 1
        return self._healthy_since is not None
