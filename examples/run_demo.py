"""Run the bundled ping-pong demo from your own code, for a fixed time, and print a summary.

    python examples/run_demo.py 3

``agentcluster up`` runs the same agents with a live view; this script shows the few lines of
API it takes: a Runtime, spawning agents, reading the bus, and a clean shutdown.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

from agentcluster import Runtime
from agentcluster.examples.pingpong import start_demo


async def main(seconds: float) -> None:
    counts: Counter[str] = Counter()
    async with Runtime("demo") as rt:
        sub = rt.bus.subscribe("app.demo.**")
        await start_demo(rt, interval=0.2)
        try:
            async with asyncio.timeout(seconds):
                async for signal in sub:
                    counts[signal.type] += 1
        except TimeoutError:
            pass
        restarts = rt.supervisor.count_restarts()
    for signal_type, n in sorted(counts.items()):
        print(f"{signal_type:20} {n}")
    print(f"supervisor restarts: {restarts}")


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0))
