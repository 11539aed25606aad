"""The discovery interface: strategies that each find candidate peer addresses.

Theory of operation: a :class:`Strategy` answers one question per round — "which addresses
might be cluster members right now?" — as a list of :class:`Candidate`. A round is stateless
with respect to failures: every round revisits every configured seed, name, file or group, so
a seed that was down (or a DNS name that did not resolve) a minute ago is tried again now.

:func:`discover_all` runs one round of several strategies concurrently, each under its own
timeout. A strategy that raises or times out contributes nothing and its message is reported in
:attr:`DiscoveryRound.errors`; one that succeeds only partly (a missing file, one seed name of
three that does not resolve) returns what it found and sets :attr:`Strategy.last_error`, which
is reported the same way. The results are merged by address (an address found by DNS and by
multicast is one :class:`Discovered` listing both sources) and sorted, so the round's outcome
does not depend on which strategy answered first.

Addresses are ``"host:port"`` strings, IPv6 hosts in brackets (``"[::1]:7946"``);
:func:`parse_addr` and :func:`format_addr` convert, and validate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "DEFAULT_PORT",
    "Candidate",
    "Discovered",
    "DiscoveryError",
    "DiscoveryRound",
    "Strategy",
    "discover_all",
    "format_addr",
    "is_ip",
    "parse_addr",
]

DEFAULT_PORT = 7946

_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


class DiscoveryError(Exception):
    """A strategy could not produce any candidate this round (reported, never fatal)."""


def _empty_meta() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, order=True)
class Candidate:
    """One address a strategy found. ``meta`` (e.g. the DNS target, the announced name) is
    informative only: it takes no part in equality, ordering or hashing."""

    addr: str
    source: str
    meta: Mapping[str, str] = field(
        default_factory=_empty_meta, compare=False, hash=False, repr=False
    )


@dataclass(frozen=True)
class Discovered:
    """One address after merging: every strategy that found it, and their metadata."""

    addr: str
    sources: tuple[str, ...]
    meta: Mapping[str, str] = field(default_factory=_empty_meta, repr=False)


@dataclass(frozen=True)
class DiscoveryRound:
    """The outcome of :func:`discover_all`."""

    found: tuple[Discovered, ...]
    # strategy name -> why it failed, timed out, or only partly succeeded
    errors: Mapping[str, str]
    # strategy name -> how many candidates it returned (0 for a failed one)
    counts: Mapping[str, int]

    @property
    def addrs(self) -> list[str]:
        return [d.addr for d in self.found]


class Strategy(ABC):
    """One way of finding peers. Subclasses set :attr:`name` (unique within a round)."""

    name: str = "strategy"
    #: A problem of the last round that did not stop it from returning candidates (set by the
    #: strategy during :meth:`discover`; :func:`discover_all` clears it before each round).
    last_error: str | None = None

    @abstractmethod
    async def discover(self) -> list[Candidate]:
        """One round; revisits every configured source (no caching of failures)."""

    async def close(self) -> None:
        """Release sockets and background tasks; the default holds none."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


async def _run_one(
    strategy: Strategy, timeout: float
) -> tuple[list[Candidate], str | None, str | None]:
    """(candidates, failure, partial problem); never raises except on cancellation."""
    strategy.last_error = None
    try:
        async with asyncio.timeout(timeout):
            found = await strategy.discover()
    except TimeoutError:
        return [], f"timed out after {timeout:g} s", None
    except Exception as exc:
        # Any failure of one strategy is data for the round, never a crash of discovery.
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return [], message, None
    return list(found), None, strategy.last_error


async def discover_all(strategies: Sequence[Strategy], *, timeout: float) -> DiscoveryRound:
    """Run one round of every strategy concurrently and merge the results."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"strategy names must be unique within a round: {names}")
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(_run_one(s, timeout)) for s in strategies]
    errors: dict[str, str] = {}
    counts: dict[str, int] = {}
    by_addr: dict[str, tuple[list[str], dict[str, str]]] = {}
    # Sorted by strategy name so the merged metadata does not depend on the argument order.
    for name, task in sorted(zip(names, tasks, strict=True), key=lambda p: p[0]):
        found, failure, partial = task.result()
        if failure is not None or partial is not None:
            errors[name] = failure if failure is not None else str(partial)
        counts[name] = len(found)
        for cand in sorted(found):
            sources, meta = by_addr.setdefault(cand.addr, ([], {}))
            if cand.source not in sources:
                sources.append(cand.source)
            for key, value in cand.meta.items():
                meta.setdefault(key, value)
    merged = tuple(
        Discovered(addr, tuple(sorted(srcs)), MappingProxyType(meta))
        for addr, (srcs, meta) in sorted(by_addr.items())
    )
    return DiscoveryRound(
        found=merged,
        errors=MappingProxyType(dict(sorted(errors.items()))),
        counts=MappingProxyType(dict(sorted(counts.items()))),
    )


# -- addresses ---------------------------------------------------------------------------------


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_hostname(host: str) -> None:
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_LABEL.match(p) for p in name.split(".")):
        raise ValueError(f"invalid host name {host!r}")


def _check_port(text: str, whole: str) -> int:
    if not text.isdigit():
        raise ValueError(f"invalid port in {whole!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {whole!r}")
    return port


def parse_addr(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``"host"``, ``"host:port"``, ``"[v6]:port"``, ``"[v6]"`` or a bare IPv6 literal.

    Returns ``(host, port)`` with IPv6 hosts unbracketed; raises ValueError on anything else.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = s[1:end], s[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {text!r}") from None
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
        return host, _check_port(rest[1:], text)
    if s.count(":") > 1:
        # Unbracketed IPv6 literal: no room for a port.
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            raise ValueError(f"invalid address {text!r} (bracket IPv6: '[v6]:port')") from None
        return s, default_port
    host, sep, port_text = s.partition(":")
    port = _check_port(port_text, text) if sep else default_port
    if not is_ip(host):
        if host.replace(".", "").isdigit():
            raise ValueError(f"invalid IPv4 address in {text!r}")
        _check_hostname(host)
    return host, port


def format_addr(host: str, port: int) -> str:
    """``"host:port"``, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
