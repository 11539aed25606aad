"""A linearizability checker for histories of concurrent clients (Wing & Gong, as Porcupine does).

Theory of operation: a history is a set of :class:`Operation` s, each with the instant its client
called it, the instant it returned, its input and its output. It is *linearizable* when some
total order of the operations (a linearization) respects real time -- an operation that returned
before another was called comes first -- and replays through a sequential :class:`Model` with
the outputs the clients saw. :func:`check` searches for such an order:

* **P-compositionality.** Linearizability is local: a history is linearizable iff each of its
  independent parts is (Herlihy & Wing), so ``model.partition`` splits it -- :class:`KVModel`
  by key -- and each part is searched alone. A 2,000-op history over ten keys becomes ten
  small searches instead of one hopeless one.
* **Wing & Gong search with Lowe's memoisation.** Call and return events sit in one list sorted
  by time (calls before returns at equal instants, so touching intervals count as concurrent).
  The search walks it: every call before the first pending return may be linearized next; a
  legal one is *lifted* out of the list (call and return) and the walk restarts; reaching a
  return means that operation can no longer be placed, so the search backtracks (*unlifts* the
  last choice and tries the next). A configuration is the set of linearized operations (a
  bitset held in an ``int``) plus the model state; one already explored is never explored
  again, which is why model states **must be hashable**.
* **Unknown outcomes.** A write that timed out or hit an unavailable store may or may not have
  taken effect -- even long after the client gave up. Such an operation has ``ret = inf`` and
  output :data:`UNKNOWN`: it may be linearized anywhere after its call, with any output, or
  never. Its return event sits at ``+inf``, so it never forces the search to place it; the
  search succeeds as soon as every *known* operation is linearized.
* **Reductions** (each keeps every linearization reachable, see the comments in ``_search``):
  a read that is legal now is placed now, without trying other orders (``Model.is_read_only``);
  since placing an unknown operation is optional, a configuration is pruned when one with the
  same known operations and state but a *subset* of the unknown ones placed was seen, and an
  unknown operation is pruned right away when the next operation does not depend on it; of
  unknown operations with equal inputs, the one called first is placed first.

A violation report names the partition (the key), the longest linearizable prefix the search
found, the model state after it, and for every operation that could have come next what the
model made of it. The optional ``timeout`` bounds the wall-clock time; a search it cuts short
is reported as *partial*, never as ok. This module is test tooling: it imports only the
standard library, and ``time.monotonic`` serves only that timeout. The operation and model
types are in :mod:`._lin_model`, the key-value model (with leases) in :mod:`._kv_model`; both
are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from agentcluster.testing._kv_model import (
    Cas,
    Delete,
    Get,
    KeepAlive,
    KVModel,
    LeasePut,
    LeaseRevoke,
    Put,
)
from agentcluster.testing._lin_model import UNKNOWN, Model, Operation, _fmt_value

__all__ = [
    "UNKNOWN",
    "Candidate",
    "Cas",
    "CompareAndSwap",
    "Delete",
    "Get",
    "HistoryRecorder",
    "KVModel",
    "KeepAlive",
    "LeasePut",
    "LeaseRevoke",
    "LinearizabilityResult",
    "Model",
    "Operation",
    "PartitionReport",
    "Put",
    "Read",
    "RegisterModel",
    "Write",
    "check",
]

# How many search steps pass between two looks at the clock when a timeout is set.
_CLOCK_EVERY = 256
# Report only the tail of a long prefix: the operations just before the violation matter.
_PREFIX_SHOWN = 10
_CANDIDATES_SHOWN = 20


# --- The classic example: one register ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """Read the register; the output is its value."""


@dataclass(frozen=True, slots=True)
class Write:
    """Write the register; the output is ignored."""

    value: Hashable


@dataclass(frozen=True, slots=True)
class CompareAndSwap:
    """Set the register to ``new`` iff it holds ``expected``; the output is ``True`` if it did."""

    expected: Hashable
    new: Hashable


class RegisterModel(Model[Hashable]):
    """A single register holding ``initial`` at first: :class:`Read`, :class:`Write`,
    :class:`CompareAndSwap`. Reads of unknown outcome are dropped."""

    def __init__(self, initial: Hashable = None) -> None:
        self.initial = initial

    def init(self) -> Hashable:
        return self.initial

    def step(self, state: Hashable, input: Any, output: Any) -> tuple[bool, Hashable]:
        if isinstance(input, Read):
            return output is UNKNOWN or output == state, state
        if isinstance(input, Write):
            return True, input.value
        if isinstance(input, CompareAndSwap):
            matches = state == input.expected
            if output is UNKNOWN or output is True:
                return matches, input.new if matches else state
            if output is False:
                return not matches, state
            raise TypeError(f"CompareAndSwap output must be a bool or UNKNOWN, not {output!r}")
        raise TypeError(f"RegisterModel cannot apply {input!r}")

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        return [[op for op in ops if not (isinstance(op.input, Read) and op.output is UNKNOWN)]]

    def describe_op(self, input: Any, output: Any) -> str:
        if isinstance(input, Read):
            return f"read -> {_fmt_value(output)}"
        if isinstance(input, Write):
            return f"write {input.value!r}"
        if isinstance(input, CompareAndSwap):
            return f"cas {input.expected!r} -> {input.new!r}: {_fmt_value(output)}"
        return f"{input!r} -> {output!r}"

    def is_read_only(self, input: Any, output: Any) -> bool:
        if output is UNKNOWN:
            return False
        return isinstance(input, Read) or (isinstance(input, CompareAndSwap) and output is False)

    def describe_state(self, state: Hashable) -> str:
        return f"register = {state!r}"

    def expected_output(self, state: Hashable, input: Any) -> Any:
        if isinstance(input, Read):
            return state
        if isinstance(input, CompareAndSwap):
            return state == input.expected
        return None


# --- The search ------------------------------------------------------------------------------


_SENTINEL_OP = Operation("sentinel", 0.0, math.inf, None, UNKNOWN)


class _Entry:
    """A call or return event in the doubly linked event list (sentinels link to themselves)."""

    __slots__ = ("bit", "is_call", "match", "next", "op", "prev", "read_only", "ret_inf", "twin")

    def __init__(self, index: int, is_call: bool, op: Operation) -> None:
        self.bit = 1 << index if index >= 0 else 0
        self.is_call = is_call
        self.op = op
        # The sentinels' op has ret=inf: reaching the tail counts as reaching an unknown
        # return, which ends the search with success (nothing known is left).
        self.ret_inf = op.ret == math.inf
        self.read_only = False
        self.twin = 0  # the bit of an earlier unknown op with the same input (see _event_list)
        self.match: _Entry = self
        self.prev: _Entry = self
        self.next: _Entry = self


def _event_list(ops: Sequence[Operation], model: Model[Any]) -> _Entry:
    """The head sentinel of the time-sorted event list of ``ops``, ended by a tail sentinel."""
    events: list[tuple[float, int, int, _Entry]] = []
    for i, op in enumerate(ops):
        call, ret = _Entry(i, True, op), _Entry(i, False, op)
        call.match = ret
        call.read_only = op.ret != math.inf and model.is_read_only(op.input, op.output)
        events.append((op.call, 0, i, call))
        events.append((op.ret, 1, i, ret))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    # Unknown ops with equal inputs are interchangeable, and the one called first can stand in
    # for any later one: the search only places an unknown op once its earlier twin is placed,
    # instead of trying every choice among them (many timed-out deletes of one key, say).
    last_twin: dict[Any, _Entry] = {}
    for _, is_return, _, entry in events:
        if is_return or not entry.ret_inf:
            continue
        try:
            twin = last_twin.get(entry.op.input)
            last_twin[entry.op.input] = entry
        except TypeError:  # an unhashable input has no twins we can find cheaply
            continue
        if twin is not None:
            entry.twin = twin.bit
    head = prev = _Entry(-1, False, _SENTINEL_OP)
    for *_, entry in events:
        prev.next = entry
        entry.prev = prev
        prev = entry
    tail = _Entry(-1, False, _SENTINEL_OP)
    prev.next = tail
    tail.prev = prev
    return head


def _lift(entry: _Entry) -> None:
    entry.prev.next = entry.next
    entry.next.prev = entry.prev
    match = entry.match
    match.prev.next = match.next
    match.next.prev = match.prev


def _unlift(entry: _Entry) -> None:
    match = entry.match
    match.prev.next = match
    match.next.prev = match
    entry.prev.next = entry
    entry.next.prev = entry


@dataclass(slots=True)
class _Outcome:
    status: str  # "ok", "violation" or "timeout"
    explored: int
    best_prefix: list[int]
    best_state: Any
    best_linearized: int


def _search(ops: Sequence[Operation], model: Model[Any], deadline: float | None) -> _Outcome:
    """Depth-first search for a linearization of one partition.

    Why the reductions lose nothing: every configuration pruned is *dominated* by one the
    search explores or has explored -- same known ops and state, with fewer unknown ops placed
    (cache, overwrite rule), an earlier-called twin in place of an unknown op (twin rule), or
    a legal read placed first (forced reads) -- and a dominating configuration can finish every
    linearization the dominated one could, in as few steps. So if any linearization exists,
    the explored configuration closest to finishing one is never stuck.
    """
    state: Any = model.init()
    head = _event_list(ops, model)
    unknown_mask = sum(1 << i for i, op in enumerate(ops) if op.ret == math.inf)
    known_mask = ((1 << len(ops)) - 1) & ~unknown_mask
    step = model.step
    plain_cache: set[tuple[int, Any]] = set()
    dominance_cache: dict[tuple[int, Any], list[int]] = {}

    def remember(bits: int, new_state: Any) -> bool:
        """Record a configuration; False when it, or one that dominates it, was seen."""
        if not unknown_mask:
            key = (bits, new_state)
            if key in plain_cache:
                return False
            plain_cache.add(key)
            return True
        # The same known ops and state with a subset of the unknown ops placed dominates: it
        # can do all this one can. Each key keeps an antichain of unknown-op masks.
        unknown = bits & unknown_mask
        seen = dominance_cache.setdefault((bits & known_mask, new_state), [])
        if any(mask & ~unknown == 0 for mask in seen):
            return False
        seen[:] = [mask for mask in seen if unknown & ~mask]
        seen.append(unknown)
        return True

    def overwrites(op: Operation, new_state: Any) -> bool:
        """Does ``op`` reach ``new_state`` without the unknown op just placed before it? Then
        that unknown op was pointless here: the path that omits it dominates this one."""
        legal, skipped = step(stack[-1][1], op.input, op.output)
        return legal and skipped == new_state

    linearized = 0
    known_done = 0
    # (entry linearized, state before it, forced): a forced step is a read the search placed
    # greedily, so backtracking over it also backtracks over its parent.
    stack: list[tuple[_Entry, Any, bool]] = []
    best_prefix: list[int] = []
    best_known, best_state, best_linearized = 0, state, 0
    explored = 0
    iterations = 0
    entry = head.next
    new_config = True
    while True:
        if deadline is not None and iterations % _CLOCK_EVERY == 0 and time.monotonic() >= deadline:
            return _Outcome("timeout", explored, best_prefix, best_state, best_linearized)
        iterations += 1
        chosen: _Entry | None = None
        forced = dead = False
        new_state: Any = None
        if new_config:
            # Partial-order reduction: a read that is legal now can be placed now -- any
            # linearization that places it later still works with it moved here.
            new_config = False
            candidate = entry
            while candidate.is_call:
                if candidate.read_only:
                    legal, new_state = step(state, candidate.op.input, candidate.op.output)
                    if legal:
                        if remember(linearized | candidate.bit, new_state):
                            chosen, forced = candidate, True
                        else:
                            dead = True  # that configuration already failed, so this one does
                        break
                candidate = candidate.next
        after_unknown = bool(stack) and stack[-1][0].ret_inf
        if chosen is None and not dead:
            while entry.is_call:
                # An unknown op waits for its earlier twin (see _event_list).
                if not entry.read_only and (linearized & entry.twin) == entry.twin:
                    legal, new_state = step(state, entry.op.input, entry.op.output)
                    if (
                        legal
                        and not (after_unknown and overwrites(entry.op, new_state))
                        and remember(linearized | entry.bit, new_state)
                    ):
                        chosen = entry
                        break
                entry = entry.next
            if chosen is None and entry.ret_inf:
                # Only unknown outcomes are left unplaced: they may never have happened.
                return _Outcome("ok", explored, best_prefix, best_state, best_linearized)
        if chosen is not None:
            explored += 1
            stack.append((chosen, state, forced))
            state = new_state
            linearized |= chosen.bit
            if not chosen.ret_inf:
                known_done += 1
                if known_done > best_known:
                    best_known, best_state, best_linearized = known_done, state, linearized
                    best_prefix = [e.bit.bit_length() - 1 for e, _, _ in stack]
            _lift(chosen)
            entry = head.next
            new_config = True
            continue
        while True:
            if not stack:
                return _Outcome("violation", explored, best_prefix, best_state, best_linearized)
            popped, state, was_forced = stack.pop()
            linearized ^= popped.bit
            if not popped.ret_inf:
                known_done -= 1
            _unlift(popped)
            if not was_forced:
                entry = popped.next
                break


# --- Results and reports ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """An operation that could have been linearized right after the longest prefix."""

    op: Operation
    accepted: bool  # the model accepted it there, but no linearization continued from it
    expected: Any  # what the model would have returned (UNKNOWN if it cannot say)


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """The furthest point the search of one partition reached: a definite violation, or (when
    ``definite`` is false) where the timeout found it."""

    partition: int
    label: str
    operations: int
    definite: bool
    prefix: tuple[Operation, ...]
    state: Any
    candidates: tuple[Candidate, ...]
    text: str


@dataclass(frozen=True, slots=True)
class LinearizabilityResult:
    """The verdict of :func:`check`: ``ok`` only when every partition was shown linearizable;
    ``partial`` when the timeout left some undecided. ``violations`` are definite either way."""

    ok: bool
    partial: bool
    partitions: int
    partitions_checked: int
    explored: int
    violations: tuple[PartitionReport, ...]
    undecided: tuple[PartitionReport, ...]

    def report(self) -> str:
        head = f"{self.partitions_checked} of {self.partitions} partition(s) checked, "
        head += f"{self.explored} states explored"
        if self.ok:
            return f"linearizable: {head}"
        lines = []
        if self.violations:
            lines.append(f"NOT LINEARIZABLE: {len(self.violations)} partition(s) violated; {head}")
        if self.partial:
            names = ", ".join(u.label for u in self.undecided)
            lines.append(f"UNDECIDED: the timeout stopped the search of {names}; {head}")
        lines.extend(f"\n{r.text}" for r in (*self.violations, *self.undecided))
        return "\n".join(lines)


def _fmt_time(t: float) -> str:
    return "?" if t == math.inf else f"{t:.6f}"


def _fmt_op(model: Model[Any], op: Operation) -> str:
    label = "" if op.id is None else f"#{op.id} "
    unknown = " (unknown outcome)" if op.ret == math.inf else ""
    return (
        f"{label}client {op.client} [{_fmt_time(op.call)} .. {_fmt_time(op.ret)}] "
        f"{model.describe_op(op.input, op.output)}{unknown}"
    )


def _partition_report(
    index: int, label: str, ops: Sequence[Operation], model: Model[Any], outcome: _Outcome
) -> PartitionReport:
    state, done, definite = outcome.best_state, outcome.best_linearized, outcome.status != "timeout"
    prefix = tuple(ops[i] for i in outcome.best_prefix)
    shown = prefix[-_PREFIX_SHOWN:]
    more = f", last {len(shown)} shown" if len(shown) < len(prefix) else ""
    what = "a violation" if definite else "undecided: the timeout stopped the search"
    lines = [f"partition {label} ({len(ops)} operations), {what}"]
    lines.append(f"  longest linearizable prefix found: {len(prefix)} operation(s){more}")
    lines.extend(f"    {_fmt_op(model, op)}" for op in shown)
    lines.append(f"  model state after it: {model.describe_state(state)}")
    remaining = [i for i in range(len(ops)) if not done >> i & 1]
    pending = [i for i in remaining if ops[i].ret != math.inf]
    candidates: list[Candidate] = []
    if pending:
        # Every remaining known op must follow the earliest pending return, so the ops called
        # by then are the ones that could have come next.
        blocking = min(pending, key=lambda i: ops[i].ret)
        horizon = ops[blocking].ret
        for i in sorted(remaining, key=lambda i: ops[i].call):
            if ops[i].call <= horizon:
                op = ops[i]
                accepted, _ = model.step(state, op.input, op.output)
                expected = model.expected_output(state, op.input)
                candidates.append(Candidate(op, accepted, expected))
        why_next = (
            "no operation can be linearized next" if definite else "the search got no further"
        )
        lines.append(
            f"  {why_next}; one of these had to be, by the return of "
            f"{_fmt_op(model, ops[blocking])}:"
        )
    for cand in candidates[:_CANDIDATES_SHOWN]:
        if cand.accepted:
            why = "legal here, but no linearization continues from there"
        elif cand.op.ret == math.inf:
            why = "cannot take effect here (and need not: its outcome is unknown)"
        elif cand.expected is UNKNOWN:
            why = "rejected by the model"
        else:
            why = f"rejected: the model would return {_fmt_value(cand.expected)}"
        lines.append(f"    {_fmt_op(model, cand.op)}  <- {why}")
    if len(candidates) > _CANDIDATES_SHOWN:
        lines.append(f"    ... and {len(candidates) - _CANDIDATES_SHOWN} more")
    text = "\n".join(lines)
    return PartitionReport(index, label, len(ops), definite, prefix, state, tuple(candidates), text)


def _normalise(op: Operation) -> Operation:
    if not math.isfinite(op.call) or math.isnan(op.ret) or op.ret < op.call:
        raise ValueError(f"operation times must satisfy finite call <= ret: {op!r}")
    if op.ret == math.inf and op.output is not UNKNOWN:
        raise ValueError(f"an operation with ret=inf must have output UNKNOWN: {op!r}")
    if op.output is UNKNOWN and op.ret != math.inf:
        return dataclasses.replace(op, ret=math.inf)
    return op


def check(
    history: Sequence[Operation], model: Model[Any], *, timeout: float | None = None
) -> LinearizabilityResult:
    """Is ``history`` linearizable with respect to ``model``?

    ``timeout`` (seconds of wall-clock time, ``None``: unbounded) bounds the whole check; a
    partition it leaves undecided makes the result ``partial`` and not ``ok``. Raises
    ``ValueError`` for a malformed operation (``ret < call``, ``ret=inf`` with a known output)
    and whatever the model raises for an input it cannot apply.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    parts = model.partition([_normalise(op) for op in history])
    explored = checked = 0
    violations: list[PartitionReport] = []
    undecided: list[PartitionReport] = []
    for index, part in enumerate(parts):
        label = model.describe_partition(part) or f"#{index}"
        outcome = _search(part, model, deadline)
        explored += outcome.explored
        if outcome.status == "ok":
            checked += 1
            continue
        report = _partition_report(index, label, part, model, outcome)
        if report.definite:
            checked += 1
            violations.append(report)
        else:
            undecided.append(report)
    return LinearizabilityResult(
        ok=not violations and not undecided,
        partial=bool(undecided),
        partitions=len(parts),
        partitions_checked=checked,
        explored=explored,
        violations=tuple(violations),
        undecided=tuple(undecided),
    )


# --- Recording histories ---------------------------------------------------------------------


class HistoryRecorder:
    """Records a history from concurrent (async) clients; the caller passes its clock's ``now``.

    ``invoke`` before sending, then exactly one of ``ok`` (the output), ``unknown`` (a timeout:
    the op may or may not have taken effect) or ``fail`` (definitely did not take effect; the
    op leaves the history). An op still pending when ``history()`` is called -- its client
    crashed or was cancelled -- is recorded as unknown. Handles are the ops' ``id`` s.

    The order of the recorder's calls is real-time order (an ``ok`` recorded before an
    ``invoke`` happened before it), and it is kept even when ``now`` does not move between
    them -- as on a virtual clock, where a client's next call often has exactly the time of
    its previous return, and the checker would take the two as concurrent: a time not after
    the last one recorded is stepped just past it (``math.nextafter``), which only ever
    states the order the recorder saw.
    """

    def __init__(self) -> None:
        self._ops: dict[int, Operation] = {}
        self._done: set[int] = set()
        self._next = 0
        self._last = -math.inf
        self._called: dict[int, float] = {}  # each op's call time as given (for checks)

    def _stamp(self, now: float) -> float:
        if now <= self._last:
            now = math.nextafter(self._last, math.inf)
        self._last = now
        return now

    def invoke(self, client: int | str, input: Any, now: float) -> int:
        handle, self._next = self._next, self._next + 1
        self._called[handle] = now
        self._ops[handle] = Operation(client, self._stamp(now), math.inf, input, UNKNOWN, handle)
        return handle

    def ok(self, handle: int, output: Any, now: float) -> None:
        op = self._complete(handle, now)  # checked as given: a return before its call is a bug
        self._ops[handle] = dataclasses.replace(op, ret=self._stamp(now), output=output)

    def unknown(self, handle: int, now: float) -> None:
        self._complete(handle, now)
        self._stamp(now)

    def fail(self, handle: int, now: float) -> None:
        self._complete(handle, now)
        self._stamp(now)
        del self._ops[handle]

    def history(self) -> list[Operation]:
        return list(self._ops.values())

    def _complete(self, handle: int, now: float) -> Operation:
        op = self._ops.get(handle)
        if op is None:
            raise ValueError(f"unknown or failed operation handle {handle}")
        if handle in self._done:
            raise ValueError(f"operation {handle} already completed")
        called = self._called[handle]
        if now < called:
            raise ValueError(f"operation {handle} completes at {now} before its call {called}")
        self._done.add(handle)
        return op
