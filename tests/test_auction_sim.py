"""Auctions among bidder agents on a simulated cluster (virtual time): every kind, committed
through the store, bidders told the outcome."""

from __future__ import annotations

import msgspec
import pytest

from agentcluster.agents import Action, ActionContext, Agent
from agentcluster.cluster import Cluster
from agentcluster.coordination.auction_service import AUCTIONS_PREFIX, AuctionCall, BidAction
from agentcluster.coordination.auctions import AuctionError
from agentcluster.testing.simcluster import SimCluster

VALUES = {"n1": 10.0, "n2": 30.0, "n3": 20.0, "n4": 25.0}


class BidderState(msgspec.Struct):
    valuation: float = 0.0
    closed: list[str] = []
    rejected: int = 0


class _Bid(BidAction):
    """Bids its valuation in sealed auctions, the ask while it is worth it in English ones,
    and takes the Dutch clock as soon as the ask is within its valuation."""

    name = "bid"

    def amount(self, call: AuctionCall, ctx: ActionContext) -> float | None:
        value = float(ctx.state.valuation)
        st = call.state
        if call.kind in ("vickrey", "sealed_first_price"):
            return value if st.get("bids", 0) == 0 or call.time_left > 0 else None
        if call.kind == "english":
            if st.get("high_bidder") == call.bidder or st["ask"] > value:
                return None
            return float(st["ask"])
        if call.kind == "dutch":
            return value if st["ask"] <= value else None
        return None


class _Closed(Action[msgspec.Struct]):
    name = "closed"

    def run(self, params: msgspec.Struct, ctx: ActionContext) -> dict[str, object]:
        assert ctx.signal is not None
        return {"closed": [*ctx.state.closed, ctx.signal.subject]}


class Bidder(Agent):
    name = "bidder"
    State = BidderState
    actions = (_Bid, _Closed)
    routes = (
        ("cluster.auction.call_for_bids", "bid"),
        ("cluster.auction.price", "bid"),
        ("cluster.auction.closed", "closed"),
    )


async def _setup(c: SimCluster) -> list[str]:
    await c.wait_until(c.converged, timeout=30)
    ids = []
    for n in c.names:
        await c.nodes[n].runtime.spawn(Bidder, state=BidderState(VALUES[n]))
        ids.append((await Cluster.of(c.nodes[n]).register("bidder")).id)
    return ids


@pytest.mark.virtual_time
@pytest.mark.parametrize(
    ("kind", "winner", "price"),
    [
        ("vickrey", "n2/bidder", 25.0),  # the highest pays the second-highest bid
        ("sealed_first_price", "n2/bidder", 30.0),
        ("english", "n2/bidder", 26.0),  # outbids n4's 25 by the increment
    ],
)
async def test_auction_kinds(kind: str, winner: str, price: float) -> None:
    async with SimCluster(4, seed=31, store_voters=3) as c:
        ids = await _setup(c)
        out = await Cluster.of(c.nodes["n1"]).auction(
            ids,
            "gpu-hour",
            kind=kind,
            duration=2.0,
            start_price=1.0,  # type: ignore[arg-type]
        )
        assert out.sold and out.result.winner == winner
        assert out.result.price == pytest.approx(price)
        stored = await c.nodes["n3"].store.get(AUCTIONS_PREFIX + out.ref)
        assert stored is not None and stored.create_revision == out.revision

        def told() -> bool:
            return all(
                out.ref in c.nodes[n].runtime.lookup("bidder").agent.state.closed for n in c.names
            )

        await c.wait_until(told, timeout=10)


@pytest.mark.virtual_time
async def test_dutch_clock_sells_to_the_first_taker_at_the_ask() -> None:
    async with SimCluster(4, seed=32, store_voters=3) as c:
        ids = await _setup(c)
        t0 = c.clock.now()
        out = await Cluster.of(c.nodes["n1"]).auction(
            ids, "slot", kind="dutch", duration=10.0, start_price=40.0, step=2.0,
            step_interval=0.1, reserve=5.0,
        )  # fmt: skip
        # 40, 38, 36, 34, 32, 30: n2 (worth 30) takes it as soon as it hears an ask of 30;
        # it pays the ask when its bid lands (the clock may have moved a step meanwhile),
        # never more than its bid and long before n4 (worth 25) would.
        assert out.result.winner == "n2/bidder"
        assert out.result.price is not None and 26.0 <= out.result.price <= 30.0
        assert c.clock.now() - t0 < 2.0  # long before the deadline


@pytest.mark.virtual_time
async def test_reserve_not_met_and_bad_requests() -> None:
    async with SimCluster(4, seed=33, store_voters=3) as c:
        ids = await _setup(c)
        cluster = Cluster.of(c.nodes["n2"])
        out = await cluster.auction(ids, "rare", kind="vickrey", reserve=100.0, duration=1.0)
        assert out.result.reason == "reserve_not_met" and out.result.winner is None
        with pytest.raises(AuctionError, match="at least one bidder"):
            await cluster.auction([], "x")
        with pytest.raises(AuctionError, match="kind"):
            await cluster.auction(ids, "x", kind="silent")  # type: ignore[arg-type]
