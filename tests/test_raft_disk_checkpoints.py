"""A segment's checkpoint says where the previous segment's records end, so an older segment
whose last records read back as zeros is reported, never taken for preallocated space."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentcluster.consensus.raft import Entry, HardState
from agentcluster.consensus.raft.disk import DiskStorage, StorageCorruption


def _entry(index: int, term: int) -> Entry:
    return Entry(term, index, bytes([index]) * 1000)


def _two_segments(d: Path) -> tuple[Path, int, int]:
    """A log whose first segment ends with a follower's replacement of entries 2-3 (term 1
    -> 2), committed by the write that rolls to the second; where that record lies."""
    s = DiskStorage.open(d, segment_bytes=4096)
    s.persist(HardState(1, "a", 0), [_entry(1, 1), _entry(2, 1), _entry(3, 1)])
    s.persist(HardState(2, "b", 0), [])
    start = s._size
    s.persist(None, [_entry(2, 2), _entry(3, 2)])
    end = s._size
    s.persist(HardState(2, "b", 3), [])
    assert s.segment_count == 2
    s.close()
    return sorted(d.glob("log-*.seg"))[0], start, end


def test_the_last_records_of_an_older_segment_read_back_as_zeros_are_corruption(
    tmp_path: Path,
) -> None:
    d = tmp_path / "raft"
    first, start, end = _two_segments(d)
    data = bytearray(first.read_bytes())
    data[start:end] = bytes(end - start)  # the replacement's sectors were lost
    first.write_bytes(bytes(data))
    with pytest.raises(StorageCorruption, match="read back as zeros") as info:
        DiskStorage.open(d, segment_bytes=4096)
    assert str(first) in str(info.value) and str(start) in str(info.value)


def test_an_intact_log_of_several_segments_reopens_with_its_entries(tmp_path: Path) -> None:
    d = tmp_path / "raft"
    _two_segments(d)
    s = DiskStorage.open(d, segment_bytes=4096)
    try:
        assert [(e.index, e.term) for e in s.entries] == [(1, 1), (2, 2), (3, 2)]
        assert s.hard_state == HardState(2, "b", 3)
    finally:
        s.close()
