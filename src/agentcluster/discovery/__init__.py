"""Discovery: strategies that find candidate peers, run concurrently and merged.

Theory of operation: each strategy (static seeds, DNS A / SRV, UDP multicast, a watched file)
implements :class:`Strategy` and returns :class:`Candidate` addresses for one round;
:func:`discover_all` runs a round of several at once, each under a timeout, and merges their
answers into a sorted :class:`DiscoveryRound` where failures are reported, never raised. The
NodeDiscovery agent runs rounds periodically and hands new addresses to membership to join.
"""

from agentcluster.discovery.base import (
    DEFAULT_PORT,
    Candidate,
    Discovered,
    DiscoveryError,
    DiscoveryRound,
    Strategy,
    discover_all,
    format_addr,
    parse_addr,
)
from agentcluster.discovery.dns import DnsA, DnsSrv
from agentcluster.discovery.file import AddressFile
from agentcluster.discovery.multicast import Announce, Multicast, MulticastAnnouncer, MulticastStats
from agentcluster.discovery.static import StaticSeeds

__all__ = [
    "DEFAULT_PORT",
    "AddressFile",
    "Announce",
    "Candidate",
    "Discovered",
    "DiscoveryError",
    "DiscoveryRound",
    "DnsA",
    "DnsSrv",
    "Multicast",
    "MulticastAnnouncer",
    "MulticastStats",
    "StaticSeeds",
    "Strategy",
    "discover_all",
    "format_addr",
    "parse_addr",
]
