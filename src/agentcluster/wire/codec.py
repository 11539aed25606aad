"""Frames on the wire: versioned, size-limited, authenticated (optionally encrypted) msgpack.

Theory of operation: a frame is ``[version:1][flags:1][key_hint:1][nonce:12][body]``. The
15-byte header is always bound to the body as AES-GCM associated data, so no header bit can be
flipped unnoticed. The payload is the msgpack encoding of ``(sent_at_ms, message)`` and the body
is, by mode:

* **encrypted** (flags bit 0 set, the default): ``AESGCM(nonce, payload, aad=header)``, i.e.
  ciphertext followed by a 16-byte tag;
* **authenticated** (no flag bit): ``payload + tag`` where the tag is GCM over
  ``header + payload`` as associated data -- readable on the wire (handy with tcpdump), but no
  node without the key can forge or alter a frame;
* **plaintext** (flags bit 1 set, no keyring, development only): ``payload`` as is.

A codec with a keyring accepts encrypted and authenticated frames (the sender chooses), and
refuses plaintext ones; a codec without a keyring accepts plaintext frames only. Both cases
are reported as :class:`BadMac`: the frame is not from a member of this cluster.

Replay protection: the sender's wall-clock time is inside the sealed payload; a frame more than
``replay_window`` seconds from the receiver's clock is refused, and a frame whose nonce was
already accepted is refused. Nonces only need remembering while their timestamp is fresh, so
the cache forgets an entry ``replay_window`` after its timestamp; it is also bounded, and when a
flood overflows it the entry with the *smallest timestamp* (the new one included) is evicted and
that timestamp becomes a floor at or below which frames are refused -- under overload the codec
errs towards dropping, never towards accepting a replay. Evicting by timestamp, not by arrival,
matters: a sender whose clock runs ahead (but inside the window) must not lift the floor above
the on-time senders' clocks, or their fresh frames would all be refused as replays. Nodes' wall
clocks must therefore agree to within ``replay_window`` (NTP does that). A consequence worth
knowing: a network that duplicates packets sees the copies dropped here as ``replayed``.

Nonces are an 8-byte random prefix chosen per codec plus a 4-byte counter (a new prefix when it
wraps), so one sender never repeats a nonce and two senders collide only if their random
prefixes do. Every failure on the receive path is a :class:`WireError` subclass whose
``reason`` names a :class:`DropCounters` field; :meth:`WireCodec.try_decode` counts it and
returns ``None``.
"""

from __future__ import annotations

import heapq
import os
import struct
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
from cryptography.exceptions import InvalidTag

from agentcluster.clock import MonotonicClock
from agentcluster.wire.keyring import Keyring

__all__ = [
    "FLAG_ENCRYPTED",
    "FLAG_PLAINTEXT",
    "HEADER_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "VERSION",
    "BadMac",
    "BadVersion",
    "DropCounters",
    "Malformed",
    "Oversized",
    "Replayed",
    "Truncated",
    "WireCodec",
    "WireError",
]

VERSION = 1
FLAG_ENCRYPTED = 0x01
FLAG_PLAINTEXT = 0x02
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct("!BBB12s")
HEADER_SIZE = _HEADER.size  # 15
_VALID_FLAGS = frozenset({0, FLAG_ENCRYPTED, FLAG_PLAINTEXT})
_COUNTER_LIMIT = 1 << 32


class WireError(Exception):
    """A frame could not be encoded or was refused; ``reason`` names the drop counter."""

    reason: ClassVar[str] = "malformed"


class Truncated(WireError):
    """Shorter than a header (plus a tag, for keyed frames)."""

    reason = "truncated"


class Oversized(WireError):
    """Larger than ``max_size``."""

    reason = "oversized"


class BadVersion(WireError):
    """Unknown version byte or flag bits."""

    reason = "bad_version"


class BadMac(WireError):
    """Not sealed by any installed key, tampered with, or keyed/plaintext mismatch."""

    reason = "bad_mac"


class Replayed(WireError):
    """Timestamp outside the replay window, or a nonce already accepted."""

    reason = "replayed"


class Malformed(WireError):
    """Authentic, but the payload is not a valid message of the codec's type."""

    reason = "malformed"


class DropCounters:
    """How many frames were refused, by reason."""

    __slots__ = ("bad_mac", "bad_version", "malformed", "oversized", "replayed", "truncated")

    REASONS: ClassVar[tuple[str, ...]] = (
        "truncated",
        "oversized",
        "bad_version",
        "bad_mac",
        "replayed",
        "malformed",
    )

    def __init__(self) -> None:
        self.truncated = 0
        self.oversized = 0
        self.bad_version = 0
        self.bad_mac = 0
        self.replayed = 0
        self.malformed = 0

    def count(self, error: WireError) -> None:
        setattr(self, error.reason, getattr(self, error.reason) + 1)

    @property
    def total(self) -> int:
        return sum(getattr(self, r) for r in self.REASONS)

    def as_dict(self) -> dict[str, int]:
        return {r: getattr(self, r) for r in self.REASONS}

    def __repr__(self) -> str:
        fields = ", ".join(f"{r}={getattr(self, r)}" for r in self.REASONS)
        return f"DropCounters({fields})"


class _NonceCache:
    """Nonces accepted within the replay window (bounded; see the module docstring).

    A min-heap of ``(sent_at_ms, nonce)`` orders expiry and eviction by timestamp (O(log n));
    the set answers "seen?" in O(1). Both hold the same entries, at most ``capacity``.
    """

    __slots__ = ("_capacity", "_floor_ms", "_heap", "_seen", "_window_ms")

    def __init__(self, window_ms: int, capacity: int) -> None:
        self._window_ms = window_ms
        self._capacity = capacity
        self._heap: list[tuple[int, bytes]] = []
        self._seen: set[bytes] = set()  # membership only, never iterated
        self._floor_ms = -(1 << 62)

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def floor_ms(self) -> int:
        """Frames sent at or before this (ms) are refused: an evicted nonce may be among them."""
        return self._floor_ms

    def admit(self, nonce: bytes, sent_at_ms: int, now_ms: int) -> bool:
        """Record ``nonce``; False if it (or anything this old) may be a replay."""
        heap, seen = self._heap, self._seen
        horizon = now_ms - self._window_ms
        while heap and heap[0][0] < horizon:
            seen.discard(heapq.heappop(heap)[1])
        if sent_at_ms <= self._floor_ms or nonce in seen:
            return False
        if len(heap) >= self._capacity:
            # Evict the oldest timestamp, the new frame's included: the floor then never
            # rises above a timestamp some on-time sender has already passed.
            evicted_at, evicted = heapq.heappushpop(heap, (sent_at_ms, nonce))
            if evicted != nonce:
                seen.discard(evicted)
                seen.add(nonce)
            self._floor_ms = max(self._floor_ms, evicted_at)
            return True
        heapq.heappush(heap, (sent_at_ms, nonce))
        seen.add(nonce)
        return True


class WireCodec:
    """Encode and decode frames carrying messages of ``message_type`` (a msgspec type)."""

    def __init__(
        self,
        message_type: Any,
        keyring: Keyring | None,
        *,
        encrypt: bool = True,
        max_size: int = 64 * 1024,
        replay_window: float = 60.0,
        wall: Callable[[], float] | None = None,
        max_nonces: int = 1 << 16,
    ) -> None:
        if max_size < HEADER_SIZE + TAG_SIZE + 1:
            raise ValueError(f"max_size must be at least {HEADER_SIZE + TAG_SIZE + 1} bytes")
        if replay_window <= 0:
            raise ValueError("replay_window must be > 0 seconds")
        if max_nonces < 1:
            raise ValueError("max_nonces must be >= 1")
        self.message_type = message_type
        self.keyring = keyring
        self.encrypt = encrypt
        self.max_size = max_size
        self.replay_window = replay_window
        # The loop-driven clock: wall time that also runs virtually under VirtualTimeLoop.
        self._wall = wall if wall is not None else MonotonicClock().wall
        self._window_ms = int(replay_window * 1000)
        self._nonces = _NonceCache(self._window_ms, max_nonces)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[tuple[int, Any]] = msgspec.msgpack.Decoder(
            tuple[int, message_type]
        )
        self._prefix = os.urandom(8)
        self._counter = 0
        self.drops = DropCounters()
        self.accepted = 0

    @property
    def mode(self) -> str:
        """``"encrypted"``, ``"authenticated"`` or ``"plaintext"`` (what :meth:`encode` emits)."""
        if self.keyring is None:
            return "plaintext"
        return "encrypted" if self.encrypt else "authenticated"

    def _next_nonce(self) -> bytes:
        if self._counter >= _COUNTER_LIMIT:
            self._prefix = os.urandom(8)
            self._counter = 0
        nonce = self._prefix + self._counter.to_bytes(4, "big")
        self._counter += 1
        return nonce

    # ------------------------------------------------------------------ encode
    def encode(self, message: Any) -> bytes:
        """Seal ``message`` into a frame; :class:`Oversized` if it would exceed ``max_size``."""
        payload = self._encoder.encode((int(self._wall() * 1000), message))
        nonce = self._next_nonce()
        ring = self.keyring
        if ring is None:
            frame = _HEADER.pack(VERSION, FLAG_PLAINTEXT, 0, nonce) + payload
        else:
            hint, cipher = ring.sealer()
            if self.encrypt:
                header = _HEADER.pack(VERSION, FLAG_ENCRYPTED, hint, nonce)
                frame = header + cipher.encrypt(nonce, payload, header)
            else:
                signed = _HEADER.pack(VERSION, 0, hint, nonce) + payload
                frame = signed + cipher.encrypt(nonce, b"", signed)
        if len(frame) > self.max_size:
            raise Oversized(
                f"{type(message).__name__} frame is {len(frame)} bytes, max_size is {self.max_size}"
            )
        return frame

    # ------------------------------------------------------------------ decode
    def decode(self, data: bytes) -> Any:
        """Open a frame and return its message, or raise a :class:`WireError` subclass."""
        size = len(data)
        if size > self.max_size:
            raise Oversized(f"frame of {size} bytes exceeds max_size {self.max_size}")
        if size < HEADER_SIZE:
            raise Truncated(f"frame of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
        version, flags, hint, nonce = _HEADER.unpack_from(data)
        if version != VERSION:
            raise BadVersion(f"unknown frame version {version}")
        if flags not in _VALID_FLAGS:
            raise BadVersion(f"unknown frame flags {flags:#04x}")
        payload = self._open(bytes(data), flags, hint, nonce)
        try:
            sent_at_ms, message = self._decoder.decode(payload)
        except Exception as exc:
            # msgspec raises DecodeError/ValidationError; a user __post_init__ may raise anything.
            raise Malformed(f"cannot decode payload: {exc}") from None
        now_ms = int(self._wall() * 1000)
        if abs(now_ms - sent_at_ms) > self._window_ms:
            raise Replayed(f"timestamp is {(now_ms - sent_at_ms) / 1000:+.3f} s from now")
        if not self._nonces.admit(nonce, sent_at_ms, now_ms):
            raise Replayed("nonce already seen")
        self.accepted += 1
        return message

    def _open(self, data: bytes, flags: int, hint: int, nonce: bytes) -> bytes:
        ring = self.keyring
        if flags & FLAG_PLAINTEXT:
            if ring is not None:
                raise BadMac("plaintext frame refused by a keyed codec")
            return data[HEADER_SIZE:]
        if ring is None:
            raise BadMac("keyed frame refused by a plaintext codec")
        if len(data) < HEADER_SIZE + TAG_SIZE:
            raise Truncated(f"keyed frame of {len(data)} bytes has no room for its tag")
        if flags & FLAG_ENCRYPTED:
            header, body = data[:HEADER_SIZE], data[HEADER_SIZE:]
            for cipher in ring.openers(hint):
                try:
                    return cipher.decrypt(nonce, body, header)
                except InvalidTag:
                    continue
        else:
            signed, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
            for cipher in ring.openers(hint):
                try:
                    cipher.decrypt(nonce, tag, signed)
                except InvalidTag:
                    continue
                return signed[HEADER_SIZE:]
        raise BadMac("no installed key opens this frame")

    def try_decode(self, data: bytes) -> Any | None:
        """Like :meth:`decode`, but count the failure in :attr:`drops` and return ``None``."""
        try:
            return self.decode(data)
        except WireError as exc:
            self.drops.count(exc)
            return None
