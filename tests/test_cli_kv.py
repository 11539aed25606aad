"""``agentcluster kv`` against 3 real node processes on loopback.

One LocalCluster serves the whole module: its event loop runs in a thread of its own (so the
launcher keeps reaping its children between tests), and every test drives the store only
through the command line. Most commands run in-process through typer's CliRunner (a fresh
interpreter costs about a second per command); ``watch`` and the error paths whose exit code
and stderr matter run as real processes, the way a user runs them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from typer.testing import CliRunner

from agentcluster.cli.main import app
from agentcluster.launcher import LocalCluster, free_port
from agentcluster.store.base import LeaseNotFound
from agentcluster.testing import eventually
from agentcluster.wire import Keyring

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "agentcluster.cli"]
_ENV: dict[str, str | None] = {"AGENTCLUSTER_KEY_FILE": None}
T = TypeVar("T")


class Running:
    """The module's cluster and the loop (in its own thread) that owns its processes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cluster-loop")
        self.thread.start()
        self.cluster = LocalCluster(3, preset="local")

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 90.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.cluster.nodes]

    def argv(self, args: tuple[str, ...], nodes: list[str] | None, key: bool) -> list[str]:
        argv = ["kv", *args]
        for addr in self.addrs if nodes is None else nodes:
            argv += ["--node", addr]
        if key:
            argv += ["--key-file", str(self.cluster.key_file)]
        return argv

    def kv(
        self, *args: str, nodes: list[str] | None = None, key: bool = True, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        """``agentcluster kv ARGS`` in this process."""
        result = CliRunner().invoke(
            app, self.argv(args, nodes, key), input=stdin, env={**_ENV, "COLUMNS": "200"}
        )
        # Anything but a deliberate exit is a crash the user would see as a traceback.
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        return subprocess.CompletedProcess(
            args, result.exit_code, result.stdout_bytes, result.stderr_bytes
        )

    def proc(
        self, *args: str, nodes: list[str] | None = None, key: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """``agentcluster kv ARGS`` as a process of its own."""
        env = {k: v for k, v in os.environ.items() if k != "AGENTCLUSTER_KEY_FILE"}
        return subprocess.run(
            [*CLI, *self.argv(args, nodes, key)],
            capture_output=True,
            timeout=60,
            check=False,
            env=env,
        )

    def ok(self, *args: str, **kw: Any) -> str:
        out = self.kv(*args, **kw)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode()


async def _one_leader(cluster: LocalCluster) -> str | None:
    """The leader's name once every voter names the same one in the same term."""
    views = []
    for name in cluster.store_voters:
        try:
            store = (await cluster.ask(name, "stats", timeout=1.0))["store"]
        except Exception:
            return None
        views.append((store.get("leader"), store.get("term")))
    leader: str | None = views[0][0]
    return leader if all(v == views[0] for v in views) else None


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    r = Running()
    try:
        r.run(r.cluster.start())
        r.run(eventually(lambda: _one_leader(r.cluster), timeout=60))
        yield r
    finally:
        r.run(r.cluster.close())
        r.loop.call_soon_threadsafe(r.loop.stop)
        r.thread.join(10)
        r.loop.close()


def _no_traceback(out: subprocess.CompletedProcess[bytes]) -> str:
    err = out.stderr.decode()
    assert "Traceback" not in err, err
    return err


def test_put_get_round_trip_of_text_and_bytes(running: Running) -> None:
    rev1 = int(running.ok("put", "rt/greeting", "hello, store"))
    assert running.kv("get", "rt/greeting").stdout == b"hello, store"
    blob = bytes(range(256)) * 3
    rev2 = int(running.ok("put", "rt/blob", "--file", "-", stdin=blob))
    assert rev2 > rev1
    assert running.kv("get", "rt/blob").stdout == blob  # unchanged, no newline added


def test_entry_nodes_are_tried_in_order(running: Running) -> None:
    dead = f"127.0.0.1:{free_port(avoid=[int(a.rsplit(':', 1)[1]) for a in running.addrs])}"
    nodes = [dead, running.addrs[2]]
    rev = int(running.ok("put", "entry/k", "v", nodes=nodes))
    got = json.loads(running.ok("get", "entry/k", "--json", nodes=nodes))
    assert got["mod_revision"] == rev


def test_json_output_shapes(running: Running) -> None:
    put = json.loads(running.ok("put", "js/k", "one", "--json"))
    assert put == {"key": "js/k", "revision": put["revision"]}
    got = json.loads(running.ok("get", "js/k", "--json"))
    assert got == {
        "key": "js/k", "value": "one", "base64": False, "create_revision": put["revision"],
        "mod_revision": put["revision"], "version": 1, "lease": 0,
    }  # fmt: skip
    again = json.loads(running.ok("put", "js/k", "two", "--json"))
    got = json.loads(running.ok("get", "js/k", "--json"))
    assert (got["value"], got["version"]) == ("two", 2)
    assert (got["create_revision"], got["mod_revision"]) == (put["revision"], again["revision"])
    running.ok("put", "js/bin", "--file", "-", stdin=b"\xff\x00\xfe")
    got = json.loads(running.ok("get", "js/bin", "--json"))
    assert got["base64"] is True and base64.b64decode(got["value"]) == b"\xff\x00\xfe"


def test_delete_and_range(running: Running) -> None:
    for key in ("rg/c", "rg/a", "rg/b", "rh/x"):
        running.ok("put", key, f"value of {key}")
    rows = json.loads(running.ok("range", "rg/", "--json"))
    assert [r["key"] for r in rows] == ["rg/a", "rg/b", "rg/c"]
    assert rows[0]["value"] == "value of rg/a" and rows[0]["version"] == 1
    assert [r["key"] for r in json.loads(running.ok("range", "rg/", "--limit", "2", "--json"))] == [
        "rg/a",
        "rg/b",
    ]
    table = running.ok("range", "rg/", "--limit", "2")
    assert "rg/a" in table and "value of rg/b" in table and "rg/c" not in table
    assert "raise --limit" in table
    assert running.ok("del", "rg/a").strip() == "1"
    assert running.ok("del", "rg/a").strip() == "0"
    assert json.loads(running.ok("del", "rg/", "--prefix", "--json")) == {"deleted": 2}
    assert json.loads(running.ok("range", "rg/", "--json")) == []
    assert [r["key"] for r in json.loads(running.ok("range", "rh", "--json"))] == ["rh/x"]


def test_range_from_a_start_key_and_in_pages(running: Running) -> None:
    for i in range(7):
        running.ok("put", f"pg/{i}", f"v{i}")

    def keys(*args: str) -> list[str]:
        return [r["key"] for r in json.loads(running.ok("range", "pg/", "--json", *args))]

    assert keys("--start", "pg/3") == ["pg/3", "pg/4", "pg/5", "pg/6"]
    assert keys("--start", "pg/3", "--limit", "2") == ["pg/3", "pg/4"]
    assert keys("--start", "pg/7") == [] and keys("--start", "a") == keys()
    assert keys("--page", "2") == [f"pg/{i}" for i in range(7)]
    assert keys("--page", "2", "--limit", "5") == [f"pg/{i}" for i in range(5)]
    assert keys("--page", "3", "--start", "pg/2") == [f"pg/{i}" for i in range(2, 7)]
    table = running.ok("range", "pg/", "--page", "3")
    assert "7 keys under 'pg/' at revision" in table and "v6" in table
    assert "--page N" in running.ok("range", "pg/", "--limit", "2")  # how to see the rest
    assert running.kv("range", "pg/", "--page", "-1").returncode == 2


def test_a_range_too_large_for_one_answer_points_to_pages(running: Running) -> None:
    big = b"x" * (2500 << 10)  # two of them exceed one reply
    for key in ("big/a", "big/b"):
        running.ok("put", key, "--file", "-", stdin=big)
    out = running.kv("range", "big/")
    assert out.returncode == 1 and "--page N" in out.stderr.decode()
    rows = json.loads(running.ok("range", "big/", "--page", "100", "--json"))
    assert [r["key"] for r in rows] == ["big/a", "big/b"]
    assert all(len(r["value"]) == len(big) for r in rows)
    running.ok("del", "big/", "--prefix")


def test_get_of_a_missing_key_exits_1(running: Running) -> None:
    out = running.proc("get", "no/such/key")
    assert out.returncode == 1
    assert out.stdout == b""
    assert _no_traceback(out).strip() == "error: key 'no/such/key' not found"


class _Lines:
    """A pipe's lines, read by a thread, so a test can wait for one with a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self.thread.start()

    def _pump(self, pipe: IO[bytes]) -> None:
        for line in pipe:
            self.q.put(line.decode())

    def next(self, timeout: float = 30.0) -> str:
        return self.q.get(timeout=timeout)

    def rest(self) -> list[str]:
        self.thread.join(30)
        out = []
        while not self.q.empty():
            out.append(self.q.get_nowait())
        return out


def test_watch_receives_events_written_after_it_started(running: Running) -> None:
    cmd = [*CLI, "kv", "watch", "wt/", "--count", "3", "--json"]
    cmd += ["--key-file", str(running.cluster.key_file), "--node", running.addrs[1]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = _Lines(proc.stdout), _Lines(proc.stderr)
        ready = stderr.next()
        assert ready.startswith("watching 'wt/' from revision "), ready
        start = int(ready.rsplit(" ", 1)[1])
        r1 = int(running.ok("put", "wt/a", "1"))
        running.ok("put", "other/a", "not watched")
        r2 = int(running.ok("put", "wt/b", "two\nlines"))
        assert running.ok("del", "wt/a").strip() == "1"
        events = [json.loads(stdout.next()) for _ in range(3)]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert start <= r1 < r2
    assert [(e["type"], e["key"]) for e in events] == [
        ("put", "wt/a"),
        ("put", "wt/b"),
        ("delete", "wt/a"),
    ]
    assert [e["revision"] for e in events][:2] == [r1, r2]
    assert events[2]["revision"] > r2
    assert events[1]["value"] == "two\nlines" and events[2]["prev"]["value"] == "1"
    assert stdout.rest() == []


def test_watch_prints_each_event_at_once_and_stops_on_sigint(running: Running) -> None:
    cmd = [*CLI, *running.argv(("watch", "wi/"), [running.addrs[0]], True)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = _Lines(proc.stdout), _Lines(proc.stderr)
        assert stderr.next().startswith("watching 'wi/' from revision ")
        rev = int(running.ok("put", "wi/k", "live"))
        # The line arrives while the watch still runs: it is flushed per event.
        assert stdout.next() == f"{rev} put wi/k live\n"
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stdout.rest() == []
    assert "Traceback" not in "".join(stderr.rest())


def test_watch_from_a_revision_replays_history_as_lines(running: Running) -> None:
    r1 = int(running.ok("put", "wh/x", "first"))
    running.ok("put", "wh/x", "tab\there")
    running.ok("del", "wh/x")
    out = running.ok("watch", "wh/", "--from-revision", str(r1), "--count", "3")
    assert out.splitlines() == [
        f"{r1} put wh/x first",
        f"{r1 + 1} put wh/x " + json.dumps("tab\there"),
        f"{r1 + 2} delete wh/x",
    ]


def test_watch_quotes_keys_that_would_break_its_lines(running: Running) -> None:
    r1 = int(running.ok("put", "wq/a b", "1"))
    running.ok("put", "wq/n\nl", "2")
    running.ok("put", 'wq/"q', "3")
    out = running.ok("watch", "wq/", "--from-revision", str(r1), "--count", "3")
    assert out.splitlines() == [
        f"{r1} put " + json.dumps("wq/a b") + " 1",
        f"{r1 + 1} put " + json.dumps("wq/n\nl") + " 2",
        f'{r1 + 2} put wq/"q 3',  # a quote inside is no ambiguity: only a leading one is
    ]


def test_watch_stops_on_sigint_while_its_entry_node_hangs(running: Running, tmp_path: Path) -> None:
    # An entry node that takes the connection and never answers (stopped, overloaded):
    # Ctrl-C must end the first read at once, not after --timeout.
    accepted = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            accepted.set()
            conn.recv(1 << 16)  # held open, never answered

    threading.Thread(target=accept, daemon=True).start()
    cmd = [*CLI, *running.argv(("watch", "wh/", "--timeout", "30"), [f"127.0.0.1:{port}"], True)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert accepted.wait(30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read().decode()


def test_leases_attach_and_revoke(running: Running) -> None:
    # Enough leases that ids need more than one hex digit: text output is hex, JSON decimal.
    for _ in range(10):
        granted = json.loads(running.ok("lease", "grant", "60", "--json"))
    assert granted["ttl"] == 60.0 and granted["id"] >= 10
    lease = running.ok("lease", "grant", "60").strip()
    lease_id = int(lease, 16)
    assert lease_id == granted["id"] + 1
    running.ok("put", "ls/k", "leased", "--lease", lease)
    running.ok("put", "ls/k2", "leased", "--lease", hex(lease_id))
    assert json.loads(running.ok("get", "ls/k", "--json"))["lease"] == lease_id
    assert lease in running.ok("range", "ls/").split()
    running.ok("lease", "revoke", lease)
    assert json.loads(running.ok("range", "ls/", "--json")) == []
    out = running.kv("put", "ls/k", "v", "--lease", lease)
    assert out.returncode == 1
    assert _no_traceback(out) == f"error: lease {lease} not found\n"


def test_lease_keepalive_keeps_a_lease_past_its_ttl(running: Running) -> None:
    lease = running.ok("lease", "grant", "1.5").strip()
    running.ok("put", "lk/k", "v", "--lease", lease)
    t0 = time.monotonic()
    # Five refreshes a third of the TTL apart: the key outlives its first 1.5 s.
    out = running.ok("lease", "keepalive", lease, "--count", "5")
    assert out.splitlines() == [f"{lease} ttl 1.5"] * 5
    assert time.monotonic() - t0 >= 2.0
    assert json.loads(running.ok("get", "lk/k", "--json"))["lease"] == int(lease, 16)
    once = running.ok("lease", "keepalive", lease, "--once", "--json")
    assert json.loads(once) == {"id": int(lease, 16), "ttl": 1.5}
    running.ok("lease", "revoke", lease)
    out = running.kv("lease", "keepalive", lease)
    assert out.returncode == 1
    assert _no_traceback(out) == f"error: lease {lease} not found\n"
    out = running.kv("lease", "keepalive", "zz")
    assert out.returncode == 2 and "not a lease id" in _no_traceback(out)


def test_lease_keepalive_fails_when_the_lease_is_revoked_and_stops_on_sigint(
    running: Running,
) -> None:
    def start(lease: str) -> tuple[subprocess.Popen[bytes], _Lines, _Lines]:
        cmd = [*CLI, *running.argv(("lease", "keepalive", lease), [running.addrs[0]], True)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        return proc, _Lines(proc.stdout), _Lines(proc.stderr)

    revoked, kept = (running.ok("lease", "grant", "3").strip() for _ in range(2))
    running.ok("put", "lk/kept", "v", "--lease", kept)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        proc, stdout, stderr = start(revoked)
        procs.append(proc)
        assert stdout.next() == f"{revoked} ttl 3\n"
        running.ok("lease", "revoke", revoked)
        assert proc.wait(timeout=30) == 1  # at its next refresh, a second later
        assert "".join(stderr.rest()) == f"error: lease {revoked} expired or was revoked\n"

        proc, stdout, stderr = start(kept)
        procs.append(proc)
        assert stdout.next() == f"{kept} ttl 3\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in "".join(stderr.rest())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # Ctrl-C leaves the lease to run out by itself: its key is still there.
    assert json.loads(running.ok("get", "lk/kept", "--json"))["lease"] == int(kept, 16)
    running.ok("lease", "revoke", kept)


def test_lease_keepalive_gives_up_a_ttl_after_its_last_refresh(running: Running) -> None:
    leader = running.run(eventually(lambda: _one_leader(running.cluster), timeout=60))
    entry = next(n for n in running.cluster.nodes if n.name != leader)  # the cluster lives on
    lease = running.ok("lease", "grant", "2").strip()
    argv = running.argv(("lease", "keepalive", lease, "--timeout", "0.3"), [entry.addr], True)
    proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = _Lines(proc.stdout), _Lines(proc.stderr)
        assert stdout.next() == f"{lease} ttl 2\n"
        running.cluster.pause(entry.name)
        assert proc.wait(timeout=30) == 1
        err = "".join(stderr.rest())
    finally:
        running.cluster.resume(entry.name)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err
    assert err.startswith("warning: refresh failed, retrying: "), err
    assert err.splitlines()[-1].startswith(
        f"error: lease {lease}: no refresh for 2 s, its TTL; it may have expired ("
    ), err


async def test_ctrl_c_ends_a_wait_on_a_stuck_request_at_once() -> None:
    # What `kv watch`'s first read and each `kv lease keepalive` refresh wait in: Ctrl-C must
    # not wait out a hung entry node's timeout.
    from agentcluster.cli.kv import _unless_stopped

    stop, never = asyncio.Event(), asyncio.Event()
    stuck = asyncio.ensure_future(_unless_stopped(never.wait(), stop))
    await asyncio.sleep(0)  # noqa: sleep -- let the wait begin (one loop turn, no timing)
    assert not stuck.done()
    stop.set()
    async with asyncio.timeout(5):
        assert await stuck is None

    async def answer() -> int:
        return 7

    async def fail() -> int:
        raise LeaseNotFound("lease 1 not found")

    assert await _unless_stopped(answer(), asyncio.Event()) == 7
    with pytest.raises(LeaseNotFound):
        await _unless_stopped(fail(), asyncio.Event())


def test_bad_input_is_a_usage_error(running: Running) -> None:
    for args in (
        ("put", "k", "v", "--file", "-"),  # two values
        ("put", "k"),  # no value
        ("put", "k", "v", "--lease", "soon"),
        ("put", "k", "v", "--lease", "0"),
        ("lease", "revoke", "-1"),
        ("get", "k", "--limit", "1"),
    ):
        out = running.kv(*args)
        assert out.returncode == 2, args
        _no_traceback(out)
    for args, words in (
        (("put", "", "v"), "must not be empty"),
        (("get", ""), "must not be empty"),
        (("put", "k" * 9000, "v"), "longer than the store takes"),
        (("del", ""), "error: KEY: a key must not be empty"),
        (("del", "k" * 9000), "longer than the store takes"),
        (("del", "k" * 9000, "--prefix"), "longer than any key"),
        (("lease", "grant", "1e12"), "less than or equal to 315360000"),
    ):
        out = running.kv(*args)
        assert out.returncode == 2, args
        err = _no_traceback(out)
        assert words in err and "Expected" not in err, (args, err)
    out = running.kv("get", "k", nodes=["no-port"])
    assert out.returncode == 2 and "--node" in _no_traceback(out)


def test_a_wrong_key_file_fails_cleanly(running: Running, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    Keyring.generate().to_file(wrong)
    for args in (("get", "rt/greeting"), ("put", "wrong/k", "v")):
        run = running.proc if args[0] == "get" else running.kv
        out = run(*args, "--key-file", str(wrong), "--timeout", "2", key=False)
        assert out.returncode == 1, args
        err = _no_traceback(out)
        assert err.startswith("error: ") and "wrong cluster key" in err, err
    # A watch from a given revision fails at once too, rather than long-polling in vain.
    out = running.kv("watch", "", "--from-revision", "1", "--key-file", str(wrong), key=False)
    assert out.returncode == 1 and "wrong cluster key" in _no_traceback(out)
    out = running.kv("get", "k", "--key-file", str(tmp_path / "missing.key"), key=False)
    assert out.returncode == 1
    assert "cannot read key file" in _no_traceback(out)
    # Nothing was written with the wrong key.
    assert running.kv("get", "wrong/k").returncode == 1


def test_status_shows_exactly_one_leader(running: Running) -> None:
    rows = json.loads(running.ok("status", "--json"))
    assert [r["node"] for r in rows] == running.addrs
    leaders = [r for r in rows if r["state"] == "leader"]
    assert len(leaders) == 1
    assert {r["leader"] for r in rows} == {leaders[0]["name"]}
    assert len({r["term"] for r in rows}) == 1
    assert all(r["voter"] and r["commit_index"] >= r["applied_index"] >= 1 for r in rows)
    table = running.ok("status")
    assert table.count("leader") == 2  # the column and the leader's state
    assert all(a in table for a in running.addrs)

    dead = f"127.0.0.1:{free_port(avoid=[int(a.rsplit(':', 1)[1]) for a in running.addrs])}"
    out = running.kv("status", nodes=[running.addrs[0], dead])
    assert out.returncode == 1
    assert f"error: cannot reach {dead}" in _no_traceback(out)
    assert running.addrs[0] in out.stdout.decode()
