"""Refusing NaN and infinities nested anywhere in a coordination payload.

A proposal, a registration's metadata or a query condition arrives as plain data (dicts and
lists, from msgpack or from the caller). A NaN inside breaks what is done with it later:
every comparison with it is false (two equal proposals differ, a bid is neither above nor
below a reserve) and the JSON a command prints for it is invalid. So payloads are walked
at the door and refused with the path of the first bad number (``proposal.bids[2].price``).

The walk keeps its own stack (a hostile payload nested thousands deep must not exhaust the
interpreter's) and refuses a payload nested deeper than :data:`MAX_DEPTH` containers: no
coordination payload needs more, and deeper ones would exhaust the recursion of every
later step that handles them (encoders, ``consensus history --json``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = ["MAX_DEPTH", "non_finite", "non_finite_value"]

MAX_DEPTH = 64
_SHOWN_KEY = 40  # characters of one key in a path
_SHOWN_PATH = 200  # characters of a path in an error


def non_finite(value: Any, root: str, *, max_depth: int = MAX_DEPTH) -> str | None:
    """An error naming the first NaN or infinite float in ``value`` (plain data: dicts,
    lists, tuples; a dict's keys count too) by its path from ``root``, or naming where it
    nests deeper than ``max_depth`` containers; None when every number is finite."""
    if isinstance(value, float):
        return None if math.isfinite(value) else _bad(root, [], value)
    children = _children(value)
    if children is None:
        return None
    path: list[Any] = []  # the keys leading to the container on top of ``stack``
    stack = [children]
    while stack:
        for key, item in stack[-1]:
            if isinstance(key, float) and not math.isfinite(key):
                return f"{_path(root, path)!r} has a key that is not a finite number: {key!r}"
            if isinstance(item, float):
                if not math.isfinite(item):
                    return _bad(root, [*path, key], item)
                continue
            inner = _children(item)
            if inner is None:
                continue
            if len(stack) >= max_depth:
                where = _path(root, [*path, key])
                return f"{where!r} nests deeper than {max_depth} levels"
            path.append(key)
            stack.append(inner)
            break
        else:
            stack.pop()
            if path:
                path.pop()
    return None


def non_finite_value(value: Any, root: str, *, max_depth: int = MAX_DEPTH) -> str | None:
    """:func:`non_finite` of any value a caller may hand in (Structs, dataclasses, sets...:
    what travels is its plain form). None for a value with no plain form: what cannot be
    sent is for the caller's encoder to report."""
    try:
        plain = msgspec.to_builtins(value)
    except RecursionError:
        return f"{root!r} nests deeper than {max_depth} levels"
    except (TypeError, ValueError, OverflowError):
        return None
    return non_finite(plain, root, max_depth=max_depth)


def _children(value: Any) -> Iterator[tuple[Any, Any]] | None:
    if isinstance(value, dict):
        return iter(value.items())
    if isinstance(value, list | tuple):
        return enumerate(value)
    return None


def _bad(root: str, path: list[Any], value: float) -> str:
    return f"{_path(root, path)!r} must be a finite number, not {value!r}"


def _path(root: str, keys: list[Any]) -> str:
    """``root.key[3]['odd key']``, cut to a readable length (a key may be long)."""
    parts = [root]
    for k in keys:
        if isinstance(k, int) and not isinstance(k, bool):
            parts.append(f"[{k}]")
        elif isinstance(k, str) and k.isidentifier():
            parts.append(f".{k[:_SHOWN_KEY]}" + ("..." if len(k) > _SHOWN_KEY else ""))
        else:
            shown = repr(k)
            parts.append(f"[{shown[:_SHOWN_KEY]}" + ("...]" if len(shown) > _SHOWN_KEY else "]"))
    text = "".join(parts)
    if len(text) <= _SHOWN_PATH:
        return text
    half = _SHOWN_PATH // 2
    return f"{text[:half]}...{text[-half:]}"
