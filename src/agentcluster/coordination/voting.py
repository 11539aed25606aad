"""Vote tallying: decision rules and a sans-I/O tally with sound early decisions.

Theory of operation
-------------------
A :class:`Tally` counts the votes of a fixed list of participants under one :class:`Rule`.
It never reads a clock: the caller casts votes as they arrive and calls :meth:`Tally.finish`
when its deadline passes. Every vote is one of ``"yes"``, ``"no"`` or ``"abstain"``.

Semantics (exact; the coordinator and its tests rely on them):

* **Abstentions leave the electorate**: ``electorate = participants - abstainers``.
  A participant that never votes stays in the electorate: at the deadline it is *timed out*
  and counts against acceptance like a ``no`` (silence is not consent).
* **majority** — accepted iff ``yes > electorate / 2`` (by count).
* **supermajority(f)**, ``0.5 < f <= 1`` — accepted iff ``yes >= f * electorate`` and at
  least one ``yes``.
* **unanimous** — accepted iff nobody voted ``no``, nobody timed out and at least one
  participant voted ``yes`` (abstainers are allowed).
* **weighted(weights, threshold)**, ``0 <= threshold < 1`` — accepted iff
  ``yes_weight > threshold * electorate_weight``. Every participant needs a weight (finite,
  ``>= 0``); weights of non-participants are ignored.
* **quorum(min_votes, f)**, ``0 <= f < 1`` — ``no_quorum`` if fewer than ``min_votes``
  ``yes`` + ``no`` votes are cast by the end; otherwise accepted iff
  ``yes > f * (yes + no)``. Abstentions and time-outs are not cast votes.
* An empty electorate (everyone abstained) is rejected by every rule, except quorum, which
  reports ``no_quorum`` when ``min_votes > 0``.

Exactness: fractions are read as the nearest rational with a denominator of at most 10**6
(so ``2/3`` means exactly two thirds and ``0.75`` three quarters) and compared by
cross-multiplying integers. Weights are floats, hence dyadic rationals: they are scaled to
integers once, so sums are exact and independent of the order votes arrive in.

Early decision: :meth:`Tally.outcome` reports a decision before every vote is in exactly
when no assignment of the missing votes (yes, no, abstain or time-out) could change it.
Every rule is monotone in each voter (``no`` = time-out <= abstain <= yes for acceptance),
so it is enough to evaluate the two extreme completions: everyone missing votes ``no``, and
everyone missing votes ``yes``; quorum has a third outcome and checks which of its three
outcomes stay reachable. The first decision is latched — its counts are those of the vote
that settled it — so every observer of the same vote sequence reports the same
:class:`Outcome`, however often it polls. Cast and check are O(1) (running counters).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from types import MappingProxyType
from typing import Literal, get_args

import msgspec

__all__ = [
    "DecisionKind",
    "Outcome",
    "Rule",
    "RuleKind",
    "Tally",
    "UnknownVoter",
    "VoteChoice",
    "format_rule",
    "majority",
    "parse_rule",
    "quorum",
    "supermajority",
    "unanimous",
    "weighted",
]

VoteChoice = Literal["yes", "no", "abstain"]
RuleKind = Literal["majority", "supermajority", "unanimous", "weighted", "quorum"]
DecisionKind = Literal["accepted", "rejected", "no_quorum"]

_KINDS: frozenset[str] = frozenset(get_args(RuleKind))
_CHOICES: frozenset[str] = frozenset(get_args(VoteChoice))
# Decimals with up to six digits and common fractions (1/3, 2/3, 5/7...) are read exactly.
_MAX_DENOMINATOR = 1_000_000


class UnknownVoter(ValueError):
    """A vote from someone who is not a participant of the tally."""


def _ratio(value: float) -> tuple[int, int]:
    frac = Fraction(value).limit_denominator(_MAX_DENOMINATOR)
    return frac.numerator, frac.denominator


class Rule(msgspec.Struct, frozen=True, array_like=True):
    """A decision rule; build one with :func:`majority`, :func:`supermajority`,
    :func:`unanimous`, :func:`weighted`, :func:`quorum` or :func:`parse_rule`.

    ``fraction`` is the supermajority share, the weighted threshold or the quorum's share of
    cast votes; fields a kind does not use must keep their defaults (a stray parameter is a
    mistake worth reporting). Invalid rules are refused at construction and decoding.
    """

    kind: RuleKind
    fraction: float = 0.5
    weights: dict[str, float] = {}
    min_votes: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` when the rule is malformed."""
        kind = self.kind
        if kind not in _KINDS:
            raise ValueError(f"unknown rule kind {kind!r}; expected one of {sorted(_KINDS)}")
        f = self.fraction
        if not isinstance(f, int | float) or isinstance(f, bool) or not math.isfinite(f):
            raise ValueError(f"{kind}: fraction must be a finite number, got {f!r}")
        if not isinstance(self.min_votes, int) or isinstance(self.min_votes, bool):
            raise ValueError(f"{kind}: min_votes must be an int, got {self.min_votes!r}")
        if kind != "weighted" and self.weights:
            raise ValueError(f"{kind}: weights only apply to the weighted rule")
        if kind != "quorum" and self.min_votes != 0:
            raise ValueError(f"{kind}: min_votes only applies to the quorum rule")
        if kind in ("majority", "unanimous") and f != 0.5:
            raise ValueError(f"{kind}: takes no fraction (got {f!r})")
        if kind == "supermajority" and not 0.5 < f <= 1.0:
            raise ValueError(f"supermajority: fraction must be in (0.5, 1], got {f!r}")
        if kind in ("weighted", "quorum") and not 0.0 <= f < 1.0:
            raise ValueError(f"{kind}: fraction must be in [0, 1), got {f!r}")
        if kind == "quorum" and self.min_votes < 0:
            raise ValueError(f"quorum: min_votes must be >= 0, got {self.min_votes}")
        for who, w in self.weights.items():
            if not isinstance(who, str):
                raise ValueError(f"weighted: participant ids must be strings, got {who!r}")
            if (
                not isinstance(w, int | float)
                or isinstance(w, bool)
                or not math.isfinite(w)
                or w < 0
            ):
                raise ValueError(f"weighted: weight of {who!r} must be finite and >= 0: {w!r}")


def majority() -> Rule:
    """More than half of the electorate votes yes."""
    return Rule("majority")


def supermajority(fraction: float = 2 / 3) -> Rule:
    """At least ``fraction`` of the electorate votes yes (``0.5 < fraction <= 1``)."""
    return Rule("supermajority", fraction=float(fraction))


def unanimous() -> Rule:
    """No ``no``, no time-out, at least one ``yes``."""
    return Rule("unanimous")


def weighted(weights: Mapping[str, float], threshold: float = 0.5) -> Rule:
    """The yes weight exceeds ``threshold`` of the electorate's weight."""
    return Rule("weighted", fraction=float(threshold), weights=dict(weights))


def quorum(min_votes: int, fraction: float = 0.5) -> Rule:
    """At least ``min_votes`` yes+no votes, and yes exceeds ``fraction`` of them."""
    return Rule("quorum", fraction=float(fraction), min_votes=min_votes)


def _parse_fraction(text: str, spec: str) -> float:
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(Fraction(int(num), int(den)))
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"bad fraction {text!r} in rule {spec!r}") from None


def parse_rule(text: str) -> Rule:
    """Parse ``majority``, ``unanimous``, ``supermajority[:F]``, ``quorum:N[:F]``.

    ``F`` is a decimal (``0.75``) or a ratio (``2/3``). Weighted rules need a weight per
    participant and cannot be written as text: build them with :func:`weighted`.
    """
    spec = text.strip()
    parts = [p.strip() for p in spec.split(":")]
    kind, args = parts[0].lower(), parts[1:]
    if kind in ("majority", "unanimous"):
        if args:
            raise ValueError(f"rule {spec!r}: {kind} takes no parameters")
        return majority() if kind == "majority" else unanimous()
    if kind == "supermajority":
        if len(args) > 1:
            raise ValueError(f"rule {spec!r}: expected supermajority[:FRACTION]")
        return supermajority(_parse_fraction(args[0], spec)) if args else supermajority()
    if kind == "quorum":
        if not 1 <= len(args) <= 2:
            raise ValueError(f"rule {spec!r}: expected quorum:MIN_VOTES[:FRACTION]")
        try:
            min_votes = int(args[0])
        except ValueError:
            raise ValueError(f"rule {spec!r}: MIN_VOTES must be an integer") from None
        if len(args) == 2:
            return quorum(min_votes, _parse_fraction(args[1], spec))
        return quorum(min_votes)
    if kind == "weighted":
        raise ValueError(
            f"rule {spec!r}: weighted rules need per-participant weights and cannot be parsed "
            "from text; build one with weighted({participant: weight, ...}, threshold)"
        )
    raise ValueError(
        f"unknown rule {spec!r}; expected majority, supermajority[:F], unanimous or quorum:N[:F]"
    )


def format_rule(rule: Rule) -> str:
    """A short human-readable form; :func:`parse_rule` reads it back for non-weighted rules."""
    if rule.kind == "supermajority":
        return f"supermajority:{rule.fraction!r}"
    if rule.kind == "quorum":
        return f"quorum:{rule.min_votes}:{rule.fraction!r}"
    if rule.kind == "weighted":
        return f"weighted[{len(rule.weights)}]:{rule.fraction!r}"
    return rule.kind


class Outcome(msgspec.Struct, frozen=True, array_like=True):
    """The result of a tally.

    Counts and weights are those at the moment of the decision. For rules without weights
    every participant weighs 1. ``timed_out`` lists, in participant order, those who never
    voted — only when the decision was taken at the deadline. ``early`` is true when the
    decision was certain before every vote was in.
    """

    decision: DecisionKind
    yes: int
    no: int
    abstain: int
    timed_out: list[str]
    yes_weight: float
    no_weight: float
    total_weight: float
    early: bool


class Tally:
    """Counts the votes of ``participants`` under ``rule``; see the module docstring."""

    __slots__ = (
        "_abstain",
        "_abstain_w",
        "_den",
        "_finished",
        "_kind",
        "_min_votes",
        "_no",
        "_no_w",
        "_num",
        "_outcome",
        "_participants",
        "_rule",
        "_scale",
        "_strict",
        "_total_w",
        "_votes",
        "_weights",
        "_yes",
        "_yes_w",
    )

    def __init__(self, participants: Sequence[str], rule: Rule) -> None:
        if isinstance(participants, str):
            raise ValueError("participants must be a sequence of ids, not a single string")
        order = tuple(participants)
        if not order:
            raise ValueError("a tally needs at least one participant")
        if len(set(order)) != len(order):
            counts: dict[str, int] = {}
            for p in order:
                counts[p] = counts.get(p, 0) + 1
            raise ValueError(f"duplicate participants: {[p for p, c in counts.items() if c > 1]}")
        for p in order:
            if not isinstance(p, str):
                raise ValueError(f"participant ids must be strings, got {p!r}")
        rule.validate()
        self._rule = rule
        self._kind = rule.kind
        self._participants = order
        self._weights = self._integer_weights(order, rule)
        self._total_w = sum(self._weights.values())
        self._votes: dict[str, VoteChoice] = {}
        self._yes = self._no = self._abstain = 0
        self._yes_w = self._no_w = self._abstain_w = 0
        self._min_votes = rule.min_votes
        if rule.kind == "majority":
            self._num, self._den, self._strict = 1, 2, True
        elif rule.kind == "supermajority":
            self._num, self._den = _ratio(rule.fraction)
            self._strict = False
        else:
            self._num, self._den = _ratio(rule.fraction)
            self._strict = True
        self._outcome: Outcome | None = None
        self._finished = False
        self._decide()

    def _integer_weights(self, order: tuple[str, ...], rule: Rule) -> dict[str, int]:
        if rule.kind != "weighted":
            self._scale = 1
            return dict.fromkeys(order, 1)
        missing = [p for p in order if p not in rule.weights]
        if missing:
            raise ValueError(f"weighted rule has no weight for participants {missing}")
        fracs = [Fraction(rule.weights[p]) for p in order]
        # Float denominators are powers of two: scaling by the largest makes all integers.
        self._scale = scale = max(f.denominator for f in fracs)
        return {
            p: f.numerator * (scale // f.denominator) for p, f in zip(order, fracs, strict=True)
        }

    # -- public API ---------------------------------------------------------------------

    @property
    def rule(self) -> Rule:
        return self._rule

    @property
    def participants(self) -> tuple[str, ...]:
        return self._participants

    @property
    def votes(self) -> Mapping[str, VoteChoice]:
        """Read-only view of the votes recorded so far (first vote per participant)."""
        return MappingProxyType(self._votes)

    @property
    def finished(self) -> bool:
        return self._finished

    def pending(self) -> list[str]:
        """Participants that have not voted yet, in participant order (O(n))."""
        votes = self._votes
        return [p for p in self._participants if p not in votes]

    def cast(self, participant: str, vote: VoteChoice) -> bool:
        """Record a vote; ``False`` when it does not count (a second vote, or after finish).

        Raises :class:`UnknownVoter` for a non-participant and ``ValueError`` for a choice
        other than yes/no/abstain. Votes after an early decision are recorded but cannot
        change the latched outcome (that is what early means).
        """
        weight = self._weights.get(participant)
        if weight is None:
            raise UnknownVoter(f"{participant!r} is not a participant of this tally")
        if vote not in _CHOICES:
            raise ValueError(f"vote must be one of yes/no/abstain, got {vote!r}")
        if self._finished or participant in self._votes:
            return False
        self._votes[participant] = vote
        if vote == "yes":
            self._yes += 1
            self._yes_w += weight
        elif vote == "no":
            self._no += 1
            self._no_w += weight
        else:
            self._abstain += 1
            self._abstain_w += weight
        if self._outcome is None:
            self._decide()
        return True

    def outcome(self) -> Outcome | None:
        """The decision once it is certain (early, or with every vote in), else ``None``."""
        return self._outcome

    def finish(self) -> Outcome:
        """Decide at the deadline: participants that never voted are timed out.

        Idempotent; afterwards :meth:`cast` returns ``False``.
        """
        self._finished = True
        if self._outcome is not None:
            return self._outcome
        timed_out = self.pending()
        missing = len(timed_out)
        if self._kind == "quorum":
            decision = self._quorum_final()
        elif self._kind == "unanimous":
            decision = self._unanimous(self._yes, self._no + missing)
        else:
            decision = self._threshold(self._yes_w, self._abstain_w, self._yes)
        self._outcome = self._make(decision, timed_out, early=False)
        return self._outcome

    # -- decision ----------------------------------------------------------------------

    def _threshold(self, yes_w: int, abstain_w: int, yes: int) -> DecisionKind:
        # yes_w > t * (W - abstain_w)  <=>  den * yes_w + num * abstain_w > num * W
        lhs = self._den * yes_w + self._num * abstain_w
        rhs = self._num * self._total_w
        if self._strict:
            return "accepted" if lhs > rhs else "rejected"
        # Non-strict (supermajority) would accept an empty electorate: require a yes.
        return "accepted" if lhs >= rhs and yes > 0 else "rejected"

    @staticmethod
    def _unanimous(yes: int, no_or_timed_out: int) -> DecisionKind:
        return "accepted" if no_or_timed_out == 0 and yes > 0 else "rejected"

    def _quorum_accepts(self, yes: int, no: int) -> bool:
        # yes > f * (yes + no)  <=>  (den - num) * yes > num * no
        return (self._den - self._num) * yes > self._num * no

    def _quorum_final(self) -> DecisionKind:
        if self._yes + self._no < self._min_votes:
            return "no_quorum"
        return "accepted" if self._quorum_accepts(self._yes, self._no) else "rejected"

    def _decide(self) -> None:
        """Latch the outcome if the missing votes can no longer change it."""
        yes, no, abstain = self._yes, self._no, self._abstain
        missing = len(self._participants) - yes - no - abstain
        decision: DecisionKind
        if self._kind == "quorum":
            cast = yes + no
            reachable = cast + missing >= self._min_votes
            possible = (
                cast < self._min_votes,
                reachable and self._quorum_accepts(yes + missing, no),
                reachable and not self._quorum_accepts(yes, no + missing),
            )
            if sum(possible) != 1:
                return
            decision = ("no_quorum", "accepted", "rejected")[possible.index(True)]
        elif self._kind == "unanimous":
            decision = self._unanimous(yes, no + missing)
            if missing and decision != self._unanimous(yes + missing, no):
                return
        else:
            decision = self._threshold(self._yes_w, self._abstain_w, yes)
            if missing:
                missing_w = self._total_w - self._yes_w - self._no_w - self._abstain_w
                if decision != self._threshold(
                    self._yes_w + missing_w, self._abstain_w, yes + missing
                ):
                    return
        self._outcome = self._make(decision, [], early=missing > 0)

    def _make(self, decision: DecisionKind, timed_out: list[str], *, early: bool) -> Outcome:
        return Outcome(
            decision=decision,
            yes=self._yes,
            no=self._no,
            abstain=self._abstain,
            timed_out=timed_out,
            yes_weight=self._as_float(self._yes_w),
            no_weight=self._as_float(self._no_w),
            total_weight=self._as_float(self._total_w),
            early=early,
        )

    def _as_float(self, scaled: int) -> float:
        try:
            return scaled / self._scale  # int / int rounds correctly
        except OverflowError:  # a sum of huge finite weights can exceed the float range
            return math.inf
