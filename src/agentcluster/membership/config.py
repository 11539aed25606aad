"""Tuning of the SWIM + Lifeguard membership core, with named presets.

Theory of operation: one frozen :class:`SwimConfig` holds every knob; :meth:`SwimConfig.lan`,
:meth:`SwimConfig.wan` and :meth:`SwimConfig.local` are the presets (``preset(name)`` picks
one by name). The class defaults *are* the LAN preset. Each default carries the reason for its
value. The numbers are shaped by three budgets that pull against each other:

* **detection time** -- crash to "every member says dead" = wait for the first probe of the
  crashed member + one probe round + the suspicion timeout + dissemination of ``Dead``;
* **false positives** -- a member that is alive but stalls (GC, a blocked event loop) for up to
  ~0.8 s must be able to refute before any suspicion timer fires: the suspicion timeout has to
  cover the rest of the stall plus the dissemination of its ``Alive``;
* **cost** -- every node sends one ping and (on average) one ack per probe interval, so the
  interval sets the steady-state packet rate (2 / probe_interval packets per second).

A pure shuffled round robin makes the wait for the first probe exponential (mean one probe
interval, p99 ~4.6 intervals, since n independent probers hit a member like a Poisson
process). ``ring_probe_ratio`` aims a share of the rounds at the member's successor on a
consistent-hash ring (as Akka's heartbeat ring does), which bounds that wait by
``probe_interval / ring_probe_ratio`` -- what makes a p99 of a few seconds reachable at 200
nodes without probing faster.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from agentcluster.membership._suspicion import suspicion_timeout

__all__ = ["SwimConfig", "preset"]


@dataclass(frozen=True)
class SwimConfig:
    """All the knobs of :class:`agentcluster.membership.swim.Swim` (defaults = ``lan``)."""

    # -- probing -------------------------------------------------------------------------------
    # One probe round per 0.52 s: ping + ack from every node is 3.85 packets/s per node; with
    # 5 % loss, retries and indirect probes bring it to ~4.55, 10 % inside the 5 packets/s
    # budget. Short enough that a crash is noticed within ~1 s (with the ring).
    probe_interval: float = 0.52
    # A LAN answers in well under a millisecond; 100 ms tolerates a busy receiver (GC, a loaded
    # event loop) while leaving the rest of the round for a retry and the indirect probes.
    probe_timeout: float = 0.1
    # One more direct ping before going indirect: with 5 % loss a lone lost ping or ack is the
    # common failure, and 2 packets fix it where k indirect probes would cost 4k.
    direct_retries: int = 1
    # SWIM's k: two independent paths (each needs 4 packets through), after two direct pings,
    # plus the stream fallback, make a false suspicion from packet loss alone vanishingly rare;
    # each more helper costs 4 packets per indirect round.
    indirect_checks: int = 2
    # Half the rounds probe the ring successor: every member is then probed by its ring
    # predecessor at least every 2 probe intervals (bounded wait), the other half keep SWIM's
    # randomized round robin (every member probed by everyone once per pass).
    ring_probe_ratio: float = 0.5
    # The TCP fallback ping in each failing round (memberlist's "TCP ping"): a member whose
    # UDP is blocked but is otherwise healthy is not declared dead.
    stream_fallback: bool = True

    # -- suspicion (Lifeguard LHA-Suspicion) --------------------------------------------------
    # min timeout = suspicion_mult * max(1, log10(n)) * probe_interval: 0.6 s at n = 200.
    # It only applies once k witnesses confirmed, and a witness can only confirm after its own
    # full probe round failed -- the member stayed silent through two rounds (~1 s) -- so a
    # member that merely paused (0.8 s) has answered the witnesses and refuted by then.
    suspicion_mult: float = 0.5
    # The timeout starts at 4x the minimum (2.4 s at n = 200) and shrinks as distinct members
    # confirm: a lone accuser -- maybe the unhealthy one -- must wait the longest.
    suspicion_max_timeout_mult: float = 4.0
    # k, the confirmations that bring the timeout down to its minimum; None = memberlist's rule
    # suspicion_mult - 2 (memberlist's LAN k is 2 too). Capped at n - 2.
    suspicion_confirmations: int | None = 2
    # The witnesses of a suspicion: the suspect's next 3 alive ring successors. They hear of it
    # directly from the accuser and probe the suspect at once, so confirmations (or the
    # refutation) come within one round; their pings carry the suspicion (buddy system). Three
    # witnesses give k = 2 confirmations even if one of them is slow.
    suspicion_probers: int = 3
    # A node that is itself unhealthy (awareness score s) waits (s+1) times longer before
    # declaring someone dead: its timers are the least trustworthy.
    awareness_scales_suspicion: bool = True

    # -- local health (Lifeguard LHA-Probe) ----------------------------------------------------
    # Lifeguard's S: probe interval and timeout stretch up to 8x when we miss nacks, fail
    # probes or have to refute suspicions of ourselves.
    awareness_max_multiplier: int = 8

    # -- dissemination -------------------------------------------------------------------------
    # Each gossip entry is sent retransmit_mult * ceil(log10(n + 1)) times by every node that
    # learns it (12 at n = 200; the log factor is floored at 2; deaths and rejoins get twice
    # that): a node misses an entry with probability ~exp(-limit), so all n hear it w.h.p.
    retransmit_mult: int = 4
    # Gossip packets go to 3 random members, only while something is pending: at once for a
    # death or a refutation, otherwise at most every 100 ms (bursts fill packets). An entry
    # reaches 200 nodes in ~4-5 hops.
    gossip_interval: float = 0.1
    gossip_nodes: int = 3
    # Keep gossiping to members we declared dead for a while: if they are in fact alive they
    # hear it and refute (heals false positives and partitions).
    gossip_to_the_dead_time: float = 15.0
    # Full state exchange with one random member every 30 s (scaled up past 32 members, as
    # memberlist does): the safety net for everything gossip missed; rare, since each is a
    # stream carrying the whole membership.
    push_pull_interval: float = 30.0
    # The UDP payload (message + piggyback) stays below 1200 bytes so the frame header, the
    # AES-GCM nonce and tag and IP/UDP headers fit a 1400-byte path without fragmenting.
    packet_budget: int = 1200

    # -- lifecycle -----------------------------------------------------------------------------
    # A dead (or left) member's name may be claimed from a new address at once: a crashed
    # process restarted on another port must be able to rejoin. None never allows it.
    dead_node_reclaim_time: float | None = 0.0
    # Dead and left members stay visible (state "dead"/"left") for a minute, then are
    # forgotten (event "reaped"); long after any gossip about them has died out.
    reap_after: float = 60.0
    # Push-pull streams carry the whole state; 5 s is ample on a LAN even for 1,000 members.
    stream_timeout: float = 5.0
    # After leave(), let the "left" gossip spread (a few hops) before the shell stops.
    leave_propagate_delay: float = 1.0
    # Metadata rides in every Alive; 512 bytes keeps a full packet able to carry two of them.
    max_meta_size: int = 512

    PRESETS: ClassVar[tuple[str, ...]] = ("lan", "wan", "local")

    def __post_init__(self) -> None:
        positive = {
            "probe_interval": self.probe_interval,
            "probe_timeout": self.probe_timeout,
            "gossip_interval": self.gossip_interval,
            "push_pull_interval": self.push_pull_interval,
            "stream_timeout": self.stream_timeout,
            "suspicion_mult": self.suspicion_mult,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.probe_timeout * (1 + self.direct_retries) >= self.probe_interval:
            raise ValueError(
                "probe_timeout * (1 + direct_retries) must be shorter than probe_interval "
                "(the indirect phase needs the rest of the round)"
            )
        if self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion_max_timeout_mult must be >= 1")
        if not 0.0 <= self.ring_probe_ratio <= 1.0:
            raise ValueError("ring_probe_ratio must be within [0, 1]")
        counts = {
            "direct_retries": self.direct_retries,
            "indirect_checks": self.indirect_checks,
            "suspicion_probers": self.suspicion_probers,
            "retransmit_mult": self.retransmit_mult,
            "gossip_nodes": self.gossip_nodes,
        }
        for name, count in counts.items():
            if count < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.suspicion_confirmations is not None and self.suspicion_confirmations < 0:
            raise ValueError("suspicion_confirmations must be >= 0 or None")
        if self.awareness_max_multiplier < 1:
            raise ValueError("awareness_max_multiplier must be >= 1")
        if self.packet_budget < 256:
            raise ValueError("packet_budget must be at least 256 bytes")
        if self.max_meta_size < 16 or self.max_meta_size > self.packet_budget // 2:
            raise ValueError("max_meta_size must be within [16, packet_budget / 2]")
        if self.reap_after < 0 or self.gossip_to_the_dead_time < 0:
            raise ValueError("reap_after and gossip_to_the_dead_time must be >= 0")
        if self.dead_node_reclaim_time is not None and self.dead_node_reclaim_time < 0:
            raise ValueError("dead_node_reclaim_time must be >= 0 or None")
        if self.leave_propagate_delay < 0:
            raise ValueError("leave_propagate_delay must be >= 0")

    @property
    def expected_confirmations(self) -> int:
        """K of Lifeguard before the n - 2 cap."""
        if self.suspicion_confirmations is not None:
            return self.suspicion_confirmations
        return max(0, int(self.suspicion_mult) - 2)

    def suspicion_bounds(self, n: int, health: int = 1) -> tuple[float, float, int]:
        """(min, max, k) of a suspicion among ``n`` live members, for a node whose awareness
        multiplier is ``health``: min = suspicion_mult * max(1, log10(n)) * probe_interval
        (times ``health`` when ``awareness_scales_suspicion``), max = min *
        suspicion_max_timeout_mult, k = expected confirmations capped at n - 2."""
        minimum = suspicion_timeout(self.suspicion_mult, n, self.probe_interval)
        if self.awareness_scales_suspicion:
            minimum *= health
        k = max(0, min(self.expected_confirmations, n - 2))
        return minimum, minimum * self.suspicion_max_timeout_mult, k

    def push_pull_interval_for(self, n: int) -> float:
        """memberlist's scaling: the interval grows with log2(n) past 32 members, so the
        cluster-wide rate of (whole-state) exchanges grows only logarithmically."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (math.ceil(math.log2(n) - math.log2(32)) + 1.0)

    def replace(self, **changes: object) -> SwimConfig:
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    # -- presets -------------------------------------------------------------------------------
    @classmethod
    def lan(cls) -> SwimConfig:
        """A data-centre network: sub-millisecond RTTs, rare loss, up to ~1,000 nodes."""
        return cls()

    @classmethod
    def wan(cls) -> SwimConfig:
        """Links across regions: RTTs of 50-300 ms, more loss, slower is acceptable."""
        return cls(
            # Rounds must contain a 300 ms RTT several times over, and WAN traffic costs more.
            probe_interval=2.0,
            # Three 300 ms round trips before a retry is worth it; no retry (the round is short
            # relative to the RTT, indirect probes through other regions work better).
            probe_timeout=1.0,
            direct_retries=0,
            # 2 * log10(n) * 2 s: 6.8 s at 50 nodes; WAN partitions heal slowly, be patient.
            suspicion_mult=2.0,
            suspicion_max_timeout_mult=4.0,
            # Gossip every 300 ms to 4 targets: fewer, fuller packets over costly links.
            gossip_interval=0.3,
            gossip_nodes=4,
            gossip_to_the_dead_time=60.0,
            # A full state exchange every minute: WAN streams are slow and expensive.
            push_pull_interval=60.0,
            reap_after=600.0,
            # A whole-state stream across an ocean can take seconds.
            stream_timeout=15.0,
            leave_propagate_delay=3.0,
        )

    @classmethod
    def local(cls) -> SwimConfig:
        """Several processes on one host (loopback): fast detection, cost hardly matters."""
        return cls(
            # 5 rounds/s: loopback packets are free, and detection needs a quick first probe.
            probe_interval=0.2,
            # Loopback answers in ~0.1 ms, but ten Python processes on two cores can be
            # descheduled for tens of milliseconds: 80 ms avoids indirect probes for that.
            probe_timeout=0.08,
            # No retry: the indirect probes in the same round do that job with 2 helpers.
            direct_retries=0,
            indirect_checks=2,
            # With n <= 10, log10(n) <= 1: min = 4 * 0.2 = 0.8 s covers a process descheduled
            # for a few hundred ms and its refutation; max = 2.4 s for a lone accuser.
            suspicion_mult=4.0,
            suspicion_max_timeout_mult=3.0,
            # Two witnesses, two confirmations: all a 5-10 node cluster can supply quickly.
            suspicion_confirmations=2,
            suspicion_probers=2,
            # Joins must reach everyone within 0.5 s: gossip as often as every 50 ms.
            gossip_interval=0.05,
            gossip_to_the_dead_time=10.0,
            push_pull_interval=10.0,
            reap_after=30.0,
            stream_timeout=1.0,
            leave_propagate_delay=0.3,
        )


def preset(name: str) -> SwimConfig:
    """The named preset: ``"lan"``, ``"wan"`` or ``"local"``."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "lan":
        return SwimConfig.lan()
    if key == "wan":
        return SwimConfig.wan()
    if key == "local":
        return SwimConfig.local()
    raise ValueError(
        f"unknown membership preset {name!r}; choose one of {', '.join(SwimConfig.PRESETS)}"
    )
