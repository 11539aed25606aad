"""The coordination store from outside the cluster: over a node's authenticated control API.

Theory of operation: :class:`RemoteStore` sends each :class:`~agentcluster.store.raft.KvRequest`
to an *entry node* as a ``kv`` control request (sealed with the cluster keyring); the entry node
runs it through its own :class:`~agentcluster.store.raft.RaftStore`, which routes it to the
Raft leader, and returns the :class:`~agentcluster.store.raft.KvReply`. Several entry nodes may
be given: when one cannot be reached, the next is tried -- for a write only if the request
certainly never left (connection refused), since otherwise its outcome is unknown. Watches are
``events`` long-polls that resume from the last revision seen + 1, so a reconnect (or another
entry node) misses nothing. ``agentcluster kv`` and the consensus bench use this client.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.control import ControlClient, ControlError
from agentcluster.store.base import StoreUnavailable
from agentcluster.store.raft import KvClient, KvReply, KvRequest
from agentcluster.wire import Keyring

__all__ = ["RemoteStore"]

_req_enc = msgspec.msgpack.Encoder()
_reply_dec = msgspec.msgpack.Decoder(KvReply)


class RemoteStore(KvClient):
    def __init__(
        self,
        nodes: Sequence[str],
        *,
        keyring: Keyring | None,
        timeout: float = 5.0,
        poll: float = 5.0,
        clock: Clock | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("RemoteStore needs at least one node address")
        self.nodes = list(nodes)
        self.keyring = keyring
        self.timeout = timeout
        self.poll = poll
        self._clock = clock or MonotonicClock()
        self._closed = False
        self._current = 0
        # One persistent connection per entry node: a TLS-free TCP handshake per request
        # would cost more than the write itself on a LAN.
        self._clients = {a: ControlClient(a, keyring=keyring, timeout=timeout) for a in nodes}

    async def _ask(self, req: KvRequest, timeout: float) -> KvReply:
        write = req.op == "cmd"
        last: Exception | None = None
        for k in range(len(self.nodes)):
            addr = self.nodes[(self._current + k) % len(self.nodes)]
            try:
                raw = await self._clients[addr].call(
                    "kv", {"req": _req_enc.encode(req), "timeout": timeout}, timeout=timeout + 1.0
                )
            except ControlError as exc:
                last = exc
                if write and not exc.not_sent:
                    raise StoreUnavailable(
                        f"{addr}: {exc}; the write's outcome is unknown"
                    ) from exc
                continue
            self._current = (self._current + k) % len(self.nodes)
            if not isinstance(raw, bytes):
                raise StoreUnavailable(f"{addr} sent a malformed store reply")
            try:
                return _reply_dec.decode(raw)
            except msgspec.DecodeError as exc:
                raise StoreUnavailable(f"{addr} sent a malformed store reply: {exc}") from exc
        raise StoreUnavailable(f"no entry node answered: {last}")

    async def request(self, req: KvRequest, *, timeout: float | None = None) -> KvReply:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        return await self._ask(req, self.timeout if timeout is None else timeout)

    async def _call_events(self, req: KvRequest) -> KvReply:
        reply = await self._ask(req, self.poll + self.timeout)
        return self._check_events(req, reply)

    async def close(self) -> None:
        self._closed = True
        for client in self._clients.values():
            await client.close()

    def __repr__(self) -> str:
        return f"RemoteStore(nodes={self.nodes!r})"
