"""What the linearizability checker works on: operations, their unknown outcome, and models.

Theory of operation: an :class:`Operation` is one client call with its call and return
instants, input and output; :data:`UNKNOWN` marks an output the client never learned. A
:class:`Model` is the sequential specification a history is replayed through. The search that
uses them is in :mod:`agentcluster.testing.linearizability`, which re-exports all of this.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["UNKNOWN", "Model", "Operation"]

S = TypeVar("S", bound=Hashable)


class _Unknown(enum.Enum):
    UNKNOWN = "UNKNOWN"

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown.UNKNOWN
"""The output of an operation whose outcome is unknown (timed out, store unavailable)."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One client operation: called at ``call``, returned ``output`` at ``ret``.

    ``ret = math.inf`` (with ``output = UNKNOWN``) marks an outcome the client never learned: it
    may have taken effect at any instant after ``call``, or never. An ``UNKNOWN`` output with a
    finite ``ret`` is treated the same way (the client stopped waiting; the effect may still
    land later). ``id`` is a free label shown in reports.
    """

    client: int | str
    call: float
    ret: float
    input: Any
    output: Any
    id: int | str | None = None


class Model(ABC, Generic[S]):
    """A sequential specification for :func:`check`.

    States must be hashable and compare by value (the search memoises them): use tuples,
    frozensets, frozen dataclasses, ``bytes``/``str``/``int`` -- never a mutable object.

    ``step`` receives output :data:`UNKNOWN` for an operation of unknown outcome and must then
    accept it wherever it could have taken effect, returning the state with its effect. An
    execution that leaves the state unchanged is equivalent to omitting the operation (always
    allowed for unknown outcomes), so ``step`` may answer ``False`` for it -- that prunes the
    search without losing a linearization.
    """

    @abstractmethod
    def init(self) -> S:
        """The initial state."""

    @abstractmethod
    def step(self, state: S, input: Any, output: Any) -> tuple[bool, S]:
        """``(legal, next_state)``: may ``input`` return ``output`` in ``state``?"""

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        """Independent sub-histories, checked one by one (default: the whole history)."""
        return [list(ops)]

    def describe_partition(self, ops: Sequence[Operation]) -> str:
        """A name for a partition in reports (e.g. its key); empty: its index is used."""
        return ""

    def describe_op(self, input: Any, output: Any) -> str:
        return f"{input!r} -> {output!r}"

    def describe_state(self, state: S) -> str:
        return repr(state)

    def is_read_only(self, input: Any, output: Any) -> bool:
        """True when ``input`` returning ``output`` never changes any state (a read, a failed
        compare-and-set). The search then places such an op as soon as it is legal instead of
        trying every order, which is sound and prunes a lot; the default ``False`` is safe."""
        return False

    def expected_output(self, state: S, input: Any) -> Any:
        """What the sequential object would return for ``input`` in ``state`` (for reports);
        :data:`UNKNOWN` when the model cannot say."""
        return UNKNOWN


def _fmt_value(value: Any) -> str:
    """An output or value in a report (a CAS's outcome reads ``ok`` / ``failed``)."""
    if value is UNKNOWN or value is None:
        return "?" if value is UNKNOWN else "absent"
    if isinstance(value, bool):
        return "ok" if value else "failed"
    return repr(value)
