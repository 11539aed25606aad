"""QuarantineBook: durations by reason, recovery passes, extension with a cap, history, and the
observer-side vote rule (one faulty observer cannot evict a healthy node)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import pytest

from agentcluster.health.quarantine import (
    QuarantineBook,
    QuarantineConfig,
    QuarantineEntry,
    vote_on,
)


@pytest.mark.parametrize(
    ("reason", "duration"),
    [
        ("unresponsive", 60.0),
        ("degraded", 300.0),
        ("flapping", 600.0),
        ("manual", None),
        ("something_else", 300.0),
    ],
)
def test_default_durations_by_reason(reason: str, duration: float | None) -> None:
    book = QuarantineBook()
    entry = book.quarantine("n1", reason, 100.0, decided_by="p-1")
    assert entry.until == (None if duration is None else 100.0 + duration)
    assert (entry.reason, entry.since, entry.decided_by, entry.released_at) == (
        reason,
        100.0,
        "p-1",
        None,
    )
    proposal = QuarantineBook().propose_reason("n1", reason, "3 of 3 probes failed")
    assert proposal is not None and proposal.duration == duration
    assert proposal.evidence == "3 of 3 probes failed"


def test_configured_durations() -> None:
    cfg = QuarantineConfig(durations={"degraded": 10.0}, default_duration=7.0)
    book = QuarantineBook(cfg)
    assert book.quarantine("a", "degraded", 0.0).until == 10.0
    assert book.quarantine("b", "unresponsive", 0.0).until == 7.0  # not listed: the default
    for bad in (
        {"recovery_passes": 0},
        {"durations": {"x": 0.0}},
        {"max_factor": 0.5},
        {"vote_window": 2, "vote_min_bad": 3},
    ):
        with pytest.raises(ValueError):
            QuarantineConfig(**bad)


def test_quarantine_is_idempotent_and_queries_are_sorted() -> None:
    book = QuarantineBook()
    first = book.quarantine("n2", "degraded", 10.0, decided_by="p-1")
    assert book.quarantine("n2", "unresponsive", 20.0, decided_by="p-2") == first
    book.quarantine("n1", "unresponsive", 11.0)
    assert book.quarantined() == ["n1", "n2"]
    assert book.is_quarantined("n1") and not book.is_quarantined("n3")
    assert book.propose_reason("n1", "degraded") is None  # already quarantined
    assert [e.node for e in book.entries()] == ["n1", "n2"]
    # an operator's hold turns an automatic quarantine into one that never expires
    held = book.quarantine("n2", "manual", 30.0)
    assert (held.reason, held.until, held.since) == ("manual", None, 10.0)
    assert book.release("n3", 40.0) is None
    released = book.release("n2", 40.0, "operator")
    assert released is not None and (released.released_at, released.why) == (40.0, "operator")
    assert book.quarantined() == ["n1"]


def test_recovery_due_once_then_three_passes_release() -> None:
    book = QuarantineBook()
    book.quarantine("n1", "unresponsive", 0.0)
    assert book.next_deadline() == 60.0
    assert book.tick(59.9) == []
    # results before the minimum time are ignored: the node is not under test yet
    assert book.recovery_result("n1", True, 30.0) is None
    assert [(e.kind, e.node) for e in book.tick(60.0)] == [("recovery_due", "n1")]
    assert book.tick(61.0) == [] and book.next_deadline() is None
    assert book.recovery_result("n1", True, 61.0) is None
    assert book.recovery_result("n1", True, 62.0) is None
    ev = book.recovery_result("n1", True, 63.0)
    assert ev is not None and ev.kind == "released"
    assert not book.is_quarantined("n1")
    [h] = book.history()
    assert (h.reason, h.since, h.until, h.released_at, h.passes) == ("unresponsive", 0, 60, 63, 3)
    assert h.why == "3 recovery checks passed"
    assert book.recovery_result("n1", True, 64.0) is None  # no longer quarantined


def test_failing_check_resets_passes_and_extends_up_to_the_cap() -> None:
    book = QuarantineBook(QuarantineConfig(extension=0.5, max_factor=2.0))
    book.quarantine("n1", "unresponsive", 0.0)  # base 60 s, cap at 120 s
    book.tick(60.0)
    book.recovery_result("n1", True, 60.0)
    book.recovery_result("n1", True, 61.0)
    ev = book.recovery_result("n1", False, 62.0)
    assert ev is not None and ev.kind == "extended"
    assert (ev.entry.until, ev.entry.passes, ev.entry.extensions) == (92.0, 0, 1)
    assert book.recovery_result("n1", True, 70.0) is None  # back to serving time: ignored
    assert book.tick(91.0) == []
    assert [e.kind for e in book.tick(92.0)] == ["recovery_due"]
    ev = book.recovery_result("n1", False, 100.0)
    assert ev is not None and ev.kind == "extended" and ev.entry.until == 120.0  # capped
    book.tick(120.0)
    ev = book.recovery_result("n1", False, 121.0)
    assert ev is not None and ev.kind == "capped"  # escalate: it cannot be extended further
    assert book.recovery_result("n1", False, 122.0) is None  # said once
    assert book.is_quarantined("n1")
    # checks go on and can still release it
    for t in (130.0, 131.0):
        assert book.recovery_result("n1", True, t) is None
    ev = book.recovery_result("n1", True, 132.0)
    assert ev is not None and ev.kind == "released" and ev.entry.extensions == 2


def test_manual_quarantine_is_only_released_by_hand() -> None:
    book = QuarantineBook()
    book.quarantine("n1", "manual", 0.0)
    assert book.tick(1e9) == [] and book.next_deadline() is None
    for t in range(10):
        assert book.recovery_result("n1", True, 1e9 + t) is None
    assert book.is_quarantined("n1")
    assert book.release("n1", 2e9, "operator") is not None


def test_history_is_bounded_and_entries_round_trip() -> None:
    book = QuarantineBook(QuarantineConfig(history=2))
    for i in range(4):
        book.quarantine(f"n{i}", "degraded", float(i))
        book.release(f"n{i}", float(i) + 0.5, "test")
    assert [h.node for h in book.history()] == ["n2", "n3"]
    book.quarantine("a", "degraded", 0.0, evidence="cpu 99%")
    wire = msgspec.msgpack.encode(book.entries())
    other = QuarantineBook()
    other.load(msgspec.msgpack.decode(wire, type=list[QuarantineEntry]))
    other.load(book.history())  # released entries are not adopted
    assert other.quarantined() == ["a"] and other.entry("a") == book.entry("a")


GOOD, BAD = "healthy", "failed"


@pytest.mark.parametrize(
    ("results", "vote"),
    [
        ([], "abstain"),
        (["unknown", "unknown"], "abstain"),
        ([GOOD], "no"),
        ([BAD], "abstain"),  # one failure is not enough to evict, nor a reason to refuse
        ([GOOD, BAD], "abstain"),
        ([BAD, GOOD], "no"),
        ([BAD, BAD], "yes"),
        ([GOOD, BAD, "degraded"], "yes"),
        ([BAD, GOOD, BAD], "yes"),
        ([BAD, BAD, GOOD], "yes"),  # 2 of the last 3 failed
        ([BAD, GOOD, GOOD], "no"),
        ([BAD, BAD, GOOD, GOOD, GOOD], "no"),  # only the last 3 count
        ([BAD, BAD, GOOD, "unknown", "unknown"], "yes"),  # unknowns carry no weight
        ([False, False], "yes"),
        ([True], "no"),
        (["timeout", "unreachable", "ok"], "yes"),
    ],
)
def test_vote_rule(results: Sequence[str | bool], vote: str) -> None:
    assert vote_on(results) == vote
    assert QuarantineBook().vote_on("n9", {"n9": results}) == vote
    assert QuarantineBook().vote_on("n9", results) == vote


def majority(votes: Sequence[str]) -> bool:
    """The lead's majority proposal over all monitors (abstentions count as not-yes)."""
    return sum(v == "yes" for v in votes) > len(votes) // 2


def test_one_faulty_observer_cannot_evict_but_a_majority_can() -> None:
    monitors = ["m1", "m2", "m3", "m4", "m5"]
    books = {m: QuarantineBook() for m in monitors}
    # m1 is degraded itself: every check it runs fails; the others see the target fine
    views = {m: {"target": [BAD, BAD, BAD] if m == "m1" else [GOOD, GOOD, GOOD]} for m in monitors}
    votes = [books[m].vote_on("target", views[m]) for m in monitors]
    assert votes == ["yes", "no", "no", "no", "no"] and not majority(votes)
    # the target really degrades: three of five monitors see it
    for m in ("m2", "m3"):
        views[m]["target"] = [GOOD, BAD, "degraded"]
    votes = [books[m].vote_on("target", views[m]) for m in monitors]
    assert majority(votes)
    # every monitor applies the committed decision; the books agree
    for m in monitors:
        books[m].quarantine("target", "degraded", 5.0, decided_by="proposal-7")
    assert len({msgspec.json.encode(b.entries()) for b in books.values()}) == 1
