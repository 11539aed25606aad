"""The process settings a node applies once it is up (agentcluster.tuning)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from agentcluster import tuning


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.fixture
def restore_sched() -> Iterator[None]:
    if not hasattr(os, "sched_getscheduler"):
        pytest.fail("these tests need Linux scheduling policies (os.sched_getscheduler)")
    before = os.sched_getscheduler(0)
    yield
    os.sched_setscheduler(0, before, os.sched_param(0))


def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold(restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    survivor = [object() for _ in range(3)]  # a container alive at tuning time
    previous = tuning.tune_gc(young=5_000)
    assert previous == (700, 10, 10)
    assert gc.get_threshold() == (5_000, 10, 10)
    assert gc.get_freeze_count() > 0
    # Frozen objects are out of every generation the collector walks.
    assert not any(o is survivor for g in range(3) for o in gc.get_objects(g))
    st = tuning.stats()
    assert st["gc_threshold"] == [5_000, 10, 10]
    assert st["gc_frozen"] == gc.get_freeze_count()
    assert isinstance(st["gc_collections"], list) and len(st["gc_collections"]) == 3


def test_tune_gc_without_freeze_keeps_the_older_thresholds(restore_gc: None) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 7, 3)
    tuning.tune_gc(freeze=False)
    assert gc.get_threshold() == (tuning.DEFAULT_YOUNG, 7, 3)
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("young", [0, -1])
def test_a_threshold_below_one_is_refused(restore_gc: None, young: int) -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="young must be >= 1"):
        tuning.tune_gc(young=young)
    assert gc.get_threshold() == before


def test_tune_scheduler_switches_between_batch_and_normal(restore_sched: None) -> None:
    assert tuning.tune_scheduler("batch") is True
    assert os.sched_getscheduler(0) == os.SCHED_BATCH
    assert tuning.stats()["sched"] == "batch"
    assert tuning.tune_scheduler("normal") is True
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert tuning.stats()["sched"] == "normal"


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="'batch' or 'normal'"):
        tuning.tune_scheduler("fifo")  # type: ignore[arg-type]


def test_tune_applies_both(restore_gc: None, restore_sched: None) -> None:
    tuning.tune(young=9_000, policy="batch")
    assert gc.get_threshold()[0] == 9_000
    assert tuning.stats()["sched"] == "batch"
    tuning.tune(young=8_000, freeze=False, policy=None)  # the scheduler is left alone
    assert gc.get_threshold()[0] == 8_000
    assert tuning.stats()["sched"] == "batch"
