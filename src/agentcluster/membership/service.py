"""The asyncio shell around the SWIM core: receive -> step -> send -> deliver events.

Theory of operation: :class:`MembershipService` owns one :class:`Swim` core and nothing else
of the protocol. Every input (a decoded packet, a stream message, a stream result, the timer)
is fed to the core with ``clock.now()``, then :meth:`_flush` drains ``core.ready()``: packets
are sealed and sent, stream requests become tasks owned by the service's task group (their
results go back into the core), events go to the node's callback, and the single timer is
re-armed at ``core.next_deadline()``.

Stalls: :meth:`stall` makes the service behave like a process whose event loop is blocked —
inputs queue up and the timer does not run until the stall ends, then everything queued is
processed in arrival order. Simulations use it to model slow (but alive) nodes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from agentcluster.clock import Clock, TimerHandle
from agentcluster.membership.messages import MemberEvent, NodeMeta, StreamMessage
from agentcluster.membership.swim import Swim
from agentcluster.transport.base import Transport, TransportError
from agentcluster.wire import WireCodec

__all__ = ["MembershipService"]

log = logging.getLogger(__name__)

EventSink = Callable[[list[MemberEvent]], None]


class MembershipService:
    def __init__(
        self,
        core: Swim,
        transport: Transport,
        packets: WireCodec,
        streams: WireCodec,
        clock: Clock,
        on_events: EventSink,
    ) -> None:
        self.core = core
        self.transport = transport
        self.packets = packets
        self.streams = streams
        self.clock = clock
        self.on_events = on_events
        self._timer: TimerHandle | None = None
        self._timer_at = float("inf")
        self._tg: asyncio.TaskGroup | None = None
        self._stalled_until = 0.0
        self._backlog: deque[Callable[[], None]] = deque()
        self._stall_timer: TimerHandle | None = None
        self._closed = False
        self._streams: set[asyncio.Task[None]] = set()
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_received = 0
        self.bytes_received = 0
        self.stream_failures = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self, tg: asyncio.TaskGroup) -> None:
        """Begin ticking; ``tg`` owns the stream tasks (the node's task group)."""
        self._tg = tg
        self._flush()

    def close(self) -> None:
        self._closed = True
        for timer in (self._timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._timer = None
        self._backlog.clear()
        for task in list(self._streams):  # in-flight stream requests end with the service
            task.cancel()

    # ------------------------------------------------------------------ stalls
    @property
    def stalled(self) -> bool:
        return self.clock.now() < self._stalled_until

    def stall(self, seconds: float) -> None:
        """Process nothing for ``seconds`` (queued inputs run when the stall ends)."""
        until = self.clock.now() + seconds
        if until <= self._stalled_until:
            return
        self._stalled_until = until
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._stall_timer = self.clock.call_later(seconds, self._unstall)

    def _unstall(self) -> None:
        self._stall_timer = None
        if self.stalled or self._closed:
            return
        while self._backlog and not self.stalled:
            self._backlog.popleft()()
        self._on_timer()

    def _run(self, work: Callable[[], None]) -> None:
        if self._closed:
            return
        if self.stalled:
            self._backlog.append(work)
        else:
            work()

    # ------------------------------------------------------------------ inputs
    def on_packet(self, src: str, data: bytes) -> None:
        """Transport callback for a UDP packet (decoding failures are counted by the codec)."""
        self.packets_received += 1
        self.bytes_received += len(data)
        msg = self.packets.try_decode(data)
        if msg is None:
            return
        self._run(self._step(lambda now: self.core.handle_packet(src, msg, now)))

    async def on_stream_message(self, src: str, msg: StreamMessage) -> StreamMessage | None:
        """A decoded SWIM stream request (push-pull, stream ping); returns the reply."""
        while self.stalled and not self._closed:
            # A blocked process answers once it runs again (the peer may have timed out).
            await self.clock.sleep(self._stalled_until - self.clock.now())
        if self._closed:
            return None
        reply = self.core.handle_stream(src, msg, self.clock.now())
        self._flush()
        return reply

    def _step(self, step: Callable[[float], None]) -> Callable[[], None]:
        """Work that feeds the core at the current time, then flushes its outputs."""

        def work() -> None:
            step(self.clock.now())
            self._flush()

        return work

    def join(self, seeds: list[str]) -> None:
        self._run(self._step(lambda now: self.core.join(seeds, now)))

    def leave(self) -> None:
        self._run(self._step(self.core.leave))

    def update_meta(self, meta: NodeMeta) -> None:
        self._run(self._step(lambda now: self.core.update_meta(meta, now)))

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._closed:
            return
        if self.stalled:
            return  # _unstall ticks when the stall ends
        self.core.tick(self.clock.now())
        self._flush()

    # ------------------------------------------------------------------ outputs
    def _flush(self) -> None:
        ready = self.core.ready()
        for addr, msg in ready.packets:
            try:
                data = self.packets.encode(msg)
            except Exception:
                log.exception("cannot encode %s for %s", type(msg).__name__, addr)
                continue
            self.packets_sent += 1
            self.bytes_sent += len(data)
            self.transport.send_packet(addr, data)
        if ready.streams:
            if self._tg is None:
                for req in ready.streams:
                    self.core.stream_result(req.request_id, None, self.clock.now())
            else:
                for req in ready.streams:
                    task = self._tg.create_task(
                        self._stream(req.request_id, req.addr, req.message, req.timeout)
                    )
                    self._streams.add(task)
                    task.add_done_callback(self._streams.discard)
        if ready.events:
            try:
                self.on_events(ready.events)
            except Exception:
                log.exception("membership event handler failed")
        self._arm()

    def _arm(self) -> None:
        deadline = self.core.next_deadline()
        if deadline >= self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.clock.call_later(max(0.0, deadline - self.clock.now()), self._on_timer)

    async def _stream(self, request_id: int, addr: str, msg: StreamMessage, timeout: float) -> None:
        reply: StreamMessage | None = None
        try:
            data = self.streams.encode(msg)
            raw = await self.transport.request(addr, data, timeout=timeout)
            decoded = self.streams.try_decode(raw)
            if decoded is not None:
                reply = decoded
        except (TimeoutError, TransportError, OSError):
            self.stream_failures += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stream_failures += 1
            log.exception("stream request to %s failed", addr)
        if self._closed:
            return
        self._run(self._step(lambda now: self.core.stream_result(request_id, reply, now)))
