"""A client's batch of writes on the leader: one Raft entry for the lot, one wake-up for the
task serving it.

Theory of operation: a remote client sends its concurrent writes as one ``kv`` call (see
:mod:`agentcluster.store.remote`). The leader validates each command and proposes the valid
ones as a single log entry holding a :class:`BatchCmd` -- the commands in order -- instead of
one entry each: the Raft work that is per entry (log bookkeeping, the disk record, the append
to each follower, decoding there, the commit and apply loops) is then paid once per batch, and
the command list is encoded and decoded in one call on every node. Applying a ``BatchCmd``
applies its commands one after the other exactly as consecutive entries would be -- each gets
its own revision and watch events, a failing command changes nothing and fails alone -- so the
replicated state is the same as with one entry per command, and the batch commits or is
dropped as a whole (its commands were concurrent, so any order among them is linearizable).

The outcomes travel back through :class:`Group` (the shell :class:`Waiter` of the batch
entry), which hands the i-th result to the i-th :class:`Slot` of a :class:`BatchWait`; the
last slot settled -- or the deadline -- resolves the one future the serving task awaits.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec

from agentcluster.clock import call_at
from agentcluster.store._kv import Command, InvalidCommand, Result

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_COMMANDS",
    "BatchCmd",
    "BatchWait",
    "Failed",
    "Group",
    "Slot",
    "decode_entry",
    "encode_batch",
]

# A batch entry stays well under a stream frame (4 MiB) and a follower's decode bound; larger
# writes go as entries of their own.
MAX_BATCH_BYTES = 1 << 20
MAX_BATCH_COMMANDS = 4_096  # as many as a client's kv call may carry


class BatchCmd(msgspec.Struct, frozen=True, array_like=True, tag="b"):
    """Several commands in one log entry, applied in order (see the module docstring)."""

    cmds: Annotated[list[Command], msgspec.Meta(min_length=1, max_length=MAX_BATCH_COMMANDS)]


_encoder = msgspec.msgpack.Encoder()
_entry_decoder: msgspec.msgpack.Decoder[Command | BatchCmd] = msgspec.msgpack.Decoder(
    Command | BatchCmd
)


def encode_batch(cmds: list[Command]) -> tuple[BatchCmd, bytes]:
    """The batch of ``cmds`` and its log-entry bytes."""
    batch = BatchCmd(cmds)
    return batch, _encoder.encode(batch)


def decode_entry(data: bytes) -> Command | BatchCmd:
    """A store log entry's command or batch; raises :class:`InvalidCommand` on any malformed
    input (sizes are bounded as for a single command)."""
    try:
        return _entry_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidCommand(f"undecodable log entry: {exc}") from exc


class Failed:
    """A proposal's exception, as a :class:`BatchWait` outcome."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class BatchWait:
    """The outcomes of a client's batch of writes, gathered into one wake-up of the task
    serving it: each write reports to a :class:`Slot`, and the last one -- or the deadline --
    resolves the single future this task awaits. (A future per proposal plus
    ``asyncio.wait`` cost a loop callback per write on the leader.)"""

    __slots__ = ("_fut", "_slots", "left", "loop", "outcomes")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.left = 0
        self.outcomes: dict[int, Result | Failed] = {}
        self._fut: asyncio.Future[None] | None = None
        self._slots: list[Slot] = []

    @property
    def started_any(self) -> bool:
        return bool(self._slots)

    def started(self, slot: Slot) -> None:
        self._slots.append(slot)
        self.left += 1

    def settled(self, slot: Slot, outcome: Result | Failed) -> None:
        self.outcomes[slot.k] = outcome
        self.left -= 1
        fut = self._fut
        if self.left <= 0 and fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, deadline: float) -> None:
        """Until every started write is settled or ``deadline`` (loop time) passed."""
        if self.left <= 0:
            return
        fut = self._fut = self.loop.create_future()
        timer = call_at(self.loop, deadline, _resolve, fut)
        try:
            await fut
        except asyncio.CancelledError:
            self._abandon()
            raise
        finally:
            timer.cancel()
        if self.left > 0:
            self._abandon()

    def _abandon(self) -> None:
        # The shell skips a done waiter; an entry already appended may still commit.
        for slot in self._slots:
            slot.closed = True

    def late(self) -> list[Slot]:
        """The slots that never settled (outcome unknown)."""
        return [slot for slot in self._slots if slot.k not in self.outcomes]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Slot:
    """One write of a :class:`BatchWait`; also the shell :class:`Waiter` of a write proposed
    as an entry of its own."""

    __slots__ = ("batch", "closed", "k")

    def __init__(self, batch: BatchWait, k: int) -> None:
        self.batch = batch
        self.k = k
        self.closed = False

    def done(self) -> bool:
        return self.closed

    def set_result(self, result: Result, /) -> None:
        if not self.closed:
            self.closed = True
            self.batch.settled(self, result)

    def set_exception(self, exception: BaseException, /) -> None:
        if not self.closed:
            self.closed = True
            self.batch.settled(self, Failed(exception))


class Group:
    """The shell :class:`Waiter` of a :class:`BatchCmd` entry: its result is the list of the
    commands' outcomes (a result, or the exception one raised), handed to ``slots`` in order;
    an exception (not leader, dropped, unknown) goes to every slot."""

    __slots__ = ("slots",)

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots

    def done(self) -> bool:
        return all(slot.closed for slot in self.slots)

    def set_result(self, results: Any, /) -> None:
        if not isinstance(results, list) or len(results) != len(self.slots):
            self.set_exception(InvalidCommand("a batch entry applied to an unexpected result"))
            return
        for slot, result in zip(self.slots, results, strict=True):
            if isinstance(result, BaseException):
                slot.set_exception(result)
            else:
                slot.set_result(result)

    def set_exception(self, exception: BaseException, /) -> None:
        for slot in self.slots:
            slot.set_exception(exception)
