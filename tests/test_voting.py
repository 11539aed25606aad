"""Vote tallying: rule semantics, exact fractions, sound and complete early decisions."""

from __future__ import annotations

import itertools
import time
from fractions import Fraction
from typing import Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentcluster.coordination.voting import (
    Outcome,
    Rule,
    Tally,
    UnknownVoter,
    VoteChoice,
    format_rule,
    majority,
    parse_rule,
    quorum,
    supermajority,
    unanimous,
    weighted,
)

Final = Literal["yes", "no", "abstain", "timeout"]


def reference(rule: Rule, exact: Fraction, final: dict[str, Final]) -> str:
    """The decision straight from the written semantics, with exact rational arithmetic."""
    yes = [p for p, v in final.items() if v == "yes"]
    no = [p for p, v in final.items() if v == "no"]
    electorate = [p for p, v in final.items() if v != "abstain"]
    if rule.kind == "majority":
        return "accepted" if 2 * len(yes) > len(electorate) else "rejected"
    if rule.kind == "supermajority":
        ok = len(yes) >= exact * len(electorate) and len(yes) > 0
        return "accepted" if ok else "rejected"
    if rule.kind == "unanimous":
        ok = bool(yes) and all(v in ("yes", "abstain") for v in final.values())
        return "accepted" if ok else "rejected"
    if rule.kind == "weighted":
        w = {p: Fraction(x) for p, x in rule.weights.items()}
        ok = sum(w[p] for p in yes) > exact * sum(w[p] for p in electorate)
        return "accepted" if ok else "rejected"
    assert rule.kind == "quorum"
    if len(yes) + len(no) < rule.min_votes:
        return "no_quorum"
    return "accepted" if len(yes) > exact * (len(yes) + len(no)) else "rejected"


def run(
    n: int, rule: Rule, votes: list[VoteChoice], *, finish: bool = True
) -> tuple[Tally, Outcome | None]:
    tally = Tally([f"p{i}" for i in range(n)], rule)
    for i, vote in enumerate(votes):
        assert tally.cast(f"p{i}", vote)
    return tally, tally.finish() if finish else tally.outcome()


Y: VoteChoice = "yes"
N: VoteChoice = "no"
A: VoteChoice = "abstain"
FINALS: tuple[Final, ...] = ("yes", "no", "abstain", "timeout")

# (participants, rule, votes of p0.. in order (the rest time out), decision, early)
CASES: list[tuple[int, Rule, list[VoteChoice], str, bool]] = [
    (3, majority(), [Y, Y], "accepted", True),
    (3, majority(), [Y, N, N], "rejected", False),
    (4, majority(), [Y, Y, N, N], "rejected", False),  # a tie is not a majority
    (4, majority(), [Y, Y, A, N], "accepted", True),  # 2 > 3/2: the abstainer left
    (4, majority(), [Y, Y, N], "rejected", False),  # the silent one counts against
    (4, majority(), [Y, Y, A], "accepted", True),  # 2 > 3/2 even if p3 votes no
    (3, majority(), [A, A, A], "rejected", False),  # empty electorate
    (3, supermajority(2 / 3), [Y, Y], "accepted", True),  # exactly 2/3 of 3
    (3, supermajority(2 / 3), [Y, N, Y], "accepted", False),
    (6, supermajority(2 / 3), [Y, Y, Y, N, N], "rejected", False),  # p5 could make it 4 of 6
    (6, supermajority(2 / 3), [Y, Y, N, N, N], "rejected", True),
    (4, supermajority(0.75), [Y, Y, Y, N], "accepted", True),
    (4, supermajority(0.75), [Y, Y, N, N], "rejected", False),
    (5, supermajority(1.0), [Y, Y, Y, Y, A], "accepted", False),
    (2, supermajority(2 / 3), [A, A], "rejected", False),
    (3, unanimous(), [Y, A, Y], "accepted", False),
    (3, unanimous(), [Y, N], "rejected", True),
    (3, unanimous(), [Y, Y], "rejected", False),  # p2 timed out: silence is not consent
    (2, unanimous(), [A, A], "rejected", False),
    (3, weighted({"p0": 3, "p1": 1, "p2": 1}), [Y], "accepted", True),
    (3, weighted({"p0": 2, "p1": 1, "p2": 1}), [Y, N, A], "accepted", False),  # 2 > 3/2
    (3, weighted({"p0": 2, "p1": 1, "p2": 1}), [Y, N, N], "rejected", False),  # 2 = 4/2
    (3, weighted({"p0": 1, "p1": 1, "p2": 1}, 0.0), [Y], "accepted", True),
    (2, weighted({"p0": 0, "p1": 0}), [Y, Y], "rejected", True),  # no weight: certain at once
    (3, weighted({"p0": 1, "p1": 1, "p2": 1}), [A, A, A], "rejected", False),
    (5, quorum(3), [Y, Y, N], "accepted", False),
    (5, quorum(3), [Y, Y, Y], "accepted", True),
    (5, quorum(3), [Y, A, A, A], "no_quorum", True),
    (5, quorum(3), [Y, Y], "no_quorum", False),  # three never voted
    (5, quorum(2, 0.6), [Y, Y, Y, N, N], "rejected", False),  # 3 > 0.6 * 5 is false
    (5, quorum(2, 0.6), [Y, Y, Y, Y, N], "accepted", True),
    (3, quorum(1), [A, A, A], "no_quorum", False),
    (3, quorum(0), [A, A, A], "rejected", False),
    (2, quorum(5), [], "no_quorum", True),  # unreachable from the start
]


@pytest.mark.parametrize(("n", "rule", "votes", "decision", "early"), CASES)
def test_rule_table(
    n: int, rule: Rule, votes: list[VoteChoice], decision: str, early: bool
) -> None:
    tally, out = run(n, rule, votes)
    assert out is not None
    assert (out.decision, out.early) == (decision, early)
    exact = Fraction(rule.fraction).limit_denominator(10**6)
    final: dict[str, Final] = {p: "timeout" for p in tally.participants}
    final.update(tally.votes)
    assert reference(rule, exact, final) == decision


def test_outcome_counts_timeouts_and_latching() -> None:
    tally = Tally(["a", "b", "c", "d", "e"], majority())
    assert tally.cast("c", "yes") and tally.cast("a", "yes")
    assert tally.outcome() is None
    assert tally.cast("e", "yes")
    early = tally.outcome()
    assert early == Outcome("accepted", 3, 0, 0, [], 3.0, 0.0, 5.0, True)
    # Later votes are recorded but cannot move the latched decision or its counts.
    assert tally.cast("b", "no")
    assert tally.votes["b"] == "no"
    assert tally.outcome() is early
    assert tally.finish() is early
    assert not tally.cast("d", "no")  # finished
    assert "d" not in tally.votes


def test_finish_lists_timed_out_in_participant_order() -> None:
    tally = Tally(["z", "a", "m", "b"], quorum(3))
    tally.cast("m", "yes")
    tally.cast("a", "no")
    assert tally.pending() == ["z", "b"]
    out = tally.finish()
    assert out.decision == "no_quorum"
    assert out.timed_out == ["z", "b"]
    assert not out.early
    assert tally.finish() is out


def test_duplicate_unknown_and_bad_votes() -> None:
    tally = Tally(["a", "b", "c"], majority())
    assert tally.cast("a", "no")
    assert not tally.cast("a", "yes")  # the first vote counts
    assert tally.votes == {"a": "no"}
    with pytest.raises(UnknownVoter, match="'mallory'"):
        tally.cast("mallory", "yes")
    with pytest.raises(ValueError, match="yes/no/abstain"):
        tally.cast("b", "maybe")  # type: ignore[arg-type]
    assert isinstance(UnknownVoter("x"), ValueError)
    with pytest.raises(TypeError):
        tally.votes["b"] = "yes"  # type: ignore[index]


@pytest.mark.parametrize(
    ("participants", "rule", "message"),
    [
        ([], majority(), "at least one"),
        (["a", "b", "a"], majority(), r"duplicate participants: \['a'\]"),
        ("abc", majority(), "not a single string"),
        (["a", "b"], weighted({"a": 1.0}), r"no weight for participants \['b'\]"),
    ],
)
def test_tally_construction_errors(participants: list[str], rule: Rule, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tally(participants, rule)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: supermajority(0.5), r"\(0.5, 1\]"),
        (lambda: supermajority(1.01), r"\(0.5, 1\]"),
        (lambda: supermajority(float("nan")), "finite"),
        (lambda: weighted({"a": -1.0}), "finite and >= 0"),
        (lambda: weighted({"a": float("inf")}), "finite and >= 0"),
        (lambda: weighted({"a": 1.0}, 1.0), r"\[0, 1\)"),
        (lambda: quorum(-1), "min_votes must be >= 0"),
        (lambda: quorum(2, 1.0), r"\[0, 1\)"),
        (lambda: Rule("majority", fraction=0.6), "takes no fraction"),
        (lambda: Rule("unanimous", min_votes=2), "min_votes only applies"),
        (lambda: Rule("quorum", weights={"a": 1.0}), "weights only apply"),
        (lambda: Rule("plurality"), "unknown rule kind"),  # type: ignore[arg-type]
    ],
)
def test_bad_rules_are_refused(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_rule_round_trips_and_bad_wire_rules_fail_validation() -> None:
    for rule in (majority(), supermajority(0.8), unanimous(), weighted({"a": 2.5}, 0.4), quorum(3)):
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(rule), type=Rule) == rule
    bad = msgspec.msgpack.encode(["supermajority", 0.2, {}, 0])
    with pytest.raises(msgspec.ValidationError, match="supermajority"):
        msgspec.msgpack.decode(bad, type=Rule)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("majority", majority()),
        (" Unanimous ", unanimous()),
        ("supermajority", supermajority()),
        ("supermajority:0.75", supermajority(0.75)),
        ("supermajority:2/3", supermajority(2 / 3)),
        ("quorum:3", quorum(3)),
        ("quorum:3:0.6", quorum(3, 0.6)),
    ],
)
def test_parse_rule(text: str, rule: Rule) -> None:
    assert parse_rule(text) == rule
    assert parse_rule(format_rule(rule)) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("weighted", "per-participant weights"),
        ("weighted:0.5", "per-participant weights"),
        ("plurality", "unknown rule"),
        ("majority:0.6", "takes no parameters"),
        ("supermajority:x", "bad fraction"),
        ("supermajority:1/0", "bad fraction"),
        ("supermajority:0.4", r"\(0.5, 1\]"),
        ("quorum", "quorum:MIN_VOTES"),
        ("quorum:two", "must be an integer"),
        ("quorum:1:2:3", "quorum:MIN_VOTES"),
    ],
)
def test_parse_rule_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rule(text)


def decide(n: int, rule: Rule, votes: list[VoteChoice]) -> str:
    return run(n, rule, votes)[0].finish().decision


def test_supermajority_fractions_are_exact() -> None:
    # 2/3 as a float is below two thirds; 7 of 10 at 0.7 and 2 of 3 at 2/3 must pass, and
    # 6 of 9 at 0.67 (a hair above two thirds) must not.
    assert decide(10, supermajority(0.7), [Y] * 7 + [N] * 3) == "accepted"
    assert decide(9, supermajority(2 / 3), [Y] * 6 + [N] * 3) == "accepted"
    assert decide(9, supermajority(0.67), [Y] * 6 + [N] * 3) == "rejected"
    assert decide(300, supermajority(2 / 3), [Y] * 200 + [N] * 100) == "accepted"
    assert decide(300, supermajority(2 / 3), [Y] * 199 + [N] * 101) == "rejected"


def test_weighted_sums_are_exact_and_order_independent() -> None:
    # Summed as floats the yes weight (0.6000000000000001) equals half the total
    # (1.2000000000000002 / 2): rejected. Exactly, the binary values 0.1 + 0.2 + 0.3 are a hair
    # above half of the total: accepted, whatever the order the votes arrive in.
    weights = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.6}
    exact_yes = Fraction(0.1) + Fraction(0.2) + Fraction(0.3)
    exact_total = exact_yes + Fraction(0.6)
    assert exact_yes > exact_total / 2
    assert not 0.1 + 0.2 + 0.3 > (0.1 + 0.2 + 0.3 + 0.6) / 2
    votes: dict[str, VoteChoice] = {"a": "yes", "b": "yes", "c": "yes", "d": "no"}
    for order in itertools.permutations(weights):
        tally = Tally(list(weights), weighted(weights, 0.5))
        for p in order:
            tally.cast(p, votes[p])
        out = tally.outcome()
        assert out is not None
        assert out.decision == "accepted"
        assert out.total_weight == float(exact_total)
        if not out.early:
            assert (out.yes_weight, out.no_weight) == (float(exact_yes), 0.6)


def test_huge_weights_report_infinite_total_instead_of_crashing() -> None:
    tally = Tally(["a", "b"], weighted({"a": 1e308, "b": 1e308}))
    tally.cast("a", "yes")
    out = tally.finish()
    assert out.decision == "rejected"  # 1e308 is not above half of 2e308
    assert out.total_weight == float("inf")
    assert out.yes_weight == 1e308


# -- early decisions: brute force over every completion -----------------------------------

SUPER = [Fraction(2, 3), Fraction(3, 4), Fraction(3, 5), Fraction(1), Fraction(5, 7)]
SHARES = [Fraction(0), Fraction(1, 2), Fraction(1, 3), Fraction(2, 3), Fraction(3, 4)]
WEIGHTS = [0.0, 0.1, 0.5, 1.0, 2.0, 3.25, 7.0]


@st.composite
def rules(draw: st.DrawFn, n: int) -> tuple[Rule, Fraction]:
    kind = draw(st.sampled_from(["majority", "supermajority", "unanimous", "weighted", "quorum"]))
    if kind == "majority":
        return majority(), Fraction(1, 2)
    if kind == "unanimous":
        return unanimous(), Fraction(1)
    if kind == "supermajority":
        f = draw(st.sampled_from(SUPER))
        return supermajority(float(f)), f
    share = draw(st.sampled_from(SHARES))
    if kind == "weighted":
        w = {f"p{i}": draw(st.sampled_from(WEIGHTS)) for i in range(n)}
        return weighted(w, float(share)), share
    return quorum(draw(st.integers(0, n + 1)), float(share)), share


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, Rule, Fraction, list[tuple[str, VoteChoice]]]:
    n = draw(st.integers(1, 6))
    rule, exact = draw(rules(n))
    order = draw(st.permutations([f"p{i}" for i in range(n)]))
    k = draw(st.integers(0, n))
    votes = [(p, draw(st.sampled_from(["yes", "no", "abstain"]))) for p in order[:k]]
    return n, rule, exact, votes  # type: ignore[return-value]


def completions(rule: Rule, exact: Fraction, tally: Tally) -> set[str]:
    missing = tally.pending()
    cast: dict[str, Final] = dict(tally.votes)
    found: set[str] = set()
    for choice in itertools.product(FINALS, repeat=len(missing)):
        final: dict[str, Final] = dict(cast)
        final.update(zip(missing, choice, strict=True))
        found.add(reference(rule, exact, final))
        if len(found) > 1:
            break
    return found


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_early_decisions_are_sound_and_complete(
    scenario: tuple[int, Rule, Fraction, list[tuple[str, VoteChoice]]],
) -> None:
    n, rule, exact, votes = scenario
    tally = Tally([f"p{i}" for i in range(n)], rule)
    steps: list[tuple[str, VoteChoice] | None] = [None, *votes]
    for step in steps:
        if step is not None:
            assert tally.cast(*step)
        possible = completions(rule, exact, tally)
        out = tally.outcome()
        if len(possible) == 1:
            # Complete: certain as soon as every completion agrees.
            assert out is not None
            assert {out.decision} == possible
            break
        # Sound: never decided while the missing votes could still change the result.
        assert out is None
    else:
        final = tally.finish()
        timed: dict[str, Final] = {p: "timeout" for p in tally.participants}
        timed.update(tally.votes)
        assert final.decision == reference(rule, exact, timed)
        assert final.timed_out == [p for p in tally.participants if p not in tally.votes]
        assert final.early is False
        return
    assert out.early == (len(tally.votes) < n)
    assert (out.yes, out.no, out.abstain) == (
        sum(v == "yes" for v in tally.votes.values()),
        sum(v == "no" for v in tally.votes.values()),
        sum(v == "abstain" for v in tally.votes.values()),
    )


# -- performance ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [majority(), supermajority(0.75), quorum(10), unanimous()])
def test_cast_and_outcome_are_constant_time(rule: Rule) -> None:
    # Alternating votes keep the tally undecided until the end, so every call takes the
    # full decision path. A re-scan per call would be ~1.25e9 steps here (minutes).
    n = 50_000
    names = [f"agent-{i}" for i in range(n)]
    tally = Tally(names, rule)
    start = time.perf_counter()
    for i, name in enumerate(names):
        tally.cast(name, "yes" if i % 2 else "abstain" if rule.kind == "unanimous" else "no")
        tally.outcome()
    elapsed = time.perf_counter() - start
    assert tally.outcome() is not None
    assert elapsed < 2.0, f"{n} casts took {elapsed:.2f}s"


def test_weighted_tally_of_many_participants_is_linear() -> None:
    n = 50_000
    names = [f"agent-{i}" for i in range(n)]
    tally = Tally(names, weighted({p: 1.0 + (i % 7) / 8 for i, p in enumerate(names)}))
    start = time.perf_counter()
    for i, name in enumerate(names):
        tally.cast(name, "yes" if i % 2 else "no")
        tally.outcome()
    assert time.perf_counter() - start < 2.0
    assert tally.outcome() is not None
