"""The cluster keyring: which AES-GCM keys seal and open frames.

Theory of operation: a cluster shares one or more symmetric keys. The *primary* key (the first
one) seals every outgoing frame; every installed key is tried when opening, so a key can be
rotated without a flag day:

1. ``install(new)`` on every node (all nodes now *accept* the new key),
2. ``use(new)`` on every node (all nodes now *seal* with it; the old one still opens stragglers),
3. ``remove(old)`` on every node (frames sealed with the old key are refused from now on).

Each frame carries a one-byte hint derived from a hash of the key that sealed it, so the
receiver tries the likely key first; a hint is not secret and may collide, so every other key
is still tried after it. Keys never appear in logs or reprs: :meth:`Keyring.fingerprint` gives
a short id to log instead.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KEY_SIZES", "Keyring", "KeyringError", "key_hint"]

log = logging.getLogger(__name__)

KEY_SIZES = (16, 24, 32)
"""Accepted key lengths in bytes: AES-128, AES-192 and AES-256."""


class KeyringError(ValueError):
    """A key or keyring file is unusable (wrong size, bad encoding, unknown key...)."""


def key_hint(key: bytes) -> int:
    """The one-byte hint a frame sealed with ``key`` carries (not secret, may collide)."""
    # Domain-separated so the hint says nothing about any other use of the key's hash.
    return hashlib.sha256(b"agentcluster/key-hint\x00" + key).digest()[0]


def _check_key(key: bytes, where: str = "key") -> bytes:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise KeyringError(f"{where}: expected bytes, got {type(key).__name__}")
    key = bytes(key)
    if len(key) not in KEY_SIZES:
        raise KeyringError(
            f"{where}: a key must be 16, 24 or 32 bytes (AES-128/192/256), got {len(key)} bytes"
        )
    return key


def _decode_b64(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        # The offending text is a (possibly mistyped) key: never echo it.
        raise KeyringError(f"{where}: not valid base64") from None
    return _check_key(raw, where)


class Keyring:
    """An ordered set of AES-GCM keys; the first one is the primary.

    >>> ring = Keyring.generate()
    >>> len(ring.primary)
    32
    """

    __slots__ = ("_ciphers", "_hints", "_keys", "_order")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if isinstance(keys, bytes | bytearray):
            raise KeyringError("Keyring takes a sequence of keys, not a single bytes object")
        checked = [_check_key(k, f"key #{i + 1}") for i, k in enumerate(keys)]
        if not checked:
            raise KeyringError("a keyring needs at least one key")
        if len(set(checked)) != len(checked):
            raise KeyringError("a keyring cannot hold the same key twice")
        self._keys: list[bytes] = checked
        self._ciphers: dict[bytes, AESGCM] = {k: AESGCM(k) for k in checked}
        self._hints: dict[bytes, int] = {k: key_hint(k) for k in checked}
        # Per-hint trial order, rebuilt lazily after every change (the receive path is hot).
        self._order: dict[int, tuple[AESGCM, ...]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def generate(cls, size: int = 32) -> Keyring:
        """A keyring with one fresh random key of ``size`` bytes."""
        if size not in KEY_SIZES:
            raise KeyringError(f"key size must be one of {KEY_SIZES}, got {size}")
        return cls([os.urandom(size)])

    @classmethod
    def from_env(cls, value: str) -> Keyring:
        """Parse comma-separated base64 keys, primary first (e.g. an environment variable)."""
        parts = [p.strip() for p in value.split(",")]
        keys = [_decode_b64(p, f"key #{i + 1}") for i, p in enumerate(parts) if p]
        if not keys:
            raise KeyringError("no key found (expected comma-separated base64 keys)")
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read one base64 key per line, primary first; blank lines and ``#`` comments skipped."""
        try:
            mode = os.stat(path).st_mode
            if mode & 0o077:
                log.warning(
                    "key file %s is accessible by group/others (mode %03o); chmod 600 it",
                    os.fspath(path),
                    mode & 0o777,
                )
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyringError(
                f"cannot read key file {os.fspath(path)!r}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise KeyringError(f"key file {os.fspath(path)!r} is not text") from None
        keys: list[bytes] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            keys.append(_decode_b64(stripped, f"{os.fspath(path)} line {lineno}"))
        if not keys:
            raise KeyringError(f"key file {os.fspath(path)!r} holds no key")
        return cls(keys)

    def to_file(self, path: str | os.PathLike[str]) -> None:
        """Write the keys (primary first) to ``path``, readable by the owner only (mode 0600).

        The file is written next to its destination and renamed over it, so a reader never
        sees half a keyring and the secret never exists with wider permissions.
        """
        dest = Path(path)
        lines = ["# agentcluster keyring: one base64 key per line, primary first"]
        lines += [base64.b64encode(k).decode("ascii") for k in self._keys]
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent or ".")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # ------------------------------------------------------------------ access
    @property
    def primary(self) -> bytes:
        """The key that seals outgoing frames."""
        return self._keys[0]

    @property
    def keys(self) -> tuple[bytes, ...]:
        """All installed keys, primary first."""
        return tuple(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and key in self._ciphers

    def __repr__(self) -> str:
        prints = ", ".join(self.fingerprint(k) for k in self._keys)
        return f"Keyring([{prints}])"

    @staticmethod
    def fingerprint(key: bytes) -> str:
        """A short hex id of ``key`` for logs and status pages (the key itself is never shown)."""
        return hashlib.sha256(b"agentcluster/key-fingerprint\x00" + bytes(key)).hexdigest()[:12]

    # ------------------------------------------------------------------ rotation
    def install(self, key: bytes) -> None:
        """Accept frames sealed with ``key`` (it does not become primary); no-op if present."""
        key = _check_key(key)
        if key in self._ciphers:
            return
        self._keys.append(key)
        self._ciphers[key] = AESGCM(key)
        self._hints[key] = key_hint(key)
        self._order.clear()

    def use(self, key: bytes) -> None:
        """Make an installed key the primary."""
        key = _check_key(key)
        if key not in self._ciphers:
            raise KeyringError(f"key {self.fingerprint(key)} is not installed; install it first")
        self._keys.remove(key)
        self._keys.insert(0, key)
        self._order.clear()

    def remove(self, key: bytes) -> None:
        """Stop accepting ``key``; the primary cannot be removed (``use`` another one first)."""
        key = _check_key(key)
        if key not in self._ciphers:
            raise KeyringError(f"key {self.fingerprint(key)} is not installed")
        if key == self._keys[0]:
            raise KeyringError("cannot remove the primary key; make another key primary first")
        self._keys.remove(key)
        del self._ciphers[key]
        del self._hints[key]
        self._order.clear()

    # ------------------------------------------------------------------ codec support
    def sealer(self) -> tuple[int, AESGCM]:
        """The primary key's hint and cipher."""
        key = self._keys[0]
        return self._hints[key], self._ciphers[key]

    def openers(self, hint: int) -> tuple[AESGCM, ...]:
        """Ciphers to try for a frame with ``hint``: keys with that hint first, then the rest."""
        order = self._order.get(hint)
        if order is None:
            hinted = [self._ciphers[k] for k in self._keys if self._hints[k] == hint]
            others = [self._ciphers[k] for k in self._keys if self._hints[k] != hint]
            order = self._order[hint] = (*hinted, *others)
        return order
