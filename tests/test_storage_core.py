"""The storage protocol core (overlay/storage_core.py), sans-IO: requests and `now` in, Sends and Answers
out, no sockets and no clock. The node (tests/test_node_net.py) and the simulator (tests/test_sim.py) drive
this same class; here each rule is pinned on its own."""

from __future__ import annotations

from overlay.identity import KeyPair
from overlay.ids import RING
from overlay.storage import Entry, Store
from overlay.storage_core import (
    E_NOT_RESPONSIBLE,
    Answer,
    Locate,
    Send,
    StorageConfig,
    StorageCore,
)

ME = 1000
PRED = (500, "10.0.0.5", 7060)
S1, S2 = (2000, "10.0.0.20", 7060), (3000, "10.0.0.30", 7060)
ME_REF = (ME, "10.0.0.10", 7060)
T = 100.0
USER = KeyPair.generate()


def core(replicas: int = 3, store: Store | None = None) -> StorageCore:
    c = StorageCore(ME, store or Store(), replicas, T, StorageConfig(handoff_window=5.0))
    c.on_neighbours(PRED, [S1, S2], T)
    c.take_outputs()
    return c


def entry(key: int = 700, eid: bytes = b"phone", seq: int = 1, life: int = 600, value: bytes = b"v") -> Entry:
    return Entry.create(USER, key, eid, value, seq, life)


def answers(c: StorageCore) -> list[Answer]:
    return [o for o in c.take_outputs() if isinstance(o, Answer)]


def test_store_fans_out_and_answers_once_every_replica_replied() -> None:
    c = core()
    c.handle_request("t1", "store", {"entry": entry()}, T)
    sends = c.take_outputs()
    assert [type(s) for s in sends] == [Send, Send]
    assert {s.to for s in sends if isinstance(s, Send)} == {S1, S2}
    first, second = (s for s in sends if isinstance(s, Send))
    assert first.body["replica"] is True
    c.on_reply(first.request_id, "ok", {"stored": 1}, T)
    assert c.take_outputs() == []  # still waiting for the second replica
    c.on_failure(second.request_id, T + 3)
    (answer,) = answers(c)
    # two copies of the three sent for: the writer compares them with its write quorum
    assert (answer.token, answer.type, answer.body) == ("t1", "ok", {"stored": 2, "wanted": 3})
    # a replica missed the write: an early repair is due soon; it compares digests with both replicas,
    # and one that does not answer gets the primary range pushed
    assert c.next_timer() <= T + 3 + c.config.early_repair_delay
    c.handle_timer(c.next_timer())
    digests = [o for o in c.take_outputs() if isinstance(o, Send)]
    assert {d.to for d in digests} == {S1, S2} and all(d.type == "digest" for d in digests)
    c.on_failure(digests[0].request_id, T + 6)
    (pushed,) = [o for o in c.take_outputs() if isinstance(o, Send)]
    assert pushed.to == digests[0].to and pushed.type == "transfer" and pushed.bulk


def test_a_store_whose_replicas_all_timed_out_says_one_copy_of_three() -> None:
    c = core()
    c.handle_request("t1", "store", {"entry": entry()}, T)
    for s in c.take_outputs():
        assert isinstance(s, Send)
        c.on_failure(s.request_id, T + 3)
    (answer,) = answers(c)
    assert answer.body == {"stored": 1, "wanted": 3}  # below a write quorum of 2: the writer fails


def test_a_node_cut_off_from_its_ring_wants_r_copies_a_ring_of_one_wants_one() -> None:
    # never saw another member: a ring of one, one copy is all there is
    alone = StorageCore(ME, Store(), 3, T, StorageConfig())
    alone.handle_request("t1", "store", {"entry": entry()}, T)
    assert answers(alone)[0].body == {"stored": 1, "wanted": 1}
    # had successors, now sees none (they died, or it is cut off): it still keeps the copy, but says it
    # was one of three, so a writer with a write quorum of 2 fails instead of promising replicas
    c = core()
    c.on_neighbours(None, [], T + 1)
    c.take_outputs()
    c.handle_request("t2", "store", {"entry": entry(seq=2)}, T + 1)
    (answer,) = answers(c)
    assert answer.body == {"stored": 1, "wanted": 3} and c.stats["stores_cut_off"] == 1
    assert c.store.current(700, b"phone") is not None


def test_not_responsible_is_421_and_a_replica_store_is_not_checked() -> None:
    c = core()
    c.handle_request("t", "store", {"entry": entry(key=1500)}, T)
    (answer,) = answers(c)
    assert answer.type == "err" and answer.body["code"] == E_NOT_RESPONSIBLE
    c.handle_request("r", "store", {"entry": entry(key=1500), "replica": True}, T, member=True)
    assert answers(c)[0].body == {"stored": 1}  # a replica does not forward


def test_a_retransmitted_request_gets_the_first_answer_and_never_runs_twice() -> None:
    c = core(replicas=1)
    e = entry()
    c.handle_request("u", "store", {"entry": e}, T, once=True)
    first = answers(c)
    c.handle_request("u", "store", {"entry": e}, T, once=True)
    assert answers(c) == first  # the same answer again, not a stale-seq refusal
    assert c.stats["request_duplicates"] == 1 and c.stats["stores_accepted"] == 1
    assert first and first[0].body == {"stored": 1, "wanted": 1}  # r = 1: no replica to send to
    # the very same entry under a new token (a retry whose reply was lost) is an idempotent success
    c.handle_request("v", "store", {"entry": e}, T)
    assert answers(c)[0].body == {"stored": 1, "wanted": 1} and c.stats["store_duplicates"] == 1


def test_the_same_entry_again_at_the_primary_asks_the_replicas_again() -> None:
    """A primary asked again for an entry it holds (a retry whose answer was lost, or a writer handing
    back a copy its fan-out missed) sends it to its replicas again, counts their answers and repairs
    early if one still misses it; a replica asked again just says it holds it."""
    c = core()
    e = entry()
    c.handle_request("w1", "store", {"entry": e}, T)
    for s in c.take_outputs():
        assert isinstance(s, Send)
        c.on_reply(s.request_id, "ok", {"stored": 1}, T)
    assert answers(c)[0].body == {"stored": 3, "wanted": 3}
    c.handle_request("w2", "store", {"entry": e}, T + 1)
    again = [s for s in c.take_outputs() if isinstance(s, Send)]
    assert {s.to for s in again} == {S1, S2} and all(s.body["replica"] is True for s in again)
    c.on_reply(again[0].request_id, "ok", {"stored": 0}, T + 1)
    c.on_failure(again[1].request_id, T + 4)
    assert answers(c)[0].body == {"stored": 2, "wanted": 3}
    assert c.stats["store_duplicates"] == 1 and c.next_timer() <= T + 4 + c.config.early_repair_delay
    c.handle_request("w3", "store", {"entry": e, "replica": True}, T + 5, member=True)
    assert answers(c)[0].body == {"stored": 0}


def test_a_fanout_store_is_kept_and_answered_at_once_without_forwarding() -> None:
    """``fanout``: the writer sends the replicas their copies itself; the primary checks and keeps the
    entry, answers how many copies its view wants, and sends nothing (not even for a duplicate)."""
    c = core()
    c.handle_request("f", "store", {"entry": entry(), "fanout": True}, T)
    (answer,) = c.take_outputs()
    assert isinstance(answer, Answer) and answer.body == {"stored": 1, "wanted": 3}
    assert c.store.current(700, b"phone") is not None
    c.handle_request("g", "store", {"entry": entry(), "fanout": True}, T)
    assert [o.body for o in c.take_outputs() if isinstance(o, Answer)] == [{"stored": 1, "wanted": 3}]
    # still only for keys in its range, and cut off from its successors it wants r copies
    c.handle_request("h", "store", {"entry": entry(key=1500), "fanout": True}, T)
    assert answers(c)[0].body["code"] == E_NOT_RESPONSIBLE
    c.on_neighbours(PRED, [], T + 1)
    c.take_outputs()
    c.handle_request("i", "store", {"entry": entry(seq=5), "fanout": True}, T + 1)
    assert answers(c)[0].body == {"stored": 1, "wanted": 3} and c.stats["stores_cut_off"] == 1


def test_replica_fetch_returns_tombstones_with_their_seq_primary_fetch_does_not() -> None:
    c = core(replicas=1)
    c.handle_request("a", "store", {"entry": entry(seq=1)}, T)
    c.handle_request("b", "store", {"entry": Entry.create(USER, 700, b"phone", b"", 2, 0)}, T)
    c.take_outputs()
    c.handle_request("p", "fetch", {"key": 700}, T + 10)  # past the hand-off window
    assert answers(c)[0].body == {"entries": []}
    c.handle_request("r", "fetch", {"key": 700, "replica": True}, T + 10)
    ((tombstone, _ms),) = answers(c)[0].body["entries"]
    assert tombstone.is_removal and tombstone.seq == 2


def test_a_new_primary_asks_its_successor_while_its_range_is_on_the_way() -> None:
    c = core()
    c.handle_request("f", "fetch", {"key": 700}, T + 1)  # inside the hand-off window, nothing here yet
    (ask,) = c.take_outputs()
    assert isinstance(ask, Send) and ask.to == S1 and ask.body == {"key": 700, "replica": True}
    removed = Entry.create(USER, 700, b"old", b"", 5, 0)
    c.on_reply(ask.request_id, "ok", {"entries": [(entry(), 5000), (removed, 0)]}, T + 1)
    (answer,) = answers(c)
    assert [e.entry_id for e, _ in answer.body["entries"]] == [b"phone"]  # the tombstone is not a binding


def test_leave_counts_what_the_successor_acknowledged() -> None:
    c = core()
    for i in range(3):
        c.handle_request(i, "store", {"entry": entry(eid=b"%d" % i), "replica": True}, T, member=True)
    c.take_outputs()
    assert c.leave(T) == 3
    sends = [o for o in c.take_outputs() if isinstance(o, Send)]
    assert c.transfers_in_flight == len(sends)
    for s in sends:
        c.on_reply(s.request_id, "ok", {"stored": 3}, T)
    assert c.handed_off == 3 and c.transfers_in_flight == 0


def test_a_restarted_node_locates_and_hands_over_keys_outside_its_range() -> None:
    store = Store()
    store.put(entry(key=700), T)  # ours once linked: (500, 1000]
    store.put(entry(key=RING - 5), T)  # someone else's
    c = StorageCore(ME, store, 3, T, StorageConfig())
    c.on_neighbours(None, [S1, S2], T)  # joined, not linked yet: nothing announced
    assert not any(isinstance(o, Locate) for o in c.take_outputs())
    c.on_neighbours(PRED, [S1, S2], T)
    (locate,) = [o for o in c.take_outputs() if isinstance(o, Locate)]
    assert locate.key == RING - 5
    c.on_located(locate.request_id, S2, T)
    (handover,) = c.take_outputs()
    assert isinstance(handover, Send) and handover.to == S2 and handover.body["announce"] is True


def test_an_announce_passes_what_was_new_on_to_the_replicas() -> None:
    c = core()
    known = entry(key=700, eid=b"known")
    c.handle_request("k", "store", {"entry": known, "replica": True}, T, member=True)
    c.take_outputs()
    fresh = entry(key=700, eid=b"fresh")
    body = {"entries": [(known, 9000), (fresh, 9000)], "announce": True}
    c.handle_request("x", "transfer", body, T, member=True)
    out = c.take_outputs()
    forwarded = [o for o in out if isinstance(o, Send)]
    assert {f.to for f in forwarded} == {S1, S2}
    assert all([e for e, _ in f.body["entries"]] == [fresh] for f in forwarded)
    # a plain transfer (join, repair) is not passed on
    c.handle_request("y", "transfer", {"entries": [(entry(key=700, eid=b"other"), 9000)]}, T, member=True)
    assert not any(isinstance(o, Send) for o in c.take_outputs())


def _replica(entries: list[Entry]) -> StorageCore:
    """S1 as a replica of ME's range, holding ``entries``."""
    r = StorageCore(S1[0], Store(), 3, T, StorageConfig())
    r.on_neighbours(S2, [(4000, "10.0.0.40", 7060)], T)
    r.handle_request("fill", "transfer", {"entries": [(e, 600_000) for e in entries]}, T, member=True)
    r.take_outputs()
    return r


def test_repair_by_digest_pushes_only_the_buckets_that_differ() -> None:
    """Anti-entropy by digest (issue 19): an idle ring with every copy in place exchanges one small
    digest per replica per round and pushes nothing; a replica that missed records gets those buckets
    only. The digest is compared over the sender's range only."""
    c = core()
    keys = [PRED[0] + 1 + i * (ME - PRED[0] - 1) // 40 for i in range(40)]  # spread over (PRED, ME]
    written = [entry(key=k) for k in keys]
    for i, e in enumerate(written):
        c.handle_request(f"w{i}", "store", {"entry": e}, T)
        for s in c.take_outputs():
            if isinstance(s, Send):
                c.on_reply(s.request_id, "ok", {"stored": 1}, T)
    outside = entry(key=ME + 5)  # held by the replica for another primary: not part of ME's digest

    def round_with(replica: StorageCore, at: float) -> list[Entry]:
        c.handle_timer(at)
        digest = next(o for o in c.take_outputs() if isinstance(o, Send) and o.to == S1)
        assert digest.type == "digest" and not digest.bulk and len(digest.body["sums"]) <= 128
        replica.handle_request("d", "digest", digest.body, at, member=True)
        (answer,) = answers(replica)
        c.on_reply(digest.request_id, answer.type, answer.body, at)
        pushed = [o for o in c.take_outputs() if isinstance(o, Send) and o.to == S1]
        return [e for p in pushed for e, _ms in p.body["entries"]]

    in_place = _replica([*written, outside])
    assert round_with(in_place, T + c.config.repair_interval) == []
    assert c.stats["digest_entries_skipped"] == 40

    missing = written[7]
    behind = _replica([e for e in written if e is not missing])
    newer = entry(key=written[30].key, seq=2)
    behind.handle_request("n", "store", {"entry": newer, "replica": True}, T, member=True)
    behind.take_outputs()
    pushed = round_with(behind, T + 2 * c.config.repair_interval + 1)
    assert missing in pushed and written[30] in pushed  # a newer copy there also differs: harmless push
    assert len(pushed) < 12  # two buckets of 16, not the range of 40


def test_repair_runs_both_ways_a_replica_hands_back_what_the_primary_lacks() -> None:
    """A record only a replica holds (the primary-to-be missed its copy and the primary of the time
    crashed, its hand-back with it): the primary's digest shows the bucket differs, and the replica
    pushes its records of that bucket back; the primary keeps the one it lacked and passes it on to its
    other replicas. Found by tests/test_node_churn.py under load: without it the record stayed one copy
    for good, since the primary's pushes only go down. An empty primary range sends its digest too."""
    c = core()
    lost = entry(key=PRED[0] + 7)
    replica = _replica([lost])
    c.handle_timer(T + c.config.repair_interval)  # nothing in ME's range: the digests still go out
    digests = [o for o in c.take_outputs() if isinstance(o, Send)]
    assert {d.to for d in digests} == {S1, S2} and {d.type for d in digests} == {"digest"}
    digest = next(d for d in digests if d.to == S1)
    replica.handle_request("d", "digest", digest.body, T + 61, member=True, sender=ME_REF)
    out = replica.take_outputs()
    (answer,) = [o for o in out if isinstance(o, Answer)]
    (back,) = [o for o in out if isinstance(o, Send)]
    assert answer.type == "ok" and any(answer.body["differ"])
    assert back.to == ME_REF and back.type == "transfer" and back.body["announce"] is True
    assert [e for e, _ms in back.body["entries"]] == [lost]
    assert replica.stats["digest_entries_pushed_back"] == 1

    c.handle_request("b", "transfer", back.body, T + 61, member=True, sender=S1)
    out = c.take_outputs()
    assert [o.body for o in out if isinstance(o, Answer)] == [{"stored": 1}]
    assert c.store.get(lost.key, T + 61) == [lost]
    onward = [o for o in out if isinstance(o, Send)]
    assert [(o.to, o.type) for o in onward] == [(S2, "transfer")]  # not back to S1, which sent it

    # a digest that matches pushes nothing back; nor does one without a sender (an older adapter)
    same = _replica([lost])
    c.on_reply(digest.request_id, answer.type, answer.body, T + 61)
    c.take_outputs()
    c.handle_timer(T + 2 * c.config.repair_interval + 1)
    digest = next(o for o in c.take_outputs() if isinstance(o, Send) and o.to == S1)
    same.handle_request("d2", "digest", digest.body, T + 122, member=True, sender=ME_REF)
    assert [type(o) for o in same.take_outputs()] == [Answer]
    replica.handle_request("d3", "digest", {**digest.body, "sums": bytes(len(digest.body["sums"]))}, T + 122,
                           member=True)
    assert [type(o) for o in replica.take_outputs()] == [Answer]


def test_a_digest_from_a_stranger_or_malformed_is_refused() -> None:
    r = _replica([entry()])
    body = {"lo": PRED[0], "hi": ME, "sums": bytes(128)}
    r.handle_request("x", "digest", body, T, member=False)
    (answer,) = answers(r)
    assert answer.type == "err" and answer.body["code"] == 403
    r.handle_request("y", "digest", {**body, "sums": b"abc"}, T, member=True)
    (answer,) = answers(r)
    assert answer.type == "err" and answer.body["code"] == 400


def test_a_fetch_asking_the_owner_is_refused_by_a_node_that_is_not() -> None:
    """``owner``: the reader took this node for the key's responsible node; a node that is not says so
    (421) instead of answering from its replica copies, so the reader looks the key up again
    (tests/test_stale_owner_read.py). Without ``owner`` a replica fetch answers whatever is held."""
    c = core()
    outside = entry(key=ME + 5)
    c.handle_request("fill", "transfer", {"entries": [(outside, 600_000)]}, T, member=True)
    c.take_outputs()
    c.handle_request("a", "fetch", {"key": outside.key, "replica": True, "owner": True}, T)
    (answer,) = answers(c)
    assert answer.type == "err" and answer.body["code"] == E_NOT_RESPONSIBLE
    assert c.stats["fetch_not_owner"] == 1
    c.handle_request("b", "fetch", {"key": outside.key, "replica": True}, T)
    (answer,) = answers(c)
    assert answer.type == "ok" and [e for e, _ms in answer.body["entries"]] == [outside]
    c.handle_request("c", "fetch", {"key": 700, "replica": True, "owner": True}, T)
    (answer,) = answers(c)
    assert answer.type == "ok" and answer.body["entries"] == []
