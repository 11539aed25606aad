"""How a node carries its coordination store: codecs, the Raft member, request routing.

Theory of operation: a node with ``store_voters`` configured gets a :class:`NodeStore`. If the
node is one of the voters it runs a :class:`~agentcluster.store.raft.RaftKV` member (its log
on disk under ``data_dir``, or in memory). Every node -- voter or not -- hands its users a
:class:`~agentcluster.store.raft.RaftStore` that routes requests to the leader.

Both ride the node's one transport, sealed with the cluster keyring like everything else, and
told apart from membership traffic by a one-byte channel prefix (membership frames start with
the wire version byte, 1):

* ``R`` + frame: a Raft message. Sent as a UDP packet when it fits (heartbeats, small
  appends: no connection set-up, and Raft tolerates loss, duplication and reordering), else
  over a stream (large appends, snapshots), fire-and-forget with a bounded number in flight.
* ``K`` + frame: a :class:`~agentcluster.store.raft.KvRequest` forwarded to the leader (or an
  ``events`` long-poll), answered with a :class:`~agentcluster.store.raft.KvReply` frame.

Raft ids are node names; a name is turned into an address through the membership view at
send time, so a voter that restarts on a new address is found again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentcluster.consensus.raft import DiskStorage, MemoryStorage, Message, Storage
from agentcluster.consensus.raft.presets import raft_preset
from agentcluster.consensus.raft.shell import ShellConfig
from agentcluster.store.base import StoreUnavailable
from agentcluster.store.raft import KvReply, KvRequest, NotSent, RaftKV, RaftStore
from agentcluster.transport.base import ConnectFailed, TransportError
from agentcluster.wire import WireCodec

if TYPE_CHECKING:
    from agentcluster.node import Node

__all__ = ["KV_PREFIX", "RAFT_PREFIX", "NodeStore"]

log = logging.getLogger(__name__)

RAFT_PREFIX = b"R"
KV_PREFIX = b"K"
_MAX_STREAMS_IN_FLIGHT = 64
_RAFT_STREAM_TIMEOUT = 2.0


class NodeStore:
    def __init__(self, node: Node, *, storage: Storage | None = None) -> None:
        cfg = node.config
        self.node = node
        self.voters = list(cfg.store_voters)
        wall = node.clock.wall
        self.raft_codec = WireCodec(Message, node.keyring, wall=wall, max_size=64 << 20)
        self.kv_codec = WireCodec(KvRequest | KvReply, node.keyring, wall=wall, max_size=16 << 20)
        self.member: RaftKV | None = None
        self._own_storage: DiskStorage | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self.unroutable = 0
        self.stream_drops = 0
        if node.name in self.voters:
            if storage is None:
                storage = self._open_storage()
            self.member = RaftKV(
                node.name,
                self.voters,
                storage=storage,
                clock=node.clock,
                rng=random.Random(node.rng.random()),
                send=self._send_raft,
                raft_config=raft_preset(cfg.preset),
                shell_config=ShellConfig(
                    snapshot_every=cfg.snapshot_every,
                    snapshot_keep=min(1_000, cfg.snapshot_every),
                ),
            )
        self.store = RaftStore(
            local=self.member, voters=self.voters, forward=self._forward, clock=node.clock
        )

    def _open_storage(self) -> Storage:
        cfg = self.node.config
        if not cfg.data_dir:
            return MemoryStorage()
        path = Path(cfg.data_dir) / "raft"
        os.makedirs(path, exist_ok=True)
        self._own_storage = DiskStorage.open(path, fsync=cfg.fsync)
        return self._own_storage

    async def start(self, tg: asyncio.TaskGroup) -> None:
        if self.member is not None:
            await self.member.start(tg)

    async def close(self) -> None:
        await self.store.close()
        if self.member is not None:
            await self.member.close()
        for task in list(self._streams):
            task.cancel()
        if self._streams:
            await asyncio.gather(*self._streams, return_exceptions=True)
        if self._own_storage is not None:
            self._own_storage.close()

    def stall(self, seconds: float) -> None:
        if self.member is not None:
            self.member.shell.stall(seconds)

    # ----------------------------------------------------------------- inbound

    def on_packet(self, data: bytes) -> None:
        msg = self.raft_codec.try_decode(data)
        if msg is not None and self.member is not None:
            self.member.on_message(msg)

    async def on_stream(self, prefix: bytes, data: bytes) -> bytes | None:
        if prefix == RAFT_PREFIX:
            self.on_packet(data)
            return b""
        req = self.kv_codec.try_decode(data)
        if not isinstance(req, KvRequest):
            return None
        if self.member is None:
            reply = KvReply(False, error="not_leader", message=f"{self.node.name} is no voter")
        else:
            reply = await self.member.serve(req)
        return self.kv_codec.encode(reply)

    # ----------------------------------------------------------------- outbound

    def addr_of(self, name: str) -> str | None:
        if name == self.node.name:
            return self.node.addr
        member = self.node.core.member(name) if self.node._core is not None else None
        return member.addr if member is not None else None

    def _send_raft(self, msg: Message) -> None:
        addr = self.addr_of(msg.dst)
        if addr is None:
            self.unroutable += 1  # not in the membership view yet; Raft retransmits
            return
        frame = RAFT_PREFIX + self.raft_codec.encode(msg)
        transport = self.node.transport
        if len(frame) <= getattr(transport, "max_packet", 1400):
            transport.send_packet(addr, frame)
            return
        if len(self._streams) >= _MAX_STREAMS_IN_FLIGHT:
            self.stream_drops += 1
            return
        task = asyncio.get_running_loop().create_task(self._stream(addr, frame))
        self._streams.add(task)
        task.add_done_callback(self._streams.discard)

    async def _stream(self, addr: str, frame: bytes) -> None:
        try:
            await self.node.transport.request(addr, frame, timeout=_RAFT_STREAM_TIMEOUT)
        except (TransportError, TimeoutError, OSError):
            self.stream_drops += 1

    async def _forward(self, name: str, req: KvRequest, timeout: float) -> KvReply:
        addr = self.addr_of(name)
        if addr is None:
            raise NotSent(f"no address known for store voter {name!r}")
        try:
            raw = await self.node.transport.request(
                addr, KV_PREFIX + self.kv_codec.encode(req), timeout=timeout
            )
        except ConnectFailed as exc:
            raise NotSent(f"{name}: {exc}") from exc
        except TransportError as exc:
            raise StoreUnavailable(f"{name}: {exc}") from exc
        reply = self.kv_codec.try_decode(raw)
        if not isinstance(reply, KvReply):
            raise StoreUnavailable(f"{name} sent no valid store reply")
        return reply

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "voters": self.voters,
            "unroutable": self.unroutable,
            "stream_drops": self.stream_drops,
            "wire_drops": self.raft_codec.drops.as_dict(),
        }
        m = self.member
        if m is not None:
            node = m.shell.node
            out.update(
                state=node.state,
                term=node.term,
                leader=node.leader_id,
                commit_index=node.commit_index,
                applied_index=node.applied_index,
                revision=m.kv.revision,
                keys=len(m.kv),
                dropped=node.dropped,
            )
        return out
