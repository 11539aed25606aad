"""The failure detector's probe rounds, and the plumbing they share with the rest of the core.

Theory of operation: :class:`ProbeLoop` is the half of :class:`~.swim.Swim` that talks to one
peer at a time. One probe round is in flight at most: a direct ping (carrying the suspicion if
the target is suspect: the buddy system), optionally a retry after the probe timeout, then
``k`` indirect pings through random alive members plus a stream ping; an ack from any path
ends the round, no ack by its end makes the target suspect. Each phase lasts its full length
from when it actually started, so a prober whose own event loop stalled never skips the
indirect phase. Lifeguard's local health moves here: -1 on success, +1 per missing nack (or +1
when there were no helpers) on failure; the round's interval and timeout are stretched by it.

Targets come first from the urgent list (members whose suspicion we witness, or that someone
else's view says are dead), then alternately from our ring successor and the shuffled round
robin, in the proportion ``ring_probe_ratio``. The other side of probing lives here too:
answering pings, relaying indirect pings (ack forwarded, or a nack after our probe timeout).

The class is abstract only in :meth:`_on_suspect` (the state rules, in ``swim.py``); the
attributes it uses are created by ``Swim.__init__``.
"""

from __future__ import annotations

import abc
import random

from agentcluster.membership._awareness import Awareness
from agentcluster.membership._broadcasts import Outbox
from agentcluster.membership._probe_order import ProbeOrder, Roster
from agentcluster.membership._state import (
    DIRECT,
    INDIRECT,
    T_NACK,
    T_RELAY_END,
    NodeState,
    PendingStream,
    Probe,
    Relay,
    SwimStats,
    Timers,
)
from agentcluster.membership.config import SwimConfig
from agentcluster.membership.messages import (
    Ack,
    GossipEntry,
    IndirectPing,
    Message,
    Nack,
    Ping,
    StreamAck,
    StreamMessage,
    StreamPing,
    StreamRequest,
    Suspect,
)
from agentcluster.membership.vivaldi import Coordinate, Vivaldi, valid_coordinate

__all__ = ["ProbeLoop"]
# Indirect pings we relay at once, at most: bounds what a flood of requests can make us do.
_MAX_RELAYS = 1024


class ProbeLoop(abc.ABC):
    """Probe rounds, probe answers and the send primitives (see the module docstring)."""

    name: str
    addr: str
    config: SwimConfig
    stats: SwimStats
    _rng: random.Random
    _vivaldi: Vivaldi | None
    _left: bool
    _nodes: dict[str, NodeState]
    _roster: Roster
    _order: ProbeOrder
    _awareness: Awareness
    _out: Outbox
    _timers: Timers
    _seq: int
    _probe: Probe | None
    _next_probe_at: float
    _ring_credit: float
    _urgent: dict[str, None]
    _relays: dict[int, Relay]
    _streams: dict[int, PendingStream]
    _request_id: int
    _stream_out: list[StreamRequest]

    @abc.abstractmethod
    def _on_suspect(self, s: Suspect, now: float) -> None:
        """Apply a suspicion (the state rules)."""

    def _run_probe(self, now: float) -> None:
        while True:
            probe = self._probe
            if probe is not None:
                if now < probe.deadline:
                    return
                self._advance_probe(probe, now)
                continue
            if self._left or now < self._next_probe_at:
                return
            if not self._start_probe(now):
                return

    def _probeable(self, name: str) -> bool:
        st = self._nodes.get(name)
        return st is not None and name != self.name and st.state in ("alive", "suspect")

    def _pick_target(self) -> str | None:
        while self._urgent:
            name = next(iter(self._urgent))
            del self._urgent[name]
            if self._probeable(name):
                self.stats.urgent_probes += 1
                return name
        self._ring_credit += self.config.ring_probe_ratio
        if self._ring_credit >= 1.0:
            self._ring_credit -= 1.0
            successor = self._order.successor()
            if successor is not None and self._probeable(successor):
                return successor
        return self._order.next_round_robin(self._roster.live, self._probeable)

    def _start_probe(self, now: float) -> bool:
        cfg = self.config
        target = self._pick_target()
        if target is None:
            self._next_probe_at = now + cfg.probe_interval
            return False
        st = self._nodes[target]
        interval = self._awareness.scale(cfg.probe_interval)
        timeout = self._awareness.scale(cfg.probe_timeout)
        probe = Probe(self._next_seq(), st, now, interval, timeout, cfg.direct_retries)
        self._probe = probe
        self._next_probe_at = now + interval
        self.stats.probes += 1
        self._send_ping(probe.seq, st)
        return True

    def _send_ping(self, seq: int, st: NodeState) -> None:
        # Buddy system: a suspect learns of its suspicion from the very ping that probes it.
        buddy: GossipEntry | None = None
        if st.suspicion is not None:
            buddy = Suspect(st.name, st.incarnation, st.suspicion.accuser)
        self._send(st.addr, Ping(seq, st.name, self.name, self.addr), first=buddy)

    def _advance_probe(self, probe: Probe, now: float) -> None:
        cfg = self.config
        if probe.phase == DIRECT and probe.retries_left > 0:
            probe.retries_left -= 1
            probe.retried = True
            probe.deadline = now + probe.timeout
            st = self._nodes.get(probe.target)
            if st is not None:
                self._send_ping(probe.seq, st)
            return
        if probe.phase == INDIRECT:
            self._finish_probe(probe, now, ok=False)
            return
        probe.phase = INDIRECT
        helpers = self._pick_members(cfg.indirect_checks, probe.target)
        for helper in helpers:
            req = IndirectPing(probe.seq, probe.target, probe.addr, self.name, self.addr, True)
            self._send(self._nodes[helper].addr, req)
        probe.helpers = dict.fromkeys(helpers)
        self.stats.indirect_sent += len(helpers)
        remaining = max(probe.interval - probe.timeout * (1 + cfg.direct_retries), probe.timeout)
        probe.deadline = now + remaining
        if cfg.stream_fallback:
            self.stats.stream_pings += 1
            ping = StreamPing(probe.seq, probe.target, self.name, self.addr)
            pending = PendingStream("ping", probe.seq, probe.target)
            self._request_stream(probe.addr, ping, pending, timeout=remaining)

    def _finish_probe(self, probe: Probe, now: float, *, ok: bool) -> None:
        self._probe = None
        if self._urgent:
            self._next_probe_at = min(self._next_probe_at, now)
        if ok:
            self._awareness.apply(-1)
            return
        self.stats.probe_failures += 1
        # Lifeguard: with helpers that nack, only the nacks that never came count against our
        # own health (the helpers are presumed fine); without helpers any failure does.
        if probe.helpers:
            missing = len(probe.helpers) - len(probe.nacks)
            self.stats.nacks_missing += missing
            self._awareness.apply(missing)
        else:
            self._awareness.apply(1)
        st = self._nodes.get(probe.target)
        if st is not None and st.state in ("alive", "suspect") and st.addr == probe.addr:
            self._on_suspect(Suspect(probe.target, probe.incarnation, self.name), now)

    def _on_ping(self, src_addr: str, msg: Ping) -> None:
        if msg.target != self.name:
            self.stats.drop("wrong_target")
            return
        coord = self._vivaldi.coordinate if self._vivaldi is not None else None
        self._send(msg.source_addr or src_addr, Ack(msg.seq, self.name, coord))

    def _on_ack(self, msg: Ack, now: float) -> None:
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self.stats.acks_relayed += 1
            self._send(relay.addr, Ack(relay.seq, relay.target))
            return
        probe = self._probe
        if probe is None or msg.seq != probe.seq:
            self.stats.drop("stale_ack")
            return
        if msg.source != probe.target:
            self.stats.drop("ack_wrong_source")
            return
        self.stats.acks += 1
        if msg.coord is not None and not probe.retried:
            self._observe_rtt(probe.target, msg.coord, now - probe.sent_at)
        self._finish_probe(probe, now, ok=True)

    def _observe_rtt(self, name: str, coord: Coordinate, rtt: float) -> None:
        st = self._nodes.get(name)
        if st is None:
            return
        # Validated before it is kept: a NaN or mis-sized coordinate would otherwise stay on
        # the member and turn every RTT estimate for it (events, control API) into NaN.
        if self._vivaldi is None:
            if valid_coordinate(coord):
                st.coord = coord
            else:
                self.stats.drop("bad_coordinate")
            return
        try:
            self._vivaldi.observe(name, coord, rtt)
        except ValueError:
            self.stats.drop("bad_coordinate")  # the old coordinate stays
            return
        st.coord = coord
        self.stats.rtt_samples += 1

    def _on_nack(self, msg: Nack) -> None:
        probe = self._probe
        if probe is None or msg.seq != probe.seq or msg.source not in probe.helpers:
            self.stats.drop("stale_nack")
            return
        if msg.source not in probe.nacks:
            probe.nacks[msg.source] = None
            self.stats.nacks_received += 1

    def _on_indirect_ping(self, src_addr: str, msg: IndirectPing, now: float) -> None:
        reply_to = msg.source_addr or src_addr
        self.stats.indirect_handled += 1
        if msg.target == self.name:
            coord = self._vivaldi.coordinate if self._vivaldi is not None else None
            self._send(reply_to, Ack(msg.seq, self.name, coord))
            return
        if len(self._relays) >= _MAX_RELAYS:
            self.stats.drop("relay_overflow")
            return
        seq = self._next_seq()
        self._relays[seq] = Relay(msg.seq, reply_to, msg.target, msg.nack)
        st = self._nodes.get(msg.target)
        if st is not None and st.addr == msg.target_addr:
            self._send_ping(seq, st)
        else:
            self._send(msg.target_addr, Ping(seq, msg.target, self.name, self.addr))
        self._timers.push(now + self.config.probe_timeout, T_NACK, seq, 0)
        # Keep relaying a late ack for the rest of the requester's round.
        self._timers.push(now + self.config.probe_interval, T_RELAY_END, seq, 0)

    def _on_stream_ack(
        self, pending: PendingStream, reply: StreamMessage | None, now: float
    ) -> None:
        if not isinstance(reply, StreamAck) or (reply.seq, reply.source) != (
            pending.seq,
            pending.target,
        ):
            return  # failed, timed out, or a confused answer: the UDP paths decide
        probe = self._probe
        if probe is not None and probe.seq == pending.seq:
            self.stats.tcp_only_acks += 1
            self._finish_probe(probe, now, ok=True)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _pick_members(self, k: int, exclude: str) -> list[str]:
        nodes = self._nodes
        return self._roster.sample(k, lambda name: name != exclude and nodes[name].state == "alive")

    def _send(
        self,
        addr: str,
        msg: Message,
        *,
        first: GossipEntry | None = None,
        need_gossip: bool = False,
    ) -> bool:
        # Like memberlist, n counts every member we know (dead ones until reaped): the news
        # of a death must not travel less far because the cluster just shrank.
        n = len(self._nodes)
        return self._out.send(addr, msg, n, first=first, need_gossip=need_gossip)

    def _request_stream(
        self,
        addr: str,
        message: StreamMessage,
        pending: PendingStream,
        timeout: float | None = None,
    ) -> None:
        self._request_id += 1
        self._streams[self._request_id] = pending
        wait = self.config.stream_timeout if timeout is None else timeout
        self._stream_out.append(StreamRequest(self._request_id, addr, message, wait))
