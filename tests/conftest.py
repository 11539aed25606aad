"""Test-suite plumbing: run ``async def`` tests without a plugin.

An ``async def test_...`` runs on a fresh asyncio loop. Mark it ``@pytest.mark.virtual_time``
and it runs on :class:`agentcluster.testing.VirtualTimeLoop`, where every sleep and timeout
completes at once in virtual time (so a 30 s retry schedule takes milliseconds).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from agentcluster.testing import VirtualTimeLoop


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "virtual_time: run this async test in virtual time")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    factory = VirtualTimeLoop if pyfuncitem.get_closest_marker("virtual_time") else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(func(**kwargs))
    return True
