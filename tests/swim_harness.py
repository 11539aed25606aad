"""A small seeded discrete-event simulation that drives N SWIM cores (test support).

Theory of operation: one heap of timed callbacks is the whole world. Each node is a
:class:`~agentcluster.membership.swim.Swim` core; after every input the harness drains
``core.ready()``: packets enter the network (per-link delay with jitter, loss), stream
requests become a request/reply exchange with the target core (reliable, but subject to the
target being crashed or stalled, and to the request's timeout), events go to a log, and the
node's next tick is scheduled at ``core.next_deadline()``.

Faults: a *crashed* node processes nothing and drops everything sent to it (streams to it are
refused); a *stalled* node is alive but its "event loop" is blocked -- packets and stream
requests addressed to it queue up, its timers do not fire, and when the stall ends the queue is
processed first (in arrival order) and then the node ticks, which is what asyncio does after a
blocking call. Packets are round-tripped through msgpack so the wire types are exercised.

Everything random comes from seeded ``random.Random`` instances and nothing iterates a set, so
the same seed gives the same event log, byte for byte.

The second half is for synchronous core tests: :class:`Wire` connects cores by an
instantaneous network (cuttable per link or node) and ticks each core exactly at its
``next_deadline()``, so times in assertions are exact; :func:`lonely` makes a core that knows
peers which never answer, to isolate one rule.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from agentcluster.membership.config import SwimConfig
from agentcluster.membership.messages import (
    Alive,
    Dead,
    Gossip,
    MemberEvent,
    Message,
    NodeMeta,
    StreamMessage,
    StreamRequest,
    Suspect,
)
from agentcluster.membership.swim import Swim
from agentcluster.membership.vivaldi import Vivaldi

__all__ = [
    "PLAIN",
    "LogEntry",
    "Sim",
    "SimNode",
    "Wire",
    "addr",
    "build_cluster",
    "cluster",
    "inject",
    "lonely",
    "percentile",
    "start_stalls",
]

# What the real wire adds to each packet payload: a (timestamp, message) msgpack tuple,
# a 15-byte frame header and a 16-byte AES-GCM tag.
FRAME_OVERHEAD = 41

_ENCODER = msgspec.msgpack.Encoder()
_PACKET_DECODER: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
_STREAM_DECODER: msgspec.msgpack.Decoder[StreamMessage] = msgspec.msgpack.Decoder(StreamMessage)


@dataclass
class SimNode:
    name: str
    addr: str
    core: Swim
    crashed: bool = False
    stalled_until: float = 0.0
    backlog: list[Callable[[], None]] = field(default_factory=list)
    tick_at: float = math.inf
    tick_version: int = 0
    packets_sent: int = 0
    bytes_sent: int = 0


@dataclass(frozen=True)
class LogEntry:
    at: float
    observer: str
    kind: str
    member: str
    incarnation: int
    accuser: str | None


class Sim:
    """N cores on a simulated network (see the module docstring)."""

    def __init__(
        self,
        seed: int,
        config: SwimConfig,
        *,
        delay: float = 0.0005,
        jitter: float = 0.0005,
        loss: float = 0.0,
        roundtrip: bool = True,
        vivaldi: bool = False,
        stall_streams: str = "queue",
    ) -> None:
        self.seed = seed
        self.config = config
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.roundtrip = roundtrip
        self.vivaldi = vivaldi
        # "queue": a stalled node answers streams when it wakes (a blocked event loop with the
        # kernel holding the connection); "refuse": streams to a stalled node fail at once.
        self.stall_streams = stall_streams
        self.now = 0.0
        self.rng = random.Random(f"net:{seed}")
        self.nodes: dict[str, SimNode] = {}
        self.by_addr: dict[str, SimNode] = {}
        self.log: list[LogEntry] = []
        self.crashes: dict[str, float] = {}
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._link_loss: dict[tuple[str, str], float] = {}
        self._gone: dict[tuple[str, str], list[float]] = {}
        self._cut: dict[tuple[str, str], None] = {}
        # Past lives of restarted nodes: (crashed at, restarted at, last incarnation).
        self._lives: dict[str, list[tuple[float, float, int]]] = {}

    # ------------------------------------------------------------------ scheduling
    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn))

    def run_until(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, fn = heapq.heappop(heap)
            self.now = max(self.now, when)
            fn()
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # ------------------------------------------------------------------ nodes
    def add_node(
        self,
        name: str,
        seeds: Iterable[str] = (),
        *,
        meta: NodeMeta | None = None,
        config: SwimConfig | None = None,
    ) -> SimNode:
        addr = f"{name}:7946"
        rng = random.Random(f"node:{self.seed}:{name}:{len(self.log)}")
        core = Swim(
            name,
            addr,
            config=config or self.config,
            rng=rng,
            now=self.now,
            meta=meta or NodeMeta(),
            vivaldi=Vivaldi(rng=random.Random(f"viv:{self.seed}:{name}")) if self.vivaldi else None,
        )
        node = SimNode(name, addr, core)
        self.nodes[name] = node
        self.by_addr[addr] = node
        seed_addrs = [self.nodes[s].addr for s in seeds]
        if seed_addrs:
            core.join(seed_addrs, self.now)
        self._flush(node)
        return node

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.crashed = True
        node.backlog.clear()
        self.crashes[name] = self.now

    def restart(self, name: str, seeds: Iterable[str]) -> SimNode:
        """A new process under the same name and address (state lost, incarnation 0)."""
        old = self.nodes[name]
        if not old.crashed:
            self.crash(name)
        self._lives.setdefault(name, []).append(
            (self.crashes.pop(name), self.now, old.core.incarnation)
        )
        return self.add_node(name, seeds)

    def stall(self, name: str, seconds: float) -> None:
        node = self.nodes[name]
        until = self.now + seconds
        if until <= node.stalled_until:
            return
        node.stalled_until = until
        self.at(until, lambda: self._unstall(node, until))

    def set_link_loss(self, src: str, dst: str, loss: float) -> None:
        """Loss on one direction of one link (overrides the global loss)."""
        self._link_loss[(self.nodes[src].addr, self.nodes[dst].addr)] = loss

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link (packets and streams, both ways) between the groups."""
        sides = [[self.nodes[n].addr for n in g] for g in groups]
        for i, side in enumerate(sides):
            for other in sides[i + 1 :]:
                for a in side:
                    for b in other:
                        self._cut[(a, b)] = None
                        self._cut[(b, a)] = None

    def heal(self) -> None:
        self._cut.clear()

    def _unstall(self, node: SimNode, until: float) -> None:
        if node.crashed or node.stalled_until != until:
            return
        backlog, node.backlog = node.backlog, []
        for work in backlog:
            if node.crashed:
                return
            work()
        node.core.tick(self.now)
        self._flush(node)

    def _run(self, node: SimNode, work: Callable[[], None]) -> None:
        if node.crashed:
            return
        if self.now < node.stalled_until:
            node.backlog.append(work)
        else:
            work()

    # ------------------------------------------------------------------ core plumbing
    def _flush(self, node: SimNode) -> None:
        if node.crashed:
            return
        ready = node.core.ready()
        for addr, msg in ready.packets:
            self._send_packet(node, addr, msg)
        for req in ready.streams:
            self._send_stream(node, req)
        for ev in ready.events:
            entry = LogEntry(ev.at, node.name, ev.kind, ev.member.name, ev.incarnation, ev.accuser)
            self.log.append(entry)
            if ev.kind in ("dead", "left"):
                self._gone.setdefault((node.name, ev.member.name), []).append(ev.at)
        deadline = node.core.next_deadline()
        if deadline < node.tick_at:
            node.tick_at = deadline
            node.tick_version += 1
            version = node.tick_version
            self.at(max(deadline, self.now), lambda: self._tick(node, version))

    def _tick(self, node: SimNode, version: int) -> None:
        if node.crashed or version != node.tick_version:
            return
        node.tick_at = math.inf
        if self.now < node.stalled_until:
            return  # _unstall ticks
        node.core.tick(self.now)
        # A tick must do everything that is due: otherwise a shell would spin.
        c = node.core
        assert c.next_deadline() > self.now, (
            "tick left work due",
            self.now,
            c._gossip_at,
            c._timers.next_at,
            c._push_pull_at,
            c._next_probe_at,
            c._probe and c._probe.deadline,
            len(c._bq),
            len(c._roster),
        )
        self._flush(node)

    def _send_packet(self, src: SimNode, addr: str, msg: Message) -> None:
        data = _ENCODER.encode(msg)
        src.packets_sent += 1
        src.bytes_sent += len(data) + FRAME_OVERHEAD
        loss = self._link_loss.get((src.addr, addr), self.loss)
        if loss > 0 and self.rng.random() < loss:
            return
        if (src.addr, addr) in self._cut:
            return
        dst = self.by_addr.get(addr)
        if dst is None:
            return
        arrive = self.now + self.delay + self.rng.random() * self.jitter
        delivered: Message = _PACKET_DECODER.decode(data) if self.roundtrip else msg
        src_addr = src.addr

        def deliver() -> None:
            if dst.crashed:
                return

            def work() -> None:
                dst.core.handle_packet(src_addr, delivered, self.now)
                self._flush(dst)

            self._run(dst, work)

        self.at(arrive, deliver)

    def _send_stream(self, src: SimNode, req: StreamRequest) -> None:
        done = [False]

        def finish(reply: StreamMessage | None) -> None:
            if done[0] or src.crashed:
                return
            done[0] = True

            def work() -> None:
                src.core.stream_result(req.request_id, reply, self.now)
                self._flush(src)

            self._run(src, work)

        self.at(self.now + req.timeout, lambda: finish(None))
        dst = self.by_addr.get(req.addr)
        hop = self.delay + self.rng.random() * self.jitter
        if (src.addr, req.addr) in self._cut:
            return  # a partition: the request times out
        if dst is None or dst.crashed:
            self.at(self.now + hop, lambda: finish(None))  # connection refused
            return
        message: StreamMessage = (
            _STREAM_DECODER.decode(_ENCODER.encode(req.message)) if self.roundtrip else req.message
        )
        src_addr = src.addr

        def arrive() -> None:
            if dst.crashed or (self.stall_streams == "refuse" and self.now < dst.stalled_until):
                finish(None)
                return

            def work() -> None:
                reply = dst.core.handle_stream(src_addr, message, self.now)
                self._flush(dst)
                if reply is not None and self.roundtrip:
                    reply = _STREAM_DECODER.decode(_ENCODER.encode(reply))
                self.at(self.now + hop, lambda: finish(reply))

            self._run(dst, work)

        self.at(self.now + hop, arrive)

    # ------------------------------------------------------------------ observations
    def live_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if not n.crashed]

    def converged(self, names: Iterable[str] | None = None) -> bool:
        """Every live node lists exactly the live nodes as alive (and nobody else)."""
        live = sorted(n.name for n in self.live_nodes()) if names is None else sorted(names)
        for node in self.live_nodes():
            alive = sorted(m.name for m in node.core.members() if m.state == "alive")
            if alive != live:
                return False
        return True

    def state_of(self, observer: str, member: str) -> str | None:
        m = self.nodes[observer].core.member(member)
        return None if m is None else m.state

    def detection_time(self, member: str) -> float | None:
        """Crash of ``member`` until the last live node marked it dead (None: not yet)."""
        crashed_at = self.crashes[member]
        worst = 0.0
        for node in self.live_nodes():
            times = [t for t in self._gone.get((node.name, member), ()) if t >= crashed_at]
            if not times:
                return None
            worst = max(worst, min(times) - crashed_at)
        return worst

    def false_positives(self) -> list[LogEntry]:
        """Dead events about a running process: neither after a crash of the current process
        nor about an incarnation of an earlier (crashed) life of that name."""
        out = []
        for e in self.log:
            if e.kind != "dead":
                continue
            crashed_at = self.crashes.get(e.member)
            if crashed_at is not None and e.at >= crashed_at:
                continue
            lives = self._lives.get(e.member, ())
            if any(c <= e.at and (e.at < r or e.incarnation <= inc) for c, r, inc in lives):
                continue
            out.append(e)
        return out

    def traffic(self) -> tuple[int, int]:
        nodes = self.nodes.values()
        return sum(n.packets_sent for n in nodes), sum(n.bytes_sent for n in nodes)

    def internal_errors(self) -> int:
        return sum(n.core.stats.dropped.get("internal_error", 0) for n in self.nodes.values())


def build_cluster(
    sim: Sim, n: int, *, prefix: str = "n", seeds: int = 1, spread: float = 0.02
) -> list[str]:
    """Start ``n`` nodes joining through the first ``seeds`` ones, ``spread`` s apart."""
    names = [f"{prefix}{i}" for i in range(n)]
    sim.add_node(names[0])
    for i, name in enumerate(names[1:], start=1):
        sim.run_for(spread)
        sim.add_node(name, names[: min(i, seeds)])
    return names


def start_stalls(
    sim: Sim,
    names: list[str],
    *,
    stall: tuple[float, float] = (0.3, 0.8),
    gap: tuple[float, float] = (1.0, 4.0),
    until: float = math.inf,
) -> None:
    """Make each of ``names`` stall for U(stall) seconds every U(gap) seconds, until ``until``."""
    rng = random.Random(f"stalls:{sim.seed}")

    def schedule(name: str) -> None:
        start = sim.now + rng.uniform(*gap)
        length = rng.uniform(*stall)
        if start + length > until:
            return

        def begin() -> None:
            if sim.nodes[name].crashed:
                return
            sim.stall(name, length)
            sim.at(sim.now + length, lambda: schedule(name))

        sim.at(start, begin)

    for name in names:
        schedule(name)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------- synchronous wiring

# A config with round numbers and no randomness-sensitive extras, for exact timing tests.
PLAIN = SwimConfig(
    probe_interval=1.0,
    probe_timeout=0.2,
    direct_retries=0,
    indirect_checks=2,
    ring_probe_ratio=0.0,
    suspicion_mult=2.0,
    suspicion_max_timeout_mult=3.0,
    suspicion_confirmations=2,
    suspicion_probers=0,
    awareness_scales_suspicion=False,
    gossip_interval=0.2,
    push_pull_interval=1000.0,
    reap_after=30.0,
)


def addr(name: str) -> str:
    return f"{name}:7946"


class Wire:
    """Cores connected by an instantaneous network that can be cut per link or per node."""

    def __init__(self, config: SwimConfig = PLAIN, *, seed: int = 1) -> None:
        self.config = config
        self.seed = seed
        self.now = 0.0
        self.cores: dict[str, Swim] = {}
        self.down: set[str] = set()  # crashed: receive and send nothing
        self.cut: set[tuple[str, str]] = set()  # (src, dst): packets dropped one way
        self.streams_cut: set[str] = set()  # streams to these nodes fail
        self.events: list[tuple[str, MemberEvent]] = []
        self.sent: list[tuple[str, str, Message]] = []
        self.keep: Callable[[str, str, Message], bool] = lambda src, dst, msg: True

    def add(self, name: str, seeds: tuple[str, ...] = (), **kw: object) -> Swim:
        core = Swim(
            name,
            addr(name),
            config=kw.pop("config", self.config),  # type: ignore[arg-type]
            rng=random.Random(f"{self.seed}:{name}"),
            now=self.now,
            **kw,  # type: ignore[arg-type]
        )
        self.cores[name] = core
        if seeds:
            core.join([addr(s) for s in seeds], self.now)
        self.pump()
        return core

    def by_addr(self, a: str) -> Swim | None:
        return self.cores.get(a.split(":")[0])

    def pump(self) -> None:
        """Deliver everything until no core has output left."""
        for _ in range(10_000):
            busy = False
            for name, core in list(self.cores.items()):
                out = core.ready()
                self.events.extend((name, ev) for ev in out.events)
                if name in self.down:
                    continue
                for dst_addr, msg in out.packets:
                    busy = True
                    self.sent.append((name, dst_addr, msg))
                    dst = self.by_addr(dst_addr)
                    if dst is None or dst.name in self.down or (name, dst.name) in self.cut:
                        continue
                    if not self.keep(name, dst.name, msg):
                        continue
                    dst.handle_packet(core.addr, msg, self.now)
                for req in out.streams:
                    busy = True
                    dst = self.by_addr(req.addr)
                    reply: StreamMessage | None = None
                    if dst is not None and dst.name not in self.down | self.streams_cut:
                        reply = dst.handle_stream(core.addr, req.message, self.now)
                    core.stream_result(req.request_id, reply, self.now)
            if not busy:
                return
        raise AssertionError("the cores never went quiet")

    def run_until(self, until: float) -> None:
        """Tick every (live) core at each of its deadlines up to ``until``."""
        while True:
            live = [c for n, c in self.cores.items() if n not in self.down]
            due = min((c.next_deadline() for c in live), default=math.inf)
            if due > until:
                break
            self.now = max(self.now, due)
            for core in live:
                if core.next_deadline() <= self.now:
                    core.tick(self.now)
                    assert core.next_deadline() > self.now, "tick left work due"
            self.pump()
        self.now = until

    def run(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_until_true(self, cond: Callable[[], bool], limit: float, step: float = 0.05) -> float:
        end = self.now + limit
        while not cond():
            if self.now >= end:
                raise AssertionError("condition not reached in time")
            self.run(step)
        return self.now

    def state(self, observer: str, member: str) -> str | None:
        m = self.cores[observer].member(member)
        return None if m is None else m.state

    def kinds(self, observer: str, member: str) -> list[str]:
        return [ev.kind for o, ev in self.events if o == observer and ev.member.name == member]


def cluster(names: str, config: SwimConfig = PLAIN, **kw: object) -> Wire:
    wire = Wire(config, **kw)  # type: ignore[arg-type]
    first, *rest = list(names)
    wire.add(first)
    for name in rest:
        wire.add(name, (first,))
    wire.run(2.0)
    for o in names:
        for m in names:
            assert wire.state(o, m) == "alive", (o, m)
    return wire


def lonely(config: SwimConfig, members: tuple[str, ...], now: float = 0.0) -> Swim:
    """A core that knows ``members`` (all at incarnation 0) but hears nothing from them."""
    core = Swim("me", addr("me"), config=config, rng=random.Random(7), now=now)
    gossip = tuple(Alive(m, addr(m), 0) for m in members)
    core.handle_packet(addr("src"), Gossip("src", gossip), now)
    core.ready()
    return core


def inject(core: Swim, *entries: Alive | Suspect | Dead, now: float) -> list[MemberEvent]:
    core.handle_packet(addr("src"), Gossip("src", entries), now)
    return core.ready().events


# ---------------------------------------------------------------------------- ad hoc runs


def main(argv: list[str] | None = None) -> None:
    """``python tests/swim_harness.py --n 200 --minutes 10``: the lossy/stalling scenario of
    the issue with crash detection, false positives and traffic figures (too slow for CI)."""
    import argparse
    import time

    from agentcluster.membership.config import preset

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--stallers", type=float, default=0.10, help="share of stalling nodes")
    ap.add_argument("--gap", type=float, nargs=2, default=(1.0, 4.0), help="s between stalls")
    ap.add_argument("--crashes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--preset", default="lan")
    ap.add_argument("--delay", type=float, default=0.0005, help="one-way delay (+ as jitter)")
    ap.add_argument("--streams", choices=("queue", "refuse"), default="refuse")
    args = ap.parse_args(argv)
    wall = time.monotonic()
    sim = Sim(args.seed, preset(args.preset), delay=args.delay, jitter=args.delay)
    sim.stall_streams = args.streams
    names = build_cluster(sim, args.n, seeds=3, spread=0.01)
    sim.run_for(5.0)
    print(f"joined: converged={sim.converged()} at {sim.now:.1f}s")
    p0, b0 = sim.traffic()
    sim.run_for(10.0)
    p1, b1 = sim.traffic()
    print(
        f"clean steady state: {(p1 - p0) / args.n / 10:.2f} packets/s/node, "
        f"{(b1 - b0) / args.n / 10:.0f} bytes/s/node"
    )
    sim.loss = args.loss
    rng = random.Random(args.seed)
    stallers = rng.sample(names[1:], int(args.n * args.stallers))
    end = sim.now + args.minutes * 60.0
    start_stalls(sim, stallers, gap=(args.gap[0], args.gap[1]), until=end)
    p0, b0, t0 = *sim.traffic(), sim.now
    victims = rng.sample([x for x in names[1:] if x not in stallers], args.crashes)
    step = (end - sim.now) / (args.crashes + 1)
    for victim in victims:
        sim.run_for(step)
        sim.crash(victim)
    sim.run_for(step)
    p1, b1 = sim.traffic()
    live = len(sim.live_nodes())
    times = [sim.detection_time(v) for v in victims]
    done = [t for t in times if t is not None]
    print(
        f"loss+stalls: {(p1 - p0) / live / (sim.now - t0):.2f} packets/s/node, "
        f"{(b1 - b0) / live / (sim.now - t0):.0f} bytes/s/node"
    )
    print(
        f"crash detection: {len(done)}/{len(times)} complete, p50={percentile(done, 50):.2f}s "
        f"p99={percentile(done, 99):.2f}s max={max(done, default=math.nan):.2f}s"
    )
    stats = [n.core.stats for n in sim.nodes.values()]
    print(
        f"false positives: {len(sim.false_positives())}, refutations: "
        f"{sum(s.refutations for s in stats)}, internal errors: {sim.internal_errors()}"
    )
    print(f"simulated {sim.now:.0f}s in {time.monotonic() - wall:.0f}s of wall time")


if __name__ == "__main__":
    main()
