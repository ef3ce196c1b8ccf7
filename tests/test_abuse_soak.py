"""A 60 s mixed-abuse soak of one peer (issue 17 "Done means"): fuzz datagrams, slowloris connections,
REGISTER floods, wrong digests and user scans at bounded rates, all at once, on loopback. Afterwards the
peer's live state returns to its baseline — transactions, connections, stored entries and records, user
keys, register locks, throttle records, tasks — and the allocations of its own code (tracemalloc) come
back to within a small margin, while the legitimate user stays callable. ``bench/abuse.py`` runs the same
for 10 minutes."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from abuse import BOB, Rates, abuse, quiet, settle, start_target, traced_kib
from peer_phone import Phone

SECONDS = float(os.environ.get("P2PSIP_SOAK_SECONDS", "60"))
#: What the peer's own code may still hold after the abuse, its bounded memo tables emptied (forget_memos):
#: the token buckets and stream counters of the dozen attacking addresses, and dicts that grew and do not
#: shrink (CPython keeps a dict's table at its largest size). Per-request state must all be gone.
TRACED_MARGIN_KIB = 256


@pytest.mark.slow
async def test_mixed_abuse_leaves_no_state_behind(tmp_path: Path) -> None:
    tracemalloc.start(1)
    peer = await start_target(tmp_path / "peer")
    bob = await Phone.open("bob", host="127.0.0.1")
    caller = await Phone.open("carol", host="127.0.0.10")
    try:
        assert (await bob.register(peer.sip_address("udp"), expires=3600)).status == 200
        warm = await caller.call(BOB, peer.sip_address("udp"), timeout=10)  # warm every code path once
        assert warm.answered
        baseline = await quiet(peer)
        assert baseline["transactions"] == 0
        traced_before = traced_kib(peer)

        tally = await abuse(peer, SECONDS, Rates())
        during = peer.status()["counters"]

        state, took = await settle(peer, baseline, timeout=30)
        assert state == baseline, f"not back to baseline after {took:.1f} s: {state} vs {baseline}"
        traced_after = traced_kib(peer)
        call = await caller.call(BOB, peer.sip_address("udp"), timeout=10)  # bob survived it all
        assert call.answered, call.statuses
    finally:
        bob.close()
        caller.close()
        await peer.close(leave=False)
        tracemalloc.stop()

    # Every kind of abuse ran, and each defence did its work.
    assert tally.sent["fuzz"] >= SECONDS * 50 and tally.answers["fuzz"] > 0
    assert tally.sent["register flood"] >= SECONDS * 20 and during["peer_new_aors_refused"] > 0
    # Each wrong digest the authenticator saw is counted as a failure; one shed before auth (503 with
    # Retry-After: overload, or too many attempts waiting out their delay) legitimately is not, and one
    # whose answer came too late may or may not have been checked.
    guessed = tally.answers
    shed, late = guessed["wrong digests 503"], guessed["wrong digests unanswered"]
    checked = tally.sent["wrong digests"] - shed - late
    assert checked >= 5 and checked <= during["peer_auth_failures"] <= checked + late, (tally, during)
    assert guessed["wrong digests 503-without-Retry-After"] == 0
    assert during["peer_auth_delayed"] > 0 and tally.answers["wrong digests 200"] == 0
    assert tally.sent["scan"] >= SECONDS * 10 and during["peer_scans_refused"] > 0
    assert during["sip_slow_closed"] > 0 and during["sip_connections_refused"] > 0
    assert during["peer_user_keys_removed"] > 0  # flood AORs came and went
    assert traced_after - traced_before < TRACED_MARGIN_KIB, (traced_before, traced_after)


async def test_the_write_seq_memo_forgets_what_the_clock_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The soak found it: ``Node._write`` remembered the last seq of every (key, entry) it ever wrote, so a
    REGISTER flood of new AORs grew the node for good. Seqs the clock passed a minute ago are dropped."""
    import time

    from overlay import node as node_module
    from overlay.identity import KeyPair
    from overlay.node import SEQ_MEMO_PRUNE_AT, Node

    node = await Node.start()
    clock = [time.time_ns()]
    monkeypatch.setattr(node_module.time, "time_ns", lambda: clock[0])
    try:
        for i in range(3 * SEQ_MEMO_PRUNE_AT):
            if i % 500 == 0:
                key = KeyPair.generate()  # the store's per-owner quota is 1,000 records
            clock[0] += 100_000_000  # 0.1 s between writes: 5 minutes in all
            await node.put(f"name{i}", b"v", lifetime=60, key=key)
        assert len(node._seqs) <= SEQ_MEMO_PRUNE_AT  # about a minute's worth, not every name ever written
        # seqs stay monotonic for a slot written again within the same millisecond
        await node.put("again", b"1", lifetime=60)
        await node.put("again", b"2", lifetime=60)
        assert [e.value for e in await node.get("again")] == [b"2"]
    finally:
        await node.close()
