"""Signals: the one message type of the runtime.

Theory of operation: a :class:`Signal` is a frozen msgspec Struct carrying the CloudEvents 1.0
context attributes plus our ``correlation`` extension (trace id, span id, parent span id,
causation id). Ids are UUIDv7, so they sort by creation time. A signal caused by another is
made with :meth:`Signal.caused`: it keeps the trace id, gets a fresh span whose parent is the
cause's span, and records the cause's id as its causation id; the bus follows these links to
rebuild a chain. Codecs: msgpack and JSON (our own compact forms, validated on decode) and
CloudEvents structured JSON (the interchange form, ``to_cloudevent`` / ``from_cloudevent``).
Every decoder raises :class:`SignalError` naming what is wrong; none lets a raw exception out.
"""

from __future__ import annotations

import base64
import os
import random
import re
import threading
import time as _time
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = [
    "Correlation",
    "Signal",
    "SignalError",
    "decode_json",
    "decode_msgpack",
    "encode_json",
    "encode_msgpack",
    "from_cloudevent",
    "new_id",
    "to_cloudevent",
    "to_cloudevent_json",
    "validate_type",
]

# Dotted type segments: letters, digits, '_' and '-'; no wildcards in a concrete signal type.
_TYPE_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
# CloudEvents extension attribute names: lower-case letters and digits only.
_EXT_RE = re.compile(r"^[a-z0-9]+$")


class SignalError(ValueError):
    """A signal (or its encoding) is malformed; the message says which part."""


# ---------------------------------------------------------------------------------- ids
class _UUID7:
    """UUIDv7 (RFC 9562): 48-bit ms timestamp, then a counter so ids are monotonic per process."""

    __slots__ = ("_counter", "_last_ms", "_lock", "_rng")

    def __init__(self) -> None:
        # A private generator seeded from the OS: ids need uniqueness, not reproducibility,
        # and must not disturb (or depend on) the global random state used elsewhere.
        self._rng = random.Random(os.urandom(16))
        self._last_ms = 0
        self._counter = 0
        self._lock = threading.Lock()

    def __call__(self) -> str:
        with self._lock:
            ms = _time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                ms = self._last_ms
                self._counter += 1
                if self._counter > 0xFFF:  # 4096 ids in one ms: borrow the next ms
                    ms += 1
                    self._counter = 0
            else:
                self._counter = self._rng.getrandbits(10)  # leave headroom for increments
            self._last_ms = ms
            rand_b = self._rng.getrandbits(62)
        value = (ms << 80) | (0x7 << 76) | (self._counter << 64) | (0b10 << 62) | rand_b
        # bytes.hex is twice as fast as formatting the int as hex (one id per signal).
        h = value.to_bytes(16, "big").hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


new_id = _UUID7()
"""Return a new UUIDv7 string."""


def _span_id() -> str:
    return os.urandom(8).hex()


def _now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------ structs
class Correlation(msgspec.Struct, frozen=True, omit_defaults=True):
    """Tracing extension: which trace a signal belongs to and what caused it."""

    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    causation_id: str | None = None


class Signal(msgspec.Struct, frozen=True, omit_defaults=True):
    """A CloudEvents 1.0 event with agentcluster's correlation extension."""

    type: str
    source: str = "/agentcluster"
    data: Any = None
    subject: str | None = None
    id: str = msgspec.field(default_factory=new_id)
    time: datetime = msgspec.field(default_factory=_now)
    specversion: str = "1.0"
    datacontenttype: str | None = "application/json"
    dataschema: str | None = None
    correlation: Correlation | None = None
    # Extension attributes this runtime does not know, kept so that nothing is lost in transit.
    extensions: dict[str, Any] | None = None

    def caused(
        self,
        type: str,
        data: Any = None,
        *,
        source: str | None = None,
        subject: str | None = None,
    ) -> Signal:
        """A new signal caused by this one: same trace, child span, causation link."""
        corr = self.correlation
        trace = corr.trace_id if corr is not None and corr.trace_id else self.id
        parent = corr.span_id if corr is not None else None
        return Signal(
            type=type,
            source=source if source is not None else self.source,
            data=data,
            subject=subject,
            correlation=Correlation(
                trace_id=trace,
                span_id=_span_id(),
                parent_span_id=parent,
                causation_id=self.id,
            ),
        )

    @property
    def causation_id(self) -> str | None:
        return self.correlation.causation_id if self.correlation is not None else None

    @property
    def trace_id(self) -> str | None:
        return self.correlation.trace_id if self.correlation is not None else None


def validate_type(type: str) -> str:
    """Check a concrete signal type (dotted segments, no wildcards); return it."""
    if not isinstance(type, str) or not _TYPE_RE.match(type):
        raise SignalError(
            f"invalid signal type {type!r}: expected dotted segments of letters, digits, '_' or '-'"
        )
    return type


def _check(sig: Signal) -> Signal:
    validate_type(sig.type)
    if sig.specversion != "1.0":
        raise SignalError(f"unsupported specversion {sig.specversion!r} (only '1.0')")
    if not sig.id:
        raise SignalError("signal id must not be empty")
    if not sig.source:
        raise SignalError("signal source must not be empty")
    return sig


# ------------------------------------------------------------------------------- codecs
_mp_enc = msgspec.msgpack.Encoder()
_mp_dec = msgspec.msgpack.Decoder(Signal)
_js_enc = msgspec.json.Encoder()
_js_dec = msgspec.json.Decoder(Signal)


def encode_msgpack(sig: Signal) -> bytes:
    return _mp_enc.encode(sig)


def decode_msgpack(buf: bytes) -> Signal:
    try:
        return _check(_mp_dec.decode(buf))
    # ValidationError is a DecodeError; a string that is not UTF-8 raises UnicodeDecodeError.
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise SignalError(f"malformed msgpack signal: {exc}") from None


def encode_json(sig: Signal) -> bytes:
    return _js_enc.encode(sig)


def decode_json(buf: bytes | str) -> Signal:
    try:
        return _check(_js_dec.decode(buf))
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise SignalError(f"malformed JSON signal: {exc}") from None


# --------------------------------------------------------------------------- CloudEvents
_CE_CORE = {
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
}
_CE_CORR = {
    "traceid": "trace_id",
    "spanid": "span_id",
    "parentspanid": "parent_span_id",
    "causationid": "causation_id",
}


def _rfc3339(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def to_cloudevent(sig: Signal) -> dict[str, Any]:
    """The CloudEvents structured-mode JSON object for a signal (bytes data -> data_base64)."""
    out: dict[str, Any] = {
        "specversion": sig.specversion,
        "id": sig.id,
        "source": sig.source,
        "type": sig.type,
        "time": _rfc3339(sig.time),
    }
    for key in ("subject", "datacontenttype", "dataschema"):
        value = getattr(sig, key)
        if value is not None:
            out[key] = value
    if isinstance(sig.data, bytes | bytearray | memoryview):
        out["data_base64"] = base64.b64encode(bytes(sig.data)).decode("ascii")
    elif sig.data is not None:
        out["data"] = msgspec.to_builtins(sig.data)
    if sig.correlation is not None:
        for ext, field in _CE_CORR.items():
            value = getattr(sig.correlation, field)
            if value is not None:
                out[ext] = value
    if sig.extensions:
        out.update(sig.extensions)
    return out


def to_cloudevent_json(sig: Signal) -> bytes:
    return _js_enc.encode(to_cloudevent(sig))


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise SignalError(f"CloudEvent 'time' must be an RFC 3339 string, got {value!r}")
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise SignalError(f"CloudEvent 'time' is not RFC 3339: {value!r}") from None
    if dt.tzinfo is None:
        raise SignalError(f"CloudEvent 'time' has no UTC offset: {value!r}")
    return dt


def from_cloudevent(event: dict[str, Any] | bytes | str) -> Signal:
    """Parse a CloudEvents 1.0 structured-mode event (a dict or its JSON text)."""
    if isinstance(event, bytes | str):
        try:
            event = msgspec.json.decode(event)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise SignalError(f"CloudEvent is not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise SignalError(f"CloudEvent must be a JSON object, got {type(event).__name__}")
    for required in ("specversion", "id", "source", "type"):
        value = event.get(required)
        if not isinstance(value, str) or not value:
            raise SignalError(f"CloudEvent attribute {required!r} is missing or not a string")
    if "data" in event and "data_base64" in event:
        raise SignalError("CloudEvent has both 'data' and 'data_base64'")
    data: Any = event.get("data")
    if "data_base64" in event:
        try:
            data = base64.b64decode(event["data_base64"], validate=True)
        except (ValueError, TypeError):
            raise SignalError("CloudEvent 'data_base64' is not valid base64") from None
    corr_fields: dict[str, str] = {}
    extensions: dict[str, Any] = {}
    for key, value in event.items():
        if key in _CE_CORE:
            continue
        if key in _CE_CORR:
            if not isinstance(value, str):
                raise SignalError(f"CloudEvent extension {key!r} must be a string")
            corr_fields[_CE_CORR[key]] = value
        elif _EXT_RE.match(key):
            extensions[key] = value
        else:
            raise SignalError(
                f"CloudEvent attribute name {key!r} is invalid (lower-case letters and digits only)"
            )
    for optional in ("subject", "datacontenttype", "dataschema"):
        value = event.get(optional)
        if value is not None and not isinstance(value, str):
            raise SignalError(f"CloudEvent attribute {optional!r} must be a string")
    try:
        sig = Signal(
            type=event["type"],
            source=event["source"],
            id=event["id"],
            specversion=event["specversion"],
            subject=event.get("subject"),
            time=_parse_time(event["time"]) if "time" in event else _now(),
            datacontenttype=event.get("datacontenttype"),
            dataschema=event.get("dataschema"),
            data=data,
            correlation=Correlation(**corr_fields) if corr_fields else None,
            extensions=extensions or None,
        )
    except TypeError as exc:
        raise SignalError(f"CloudEvent is malformed: {exc}") from None
    return _check(sig)
