"""The bundled demo: agents that exchange signals, and one that crashes and is restarted.

Theory of operation: ``Pinger`` schedules itself a tick every ``interval`` seconds; on each
tick it sends ``app.demo.ping`` to ``ponger``, which answers with ``app.demo.pong``. Both
publish what they do on the bus, where ``agentcluster up`` shows it live. ``Flaky`` mounts a
heartbeat skill and crashes on every ``crash_every``-th beat; its error policy is ``stop``,
so the crash ends it and the root supervisor restarts it from its initial state.
"""

from __future__ import annotations

from typing import Any

import msgspec

from agentcluster.agents import (
    Action,
    ActionContext,
    Agent,
    Emit,
    ErrorPolicy,
    Every,
    Result,
    Runtime,
    Schedule,
    Send,
    Skill,
)
from agentcluster.signals import Signal

__all__ = ["Flaky", "Pinger", "Ponger", "start_demo"]


class TickParams(msgspec.Struct):
    pass


class PingerState(msgspec.Struct):
    interval: float = 0.5
    sent: int = 0
    received: int = 0


class Tick(Action[TickParams]):
    name = "tick"
    description = "Send the next ping and schedule the next tick."
    Params = TickParams

    def run(self, params: TickParams, ctx: ActionContext) -> Result:
        state: PingerState = ctx.state
        n = state.sent + 1
        ping = Signal(type="app.demo.ping", source=f"/agent/{ctx.agent_id}", data={"n": n})
        return Result(
            state=msgspec.structs.replace(state, sent=n),
            directives=[
                Send("ponger", ping),
                Emit(ping),
                Schedule(state.interval, Signal(type="app.demo.tick"), key="tick"),
            ],
        )


class PongParams(msgspec.Struct):
    n: int


class GotPong(Action[PongParams]):
    name = "got_pong"
    Params = PongParams

    def run(self, params: PongParams, ctx: ActionContext) -> dict[str, Any]:
        return {"received": ctx.state.received + 1}


class Pinger(Agent):
    name = "pinger"
    description = "Pings the ponger on a schedule and counts the answers."
    State = PingerState
    actions = (Tick, GotPong)
    routes = (("app.demo.tick", "tick"), ("app.demo.pong", "got_pong"))

    def on_start(self) -> Result:
        return Result(directives=[Schedule(0.0, Signal(type="app.demo.tick"), key="tick")])


class PongerState(msgspec.Struct):
    answered: int = 0


class Answer(Action[PongParams]):
    name = "answer"
    Params = PongParams

    def run(self, params: PongParams, ctx: ActionContext) -> Result:
        sender = ctx.signal.source.rsplit("/", 1)[-1] if ctx.signal is not None else "pinger"
        pong = Signal(type="app.demo.pong", source=f"/agent/{ctx.agent_id}", data={"n": params.n})
        return Result(
            state=PongerState(answered=ctx.state.answered + 1),
            directives=[Send(sender, pong), Emit(pong)],
        )


class Ponger(Agent):
    name = "ponger"
    description = "Answers every ping with a pong."
    State = PongerState
    actions = (Answer,)
    routes = (("app.demo.ping", "answer"),)


class BeatConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    interval: float = 1.0
    crash_every: int = 3


class BeatState(msgspec.Struct):
    beats: int = 0
    crash_every: int = 3


class NoParams(msgspec.Struct):
    seq: int = 0
    at: float | None = None


class Beat(Action[NoParams]):
    name = "beat"
    Params = NoParams

    def run(self, params: NoParams, ctx: ActionContext) -> Result:
        beats = ctx.state.beats + 1
        if beats % ctx.state.crash_every == 0:
            raise RuntimeError(f"flaky agent crashes on beat {beats} (on purpose)")
        return Result(
            state=msgspec.structs.replace(ctx.state, beats=beats),
            directives=[
                Emit(
                    Signal(
                        type="app.demo.beat", source=f"/agent/{ctx.agent_id}", data={"beats": beats}
                    )
                )
            ],
        )


class Heartbeats(Skill):
    name = "heartbeats"
    description = "Counts heartbeats delivered on a schedule."
    Config = BeatConfig
    State = BeatState
    actions = (Beat,)
    routes = (("app.demo.heartbeat", "beat"),)

    def initial_state(self) -> BeatState:
        return BeatState(crash_every=self.config.crash_every)

    def schedules(self) -> list[Every]:
        return [Every(self.config.interval, "app.demo.heartbeat")]


class Flaky(Agent):
    name = "flaky"
    description = "Crashes on every third heartbeat; the supervisor restarts it."
    skills = (Heartbeats({"interval": 1.0, "crash_every": 3}),)


async def start_demo(rt: Runtime, *, interval: float = 0.5) -> None:
    """Spawn the demo agents into a running runtime."""
    await rt.spawn(Ponger)
    await rt.spawn(Pinger, state=PingerState(interval=interval))
    await rt.spawn(Flaky, error_policy=ErrorPolicy(on_error="stop"))
