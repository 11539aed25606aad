"""Static seeds: a fixed list of addresses, with host names resolved every round.

Theory of operation: the seeds (``"10.0.0.5"``, ``"seed-1.internal:7946"``, ``"[fd00::1]:7000"``)
are validated once, when the strategy is built, so a typo fails at start-up rather than
silently finding nobody. IP literals become candidates as they are. Host names are resolved
again in every round through the loop's ``getaddrinfo`` (the system resolver, /etc/hosts
included), so a seed whose IP changes — a rescheduled container, a replaced VM — is found at
its new address on the next round. Names resolve concurrently; a name that fails to resolve is
reported as a partial error while the other seeds still count. If no seed yields anything and
some failed, the round fails as a whole.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from types import MappingProxyType

from agentcluster.discovery.base import (
    DEFAULT_PORT,
    Candidate,
    DiscoveryError,
    Strategy,
    format_addr,
    is_ip,
    parse_addr,
)

__all__ = ["Resolve", "StaticSeeds", "resolve_seeds", "system_resolve"]

#: ``(host, port) -> IP addresses`` of that host; raises OSError when it cannot resolve.
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """Every IP address of ``host`` from the system resolver, in the resolver's order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = str(sockaddr[0])
        if ip not in out:
            out.append(ip)
    return out


async def resolve_seeds(
    seeds: Sequence[tuple[str, str, int]], source: str, resolve: Resolve
) -> tuple[list[Candidate], list[str]]:
    """Resolve ``(text, host, port)`` seeds concurrently; returns (candidates, error messages).

    Shared with the address file, whose lines are seeds too.
    """

    async def one(text: str, host: str, port: int) -> tuple[list[Candidate], str | None]:
        if is_ip(host):
            meta = MappingProxyType({"seed": text})
            return [Candidate(format_addr(host, port), source, meta)], None
        try:
            ips = await resolve(host, port)
        except OSError as exc:
            return [], f"{host}: {exc.strerror or exc}"
        if not ips:
            return [], f"{host}: no address"
        meta = MappingProxyType({"seed": text, "host": host})
        return [Candidate(format_addr(ip, port), source, meta) for ip in ips], None

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(text, host, port)) for text, host, port in seeds]
    found: list[Candidate] = []
    errors: list[str] = []
    for task in tasks:
        cands, err = task.result()
        found.extend(cands)
        if err is not None:
            errors.append(err)
    return found, errors


class StaticSeeds(Strategy):
    """A fixed list of seed addresses (``"host"``, ``"host:port"``, ``"[v6]:port"``)."""

    def __init__(
        self,
        addrs: Sequence[str],
        default_port: int = DEFAULT_PORT,
        *,
        label: str = "static",
        resolve: Resolve | None = None,
    ) -> None:
        if isinstance(addrs, str):
            raise TypeError("addrs must be a sequence of addresses, not one string")
        if not 1 <= default_port <= 65535:
            raise ValueError(f"default_port out of range: {default_port}")
        seeds: list[tuple[str, str, int]] = []
        for text in addrs:
            host, port = parse_addr(text, default_port)
            seeds.append((text.strip(), host, port))
        self.name = label
        self.seeds = tuple(seeds)
        self._resolve = resolve or system_resolve

    async def discover(self) -> list[Candidate]:
        found, errors = await resolve_seeds(self.seeds, self.name, self._resolve)
        if errors:
            message = "; ".join(errors)
            if not found:
                raise DiscoveryError(message)
            self.last_error = message
        return found
