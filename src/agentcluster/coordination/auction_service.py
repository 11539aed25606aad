"""Auctions among agents across the cluster: the node shell around the auction cores.

Theory of operation: :meth:`AuctionService.start` opens an auction core
(:mod:`agentcluster.coordination.auctions`) on this node, the *auctioneer*, and sends every
bidder agent a ``cluster.auction.call_for_bids`` signal carrying an :class:`AuctionCall`
(what a bidder may see: the kind, the item, the time left, the public state -- never the
reserve, except as a Dutch floor). Bidders answer with ``cluster.auction.bid`` signals to
the auctioneer's ConsensusCoordinator, which hands each to this service (the
:class:`SubmitBid` directive); :class:`BidAction` is a ready-made bidder handler: subclass it
and write ``amount``. Open auctions keep their bidders informed: an English auction sends
``cluster.auction.price`` after every accepted bid, a Dutch one at every step of its clock,
and a bidder may answer each with a new bid.

At the deadline (or at once when a Dutch bid takes the ask) the result is committed through
the coordination store under ``mabeam/auctions/<ref>``, created only if absent, and every
bidder gets ``cluster.auction.closed`` with the committed :class:`AuctionOutcome`. A refused
bid is answered with ``cluster.auction.rejected`` (and the reason), so a bidder is never left
guessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from agentcluster._background import spawn_owned
from agentcluster.agents import Action, ActionContext, Directive, Send
from agentcluster.coordination.auctions import (
    Auction,
    AuctionError,
    AuctionKind,
    AuctionResult,
    AuctionSpec,
    Dutch,
    English,
    open_auction,
)
from agentcluster.coordination.proposals import COORDINATOR, split_participant
from agentcluster.signals import Signal
from agentcluster.signals._signal import new_id
from agentcluster.store.base import Compare, GetOp, PutOp, StoreError

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = [
    "AUCTIONS_PREFIX",
    "AuctionCall",
    "AuctionOutcome",
    "AuctionService",
    "BidAction",
    "BidCast",
    "SubmitBid",
]

log = logging.getLogger(__name__)

AUCTIONS_PREFIX = "mabeam/auctions/"
_enc = msgspec.msgpack.Encoder()


class AuctionCall(msgspec.Struct, frozen=True):
    """What a bidder hears: a call for bids, a price update, or the close."""

    ref: str
    item: str
    kind: AuctionKind
    auctioneer: str  # the node to send bids to
    bidder: str  # the addressee, "<node>/<agent id>"
    time_left: float
    state: dict[str, Any] = {}


class BidCast(msgspec.Struct, frozen=True):
    ref: str
    bidder: str
    amount: float


class AuctionOutcome(msgspec.Struct, frozen=True):
    ref: str
    result: AuctionResult
    bidders: list[str]
    auctioneer: str
    revision: int = 0  # the store revision that committed it

    @property
    def sold(self) -> bool:
        return self.result.reason == "sold"


@dataclass(frozen=True, slots=True)
class SubmitBid(Directive):
    """Hand a bid to the node's auction service (the coordinator forwards bids)."""

    bid: BidCast


class BidAction(Action[AuctionCall]):
    """A bidder's handler: subclass, write :meth:`amount` (``None``: no bid now), route
    ``cluster.auction.call_for_bids`` and ``cluster.auction.price`` to it."""

    name = "auction_bid"

    @abstractmethod
    def amount(self, call: AuctionCall, ctx: ActionContext) -> float | None: ...

    def run(self, params: AuctionCall, ctx: ActionContext) -> list[Send]:
        amount = self.amount(params, ctx)
        if amount is None:
            return []
        bid = BidCast(params.ref, params.bidder, float(amount))
        signal = Signal(type="cluster.auction.bid", data=msgspec.to_builtins(bid))
        return [Send(COORDINATOR, signal, node=params.auctioneer)]


class _Open:
    def __init__(self, ref: str, core: Auction, bidders: list[str], deadline: float) -> None:
        self.ref = ref
        self.core = core
        self.bidders = bidders
        self.deadline = deadline
        self.wake = asyncio.Event()
        self.done: asyncio.Future[AuctionOutcome] = asyncio.get_running_loop().create_future()


class AuctionService:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._open: dict[str, _Open] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.bids_rejected = 0

    def attach(self) -> None:
        self.node.runtime.register_directive(SubmitBid, self._submit)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._open.clear()

    def _spawn(self, coro: Any) -> None:
        spawn_owned(self._tasks, coro, log)

    async def start(
        self,
        bidders: Sequence[str],
        item: str,
        *,
        kind: AuctionKind = "vickrey",
        duration: float = 2.0,
        reserve: float = 0.0,
        start_price: float = 0.0,
        min_increment: float = 1.0,
        step: float = 1.0,
        step_interval: float = 0.1,
    ) -> str:
        """Open an auction among ``bidders`` (registry ids); returns its reference."""
        if self.node.store_host is None:
            raise AuctionError("auctions commit through the coordination store: set store_voters")
        parts = list(dict.fromkeys(bidders))
        if not parts:
            raise AuctionError("an auction needs at least one bidder")
        for b in parts:
            split_participant(b)
        if not 0 < duration <= 3600:
            raise AuctionError(f"duration must be in (0, 3600] seconds, not {duration}")
        now = self.node.clock.now()
        spec = AuctionSpec(
            kind=kind, item=item, deadline=now + duration, reserve=reserve,
            start_price=start_price, min_increment=min_increment, step=step,
            step_interval=step_interval,
        )  # fmt: skip
        core = open_auction(spec, now)
        ref = new_id()
        auction = self._open[ref] = _Open(ref, core, parts, spec.deadline)
        self._tell(auction, "cluster.auction.call_for_bids")
        self._spawn(self._run(auction))
        return ref

    async def result(self, ref: str, *, timeout: float | None = None) -> AuctionOutcome:
        auction = self._open.get(ref)
        if auction is not None:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(auction.done)
        kv = await self.node.store.get(AUCTIONS_PREFIX + ref)
        if kv is None:
            raise AuctionError(f"no auction {ref} here or in the store")
        return msgspec.structs.replace(
            msgspec.msgpack.decode(kv.value, type=AuctionOutcome), revision=kv.create_revision
        )

    # ----------------------------------------------------------------- the auction's life
    def _call(self, auction: _Open, bidder: str) -> AuctionCall:
        core = auction.core
        now = self.node.clock.now()
        state = dict(core.state())
        if isinstance(core, Dutch):
            state["ask"] = core.ask(now)
        return AuctionCall(
            auction.ref, core.item, core.kind, self.node.name, bidder,
            max(0.0, core.deadline - now), state,
        )  # fmt: skip

    def _tell(self, auction: _Open, kind: str) -> None:
        for bidder in auction.bidders:
            node, agent = split_participant(bidder)
            data = msgspec.to_builtins(self._call(auction, bidder))
            signal = Signal(type=kind, subject=auction.ref, data=data)
            self._spawn(self._send(agent, signal, node))

    async def _send(self, agent: str, signal: Signal, node: str) -> None:
        try:
            await self.node.runtime.send(agent, signal, node=node)
        except Exception as exc:
            log.info("auction message to %s on %s failed: %s", agent, node, exc)

    async def _run(self, auction: _Open) -> None:
        clock = self.node.clock
        core = auction.core
        next_step = clock.now() + core.step_interval if isinstance(core, Dutch) else float("inf")
        while not core.closed:
            now = clock.now()
            if core.tick(now) is not None:
                break
            if now >= next_step and isinstance(core, Dutch):
                next_step += core.step_interval
                self._tell(auction, "cluster.auction.price")
            # English anti-sniping may move the deadline: read it again every round.
            wait = min(core.deadline, next_step) - clock.now()
            auction.wake.clear()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await auction.wake.wait()
        result = core.result
        assert result is not None
        outcome = AuctionOutcome(auction.ref, result, auction.bidders, self.node.name)
        try:
            outcome = await self._commit(outcome)
        except (StoreError, TimeoutError) as exc:
            self._open.pop(auction.ref, None)
            auction.done.set_exception(AuctionError(f"could not commit the auction: {exc}"))
            return
        self._open.pop(auction.ref, None)
        auction.done.set_result(outcome)
        data = {"outcome": msgspec.to_builtins(outcome)}
        for bidder in auction.bidders:
            node, agent = split_participant(bidder)
            signal = Signal(type="cluster.auction.closed", subject=auction.ref, data=data)
            self._spawn(self._send(agent, signal, node))

    async def _commit(self, outcome: AuctionOutcome) -> AuctionOutcome:
        store = self.node.store
        key = AUCTIONS_PREFIX + outcome.ref
        async with asyncio.timeout(10.0):
            res = await store.txn(
                [Compare(key, "create", "==", 0)], [PutOp(key, _enc.encode(outcome))], [GetOp(key)]
            )
        if res.succeeded:
            return msgspec.structs.replace(outcome, revision=res.revision)
        kvs = res.results[0]
        assert isinstance(kvs, list) and kvs
        stored = msgspec.msgpack.decode(kvs[0].value, type=AuctionOutcome)
        return msgspec.structs.replace(stored, revision=kvs[0].create_revision)

    def _submit(self, server: Any, d: SubmitBid) -> None:
        bid = d.bid
        auction = self._open.get(bid.ref)
        if auction is None or bid.bidder not in auction.bidders:
            self.bids_rejected += 1
            return
        try:
            auction.core.bid(bid.bidder, bid.amount, self.node.clock.now())
        except AuctionError as exc:
            self.bids_rejected += 1
            node, agent = split_participant(bid.bidder)
            signal = Signal(
                type="cluster.auction.rejected",
                subject=bid.ref,
                data={"ref": bid.ref, "amount": bid.amount, "reason": str(exc)},
            )
            self._spawn(self._send(agent, signal, node))
            return
        if isinstance(auction.core, English):
            self._tell(auction, "cluster.auction.price")
        auction.wake.set()

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._open), "bids_rejected": self.bids_rejected}
