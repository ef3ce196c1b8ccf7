"""TransactionLayer: matching (§17.1.3, §17.2.3, RFC 2543 fallback, CANCEL §9.2), the timer heap, clean-up."""

from __future__ import annotations

import types

import pytest

from p2psip.errors import TransactionError
from p2psip.message import Request, Response, SentResponse, parse
from p2psip.timers import TimerConfig
from p2psip.transaction import (
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteServerTransaction,
    PassToTU,
    State,
    Terminated,
    Timeout,
    TransactionLayer,
    Transmit,
    TransportFailure,
    TUEvent,
    make_cancel,
)

DEST = ("udp", "192.0.2.2", 5060)
SRC = ("udp", "192.0.2.1", 5060)


def request(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bKl1",
    host: str = "192.0.2.1",
    cseq: int = 1,
    to_tag: str | None = None,
) -> Request:
    via = f"SIP/2.0/UDP {host}:5060" + (f";branch={branch}" if branch else "")
    req = Request.create(
        method,
        "sip:bob@example.com",
        from_="<sip:alice@example.com>;tag=a1",
        to="<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else ""),
        call_id="call-L@192.0.2.1",
        cseq=cseq,
        via=via,
    )
    parsed = parse(bytes(req))
    assert isinstance(parsed, Request)
    return parsed


def response(req: Request, status: int, tag: str | None = "b1") -> Response:
    parsed = parse(bytes(Response.for_request(req, status, to_tag=tag)))
    assert isinstance(parsed, Response)
    return parsed


def readable_fields(obj: object) -> list[object]:
    """The values of an object's instance fields: ``__slots__`` entries in CPython, the compiled build's
    attributes (descriptors too) otherwise; a field that is unset or refuses to be read is left out."""
    fields = types.MemberDescriptorType | types.GetSetDescriptorType
    names = {
        name
        for cls in type(obj).__mro__
        for name, attr in vars(cls).items()
        if isinstance(attr, fields) and not name.startswith("__")
    }
    values = []
    for name in sorted(names):
        try:
            values.append(getattr(obj, name))
        except Exception:  # unset (AttributeError), or a property that refuses (TransactionError)
            continue
    return values


def of(events: list[TUEvent], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def drive(layer: TransactionLayer, until: float) -> list[tuple[float, TUEvent]]:
    """Advance the fake clock from deadline to deadline up to ``until``."""
    log = []
    while (deadline := layer.next_deadline()) is not None and deadline <= until:
        log.extend((deadline, e) for e in layer.handle_timers(deadline))
    return log


class TestClientSide:
    def test_response_routing_by_branch_and_method(self) -> None:
        layer = TransactionLayer()
        invite = request()
        tx, events = layer.send_request(invite, DEST, 0.0, reliable=False)
        assert isinstance(tx, InviteClientTransaction) and [e.message for e in of(events, Transmit)] == [
            invite
        ]
        # a response with another branch is stray; one with our branch reaches our transaction
        other = response(request(branch="z9hG4bKother"), 180)
        (stray,) = layer.receive_response(other, DEST, 0.1)
        assert isinstance(stray, PassToTU) and stray.transaction is None and stray.source == DEST
        (ev,) = layer.receive_response(response(invite, 180), DEST, 0.1)
        assert isinstance(ev, PassToTU) and ev.transaction is tx
        assert layer.stats["stray_responses"] == 1

    def test_duplicate_branch_and_ack_refused(self) -> None:
        layer = TransactionLayer()
        layer.send_request(request(), DEST, 0.0, reliable=False)
        with pytest.raises(TransactionError):
            layer.send_request(request(), DEST, 0.0, reliable=False)
        with pytest.raises(TransactionError):
            layer.send_request(request("ACK"), DEST, 0.0, reliable=False)

    def test_timer_heap_drives_retransmissions_and_timeout_then_forgets(self) -> None:
        layer = TransactionLayer(TimerConfig(t1=0.5))
        tx, _ = layer.send_request(request("OPTIONS"), DEST, 0.0, reliable=False)
        assert len(layer) == 1 and layer.next_deadline() == 0.5
        log = drive(layer, 100.0)
        sends = [t for t, e in log if isinstance(e, Transmit)]
        assert sends == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
        assert [(t, type(e)) for t, e in log[-2:]] == [(32.0, Timeout), (32.0, Terminated)]
        assert len(layer) == 0 and layer.next_deadline() is None and tx.state is State.TERMINATED
        assert layer.stats["retransmissions"] == 10 and layer.stats["timeouts"] == 1

    def test_cancelled_timers_do_not_fire(self) -> None:
        layer = TransactionLayer()
        invite = request()
        layer.send_request(invite, DEST, 0.0, reliable=False)
        layer.receive_response(response(invite, 180), DEST, 0.1)
        assert layer.next_deadline() is None  # A and B disarmed in Proceeding
        assert layer.handle_timers(40.0) == []

    def test_cancel_waits_for_a_provisional(self) -> None:
        layer = TransactionLayer()
        invite = request()
        tx, _ = layer.send_request(invite, DEST, 0.0, reliable=False)
        assert layer.cancel(tx, 0.05) == []  # §9.1: no CANCEL before a provisional response
        events = layer.receive_response(response(invite, 180), DEST, 0.2)
        (cancel,) = [e.message for e in of(events, Transmit)]
        assert isinstance(cancel, Request) and cancel.method == "CANCEL"
        assert cancel.top_via is not None and cancel.top_via.branch == "z9hG4bKl1"
        assert cancel.cseq.number == 1 and cancel.cseq.method == "CANCEL"
        assert cancel.to.tag is None and str(cancel.uri) == str(invite.uri)
        # the CANCEL's 200 and the INVITE's 487 reach their own transactions
        (ok,) = of(layer.receive_response(response(cancel, 200), DEST, 0.3), PassToTU)
        assert ok.transaction is not tx and ok.transaction is not None and ok.transaction.method == "CANCEL"
        events = layer.receive_response(response(invite, 487), DEST, 0.4)
        assert [e.message.status for e in of(events, PassToTU)] == [487]
        assert [e.message.method for e in of(events, Transmit)] == ["ACK"]
        assert layer.cancel(tx, 0.5) == []  # after a final response: nothing to cancel

    def test_cancelled_invite_without_final_response_is_given_up(self) -> None:
        """§9.1: 64*T1 after the CANCEL without a final response, the INVITE transaction ends."""
        layer = TransactionLayer()
        invite = request()
        tx, _ = layer.send_request(invite, DEST, 0.0, reliable=True)
        layer.receive_response(response(invite, 180), DEST, 1.0)
        layer.cancel(tx, 5.0)
        cancel_tx = next(t for t in layer.clients.values() if t.method == "CANCEL")
        layer.receive_response(response(cancel_tx.request, 200), DEST, 5.1)  # 200 to the CANCEL, no 487
        log = drive(layer, 100.0)
        assert [(t, type(e)) for t, e in log if e.transaction is tx] == [(37.0, Timeout), (37.0, Terminated)]
        assert [e.timer for _, e in log if isinstance(e, Timeout)] == ["CANCEL"]
        assert len(layer) == 0

    def test_cancel_dropped_when_final_comes_first(self) -> None:
        layer = TransactionLayer()
        invite = request()
        tx, _ = layer.send_request(invite, DEST, 0.0, reliable=False)
        layer.cancel(tx, 0.05)
        events = layer.receive_response(response(invite, 200), DEST, 0.1)
        assert of(events, Transmit) == [] and tx.state is State.ACCEPTED

    def test_transport_error_reported(self) -> None:
        layer = TransactionLayer()
        tx, _ = layer.send_request(request("MESSAGE"), DEST, 0.0, reliable=True)
        events = layer.transport_error(tx, "connection refused", 0.0)
        assert [type(e) for e in events] == [TransportFailure, Terminated] and len(layer) == 0


class TestServerSide:
    def test_new_request_then_retransmission_absorbed(self) -> None:
        layer = TransactionLayer()
        events = layer.receive_request(request(), SRC, 0.0, reliable=False)
        (tu,) = of(events, PassToTU)
        assert isinstance(tu.transaction, InviteServerTransaction) and tu.source == SRC
        assert [e.message.status for e in of(events, Transmit)] == [100]
        again = layer.receive_request(request(), SRC, 0.5, reliable=False)
        assert of(again, PassToTU) == [] and [e.message.status for e in of(again, Transmit)] == [100]
        assert len(layer) == 1 and layer.stats["absorbed"] == 1

    def test_same_branch_other_sent_by_or_method_is_another_transaction(self) -> None:
        layer = TransactionLayer()
        layer.receive_request(request(), SRC, 0.0, reliable=False)
        events = layer.receive_request(request(host="192.0.2.9"), SRC, 0.0, reliable=False)
        assert len(of(events, PassToTU)) == 1
        events = layer.receive_request(request("CANCEL"), SRC, 0.0, reliable=False)
        (tu,) = of(events, PassToTU)
        assert isinstance(tu.transaction, NonInviteServerTransaction) and len(layer) == 3

    def test_ack_for_non_2xx_absorbed_and_2xx_ack_to_tu(self) -> None:
        layer = TransactionLayer()
        (tu,) = of(layer.receive_request(request(), SRC, 0.0, reliable=False), PassToTU)
        tx = tu.transaction
        assert isinstance(tx, InviteServerTransaction)
        layer.send_response(tx, response(tx.request, 486), 0.1)
        ack = request("ACK", to_tag="b1")
        assert layer.receive_request(ack, SRC, 0.2, reliable=False) == []
        assert tx.state is State.CONFIRMED
        # an ACK for a 2xx has its own branch: no transaction, straight to the TU
        ack2 = request("ACK", branch="z9hG4bKack2", to_tag="b1")
        (ev,) = layer.receive_request(ack2, SRC, 0.3, reliable=False)
        assert isinstance(ev, PassToTU) and ev.transaction is None and layer.stats["stray_acks"] == 1

    def test_cancel_finds_its_invite(self) -> None:
        layer = TransactionLayer()
        (tu,) = of(layer.receive_request(request(), SRC, 0.0, reliable=False), PassToTU)
        cancel = make_cancel(request())
        assert layer.find_invite_for_cancel(cancel) is tu.transaction
        assert layer.find_invite_for_cancel(make_cancel(request(branch="z9hG4bKnone"))) is None
        assert layer.find_invite_for_cancel(make_cancel(request(host="192.0.2.7"))) is None

    def test_rfc2543_fallback_matching(self) -> None:
        layer = TransactionLayer()
        old = request(branch=None)
        (tu,) = of(layer.receive_request(old, SRC, 0.0, reliable=False), PassToTU)
        tx = tu.transaction
        assert isinstance(tx, InviteServerTransaction)
        assert of(layer.receive_request(request(branch=None), SRC, 0.1, reliable=False), PassToTU) == []
        assert layer.find_invite_for_cancel(make_cancel(request(branch=None))) is tx
        layer.send_response(tx, response(old, 404, "t404"), 0.2)
        # ACK with another To tag is not ours; with the To tag of our response it is
        (stray,) = layer.receive_request(request("ACK", branch=None, to_tag="zzz"), SRC, 0.3, reliable=False)
        assert isinstance(stray, PassToTU) and stray.transaction is None
        assert (
            layer.receive_request(request("ACK", branch=None, to_tag="t404"), SRC, 0.3, reliable=False) == []
        )
        assert tx.state is State.CONFIRMED
        # a different CSeq is a new request
        assert (
            len(of(layer.receive_request(request(branch=None, cseq=2), SRC, 0.4, reliable=False), PassToTU))
            == 1
        )

    def test_server_timers_and_cleanup(self) -> None:
        layer = TransactionLayer()
        (tu,) = of(layer.receive_request(request("OPTIONS"), SRC, 0.0, reliable=False), PassToTU)
        assert tu.transaction is not None
        done = layer.send_response(tu.transaction, response(tu.transaction.request, 200), 0.1)  # type: ignore[arg-type]
        assert [type(e) for e in done] == [Transmit, Terminated]  # the object ends; its bytes absorb
        assert len(layer) == 1 and layer.next_deadline() == pytest.approx(32.1)
        assert drive(layer, 32.0) == [] and len(layer) == 1
        assert drive(layer, 100.0) == [] and len(layer) == 0 and layer.next_deadline() is None
        # after Timer J the same request is new again
        assert len(of(layer.receive_request(request("OPTIONS"), SRC, 40.0, reliable=False), PassToTU)) == 1

    def test_lingering_transactions_drop_parsed_views(self) -> None:
        """Once an INVITE transaction only absorbs retransmissions (Accepted), the layer drops the parsed
        views of its messages at its next call, so a proxy holding ~10,000 of them for 32 s gives the
        garbage collector a third of the objects to walk. The views come back on access."""
        layer = TransactionLayer()
        invite = request()
        (itu,) = of(layer.receive_request(invite, SRC, 0.0, reliable=False), PassToTU)
        ist = itu.transaction
        assert isinstance(ist, InviteServerTransaction)
        ok = response(invite, 200)
        layer.send_response(ist, ok, 0.1)
        assert ist.state is State.ACCEPTED
        assert invite.top_via is not None and ok.to.tag == "b1"  # still parsed while the TU handles it
        assert invite._cache and ok._cache
        layer.handle_timers(0.2)  # the layer's next call
        assert not invite._cache and not ok._cache
        assert invite.top_via.branch == "z9hG4bKl1" and ist.request is invite  # views come back

    def test_completed_non_invite_server_keeps_only_the_response_bytes(self) -> None:
        """A completed non-INVITE server transaction (§17.2.2, waiting for Timer J) answers retransmissions
        from the bytes of its final response alone: the layer keeps neither the transaction object nor
        a timer heap entry for it (a registrar at 300 REGISTER/s keeps 9,600 of them), and a retransmitted
        request gets a byte-identical response, sent where the retransmission came from, until Timer J."""
        layer = TransactionLayer()
        options = request("OPTIONS", branch="z9hG4bKl2")
        (otu,) = of(layer.receive_request(options, SRC, 0.0, reliable=False), PassToTU)
        nist = otu.transaction
        assert isinstance(nist, NonInviteServerTransaction)
        done = response(options, 200)
        sent = bytes(done)
        first, ended = layer.send_response(nist, done, 0.1)
        assert isinstance(first, Transmit) and isinstance(first.message, SentResponse)
        assert first.message.status == 200 and bytes(first.message) == sent and first.message.local is False
        assert isinstance(ended, Terminated) and ended.transaction is nist and nist.state is State.TERMINATED
        assert nist.request is options and not nist.deadlines and layer.servers == {} and layer._heap == []
        other = ("udp", "192.0.2.1", 5999)  # e.g. a NAT that rebound: the response follows the request
        for at, source in ((0.5, SRC), (1.5, other), (32.0, SRC)):
            again = layer.receive_request(request("OPTIONS", branch="z9hG4bKl2"), source, at, reliable=False)
            (resend,) = again
            assert isinstance(resend, Transmit) and resend.transaction is None
            assert resend.destination == source
            assert isinstance(resend.message, SentResponse) and resend.message.status == 200
            assert bytes(resend.message) == sent and resend.message.top_via == done.top_via
        assert layer.stats["retransmissions"] == 3 and layer.stats["absorbed"] == 3
        assert drive(layer, 100.0) == [] and len(layer) == 0
        # after Timer J the same request is new again
        again = layer.receive_request(request("OPTIONS", branch="z9hG4bKl2"), SRC, 40.0, reliable=False)
        assert len(of(again, PassToTU)) == 1

    def test_completed_non_invite_server_over_a_reliable_transport_keeps_nothing(self) -> None:
        """Timer J is 0 over TCP (§17.2.2): the transaction ends with its final response, nothing kept."""
        layer = TransactionLayer()
        (tu,) = of(layer.receive_request(request("OPTIONS"), SRC, 0.0, reliable=True), PassToTU)
        assert isinstance(tu.transaction, NonInviteServerTransaction)
        done = layer.send_response(tu.transaction, response(tu.transaction.request, 200), 0.1)
        assert [type(e) for e in done] == [Transmit, Terminated]
        assert len(layer) == 0 and layer.next_deadline() is None and not layer._absorbing

    def test_absorbing_expires_in_completion_order_among_other_timers(self) -> None:
        """Completed non-INVITE server transactions expire in the order they completed (Timer J is one
        constant), interleaved correctly with the timer heap's deadlines."""
        layer = TransactionLayer()
        for i in range(3):
            message = request("MESSAGE", branch=f"z9hG4bKm{i}")
            (tu,) = of(layer.receive_request(message, SRC, float(i), reliable=False), PassToTU)
            assert isinstance(tu.transaction, NonInviteServerTransaction)
            layer.send_response(tu.transaction, response(tu.transaction.request, 202), float(i))
        invite_tx, _ = layer.send_request(request(branch="z9hG4bKc1"), DEST, 10.0, reliable=False)
        assert len(layer) == 4 and layer.next_deadline() == pytest.approx(10.5)  # Timer A first
        layer.handle_timers(32.0)
        assert len(layer) == 3 and layer.next_deadline() == pytest.approx(33.0)
        layer.handle_timers(33.0)
        assert len(layer) == 2 and [key[1] for key in layer._absorbing] == ["z9hG4bKm2"]
        assert invite_tx.state is State.CALLING

    def test_sent_response_reads_its_top_via_from_its_bytes(self) -> None:
        """SentResponse keeps no header text: its top Via (for routing a retransmission) comes from the
        bytes, the first of several Via lines or of a comma list."""
        for vias in (["SIP/2.0/UDP a.example:5070;branch=z9hG4bKa", "SIP/2.0/TCP b.example;branch=z9hG4bKb"],
                     ["SIP/2.0/UDP a.example:5070;branch=z9hG4bKa, SIP/2.0/TCP b.example;branch=z9hG4bKb"]):
            text = "SIP/2.0 200 OK\r\n" + "".join(f"Via: {v}\r\n" for v in vias)
            text += "From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
            sent = SentResponse(parse((text + "Content-Length: 0\r\n\r\n").encode()))
            via = sent.top_via
            assert via is not None and (via.host, via.port) == ("a.example", 5070)
            assert via.params["branch"] == "z9hG4bKa"

    def test_lingering_transactions_share_their_repeated_strings(self) -> None:
        """Transactions have no ``__dict__``, and the method and sent-by in the keys of transactions from one
        source are one string each, not one per request (memory: a registrar holds rate x 32 s of them)."""
        layer = TransactionLayer()
        txs = []
        for i in range(2):
            reg = request("REGISTER", branch=f"z9hG4bKs{i}")
            reg = parse(bytes(reg))  # fresh strings, as from the wire
            (tu,) = of(layer.receive_request(reg, SRC, 0.0, reliable=False), PassToTU)
            txs.append(tu.transaction)
        a, b = txs
        assert not hasattr(a, "__dict__")
        assert a.key[2] is b.key[2] and a.key[3] is b.key[3] and a.method is b.method == "REGISTER"
        assert a.key[1] != b.key[1]

    def test_completed_rfc2543_non_invite_server_still_matches_by_to_tag(self) -> None:
        """Without a branch (RFC 2543 matching) the To tag kept with the response's bytes still tells a
        retransmission (same tag) from a new request (another tag), whose own completion then replaces
        the entry without the older one's Timer J ending it early."""
        layer = TransactionLayer()
        bye = request("BYE", branch=None, to_tag="t1")
        (tu,) = of(layer.receive_request(bye, SRC, 0.0, reliable=False), PassToTU)
        tx = tu.transaction
        assert isinstance(tx, NonInviteServerTransaction)
        layer.send_response(tx, response(bye, 200, "t1"), 0.1)
        (resend,) = layer.receive_request(request("BYE", branch=None, to_tag="t1"), SRC, 0.3, reliable=False)
        assert isinstance(resend, Transmit) and bytes(resend.message) == bytes(response(bye, 200, "t1"))
        bye2 = request("BYE", branch=None, to_tag="t2")
        (tu2,) = of(layer.receive_request(bye2, SRC, 0.4, reliable=False), PassToTU)
        assert isinstance(tu2.transaction, NonInviteServerTransaction)
        layer.send_response(tu2.transaction, response(bye2, 481, "t2"), 1.0)
        layer.handle_timers(32.2)  # the first one's Timer J
        (resend,) = layer.receive_request(request("BYE", branch=None, to_tag="t2"), SRC, 32.3, reliable=False)
        assert isinstance(resend, Transmit) and resend.message.status == 481
        layer.handle_timers(33.0)
        assert len(layer) == 0

    def test_full_call_between_two_layers(self) -> None:
        """A UAC layer and a UAS layer wired back to back through a lossy-free fake network."""
        uac, uas = TransactionLayer(), TransactionLayer()
        invite = request()
        tx, out = uac.send_request(invite, DEST, 0.0, reliable=False)
        statuses: list[int] = []
        server_tx = None
        for ev in of(out, Transmit):
            for sev in uas.receive_request(parse(bytes(ev.message)), SRC, 0.01, reliable=False):  # type: ignore[arg-type]
                if isinstance(sev, PassToTU):
                    server_tx = sev.transaction
                elif isinstance(sev, Transmit):
                    for cev in uac.receive_response(parse(bytes(sev.message)), DEST, 0.02):  # type: ignore[arg-type]
                        if isinstance(cev, PassToTU):
                            statuses.append(cev.message.status)  # type: ignore[union-attr]
        assert isinstance(server_tx, InviteServerTransaction) and statuses == [100]
        for sev in uas.send_response(server_tx, response(server_tx.request, 200), 1.0):
            if isinstance(sev, Transmit):
                for cev in uac.receive_response(parse(bytes(sev.message)), DEST, 1.01):  # type: ignore[arg-type]
                    if isinstance(cev, PassToTU):
                        statuses.append(cev.message.status)  # type: ignore[union-attr]
        assert statuses == [100, 200]
        assert tx.state is State.ACCEPTED and server_tx.state is State.ACCEPTED
        drive(uac, 100.0)
        drive(uas, 100.0)
        assert len(uac) == 0 and len(uas) == 0
