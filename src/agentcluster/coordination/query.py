"""Registry query language: conditions, their validation, parsing and matching.

Theory of operation: a query is a list of :class:`Cond` (field, op, value), ANDed. A condition
names one of three kinds of field:

* *scalar* fields of an entry -- ``id``, ``name``, ``node``, ``health`` -- compared as strings
  (``gt``/``lt``/``gte``/``lte`` are plain string comparisons);
* the *set* field ``capability``: ``eq X`` means "X is one of the capabilities", ``neq X``
  "X is not", ``in [..]`` "any listed one is present", ``not_in [..]`` "none is". Ordering an
  unordered set is meaningless, so ordering ops on it are rejected;
* *mapping* fields ``resources.<name>`` (numbers) and ``metadata.<key>`` (strings). A key the
  entry does not have never satisfies ``eq``/``in``/ordering ops and always satisfies
  ``neq``/``not_in`` (SQL-like "unknown is not equal, and not greater").

:func:`cond` is the validating constructor (a wrong value type is a :class:`QueryError` that names
the field, op and value, raised when the query is built, not when it runs). :func:`parse_cond` is
the CLI syntax. :func:`compile_query` turns the ANDed conditions into one list -> list filter:
the field path is split, the op resolved and the value normalised (``in`` lists become
frozensets) once, and all conditions are fused into a single comprehension generated from fixed
templates per query *shape* (fields and ops; cached), so the per-entry work has no parsing and
no function call per condition. Compiled filters are cached by their conditions, so a repeated
query costs one dict lookup before the scan. :func:`matches` is the single-entry form.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import msgspec

if TYPE_CHECKING:
    from agentcluster.coordination.registry import AgentEntry

__all__ = [
    "HEALTH_VALUES",
    "INDEXED_FIELDS",
    "OPS",
    "Cond",
    "CondValue",
    "Filter",
    "Op",
    "QueryError",
    "compile_filter",
    "compile_query",
    "cond",
    "matches",
    "matches_all",
    "parse_cond",
]

Op = Literal["eq", "neq", "gt", "lt", "gte", "lte", "in", "not_in"]
OPS: tuple[str, ...] = get_args(Op)
Scalar = str | int | float
# Lists arrive as tuples so that a Cond stays hashable (frozen) and can key a cache.
CondValue = str | int | float | tuple[Scalar, ...]
Filter = Callable[[list["AgentEntry"]], list["AgentEntry"]]

HEALTH_VALUES: frozenset[str] = frozenset({"healthy", "degraded", "unhealthy", "unknown"})
SCALAR_FIELDS: frozenset[str] = frozenset({"id", "name", "node", "health"})
# Fields with an index in RegistryIndex (equality and ``in`` on them can pick candidates).
INDEXED_FIELDS: frozenset[str] = SCALAR_FIELDS | {"capability"}
_LIST_OPS = frozenset({"in", "not_in"})
_ORDER_OPS = frozenset({"gt", "lt", "gte", "lte"})
_MAX_LIST = 1024


class QueryError(ValueError):
    """A condition that cannot be built or parsed; the message names the culprit."""


class Cond(msgspec.Struct, frozen=True, array_like=True):
    """One condition: ``field op value``. Build with :func:`cond` or :func:`parse_cond`."""

    field: str
    op: Op
    value: CondValue


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_scalar(field: str, op: str, v: object, numeric: bool) -> Scalar:
    if numeric:
        if not _is_number(v):
            raise QueryError(f"{field} {op} {v!r}: {field} needs a number")
        assert isinstance(v, int | float)
        if not math.isfinite(v):
            raise QueryError(f"{field} {op} {v!r}: the number must be finite")
        return v
    if not isinstance(v, str):
        raise QueryError(f"{field} {op} {v!r}: {field} needs a string")
    if field == "health" and v not in HEALTH_VALUES and op in ("eq", "neq", "in", "not_in"):
        raise QueryError(f"{field} {op} {v!r}: health is one of {', '.join(sorted(HEALTH_VALUES))}")
    return v


def cond(field: str, op: str, value: object) -> Cond:
    """Build a validated :class:`Cond`; raises :class:`QueryError` naming the fault."""
    if op not in OPS:
        raise QueryError(f"{field} {op} {value!r}: unknown op {op!r} (one of {', '.join(OPS)})")
    if field.startswith("resources."):
        numeric = True
    elif field.startswith("metadata.") or field in INDEXED_FIELDS:
        numeric = False
    else:
        raise QueryError(
            f"{field} {op} {value!r}: unknown field {field!r} (id, name, node, capability, "
            "health, resources.<name> or metadata.<key>)"
        )
    if field in ("resources.", "metadata."):
        raise QueryError(f"{field} {op} {value!r}: {field!r} needs a key after the dot")
    if field == "capability" and op in _ORDER_OPS:
        raise QueryError(f"{field} {op} {value!r}: capability is a set; use eq, neq, in or not_in")
    if op in _LIST_OPS:
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple | frozenset):
            raise QueryError(f"{field} {op} {value!r}: {op} needs a list of values")
        items = sorted(value, key=repr) if isinstance(value, frozenset) else list(value)
        if not items:
            raise QueryError(f"{field} {op} {value!r}: {op} needs at least one value")
        if len(items) > _MAX_LIST:
            raise QueryError(f"{field} {op}: at most {_MAX_LIST} values")
        checked = tuple(_check_scalar(field, op, v, numeric) for v in items)
        return Cond(field, op, checked)  # type: ignore[arg-type]
    return Cond(field, op, _check_scalar(field, op, value, numeric))  # type: ignore[arg-type]


# Longest symbols first so ">=" is not read as ">" followed by "=value".
_SYMBOL_RE = re.compile(
    r"^\s*(?P<field>[^\s=!<>]+)\s*(?P<op>==|!=|>=|<=|=|>|<)\s*(?P<value>.*?)\s*$"
)
_WORD_RE = re.compile(
    r"^\s*(?P<field>\S+)\s+(?P<op>not_in|in|eq|neq|gte|lte|gt|lt)\s+(?P<value>.*?)\s*$"
)
_SYMBOLS: dict[str, str] = {
    "=": "eq",
    "==": "eq",
    "!=": "neq",
    ">=": "gte",
    "<=": "lte",
    ">": "gt",
    "<": "lt",
}


def _parse_number(field: str, text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise QueryError(f"{field}: {text!r} is not a number") from None
    if not math.isfinite(number):
        raise QueryError(f"{field}: {text!r} is not a finite number")
    return number


def parse_cond(text: str) -> Cond:
    """Parse the CLI syntax: ``capability=llm``, ``health!=unhealthy``, ``resources.gpu>=1``,
    ``node in n1,n2``, ``metadata.zone not_in a,b`` (ops also as words: ``load gte 2``)."""
    m = _WORD_RE.match(text) or _SYMBOL_RE.match(text)
    if m is None:
        raise QueryError(
            f"cannot parse condition {text!r}: expected FIELD OP VALUE, e.g. capability=llm, "
            "resources.gpu>=1 or node in n1,n2"
        )
    field, op_text, raw = m.group("field"), m.group("op"), m.group("value")
    op = _SYMBOLS.get(op_text, op_text)
    if raw == "":
        raise QueryError(f"cannot parse condition {text!r}: missing value after {op_text!r}")
    numeric = field.startswith("resources.")
    value: object
    if op in _LIST_OPS:
        parts = [p.strip() for p in raw.split(",")]
        if any(p == "" for p in parts):
            raise QueryError(f"cannot parse condition {text!r}: empty item in list {raw!r}")
        value = [_parse_number(field, p) for p in parts] if numeric else parts
    else:
        value = _parse_number(field, raw) if numeric else raw
    return cond(field, op, value)


# Per-condition expression templates, fused into one comprehension per query shape. Only
# these fixed strings and slot numbers ever reach the generated source: field keys and values
# are passed in as closure variables, so nothing a caller supplies is compiled.
_SET_EXPR: dict[str, str] = {
    "eq": "v{i} in e.capabilities",
    "neq": "v{i} not in e.capabilities",
    "in": "not v{i}.isdisjoint(e.capabilities)",
    "not_in": "v{i}.isdisjoint(e.capabilities)",
}
_SCALAR_EXPR: dict[str, str] = {
    "eq": "e.{a} == v{i}",
    "neq": "e.{a} != v{i}",
    "in": "e.{a} in v{i}",
    "not_in": "e.{a} not in v{i}",
    "gt": "e.{a} > v{i}",
    "gte": "e.{a} >= v{i}",
    "lt": "e.{a} < v{i}",
    "lte": "e.{a} <= v{i}",
}
# ``k in m and m[k] ...``: a missing key fails eq/in/ordering and passes neq/not_in, and the
# membership test plus subscript is cheaper than a ``.get`` method call per entry.
_MAPPING_EXPR: dict[str, str] = {
    "eq": "(k{i} in (m := e.{a}) and m[k{i}] == v{i})",
    "neq": "not (k{i} in (m := e.{a}) and m[k{i}] == v{i})",
    "in": "(k{i} in (m := e.{a}) and m[k{i}] in v{i})",
    "not_in": "not (k{i} in (m := e.{a}) and m[k{i}] in v{i})",
    "gt": "(k{i} in (m := e.{a}) and m[k{i}] > v{i})",
    "gte": "(k{i} in (m := e.{a}) and m[k{i}] >= v{i})",
    "lt": "(k{i} in (m := e.{a}) and m[k{i}] < v{i})",
    "lte": "(k{i} in (m := e.{a}) and m[k{i}] <= v{i})",
}
_SCALAR_ATTRS = {"id": "id", "name": "name", "node": "node", "health": "health"}
_Shape = tuple[tuple[str, str], ...]
_factories: dict[_Shape, Callable[..., Filter]] = {}
_compiled: dict[tuple[Cond, ...], Filter] = {}
_CACHE_MAX = 4096


def _identity(es: list[AgentEntry]) -> list[AgentEntry]:
    return es


def _factory(shape: _Shape) -> Callable[..., Filter]:
    make = _factories.get(shape)
    if make is not None:
        return make
    exprs = []
    params = []
    for i, (kind, op) in enumerate(shape):
        if kind == "capability":
            exprs.append(_SET_EXPR[op].format(i=i))
        elif kind in ("resources", "metadata"):
            exprs.append(_MAPPING_EXPR[op].format(i=i, a=kind))
            params.append(f"k{i}")
        else:
            exprs.append(_SCALAR_EXPR[op].format(i=i, a=_SCALAR_ATTRS[kind]))
        params.append(f"v{i}")
    src = (
        f"def make({', '.join(params)}):\n"
        f"    return lambda es: [e for e in es if {' and '.join(exprs)}]\n"
    )
    namespace: dict[str, Any] = {}
    exec(compile(src, f"<registry query {shape}>", "exec"), namespace)
    made: Callable[..., Filter] = namespace["make"]
    if len(_factories) >= _CACHE_MAX:
        _factories.clear()
    _factories[shape] = made
    return made


def _normalise(c: Cond) -> Cond:
    # A Cond built directly (or decoded from a peer) has not been through cond()'s checks.
    value = list(c.value) if isinstance(c.value, list | tuple) else c.value
    return cond(c.field, c.op, value)


def compile_query(conds: Sequence[Cond]) -> Filter:
    """The AND of ``conds`` as one list -> list filter (keeps input order).

    Conditions are validated, split and normalised once, and fused into a single comprehension
    (generated once per query *shape* -- the fields and ops -- and cached), so matching an entry
    costs no parsing and no function call per condition. Raises :class:`QueryError`.
    """
    key = tuple(conds)
    try:
        f = _compiled.get(key)
    except TypeError:  # a list value: unhashable, so not built by cond()
        key = tuple(_normalise(c) for c in conds)
        f = _compiled.get(key)
    if f is not None:
        return f
    if not key:
        return _identity
    shape: list[tuple[str, str]] = []
    args: list[object] = []
    for raw in key:
        c = _normalise(raw)
        field, op, v = c.field, c.op, c.value
        value: object = frozenset(v) if isinstance(v, tuple) else v
        if field.startswith(("resources.", "metadata.")):
            kind, _, k = field.partition(".")
            shape.append((kind, op))
            args += (k, value)
        else:
            shape.append((field, op))
            args.append(value)
    f = _factory(tuple(shape))(*args)
    if len(_compiled) >= _CACHE_MAX:
        _compiled.clear()
    _compiled[key] = f
    return f


def compile_filter(c: Cond) -> Filter:
    """One condition as a list -> list filter (see :func:`compile_query`)."""
    return compile_query((c,))


def matches(entry: AgentEntry, c: Cond) -> bool:
    """Whether one entry satisfies one condition."""
    return bool(compile_filter(c)([entry]))


def matches_all(entry: AgentEntry, conds: Iterable[Cond]) -> bool:
    """Whether one entry satisfies every condition (the AND of a query)."""
    return all(matches(entry, c) for c in conds)
