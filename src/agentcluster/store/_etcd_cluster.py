"""EtcdCluster: N real ``etcd`` processes on loopback, for the etcd backend's tests and bench.

Theory of operation: each member gets two free loopback ports (client and peer), a data
directory in a private temporary directory and a log file beside it; all members are started
at once with the same ``--initial-cluster`` and a per-cluster token, so they bootstrap one
fresh cluster. ``start`` then polls every member's ``/health`` endpoint (plain HTTP on the
client port; ``{"health":"true"}`` once the member has a leader and serves a read) until all
are healthy or a deadline passes. Children get ``PR_SET_PDEATHSIG`` (Linux) like
:mod:`agentcluster.launcher`'s nodes, so they die with this process even when it is killed
with SIGKILL: no orphans. The processes are plain :class:`subprocess.Popen` objects, not
asyncio ones, so one cluster can outlive the event loop that started it (a module-scoped
pytest fixture serves tests that each run on a fresh loop); waiting is done by polling.

Faults are real signals: ``kill(member)`` sends SIGKILL by default (a crash; the data
directory stays, fsynced as etcd left it), ``restart(member)`` starts the same member again
on the same ports and data directory and waits until it is healthy.

With ``tls=True`` the client listeners speak TLS only and demand a client certificate
(``--client-cert-auth``): the cluster makes a throw-away CA, a server certificate for
127.0.0.1 and a client certificate (:func:`~agentcluster.store._test_pki.make_pki`, files in
``cluster.pki``), and its own health and status probes present that client certificate.
Peers still talk plain HTTP to each other: that link is not what the tests exercise. With
``jwt_tokens=True`` etcd's auth tokens are JWTs (ES256, a key pair made for the run) instead
of its default in-memory "simple" tokens: a JWT carries the auth store's revision, so any
change to users or roles makes the tokens issued before it stale.

Timing flags are etcd's own defaults, spelled out so the figures measured against this
cluster can be quoted with them: ``--heartbeat-interval 100`` ms and ``--election-timeout
1000`` ms. fsync stays on (no ``--unsafe-no-fsync``): this cluster is the baseline our own
Raft store is compared with, on equal durability terms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agentcluster.launcher import die_with_parent
from agentcluster.store._test_pki import TestPKI, make_jwt_keys, make_pki

__all__ = ["EtcdCluster", "EtcdMember", "EtcdNotInstalled", "find_etcd"]

_DEBIAN_PACKAGE = "etcd-server"
_INSTALL_SCRIPT = "scripts/ci-system-deps.sh"


class EtcdNotInstalled(RuntimeError):
    """No ``etcd`` binary on this machine."""

    def __init__(self, searched: str) -> None:
        super().__init__(
            f"the etcd binary was not found ({searched}); install Debian's {_DEBIAN_PACKAGE} "
            f"package (it provides /usr/bin/etcd), e.g. by running {_INSTALL_SCRIPT} as root"
        )


def find_etcd(binary: str | None = None) -> str:
    """The path of the etcd binary: ``binary``, ``$ETCD_BINARY``, or ``etcd`` on PATH."""
    candidate = binary or os.environ.get("ETCD_BINARY") or "etcd"
    found = shutil.which(candidate)
    if found is None:
        raise EtcdNotInstalled(f"looked for {candidate!r} on PATH")
    return found


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    # Holding every socket open until all are bound makes the ports pairwise distinct.
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    scheme: str = "http"  # of the client listener; peers always use http

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client (gRPC and HTTP) listener."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def _http(
    port: int, method: str, path: str, body: bytes = b"", *, tls: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    # HTTP/1.0 so the server answers with a plain body and closes: no chunking, no keep-alive.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        head = (
            f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"bad HTTP answer from 127.0.0.1:{port}: {status_line!r}")
    return int(parts[1]), payload


class EtcdCluster:
    """Start, break and stop an N-member etcd cluster on 127.0.0.1."""

    def __init__(
        self,
        n: int = 3,
        *,
        binary: str | None = None,
        workdir: str | Path | None = None,
        heartbeat_interval_ms: int = 100,
        election_timeout_ms: int = 1000,
        log_level: str = "warn",
        extra_args: tuple[str, ...] = (),
        tls: bool = False,
        jwt_tokens: bool = False,
    ) -> None:
        if n < 1:
            raise ValueError(f"an etcd cluster needs at least one member, got {n}")
        self.binary = find_etcd(binary)
        self.n = n
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.log_level = log_level
        self.extra_args = extra_args
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="agentcluster-etcd-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki: TestPKI | None = make_pki(self.workdir / "pki") if tls else None
        self._token_args: list[str] = []
        if jwt_tokens:
            private, public = make_jwt_keys(self.workdir / "jwt")
            self._token_args = [
                "--auth-token",
                f"jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=10m",
            ]
        self._probe_tls: ssl.SSLContext | None = None
        if self.pki is not None:
            ctx = ssl.create_default_context(cafile=str(self.pki.ca_file))
            ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
            self._probe_tls = ctx
        # A unique token keeps members of two clusters started side by side from ever joining.
        self.token = f"agentcluster-{os.getpid()}-{time.monotonic_ns()}"
        ports = _free_ports(2 * n)
        self.members = [
            EtcdMember(
                name=f"e{i + 1}",
                client_port=ports[2 * i],
                peer_port=ports[2 * i + 1],
                data_dir=self.workdir / f"e{i + 1}.etcd",
                log_path=self.workdir / f"e{i + 1}.log",
                scheme="https" if tls else "http",
            )
            for i in range(n)
        ]

    @property
    def endpoints(self) -> list[str]:
        """Every member's client endpoint as ``127.0.0.1:port``, in member order."""
        return [member.endpoint for member in self.members]

    def member(self, which: int | str) -> EtcdMember:
        """A member by index (0-based), name (``e1``...) or endpoint (``127.0.0.1:port``)."""
        if isinstance(which, int):
            return self.members[which]
        for member in self.members:
            if which in (member.name, member.endpoint, member.client_url):
                return member
        raise KeyError(f"no etcd member {which!r} (members: {[m.name for m in self.members]})")

    def _args(self, member: EtcdMember) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            self.binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            # Ignored once the data directory holds a WAL, so restarts reuse it as is.
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(self.heartbeat_interval_ms),
            "--election-timeout", str(self.election_timeout_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", self.log_level,
            *self._tls_args(),
            *self._token_args,
            *self.extra_args,
        ]  # fmt: skip

    def _tls_args(self) -> list[str]:
        if self.pki is None:
            return []
        return [
            "--cert-file", str(self.pki.server_cert),
            "--key-file", str(self.pki.server_key),
            "--trusted-ca-file", str(self.pki.ca_file),
            "--client-cert-auth",
        ]  # fmt: skip

    def _spawn(self, member: EtcdMember) -> None:
        if member.running:
            raise RuntimeError(f"etcd member {member.name} is already running")
        # etcd reads ETCD_* variables as flags; a stray one from the caller's shell must not
        # reconfigure the test cluster.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        args = self._args(member)
        setpriv = shutil.which("setpriv")
        with open(member.log_path, "ab") as log:
            if setpriv is not None:
                # util-linux's setpriv sets PR_SET_PDEATHSIG and execs etcd: no Python runs in
                # the forked child, which matters once gRPC threads live in this process (a
                # preexec_fn there can crash the child before it execs).
                member.proc = subprocess.Popen(
                    [setpriv, "--pdeathsig", "KILL", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            else:
                member.proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    preexec_fn=die_with_parent,
                )

    async def start(self, *, timeout: float = 30.0) -> EtcdCluster:
        """Start every member and wait until all are healthy."""
        try:
            for member in self.members:
                self._spawn(member)
            await self.wait_healthy(timeout=timeout)
        except BaseException:
            await self.stop()
            raise
        return self

    async def healthy(self, member: int | str) -> bool:
        """True when the member answers ``/health`` with ``"health":"true"``."""
        m = self.member(member)
        if not m.running:
            return False
        try:
            status, body = await asyncio.wait_for(
                _http(m.client_port, "GET", "/health", tls=self._probe_tls), 2.0
            )
        except (OSError, TimeoutError):
            return False
        if status != 200:
            return False
        try:
            return bool(json.loads(body).get("health") == "true")
        except ValueError:
            return False

    async def wait_healthy(
        self, members: list[int | str] | None = None, *, timeout: float = 30.0
    ) -> None:
        """Poll until every running member (or the ones named) is healthy."""
        targets = [self.member(m) for m in members] if members is not None else self.members
        deadline = time.monotonic() + timeout
        while True:
            for member in targets:
                if member.proc is not None and member.proc.poll() is not None:
                    raise RuntimeError(
                        f"etcd member {member.name} exited with code {member.proc.returncode}; "
                        f"see {member.log_path}:\n{self._log_tail(member)}"
                    )
            states = [await self.healthy(member.name) for member in targets if member.running]
            if states and all(states):
                return
            if time.monotonic() >= deadline:
                names = [m.name for m in targets]
                raise TimeoutError(f"etcd members {names} not healthy after {timeout} s")
            await asyncio.sleep(0.05)

    async def status(self, member: int | str) -> dict[str, int]:
        """The member's own id, the leader's id and the raft term (``/v3/maintenance/status``)."""
        m = self.member(member)
        status, body = await asyncio.wait_for(
            _http(m.client_port, "POST", "/v3/maintenance/status", b"{}", tls=self._probe_tls),
            2.0,
        )
        if status != 200:
            raise OSError(f"status of {m.name}: HTTP {status}: {body[:200]!r}")
        data = json.loads(body)
        # The JSON gateway prints 64-bit numbers as strings.
        return {
            "member_id": int(data["header"]["member_id"]),
            "leader": int(data.get("leader", 0)),
            "raft_term": int(data.get("raftTerm", 0)),
        }

    async def leader(self, *, timeout: float = 10.0) -> EtcdMember:
        """The member that is the leader, as all running members agree."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ids: dict[int, EtcdMember] = {}
                leaders: list[int] = []
                for member in self.members:
                    if member.running:
                        st = await self.status(member.name)
                        ids[st["member_id"]] = member
                        leaders.append(st["leader"])
                if leaders and len(set(leaders)) == 1 and leaders[0] in ids:
                    return ids[leaders[0]]
            except (OSError, TimeoutError, ValueError, KeyError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no agreed etcd leader after {timeout} s")
            await asyncio.sleep(0.05)

    async def kill(self, member: int | str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the member; for SIGKILL/SIGTERM wait until the process is gone."""
        m = self.member(member)
        if m.proc is None or m.proc.poll() is not None:
            return
        m.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            await self._reap(m, timeout=10.0)

    async def restart(self, member: int | str, *, timeout: float = 30.0) -> None:
        """Start a stopped or killed member again (same ports, same data) and wait for it."""
        m = self.member(member)
        if m.running:
            await self.kill(m.name, signal.SIGKILL)
        self._spawn(m)
        m.restarts += 1
        await self.wait_healthy([m.name], timeout=timeout)

    async def _reap(self, member: EtcdMember, *, timeout: float) -> bool:
        assert member.proc is not None
        deadline = time.monotonic() + timeout
        while member.proc.poll() is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self, *, timeout: float = 10.0) -> None:
        """Terminate every member (SIGKILL after ``timeout``) and remove the temporary dir."""
        # One at a time: a leader stopping beside stopping peers tries to hand its leadership
        # over and waits out the request timeout (about 7 s) when nobody takes it; a member
        # stopping while its peers are still up hands over (or leaves) in a few milliseconds.
        for member in self.members:
            if member.proc is None or member.proc.poll() is not None:
                continue
            member.proc.terminate()
            if not await self._reap(member, timeout=timeout):
                member.proc.kill()
                await self._reap(member, timeout=timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def stop_now(self) -> None:
        """Synchronous last resort (for ``finally`` blocks without a loop): SIGKILL all."""
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.kill()
                member.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _log_tail(self, member: EtcdMember, lines: int = 20) -> str:
        try:
            text = member.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def __aenter__(self) -> EtcdCluster:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
