"""Dialogs (RFC 3261 §12): creation on both sides, route sets, CSeq, target refresh, in-dialog requests."""

from __future__ import annotations

import pytest

from p2psip.dialog import (
    Dialog,
    DialogId,
    DialogState,
    dialog_id_of_request,
    dialog_id_of_response,
)
from p2psip.errors import TransactionError
from p2psip.message import Request, Response, parse
from p2psip.uri import URI


def wire(message: Request | Response) -> Request | Response:
    """The message as the peer parses it (a request gets the top Via the Stack would add)."""
    if isinstance(message, Request) and "Via" not in message:
        message = message.copy()
        message.add("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKstack", first=True)
    return parse(bytes(message))


def invite(record_route: list[str] | None = None, cseq: int = 10) -> Request:
    req = Request.create(
        "INVITE",
        "sip:bob@example.com",
        from_="Alice <sip:alice@example.com>;tag=alice-tag",
        to="Bob <sip:bob@example.com>",
        call_id="dlg-1@192.0.2.1",
        cseq=cseq,
        via="SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKd1",
        contact="<sip:alice@192.0.2.1:5060>",
        headers=[("Record-Route", rr) for rr in (record_route or [])],
    )
    out = wire(req)
    assert isinstance(out, Request)
    return out


def answer(
    req: Request, status: int, tag: str = "bob-tag", contact: str = "<sip:bob@192.0.2.2:5070>"
) -> Response:
    resp = Response.for_request(req, status, to_tag=tag)
    for rr in req.get_all("Record-Route"):
        resp.add("Record-Route", rr)
    resp.add("Contact", contact)
    out = wire(resp)
    assert isinstance(out, Response)
    return out


RR = ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]


class TestUacDialog:
    def test_created_from_2xx(self) -> None:
        req = invite(RR)
        dialog = Dialog.uac(req, answer(req, 200))
        assert dialog.id == DialogId("dlg-1@192.0.2.1", "alice-tag", "bob-tag")
        assert dialog.state is DialogState.CONFIRMED and dialog.is_uac
        assert [str(r.uri) for r in dialog.route_set] == ["sip:p2.example.com;lr", "sip:p1.example.com;lr"]
        assert dialog.remote_target == URI("sip:bob@192.0.2.2:5070")
        assert dialog.local_cseq == 10 and dialog.remote_cseq is None
        assert dialog.local_uri.tag is None and dialog.remote_uri.tag is None
        assert dialog_id_of_response(answer(req, 200)) == dialog.id

    def test_early_dialog_from_1xx_then_confirmed_route_set_recomputed(self) -> None:
        req = invite(RR)
        early = Dialog.uac(req, answer(req, 180))
        assert early.state is DialogState.EARLY
        ok = answer(req, 200, contact="<sip:bob@192.0.2.2:5080>")
        ok.set("Record-Route", ["<sip:p1.example.com;lr>"])
        early.receive_response(req, ok)
        assert early.state is DialogState.CONFIRMED
        assert [str(r.uri) for r in early.route_set] == ["sip:p1.example.com;lr"]
        assert early.remote_target == URI("sip:bob@192.0.2.2:5080")

    def test_early_dialog_terminated_by_non_2xx(self) -> None:
        req = invite()
        early = Dialog.uac(req, answer(req, 183))
        early.receive_response(req, answer(req, 486))
        assert early.state is DialogState.TERMINATED

    def test_forked_2xx_make_distinct_dialogs(self) -> None:
        req = invite()
        one = Dialog.uac(req, answer(req, 200, tag="fork-1"))
        two = Dialog.uac(req, answer(req, 200, tag="fork-2", contact="<sip:bob@192.0.2.3>"))
        assert one.id != two.id and {one.id.remote_tag, two.id.remote_tag} == {"fork-1", "fork-2"}
        assert two.remote_target == URI("sip:bob@192.0.2.3")

    def test_no_dialog_without_to_tag_or_for_a_failure(self) -> None:
        req = invite()
        resp = wire(Response.for_request(req, 100))
        assert isinstance(resp, Response)
        with pytest.raises(TransactionError):
            Dialog.uac(req, resp)
        with pytest.raises(TransactionError):
            Dialog.uac(req, answer(req, 404))

    def test_ack_for_2xx_uses_invite_cseq_and_route_set(self) -> None:
        req = invite(RR)
        ok = answer(req, 200)
        dialog = Dialog.uac(req, ok)
        ack = wire(dialog.create_ack(ok, via="SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKack"))
        assert isinstance(ack, Request) and ack.method == "ACK"
        assert ack.cseq.number == 10 and ack.cseq.method == "ACK"
        assert ack.uri == URI("sip:bob@192.0.2.2:5070")
        assert [str(r.uri) for r in ack.route] == ["sip:p2.example.com;lr", "sip:p1.example.com;lr"]
        assert ack.to.tag == "bob-tag" and ack.from_.tag == "alice-tag" and ack.call_id == req.call_id
        assert dialog.local_cseq == 10  # the ACK does not consume a CSeq
        with pytest.raises(TransactionError):
            dialog.create_ack(answer(req, 486))

    def test_bye_and_reinvite_increment_cseq(self) -> None:
        req = invite()
        dialog = Dialog.uac(req, answer(req, 200))
        built = dialog.create_request("INVITE", body=b"v=0\r\n", content_type="application/sdp")
        assert "Via" not in built  # the Stack adds its own Via
        reinvite = wire(built)
        assert isinstance(reinvite, Request) and reinvite.cseq == (11, "INVITE")
        assert [str(c.uri) for c in reinvite.contacts] == ["sip:alice@192.0.2.1:5060"]
        assert reinvite.body == b"v=0\r\n" and reinvite.content_type == "application/sdp"
        info = wire(dialog.create_request("INFO"))
        assert isinstance(info, Request) and info.cseq == (12, "INFO") and info.contacts == []
        bye = wire(dialog.create_request("BYE"))
        assert isinstance(bye, Request) and bye.cseq.number == 13 and dialog.invite_cseq == 11
        with pytest.raises(TransactionError):
            dialog.create_request("ACK")
        with pytest.raises(TransactionError):
            dialog.create_request("CANCEL")

    def test_target_refresh_on_2xx_to_reinvite_or_update(self) -> None:
        req = invite()
        dialog = Dialog.uac(req, answer(req, 200))
        for method, port in (("INVITE", 6000), ("UPDATE", 6001)):
            refresh = dialog.create_request(method, via="SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKr" + method)
            dialog.receive_response(refresh, answer(refresh, 200, contact=f"<sip:bob@192.0.2.9:{port}>"))
            assert dialog.remote_target == URI(f"sip:bob@192.0.2.9:{port}")
        info = dialog.create_request("INFO", via="SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKi")
        dialog.receive_response(info, answer(info, 200, contact="<sip:elsewhere@192.0.2.99>"))
        assert dialog.remote_target == URI("sip:bob@192.0.2.9:6001")  # INFO is no target refresh

    @pytest.mark.parametrize("status", [481, 408])
    def test_481_or_408_terminates(self, status: int) -> None:
        req = invite()
        dialog = Dialog.uac(req, answer(req, 200))
        bye = dialog.create_request("BYE", via="SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKb")
        dialog.receive_response(bye, answer(bye, status))
        assert dialog.state is DialogState.TERMINATED
        with pytest.raises(TransactionError):
            dialog.create_request("BYE")


class TestRouting:
    def test_no_route_set(self) -> None:
        req = invite()
        request = wire(Dialog.uac(req, answer(req, 200)).create_request("BYE"))
        assert isinstance(request, Request)
        assert request.uri == URI("sip:bob@192.0.2.2:5070") and request.route == []

    def test_strict_router_first(self) -> None:
        """§12.2.1.1: a first route without lr goes into the Request-URI, the remote target last in Route."""
        req = invite(["<sip:p1.example.com;lr>", "<sip:strict.example.com;transport=tcp>"])
        dialog = Dialog.uac(req, answer(req, 200))
        request = wire(dialog.create_request("BYE"))
        assert isinstance(request, Request)
        assert request.uri == URI("sip:strict.example.com;transport=tcp")
        assert [str(r.uri) for r in request.route] == ["sip:p1.example.com;lr", "sip:bob@192.0.2.2:5070"]


class TestUasDialog:
    def test_created_from_invite_and_our_response(self) -> None:
        req = invite(RR)
        ok = answer(req, 200, tag="uas-tag", contact="<sip:bob@192.0.2.2:5070>")
        dialog = Dialog.uas(req, ok)
        assert dialog.id == DialogId("dlg-1@192.0.2.1", "uas-tag", "alice-tag")
        assert [str(r.uri) for r in dialog.route_set] == ["sip:p1.example.com;lr", "sip:p2.example.com;lr"]
        assert dialog.remote_target == URI("sip:alice@192.0.2.1:5060")
        assert dialog.remote_cseq == 10 and dialog.local_cseq is None and not dialog.is_uac
        bye = wire(dialog.create_request("BYE"))
        assert isinstance(bye, Request)
        assert bye.from_.tag == "uas-tag" and bye.to.tag == "alice-tag"
        assert str(bye.from_.uri) == "sip:bob@example.com" and str(bye.to.uri) == "sip:alice@example.com"
        assert bye.uri == URI("sip:alice@192.0.2.1:5060")
        assert [str(r.uri) for r in bye.route] == ["sip:p1.example.com;lr", "sip:p2.example.com;lr"]
        assert bye.cseq.number == 1

    def test_in_dialog_requests_cseq_checks_and_refresh(self) -> None:
        req = invite()
        dialog = Dialog.uas(req, answer(req, 200, tag="uas-tag"))
        uac_view = Dialog.uac(req, answer(req, 200, tag="uas-tag"))
        ack = uac_view.create_ack(answer(req, 200, tag="uas-tag"))
        assert dialog.receive_request(ack) is None
        reinvite = uac_view.create_request("INVITE")
        reinvite.set("Contact", "<sip:alice@192.0.2.50>")
        assert dialog_id_of_request(reinvite) == dialog.id
        assert dialog.receive_request(reinvite) is None and dialog.remote_cseq == 11
        assert dialog.remote_target == URI("sip:alice@192.0.2.50")
        stale = uac_view.create_request("INFO")
        stale.set("CSeq", "5 INFO")
        assert dialog.receive_request(stale) == 500 and dialog.remote_cseq == 11
        bye = uac_view.create_request("BYE")
        assert dialog.receive_request(bye) is None and dialog.state is DialogState.TERMINATED

    def test_early_uas_dialog_and_errors(self) -> None:
        req = invite()
        early = Dialog.uas(req, answer(req, 180, tag="uas-tag"))
        assert early.state is DialogState.EARLY
        early.response_sent(answer(req, 200, tag="uas-tag"))
        assert early.state is DialogState.CONFIRMED
        rejected = Dialog.uas(req, answer(req, 183, tag="uas-tag"))
        rejected.response_sent(answer(req, 486, tag="uas-tag"))
        assert rejected.state is DialogState.TERMINATED
        no_contact = invite()
        no_contact.remove("Contact")
        with pytest.raises(TransactionError):
            Dialog.uas(no_contact, answer(no_contact, 200))


class TestAnswerRetransmitter:
    def test_schedule_until_give_up(self) -> None:
        from p2psip.dialog import AnswerRetransmitter

        req = invite()
        ok = answer(req, 200)
        retx = AnswerRetransmitter(ok, now=0.0)
        assert retx.fire(0.2) is None  # too early
        sent = []
        while retx.deadline is not None:
            at = retx.deadline
            if retx.fire(at) is ok:
                sent.append(at)
        assert sent == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
        assert retx.timed_out and not retx.acked

    def test_ack_stops_it(self) -> None:
        from p2psip.dialog import AnswerRetransmitter

        req = invite()
        retx = AnswerRetransmitter(answer(req, 200), now=10.0)
        assert retx.fire(10.5) is not None
        retx.ack_received()
        assert retx.deadline is None and retx.fire(11.5) is None and not retx.timed_out
        with pytest.raises(TransactionError):
            AnswerRetransmitter(answer(req, 486), now=0.0)

    def test_uac_resends_the_same_ack_for_retransmitted_2xx(self) -> None:
        req = invite()
        ok = answer(req, 200)
        dialog = Dialog.uac(req, ok)
        assert dialog.last_ack is None
        ack = dialog.create_ack(ok)
        assert dialog.last_ack is ack
