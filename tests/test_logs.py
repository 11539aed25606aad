"""Structured logs carry node, agent and signal ids."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import msgspec

from agentcluster.agents import Action, ActionContext, Agent, Runtime
from agentcluster.logs import configure_logging, log_context
from agentcluster.signals import Signal

user_log = logging.getLogger("agentcluster.user")


class Speak(Action[msgspec.Struct]):
    name = "speak"

    def run(self, params: Any, ctx: ActionContext) -> None:
        user_log.info("hello from an action")


class Speaker(Agent):
    name = "speaker"
    actions = (Speak,)
    routes = (("test.speak", "speak"),)


async def test_json_logs_carry_the_ids() -> None:
    stream = io.StringIO()
    handler = configure_logging(logging.INFO, json=True, stream=stream)
    try:
        async with Runtime("node-7") as rt:
            await rt.spawn(Speaker)
            sig = Signal(type="test.speak")
            await rt.call("speaker", sig)
    finally:
        logging.getLogger("agentcluster").removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [r for r in records if r["message"] == "hello from an action"]
    assert mine == [
        {
            "time": mine[0]["time"],
            "level": "info",
            "logger": "agentcluster.user",
            "message": "hello from an action",
            "node_id": "node-7",
            "agent_id": "speaker",
            "signal_id": sig.id,
        }
    ]


def test_text_logs_and_log_context() -> None:
    stream = io.StringIO()
    handler = configure_logging(logging.INFO, stream=stream)
    try:
        with log_context(node_id="n1", agent_id="a1"):
            user_log.info("inside")
        user_log.info("outside")
    finally:
        logging.getLogger("agentcluster").removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("inside [node=n1 agent=a1]")
    assert outside.endswith("outside")
