"""Webhook delivery: the one piece of I/O of the alerting path (re-exported by ``alerts``).

Theory of operation: :class:`WebhookSender` POSTs JSON bodies over HTTP/1.1 with the standard
library only (asyncio streams, ``ssl`` for https): it writes the request with a
``Content-Length`` and ``Connection: close``, reads the status line, and calls a 2xx a
delivery. Each attempt has its own timeout (connect, write and status line together). Timeouts,
connection errors, malformed responses, 5xx, 408, 425 and 429 are retried with jittered
exponential backoff (:func:`backoff_delay`, from a seeded rng, through an injectable ``sleep``
so tests need not wait); an unusable URL or another 4xx is not, since retrying cannot fix it.
Posts go through a bounded queue drained by worker tasks the sender owns (``start`` /
``close``); a full queue drops and counts instead of growing. Nothing raises into the caller:
every failure is logged and counted in :class:`WebhookStats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

__all__ = ["WebhookSender", "WebhookStats", "backoff_delay"]

log = logging.getLogger(__name__)


def backoff_delay(
    attempt: int, base: float, cap: float, jitter: float, rng: random.Random
) -> float:
    """Delay before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)`` capped at
    ``cap``, scaled by a factor drawn uniformly from ``[1 - jitter, 1 + jitter]`` and capped
    again, so many senders retrying after one outage spread out."""
    nominal = min(cap, base * (2.0 ** (attempt - 1)))
    return min(cap, nominal * (1.0 - jitter + 2.0 * jitter * rng.random()))


class WebhookStats(msgspec.Struct):
    """Counters of a :class:`WebhookSender` (mutable: read a copy with ``msgspec.structs``)."""

    queued: int = 0
    dropped: int = 0  # the queue was full (or the sender closed with items left)
    delivered: int = 0
    failed: int = 0  # gave up on a delivery
    attempts: int = 0
    retries: int = 0
    timeouts: int = 0
    errors: int = 0  # connection / protocol errors
    http_errors: int = 0  # non-2xx responses
    invalid: int = 0  # unusable URLs
    last_status: int = 0
    last_error: str = ""
    last_latency: float = 0.0  # seconds from the first attempt to the 2xx, retries included


class _Permanent(Exception):
    """An outcome that retrying cannot fix (bad URL, 4xx)."""


class _Retryable(Exception):
    pass


_RETRY_STATUS = frozenset({408, 425, 429})


class WebhookSender:
    """POSTs JSON bodies to http(s) URLs with retries; owns its worker tasks."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        jitter: float = 0.5,
        queue_size: int = 256,
        workers: int = 1,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_attempts < 1 or workers < 1 or queue_size < 1 or timeout <= 0.0:
            raise ValueError("max_attempts, workers, queue_size and timeout must be positive")
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._base = backoff_base
        self._cap = backoff_max
        self._jitter = jitter
        self._rng = rng if rng is not None else random.Random(0)
        self._sleep = sleep
        self._clock = clock
        self._ssl = ssl_context
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if "\n" in self._headers.replace("\r\n", ""):
            raise ValueError("header values must not contain line breaks")
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self._n_workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0
        self.stats = WebhookStats()

    async def __aenter__(self) -> WebhookSender:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._worker(), name=f"webhook-{i}")
                for i in range(self._n_workers)
            ]

    async def close(self, *, drain_timeout: float = 0.0) -> None:
        """Stop the workers (after up to ``drain_timeout`` s for queued posts to go out);
        whatever is still queued is counted as dropped."""
        if drain_timeout > 0.0 and self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._queue.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self.stats.dropped += 1

    def submit(self, url: str, payload: bytes | Any) -> bool:
        """Queue a POST; ``payload`` is JSON bytes or anything msgspec can encode. False (and
        counted) when the queue is full or the payload cannot be encoded."""
        try:
            body = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
        except (TypeError, ValueError) as e:
            self.stats.invalid += 1
            self.stats.last_error = f"unencodable payload: {e}"
            log.warning("webhook payload for %s not encodable: %s", url, e)
            return False
        try:
            self._queue.put_nowait((url, body))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            log.warning("webhook queue full; dropped a post to %s", url)
            return False
        self.stats.queued += 1
        return True

    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        return self._queue.empty() and self._busy == 0

    async def join(self) -> None:
        await self._queue.join()

    async def send(self, url: str, body: bytes) -> bool:
        """Deliver one POST with retries; True when a 2xx came back. Never raises (except
        cancellation)."""
        clock = self._clock or asyncio.get_running_loop().time
        started = clock()
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                self.stats.retries += 1
                await self._sleep(
                    backoff_delay(attempt - 1, self._base, self._cap, self._jitter, self._rng)
                )
            self.stats.attempts += 1
            try:
                status = await self._post(url, body)
            except _Permanent as e:
                self.stats.last_error = str(e)
                break
            except _Retryable as e:
                self.stats.last_error = str(e)
                log.info("webhook %s attempt %d failed: %s", url, attempt, e)
                continue
            except TimeoutError:
                self.stats.timeouts += 1
                self.stats.last_error = f"timeout after {self._timeout} s"
                log.info("webhook %s attempt %d timed out", url, attempt)
                continue
            except (OSError, ssl.SSLError, ValueError, UnicodeError) as e:
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.info("webhook %s attempt %d failed: %s", url, attempt, e)
                continue
            self.stats.delivered += 1
            self.stats.last_latency = clock() - started
            self.stats.last_status = status
            return True
        self.stats.failed += 1
        log.warning("webhook %s: gave up (%s)", url, self.stats.last_error)
        return False

    async def _worker(self) -> None:
        while True:
            url, body = await self._queue.get()
            self._busy += 1
            try:
                await self.send(url, body)
            except Exception:  # a bug here must not kill the worker and stall the queue
                log.exception("webhook worker error")
            finally:
                self._busy -= 1
                self._queue.task_done()

    async def _post(self, url: str, body: bytes) -> int:
        host, port, path, tls = self._target(url)
        host_header = f"[{host}]" if ":" in host else host
        if port != (443 if tls else 80):
            host_header = f"{host_header}:{port}"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\nUser-Agent: agentcluster-webhook\r\n"
            f"{self._headers}\r\n"
        ).encode("ascii")
        context: ssl.SSLContext | None = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, server_hostname=host if tls else None
                )
                writer.write(head + body)
                await writer.drain()
                line = await reader.readline()
        finally:
            if writer is not None:
                await _close(writer)
        try:
            status = _status(line)
        except _Retryable:
            self.stats.errors += 1
            raise
        self.stats.last_status = status
        if 200 <= status < 300:
            return status
        self.stats.http_errors += 1
        if status >= 500 or status in _RETRY_STATUS:
            raise _Retryable(f"HTTP {status}")
        raise _Permanent(f"HTTP {status}")

    def _target(self, url: str) -> tuple[str, int, str, bool]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            self.stats.invalid += 1
            raise _Permanent(f"bad url {url!r}: {e}") from None
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not host:
            self.stats.invalid += 1
            raise _Permanent(f"bad url {url!r}: need http:// or https:// and a host")
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        if any(c in path or c in host for c in "\r\n \t"):
            self.stats.invalid += 1
            raise _Permanent(f"bad url {url!r}: whitespace")
        tls = parts.scheme == "https"
        return host, port or (443 if tls else 80), path, tls


def _status(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise _Retryable(f"bad status line {line[:80]!r}")
    try:
        return int(parts[1])
    except ValueError:
        raise _Retryable(f"bad status line {line[:80]!r}") from None


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # A TLS close_notify that never completes must not hold the sender up.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
