"""DNS discovery: A/AAAA records of one name, or SRV records of a service.

Theory of operation: in many deployments the list of peers is already published in DNS — a
headless Kubernetes service, a Consul DNS interface, a Route 53 record set. Two strategies read
it with dnspython's asyncio resolver:

* :class:`DnsA` resolves a name's A and AAAA records (concurrently) and pairs every address
  with a fixed port;
* :class:`DnsSrv` resolves a service's SRV records (each gives a target host *and* a port, so
  nodes may listen on different ports), then the A/AAAA records of every target.

No answer is cached here (the resolver is used without a cache unless the caller gives it one):
every round asks again, so a scaled-up service is seen on the next round. Outcomes:

* the name does not exist (NXDOMAIN): no candidates, reported as a partial error (probably a
  misconfiguration, but not a reason to stop the other strategies);
* the name exists without records of a type (NoAnswer): nothing of that type, silently — a
  service without IPv6 is normal;
* a lookup fails (timeout, no reachable server): reported; if nothing at all was found the
  round fails, otherwise the addresses found still count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from agentcluster.discovery.base import Candidate, DiscoveryError, Strategy, format_addr

__all__ = ["DnsA", "DnsSrv"]

_ADDRESS_TYPES = ("A", "AAAA")


@dataclass
class _Lookup:
    """What one name's address lookups produced."""

    ips: list[str] = field(default_factory=list)
    nxdomain: bool = False
    errors: list[str] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no DNS server answered"
    return f"{type(exc).__name__}: {exc}"


class _DnsStrategy(Strategy):
    def __init__(self, resolver: dns.asyncresolver.Resolver | None) -> None:
        self._resolver = resolver

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        # Built on first use: reading /etc/resolv.conf at construction would make a node fail
        # to start on a host whose DNS is not configured yet.
        if self._resolver is None:
            self._resolver = dns.asyncresolver.Resolver()
        return self._resolver

    async def _query(self, qname: str, rdtype: str) -> dns.resolver.Answer:
        return await self.resolver.resolve(qname, rdtype, raise_on_no_answer=False)

    async def _addresses(self, qname: str, rdtypes: Sequence[str]) -> _Lookup:
        """A and AAAA of ``qname`` concurrently; never raises (except cancellation)."""

        async def one(rdtype: str) -> tuple[list[str], bool, str | None]:
            try:
                answer = await self._query(qname, rdtype)
            except dns.resolver.NXDOMAIN:
                return [], True, None
            except dns.exception.DNSException as exc:
                return [], False, f"{qname} {rdtype}: {_describe(exc)}"
            return [rd.address for rd in answer], False, None

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(t)) for t in rdtypes]
        out = _Lookup()
        for task in tasks:
            ips, nx, err = task.result()
            out.ips.extend(ip for ip in ips if ip not in out.ips)
            out.nxdomain |= nx
            if err is not None:
                out.errors.append(err)
        return out

    def _finish(self, found: list[Candidate], problems: list[str]) -> list[Candidate]:
        if problems:
            message = "; ".join(problems)
            if not found and not all(p.startswith("NXDOMAIN") for p in problems):
                raise DiscoveryError(message)
            self.last_error = message
        return found


class DnsA(_DnsStrategy):
    """Every A/AAAA address of ``name``, each on ``port``."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        resolver: dns.asyncresolver.Resolver | None = None,
        rdtypes: Sequence[str] = _ADDRESS_TYPES,
        label: str | None = None,
    ) -> None:
        super().__init__(resolver)
        if not 1 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        bad = [t for t in rdtypes if t not in _ADDRESS_TYPES]
        if bad or not rdtypes:
            raise ValueError(f"rdtypes must be a non-empty subset of {_ADDRESS_TYPES}: {rdtypes}")
        self.qname = name
        self.port = port
        self.rdtypes = tuple(rdtypes)
        self.name = label or f"dns-a:{name}"

    async def discover(self) -> list[Candidate]:
        lookup = await self._addresses(self.qname, self.rdtypes)
        meta = MappingProxyType({"dns": self.qname})
        found = [Candidate(format_addr(ip, self.port), self.name, meta) for ip in lookup.ips]
        problems = list(lookup.errors)
        if lookup.nxdomain and not found:
            problems.insert(0, f"NXDOMAIN: {self.qname} does not exist")
        return self._finish(found, problems)


class DnsSrv(_DnsStrategy):
    """The targets and ports of the SRV records of ``name`` (e.g. ``_agentcluster._udp.example``)."""

    def __init__(
        self,
        name: str,
        *,
        resolver: dns.asyncresolver.Resolver | None = None,
        rdtypes: Sequence[str] = _ADDRESS_TYPES,
        label: str | None = None,
    ) -> None:
        super().__init__(resolver)
        bad = [t for t in rdtypes if t not in _ADDRESS_TYPES]
        if bad or not rdtypes:
            raise ValueError(f"rdtypes must be a non-empty subset of {_ADDRESS_TYPES}: {rdtypes}")
        self.qname = name
        self.rdtypes = tuple(rdtypes)
        self.name = label or f"dns-srv:{name}"

    async def discover(self) -> list[Candidate]:
        try:
            answer = await self._query(self.qname, "SRV")
        except dns.resolver.NXDOMAIN:
            return self._finish([], [f"NXDOMAIN: {self.qname} does not exist"])
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"{self.qname} SRV: {_describe(exc)}") from None
        records = sorted(
            (rd.priority, -rd.weight, rd.target.to_text(), rd.port, rd.weight) for rd in answer
        )
        # "." as target means "no service here" (RFC 2782); each distinct target is asked once.
        targets: dict[str, None] = {r[2]: None for r in records if r[2] != "."}
        async with asyncio.TaskGroup() as tg:
            lookups = {t: tg.create_task(self._addresses(t, self.rdtypes)) for t in targets}
        found: list[Candidate] = []
        problems: list[str] = []
        for target, task in lookups.items():
            lookup = task.result()
            problems.extend(lookup.errors)
            if lookup.nxdomain and not lookup.ips:
                problems.append(f"SRV target {target} does not exist")
        for priority, _neg_weight, target, port, weight in records:
            if target == ".":
                continue
            meta = MappingProxyType(
                {"target": target, "priority": str(priority), "weight": str(weight)}
            )
            for ip in lookups[target].result().ips:
                found.append(Candidate(format_addr(ip, port), self.name, meta))
        return self._finish(found, problems)
