"""Alerts: threshold rules, deduplication, hysteresis, burn-rate windows, escalation, and the
webhook sender against an in-test HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import math
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.health.alerts import (
    ESCALATION_SIGNAL,
    Alert,
    AlertEngine,
    AlertEvent,
    AlertRule,
    BurnRateRule,
    BurnRateTracker,
    BurnWindow,
    EscalationMatrix,
    EscalationStep,
    WebhookSender,
    backoff_delay,
)
from agentcluster.testing import wait_until


def kinds(events: list[AlertEvent]) -> list[str]:
    return [e.kind for e in events]


def run_series(engine: AlertEngine, metric: str, values: list[float]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for i, v in enumerate(values):
        out.extend((i, e.kind) for e in engine.evaluate("n1", {metric: v}, float(i)))
    return out


# ------------------------------------------------------------------------- threshold rules
@pytest.mark.parametrize(
    ("rule", "values", "expected"),
    [
        # plain ">" rule: fires on the first breach, resolves on the first clear sample
        (
            AlertRule("cpu", "cpu", ">", 80.0),
            [50, 81, 90, 80, 70],
            [(1, "fired"), (3, "resolved")],
        ),
        # ">=" fires on equality; "<" and "<=" mirror them
        (AlertRule("cpu", "cpu", ">=", 80.0), [79, 80, 79.9], [(1, "fired"), (2, "resolved")]),
        (
            AlertRule("mem", "free", "<", 10.0),
            [20, 9, 10, 5],
            [(1, "fired"), (2, "resolved"), (3, "fired")],
        ),
        (AlertRule("mem", "free", "<=", 10.0), [20, 10, 10.1], [(1, "fired"), (2, "resolved")]),
        # for_samples: three breaches in a row; an interruption resets the streak
        (
            AlertRule("cpu", "cpu", ">", 80.0, for_samples=3),
            [90, 90, 50, 90, 90, 90, 50],
            [(5, "fired"), (6, "resolved")],
        ),
        # clear_samples: two clear samples in a row; a breach in between resets them
        (
            AlertRule("cpu", "cpu", ">", 80.0, clear_samples=2),
            [90, 50, 90, 50, 50],
            [(0, "fired"), (4, "resolved")],
        ),
        # clear_threshold below threshold: 75 is not low enough to resolve
        (
            AlertRule("cpu", "cpu", ">", 80.0, clear_threshold=70.0),
            [90, 75, 79, 70, 90],
            [(0, "fired"), (3, "resolved"), (4, "fired")],
        ),
        (
            AlertRule("free", "free", "<", 10.0, clear_threshold=20.0),
            [5, 15, 19.9, 20, 21],
            [(0, "fired"), (3, "resolved")],
        ),
    ],
)
def test_threshold_rules_fire_and_resolve(
    rule: AlertRule, values: list[float], expected: list[tuple[int, str]]
) -> None:
    engine = AlertEngine([rule])
    assert run_series(engine, rule.metric, values) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"comparison": ">", "clear_threshold": 90.0},  # clear above a ">" threshold
        {"comparison": "<", "clear_threshold": 70.0},  # clear below a "<" threshold
        {"comparison": "==", "clear_threshold": None},
        {"comparison": ">", "for_samples": 0},
        {"comparison": ">", "clear_samples": 0},
        {"comparison": ">", "threshold": math.nan},
    ],
)
def test_bad_rules_are_rejected(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"name": "r", "metric": "m", "threshold": 80.0, **kwargs}
    with pytest.raises(ValueError):
        AlertRule(**args)


def test_rule_decoded_from_json_is_validated() -> None:
    good = b'{"name":"r","metric":"m","comparison":">","threshold":1,"severity":"critical"}'
    assert msgspec.json.decode(good, type=AlertRule).severity == "critical"
    bad = b'{"name":"r","metric":"m","comparison":">","threshold":1,"clear_threshold":5}'
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(bad, type=AlertRule)


def test_deduplication_one_active_alert_per_rule_and_node() -> None:
    engine = AlertEngine(
        [AlertRule("cpu", "cpu", ">", 80.0, severity="critical", labels={"t": "x"})]
    )
    first = engine.evaluate("n1", {"cpu": 90.0}, 1.0)
    assert kinds(first) == ["fired"]
    alert = first[0].alert
    assert (alert.rule, alert.node, alert.severity, alert.count) == ("cpu", "n1", "critical", 1)
    assert first[0].signal_type == "cluster.health.alert.critical"
    for t in range(2, 12):
        assert engine.evaluate("n1", {"cpu": 95.0 + t}, float(t)) == []
    [active] = engine.active()
    assert active.id == alert.id
    assert (active.count, active.since, active.last_seen, active.value) == (11, 1.0, 11.0, 106.0)
    assert active.labels == {"t": "x"}
    # another node gets its own alert
    assert kinds(engine.evaluate("n2", {"cpu": 99.0}, 12.0)) == ["fired"]
    assert sorted(a.node for a in engine.active()) == ["n1", "n2"]
    assert [a.node for a in engine.active_for("n2")] == ["n2"]
    [resolved] = engine.evaluate("n1", {"cpu": 10.0}, 13.0)
    assert resolved.kind == "resolved" and resolved.alert.id == alert.id
    assert resolved.alert.resolved_at == 13.0 and resolved.alert.count == 11
    assert resolved.signal_type == "cluster.health.alert.resolved"
    # a new incident is a new alert
    [again] = engine.evaluate("n1", {"cpu": 90.0}, 14.0)
    assert again.kind == "fired" and again.alert.id != alert.id


def oscillating(n: int, centre: float, amplitude: float) -> list[float]:
    return [centre + amplitude * math.sin(i * 1.7) for i in range(n)]


def test_hysteresis_oscillating_series_fires_once_and_resolves_once() -> None:
    values = oscillating(300, 80.0, 4.0) + [60.0] * 5
    rule = AlertRule("cpu", "cpu", ">", 80.0, clear_threshold=70.0, for_samples=2)
    events = run_series(AlertEngine([rule]), "cpu", values)
    assert [k for _, k in events] == ["fired", "resolved"]
    assert events[1][0] == 300  # resolved by the first sample that really fell back
    # without the band the same series flaps: this is what hysteresis prevents
    naive = run_series(AlertEngine([AlertRule("cpu", "cpu", ">", 80.0)]), "cpu", values)
    assert len(naive) > 50


def test_non_finite_and_unknown_metrics_change_nothing() -> None:
    engine = AlertEngine([AlertRule("cpu", "cpu", ">", 80.0, for_samples=2)])
    assert engine.evaluate("n1", {"cpu": 90.0, "other": 1e9}, 0.0) == []
    assert engine.evaluate("n1", {"cpu": math.nan}, 1.0) == []
    assert kinds(engine.evaluate("n1", {"cpu": 90.0}, 2.0)) == ["fired"]  # streak kept
    assert engine.evaluate("n1", {"cpu": math.inf}, 3.0) == []
    assert engine.evaluate("n1", {"cpu": math.nan}, 4.0) == []  # NaN does not resolve
    assert len(engine.active()) == 1


def test_history_is_bounded_and_forget_node_and_remove_rule_resolve() -> None:
    engine = AlertEngine([AlertRule("a", "x", ">", 0.0), AlertRule("b", "x", ">", 5.0)], history=3)
    for i in range(5):
        engine.evaluate("n1", {"x": 1.0}, 2.0 * i)
        engine.evaluate("n1", {"x": -1.0}, 2.0 * i + 1)
    hist = engine.history()
    assert len(hist) == 3 and [a.resolved_at for a in hist] == [5.0, 7.0, 9.0]
    engine.evaluate("n1", {"x": 10.0}, 20.0)
    engine.evaluate("n2", {"x": 10.0}, 20.0)
    assert len(engine.active()) == 4
    gone = engine.forget_node("n1", 21.0)
    assert sorted((e.kind, e.alert.rule) for e in gone) == [("resolved", "a"), ("resolved", "b")]
    removed = engine.remove_rule("b", 22.0)
    assert [(e.alert.rule, e.alert.node) for e in removed] == [("b", "n2")]
    assert [(a.rule, a.node) for a in engine.active()] == [("a", "n2")]
    assert engine.evaluate("n3", {"x": 10.0}, 23.0)[0].alert.rule == "a"  # b is gone
    with pytest.raises(ValueError):
        engine.add_rule(AlertRule("a", "y", ">", 1.0))


# ------------------------------------------------------------------------------- burn rate
SCALE = 1.0 / 360.0  # 1 h -> 10 s, 5 min -> 0.833 s, 6 h -> 60 s, 30 min -> 5 s


def feed(
    engine: AlertEngine, start: float, end: float, error_ratio: float, step: float = 0.1
) -> list[tuple[float, AlertEvent]]:
    """100 requests every ``step`` seconds with the given error ratio."""
    out: list[tuple[float, AlertEvent]] = []
    n = round((end - start) / step)
    for i in range(n):
        t = start + i * step
        bad = round(100 * error_ratio)
        out.extend((t, e) for e in engine.observe_counts("n1", "requests", t, 100 - bad, 100))
    return out


def burn_engine() -> AlertEngine:
    return AlertEngine(burn_rules=[BurnRateRule.sre("avail", "requests", 0.999, scale=SCALE)])


def test_burn_rate_page_fires_after_enough_budget_and_resets_on_the_short_window() -> None:
    engine = burn_engine()
    assert feed(engine, 0.0, 100.0, 0.0) == []
    # 2 % errors = burn rate 20 > 14.4: the 10 s window crosses 14.4 after 7.2 s of it
    events = feed(engine, 100.0, 120.0, 0.02)
    fired = [(t, e) for t, e in events if e.kind == "fired"]
    assert [e.alert.severity for _, e in fired][-1] == "critical"
    t_page = next(t for t, e in fired if e.alert.severity == "critical")
    assert 107.0 <= t_page <= 108.0
    assert engine.burn_rates("avail", "n1", 119.9)[0][0] == pytest.approx(20.0, rel=0.01)
    # errors stop: the page pair's 0.83 s short window clears within about a second although
    # its 10 s long window is still far above 14.4 ...
    events = feed(engine, 120.0, 121.0, 0.0)
    assert events == []
    (page_long, page_short), _ticket = engine.burn_rates("avail", "n1", 121.0)
    assert page_long > 14.4 and page_short == 0.0
    # ... and the alert resolves once the ticket pair's 5 s short window has cleared too
    events = feed(engine, 121.0, 130.0, 0.0)
    resolved = [(t, e) for t, e in events if e.kind == "resolved"]
    assert len(resolved) == 1 and resolved[0][0] <= 125.5
    assert engine.active() == []


def test_burn_rate_ticket_then_page_upgrades_the_same_alert() -> None:
    engine = burn_engine()
    feed(engine, 0.0, 100.0, 0.0)
    # 0.8 % = burn 8: above the ticket's 6, below the page's 14.4
    events = feed(engine, 100.0, 200.0, 0.008)
    assert [(e.kind, e.alert.severity) for _, e in events] == [("fired", "warning")]
    ticket_id = events[0][1].alert.id
    events = feed(engine, 200.0, 220.0, 0.05)
    assert [(e.kind, e.alert.severity) for _, e in events] == [("fired", "critical")]
    assert events[0][1].alert.id == ticket_id
    # no events arrive: tick slides the windows and resolves
    assert engine.tick(219.95) == []
    assert engine.tick(222.0) == []  # the page pair cleared; the ticket pair still burns
    [res] = engine.tick(226.0)
    assert res.kind == "resolved" and res.alert.severity == "critical"


def test_burn_rate_short_blip_does_not_page_and_min_events_holds() -> None:
    engine = burn_engine()
    feed(engine, 0.0, 100.0, 0.0)
    # 0.3 s of 10 % errors: 30 bad in a 10 s window of 10 000 = burn 3: nothing
    assert feed(engine, 100.0, 100.3, 0.10) == []
    quiet = AlertEngine(
        burn_rules=[BurnRateRule.sre("avail", "requests", 0.999, scale=SCALE, min_events=1000)]
    )
    # every request fails, but only 10 of them: below min_events
    assert quiet.observe_counts("n1", "requests", 0.0, 0, 10) == []
    with pytest.raises(ValueError):
        quiet.observe_counts("n1", "requests", 1.0, 11, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slo": 1.0},
        {"slo": 0.0},
        {"windows": ()},
        {"windows": (BurnWindow(long=1.0, short=2.0, burn_rate=2.0, severity="info"),)},
        {"bucket": 1000.0},  # coarser than the 300 s short window
    ],
)
def test_bad_burn_rules_are_rejected(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"name": "b", "metric": "m", "slo": 0.99, **kwargs}
    with pytest.raises(ValueError):
        BurnRateRule(**args)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 3.0), st.integers(0, 5), st.integers(0, 5)),
        min_size=1,
        max_size=60,
    )
)
def test_burn_tracker_windows_match_brute_force(steps: list[tuple[float, int, int]]) -> None:
    rule = BurnRateRule(
        "b",
        "m",
        0.99,
        windows=(BurnWindow(long=4.0, short=1.0, burn_rate=2.0, severity="warning"),),
        bucket=0.5,
    )
    tracker = BurnRateTracker(rule)
    t = 0.0
    seen: list[tuple[int, int, int]] = []  # bucket index, bad, total
    for dt, bad, good in steps:
        t += dt
        tracker.observe(t, good, good + bad)
        seen.append((math.floor(t / 0.5), bad, good + bad))
        cur = seen[-1][0]
        for window, k in ((4.0, 8), (1.0, 2)):
            want_bad = sum(b for i, b, _ in seen if i > cur - k)
            want_total = sum(n for i, _, n in seen if i > cur - k)
            assert tracker.counts(window, t) == (want_bad, want_total)


# ------------------------------------------------------------------------------ escalation
def mk_alert(severity: Any, *, since: float = 0.0, count: int = 1, aid: str = "a1") -> Alert:
    return Alert(aid, "r", "n1", severity, 1.0, since, since, count)


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        ("info", [("log", "")]),
        ("warning", [("log", "")]),
        ("critical", [("log", ""), ("signal", ""), ("webhook", "http://x/hook")]),
    ],
)
def test_default_matrix_actions_by_severity(severity: str, expected: list[tuple[str, str]]) -> None:
    m = EscalationMatrix.default("http://x/hook")
    actions = m.actions_for(AlertEvent("fired", mk_alert(severity)), 0.0)
    assert [(a.kind, a.url) for a in actions] == expected
    assert all(a.event == "fired" and a.level == 0 for a in actions)
    assert [a.signal_type for a in actions if a.kind == "signal"] == (
        [ESCALATION_SIGNAL] if severity == "critical" else []
    )


def test_reescalation_of_unresolved_critical_alerts_and_resolve_notice() -> None:
    m = EscalationMatrix.default("http://x/hook", reescalate_after=60.0, max_reescalations=2)
    crit, warn = mk_alert("critical", aid="c"), mk_alert("warning", aid="w")
    m.actions_for(AlertEvent("fired", crit), 0.0)
    m.actions_for(AlertEvent("fired", warn), 0.0)
    assert m.tick(59.0, [crit, warn]) == []
    again = m.tick(60.0, [crit, warn])
    assert [(a.kind, a.event, a.level) for a in again] == [
        ("log", "reescalated", 1),
        ("signal", "reescalated", 1),
        ("webhook", "reescalated", 1),
    ]
    assert m.tick(100.0, [crit, warn]) == []
    assert len(m.tick(120.0, [crit])) == 3
    assert m.tick(500.0, [crit]) == []  # max_reescalations reached
    done = m.actions_for(AlertEvent("resolved", crit), 510.0)
    assert [(a.kind, a.event, a.level) for a in done] == [
        ("log", "resolved", 2),
        ("webhook", "resolved", 2),
    ]
    body = msgspec.json.decode(done[1].body())
    assert body["event"] == "resolved" and body["alert"]["id"] == "c"


def test_matrix_steps_gated_by_count_and_age() -> None:
    m = EscalationMatrix(
        [
            EscalationStep("warning", "log"),
            EscalationStep("warning", "signal", min_count=5),
            EscalationStep("warning", "webhook", url="http://h/", min_age=30.0),
        ]
    )
    alert = mk_alert("warning", since=10.0)
    assert [a.kind for a in m.actions_for(AlertEvent("fired", alert), 10.0)] == ["log"]
    assert m.tick(20.0, [alert]) == []
    bumped = msgspec.structs.replace(alert, count=5)
    assert [(a.kind, a.event) for a in m.tick(21.0, [bumped])] == [("signal", "escalated")]
    assert [(a.kind, a.event) for a in m.tick(40.0, [bumped])] == [("webhook", "escalated")]
    assert m.tick(1000.0, [bumped]) == []  # warnings are not re-escalated by default
    with pytest.raises(ValueError):
        EscalationStep("critical", "webhook")


def test_backoff_delay_grows_caps_and_jitters_within_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        nominal = min(10.0, 0.5 * 2 ** (attempt - 1))
        for _ in range(20):
            d = backoff_delay(attempt, 0.5, 10.0, 0.25, rng)
            assert nominal * 0.75 <= d <= min(10.0, nominal * 1.25)
    a = [backoff_delay(3, 1.0, 60.0, 0.5, random.Random(1)) for _ in range(2)]
    assert a[0] == a[1]  # reproducible from the seed


# -------------------------------------------------------------------------------- webhooks
class Hook:
    """A tiny HTTP/1.1 server: answers each POST with the next scripted status, or never."""

    def __init__(self, statuses: list[int], *, hang: bool = False) -> None:
        self.statuses = statuses
        self.hang = hang
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("ascii").split("\r\n")
            headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if x)}
            body = await reader.readexactly(int(headers["content-length"]))
            self.requests.append((lines[0], headers, body))
            if self.hang:
                await reader.read()  # until the client gives up and closes
                return
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve(hook: Hook, ssl_ctx: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    server = await asyncio.start_server(hook.handle, "127.0.0.1", 0, ssl=ssl_ctx)
    hook.port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_ctx else "http"
    try:
        yield f"{scheme}://127.0.0.1:{hook.port}/hooks/alert?x=1"
    finally:
        server.close()
        await server.wait_closed()


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, d: float) -> None:
        self.delays.append(d)


async def test_webhook_retries_on_500_then_succeeds() -> None:
    hook, sleeps = Hook([500, 502, 200]), Sleeps()
    async with serve(hook) as url:
        ticks = iter([10.0, 12.5])
        sender = WebhookSender(
            max_attempts=5,
            rng=random.Random(3),
            sleep=sleeps,
            timeout=5.0,
            clock=lambda: next(ticks),
        )
        assert await sender.send(url, b'{"a": 1}') is True
    s = sender.stats
    assert (s.delivered, s.failed, s.attempts, s.retries, s.http_errors) == (1, 0, 3, 2, 2)
    assert s.last_status == 200 and s.last_latency == 2.5
    rng = random.Random(3)
    assert sleeps.delays == [backoff_delay(i, 0.5, 30.0, 0.5, rng) for i in (1, 2)]
    line, headers, body = hook.requests[0]
    assert line == "POST /hooks/alert?x=1 HTTP/1.1"
    assert headers["content-type"] == "application/json"
    assert headers["host"] == f"127.0.0.1:{hook.port}" and body == b'{"a": 1}'


async def test_webhook_gives_up_after_max_attempts_and_does_not_retry_4xx() -> None:
    hook, sleeps = Hook([503]), Sleeps()
    async with serve(hook) as url:
        sender = WebhookSender(max_attempts=4, sleep=sleeps)
        assert await sender.send(url, b"{}") is False
        assert (sender.stats.attempts, sender.stats.failed, len(sleeps.delays)) == (4, 1, 3)
        hook.statuses = [404]
        assert await sender.send(url, b"{}") is False
        assert (sender.stats.attempts, sender.stats.failed) == (5, 2)
        assert sender.stats.last_error == "HTTP 404"


async def test_webhook_times_out_on_a_server_that_never_answers() -> None:
    hook = Hook([200], hang=True)
    async with serve(hook) as url:
        sender = WebhookSender(max_attempts=2, timeout=0.2, sleep=Sleeps())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await sender.send(url, b"{}") is False
        elapsed = loop.time() - t0
    assert (sender.stats.timeouts, sender.stats.failed, sender.stats.attempts) == (2, 1, 2)
    assert 0.35 <= elapsed < 2.0
    assert len(hook.requests) == 2


async def test_webhook_errors_never_propagate() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    sender = WebhookSender(max_attempts=2, sleep=Sleeps())
    assert await sender.send(f"http://127.0.0.1:{port}/", b"{}") is False  # refused
    assert sender.stats.errors == 2
    for bad in ("ftp://h/x", "http:///nohost", "http://h:99999/", "http://h/a b"):
        assert await sender.send(bad, b"{}") is False
    assert sender.stats.invalid == 4 and sender.stats.failed == 5
    assert sender.stats.attempts == 6  # bad urls are not retried


async def test_webhook_queue_delivers_in_background_and_is_bounded() -> None:
    hook = Hook([200])
    async with serve(hook) as url:
        sender = WebhookSender(queue_size=2, sleep=Sleeps())
        assert sender.submit(url, {"n": 1}) and sender.submit(url, b'{"n":2}')
        assert sender.submit(url, {"n": 3}) is False  # not started yet: the queue is full
        assert sender.stats.dropped == 1
        assert sender.submit(url, {"n": object()}) is False  # not JSON: counted, not raised
        assert sender.stats.invalid == 1
        async with sender:
            await wait_until(lambda: sender.stats.delivered == 2 and sender.idle())
            sender.submit(url, {"n": 4})
            await sender.join()
        assert sender.stats.delivered == 3
    assert [msgspec.json.decode(b)["n"] for _, _, b in hook.requests] == [1, 2, 4]
    closed = WebhookSender()
    closed.submit("http://127.0.0.1:9/", {})
    await closed.close()
    assert closed.stats.dropped == 1


def make_cert(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_webhook_over_https(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    hook = Hook([200])
    async with serve(hook, server_ctx) as url:
        trusting = WebhookSender(ssl_context=ssl.create_default_context(cafile=str(cert)))
        assert await trusting.send(url, b'{"tls": true}') is True
        # the system trust store does not know our self-signed certificate
        default = WebhookSender(max_attempts=1)
        assert await default.send(url, b"{}") is False
        assert default.stats.errors == 1 and "SSL" in default.stats.last_error
    assert hook.requests[0][2] == b'{"tls": true}'
