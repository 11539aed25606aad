"""Task market: cheapest qualifying agent wins, pricing, refusals, ties, exactly-once awards."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.coordination.market import (
    Award,
    AwardReason,
    MarketError,
    Offer,
    Pricing,
    Task,
    TaskMarket,
)

GPU = {"gpu": 1.0, "mem_gb": 16.0}


def _market(*tasks: Task) -> TaskMarket:
    market = TaskMarket()
    for task in tasks:
        market.post(task, now=0.0)
    return market


def _task(pricing: Pricing = "vickrey", budget: float = 100.0) -> Task:
    return Task(id="t1", requirements=GPU, budget=budget, deadline=10.0, pricing=pricing)


def _offer(agent: str, cost: float, at: float = 1.0, task: str = "t1", **res: float) -> Offer:
    return Offer(task, agent, cost, res or {"gpu": 2.0, "mem_gb": 32.0}, at)


# (pricing, offers as (agent, cost, at), expected award agent, price)
PRICING: list[tuple[Pricing, list[tuple[str, float, float]], str | None, float | None]] = [
    ("vickrey", [], None, None),
    ("vickrey", [("a", 40, 1)], "a", 100.0),  # alone: paid the budget (the reserve's part)
    ("vickrey", [("a", 40, 1), ("b", 60, 2), ("c", 90, 3)], "a", 60.0),
    ("vickrey", [("c", 90, 1), ("b", 60, 2), ("a", 40, 3)], "a", 60.0),
    ("vickrey", [("a", 40, 1), ("b", 100, 2)], "a", 100.0),
    ("vickrey", [("b", 50, 1), ("a", 50, 2)], "b", 50.0),  # tie: the earlier offer
    ("vickrey", [("b", 50, 1), ("a", 50, 1)], "a", 50.0),  # same time: the smaller id
    ("first", [("a", 40, 1), ("b", 60, 2)], "a", 40.0),
    ("first", [("a", 40, 1)], "a", 40.0),
    ("first", [("a", 0, 1)], "a", 0.0),  # free work is allowed
]


@pytest.mark.parametrize(("pricing", "offers", "agent", "price"), PRICING)
def test_pricing_table(
    pricing: Pricing, offers: list[tuple[str, float, float]], agent: str | None, price: float | None
) -> None:
    market = _market(_task(pricing))
    for name, cost, at in offers:
        market.offer(_offer(name, cost, at), now=at)
    assert market.offer_count("t1") == len(offers)
    assert market.tick(9.99) == []
    reason: AwardReason = "assigned" if agent else "no_offers"
    assert market.tick(10.0) == [Award("t1", agent, price, reason)]
    assert market.award("t1") == Award("t1", agent, price, reason)


def test_requirements_are_enforced() -> None:
    market = _market(_task())
    with pytest.raises(MarketError, match=r"gpu=0.5, requirement is >= 1.0"):
        market.offer(_offer("weak", 10.0, gpu=0.5, mem_gb=64.0), now=1.0)
    with pytest.raises(MarketError, match=r"mem_gb=None"):
        market.offer(_offer("nomem", 10.0, gpu=4.0), now=1.0)
    market.offer(_offer("exact", 50.0, gpu=1.0, mem_gb=16.0), now=1.0)  # minimum is enough
    assert market.tick(10.0) == [Award("t1", "exact", 100.0, "assigned")]


def test_cheapest_qualifying_agent_wins_over_a_cheaper_unqualified_one() -> None:
    market = _market(_task())
    with pytest.raises(MarketError):
        market.offer(_offer("cheap", 1.0, gpu=0.0, mem_gb=64.0), now=1.0)
    market.offer(_offer("mid", 30.0), now=1.0)
    market.offer(_offer("dear", 45.0), now=2.0)
    assert market.tick(10.0) == [Award("t1", "mid", 45.0, "assigned")]


OFFER_REFUSALS: list[tuple[str, Offer, float, str]] = [
    ("unknown task", _offer("a", 1.0, task="nope"), 1.0, "unknown task 'nope'"),
    ("too late", _offer("a", 1.0), 10.0, "offers closed at 10.0"),
    ("over budget", _offer("a", 100.5), 1.0, "exceeds the budget 100.0"),
    ("negative cost", _offer("a", -1.0), 1.0, "cost must be finite and >= 0"),
    ("nan cost", _offer("a", math.nan), 1.0, "cost must be finite"),
    ("empty agent", _offer("", 1.0), 1.0, "agent must be a non-empty string"),
    ("nan resource", _offer("a", 1.0, gpu=math.nan, mem_gb=32.0), 1.0, "gpu=nan"),
    ("nan at", _offer("a", 1.0, at=math.nan), 1.0, "offer time must be finite"),
    ("nan now", _offer("a", 1.0), math.nan, "now must be a finite number"),
]


@pytest.mark.parametrize(
    ("case", "offer", "now", "message"), OFFER_REFUSALS, ids=[r[0] for r in OFFER_REFUSALS]
)
def test_refused_offers(case: str, offer: Offer, now: float, message: str) -> None:
    market = _market(_task())
    with pytest.raises(MarketError, match=message):
        market.offer(offer, now=now)
    assert market.offer_count("t1") == 0


def test_second_offer_from_an_agent_and_offers_on_closed_tasks_are_refused() -> None:
    market = _market(_task())
    market.offer(_offer("a", 50.0), now=1.0)
    with pytest.raises(MarketError, match="already offered"):
        market.offer(_offer("a", 10.0), now=2.0)
    assert market.tick(10.0) == [Award("t1", "a", 100.0, "assigned")]
    with pytest.raises(MarketError, match=r"is closed \(assigned\)"):
        market.offer(_offer("b", 10.0), now=2.0)


@pytest.mark.parametrize(
    ("task", "now", "message"),
    [
        (Task(id="", budget=1.0, deadline=5.0), 0.0, "non-empty"),
        (Task(id="t", budget=-1.0, deadline=5.0), 0.0, "budget"),
        (Task(id="t", budget=math.inf, deadline=5.0), 0.0, "budget"),
        (Task(id="t", budget=1.0, deadline=5.0), 5.0, "not after now"),
        (Task(id="t", budget=1.0, deadline=math.nan), 0.0, "deadline must be a number"),
        (Task(id="t", budget=1.0, deadline=5.0, pricing="dutch"), 0.0, "pricing"),  # type: ignore[arg-type]
        (Task(id="t", budget=1.0, deadline=5.0, requirements={"cpu": math.inf}), 0.0, "'cpu'"),
    ],
)
def test_refused_posts(task: Task, now: float, message: str) -> None:
    market = TaskMarket()
    with pytest.raises(MarketError, match=message):
        market.post(task, now)
    assert market.open_tasks() == []


def test_duplicate_ids_are_refused_even_after_the_task_closed() -> None:
    market = _market(_task())
    with pytest.raises(MarketError, match="already posted"):
        market.post(_task(), now=0.0)
    market.tick(10.0)
    with pytest.raises(MarketError, match="already posted"):
        market.post(Task(id="t1", budget=1.0, deadline=50.0), now=20.0)


def test_cancel() -> None:
    market = _market(_task(), Task(id="t2", budget=5.0, deadline=20.0))
    market.offer(_offer("a", 10.0), now=1.0)
    assert market.cancel("t1") == Award("t1", None, None, "cancelled")
    assert [t.id for t in market.open_tasks()] == ["t2"]
    with pytest.raises(MarketError, match="already closed"):
        market.cancel("t1")
    with pytest.raises(MarketError, match="unknown task"):
        market.cancel("zzz")
    with pytest.raises(MarketError, match=r"closed \(cancelled\)"):
        market.offer(_offer("b", 1.0), now=2.0)
    assert market.tick(10.0) == []  # the cancelled task is not awarded again
    assert market.tick(20.0) == [Award("t2", None, None, "no_offers")]


def test_tick_awards_each_task_once_in_deadline_then_id_order() -> None:
    market = TaskMarket()
    for task_id, deadline in [("c", 5.0), ("b", 3.0), ("a", 5.0), ("d", 9.0)]:
        market.post(Task(id=task_id, budget=10.0, deadline=deadline), now=0.0)
    assert [t.id for t in market.open_tasks()] == ["c", "b", "a", "d"]  # posting order
    assert [a.task for a in market.tick(6.0)] == ["b", "a", "c"]
    assert market.tick(6.0) == []
    assert [a.task for a in market.tick(100.0)] == ["d"]
    assert market.tick(1000.0) == []
    assert market.open_tasks() == []


def test_records_round_trip_on_the_wire() -> None:
    task = _task()
    offer = _offer("a", 3.0)
    award = Award("t1", "a", 3.0, "assigned")
    for value in (task, offer, award):
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=type(value)) == value


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["first", "vickrey"]),
    st.sampled_from([10.0, 50.0, 100.0]),
    st.lists(
        st.tuples(
            st.sampled_from("abcdefg"),
            st.sampled_from([0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 120.0]),
            st.integers(0, 3),
            st.sampled_from([0.0, 1.0, 2.0]),
        ),
        max_size=20,
    ),
)
def test_award_matches_a_brute_force_reference(
    pricing: Pricing, budget: float, attempts: list[tuple[str, float, int, float]]
) -> None:
    market = TaskMarket()
    market.post(
        Task(id="t", requirements={"gpu": 1.0}, budget=budget, deadline=10.0, pricing=pricing), 0.0
    )
    accepted: dict[str, Offer] = {}
    for agent, cost, at, gpu in attempts:
        offer = Offer("t", agent, cost, {"gpu": gpu}, float(at))
        valid = agent not in accepted and cost <= budget and gpu >= 1.0
        try:
            market.offer(offer, now=float(at))
        except MarketError:
            assert not valid
            continue
        assert valid
        accepted[agent] = offer
    awards = market.tick(10.0)
    assert market.tick(11.0) == []
    assert len(awards) == 1
    award = awards[0]
    ranked = sorted(accepted.values(), key=lambda o: (o.cost, o.at, o.agent))
    if not ranked:
        assert award == Award("t", None, None, "no_offers")
        return
    best = ranked[0]
    assert (award.agent, award.reason) == (best.agent, "assigned")
    assert award.price is not None
    assert best.cost <= award.price <= budget  # never above the budget, never below the ask
    if pricing == "first":
        assert award.price == best.cost
    else:
        assert award.price == (min(ranked[1].cost, budget) if len(ranked) > 1 else budget)
