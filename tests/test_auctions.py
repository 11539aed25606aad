"""Auction cores: scenario tables per kind, refusals, and hypothesis properties."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.coordination.auctions import (
    Auction,
    AuctionError,
    AuctionResult,
    AuctionSpec,
    Bid,
    Dutch,
    English,
    SealedFirstPrice,
    Vickrey,
    open_auction,
    rank_key,
)

# -- sealed kinds: table -------------------------------------------------------------------

# (reserve, bids as (bidder, amount, at), first-price (winner, price, reason), Vickrey (...))
SEALED: list[
    tuple[
        float,
        list[tuple[str, float, float]],
        tuple[str | None, float | None, str],
        tuple[str | None, float | None, str],
    ]
] = [
    (0.0, [], (None, None, "no_bids"), (None, None, "no_bids")),
    (0.0, [("a", 10, 1)], ("a", 10, "sold"), ("a", 0.0, "sold")),
    (4.0, [("a", 10, 1)], ("a", 10, "sold"), ("a", 4.0, "sold")),  # lone bid pays the reserve
    (0.0, [("a", 10, 1), ("b", 7, 2), ("c", 3, 3)], ("a", 10, "sold"), ("a", 7, "sold")),
    (8.0, [("a", 10, 1), ("b", 7, 2)], ("a", 10, "sold"), ("a", 8.0, "sold")),
    (
        12.0,
        [("a", 10, 1), ("b", 7, 2)],
        (None, None, "reserve_not_met"),
        (None, None, "reserve_not_met"),
    ),
    (10.0, [("a", 10, 1)], ("a", 10, "sold"), ("a", 10.0, "sold")),  # the reserve itself is enough
    # Ties: equal amounts -> earlier `at`, then the smaller id; the runner-up sets the price.
    (0.0, [("b", 10, 1), ("a", 10, 2), ("c", 5, 0)], ("b", 10, "sold"), ("b", 10, "sold")),
    (0.0, [("b", 10, 1), ("a", 10, 1), ("c", 5, 0)], ("a", 10, "sold"), ("a", 10, "sold")),
]


@pytest.mark.parametrize(("reserve", "bids", "first", "second"), SEALED)
def test_sealed_table(
    reserve: float,
    bids: list[tuple[str, float, float]],
    first: tuple[str | None, float | None, str],
    second: tuple[str | None, float | None, str],
) -> None:
    for cls, expected in ((SealedFirstPrice, first), (Vickrey, second)):
        auction = cls("lamp", deadline=100.0, reserve=reserve)
        for bidder, amount, at in bids:
            auction.bid(bidder, amount, at)
        assert auction.tick(99.9) is None
        result = auction.tick(100.0)
        assert result == AuctionResult(cls.kind, "lamp", *expected[:2], len(bids), expected[2])  # type: ignore[arg-type]
        assert auction.closed and auction.result is result
        assert auction.tick(500.0) is result  # idempotent
        assert auction.close(600.0) is result


def test_sealed_state_reveals_only_the_count() -> None:
    auction = Vickrey("lamp", deadline=10.0, reserve=5.0)
    auction.bid("a", 9.0, 1.0)
    auction.bid("b", 3.0, 2.0)
    state = auction.state()
    assert state == {
        "kind": "vickrey",
        "item": "lamp",
        "deadline": 10.0,
        "closed": False,
        "bids": 2,
    }
    assert "9.0" not in repr(state) and "5.0" not in repr(state)


# -- refusals ------------------------------------------------------------------------------


def _closed_sealed() -> Auction:
    a = SealedFirstPrice("x", deadline=10.0)
    a.close(1.0)
    return a


def _english_with_high() -> Auction:
    a = English("x", deadline=10.0, start_price=5.0, min_increment=1.0)
    a.bid("a", 5.0, 1.0)
    return a


def _sealed_with_bid() -> Auction:
    a = Vickrey("x", deadline=10.0)
    a.bid("a", 5.0, 1.0)
    return a


REFUSALS: list[tuple[str, Callable[[], Auction], str, float, float, str]] = [
    ("after close", _closed_sealed, "b", 5.0, 2.0, "is closed"),
    ("at the deadline", lambda: Vickrey("x", deadline=10.0), "b", 5.0, 10.0, "too late"),
    ("after the deadline", lambda: Vickrey("x", deadline=10.0), "b", 5.0, 11.0, "too late"),
    ("zero amount", lambda: Vickrey("x", deadline=10.0), "b", 0.0, 1.0, "> 0"),
    ("negative amount", lambda: Vickrey("x", deadline=10.0), "b", -1.0, 1.0, "> 0"),
    ("nan amount", lambda: Vickrey("x", deadline=10.0), "b", math.nan, 1.0, "finite"),
    ("infinite amount", lambda: Vickrey("x", deadline=10.0), "b", math.inf, 1.0, "finite"),
    ("nan now", lambda: Vickrey("x", deadline=10.0), "b", 1.0, math.nan, "now must be"),
    ("empty bidder", lambda: Vickrey("x", deadline=10.0), "", 1.0, 1.0, "non-empty"),
    ("second sealed bid", _sealed_with_bid, "a", 9.0, 2.0, "sealed bids are final"),
    (
        "below the opening",
        lambda: English("x", deadline=10.0, start_price=5.0),
        "b",
        4.0,
        1.0,
        "below the ask 5.0",
    ),
    ("below the increment", _english_with_high, "b", 5.5, 2.0, "below the ask 6.0"),
    ("outbidding oneself", _english_with_high, "a", 9.0, 2.0, "already holds"),
    (
        "below the Dutch ask",
        lambda: Dutch(
            "x", deadline=10.0, start_price=10.0, step=1.0, step_interval=1.0, opened_at=0.0
        ),
        "b",
        7.5,
        2.5,
        "below the ask 8.0",
    ),
]


@pytest.mark.parametrize(
    ("case", "build", "bidder", "amount", "now", "message"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refused_bids_leave_the_auction_unchanged(
    case: str, build: Callable[[], Auction], bidder: str, amount: float, now: float, message: str
) -> None:
    auction = build()
    before = (auction.state(), auction.bid_count, auction.deadline)
    with pytest.raises(AuctionError, match=message):
        auction.bid(bidder, amount, now)
    assert (auction.state(), auction.bid_count, auction.deadline) == before


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Vickrey("", deadline=1.0), "item"),
        (lambda: Vickrey("x", deadline=math.nan), "deadline"),
        (lambda: Vickrey("x", deadline=1.0, reserve=-1.0), "reserve"),
        (lambda: English("x", deadline=1.0, min_increment=0.0), "min_increment"),
        (lambda: English("x", deadline=1.0, extend_by=-1.0), "extend_by"),
        (
            lambda: Dutch(
                "x", deadline=1.0, start_price=5, step=1, step_interval=1, opened_at=0, reserve=6
            ),
            "below the reserve",
        ),
        (
            lambda: Dutch("x", deadline=1.0, start_price=5, step=0, step_interval=1, opened_at=0),
            "step",
        ),
        (
            lambda: Dutch("x", deadline=1.0, start_price=5, step=1, step_interval=0, opened_at=0),
            "step_interval",
        ),
    ],
)
def test_bad_construction(build: Callable[[], Auction], message: str) -> None:
    with pytest.raises(AuctionError, match=message):
        build()


def test_cancel() -> None:
    auction = English("x", deadline=10.0)
    auction.bid("a", 3.0, 1.0)
    result = auction.cancel(2.0)
    assert result == AuctionResult("english", "x", None, None, 1, "cancelled")
    assert auction.tick(20.0) is result
    with pytest.raises(AuctionError, match="already ended"):
        auction.cancel(3.0)
    sold = SealedFirstPrice("y", deadline=5.0)
    sold.bid("a", 1.0, 0.0)
    sold.tick(5.0)
    with pytest.raises(AuctionError, match=r"already ended \(sold\)"):
        sold.cancel(6.0)


# -- English -------------------------------------------------------------------------------


def test_english_scenario() -> None:
    auction = English("vase", deadline=100.0, reserve=20.0, start_price=10.0, min_increment=2.0)
    assert auction.ask() == 10.0
    auction.bid("a", 10.0, 1.0)
    assert auction.state()["reserve_met"] is False
    auction.bid("b", 12.0, 2.0)
    auction.bid("a", 25.0, 3.0)
    state = auction.state()
    assert (state["price"], state["high_bidder"], state["ask"], state["bids"]) == (
        25.0,
        "a",
        27.0,
        3,
    )
    assert state["reserve_met"] is True
    assert auction.tick(99.0) is None
    assert auction.tick(100.0) == AuctionResult("english", "vase", "a", 25.0, 3, "sold")


def test_english_reserve_not_met_and_no_bids() -> None:
    auction = English("vase", deadline=10.0, reserve=50.0, start_price=10.0)
    auction.bid("a", 30.0, 1.0)
    assert auction.tick(10.0) == AuctionResult("english", "vase", None, None, 1, "reserve_not_met")
    empty = English("vase", deadline=10.0)
    assert empty.close(3.0) == AuctionResult("english", "vase", None, None, 0, "no_bids")


def test_english_anti_sniping_extends_the_deadline() -> None:
    auction = English("x", deadline=100.0, min_increment=1.0, extend_window=10.0, extend_by=30.0)
    auction.bid("a", 5.0, 50.0)  # far from the deadline: no change
    assert auction.deadline == 100.0
    auction.bid("b", 6.0, 95.0)  # a snipe: pushed back
    assert auction.deadline == 130.0
    assert auction.tick(100.0) is None
    auction.bid("a", 7.0, 125.0)
    assert auction.deadline == 160.0
    assert auction.tick(159.9) is None
    assert auction.tick(160.0) == AuctionResult("english", "x", "a", 7.0, 3, "sold")


def test_english_refuses_a_bid_that_float_rounding_would_make_equal() -> None:
    auction = English("x", deadline=10.0, min_increment=1.0)
    auction.bid("a", 1e20, 1.0)
    assert auction.ask() == 1e20  # 1e20 + 1 rounds back to 1e20
    with pytest.raises(AuctionError, match="below the ask"):
        auction.bid("b", 1e20, 2.0)


# -- Dutch ---------------------------------------------------------------------------------


def _dutch(reserve: float = 4.0) -> Dutch:
    return Dutch(
        "tulips",
        deadline=100.0,
        start_price=10.0,
        step=1.5,
        step_interval=2.0,
        opened_at=10.0,
        reserve=reserve,
    )


@pytest.mark.parametrize(
    ("now", "ask"),
    [
        (0.0, 10.0),
        (10.0, 10.0),
        (11.9, 10.0),
        (12.0, 8.5),
        (15.0, 7.0),
        (16.0, 5.5),
        (18.0, 4.0),
        (30.0, 4.0),
        (1e9, 4.0),
    ],
)
def test_dutch_schedule(now: float, ask: float) -> None:
    assert _dutch().ask(now) == ask


def test_dutch_first_taker_wins_at_the_ask() -> None:
    auction = _dutch()
    auction.bid("a", 9.0, 14.5)  # the ask is 7.0; willing to pay more, pays the ask
    result = AuctionResult("dutch", "tulips", "a", 7.0, 1, "sold")
    assert auction.closed and auction.result == result
    assert auction.tick(15.0) == result
    with pytest.raises(AuctionError, match="closed"):
        auction.bid("b", 9.0, 15.0)


def test_dutch_without_taker_ends_with_no_bids_at_the_deadline() -> None:
    auction = _dutch()
    assert auction.tick(99.0) is None
    assert auction.tick(100.0) == AuctionResult("dutch", "tulips", None, None, 0, "no_bids")


def test_dutch_floor_of_zero() -> None:
    auction = Dutch("x", deadline=50.0, start_price=2.0, step=1.0, step_interval=1.0, opened_at=0.0)
    assert auction.ask(5.0) == 0.0
    auction.bid("a", 0.01, 5.0)
    assert auction.result == AuctionResult("dutch", "x", "a", 0.0, 1, "sold")


# -- spec / wire ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sealed_first_price", "vickrey", "english", "dutch"])
def test_open_auction_from_a_decoded_spec(kind: str) -> None:
    spec = AuctionSpec(kind=kind, item="x", deadline=50.0, reserve=1.0, start_price=5.0)  # type: ignore[arg-type]
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=AuctionSpec)
    auction = open_auction(decoded, now=0.0)
    assert (auction.kind, auction.item, auction.deadline, auction.reserve) == (kind, "x", 50.0, 1.0)
    auction.bid("a", 6.0, 1.0)
    result = auction.close(2.0)
    assert result.winner == "a" and result.reason == "sold"
    wire = msgspec.msgpack.encode(result)
    assert msgspec.msgpack.decode(wire, type=AuctionResult) == result


# -- properties ----------------------------------------------------------------------------

amounts = st.floats(0.01, 1000.0, allow_nan=False).map(lambda x: round(x, 2))
reserves = st.sampled_from([0.0, 1.0, 50.0, 500.0])


@st.composite
def sealed_bids(draw: st.DrawFn) -> list[Bid]:
    names = draw(st.lists(st.sampled_from("abcdefgh"), unique=True, max_size=8))
    # Few distinct amounts and times so that ties happen often.
    return [
        Bid(n, draw(st.sampled_from([1.0, 5.0, 50.0, 99.5]) | amounts), draw(st.integers(0, 3)))
        for n in names
    ]


def _run_sealed(
    cls: type[SealedFirstPrice | Vickrey], reserve: float, bids: list[Bid]
) -> AuctionResult:
    auction = cls("item", deadline=10.0, reserve=reserve)
    for b in bids:
        auction.bid(b.bidder, b.amount, b.at)
    result = auction.tick(10.0)
    assert result is not None
    return result


@settings(max_examples=300, deadline=None)
@given(sealed_bids(), reserves, st.randoms(use_true_random=False))
def test_sealed_properties(bids: list[Bid], reserve: float, rnd: random.Random) -> None:
    ranked = sorted(bids, key=rank_key)
    for cls in (SealedFirstPrice, Vickrey):
        result = _run_sealed(cls, reserve, bids)
        # Arrival order does not matter.
        shuffled = list(bids)
        rnd.shuffle(shuffled)
        assert _run_sealed(cls, reserve, shuffled) == result
        assert result.bids == len(bids)
        if not bids:
            assert result.reason == "no_bids"
            continue
        top = ranked[0]
        if top.amount < reserve:
            assert (result.winner, result.price, result.reason) == (None, None, "reserve_not_met")
            continue
        assert result.reason == "sold" and result.winner == top.bidder
        assert result.price is not None
        assert result.price >= reserve  # never below the reserve
        assert result.price <= top.amount  # never more than the winner offered
        assert top.amount == max(b.amount for b in bids)  # a highest bidder wins
        if cls is SealedFirstPrice:
            assert result.price == top.amount
        else:
            runner_up = ranked[1].amount if len(ranked) > 1 else reserve
            assert result.price == max(runner_up, reserve)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcd"), amounts, st.floats(0.0, 0.5)), max_size=30),
    reserves,
    st.sampled_from([0.5, 1.0, 10.0]),
)
def test_english_properties(
    attempts: list[tuple[str, float, float]], reserve: float, increment: float
) -> None:
    auction = English(
        "x",
        deadline=100.0,
        reserve=reserve,
        start_price=1.0,
        min_increment=increment,
        extend_window=5.0,
        extend_by=5.0,
    )
    now = 80.0
    prices: list[float] = []
    accepted: list[tuple[str, float]] = []
    for bidder, amount, dt in attempts:
        now += dt
        ask, high = auction.ask(), auction.high
        try:
            auction.bid(bidder, amount, now)
        except AuctionError:
            # Refused exactly when the rules say so.
            assert amount < ask or (high is not None and high.bidder == bidder)
            continue
        assert amount >= ask
        accepted.append((bidder, amount))
        prices.append(auction.state()["price"])
    assert prices == sorted(prices) and len(set(prices)) == len(prices)  # strictly rising
    result = auction.close(now)
    if not accepted:
        assert result.reason == "no_bids"
    elif accepted[-1][1] < reserve:
        assert result.reason == "reserve_not_met"
    else:
        assert (result.winner, result.price) == accepted[-1]
        assert result.price is not None and result.price >= reserve


@settings(max_examples=300, deadline=None)
@given(
    st.floats(1.0, 100.0),
    st.floats(0.01, 10.0),
    st.floats(0.01, 10.0),
    st.floats(0.0, 1.0),
    st.lists(st.floats(-10.0, 1000.0), min_size=1, max_size=40),
)
def test_dutch_ask_is_non_increasing_and_floored(
    start: float, step: float, interval: float, floor_share: float, times: list[float]
) -> None:
    floor = start * floor_share
    auction = Dutch(
        "x",
        deadline=2000.0,
        start_price=start,
        step=step,
        step_interval=interval,
        opened_at=0.0,
        reserve=floor,
    )
    asks = [auction.ask(t) for t in sorted(times)]
    assert all(a >= b for a, b in itertools.pairwise(asks))
    assert all(floor <= a <= start for a in asks)
    when = sorted(times)[-1]
    if when < auction.deadline:
        auction.bid("z", start, when)
        assert auction.result is not None
        assert auction.result.price == auction.ask(when) >= floor
