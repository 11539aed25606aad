"""The wire layer: the cluster keyring and the versioned, authenticated frame codec.

Theory of operation: everything a node puts on the network goes through a
:class:`WireCodec`, which turns a msgspec message into a size-limited frame sealed with the
primary key of a :class:`Keyring` (AES-GCM), and turns bytes back into a message only if they
are a fresh, authentic frame of the expected type. Refusals are :class:`WireError` subclasses;
receive paths use :meth:`WireCodec.try_decode`, which counts them in :class:`DropCounters`.
"""

from agentcluster.wire.codec import (
    FLAG_ENCRYPTED,
    FLAG_PLAINTEXT,
    HEADER_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    VERSION,
    BadMac,
    BadVersion,
    DropCounters,
    Malformed,
    Oversized,
    Replayed,
    Truncated,
    WireCodec,
    WireError,
)
from agentcluster.wire.keyring import KEY_SIZES, Keyring, KeyringError, key_hint

__all__ = [
    "FLAG_ENCRYPTED",
    "FLAG_PLAINTEXT",
    "HEADER_SIZE",
    "KEY_SIZES",
    "NONCE_SIZE",
    "TAG_SIZE",
    "VERSION",
    "BadMac",
    "BadVersion",
    "DropCounters",
    "Keyring",
    "KeyringError",
    "Malformed",
    "Oversized",
    "Replayed",
    "Truncated",
    "WireCodec",
    "WireError",
    "key_hint",
]
