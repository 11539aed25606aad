"""Three real hosts in network namespaces: convergence, a link cut, a one-way nftables drop.

Each node is a real ``agentcluster node run`` process inside its own namespace, bound to
10.213.0.N:7946 on a bridged veth network (see ``tests/netns.py``); every view is read with
``agentcluster members`` run inside the node's namespace. The test process never talks to the
lab's addresses from the root namespace. These tests need root: without it they FAIL (CI runs
them as root); a missing ``nft`` is installed with ``scripts/ci-system-deps.sh``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentcluster.wire import Keyring
from netns import (
    OWNER_DIR,
    NetnsLab,
    NetnsUnavailable,
    cleanup_stale_labs,
    new_prefix,
    require_lab_support,
)

pytestmark = pytest.mark.slow

PORT = 7946
NAMES = {1: "n1", 2: "n2", 3: "n3"}
View = list[dict[str, Any]]


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    try:
        require_lab_support()
    except NetnsUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    with NetnsLab(3, new_prefix()) as the_lab:
        yield the_lab


class NetnsCluster:
    """One agentcluster node per lab host; views come from ``members`` inside each host."""

    def __init__(self, lab: NetnsLab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.key_file = workdir / "cluster.key"
        Keyring.generate().to_file(self.key_file)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def endpoint(self, host: int) -> str:
        return f"{self.lab.addr(host)}:{PORT}"

    def log_path(self, host: int) -> Path:
        return self.workdir / f"{NAMES[host]}.log"

    def start(self, host: int) -> None:
        argv = [
            sys.executable, "-m", "agentcluster.cli", "node", "run",
            "--name", NAMES[host], "--bind", self.endpoint(host), "--zone", f"z{host}",
            "--key-file", str(self.key_file), "--preset", "local", "--log-level", "info",
        ]  # fmt: skip
        if host != 1:
            argv += ["--seed", self.endpoint(1)]
        with open(self.log_path(host), "ab") as log:
            self.procs[host] = self.lab.exec(
                host, *argv, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def start_all(self, *, seed_first: bool = False) -> None:
        """Start every node; with ``seed_first``, the others only once n1 answers (so their
        first join attempt finds it, instead of waiting for the next discovery round)."""
        if seed_first:
            self.start(1)
            deadline = time.monotonic() + 20
            while self._query(1) is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"n1 never answered\n{self.report({})}")
        for host in self.lab.hosts:
            if host not in self.procs:
                self.start(host)

    def _query(self, host: int) -> View | None:
        return self._collect(self._members_query(host))

    @staticmethod
    def _collect(proc: subprocess.Popen[str]) -> View | None:
        try:
            stdout, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return None
        try:
            return json.loads(stdout) if proc.returncode == 0 else None
        except ValueError:
            return None

    def _members_query(self, host: int) -> subprocess.Popen[str]:
        argv = [
            sys.executable, "-m", "agentcluster.cli", "members", "--node", self.endpoint(host),
            "--key-file", str(self.key_file), "--json", "--timeout", "2",
        ]  # fmt: skip
        return self.lab.exec(host, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def views(self) -> dict[int, View | None]:
        """Each node's member list, asked in parallel (None where it did not answer)."""
        queries = {host: self._members_query(host) for host in self.lab.hosts}
        return {host: self._collect(proc) for host, proc in queries.items()}

    def wait_for(
        self, what: str, pred: Callable[[dict[int, View | None]], bool], *, timeout: float
    ) -> tuple[float, dict[int, View | None]]:
        """Poll the views until ``pred`` holds; return (seconds waited, the views)."""
        start = time.monotonic()
        deadline = start + timeout
        views = self.views()
        while not pred(views):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for: {what}\n{self.report(views)}")
            views = self.views()
        return time.monotonic() - start, views

    def report(self, views: dict[int, View | None]) -> str:
        lines = []
        for host, view in views.items():
            summary = (
                "no answer"
                if view is None
                else ", ".join(f"{m['name']}={m['state']}/{m['incarnation']}" for m in view)
            )
            lines.append(f"  {NAMES[host]} sees: {summary}")
        for host in self.lab.hosts:
            proc = self.procs.get(host)
            status = "not started" if proc is None else f"exit={proc.poll()}"
            try:
                tail = self.log_path(host).read_text(errors="replace").splitlines()[-25:]
            except OSError:
                tail = []
            lines.append(f"--- {NAMES[host]} ({status}) log tail:")
            lines += [f"    {line}" for line in tail]
        return "\n".join(lines)


def state_of(view: View | None, name: str) -> str | None:
    for m in view or []:
        if m["name"] == name:
            return str(m["state"])
    return None


def member(view: View | None, name: str) -> dict[str, Any]:
    for m in view or []:
        if m["name"] == name:
            return m
    raise KeyError(name)


def all_alive(views: dict[int, View | None]) -> bool:
    return all(
        view is not None and all(state_of(view, n) == "alive" for n in NAMES.values())
        for view in views.values()
    )


def udp_reaches(lab: NetnsLab, src: int, dst: int, *, port: int = 9000) -> bool:
    """Whether UDP datagrams sent from ``src`` arrive at ``dst`` within 1.5 s."""
    listener = lab.exec(
        dst, sys.executable, "-c",
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind(({lab.addr(dst)!r}, {port}))\n"
        "print('ready', flush=True)\n"
        "s.settimeout(1.5)\n"
        "try:\n"
        "    s.recvfrom(64)\n"
        "except TimeoutError:\n"
        "    sys.exit(1)\n",
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    sender = lab.exec(
        src, sys.executable, "-c",
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(60):\n"
        f"    s.sendto(b'probe', ({lab.addr(dst)!r}, {port}))\n"
        "    time.sleep(0.05)\n",  # the probe sender paces itself (noqa: sleep)
    )  # fmt: skip
    try:
        return listener.wait(timeout=10) == 0
    finally:
        sender.kill()
        sender.wait()


def test_lab_faults_are_real(lab: NetnsLab) -> None:
    """The harness itself: a cut isolates a host, a one-way drop blocks one direction only,
    and nothing of the lab leaks into the root namespace."""
    root_addrs = subprocess.run(
        [lab.ip, "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    assert "10.213." not in root_addrs
    assert udp_reaches(lab, 1, 3)
    lab.cut(3)
    assert not lab.link_up(3)
    assert not udp_reaches(lab, 1, 3)
    assert not udp_reaches(lab, 3, 2)
    lab.restore(3)
    assert udp_reaches(lab, 1, 3)
    lab.drop_one_way(1, 3)
    assert not udp_reaches(lab, 1, 3)
    assert udp_reaches(lab, 3, 1)
    assert udp_reaches(lab, 2, 3)
    assert lab.dropped_packets(3) > 0
    lab.allow_all(3)
    assert lab.dropped_packets(3) == 0
    assert udp_reaches(lab, 1, 3)


def test_stale_namespaces_of_a_dead_owner_are_cleaned_up() -> None:
    """A lab whose owner died is deleted; a look-alike namespace without a record is not."""
    try:
        ip, _ = require_lab_support()
    except NetnsUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time()
    dead.wait()
    stale, lookalike = new_prefix(), new_prefix()
    while lookalike == stale:
        lookalike = new_prefix()
    stale_ns, lookalike_ns = f"{stale}-h1", f"{lookalike}-h1"
    record = OWNER_DIR / f"{stale}.json"
    OWNER_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        for ns in (stale_ns, lookalike_ns):
            subprocess.run([ip, "netns", "add", ns], check=True, timeout=15)
        record.write_text(
            json.dumps({"pid": dead.pid, "started": started, "namespaces": [stale_ns]})
        )
        deleted = cleanup_stale_labs(ip)
        listed = subprocess.run(
            [ip, "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert stale_ns in deleted
        assert stale_ns not in listed
        assert lookalike_ns in listed
        assert not record.exists()
    finally:
        for ns in (stale_ns, lookalike_ns):
            subprocess.run([ip, "netns", "del", ns], capture_output=True, check=False)
        record.unlink(missing_ok=True)


def test_three_hosts_converge(lab: NetnsLab, tmp_path: Path) -> None:
    """All three start at once, so the seed n1 may come up after the others: their first
    join attempt can fail and the next discovery round (10 s later) must bring them in."""
    cluster = NetnsCluster(lab, tmp_path)
    cluster.start_all()
    took, views = cluster.wait_for("every node lists n1..n3 alive", all_alive, timeout=25)
    for view in views.values():
        for host, name in NAMES.items():
            m = member(view, name)
            assert m["addr"] == cluster.endpoint(host)
            assert m["zone"] == f"z{host}"
    print(f"netns convergence: {took:.2f}s")


def test_link_cut_is_detected_and_heals(lab: NetnsLab, tmp_path: Path) -> None:
    """Cutting host 3's link: n1 and n2 declare n3 dead within 5 s; n3, alone, declares both
    of them dead too, but later (by design, not bounded here beyond the wait): every probe
    it sends fails and no nack ever comes back, so Lifeguard's local-health awareness tells
    it that *it* is the likely sick one and stretches its own probe and suspicion timers.
    After the link comes back the two sides merge (n3 learns it was declared dead and
    refutes with a higher incarnation): all three alive again within 30 s."""
    cluster = NetnsCluster(lab, tmp_path)
    cluster.start_all(seed_first=True)
    cluster.wait_for("initial convergence", all_alive, timeout=20)
    inc_before = member(cluster.views()[3], "n3")["incarnation"]

    cut_at = time.time()
    lab.cut(3)

    def partitioned(views: dict[int, View | None]) -> bool:
        return (
            state_of(views[1], "n3") == "dead"
            and state_of(views[2], "n3") == "dead"
            and state_of(views[3], "n1") == "dead"
            and state_of(views[3], "n2") == "dead"
        )

    _, views = cluster.wait_for("both sides of the cut see the other dead", partitioned, timeout=35)
    # changed_at is the observer's wall clock when the state changed; every namespace shares
    # this machine's clock, so it measures detection without the polling delay.
    majority = {h: member(views[h], "n3")["changed_at"] - cut_at for h in (1, 2)}
    minority = {n: member(views[3], n)["changed_at"] - cut_at for n in ("n1", "n2")}
    print(f"netns cut: n3 dead after {majority}; n3 saw n1/n2 dead after {minority}")
    for host, delay in majority.items():
        assert 0 <= delay <= 5.0, f"n{host} took {delay:.2f}s to declare n3 dead"
    for name, delay in minority.items():
        assert delay >= 0, f"n3 declared {name} dead before the cut"
    # The majority keeps each other alive throughout.
    assert state_of(views[1], "n2") == "alive"
    assert state_of(views[2], "n1") == "alive"

    lab.restore(3)
    took, views = cluster.wait_for("the partition heals", all_alive, timeout=30)
    print(f"netns heal: all alive {took:.2f}s after the link came back")
    # n3 was declared dead, so rejoining means refuting with a higher incarnation.
    assert member(views[1], "n3")["incarnation"] > inc_before


def test_one_way_drop_keeps_the_victim_alive_through_indirect_probes(
    lab: NetnsLab, tmp_path: Path
) -> None:
    """Host 3 drops every packet from host 1 (n1 -> n3 is lost; n3 -> n1 still flows).

    SWIM's answer: n1's direct pings to n3 go unanswered, so n1 asks n2 (ping-req); n2
    reaches n3 and relays the ack, so n3 is never declared dead. Symmetrically, n1's acks to
    n3's pings are lost, and n3 confirms n1 through n2 the same way. A suspicion may be raised
    and refuted in between, but nobody may declare anybody dead during the 10 s window. The
    rule's counter proves n1 did send to n3 and lost it. Removing the rule converges again.
    """
    cluster = NetnsCluster(lab, tmp_path)
    cluster.start_all(seed_first=True)
    cluster.wait_for("initial convergence", all_alive, timeout=20)

    lab.drop_one_way(1, 3)
    window_end = time.monotonic() + 10.0
    polls = 0
    suspicions: set[tuple[int, str]] = set()
    while time.monotonic() < window_end:
        views = cluster.views()
        polls += 1
        for host, view in views.items():
            assert view is not None, f"n{host} stopped answering\n{cluster.report(views)}"
            for name in NAMES.values():
                state = state_of(view, name)
                assert state in ("alive", "suspect"), (
                    f"n{host} sees {name} {state} under a one-way drop\n{cluster.report(views)}"
                )
                if state == "suspect":
                    suspicions.add((host, name))
    dropped = lab.dropped_packets(3)
    print(f"netns one-way: {polls} polls, {dropped} packets dropped, suspicions {suspicions}")
    assert polls >= 3
    assert dropped > 0, "the nftables rule never dropped a packet from n1"

    lab.allow_all(3)
    took, _ = cluster.wait_for("convergence after the drop is lifted", all_alive, timeout=30)
    print(f"netns one-way: all alive {took:.2f}s after the rule was removed")
