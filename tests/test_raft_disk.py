"""Tests of the durable Raft storage (:mod:`agentcluster.consensus.raft.disk`).

The reference is :class:`MemoryStorage`: every scenario is applied to both and the disk storage,
reopened from its files, must show the same hard state, snapshot and entries. Damage is made by
hand (cutting, flipping, deleting bytes and files) to check that a torn tail is repaired and
everything else is reported with the file and byte offset.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentcluster.consensus.raft import Entry, HardState, MemoryStorage, RaftConfig, RaftNode
from agentcluster.consensus.raft._log import Storage
from agentcluster.consensus.raft.disk import (
    DEFAULT_SEGMENT_BYTES,
    DiskStorage,
    StorageCorruption,
    StorageLocked,
    _Checkpoint,
    _Compact,
    _encoder,
    _frame,
    _Persist,
    _SnapMark,
)
from agentcluster.consensus.raft.messages import ConfState, Snapshot

HEADER = 12
CONF = ConfState(("n1", "n2", "n3"))

View = tuple[HardState, Snapshot | None, list[Entry]]
Op = tuple[str, object]


def E(index: int, term: int = 1, data: bytes = b"") -> Entry:
    return Entry(term=term, index=index, data=data)


def snap(index: int, term: int, data: bytes = b"state") -> Snapshot:
    return Snapshot(index, term, CONF, data)


def view(s: Storage) -> View:
    return s.hard_state, s.snapshot, list(s.entries)


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("log-*.seg"))


def apply(s: Storage, op: Op) -> None:
    kind, arg = op
    if kind == "persist":
        assert isinstance(arg, tuple)
        hs, entries = arg
        s.persist(hs, entries)
    elif kind == "snap":
        assert isinstance(arg, Snapshot)
        s.save_snapshot(arg)
    else:
        assert kind == "compact" and isinstance(arg, int)
        s.compact(arg)


def P(*entries: Entry, hs: HardState | None = None) -> Op:
    return ("persist", (hs, list(entries)))


def reopen(
    disk: DiskStorage, *, fsync: bool = True, segment_bytes: int = DEFAULT_SEGMENT_BYTES
) -> DiskStorage:
    disk.close()
    return DiskStorage.open(disk.directory, fsync=fsync, segment_bytes=segment_bytes)


# ----------------------------------------------------------------- round trips


def test_hard_state_and_entries_survive_reopen(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path) as d:
        d.persist(HardState(1, "n1", 0), [E(1), E(2, data=b"x" * 100)])
        d.persist(HardState(2, "n2", 1), [])
        d.persist(None, [E(3, 2)])
        before = view(d)
    assert before == (HardState(2, "n2", 1), None, [E(1), E(2, data=b"x" * 100), E(3, 2)])
    with DiskStorage.open(tmp_path) as d:
        assert view(d) == before
        assert d.repaired_tail_bytes == 0
    assert [p.name for p in segments(tmp_path)] == [f"log-{1:020d}-{1:020d}.seg"]


def test_suffix_replacement_survives_reopen(tmp_path: Path) -> None:
    d = DiskStorage.open(tmp_path)
    d.persist(HardState(1), [E(i) for i in range(1, 6)])
    d.persist(HardState(2), [E(3, 2), E(4, 2)])
    assert list(d.entries) == [E(1), E(2), E(3, 2), E(4, 2)]
    d = reopen(d)
    assert list(d.entries) == [E(1), E(2), E(3, 2), E(4, 2)]
    d.persist(None, [E(5, 2)])
    d.persist(HardState(3), [E(2, 3)])
    d = reopen(d)
    assert view(d) == (HardState(3), None, [E(1), E(2, 3)])
    d.close()


def test_unchanged_hard_state_writes_nothing(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path) as d:
        d.persist(HardState(1), [])
        size = segments(tmp_path)[0].stat().st_size
        d.persist(HardState(1), [])
        d.persist(None, [])
        assert segments(tmp_path)[0].stat().st_size == size


# ----------------------------------------------------------------- errors shared with MemoryStorage

ERROR_CASES: list[tuple[str, list[Op], Op]] = [
    ("gap on an empty log", [], P(E(2))),
    ("gap after the last entry", [P(E(1), E(2), E(3))], P(E(5))),
    (
        "index before the compacted log start",
        [P(*[E(i) for i in range(1, 6)]), ("snap", snap(3, 1)), ("compact", 3)],
        P(E(3)),
    ),
    ("compact without a snapshot", [P(E(1), E(2))], ("compact", 1)),
    ("compact past the snapshot", [P(E(1), E(2), E(3)), ("snap", snap(2, 1))], ("compact", 3)),
    (
        "gap after a discarding snapshot",
        [P(E(1), E(2)), ("snap", snap(10, 4))],
        P(E(12, 4)),
    ),
]


@pytest.mark.parametrize(
    ("setup", "bad"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_rejects_what_memory_storage_rejects(tmp_path: Path, setup: list[Op], bad: Op) -> None:
    mem = MemoryStorage()
    disk = DiskStorage.open(tmp_path)
    for op in setup:
        apply(mem, op)
        apply(disk, op)
    with pytest.raises(ValueError):
        apply(mem, bad)
    with pytest.raises(ValueError):
        apply(disk, bad)
    disk = reopen(disk)
    assert view(disk) == view(mem)
    disk.close()


def test_non_contiguous_batch_is_rejected_before_writing(tmp_path: Path) -> None:
    # Stricter than MemoryStorage, which would store the hole: on disk it would make the log
    # unrecoverable.
    with DiskStorage.open(tmp_path) as d:
        with pytest.raises(ValueError, match="not contiguous"):
            d.persist(HardState(1), [E(1), E(3)])
        assert view(d) == (HardState(), None, [])
    with DiskStorage.open(tmp_path) as d:
        assert view(d) == (HardState(), None, [])


# ----------------------------------------------------------------- snapshots and compaction

SNAPSHOT_CASES: list[tuple[str, list[Op], list[Entry]]] = [
    ("local snapshot keeps the log", [("snap", snap(3, 1))], [E(i) for i in range(1, 6)]),
    ("term mismatch discards the log", [("snap", snap(3, 2))], []),
    ("snapshot beyond the log discards it", [("snap", snap(9, 1))], []),
    ("keep, then compact", [("snap", snap(3, 1)), ("compact", 3)], [E(4), E(5)]),
    ("compact everything kept", [("snap", snap(5, 1)), ("compact", 5)], []),
    ("compact below the snapshot", [("snap", snap(4, 1)), ("compact", 2)], [E(3), E(4), E(5)]),
    (
        "newer snapshot replaces an older one",
        [("snap", snap(2, 1)), ("compact", 2), ("snap", snap(20, 3))],
        [],
    ),
]


@pytest.mark.parametrize(
    ("ops", "entries"), [c[1:] for c in SNAPSHOT_CASES], ids=[c[0] for c in SNAPSHOT_CASES]
)
def test_snapshot_semantics_survive_reopen(
    tmp_path: Path, ops: list[Op], entries: list[Entry]
) -> None:
    mem = MemoryStorage()
    disk = DiskStorage.open(tmp_path)
    for op in [P(*[E(i) for i in range(1, 6)], hs=HardState(1, "n1", 2)), *ops]:
        apply(mem, op)
        apply(disk, op)
    assert list(mem.entries) == entries
    disk = reopen(disk)
    assert view(disk) == view(mem)
    assert len(list(tmp_path.glob("snap-*.snap"))) == 1
    # The next append lands where MemoryStorage puts it, and that survives too.
    nxt = entries[-1].index + 1 if entries else disk.snapshot.index + 1  # type: ignore[union-attr]
    apply(mem, P(E(nxt, 5)))
    apply(disk, P(E(nxt, 5)))
    disk = reopen(disk)
    assert view(disk) == view(mem)
    disk.close()


def test_segments_roll_at_the_size_limit(tmp_path: Path) -> None:
    d = DiskStorage.open(tmp_path, segment_bytes=1)
    for i in range(1, 11):
        d.persist(HardState(i), [E(i, data=b"y" * 50)])
    names = [p.name for p in segments(tmp_path)]
    # Segment 1 holds only its checkpoint, then each append rolls: ``index`` is the next index.
    assert names == [f"log-{s:020d}-{s - 1 if s > 1 else 1:020d}.seg" for s in range(1, 12)]
    before = view(d)
    d = reopen(d, segment_bytes=1)
    assert view(d) == before
    d.close()


def test_compact_deletes_whole_dead_segments_only(tmp_path: Path) -> None:
    mem = MemoryStorage()
    d = DiskStorage.open(tmp_path, segment_bytes=300)
    for i in range(1, 41):
        op = P(E(i, data=bytes(50)), hs=HardState(1, "n1", i - 1))
        apply(mem, op)
        apply(d, op)
    count = len(segments(tmp_path))
    assert count >= 8
    for op in [("snap", snap(30, 1)), ("compact", 30)]:
        apply(mem, op)
        apply(d, op)
    left = segments(tmp_path)
    assert 1 < len(left) < count
    # The oldest surviving segment is the one entry 31 lives in: it also holds entries <= 30.
    assert int(left[0].name.split("-")[2].split(".")[0]) <= 31
    assert d.segment_count == len(left)
    d = reopen(d, segment_bytes=300)
    assert view(d) == view(mem)
    assert [e.index for e in d.entries] == list(range(31, 41))
    for op in [P(E(35, 2)), ("snap", snap(34, 1)), ("compact", 34)]:
        apply(mem, op)
        apply(d, op)
    d = reopen(d, segment_bytes=300)
    assert view(d) == view(mem)
    d.close()


def test_discarding_snapshot_deletes_old_segments(tmp_path: Path) -> None:
    d = DiskStorage.open(tmp_path, segment_bytes=200)
    for i in range(1, 21):
        d.persist(HardState(1), [E(i, data=bytes(40))])
    assert len(segments(tmp_path)) > 3
    d.save_snapshot(snap(100, 7))
    assert len(segments(tmp_path)) == 1
    d = reopen(d, segment_bytes=200)
    assert view(d) == (HardState(1), snap(100, 7), [])
    d.close()


# ----------------------------------------------------------------- crashes and damage


def _log_with_record_offsets(d: Path, n: int) -> tuple[Path, list[int]]:
    """One segment with ``n`` persist records, appended without preallocation (the file ends
    where the last record does); returns it and each record's start offset."""
    offsets = []
    with DiskStorage.open(d, prealloc_bytes=0) as s:
        seg = segments(d)[0]
        for i in range(1, n + 1):
            offsets.append(seg.stat().st_size)
            s.persist(HardState(i), [E(i, data=b"z" * 30)])
    return seg, offsets


TORN_CASES: list[tuple[str, Callable[[bytes, int], bytes], int]] = [
    ("payload cut short", lambda data, last: data[:-3], 2),
    ("partial header", lambda data, last: data[: last + 5], 2),
    ("header without payload", lambda data, last: data[: last + HEADER], 2),
]


@pytest.mark.parametrize(
    ("damage", "kept"), [c[1:] for c in TORN_CASES], ids=[c[0] for c in TORN_CASES]
)
def test_torn_tail_is_cut_off_and_logged(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[bytes, int], bytes],
    kept: int,
) -> None:
    seg, offsets = _log_with_record_offsets(tmp_path, 3)
    data = seg.read_bytes()
    damaged = damage(data, offsets[-1])
    seg.write_bytes(damaged)
    with caplog.at_level(logging.WARNING), DiskStorage.open(tmp_path) as d:
        assert [e.index for e in d.entries] == list(range(1, kept + 1))
        assert d.hard_state == HardState(kept)
        assert d.repaired_tail_bytes == len(damaged) - (offsets[kept] if kept < 3 else len(data))
        assert "torn" in caplog.text
        d.persist(HardState(9), [E(kept + 1, 9)])
    with DiskStorage.open(tmp_path) as d:
        assert d.repaired_tail_bytes == 0
        assert [(e.index, e.term) for e in d.entries][-1] == (kept + 1, 9)


def test_torn_roll_falls_back_to_the_previous_segment(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, segment_bytes=1) as d:
        d.persist(HardState(1), [E(1)])
        d.persist(HardState(2), [E(2)])
    last = segments(tmp_path)[-1]
    last.write_bytes(last.read_bytes()[:7])  # the checkpoint of the new segment never landed
    with DiskStorage.open(tmp_path, segment_bytes=1) as d:
        assert view(d) == (HardState(1), None, [E(1)])
        d.persist(HardState(3), [E(2, 3)])
    with DiskStorage.open(tmp_path) as d:
        assert view(d) == (HardState(3), None, [E(1), E(2, 3)])


# ----------------------------------------------------------------- preallocated segments

SECTOR = 512


def test_records_overwrite_preallocated_zeros_in_place(tmp_path: Path) -> None:
    d = DiskStorage.open(tmp_path, prealloc_bytes=4096)
    (seg,) = segments(tmp_path)
    checkpoint = len(seg.read_bytes().rstrip(b"\0"))
    assert seg.stat().st_size == checkpoint + 4096  # the checkpoint, then 4 KiB of zeros
    for i in range(1, 11):
        d.persist(HardState(i), [E(i, data=b"w" * 100)])
    assert seg.stat().st_size == checkpoint + 4096  # written over the zeros: no growth
    for i in range(11, 61):
        d.persist(HardState(i), [E(i, data=b"w" * 100)])
    # Past the first zeros, a record brought the next 4 KiB with it.
    used = len(seg.read_bytes().rstrip(b"\0"))
    assert checkpoint + 4096 < used < seg.stat().st_size <= used + 4096
    before = view(d)
    d = reopen(d)
    assert view(d) == before and d.repaired_tail_bytes == 0
    d.persist(HardState(99), [E(61, 2)])  # goes right after the last record
    d = reopen(d)
    assert view(d) == (HardState(99), None, before[2] + [E(61, 2)])
    d.close()


def test_preallocation_stops_at_the_segment_size(tmp_path: Path) -> None:
    d = DiskStorage.open(tmp_path, segment_bytes=1000, prealloc_bytes=1 << 20)
    for i in range(1, 40):
        d.persist(HardState(i), [E(i, data=b"s" * 90)])
    files = segments(tmp_path)
    assert len(files) > 3
    # Every segment is at most its limit plus the record that crossed it; the older ones end
    # in no zeros but the ones a record did not fill.
    assert all(f.stat().st_size <= 1000 + 200 for f in files)
    before = view(d)
    d = reopen(d, segment_bytes=1000)
    assert view(d) == before and d.repaired_tail_bytes == 0
    d.close()


def test_a_disk_too_full_for_the_zeros_takes_the_records_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    import agentcluster.consensus.raft.disk as disk

    real = disk._pwrite_all

    def no_room_for_zeros(fd: int, data: bytes | memoryview, offset: int) -> None:
        if len(data) >= 1024 and bytes(data).count(0) == len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    d = DiskStorage.open(tmp_path, prealloc_bytes=4096)
    monkeypatch.setattr(disk, "_pwrite_all", no_room_for_zeros)
    with caplog.at_level(logging.WARNING):
        for i in range(1, 60):  # well past the first 4 KiB of zeros
            d.persist(HardState(i), [E(i, data=b"n" * 100)])
    (seg,) = segments(tmp_path)
    assert seg.stat().st_size == len(seg.read_bytes().rstrip(b"\0")) > 4096
    assert caplog.text.count("no space to preallocate") == 1
    d = reopen(d)
    assert [e.index for e in d.entries] == list(range(1, 60)) and d.repaired_tail_bytes == 0
    d.close()


def test_zeros_after_the_last_record_are_space_not_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seg, _ = _log_with_record_offsets(tmp_path, 3)
    data = seg.read_bytes()
    seg.write_bytes(data + bytes(40))  # e.g. an append-only log whose size landed first
    with caplog.at_level(logging.WARNING), DiskStorage.open(tmp_path) as d:
        assert [e.index for e in d.entries] == [1, 2, 3]
        assert d.repaired_tail_bytes == 0
        assert "torn" not in caplog.text
        d.persist(HardState(9), [E(4, 9)])
    with DiskStorage.open(tmp_path) as d:
        assert [(e.index, e.term) for e in d.entries] == [(1, 1), (2, 1), (3, 1), (4, 9)]
    # The new record went where the zeros began, not after them.
    assert seg.read_bytes().startswith(data) and seg.read_bytes()[len(data)] != 0


def test_an_append_only_log_is_preallocated_from_its_next_write(tmp_path: Path) -> None:
    seg, _ = _log_with_record_offsets(tmp_path, 2)
    size = seg.stat().st_size
    with DiskStorage.open(tmp_path, prealloc_bytes=8192) as d:
        d.persist(HardState(3), [E(3)])
    assert seg.stat().st_size > size + 8000
    with DiskStorage.open(tmp_path, prealloc_bytes=0) as d:
        assert [e.index for e in d.entries] == [1, 2, 3]


def _prealloc_log(d: Path) -> tuple[Path, int, bytes]:
    """A preallocated segment with three records; returns it, where its zeros start, and the
    frame a fourth, multi-sector persist would write there."""
    with DiskStorage.open(d, prealloc_bytes=1 << 16) as s:
        for i in range(1, 4):
            s.persist(HardState(i), [E(i, data=b"p" * 40)])
    (seg,) = segments(d)
    end = len(seg.read_bytes().rstrip(b"\0"))
    frame = _frame(_encoder.encode(_Persist(HardState(4), [E(4, data=b"x" * 3 * SECTOR)])))
    return seg, end, frame


def _land(seg: Path, at: int, frame: bytes, sectors: list[int]) -> bytes:
    """Write the parts of ``frame`` (placed at ``at``) that fall in the given disk sectors
    (numbered from the file's start): what a crash mid-write leaves behind."""
    data = bytearray(seg.read_bytes())
    for k in sectors:
        lo, hi = max(at, k * SECTOR), min(at + len(frame), (k + 1) * SECTOR)
        data[lo:hi] = frame[lo - at : hi - at]
    seg.write_bytes(bytes(data))
    return bytes(data)


def test_a_write_torn_in_preallocated_space_is_cut_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seg, at, frame = _prealloc_log(tmp_path)
    first, last = at // SECTOR, (at + len(frame) - 1) // SECTOR
    assert last - first >= 3
    # Every sector but the second landed: its CRC fails, and a sector still holds zeros.
    _land(seg, at, frame, [k for k in range(first, last + 1) if k != first + 1])
    with caplog.at_level(logging.WARNING), DiskStorage.open(tmp_path) as d:
        assert view(d)[0] == HardState(3) and [e.index for e in d.entries] == [1, 2, 3]
        assert d.repaired_tail_bytes > 0 and "torn" in caplog.text
        d.persist(HardState(5), [E(4, 5)])
    with DiskStorage.open(tmp_path) as d:
        assert [(e.index, e.term) for e in d.entries][-1] == (4, 5)
        assert d.repaired_tail_bytes == 0


def test_a_write_whose_first_sector_never_landed_is_cut_off(tmp_path: Path) -> None:
    # Its header reads as zeros, later sectors hold its data, and no record follows it.
    seg, at, frame = _prealloc_log(tmp_path)
    first, last = at // SECTOR, (at + len(frame) - 1) // SECTOR
    _land(seg, at, frame, list(range(first + 1, last + 1)))
    with DiskStorage.open(tmp_path) as d:
        assert view(d)[0] == HardState(3) and [e.index for e in d.entries] == [1, 2, 3]
        assert d.repaired_tail_bytes > 0


def test_a_zeroed_sector_followed_by_records_is_reported(tmp_path: Path) -> None:
    # The same zeros in front of records that are still valid: damage, not a torn write.
    seg, at, _ = _prealloc_log(tmp_path)
    with DiskStorage.open(tmp_path) as d:
        d.persist(HardState(4), [E(4, data=b"x" * 3 * SECTOR)])
        d.persist(HardState(5), [E(5, data=b"y" * 40)])
    data = bytearray(seg.read_bytes())
    first_sector_end = (at // SECTOR + 1) * SECTOR
    data[at:first_sector_end] = bytes(first_sector_end - at)
    seg.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption, match="header checksum"):
        DiskStorage.open(tmp_path)


def test_a_header_torn_at_a_sector_boundary_is_cut_off(tmp_path: Path) -> None:
    seg, end, _ = _prealloc_log(tmp_path)
    # Pad with one record so that the next header starts 5 bytes before a sector boundary.
    with DiskStorage.open(tmp_path) as d:
        boundary = (end // SECTOR + 2) * SECTOR

        def size(extra: int) -> int:
            return len(_frame(_encoder.encode(_Persist(HardState(4), [E(4, data=b"f" * extra)]))))

        extra = next(x for x in range(SECTOR * 2) if end + size(x) == boundary - 5)
        d.persist(HardState(4), [E(4, data=b"f" * extra)])
    at = len(seg.read_bytes().rstrip(b"\0"))
    assert at == boundary - 5
    frame = _frame(_encoder.encode(_Persist(HardState(5), [E(5)])))
    _land(seg, at, frame, [at // SECTOR])  # the header's first 5 bytes only
    with DiskStorage.open(tmp_path) as d:
        assert [e.index for e in d.entries] == [1, 2, 3, 4] and d.repaired_tail_bytes > 0


TORN_LOOKALIKES: list[tuple[str, Callable[[bytes, int, bytes], bytes], str]] = [
    # Every sector of the last record landed, one byte of it is wrong: damage, not a crash.
    ("flipped byte", lambda data, at, frame: _flip(data, at + HEADER + 700), "CRC mismatch"),
    # A torn-looking record with something written after it.
    ("data after a zero sector", lambda data, at, frame: _flip(data, at + len(frame) + 10), "CRC"),
]


def _flip(data: bytes, i: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 0x40
    return bytes(out)


@pytest.mark.parametrize(
    ("damage", "reason"), [c[1:] for c in TORN_LOOKALIKES], ids=[c[0] for c in TORN_LOOKALIKES]
)
def test_damage_in_preallocated_space_is_reported(
    tmp_path: Path, damage: Callable[[bytes, int, bytes], bytes], reason: str
) -> None:
    seg, at, frame = _prealloc_log(tmp_path)
    first, last = at // SECTOR, (at + len(frame) - 1) // SECTOR
    sectors = list(range(first, last + 1))
    if reason == "CRC":
        sectors.remove(first + 1)  # torn, but ...
    landed = _land(seg, at, frame, sectors)
    seg.write_bytes(damage(landed, at, frame))
    with pytest.raises(StorageCorruption, match=reason) as info:
        DiskStorage.open(tmp_path)
    assert (info.value.path, info.value.offset) == (seg, at)


FLIP_CASES: list[tuple[str, int, str]] = [
    ("payload byte", HEADER + 3, "CRC mismatch"),
    ("length field", 1, "header checksum"),
    ("payload CRC field", 5, "header checksum"),
]


@pytest.mark.parametrize(
    ("delta", "reason"), [c[1:] for c in FLIP_CASES], ids=[c[0] for c in FLIP_CASES]
)
def test_flipped_byte_in_a_middle_record_is_reported(
    tmp_path: Path, delta: int, reason: str
) -> None:
    seg, offsets = _log_with_record_offsets(tmp_path, 4)
    data = bytearray(seg.read_bytes())
    data[offsets[1] + delta] ^= 0x40
    seg.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption) as info:
        DiskStorage.open(tmp_path)
    assert info.value.path == seg
    assert info.value.offset == offsets[1]
    assert reason in info.value.reason
    assert seg.name in str(info.value) and f"offset {offsets[1]}" in str(info.value)
    assert seg.read_bytes() == bytes(data)  # nothing was "repaired"


def test_damage_in_an_older_segment_is_reported(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, segment_bytes=100) as d:
        for i in range(1, 8):
            d.persist(HardState(i), [E(i, data=b"q" * 60)])
    first = segments(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-2])  # torn, but not at the end of the log
    with pytest.raises(StorageCorruption, match="past the end") as info:
        DiskStorage.open(tmp_path)
    assert info.value.path == first


def test_missing_middle_segment_is_reported(tmp_path: Path) -> None:
    with DiskStorage.open(tmp_path, segment_bytes=1) as d:
        for i in range(1, 5):
            d.persist(HardState(i), [E(i)])
    segments(tmp_path)[2].unlink()
    with pytest.raises(StorageCorruption, match="segment 3 is missing"):
        DiskStorage.open(tmp_path)


FORGED: list[tuple[str, bytes, str]] = [
    ("gap", _encoder.encode(_Persist(None, [E(5)])), "gap: storing index 5"),
    ("entries out of order", _encoder.encode(_Persist(None, [E(3), E(2)])), "not contiguous"),
    ("compact past the snapshot", _encoder.encode(_Compact(2)), "cannot compact"),
    ("snapshot mark against the log", _encoder.encode(_SnapMark(1, 1, False)), "disagrees"),
    ("checkpoint mid-segment", _encoder.encode(_Checkpoint(1, HardState(), None, 1, 1)), "middle"),
    ("valid CRC, not a record", b"\x93\x01\x02\x03", "undecodable"),
]


@pytest.mark.parametrize(("payload", "reason"), [c[1:] for c in FORGED], ids=[c[0] for c in FORGED])
def test_impossible_record_is_reported(tmp_path: Path, payload: bytes, reason: str) -> None:
    # Records with a valid CRC that no live call could have written (a bug, or damage that
    # the CRC missed) stop recovery too; one more good record after it keeps it off the tail.
    seg, _ = _log_with_record_offsets(tmp_path, 2)
    at = seg.stat().st_size
    seg.write_bytes(
        seg.read_bytes() + _frame(payload) + _frame(_encoder.encode(_Persist(HardState(7), [])))
    )
    with pytest.raises(StorageCorruption, match=reason) as info:
        DiskStorage.open(tmp_path)
    assert (info.value.path, info.value.offset) == (seg, at)


def _with_snapshot(d: Path) -> Path:
    with DiskStorage.open(d) as s:
        s.persist(HardState(1), [E(1), E(2)])
        s.save_snapshot(snap(2, 1, b"S" * 64))
    (path,) = d.glob("snap-*.snap")
    return path


SNAP_DAMAGE: list[tuple[str, Callable[[Path], object], str]] = [
    ("flipped byte", lambda p: p.write_bytes(p.read_bytes()[:-1] + b"!"), "CRC mismatch"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-10]), "does not match"),
    ("deleted", lambda p: p.unlink(), "missing"),
]


@pytest.mark.parametrize(
    ("damage", "reason"), [c[1:] for c in SNAP_DAMAGE], ids=[c[0] for c in SNAP_DAMAGE]
)
def test_damaged_snapshot_is_reported(
    tmp_path: Path, damage: Callable[[Path], object], reason: str
) -> None:
    path = _with_snapshot(tmp_path)
    damage(path)
    with pytest.raises(StorageCorruption, match=reason) as info:
        DiskStorage.open(tmp_path)
    assert info.value.path == path


def test_stray_tmp_and_unnamed_snapshots_are_removed(tmp_path: Path) -> None:
    path = _with_snapshot(tmp_path)
    # A save that crashed after its rename but before its log mark, and one before the rename.
    orphan = tmp_path / f"snap-{1:020d}-{9:020d}.snap"
    shutil.copy(path, orphan)
    stray = tmp_path / (orphan.name + ".tmp")
    stray.write_bytes(b"half a snapsh")
    with DiskStorage.open(tmp_path) as d:
        assert d.snapshot == snap(2, 1, b"S" * 64)
    assert sorted(p.name for p in tmp_path.iterdir() if "snap" in p.name) == [path.name]


def test_snapshot_without_a_log_is_reported(tmp_path: Path) -> None:
    path = _with_snapshot(tmp_path)
    for seg in segments(tmp_path):
        seg.unlink()
    with pytest.raises(StorageCorruption, match="without a log"):
        DiskStorage.open(tmp_path)
    assert path.exists()


# ----------------------------------------------------------------- lifecycle


def test_second_open_of_a_directory_is_refused(tmp_path: Path) -> None:
    first = DiskStorage.open(tmp_path)
    with pytest.raises(StorageLocked, match="locked"):
        DiskStorage.open(tmp_path)
    first.persist(HardState(4), [])
    first.close()
    with DiskStorage.open(tmp_path) as again:
        assert again.hard_state == HardState(4)


def test_closed_storage_refuses_writes(tmp_path: Path) -> None:
    d = DiskStorage.open(tmp_path)
    d.close()
    d.close()
    assert d.closed
    with pytest.raises(ValueError, match="closed"):
        d.persist(HardState(1), [])
    with pytest.raises(ValueError, match="closed"):
        d.compact(0)


# ----------------------------------------------------------------- equivalence with MemoryStorage


def _next_index(s: Storage) -> int:
    if s.entries:
        return s.entries[-1].index + 1
    return s.snapshot.index + 1 if s.snapshot is not None else 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_disk_and_memory_storage_agree(data: st.DataObject) -> None:
    seg_bytes = data.draw(st.sampled_from([1, 120, 400, 1 << 20]), label="segment_bytes")
    terms = st.integers(0, 4)
    with tempfile.TemporaryDirectory() as tmp:
        mem = MemoryStorage()
        disk = DiskStorage.open(tmp, fsync=False, segment_bytes=seg_bytes)
        try:
            for _ in range(data.draw(st.integers(1, 30), label="steps")):
                kind = data.draw(st.sampled_from(["persist"] * 3 + ["snap", "compact", "reopen"]))
                nxt = _next_index(mem)
                base = mem.entries[0].index if mem.entries else nxt
                op: Op
                if kind == "reopen":
                    disk = reopen(disk, fsync=False, segment_bytes=seg_bytes)
                    assert view(disk) == view(mem)
                    continue
                if kind == "persist":
                    first = data.draw(st.integers(max(1, base - 1), nxt + 1))
                    n = data.draw(st.integers(0, 3))
                    batch = [
                        E(first + i, data.draw(terms), data.draw(st.binary(max_size=40)))
                        for i in range(n)
                    ]
                    hs = data.draw(
                        st.none()
                        | st.builds(
                            HardState, terms, st.sampled_from([None, "a", "b"]), st.integers(0, 5)
                        )
                    )
                    if batch and not base <= first <= nxt:
                        hs = None  # MemoryStorage sets the hard state before it rejects a gap
                    op = ("persist", (hs, batch))
                elif kind == "snap":
                    index = data.draw(st.integers(0, nxt + 2))
                    known = [e.term for e in mem.entries if e.index == index]
                    term = data.draw(st.sampled_from(known) | terms if known else terms)
                    op = ("snap", snap(index, term, data.draw(st.binary(max_size=30))))
                else:
                    limit = mem.snapshot.index if mem.snapshot is not None else 0
                    op = ("compact", data.draw(st.integers(0, limit + 1)))
                outcomes = []
                for s in (mem, disk):
                    try:
                        apply(s, op)
                        outcomes.append("ok")
                    except ValueError:
                        outcomes.append("ValueError")
                assert outcomes[0] == outcomes[1], op
                assert view(disk) == view(mem), op
            disk = reopen(disk, fsync=False, segment_bytes=seg_bytes)
            assert view(disk) == view(mem)
        finally:
            disk.close()


# ----------------------------------------------------------------- the Raft core on disk


def test_raft_node_is_rebuilt_from_disk(tmp_path: Path) -> None:
    cfg = RaftConfig()
    disk = DiskStorage.open(tmp_path)
    node = RaftNode("n1", [], config=cfg, rng=random.Random(1), now=0.0, storage=disk)
    now = 0.0
    for _ in range(20):
        if node.state == "leader":
            break
        now = max(now, node.next_deadline())
        node.tick(now)
        for _ in range(3):
            rd = node.ready()
            disk.persist(rd.hard_state, rd.entries)
            node.advance(rd)
    assert node.state == "leader"
    assert node.propose(b"hello", now) is not None
    rd = node.ready()
    disk.persist(rd.hard_state, rd.entries)
    node.advance(rd)
    term, last = node.term, node.log.last_index
    disk = reopen(disk)
    rebuilt = RaftNode("n1", [], config=cfg, rng=random.Random(2), now=now, storage=disk)
    assert (rebuilt.term, rebuilt.vote, rebuilt.log.last_index) == (term, "n1", last)
    assert disk.entries[-1].data == b"hello"
    disk.close()
