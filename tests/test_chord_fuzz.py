"""Property test: whatever arrives, the Chord core neither raises nor lets garbage into its routing state."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay import ids
from overlay.chord import CHORD_MESSAGES, ChordCore, NodeRef, SendRequest
from overlay.sim import sim_sign, sim_verify

ids_st = st.one_of(st.integers(min_value=-5, max_value=ids.RING + 5), st.binary(min_size=0, max_size=20))
node_st = st.one_of(
    st.tuples(ids_st, st.text(max_size=5), st.integers(min_value=-2, max_value=70000)).map(list),
    st.builds(NodeRef, st.integers(min_value=0, max_value=ids.RING - 1), st.just("10.0.0.9"), st.just(7000)),
    st.none(),
    st.integers(),
)
value_st = st.one_of(
    ids_st,
    node_st,
    st.lists(node_st, max_size=20),
    st.booleans(),
    st.binary(max_size=200),
    st.text(max_size=10),
    st.none(),
)
fields = sorted({f for spec in CHORD_MESSAGES.values() for f in [*spec.request, *spec.reply]} | {"x"})
body_st = st.one_of(st.dictionaries(st.sampled_from(fields), value_st, max_size=5), st.none(), st.integers())
type_st = st.sampled_from([*CHORD_MESSAGES, "store", "", "ok"])


def make_ring(n: int = 6) -> list[ChordCore]:
    rng = random.Random(1)
    cores = []
    for port in range(n):
        pk = rng.randbytes(32)
        cores.append(
            ChordCore(
                NodeRef(ids.key_for(pk), "10.0.0.1", 7000 + port),
                public_key=pk,
                sign=sim_sign(pk),
                verify=sim_verify,
                random_bytes=rng.randbytes,
            )
        )
    ordered = sorted(cores, key=lambda c: c.me.id)
    for i, core in enumerate(ordered):
        refs = [c.me for c in ordered]
        core.seed_routing([refs[(i + 1) % n], refs[(i + 2) % n]], refs[i - 1], refs, 0.0)
        core.take_outputs()
    return ordered


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(type_st, body_st, st.booleans()), min_size=1, max_size=12))
def test_random_requests_and_replies_never_raise(steps: list[tuple[str, Any, bool]]) -> None:
    cores = make_ring()
    core = cores[0]
    members = {c.me.id for c in cores}
    now = 0.0
    core.start_lookup(12345, now)  # so that replies have something to land on
    for mtype, body, as_reply in steps:
        now += 0.3
        if as_reply:
            pending = [o for o in core.take_outputs() if isinstance(o, SendRequest)]
            for req in pending:
                core.handle_reply(req.request_id, req.node_id or 0, body, now)
        else:
            reply = core.handle_request(cores[1].me, mtype, body, now)
            assert reply is None or reply.type in ("ok", "err")
        core.handle_timer(now)
        # Routing state holds only real members (garbage never becomes a neighbour).
        assert {n.id for n in core.successors} <= members
        assert core.predecessor is None or core.predecessor.id in members
        assert {n.id for n in core.fingers()} <= members
    assert core.stats().get("request_errors", 0) == 0
    assert core.stats().get("reply_errors", 0) == 0
