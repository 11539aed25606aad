"""The etcd backend with TLS and authentication, against real etcd members on loopback.

The option checks at the top and the renewal tests at the end need no etcd (they are not
marked slow). Everything else starts real ``etcd`` processes whose client listeners speak TLS
only and demand a client certificate (``EtcdCluster(..., tls=True)``: a throw-away CA made
for the run), so those tests are marked ``slow``; as in ``test_store_etcd``, a missing etcd
is installed or named, never skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentcluster.store._etcd_cluster import EtcdCluster
from agentcluster.store._etcd_errors import RENEWALS_PER_CALL
from agentcluster.store._test_pki import TestPKI, make_pki
from agentcluster.store.base import Store, StoreUnavailable
from agentcluster.store.etcd import EtcdAuthError, EtcdStore
from agentcluster.testing import eventually, wait_until
from store_contract import StoreContract
from test_store_etcd import _ensure_etcd, _next_events

ROOT_PASSWORD = "root-secret"
READER_PASSWORD = "reader-secret"


def _tls(pki: TestPKI) -> dict[str, Any]:
    return {"ca_file": pki.ca_file, "cert_file": pki.client_cert, "key_file": pki.client_key}


# -- options, no etcd needed ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(
    ("endpoints", "options", "message"),
    [
        (["http://h:1", "https://h:2"], {}, "mix http:// and https://"),
        (["ftp://h:1"], {}, "host:port, http:// or https://"),
        (["http://https://h:1"], {}, "host:port, http:// or https://"),
        (["https://h:1"], {"cert_file": "c.pem"}, "needs its key"),
        (["https://h:1"], {"key_file": "k.pem"}, "needs its key"),
        (["http://h:1"], {"ca_file": "ca.pem"}, "endpoints are http://"),
        (["h:1"], {"server_name": "localhost"}, "only applies to TLS"),
        (["h:1"], {"user": "root"}, "both user and password"),
        (["h:1"], {"password": "pw"}, "both user and password"),
        (["h:1"], {"user": "", "password": "pw"}, "user name is empty"),
    ],
)
def test_inconsistent_options_are_refused(
    endpoints: list[str], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        EtcdStore(endpoints, **options)


def test_unreadable_or_wrong_files_are_named(pki: TestPKI, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=r"cannot read the etcd CA file .*nope\.pem"):
        EtcdStore(["h:1"], ca_file=missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"CA file .*garbage\.pem.* holds no PEM certificate"):
        EtcdStore(["h:1"], ca_file=garbage)
    with pytest.raises(ValueError, match=r"client certificate file .* holds no PEM"):
        EtcdStore(["h:1"], cert_file=garbage, key_file=pki.client_key)
    # A key in the certificate's place, and an encrypted key: gRPC could use neither.
    with pytest.raises(ValueError, match=r"client key file .* no unencrypted PEM private key"):
        EtcdStore(["h:1"], cert_file=pki.client_cert, key_file=pki.client_cert)
    locked = tmp_path / "locked-key.pem"
    locked.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ValueError, match="no unencrypted PEM private key"):
        EtcdStore(["h:1"], cert_file=pki.client_cert, key_file=locked)


async def test_scheme_decides_tls(pki: TestPKI) -> None:
    plain = EtcdStore(["h:1", "http://h:2/"])
    system_roots = EtcdStore(["https://h:1"])
    bare_with_ca = EtcdStore(["h:1"], **_tls(pki))
    try:
        assert (plain.tls, system_roots.tls, bare_with_ca.tls) == (False, True, True)
        assert plain.endpoints == ["h:1", "h:2"]
        assert bare_with_ca.endpoints == ["h:1"]
    finally:
        for store in (plain, system_roots, bare_with_ca):
            await store.close()


# -- real etcd with TLS ---------------------------------------------------------------------


async def _add_user(admin: EtcdStore, name: str, password: str, role: str) -> None:
    """Add a user with ``role``, through ``admin``'s own channel and token."""
    auth = admin._endpoints[admin._current].auth
    meta = admin._metadata
    await auth.UserAdd(rpc.AuthUserAddRequest(name=name, password=password), metadata=meta)
    await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=name, role=role), metadata=meta)


async def _enable_auth(cluster: EtcdCluster) -> None:
    """A root user and a ``reader`` who may read keys under ``pub/`` only; then auth on."""
    assert cluster.pki is not None
    async with await EtcdStore.connect(cluster.endpoints, **_tls(cluster.pki)) as store:
        auth = store._endpoints[store._current].auth
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="pub-reader"))
        await auth.RoleGrantPermission(
            rpc.AuthRoleGrantPermissionRequest(
                name="pub-reader",
                perm=rpc.Permission(permType=rpc.Permission.READ, key=b"pub/", range_end=b"pub0"),
            )
        )
        await auth.UserAdd(rpc.AuthUserAddRequest(name="reader", password=READER_PASSWORD))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="reader", role="pub-reader"))
        await auth.AuthEnable(rpc.AuthEnableRequest())


@pytest.fixture(scope="module")
def secure_cluster() -> Iterator[EtcdCluster]:
    """Three TLS members (client certificates required) with authentication on."""
    _ensure_etcd()
    cluster = EtcdCluster(3, tls=True)

    async def start() -> None:
        await cluster.start()
        await _enable_auth(cluster)

    asyncio.run(start())
    try:
        yield cluster
    finally:
        asyncio.run(cluster.stop())


@asynccontextmanager
async def fresh_secure_cluster(n: int) -> AsyncIterator[EtcdCluster]:
    _ensure_etcd()
    async with EtcdCluster(n, tls=True) as cluster:
        yield cluster


@asynccontextmanager
async def _rooted_cluster(
    *, jwt_tokens: bool = False
) -> AsyncIterator[tuple[EtcdCluster, EtcdStore, EtcdStore]]:
    """A fresh 3-member TLS cluster with authentication on, a store and an admin store (both
    root) on it."""
    _ensure_etcd()
    async with EtcdCluster(3, tls=True, jwt_tokens=jwt_tokens) as cluster:
        await _enable_auth(cluster)
        assert cluster.pki is not None
        urls = [m.client_url for m in cluster.members]
        tls = _tls(cluster.pki)
        async with (
            await EtcdStore.connect(urls, user="root", password=ROOT_PASSWORD, **tls) as store,
            await EtcdStore.connect(urls, user="root", password=ROOT_PASSWORD, **tls) as admin,
        ):
            yield cluster, store, admin


@pytest.mark.slow
class TestSecureEtcdStore(StoreContract):
    """The whole store contract over TLS with a client certificate, as an authenticated
    user: every call and every watch and keep-alive stream carries the token."""

    carries_surrogate_keys = True

    short_ttl = 2.0
    lock_ttl = 3.0
    settle_timeout = 10.0

    @pytest.fixture(autouse=True)
    def _use_cluster(self, secure_cluster: EtcdCluster) -> None:
        assert secure_cluster.pki is not None
        self.urls = [m.client_url for m in secure_cluster.members]
        self.tls = _tls(secure_cluster.pki)

    async def make_store(self) -> Store:
        return await EtcdStore.connect(self.urls, user="root", password=ROOT_PASSWORD, **self.tls)


@pytest.mark.slow
async def test_tls_refuses_a_client_without_the_right_certificates(
    secure_cluster: EtcdCluster, tmp_path: Path
) -> None:
    assert secure_cluster.pki is not None
    urls = [m.client_url for m in secure_cluster.members]
    creds: dict[str, Any] = {"user": "root", "password": ROOT_PASSWORD}
    pki = secure_cluster.pki
    # No client certificate: the server ends the handshake (a listener that is there).
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1") as info:
        await EtcdStore.connect(urls, ca_file=pki.ca_file, timeout=1.0, **creds)
    assert "Connection refused" not in str(info.value)
    # Plain text to a TLS listener.
    with pytest.raises(StoreUnavailable):
        await EtcdStore.connect(secure_cluster.endpoints, timeout=1.0, **creds)
    # The server's certificate is not from the CA we trust.
    other = make_pki(tmp_path / "other", ca_name="some other CA")
    stranger: dict[str, Any] = {"cert_file": pki.client_cert, "key_file": pki.client_key}
    with pytest.raises(StoreUnavailable, match=r"(?i)tls handshake failed"):
        await EtcdStore.connect(urls, ca_file=other.ca_file, timeout=1.0, **stranger, **creds)
    # A client certificate from another CA.
    foreign: dict[str, Any] = {"cert_file": other.client_cert, "key_file": other.client_key}
    with pytest.raises(StoreUnavailable):
        await EtcdStore.connect(urls, ca_file=pki.ca_file, timeout=1.0, **foreign, **creds)


@pytest.mark.slow
async def test_server_name_checks_the_certificate_name(secure_cluster: EtcdCluster) -> None:
    assert secure_cluster.pki is not None
    tls = _tls(secure_cluster.pki)
    creds: dict[str, Any] = {"user": "root", "password": ROOT_PASSWORD}
    # The certificate names localhost (and 127.0.0.1): either name passes.
    async with await EtcdStore.connect(
        secure_cluster.endpoints, server_name="localhost", **tls, **creds
    ) as store:
        assert store.tls
        assert await store.put("pub/named", b"1") > 0
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1"):
        await EtcdStore.connect(
            secure_cluster.endpoints, server_name="etcd.example", timeout=1.0, **tls, **creds
        )


# -- authentication --------------------------------------------------------------------------


@pytest.mark.slow
async def test_wrong_or_missing_credentials_are_auth_errors(secure_cluster: EtcdCluster) -> None:
    assert secure_cluster.pki is not None
    urls = [m.client_url for m in secure_cluster.members]
    tls = _tls(secure_cluster.pki)
    with pytest.raises(EtcdAuthError, match="refused the credentials"):
        await EtcdStore.connect(urls, user="root", password="wrong", **tls)
    with pytest.raises(EtcdAuthError, match="refused the credentials"):
        await EtcdStore.connect(urls, user="nobody", password="x", **tls)
    # No credentials: connecting (a read) is refused, and the error says what is missing.
    with pytest.raises(EtcdAuthError, match="user= and password="):
        await EtcdStore.connect(urls, **tls)


@pytest.mark.slow
async def test_permissions_limit_what_a_user_may_do(secure_cluster: EtcdCluster) -> None:
    assert secure_cluster.pki is not None
    urls = [m.client_url for m in secure_cluster.members]
    tls = _tls(secure_cluster.pki)
    async with await EtcdStore.connect(urls, user="root", password=ROOT_PASSWORD, **tls) as root:
        await root.put("pub/news", b"hello")
        await root.put("secret/plan", b"x")
    async with await EtcdStore.connect(
        urls, user="reader", password=READER_PASSWORD, **tls
    ) as reader:
        got = await reader.get("pub/news")
        assert got is not None and got.value == b"hello"
        with pytest.raises(EtcdAuthError, match="permission denied"):
            await reader.put("pub/news", b"defaced")
        with pytest.raises(EtcdAuthError, match="permission denied"):
            await reader.get("secret/plan")
        async with reader.watch("pub/"):  # allowed: the watch is created
            pass
        before = reader.authentications
        with pytest.raises(EtcdAuthError, match="refused the watch on 'secret/'"):
            async with reader.watch("secret/"):
                pass
        # Denied once more with a fresh token: the refusal is real, not an old token.
        assert reader.authentications == before + 1


async def _until_every_member_refuses(store: EtcdStore) -> None:
    """Wait until every member refuses ``store``'s token: members apply an auth change one
    by one. (A refused token is not refreshed by the probe.)"""

    async def all_refuse() -> bool:
        for ep in store._endpoints:
            try:
                await ep.kv.Range(rpc.RangeRequest(key=b"pub/"), metadata=store._metadata)
            except grpc.aio.AioRpcError as err:
                if err.details() not in (
                    "etcdserver: invalid auth token",
                    "etcdserver: revision of auth store is old",
                ):
                    raise
            else:
                return False
        return True

    await eventually(all_refuse, timeout=10.0)


async def _invalidate_tokens(admin: EtcdStore, victim: EtcdStore, password: str) -> None:
    """Set the password of ``victim``'s user (to the same one): etcd forgets every token of
    that user, on each member as it applies the change."""
    assert victim._user is not None
    auth = admin._endpoints[admin._current].auth
    request = rpc.AuthUserChangePasswordRequest(name=victim._user, password=password)
    await auth.UserChangePassword(request, metadata=admin._metadata)
    await _until_every_member_refuses(victim)


@pytest.mark.slow
async def test_a_revoked_token_is_renewed_once_for_concurrent_calls(
    secure_cluster: EtcdCluster,
) -> None:
    """The refused calls -- writes included, since etcd refuses a bad token before anything
    reaches its log -- share one new token and all succeed."""
    assert secure_cluster.pki is not None
    urls = [m.client_url for m in secure_cluster.members]
    tls = _tls(secure_cluster.pki)
    async with await EtcdStore.connect(urls, user="root", password=ROOT_PASSWORD, **tls) as admin:
        await _add_user(admin, "rotor", "rotor-pw", "root")
        async with await EtcdStore.connect(urls, user="rotor", password="rotor-pw", **tls) as store:
            assert store.authentications == 1
            await store.put("pub/stale/0", b"before")
            await _invalidate_tokens(admin, store, "rotor-pw")
            revisions = await asyncio.gather(
                *(store.put(f"pub/stale/{i}", b"after") for i in range(1, 9))
            )
            assert len(set(revisions)) == 8
            assert store.authentications == 2
            kv = await store.get("pub/stale/8")
            assert kv is not None and kv.value == b"after"
            # A token that keeps being refused right after each renewal is not stale: the
            # call gives up with an auth error instead of looping.
            await _invalidate_tokens(admin, store, "rotor-pw")
            renewals = store.authentications
            real_renew = store._renew

            async def renew_then_revoke(stale: str | None, err: Any, deadline: float) -> None:
                await real_renew(stale, err, deadline)
                await _invalidate_tokens(admin, store, "rotor-pw")

            store._renew = renew_then_revoke  # type: ignore[method-assign]
            with pytest.raises(EtcdAuthError, match="kept refusing fresh tokens"):
                await store.put("pub/stale/never", b"x")
            assert store.authentications == renewals + 3
            store._renew = real_renew  # type: ignore[method-assign]
            assert await store.get("pub/stale/never") is None


@pytest.mark.slow
async def test_credentials_are_used_once_the_cluster_turns_auth_on() -> None:
    """Credentials against a cluster without authentication go unused (as etcd's own client
    does); when authentication is turned on later, the first refused call authenticates."""
    async with fresh_secure_cluster(1) as cluster:
        assert cluster.pki is not None
        async with await EtcdStore.connect(
            cluster.endpoints, user="root", password=ROOT_PASSWORD, **_tls(cluster.pki)
        ) as store:
            assert store.authentications == 0
            assert await store.put("pub/before", b"v") > 0
            await _enable_auth(cluster)
            # A watch without a token is cancelled as "permission denied": it authenticates.
            async with store.watch("pub/") as events:
                assert store.authentications == 1
                assert await store.put("pub/after", b"v") > 0
                assert [e.kv.key for e in await _next_events(events, 1)] == ["pub/after"]
            assert store.authentications == 1
            kv = await store.get("pub/after")
            assert kv is not None and kv.value == b"v"


@pytest.mark.slow
async def test_watch_resumes_with_a_new_token_after_its_member_restarts() -> None:
    """The watch's member restarts after etcd revoked the watch's token: re-created on
    another member, the watch is refused for its token, renews it and misses nothing."""
    async with _rooted_cluster() as (cluster, store, admin):
        watched = store.current_endpoint  # where the watch's stream goes
        async with store.watch("pub/w/") as events:
            await store.put("pub/w/1", b"1")
            assert [e.kv.key for e in await _next_events(events, 1)] == ["pub/w/1"]
            await _invalidate_tokens(admin, store, ROOT_PASSWORD)
            before = store.authentications
            assert store.current_endpoint == watched
            await cluster.restart(cluster.member(watched).name)
            await admin.put("pub/w/2", b"2")
            await admin.put("pub/w/3", b"3")
            got = [e.kv.key for e in await _next_events(events, 2, timeout=20.0)]
            assert got == ["pub/w/2", "pub/w/3"]
            assert store.authentications == before + 1


@pytest.mark.slow
async def test_jwt_tokens_made_stale_by_an_auth_change_are_renewed() -> None:
    """With JWT tokens (they carry the auth store's revision), any change to users or roles
    makes every older token stale ("revision of auth store is old", refused when applied:
    nothing takes effect). Concurrent calls share one renewal, and a watch created -- or
    re-created after its member restarts -- with a stale token renews it and misses nothing."""
    async with _rooted_cluster(jwt_tokens=True) as (cluster, store, admin):
        await _add_user(admin, "unrelated-1", "pw", "pub-reader")
        revisions = await asyncio.gather(*(store.put(f"pub/j/{i}", b"v") for i in range(8)))
        assert len(set(revisions)) == 8
        assert store.authentications == 2
        await _add_user(admin, "unrelated-2", "pw", "pub-reader")
        watched = store.current_endpoint
        async with store.watch("pub/jw/") as events:
            assert store.authentications == 3
            await admin.put("pub/jw/1", b"1")
            assert [e.kv.key for e in await _next_events(events, 1)] == ["pub/jw/1"]
            await _add_user(admin, "unrelated-3", "pw", "pub-reader")
            await _until_every_member_refuses(store)
            assert store.current_endpoint == watched
            await cluster.restart(cluster.member(watched).name)
            await admin.put("pub/jw/2", b"2")
            got = [e.kv.key for e in await _next_events(events, 1, timeout=20.0)]
            assert got == ["pub/jw/2"]
            assert store.authentications == 4


class _Refusal(Exception):
    """Stands in for a gRPC error refusing a call for its token."""

    def details(self) -> str:
        return "etcdserver: invalid auth token"


async def test_concurrent_renewals_share_one_authentication_and_its_failure() -> None:
    store = EtcdStore(["127.0.0.1:1"], user="u", password="p")
    calls = 0
    release = asyncio.Event()

    async def failing_authenticate() -> None:
        nonlocal calls
        calls += 1
        await release.wait()
        raise StoreUnavailable("no quorum")

    store._authenticate = failing_authenticate  # type: ignore[method-assign]
    try:
        loop = asyncio.get_running_loop()
        far = loop.time() + 60
        waiters = [asyncio.ensure_future(store._renew(None, _Refusal(), far)) for _ in range(8)]
        # A caller whose own deadline comes first gives up alone, as unavailable.
        with pytest.raises(StoreUnavailable, match="no new etcd auth token in time"):
            await store._renew(None, _Refusal(), loop.time() + 0.05)
        assert not any(w.done() for w in waiters)
        release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert calls == 1
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        # The next stale call starts a new authentication.
        release.clear()
        retry = asyncio.ensure_future(store._renew(None, _Refusal(), far))
        await wait_until(lambda: calls == 2, timeout=5.0)
        release.set()
        with pytest.raises(StoreUnavailable):
            await retry
    finally:
        await store.close()


async def test_close_cancels_a_renewal_under_way() -> None:
    store = EtcdStore(["127.0.0.1:1"], user="u", password="p")
    started = asyncio.Event()

    async def hanging_authenticate() -> None:
        started.set()
        await asyncio.Event().wait()

    store._authenticate = hanging_authenticate  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(store._renew(None, _Refusal(), loop.time() + 60))
    await started.wait()
    renewal = store._renewal
    assert renewal is not None
    await store.close()
    assert renewal.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_watch_that_cannot_renew_its_token_ends_unavailable_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every member refuses the watch's token and no new one can be had (no quorum): that
    is an outage, so the watch ends as unavailable within its deadline -- not with an auth
    error, which would say that retrying is pointless."""
    from agentcluster.store import etcd as etcd_module

    store = EtcdStore(["127.0.0.1:1", "127.0.0.1:2"], user="u", password="p", timeout=0.3)
    renewals = 0

    async def refused(self: Any, endpoint: Any) -> str:
        raise etcd_module._WatchDenied("invalid auth token", stale=True)

    async def no_quorum(stale: str | None, err: Any, deadline: float) -> None:
        nonlocal renewals
        renewals += 1
        raise StoreUnavailable("no leader")

    monkeypatch.setattr(etcd_module._Watch, "_stream", refused)
    store._renew = no_quorum  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreUnavailable, match=r"not re-established within 0\.3 s"):
            async with store.watch("x/"):
                pass
        assert renewals > RENEWALS_PER_CALL  # an outage spends no renewals
    finally:
        await store.close()
