"""Registry dissemination as a sans-I/O core: every node's agents, on every node.

Theory of operation: each node *owns* the entries of its local agents and is the only source
of truth about them. Per owner there is a state ``(epoch, version)``: ``epoch`` is fixed when the
owner starts (the shell passes its start time in ns, so a restarted node outranks its former
self) and ``version`` counts the owner's changes. States are ordered by tuple comparison. The
core keeps its own entries plus, per remote owner, the entries and state it last learned; the
merged view lives in :attr:`RegistrySync.index` (a :class:`RegistryIndex`) for readers.

*Push (bounded convergence).* Local changes collect in a pending delta; at most
``flush_interval`` later one :class:`Delta` ``(owner, epoch, base_version, version, upserts,
removed_ids)`` goes straight to every live peer, so a change is one hop from everyone. A receiver
applies a delta only if it extends exactly what it holds (same epoch and ``base_version`` equal
to its version, or a new epoch starting from version 0); anything else is a *gap*: it sends
:class:`Pull` to the sender and waits for a :class:`Full`. A pending change set too big for one
message is pushed as a Full instead.

*Anti-entropy.* Every ``sync_interval`` a :class:`Digest` ``{owner: (epoch, version)}`` goes to one
random live peer, which answers with Fulls where it is newer (or where the digest lacks an
owner) and Pulls where it is older. Any node may answer a Pull with what it holds for that
owner; versions make a relayed copy as good as the owner's.

*Split Fulls are assembled, not merged.* A Full carries ``part``/``parts``; the receiver buffers
parts per (sender, owner) and installs the owner's state only when all parts of one
``(epoch, version)`` are in, replacing the whole entry set at once. Merging parts as they come
("replace by version") cannot tell an entry deleted by the owner from one that sits in a part
still on its way, so it would either resurrect deletions or briefly drop live entries; the
assembly costs a buffer, bounded by ``assembly_timeout`` (a lost part just means a later
digest pulls again).

*Trust rules.* An entry in an owner's stream whose ``node`` is not that owner is dropped and
counted (entries only come from their owner), as is one that fails ``validate_entry`` or
reuses an id held by another node. A node never accepts a claim about its own entries; if a
peer holds a *newer* state for us (we restarted with a clock behind our former epoch), we take
an epoch above it and push our state, so our word wins again.

*Bounds.* Epochs are at most :data:`MAX_EPOCH` (``2**62``: a start time in ns fits until
2116) and versions at most ``2**63 - 1`` on the wire; anything larger fails decoding, and the
core drops such a state even when handed one directly. Outranking a newer claim about
ourselves never steps past the bound: it takes the claim's epoch + 1, or -- at ``MAX_EPOCH`` --
the claim's version + 1 (only while that version is below ``2**62``, which leaves local changes
some ``2**62`` versions of headroom); a claim beyond both is ignored. Owners that are not live
members (learned through a relay before membership reports them, or invented by a peer) are
kept only up to ``max_unknown_owners``; and a digest lists at most ``max_digest_bytes`` worth of
owners -- ourselves, then live members, then the rest, from a random offset when they do not
all fit -- marked ``partial`` so the receiver does not read an omission as "I lack this owner".

*Departures.* :meth:`member_down` drops a node's entries and tombstones ``(node, epoch)``: any
Delta, Full or Digest line about that owner with an epoch at or below the tombstone is ignored,
so a peer that has not yet heard of the death cannot gossip the entries back. If we never
learned the node's epoch, every epoch is blocked until :meth:`member_up` clears the tombstone
(and re-pulls). A restarted owner's larger epoch passes the tombstone.

*Unique names.* After every change the core checks the touched unique names: when two unique
entries from different owners share a name, the winner is the first by
``registry.name_rank`` (identical on every node); a local loser
yields one ``name_conflict`` event per (loser, winner) pair, reported again only if the conflict
goes away and comes back.

Determinism: peers are chosen with the caller's ``random.Random`` from a sorted list, owners and
ids are visited in sorted order, and time comes only from ``now`` arguments.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec

from agentcluster.coordination.registry import (
    AgentEntry,
    RegistryIndex,
    validate_entry,
)

__all__ = [
    "MAX_EPOCH",
    "MAX_VERSION",
    "Delta",
    "Digest",
    "Full",
    "Pull",
    "RegistryEvent",
    "RegistrySync",
    "SyncConfig",
    "SyncDecodeError",
    "SyncMessage",
    "SyncStats",
    "decode_sync",
    "encode_sync",
]

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Count = Annotated[int, msgspec.Meta(ge=0)]
# Far below msgpack's uint64 (epochs are start times in ns: 2**62 ns is the year 2116), so
# outranking a claim with epoch + 1 always stays encodable and decodable.
MAX_EPOCH = 2**62
# Fits int64 so every implementation decodes it.
MAX_VERSION = 2**63 - 1
# A claim about ourselves at MAX_EPOCH is outranked with version + 1 only below this: local
# changes then still have ~2**62 versions before MAX_VERSION.
_STEP_VERSION_LIMIT = 2**62
_Epoch = Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH)]
_Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_VERSION)]
# Far above any sane message (max_entries_per_message is ~2000) but bounds a hostile one.
_MAX_WIRE_ITEMS = 100_000
# Tombstone of a node whose epoch we never learned: blocks every epoch until member_up.
_ALL_EPOCHS = 2**63 - 1


class SyncConfig(msgspec.Struct, frozen=True):
    """Timing and size knobs of the registry dissemination."""

    # Batch window of local changes: short enough that one hop stays far under the 1 s
    # convergence target, long enough to coalesce a burst (an agent pool starting) into one
    # message per peer.
    flush_interval: float = 0.005
    # Anti-entropy period: repairs what pushes missed (loss, partitions). One small digest per
    # node per second is negligible traffic, and repair within a few seconds is ample since
    # pushes and gap pulls already fix most misses within milliseconds.
    sync_interval: float = 1.0
    # Entries per Delta/Full: keeps a message around a few hundred KB, below transport frame
    # limits, while a node with a few thousand agents still fits in one or two parts.
    max_entries_per_message: int = 2000
    # Parts of a split Full that do not all arrive within this are dropped: a lost part would
    # otherwise pin the buffer; the next digest or gap pulls the state again anyway.
    assembly_timeout: float = 5.0
    # A Pull for the same (peer, owner) is not repeated sooner: every further delta of a gapped
    # owner would otherwise trigger another Full while the first is in flight.
    pull_retry: float = 0.1
    # Owners that are not live members we keep state for: a relay may legitimately run ahead
    # of membership for a moment, but a peer must not make us keep (and list in every digest)
    # an unbounded number of invented owners.
    max_unknown_owners: int = 1024
    # Owner lines per digest, in encoded bytes: far below the 4 MiB registry frame, and a
    # digest is never split, so a larger owner set is listed in part (rotating).
    max_digest_bytes: int = 1 << 20


# ----------------------------------------------------------------------------- wire


class Delta(msgspec.Struct, frozen=True, array_like=True, tag="d", tag_field="t"):
    """An owner's changes taking it from ``base_version`` to ``version`` within ``epoch``."""

    owner: _Name
    epoch: _Epoch
    base_version: _Version
    version: _Version
    upserts: Annotated[tuple[AgentEntry, ...], msgspec.Meta(max_length=_MAX_WIRE_ITEMS)] = ()
    removed_ids: Annotated[tuple[str, ...], msgspec.Meta(max_length=_MAX_WIRE_ITEMS)] = ()


class Full(msgspec.Struct, frozen=True, array_like=True, tag="f", tag_field="t"):
    """Part ``part`` of ``parts`` of an owner's complete entry set at ``(epoch, version)``."""

    owner: _Name
    epoch: _Epoch
    version: _Version
    part: _Count
    parts: Annotated[int, msgspec.Meta(ge=1, le=_MAX_WIRE_ITEMS)]
    entries: Annotated[tuple[AgentEntry, ...], msgspec.Meta(max_length=_MAX_WIRE_ITEMS)] = ()


class Digest(msgspec.Struct, frozen=True, array_like=True, tag="g", tag_field="t"):
    """The sender's ``(epoch, version)`` per owner it holds (its own included); ``partial``:
    only some of them (the digest would not fit a frame), so an owner missing from it is not
    one the sender lacks."""

    owners: Annotated[
        dict[_Name, tuple[_Epoch, _Version]], msgspec.Meta(max_length=_MAX_WIRE_ITEMS)
    ]
    partial: bool = False


class Pull(msgspec.Struct, frozen=True, array_like=True, tag="p", tag_field="t"):
    """Ask the receiver for a Full of ``owner``."""

    owner: _Name


SyncMessage = Delta | Full | Digest | Pull


class SyncDecodeError(ValueError):
    """Bytes that are not a valid registry sync message."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SyncMessage)


def encode_sync(msg: SyncMessage) -> bytes:
    return _encoder.encode(msg)


def decode_sync(data: bytes) -> SyncMessage:
    """Decode one message; any malformed input raises :class:`SyncDecodeError`."""
    try:
        msg: SyncMessage = _decoder.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise SyncDecodeError(f"bad registry sync message: {exc}") from None
    return msg


def _in_range(epoch: int, version: int) -> bool:
    return 0 <= epoch <= MAX_EPOCH and 0 <= version <= MAX_VERSION


def _digest_line_size(owner: str) -> int:
    """An upper bound on the msgpack bytes of one digest line ``owner: [epoch, version]``."""
    return len(owner.encode()) + 5 + 1 + 9 + 9


# ----------------------------------------------------------------------------- outputs


class RegistryEvent(msgspec.Struct, frozen=True):
    """A change of the merged view (or a lost unique name, for the local loser)."""

    kind: Literal["registered", "updated", "unregistered", "name_conflict"]
    entry: AgentEntry
    winner: AgentEntry | None = None


def _kinds() -> dict[str, int]:
    return {"delta": 0, "full": 0, "digest": 0, "pull": 0}


@dataclass
class SyncStats:
    """Counters for observability and tests."""

    msgs_in: dict[str, int] = field(default_factory=_kinds)
    msgs_out: dict[str, int] = field(default_factory=_kinds)
    deltas_applied: int = 0
    fulls_applied: int = 0
    gaps: int = 0  # deltas that did not extend our state (each may cause a Pull)
    stale_dropped: int = 0  # deltas / fulls / parts at or below what we hold
    foreign_dropped: int = 0  # entries whose node is not the stream's owner
    invalid_dropped: int = 0  # entries failing validate_entry, malformed parts / versions
    id_conflicts_dropped: int = 0  # entries reusing an id another node holds
    own_claims_dropped: int = 0  # deltas / fulls about our own entries from others
    tombstoned_dropped: int = 0  # messages about owners we hold dead at that epoch
    unknown_owners_dropped: int = 0  # states of non-members beyond max_unknown_owners
    out_of_range_dropped: int = 0  # epochs / versions beyond MAX_EPOCH / MAX_VERSION
    digests_trimmed: int = 0  # digests sent partial (too many owners for one)
    epoch_bumps: int = 0  # times a peer held a newer state of ours than we did
    name_conflicts: int = 0  # name_conflict events emitted


_KIND = {Delta: "delta", Full: "full", Digest: "digest", Pull: "pull"}


class _Owner:
    __slots__ = ("entries", "epoch", "version")

    def __init__(self, epoch: int, version: int) -> None:
        self.epoch = epoch
        self.version = version
        self.entries: dict[str, AgentEntry] = {}


class _Assembly:
    __slots__ = ("epoch", "got", "parts", "started", "version")

    def __init__(self, epoch: int, version: int, parts: int, started: float) -> None:
        self.epoch = epoch
        self.version = version
        self.parts = parts
        self.started = started
        self.got: dict[int, tuple[AgentEntry, ...]] = {}


class RegistrySync:
    """One node's registry dissemination core (see the module docstring)."""

    def __init__(
        self,
        node: str,
        epoch: int,
        rng: random.Random,
        config: SyncConfig = SyncConfig(),  # noqa: B008 - frozen, shared safely
        now: float = 0.0,
    ) -> None:
        if not 0 <= epoch <= MAX_EPOCH:
            raise ValueError(f"epoch {epoch} is outside [0, {MAX_EPOCH}]")
        self.node = node
        self.epoch = epoch
        self.version = 0
        self.config = config
        self.index = RegistryIndex()
        self.stats = SyncStats()
        self._rng = rng
        self._local: dict[str, AgentEntry] = {}
        self._owners: dict[str, _Owner] = {}
        self._live: dict[str, None] = {}
        self._unknown: dict[str, None] = {}  # owners in _owners that are not live members
        self._tombstones: dict[str, int] = {}
        self._pending_up: dict[str, AgentEntry] = {}
        self._pending_rm: dict[str, None] = {}
        self._pending_base = 0
        self._flush_at: float | None = None
        self._next_sync = now + config.sync_interval
        self._out: list[tuple[str, SyncMessage]] = []
        self._assembly: dict[tuple[str, str], _Assembly] = {}
        self._pulls: dict[tuple[str, str], float] = {}
        self._conflicts: dict[str, dict[tuple[str, str], None]] = {}

    # ------------------------------------------------------------------ reads

    def peers(self) -> list[str]:
        """Live peers, sorted."""
        return sorted(self._live)

    def local_entries(self) -> list[AgentEntry]:
        """Our own entries, by id."""
        return [self._local[i] for i in sorted(self._local)]

    def owner_state(self, owner: str) -> tuple[int, int] | None:
        """The ``(epoch, version)`` we hold for ``owner`` (ours for ourselves)."""
        if owner == self.node:
            return (self.epoch, self.version)
        st = self._owners.get(owner)
        return None if st is None else (st.epoch, st.version)

    def next_deadline(self) -> float:
        """When :meth:`tick` has work next."""
        if self._flush_at is not None and self._flush_at < self._next_sync:
            return self._flush_at
        return self._next_sync

    def ready(self) -> list[tuple[str, SyncMessage]]:
        """Drain the outgoing ``(destination node, message)`` pairs."""
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ local changes

    def register(self, entry: AgentEntry, now: float) -> list[RegistryEvent]:
        """Add or replace one of our agents; raises ValueError on a bad entry."""
        if entry.node != self.node:
            raise ValueError(
                f"agent {entry.id!r} belongs to node {entry.node!r}, not {self.node!r}"
            )
        validate_entry(entry)
        if entry.unique:
            for other in self._local.values():
                if other.unique and other.name == entry.name and other.id != entry.id:
                    raise ValueError(
                        f"unique name {entry.name!r} is already held by local agent {other.id!r}"
                    )
        prev = self._local.get(entry.id)
        if prev == entry:
            return []
        self._local[entry.id] = entry
        self.index.upsert(entry)
        self._pending_rm.pop(entry.id, None)
        self._pending_up[entry.id] = entry
        self._changed(now)
        events = [RegistryEvent("registered" if prev is None else "updated", entry)]
        names = {entry.name: None} if entry.unique else {}
        if prev is not None and prev.unique:
            names[prev.name] = None
        if names:
            events += self._check_names(names)
        return events

    def unregister(self, id: str, now: float) -> list[RegistryEvent]:
        """Remove one of our agents (unknown ids are ignored)."""
        prev = self._local.pop(id, None)
        if prev is None:
            return []
        self.index.remove(id)
        self._pending_up.pop(id, None)
        self._pending_rm[id] = None
        self._changed(now)
        events = [RegistryEvent("unregistered", prev)]
        if prev.unique:
            events += self._check_names({prev.name: None})
        return events

    def _changed(self, now: float) -> None:
        self.version += 1
        if self._flush_at is None:
            self._flush_at = now + self.config.flush_interval

    def _flush(self) -> None:
        self._flush_at = None
        ups = [self._pending_up[i] for i in sorted(self._pending_up)]
        rms = sorted(self._pending_rm)
        base, self._pending_base = self._pending_base, self.version
        self._pending_up = {}
        self._pending_rm = {}
        if not self._live:
            return
        if len(ups) + len(rms) > self.config.max_entries_per_message:
            for peer in self.peers():
                self._send_own_full(peer)
            return
        delta = Delta(self.node, self.epoch, base, self.version, tuple(ups), tuple(rms))
        for peer in self.peers():
            self._send(peer, delta)

    # ------------------------------------------------------------------ membership

    def member_up(self, node: str, now: float) -> None:
        """A live peer (joined or alive again): push our state to it and pull its state."""
        if node == self.node:
            return
        self._live[node] = None
        self._unknown.pop(node, None)
        self._tombstones.pop(node, None)
        self._send_own_full(node)
        self._pulls.pop((node, node), None)
        self._pull(node, node, now)

    def member_down(self, node: str, now: float) -> list[RegistryEvent]:
        """A dead or departed peer: drop its entries and tombstone its epoch."""
        if node == self.node:
            return []
        self._live.pop(node, None)
        self._unknown.pop(node, None)
        st = self._owners.pop(node, None)
        self._tombstones[node] = max(
            _ALL_EPOCHS if st is None else st.epoch, self._tombstones.get(node, -1)
        )
        for key in [k for k in self._assembly if node in k]:
            del self._assembly[key]
        for key in [k for k in self._pulls if node in k]:
            del self._pulls[key]
        if st is None:
            return []
        events: list[RegistryEvent] = []
        names: dict[str, None] = {}
        for id in sorted(st.entries):
            self._drop_entry(node, st.entries[id], events, names)
        return events + self._check_names(names) if names else events

    def _tombstoned(self, owner: str, epoch: int) -> bool:
        t = self._tombstones.get(owner)
        return t is not None and epoch <= t

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> None:
        """Run what is due: flush pending changes, expire buffers, send a digest."""
        if self._flush_at is not None and now >= self._flush_at:
            self._flush()
        if self._assembly:
            limit = now - self.config.assembly_timeout
            for key in [k for k, a in self._assembly.items() if a.started <= limit]:
                del self._assembly[key]
        if self._pulls:
            for key in [k for k, t in self._pulls.items() if t <= now]:
                del self._pulls[key]
        if now >= self._next_sync:
            self._next_sync = now + self.config.sync_interval
            peers = self.peers()
            if peers:
                self._send(self._rng.choice(peers), self._digest())

    def _digest(self) -> Digest:
        owners = {self.node: (self.epoch, self.version)}
        budget = self.config.max_digest_bytes - _digest_line_size(self.node)
        live = [o for o in sorted(self._owners) if o not in self._unknown]
        order = live + sorted(self._unknown)
        if sum(_digest_line_size(o) for o in order) > budget:
            # Too many to list: a rotating window, live members first, so that every owner
            # is compared now and then.
            start = self._rng.randrange(len(order))
            order = order[start:] + order[:start]
            order.sort(key=lambda o: o in self._unknown)
            self.stats.digests_trimmed += 1
        partial = False
        for o in order:
            budget -= _digest_line_size(o)
            if budget < 0:
                partial = True
                break
            st = self._owners[o]
            owners[o] = (st.epoch, st.version)
        return Digest(owners, partial)

    # ------------------------------------------------------------------ input

    def step(self, src: str, msg: SyncMessage, now: float) -> list[RegistryEvent]:
        """Handle one message from ``src``; returns the resulting view changes."""
        self.stats.msgs_in[_KIND[type(msg)]] += 1
        if isinstance(msg, Delta | Full) and not _in_range(msg.epoch, msg.version):
            # Decoding refuses these; a message built in-process is checked all the same.
            self.stats.out_of_range_dropped += 1
            return []
        if isinstance(msg, Delta):
            return self._on_delta(src, msg, now)
        if isinstance(msg, Full):
            return self._on_full(src, msg, now)
        if isinstance(msg, Digest):
            self._on_digest(src, msg, now)
        else:
            self._on_pull(src, msg)
        return []

    def _about_self(self, epoch: int, version: int) -> None:
        self.stats.own_claims_dropped += 1
        if (epoch, version) > (self.epoch, self.version):
            # A peer holds a newer state of ours than we do: our epoch went backwards (a
            # restart with a clock behind). Outrank it so our own word wins again -- without
            # ever stepping past the bounds (see the module docstring).
            if epoch < MAX_EPOCH:
                self.epoch = epoch + 1
            elif version < _STEP_VERSION_LIMIT:
                self.epoch, self.version = MAX_EPOCH, version + 1
            else:
                self.stats.out_of_range_dropped += 1
                return
            self.stats.epoch_bumps += 1
            self._pending_up = {}
            self._pending_rm = {}
            self._pending_base = self.version
            self._flush_at = None
            for peer in self.peers():
                self._send_own_full(peer)

    def _on_delta(self, src: str, d: Delta, now: float) -> list[RegistryEvent]:
        owner = d.owner
        if owner == self.node:
            self._about_self(d.epoch, d.version)
            return []
        if d.version <= d.base_version:
            self.stats.invalid_dropped += 1
            return []
        if self._tombstoned(owner, d.epoch):
            self.stats.tombstoned_dropped += 1
            return []
        st = self._owners.get(owner)
        if st is not None and (d.epoch, d.version) <= (st.epoch, st.version):
            self.stats.stale_dropped += 1
            return []
        if st is None and not self._may_hold(owner):
            return []
        events: list[RegistryEvent] = []
        names: dict[str, None] = {}
        if st is not None and d.epoch == st.epoch and d.base_version == st.version:
            pass
        elif d.base_version == 0 and (st is None or d.epoch > st.epoch):
            # First delta of an owner, or of a new epoch: it starts from an empty state.
            if st is not None:
                for id in sorted(st.entries):
                    self._drop_entry(owner, st.entries[id], events, names)
            if st is None:
                st = self._new_owner(owner, d.epoch, 0)
            else:
                st = self._owners[owner] = _Owner(d.epoch, 0)
        else:
            self.stats.gaps += 1
            self._pull(src, owner, now)
            return []
        st.epoch, st.version = d.epoch, d.version
        for id in d.removed_ids:
            old = st.entries.pop(id, None)
            if old is not None:
                self._drop_entry(owner, old, events, names)
        for e in d.upserts:
            if self._acceptable(owner, e):
                self._put_entry(st, owner, e, events, names)
        self.stats.deltas_applied += 1
        return events + self._check_names(names) if names else events

    def _on_full(self, src: str, f: Full, now: float) -> list[RegistryEvent]:
        owner = f.owner
        if owner == self.node:
            self._about_self(f.epoch, f.version)
            return []
        if f.part >= f.parts:
            self.stats.invalid_dropped += 1
            return []
        if self._tombstoned(owner, f.epoch):
            self.stats.tombstoned_dropped += 1
            return []
        st = self._owners.get(owner)
        if st is not None and (f.epoch, f.version) <= (st.epoch, st.version):
            self.stats.stale_dropped += 1
            return []
        if st is None and not self._may_hold(owner):
            return []
        if f.parts == 1:
            return self._install(owner, f.epoch, f.version, f.entries)
        key = (src, owner)
        a = self._assembly.get(key)
        if a is None or (a.epoch, a.version, a.parts) != (f.epoch, f.version, f.parts):
            if a is not None and (a.epoch, a.version) > (f.epoch, f.version):
                self.stats.stale_dropped += 1
                return []
            a = self._assembly[key] = _Assembly(f.epoch, f.version, f.parts, now)
        a.got[f.part] = f.entries
        if len(a.got) < a.parts:
            return []
        del self._assembly[key]
        entries = tuple(e for i in range(a.parts) for e in a.got[i])
        return self._install(owner, a.epoch, a.version, entries)

    def _install(
        self, owner: str, epoch: int, version: int, entries: tuple[AgentEntry, ...]
    ) -> list[RegistryEvent]:
        """Replace an owner's whole entry set (a complete Full)."""
        st = self._owners.get(owner)
        if st is None:
            st = self._new_owner(owner, epoch, version)
        st.epoch, st.version = epoch, version
        new: dict[str, AgentEntry] = {}
        for e in entries:
            if self._acceptable(owner, e):
                new[e.id] = e
        events: list[RegistryEvent] = []
        names: dict[str, None] = {}
        for id in sorted(st.entries):
            if id not in new:
                self._drop_entry(owner, st.entries.pop(id), events, names)
        for id in sorted(new):
            self._put_entry(st, owner, new[id], events, names)
        self.stats.fulls_applied += 1
        for key in [k for k in self._pulls if k[1] == owner]:
            del self._pulls[key]
        return events + self._check_names(names) if names else events

    def _on_digest(self, src: str, g: Digest, now: float) -> None:
        theirs = g.owners
        for owner in sorted(theirs):
            ep, ver = theirs[owner]
            if not _in_range(ep, ver):
                self.stats.out_of_range_dropped += 1
                continue
            if owner == self.node:
                if (ep, ver) < (self.epoch, self.version):
                    self._send_own_full(src)
                elif (ep, ver) > (self.epoch, self.version):
                    self._about_self(ep, ver)
                continue
            if self._tombstoned(owner, ep):
                continue
            st = self._owners.get(owner)
            if st is None or (st.epoch, st.version) < (ep, ver):
                self._pull(src, owner, now)
            elif (st.epoch, st.version) > (ep, ver):
                self._send_full(src, owner, st)
        if g.partial:
            return  # an owner missing from a partial digest is not one the sender lacks
        if self.node not in theirs:
            self._send_own_full(src)
        for owner in sorted(self._owners):
            if owner not in theirs and owner != src:
                self._send_full(src, owner, self._owners[owner])

    def _on_pull(self, src: str, p: Pull) -> None:
        if p.owner == self.node:
            self._send_own_full(src)
            return
        st = self._owners.get(p.owner)
        if st is not None:
            self._send_full(src, p.owner, st)

    # ------------------------------------------------------------------ helpers

    def _may_hold(self, owner: str) -> bool:
        """Whether a state for ``owner`` (not held yet) may be kept: always for a live
        member, for anyone else only within ``max_unknown_owners``."""
        if owner in self._live or len(self._unknown) < self.config.max_unknown_owners:
            return True
        self.stats.unknown_owners_dropped += 1
        return False

    def _new_owner(self, owner: str, epoch: int, version: int) -> _Owner:
        st = self._owners[owner] = _Owner(epoch, version)
        if owner not in self._live:
            self._unknown[owner] = None
        return st

    def _acceptable(self, owner: str, e: AgentEntry) -> bool:
        if e.node != owner:
            self.stats.foreign_dropped += 1
            return False
        try:
            validate_entry(e)
        except ValueError:
            self.stats.invalid_dropped += 1
            return False
        held = self.index.get(e.id)
        if held is not None and held.node != owner:
            self.stats.id_conflicts_dropped += 1
            return False
        return True

    def _put_entry(
        self,
        st: _Owner,
        owner: str,
        e: AgentEntry,
        events: list[RegistryEvent],
        names: dict[str, None],
    ) -> None:
        prev = st.entries.get(e.id)
        if prev == e:
            return
        st.entries[e.id] = e
        self.index.upsert(e)
        events.append(RegistryEvent("registered" if prev is None else "updated", e))
        if e.unique:
            names[e.name] = None
        if prev is not None and prev.unique:
            names[prev.name] = None

    def _drop_entry(
        self, owner: str, e: AgentEntry, events: list[RegistryEvent], names: dict[str, None]
    ) -> None:
        held = self.index.get(e.id)
        # Only ever remove what this owner put there (ids are not trusted to be unique).
        if held is not None and held.node == owner:
            self.index.remove(e.id)
        events.append(RegistryEvent("unregistered", e))
        if e.unique:
            names[e.name] = None

    def _check_names(self, names: dict[str, None]) -> list[RegistryEvent]:
        """name_conflict events for our entries that lost a touched unique name."""
        events: list[RegistryEvent] = []
        for name in sorted(names):
            holders = [e for e in self.index.by_name(name) if e.unique]
            pairs: dict[tuple[str, str], None] = {}
            if len(holders) > 1:
                winner = holders[0]
                for loser in holders[1:]:
                    if loser.node == self.node and winner.node != self.node:
                        pairs[(loser.id, winner.id)] = None
                        if (loser.id, winner.id) not in self._conflicts.get(name, {}):
                            events.append(RegistryEvent("name_conflict", loser, winner))
                            self.stats.name_conflicts += 1
            if pairs:
                self._conflicts[name] = pairs
            else:
                self._conflicts.pop(name, None)
        return events

    def _pull(self, peer: str, owner: str, now: float) -> None:
        key = (peer, owner)
        if self._pulls.get(key, -math.inf) > now:
            return
        self._pulls[key] = now + self.config.pull_retry
        self._send(peer, Pull(owner))

    def _send(self, peer: str, msg: SyncMessage) -> None:
        self.stats.msgs_out[_KIND[type(msg)]] += 1
        self._out.append((peer, msg))

    def _send_own_full(self, peer: str) -> None:
        # Sent even when empty: a restarted node's empty state must replace its old entries.
        entries = [self._local[i] for i in sorted(self._local)]
        self._send_parts(peer, self.node, self.epoch, self.version, entries)

    def _send_full(self, peer: str, owner: str, st: _Owner) -> None:
        entries = [st.entries[i] for i in sorted(st.entries)]
        self._send_parts(peer, owner, st.epoch, st.version, entries)

    def _send_parts(
        self, peer: str, owner: str, epoch: int, version: int, entries: list[AgentEntry]
    ) -> None:
        size = max(1, self.config.max_entries_per_message)
        parts = max(1, -(-len(entries) // size))
        for i in range(parts):
            chunk = tuple(entries[i * size : (i + 1) * size])
            self._send(peer, Full(owner, epoch, version, i, parts, chunk))
