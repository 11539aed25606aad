"""Node configuration: defaults, a TOML file, environment variables, command-line flags.

Theory of operation: :class:`NodeConfig` is a msgspec Struct, so every source is validated the
same way and errors name the offending field. Sources are layered, later ones winning:
built-in defaults < TOML file (``[node]`` table or top level) < ``AGENTCLUSTER_*`` environment
variables < explicit overrides (the CLI flags). List values in the environment are
comma-separated. The node name defaults to the host name plus the port, so two nodes on one
host never collide by accident.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["ENV_PREFIX", "ConfigError", "NodeConfig", "load_config"]

ENV_PREFIX = "AGENTCLUSTER_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the source and the field."""


class NodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Unique within the cluster; "" means "<hostname>-<port>" (filled in by load_config).
    name: str = ""
    # Where this node listens for UDP packets and TCP streams (one port for both, as memberlist).
    bind: str = "127.0.0.1:7946"
    # The address peers should use, when it differs from bind (NAT, 0.0.0.0 binds).
    advertise: str = ""
    # Addresses to join through at start (any one live member suffices).
    seeds: list[str] = []
    # Placement metadata gossiped with membership: used by balancing and partition handling.
    zone: str = ""
    region: str = ""
    capabilities: list[str] = []
    tags: dict[str, str] = {}
    # The cluster keyring file (base64 keys, primary first). Without one the node runs
    # unauthenticated, which is only acceptable on a development machine.
    key_file: str = ""
    # Membership timing preset: "local" (one host), "lan" (a data centre), "wan".
    preset: str = "lan"
    # A file of peer addresses to watch (discovery), and DNS names to resolve each round.
    seeds_file: str = ""
    dns_a: list[str] = []
    dns_srv: list[str] = []
    # Seconds between discovery rounds (each round revisits every candidate).
    discovery_interval: float = 10.0
    # Announce / listen on a UDP multicast group (authenticated with the keyring). Off by
    # default: multicast rarely crosses routers and clouds often drop it.
    multicast: bool = False
    multicast_group: str = "239.255.86.76"
    multicast_port: int = 7947
    # The local interface address multicast is sent and received on.
    multicast_interface: str = "127.0.0.1"
    # The coordination store: the names of the nodes that hold the replicated log (3 or 5;
    # every node of the cluster uses it). Empty: this node has no store.
    store_voters: list[str] = []
    # Where a voter keeps its Raft log and snapshots ("": in memory -- lost on restart, only
    # for tests and throw-away clusters).
    data_dir: str = ""
    # Sync every Raft write to disk before acknowledging it. Turning this off trades
    # durability on power loss for latency; never do it in production.
    fsync: bool = True
    # Applied entries between two snapshots of the store (then the log is compacted).
    snapshot_every: int = 10_000
    # User agents this node starts and registers, as "package.module:AgentClass". A class
    # may declare ``capabilities`` (a tuple of strings) for its registry entry. None by
    # default: a bare node runs only the clustering agents.
    agents: list[str] = []
    # How cluster.call picks a node: P2C over peak-EWMA latency sends almost nothing to a slow
    # or fast-failing node (see `agentcluster bench lb`); others: round_robin,
    # weighted_round_robin, least_connections, capacity_aware, geographic, maglev,
    # bounded_load, adaptive.
    lb_strategy: str = "latency_aware"
    # Health check timings: "lan" (basic 1 s, comprehensive 30 s, deep 30 s, predictive 60 s),
    # "local" (faster, one host) or "design" (the design's 30 s / 300 s / 600 s).
    health_preset: str = "lan"
    # Where critical health alerts are POSTed as JSON ("": nowhere; they are logged and sent
    # to the orchestrator as signals either way).
    health_webhook: str = ""
    # A TLS certificate whose expiry the security check watches ("": none configured).
    tls_cert: str = ""


_LIST_FIELDS = {"seeds", "capabilities", "dns_a", "dns_srv", "store_voters", "agents"}
_BOOL_FIELDS = {"multicast", "fsync"}
_NUMBER_FIELDS: dict[str, type[int] | type[float]] = {
    "multicast_port": int,
    "snapshot_every": int,
    "discovery_interval": float,
}


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in NodeConfig.__struct_fields__:
        raw = env.get(ENV_PREFIX + field.upper())
        if raw is None:
            continue
        if field in _LIST_FIELDS:
            out[field] = [item.strip() for item in raw.split(",") if item.strip()]
        elif field == "tags":
            tags: dict[str, str] = {}
            for item in raw.split(","):
                if item.strip():
                    key, sep, value = item.partition("=")
                    if not sep:
                        raise ConfigError(
                            f"{ENV_PREFIX}TAGS: expected key=value pairs, got {item.strip()!r}"
                        )
                    tags[key.strip()] = value.strip()
            out[field] = tags
        elif field in _BOOL_FIELDS:
            out[field] = raw.strip().lower() in ("1", "true", "yes", "on")
        elif field in _NUMBER_FIELDS:
            kind = _NUMBER_FIELDS[field]
            try:
                out[field] = kind(raw)
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}{field.upper()}: not a number: {raw!r}") from None
        else:
            out[field] = raw
    return out


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("node", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [node] must be a table")
    return table


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build a NodeConfig from defaults, a TOML file, the environment and overrides."""
    merged: dict[str, Any] = {}
    source = "defaults"
    try:
        if path is not None:
            source = f"config file {path}"
            merged.update(_from_file(Path(path)))
        source = "environment"
        merged.update(_from_env(os.environ if env is None else env))
        source = "command line"
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        config = msgspec.convert(merged, NodeConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid node configuration ({source}): {exc}") from None
    _check(config)
    if not config.name:
        port = config.bind.rsplit(":", 1)[-1]
        config = msgspec.structs.replace(config, name=f"{socket.gethostname()}-{port}")
    return config


def _check(config: NodeConfig) -> None:
    from agentcluster.discovery import parse_addr as parse_seed
    from agentcluster.membership.config import SwimConfig
    from agentcluster.transport.base import parse_addr

    for field in ("bind", "advertise"):
        value = getattr(config, field)
        if value:
            try:
                parse_addr(value)
            except ValueError as exc:
                raise ConfigError(f"invalid node configuration: {field}: {exc}") from None
    for seed in config.seeds:
        try:
            parse_seed(seed)  # "host" alone means the default port
        except ValueError as exc:
            raise ConfigError(f"invalid node configuration: seeds: {exc}") from None
    if config.preset not in SwimConfig.PRESETS:
        raise ConfigError(
            f"invalid node configuration: preset {config.preset!r} is not one of "
            f"{', '.join(SwimConfig.PRESETS)}"
        )
    if config.discovery_interval <= 0:
        raise ConfigError("invalid node configuration: discovery_interval must be > 0")
    if config.snapshot_every < 1:
        raise ConfigError("invalid node configuration: snapshot_every must be >= 1")
    from agentcluster.balancing.strategies import STRATEGIES

    if config.lb_strategy not in STRATEGIES:
        raise ConfigError(
            f"invalid node configuration: lb_strategy {config.lb_strategy!r} is not one of "
            f"{', '.join(sorted(STRATEGIES))}"
        )
    from agentcluster.health._check_runner import CHECK_PRESETS

    if config.health_preset not in CHECK_PRESETS:
        raise ConfigError(
            f"invalid node configuration: health_preset {config.health_preset!r} is not one "
            f"of {', '.join(CHECK_PRESETS)}"
        )
    if config.health_webhook and not config.health_webhook.startswith(("http://", "https://")):
        raise ConfigError("invalid node configuration: health_webhook must be an http(s) URL")
    for spec in config.agents:
        module, sep, attr = spec.partition(":")
        if not (sep and module and attr):
            raise ConfigError(
                f"invalid node configuration: agent {spec!r} must be 'package.module:Class'"
            )
    if len(set(config.store_voters)) != len(config.store_voters) or "" in config.store_voters:
        raise ConfigError("invalid node configuration: store_voters must be distinct names")
