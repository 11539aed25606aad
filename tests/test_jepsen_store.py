"""Jepsen-style tests of the raft store (see ``jepsen_harness``): 300 seeds in the normal run
-- 200 with 3 voters, 100 with 5 -- each a fresh simulated cluster under crashes, restarts,
leader isolation, random and one-way partitions, stalls, loss, duplication and reordering,
with its history checked for linearizability, one leader per term, and lock fencing.
``make jepsen`` runs a longer sweep."""

from __future__ import annotations

import pytest

from agentcluster.store import raft as raft_store
from jepsen_harness import run_seed

CHUNK = 20


@pytest.mark.parametrize(
    ("voters", "first"),
    [(3, k) for k in range(0, 200, CHUNK)] + [(5, k) for k in range(0, 100, CHUNK)],
)
def test_histories_are_linearizable(voters: int, first: int) -> None:
    fenced = 0
    for seed in range(first, first + CHUNK):
        res = run_seed(seed, voters)
        assert res.ok, f"seed {seed} ({voters} voters):\n{res.check.report()}\n{res.faults}"
        assert res.leaders, f"seed {seed}: no leader was ever elected"
        assert res.ops > 50, f"seed {seed}: only {res.ops} operations completed"
        fenced += res.fencing_checked
    assert fenced > 0, "the fencing scenario never ran in this chunk"


def test_the_checker_catches_stale_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Canary: a store whose voters answer reads from their own, possibly stale, state
    (no leader, no ReadIndex) must be caught on most seeds -- so a pass above means
    something."""
    serve = raft_store.RaftKV._serve
    request = raft_store.RaftStore.request

    async def sloppy_serve(
        self: raft_store.RaftKV, req: raft_store.KvRequest
    ) -> raft_store.KvReply:
        if req.op == "get":
            return raft_store.KvReply(True, raft_store._enc.encode(self.kv.get(req.key)))
        return await serve(self, req)

    async def sloppy_request(
        self: raft_store.RaftStore, req: raft_store.KvRequest, *, timeout: float | None = None
    ) -> raft_store.KvReply:
        if req.op == "get" and self.local is not None:
            return await self.local.serve(req)
        return await request(self, req, timeout=timeout)

    monkeypatch.setattr(raft_store.RaftKV, "_serve", sloppy_serve)
    monkeypatch.setattr(raft_store.RaftStore, "request", sloppy_request)
    flagged = [seed for seed in range(6) if not run_seed(seed, 3).ok]
    assert len(flagged) >= 3, f"stale reads went unnoticed (flagged seeds: {flagged})"
