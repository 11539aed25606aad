"""Transports: how bytes move between nodes.

Theory of operation: :class:`Transport` is the contract the layers above use -- best-effort
packets and reliable one-request-one-reply streams, handlers that can never crash the
transport, and counters. :class:`UdpTcpTransport` implements it on real sockets (UDP and TCP
on one port); :class:`SimNetwork` hands out :class:`MemoryTransport` objects joined by a
simulated, seeded network with delay, loss, duplication, reordering, partitions, crashes and
stalls, timed by the event loop so that it runs in virtual time.
"""

from agentcluster.transport.base import (
    ConnectFailed,
    PacketHandler,
    StreamHandler,
    Transport,
    TransportError,
    TransportStats,
    format_addr,
    parse_addr,
)
from agentcluster.transport.memory import LinkConfig, MemoryTransport, SimNetwork, SimNetworkStats
from agentcluster.transport.udp_tcp import UdpTcpTransport

__all__ = [
    "ConnectFailed",
    "LinkConfig",
    "MemoryTransport",
    "PacketHandler",
    "SimNetwork",
    "SimNetworkStats",
    "StreamHandler",
    "Transport",
    "TransportError",
    "TransportStats",
    "UdpTcpTransport",
    "format_addr",
    "parse_addr",
]
