"""Node configuration: defaults < TOML < environment < flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentcluster.config import ConfigError, load_config


def test_layering(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[node]\nname = "from-file"\nzone = "z-file"\nseeds = ["10.0.0.1:7946"]\npreset = "wan"\n'
    )
    env = {
        "AGENTCLUSTER_ZONE": "z-env",
        "AGENTCLUSTER_TAGS": "a=1, b = 2",
        "AGENTCLUSTER_SEEDS": "h1:1,h2:2",
    }
    cfg = load_config(toml, env=env, overrides={"name": "from-flag", "region": None})
    assert cfg.name == "from-flag"  # flag beats file
    assert cfg.zone == "z-env"  # env beats file
    assert cfg.seeds == ["h1:1", "h2:2"]
    assert cfg.tags == {"a": "1", "b": "2"}
    assert cfg.preset == "wan"
    assert cfg.region == ""  # a None override does not erase


def test_default_name_uses_host_and_port() -> None:
    cfg = load_config(env={}, overrides={"bind": "127.0.0.1:9999"})
    assert cfg.name.endswith("-9999")


@pytest.mark.parametrize(
    ("overrides", "env", "fragment"),
    [
        ({"bind": "nonsense"}, {}, "bind"),
        ({"preset": "fast"}, {}, "preset 'fast'"),
        ({"zone": 5}, {}, "zone"),
        ({}, {"AGENTCLUSTER_TAGS": "novalue"}, "key=value"),
        ({}, {"AGENTCLUSTER_DISCOVERY_INTERVAL": "soon"}, "not a number"),
        ({"discovery_interval": 0}, {}, "discovery_interval"),
    ],
)
def test_errors_name_the_field(
    overrides: dict[str, object], env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(env=env, overrides=overrides)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('colour = "blue"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_config(unknown, env={})
