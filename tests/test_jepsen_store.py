"""Jepsen-style tests of the raft store (see ``jepsen_harness``): 300 seeds in the normal run
-- 200 with 3 voters, 100 with 5 -- each a fresh simulated cluster under crashes, restarts,
leader isolation, random and one-way partitions, stalls, loss, duplication and reordering,
with its history (puts, gets, compare-and-sets, deletes and lease operations, plus reads
probing a deposed leader) checked for linearizability, one leader per term, and lock fencing.
Canaries break the store on purpose and must be caught.
``make jepsen`` runs a longer sweep."""

from __future__ import annotations

import msgspec
import pytest

from agentcluster.consensus.raft._reads import ReadsMixin
from agentcluster.store import Compare
from agentcluster.store import raft as raft_store
from agentcluster.store._kv import KVStateMachine, Result, RevokeResult
from jepsen_harness import LOCK_NAME, run_seed

CHUNK = 20


@pytest.mark.parametrize(
    ("voters", "first"),
    [(3, k) for k in range(0, 200, CHUNK)] + [(5, k) for k in range(0, 100, CHUNK)],
)
def test_histories_are_linearizable(voters: int, first: int) -> None:
    fenced = probed = refused = 0
    for seed in range(first, first + CHUNK):
        res = run_seed(seed, voters)
        assert res.ok, f"seed {seed} ({voters} voters):\n{res.report()}"
        assert res.leaders, f"seed {seed}: no leader was ever elected"
        assert res.ops > 50, f"seed {seed}: only {res.ops} operations completed"
        assert res.lease_ops > 0, f"seed {seed}: no lease operation completed"
        fenced += res.fencing_checked
        probed += res.probe_writes
        assert res.fencing is not None
        refused += res.fencing.refused
    assert fenced > 0, "the fencing scenario never ran in this chunk"
    # (Reads through the cut-off leader must not return while it is cut off; the canary
    # below shows they are caught when they do.)
    assert probed > 0, "no probe found a new leader behind a cut-off one in this chunk"
    assert refused > 0, "no stale lock holder was ever refused in this chunk"


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


def test_the_nemesis_catches_a_leader_trusting_its_lease_too_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Canary for "a deposed leader never serves a stale read": a leader that trusts its
    lease for as long as it believes it leads (no clock check) must be caught -- by the
    nemesis freezing and cutting off the leader while the rest elect another and write, then
    reading through the old one."""

    def trusting(self: ReadsMixin, now: float) -> bool:
        return self.state == "leader" and self._transferee is None

    monkeypatch.setattr(ReadsMixin, "lease_valid", trusting)
    flagged = [seed for seed in range(12) if not run_seed(seed, 3).ok]
    assert len(flagged) >= 4, f"stale lease reads went unnoticed (flagged seeds: {flagged})"


def test_the_fencing_check_catches_a_store_that_ignores_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Canary for "a client holding an expired lock is fenced off": a store whose fencing
    compare (the lock key's create revision against the holder's token) always holds must
    be caught by the lock clients' log (seeds without the post-heal fencing scenario)."""
    compare = KVStateMachine._compare

    def ignores_tokens(self: KVStateMachine, cmp: Compare) -> bool:
        if cmp.target == "create" and cmp.value != 0 and cmp.key.startswith(f"{LOCK_NAME}/"):
            return True
        return compare(self, cmp)

    monkeypatch.setattr(KVStateMachine, "_compare", ignores_tokens)
    seeds = [s for s in range(12) if s % 3]
    flagged = [seed for seed in seeds if run_seed(seed, 3).fencing_violations]
    assert len(flagged) >= 3, f"stale holders' writes went unnoticed ({flagged})"


def test_the_checker_catches_a_revocation_that_keeps_its_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Canary for the lease operations: a store whose revocation ends the lease but leaves
    the keys attached to it must be caught (seeds without the fencing scenario, which would
    stop at its own assertion first)."""

    def keeps_keys(self: KVStateMachine, lease_id: int) -> Result:
        record = self._leases.pop(lease_id, None)
        if record is None:
            return RevokeResult(False, 0, self._revision)
        for key in record.keys:  # detached (a snapshot must stay valid), not deleted
            self._kvs[key] = msgspec.structs.replace(self._kvs[key], lease=0)
        return RevokeResult(True, 0, self._revision)

    monkeypatch.setattr(KVStateMachine, "_apply_revoke", keeps_keys)
    seeds = [s for s in range(12) if s % 3]
    flagged = [seed for seed in seeds if not run_seed(seed, 3).ok]
    assert len(flagged) >= 3, f"keys outliving their lease went unnoticed ({flagged})"
