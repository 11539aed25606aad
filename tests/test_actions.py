"""Actions and workflows: schema, validation, execution policy, chains, DAGs, compensation."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
import pytest

from agentcluster.agents._workflow import (
    Step,
    Workflow,
    WorkflowDefinitionError,
    WorkflowError,
    run_chain,
    run_parallel,
)
from agentcluster.agents.actions import (
    Action,
    ActionContext,
    ActionError,
    ActionTimeout,
    ActionValidationError,
    NoParams,
    RetryableError,
    action,
    execute,
    execute_sync,
    snake_case,
)
from agentcluster.clock import SimClock
from agentcluster.testing import advance


# ------------------------------------------------------------------------------ fixtures
class Inner(msgspec.Struct):
    x: int


class SearchParams(msgspec.Struct, forbid_unknown_fields=True):
    """Search the index."""

    query: str
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    inner: Inner | None = None
    tags: list[Inner] = []


class Search(Action[SearchParams]):
    """Find documents matching a query."""

    name = "docs.search"

    def run(self, params: SearchParams, ctx: ActionContext) -> list[str]:
        return [params.query] * min(params.limit, 3)


class Tree(msgspec.Struct):
    label: str
    children: list[Tree] = []


class Grow(Action[Tree]):
    def run(self, params: Tree, ctx: ActionContext) -> int:
        return len(params.children)


class Num(msgspec.Struct):
    n: int = 0


class Pair(msgspec.Struct, array_like=True):
    a: int


def now() -> float:
    return asyncio.get_running_loop().time()


# -------------------------------------------------------------------------------- schema
def test_json_schema_of_flat_params_is_an_inline_object() -> None:
    class Flat(msgspec.Struct):
        a: int
        b: str = "x"

    class UsesFlat(Action[Flat]):
        pass

    schema = UsesFlat.json_schema()
    assert schema["type"] == "object"
    assert schema["properties"] == {
        "a": {"type": "integer"},
        "b": {"type": "string", "default": "x"},
    }
    assert schema["required"] == ["a"]
    assert "$defs" not in schema and "$ref" not in schema


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_json_schema_keeps_nested_defs_resolvable() -> None:
    schema = Search.json_schema()
    assert schema["type"] == "object"
    assert schema["description"] == "Search the index."
    assert set(schema["properties"]) == {"query", "limit", "inner", "tags"}
    assert schema["properties"]["limit"] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": 10,
    }
    assert set(schema["$defs"]) == {"Inner"}  # the root itself is inlined, not duplicated
    refs = _refs(schema)
    assert refs and all(r.removeprefix("#/$defs/") in schema["$defs"] for r in refs)


def test_json_schema_inline_removes_every_ref() -> None:
    schema = Search.json_schema(inline=True)
    assert _refs(schema) == [] and "$defs" not in schema
    inner = schema["properties"]["tags"]["items"]
    assert inner["type"] == "object" and inner["required"] == ["x"]


def test_recursive_params_keep_their_root_definition() -> None:
    schema = Grow.json_schema()
    assert schema["$defs"]["Tree"]["type"] == "object"
    assert set(_refs(schema)) == {"#/$defs/Tree"}
    with pytest.raises(ValueError, match="recursive schema of 'Tree'"):
        Grow.json_schema(inline=True)


def test_tool_spec_shape() -> None:
    spec = Search.tool_spec()
    assert set(spec) == {"name", "description", "parameters"}
    assert spec["name"] == "docs-search"  # tool names may not contain '.'
    assert spec["description"] == "Find documents matching a query."
    assert spec["parameters"] == Search.json_schema()
    msgspec.json.encode(spec)  # JSON-serialisable as is

    class Ping(Action):
        description = "Check liveness."

    spec = Ping.tool_spec()
    assert spec["name"] == "ping" and spec["description"] == "Check liveness."
    assert spec["parameters"]["type"] == "object" and spec["parameters"]["properties"] == {}


# ---------------------------------------------------------------------------- definition
@pytest.mark.parametrize(
    ("cls_name", "expected"),
    [
        ("SendEmail", "send_email"),
        ("FetchURLData", "fetch_url_data"),
        ("HTTP2Probe", "http2_probe"),
        ("ping", "ping"),
    ],
)
def test_default_name_is_snake_case(cls_name: str, expected: str) -> None:
    assert snake_case(cls_name) == expected
    cls = type(cls_name, (Action,), {})
    assert cls.name == expected


def test_subclass_gets_its_own_default_name_and_inherits_params() -> None:
    class Base(Action[Num]):
        name = "base.thing"

    class DerivedThing(Base):
        pass

    assert DerivedThing.name == "derived_thing"
    assert DerivedThing.Params is Num


@pytest.mark.parametrize(
    ("attrs", "exc", "needle"),
    [
        ({"name": "Bad-Name"}, ValueError, "name 'Bad-Name' is invalid"),
        ({"name": "a..b"}, ValueError, "name 'a..b' is invalid"),
        ({"Params": dict}, TypeError, "Params must be a msgspec.Struct"),
        ({"Params": Pair}, TypeError, "Params must encode as an object, not array_like"),
        ({"timeout": 0}, ValueError, "timeout must be None or a number > 0"),
        ({"timeout": "1"}, ValueError, "timeout must be None or a number > 0"),
        ({"max_retries": -1}, ValueError, "max_retries must be an int >= 0"),
        ({"max_retries": 1.5}, ValueError, "max_retries must be an int >= 0"),
        ({"backoff_base": -0.1}, ValueError, "backoff_base must be a number >= 0"),
        ({"jitter": 1.5}, ValueError, "jitter must be a fraction in [0, 1]"),
        ({"retryable": (asyncio.CancelledError,)}, TypeError, "retryable must be a tuple"),
        ({"retryable": ValueError}, TypeError, "retryable must be a tuple"),
    ],
)
def test_bad_class_configuration_is_rejected(
    attrs: dict[str, Any], exc: type[Exception], needle: str
) -> None:
    with pytest.raises(exc) as info:
        type("Broken", (Action,), attrs)
    assert needle in str(info.value) and "Broken." in str(info.value)


def test_compensable_flag_follows_override() -> None:
    class Plain(Action):
        pass

    class Undoable(Action):
        def compensate(self, params: NoParams, ctx: ActionContext, error: BaseException) -> None:
            pass

    class StillUndoable(Undoable):
        pass

    flags = [c.compensable for c in (Plain, Undoable, StillUndoable)]
    assert flags == [False, True, True]


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("params", "field", "needle"),
    [
        ({}, "query", "missing required field `query`"),
        ({"query": 5}, "query", "Expected `str`, got `int`"),
        ({"query": "q", "limit": "ten"}, "limit", "Expected `int`, got `str`"),
        ({"query": "q", "limit": 0}, "limit", "Expected `int` >= 1"),
        ({"query": "q", "inner": {"x": "y"}}, "inner.x", "Expected `int`, got `str`"),
        ({"query": "q", "inner": {}}, "inner.x", "missing required field `x`"),
        ({"query": "q", "tags": [{"x": 1}, {"z": 2}]}, "tags[1].x", "missing required"),
        ({"query": "q", "bogus": 1}, "bogus", "unknown field `bogus`"),
        ([1, 2], None, "expected a mapping or SearchParams, got list"),
    ],
)
def test_validation_errors_name_the_field(params: Any, field: str | None, needle: str) -> None:
    with pytest.raises(ActionValidationError) as info:
        Search.validate(params)
    err = info.value
    assert err.field == field
    assert err.action == "docs.search"
    assert needle in err.message
    assert isinstance(err, ValueError)
    if field is not None:
        assert f"field {field!r}" in str(err)


def test_validate_accepts_struct_mapping_other_struct_and_none() -> None:
    p = SearchParams(query="q")
    assert Search.validate(p) is p
    assert Search.validate({"query": "q", "limit": 2}) == SearchParams(query="q", limit=2)

    class NumAction(Action[Num]):
        pass

    assert NumAction.validate(None) == Num(0)

    class Query(msgspec.Struct):
        query: str

    assert Search.validate(Query("z")) == SearchParams(query="z")


def test_validate_json_for_tool_calls() -> None:
    assert Search.validate_json('{"query": "a", "limit": 3}') == SearchParams("a", 3)
    with pytest.raises(ActionValidationError) as info:
        Search.validate_json('{"query": "a", "limit": -3}')
    assert info.value.field == "limit"
    with pytest.raises(ActionValidationError, match="malformed JSON"):
        Search.validate_json("{not json")


# ----------------------------------------------------------------------------- execution
class AsyncEcho(Action[Num]):
    async def run(self, params: Num, ctx: ActionContext) -> tuple[int, Any, int]:
        await asyncio.sleep(0)
        return params.n, ctx.state, ctx.attempt


async def test_execute_sync_and_async_actions() -> None:
    assert await execute(Search, {"query": "hi", "limit": 2}) == ["hi", "hi"]
    ctx = ActionContext(state={"k": 1}, agent_id="a1")
    assert await execute(AsyncEcho, {"n": 4}, ctx) == (4, {"k": 1}, 1)
    assert await execute(AsyncEcho(), Num(5), ctx) == (5, {"k": 1}, 1)


async def test_execute_raises_validation_error_before_running() -> None:
    ran: list[int] = []

    class Counting(Action[Num]):
        def run(self, params: Num, ctx: ActionContext) -> None:
            ran.append(params.n)

    with pytest.raises(ActionValidationError) as info:
        await execute(Counting, {"n": "x"})
    assert info.value.field == "n" and ran == []


def test_execute_sync() -> None:
    assert execute_sync(Search, {"query": "s", "limit": 1}) == ["s"]
    with pytest.raises(TypeError, match=r"is asynchronous.*await execute"):
        execute_sync(AsyncEcho, {"n": 1})


def test_execute_sync_retries_with_the_given_sleep() -> None:
    waits: list[float] = []
    calls: list[int] = []

    class Flaky(Action):
        max_retries = 3
        backoff_base = 1.0
        jitter = 0.0

        def run(self, params: NoParams, ctx: ActionContext) -> str:
            calls.append(ctx.attempt)
            if ctx.attempt < 3:
                raise RetryableError("not yet")
            return "ok"

    assert execute_sync(Flaky, sleep=waits.append) == "ok"
    assert calls == [1, 2, 3] and waits == [1.0, 2.0]
    with pytest.raises(ActionError) as info:
        execute_sync(Flaky, max_retries=1, sleep=waits.append)
    assert info.value.attempts == 2 and info.value.exhausted


class Slow(Action):
    timeout = 1.0

    async def run(self, params: NoParams, ctx: ActionContext) -> str:
        await ctx.clock.sleep(10)
        return "done"


@pytest.mark.virtual_time
async def test_timeout_raises_action_timeout_at_the_deadline() -> None:
    with pytest.raises(ActionTimeout) as info:
        await execute(Slow)
    err = info.value
    assert now() == 1.0
    assert err.timed_out and err.attempts == 1 and err.action == "slow"
    assert isinstance(err.__cause__, TimeoutError)
    assert (err.history[0].started, err.history[0].ended) == (0.0, 1.0)
    # Our cancellation was consumed: the task is not left with a pending cancel.
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await advance(1)
    assert await execute(Slow, timeout=None) == "done" and now() == 12.0


@pytest.mark.virtual_time
async def test_timeouts_are_retried_on_schedule() -> None:
    starts: list[float] = []

    class SlowRetried(Action):
        timeout = 1.0
        max_retries = 2
        backoff_base = 0.5
        jitter = 0.0

        async def run(self, params: NoParams, ctx: ActionContext) -> None:
            starts.append(now())
            await advance(5)

    with pytest.raises(ActionTimeout) as info:
        await execute(SlowRetried)
    assert starts == [0.0, 1.5, 3.5]
    assert [(a.started, a.ended, a.timed_out) for a in info.value.history] == [
        (0.0, 1.0, True),
        (1.5, 2.5, True),
        (3.5, 4.5, True),
    ]
    assert info.value.exhausted
    assert str(info.value) == "action 'slow_retried' timed out on attempt 3, retries exhausted"


def test_timeout_through_a_sim_clock() -> None:
    clock = SimClock()

    async def main() -> None:
        ctx = ActionContext(clock=clock)
        task = asyncio.create_task(execute(Slow, ctx=ctx))
        await clock.run_for(0.5)
        assert not task.done()
        await clock.run_for(1.0)
        assert task.done()
        with pytest.raises(ActionTimeout):
            await task
        assert task.exception() is not None

    asyncio.run(main())
    assert clock.now() == 1.5


class FlakyUntil(Action[Num]):
    """Fails with RetryableError until attempt ``n``; records when each attempt started."""

    max_retries = 10
    backoff_base = 1.0
    backoff_max = 5.0
    jitter = 0.0

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.attempts: list[int] = []

    def run(self, params: Num, ctx: ActionContext) -> str:
        self.starts.append(ctx.clock.now())
        self.attempts.append(ctx.attempt)
        if ctx.attempt < params.n:
            raise RetryableError(f"attempt {ctx.attempt}")
        return f"ok@{ctx.attempt}"


@pytest.mark.virtual_time
async def test_retry_schedule_exact_instants_without_jitter() -> None:
    act = FlakyUntil()
    assert await execute(act, {"n": 6}) == "ok@6"
    # waits 1, 2, 4, then capped at 5, 5
    assert act.starts == [0.0, 1.0, 3.0, 7.0, 12.0, 17.0]
    assert act.attempts == [1, 2, 3, 4, 5, 6]


@pytest.mark.virtual_time
async def test_retries_exhausted() -> None:
    act = FlakyUntil()
    with pytest.raises(ActionError) as info:
        await execute(act, {"n": 99}, max_retries=2)
    err = info.value
    assert not isinstance(err, ActionTimeout) and not err.timed_out
    assert err.attempts == 3 and err.exhausted and act.starts == [0.0, 1.0, 3.0]
    assert isinstance(err.__cause__, RetryableError) and str(err.__cause__) == "attempt 3"
    assert "failed after 3 attempts" in str(err)


@pytest.mark.virtual_time
async def test_jitter_stays_within_bounds_and_is_reproducible() -> None:
    class Jittery(FlakyUntil):
        jitter = 0.5

    async def waits_for(seed: int) -> list[float]:
        act = Jittery()
        await execute(act, {"n": 8}, rng=random.Random(seed))
        return [b - a for a, b in itertools.pairwise(act.starts)]

    waits = await waits_for(7)
    assert waits == pytest.approx(await waits_for(7), rel=1e-9, abs=1e-9)
    assert waits != pytest.approx(await waits_for(8), rel=1e-3)
    nominal = [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    for wait, d in zip(waits, nominal, strict=True):
        assert 0.5 * d - 1e-9 <= wait <= d + 1e-9
    assert any(w < d for w, d in zip(waits, nominal, strict=True))


@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.5, 1.0])
def test_retry_delay_bounds(jitter: float) -> None:
    cls = type("J", (Action,), {"jitter": jitter, "backoff_base": 0.1, "backoff_max": 3.0})
    rng = random.Random(1)
    for attempt in range(1, 200):
        nominal = min(3.0, 0.1 * 2 ** min(attempt - 1, 64))
        d = cls.retry_delay(attempt, rng)
        assert (1 - jitter) * nominal - 1e-12 <= d <= nominal
    assert cls.retry_delay(3, rng, RetryableError(retry_after=7.5)) == 7.5


@pytest.mark.virtual_time
async def test_retry_after_overrides_backoff() -> None:
    starts: list[float] = []

    class RateLimited(Action):
        max_retries = 1

        def run(self, params: NoParams, ctx: ActionContext) -> str:
            starts.append(now())
            if ctx.attempt == 1:
                raise RetryableError("429", retry_after=7.0)
            return "ok"

    assert await execute(RateLimited) == "ok" and starts == [0.0, 7.0]


@pytest.mark.parametrize(
    ("retryable", "raised", "attempts"),
    [
        (None, ValueError("bad"), 1),
        (None, RetryableError("again"), 4),
        (None, TimeoutError("slow peer"), 4),
        ((ConnectionError,), ConnectionResetError("reset"), 4),
        ((ConnectionError,), TimeoutError("slow"), 1),
        ((ConnectionError,), RetryableError("again"), 1),
    ],
)
@pytest.mark.virtual_time
async def test_only_retryable_errors_are_retried(
    retryable: tuple[type[Exception], ...] | None, raised: Exception, attempts: int
) -> None:
    calls: list[int] = []
    attrs: dict[str, Any] = {"max_retries": 3, "run": lambda self, p, ctx: _boom(calls, raised)}
    if retryable is not None:
        attrs["retryable"] = retryable
    cls = type("Failing", (Action,), attrs)
    with pytest.raises(ActionError) as info:
        await execute(cls)
    assert len(calls) == attempts == info.value.attempts
    assert info.value.__cause__ is raised
    assert info.value.exhausted == (attempts == 4)
    assert isinstance(info.value, ActionTimeout) == isinstance(raised, TimeoutError)


def _boom(calls: list[int], exc: Exception) -> None:
    calls.append(1)
    raise exc


@pytest.mark.virtual_time
async def test_outer_cancellation_is_not_retried_nor_converted() -> None:
    class Patient(Action):
        timeout = 100.0
        max_retries = 5

        async def run(self, params: NoParams, ctx: ActionContext) -> None:
            await advance(50)

    task = asyncio.create_task(execute(Patient))
    await advance(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert now() == 1.0


async def test_blocking_action_runs_in_a_thread_and_honours_timeout() -> None:
    release = threading.Event()

    class Blocking(Action):
        blocking = True
        timeout = 0.05

        def run(self, params: NoParams, ctx: ActionContext) -> int:
            release.wait(5)
            return threading.get_ident()

    try:
        with pytest.raises(ActionTimeout):
            await execute(Blocking)
    finally:
        release.set()
    ident = await execute(Blocking)
    assert ident != threading.get_ident()


# ----------------------------------------------------------------------------- decorator
@action
def double(params: Num, ctx: ActionContext) -> int:
    """Double a number."""
    return params.n * 2


@action(name="math.slow_inc", timeout=2.0, max_retries=1, jitter=0.0, backoff_base=0.25)
async def slow_inc(params: Num, ctx: ActionContext) -> int:
    await asyncio.sleep(params.n)
    return params.n + 1


@pytest.mark.virtual_time
async def test_decorated_actions() -> None:
    assert issubclass(double, Action) and double.Params is Num
    assert double.name == "double" and double.description == "Double a number."
    assert double.tool_spec()["parameters"]["properties"] == {
        "n": {"type": "integer", "default": 0}
    }
    assert execute_sync(double, {"n": 21}) == 42
    assert await execute(slow_inc, {"n": 1}) == 2
    assert (slow_inc.name, slow_inc.timeout, slow_inc.max_retries) == ("math.slow_inc", 2.0, 1)
    assert not double.compensable


@pytest.mark.virtual_time
async def test_decorated_action_timeout_and_retry() -> None:
    with pytest.raises(ActionTimeout) as info:
        await execute(slow_inc, {"n": 5})
    assert info.value.attempts == 2 and now() == 4.25


def test_decorator_rejects_bad_signatures() -> None:
    with pytest.raises(TypeError, match=r"must be annotated with a msgspec\.Struct"):

        @action  # type: ignore[type-var]
        def untyped(params: dict[str, Any], ctx: ActionContext) -> None: ...

    with pytest.raises(TypeError, match=r"expected a function \(params, ctx\)"):

        @action  # type: ignore[arg-type]
        def one_arg(params: Num) -> None: ...


async def test_decorator_compensate_marks_compensable() -> None:
    undone: list[tuple[int, str]] = []

    def give_back(params: Num, ctx: ActionContext, error: BaseException) -> None:
        undone.append((params.n, type(error).__name__))

    @action(compensate=give_back)
    def reserve(params: Num, ctx: ActionContext) -> int:
        return params.n

    j = Journal()
    assert reserve.compensable and reserve.name == "reserve"
    with pytest.raises(WorkflowError) as info:
        await run_chain([(reserve, {"n": 3}), recorder(j, "fails", fail=True)])
    assert info.value.compensated == ("reserve",) and undone == [(3, "ActionError")]


# ---------------------------------------------------------------------------- chains
class Journal:
    """Shared record of what ran and what was compensated, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []


def recorder(
    journal: Journal,
    name: str,
    *,
    compensable: bool = True,
    fail: bool = False,
    seconds: float = 0.0,
    result: Any = None,
    bad_undo: bool = False,
) -> type[Action[NoParams]]:
    """An action class that logs run/undo into ``journal`` and optionally fails or sleeps."""

    async def run(self: Action[NoParams], params: NoParams, ctx: ActionContext) -> Any:
        journal.events.append(f"start {name}")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            journal.events.append(f"cancelled {name}")
            raise
        if fail:
            raise ValueError(f"{name} broke")
        journal.events.append(f"done {name}")
        return result if result is not None else name

    def undo(
        self: Action[NoParams], params: NoParams, ctx: ActionContext, error: Exception
    ) -> None:
        journal.events.append(f"undo {name} ({error.__class__.__name__})")
        if bad_undo:
            raise RuntimeError(f"cannot undo {name}")

    attrs: dict[str, Any] = {"name": name, "run": run}
    if compensable:
        attrs["compensate"] = undo
    return type(name.capitalize(), (Action,), attrs)


class AddParams(msgspec.Struct):
    x: int
    y: int = 0


class Add(Action[AddParams]):
    def run(self, params: AddParams, ctx: ActionContext) -> dict[str, Any]:
        seen = sorted(ctx.extra.get("results", {}))
        return {"x": params.x + params.y, "seen": seen}


class Total(msgspec.Struct):
    x: int
    label: str


class Label(Action[AddParams]):
    def run(self, params: AddParams, ctx: ActionContext) -> Total:
        return Total(params.x, f"x={params.x}")


async def test_chain_flows_outputs_forward() -> None:
    out = await run_chain(
        [
            Add,  # x=1 from initial, y=2 -> {"x": 3}
            (Add, {"y": 10}),  # x=3 flows in, own y=10 -> 13
            Label,  # Struct result flows as fields
            Step("last", Add, lambda flowing: {"x": flowing["x"] * 100}),
        ],
        initial={"x": 1, "y": 2},
    )
    # The callable saw x=13 from Label's Total; y is not carried since the callable dropped it.
    assert out == {"x": 1300, "seen": ["add", "add#2", "label"]}


async def test_chain_result_that_is_not_a_mapping_does_not_flow() -> None:
    class Const(Action):
        def run(self, params: NoParams, ctx: ActionContext) -> int:
            return 7

    assert await run_chain([Const, Add], initial={"x": 2, "y": 3}) == {"x": 5, "seen": ["const"]}


async def test_chain_compensates_completed_steps_in_reverse() -> None:
    j = Journal()
    steps = [
        recorder(j, "a"),
        recorder(j, "b", compensable=False),
        recorder(j, "c"),
        recorder(j, "d", fail=True),
        recorder(j, "e"),
    ]
    with pytest.raises(WorkflowError) as info:
        await run_chain(steps)
    err = info.value
    ran = [f"{verb} {s}" for s in "abc" for verb in ("start", "done")]
    assert j.events == [*ran, "start d", "undo c (ActionError)", "undo a (ActionError)"]
    assert (err.step, err.action) == ("d", "d")
    assert err.completed == ("a", "b", "c") and err.compensated == ("c", "a")
    assert isinstance(err.error, ActionError) and err.__cause__ is err.error
    assert isinstance(err.error.__cause__, ValueError)
    assert "compensated c, a" in str(err)


async def test_compensation_failures_are_collected_not_raised() -> None:
    j = Journal()
    steps = [recorder(j, "a"), recorder(j, "b", bad_undo=True), recorder(j, "c", fail=True)]
    with pytest.raises(WorkflowError) as info:
        await run_chain(steps)
    err = info.value
    assert err.compensated == ("a",)
    assert list(err.compensation_errors) == ["b"]
    assert isinstance(err.compensation_errors["b"], RuntimeError)
    assert "compensation FAILED for b" in str(err)
    assert j.events[-2:] == ["undo b (ActionError)", "undo a (ActionError)"]


async def test_chain_validation_failure_is_a_workflow_error() -> None:
    j = Journal()
    with pytest.raises(WorkflowError) as info:
        await run_chain([recorder(j, "a"), (Add, {"y": 1})])  # Add lacks x
    assert info.value.step == "add" and isinstance(info.value.error, ActionValidationError)
    assert info.value.compensated == ("a",)


@pytest.mark.parametrize(
    ("steps", "exc", "needle"),
    [
        ([], ValueError, "at least one step"),
        ([Step("a", Add), Step("a", Add)], WorkflowDefinitionError, "duplicate step id 'a'"),
        ([Step("a", Add, depends_on=("b",))], WorkflowDefinitionError, "has depends_on"),
        ([42], TypeError, "step 0: expected a Step"),
        ([(Add, {}, 1)], TypeError, "expected (action, params), got a 3-tuple"),
    ],
)
async def test_bad_chains(steps: list[Any], exc: type[Exception], needle: str) -> None:
    with pytest.raises(exc) as info:
        await run_chain(steps, initial={"x": 1})
    assert needle in str(info.value)


# ------------------------------------------------------------------------------- DAGs
@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        (
            [Step("a", Add), Step("b", Add, depends_on=["a", "x"])],
            "step 'b' depends on unknown step 'x'",
        ),
        ([Step("a", Add, depends_on=["a"])], "cycle: a -> a"),
        (
            [
                Step("a", Add, depends_on=["c"]),
                Step("b", Add, depends_on=["a"]),
                Step("c", Add, depends_on=["b"]),
                Step("d", Add),
            ],
            "cycle: a -> c -> b -> a (-> means 'depends on')",
        ),
        ([Step("a", Add), Step("a", Add)], "duplicate step id 'a'"),
    ],
)
def test_workflow_validation_errors(steps: list[Step], needle: str) -> None:
    with pytest.raises(WorkflowDefinitionError) as info:
        Workflow(steps).validate()
    assert needle in str(info.value)


def test_workflow_validate_returns_a_topological_order() -> None:
    steps = [
        Step("d", Add, depends_on=["b", "c"]),
        Step("b", Add, depends_on=["a"]),
        Step("c", Add, depends_on=["a"]),
        Step("a", Add),
    ]
    order = Workflow(steps).validate()
    assert sorted(order) == ["a", "b", "c", "d"]
    for s in steps:
        assert all(order.index(dep) < order.index(s.id) for dep in s.depends_on)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"id": "", "action": Add}, "non-empty string"),
        ({"id": "a", "action": int}, "must be an Action subclass"),
        ({"id": "a", "action": Add, "depends_on": "b"}, "not the string 'b'"),
        ({"id": "a", "action": Add, "params": 3}, "params must be a mapping"),
    ],
)
def test_bad_steps(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(TypeError, match=needle):
        Step(**kwargs)


class Sleep(Action[Num]):
    """Sleeps ``n`` virtual seconds, tracking how many sleepers run at once."""

    active = 0
    peak = 0

    async def run(self, params: Num, ctx: ActionContext) -> float:
        cls = type(self)
        cls.active += 1
        cls.peak = max(cls.peak, cls.active)
        try:
            await asyncio.sleep(params.n)
        finally:
            cls.active -= 1
        return now()


@pytest.fixture
def sleeper() -> type[Sleep]:
    return type("Sleeper", (Sleep,), {"active": 0, "peak": 0})


@pytest.mark.virtual_time
async def test_independent_steps_run_in_parallel(sleeper: type[Sleep]) -> None:
    results = await Workflow([Step("a", sleeper, {"n": 10}), Step("b", sleeper, {"n": 10})]).run()
    assert results == {"a": 10.0, "b": 10.0} and now() == 10.0 and sleeper.peak == 2
    assert await run_parallel([(sleeper, {"n": 3}), (sleeper, {"n": 1})]) == [13.0, 11.0]


@pytest.mark.virtual_time
async def test_dag_starts_each_step_when_its_dependencies_finish(sleeper: type[Sleep]) -> None:
    steps = [
        Step("a", sleeper, {"n": 1}),
        Step("b", sleeper, {"n": 2}, depends_on=["a"]),
        Step("c", sleeper, {"n": 3}, depends_on=["a"]),
        Step("d", sleeper, {"n": 1}, depends_on=["b"]),
        Step("e", sleeper, {"n": 1}, depends_on=["c", "d"]),
    ]
    results = await Workflow(steps).run()
    assert results == {"a": 1.0, "b": 3.0, "c": 4.0, "d": 4.0, "e": 5.0}
    assert list(results) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(("limit", "end"), [(None, 10.0), (1, 40.0), (2, 20.0), (3, 20.0)])
@pytest.mark.virtual_time
async def test_max_parallel_limits_concurrency(
    sleeper: type[Sleep], limit: int | None, end: float
) -> None:
    steps = [Step(f"s{i}", sleeper, {"n": 10}) for i in range(4)]
    await Workflow(steps).run(max_parallel=limit)
    assert now() == end
    assert sleeper.peak == (limit or 4)


async def test_max_parallel_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_parallel must be None or an int >= 1"):
        await Workflow([Step("a", Add, {"x": 1})]).run(max_parallel=0)


class Collect(Action):
    def run(self, params: NoParams, ctx: ActionContext) -> dict[str, Any]:
        assert ctx.extra["tenant"] == "t1"  # the caller's extra survives
        return {"step": ctx.extra["step"], "upstream": dict(ctx.extra["results"])}


async def test_upstream_results_reach_params_and_context() -> None:
    seen: list[Mapping[str, Any]] = []

    def params_for_sum(results: Mapping[str, Any]) -> dict[str, Any]:
        seen.append(dict(results))
        return {"x": results["one"]["x"], "y": results["two"]["x"]}

    steps = [
        Step("one", Add, {"x": 1}),
        Step("two", Add, {"x": 2}),
        Step("sum", Add, params_for_sum, depends_on=["one", "two"]),
        Step("report", Collect, depends_on=["sum"]),
        Step("alone", Collect),
    ]
    results = await Workflow(steps).run(ctx=ActionContext(extra={"tenant": "t1"}))
    assert results["sum"] == {"x": 3, "seen": ["one", "two"]}
    assert seen == [{"one": results["one"], "two": results["two"]}]
    # Transitive ancestors are included, in declaration order.
    assert results["report"] == {
        "step": "report",
        "upstream": {"one": results["one"], "two": results["two"], "sum": results["sum"]},
    }
    assert results["alone"] == {"step": "alone", "upstream": {}}


@pytest.mark.virtual_time
async def test_dag_failure_cancels_running_and_compensates_in_reverse_completion_order() -> None:
    j = Journal()
    steps = [
        Step("slow", recorder(j, "slow", seconds=2)),
        Step("fast", recorder(j, "fast", seconds=1)),
        Step("plain", recorder(j, "plain", seconds=1.5, compensable=False)),
        Step("boom", recorder(j, "boom", seconds=3, fail=True), depends_on=["fast"]),
        Step("long", recorder(j, "long", seconds=10), depends_on=["fast"]),
        Step("never", recorder(j, "never"), depends_on=["boom"]),
    ]
    with pytest.raises(WorkflowError) as info:
        await Workflow(steps).run()
    err = info.value
    assert now() == 4.0  # boom starts at 1 (after fast) and fails at 1 + 3
    assert (err.step, err.completed) == ("boom", ("fast", "plain", "slow"))
    assert err.compensated == ("slow", "fast")
    assert err.cancelled == ("long",)
    assert err.results == {"fast": "fast", "plain": "plain", "slow": "slow"}
    assert "cancelled long" in j.events and "start never" not in j.events
    assert j.events[-2:] == ["undo slow (ActionError)", "undo fast (ActionError)"]


async def test_dag_params_callable_failure_is_reported() -> None:
    def broken(results: Mapping[str, Any]) -> dict[str, Any]:
        raise KeyError("missing upstream")

    j = Journal()
    with pytest.raises(WorkflowError) as info:
        await Workflow([Step("a", recorder(j, "a")), Step("b", Add, broken, ["a"])]).run()
    assert info.value.step == "b" and isinstance(info.value.error, KeyError)
    assert info.value.compensated == ("a",)


async def test_run_parallel_rejects_dependencies_and_handles_empty() -> None:
    with pytest.raises(WorkflowDefinitionError, match="independent"):
        await run_parallel([Step("a", Add, {"x": 1}), Step("b", Add, {"x": 1}, ["a"])])
    assert await run_parallel([]) == []
    assert await Workflow([]).run() == {}


@pytest.mark.virtual_time
async def test_workflow_steps_use_action_retry_policy() -> None:
    act = FlakyUntil()
    results = await Workflow([Step("flaky", act, {"n": 3})]).run(rng=random.Random(0))
    assert results == {"flaky": "ok@3"} and act.starts == [0.0, 1.0, 3.0]


@pytest.mark.virtual_time
async def test_outer_cancellation_of_a_workflow_propagates_without_compensation() -> None:
    j = Journal()
    wf = Workflow(
        [Step("a", recorder(j, "a")), Step("b", recorder(j, "b", seconds=5), depends_on=["a"])]
    )
    task = asyncio.create_task(wf.run())
    await advance(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert j.events == ["start a", "done a", "start b", "cancelled b"]
