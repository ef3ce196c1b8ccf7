"""Home-peer routing, sans-IO (p2psip.location, p2psip.registrar): Path and Route decisions with a fake clock.

Which Path a REGISTER stores, which home peer an entry peer hands a call to (and whether that peer may
skip its lookup, ``;p2p-home``), which Route set each forked branch gets, with home routing on and off,
and how a home peer's own registrations expire: pure functions of their inputs and of ``now``. The same
decisions on real sockets are in tests/test_home_routing.py and tests/test_client_peer.py.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from p2psip.location import SOLE_HOME, HomeTable, branches, by_preference, live_targets, primary_home
from p2psip.registrar import Binding, plan_register
from p2psip.uri import Address
from tests.test_registrar import AOR, NOW, register

P1, P2, P3 = ("10.0.0.1", 5060), ("10.0.0.2", 5060), ("10.0.0.3", 5060)


def hop(peer: tuple[str, int], token: str | None = None) -> str:
    user = f"{token}@" if token else ""
    return f"<sip:{user}{peer[0]}:{peer[1]};lr{';ob' if token else ''}>"


def binding(contact: str, *path: str, q: float | None = None, at: float = NOW, expires: int = 600) -> Binding:
    return Binding(AOR, contact, expires, at, q=q, path=tuple(path))


def at(peer: tuple[str, int] | None):  # type: ignore[no-untyped-def]
    """``is_local`` of the peer at ``peer`` (None: a peer that is nobody's home)."""
    return lambda host, port: peer is not None and (host, port or 5060) == peer


def test_the_home_peers_hop_goes_before_the_registers_own_path() -> None:
    """A full peer stores [itself with the flow token]; a client peer [its attach peer's hop, its own];
    a Path the REGISTER already carries (an edge proxy's) follows them."""
    request = register("<sip:alice@192.168.1.7:5060>", expires=600)
    plan = plan_register(request, [], NOW, path=[hop(P1, "TOK")])
    assert plan.writes[0].binding.path == (hop(P1, "TOK"),)
    request.add("Path", "<sip:edge.example;lr>")
    plan = plan_register(request, [], NOW, path=[hop(P1, "TA"), hop(P3, "TP")])
    assert plan.writes[0].binding.path == (hop(P1, "TA"), hop(P3, "TP"), "<sip:edge.example;lr>")


def test_an_entry_peer_hands_the_call_to_the_best_bindings_home_peer() -> None:
    desk = binding("sip:alice@192.168.1.7", hop(P1, "A"), q=0.5)
    mobile = binding("sip:alice@10.1.1.9", hop(P2, "B"), q=1.0)
    ordered = by_preference([desk, mobile])
    assert ordered == [mobile, desk]
    route = primary_home(ordered, at(P3))
    assert route is not None and Address(route).uri.host == P2[0]
    assert SOLE_HOME not in route  # the home peer still looks up: desk lives elsewhere
    # a home peer of any binding forks itself, whichever binding is best
    assert primary_home(ordered, at(P1)) is None and primary_home(ordered, at(P2)) is None
    # every binding at one home peer: that peer may serve the call from its own registrations
    both = by_preference([desk, binding("sip:alice@10.1.1.9", hop(P1, "C"))])
    route = primary_home(both, at(P3))
    assert route is not None and SOLE_HOME in Address(route).uri.params
    # no Path at all (registered with home routing off): nobody to hand it to
    assert primary_home([binding("sip:alice@192.0.2.1")], at(P3)) is None
    # a Path that does not parse is nobody's home, and the rest is then not "sole"
    junk = binding("sip:alice@192.0.2.2", "<not a uri")
    route = primary_home(by_preference([junk, desk]), at(P3))
    assert route is not None and SOLE_HOME not in route


def test_each_branch_takes_its_own_path_and_the_switch_skips_only_reachable_contacts() -> None:
    natted = binding("sip:alice@192.168.1.7", hop(P1, "TOK"), q=0.9)
    public = binding("sip:alice@192.0.2.1:5070", hop(P2))
    browser = binding("sip:k3j2@k3j2.invalid;transport=ws", hop(P3))
    broken = binding("not a contact", hop(P1))
    ordered = by_preference([natted, public, browser, broken])
    on = branches(ordered, home_routing=True)
    assert [(str(u), route) for u, route, _q in on] == [
        ("sip:alice@192.0.2.1:5070", (hop(P2),)),
        ("sip:k3j2@k3j2.invalid;transport=ws", (hop(P3),)),
        ("sip:alice@192.168.1.7", (hop(P1, "TOK"),)),
    ]
    assert on[2][2] == 0.9
    # home routing off: straight to a contact that is reachable as written; a flow's binding (a token in
    # its first hop) and a browser still go through their Path
    off = branches(ordered, home_routing=False)
    assert [route for _u, route, _q in off] == [None, (hop(P3),), (hop(P1, "TOK"),)]


def test_a_home_peers_own_registrations_expire_on_the_fake_clock() -> None:
    """The sole home peer serves a call from its HomeTable, never past a binding's expiry."""
    table = HomeTable()
    short = binding("sip:alice@192.168.1.7", hop(P1, "A"), expires=60)
    long = binding("sip:alice@192.168.1.8", hop(P1, "B"), expires=600, q=0.2)
    table.update(AOR, [short, long])
    assert live_targets(table.live(AOR, NOW + 59), NOW + 59) == [short, long]
    assert table.live(AOR, NOW + 61) == (long,) and table.get(AOR) == (long,)  # forgotten once expired
    table.update(AOR, drop=[long.entry_id])
    assert AOR not in table and table.live(AOR, NOW) == ()


paths = st.lists(
    st.sampled_from([hop(P1, "A"), hop(P2, "B"), hop(P3), "<junk", "<sip:10.0.0.9;lr>"]), max_size=2
)
bindings = st.lists(
    st.builds(
        lambda n, path, q: binding(f"sip:u{n}@192.0.2.{n}", *path, q=q),
        st.integers(1, 200),
        paths,
        st.sampled_from([None, 0.1, 0.5, 1.0]),
    ),
    max_size=6,
    unique_by=lambda b: b.entry_id,
)


@given(bindings, st.randoms(use_true_random=False))
def test_every_entry_peer_picks_the_same_home_peer_whatever_order_it_read(
    found: list[Binding], rnd: random.Random
) -> None:
    """The DHT returns bindings in any order; every peer that is nobody's home hands the call to the same
    home peer, and every binding gets exactly one branch (or is skipped as unparseable) either way."""
    shuffled = list(found)
    rnd.shuffle(shuffled)
    first, second = by_preference(found), by_preference(shuffled)
    assert first == second
    assert primary_home(first, at(None)) == primary_home(second, at(None))
    for switch in (True, False):
        out = branches(first, home_routing=switch)
        assert len(out) == len(found)
        assert all(route is None or route == b.path for (_u, route, _q), b in zip(out, first, strict=True))
