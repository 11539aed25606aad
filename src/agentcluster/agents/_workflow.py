"""Workflows: chains, DAGs and parallel groups of actions, with saga-style compensation.

Theory of operation: a :class:`Step` names an action, its params and the steps it depends on.

* :func:`run_chain` runs steps one after the other. A dict of params *flows* through the chain:
  it starts as ``initial``; a step gets the flowing dict overlaid with its own mapping params (its
  own values win), and when its result is a Mapping or Struct, the result's fields are merged into
  the flowing dict for the next steps. A callable ``params`` receives the flowing dict and returns
  the step's params (a transform). The chain returns the last step's result.
* :class:`Workflow` runs a DAG. It starts every step whose dependencies are done, in a
  TaskGroup (optionally at most ``max_parallel`` at a time, admitted in declaration order), and
  returns the results by step id. A callable ``params`` receives the results of all the step's
  ancestors (direct and transitive dependencies, so always complete and deterministic); the same
  mapping is in ``ctx.extra["results"]`` and the step id in ``ctx.extra["step"]``.
* On a failure (validation, params callable, or :func:`execute` giving up) the running steps are
  cancelled, steps not yet started never start, and every *completed* compensable step is
  compensated in reverse completion order; the failed and cancelled steps are not (they did not
  complete). Compensation errors are collected, never raised over the original failure, which
  surfaces as a :class:`WorkflowError`. A workflow cancelled from outside propagates the
  cancellation and does not compensate (the canceller owns the cleanup).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import msgspec

from agentcluster.agents.actions import (
    Action,
    ActionContext,
    compensate_once,
    execute,
    instantiate,
)

__all__ = [
    "Step",
    "Workflow",
    "WorkflowDefinitionError",
    "WorkflowError",
    "run_chain",
    "run_parallel",
]

ParamsFn: TypeAlias = Callable[[Mapping[str, Any]], Mapping[str, Any] | msgspec.Struct | None]
ParamsSpec: TypeAlias = Mapping[str, Any] | msgspec.Struct | ParamsFn
ActionRef: TypeAlias = type[Action[Any]] | Action[Any]
StepLike: TypeAlias = "Step | ActionRef | tuple[ActionRef, ParamsSpec]"


class WorkflowDefinitionError(ValueError):
    """The steps do not form a valid workflow (duplicate id, unknown dependency, cycle)."""


class WorkflowError(Exception):
    """A step failed; completed compensable steps were compensated (see the attributes)."""

    def __init__(
        self,
        step: str,
        action: str,
        error: BaseException,
        *,
        completed: Sequence[str] = (),
        compensated: Sequence[str] = (),
        compensation_errors: Mapping[str, BaseException] | None = None,
        cancelled: Sequence[str] = (),
        results: Mapping[str, Any] | None = None,
        other_errors: Mapping[str, BaseException] | None = None,
    ) -> None:
        self.step = step
        self.action = action
        self.error = error
        self.completed = tuple(completed)
        self.compensated = tuple(compensated)
        self.compensation_errors = dict(compensation_errors or {})
        self.cancelled = tuple(cancelled)
        self.results = dict(results or {})
        # Failures of other steps that raced the first one (e.g. raised while being cancelled).
        self.other_errors = dict(other_errors or {})
        msg = f"workflow step {step!r} (action {action!r}) failed: {error}"
        if self.compensated:
            msg += f"; compensated {', '.join(self.compensated)}"
        if self.compensation_errors:
            failed = ", ".join(
                f"{sid} ({type(exc).__name__}: {exc})"
                for sid, exc in self.compensation_errors.items()
            )
            msg += f"; compensation FAILED for {failed}"
        super().__init__(msg)


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """One node of a workflow: ``action`` run with ``params`` after ``depends_on`` are done."""

    id: str
    action: ActionRef
    params: ParamsSpec = dataclasses.field(default_factory=dict)
    depends_on: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise TypeError(f"step id must be a non-empty string, got {self.id!r}")
        if not (
            isinstance(self.action, Action)
            or (isinstance(self.action, type) and issubclass(self.action, Action))
        ):
            raise TypeError(
                f"step {self.id!r}: action must be an Action subclass or instance, "
                f"got {self.action!r}"
            )
        if not (callable(self.params) or isinstance(self.params, Mapping | msgspec.Struct)):
            raise TypeError(
                f"step {self.id!r}: params must be a mapping, a Struct or a callable, "
                f"got {type(self.params).__name__}"
            )
        if isinstance(self.depends_on, str):
            raise TypeError(
                f"step {self.id!r}: depends_on must be a sequence of step ids, not the string "
                f"{self.depends_on!r} (write ({self.depends_on!r},))"
            )
        deps = tuple(self.depends_on)
        for dep in deps:
            if not isinstance(dep, str):
                raise TypeError(f"step {self.id!r}: dependency {dep!r} is not a step id")
        object.__setattr__(self, "depends_on", deps)

    @property
    def action_name(self) -> str:
        return self.action.name


@dataclasses.dataclass(slots=True)
class _Done:
    id: str
    inst: Action[Any]
    params: msgspec.Struct
    ctx: ActionContext


class _StepFailed(Exception):
    """Raised inside the TaskGroup so that it cancels the other steps."""


def _as_mapping(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, msgspec.Struct):
        return msgspec.structs.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"expected a mapping or a Struct, got {type(value).__name__}")


async def _compensate(
    done: Sequence[_Done], error: BaseException
) -> tuple[list[str], dict[str, BaseException]]:
    compensated: list[str] = []
    failures: dict[str, BaseException] = {}
    for entry in reversed(done):
        if not type(entry.inst).compensable:
            continue
        try:
            await compensate_once(entry.inst, entry.params, entry.ctx, error)
        except Exception as exc:
            failures[entry.id] = exc
        else:
            compensated.append(entry.id)
    return compensated, failures


def _coerce_steps(steps: Iterable[StepLike]) -> list[Step]:
    out: list[Step] = []
    seen: dict[str, int] = {}

    def auto_id(ref: ActionRef) -> str:
        base = ref.name
        seen[base] = seen.get(base, 0) + 1
        return base if seen[base] == 1 else f"{base}#{seen[base]}"

    for i, item in enumerate(steps):
        if isinstance(item, Step):
            out.append(item)
        elif isinstance(item, tuple):
            if len(item) != 2:
                raise TypeError(f"step {i}: expected (action, params), got a {len(item)}-tuple")
            ref, params = item
            _check_ref(i, ref)
            out.append(Step(auto_id(ref), ref, params))
        else:
            _check_ref(i, item)
            out.append(Step(auto_id(item), item))
    return out


def _check_ref(index: int, ref: object) -> None:
    if isinstance(ref, Action) or (isinstance(ref, type) and issubclass(ref, Action)):
        return
    raise TypeError(
        f"step {index}: expected a Step, an Action (class or instance) or (action, params), "
        f"got {ref!r}"
    )


def _check_unique(steps: Sequence[Step]) -> None:
    ids: set[str] = set()
    for step in steps:
        if step.id in ids:
            raise WorkflowDefinitionError(f"duplicate step id {step.id!r}")
        ids.add(step.id)


# ------------------------------------------------------------------------------------ chain
async def run_chain(
    steps: Sequence[StepLike],
    initial: Mapping[str, Any] | msgspec.Struct | None = None,
    ctx: ActionContext | None = None,
    *,
    rng: random.Random | None = None,
) -> Any:
    """Run ``steps`` in order, flowing params forward; return the last step's result."""
    items = _coerce_steps(steps)
    if not items:
        raise ValueError("run_chain needs at least one step")
    _check_unique(items)
    for step in items:
        if step.depends_on:
            raise WorkflowDefinitionError(
                f"chain step {step.id!r} has depends_on; a chain runs in list order "
                "(use Workflow for dependencies)"
            )
    ctx = ctx if ctx is not None else ActionContext()
    flowing = _as_mapping(initial)
    results: dict[str, Any] = {}
    done: list[_Done] = []
    last: Any = None
    for step in items:
        inst = instantiate(step.action)
        try:
            spec = step.params
            raw = spec(dict(flowing)) if callable(spec) else {**flowing, **_as_mapping(spec)}
            params = type(inst).validate(raw)
            sctx = ctx.with_extra(results=dict(results), step=step.id)
            last = await execute(inst, params, sctx, rng=rng)
        except Exception as exc:
            compensated, comp_errors = await _compensate(done, exc)
            raise WorkflowError(
                step.id,
                inst.name,
                exc,
                completed=[d.id for d in done],
                compensated=compensated,
                compensation_errors=comp_errors,
                results=results,
            ) from exc
        results[step.id] = last
        done.append(_Done(step.id, inst, params, sctx))
        if isinstance(last, Mapping | msgspec.Struct):
            flowing.update(_as_mapping(last))
    return last


# -------------------------------------------------------------------------------------- DAG
class Workflow:
    """A DAG of steps; ``validate()`` checks it, ``await run()`` executes it."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps: tuple[Step, ...] = tuple(steps)
        for i, step in enumerate(self.steps):
            if not isinstance(step, Step):
                raise TypeError(f"workflow step {i} must be a Step, got {step!r}")

    def validate(self) -> list[str]:
        """Check ids, dependencies and acyclicity; return the step ids in a topological order."""
        _check_unique(self.steps)
        by_id = {s.id: s for s in self.steps}
        unknown = [
            f"step {s.id!r} depends on unknown step {d!r}"
            for s in self.steps
            for d in s.depends_on
            if d not in by_id
        ]
        if unknown:
            raise WorkflowDefinitionError("; ".join(unknown))
        # Iterative DFS with colours; a grey node met again closes a cycle on the current path.
        white, grey, black = 0, 1, 2
        colour = dict.fromkeys(by_id, white)
        order: list[str] = []
        for root in by_id:
            if colour[root] != white:
                continue
            path = [root]
            stack = [iter(by_id[root].depends_on)]
            colour[root] = grey
            while stack:
                dep = next(stack[-1], None)
                if dep is None:
                    stack.pop()
                    node = path.pop()
                    colour[node] = black
                    order.append(node)
                elif colour[dep] == grey:
                    cycle = [*path[path.index(dep) :], dep]
                    raise WorkflowDefinitionError(
                        "workflow has a dependency cycle: "
                        + " -> ".join(cycle)
                        + " (-> means 'depends on')"
                    )
                elif colour[dep] == white:
                    colour[dep] = grey
                    path.append(dep)
                    stack.append(iter(by_id[dep].depends_on))
        return order

    async def run(
        self,
        ctx: ActionContext | None = None,
        rng: random.Random | None = None,
        max_parallel: int | None = None,
    ) -> dict[str, Any]:
        """Run every step once its dependencies are done; return results by step id."""
        order = self.validate()
        if max_parallel is not None and (
            not isinstance(max_parallel, int) or isinstance(max_parallel, bool) or max_parallel < 1
        ):
            raise ValueError(f"max_parallel must be None or an int >= 1, got {max_parallel!r}")
        ctx = ctx if ctx is not None else ActionContext()
        by_id = {s.id: s for s in self.steps}
        position = {s.id: i for i, s in enumerate(self.steps)}
        ancestors: dict[str, list[str]] = {}
        for sid in order:  # dependencies come first in a topological order
            found: set[str] = set()
            for dep in by_id[sid].depends_on:
                found.add(dep)
                found.update(ancestors[dep])
            ancestors[sid] = sorted(found, key=position.__getitem__)
        waiting = {s.id: set(s.depends_on) for s in self.steps}
        dependents: dict[str, list[str]] = {s.id: [] for s in self.steps}
        for s in self.steps:
            for dep in dict.fromkeys(s.depends_on):
                dependents[dep].append(s.id)

        results: dict[str, Any] = {}
        done: list[_Done] = []
        started: list[str] = []
        failures: list[tuple[str, str, BaseException]] = []
        gate: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(max_parallel) if max_parallel else contextlib.nullcontext()
        )

        async def run_step(step: Step, tg: asyncio.TaskGroup) -> None:
            async with gate:
                inst = instantiate(step.action)
                started.append(step.id)
                try:
                    upstream = {a: results[a] for a in ancestors[step.id]}
                    spec = step.params
                    raw = spec(upstream) if callable(spec) else spec
                    params = type(inst).validate(raw)
                    sctx = ctx.with_extra(results=upstream, step=step.id)
                    value = await execute(inst, params, sctx, rng=rng)
                except Exception as exc:
                    failures.append((step.id, inst.name, exc))
                    raise _StepFailed from exc
                # No await since execute() returned: a completed step is always recorded.
                results[step.id] = value
                done.append(_Done(step.id, inst, params, sctx))
            if failures:
                return  # the group is shutting down; it would refuse new tasks anyway
            for nxt in dependents[step.id]:
                waiting[nxt].discard(step.id)
                if not waiting[nxt]:
                    tg.create_task(run_step(by_id[nxt], tg), name=f"workflow step {nxt}")

        try:
            async with asyncio.TaskGroup() as tg:
                for s in self.steps:
                    if not s.depends_on:
                        tg.create_task(run_step(s, tg), name=f"workflow step {s.id}")
        except* _StepFailed:
            pass
        if not failures:
            return {s.id: results[s.id] for s in self.steps}

        step_id, action_name, error = failures[0]
        failed_ids = {f[0] for f in failures}
        cancelled = [s for s in started if s not in results and s not in failed_ids]
        compensated, comp_errors = await _compensate(done, error)
        raise WorkflowError(
            step_id,
            action_name,
            error,
            completed=[d.id for d in done],
            compensated=compensated,
            compensation_errors=comp_errors,
            cancelled=cancelled,
            results=results,
            other_errors={sid: exc for sid, _, exc in failures[1:]},
        ) from error


async def run_parallel(
    steps: Sequence[StepLike],
    ctx: ActionContext | None = None,
    *,
    rng: random.Random | None = None,
    max_parallel: int | None = None,
) -> list[Any]:
    """Run independent steps concurrently; return their results in the order given."""
    items = _coerce_steps(steps)
    for step in items:
        if step.depends_on:
            raise WorkflowDefinitionError(
                f"parallel step {step.id!r} has depends_on; run_parallel takes independent "
                "steps (use Workflow for dependencies)"
            )
    results = await Workflow(items).run(ctx, rng=rng, max_parallel=max_parallel)
    return [results[s.id] for s in items]
