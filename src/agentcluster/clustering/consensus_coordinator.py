"""ConsensusCoordinator: the agent that runs proposals and votes among agents.

Theory of operation: one runs on every node under the clustering supervisor. It *decides*;
the node *acts* (see :mod:`agentcluster.coordination.consensus_service`):

* ``cluster.consensus.propose`` (a :class:`ProposalSpec`) opens a proposal: a vote request is
  sent to every participant agent (``Send`` across nodes) and a deadline timer is scheduled.
* ``cluster.consensus.vote`` (a :class:`VoteCast`) records a vote; as soon as the tally is
  certain -- whatever the missing votes would be -- the agent asks the node to commit the
  decision (:class:`CommitDecision`).
* ``cluster.consensus.deadline``: the tally is finished with the votes that came; silent
  participants are listed as timed out.
* ``cluster.auction.bid``: a bid for an auction this node runs goes to the node's auction
  service (:mod:`agentcluster.coordination.auction_service`).
* ``cluster.consensus.committed`` (a :class:`Decision`, what the store holds -- possibly a
  racing coordinator's): the proposal closes, the decision joins the history and is
  broadcast as ``cluster.consensus.decided`` to every node's coordinator, which publishes it
  on its node's bus.

The state is plain data (open proposals with the votes so far, a bounded history), so the
agent checkpoints and restarts like any other; a tally is rebuilt from the votes when needed
(proposals have few participants; the tally itself is O(1) per vote).
"""

from __future__ import annotations

import msgspec

from agentcluster.agents import (
    Action,
    ActionContext,
    Agent,
    Cancel,
    Directive,
    Emit,
    Result,
    Schedule,
    Send,
)
from agentcluster.clustering.base import ClusterAgentSkill
from agentcluster.coordination.auction_service import BidCast, SubmitBid
from agentcluster.coordination.proposals import (
    COORDINATOR,
    BroadcastDecision,
    CommitDecision,
    Decision,
    ProposalSpec,
    RequestVotes,
    VoteCast,
    VoteRequest,
    split_participant,
)
from agentcluster.coordination.voting import Outcome, Tally, VoteChoice
from agentcluster.signals import Signal

__all__ = [
    "BroadcastDecision",
    "CommitDecision",
    "ConsensusCoordinator",
    "CoordinatorState",
    "OpenProposal",
    "RequestVotes",
]

HISTORY_LIMIT = 1_000  # decisions kept in the agent (the store keeps every one)


class OpenProposal(msgspec.Struct, frozen=True):
    spec: ProposalSpec
    votes: dict[str, VoteChoice] = {}
    committing: bool = False


class CoordinatorState(msgspec.Struct, frozen=True):
    open: dict[str, OpenProposal] = {}
    history: list[Decision] = []
    started: int = 0
    decided: int = 0
    stray_votes: int = 0  # votes for unknown / closed proposals or from non-participants


def _decision(
    spec: ProposalSpec, votes: dict[str, VoteChoice], outcome: Outcome, ctx: ActionContext
) -> Decision:
    return Decision(
        ref=spec.ref,
        topic=spec.topic,
        proposal=spec.proposal,
        rule=spec.rule,
        outcome=outcome,
        participants=list(spec.participants),
        votes=dict(votes),
        coordinator=spec.coordinator,
        decided_at=ctx.clock.wall(),
    )


def _tally(p: OpenProposal) -> Tally:
    tally = Tally(p.spec.participants, p.spec.rule)
    for who, vote in p.votes.items():
        tally.cast(who, vote)
    return tally


def _commit(
    state: CoordinatorState, p: OpenProposal, outcome: Outcome, ctx: ActionContext
) -> Result:
    opened = dict(state.open)
    opened[p.spec.ref] = msgspec.structs.replace(p, committing=True)
    decision = _decision(p.spec, p.votes, outcome, ctx)
    return Result(
        state=msgspec.structs.replace(state, open=opened),
        directives=[Cancel(f"deadline:{p.spec.ref}"), CommitDecision(decision)],
    )


class StartProposal(Action[ProposalSpec]):
    name = "start_proposal"
    description = "Open a proposal: ask every participant for its vote, start the deadline."

    def run(self, spec: ProposalSpec, ctx: ActionContext) -> Result:
        state: CoordinatorState = ctx.state
        if spec.ref in state.open:
            return Result()  # a duplicate start (a retried cast): already running
        Tally(spec.participants, spec.rule)  # validates participants and rule up front
        sends: list[Send] = []
        for participant in spec.participants:
            node, agent = split_participant(participant)
            request = VoteRequest(
                spec.ref, participant, spec.proposal, spec.coordinator, spec.timeout, spec.topic
            )
            sends.append(
                Send(
                    agent,
                    Signal(
                        type="cluster.consensus.vote_request",
                        source=f"/node/{spec.coordinator}/{COORDINATOR}",
                        subject=spec.ref,
                        data=msgspec.to_builtins(request),
                    ),
                    node=node,
                )
            )
        directives: list[Directive] = [
            RequestVotes(tuple(sends)),
            Schedule(
                spec.timeout,
                Signal(type="cluster.consensus.deadline", data={"ref": spec.ref}),
                key=f"deadline:{spec.ref}",
            ),
        ]
        opened = dict(state.open)
        opened[spec.ref] = OpenProposal(spec)
        return Result(
            state=msgspec.structs.replace(state, open=opened, started=state.started + 1),
            directives=directives,
        )


class RecordVote(Action[VoteCast]):
    name = "record_vote"
    description = "Count a participant's vote; commit as soon as the outcome is certain."

    def run(self, vote: VoteCast, ctx: ActionContext) -> Result:
        state: CoordinatorState = ctx.state
        p = state.open.get(vote.ref)
        if (
            p is None
            or p.committing
            or vote.participant not in p.spec.participants
            or vote.participant in p.votes
        ):
            return Result(state=msgspec.structs.replace(state, stray_votes=state.stray_votes + 1))
        p = msgspec.structs.replace(p, votes={**p.votes, vote.participant: vote.vote})
        outcome = _tally(p).outcome()
        if outcome is not None:
            return _commit(state, p, outcome, ctx)
        opened = dict(state.open)
        opened[vote.ref] = p
        return Result(state=msgspec.structs.replace(state, open=opened))


class _Ref(msgspec.Struct, frozen=True):
    ref: str


class Deadline(Action[_Ref]):
    name = "proposal_deadline"
    description = "Finish a tally at its deadline; silent participants count as timed out."

    def run(self, params: _Ref, ctx: ActionContext) -> Result:
        state: CoordinatorState = ctx.state
        p = state.open.get(params.ref)
        if p is None or p.committing:
            return Result()
        return _commit(state, p, _tally(p).finish(), ctx)


class Abandoned(Action[_Ref]):
    name = "proposal_abandoned"
    description = "The node could not commit the decision (no store): close the proposal."

    def run(self, params: _Ref, ctx: ActionContext) -> Result:
        state: CoordinatorState = ctx.state
        if params.ref not in state.open:
            return Result()
        opened = dict(state.open)
        opened.pop(params.ref)
        return Result(state=msgspec.structs.replace(state, open=opened))


def _remember(history: list[Decision], decision: Decision) -> list[Decision]:
    if any(d.ref == decision.ref for d in history[-64:]):
        return history
    return [*history[-(HISTORY_LIMIT - 1) :], decision]


class Committed(Action[Decision]):
    name = "proposal_committed"
    description = "Close a committed proposal, keep it in the history and broadcast it."

    def run(self, decision: Decision, ctx: ActionContext) -> Result:
        state: CoordinatorState = ctx.state
        opened = dict(state.open)
        opened.pop(decision.ref, None)
        new = msgspec.structs.replace(
            state,
            open=opened,
            history=_remember(state.history, decision),
            decided=state.decided + 1,
        )
        signal = Signal(
            type="cluster.consensus.decided",
            source=f"/node/{ctx.agent_id}",
            subject=decision.ref,
            data=msgspec.to_builtins(decision),
        )
        return Result(state=new, directives=[Emit(signal), BroadcastDecision(decision)])


class Decided(Action[Decision]):
    name = "proposal_decided"
    description = "Another node's decision: keep it in the history, publish it on this bus."

    def run(self, decision: Decision, ctx: ActionContext) -> Result:
        state: CoordinatorState = ctx.state
        history = _remember(state.history, decision)
        if history is state.history:
            return Result()
        signal = Signal(
            type="cluster.consensus.decided",
            source=f"/node/{decision.coordinator}/{COORDINATOR}",
            subject=decision.ref,
            data=msgspec.to_builtins(decision),
        )
        return Result(
            state=msgspec.structs.replace(state, history=history), directives=[Emit(signal)]
        )


class ForwardBid(Action[BidCast]):
    name = "forward_bid"
    description = "A bid for an auction this node runs: hand it to the node's auctioneer."

    def run(self, bid: BidCast, ctx: ActionContext) -> list[Directive]:
        return [SubmitBid(bid)]


class ConsensusCoordinator(Agent):
    name = COORDINATOR
    description = "Proposals and votes among agents, committed exactly once through the store."
    State = CoordinatorState
    actions = (StartProposal, RecordVote, Deadline, Committed, Decided, Abandoned, ForwardBid)
    routes = (
        ("cluster.consensus.propose", "start_proposal"),
        ("cluster.consensus.vote", "record_vote"),
        ("cluster.consensus.deadline", "proposal_deadline"),
        ("cluster.consensus.committed", "proposal_committed"),
        ("cluster.consensus.decided", "proposal_decided"),
        ("cluster.consensus.abandoned", "proposal_abandoned"),
        ("cluster.auction.bid", "forward_bid"),
    )
    skills = (ClusterAgentSkill(),)
