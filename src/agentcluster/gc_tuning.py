"""Garbage-collector settings for processes that run a node (or drive one hard, as a bench does).

Theory of operation: CPython frees almost everything by reference counting; its cyclic
collector exists for reference cycles only, and it runs by allocation count -- a young
collection after every 700 net container allocations, an older one every tenth of those, a
full one when the old generation has grown by a quarter. A node keeps tens of thousands of
long-lived containers (its imported modules, tables, the store's watch history) and a busy one
allocates thousands of containers a second, so with those defaults the collector runs hundreds
of times a second, inside whatever request is being served: measured on a 3-node store under
load, ~400 young collections (0.1 ms each), ~40 middle ones (1 ms) and full ones of 40-50 ms per
process in a few seconds; on the call path, one call in sixty met a young collection, which
made the collector the largest cause of ``call_overhead_p99_us``.

:func:`tune` does two things, once the process has started (everything it needs is imported and
built):

* ``gc.collect()`` then ``gc.freeze()``: whatever exists now moves to the permanent generation
  and is never traversed again, so later full collections look only at what the node created
  since;
* the young threshold goes from 700 to ``young`` (default 20,000): the collector runs ~30 times
  less often. Each run looks at the objects that survived since the previous one, so the total
  work stays about the same (less, as more objects die before a run), in fewer, longer pauses
  (a few ms) that fall on far fewer requests.

Memory: cycles live a little longer before they are reclaimed (at most ``young`` container
allocations); refcounting is untouched. Embedding applications keep their own settings unless
they call :func:`tune` themselves; ``agentcluster node run`` calls it once the node is up.
"""

from __future__ import annotations

import gc

__all__ = ["DEFAULT_YOUNG", "stats", "tune"]

DEFAULT_YOUNG = 20_000  # young collections after this many net container allocations


def tune(*, young: int = DEFAULT_YOUNG, freeze: bool = True) -> tuple[int, int, int]:
    """Apply the settings described in the module docstring; returns the previous thresholds
    (``gc.set_threshold(*previous)`` restores them; ``gc.unfreeze()`` undoes the freeze)."""
    if young < 1:
        raise ValueError(f"young must be >= 1, not {young}")
    previous = gc.get_threshold()
    if freeze:
        gc.collect()
        gc.freeze()
    _, middle, old = previous
    gc.set_threshold(young, middle, old)
    return previous


def stats() -> dict[str, object]:
    """What the collector is set to and has done (a node's ``stats`` carry it)."""
    return {
        "threshold": list(gc.get_threshold()),
        "frozen": gc.get_freeze_count(),
        "collections": [g["collections"] for g in gc.get_stats()],
    }
