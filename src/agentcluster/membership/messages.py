"""SWIM wire messages and the value types the membership core hands out.

Theory of operation: everything that crosses the network is a frozen ``msgspec.Struct`` encoded
*array-like* (a msgpack array, field names never sent) with a one- or two-letter tag as its
first element, so a ping with no gossip is a handful of bytes. There are two unions:

* :data:`Message` -- the **packets** (UDP in production): :class:`Ping`, :class:`IndirectPing`,
  :class:`Ack`, :class:`Nack` and :class:`Gossip`. Piggybacking is a field, not an envelope:
  *every* packet type carries ``gossip``, a tuple of :data:`GossipEntry` (:class:`Alive`,
  :class:`Suspect`, :class:`Dead`). The core fills it up to its packet budget, and a pure
  :class:`Gossip` packet is just a packet with nothing but gossip. One decode gives the shell a
  complete message; there is no second framing layer to get wrong.
* :data:`StreamMessage` -- the **stream** requests and replies (TCP in production):
  :class:`PushPull` (full state exchange, used to join and for anti-entropy), and
  :class:`StreamPing` / :class:`StreamAck` (the TCP fallback of a probe).

Every field that a peer controls is bounded (name and address lengths, non-negative counters,
tuple lengths) so a hostile or corrupt packet fails decoding instead of reaching the core.

The second half of the module holds what the core *returns*, not what it sends:
:class:`Member` (one row of the membership view), :class:`MemberEvent`, :class:`StreamRequest`
and :class:`Ready` (the batch of outputs drained by the shell after every input).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from agentcluster.membership.vivaldi import Coordinate

__all__ = [
    "MAX_GOSSIP_ENTRIES",
    "MAX_INCARNATION",
    "MAX_MEMBERS_PER_PUSH_PULL",
    "Ack",
    "Alive",
    "Dead",
    "EventKind",
    "Gossip",
    "GossipEntry",
    "IndirectPing",
    "Member",
    "MemberEvent",
    "MemberSnapshot",
    "MemberState",
    "Message",
    "Nack",
    "NodeMeta",
    "Ping",
    "PushPull",
    "Ready",
    "StreamAck",
    "StreamMessage",
    "StreamPing",
    "StreamRequest",
    "Suspect",
    "encoded_size",
    "meta_size",
    "validate_meta",
]

# A gossip tuple can never hold more than this many entries: a 1,400-byte datagram cannot fit
# more than ~100 of even the smallest entry, so anything larger is garbage.
MAX_GOSSIP_ENTRIES = 256
# Push-pull carries the whole membership; 100k members is far beyond any cluster we target
# but still bounds the memory a single hostile stream can make us allocate.
MAX_MEMBERS_PER_PUSH_PULL = 100_000

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# "host:port", IPv6 in brackets; DNS names are at most 253 characters.
Addr = Annotated[str, msgspec.Meta(max_length=262)]
# Fits msgpack's int64 so every implementation can decode it.
Counter = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# Incarnations grow by one per refutation or metadata change, so an honest member never gets
# anywhere near this; it sits far below the int64 limit so that a member accused at any
# incarnation the core accepts (``< MAX_INCARNATION``) can always refute with one more, and
# that Alive still encodes and decodes everywhere. Anything larger is garbage and fails
# decoding; the core also ignores accusations at the bound itself (see ``Swim``).
MAX_INCARNATION = 2**62
Incarnation = Annotated[int, msgspec.Meta(ge=0, le=MAX_INCARNATION)]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]

MemberState = Literal["alive", "suspect", "dead", "left"]
EventKind = Literal["joined", "updated", "suspect", "alive", "dead", "left", "reaped"]

_encoder = msgspec.msgpack.Encoder()


def encoded_size(obj: object) -> int:
    """Bytes of the msgpack encoding of ``obj`` (what the core budgets packets with)."""
    return len(_encoder.encode(obj))


# --------------------------------------------------------------------------- node metadata


class NodeMeta(msgspec.Struct, frozen=True, array_like=True):
    """What a node tells the cluster about itself; gossiped inside :class:`Alive`.

    Kept small on purpose (the core refuses metadata over ``SwimConfig.max_meta_size`` bytes
    encoded): it rides on UDP gossip, and every byte is sent λ·log(n) times by every node.
    """

    zone: ShortText = ""
    region: ShortText = ""
    capabilities: Annotated[tuple[ShortText, ...], msgspec.Meta(max_length=64)] = ()
    capacity: Annotated[dict[ShortText, float], msgspec.Meta(max_length=64)] = {}
    tags: Annotated[dict[ShortText, ShortText], msgspec.Meta(max_length=64)] = {}


def meta_size(meta: NodeMeta) -> int:
    return encoded_size(meta)


def validate_meta(meta: NodeMeta, limit: int) -> None:
    """Raise ``ValueError`` unless ``meta`` is a :class:`NodeMeta` of at most ``limit`` bytes."""
    if not isinstance(meta, NodeMeta):
        raise ValueError(f"meta must be a NodeMeta, not {type(meta).__name__}")
    size = meta_size(meta)
    if size > limit:
        raise ValueError(f"node metadata is {size} bytes encoded, the limit is {limit}")


# --------------------------------------------------------------------------- gossip entries


class Alive(msgspec.Struct, frozen=True, array_like=True, tag="A", tag_field="t"):
    """``name`` is alive at ``addr`` with ``incarnation``; carries its metadata."""

    name: Name
    addr: Addr
    incarnation: Incarnation
    meta: NodeMeta = NodeMeta()


class Suspect(msgspec.Struct, frozen=True, array_like=True, tag="S", tag_field="t"):
    """``accuser`` failed to reach ``name`` at ``incarnation``."""

    name: Name
    incarnation: Incarnation
    accuser: Name


class Dead(msgspec.Struct, frozen=True, array_like=True, tag="D", tag_field="t"):
    """``name`` is dead at ``incarnation``; ``accuser == name`` means it left gracefully."""

    name: Name
    incarnation: Incarnation
    accuser: Name


GossipEntry = Alive | Suspect | Dead
GossipTuple = Annotated[tuple[GossipEntry, ...], msgspec.Meta(max_length=MAX_GOSSIP_ENTRIES)]


# --------------------------------------------------------------------------- packets


class Ping(msgspec.Struct, frozen=True, array_like=True, tag="p", tag_field="t"):
    """Are you alive? ``target`` names the intended receiver (a node that restarted under
    another name at the same address must not answer for the old one). Buddy system: a ping
    to a member the sender suspects carries that :class:`Suspect` first in ``gossip``."""

    seq: Counter
    target: Name
    source: Name
    source_addr: Addr
    gossip: GossipTuple = ()


class IndirectPing(msgspec.Struct, frozen=True, array_like=True, tag="i", tag_field="t"):
    """Please ping ``target`` for me and relay its ack (SWIM ping-req); with ``nack`` set,
    answer :class:`Nack` if the target stays silent (Lifeguard: a missing nack tells the
    requester that *it* is the one with the problem)."""

    seq: Counter
    target: Name
    target_addr: Addr
    source: Name
    source_addr: Addr
    nack: bool = True
    gossip: GossipTuple = ()


class Ack(msgspec.Struct, frozen=True, array_like=True, tag="a", tag_field="t"):
    """Answer to a ping (``source`` is the node that was probed). ``coord`` is the sender's
    Vivaldi coordinate on a direct ack, ``None`` on an ack relayed by an indirect helper."""

    seq: Counter
    source: Name
    coord: Coordinate | None = None
    gossip: GossipTuple = ()


class Nack(msgspec.Struct, frozen=True, array_like=True, tag="n", tag_field="t"):
    """An indirect helper got no ack from the target within its probe timeout."""

    seq: Counter
    source: Name
    gossip: GossipTuple = ()


class Gossip(msgspec.Struct, frozen=True, array_like=True, tag="g", tag_field="t"):
    """Nothing but piggyback: sent only while there is something to disseminate."""

    source: Name
    gossip: GossipTuple = ()


Message = Ping | IndirectPing | Ack | Nack | Gossip


# --------------------------------------------------------------------------- streams


class MemberSnapshot(msgspec.Struct, frozen=True, array_like=True):
    """One member's state as exchanged by push-pull."""

    name: Name
    addr: Addr
    state: MemberState
    incarnation: Incarnation
    meta: NodeMeta = NodeMeta()


class PushPull(msgspec.Struct, frozen=True, array_like=True, tag="pp", tag_field="t"):
    """Full state exchange. The requester sends its states, the responder merges them and
    replies with its own (``reply=True``). ``join`` marks the first exchange of a new node."""

    source: Name
    source_addr: Addr
    join: bool
    states: Annotated[
        tuple[MemberSnapshot, ...], msgspec.Meta(max_length=MAX_MEMBERS_PER_PUSH_PULL)
    ]
    reply: bool = False


class StreamPing(msgspec.Struct, frozen=True, array_like=True, tag="sp", tag_field="t"):
    """A probe over a stream: reaches a member whose UDP path is broken (memberlist's
    "TCP fallback" ping), answered synchronously with :class:`StreamAck`."""

    seq: Counter
    target: Name
    source: Name
    source_addr: Addr


class StreamAck(msgspec.Struct, frozen=True, array_like=True, tag="sa", tag_field="t"):
    seq: Counter
    source: Name


StreamMessage = PushPull | StreamPing | StreamAck


# --------------------------------------------------------------------------- core outputs


class Member(msgspec.Struct, frozen=True):
    """One row of a node's membership view (a snapshot; never mutated)."""

    name: str
    addr: str
    state: MemberState
    incarnation: int
    meta: NodeMeta
    state_changed_at: float
    coord: Coordinate | None = None


class MemberEvent(msgspec.Struct, frozen=True):
    """A change in the membership view.

    ``accuser`` is who suspected / declared the member dead (the member itself for ``left``),
    ``confirmations`` how many distinct other members confirmed the suspicion.
    """

    kind: EventKind
    member: Member
    incarnation: int
    accuser: str | None
    confirmations: int
    at: float


class StreamRequest(msgspec.Struct, frozen=True):
    """Open a stream to ``addr``, send ``message``, and report the reply (or ``None`` on any
    failure, including ``timeout`` seconds passing) to ``Swim.stream_result(request_id, ...)``."""

    request_id: int
    addr: str
    message: StreamMessage
    timeout: float


class Ready(msgspec.Struct):
    """What the core wants done, drained by the shell after every input or tick."""

    packets: list[tuple[str, Message]]
    streams: list[StreamRequest]
    events: list[MemberEvent]
