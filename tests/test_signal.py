"""Signals: ids, causation, codecs, CloudEvents structured JSON."""

from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agentcluster.signals import (
    Correlation,
    Signal,
    SignalError,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
    from_cloudevent,
    new_id,
    to_cloudevent,
    to_cloudevent_json,
)

# The example of the CloudEvents 1.0 JSON Event Format specification (section 3.1, with a
# real base64 payload in place of the spec's "... base64 encoded string ..." placeholder),
# and the spec's example of a JSON `data` member.
SPEC_BINARY_EXAMPLE = """
{
    "specversion" : "1.0",
    "type" : "com.example.someevent",
    "source" : "/mycontext",
    "id" : "A234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "datacontenttype" : "application/vnd.apache.thrift.binary",
    "data_base64" : "aGVsbG8gY2xvdWRldmVudHM="
}
"""
SPEC_JSON_EXAMPLE = """
{
    "specversion" : "1.0",
    "type" : "com.example.someevent",
    "source" : "/mycontext",
    "subject": null,
    "id" : "C234-1234-1234",
    "time" : "2018-04-05T17:31:00Z",
    "comexampleextension1" : "value",
    "comexampleothervalue" : 5,
    "datacontenttype" : "application/json",
    "data" : {
        "appinfoA" : "abc",
        "appinfoB" : 123,
        "appinfoC" : true
    }
}
"""


def test_ids_are_uuid7_and_sorted() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    ms = int(ids[0].replace("-", "")[:12], 16)
    now_ms = datetime.now(UTC).timestamp() * 1000
    assert abs(ms - now_ms) < 60_000


def test_signal_defaults_and_frozen() -> None:
    sig = Signal(type="app.test.thing", data={"a": 1})
    assert sig.specversion == "1.0"
    assert sig.time.tzinfo is not None
    with pytest.raises(AttributeError):
        sig.type = "other"  # type: ignore[misc]


def test_caused_builds_a_causal_chain() -> None:
    root = Signal(type="a.root")
    child = root.caused("a.child", {"x": 1})
    grandchild = child.caused("a.grandchild")
    assert child.causation_id == root.id
    assert grandchild.causation_id == child.id
    assert child.trace_id == root.id == grandchild.trace_id
    assert grandchild.correlation is not None and child.correlation is not None
    assert grandchild.correlation.parent_span_id == child.correlation.span_id
    assert child.correlation.span_id != grandchild.correlation.span_id


@pytest.mark.parametrize(
    ("encode", "decode"), [(encode_msgpack, decode_msgpack), (encode_json, decode_json)]
)
def test_codecs_round_trip(encode, decode) -> None:  # type: ignore[no-untyped-def]
    sig = Signal(type="a.b", data={"n": [1, 2, 3]}, subject="s").caused("a.c", {"k": "v"})
    assert decode(encode(sig)) == sig


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x93\x01", "malformed msgpack"),
        (msgspec.msgpack.encode({"type": "bad type!"}), "invalid signal type"),
        (msgspec.msgpack.encode({"type": "a.b", "specversion": "0.3"}), "specversion"),
        (msgspec.msgpack.encode({"type": "a.b", "source": 5}), "source"),
        (msgspec.msgpack.encode({"source": "x"}), "type"),
    ],
)
def test_msgpack_errors_are_clear(payload: bytes, fragment: str) -> None:
    with pytest.raises(SignalError, match=fragment):
        decode_msgpack(payload)


def test_json_errors_are_clear() -> None:
    with pytest.raises(SignalError, match="malformed JSON"):
        decode_json(b'{"type": "a.b", "time": "not a time"}')
    with pytest.raises(SignalError, match="malformed JSON"):
        decode_json(b"{")


def test_parses_the_cloudevents_spec_binary_example() -> None:
    sig = from_cloudevent(SPEC_BINARY_EXAMPLE)
    assert sig.type == "com.example.someevent"
    assert sig.source == "/mycontext"
    assert sig.id == "A234-1234-1234"
    assert sig.time == datetime(2018, 4, 5, 17, 31, tzinfo=UTC)
    assert sig.datacontenttype == "application/vnd.apache.thrift.binary"
    assert sig.data == b"hello cloudevents"
    assert sig.extensions == {"comexampleextension1": "value", "comexampleothervalue": 5}
    out = to_cloudevent(sig)
    assert out["data_base64"] == base64.b64encode(b"hello cloudevents").decode()
    assert out["comexampleothervalue"] == 5
    assert out["time"] == "2018-04-05T17:31:00Z"
    assert from_cloudevent(to_cloudevent_json(sig)) == sig


def test_parses_the_cloudevents_spec_json_example() -> None:
    sig = from_cloudevent(SPEC_JSON_EXAMPLE)
    assert sig.data == {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True}
    assert sig.subject is None
    again = json.loads(to_cloudevent_json(sig))
    assert again["data"] == sig.data
    assert again["id"] == "C234-1234-1234"


def test_correlation_maps_to_extension_attributes() -> None:
    sig = Signal(type="a.b").caused("a.c")
    ce = to_cloudevent(sig)
    assert ce["causationid"] == sig.causation_id
    assert ce["traceid"] == sig.trace_id
    assert all(re.match(r"^[a-z0-9]+$", k) or k == "data_base64" for k in ce)
    back = from_cloudevent(ce)
    assert back.correlation == sig.correlation


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        ("[]", "JSON object"),
        ("{", "not valid JSON"),
        ({"specversion": "1.0", "type": "a.b", "source": "/x"}, "'id'"),
        ({"specversion": "1.0", "id": "1", "source": "/x", "type": "a b"}, "invalid signal type"),
        ({"specversion": "0.3", "id": "1", "source": "/x", "type": "a.b"}, "specversion"),
        (
            {"specversion": "1.0", "id": "1", "source": "/x", "type": "a.b", "time": "yesterday"},
            "RFC 3339",
        ),
        (
            {
                "specversion": "1.0",
                "id": "1",
                "source": "/x",
                "type": "a.b",
                "time": "2018-04-05T17:31:00",
            },
            "offset",
        ),
        (
            {"specversion": "1.0", "id": "1", "source": "/x", "type": "a.b", "Bad-Name": 1},
            "invalid",
        ),
        (
            {
                "specversion": "1.0",
                "id": "1",
                "source": "/x",
                "type": "a.b",
                "data": 1,
                "data_base64": "AA==",
            },
            "both",
        ),
        (
            {"specversion": "1.0", "id": "1", "source": "/x", "type": "a.b", "data_base64": "!!"},
            "base64",
        ),
        ({"specversion": "1.0", "id": "1", "source": "/x", "type": "a.b", "traceid": 5}, "traceid"),
        ({"specversion": "1.0", "id": "1", "source": "/x", "type": "a.b", "subject": 5}, "subject"),
    ],
)
def test_cloudevent_errors_are_clear(event: object, fragment: str) -> None:
    with pytest.raises(SignalError, match=fragment):
        from_cloudevent(event)  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
types = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=4).map(
    ".".join
)


@given(type_=types, data=json_values, subject=st.none() | st.text(max_size=10))
def test_property_codecs_round_trip(type_: str, data: object, subject: str | None) -> None:
    sig = Signal(type=type_, data=data, subject=subject, correlation=Correlation(trace_id="t"))
    assert decode_msgpack(encode_msgpack(sig)) == sig
    assert decode_json(encode_json(sig)) == sig
    assert from_cloudevent(to_cloudevent_json(sig)) == sig


@given(st.binary(max_size=64))
@example(b'"\x80"')  # a JSON string that is not UTF-8 (once escaped as UnicodeDecodeError)
@example(b"\xa2\x80\x81")  # the same in msgpack
def test_property_garbage_never_escapes_as_another_error(blob: bytes) -> None:
    for decode in (decode_msgpack, decode_json, from_cloudevent):
        try:
            decode(blob)  # type: ignore[operator]
        except SignalError:
            pass
