"""Property tests (hypothesis): any sequence of events drives each machine only along the edges of its RFC
figure, never raises anything but TransactionError (for a TU misuse), and ends in Terminated once the TU has
answered and all timers have run."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from p2psip.errors import TransactionError
from p2psip.message import Request, Response
from p2psip.transaction import (
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    State,
    Transaction,
)

C, TR, P, A, CO, CF, T = (
    State.CALLING,
    State.TRYING,
    State.PROCEEDING,
    State.ACCEPTED,
    State.COMPLETED,
    State.CONFIRMED,
    State.TERMINATED,
)
EDGES = {
    "ict": {(C, P), (C, A), (C, CO), (C, T), (P, A), (P, CO), (P, T), (A, T), (CO, T)},
    "nict": {(TR, P), (TR, CO), (TR, T), (P, CO), (P, T), (CO, T)},
    "ist": {(P, A), (P, CO), (P, T), (A, T), (CO, CF), (CO, T), (CF, T)},
    "nist": {(TR, P), (TR, CO), (TR, T), (P, CO), (P, T), (CO, T)},
}
FIRST = {"ict": C, "nict": TR, "ist": P, "nist": TR}


def make_request(method: str) -> Request:
    return Request.create(
        method,
        "sip:bob@example.com",
        from_="<sip:alice@example.com>;tag=a",
        to="<sip:bob@example.com>",
        call_id="prop",
        via="SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKprop",
    )


def build(kind: str, reliable: bool) -> Transaction:
    if kind == "ict":
        return InviteClientTransaction(make_request("INVITE"), None, reliable=reliable, timer_c=True)
    if kind == "nict":
        return NonInviteClientTransaction(make_request("OPTIONS"), None, reliable=reliable)
    if kind == "ist":
        return InviteServerTransaction(make_request("INVITE"), None, reliable=reliable, trying_delay=0.2)
    return NonInviteServerTransaction(make_request("OPTIONS"), None, reliable=reliable)


EVENT = st.one_of(
    st.tuples(st.just("response"), st.sampled_from([100, 180, 183, 200, 202, 302, 404, 487, 503, 603])),
    st.tuples(st.just("timer"), st.integers(0, 5)),
    st.tuples(st.just("retransmit"), st.just(0)),
    st.tuples(st.just("ack"), st.just(0)),
    st.tuples(st.just("transport_error"), st.just(0)),
)


def drive(kind: str, reliable: bool, events: list[tuple[str, int]]) -> Transaction:
    """Feed ``events`` to a fresh machine, let the TU finish (answer / CANCEL) and run out every timer."""
    tx = build(kind, reliable)
    now = 0.0
    tx.start(now)  # type: ignore[attr-defined]
    for name, arg in events:
        now += 0.01
        try:
            if name == "response":
                response = Response.for_request(tx.request, arg, to_tag="t" if arg > 100 else None)
                if kind in ("ict", "nict"):
                    tx.receive_response(response, now)  # type: ignore[attr-defined]
                else:
                    tx.send_response(response, now)  # type: ignore[attr-defined]
            elif name == "timer" and tx.deadlines:
                timer, at = sorted(tx.deadlines.items(), key=lambda item: item[1])[arg % len(tx.deadlines)]
                now = max(now, at)
                tx.timer_fired(timer, now)
            elif name in ("retransmit", "ack") and kind in ("ist", "nist"):
                if name == "ack" and kind == "ist":
                    tx.receive_request(make_request("ACK"), now)  # type: ignore[attr-defined]
                elif name == "retransmit":
                    tx.receive_request(tx.request, now)  # type: ignore[attr-defined]
            elif name == "transport_error":
                tx.transport_error("boom", now)
        except TransactionError:
            assert kind in ("ist", "nist")  # only a TU can misuse a server transaction
    # the TU answers (server) or gives up with a CANCEL (INVITE client) if it has not, then time runs out
    if kind in ("ist", "nist") and tx.state in (State.PROCEEDING, State.TRYING):
        tx.send_response(Response.for_request(tx.request, 500, to_tag="t"), now)  # type: ignore[attr-defined]
    if isinstance(tx, InviteClientTransaction):
        tx.cancel_sent(now)
    for _ in range(200):
        if not tx.deadlines:
            break
        timer, at = min(tx.deadlines.items(), key=lambda item: item[1])
        now = max(now, at)
        tx.timer_fired(timer, now)
    return tx


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["ict", "nict", "ist", "nist"]),
    reliable=st.booleans(),
    events=st.lists(EVENT, max_size=25),
)
def test_only_rfc_edges_and_always_terminates(
    kind: str, reliable: bool, events: list[tuple[str, int]]
) -> None:
    tx = drive(kind, reliable, events)
    history = tx.history
    assert history[0] is FIRST[kind]
    for before, after in itertools.pairwise(history):
        assert (before, after) in EDGES[kind], (kind, history)
    assert tx.state is State.TERMINATED, (kind, history, tx.deadlines)
    assert not tx.deadlines


# The transitions drawn in RFC 6026 Figures 5 and 7 and RFC 3261 Figures 6 and 8 (a zero Timer D/I/J/K on
# a reliable transport is still the Completed/Confirmed -> Terminated edge).
FIGURE_EDGES = {
    "ict": {(C, P), (C, A), (C, CO), (C, T), (P, A), (P, CO), (A, T), (CO, T)},
    "nict": {(TR, P), (TR, CO), (TR, T), (P, CO), (P, T), (CO, T)},
    "ist": {(P, A), (P, CO), (P, T), (A, T), (CO, CF), (CO, T), (CF, T)},
    "nist": {(TR, P), (TR, CO), (P, CO), (P, T), (CO, T)},
}


def test_every_figure_transition_is_taken() -> None:
    """Seeded random walks (2,000 per machine) visit every edge of the RFC figures, and nothing else
    than the allowed edges (the figures plus transport errors and the §9.1 CANCEL guard)."""
    rng = random.Random(6026)
    kinds = ["response", "timer", "retransmit", "ack", "transport_error"]
    statuses = [100, 180, 200, 486, 503]
    for kind in ("ict", "nict", "ist", "nist"):
        seen: set[tuple[State, State]] = set()
        for _ in range(2000):
            events = []
            for _ in range(rng.randint(0, 6)):
                name = rng.choice(kinds)
                events.append((name, rng.choice(statuses) if name == "response" else rng.randint(0, 3)))
            tx = drive(kind, rng.random() < 0.5, events)
            seen.update(itertools.pairwise(tx.history))
        assert FIGURE_EDGES[kind] <= seen, (kind, FIGURE_EDGES[kind] - seen)
        assert seen <= EDGES[kind], (kind, seen - EDGES[kind])
