"""Keyring and frame codec: modes, keys and rotation, replay, limits, and hostile input."""

from __future__ import annotations

import base64
import os
import random
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcluster.wire import (
    FLAG_ENCRYPTED,
    FLAG_PLAINTEXT,
    HEADER_SIZE,
    TAG_SIZE,
    VERSION,
    BadMac,
    BadVersion,
    DropCounters,
    Keyring,
    KeyringError,
    Malformed,
    Oversized,
    Replayed,
    Truncated,
    WireCodec,
    WireError,
    key_hint,
)


class Ping(msgspec.Struct, tag=True):
    seq: int
    target: str


class Ack(msgspec.Struct, tag=True):
    seq: int
    payload: bytes = b""


class Other(msgspec.Struct, tag=True):
    flag: bool


Msg = Ping | Ack


class FakeWall:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def key(n: int, size: int = 32) -> bytes:
    return bytes([n]) * size


def pair(
    ring: Keyring | None, *, encrypt: bool = True, **kw: object
) -> tuple[WireCodec, WireCodec, FakeWall]:
    wall = FakeWall()
    return (
        WireCodec(Msg, ring, encrypt=encrypt, wall=wall, **kw),  # type: ignore[arg-type]
        WireCodec(Msg, ring, encrypt=encrypt, wall=wall, **kw),  # type: ignore[arg-type]
        wall,
    )


# ---------------------------------------------------------------------------- keyring


@pytest.mark.parametrize("size", [16, 24, 32])
def test_keyring_accepts_aes_key_sizes(size: int) -> None:
    ring = Keyring([os.urandom(size)])
    assert len(ring.primary) == size
    assert len(Keyring.generate(size).primary) == size


@pytest.mark.parametrize("size", [0, 8, 15, 17, 31, 33, 64])
def test_keyring_rejects_other_sizes_naming_the_problem(size: int) -> None:
    with pytest.raises(KeyringError, match=f"16, 24 or 32 bytes.*got {size} bytes"):
        Keyring([b"k" * size])
    with pytest.raises(KeyringError):
        Keyring.generate(size)


def test_keyring_rejects_empty_duplicates_and_bare_bytes() -> None:
    with pytest.raises(KeyringError, match="at least one key"):
        Keyring([])
    with pytest.raises(KeyringError, match="twice"):
        Keyring([key(1), key(1)])
    with pytest.raises(KeyringError, match="sequence"):
        Keyring(key(1))  # type: ignore[arg-type]
    assert issubclass(KeyringError, ValueError)


def test_generate_gives_distinct_random_keys() -> None:
    assert Keyring.generate().primary != Keyring.generate().primary


def test_use_install_remove() -> None:
    ring = Keyring([key(1), key(2)])
    assert list(ring.keys) == [key(1), key(2)] and ring.primary == key(1)
    ring.install(key(3))
    ring.install(key(3))  # idempotent
    assert list(ring.keys) == [key(1), key(2), key(3)]
    ring.use(key(3))
    assert ring.primary == key(3) and list(ring.keys) == [key(3), key(1), key(2)]
    ring.remove(key(1))
    assert list(ring.keys) == [key(3), key(2)] and key(1) not in ring and key(2) in ring
    with pytest.raises(KeyringError, match="primary"):
        ring.remove(key(3))
    with pytest.raises(KeyringError, match="not installed"):
        ring.remove(key(9))
    with pytest.raises(KeyringError, match="not installed"):
        ring.use(key(9))
    with pytest.raises(KeyringError, match="32 bytes"):
        ring.install(b"short")
    assert len(ring) == 2


def test_file_round_trip_comments_and_mode(tmp_path: Path) -> None:
    ring = Keyring([key(1), key(2, 16), key(3, 24)])
    path = tmp_path / "cluster.key"
    ring.to_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.from_file(path).keys == ring.keys
    # Overwriting keeps 0600 even if the old file was world-readable.
    path.chmod(0o644)
    Keyring([key(4)]).to_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.from_file(path).keys == (key(4),)
    b64 = [base64.b64encode(k).decode() for k in (key(5), key(6))]
    path.write_text(f"# rotated 2024-05\n\n  {b64[0]}  \n# old key\n{b64[1]}\n")
    assert Keyring.from_file(path).keys == (key(5), key(6))
    assert list(tmp_path.iterdir()) == [path], "no temporary file left behind"


def test_loose_key_file_permissions_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k"
    Keyring([key(1)]).to_file(path)
    Keyring.from_file(path)
    assert caplog.records == []
    path.chmod(0o644)
    assert Keyring.from_file(path).primary == key(1)
    assert "mode 644" in caplog.text and "chmod 600" in caplog.text


def test_file_errors_name_the_line_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    good = base64.b64encode(key(1)).decode()
    path.write_text(f"{good}\nnot*base64!\n")
    with pytest.raises(KeyringError, match="line 2: not valid base64") as info:
        Keyring.from_file(path)
    assert "not*base64" not in str(info.value)
    path.write_text(base64.b64encode(b"x" * 20).decode() + "\n")
    with pytest.raises(KeyringError, match=r"line 1.*got 20 bytes"):
        Keyring.from_file(path)
    path.write_text("# nothing here\n\n")
    with pytest.raises(KeyringError, match="no key"):
        Keyring.from_file(path)
    with pytest.raises(KeyringError, match="cannot read"):
        Keyring.from_file(tmp_path / "missing")


def test_from_env() -> None:
    a, b = (base64.b64encode(k).decode() for k in (key(1), key(2, 16)))
    assert Keyring.from_env(f" {a} , {b},").keys == (key(1), key(2, 16))
    with pytest.raises(KeyringError, match="no key"):
        Keyring.from_env(" , ")
    with pytest.raises(KeyringError, match="key #2: not valid base64"):
        Keyring.from_env(f"{a},???")


def test_fingerprint_and_repr_never_show_the_key() -> None:
    k = key(7)
    fp = Keyring.fingerprint(k)
    assert fp == Keyring.fingerprint(k) and fp != Keyring.fingerprint(key(8))
    assert len(fp) == 12 and int(fp, 16) >= 0
    ring = Keyring([k])
    text = repr(ring)
    assert fp in text
    assert base64.b64encode(k).decode() not in text and k.hex() not in text
    assert 0 <= key_hint(k) < 256


# ---------------------------------------------------------------------------- codec modes


@pytest.mark.parametrize(
    ("ring", "encrypt", "flags", "mode"),
    [
        (Keyring([key(1)]), True, FLAG_ENCRYPTED, "encrypted"),
        (Keyring([key(1)]), False, 0, "authenticated"),
        (None, True, FLAG_PLAINTEXT, "plaintext"),
    ],
)
def test_round_trip_in_each_mode(
    ring: Keyring | None, encrypt: bool, flags: int, mode: str
) -> None:
    tx, rx, _ = pair(ring, encrypt=encrypt)
    assert tx.mode == mode
    for msg in (Ping(1, "n2:7946"), Ack(2, b"\x00" * 100), Ping(-5, "")):
        frame = tx.encode(msg)
        assert frame[0] == VERSION and frame[1] == flags
        got = rx.decode(frame)
        assert got == msg and type(got) is type(msg)
    assert rx.accepted == 3 and rx.drops.total == 0


def test_encrypted_hides_payload_authenticated_shows_it() -> None:
    ring = Keyring([key(1)])
    secret = Ping(1, "very-visible-target")
    encrypted = WireCodec(Msg, ring).encode(secret)
    authenticated = WireCodec(Msg, ring, encrypt=False).encode(secret)
    assert b"very-visible-target" not in encrypted
    assert b"very-visible-target" in authenticated
    assert len(encrypted) == len(authenticated)


def test_frame_overhead_is_header_plus_tag() -> None:
    msg = Ping(1, "x")
    plain = WireCodec(Msg, None).encode(msg)
    sealed = WireCodec(Msg, Keyring([key(1)])).encode(msg)
    assert len(sealed) - len(plain) == TAG_SIZE
    assert len(plain) > HEADER_SIZE


def test_nonces_are_unique_and_survive_counter_wrap() -> None:
    codec = WireCodec(Msg, Keyring([key(1)]))
    nonces = {codec.encode(Ping(1, "a"))[3:15] for _ in range(1000)}
    assert len(nonces) == 1000
    codec._counter = 1 << 32
    wrapped = codec.encode(Ping(1, "a"))[3:15]
    assert wrapped[-4:] == b"\x00\x00\x00\x00" and wrapped not in nonces


# ---------------------------------------------------------------------------- keys


@pytest.mark.parametrize("encrypt", [True, False])
def test_wrong_key_cannot_decode(encrypt: bool) -> None:
    tx = WireCodec(Msg, Keyring([key(1)]), encrypt=encrypt)
    rx = WireCodec(Msg, Keyring([key(2)]))
    with pytest.raises(BadMac):
        rx.decode(tx.encode(Ping(1, "x")))
    assert rx.try_decode(tx.encode(Ping(1, "x"))) is None
    assert rx.drops.bad_mac == 1


def test_plaintext_and_keyed_codecs_refuse_each_other() -> None:
    keyed = WireCodec(Msg, Keyring([key(1)]))
    plain = WireCodec(Msg, None)
    with pytest.raises(BadMac, match="plaintext frame refused"):
        keyed.decode(plain.encode(Ping(1, "x")))
    with pytest.raises(BadMac, match="keyed frame refused"):
        plain.decode(keyed.encode(Ping(1, "x")))


def test_key_rotation() -> None:
    old, new = key(1), key(2)
    sender = WireCodec(Msg, Keyring([old]))
    receiver_ring = Keyring([old])
    receiver = WireCodec(Msg, receiver_ring)
    # Step 1: receiver installs the new key; old frames still open.
    receiver_ring.install(new)
    assert receiver.decode(sender.encode(Ping(1, "a"))) == Ping(1, "a")
    # Step 2: receiver seals with the new key, still opens the old one.
    receiver_ring.use(new)
    assert receiver.decode(sender.encode(Ping(2, "a"))) == Ping(2, "a")
    assert WireCodec(Msg, Keyring([new])).decode(receiver.encode(Ping(3, "b"))) == Ping(3, "b")
    # Step 3: once removed, the old key is refused.
    receiver_ring.remove(old)
    with pytest.raises(BadMac):
        receiver.decode(sender.encode(Ping(4, "a")))


def test_hint_collision_falls_back_to_other_keys() -> None:
    rng = random.Random(1)
    by_hint: dict[int, bytes] = {}
    while True:
        k = rng.randbytes(32)
        h = key_hint(k)
        if h in by_hint:
            first, second = by_hint[h], k
            break
        by_hint[h] = k
    other = next(k for hk, k in by_hint.items() if hk != key_hint(first))
    # The receiver tries `second` (same hint, wrong key) before `first`.
    receiver = WireCodec(Msg, Keyring([second, other, first]))
    assert receiver.decode(WireCodec(Msg, Keyring([first])).encode(Ping(1, "x"))) == Ping(1, "x")
    # A key with a different hint is still found after the hinted ones fail.
    assert receiver.decode(WireCodec(Msg, Keyring([other])).encode(Ping(2, "x"))) == Ping(2, "x")


@pytest.mark.parametrize("encrypt", [True, False])
def test_any_flipped_bit_is_detected(encrypt: bool) -> None:
    tx, rx, _ = pair(Keyring([key(1)]), encrypt=encrypt)
    frame = tx.encode(Ping(7, "target"))
    for i in range(len(frame) * 8):
        bad = bytearray(frame)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises((BadMac, BadVersion)):
            rx.decode(bytes(bad))
    assert rx.decode(frame) == Ping(7, "target")


# ---------------------------------------------------------------------------- replay


@pytest.mark.parametrize("ring", [Keyring([key(1)]), None])
def test_identical_frame_replayed_is_rejected(ring: Keyring | None) -> None:
    tx, rx, _ = pair(ring)
    frame = tx.encode(Ping(1, "x"))
    assert rx.decode(frame) == Ping(1, "x")
    with pytest.raises(Replayed, match="nonce"):
        rx.decode(frame)
    assert rx.try_decode(frame) is None and rx.drops.replayed == 1


def test_stale_and_future_timestamps_rejected() -> None:
    ring = Keyring([key(1)])
    sender_wall, receiver_wall = FakeWall(1000.0), FakeWall(1000.0)
    tx = WireCodec(Msg, ring, wall=sender_wall)
    rx = WireCodec(Msg, ring, wall=receiver_wall, replay_window=10.0)
    frame = tx.encode(Ping(1, "x"))
    receiver_wall.t = 1010.5
    with pytest.raises(Replayed, match="timestamp"):
        rx.decode(frame)
    receiver_wall.t = 989.0  # the sender's clock runs 11 s ahead
    with pytest.raises(Replayed, match="timestamp"):
        rx.decode(frame)
    receiver_wall.t = 1009.9  # within the window: accepted, once
    assert rx.decode(frame) == Ping(1, "x")
    with pytest.raises(Replayed):
        rx.decode(frame)


def test_nonce_cache_forgets_entries_older_than_the_window() -> None:
    ring = Keyring([key(1)])
    wall = FakeWall(1000.0)
    tx = WireCodec(Msg, ring, wall=wall)
    rx = WireCodec(Msg, ring, wall=wall, replay_window=5.0)
    for i in range(100):
        rx.decode(tx.encode(Ping(i, "x")))
    assert len(rx._nonces) == 100
    wall.t += 5.5
    rx.decode(tx.encode(Ping(0, "y")))
    assert len(rx._nonces) == 1


def test_nonce_cache_is_bounded_and_errs_towards_dropping() -> None:
    ring = Keyring([key(1)])
    wall = FakeWall(1000.0)
    tx = WireCodec(Msg, ring, wall=wall)
    rx = WireCodec(Msg, ring, wall=wall, max_nonces=4)
    frames = []
    for i in range(10):
        wall.t += 0.01
        frames.append(tx.encode(Ping(i, "x")))
    for f in frames:
        rx.decode(f)
    assert len(rx._nonces) == 4
    for f in frames:  # evicted ones fall under the floor, kept ones are remembered
        with pytest.raises(Replayed):
            rx.decode(f)


# ---------------------------------------------------------------------------- limits and junk


@pytest.mark.parametrize("ring", [Keyring([key(1)]), None])
def test_oversized_rejected_on_both_sides(ring: Keyring | None) -> None:
    small = WireCodec(Msg, ring, max_size=200)
    big = WireCodec(Msg, ring, max_size=10_000)
    assert small.encode(Ack(1, b"x" * 100))
    with pytest.raises(Oversized, match="max_size is 200"):
        small.encode(Ack(1, b"x" * 200))
    frame = big.encode(Ack(1, b"x" * 200))
    with pytest.raises(Oversized):
        small.decode(frame)
    assert small.try_decode(frame) is None and small.drops.oversized == 1
    assert isinstance(Oversized("x"), WireError)


def test_each_reason_is_raised_and_counted() -> None:
    ring = Keyring([key(1)])
    tx, rx, _ = pair(ring)
    good = tx.encode(Ping(1, "x"))
    cases: list[tuple[bytes, type[WireError]]] = [
        (b"", Truncated),
        (good[: HEADER_SIZE - 1], Truncated),
        (good[: HEADER_SIZE + TAG_SIZE - 1], Truncated),
        (bytes([2]) + good[1:], BadVersion),
        (bytes([0]) + good[1:], BadVersion),
        (good[:1] + bytes([0x80]) + good[2:], BadVersion),
        (good[:1] + bytes([FLAG_ENCRYPTED | FLAG_PLAINTEXT]) + good[2:], BadVersion),
        (good[:-1] + bytes([good[-1] ^ 1]), BadMac),
        (WireCodec(Other, ring).encode(Other(True)), Malformed),
        (b"\x00" * 70_000, Oversized),
    ]
    for data, error in cases:
        with pytest.raises(error):
            rx.decode(data)
        assert rx.try_decode(data) is None
    assert rx.decode(good) == Ping(1, "x")
    assert rx.try_decode(good) is None  # second time: a replay
    assert rx.drops.as_dict() == {
        "truncated": 3,
        "oversized": 1,
        "bad_version": 4,
        "bad_mac": 1,
        "replayed": 1,
        "malformed": 1,
    }
    assert rx.drops.total == 11
    assert "bad_mac=1" in repr(rx.drops)


def test_malformed_in_plaintext_mode() -> None:
    rx = WireCodec(Msg, None)
    header = bytes([VERSION, FLAG_PLAINTEXT, 0]) + b"\x00" * 12
    for body in (b"", b"\xc1", msgspec.msgpack.encode([1]), msgspec.msgpack.encode([1, {"x": 1}])):
        with pytest.raises(Malformed):
            rx.decode(header + body)
    payload = msgspec.msgpack.encode([1, {"type": "Ping", "seq": "nope", "target": "x"}])
    with pytest.raises(Malformed, match="Expected `int`"):
        rx.decode(header + payload)


def test_drop_counters_standalone() -> None:
    counters = DropCounters()
    counters.count(BadMac("x"))
    counters.count(BadMac("y"))
    counters.count(Truncated("z"))
    assert counters.bad_mac == 2 and counters.truncated == 1
    assert counters.as_dict()["bad_mac"] == 2 and counters.total == 3


def test_constructor_validates_limits() -> None:
    with pytest.raises(ValueError, match="max_size"):
        WireCodec(Msg, None, max_size=10)
    with pytest.raises(ValueError, match="replay_window"):
        WireCodec(Msg, None, replay_window=0)


# ---------------------------------------------------------------------------- hypothesis

_RING = Keyring([key(1), key(2, 16)])
_CODECS = {
    "encrypted": WireCodec(Msg, _RING),
    "authenticated": WireCodec(Msg, _RING, encrypt=False),
    "plaintext": WireCodec(Msg, None),
}
_VALID = {name: c.encode(Ack(3, b"abc")) for name, c in _CODECS.items()}


def _check_never_raises_other(codec: WireCodec, data: bytes) -> None:
    try:
        codec.decode(data)
    except WireError:
        pass
    before = codec.drops.total
    result = codec.try_decode(data)
    assert result is None or isinstance(result, Ping | Ack)
    assert codec.drops.total in (before, before + 1)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), name=st.sampled_from(sorted(_CODECS)))
def test_random_bytes_only_raise_wire_errors(data: bytes, name: str) -> None:
    _check_never_raises_other(_CODECS[name], data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from([bytes([1, 0, 0]), bytes([1, 1, 0]), bytes([1, 2, 0])]),
    rest=st.binary(min_size=12, max_size=200),
    name=st.sampled_from(sorted(_CODECS)),
)
def test_random_bodies_behind_a_plausible_header(prefix: bytes, rest: bytes, name: str) -> None:
    _check_never_raises_other(_CODECS[name], prefix + rest)


@settings(max_examples=200)
@given(
    body=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.sampled_from(["Ping", "Ack", "seq", "target", "type"])
        | st.binary(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from(["type", "seq", "target", "payload", "x"]), inner)
        ),
        max_leaves=10,
    )
)
def test_random_msgpack_payloads_are_malformed_or_valid(body: object) -> None:
    header = bytes([VERSION, FLAG_PLAINTEXT, 0]) + os.urandom(12)
    now_ms = 1_700_000_000_000
    codec = WireCodec(Msg, None, wall=FakeWall(now_ms / 1000))
    _check_never_raises_other(codec, header + msgspec.msgpack.encode([now_ms, body]))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(_VALID)),
    flips=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
    cut=st.integers(min_value=0, max_value=10_000),
    junk=st.binary(max_size=40),
    mode=st.sampled_from(["flip", "truncate", "append", "all"]),
)
def test_mutated_valid_frames_only_raise_wire_errors(
    name: str, flips: list[int], cut: int, junk: bytes, mode: str
) -> None:
    frame = bytearray(_VALID[name])
    if mode in ("flip", "all"):
        for bit in flips:
            frame[(bit // 8) % len(frame)] ^= 1 << (bit % 8)
    if mode in ("truncate", "all"):
        frame = frame[: cut % (len(frame) + 1)]
    if mode in ("append", "all"):
        frame += junk
    _check_never_raises_other(_CODECS[name], bytes(frame))
