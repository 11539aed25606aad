"""``agentcluster kv``: the coordination store from the shell.

Theory of operation: every command opens a :class:`~agentcluster.store.remote.RemoteStore`
over the ``--node`` entry nodes (tried in order; sealed with the cluster keyring from
``--key-file`` or ``AGENTCLUSTER_KEY_FILE``), runs one store operation and prints the result:
text for people, one JSON document (``watch``: one JSON object per line) with ``--json``.
``status`` is the exception: it asks each given node's ``stats`` control op for its ``store``
section, so it shows every voter's own view (state, term, leader, indexes) rather than one
routed answer.

``range`` reads a prefix in one answer, at one revision, which must fit in one reply frame;
``--page N`` reads a larger one in pages of N keys -- separate reads, each at its own revision
(the text title shows the span), so the listing is not one snapshot. ``--start KEY`` lists
from KEY on.

Values are bytes. ``get`` writes them to stdout unchanged (a newline is added only on a
terminal), so ``kv put k --file x`` / ``kv get k > y`` round-trips any file; JSON renders a
value as UTF-8 text when it decodes, else as base64 with ``"base64": true``. Lease ids are
hexadecimal in text (as in etcdctl and the store's messages), plain integers in JSON.

Every failure -- no entry node reachable, a wrong key, an unknown lease, an absent key -- is
one ``error: ...`` line on stderr and exit code 1; bad input is exit code 2. ``watch`` runs
until ``--count`` events were printed or SIGINT / SIGTERM (exit code 0 either way); it first
reports the revision it watches from on stderr, and the long-poll resumes from the last
revision seen + 1 across reconnects, so no event is lost or repeated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import signal as os_signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from agentcluster.store.base import KeyValue, WatchEvent
    from agentcluster.store.remote import RemoteStore

kv_app = typer.Typer(
    help="The coordination store: get, put, del, range, watch, leases, status.",
    no_args_is_help=True,
)
lease_app = typer.Typer(help="Grant, keep alive and revoke store leases.", no_args_is_help=True)
kv_app.add_typer(lease_app, name="lease")

NodeOpt = Annotated[
    list[str],
    typer.Option("--node", metavar="HOST:PORT", help="An entry node (repeatable: tried in order)."),
]
KeyFileOpt = Annotated[
    str | None,
    typer.Option(metavar="PATH", help="Cluster keyring file (default: $AGENTCLUSTER_KEY_FILE)."),
]
T = TypeVar("T")

# Lease ids and revisions are below 2**63 in the store; a larger number cannot even be sent.
_MAX_ID = 2**63 - 1
_MAX_TTL = 10 * 365 * 24 * 3600.0  # the store's longest lease


def _finite(value: float) -> float:
    # The range checks of float options let NaN through (every comparison with it is false).
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _key_arg_or_usage(value: str) -> None:
    try:
        _key_arg(value)
    except typer.BadParameter as exc:
        raise _UsageError(f"KEY: {exc}") from None


def _key_arg(value: str) -> str:
    # The store's own check would answer in its decoder's words ("Expected `str` of length
    # >= 1 - at `$[1]`"), and as a failure (exit 1), not a usage error.
    from agentcluster.store._kv import MAX_KEY_BYTES

    if not value:
        raise typer.BadParameter("a key must not be empty")
    if len(value) > MAX_KEY_BYTES:
        raise typer.BadParameter(
            f"a key of {len(value):,} characters is longer than the store takes ({MAX_KEY_BYTES:,})"
        )
    return value


TimeoutOpt = Annotated[
    float,
    typer.Option(min=0.05, callback=_finite, help="Seconds to wait for an answer per request."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


class _UsageError(Exception):
    """Bad input from the command line: exit code 2."""


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(make: Callable[[], Coroutine[Any, Any, int]]) -> NoReturn:
    """Run a command's coroutine and turn every expected failure into ``error: ...``."""
    from agentcluster.control import ControlError
    from agentcluster.store.base import StoreError

    try:
        code = asyncio.run(make())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except _UsageError as exc:
        _fail(str(exc), 2)
    except (StoreError, ControlError, ValueError, OSError) as exc:
        # StoreError covers StoreUnavailable, LeaseNotFound, Compacted, InvalidCommand;
        # ValueError a bad address or key file; OSError an unreadable --file.
        _fail(str(exc) or type(exc).__name__)
    raise typer.Exit(code)


def _open(nodes: list[str], key_file: str | None, timeout: float) -> RemoteStore:
    from agentcluster.cli.cluster import _keyring
    from agentcluster.store.remote import RemoteStore
    from agentcluster.transport.base import parse_addr

    if not nodes:
        raise _UsageError("give at least one --node HOST:PORT")
    for addr in nodes:
        try:
            parse_addr(addr)
        except ValueError as exc:
            raise _UsageError(f"--node: {exc}") from None
    return RemoteStore(nodes, keyring=_keyring(key_file), timeout=timeout)


def _value_json(value: bytes) -> dict[str, Any]:
    try:
        return {"value": value.decode("utf-8"), "base64": False}
    except UnicodeDecodeError:
        return {"value": base64.b64encode(value).decode("ascii"), "base64": True}


def kv_json(kv: KeyValue) -> dict[str, Any]:
    """A key-value as a JSON object (the shape every ``--json`` output uses)."""
    return {
        "key": kv.key,
        **_value_json(kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    }


def event_json(event: WatchEvent) -> dict[str, Any]:
    return {
        "revision": event.revision,
        "type": event.type,
        **kv_json(event.kv),
        "prev": None if event.prev is None else kv_json(event.prev),
    }


def value_text(value: bytes) -> str:
    """A value on one line: the text itself when it is printable UTF-8, a JSON string when
    it is UTF-8 with control characters, ``base64:...`` otherwise."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode("ascii")
    return text if text.isprintable() else json.dumps(text)


def key_text(key: str) -> str:
    """A key as one token of a line: itself when it is printable with no whitespace (and
    does not start with a quote), else a JSON string -- so ``kv watch`` keeps one event per
    line and "revision type key value" splits the same way for every key."""
    if key and key.isprintable() and not key.startswith('"') and not any(c.isspace() for c in key):
        return key
    return json.dumps(key)


def _lease_id(text: str | None, what: str = "--lease") -> int:
    """A lease id as the CLI shows it: hexadecimal, as in etcdctl and the store's own
    messages and election keys (an optional ``0x`` is accepted)."""
    if text is None:
        return 0
    digits = text[2:] if text.lower().startswith("0x") else text
    try:
        lease = int(digits, 16)
    except ValueError:
        raise _UsageError(f"{what}: {text!r} is not a lease id (hexadecimal)") from None
    if lease <= 0:
        raise _UsageError(f"{what}: a lease id is positive, not {text!r}")
    if lease > _MAX_ID:
        raise _UsageError(f"{what}: {text!r} is too large for a lease id (at most {_MAX_ID:x})")
    return lease


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data))


# ----------------------------------------------------------------------------- commands


@kv_app.command("get")
def get(
    key: Annotated[str, typer.Argument(help="The key.", callback=_key_arg)],
    *,
    node: NodeOpt,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Print a key's value (exit code 1 if the key is absent)."""

    async def main() -> int:
        async with _open(node, key_file, timeout) as store:
            kv = await store.get(key)
        if kv is None:
            typer.echo(f"error: key {key!r} not found", err=True)
            return 1
        if as_json:
            _echo_json(kv_json(kv))
        else:
            out = sys.stdout.buffer
            out.write(kv.value)
            if sys.stdout.isatty():
                out.write(b"\n")
            out.flush()
        return 0

    _run(main)


@kv_app.command("put")
def put(
    key: Annotated[str, typer.Argument(help="The key.", callback=_key_arg)],
    value: Annotated[
        str | None, typer.Argument(help="The value as text (or use --file).", show_default=False)
    ] = None,
    *,
    node: NodeOpt,
    file: Annotated[
        str | None,
        typer.Option(
            "--file", metavar="PATH", help="Read the value's bytes from PATH ('-': stdin)."
        ),
    ] = None,
    lease: Annotated[
        str | None,
        typer.Option(metavar="ID", help="Attach the key to this lease (hex id)."),
    ] = None,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Write a key; prints the new store revision."""

    async def main() -> int:
        if (value is None) == (file is None):
            raise _UsageError("give the value either as an argument or with --file, not both")
        lease_id = _lease_id(lease)
        if file is None:
            assert value is not None
            data = value.encode("utf-8", "surrogateescape")
        elif file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(file, "rb") as f:  # noqa: ASYNC230 -- one local read before any I/O
                data = f.read()
        async with _open(node, key_file, timeout) as store:
            revision = await store.put(key, data, lease=lease_id)
        if as_json:
            _echo_json({"key": key, "revision": revision})
        else:
            typer.echo(str(revision))
        return 0

    _run(main)


@kv_app.command("del")
def delete(
    key: Annotated[str, typer.Argument(help="The key (or prefix with --prefix).")],
    *,
    node: NodeOpt,
    prefix: Annotated[bool, typer.Option("--prefix", help="Delete every key under KEY.")] = False,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Delete a key (or a prefix); prints how many keys were deleted."""

    async def main() -> int:
        from agentcluster.store.base import MAX_KEY_LENGTH

        # Usage errors (exit 2) as for get and put; "" with --prefix means every key.
        if not prefix:
            _key_arg_or_usage(key)
        elif len(key) > MAX_KEY_LENGTH:
            raise _UsageError(f"a prefix of {len(key):,} characters is longer than any key")
        async with _open(node, key_file, timeout) as store:
            deleted = await store.delete(key, prefix=prefix)
        if as_json:
            _echo_json({"deleted": deleted})
        else:
            typer.echo(str(deleted))
        return 0

    _run(main)


@kv_app.command("range")
def range_(
    prefix: Annotated[str, typer.Argument(help="Key prefix ('' for every key).")],
    *,
    node: NodeOpt,
    limit: Annotated[
        int, typer.Option(min=0, max=_MAX_ID, help="At most this many keys (0: all).")
    ] = 0,
    start: Annotated[
        str, typer.Option(metavar="KEY", help="List from this key on (inclusive).")
    ] = "",
    page: Annotated[
        int,
        typer.Option(
            min=0,
            max=_MAX_ID,
            metavar="N",
            help="Read in pages of N keys, for a prefix too large for one answer "
            "(0: one read, one revision).",
        ),
    ] = 0,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """List the keys under a prefix, in key order."""

    async def main() -> int:
        from agentcluster.store.base import ReplyTooLarge

        async with _open(node, key_file, timeout) as store:
            try:
                kvs, revisions, more = await _read_range(store, prefix, limit, start, page)
            except ReplyTooLarge as exc:
                raise ReplyTooLarge(f"{exc}; from the command line: --page N") from None
        if as_json:
            _echo_json([kv_json(kv) for kv in kvs])
            return 0
        title = f"{len(kvs)} keys under {prefix!r}" + (f" from {start!r}" if start else "")
        first, last = revisions[0], revisions[-1]
        title += f" at revision {first}" if first == last else f" at revisions {first}-{last}"
        if more:
            title += " (more: raise --limit" + (
                ")" if page else ", or list them all with --page N)"
            )
        table = Table(title=title)
        for col in ("key", "value", "created", "modified", "version", "lease"):
            table.add_column(col, justify="left" if col in ("key", "value") else "right")
        for kv in kvs:
            text = value_text(kv.value)
            table.add_row(
                Text(key_text(kv.key)), Text(text if len(text) <= 60 else text[:57] + "..."),
                str(kv.create_revision), str(kv.mod_revision), str(kv.version),
                f"{kv.lease:x}" if kv.lease else "",
            )  # fmt: skip
        Console(highlight=False).print(table)
        return 0

    _run(main)


async def _read_range(
    store: RemoteStore, prefix: str, limit: int, start: str, page: int
) -> tuple[list[KeyValue], list[int], bool]:
    """The keys of ``kv range``, the revision of each read, and whether keys remain past
    ``limit``: one read without ``page``, else pages of ``page`` keys until ``limit``."""
    if not page:
        result = await store.range(prefix, limit=limit, start=start)
        return result.kvs, [result.revision], result.more
    kvs: list[KeyValue] = []
    revisions: list[int] = []
    async for result in store.range_pages(
        prefix, page=min(page, limit) if limit else page, start=start
    ):
        kvs += result.kvs
        revisions.append(result.revision)
        if limit and len(kvs) >= limit:
            return kvs[:limit], revisions, len(kvs) > limit or result.more
    return kvs, revisions, False


def _print_event(event: WatchEvent, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(event_json(event)))
        return
    line = f"{event.revision} {event.type} {key_text(event.kv.key)}"
    typer.echo(line + (f" {value_text(event.kv.value)}" if event.type == "put" else ""))


@kv_app.command("watch")
def watch(
    prefix: Annotated[str, typer.Argument(help="Key prefix ('' for every key).")],
    *,
    node: NodeOpt,
    from_revision: Annotated[
        int,
        typer.Option(min=0, max=_MAX_ID, help="First revision to report (0: changes from now on)."),
    ] = 0,
    count: Annotated[
        int, typer.Option(min=0, help="Stop after this many events (0: run until Ctrl-C).")
    ] = 0,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Print changes under a prefix as they happen: revision, type, key, value per line."""

    async def main() -> int:
        stop = _stop_on_signals()
        async with _open(node, key_file, timeout) as store:
            # Asked even with --from-revision: a wrong key or no reachable node fails here,
            # at once, instead of the long-poll retrying in silence. Ctrl-C ends the wait.
            current = await _unless_stopped(store.revision(), stop)
            if current is None:
                return 0
            start = from_revision or current + 1
            typer.echo(f"watching {prefix!r} from revision {start}", err=True)

            async def consume() -> None:
                seen = 0
                async with store.watch(prefix, start_revision=start) as events:
                    async for event in events:
                        _print_event(event, as_json)
                        seen += 1
                        if seen == count:
                            return

            try:
                await _unless_stopped(consume(), stop)
            except BrokenPipeError:
                _silence_stdout()
        return 0

    _run(main)


def _stop_on_signals() -> asyncio.Event:
    """An event that Ctrl-C or SIGTERM sets (instead of interrupting the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (os_signal.SIGINT, os_signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None once ``stop`` is set first (``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        stopper.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
    if not task.cancelled():
        return task.result()  # done first (or as Ctrl-C came): its answer, or its error
    return None


def _silence_stdout() -> None:
    # The reader went away (``kv watch | head -1``): nothing more to say, and the interpreter
    # must not complain when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@lease_app.command("grant")
def lease_grant(
    ttl: Annotated[
        float,
        typer.Argument(
            min=0.001,
            max=_MAX_TTL,
            callback=_finite,
            help="Time to live, seconds (up to 10 years).",
        ),
    ],
    *,
    node: NodeOpt,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Grant a lease; prints its hex id (keys put with --lease ID vanish when it ends)."""

    async def main() -> int:
        async with _open(node, key_file, timeout) as store:
            lease = await store.lease_grant(ttl)
        if as_json:
            _echo_json({"id": lease.id, "ttl": lease.ttl})
        else:
            typer.echo(f"{lease.id:x}")
        return 0

    _run(main)


@lease_app.command("revoke")
def lease_revoke(
    lease_id: Annotated[str, typer.Argument(metavar="ID", help="The lease id (hex).")],
    *,
    node: NodeOpt,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Revoke a lease now, deleting its keys."""

    async def main() -> int:
        parsed = _lease_id(lease_id, "ID")
        async with _open(node, key_file, timeout) as store:
            await store.lease_revoke(parsed)
        return 0

    _run(main)


@lease_app.command("keepalive")
def lease_keepalive(
    lease_id: Annotated[str, typer.Argument(metavar="ID", help="The lease id (hex).")],
    *,
    node: NodeOpt,
    once: Annotated[bool, typer.Option("--once", help="Refresh once, then exit.")] = False,
    count: Annotated[
        int, typer.Option(min=0, help="Stop after this many refreshes (0: run until Ctrl-C).")
    ] = 0,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Keep a lease alive: refresh it every third of its TTL, one line per refresh, until
    Ctrl-C (the lease is left to run out then, not revoked). Fails once the lease is gone."""

    async def main() -> int:
        from agentcluster.control import ControlError
        from agentcluster.store.base import LeaseNotFound, StoreUnavailable

        parsed = _lease_id(lease_id, "ID")
        limit = 1 if once else count
        stop = _stop_on_signals()
        loop = asyncio.get_running_loop()
        async with _open(node, key_file, timeout) as store:
            done = 0
            # The first refresh must succeed: a wrong id or no reachable node fails at once.
            # Ctrl-C ends any wait, a refresh's included.
            first = await _unless_stopped(store.lease_keepalive(parsed), stop)
            if first is None:
                return 0
            ttl, last_ok = first, loop.time()
            while True:
                done += 1
                try:
                    if as_json:
                        _echo_json({"id": parsed, "ttl": ttl})
                    else:
                        typer.echo(f"{parsed:x} ttl {ttl:g}")
                except BrokenPipeError:  # ``kv lease keepalive ID | head -1``
                    _silence_stdout()
                    return 0
                if done == limit:
                    return 0
                # A third of the TTL leaves two more tries before the lease runs out.
                wait = max(ttl / 3, 0.01)
                while True:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await stop.wait()
                    if stop.is_set():
                        return 0
                    try:
                        refreshed = await _unless_stopped(store.lease_keepalive(parsed), stop)
                    except LeaseNotFound:
                        raise LeaseNotFound(f"lease {parsed:x} expired or was revoked") from None
                    except (StoreUnavailable, ControlError) as exc:
                        if loop.time() - last_ok >= ttl:
                            raise StoreUnavailable(
                                f"lease {parsed:x}: no refresh for {ttl:g} s, its TTL; it may "
                                f"have expired ({exc})"
                            ) from None
                        typer.echo(f"warning: refresh failed, retrying: {exc}", err=True)
                        wait = min(max(ttl / 10, 0.01), 1.0)
                        continue
                    if refreshed is None:
                        return 0
                    ttl, last_ok = refreshed, loop.time()
                    break

    _run(main)


# ----------------------------------------------------------------------------- status

_STATUS_FIELDS = ("state", "term", "leader", "commit_index", "applied_index", "revision", "keys")


async def _status_of(addr: str, keyring: Any, timeout: float) -> dict[str, Any]:
    from agentcluster.control import ControlError, request

    try:
        stats = await request(addr, "stats", keyring=keyring, timeout=timeout)
    except ControlError as exc:
        return {"node": addr, "error": str(exc)}
    store = stats.get("store") if isinstance(stats, dict) else None
    row: dict[str, Any] = {"node": addr, "name": stats.get("node") if stats else None}
    if store is None:
        return {**row, "store": False}
    row.update(store=True, voter="state" in store, voters=store.get("voters", []))
    row.update({f: store.get(f) for f in _STATUS_FIELDS})
    return row


@kv_app.command("status")
def status(
    *,
    node: NodeOpt,
    key_file: KeyFileOpt = None,
    timeout: TimeoutOpt = 5.0,
    as_json: JsonOpt = False,
) -> None:
    """Each given node's view of the store: Raft state, term, leader, indexes, revision."""

    async def main() -> int:
        from agentcluster.cli.cluster import _keyring

        if not node:
            raise _UsageError("give at least one --node HOST:PORT")
        keyring = _keyring(key_file)
        rows = await asyncio.gather(*(_status_of(addr, keyring, timeout) for addr in node))
        failed = [r for r in rows if "error" in r]
        for row in failed:
            typer.echo(f"error: {row['error']}", err=True)
        if as_json:
            _echo_json(rows)
            return 1 if failed else 0
        # No vertical rules: nine columns still fit an 80-column terminal.
        table = Table(
            title="coordination store", box=box.SIMPLE, show_edge=False, collapse_padding=True
        )
        for col in ("node", "name", "state", "term", "leader", "commit", "applied", "rev"):
            table.add_column(
                col,
                justify="left" if col in ("node", "name", "state") else "right",
                no_wrap=col == "node",
            )
        table.add_column("keys", justify="right")
        styles = {"leader": "bold green", "follower": "", "candidate": "yellow"}
        for row in rows:
            if "error" in row:
                continue
            if not row["store"] or not row["voter"]:
                state = "no store" if not row["store"] else "non-voter"
                table.add_row(row["node"], row["name"] or "", Text(state, style="dim"))
                continue
            cells = [row[f] for f in _STATUS_FIELDS[1:]]
            table.add_row(
                row["node"], row["name"] or "",
                Text(str(row["state"]), style=styles.get(str(row["state"]), "")),
                *("-" if c is None else str(c) for c in cells),
            )  # fmt: skip
        Console(highlight=False).print(table)
        return 1 if failed else 0

    _run(main)
