"""Two real nodes with no seeds find each other through authenticated multicast."""

from __future__ import annotations

import pytest

from agentcluster.config import NodeConfig
from agentcluster.launcher import free_port
from agentcluster.node import Node
from agentcluster.testing import wait_until
from agentcluster.wire import Keyring

pytestmark = pytest.mark.slow


def config(name: str, port: int) -> NodeConfig:
    return NodeConfig(
        name=name,
        bind="127.0.0.1:0",
        preset="local",
        multicast=True,
        multicast_port=port,
        discovery_interval=1.0,
    )


async def test_nodes_find_each_other_by_multicast_and_strangers_do_not() -> None:
    port = free_port()
    key = Keyring.generate()
    async with (
        Node(config("m1", port), keyring=key) as a,
        Node(config("m2", port), keyring=key) as b,
        Node(config("stranger", port), keyring=Keyring.generate()) as c,
    ):
        await wait_until(
            lambda: (
                {m.name for m in a.members() if m.state == "alive"} == {"m1", "m2"}
                and {m.name for m in b.members() if m.state == "alive"} == {"m1", "m2"}
            ),
            timeout=20,
            interval=0.05,
        )
        assert {m.name for m in c.members()} == {"stranger"}
        mcast = next(s for s in a.strategies if s.name.startswith("multicast"))
        assert mcast.stats.dropped_auth > 0  # type: ignore[attr-defined]
