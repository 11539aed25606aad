"""How a node carries its coordination store: codecs, the Raft member, request routing.

Theory of operation: a node with ``store_voters`` configured gets a :class:`NodeStore`. If the
node is one of the voters it runs a :class:`~agentcluster.store.raft.RaftKV` member (its log
on disk under ``data_dir``, or in memory). Every node -- voter or not -- hands its users a
:class:`~agentcluster.store.raft.RaftStore` that routes requests to the leader.

Both ride the node's one transport, sealed with the cluster keyring like everything else, and
told apart from membership traffic by a one-byte channel prefix (membership frames start with
the wire version byte, 1):

* ``R`` + frame: a Raft message. Over TCP, each peer gets a *pipe*: one long-lived connection
  to its stream port on which frames are written back to back, each marked one-way (the
  server sends no reply); a broken pipe drops what was queued and reconnects
  on the next message -- Raft retransmits. The server closes a connection on the first frame
  that does not decode, so a host without the key cannot hold a stream slot open. On a transport without real connections (the
  simulated network) a message is a packet when it fits, else a one-off stream request.
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
from agentcluster.transport.base import ConnectFailed, TransportError, parse_addr
from agentcluster.transport.udp_tcp import ONE_WAY_FLAG, UdpTcpTransport
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
        self._pipes: dict[str, _Pipe] = {}
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
                    threaded_writes=isinstance(storage, DiskStorage),
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

    async def close(self, *, graceful: bool = False) -> None:
        """Stop; ``graceful`` (a node leaving) hands Raft leadership over first."""
        await self.store.close()
        if self.member is not None:
            await self.member.close(hand_over=graceful)
        pipe_tasks = [t for pipe in self._pipes.values() if (t := pipe.close()) is not None]
        if pipe_tasks:
            await asyncio.gather(*pipe_tasks, return_exceptions=True)
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

    def on_packet(self, data: bytes) -> bool:
        """Hand one Raft frame to the member; False if it does not decode (it is counted)."""
        msg = self.raft_codec.try_decode(data)
        if msg is None:
            return False
        if self.member is not None:
            self.member.on_message(msg)
        return True

    async def on_stream(self, prefix: bytes, data: bytes) -> bytes | None:
        """``b""`` keeps a Raft pipe open; ``None`` closes the connection without a reply --
        for any frame that does not decode, so a host without the cluster key cannot hold a
        stream slot by trickling garbage."""
        if prefix == RAFT_PREFIX:
            return b"" if self.on_packet(data) else None
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
        return self.node.core.addr_of(name) if self.node._core is not None else None

    def _send_raft(self, msg: Message) -> None:
        addr = self.addr_of(msg.dst)
        if addr is None:
            self.unroutable += 1  # not in the membership view yet; Raft retransmits
            return
        frame = RAFT_PREFIX + self.raft_codec.encode(msg)
        transport = self.node.transport
        if isinstance(transport, UdpTcpTransport) and len(frame) <= transport.max_stream:
            pipe = self._pipes.get(addr)
            if pipe is None:
                pipe = self._pipes[addr] = _Pipe(addr, self)
            pipe.send(frame)
            return
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
                snapshot_index=node.snapshot.index if node.snapshot is not None else 0,
                snapshots_installed=m.shell.snapshots_installed,
                batches=m.shell.batches,
            )
        return out


_PIPE_MAX_QUEUED = 4 << 20  # bytes buffered for a slow peer before frames are dropped


class _Pipe:
    """A persistent connection carrying Raft frames to one peer (see the module docstring)."""

    def __init__(self, addr: str, owner: NodeStore) -> None:
        self.addr = addr
        self.owner = owner
        self._writer: asyncio.StreamWriter | None = None
        self._queue: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def send(self, frame: bytes) -> None:
        if self._closed:
            return
        writer = self._writer
        if writer is not None and not writer.is_closing():
            transport = writer.transport
            if transport.get_write_buffer_size() > _PIPE_MAX_QUEUED:
                self.owner.stream_drops += 1  # the peer is not reading: Raft will resend
                return
            writer.write((len(frame) | ONE_WAY_FLAG).to_bytes(4, "big") + frame)
            return
        self._queue.append(frame)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        host, port = parse_addr(self.addr)
        try:
            async with asyncio.timeout(_RAFT_STREAM_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            self.owner.stream_drops += len(self._queue)
            self._queue.clear()
            return
        queued, self._queue = self._queue, []
        for frame in queued:
            writer.write((len(frame) | ONE_WAY_FLAG).to_bytes(4, "big") + frame)
        self._writer = writer
        try:
            # Nothing comes back on a pipe: reading only notices the server closing it.
            while not self._closed and await reader.read(4096):
                pass
        except OSError:
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()

    def close(self) -> asyncio.Task[None] | None:
        """Close the connection; returns the connection task (cancelled) for the caller to
        await."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
        return self._task
