"""Actions: named, validated units of work with timeouts, retries and compensation.

Theory of operation: an :class:`Action` subclass declares a ``Params`` msgspec Struct (its input
schema, exported as JSON Schema and as an LLM function-tool spec), a ``run(params, ctx)`` that may
be sync or async, and optionally a ``compensate(params, ctx, error)`` that undoes a completed run
when a later step of a workflow fails (the saga pattern). :func:`execute` validates the params,
then runs attempts until one succeeds, the error is not retryable, or ``max_retries`` is spent.

* Time goes through ``ctx.clock``: the per-attempt timeout is a ``clock.call_later`` timer that
  cancels the attempt's task (the mechanism ``asyncio.timeout`` uses, minus its dependence on loop
  time), and the backoff between attempts is ``clock.sleep``. So the same code runs on real time,
  on :class:`~agentcluster.testing.VirtualTimeLoop` and on a hand-driven
  :class:`~agentcluster.clock.SimClock`.
* Only errors that are instances of the action's ``retryable`` classes are retried (by default
  :class:`RetryableError` and ``TimeoutError``); anything else fails at once. Cancellation of the
  caller is never retried nor converted: it propagates untouched.
* Backoff: the wait after failed attempt ``n`` is ``d = min(backoff_max, backoff_base * 2**(n-1))``
  reduced by a random fraction: uniform in ``[(1 - jitter) * d, d]``. ``jitter=1`` is AWS "full
  jitter", ``jitter=0.5`` "equal jitter", ``jitter=0`` a fixed schedule. The wait never exceeds
  ``d``, so ``backoff_max`` is a hard cap. A :class:`RetryableError` may carry ``retry_after``,
  which replaces the computed wait (a server's Retry-After hint).
* A final failure raises :class:`ActionError` (:class:`ActionTimeout` when the last attempt timed
  out) with the cause as ``__cause__`` and an :class:`AttemptRecord` per attempt. Bad params raise
  :class:`ActionValidationError` before any attempt, naming the offending field.

Synchronous ``run()`` bodies execute inline on the loop thread, where no timer can interrupt them;
mark an action ``blocking = True`` to run it in a worker thread instead, which makes its timeout
effective (the thread itself cannot be killed and finishes in the background). Chains, DAG
workflows and parallel groups live in :mod:`agentcluster.agents._workflow`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
import random
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast, overload

import msgspec

from agentcluster.clock import Clock, MonotonicClock
from agentcluster.signals._signal import Signal

__all__ = [
    "Action",
    "ActionContext",
    "ActionError",
    "ActionTimeout",
    "ActionValidationError",
    "AttemptRecord",
    "NoParams",
    "RetryableError",
    "action",
    "execute",
    "execute_sync",
    "struct_schema",
]

P = TypeVar("P", bound=msgspec.Struct)
S = TypeVar("S", bound=msgspec.Struct)

# Dotted lower-case segments; also what makes the '.' -> '-' tool-name mapping reversible.
_NAME_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_PATH_RE = re.compile(r"^(?P<detail>.*?) - at `(?P<path>[^`]*)`$", re.DOTALL)
_NAMED_RE = re.compile(r"(?:missing required|contains unknown) field `(?P<name>[^`]+)`")
# An exponent past this is far beyond any sane backoff_max and would overflow a float.
_MAX_EXPONENT = 64
# Jitter needs randomness but not reproducibility unless the caller passes a seeded rng; a
# private generator keeps the global ``random`` state out of it.
_DEFAULT_RNG = random.Random()


def snake_case(name: str) -> str:
    """``FetchURLData`` -> ``fetch_url_data``: the default action name for a class."""
    return _CAMEL_RE.sub("_", name).lower()


# ---------------------------------------------------------------------------------- context
class ActionContext(msgspec.Struct, frozen=True):
    """What an action may know about its surroundings; immutable, one per attempt.

    (A frozen struct rather than a frozen dataclass: one is built for every message an agent
    runs, and the dataclass's per-field ``object.__setattr__`` made that 2.2 µs, not 0.24.)"""

    state: Any = None
    agent_id: str | None = None
    signal: Signal | None = None
    clock: Clock = msgspec.field(default_factory=MonotonicClock)
    attempt: int = 1
    extra: Mapping[str, Any] = msgspec.field(default_factory=dict)

    def replace(self, **changes: Any) -> ActionContext:
        return msgspec.structs.replace(self, **changes)

    def with_extra(self, **items: Any) -> ActionContext:
        """A copy whose ``extra`` has ``items`` added (overriding same-named keys)."""
        return msgspec.structs.replace(self, extra={**self.extra, **items})


# ----------------------------------------------------------------------------------- errors
class ActionValidationError(ValueError):
    """Parameters did not match an action's ``Params``; ``field`` is the dotted path or None."""

    def __init__(self, field: str | None, message: str, *, action: str | None = None) -> None:
        self.field = field
        self.message = message
        self.action = action
        who = f"action {action!r}" if action else "action"
        where = f"field {field!r}: " if field else ""
        super().__init__(f"invalid parameters for {who}: {where}{message}")


class RetryableError(Exception):
    """Raise from ``run()`` to ask for another attempt (``retry_after`` overrides the backoff)."""

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        if retry_after is not None and retry_after < 0:
            raise ValueError(f"retry_after must be >= 0, got {retry_after}")
        self.retry_after = retry_after
        super().__init__(message)


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One failed attempt: its number, clock instants and error."""

    number: int
    started: float
    ended: float
    error: BaseException
    timed_out: bool


class ActionError(Exception):
    """An action failed for good; ``__cause__`` is the last attempt's error."""

    timed_out: ClassVar[bool] = False

    def __init__(
        self, action: str, history: Sequence[AttemptRecord], *, exhausted: bool = False
    ) -> None:
        self.action = action
        self.history = tuple(history)
        self.attempts = len(self.history)
        # True when the last error was retryable and retries ran out (as opposed to a
        # non-retryable error that stopped the schedule early).
        self.exhausted = exhausted
        super().__init__(self._describe())

    @property
    def error(self) -> BaseException | None:
        return self.history[-1].error if self.history else None

    def _describe(self) -> str:
        err = self.error
        what = f"{type(err).__name__}: {err}" if err is not None else "unknown error"
        n = self.attempts
        return f"action {self.action!r} failed after {n} attempt{'s' * (n != 1)}: {what}"


class ActionTimeout(ActionError):
    """The last attempt of an action exceeded its timeout."""

    timed_out: ClassVar[bool] = True

    def _describe(self) -> str:
        n = self.attempts
        tail = ", retries exhausted" if self.exhausted else ""
        return f"action {self.action!r} timed out on attempt {n}{tail}"


# ----------------------------------------------------------------------------------- action
class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The parameter schema of an action that takes none."""


class Action(ABC, Generic[P]):
    """Base class of every action; see the module docstring for the execution model.

    ``Params`` may be given explicitly or inferred from the generic argument::

        class Fetch(Action[FetchParams]):
            max_retries = 3
            async def run(self, params: FetchParams, ctx: ActionContext) -> bytes: ...
    """

    name: ClassVar[str] = "action"
    description: ClassVar[str] = ""
    Params: ClassVar[type[msgspec.Struct]] = NoParams
    timeout: ClassVar[float | None] = None
    max_retries: ClassVar[int] = 0
    backoff_base: ClassVar[float] = 0.1
    backoff_max: ClassVar[float] = 10.0
    jitter: ClassVar[float] = 0.2
    retryable: ClassVar[tuple[type[BaseException], ...]] = (RetryableError, TimeoutError)
    blocking: ClassVar[bool] = False
    # Set per class: True when compensate() is overridden somewhere below Action.
    compensable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__)
        if "Params" not in cls.__dict__:
            inferred = _params_from_generic(cls)
            if inferred is not None:
                cls.Params = inferred
        cls.compensable = cls.compensate is not Action.compensate
        _check_config(cls)

    @abstractmethod
    def run(self, params: P, ctx: ActionContext) -> Any:
        """Do the work (sync, or return an awaitable); the result is the action's value.

        Abstract: an action class without ``run`` cannot be instantiated (a clear TypeError
        at the first call rather than a silent no-op)."""

    def compensate(self, params: P, ctx: ActionContext, error: BaseException) -> Any:
        """Undo a completed run after a later failure; overriding marks the action compensable."""
        return None

    # -------------------------------------------------------------------------- schema
    @classmethod
    def validate(cls, params: Mapping[str, Any] | P | None) -> P:
        """Convert ``params`` to ``Params``; raise :class:`ActionValidationError` naming the field."""
        data: Any
        if params is None:
            data = {}
        elif type(params) is dict:  # the common case, checked first: validate is on hot paths
            data = params
        elif isinstance(params, cls.Params):
            return params
        elif isinstance(params, msgspec.Struct):
            data = msgspec.structs.asdict(params)
        elif isinstance(params, Mapping):
            data = dict(params)
        else:
            raise ActionValidationError(
                None,
                f"expected a mapping or {cls.Params.__name__}, got {type(params).__name__}",
                action=cls.name,
            )
        try:
            return cast(P, msgspec.convert(data, cls.Params))
        except msgspec.ValidationError as exc:
            raise _validation_error(cls.name, exc) from exc

    @classmethod
    def validate_json(cls, data: bytes | str) -> P:
        """Decode and validate JSON arguments (e.g. an LLM tool call's ``arguments`` string)."""
        try:
            return cast(P, msgspec.json.decode(data, type=cls.Params))
        except msgspec.ValidationError as exc:
            raise _validation_error(cls.name, exc) from exc
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ActionValidationError(None, f"malformed JSON: {exc}", action=cls.name) from exc

    @classmethod
    def json_schema(cls, *, inline: bool = False) -> dict[str, Any]:
        """JSON Schema of ``Params``: the object schema at the top, nested types in ``$defs``.

        ``inline=True`` replaces every ``$ref`` by its definition (for consumers that do not
        resolve references); it raises ``ValueError`` for a recursive schema.
        """
        return struct_schema(cls.Params, inline=inline)

    @classmethod
    def tool_name(cls) -> str:
        """The name offered to an LLM: ``name`` with '.' -> '-' (tool names forbid dots)."""
        return cls.name.replace(".", "-")

    @classmethod
    def tool_spec(cls) -> dict[str, Any]:
        """``{"name", "description", "parameters"}``: the OpenAI/Anthropic function-tool shape.

        Anthropic calls ``parameters`` ``input_schema``; the value is the same JSON Schema.
        """
        tool = cls.tool_name()
        if len(tool) > 64:
            raise ValueError(f"action name {cls.name!r} is too long for a tool name (max 64)")
        doc = cls.__dict__.get("__doc__")
        desc = cls.description or (inspect.cleandoc(doc) if isinstance(doc, str) else "")
        return {"name": tool, "description": desc, "parameters": cls.json_schema()}

    @classmethod
    def retry_delay(
        cls, attempt: int, rng: random.Random | None = None, error: BaseException | None = None
    ) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next."""
        if isinstance(error, RetryableError) and error.retry_after is not None:
            return error.retry_after
        delay = min(cls.backoff_max, cls.backoff_base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
        if cls.jitter > 0:
            delay -= delay * cls.jitter * (rng or _DEFAULT_RNG).random()
        return delay


def _params_from_generic(cls: type) -> type[msgspec.Struct] | None:
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Action):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct):
                return args[0]
    return None


def _check_config(cls: type[Action[Any]]) -> None:
    where = cls.__qualname__
    if not isinstance(cls.name, str) or not _NAME_RE.match(cls.name):
        raise ValueError(f"{where}.name {cls.name!r} is invalid: use dotted segments of [a-z0-9_]")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, msgspec.Struct)):
        raise TypeError(f"{where}.Params must be a msgspec.Struct subclass, got {cls.Params!r}")
    if cls.Params.__struct_config__.array_like:
        raise TypeError(f"{where}.Params must encode as an object, not array_like")
    if cls.timeout is not None and not (_is_number(cls.timeout) and cls.timeout > 0):
        raise ValueError(f"{where}.timeout must be None or a number > 0, got {cls.timeout!r}")
    if not isinstance(cls.max_retries, int) or cls.max_retries < 0:
        raise ValueError(f"{where}.max_retries must be an int >= 0, got {cls.max_retries!r}")
    for attr in ("backoff_base", "backoff_max"):
        value = getattr(cls, attr)
        if not _is_number(value) or value < 0:
            raise ValueError(f"{where}.{attr} must be a number >= 0, got {value!r}")
    if not _is_number(cls.jitter) or not 0 <= cls.jitter <= 1:
        raise ValueError(f"{where}.jitter must be a fraction in [0, 1], got {cls.jitter!r}")
    if not isinstance(cls.retryable, tuple) or not all(
        isinstance(t, type) and issubclass(t, Exception) for t in cls.retryable
    ):
        raise TypeError(
            f"{where}.retryable must be a tuple of Exception subclasses, got {cls.retryable!r}"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validation_error(action: str, exc: msgspec.ValidationError) -> ActionValidationError:
    text = str(exc)
    path = ""
    m = _PATH_RE.match(text)
    if m is not None:
        text, raw = m.group("detail"), m.group("path")
        path = raw[2:] if raw.startswith("$.") else raw[1:]
    named = _NAMED_RE.search(text)
    if named is not None:
        path = f"{path}.{named.group('name')}" if path else named.group("name")
    return ActionValidationError(path or None, text, action=action)


def struct_schema(struct: type[msgspec.Struct], *, inline: bool = False) -> dict[str, Any]:
    """JSON Schema of a Struct type: its object schema at the top, nested types in ``$defs``.

    ``inline=True`` replaces every ``$ref`` by its definition; ``ValueError`` if recursive.
    """
    raw = msgspec.json.schema(struct)
    defs: dict[str, Any] = dict(raw.get("$defs", {}))
    ref = raw.get("$ref")
    if not isinstance(ref, str):
        return dict(raw)
    key = ref.rsplit("/", 1)[-1]
    root = dict(defs[key])
    # The root's own definition stays only if something refers back to it (recursion).
    others = [root, *(v for k, v in defs.items() if k != key)]
    if f'"{ref}"' not in msgspec.json.encode(others).decode():
        del defs[key]
    if inline:
        return cast(dict[str, Any], _inline_refs(root, defs, (struct.__name__,)))
    if defs:
        root["$defs"] = defs
    return root


def _inline_refs(node: Any, defs: Mapping[str, Any], stack: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline_refs(item, defs, stack) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        key = ref[len("#/$defs/") :]
        if key in stack:
            raise ValueError(f"cannot inline the recursive schema of {key!r}")
        body = dict(_inline_refs(defs[key], defs, (*stack, key)))
        body.update({k: _inline_refs(v, defs, stack) for k, v in node.items() if k != "$ref"})
        return body
    return {k: _inline_refs(v, defs, stack) for k, v in node.items()}


# -------------------------------------------------------------------------------- decorator
_Fn = Callable[[S, ActionContext], Any]


@overload
def action(func: _Fn[S], /) -> type[Action[S]]: ...


@overload
def action(
    func: None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    max_retries: int = 0,
    backoff_base: float = 0.1,
    backoff_max: float = 10.0,
    jitter: float = 0.2,
    retryable: tuple[type[BaseException], ...] | None = None,
    blocking: bool = False,
    compensate: Callable[[Any, ActionContext, BaseException], Any] | None = None,
) -> Callable[[_Fn[S]], type[Action[S]]]: ...


def action(
    func: _Fn[S] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    max_retries: int = 0,
    backoff_base: float = 0.1,
    backoff_max: float = 10.0,
    jitter: float = 0.2,
    retryable: tuple[type[BaseException], ...] | None = None,
    blocking: bool = False,
    compensate: Callable[[Any, ActionContext, BaseException], Any] | None = None,
) -> type[Action[S]] | Callable[[_Fn[S]], type[Action[S]]]:
    """Turn ``def f(params: SomeStruct, ctx: ActionContext)`` (sync or async) into an Action.

    ``Params`` comes from the first parameter's annotation, ``name`` from the function name
    and ``description`` from its docstring unless given.
    """

    def build(fn: _Fn[S]) -> type[Action[S]]:
        params_type = _first_param_type(fn)
        doc = inspect.getdoc(fn) or ""
        ns: dict[str, Any] = {
            "__module__": fn.__module__,
            "__qualname__": getattr(fn, "__qualname__", fn.__name__),
            "__doc__": doc or None,
            "name": name if name is not None else snake_case(fn.__name__),
            "description": description if description is not None else doc,
            "Params": params_type,
            "timeout": timeout,
            "max_retries": max_retries,
            "backoff_base": backoff_base,
            "backoff_max": backoff_max,
            "jitter": jitter,
            "blocking": blocking,
            "fn": staticmethod(fn),
            "run": lambda self, params, ctx: fn(params, ctx),
        }
        if retryable is not None:
            ns["retryable"] = retryable
        if compensate is not None:
            undo = compensate
            ns["compensate"] = lambda self, params, ctx, error: undo(params, ctx, error)
        cls_name = "".join(part.capitalize() for part in fn.__name__.split("_")) or "Action"
        return cast(type[Action[S]], type(cls_name, (Action,), ns))

    return build(func) if func is not None else build


def _first_param_type(fn: Callable[..., Any]) -> type[msgspec.Struct]:
    label = getattr(fn, "__qualname__", repr(fn))
    positional = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) != 2:
        raise TypeError(
            f"@action {label}: expected a function (params, ctx), got {len(positional)} positional parameters"
        )
    try:
        hints = typing.get_type_hints(fn)
    except NameError as exc:
        raise TypeError(f"@action {label}: cannot resolve annotations ({exc})") from exc
    ptype = hints.get(positional[0].name)
    if not (isinstance(ptype, type) and issubclass(ptype, msgspec.Struct)):
        raise TypeError(
            f"@action {label}: parameter {positional[0].name!r} must be annotated with a "
            f"msgspec.Struct subclass, got {ptype!r}"
        )
    return ptype


# -------------------------------------------------------------------------------- execution
class _Unset(enum.Enum):
    UNSET = 0


UNSET = _Unset.UNSET


def instantiate(action: Action[Any] | type[Action[Any]]) -> Action[Any]:
    """The instance to run: ``action`` itself, or a fresh one for a class."""
    if isinstance(action, Action):
        return action
    if isinstance(action, type) and issubclass(action, Action):
        return action()
    raise TypeError(f"expected an Action subclass or instance, got {action!r}")


async def execute(
    action: Action[Any] | type[Action[Any]],
    params: Mapping[str, Any] | msgspec.Struct | None = None,
    ctx: ActionContext | None = None,
    *,
    rng: random.Random | None = None,
    timeout: float | _Unset | None = UNSET,
    max_retries: int | None = None,
) -> Any:
    """Validate ``params`` and run ``action`` with its timeout and retry policy.

    ``timeout`` and ``max_retries`` override the class's values for this call (``timeout=None``
    disables the timeout). Returns the value of the first successful attempt; raises
    :class:`ActionValidationError` for bad params, :class:`ActionError` / :class:`ActionTimeout`
    for a final failure.
    """
    inst = instantiate(action)
    cls = type(inst)
    valid = cls.validate(params)
    ctx = ctx if ctx is not None else ActionContext()
    limit = cls.timeout if timeout is UNSET else timeout
    retries = cls.max_retries if max_retries is None else max_retries
    _check_overrides(limit, retries)
    clock = ctx.clock
    history: list[AttemptRecord] = []
    attempt = 1
    while True:
        actx = ctx if ctx.attempt == attempt else msgspec.structs.replace(ctx, attempt=attempt)
        started = clock.now()
        try:
            return await _attempt(inst, valid, actx, limit)
        except Exception as exc:
            history.append(
                AttemptRecord(attempt, started, clock.now(), exc, isinstance(exc, TimeoutError))
            )
            if not isinstance(exc, cls.retryable):
                raise _final(cls.name, history, exhausted=False) from exc
            if attempt > retries:
                raise _final(cls.name, history, exhausted=True) from exc
            await clock.sleep(cls.retry_delay(attempt, rng, exc))
            attempt += 1


def execute_sync(
    action: Action[Any] | type[Action[Any]],
    params: Mapping[str, Any] | msgspec.Struct | None = None,
    ctx: ActionContext | None = None,
    *,
    rng: random.Random | None = None,
    max_retries: int | None = None,
    sleep: Callable[[float], object] | None = None,
) -> Any:
    """Run a synchronous action on the calling thread, with retries but no timeout.

    Nothing can interrupt synchronous code on its own thread, so the class ``timeout`` is not
    enforced here. Between attempts ``sleep(delay)`` is called when given; without it retries
    follow each other at once. Raises ``TypeError`` if ``run()`` returns an awaitable.
    """
    inst = instantiate(action)
    cls = type(inst)
    valid = cls.validate(params)
    ctx = ctx if ctx is not None else ActionContext()
    retries = cls.max_retries if max_retries is None else max_retries
    _check_overrides(None, retries)
    history: list[AttemptRecord] = []
    attempt = 1
    while True:
        actx = ctx if ctx.attempt == attempt else msgspec.structs.replace(ctx, attempt=attempt)
        started = ctx.clock.now()
        try:
            result = inst.run(valid, actx)
        except Exception as exc:
            history.append(
                AttemptRecord(attempt, started, ctx.clock.now(), exc, isinstance(exc, TimeoutError))
            )
            if not isinstance(exc, cls.retryable):
                raise _final(cls.name, history, exhausted=False) from exc
            if attempt > retries:
                raise _final(cls.name, history, exhausted=True) from exc
            if sleep is not None:
                sleep(cls.retry_delay(attempt, rng, exc))
            attempt += 1
            continue
        if inspect.isawaitable(result):
            _discard(result)
            raise TypeError(
                f"action {cls.name!r} is asynchronous (run() returned {type(result).__name__}); "
                "use `await execute(...)` instead of execute_sync()"
            )
        return result


async def compensate_once(
    inst: Action[Any], params: msgspec.Struct, ctx: ActionContext, error: BaseException
) -> Any:
    """Call ``inst.compensate`` (sync or async) once, under the action's timeout."""
    out = inst.compensate(params, ctx, error)
    if inspect.isawaitable(out):
        timeout = type(inst).timeout
        return await (out if timeout is None else _within(out, timeout, ctx.clock))
    return out


def _check_overrides(limit: float | None, retries: int) -> None:
    if limit is not None and not (_is_number(limit) and limit > 0):
        raise ValueError(f"timeout must be None or a number > 0, got {limit!r}")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {retries!r}")


def _final(name: str, history: list[AttemptRecord], *, exhausted: bool) -> ActionError:
    if history[-1].timed_out:
        return ActionTimeout(name, history, exhausted=exhausted)
    return ActionError(name, history, exhausted=exhausted)


def _discard(awaitable: Awaitable[Any]) -> None:
    # Closing an unawaited coroutine avoids a "never awaited" warning at garbage collection.
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()


async def _attempt(
    inst: Action[Any], params: msgspec.Struct, ctx: ActionContext, limit: float | None
) -> Any:
    if inst.blocking:
        pending: Awaitable[Any] = asyncio.to_thread(inst.run, params, ctx)
    else:
        out = inst.run(params, ctx)
        if not inspect.isawaitable(out):
            return out
        pending = out
    result = await (pending if limit is None else _within(pending, limit, ctx.clock))
    if inst.blocking and inspect.isawaitable(result):
        _discard(result)
        raise TypeError(f"blocking action {inst.name!r} must have a synchronous run()")
    return result


async def _within(awaitable: Awaitable[Any], limit: float, clock: Clock) -> Any:
    """Await ``awaitable`` in this task, cancelling it when ``clock`` reaches the deadline."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("action timeouts need to run inside an asyncio task")
    fired = False

    def expire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    # Cancellations already requested from outside must survive ours: compare counts, as
    # asyncio.timeout does, so only the cancellation we caused becomes a TimeoutError.
    baseline = task.cancelling()
    handle = clock.call_later(limit, expire)
    try:
        result = await awaitable
    except asyncio.CancelledError:
        if fired and task.uncancel() <= baseline:
            raise TimeoutError(f"attempt exceeded its timeout of {limit} s") from None
        raise
    finally:
        handle.cancel()
    if fired:
        # The work swallowed our cancellation and finished anyway: keep its result, and drop
        # the pending cancel request so it does not hit the caller's next await.
        task.uncancel()
    return result
