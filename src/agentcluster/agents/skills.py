"""Skills: reusable bundles mounted on agents.

Theory of operation: a skill packages actions, the signal routes that reach them, a state of
its own kept under ``state_key`` (so two skills never trample each other or the agent's
state), the sensors it needs, periodic schedules, and a validated ``Config``. A skill class
declares these; an instance carries one configuration and is what an agent mounts::

    class Heartbeats(Skill):
        name = "heartbeats"
        Config = HeartbeatConfig
        State = HeartbeatState
        actions = (RecordBeat,)
        routes = (("agent.heartbeat", RecordBeat),)

        def schedules(self) -> list[Every]:
            return [Every(self.config.interval, "agent.heartbeat")]

    class Worker(Agent):
        skills = (Heartbeats({"interval": 5.0}),)

Actions of a skill see the skill's state as ``ctx.state`` and their results update it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from agentcluster.agents.actions import Action, snake_case, struct_schema

if TYPE_CHECKING:
    from agentcluster.agents.sensors import Sensor

__all__ = ["EmptyConfig", "Every", "Skill", "SkillError"]

_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class SkillError(ValueError):
    """A skill is declared or configured wrongly."""


class EmptyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Configuration of a skill that takes none."""


class _EmptySkillState(msgspec.Struct, frozen=True):
    pass


@dataclass(frozen=True, slots=True)
class Every:
    """A periodic schedule: deliver a signal of ``type`` to the agent every ``interval`` s."""

    interval: float
    type: str
    data: Any = None

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise SkillError(f"Every.interval must be > 0, got {self.interval}")


class Skill:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type[msgspec.Struct]] = EmptyConfig
    State: ClassVar[type[msgspec.Struct]] = _EmptySkillState
    actions: ClassVar[Sequence[type[Action[Any]]]] = ()
    # Route objects or (pattern, action[, priority]) tuples, as on an Agent.
    routes: ClassVar[Sequence[Any]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = snake_case(cls.__name__).lstrip("_")

    def __init__(
        self,
        config: Mapping[str, Any] | msgspec.Struct | None = None,
        *,
        state_key: str | None = None,
    ) -> None:
        self.state_key = state_key if state_key is not None else self.name
        if not _KEY_RE.match(self.state_key):
            raise SkillError(f"skill state key {self.state_key!r} must match {_KEY_RE.pattern}")
        if config is None:
            config = {}
        try:
            self.config: Any = (
                config if isinstance(config, self.Config) else msgspec.convert(config, self.Config)
            )
        except msgspec.ValidationError as exc:
            raise SkillError(f"invalid config for skill {self.name!r}: {exc}") from None

    def initial_state(self) -> Any:
        """The skill's state when an agent starts; override to derive it from the config."""
        try:
            return self.State()
        except TypeError:
            raise SkillError(
                f"skill {self.name!r}: State {self.State.__name__} has required fields; "
                "override initial_state()"
            ) from None

    def sensors(self) -> Sequence[tuple[str, Sensor]]:
        """Sensors to run while the agent runs, as (key, sensor) pairs."""
        return ()

    def schedules(self) -> Sequence[Every]:
        """Periodic signals to deliver to the agent while it runs."""
        return ()

    @classmethod
    def config_schema(cls) -> dict[str, Any]:
        """JSON Schema of ``Config`` (for docs, UIs and config validation elsewhere)."""
        return struct_schema(cls.Config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} key={self.state_key!r} config={self.config!r}>"
