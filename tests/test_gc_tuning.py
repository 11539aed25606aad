"""The collector settings a node process applies once it is up (agentcluster.gc_tuning)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from agentcluster import gc_tuning


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_freezes_what_exists_and_raises_the_young_threshold(restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    survivor = [object() for _ in range(3)]  # a container alive at tuning time
    previous = gc_tuning.tune(young=5_000)
    assert previous == (700, 10, 10)
    assert gc.get_threshold() == (5_000, 10, 10)
    assert gc.get_freeze_count() > 0
    # Frozen objects are out of every generation the collector walks.
    assert not any(o is survivor for g in range(3) for o in gc.get_objects(g))
    st = gc_tuning.stats()
    assert st["threshold"] == [5_000, 10, 10]
    assert st["frozen"] == gc.get_freeze_count()
    assert isinstance(st["collections"], list) and len(st["collections"]) == 3


def test_tune_without_freeze_keeps_the_older_thresholds(restore_gc: None) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 7, 3)
    gc_tuning.tune(freeze=False)
    assert gc.get_threshold() == (gc_tuning.DEFAULT_YOUNG, 7, 3)
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("young", [0, -1])
def test_a_threshold_below_one_is_refused(restore_gc: None, young: int) -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="young must be >= 1"):
        gc_tuning.tune(young=young)
    assert gc.get_threshold() == before
