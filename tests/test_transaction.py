"""Every state transition of the four transaction machines (RFC 3261 §17 with RFC 6026), with a fake clock.

Messages are built with the real message layer and round-tripped through bytes, so what a transaction
emits is also what would go on the wire.
"""

from __future__ import annotations

import pytest

from p2psip.errors import TransactionError
from p2psip.message import Request, Response, parse
from p2psip.timers import TimerConfig
from p2psip.transaction import (
    CancelTimer,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    PassToTU,
    StartTimer,
    State,
    Terminated,
    Timeout,
    Transaction,
    Transmit,
    TransportFailure,
)

T = TimerConfig()  # T1 = 0.5, T2 = 4, T4 = 5
DEST = ("udp", "192.0.2.2", 5060)


def wire(message: Request | Response) -> Request | Response:
    """The message as a peer would parse it."""
    return parse(bytes(message))


def request(method: str = "INVITE", branch: str = "z9hG4bKtx1", cseq: int = 1) -> Request:
    req = Request.create(
        method,
        "sip:bob@example.com",
        from_="Alice <sip:alice@example.com>;tag=a1",
        to="Bob <sip:bob@example.com>",
        call_id="call-1@192.0.2.1",
        cseq=cseq,
        via=f"SIP/2.0/UDP 192.0.2.1:5060;branch={branch}",
        contact="<sip:alice@192.0.2.1>",
        headers=[("Route", "<sip:p1.example.com;lr>"), ("Route", "<sip:p2.example.com;lr>")],
    )
    parsed = wire(req)
    assert isinstance(parsed, Request)
    return parsed


def response(req: Request, status: int, tag: str | None = "b1") -> Response:
    resp = Response.for_request(req, status, to_tag=tag)
    parsed = wire(resp)
    assert isinstance(parsed, Response)
    return parsed


def transmitted(actions: list) -> list[Request | Response]:
    return [a.message for a in actions if isinstance(a, Transmit)]


def to_tu(actions: list) -> list[Request | Response]:
    return [a.message for a in actions if isinstance(a, PassToTU)]


def started(actions: list) -> dict[str, float]:
    return {a.name: a.at for a in actions if isinstance(a, StartTimer)}


def cancelled(actions: list) -> set[str]:
    return {a.name for a in actions if isinstance(a, CancelTimer)}


def is_terminated(actions: list) -> bool:
    return any(isinstance(a, Terminated) for a in actions)


def run_timers(tx: Transaction, until: float) -> list[tuple[float, str, list]]:
    """Fire the transaction's timers in deadline order up to ``until``: [(time, timer, actions)]."""
    log = []
    while tx.deadlines:
        name, at = min(tx.deadlines.items(), key=lambda item: item[1])
        if at > until:
            break
        log.append((at, name, tx.timer_fired(name, at)))
    return log


# --------------------------------------------------------------------------------------------- INVITE client
class TestInviteClient:
    def new(self, *, reliable: bool = False, timers: TimerConfig = T, timer_c: bool = False):
        tx = InviteClientTransaction(request(), DEST, reliable=reliable, timers=timers, timer_c=timer_c)
        return tx, tx.start(0.0)

    def test_start_enters_calling_sends_and_arms_a_and_b(self) -> None:
        tx, out = self.new()
        assert tx.state is State.CALLING
        assert [m.method for m in transmitted(out)] == ["INVITE"]  # type: ignore[union-attr]
        assert all(a.destination == DEST for a in out if isinstance(a, Transmit))
        assert started(out) == {"A": 0.5, "B": 32.0}
        with pytest.raises(TransactionError):
            tx.start(1.0)

    def test_timer_a_doubles_without_cap_until_timer_b(self) -> None:
        tx, _ = self.new()
        log = run_timers(tx, 100.0)
        retransmit_times = [at for at, name, out in log if name == "A" and transmitted(out)]
        assert retransmit_times == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
        at, name, out = log[-1]
        assert (at, name) == (32.0, "B")
        assert [type(a) for a in out if isinstance(a, Timeout | Terminated)] == [Timeout, Terminated]
        assert next(a for a in out if isinstance(a, Timeout)).timer == "B"
        assert tx.state is State.TERMINATED and not tx.deadlines

    def test_reliable_transport_has_no_timer_a(self) -> None:
        tx, out = self.new(reliable=True)
        assert started(out) == {"B": 32.0}
        log = run_timers(tx, 100.0)
        assert [name for _, name, _ in log] == ["B"]

    def test_calling_to_proceeding_on_1xx_then_more_1xx(self) -> None:
        tx, _ = self.new()
        out = tx.receive_response(response(tx.request, 100, None), 0.1)
        assert tx.state is State.PROCEEDING
        assert cancelled(out) == {"A", "B"}
        assert [r.status for r in to_tu(out)] == [100]  # type: ignore[union-attr]
        out = tx.receive_response(response(tx.request, 180), 0.2)
        assert tx.state is State.PROCEEDING and [r.status for r in to_tu(out)] == [180]  # type: ignore[union-attr]
        assert tx.timer_fired("A", 0.5) == []  # a stale timer does nothing
        assert tx.provisional_received

    @pytest.mark.parametrize("via_proceeding", [False, True])
    def test_2xx_enters_accepted_then_timer_m_terminates(self, via_proceeding: bool) -> None:
        tx, _ = self.new()
        if via_proceeding:
            tx.receive_response(response(tx.request, 180), 0.1)
        ok = response(tx.request, 200)
        out = tx.receive_response(ok, 1.0)
        assert tx.state is State.ACCEPTED
        assert to_tu(out) == [ok] and transmitted(out) == []  # the 2xx ACK is the TU's job
        assert started(out) == {"M": 1.0 + 32.0}
        # Accepted: retransmitted 2xx and a forked 2xx (other To tag) go to the TU
        assert to_tu(tx.receive_response(ok, 2.0)) == [ok]
        fork = response(tx.request, 200, "b2")
        assert to_tu(tx.receive_response(fork, 2.5)) == [fork]
        assert to_tu(tx.receive_response(response(tx.request, 180), 2.6)) == []
        out = tx.timer_fired("M", 33.0)
        assert is_terminated(out) and tx.state is State.TERMINATED
        expected = [State.CALLING, State.PROCEEDING, State.ACCEPTED, State.TERMINATED]
        assert tx.history == (
            expected if via_proceeding else [s for s in expected if s is not State.PROCEEDING]
        )

    @pytest.mark.parametrize("status", [300, 404, 486, 503, 603])
    def test_non_2xx_final_sends_ack_and_enters_completed(self, status: int) -> None:
        tx, _ = self.new()
        tx.receive_response(response(tx.request, 183), 0.1)
        final = response(tx.request, status)
        out = tx.receive_response(final, 1.0)
        assert tx.state is State.COMPLETED
        assert to_tu(out) == [final]
        (ack,) = transmitted(out)
        ack = wire(ack)
        assert isinstance(ack, Request) and ack.method == "ACK"
        assert ack.uri == tx.request.uri
        assert ack.cseq.number == 1 and ack.cseq.method == "ACK"
        assert len(ack.via) == 1 and ack.top_via is not None and ack.top_via.branch == "z9hG4bKtx1"
        assert ack.to.tag == "b1" and ack.from_.tag == "a1" and ack.call_id == tx.request.call_id
        assert [str(r.uri) for r in ack.route] == ["sip:p1.example.com;lr", "sip:p2.example.com;lr"]
        assert started(out) == {"D": 33.0}  # max(32 s, 64*T1) after the final
        # Completed: a retransmitted final is answered with the same ACK and not passed up
        again = tx.receive_response(final, 2.0)
        assert transmitted(again) == [tx.ack] and to_tu(again) == []
        assert is_terminated(tx.timer_fired("D", 33.0))
        assert tx.state is State.TERMINATED

    def test_final_in_calling_goes_straight_to_completed(self) -> None:
        tx, _ = self.new()
        out = tx.receive_response(response(tx.request, 486), 0.2)
        assert cancelled(out) == {"A", "B"} and tx.history == [State.CALLING, State.COMPLETED]

    def test_reliable_final_terminates_at_once(self) -> None:
        tx, _ = self.new(reliable=True)
        out = tx.receive_response(response(tx.request, 404), 0.2)
        assert [m.method for m in transmitted(out)] == ["ACK"]  # type: ignore[union-attr]
        assert is_terminated(out) and tx.history == [State.CALLING, State.COMPLETED, State.TERMINATED]

    @pytest.mark.parametrize("when", ["calling", "proceeding", "completed"])
    def test_transport_error_informs_tu_and_terminates(self, when: str) -> None:
        tx, _ = self.new()
        if when != "calling":
            tx.receive_response(response(tx.request, 180), 0.1)
        if when == "completed":
            tx.receive_response(response(tx.request, 500), 0.2)
        out = tx.transport_error("connection refused", 0.3)
        assert [type(a) for a in out if not isinstance(a, CancelTimer)] == [TransportFailure, Terminated]
        assert out[0].error == "connection refused"  # type: ignore[union-attr]
        assert tx.transport_error("again", 0.4) == []

    def test_timer_c_reset_by_provisionals_and_fires_in_proceeding(self) -> None:
        tx, out = self.new(timer_c=True)
        assert started(out)["C"] == 180.0
        out = tx.receive_response(response(tx.request, 100, None), 1.0)
        assert "C" not in started(out)  # 100 does not reset Timer C
        out = tx.receive_response(response(tx.request, 180), 10.0)
        assert started(out) == {"C": 190.0}
        assert tx.timer_fired("C", 180.0) == []  # the old deadline no longer counts
        out = tx.timer_fired("C", 190.0)
        assert [a.timer for a in out if isinstance(a, Timeout)] == ["C"]
        assert tx.state is State.PROCEEDING  # the proxy now CANCELs and waits for the 487
        out = tx.receive_response(response(tx.request, 487), 190.1)
        assert tx.state is State.COMPLETED and [m.method for m in transmitted(out)] == ["ACK"]  # type: ignore[union-attr]

    def test_timer_c_in_calling_terminates(self) -> None:
        tx, _ = self.new(timer_c=True, timers=TimerConfig(timer_c=10.0))
        log = run_timers(tx, 100.0)
        at, name, out = log[-1]
        assert (at, name) == (10.0, "C") and is_terminated(out)
        assert [a.timer for a in out if isinstance(a, Timeout)] == ["C"]

    def test_2xx_cancels_timer_c(self) -> None:
        tx, _ = self.new(timer_c=True)
        out = tx.receive_response(response(tx.request, 200), 1.0)
        assert "C" in cancelled(out) and "C" not in tx.deadlines


# ------------------------------------------------------------------------------------- non-INVITE client
class TestNonInviteClient:
    def new(self, *, reliable: bool = False, method: str = "OPTIONS"):
        tx = NonInviteClientTransaction(request(method), DEST, reliable=reliable, timers=T)
        return tx, tx.start(0.0)

    def test_refuses_invite_and_ack(self) -> None:
        for method in ("INVITE", "ACK"):
            with pytest.raises(TransactionError):
                NonInviteClientTransaction(request(method), DEST, reliable=False)

    def test_start_enters_trying(self) -> None:
        tx, out = self.new()
        assert tx.state is State.TRYING and len(transmitted(out)) == 1
        assert started(out) == {"E": 0.5, "F": 32.0}

    def test_timer_e_doubles_up_to_t2_then_timer_f(self) -> None:
        tx, _ = self.new()
        log = run_timers(tx, 100.0)
        times = [at for at, name, out in log if name == "E" and transmitted(out)]
        assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
        assert log[-1][:2] == (32.0, "F")
        assert [a.timer for a in log[-1][2] if isinstance(a, Timeout)] == ["F"]
        assert tx.state is State.TERMINATED

    def test_proceeding_retransmits_every_t2(self) -> None:
        tx, _ = self.new()
        out = tx.receive_response(response(tx.request, 100, None), 0.2)
        assert tx.state is State.PROCEEDING and len(to_tu(out)) == 1 and not cancelled(out)
        log = run_timers(tx, 12.0)
        assert [at for at, name, _ in log if name == "E"] == [0.5, 4.5, 8.5]
        out = tx.receive_response(response(tx.request, 180), 12.0)
        assert tx.state is State.PROCEEDING and len(to_tu(out)) == 1

    def test_timer_f_in_proceeding(self) -> None:
        tx, _ = self.new()
        tx.receive_response(response(tx.request, 100, None), 0.2)
        log = run_timers(tx, 100.0)
        assert log[-1][1] == "F" and tx.state is State.TERMINATED

    @pytest.mark.parametrize("via_proceeding", [False, True])
    def test_final_enters_completed_then_k(self, via_proceeding: bool) -> None:
        tx, _ = self.new()
        if via_proceeding:
            tx.receive_response(response(tx.request, 100, None), 0.1)
        final = response(tx.request, 200)
        out = tx.receive_response(final, 1.0)
        assert tx.state is State.COMPLETED and to_tu(out) == [final]
        assert cancelled(out) == {"E", "F"} and started(out) == {"K": 6.0}
        assert tx.receive_response(final, 2.0) == []  # retransmission absorbed
        assert tx.receive_response(response(tx.request, 180), 2.0) == []
        assert is_terminated(tx.timer_fired("K", 6.0))

    def test_reliable_has_no_e_and_no_k(self) -> None:
        tx, out = self.new(reliable=True)
        assert started(out) == {"F": 32.0}
        out = tx.receive_response(response(tx.request, 404), 1.0)
        assert is_terminated(out) and tx.history == [State.TRYING, State.COMPLETED, State.TERMINATED]

    @pytest.mark.parametrize("when", ["trying", "proceeding"])
    def test_transport_error(self, when: str) -> None:
        tx, _ = self.new()
        if when == "proceeding":
            tx.receive_response(response(tx.request, 100, None), 0.05)
        out = tx.transport_error("no route", 0.1)
        assert any(isinstance(a, TransportFailure) for a in out) and tx.state is State.TERMINATED
        assert not tx.deadlines


# --------------------------------------------------------------------------------------------- INVITE server
SRC = ("udp", "192.0.2.1", 5060)


class TestInviteServer:
    def new(self, *, reliable: bool = False, trying_delay: float | None = 0.0):
        tx = InviteServerTransaction(request(), SRC, reliable=reliable, timers=T, trying_delay=trying_delay)
        return tx, tx.start(0.0)

    def test_start_sends_100_trying_and_passes_request(self) -> None:
        tx, out = self.new()
        assert tx.state is State.PROCEEDING
        (trying,) = transmitted(out)
        assert isinstance(trying, Response) and trying.status == 100 and trying.to.tag is None
        assert to_tu(out) == [tx.request]
        assert all(a.destination == SRC for a in out if isinstance(a, Transmit))

    def test_delayed_trying_only_if_tu_is_slow(self) -> None:
        tx, out = self.new(trying_delay=0.2)
        assert transmitted(out) == [] and started(out) == {"Trying": 0.2}
        out = tx.timer_fired("Trying", 0.2)
        assert [m.status for m in transmitted(out)] == [100]  # type: ignore[union-attr]
        tx, out = self.new(trying_delay=0.2)
        out = tx.send_response(response(tx.request, 180), 0.1)
        assert "Trying" in cancelled(out)
        assert tx.timer_fired("Trying", 0.2) == []
        tx, out = self.new(trying_delay=None)
        assert transmitted(out) == [] and started(out) == {}

    def test_proceeding_resends_last_provisional_on_retransmission(self) -> None:
        tx, _ = self.new()
        assert [m.status for m in transmitted(tx.receive_request(request(), 0.5))] == [100]  # type: ignore[union-attr]
        ringing = response(tx.request, 180)
        out = tx.send_response(ringing, 0.6)
        assert transmitted(out) == [ringing] and tx.state is State.PROCEEDING
        assert transmitted(tx.receive_request(request(), 1.0)) == [ringing]
        assert to_tu(tx.receive_request(request(), 1.0)) == []

    def test_2xx_enters_accepted_absorbs_invites_passes_acks_then_l(self) -> None:
        tx, _ = self.new()
        ok = response(tx.request, 200)
        out = tx.send_response(ok, 1.0)
        assert tx.state is State.ACCEPTED and transmitted(out) == [ok] and started(out) == {"L": 33.0}
        assert tx.receive_request(request(), 1.5) == []  # RFC 6026: INVITE retransmission absorbed
        assert transmitted(tx.send_response(ok, 2.0)) == [ok]  # the TU's 2xx retransmission passes
        ack = request("ACK")
        assert to_tu(tx.receive_request(ack, 2.5)) == [ack]
        with pytest.raises(TransactionError):
            tx.send_response(response(tx.request, 486), 3.0)
        assert is_terminated(tx.timer_fired("L", 33.0))
        assert tx.history == [State.PROCEEDING, State.ACCEPTED, State.TERMINATED]

    def test_non_2xx_timer_g_doubles_to_t2_until_h(self) -> None:
        tx, _ = self.new()
        busy = response(tx.request, 486)
        out = tx.send_response(busy, 0.0)
        assert tx.state is State.COMPLETED and started(out) == {"G": 0.5, "H": 32.0}
        log = run_timers(tx, 100.0)
        times = [at for at, name, o in log if name == "G" and transmitted(o) == [busy]]
        assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
        at, name, out = log[-1]
        assert (at, name) == (32.0, "H") and [a.timer for a in out if isinstance(a, Timeout)] == ["H"]
        assert tx.state is State.TERMINATED

    def test_completed_ack_confirmed_then_i(self) -> None:
        tx, _ = self.new()
        tx.send_response(response(tx.request, 180), 0.1)
        busy = response(tx.request, 486)
        tx.send_response(busy, 1.0)
        assert transmitted(tx.receive_request(request(), 1.2)) == [busy]
        with pytest.raises(TransactionError):
            tx.send_response(response(tx.request, 500), 1.3)
        out = tx.receive_request(request("ACK"), 2.0)
        assert tx.state is State.CONFIRMED and to_tu(out) == []  # the non-2xx ACK is absorbed
        assert cancelled(out) == {"G", "H"} and started(out) == {"I": 7.0}
        assert tx.receive_request(request("ACK"), 3.0) == []
        assert tx.receive_request(request(), 3.0) == []
        assert is_terminated(tx.timer_fired("I", 7.0))
        assert tx.history == [State.PROCEEDING, State.COMPLETED, State.CONFIRMED, State.TERMINATED]

    def test_reliable_no_g_and_i_zero(self) -> None:
        tx, _ = self.new(reliable=True)
        out = tx.send_response(response(tx.request, 404), 0.1)
        assert started(out) == {"H": 32.1}
        out = tx.receive_request(request("ACK"), 0.2)
        assert is_terminated(out)

    @pytest.mark.parametrize("when", ["proceeding", "completed", "accepted"])
    def test_transport_error(self, when: str) -> None:
        tx, _ = self.new()
        if when == "completed":
            tx.send_response(response(tx.request, 404), 0.1)
        elif when == "accepted":
            tx.send_response(response(tx.request, 200), 0.1)
        out = tx.transport_error("reset", 0.2)
        assert any(isinstance(a, TransportFailure) for a in out) and tx.state is State.TERMINATED
        with pytest.raises(TransactionError):
            tx.send_response(response(tx.request, 500), 0.3)

    def test_refuses_non_invite(self) -> None:
        with pytest.raises(TransactionError):
            InviteServerTransaction(request("OPTIONS"), SRC, reliable=False)


# ------------------------------------------------------------------------------------- non-INVITE server
class TestNonInviteServer:
    def new(self, *, reliable: bool = False):
        tx = NonInviteServerTransaction(request("BYE"), SRC, reliable=reliable, timers=T)
        return tx, tx.start(0.0)

    def test_trying_absorbs_retransmissions(self) -> None:
        tx, out = self.new()
        assert tx.state is State.TRYING and to_tu(out) == [tx.request] and transmitted(out) == []
        assert tx.receive_request(request("BYE"), 0.5) == []

    def test_proceeding_resends_provisional(self) -> None:
        tx, _ = self.new()
        trying = response(tx.request, 100, None)
        assert transmitted(tx.send_response(trying, 0.1)) == [trying] and tx.state is State.PROCEEDING
        assert transmitted(tx.receive_request(request("BYE"), 0.5)) == [trying]
        assert tx.send_response(response(tx.request, 180), 0.6) and tx.state is State.PROCEEDING

    @pytest.mark.parametrize("via_proceeding", [False, True])
    def test_final_completed_resends_then_j(self, via_proceeding: bool) -> None:
        tx, _ = self.new()
        if via_proceeding:
            tx.send_response(response(tx.request, 100, None), 0.1)
        ok = response(tx.request, 200)
        out = tx.send_response(ok, 1.0)
        assert tx.state is State.COMPLETED and started(out) == {"J": 33.0}
        # encoded once (a SentResponse), byte for byte the response, and the same bytes on each retransmission
        (sent,) = transmitted(out)
        assert sent is tx.last_response and bytes(sent) == bytes(ok)
        assert transmitted(tx.receive_request(request("BYE"), 2.0)) == [sent]
        with pytest.raises(TransactionError):
            tx.send_response(response(tx.request, 500), 2.0)
        assert is_terminated(tx.timer_fired("J", 33.0))

    def test_reliable_terminates_after_final(self) -> None:
        tx, _ = self.new(reliable=True)
        out = tx.send_response(response(tx.request, 200), 1.0)
        assert is_terminated(out) and tx.history == [State.TRYING, State.COMPLETED, State.TERMINATED]

    @pytest.mark.parametrize("status", [100, 200])
    def test_transport_error(self, status: int) -> None:
        tx, _ = self.new()
        tx.send_response(response(tx.request, status, None if status == 100 else "b1"), 0.1)
        out = tx.transport_error("reset", 0.2)
        assert any(isinstance(a, TransportFailure) for a in out) and tx.state is State.TERMINATED


@pytest.mark.parametrize("method, timer", [("INVITE", "A"), ("MESSAGE", "E")])
def test_a_refused_size_switched_request_falls_back_to_udp(method: str, timer: str) -> None:
    """§18.1.1: a request sent over TCP for its size, refused by the next hop, goes again over UDP with
    UDP's retransmission timer; once a response arrived there is no falling back."""
    cls = InviteClientTransaction if method == "INVITE" else NonInviteClientTransaction
    req = request(method)
    tx = cls(req, ("tcp", "192.0.2.2", 5060), reliable=True, timers=T)
    assert not {"A", "E"} & set(started(tx.start(0.0)))  # reliable: no retransmissions
    udp = ("udp", "192.0.2.2", 5060)
    actions = tx.fall_back_to_udp(udp, 0.1)
    sent = [a for a in actions if isinstance(a, Transmit)]
    assert len(sent) == 1 and sent[0].destination == udp and sent[0].message is req
    assert started(actions) == {timer: 0.1 + T.t1} and not tx.reliable
    again = cls(request(method), ("tcp", "192.0.2.2", 5060), reliable=True, timers=T)
    again.start(0.0)
    again.receive_response(response(again.request, 100), 0.05)
    assert again.fall_back_to_udp(udp, 0.1) == [] and again.reliable
