"""The sans-IO cores against a real peer, with loss: sipp's UAC calls a minimal UAS built only from
TransactionLayer + Dialog + AnswerRetransmitter (no Stack), and a minimal UAC built the same way calls
sipp's UAS, each through a seeded lossy UDP relay.

This checks the cores themselves interoperate — retransmission absorption, 100 Trying, the 2xx resent
until sipp's ACK arrives (its first copy is always dropped), BYE answered in the dialog — independently of
the Stack built on top of them.

The relay loses at most two copies of any one message, and sipp runs scenarios that survive every such
pattern (tests/interop/scenarios/uac_txn.xml and uas_timer_j.xml; sipp's built-in ones do not, see
docs/interop.md): so every call must end well, and a call that does not is a finding about our cores.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from interop.relay import LossyRelay
from interop.sipp import UAC_TXN, UAS_TIMER_J, uac, uas

from p2psip.dialog import (
    AnswerRetransmitter,
    Dialog,
    DialogId,
    dialog_id_of_request,
    dialog_id_of_response,
)
from p2psip.errors import ParseError
from p2psip.message import Request, Response, new_branch, new_tag, parse
from p2psip.transaction import (
    ClientTransaction,
    PassToTU,
    Timeout,
    TransactionLayer,
    Transmit,
    TransportFailure,
    TUEvent,
)

pytestmark = pytest.mark.interop

Address = tuple[str, int]


class CoreUAS(asyncio.DatagramProtocol):
    """Answers every INVITE 180 + 200 and every BYE 200, using only the sans-IO cores."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.layer = TransactionLayer()
        self.dialogs: dict[DialogId, Dialog] = {}
        self.pending: dict[DialogId, tuple[AnswerRetransmitter, Address]] = {}
        self.stats: Counter[str] = Counter()
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: Address) -> None:
        now = self.loop.time()
        try:
            message = parse(data)
        except ParseError:
            self.stats["unparsable"] += 1
            return
        if isinstance(message, Request):
            self.perform(self.layer.receive_request(message, addr, now, reliable=False), now)
        else:
            self.perform(self.layer.receive_response(message, addr, now), now)
        self.rearm()

    def send(self, message: Request | Response, to: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(bytes(message), to)

    def perform(self, events: list[TUEvent], now: float) -> None:
        for event in events:
            if isinstance(event, Transmit):
                self.send(event.message, event.destination)
            elif isinstance(event, PassToTU) and isinstance(event.message, Request):
                self.on_request(event.message, event, now)

    def on_request(self, request: Request, event: PassToTU, now: float) -> None:
        tx = event.transaction
        if request.method == "ACK":
            pending = self.pending.pop(dialog_id_of_request(request), None)
            if pending is not None:
                pending[0].ack_received()
                self.stats["acks"] += 1
            return
        assert tx is not None
        if request.method == "INVITE":
            tag = new_tag()
            ringing = Response.for_request(request, 180, to_tag=tag)
            ok = Response.for_request(request, 200, to_tag=tag)
            ok.add("Contact", f"<sip:uas@127.0.0.1:{self.port}>")
            dialog = Dialog.uas(request, ok)
            self.dialogs[dialog.id] = dialog
            self.pending[dialog.id] = (AnswerRetransmitter(ok, now), event.source)
            self.perform(self.layer.send_response(tx, ringing, now), now)  # type: ignore[arg-type]
            self.perform(self.layer.send_response(tx, ok, now), now)  # type: ignore[arg-type]
            self.stats["invites"] += 1
        elif request.method == "BYE":
            if self.pending.pop(dialog_id_of_request(request), None) is not None:
                self.stats["bye_before_ack"] += 1  # the ACK was lost; the BYE ends the 2xx retransmission
            dialog = self.dialogs.get(dialog_id_of_request(request))
            status = 481 if dialog is None else (dialog.receive_request(request) or 200)
            self.perform(self.layer.send_response(tx, Response.for_request(request, status), now), now)  # type: ignore[arg-type]
            self.stats[f"bye_{status}"] += 1
        else:
            self.perform(self.layer.send_response(tx, Response.for_request(request, 501), now), now)  # type: ignore[arg-type]

    def on_timer(self) -> None:
        self.timer = None
        now = self.loop.time()
        self.perform(self.layer.handle_timers(now), now)
        for dialog_id, (retx, addr) in list(self.pending.items()):
            if retx.deadline is not None and retx.deadline <= now:
                again = retx.fire(now)
                if again is not None:
                    self.send(again, addr)
                    self.stats["2xx_retransmissions"] += 1
            if retx.deadline is None:
                del self.pending[dialog_id]
                self.stats["no_ack"] += int(retx.timed_out)
        self.rearm()

    def rearm(self) -> None:
        deadlines = [r.deadline for r, _ in self.pending.values() if r.deadline is not None]
        layer_next = self.layer.next_deadline()
        if layer_next is not None:
            deadlines.append(layer_next)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadlines:
            self.timer = self.loop.call_at(min(deadlines), self.on_timer)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()


def is_first_invite_200(data: bytes) -> bool:
    return data.startswith(b"SIP/2.0 200") and b" INVITE\r\n" in data


async def test_sipp_calls_core_uas_through_lossy_relay(tmp_path: Path) -> None:
    require_tool("sipp")
    loop = asyncio.get_running_loop()
    transport, uas = await loop.create_datagram_endpoint(CoreUAS, local_addr=("127.0.0.1", 0))
    calls = 60
    try:
        async with LossyRelay(
            ("127.0.0.1", uas.port), loss=0.1, seed=4242, drop_first=is_first_invite_200
        ) as relay:
            host, port = relay.address
            # uac_txn.xml: sipp's built-in UAC, but the BYE's 200 is matched by its transaction; the built-in
            # one takes a retransmitted 200 of the INVITE for it, so a call whose ACK and BYE were both lost
            # ended on sipp's side with the BYE never retransmitted, and this UAS never saw that BYE
            sipp = uac(tmp_path, f"{host}:{port}", calls=calls, rate=20, port=free_port(), scenario=UAC_TXN)
            with sipp:
                result = await asyncio.to_thread(sipp.wait, 120.0)
    finally:
        uas.close()
        transport.close()
    assert result.successful == calls and result.failed == 0, f"{result}\n{uas.stats}\n{relay.stats}"
    assert uas.stats["invites"] == calls and uas.stats["bye_200"] == calls, f"{uas.stats}\n{relay.stats}"
    assert uas.stats["2xx_retransmissions"] >= calls  # every first 200 was dropped and resent
    assert uas.stats["acks"] + uas.stats["bye_before_ack"] == calls and uas.stats["no_ack"] == 0
    assert relay.stats.dropped > calls  # the random losses came on top of the forced ones


class CoreUAC(asyncio.DatagramProtocol):
    """Places calls with the sans-IO cores only: INVITE on a client transaction, ACK for the 2xx from the
    dialog (re-sent for every retransmitted 2xx), BYE on a client transaction. Every request goes to
    ``outbound`` (the relay), like an outbound proxy."""

    def __init__(self, outbound: Address, calls: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.outbound = outbound
        self.calls = calls
        self.layer = TransactionLayer()
        self.invites: dict[str, Request] = {}
        self.dialogs: dict[DialogId, Dialog] = {}
        self.stats: Counter[str] = Counter()
        self.failures: list[str] = []
        self.ended: dict[str, str] = {}
        """Call-ID -> how the call ended ("ok" on the 200 to its BYE, else the failure)."""
        self.transactions: dict[str, list[ClientTransaction]] = {}
        """Call-ID -> its client transactions (INVITE, BYE), to say where a call that never ended stands."""
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def via(self) -> str:
        return f"SIP/2.0/UDP 127.0.0.1:{self.port};rport;branch={new_branch()}"

    def call(self, number: int, target: str) -> None:
        invite = Request.create(
            "INVITE",
            f"sip:service@{target}",
            from_="<sip:core@127.0.0.1>",
            to=f"<sip:service@{target}>",
            via=self.via(),
            contact=f"<sip:core@127.0.0.1:{self.port}>",
        )
        self.invites[invite.call_id] = invite
        tx, events = self.layer.send_request(invite, self.outbound, self.loop.time(), reliable=False)
        self.transactions[invite.call_id] = [tx]
        self.perform(events)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            message = parse(data)
        except ParseError:
            self.stats["unparsable"] += 1
            return
        now = self.loop.time()
        if isinstance(message, Response):
            self.perform(self.layer.receive_response(message, addr, now))
        else:
            self.perform(self.layer.receive_request(message, addr, now, reliable=False))

    def perform(self, events: list[TUEvent]) -> None:
        for event in events:
            if isinstance(event, Transmit):
                assert self.transport is not None
                self.transport.sendto(bytes(event.message), event.destination)
            elif isinstance(event, PassToTU) and isinstance(event.message, Response):
                self.on_response(event.message)
            elif isinstance(event, Timeout | TransportFailure):
                self.end(event.transaction.request.call_id, f"{event.transaction!r}: {event}")
        self.rearm()

    def end(self, call_id: str, failure: str | None = None) -> None:
        """The call ``call_id`` has ended, well (200 to its BYE) or not (``failure``). Once every call has,
        the test can assert: a failed call must end the wait too, or the test would sit out its whole
        timeout and never say which call failed and why."""
        if failure is not None:
            self.failures.append(f"{call_id}: {failure}")
        self.ended.setdefault(call_id, failure or "ok")
        if len(self.ended) >= self.calls and not self.done.done():
            self.done.set_result(None)

    def unended(self, relay: LossyRelay) -> list[str]:
        """One line per call that has not ended: its transactions' states and what the relay dropped of it."""
        lines = []
        for call_id, transactions in self.transactions.items():
            if call_id not in self.ended:
                states = ", ".join(
                    f"{tx.method} {'->'.join(s.value for s in tx.history)}" for tx in transactions
                )
                dropped = [line for line in relay.stats.dropped_lines if call_id in line]
                lines.append(f"{call_id}: {states}; dialog: {self.has_dialog(call_id)}; dropped: {dropped}")
        return lines

    def has_dialog(self, call_id: str) -> bool:
        return any(dialog_id[0] == call_id for dialog_id in self.dialogs)

    def on_response(self, response: Response) -> None:
        method = response.cseq.method
        if method == "INVITE" and 200 <= response.status < 300:
            invite = self.invites.get(response.call_id)
            if invite is None:
                return
            dialog_id = dialog_id_of_response(response)
            dialog = self.dialogs.get(dialog_id)
            first = dialog is None
            if dialog is None:
                dialog = self.dialogs[dialog_id] = Dialog.uac(invite, response)
            ack = dialog.create_ack(response, via=self.via()) if first else dialog.last_ack
            assert ack is not None
            assert self.transport is not None
            self.transport.sendto(bytes(ack), self.outbound)  # no transaction for the 2xx ACK
            self.stats["acks" if first else "re_acks"] += 1
            if first:
                self.loop.call_later(0.2, self.hang_up, dialog)
        elif method == "INVITE" and response.status >= 300:
            self.end(response.call_id, f"INVITE answered {response.status}")
        elif method == "BYE" and response.status >= 200:
            self.stats[f"bye_{response.status}"] += 1
            self.end(response.call_id, None if response.status == 200 else f"BYE answered {response.status}")

    def hang_up(self, dialog: Dialog) -> None:
        bye = dialog.create_request("BYE", via=self.via())
        tx, events = self.layer.send_request(bye, self.outbound, self.loop.time(), reliable=False)
        self.transactions[bye.call_id].append(tx)
        self.perform(events)

    def on_timer(self) -> None:
        self.timer = None
        self.perform(self.layer.handle_timers(self.loop.time()))

    def rearm(self) -> None:
        deadline = self.layer.next_deadline()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadline is not None:
            self.timer = self.loop.call_at(deadline, self.on_timer)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()


def is_invite(data: bytes) -> bool:
    return data.startswith(b"INVITE ")


async def test_core_uac_calls_sipp_uas_through_lossy_relay(tmp_path: Path) -> None:
    require_tool("sipp")
    loop = asyncio.get_running_loop()
    calls = 30
    wait = 90  # every call ends within 64*T1 of its INVITE (Timer B) or BYE (Timer F), well or not
    sipp_port = free_port()
    # uas_timer_j.xml: the built-in UAS, but a call lives 32 s (Timer J) after its 200 to the BYE, not 4 s,
    # so a BYE retransmission the relay's losses pushed past 4 s still gets its 200 (else Timer F fires)
    with uas(tmp_path, sipp_port, scenario=UAS_TIMER_J):
        async with LossyRelay(("127.0.0.1", sipp_port), loss=0.1, seed=777, drop_first=is_invite) as relay:
            transport, uac_core = await loop.create_datagram_endpoint(
                lambda: CoreUAC(relay.address, calls), local_addr=("127.0.0.1", 0)
            )
            try:
                for number in range(calls):
                    loop.call_later(number * 0.05, uac_core.call, number, f"127.0.0.1:{sipp_port}")
                try:
                    await asyncio.wait_for(asyncio.shield(uac_core.done), timeout=wait)
                except TimeoutError:
                    unended = "\n".join(uac_core.unended(relay))
                    pytest.fail(f"calls not ended in {wait} s:\n{unended}\n{uac_core.stats}\n{relay.stats}")
            finally:
                uac_core.close()
                transport.close()
    assert uac_core.failures == [], f"{uac_core.failures}\n{uac_core.stats}\n{relay.stats}"
    assert uac_core.stats["acks"] == calls and uac_core.stats["bye_200"] == calls
    assert uac_core.layer.stats["retransmissions"] >= calls  # every first INVITE was dropped: Timer A
    assert relay.stats.dropped > calls
