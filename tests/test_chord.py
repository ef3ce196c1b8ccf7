"""Unit tests of the sans-IO Chord core, driven by a fake clock and an in-memory network.

The network delivers every request and its reply at once, in FIFO order; time only moves when the test
advances it, and then each core's timer fires exactly when the core asked. Nothing sleeps, and the same
seed gives the same run.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from overlay import ids
from overlay.chord import (
    CHORD_MESSAGES,
    ChordConfig,
    ChordCore,
    Joined,
    JoinFailed,
    LookupDone,
    LookupFailed,
    NeighboursChanged,
    NodeRef,
    Output,
    SendRequest,
    proof_data,
)
from overlay.identity import KeyPair
from overlay.identity import verify as ed25519_verify
from overlay.sim import sim_sign, sim_verify

Endpoint = tuple[str, int]


def ed_verify(public_key: bytes, data: bytes, sig: bytes) -> bool:
    return ed25519_verify(public_key, sig, data)


class Net:
    """Zero-latency network of cores plus a fake clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cores: dict[Endpoint, ChordCore] = {}
        self.down: set[Endpoint] = set()
        self.events: dict[Endpoint, list[Output]] = {}
        self.queue: deque[tuple[ChordCore, SendRequest]] = deque()
        self.sent: dict[str, int] = {}

    def add(self, core: ChordCore) -> ChordCore:
        self.cores[core.me.ep] = core
        self.events[core.me.ep] = []
        return core

    def kill(self, core: ChordCore) -> None:
        self.down.add(core.me.ep)

    def live(self) -> list[ChordCore]:
        return [c for ep, c in self.cores.items() if ep not in self.down]

    def _collect(self, core: ChordCore) -> None:
        for out in core.take_outputs():
            if isinstance(out, SendRequest):
                self.sent[out.type] = self.sent.get(out.type, 0) + 1
                self.queue.append((core, out))
            else:
                self.events[core.me.ep].append(out)

    def pump(self) -> None:
        for core in self.live():
            self._collect(core)
        while self.queue:
            src, req = self.queue.popleft()
            dst = self.cores.get(req.to)
            if dst is None or req.to in self.down or src.me.ep in self.down:
                continue
            reply = dst.handle_request(src.me, req.type, req.body, self.now)
            self._collect(dst)
            if reply is not None:
                if reply.type == "ok":
                    src.handle_reply(req.request_id, dst.me.id, reply.body, self.now)
                else:
                    src.handle_error(req.request_id, reply.body["code"], reply.body["reason"], self.now)
                self._collect(src)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        self.pump()
        while True:
            due = [t for c in self.live() if (t := c.next_timer()) is not None]
            if not due or min(due) > end:
                break
            self.now = max(self.now, min(due))
            for core in self.live():
                t = core.next_timer()
                if t is not None and t <= self.now:
                    core.handle_timer(self.now)
                    self._collect(core)
            self.pump()
        self.now = end

    def lookup(self, origin: ChordCore, key: int) -> LookupDone | LookupFailed:
        lid = origin.start_lookup(key, self.now)
        for _ in range(200):
            self.pump()
            for ev in self.events[origin.me.ep]:
                if isinstance(ev, LookupDone | LookupFailed) and ev.lookup_id == lid:
                    return ev
            self.run(0.5)
        raise AssertionError("lookup never finished")


def owner_of(key: int, members: list[int]) -> int:
    ordered = sorted(members)
    return ordered[bisect.bisect_left(ordered, key) % len(ordered)]


# -------------------------------------------------------------------------------------------------------
# node factories
# -------------------------------------------------------------------------------------------------------

_counter = iter(range(1, 1_000_000))


def ed_node(
    rng: random.Random, config: ChordConfig | None = None, pair: KeyPair | None = None, port: int = 0
) -> ChordCore:
    """A core with a real Ed25519 identity (seeded, so the test is deterministic)."""
    pair = pair or KeyPair.from_private_bytes(rng.randbytes(32))
    n = next(_counter)
    return ChordCore(
        NodeRef(pair.node_id, "127.0.0.1", port or 10000 + n),
        public_key=pair.public_key,
        sign=pair.sign,
        verify=ed_verify,
        config=config,
        random_bytes=rng.randbytes,
    )


def hash_node(
    rng: random.Random, config: ChordConfig | None = None, want: Callable[[int], bool] | None = None
) -> ChordCore:
    """A core with the simulator's hash identity; ``want`` picks where on the ring it lands."""
    while True:
        pk = rng.randbytes(32)
        node_id = ids.key_for(pk)
        if want is None or want(node_id):
            break
    n = next(_counter)
    return ChordCore(
        NodeRef(node_id, "127.0.0.1", 20000 + n),
        public_key=pk,
        sign=sim_sign(pk),
        verify=sim_verify,
        config=config,
        random_bytes=rng.randbytes,
    )


def seeded_ring(net: Net, cores: list[ChordCore], base: int) -> None:
    """Install the exact stable ring (what overlay.sim does for large N)."""
    ordered = sorted(cores, key=lambda c: c.me.id)
    refs = [c.me for c in ordered]
    id_list = [r.id for r in refs]
    count = len(refs)
    for i, core in enumerate(ordered):
        r = core.config.successors
        succs = [refs[(i + k) % count] for k in range(1, min(r, count - 1) + 1)]
        fingers = {}
        level = 1
        while level < ids.RING:
            for j in range(1, base):
                if j * level < ids.RING:
                    k = bisect.bisect_left(id_list, (core.me.id + j * level) % ids.RING) % count
                    fingers[refs[k].id] = refs[k]
            level *= base
        core.seed_routing(succs, refs[i - 1], fingers.values(), net.now)
        net.add(core)
    net.pump()


def assert_ring(cores: list[ChordCore]) -> None:
    """Successor lists, predecessors: exactly the sorted order of the given (live) cores."""
    ordered = sorted(cores, key=lambda c: c.me.id)
    count = len(ordered)
    for i, core in enumerate(ordered):
        r = core.config.successors
        expect = [ordered[(i + k) % count].me.id for k in range(1, min(r, count - 1) + 1)]
        assert [n.id for n in core.successors] == expect, f"successors of {ids.short(core.me.id)}"
        assert core.predecessor is not None and core.predecessor.id == ordered[i - 1].me.id


def join_all(net: Net, cores: list[ChordCore], rng: random.Random, spacing: float = 1.0) -> None:
    cores[0].start(net.now)
    net.add(cores[0])
    for k, core in enumerate(cores[1:], start=1):
        net.add(core)
        core.start_join(cores[rng.randrange(k)].me.ep, net.now)
        net.run(spacing)


# -------------------------------------------------------------------------------------------------------
# tests
# -------------------------------------------------------------------------------------------------------


def test_schema_covers_every_routing_message() -> None:
    assert set(CHORD_MESSAGES) == {
        "ping",
        "find_successor",
        "get_predecessor",
        "get_successors",
        "notify",
        "leave",
    }
    vocabulary = {"id", "ep", "node", "nodes", "u64", "bytes", "str", "bool", "cert"}
    for spec in CHORD_MESSAGES.values():
        for ftype in [*spec.request.values(), *spec.reply.values()]:
            assert ftype.rstrip("?") in vocabulary


def test_join_and_stabilize_converge_with_real_signatures() -> None:
    rng = random.Random(1)
    net = Net()
    cores = [ed_node(rng) for _ in range(12)]
    join_all(net, cores, rng)
    net.run(40)
    assert_ring(cores)
    assert all(any(isinstance(e, Joined) for e in net.events[c.me.ep]) for c in cores[1:])
    # Every neighbour was admitted after an identity check, and each check cost one ping per neighbour.
    checks = sum(c.stats().get("identity_checks", 0) for c in cores)
    assert 0 < checks <= net.sent["ping"]
    for core in cores:
        stats = core.stats()
        assert stats.get("identity_rejected", 0) == 0
        # Once per neighbour: every check verified a different node, none was checked twice.
        assert stats.get("identity_checks", 0) == stats["verified_identities"]


def test_neighbours_changed_reports_the_final_state() -> None:
    rng = random.Random(2)
    net = Net()
    cores = [hash_node(rng) for _ in range(6)]
    join_all(net, cores, rng)
    net.run(30)
    for core in cores:
        changes = [e for e in net.events[core.me.ep] if isinstance(e, NeighboursChanged)]
        assert changes, "no NeighboursChanged event"
        last = changes[-1]
        assert last.predecessor == core.predecessor
        assert last.successors == core.successors


def test_fingers_are_the_true_successors_of_their_starts() -> None:
    rng = random.Random(3)
    config = ChordConfig(finger_base=4, proximity=False)
    net = Net()
    cores = [hash_node(rng, config) for _ in range(24)]
    join_all(net, cores, rng, spacing=0.5)
    net.run(200)  # several fix_fingers rounds
    assert_ring(cores)
    members = [c.me.id for c in cores]
    for core in cores:
        fingers = {f.id for f in core.fingers()}
        assert fingers <= set(members)
        first = ids.distance(core.me.id, core.successors[0].id)
        level = 1
        while level < ids.RING:
            for j in range(1, 4):
                d = j * level
                if first < d < ids.RING:
                    want = owner_of((core.me.id + d) % ids.RING, members)
                    assert want in fingers or want == core.me.id, "a finger is missing or wrong"
            level *= 4


@pytest.mark.parametrize("base", [2, 16])
def test_lookups_are_correct_and_short_on_a_stable_ring(base: int) -> None:
    rng = random.Random(4)
    net = Net()
    cores = [hash_node(rng, ChordConfig(finger_base=base)) for _ in range(128)]
    seeded_ring(net, cores, base)
    members = [c.me.id for c in cores]
    hops = []
    for _ in range(200):
        origin = rng.choice(cores)
        key = rng.getrandbits(128)
        result = net.lookup(origin, key)
        assert isinstance(result, LookupDone)
        assert result.node.id == owner_of(key, members)
        hops.append(result.hops)
    mean = sum(hops) / len(hops)
    assert mean <= 0.5 * 7 + 1 if base == 2 else mean <= 0.5 * 7  # log2(128) = 7
    assert max(hops) <= 8


def test_lookup_answered_locally_costs_zero_hops_and_the_successor_one() -> None:
    rng = random.Random(5)
    net = Net()
    cores = [hash_node(rng) for _ in range(8)]
    seeded_ring(net, cores, 16)
    core = cores[0]
    assert core.predecessor is not None
    own = net.lookup(core, core.me.id)
    assert isinstance(own, LookupDone) and own.node == core.me and own.hops == 0
    succ = core.successors[0]
    nxt = net.lookup(core, succ.id)
    assert isinstance(nxt, LookupDone) and nxt.node.id == succ.id and nxt.hops == 1


def test_a_confirmed_owner_answers_later_lookups_of_its_range_without_messages() -> None:
    """The owner cache: a lookup's confirmed answer (owner, its predecessor, its successors) ends later
    lookups of keys in (predecessor, owner] at once; it expires, is dropped when the adapter reports the
    owner wrong, and when our own neighbours change (issue 19: a new AOR's REGISTER saved a round trip)."""
    rng = random.Random(15)
    net = Net()
    cores = [hash_node(rng, ChordConfig(owner_cache_ttl=10.0)) for _ in range(8)]
    seeded_ring(net, cores, 16)
    origin = cores[0]
    members = sorted(c.me.id for c in cores)
    far = next(m for m in members if m not in (origin.me.id, *(n.id for n in origin.successors)))
    before = members[members.index(far) - 1]
    inside = [far, before + 1, (before + far) // 2]

    def asked(key: int) -> tuple[LookupDone, int]:
        sent = net.sent.get("find_successor", 0)
        result = net.lookup(origin, key)
        assert isinstance(result, LookupDone) and result.node.id == owner_of(key, members)
        return result, net.sent.get("find_successor", 0) - sent

    first, messages = asked(inside[0])
    assert first.hops >= 1 and messages >= 1
    for key in inside[1:]:
        hit, messages = asked(key)
        assert (hit.hops, messages) == (0, 0)
        assert hit.successors == first.successors  # the holders a quorum read asks
    assert asked(before)[1] >= 1 or before in (origin.me.id, *(n.id for n in origin.successors))
    assert origin.stats()["lookups_cached"] == 2

    origin.forget_owner(far)  # the adapter was told "not responsible"
    assert asked(inside[1])[1] >= 1
    net.now += 10.5  # expired
    assert asked(inside[1])[1] >= 1
    assert asked(inside[2])[1] == 0
    dead = origin.successors[0]
    net.kill(net.cores[dead.ep])
    origin.node_failed(dead.id, net.now)  # a ring change around us: all forgotten
    sent = net.sent.get("find_successor", 0)
    net.lookup(origin, inside[2])
    assert net.sent.get("find_successor", 0) > sent


def test_an_owner_answering_with_a_short_successor_list_is_not_cached() -> None:
    """A claim made while the owner's successor list is short (its successors just declared dead, or the
    list still filling after a join) names fewer replica holders than the key has. The lookup reports it
    as it is, but the owner cache does not keep it: every read and write of the range would ask too few
    holders for the cache's lifetime (a read that knew only the responsible node believed it alone)."""
    rng = random.Random(15)
    net = Net()
    cores = [hash_node(rng, ChordConfig(owner_cache_ttl=10.0, stabilize_interval=0.5)) for _ in range(8)]
    seeded_ring(net, cores, 16)
    origin = cores[0]
    members = sorted(c.me.id for c in cores)
    far = next(m for m in members if m not in (origin.me.id, *(n.id for n in origin.successors)))
    owner = next(c for c in cores if c.me.id == far)
    for lost in owner.successors[1:]:  # e.g. timed out under load: the list keeps its first entry only
        owner.node_failed(lost.id, net.now)
    assert len(owner.successors) == 1

    def asked() -> tuple[LookupDone, int]:
        sent = net.sent.get("find_successor", 0)
        result = net.lookup(origin, far)
        assert isinstance(result, LookupDone) and result.node.id == far
        return result, net.sent.get("find_successor", 0) - sent

    short, messages = asked()
    assert short.successors == owner.successors and messages >= 1
    assert asked()[1] >= 1  # not answered from the cache
    assert origin.stats()["owner_cache_short_lists"] == 2
    net.run(3.0)  # stabilization fills the owner's list again
    full, messages = asked()
    assert len(full.successors) == 3 and messages >= 1
    cached, messages = asked()
    assert messages == 0 and cached.successors == full.successors


def test_wrap_around_edges() -> None:
    rng = random.Random(6)
    top = ids.RING - 1
    net = Net()
    # Nodes crowded at both ends of the identifier space, plus a few elsewhere.
    cores = [hash_node(rng, want=lambda i: i >> 122 == 63) for _ in range(3)]
    cores += [hash_node(rng, want=lambda i: i >> 122 == 0) for _ in range(3)]
    cores += [hash_node(rng) for _ in range(4)]
    join_all(net, cores, rng)
    net.run(40)
    assert_ring(cores)
    members = [c.me.id for c in cores]
    highest, lowest = max(members), min(members)
    keys = [0, 1, top, top - 1, highest, highest + 1, lowest, lowest - 1, (highest + 1) % ids.RING]
    for origin in cores:
        for key in keys:
            result = net.lookup(origin, key % ids.RING)
            assert isinstance(result, LookupDone)
            assert result.node.id == owner_of(key % ids.RING, members), (
                ids.short(key),
                ids.short(origin.me.id),
            )
    lowest_core = next(c for c in cores if c.me.id == lowest)
    assert lowest_core.is_responsible(0) and lowest_core.is_responsible(top)
    assert lowest_core.predecessor is not None and lowest_core.predecessor.id == highest


def crash_and_check(
    net: Net,
    rng: random.Random,
    cores: list[ChordCore],
    dead: list[ChordCore],
    *,
    run_for: float,
    lookups: int,
) -> None:
    """Crash ``dead`` at once, let the survivors repair for ``run_for`` s; then the ring must be exact and
    ``lookups`` random keys, looked up from random survivors, must reach their owners."""
    for core in dead:
        net.kill(core)
    survivors = [c for c in cores if c not in dead]
    net.run(run_for)
    assert_ring(survivors)
    members = [c.me.id for c in survivors]
    for _ in range(lookups):
        key = rng.getrandbits(128)
        result = net.lookup(rng.choice(survivors), key)
        assert isinstance(result, LookupDone) and result.node.id == owner_of(key, members)


def test_ring_repairs_after_r_minus_1_consecutive_failures() -> None:
    rng = random.Random(7)
    config = ChordConfig(successors=3)
    net = Net()
    cores = [hash_node(rng, config) for _ in range(20)]
    seeded_ring(net, cores, 16)
    ordered = sorted(cores, key=lambda c: c.me.id)
    dead = ordered[5:7]  # r - 1 = 2 consecutive nodes
    crash_and_check(net, rng, cores, dead, run_for=40, lookups=50)


def test_lookup_routes_around_a_dead_hop() -> None:
    rng = random.Random(8)
    net = Net()
    cores = [hash_node(rng) for _ in range(64)]
    seeded_ring(net, cores, 16)
    origin = cores[0]
    victim = origin.fingers()[-1]  # the farthest finger: the first hop for many keys
    net.kill(net.cores[victim.ep])
    members = [c.me.id for c in cores if c.me.id != victim.id]
    key = (victim.id + 1) % ids.RING  # the victim would be the closest preceding node
    result = net.lookup(origin, key)
    assert isinstance(result, LookupDone) and result.node.id == owner_of(key, members)
    assert origin.stats().get("timeouts", 0) >= 1
    assert victim.id not in {f.id for f in origin.fingers()}


def unsigning_node(rng: random.Random, port: int) -> ChordCore:
    """A node whose id matches its key but which cannot sign (its signatures are all zeros)."""
    pair = KeyPair.from_private_bytes(rng.randbytes(32))
    return ChordCore(
        NodeRef(pair.node_id, "127.0.0.1", port),
        public_key=pair.public_key,
        sign=lambda data: bytes(64),
        verify=ed_verify,
        random_bytes=rng.randbytes,
    )


def test_unverified_node_is_not_admitted_as_predecessor() -> None:
    rng = random.Random(9)
    net = Net()
    cores = [ed_node(rng) for _ in range(6)]
    join_all(net, cores, rng)
    net.run(30)
    assert_ring(cores)
    victim = cores[0]
    pred = victim.predecessor
    assert pred is not None
    # An impostor claims an id just before the victim (between its predecessor and it) that is not the
    # hash of its key, and signs the nonce correctly with the key it has.
    pair = KeyPair.from_private_bytes(rng.randbytes(32))
    fake_id = (victim.me.id - 1) % ids.RING
    impostor = net.add(
        ChordCore(
            NodeRef(fake_id, "127.0.0.1", 29999),
            public_key=pair.public_key,
            sign=pair.sign,
            verify=ed_verify,
            random_bytes=rng.randbytes,
        )
    )
    impostor.seed_routing([victim.me], None, [], net.now)
    reply = victim.handle_request(impostor.me, "notify", {}, net.now)
    assert reply is not None and reply.type == "ok"
    net.pump()
    assert victim.predecessor == pred
    assert victim.stats()["identity_rejected"] == 1
    # A node whose id does match its key but which cannot sign is refused too.
    liar = net.add(unsigning_node(rng, 29998))
    liar.seed_routing([victim.me], None, [], net.now)
    for core in cores:
        core.handle_request(liar.me, "notify", {}, net.now)
    net.pump()
    net.run(20)
    assert all(c.predecessor is None or c.predecessor.id != liar.me.id for c in cores)
    assert all(liar.me.id not in {n.id for n in c.successors} for c in cores)
    assert sum(c.stats().get("identity_rejected", 0) for c in cores) >= 2


def test_identity_proof_binds_the_endpoint() -> None:
    rng = random.Random(10)
    core = ed_node(rng)
    nonce = rng.randbytes(16)
    reply = core.handle_request(core.me._replace(id=1), "ping", {"nonce": nonce}, 0.0)
    assert reply is not None and reply.type == "ok"
    assert ed_verify(reply.body["pk"], proof_data(nonce, core.me), reply.body["sig"])
    moved = core.me._replace(port=core.me.port + 1)
    assert not ed_verify(reply.body["pk"], proof_data(nonce, moved), reply.body["sig"])


GARBAGE: list[tuple[str, Any]] = [
    ("find_successor", {}),
    ("find_successor", {"key": b"short"}),
    ("find_successor", {"key": -1}),
    ("find_successor", {"key": "x" * 16}),
    ("find_successor", None),
    ("find_successor", [1, 2, 3]),
    ("ping", {"nonce": b"x" * 500}),
    ("ping", {"nonce": 12}),
    ("leave", {"nodes": "not a list"}),
    ("leave", {"nodes": [[b"\x00" * 16, "h", 70000]]}),
    ("leave", {"nodes": [[b"\x00" * 16, "h", 1]] * 40}),
    ("leave", {"pred": [b"\x00" * 3, "h", 1], "nodes": []}),
    ("leave", {"pred": "me", "nodes": []}),
    ("no_such_type", {}),
    ("store", {"entry": []}),
]


def test_malformed_requests_are_dropped_without_raising() -> None:
    rng = random.Random(11)
    net = Net()
    cores = [hash_node(rng) for _ in range(5)]
    seeded_ring(net, cores, 16)
    core = cores[0]
    before = (core.predecessor, core.successors)
    src = cores[1].me
    for mtype, body in GARBAGE:
        reply = core.handle_request(src, mtype, body, net.now)
        assert reply is None or reply.type == "err", (mtype, body)
    bad_src: Any = ("not", "a node")
    assert core.handle_request(bad_src, "ping", {}, net.now) is None
    assert (core.predecessor, core.successors) == before
    assert core.stats()["dropped"] >= len(GARBAGE)


def test_malformed_replies_do_not_break_a_lookup() -> None:
    rng = random.Random(12)
    net = Net()
    cores = [hash_node(rng) for _ in range(32)]
    seeded_ring(net, cores, 16)
    origin = cores[0]
    members = [c.me.id for c in cores]
    while True:  # a key whose first hop is an intermediate node, not the owner
        key = rng.getrandbits(128)
        lid = origin.start_lookup(key, net.now)
        requests = [o for o in origin.take_outputs() if isinstance(o, SendRequest)]
        if requests and requests[0].node_id != owner_of(key, members):
            break
        net.queue.extend((origin, r) for r in requests)
        net.pump()
    req = requests[0]
    for body in ({"done": "yes"}, {"node": 5}, {"done": True, "node": [1, 2], "nodes": []}):
        origin.handle_reply(req.request_id, req.node_id or 0, body, net.now)
    origin.handle_reply(999_999, 1, {"done": True}, net.now)  # unknown id: ignored
    net.queue.clear()
    for out in origin.take_outputs():
        if isinstance(out, SendRequest):
            net.queue.append((origin, out))
    net.run(30)
    done = [
        e for e in net.events[origin.me.ep] if isinstance(e, LookupDone | LookupFailed) and e.lookup_id == lid
    ]
    assert len(done) == 1
    assert isinstance(done[0], LookupDone) and done[0].node.id == owner_of(key, members)


def test_graceful_leave_splices_the_ring_at_once() -> None:
    rng = random.Random(13)
    net = Net()
    cores = [hash_node(rng) for _ in range(10)]
    seeded_ring(net, cores, 16)
    ordered = sorted(cores, key=lambda c: c.me.id)
    leaver, before, after = ordered[4], ordered[3], ordered[5]
    leaver.leave(net.now)
    net.pump()
    net.kill(leaver)
    assert before.successors[0] == after.me
    assert after.predecessor == before.me
    net.run(20)
    assert_ring([c for c in cores if c is not leaver])
    assert leaver.handle_request(before.me, "ping", {}, net.now) is None


def test_join_through_a_silent_bootstrap_fails_cleanly() -> None:
    rng = random.Random(14)
    net = Net()
    core = net.add(hash_node(rng))
    core.start_join(("127.0.0.1", 9), net.now)
    net.run(30)
    assert any(isinstance(e, JoinFailed) for e in net.events[core.me.ep])
    assert not core.joined
    assert core.next_timer() is None


def test_lookup_before_joining_fails_immediately() -> None:
    rng = random.Random(15)
    core = hash_node(rng)
    lid = core.start_lookup(42, 0.0)
    out = core.take_outputs()
    assert any(isinstance(e, LookupFailed) and e.lookup_id == lid for e in out)


def test_config_is_checked() -> None:
    rng = random.Random(16)
    with pytest.raises(ValueError, match="finger_base"):
        hash_node(rng, ChordConfig(finger_base=3))
    with pytest.raises(ValueError, match="successors"):
        hash_node(rng, ChordConfig(successors=0))


def test_join_fails_when_the_successor_cannot_prove_its_id() -> None:
    rng = random.Random(17)
    net = Net()
    liar = net.add(unsigning_node(rng, 29997))
    liar.start(net.now)
    joiner = net.add(ed_node(rng))
    joiner.start_join(liar.me.ep, net.now)
    net.run(10)
    assert any(isinstance(e, JoinFailed) for e in net.events[joiner.me.ep])
    assert not joiner.joined and joiner.successors == ()
    assert joiner.stats()["identity_rejected"] == 1


def test_ring_repairs_after_a_quarter_of_the_nodes_crash_at_once() -> None:
    rng = random.Random(18)
    net = Net()
    cores = [hash_node(rng) for _ in range(40)]
    seeded_ring(net, cores, 16)
    ordered = sorted(cores, key=lambda c: c.me.id)
    # Every third node, and then some: never r = 3 consecutive (a non-partitioning failure).
    dead = [c for i, c in enumerate(ordered) if i % 3 == 1][:10]
    crash_and_check(net, rng, cores, dead, run_for=60, lookups=40)


def test_a_crashed_node_rejoins_with_the_same_identity() -> None:
    rng = random.Random(19)
    net = Net()
    pairs = [KeyPair.from_private_bytes(rng.randbytes(32)) for _ in range(10)]
    cores = [ed_node(rng, pair=p) for p in pairs]
    seeded_ring(net, cores, 16)
    ordered = sorted(cores, key=lambda c: c.me.id)
    victim = ordered[3]
    net.kill(victim)
    net.run(3)  # the crash is not even noticed by everyone yet
    pair = next(p for p in pairs if p.node_id == victim.me.id)
    reborn = ed_node(rng, pair=pair, port=victim.me.port)  # restarted from its data dir: same key, same port
    net.down.discard(victim.me.ep)
    net.cores[victim.me.ep] = reborn
    reborn.start_join(ordered[7].me.ep, net.now)
    net.run(30)
    members = [c for c in cores if c is not victim] + [reborn]
    assert_ring(members)


def test_a_forged_leave_does_not_cut_the_ring() -> None:
    rng = random.Random(20)
    net = Net()
    cores = [hash_node(rng) for _ in range(8)]
    seeded_ring(net, cores, 16)
    core = cores[0]
    succ = core.successors[0]
    forged = succ._replace(host="192.0.2.66")  # claims the successor's id from another endpoint
    reply = core.handle_request(forged, "leave", {"pred": None, "nodes": []}, net.now)
    assert reply is not None and reply.type == "ok"
    assert core.successors[0] == succ
    assert core.stats()["leave_ignored"] == 1


def test_a_burst_of_joins_converges() -> None:
    # 40 nodes join within 4 s, each through a random earlier node, while the ring is still forming:
    # joins get successors that are too far, and chains of such nodes must be walked back.
    rng = random.Random(21)
    net = Net()
    cores = [hash_node(rng) for _ in range(40)]
    join_all(net, cores, rng, spacing=0.1)
    net.run(60)
    assert_ring(cores)


def test_proximity_fingers_stay_inside_their_intervals() -> None:
    rng = random.Random(22)
    config = ChordConfig(finger_base=4, proximity=True)
    net = Net()
    cores = [hash_node(rng, config) for _ in range(24)]
    join_all(net, cores, rng, spacing=0.5)
    net.run(200)
    assert_ring(cores)
    members = sorted(c.me.id for c in cores)
    for core in cores:
        for finger in core.fingers():
            assert finger.id in members
        # Each interval [me + j 4^i, me + (j+1) 4^i) beyond the successor that holds a node has a finger
        # inside it (which one of its nodes is the RTT's choice).
        first = ids.distance(core.me.id, core.successors[0].id)
        dists = [ids.distance(core.me.id, f.id) for f in core.fingers()]
        level = 1
        while level < ids.RING:
            for j in range(1, 4):
                lo, hi = j * level, (j + 1) * level
                if lo <= first or lo >= ids.RING:
                    continue
                inside = [m for m in members if m != core.me.id and lo <= ids.distance(core.me.id, m) < hi]
                if inside:
                    assert any(lo <= d < hi for d in dists), "an interval with nodes has no finger"
            level *= 4
