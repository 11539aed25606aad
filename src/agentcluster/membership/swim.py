"""SWIM + Lifeguard group membership as a sans-I/O core.

Theory of operation: :class:`Swim` is one node's membership protocol as a plain state
machine. Inputs are method calls carrying ``now`` (``handle_packet``, ``handle_stream``,
``stream_result``, ``tick``, ``join``, ``leave``, ``update_meta``); outputs pile up until the
shell drains them with :meth:`Swim.ready` (packets to send, stream requests to open, events);
:meth:`Swim.next_deadline` says when to call ``tick`` next. No sockets, no clocks, no global
random: the same inputs and seed give the same outputs.

*Failure detection* (SWIM, Das et al. 2002, as refined by hashicorp/memberlist): one probe
round per probe interval -- direct ping, optional retry, ``k`` indirect pings plus a stream ping
-- and no ack by the end of the round makes the target *suspect*. The probe loop lives in
``_probing`` (:class:`ProbeLoop`, our base class); targets come from a shuffled round robin
interleaved with our successor on a hash ring (``_probe_order``).

*Lifeguard* (Dadgar et al. 2018). LHA-Probe: a local health score (``_awareness``) stretches
our probe interval and timeout when we fail probes, miss nacks or have to refute. LHA-Suspicion:
a suspicion timer starts at its maximum and shrinks as distinct members confirm it
(``_suspicion``). Buddy system: a ping to a member we suspect carries the suspicion, and the
member refutes on the spot.

*Witnesses instead of cluster-wide suspicion gossip.* The accuser sends its suspicion directly
to the suspect (buddy system again) and to the suspect's next ``suspicion_probers`` alive ring
successors, its *witnesses*; they probe the suspect at once and, if their own probe fails,
confirm to the accusers and each other. Only these few members hold timers, so a refutation
has to reach only them -- it is sent to them directly (plus one gossip burst, then it only rides
on packets sent anyway) -- and a member that merely paused, which has answered the witnesses'
pings by the time their round ends, is never at the mercy of 200 timers. Pauses are frequent,
so suspicions and refutations cost a handful of packets, not a cluster-wide epidemic. The verdict, Dead, is gossiped to everyone. Another node's view that
a member is dead (push-pull, or a Dead older than what we know) is *hearsay*: it starts no
timer, we tell the member and probe it ourselves.

*State rules* (incarnation numbers). Alive(i) overrides Suspect/Dead only with i greater than
what we hold; Suspect(i) applies to an alive member with i >= ours; Dead(i) with i >= ours is
final for that incarnation (Dead by the member itself = "left"). A node that hears itself
suspected or declared dead takes an incarnation above the accusation and gossips Alive --
this is also how a restarted node wins back its name. A member that changes address may do so
only once it is dead or left (``dead_node_reclaim_time``); a conflicting claim seen earlier is
applied as soon as the old holder is declared dead. A node whose view is behind ours (a stale
suspicion or Dead) is told what we know.

*Incarnation bound.* A refutation takes one more than the accusation, so the accusations we
act on must leave room for it: Suspect and Dead at or above ``MAX_INCARNATION`` (far beyond
anything an honest member reaches, far below the wire's int64 limit) and Alive above it are
ignored and counted as ``incarnation_bound``. Otherwise a single forged Suspect at the top of
the range would make its target unrefutable -- its Alive would no longer decode anywhere.
(The price: a member pushed to the bound by such garbage can no longer be accused at all.)

*Dissemination*. Every change is queued (``_broadcasts``) and piggybacked on every packet we
send, up to ``packet_budget`` bytes; while the queue is not empty, :class:`Gossip` packets go
to ``gossip_nodes`` random members every ``gossip_interval`` -- and nothing when it is empty.
Deaths leave at once and are sent twice as often (everyone must hear of them), as are returns
from the dead; other news leaves at once when nothing else is pending and is paced otherwise,
so that bursts fill packets. Refutations are *passive*: piggybacked, never a reason to gossip. Push-pull state exchange over a stream
repairs what gossip missed: periodically (now and then with a member we hold dead, which heals
partitions), a few rounds after joining, and with any member that talks to us while unknown.

Bad input never raises: unknown members, stale sequence numbers, claims about ourselves from
the wrong address and the like are dropped and counted in ``stats.dropped``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from agentcluster.membership._awareness import Awareness
from agentcluster.membership._broadcasts import PACKET_KINDS, BroadcastQueue, Outbox
from agentcluster.membership._probe_order import ProbeOrder, Roster
from agentcluster.membership._probing import ProbeLoop
from agentcluster.membership._state import (
    T_LEARN,
    T_NACK,
    T_REAP,
    T_RELAY_END,
    T_SUSPECT,
    NodeState,
    PendingStream,
    Probe,
    Relay,
    SwimStats,
    Timers,
)
from agentcluster.membership._suspicion import Suspicion
from agentcluster.membership.config import SwimConfig
from agentcluster.membership.messages import (
    MAX_INCARNATION,
    Ack,
    Alive,
    Dead,
    EventKind,
    Gossip,
    GossipEntry,
    IndirectPing,
    Member,
    MemberEvent,
    MemberSnapshot,
    MemberState,
    Message,
    Nack,
    NodeMeta,
    Ping,
    PushPull,
    Ready,
    StreamAck,
    StreamMessage,
    StreamPing,
    StreamRequest,
    Suspect,
    validate_meta,
)
from agentcluster.membership.vivaldi import Vivaldi

__all__ = ["Member", "MemberEvent", "Ready", "StreamRequest", "Swim", "SwimStats"]

_INF = math.inf
# Bounds on what peers can make us hold.
_MAX_MEMBERS = 65_536
_MAX_CLAIMS = 256


class Swim(ProbeLoop):
    """One node's SWIM + Lifeguard membership state machine (see the module docstring)."""

    def __init__(
        self,
        name: str,
        addr: str,
        *,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        meta: NodeMeta = NodeMeta(),  # noqa: B008 - frozen, immutable default
        vivaldi: Vivaldi | None = None,
    ) -> None:
        if not name or len(name) > 128:
            raise ValueError("name must be 1-128 characters")
        if not addr or len(addr) > 262:
            raise ValueError("addr must be 1-262 characters")
        validate_meta(meta, config.max_meta_size)
        self.name = name
        self.addr = addr
        self.config = config
        self.stats = SwimStats()
        self._rng = rng
        self._vivaldi = vivaldi
        self._now = now
        self._incarnation = 0
        self._meta = meta
        self._left = False
        self._me = NodeState(name, addr, "alive", 0, meta, now)
        self._nodes: dict[str, NodeState] = {name: self._me}
        self._roster = Roster(rng)
        self._order = ProbeOrder(rng, name)
        self._bq = BroadcastQueue()
        self._out = Outbox(self._bq, config.packet_budget, config.retransmit_mult, self.stats)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._timers = Timers()
        self._suspicion_seq = 0
        self._seq = 0
        self._probe: Probe | None = None
        # Random phase, as memberlist staggers its tickers: nodes started together must not
        # probe in lockstep.
        self._next_probe_at = now + rng.uniform(0.0, config.probe_interval)
        self._ring_credit = 0.0
        self._urgent: dict[str, None] = {}
        self._relays: dict[int, Relay] = {}
        self._streams: dict[int, PendingStream] = {}
        self._request_id = 0
        self._gossip_at = _INF
        self._last_gossip = -_INF
        self._push_pull_at = now + rng.uniform(0.0, config.push_pull_interval)
        self._claims: dict[str, Alive] = {}
        self._strangers: dict[str, str] = {}
        self._stream_out: list[StreamRequest] = []
        self._events: list[MemberEvent] = []
        self._queue(name, Alive(name, addr, 0, meta), now)

    # ================================================================== inputs
    def join(self, seeds: Sequence[str], now: float) -> None:
        """Exchange state with every seed (push-pull over a stream, ``join=True``)."""
        self._now = now
        if self._left:
            # Rejoining after leave(): a new incarnation beats our own "left" record.
            self._left = False
            self._bump_incarnation(now)
            self._me.state = "alive"
            self._next_probe_at = now
        message = PushPull(self.name, self.addr, True, self._snapshot())
        for addr in dict.fromkeys(seeds):
            if addr and addr != self.addr:
                self._request_stream(addr, message, PendingStream("join"))

    def handle_packet(self, src_addr: str, msg: Message, now: float) -> None:
        """Process one decoded packet from ``src_addr``."""
        self._now = now
        kind = PACKET_KINDS.get(type(msg))
        if kind is None:
            self.stats.drop("unexpected_type")
            return
        received = self.stats.received
        received[kind] = received.get(kind, 0) + 1
        try:
            if msg.gossip:
                self._apply_gossip(msg.gossip, now)
            sender = self._nodes.get(msg.source)
            if sender is None or sender.state in ("dead", "left"):
                reply_addr = msg.source_addr if isinstance(msg, Ping | IndirectPing) else ""
                self._stranger(sender, msg.source, reply_addr or src_addr, now)
            if isinstance(msg, Ping):
                self._on_ping(src_addr, msg)
            elif isinstance(msg, Ack):
                self._on_ack(msg, now)
            elif isinstance(msg, IndirectPing):
                self._on_indirect_ping(src_addr, msg, now)
            elif isinstance(msg, Nack):
                self._on_nack(msg)
        except Exception:  # a malformed hand-built message must not kill the node
            self.stats.drop("internal_error")

    def handle_stream(self, src_addr: str, msg: StreamMessage, now: float) -> StreamMessage | None:
        """Answer a stream request synchronously (``None``: close without a reply)."""
        self._now = now
        try:
            if isinstance(msg, PushPull) and not msg.reply:
                self.stats.push_pulls_handled += 1
                reply = PushPull(self.name, self.addr, False, self._snapshot(), reply=True)
                self._merge(msg.states, msg.source, now)
                return reply
            if isinstance(msg, StreamPing):
                if msg.target != self.name:
                    self.stats.drop("wrong_target")
                    return None
                return StreamAck(msg.seq, self.name)
            self.stats.drop("unexpected_stream")
        except Exception:
            self.stats.drop("internal_error")
        return None

    def stream_result(self, request_id: int, reply: StreamMessage | None, now: float) -> None:
        """The outcome of a :class:`StreamRequest` (``None``: failed or timed out)."""
        self._now = now
        pending = self._streams.pop(request_id, None)
        if pending is None:
            self.stats.drop("unknown_stream")
            return
        try:
            if pending.kind == "ping":
                self._on_stream_ack(pending, reply, now)
            elif isinstance(reply, PushPull) and reply.reply:
                self._merge(reply.states, reply.source, now, quiet=pending.kind == "join")
                if pending.kind == "join":
                    # A follow-up sync a few rounds later picks up the members that joined
                    # at the same time as us, whose gossip went to those who knew them.
                    follow_up = now + 4 * self.config.probe_interval
                    self._push_pull_at = min(self._push_pull_at, follow_up)
            elif pending.kind == "join":
                self.stats.join_failures += 1
            else:
                self.stats.push_pull_failures += 1
        except Exception:
            self.stats.drop("internal_error")

    def tick(self, now: float) -> None:
        """Run everything that is due at ``now``."""
        self._now = now
        # One pass can make more work due at once (a failed probe confirming a suspicion whose
        # shortened deadline has passed): loop until nothing is due, so the shell never spins.
        for _ in range(8):
            self._run_timers(now)
            self._run_probe(now)
            if now >= self._gossip_at:
                self._gossip(now)
            if now >= self._push_pull_at:
                self._push_pull(now)
            if self.next_deadline() > now:
                break

    def next_deadline(self) -> float:
        """When :meth:`tick` must be called next (never infinite)."""
        deadline = min(self._gossip_at, self._timers.next_at)
        if not self._left:
            deadline = min(deadline, self._push_pull_at)
        if self._probe is not None:
            # The next round waits for this one to finish, however late that is.
            deadline = min(deadline, self._probe.deadline)
        elif not self._left:
            deadline = min(deadline, self._next_probe_at)
        if deadline == _INF:
            deadline = self._now + self.config.probe_interval
        return deadline

    def leave(self, now: float) -> None:
        """Announce a graceful departure (Dead about ourselves, accuser = ourselves). We keep
        answering probes and relaying until the shell stops, but probe nobody."""
        self._now = now
        if self._left:
            return
        self._left = True
        self._urgent.clear()
        self._me.state = "left"
        self._me.changed_at = now
        self._queue(self.name, Dead(self.name, self._incarnation, self.name), now, urgent=True)

    def update_meta(self, meta: NodeMeta, now: float) -> None:
        """Change our metadata: a new incarnation, gossiped as Alive. ``ValueError`` if the
        encoded metadata exceeds ``config.max_meta_size`` (or, only after a peer gossiped
        garbage about us, our incarnation is at ``MAX_INCARNATION``)."""
        validate_meta(meta, self.config.max_meta_size)
        if self._incarnation >= MAX_INCARNATION and not self._left:
            raise ValueError("our incarnation is at its bound: metadata can no longer change")
        self._now = now
        self._meta = meta
        self._me.meta = meta
        if not self._left:  # after leave() an Alive would undo it; join() announces it
            self._bump_incarnation(now)

    def ready(self) -> Ready:
        """Drain the outputs accumulated since the last call."""
        out = Ready(self._out.drain(), self._stream_out, self._events)
        self._stream_out, self._events = [], []
        return out

    # ================================================================== views
    def members(self) -> list[Member]:
        return [self._view(st) for st in self._nodes.values()]

    def member(self, name: str) -> Member | None:
        st = self._nodes.get(name)
        return None if st is None else self._view(st)

    def addr_of(self, name: str) -> str | None:
        """``member(name).addr`` without building the view: every call and Raft frame
        looks its target up."""
        st = self._nodes.get(name)
        return None if st is None else st.addr

    def health_score(self) -> int:
        return self._awareness.score

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def num_live(self) -> int:
        """Alive or suspect members, ourselves included (the n of the formulas)."""
        return len(self._roster) + 1

    def estimate_rtt(self, name: str) -> float | None:
        st = self._nodes.get(name)
        if self._vivaldi is None or st is None or st.coord is None:
            return None
        try:
            rtt = self._vivaldi.estimate_rtt(st.coord)
        except (ValueError, ArithmeticError):
            return None
        return rtt if math.isfinite(rtt) else None

    def suspicion_timeouts(self) -> tuple[float, float, int]:
        """(min, max, k) a suspicion started now would get (for tests and dashboards)."""
        return self.config.suspicion_bounds(self.num_live, self._awareness.multiplier)

    # ================================================================== state rules
    def _apply_gossip(self, entries: Sequence[GossipEntry], now: float) -> None:
        for entry in entries:
            if isinstance(entry, Alive):
                self._on_alive(entry, now)
            elif isinstance(entry, Suspect):
                self._on_suspect(entry, now)
            elif isinstance(entry, Dead):
                self._on_dead(entry, now)
            else:
                self.stats.drop("unknown_gossip")

    def _on_alive(self, a: Alive, now: float, *, gossip: bool = True) -> None:
        if a.incarnation > MAX_INCARNATION:
            self.stats.drop("incarnation_bound")
            return
        st = self._nodes.get(a.name)
        if st is None:
            if len(self._nodes) >= _MAX_MEMBERS:
                self.stats.drop("too_many_members")
                return
            st = NodeState(a.name, a.addr, "alive", a.incarnation, a.meta, now)
            self._nodes[a.name] = st
            self._make_live(st, now)
            if gossip:
                self._queue(a.name, a, now)
            self._emit("joined", st, None, 0, now)
            return
        moved = st.addr != a.addr
        if moved and not self._can_reclaim(st, now):
            self.stats.conflicts += 1
            self.stats.drop("addr_conflict")
            if st is self._me:
                if a.incarnation >= self._incarnation and not self._left:
                    self._refute(a.incarnation, None, now)
            elif a.name in self._claims or len(self._claims) < _MAX_CLAIMS:
                self._claims[a.name] = a
            return
        if st is self._me:
            if a.incarnation < self._incarnation or self._left:
                return
            if a.incarnation == self._incarnation and a.meta == self._meta:
                return  # our own Alive, echoed back
            self._refute(a.incarnation, None, now)
            return
        if a.incarnation <= st.incarnation and not moved:
            return
        old_state, old_meta = st.state, st.meta
        st.suspicion = None
        st.incarnation = a.incarnation
        st.meta = a.meta
        st.addr = a.addr
        self._claims.pop(a.name, None)
        if old_state != "alive":
            self._set_state(st, "alive", now)
        if old_state in ("dead", "left"):
            self._make_live(st, now)
        if gossip:
            # A return from the dead or new metadata is news for everyone; a refutation of a
            # suspicion (same metadata, higher incarnation) only rides along (see _refute).
            back = old_state in ("dead", "left")
            self._queue(
                a.name, a, now, boost=2 if back else 1, active=back or moved or old_meta != a.meta
            )
        if old_state in ("dead", "left"):
            self._emit("joined", st, None, 0, now)
            return
        if old_state == "suspect":
            self._emit("alive", st, None, 0, now)
        if old_meta != a.meta or moved:
            self._emit("updated", st, None, 0, now)

    def _on_suspect(self, s: Suspect, now: float) -> None:
        if s.incarnation >= MAX_INCARNATION:
            self.stats.drop("incarnation_bound")  # no incarnation left to refute it with
            return
        st = self._nodes.get(s.name)
        if st is None:
            self.stats.drop("unknown_member")
            return
        if s.accuser != self.name:
            # The accuser's view is behind ours (it missed some gossip): tell it what we know,
            # or it may declare a live member dead on its own -- or go on probing a dead one.
            if st.state == "alive" and s.incarnation < st.incarnation:
                self._tell(s.accuser, Alive(st.name, st.addr, st.incarnation, st.meta))
            elif st.state in ("dead", "left") and s.incarnation <= st.incarnation:
                by = st.name if st.state == "left" else self.name
                self._tell(s.accuser, Dead(st.name, st.incarnation, by))
        if s.incarnation < st.incarnation:
            return
        susp = st.suspicion
        if susp is not None:
            if susp.confirm(s.accuser):
                self.stats.confirmations += 1
                st.incarnation = s.incarnation
                self._timers.push(susp.deadline, T_SUSPECT, s.name, susp.token)
                if s.accuser == self.name:
                    self._announce(st, s)
            return
        if st.state != "alive":
            return
        if st is self._me:
            if not self._left:
                self._refute(s.incarnation, s.accuser, now)
            return
        minimum, maximum, k = self.suspicion_timeouts()
        st.incarnation = s.incarnation
        self._set_state(st, "suspect", now)
        self._suspicion_seq += 1
        susp = Suspicion(s.accuser, k, minimum, maximum, now, self._suspicion_seq)
        st.suspicion = susp
        self._timers.push(susp.deadline, T_SUSPECT, s.name, susp.token)
        self._emit("suspect", st, s.accuser, 0, now)
        if s.accuser == self.name:
            self.stats.suspicions += 1
            self._announce(st, s)
        elif self.name in self._witnesses(s.name) and not self._left:
            # We are one of the suspect's witnesses: check it ourselves, right away.
            self._urgent[s.name] = None
            if self._probe is None:
                self._next_probe_at = min(self._next_probe_at, now)

    def _witnesses(self, name: str) -> list[str]:
        """The members that check a suspicion of ``name``: its next alive ring successors."""
        nodes = self._nodes
        return self._order.successors_of(
            name, self.config.suspicion_probers, lambda other: nodes[other].state != "alive"
        )

    def _announce(self, st: NodeState, s: Suspect) -> None:
        """Our own probe failed: tell the suspect (buddy system), its witnesses and the other
        accusers directly. Suspicions are not gossiped cluster-wide: only these few members
        hold timers, and a refutation has to reach only them (plus the Dead, if it comes, is
        gossiped to everyone)."""
        targets = dict.fromkeys(self._witnesses(st.name))
        if st.suspicion is not None:
            targets.update(st.suspicion.accusers)
        targets[st.name] = None
        targets.pop(self.name, None)
        for name in targets:
            self._tell(name, s)

    def _tell(self, name: str, entry: GossipEntry) -> None:
        st = self._nodes.get(name)
        if st is not None and st is not self._me and st.state in ("alive", "suspect"):
            self._send(st.addr, Gossip(self.name), first=entry)

    def _on_dead(self, d: Dead, now: float) -> None:
        if d.incarnation >= MAX_INCARNATION:
            self.stats.drop("incarnation_bound")  # no incarnation left to refute it with
            return
        st = self._nodes.get(d.name)
        if st is None:
            self.stats.drop("unknown_member")
            return
        if d.incarnation < st.incarnation:
            # Someone with an older view of the member found it unresponsive: check it (or,
            # about us, tell the accuser who we are now).
            if st is self._me:
                self._tell(d.accuser, Alive(self.name, self.addr, self._incarnation, self._meta))
            else:
                self._hearsay(Suspect(d.name, st.incarnation, d.accuser), now)
            return
        susp = st.suspicion
        st.suspicion = None
        if st.state in ("dead", "left"):
            return
        if st is self._me:
            self._refute(d.incarnation, d.accuser, now)
            return
        st.incarnation = d.incarnation
        gone: MemberState = "left" if d.accuser == d.name else "dead"
        self._set_state(st, gone, now)
        self._make_dead(st, now)
        self._queue(d.name, d, now, urgent=True)
        self._emit(gone, st, d.accuser, susp.confirmations if susp is not None else 0, now)
        claim = self._claims.pop(d.name, None)
        if claim is not None and self._can_reclaim(st, now):
            self._on_alive(claim, now)

    def _refute(self, accused: int, accuser: str | None, now: float) -> None:
        if accused >= MAX_INCARNATION:
            # Only an Alive about us at the bound gets here (accusations there are ignored):
            # a refutation above it would not decode anywhere.
            self.stats.drop("incarnation_bound")
            return
        self._incarnation = max(self._incarnation, accused)
        self._awareness.apply(1)
        self.stats.refutations += 1
        alive = self._bump_incarnation(now, active=False)
        # Only the accusers and our witnesses hold suspicion timers: they are told directly
        # (the accuser twice: it holds the earliest timer and its round is over, so no ack of
        # ours will reach it), plus one gossip burst; after that the news only rides on
        # packets sent anyway -- for everyone else it is just a newer incarnation number, and
        # a suspicion stale by it is answered when it arrives. Refutations are the frequent
        # kind of news (every pause of a member), so they must cost a handful of packets.
        targets = dict.fromkeys(self._witnesses(self.name))
        if accuser is not None:
            self._tell(accuser, alive)
            targets[accuser] = None
        for name in targets:
            self._tell(name, alive)
        cfg = self.config
        for name in self._roster.gossip_targets(cfg.gossip_nodes, now):
            self._tell(name, alive)

    def _bump_incarnation(self, now: float, *, active: bool = True) -> Alive:
        self._incarnation = min(self._incarnation + 1, MAX_INCARNATION)
        self._me.incarnation = self._incarnation
        alive = Alive(self.name, self.addr, self._incarnation, self._meta)
        self._queue(self.name, alive, now, urgent=True, active=active)
        return alive

    def _can_reclaim(self, st: NodeState, now: float) -> bool:
        if st.state == "left":
            return True
        reclaim = self.config.dead_node_reclaim_time
        return st.state == "dead" and reclaim is not None and now - st.changed_at >= reclaim

    def _merge(
        self, states: Sequence[MemberSnapshot], source: str, now: float, *, quiet: bool = False
    ) -> None:
        """Apply a push-pull state. ``quiet`` (the reply to our own join): what we learn is
        old news to everyone else, so it is not re-gossiped -- a joiner would otherwise
        broadcast the whole membership λ·log(n) times."""
        for s in states:
            if s.state == "alive":
                self._on_alive(Alive(s.name, s.addr, s.incarnation, s.meta), now, gossip=not quiet)
            elif s.state == "left":
                self._on_dead(Dead(s.name, s.incarnation, s.name), now)
            else:
                self._hearsay(Suspect(s.name, s.incarnation, source), now)

    def _stranger(self, st: NodeState | None, name: str, addr: str, now: float) -> None:
        """A member we hold dead, or have never heard of, talks to us.

        Dead: tell it so. If it is a new incarnation that we missed, it answers with its
        Alive (a stale accusation); if not (a partition, a pause), it refutes. Unknown: its
        Alive is probably on its way; if we still do not know it two rounds later, we missed
        that gossip (we joined through a seed that did not know it yet) -- sync with it."""
        if st is not None:
            if st.state == "dead":  # a member that left and talks again will announce itself
                dead = Dead(name, st.incarnation, self.name)
                self._send(addr, Gossip(self.name), first=dead)
            return
        if name in self._strangers or len(self._strangers) >= _MAX_CLAIMS:
            return
        self._strangers[name] = addr
        self._timers.push(now + 2 * self.config.probe_interval, T_LEARN, name)

    def _hearsay(self, s: Suspect, now: float) -> None:
        """Another node's view says ``s.name`` is suspect or dead. Unlike memberlist we start
        no timer on hearsay (after a partition heals, one push-pull would otherwise start
        timers for half the cluster): the member is told, so it refutes, and we probe it."""
        st = self._nodes.get(s.name)
        if st is None or st.state != "alive" or s.incarnation < st.incarnation:
            return
        if s.incarnation >= MAX_INCARNATION:
            self.stats.drop("incarnation_bound")
            return
        if st is self._me:
            self._on_suspect(s, now)
            return
        if s.name in self._urgent:
            return  # already being checked
        self._tell(s.name, s)
        if not self._left:
            self._urgent[s.name] = None
            if self._probe is None:
                self._next_probe_at = min(self._next_probe_at, now)

    # ================================================================== bookkeeping
    def _set_state(self, st: NodeState, state: MemberState, now: float) -> None:
        st.state = state
        st.changed_at = now
        st.version += 1

    def _make_live(self, st: NodeState, now: float) -> None:
        if st is self._me or not self._roster.add(st.name):
            return
        self._order.add(st.name)
        if self._bq.active:
            paced = max(now, self._last_gossip + self.config.gossip_interval)
            self._gossip_at = min(self._gossip_at, paced)

    def _make_dead(self, st: NodeState, now: float) -> None:
        self._roster.remove(st.name, now)
        self._order.remove(st.name)
        self._urgent.pop(st.name, None)
        self._timers.push(now + self.config.reap_after, T_REAP, st.name, st.version)

    def _run_timers(self, now: float) -> None:
        while (due := self._timers.pop_due(now)) is not None:
            kind, key, token = due
            if kind == T_SUSPECT:
                self._suspicion_expired(str(key), token, now)
            elif kind == T_NACK:
                relay = self._relays.get(int(key))
                if relay is not None and relay.nack:
                    relay.nack = False
                    self.stats.nacks_sent += 1
                    self._send(relay.addr, Nack(relay.seq, self.name))
            elif kind == T_RELAY_END:
                self._relays.pop(int(key), None)
            elif kind == T_LEARN:
                addr = self._strangers.pop(str(key), None)
                if addr is not None and str(key) not in self._nodes and not self._left:
                    message = PushPull(self.name, self.addr, False, self._snapshot())
                    self._request_stream(addr, message, PendingStream("push_pull"))
            else:
                self._reap(str(key), token, now)

    def _suspicion_expired(self, name: str, token: int, now: float) -> None:
        st = self._nodes.get(name)
        susp = st.suspicion if st is not None else None
        if st is None or susp is None or susp.token != token or st.state != "suspect":
            return
        if now < susp.deadline:  # an earlier entry for a deadline that has since moved
            self._timers.push(susp.deadline, T_SUSPECT, name, token)
            return
        self.stats.deaths_declared += 1
        self._on_dead(Dead(name, st.incarnation, self.name), now)

    def _reap(self, name: str, version: int, now: float) -> None:
        st = self._nodes.get(name)
        if st is None or st.version != version or st.state not in ("dead", "left"):
            return
        del self._nodes[name]
        self._roster.forget(name)
        self._claims.pop(name, None)
        if self._vivaldi is not None:
            self._vivaldi.forget(name)
        self._emit("reaped", st, None, 0, now)

    def _emit(
        self, kind: EventKind, st: NodeState, accuser: str | None, confirmations: int, now: float
    ) -> None:
        member = self._view(st)
        self._events.append(MemberEvent(kind, member, st.incarnation, accuser, confirmations, now))

    def _view(self, st: NodeState) -> Member:
        coord = st.coord
        if st is self._me and self._vivaldi is not None:
            coord = self._vivaldi.coordinate
        return Member(st.name, st.addr, st.state, st.incarnation, st.meta, st.changed_at, coord)

    def _snapshot(self) -> tuple[MemberSnapshot, ...]:
        return tuple(
            MemberSnapshot(st.name, st.addr, st.state, st.incarnation, st.meta)
            for st in self._nodes.values()
        )

    # ================================================================== dissemination
    def _queue(
        self,
        key: str,
        entry: GossipEntry,
        now: float,
        *,
        urgent: bool = False,
        boost: int = 1,
        active: bool = True,
    ) -> None:
        # Deaths and returns from the dead are sent twice as often (boost 2): a member that
        # misses one (probability ~exp(-limit)) would keep a wrong view until it probes the
        # member itself. New members (a missed one is caught when it talks to us, or by the
        # follow-up sync) and refutations, the frequent kinds, keep the normal limit.
        self._bq.queue(key, entry, boost=2 if isinstance(entry, Dead) else boost, active=active)
        if not self._roster or not active:
            return
        if urgent or self._bq.active == 1:
            # A death, or news when nothing else is pending, leaves at once: each hop then
            # costs a network delay, not a gossip interval.
            self._gossip_at = now
        else:
            # A backlog (a wave of joins) is paced, so that it fills packets instead of
            # multiplying them.
            paced = max(now, self._last_gossip + self.config.gossip_interval)
            self._gossip_at = min(self._gossip_at, paced)

    def _gossip(self, now: float) -> None:
        self._gossip_at = _INF
        if not self._bq.active:
            return  # passive entries only ride on packets sent anyway
        cfg = self.config
        targets = self._roster.gossip_targets(cfg.gossip_nodes, now - cfg.gossip_to_the_dead_time)
        if not targets:
            return  # re-armed when a member appears
        for name in targets:
            if not self._send(self._nodes[name].addr, Gossip(self.name), need_gossip=True):
                break
            self.stats.gossip_packets += 1
        self._last_gossip = now
        if self._bq.active:
            self._gossip_at = now + cfg.gossip_interval

    def _push_pull(self, now: float) -> None:
        cfg = self.config
        self._push_pull_at = now + cfg.push_pull_interval_for(self.num_live)
        if self._left:
            return
        # Now and then a member we hold dead (Serf's "reconnect"): if it is in fact alive --
        # a healed partition -- the exchange makes both sides refute and merge again. O(n),
        # but push-pulls are rare.
        dead = [st.addr for st in self._nodes.values() if st.state == "dead"]
        live = self._pick_members(1, self.name)
        if dead and self._rng.random() * (len(dead) + len(self._roster)) < len(dead):
            target = self._rng.choice(dead)
        elif live:
            target = self._nodes[live[0]].addr
        else:
            return
        self.stats.push_pulls += 1
        message = PushPull(self.name, self.addr, False, self._snapshot())
        self._request_stream(target, message, PendingStream("push_pull"))
