"""The MABEAM coordination layer: the agent registry, proposals and votes, barriers,
semaphores, auctions and a task market.

Theory of operation: the protocol logic lives in sans-I/O cores -- the registry index and
query planner (:mod:`.registry`, :mod:`.query`), the registry's dissemination protocol
(:mod:`.registry_sync`), vote tallies (:mod:`.voting`), auctions (:mod:`.auctions`) and the
task market (:mod:`.market`). The node runs them through thin shells: the registry service
(moves sync messages, claims unique names in the store), the consensus service (carries out
what the ConsensusCoordinator agent decides and commits decisions through the store) and
the auction service. Barriers and semaphores are recipes over the coordination store, like
its locks and elections. Users reach all of it through :class:`agentcluster.Cluster`.
"""

from agentcluster.coordination.auctions import (
    Auction,
    AuctionError,
    AuctionKind,
    AuctionResult,
    AuctionSpec,
    Bid,
    Dutch,
    English,
    SealedFirstPrice,
    Vickrey,
    open_auction,
)
from agentcluster.coordination.barrier import (
    Barrier,
    BarrierError,
    BarrierMismatch,
    BarrierTimeout,
)
from agentcluster.coordination.market import Award, MarketError, Offer, Task, TaskMarket
from agentcluster.coordination.proposals import Decision, VoteAction, VoteCast, VoteRequest
from agentcluster.coordination.query import Cond, QueryError, cond, matches, parse_cond
from agentcluster.coordination.registry import AgentEntry, Health, RegistryIndex
from agentcluster.coordination.registry_sync import RegistryEvent, RegistrySync, SyncConfig
from agentcluster.coordination.semaphore import (
    Permit,
    Semaphore,
    SemaphoreError,
    SemaphoreTimeout,
)
from agentcluster.coordination.voting import (
    Outcome,
    Rule,
    Tally,
    UnknownVoter,
    VoteChoice,
    format_rule,
    majority,
    parse_rule,
    quorum,
    supermajority,
    unanimous,
    weighted,
)

__all__ = [
    "AgentEntry",
    "Auction",
    "AuctionError",
    "AuctionKind",
    "AuctionResult",
    "AuctionSpec",
    "Award",
    "Barrier",
    "BarrierError",
    "BarrierMismatch",
    "BarrierTimeout",
    "Bid",
    "Cond",
    "Decision",
    "Dutch",
    "English",
    "Health",
    "MarketError",
    "Offer",
    "Outcome",
    "Permit",
    "QueryError",
    "RegistryEvent",
    "RegistryIndex",
    "RegistrySync",
    "Rule",
    "SealedFirstPrice",
    "Semaphore",
    "SemaphoreError",
    "SemaphoreTimeout",
    "SyncConfig",
    "Tally",
    "Task",
    "TaskMarket",
    "UnknownVoter",
    "Vickrey",
    "VoteAction",
    "VoteCast",
    "VoteChoice",
    "VoteRequest",
    "cond",
    "format_rule",
    "majority",
    "matches",
    "open_auction",
    "parse_cond",
    "parse_rule",
    "quorum",
    "supermajority",
    "unanimous",
    "weighted",
]
