"""What a proposal and its decision look like on the wire and in the store.

Theory of operation: a proposal is started on one node's ConsensusCoordinator (the
*coordinator*), which asks each participant agent for its vote with a
``cluster.consensus.vote_request`` signal carrying a :class:`VoteRequest`. A participant's
agent decides in its own handler and answers with a ``cluster.consensus.vote`` signal
carrying a :class:`VoteCast` -- :class:`VoteAction` is a ready-made handler: subclass it and
write ``decide``. The coordinator tallies (:mod:`agentcluster.coordination.voting`) and, once
the outcome is certain or the deadline passed, commits a :class:`Decision` through the
coordination store under ``mabeam/consensus/<ref>``, created only if absent: whichever
coordinator commits first wins and every other one adopts what was committed, so a proposal
has exactly one outcome even when two coordinators race on it.

Participants are registry entry ids, ``<node>/<agent id>``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import msgspec

from agentcluster.agents import Action, ActionContext, Directive, Send
from agentcluster.coordination.voting import Outcome, Rule, VoteChoice
from agentcluster.signals import Signal

__all__ = [
    "CONSENSUS_PREFIX",
    "COORDINATOR",
    "BroadcastDecision",
    "CommitDecision",
    "Decision",
    "ProposalSpec",
    "RequestVotes",
    "VoteAction",
    "VoteCast",
    "VoteRequest",
    "split_participant",
    "vote_reply",
]

CONSENSUS_PREFIX = "mabeam/consensus/"
COORDINATOR = "consensus_coordinator"  # the agent's id on every node


@dataclass(frozen=True, slots=True)
class CommitDecision(Directive):
    """Ask the node to commit ``decision`` through the store (created only if absent) and to
    answer with ``cluster.consensus.committed`` carrying what the store holds."""

    decision: Decision


@dataclass(frozen=True, slots=True)
class RequestVotes(Directive):
    """Ask the node to deliver these vote requests concurrently, without waiting for them: a
    participant on an unreachable node must not hold up the others (it times out instead)."""

    sends: tuple[Send, ...]


@dataclass(frozen=True, slots=True)
class BroadcastDecision(Directive):
    """Ask the node to deliver ``cluster.consensus.decided`` to every other node's
    coordinator."""

    decision: Decision


class ProposalSpec(msgspec.Struct, frozen=True):
    ref: str
    participants: list[str]  # "<node>/<agent id>"
    proposal: Any
    rule: Rule
    timeout: float
    coordinator: str  # the node whose ConsensusCoordinator tallies
    topic: str = ""  # a label for the history


class VoteRequest(msgspec.Struct, frozen=True):
    ref: str
    participant: str
    proposal: Any
    coordinator: str
    timeout: float  # seconds left to vote when sent
    topic: str = ""


class VoteCast(msgspec.Struct, frozen=True):
    ref: str
    participant: str
    vote: VoteChoice
    reason: str = ""


class Decision(msgspec.Struct, frozen=True):
    ref: str
    topic: str
    proposal: Any
    rule: Rule
    outcome: Outcome
    participants: list[str]
    votes: dict[str, VoteChoice]
    coordinator: str
    decided_at: float  # Unix time at the coordinator
    revision: int = 0  # the store revision that committed it

    @property
    def accepted(self) -> bool:
        return self.outcome.decision == "accepted"


def split_participant(participant: str) -> tuple[str, str]:
    """``"<node>/<agent>"`` -> ``(node, agent)``; ValueError naming the bad id."""
    node, sep, agent = participant.partition("/")
    if not sep or not node or not agent:
        raise ValueError(f"participant {participant!r} is not '<node>/<agent id>'")
    return node, agent


def vote_reply(request: VoteRequest, vote: VoteChoice, reason: str = "") -> Send:
    """The directive that answers ``request`` with ``vote`` (for hand-written handlers)."""
    cast = VoteCast(request.ref, request.participant, vote, reason)
    return Send(
        COORDINATOR,
        Signal(type="cluster.consensus.vote", data=msgspec.to_builtins(cast)),
        node=request.coordinator,
    )


class VoteAction(Action[VoteRequest]):
    """A participant's vote handler: subclass, write :meth:`decide`, route
    ``cluster.consensus.vote_request`` to it. Whatever ``decide`` raises is a ``no`` vote
    with the error as the reason (a broken voter never blocks a decision)."""

    name = "consensus_vote"

    @abstractmethod
    def decide(self, request: VoteRequest, ctx: ActionContext) -> VoteChoice: ...

    def run(self, params: VoteRequest, ctx: ActionContext) -> list[Send]:
        try:
            vote = self.decide(params, ctx)
            reason = ""
        except Exception as exc:
            vote, reason = "no", f"{type(exc).__name__}: {exc}"
        if vote not in ("yes", "no", "abstain"):
            vote, reason = "no", f"decide returned {vote!r}, not yes / no / abstain"
        return [vote_reply(params, vote, reason)]
