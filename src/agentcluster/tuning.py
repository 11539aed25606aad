"""Process settings for processes that run a node (or drive one hard, as a bench does): the
garbage collector and the CPU scheduling policy.

Theory of operation -- two costs that are not in our code but land inside every request:

**The cyclic garbage collector.** CPython frees almost everything by reference counting; its
cyclic collector exists for reference cycles only, and it runs by allocation count -- a young
collection after every 700 net container allocations, an older one every tenth of those, a
full one when the old generation has grown by a quarter. A node keeps tens of thousands of
long-lived containers (its imported modules, tables, the store's watch history) and a busy one
allocates thousands of containers a second, so with those defaults the collector runs hundreds
of times a second inside whatever request is being served: measured on a 3-node store under
load, ~400 young collections (0.1 ms each), ~40 middle ones (1 ms) and full ones of 40-50 ms
per process in a few seconds; on the call path one call in sixty met a young collection.
:func:`tune_gc` runs ``gc.collect()`` then ``gc.freeze()`` -- whatever exists once the node is
up moves to the permanent generation and is never traversed again -- and raises the young
threshold to ``young`` (20,000): the collector runs ~30 times less often; each run looks at
what survived since the previous one, so the total work stays about the same, in fewer,
longer pauses (a few ms). Cycles live a little longer before they are reclaimed.

**Wake-up preemption.** A node's work is a chain of short bursts handed between processes
over loopback: a leader writes an append to two followers, a caller writes a request to the
node that runs the agent. Under Linux's default policy the woken receiver preempts the writer
in the middle of its ``write()`` whenever they share a CPU, and the writer -- often the one on
the critical path, with its fsync or its next message still to go -- waits until the receiver
blocks. On a 2-vCPU machine a loopback write cost ~100 us of wall time that way. With
``SCHED_BATCH`` (:func:`tune_scheduler`; no privilege needed, nice level and fairness
unchanged) a waking node does not preempt the running task; it runs on an idle CPU at once,
else when the running task blocks or its slice ends (a few ms at most, far inside every
failure-detection timeout). Measured on the 2-core bench machine: store throughput +5-17 %,
``cluster.call`` overhead p99 roughly halved under contention.

``agentcluster node run`` applies both once the node is up (``--gc-young``, ``--sched``);
applications that embed a ``Node`` keep their own settings unless they call :func:`tune`.
"""

from __future__ import annotations

import gc
import os
from typing import Literal

__all__ = ["DEFAULT_YOUNG", "SchedPolicy", "stats", "tune", "tune_gc", "tune_scheduler"]

DEFAULT_YOUNG = 20_000  # young collections after this many net container allocations

SchedPolicy = Literal["batch", "normal"]


def tune_gc(*, young: int = DEFAULT_YOUNG, freeze: bool = True) -> tuple[int, int, int]:
    """Freeze what exists and raise the young threshold (see the module docstring); returns
    the previous thresholds (``gc.set_threshold(*previous)`` restores them, ``gc.unfreeze()``
    undoes the freeze)."""
    if young < 1:
        raise ValueError(f"young must be >= 1, not {young}")
    previous = gc.get_threshold()
    if freeze:
        gc.collect()
        gc.freeze()
    _, middle, old = previous
    gc.set_threshold(young, middle, old)
    return previous


def tune_scheduler(policy: SchedPolicy = "batch") -> bool:
    """Set this process's scheduling policy (Linux): ``batch`` (SCHED_BATCH, see the module
    docstring) or ``normal`` (SCHED_OTHER). False where the platform has no such policies or
    refuses the change (the process keeps running as it was)."""
    if policy not in ("batch", "normal"):
        raise ValueError(f"policy must be 'batch' or 'normal', not {policy!r}")
    setter = getattr(os, "sched_setscheduler", None)
    batch = getattr(os, "SCHED_BATCH", None)
    if setter is None or batch is None:
        return False
    try:
        setter(0, batch if policy == "batch" else os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        return False
    return True


def tune(
    *, young: int = DEFAULT_YOUNG, freeze: bool = True, policy: SchedPolicy | None = "batch"
) -> None:
    """:func:`tune_gc` and (unless ``policy`` is None) :func:`tune_scheduler`."""
    tune_gc(young=young, freeze=freeze)
    if policy is not None:
        tune_scheduler(policy)


def _policy() -> str:
    getter = getattr(os, "sched_getscheduler", None)
    if getter is None:
        return "unknown"
    current = getter(0)
    if current == getattr(os, "SCHED_BATCH", None):
        return "batch"
    if current == getattr(os, "SCHED_OTHER", None):
        return "normal"
    return str(current)


def stats() -> dict[str, object]:
    """What the collector and the scheduler are set to (a node's ``stats`` carry it)."""
    return {
        "gc_threshold": list(gc.get_threshold()),
        "gc_frozen": gc.get_freeze_count(),
        "gc_collections": [g["collections"] for g in gc.get_stats()],
        "sched": _policy(),
    }
