"""NetnsLab: a small real network of Linux network namespaces for partition tests.

Theory of operation: a lab is one namespace per host (``<prefix>-h1`` .. ``<prefix>-hN``) plus
one namespace holding a Linux bridge (``<prefix>-br``). Each host has a veth pair: ``eth0``
inside the host namespace, ``vhI`` enslaved to the bridge. Every link is created directly
inside the lab's namespaces (``ip -n``), so the root namespace never gets an interface, an
address or a route: the lab is an island, 10.213.0.1 .. 10.213.0.N/24 exist only inside it.

Faults are real kernel state: :meth:`NetnsLab.cut` sets the host's bridge-side veth down (the
host sees NO-CARRIER, as with a pulled cable) and :meth:`NetnsLab.restore` sets it up again;
:meth:`NetnsLab.drop_one_way` adds an nftables rule (with a counter) in the receiving host's
namespace that drops every packet from the sender's address, so traffic flows one way only.

Processes run inside a host with :meth:`NetnsLab.exec` (``ip netns exec``, which execs the
command in place, so the returned pid is the command's own). Each gets its own session and
``PR_SET_PDEATHSIG``: teardown kills their process groups, and they die with the test process
even if that is SIGKILLed. Teardown always kills every process still inside the namespaces
and deletes every namespace the lab created.

Crash safety: before creating anything, a lab writes an owner record
(``/run/agentcluster-netns/<prefix>.json``: pid, process start time, namespace names). A later
lab deletes the namespaces listed in records whose owner is gone; namespaces it has no record
for (even with a similar name) are never touched.

Requirements: root, ``ip`` (iproute2) and ``nft`` (nftables). :func:`require_lab_support`
checks them and, as root, installs what is missing with ``scripts/ci-system-deps.sh``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

__all__ = [
    "DEPS_SCRIPT",
    "OWNER_DIR",
    "NetnsLab",
    "NetnsUnavailable",
    "cleanup_stale_labs",
    "new_prefix",
    "require_lab_support",
]

DEPS_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ci-system-deps.sh"
OWNER_DIR = Path("/run/agentcluster-netns")
# "ac" + 4 hex digits: short enough that every name stays far below IFNAMSIZ-sized limits,
# and the only shape of prefix a lab accepts (so stale-lab cleanup can be strict about it).
PREFIX_RE = re.compile(r"^ac[0-9a-f]{4}$")
NS_RE = re.compile(r"^(ac[0-9a-f]{4})-(br|h[0-9]+)$")
# sbin directories are often missing from PATH even for root (e.g. under sudo or in CI).
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
_CMD_TIMEOUT = 15.0


class NetnsUnavailable(RuntimeError):
    """The machine cannot host a lab (not root, or a tool is missing and cannot be installed)."""


def _tool(name: str) -> str | None:
    return shutil.which(name, path=_TOOL_PATH)


def require_lab_support(*, install: bool = True) -> tuple[str, str]:
    """Return the paths of ``ip`` and ``nft``, installing them as root when missing.

    Raises :class:`NetnsUnavailable` with a message naming what is missing.
    """
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            "the network-namespace tests need root (they create namespaces, veth pairs, a "
            f"bridge and nftables rules); running as uid {os.geteuid()}. Run the suite as root "
            "(CI does), e.g. `sudo make test`."
        )
    ip, nft = _tool("ip"), _tool("nft")
    if (ip is None or nft is None) and install:
        proc = subprocess.run(
            ["bash", str(DEPS_SCRIPT)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise NetnsUnavailable(
                f"{DEPS_SCRIPT.name} failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        ip, nft = _tool("ip"), _tool("nft")
    missing = [pkg for pkg, path in (("iproute2 (ip)", ip), ("nftables (nft)", nft)) if not path]
    if ip is None or nft is None:
        raise NetnsUnavailable(
            f"missing system package(s): {', '.join(missing)}; install them with "
            f"`sudo {DEPS_SCRIPT}` or `apt-get install -y nftables iproute2`"
        )
    return ip, nft


def new_prefix() -> str:
    """A fresh lab prefix: ``ac`` + 4 random hex digits."""
    return "ac" + secrets.token_hex(2)


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr.strip()}"
        )
    return proc


def _list_namespaces(ip: str) -> list[str]:
    out = _run([ip, "netns", "list"]).stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _owner_alive(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        # The start time guards against a recycled pid.
        return abs(proc.create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _kill_namespace_pids(ip: str, ns: str) -> None:
    out = _run([ip, "netns", "pids", ns], check=False).stdout
    for word in out.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _delete_namespace(ip: str, ns: str) -> bool:
    _kill_namespace_pids(ip, ns)
    return _run([ip, "netns", "del", ns], check=False).returncode == 0


def cleanup_stale_labs(ip: str, *, keep: str | None = None) -> list[str]:
    """Delete the namespaces of labs whose owner process is gone; return their names.

    Only namespaces listed in an owner record *and* matching the lab naming scheme are
    deleted; labs whose owner still runs (another test session) and ``keep`` are left alone.
    """
    if not OWNER_DIR.is_dir():
        return []
    existing = set(_list_namespaces(ip))
    deleted: list[str] = []
    for record in sorted(OWNER_DIR.glob("ac*.json")):
        prefix = record.stem
        if not PREFIX_RE.match(prefix) or prefix == keep:
            continue
        try:
            owner = json.loads(record.read_text(encoding="utf-8"))
            pid, started = int(owner["pid"]), float(owner["started"])
            names = [str(n) for n in owner["namespaces"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a record this harness wrote: leave it (and its namespaces) alone
        if _owner_alive(pid, started):
            continue
        ok = True
        for ns in names:
            m = NS_RE.match(ns)
            if m is None or m.group(1) != prefix or ns not in existing:
                continue
            if _delete_namespace(ip, ns):
                deleted.append(ns)
            else:
                ok = False
        if ok:
            with contextlib.suppress(OSError):
                record.unlink()
    return deleted


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG survives the exec of `ip netns exec` and of the command it runs.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class NetnsLab:
    """N hosts on one bridged /24, each in its own network namespace. A context manager."""

    def __init__(self, n_hosts: int = 3, prefix: str | None = None, *, subnet: str = "10.213.0"):
        if not 1 <= n_hosts <= 250:
            raise ValueError(f"n_hosts must be in 1..250, got {n_hosts}")
        prefix = prefix if prefix is not None else new_prefix()
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {PREFIX_RE.pattern}, got {prefix!r}")
        self.n_hosts = n_hosts
        self.prefix = prefix
        self.subnet = subnet
        self.ip, self.nft = require_lab_support()
        self.bridge_ns = f"{prefix}-br"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._record = OWNER_DIR / f"{prefix}.json"
        self._owns_record = False
        self._closed = False

    # -- naming ---------------------------------------------------------------------------

    @property
    def hosts(self) -> list[int]:
        return list(range(1, self.n_hosts + 1))

    def ns(self, host: int) -> str:
        self._check_host(host)
        return f"{self.prefix}-h{host}"

    def addr(self, host: int) -> str:
        """The host's IPv4 address (no port)."""
        self._check_host(host)
        return f"{self.subnet}.{host}"

    def _check_host(self, host: int) -> None:
        if not 1 <= host <= self.n_hosts:
            raise ValueError(f"no host {host} (hosts are 1..{self.n_hosts})")

    def _namespaces(self) -> list[str]:
        return [self.bridge_ns] + [f"{self.prefix}-h{h}" for h in self.hosts]

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> NetnsLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        cleanup_stale_labs(self.ip, keep=self.prefix)
        taken = set(_list_namespaces(self.ip)) & set(self._namespaces())
        if taken or self._record.exists():
            raise RuntimeError(
                f"prefix {self.prefix!r} is in use by another lab; pick another prefix"
            )
        OWNER_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        me = psutil.Process()
        record = {"pid": me.pid, "started": me.create_time(), "namespaces": self._namespaces()}
        self._record.write_text(json.dumps(record), encoding="utf-8")
        self._owns_record = True

        ip, br = self.ip, self.bridge_ns
        self._add_ns(br)
        _run([ip, "-n", br, "link", "set", "lo", "up"])
        _run([ip, "-n", br, "link", "add", "br0", "type", "bridge"])
        _run([ip, "-n", br, "link", "set", "br0", "up"])
        for h in self.hosts:
            ns = self.ns(h)
            self._add_ns(ns)
            # The peer is created straight into the host namespace: nothing lands in root.
            _run([ip, "-n", br, "link", "add", f"vh{h}", "type", "veth",
                  "peer", "name", "eth0", "netns", ns])  # fmt: skip
            _run([ip, "-n", br, "link", "set", f"vh{h}", "master", "br0"])
            _run([ip, "-n", br, "link", "set", f"vh{h}", "up"])
            _run([ip, "-n", ns, "link", "set", "lo", "up"])
            _run([ip, "-n", ns, "addr", "add", f"{self.addr(h)}/24", "dev", "eth0"])
            _run([ip, "-n", ns, "link", "set", "eth0", "up"])

    def _add_ns(self, ns: str) -> None:
        _run([self.ip, "netns", "add", ns])
        self._created.append(ns)

    def close(self) -> None:
        """Kill every process started here or still inside a lab namespace; delete them all."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        failed = [ns for ns in reversed(self._created) if not _delete_namespace(self.ip, ns)]
        if not failed and self._owns_record:
            with contextlib.suppress(OSError):
                self._record.unlink()
        if failed:
            raise RuntimeError(f"could not delete namespaces {failed}")

    # -- processes ------------------------------------------------------------------------

    def exec(self, host: int, *argv: str, **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``host``'s namespace; the lab kills it at teardown.

        Keyword arguments go to :class:`subprocess.Popen`; by default the child gets its own
        session (so teardown can kill its whole group) and dies with this process.
        """
        if self._closed:
            raise RuntimeError("the lab is closed")
        # Finished processes need no teardown; forgetting them keeps long polls cheap.
        self._procs = [p for p in self._procs if p.poll() is None]
        popen_kw.setdefault("start_new_session", True)
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        user_preexec: Callable[[], Any] | None = popen_kw.pop("preexec_fn", None)

        def preexec() -> None:
            _die_with_parent()
            if user_preexec is not None:
                user_preexec()

        proc: subprocess.Popen[Any] = subprocess.Popen(
            [self.ip, "netns", "exec", self.ns(host), *argv], preexec_fn=preexec, **popen_kw
        )
        self._procs.append(proc)
        return proc

    def run(self, host: int, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host``'s namespace to completion; capture text output."""
        proc = self.exec(host, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        finally:
            self._procs.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # -- faults ---------------------------------------------------------------------------

    def cut(self, host: int) -> None:
        """Cut ``host``'s link: its bridge-side veth goes down."""
        _run([self.ip, "-n", self.bridge_ns, "link", "set", f"vh{self._host(host)}", "down"])

    def restore(self, host: int) -> None:
        """Reconnect ``host``'s link."""
        _run([self.ip, "-n", self.bridge_ns, "link", "set", f"vh{self._host(host)}", "up"])

    def link_up(self, host: int) -> bool:
        """Whether ``host``'s bridge-side veth is administratively up."""
        out = _run([self.ip, "-n", self.bridge_ns, "-o", "link", "show", f"vh{self._host(host)}"])
        flags = out.stdout.split("<", 1)[1].split(">", 1)[0].split(",")
        return "UP" in flags

    def _host(self, host: int) -> int:
        self._check_host(host)
        return host

    def drop_one_way(self, src_host: int, dst_host: int) -> None:
        """Drop, in ``dst_host``'s namespace, every packet coming from ``src_host``.

        ``dst`` can still send to ``src``: only the ``src -> dst`` direction is lost.
        """
        ns = self.ns(dst_host)
        # `add table` / `add chain` are idempotent, so several drops share one chain.
        self._nft(ns, "add table inet netnslab")
        self._nft(
            ns,
            "add chain inet netnslab input { type filter hook input priority 0 ; policy accept ; }",
        )
        self._nft(ns, f"add rule inet netnslab input ip saddr {self.addr(src_host)} counter drop")

    def allow_all(self, host: int) -> None:
        """Remove every rule :meth:`drop_one_way` added in ``host``'s namespace."""
        ns = self.ns(host)
        # Adding first makes the delete succeed whether or not a drop was ever installed.
        self._nft(ns, "add table inet netnslab")
        self._nft(ns, "delete table inet netnslab")

    def dropped_packets(self, host: int) -> int:
        """Packets the drop rules in ``host``'s namespace have discarded so far."""
        out = _run([self.ip, "netns", "exec", self.ns(host), self.nft, "-j", "list", "ruleset"])
        total = 0
        for item in json.loads(out.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule or rule.get("table") != "netnslab":
                continue
            for expr in rule.get("expr", []):
                counter = expr.get("counter") if isinstance(expr, dict) else None
                if isinstance(counter, dict):
                    total += int(counter.get("packets", 0))
        return total

    def _nft(self, ns: str, command: str) -> None:
        _run([self.ip, "netns", "exec", ns, self.nft, command])
