"""NaN and infinities nested in MABEAM payloads (proposals, metadata, conditions) are refused
where they enter -- the ``mabeam`` control op, the consensus service, the remote facade --
with the path of the bad number, and hostile nesting is refused without recursion; the node
keeps working."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from agentcluster.cli.mabeam import _plain
from agentcluster.cluster import Cluster, RemoteCluster
from agentcluster.control import ControlRequest, handle_control
from agentcluster.coordination._finite import MAX_DEPTH, non_finite, non_finite_value
from agentcluster.coordination.consensus_service import ConsensusError
from agentcluster.examples.voter import Voter
from agentcluster.testing.simcluster import SimCluster


def _nested(depth: int, leaf: Any = 1.0) -> Any:
    """``depth`` lists, one inside the other, around ``leaf`` (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _bids(bad: float) -> dict[str, Any]:
    return {"item": "gpu", "bids": [{"price": 1.0}, {"price": 2}, {"price": bad}]}


# ----------------------------------------------------------------- the walk
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (_bids(math.nan), "'data.bids[2].price' must be a finite number, not nan"),
        (_bids(math.inf), "'data.bids[2].price' must be a finite number, not inf"),
        ((1.0, [2.0, -math.inf]), "'data[1][1]' must be a finite number, not -inf"),
        (math.nan, "'data' must be a finite number, not nan"),
        ({"a b": {7: math.nan}}, "\"data['a b'][7]\" must be a finite number, not nan"),
        ({"x": {math.nan: 1}}, "'data.x' has a key that is not a finite number: nan"),
    ],
)
def test_the_first_non_finite_number_is_named_by_its_path(value: Any, error: str) -> None:
    assert non_finite(value, "data") == error


def test_finite_payloads_of_every_shape_pass() -> None:
    # MAX_DEPTH containers in all: a dict, a list, a dict and the rest.
    ok = {"n": [1, 2.5, -0.0, True, None, "nan", b"x", {"deep": _nested(MAX_DEPTH - 3)}]}
    assert non_finite(ok, "data") is None
    assert non_finite(_nested(MAX_DEPTH), "data") is None


def test_the_first_bad_number_in_document_order_is_the_one_named() -> None:
    value = {"a": [1.0, {"b": math.nan}], "c": math.inf}
    assert non_finite(value, "p") == "'p.a[1].b' must be a finite number, not nan"


@pytest.mark.parametrize("depth", [MAX_DEPTH, 100_000])  # (inside a dict: one level more)
def test_a_payload_nested_too_deep_is_refused_without_recursion(depth: int) -> None:
    # 100,000 levels would exhaust any recursive walk (the interpreter's limit is 1,000).
    error = non_finite({"bids": _nested(depth)}, "data")
    assert error is not None and error.endswith(f"nests deeper than {MAX_DEPTH} levels")
    assert error.startswith("'data.bids[0][0]") and len(error) < 300  # the path is cut


def test_a_long_key_is_cut_in_the_path() -> None:
    error = non_finite({"k" * 10_000: math.nan}, "data")
    assert error is not None and len(error) < 300 and "..." in error


def test_any_value_a_caller_hands_in_is_walked_in_its_plain_form() -> None:
    class Bid(msgspec.Struct):
        price: float

    assert non_finite_value({"bids": [Bid(1.0), Bid(math.nan)]}, "proposal") == (
        "'proposal.bids[1].price' must be a finite number, not nan"
    )
    assert non_finite_value({object()}, "proposal") is None  # for its encoder to refuse
    assert non_finite_value(_nested(5_000), "proposal") is not None


def test_the_json_of_a_decision_kept_from_before_stays_valid() -> None:
    assert _plain({"p": [1.0, math.nan, {"q": -math.inf}]}) == {"p": [1.0, None, {"q": None}]}


# ----------------------------------------------------------------- where payloads enter
async def _voters(c: SimCluster) -> list[str]:
    node = c.nodes["n1"]
    await node.runtime.spawn(Voter)
    entry = await Cluster.of(node).register("voter", capabilities=["vote"])
    return [entry.id]


@pytest.mark.virtual_time
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            {"fn": "consensus_start", "proposal": _bids(math.nan)},
            "mabeam: 'proposal.bids[2].price' must be a finite number, not nan",
        ),
        (
            {"fn": "consensus_start", "proposal": {"bids": _nested(500)}},
            f"nests deeper than {MAX_DEPTH} levels",
        ),
        (
            {"fn": "register", "agent": "voter", "metadata": {"zone": {"w": math.inf}}},
            "mabeam: 'metadata.zone.w' must be a finite number, not inf",
        ),
        (
            {"fn": "find", "where": [["resources.gpu", "in", [1, math.nan]]]},
            "mabeam: 'where[0][2][1]' must be a finite number, not nan",
        ),
    ],
)
async def test_a_nested_non_finite_mabeam_argument_is_refused_and_the_node_keeps_working(
    args: dict[str, Any], error: str
) -> None:
    async with SimCluster(1, seed=31, store_voters=1) as c:
        ids = await _voters(c)
        node = c.nodes["n1"]
        reply = await handle_control(node, ControlRequest("mabeam", {"participants": ids, **args}))
        assert not reply.ok and reply.error is not None and error in reply.error
        assert await node.consensus.history() == []  # nothing was proposed
        decision = await Cluster.of(node).consensus(ids, _bids(3.0), topic="t")
        assert decision.accepted and decision.proposal == _bids(3.0)
        history = await handle_control(node, ControlRequest("mabeam", {"fn": "consensus_history"}))
        assert history.ok and [d["ref"] for d in history.data] == [decision.ref]


@pytest.mark.virtual_time
async def test_an_in_process_proposal_with_a_nested_nan_is_a_consensus_error() -> None:
    async with SimCluster(1, seed=32, store_voters=1) as c:
        ids = await _voters(c)
        node = c.nodes["n1"]
        with pytest.raises(ConsensusError, match=r"'proposal\.bids\[2\]\.price' must be a finite"):
            await Cluster.of(node).consensus(ids, _bids(math.nan))
        with pytest.raises(ConsensusError, match="nests deeper than"):
            await node.consensus.start(ids, {"a": _nested(MAX_DEPTH + 5)})
        assert (await Cluster.of(node).consensus(ids, {"ok": 1.0})).accepted


async def test_the_remote_facade_refuses_it_as_the_node_does() -> None:
    rc = RemoteCluster(["127.0.0.1:1"], keyring=None, timeout=0.5)  # never reached
    try:
        with pytest.raises(ConsensusError, match=r"'proposal\.bids\[2\]\.price'"):
            await rc.start_consensus(["n1/voter"], _bids(math.nan))
    finally:
        await rc.close()
