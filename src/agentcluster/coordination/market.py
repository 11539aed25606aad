"""A task market: agents bid for work in sealed reverse auctions.

Theory of operation
-------------------
A :class:`Task` is posted with resource requirements (resource -> minimum amount), a budget
(the most the poster will pay) and a deadline. Agents that meet the requirements submit a
sealed :class:`Offer` with the cost they ask. At the deadline :meth:`TaskMarket.tick` awards
the task to the cheapest offer; ties go to the earlier ``at`` (the caller's ``now`` when the
offer was made), then to the lexicographically smaller agent id. The winner is paid

* its own cost with ``pricing="first"``, or
* with ``pricing="vickrey"``, the second-lowest cost capped at the budget — the budget itself
  when it was the only offer (the budget plays the reserve's part), which makes asking one's
  true cost the best strategy.

Either way the price lies between the winner's cost and the budget. A task with no offer
ends ``unassigned`` with reason ``no_offers``.

Offers are checked when they arrive and a refused one raises :class:`MarketError` with the
reason: unknown or closed task, deadline passed, a second offer from the same agent (sealed
offers are final), a cost that is negative, non-finite or above the budget, a requirement not
met. Each open task keeps only its two best offers' ranking incrementally (O(1) per offer)
and deadlines sit in a heap, so ``tick`` costs O(log n) per task it awards. Awards are
returned exactly once — by :meth:`TaskMarket.tick` or :meth:`TaskMarket.cancel` — and stay
readable with :meth:`TaskMarket.award`. The core reads no clock: the resource manager calls
it with ``now`` and commits the awards through the coordination store.
"""

from __future__ import annotations

import heapq
import math
from typing import Literal

import msgspec

__all__ = [
    "Award",
    "AwardReason",
    "MarketError",
    "Offer",
    "Pricing",
    "Task",
    "TaskMarket",
]

Pricing = Literal["first", "vickrey"]
AwardReason = Literal["assigned", "no_offers", "cancelled"]
_PRICINGS = ("first", "vickrey")


class MarketError(ValueError):
    """A refused post, offer or cancellation, with the reason in the message."""


class Task(msgspec.Struct, frozen=True, kw_only=True):
    """Work to be done: the winner must have at least ``requirements[r]`` of each resource."""

    id: str
    requirements: dict[str, float] = {}
    budget: float
    deadline: float
    pricing: Pricing = "vickrey"


class Offer(msgspec.Struct, frozen=True):
    """An agent's sealed bid: it would do ``task`` for ``cost`` with these ``resources``."""

    task: str
    agent: str
    cost: float
    resources: dict[str, float]
    at: float


class Award(msgspec.Struct, frozen=True):
    """How a task ended; ``agent``/``price`` are set only when ``reason == "assigned"``."""

    task: str
    agent: str | None
    price: float | None
    reason: AwardReason


def _offer_key(offer: Offer) -> tuple[float, float, str]:
    return (offer.cost, offer.at, offer.agent)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _OpenTask:
    __slots__ = ("agents", "best", "second", "task")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.agents: set[str] = set()  # membership only, never iterated
        self.best: Offer | None = None
        self.second: Offer | None = None

    def add(self, offer: Offer) -> None:
        self.agents.add(offer.agent)
        key = _offer_key(offer)
        if self.best is None or key < _offer_key(self.best):
            self.best, self.second = offer, self.best
        elif self.second is None or key < _offer_key(self.second):
            self.second = offer

    def settle(self) -> Award:
        task, best = self.task, self.best
        if best is None:
            return Award(task.id, None, None, "no_offers")
        if task.pricing == "first":
            price = best.cost
        elif self.second is None:
            price = task.budget
        else:
            price = min(self.second.cost, task.budget)
        return Award(task.id, best.agent, price, "assigned")


class TaskMarket:
    """Open tasks, their sealed offers, and the awards of the closed ones."""

    __slots__ = ("_closed", "_deadlines", "_open")

    def __init__(self) -> None:
        self._open: dict[str, _OpenTask] = {}
        self._closed: dict[str, Award] = {}
        self._deadlines: list[tuple[float, str]] = []

    def post(self, task: Task, now: float) -> None:
        """Open ``task`` for offers until its deadline."""
        _check_now(now)
        if not isinstance(task.id, str) or not task.id:
            raise MarketError(f"task id must be a non-empty string, got {task.id!r}")
        if task.id in self._open or task.id in self._closed:
            raise MarketError(f"task {task.id!r} was already posted")
        if not _finite(task.budget) or task.budget < 0:
            raise MarketError(f"task {task.id!r}: budget must be finite and >= 0: {task.budget!r}")
        if not _is_number(task.deadline) or math.isnan(task.deadline):
            raise MarketError(f"task {task.id!r}: deadline must be a number: {task.deadline!r}")
        if task.deadline <= now:
            raise MarketError(f"task {task.id!r}: deadline {task.deadline} is not after now {now}")
        if task.pricing not in _PRICINGS:
            raise MarketError(f"task {task.id!r}: pricing must be first or vickrey")
        for resource, minimum in task.requirements.items():
            if not _finite(minimum):
                raise MarketError(
                    f"task {task.id!r}: requirement {resource!r} must be finite: {minimum!r}"
                )
        self._open[task.id] = _OpenTask(task)
        heapq.heappush(self._deadlines, (float(task.deadline), task.id))

    def offer(self, offer: Offer, now: float) -> None:
        """Submit a sealed offer; raises :class:`MarketError` when it is refused."""
        _check_now(now)
        entry = self._open.get(offer.task)
        if entry is None:
            if offer.task in self._closed:
                reason = self._closed[offer.task].reason
                raise MarketError(f"task {offer.task!r} is closed ({reason})")
            raise MarketError(f"unknown task {offer.task!r}")
        task = entry.task
        if now >= task.deadline:
            raise MarketError(f"task {task.id!r}: offers closed at {task.deadline} (now {now})")
        if not isinstance(offer.agent, str) or not offer.agent:
            raise MarketError(f"task {task.id!r}: agent must be a non-empty string")
        if offer.agent in entry.agents:
            raise MarketError(f"task {task.id!r}: {offer.agent!r} already offered (final)")
        if not _finite(offer.cost) or offer.cost < 0:
            raise MarketError(f"task {task.id!r}: cost must be finite and >= 0: {offer.cost!r}")
        if offer.cost > task.budget:
            raise MarketError(
                f"task {task.id!r}: cost {offer.cost} exceeds the budget {task.budget}"
            )
        if not _finite(offer.at):
            raise MarketError(f"task {task.id!r}: offer time must be finite: {offer.at!r}")
        for resource, minimum in task.requirements.items():
            have = offer.resources.get(resource)
            # `not have >= minimum` also refuses NaN and non-numbers.
            if have is None or not _is_number(have) or not have >= minimum:
                raise MarketError(
                    f"task {task.id!r}: {offer.agent!r} offers {resource}={have!r}, "
                    f"requirement is >= {minimum}"
                )
        entry.add(offer)

    def cancel(self, task_id: str) -> Award:
        """Withdraw an open task; nobody is assigned."""
        entry = self._open.pop(task_id, None)
        if entry is None:
            if task_id in self._closed:
                raise MarketError(f"task {task_id!r} is already closed")
            raise MarketError(f"unknown task {task_id!r}")
        award = Award(task_id, None, None, "cancelled")
        self._closed[task_id] = award
        return award

    def tick(self, now: float) -> list[Award]:
        """Award every open task whose deadline is ``<= now``, by (deadline, id)."""
        _check_now(now)
        awards: list[Award] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, task_id = heapq.heappop(heap)
            entry = self._open.pop(task_id, None)
            if entry is None:  # cancelled before its deadline
                continue
            award = entry.settle()
            self._closed[task_id] = award
            awards.append(award)
        return awards

    def open_tasks(self) -> list[Task]:
        """Tasks still taking offers (or awaiting their award), in posting order."""
        return [entry.task for entry in self._open.values()]

    def offer_count(self, task_id: str) -> int:
        """Offers accepted for an open task (0 when it is not open)."""
        entry = self._open.get(task_id)
        return 0 if entry is None else len(entry.agents)

    def award(self, task_id: str) -> Award | None:
        """The award of a closed task, or ``None`` while it is open or unknown."""
        return self._closed.get(task_id)


def _check_now(now: float) -> None:
    if not _finite(now):
        raise MarketError(f"now must be a finite number, got {now!r}")
