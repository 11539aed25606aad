"""Agents: declarative definitions, pure ``cmd``, lifecycle hooks, checkpoints.

Theory of operation: an agent *definition* is a subclass of :class:`Agent` that declares, as
class attributes, a ``name``, a ``State`` schema (a msgspec Struct), its ``actions``, the
signal ``routes`` that map signal types to actions, and mounted ``skills``. The class is
compiled once (``__init_subclass__``): action table, router, skill namespaces — so a bad
definition fails at import time with an error naming the culprit.

An agent *value* is an instance: ``id``, ``state`` and the state of each mounted skill. It is
treated as immutable: :func:`cmd` runs an instruction (an action with params, or a signal that
the routes turn into one) and returns ``(new_state, directives)`` without touching the world.
Actions return ``None``, a new state, a dict of field updates, directives, or a
:class:`Result`. The runtime (``AgentServer``) swaps the state in and executes the directives.

``cmd`` runs synchronous actions only (that is what makes it pure and testable in a table);
``acmd`` is the async twin the server uses: it awaits async actions and applies each action's
timeout and retry policy through :func:`agentcluster.agents.actions.execute`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Self

import msgspec

from agentcluster.agents.actions import (
    Action,
    ActionContext,
    ActionValidationError,
    execute,
    snake_case,
)
from agentcluster.agents.directives import Directive, Reply
from agentcluster.agents.skills import Skill
from agentcluster.clock import Clock, MonotonicClock
from agentcluster.signals import Signal
from agentcluster.signals.router import Router

__all__ = [
    "Agent",
    "AgentDefinitionError",
    "AgentError",
    "CheckpointError",
    "EmptyState",
    "Instruction",
    "NoRoute",
    "Result",
    "Route",
    "UnknownAction",
    "acmd",
    "cmd",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-.]*$")


class AgentError(Exception):
    """Base class for errors raised by agent definitions and commands."""


class AgentDefinitionError(AgentError, TypeError):
    """An agent class is declared wrongly (the message names the attribute)."""


class UnknownAction(AgentError, LookupError):
    pass


class NoRoute(AgentError, LookupError):
    """A signal reached an agent that has no route for its type."""


class CheckpointError(AgentError, ValueError):
    """A checkpoint cannot be restored into this agent definition."""


class EmptyState(msgspec.Struct, frozen=True):
    """The state of an agent that keeps none."""


class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()


# Result and Instruction are frozen msgspec Structs rather than frozen dataclasses: one of
# each is built for every message an agent runs, and a frozen dataclass's per-field
# ``object.__setattr__`` made that 0.8 us apiece instead of 0.1 (they never go on the wire).
class Result(msgspec.Struct, frozen=True):
    """Full form of an action's outcome inside an agent."""

    state: Any = UNCHANGED
    directives: Sequence[Directive] = ()
    reply: Any = None


class Instruction(msgspec.Struct, frozen=True):
    """Run ``action`` with ``params``; ``signal`` is the signal that asked for it, if any."""

    action: str | type[Action[Any]]
    params: Any = None
    signal: Signal | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Signals whose type matches ``pattern`` run ``action``.

    ``params`` turns the signal into the action's params; by default the signal's ``data``
    (a mapping, or None for no params) is used.
    """

    pattern: str
    action: str | type[Action[Any]]
    priority: int = 0
    predicate: Callable[[Signal], bool] | None = None
    params: Callable[[Signal], Any] | None = None


@dataclass(slots=True)
class _Compiled:
    actions: dict[str, tuple[type[Action[Any]], str | None]] = field(default_factory=dict)
    # Targets carry the owning skill's state key (None: the agent itself).
    router: Router[tuple[Route, str | None]] = field(default_factory=Router)
    skills: dict[str, Skill] = field(default_factory=dict)


def _as_route(item: Route | tuple[Any, ...]) -> Route:
    if isinstance(item, Route):
        return item
    if isinstance(item, tuple) and len(item) in (2, 3):
        return Route(item[0], item[1], *(item[2:]))
    raise AgentDefinitionError(
        f"a route must be a Route or (pattern, action[, priority]): {item!r}"
    )


class Agent:
    """Base class of agent definitions. Subclass it and declare the class attributes."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    State: ClassVar[type[msgspec.Struct]] = EmptyState
    actions: ClassVar[Sequence[type[Action[Any]]]] = ()
    routes: ClassVar[Sequence[Route | tuple[Any, ...]]] = ()
    skills: ClassVar[Sequence[Skill]] = ()
    _compiled: ClassVar[_Compiled]

    __slots__ = ("id", "skill_states", "state")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__).lstrip("_")
        if not isinstance(cls.name, str) or not _NAME_RE.match(cls.name):
            raise AgentDefinitionError(
                f"{cls.__qualname__}.name {cls.name!r} must match {_NAME_RE.pattern}"
            )
        if not (isinstance(cls.State, type) and issubclass(cls.State, msgspec.Struct)):
            raise AgentDefinitionError(f"{cls.__qualname__}.State must be a msgspec.Struct class")
        cls._compiled = _compile(cls)

    def __init__(
        self,
        id: str | None = None,
        state: Any = None,
        skill_states: Mapping[str, Any] | None = None,
    ) -> None:
        self.id = id if id is not None else self.name
        self.state = self._initial_state() if state is None else self._validate_state(state)
        skills = self._compiled.skills
        given = dict(skill_states or {})
        unknown = set(given) - set(skills)
        if unknown:
            raise AgentError(f"agent {self.name!r} has no skill state key(s) {sorted(unknown)}")
        self.skill_states: dict[str, Any] = {
            key: given[key] if key in given else skill.initial_state()
            for key, skill in skills.items()
        }

    # ------------------------------------------------------------------ state helpers
    @classmethod
    def _initial_state(cls) -> Any:
        try:
            return cls.State()
        except TypeError:
            raise AgentError(
                f"agent {cls.name!r}: State {cls.State.__name__} has required fields; "
                "pass an initial state"
            ) from None

    @classmethod
    def _validate_state(cls, state: Any) -> Any:
        if isinstance(state, cls.State):
            return state
        try:
            return msgspec.convert(state, cls.State)
        except msgspec.ValidationError as exc:
            raise AgentError(f"agent {cls.name!r}: invalid state: {exc}") from None

    def with_state(self, state: Any, skill_states: Mapping[str, Any] | None = None) -> Self:
        new = object.__new__(type(self))
        new.id = self.id
        new.state = state
        new.skill_states = dict(skill_states) if skill_states is not None else self.skill_states
        return new

    # ------------------------------------------------------------------ lifecycle hooks
    def on_start(self) -> Result | None:
        """Called once when the server starts the agent; may change state and emit directives."""
        return None

    def on_before_cmd(self, instruction: Instruction) -> Instruction:
        """May rewrite the instruction, or raise to reject it."""
        return instruction

    def on_after_cmd(
        self, instruction: Instruction, state: Any, directives: list[Directive]
    ) -> tuple[Any, list[Directive]]:
        """May adjust the outcome of a command."""
        return state, directives

    def on_error(self, instruction: Instruction, error: BaseException) -> Result | None:
        """Return a Result to recover from a failed action, or None to let the error through."""
        return None

    # ------------------------------------------------------------------ commands
    def cmd(
        self,
        instruction: Instruction | Signal | type[Action[Any]] | str,
        *,
        clock: Clock | None = None,
    ) -> tuple[Any, list[Directive]]:
        return cmd(self, instruction, clock=clock)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> bytes:
        """The agent's id and state (and skill states) as msgpack."""
        return _CKPT_ENC.encode(
            _Checkpoint(
                agent=self.name,
                id=self.id,
                state=msgspec.to_builtins(self.state),
                skills={k: msgspec.to_builtins(v) for k, v in self.skill_states.items()},
            )
        )

    @classmethod
    def restore(cls, data: bytes) -> Self:
        try:
            ckpt = _CKPT_DEC.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"not an agent checkpoint: {exc}") from None
        if ckpt.agent != cls.name:
            raise CheckpointError(
                f"checkpoint is of agent {ckpt.agent!r}, cannot restore into {cls.name!r}"
            )
        try:
            state = msgspec.convert(ckpt.state, cls.State)
        except msgspec.ValidationError as exc:
            raise CheckpointError(
                f"checkpoint state does not match {cls.name}.State ({cls.State.__name__}): {exc}"
            ) from None
        skill_states: dict[str, Any] = {}
        for key, skill in cls._compiled.skills.items():
            if key not in ckpt.skills:
                raise CheckpointError(f"checkpoint lacks the state of skill {key!r}")
            try:
                skill_states[key] = msgspec.convert(ckpt.skills[key], skill.State)
            except msgspec.ValidationError as exc:
                raise CheckpointError(
                    f"checkpoint state of skill {key!r} does not match {skill.State.__name__}: {exc}"
                ) from None
        return cls(id=ckpt.id, state=state, skill_states=skill_states)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id!r} state={self.state!r}>"


class _Checkpoint(msgspec.Struct):
    agent: str
    id: str
    state: Any
    skills: dict[str, Any] = {}


_CKPT_ENC = msgspec.msgpack.Encoder()
_CKPT_DEC = msgspec.msgpack.Decoder(_Checkpoint)


def _compile(cls: type[Agent]) -> _Compiled:
    out = _Compiled()

    def add_action(action: Any, owner: str | None) -> None:
        if not (isinstance(action, type) and issubclass(action, Action)):
            raise AgentDefinitionError(f"{cls.__qualname__}: {action!r} is not an Action class")
        # A skill's actions are also reachable as "<state_key>.<name>", so that two mounts
        # of one skill (or a skill and the agent) can share action names.
        if owner is not None:
            out.actions[f"{owner}.{action.name}"] = (action, owner)
        known = out.actions.get(action.name)
        if known is not None and known[0] is not action:
            raise AgentDefinitionError(f"{cls.__qualname__}: two actions are named {action.name!r}")
        if known is None:
            out.actions[action.name] = (action, owner)

    def add_routes(routes: Iterable[Route | tuple[Any, ...]], owner: str | None) -> None:
        for item in routes:
            route = _as_route(item)
            target = route.action
            if isinstance(target, type):
                add_action(target, owner)
            elif target not in out.actions and f"{owner}.{target}" not in out.actions:
                raise AgentDefinitionError(
                    f"{cls.__qualname__}: route {route.pattern!r} names unknown action {target!r}"
                )
            try:
                out.router.add(
                    route.pattern,
                    (route, owner),
                    priority=route.priority,
                    predicate=route.predicate,
                )
            except ValueError as exc:
                raise AgentDefinitionError(f"{cls.__qualname__}: {exc}") from None

    for action in cls.actions:
        add_action(action, None)
    for skill in cls.skills:
        if not isinstance(skill, Skill):
            raise AgentDefinitionError(f"{cls.__qualname__}: {skill!r} is not a Skill")
        if skill.state_key in out.skills:
            raise AgentDefinitionError(
                f"{cls.__qualname__}: two skills use state key {skill.state_key!r}"
            )
        out.skills[skill.state_key] = skill
        for action in skill.actions:
            add_action(action, skill.state_key)
        add_routes(skill.routes, skill.state_key)
    add_routes(cls.routes, None)
    return out


# ------------------------------------------------------------------------ command core
def _resolve(
    agent: Agent, instruction: Instruction | Signal | type[Action[Any]] | str
) -> tuple[Instruction, type[Action[Any]], str | None]:
    table = agent._compiled.actions
    if isinstance(instruction, Signal):
        routes = agent._compiled.router.match(instruction)
        if not routes:
            raise NoRoute(f"agent {agent.name!r} has no route for signal type {instruction.type!r}")
        route, owner = routes[0]
        params = route.params(instruction) if route.params is not None else instruction.data
        target = route.action if isinstance(route.action, str) else route.action.name
        if owner is not None:
            target = f"{owner}.{target}"
        instruction = Instruction(target, params, instruction)
    elif isinstance(instruction, str | type):
        instruction = Instruction(instruction)
    elif not isinstance(instruction, Instruction):
        raise AgentError(f"not an instruction: {instruction!r}")
    instruction = agent.on_before_cmd(instruction)
    name = instruction.action if isinstance(instruction.action, str) else instruction.action.name
    entry = table.get(name)
    if entry is None:
        raise UnknownAction(f"agent {agent.name!r} has no action {name!r}")
    return instruction, entry[0], entry[1]


def _apply(
    agent: Agent, owner: str | None, outcome: Any
) -> tuple[Any, dict[str, Any] | None, list[Directive]]:
    """Turn an action's return value into (agent state, skill states or None, directives)."""
    current = agent.state if owner is None else agent.skill_states[owner]
    schema: type[msgspec.Struct] = (
        type(agent).State if owner is None else agent._compiled.skills[owner].State
    )
    directives: list[Directive] = []
    new: Any = current
    if outcome is None:
        pass
    elif isinstance(outcome, Result):
        if outcome.state is not UNCHANGED:
            new = _coerce_state(agent, schema, current, outcome.state)
        directives = list(outcome.directives)
        if outcome.reply is not None:
            directives.append(Reply(outcome.reply))
    elif isinstance(outcome, Directive):
        directives = [outcome]
    elif isinstance(outcome, list | tuple) and all(isinstance(d, Directive) for d in outcome):
        directives = list(outcome)
    else:
        new = _coerce_state(agent, schema, current, outcome)
    if owner is None:
        return new, None, directives
    skill_states = dict(agent.skill_states)
    skill_states[owner] = new
    return agent.state, skill_states, directives


def _coerce_state(agent: Agent, schema: type[msgspec.Struct], current: Any, value: Any) -> Any:
    if isinstance(value, schema):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(schema.__struct_fields__)
        if unknown:
            raise AgentError(
                f"agent {agent.name!r}: state {schema.__name__} has no field(s) {sorted(unknown)}"
            )
        merged = {**msgspec.structs.asdict(current), **value}
        try:
            return msgspec.convert(merged, schema, from_attributes=True)
        except msgspec.ValidationError as exc:
            raise AgentError(f"agent {agent.name!r}: invalid state update: {exc}") from None
    raise AgentError(
        f"agent {agent.name!r}: an action returned {type(value).__name__}; expected None, "
        f"a {schema.__name__}, a dict of updates, directives or a Result"
    )


def _context(
    agent: Agent, owner: str | None, ins: Instruction, clock: Clock | None
) -> ActionContext:
    return ActionContext(
        state=agent.state if owner is None else agent.skill_states[owner],
        agent_id=agent.id,
        signal=ins.signal,
        clock=clock if clock is not None else _DEFAULT_CLOCK,
    )


_DEFAULT_CLOCK = MonotonicClock()


def _finish(
    agent: Agent, ins: Instruction, owner: str | None, outcome: Any
) -> tuple[Agent, list[Directive]]:
    state, skill_states, directives = _apply(agent, owner, outcome)
    state, directives = agent.on_after_cmd(ins, state, directives)
    return agent.with_state(state, skill_states), directives


def _recover(
    agent: Agent, ins: Instruction, owner: str | None, error: BaseException
) -> tuple[Agent, list[Directive]]:
    recovered = agent.on_error(ins, error)
    if recovered is None:
        raise error
    return _finish(agent, ins, owner, recovered)


def run_cmd(
    agent: Agent,
    instruction: Instruction | Signal | type[Action[Any]] | str,
    *,
    clock: Clock | None = None,
) -> tuple[Agent, list[Directive]]:
    """Like :func:`cmd` but returns the new agent value (skill states included)."""
    ins, action_cls, owner = _resolve(agent, instruction)
    try:
        params = action_cls.validate(ins.params)
        outcome = action_cls().run(params, _context(agent, owner, ins, clock))
        if inspect.isawaitable(outcome):
            if inspect.iscoroutine(outcome):
                outcome.close()
            raise AgentError(
                f"action {action_cls.name!r} is async: run it through the runtime or acmd()"
            )
    except (ActionValidationError, AgentError):
        raise
    except Exception as exc:
        return _recover(agent, ins, owner, exc)
    return _finish(agent, ins, owner, outcome)


async def arun_cmd(
    agent: Agent,
    instruction: Instruction | Signal | type[Action[Any]] | str,
    *,
    clock: Clock | None = None,
) -> tuple[Agent, list[Directive]]:
    """The async twin of :func:`run_cmd`: awaits async actions, applies timeouts and retries."""
    ins, action_cls, owner = _resolve(agent, instruction)
    try:
        params = action_cls.validate(ins.params)
        ctx = _context(agent, owner, ins, clock)
        if action_cls.timeout is None and action_cls.max_retries == 0:
            # The common case skips the retry machinery: it matters on the call hot path.
            outcome = action_cls().run(params, ctx)
            if inspect.isawaitable(outcome):
                outcome = await outcome
        else:
            outcome = await execute(action_cls, params, ctx)
    except (ActionValidationError, AgentError):
        raise
    except Exception as exc:
        return _recover(agent, ins, owner, exc)
    return _finish(agent, ins, owner, outcome)


def cmd(
    agent: Agent,
    instruction: Instruction | Signal | type[Action[Any]] | str,
    *,
    clock: Clock | None = None,
) -> tuple[Any, list[Directive]]:
    """Run one instruction on an agent value: pure, returns ``(new_state, directives)``."""
    new, directives = run_cmd(agent, instruction, clock=clock)
    return new.state, directives


async def acmd(
    agent: Agent,
    instruction: Instruction | Signal | type[Action[Any]] | str,
    *,
    clock: Clock | None = None,
) -> tuple[Any, list[Directive]]:
    new, directives = await arun_cmd(agent, instruction, clock=clock)
    return new.state, directives
