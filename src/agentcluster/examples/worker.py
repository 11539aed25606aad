"""An example worker for ``cluster.call`` (``--agent agentcluster.examples.worker:Echo``): it
registers with the ``echo`` capability and answers each ``app.echo`` signal with its data,
the agent id that served it and how many calls it has served. ``{"fail": "message"}`` makes
it raise (a :class:`ValueError`), ``{"sleep": seconds}`` makes it slow."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import msgspec

from agentcluster.agents import Action, ActionContext, Agent, Result

__all__ = ["Echo", "EchoState"]


class EchoState(msgspec.Struct):
    served: int = 0


class _Echo(Action[msgspec.Struct]):
    name = "echo"

    async def run(self, params: Any, ctx: ActionContext) -> Result:
        signal = ctx.signal
        data = signal.data if signal is not None else None
        if isinstance(data, dict):
            if "sleep" in data:
                await asyncio.sleep(float(data["sleep"]))
            if "fail" in data:
                raise ValueError(str(data["fail"]))
        served = ctx.state.served + 1
        return Result(
            state=EchoState(served), reply={"echo": data, "agent": ctx.agent_id, "served": served}
        )


class Echo(Agent):
    name = "echo"
    description = "Answers app.echo calls with their data (an example worker)."
    capabilities: ClassVar[tuple[str, ...]] = ("echo",)
    State = EchoState
    actions = (_Echo,)
    routes = (("app.echo", "echo"),)
