"""An example user agent that takes part in proposals (``agentcluster node run --agent
agentcluster.examples.voter:Voter``): it registers with the ``vote`` capability and votes yes,
unless the proposal is a mapping that asks for a no (``{"veto": true}``) or an abstention
(``{"abstain": true}``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from agentcluster.agents import ActionContext, Agent
from agentcluster.coordination.proposals import VoteAction, VoteRequest
from agentcluster.coordination.voting import VoteChoice

__all__ = ["Voter"]


class _Decide(VoteAction):
    name = "decide_vote"

    def decide(self, request: VoteRequest, ctx: ActionContext) -> VoteChoice:
        p = request.proposal
        if isinstance(p, Mapping):
            if p.get("veto"):
                return "no"
            if p.get("abstain"):
                return "abstain"
        return "yes"


class Voter(Agent):
    name = "voter"
    description = "Votes yes on proposals unless told otherwise (an example participant)."
    capabilities: ClassVar[tuple[str, ...]] = ("vote",)
    actions = (_Decide,)
    routes = (("cluster.consensus.vote_request", "decide_vote"),)
