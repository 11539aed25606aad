"""Auctions as pure cores: sealed first-price, Vickrey, English and Dutch.

Theory of operation
-------------------
Every auction is a plain object driven by the caller: :meth:`Auction.bid` with the caller's
``now``, :meth:`Auction.tick` as time passes, :meth:`Auction.close` / :meth:`Auction.cancel`
to end it by hand. Nothing here reads a clock or draws randomness, so the coordinator (which
commits the :class:`AuctionResult` through the coordination store) and a simulation replay the
same bids to the same result.

Shared rules:

* A bid needs a non-empty bidder id and a finite amount ``> 0``; it is accepted only while the
  auction is open and ``now < deadline`` (the deadline itself is too late). A refused bid
  raises :class:`AuctionError` and leaves the auction unchanged.
* ``tick(now)`` closes the auction once ``now >= deadline`` (or the kind's own end condition
  was met) and from then on returns the same result on every call; it returns ``None`` while
  the auction runs. ``close(now)`` ends it at once (the auctioneer's gavel) and is idempotent.
* Ties are broken deterministically: a higher amount wins, then the earlier ``at`` (the
  caller's ``now`` when the bid arrived), then the lexicographically smaller bidder id.
* Nothing is ever sold below ``reserve``; a best bid under it ends as ``reserve_not_met``.
  The reserve is private to the auctioneer: :meth:`Auction.state` does not reveal it, except
  as the Dutch floor (a descending clock shows where it stops).

Kinds:

* :class:`SealedFirstPrice` — one sealed bid per bidder (sealed bids are final: a second bid
  from the same bidder is refused, which also keeps the result independent of arrival order);
  the best bid wins and pays its amount.
* :class:`Vickrey` — sealed, one bid per bidder; the best bid wins and pays
  ``max(second-best amount, reserve)`` (the reserve alone with a single bid), never more than
  its own bid.
* :class:`English` — open ascending: the opening bid must reach ``start_price``, each later bid
  must beat the high bid by at least ``min_increment``; the high bidder cannot outbid itself.
  Optional anti-sniping: a bid within ``extend_window`` seconds of the deadline pushes the
  deadline back by ``extend_by``. At the deadline the high bidder pays its bid.
* :class:`Dutch` — descending clock: the ask starts at ``start_price`` and drops by ``step``
  every ``step_interval`` seconds after ``opened_at``, never below the floor (the reserve).
  The first bid with ``amount >= ask(now)`` wins at once and pays ``ask(now)``; with no taker
  by the deadline the auction ends with ``no_bids``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import msgspec

__all__ = [
    "Auction",
    "AuctionError",
    "AuctionKind",
    "AuctionReason",
    "AuctionResult",
    "AuctionSpec",
    "Bid",
    "Dutch",
    "English",
    "SealedFirstPrice",
    "Vickrey",
    "open_auction",
    "rank_key",
]

AuctionKind = Literal["sealed_first_price", "vickrey", "english", "dutch"]
AuctionReason = Literal["sold", "no_bids", "reserve_not_met", "cancelled"]


class AuctionError(ValueError):
    """A refused bid or operation (closed auction, too late, too low, malformed...)."""


class Bid(msgspec.Struct, frozen=True, array_like=True):
    """One bid; ``at`` is the caller's ``now`` when it was accepted."""

    bidder: str
    amount: float
    at: float


class AuctionResult(msgspec.Struct, frozen=True, array_like=True):
    """How an auction ended; ``winner``/``price`` are set only when ``reason == "sold"``."""

    kind: str
    item: str
    winner: str | None
    price: float | None
    bids: int
    reason: AuctionReason


def rank_key(bid: Bid) -> tuple[float, float, str]:
    """Sort key putting the winning bid first (highest amount, earliest, smallest id)."""
    return (-bid.amount, bid.at, bid.bidder)


def _number(name: str, value: float, *, positive: bool = False, allow_inf: bool = False) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AuctionError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (not allow_inf and math.isinf(v)):
        raise AuctionError(f"{name} must be finite, got {value!r}")
    if v < 0 or (positive and v == 0):
        raise AuctionError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


class Auction(ABC):
    """The common interface; see the module docstring for the shared rules."""

    kind: ClassVar[AuctionKind]

    def __init__(self, item: str, *, deadline: float, reserve: float = 0.0) -> None:
        if not isinstance(item, str) or not item:
            raise AuctionError(f"item must be a non-empty string, got {item!r}")
        if not isinstance(deadline, int | float) or math.isnan(deadline):
            raise AuctionError(f"deadline must be a number, got {deadline!r}")
        self.item = item
        self.reserve = _number("reserve", reserve)
        self.deadline = float(deadline)
        self.closed = False
        self._result: AuctionResult | None = None

    @property
    def result(self) -> AuctionResult | None:
        """The result once the auction is closed, else ``None``."""
        return self._result

    def bid(self, bidder: str, amount: float, now: float) -> None:
        """Submit a bid; raises :class:`AuctionError` when it is refused."""
        if not isinstance(bidder, str) or not bidder:
            raise AuctionError(f"bidder must be a non-empty string, got {bidder!r}")
        value = _number("bid amount", amount, positive=True)
        when = _number_now(now)
        if self.closed:
            raise AuctionError(f"auction for {self.item!r} is closed")
        if when >= self.deadline:
            raise AuctionError(
                f"auction for {self.item!r} ended at {self.deadline} (bid at {when} is too late)"
            )
        self._accept(Bid(bidder, value, when))

    def tick(self, now: float) -> AuctionResult | None:
        """Close once the deadline has passed; the result (every call after), else ``None``."""
        if self._result is not None:
            return self._result
        if _number_now(now) >= self.deadline:
            return self.close(now)
        return None

    def close(self, now: float) -> AuctionResult:
        """End the auction now and settle it (idempotent)."""
        _number_now(now)
        if self._result is None:
            self._finish(self._settle())
        assert self._result is not None
        return self._result

    def cancel(self, now: float) -> AuctionResult:
        """Withdraw the item: nobody wins. A closed auction cannot be cancelled."""
        _number_now(now)
        if self._result is not None:
            raise AuctionError(f"auction for {self.item!r} already ended ({self._result.reason})")
        return self._finish(self._result_of(None, None, "cancelled"))

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """What a bidder may see."""

    @property
    @abstractmethod
    def bid_count(self) -> int:
        """Bids accepted so far."""

    @abstractmethod
    def _accept(self, bid: Bid) -> None:
        """Validate ``bid`` against the kind's rules and record it (or raise)."""

    @abstractmethod
    def _settle(self) -> AuctionResult:
        """The result of closing now."""

    def _finish(self, result: AuctionResult) -> AuctionResult:
        self.closed = True
        self._result = result
        return result

    def _result_of(
        self, winner: str | None, price: float | None, reason: AuctionReason
    ) -> AuctionResult:
        return AuctionResult(self.kind, self.item, winner, price, self.bid_count, reason)

    def _base_state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "item": self.item,
            "deadline": self.deadline,
            "closed": self.closed,
            "bids": self.bid_count,
        }


def _number_now(now: float) -> float:
    if not isinstance(now, int | float) or isinstance(now, bool) or not math.isfinite(now):
        raise AuctionError(f"now must be a finite number, got {now!r}")
    return float(now)


class _Sealed(Auction):
    """Sealed bids, one per bidder, revealed only at the close."""

    def __init__(self, item: str, *, deadline: float, reserve: float = 0.0) -> None:
        super().__init__(item, deadline=deadline, reserve=reserve)
        self._bids: dict[str, Bid] = {}

    @property
    def bid_count(self) -> int:
        return len(self._bids)

    def state(self) -> dict[str, Any]:
        return self._base_state()

    def _accept(self, bid: Bid) -> None:
        if bid.bidder in self._bids:
            raise AuctionError(f"{bid.bidder!r} already bid: sealed bids are final")
        self._bids[bid.bidder] = bid

    def _top_two(self) -> tuple[Bid | None, Bid | None]:
        best: Bid | None = None
        second: Bid | None = None
        for b in self._bids.values():
            key = rank_key(b)
            if best is None or key < rank_key(best):
                best, second = b, best
            elif second is None or key < rank_key(second):
                second = b
        return best, second

    def _settle(self) -> AuctionResult:
        best, second = self._top_two()
        if best is None:
            return self._result_of(None, None, "no_bids")
        if best.amount < self.reserve:
            return self._result_of(None, None, "reserve_not_met")
        return self._result_of(best.bidder, self._price(best, second), "sold")

    @abstractmethod
    def _price(self, best: Bid, second: Bid | None) -> float: ...


class SealedFirstPrice(_Sealed):
    """Sealed bids; the best bid wins and pays its own amount."""

    kind: ClassVar[AuctionKind] = "sealed_first_price"

    def _price(self, best: Bid, second: Bid | None) -> float:
        return best.amount


class Vickrey(_Sealed):
    """Sealed second-price: the best bid wins and pays max(second-best, reserve)."""

    kind: ClassVar[AuctionKind] = "vickrey"

    def _price(self, best: Bid, second: Bid | None) -> float:
        if second is None:
            return self.reserve
        return max(second.amount, self.reserve)


class English(Auction):
    """Open ascending auction with a minimum increment and optional anti-sniping."""

    kind: ClassVar[AuctionKind] = "english"

    def __init__(
        self,
        item: str,
        *,
        deadline: float,
        reserve: float = 0.0,
        start_price: float = 0.0,
        min_increment: float = 1.0,
        extend_window: float = 0.0,
        extend_by: float = 0.0,
    ) -> None:
        super().__init__(item, deadline=deadline, reserve=reserve)
        self.start_price = _number("start_price", start_price)
        self.min_increment = _number("min_increment", min_increment, positive=True)
        self.extend_window = _number("extend_window", extend_window)
        self.extend_by = _number("extend_by", extend_by)
        self._high: Bid | None = None
        self._count = 0

    @property
    def bid_count(self) -> int:
        return self._count

    @property
    def high(self) -> Bid | None:
        """The current high bid (public in an open auction)."""
        return self._high

    def ask(self) -> float:
        """The lowest amount the next bid may offer."""
        if self._high is None:
            return self.start_price
        return self._high.amount + self.min_increment

    def state(self) -> dict[str, Any]:
        high = self._high
        return self._base_state() | {
            "price": None if high is None else high.amount,
            "high_bidder": None if high is None else high.bidder,
            "ask": self.ask(),
            "reserve_met": high is not None and high.amount >= self.reserve,
        }

    def _accept(self, bid: Bid) -> None:
        high = self._high
        if high is not None and bid.bidder == high.bidder:
            raise AuctionError(f"{bid.bidder!r} already holds the high bid")
        ask = self.ask()
        # `amount > high` also guards against an increment too small to change a large float.
        if bid.amount < ask or (high is not None and bid.amount <= high.amount):
            raise AuctionError(f"bid {bid.amount} is below the ask {ask} for {self.item!r}")
        self._high = bid
        self._count += 1
        if self.deadline - bid.at <= self.extend_window:
            self.deadline += self.extend_by

    def _settle(self) -> AuctionResult:
        high = self._high
        if high is None:
            return self._result_of(None, None, "no_bids")
        if high.amount < self.reserve:
            return self._result_of(None, None, "reserve_not_met")
        return self._result_of(high.bidder, high.amount, "sold")


class Dutch(Auction):
    """Descending clock auction: the first taker wins at the current ask."""

    kind: ClassVar[AuctionKind] = "dutch"

    def __init__(
        self,
        item: str,
        *,
        deadline: float,
        start_price: float,
        step: float,
        step_interval: float,
        opened_at: float,
        reserve: float = 0.0,
    ) -> None:
        super().__init__(item, deadline=deadline, reserve=reserve)
        self.start_price = _number("start_price", start_price, positive=True)
        if self.start_price < self.reserve:
            raise AuctionError(
                f"start_price {start_price} is below the reserve {reserve} for {item!r}"
            )
        self.step = _number("step", step, positive=True)
        self.step_interval = _number("step_interval", step_interval, positive=True)
        self.opened_at = _number_now(opened_at)
        self._winner: Bid | None = None

    @property
    def bid_count(self) -> int:
        return 0 if self._winner is None else 1

    def ask(self, now: float) -> float:
        """The price at ``now``: non-increasing in ``now`` and never below the reserve."""
        steps = math.floor((_number_now(now) - self.opened_at) / self.step_interval)
        if steps <= 0:
            return self.start_price
        return max(self.reserve, self.start_price - steps * self.step)

    def state(self) -> dict[str, Any]:
        return self._base_state() | {
            "start_price": self.start_price,
            "step": self.step,
            "step_interval": self.step_interval,
            "opened_at": self.opened_at,
            "floor": self.reserve,
        }

    def _accept(self, bid: Bid) -> None:
        ask = self.ask(bid.at)
        if bid.amount < ask:
            raise AuctionError(f"bid {bid.amount} is below the ask {ask} for {self.item!r}")
        self._winner = bid
        self._finish(self._result_of(bid.bidder, ask, "sold"))

    def _settle(self) -> AuctionResult:
        return self._result_of(None, None, "no_bids")


class AuctionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A serialisable description of an auction to open (what a ``Cluster.auction`` call sends).

    Fields a kind does not use are ignored: ``start_price`` (English, Dutch),
    ``min_increment``/``extend_window``/``extend_by`` (English), ``step``/``step_interval``
    (Dutch).
    """

    kind: AuctionKind
    item: str
    deadline: float
    reserve: float = 0.0
    start_price: float = 0.0
    min_increment: float = 1.0
    extend_window: float = 0.0
    extend_by: float = 0.0
    step: float = 1.0
    step_interval: float = 1.0


def open_auction(spec: AuctionSpec, now: float) -> Auction:
    """Build the auction ``spec`` describes, opened at ``now``."""
    if spec.kind == "sealed_first_price":
        return SealedFirstPrice(spec.item, deadline=spec.deadline, reserve=spec.reserve)
    if spec.kind == "vickrey":
        return Vickrey(spec.item, deadline=spec.deadline, reserve=spec.reserve)
    if spec.kind == "english":
        return English(
            spec.item,
            deadline=spec.deadline,
            reserve=spec.reserve,
            start_price=spec.start_price,
            min_increment=spec.min_increment,
            extend_window=spec.extend_window,
            extend_by=spec.extend_by,
        )
    if spec.kind == "dutch":
        return Dutch(
            spec.item,
            deadline=spec.deadline,
            reserve=spec.reserve,
            start_price=spec.start_price,
            step=spec.step,
            step_interval=spec.step_interval,
            opened_at=now,
        )
    raise AuctionError(f"unknown auction kind {spec.kind!r}")
