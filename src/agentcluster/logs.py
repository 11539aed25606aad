"""Structured logs that carry node, agent and signal ids.

Theory of operation: the ids live in context variables. The node sets ``node_id`` once; each
agent server sets ``agent_id`` in its own task and ``signal_id`` around each instruction, so
every log record emitted while handling a signal — in the runtime, in an action, in user
code using the standard :mod:`logging` module — is stamped with all three by
:class:`ContextFilter`. :func:`configure_logging` installs the filter and either a readable
line format or one JSON object per line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

import msgspec

__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "agent_id_var",
    "configure_logging",
    "log_context",
    "node_id_var",
    "signal_id_var",
]

node_id_var: ContextVar[str | None] = ContextVar("agentcluster_node_id", default=None)
agent_id_var: ContextVar[str | None] = ContextVar("agentcluster_agent_id", default=None)
signal_id_var: ContextVar[str | None] = ContextVar("agentcluster_signal_id", default=None)

_FIELDS = (("node_id", node_id_var), ("agent_id", agent_id_var), ("signal_id", signal_id_var))


class ContextFilter(logging.Filter):
    """Stamp records with the current node / agent / signal ids (attributes may be None)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _FIELDS:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ids, exception."""

    _enc = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, _ in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return self._enc.encode(out).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(
            f"{name.split('_')[0]}={value}"
            for name, _ in _FIELDS
            if (value := getattr(record, name, None)) is not None
        )
        base = super().format(record)
        return f"{base} [{ids}]" if ids else base


def configure_logging(
    level: int | str = logging.INFO, *, json: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Install a handler on the ``agentcluster`` logger; returns it (remove it to undo)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        JsonFormatter()
        if json
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logger = logging.getLogger("agentcluster")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


@contextlib.contextmanager
def log_context(
    *, node_id: str | None = None, agent_id: str | None = None, signal_id: str | None = None
) -> Iterator[None]:
    """Set ids for the duration of a block (only those given)."""
    tokens = [
        (var, var.set(value))
        for (_, var), value in zip(_FIELDS, (node_id, agent_id, signal_id), strict=True)
        if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
