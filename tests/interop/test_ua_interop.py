"""Our UserAgent against real peers: sipp as callee and as caller, with and without seeded packet loss
(the lossy relay stands between them), and Kamailio as registrar (digest auth) and proxy.

A call passes only when both sides say so: our UA sees the 200 and the BYE's 200, and sipp counts the call
successful (its UAS: INVITE answered, ACK and BYE received; its UAC: the whole exchange as scripted).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port
from test_node_net import wait_until

from p2psip.stack import Stack
from p2psip.useragent import UserAgent

from .kamailio import Kamailio, registrar_config
from .relay import LossyRelay
from .sipp import UAC_DOMAIN, UAC_TXN, UAS_TIMER_J, Sipp, uac, uas
from .ua import SDP, answering_ua

pytestmark = pytest.mark.interop


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    st = await Stack.start(listen=["udp:127.0.0.1:0", "tcp:127.0.0.1:0"])
    try:
        yield st
    finally:
        await st.close()


async def _wait_sipp(sipp: Sipp, timeout: float) -> None:
    """Wait (bounded) for a sipp child to exit, in a thread, so the event loop our UA runs on goes on."""
    assert sipp.proc is not None
    try:
        await asyncio.to_thread(sipp.proc.wait, timeout)
    except subprocess.TimeoutExpired:
        sipp.stop()


async def _place_calls(ua: UserAgent, uri: str, count: int) -> None:
    for _ in range(count):
        call = await ua.call(uri, body=SDP, timeout=30)
        assert call.response is None or call.response.status == 200
        bye = await call.bye(timeout=30)
        assert bye.status == 200, f"BYE answered {bye.status} {bye.reason}"


def _uas_counts(sipp: Sipp) -> str:
    return sipp.log_tail(60)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_our_ua_calls_sipp_uas(sipp_tool: str, workdir: Path, stack: Stack, transport: str) -> None:
    uport = free_port()
    with uas(
        workdir, uport, transport="t1" if transport == "tcp" else "u1", scenario=None, extra=["-m", "5"]
    ) as callee:
        ua = UserAgent(stack, "sip:alice@127.0.0.1")
        suffix = ";transport=tcp" if transport == "tcp" else ""
        await _place_calls(ua, f"sip:service@127.0.0.1:{uport}{suffix}", 5)
        await _wait_sipp(callee, 15)  # -m 5: the UAS ends after its 5th call (its 4 s timewait included)
        await ua.close()
    assert callee.proc is not None and callee.proc.returncode == 0, _uas_counts(callee)


def _first_copy_lost(data: bytes) -> bool:
    """The relay's ``drop_first`` of the lossy tests: the first copy of every INVITE, ACK, BYE and 200 (to
    the INVITE and to the BYE) is lost, so each retransmission path of a call is taken in every call."""
    return data.startswith((b"INVITE ", b"ACK ", b"BYE ", b"SIP/2.0 200"))


def _losses_of_every_call(relay: LossyRelay, call_ids: list[str], *, caller: str) -> list[str]:
    """What the relay should have dropped of each call and did not: a first copy of the INVITE and of the
    ACK and BYE (going ``caller``: ``up`` when the caller is the relay's client) and of the 200s to the
    INVITE and to the BYE (the other way). One line per miss; empty when every call lost them all."""
    callee = "down" if caller == "up" else "up"
    wanted = [
        (caller, "INVITE "),
        (callee, "SIP/2.0 200 ", "INVITE"),
        (caller, "ACK "),
        (caller, "BYE "),
        (callee, "SIP/2.0 200 ", "BYE"),
    ]
    missing = []
    for call_id in call_ids:
        lines = [line for line in relay.stats.dropped_lines if f"[{call_id}]" in line]
        for direction, start, *method in wanted:
            if not any(
                line.startswith(f"{direction} {start}") and all(line.endswith(f" {m}") for m in method)
                for line in lines
            ):
                missing.append(f"{call_id}: no {direction} {start}{' '.join(method)} dropped")
    return missing


@pytest.mark.slow
async def test_our_ua_calls_sipp_uas_through_loss(sipp_tool: str, workdir: Path, stack: Stack) -> None:
    """Every message of 5 concurrent calls crosses the lossy relay, both ways: the relay rewrites Contacts
    (as a NAT's SIP ALG), so our ACK and BYE go to it, not to sipp. 20 % seeded loss (at most two copies of
    any one message), and the first copy of every INVITE, 200, ACK and BYE lost. The calls still complete
    per RFC 3261: our INVITE retransmission (Timer A), sipp's 200 retransmission answered by our ACK again
    (§13.2.2.4; a call waits for the relay to carry its ACK before it hangs up, so the ACK's loss is
    repaired by that path and not hidden by the BYE), our BYE retransmission (Timer E) and sipp answering
    each copy (its call lives 32 s after its 200 to the BYE, Timer J: uas_timer_j.xml)."""
    uport, calls = free_port(), 5
    counts = ["-trace_counts", "-fd", "1"]
    with uas(workdir, uport, scenario=UAS_TIMER_J, extra=["-m", str(calls), *counts]) as callee:
        async with LossyRelay(
            ("127.0.0.1", uport), loss=0.2, seed=4475, drop_first=_first_copy_lost, rewrite_contact=True
        ) as relay:
            ua = UserAgent(stack, "sip:alice@127.0.0.1")
            host, port = relay.address

            async def one_call() -> str:
                call = await ua.call(f"sip:service@{host}:{port}", body=SDP, timeout=30)
                assert call.dialog is not None and call.response is not None
                call_id = call.dialog.id.call_id

                def acked(line: str) -> bool:
                    return line.startswith("up ACK ") and call_id in line

                # sipp resends its 200 until an ACK reaches it (the first ACK is always lost): wait for that
                try:
                    await relay.wait_forwarded(acked, 20)
                except TimeoutError:
                    pytest.fail(f"no ACK of {call_id} reached sipp in 20 s\n{relay.stats}")
                bye = await call.bye(timeout=30)
                assert bye.status == 200, f"BYE answered {bye.status} {bye.reason}"
                return call_id

            try:
                call_ids = await asyncio.gather(*(one_call() for _ in range(calls)))
            finally:
                await ua.close()
        # sipp's own count of what reached it; it writes the row every second (-fd 1)
        want = {"0_INVITE_Recv": calls, "3_ACK_Recv": calls, "4_BYE_Recv": calls, "5_200_Sent": calls}
        with contextlib.suppress(AssertionError):  # the assertions below say what is missing
            await wait_until(lambda: all(callee.counts().get(k, 0) >= v for k, v in want.items()), "sipp", 10)
        callee.stop()  # a Timer-J call lives on for 32 s; sipp writes its last row as it ends
        seen = callee.counts()
    assert {k: seen.get(k) for k in want} == want, f"{seen}\n{relay.stats}"
    # no step of sipp's timed out (e.g. its 200 resent to the limit without an ACK). Unexpected messages
    # are not counted against us: a 200 copy crossing our ACK is ACKed again (§13.2.2.4), and that ACK
    # may legally reach sipp after the BYE
    timeouts = {k: v for k, v in seen.items() if k.endswith("_Timeout") and v}
    assert timeouts == {}, f"{seen}\n{_uas_counts(callee)}\n{relay.stats}"
    missing = _losses_of_every_call(relay, call_ids, caller="up")
    assert missing == [], "\n".join([*missing, str(relay.stats)])
    # the random 20 % came on top of the 5 forced losses per call, and every message used the relay:
    # none of sipp's messages to our UA bypassed it, nor our ACKs and BYEs
    assert relay.stats.dropped > 5 * calls, relay.stats
    for call_id in call_ids:
        forwarded = [line for line in relay.stats.forwarded_lines if f"[{call_id}]" in line]
        assert any(line.startswith("up ACK ") for line in forwarded), forwarded
        assert any(line.startswith("up BYE ") for line in forwarded), forwarded
        assert any(line.startswith("down SIP/2.0 200 ") and line.endswith(" BYE") for line in forwarded)


@pytest.mark.parametrize("loss", [0.0, pytest.param(0.2, marks=pytest.mark.slow)])
async def test_sipp_uac_calls_our_ua(sipp_tool: str, workdir: Path, stack: Stack, loss: float) -> None:
    """sipp's UAC calls our UA 10 times, directly or through the lossy relay: there every message of the
    call crosses it, both ways (sipp sends every request to the relay; the relay rewrites Contacts, so
    our UA would send its own in-dialog requests to it too), with 20 % seeded loss and the first copy of
    every INVITE, 200, ACK and BYE lost. Our UA must resend its 200 until an ACK (or the BYE) comes, absorb
    INVITE and BYE retransmissions and answer each BYE copy; sipp (uac_txn.xml: the BYE ends its call only
    with the BYE's own 200) resends the ACK for each 200 and the BYE until answered."""
    ua, answered = answering_ua(stack, "sip:service@127.0.0.1")
    host, port = stack.local_address("udp")
    drop = _first_copy_lost if loss else None
    async with LossyRelay((host, port), loss=loss, seed=3261, drop_first=drop, rewrite_contact=True) as relay:
        rhost, rport = relay.address if loss else (host, port)
        caller = uac(
            workdir,
            f"{rhost}:{rport}",
            calls=10,
            rate=5,
            port=free_port(),
            timeout_s=60,
            scenario=UAC_TXN,
        )
        with caller:
            await _wait_sipp(caller, 90)
            result = caller.result()
        try:
            ended = await asyncio.wait_for(asyncio.gather(*(call.wait_ended() for call in answered)), 10)
        finally:
            await ua.close()
    assert (result.successful, result.failed) == (10, 0), f"{result}\n{relay.stats}"
    assert len(answered) == 10
    assert ended == ["bye received"] * 10, ended  # our UA saw every call's BYE, not just sipp its 200
    if loss:
        call_ids = [call.request.call_id for call in answered]
        missing = _losses_of_every_call(relay, call_ids, caller="up")
        assert missing == [], "\n".join([*missing, str(relay.stats)])
        assert relay.stats.dropped > 5 * 10, relay.stats


async def test_sipp_uac_calls_our_ua_over_tcp(sipp_tool: str, workdir: Path, stack: Stack) -> None:
    """sipp's UAC calls our UA over one TCP connection (``-t t1``): answers go back on the connection."""
    ua, answered = answering_ua(stack, "sip:service@127.0.0.1")
    host, port = stack.local_address("tcp")
    caller = uac(workdir, f"{host}:{port}", calls=10, rate=5, port=free_port(), transport="t1", timeout_s=60)
    with caller:
        await _wait_sipp(caller, 90)
        result = caller.result()
    await ua.close()
    assert (result.successful, result.failed) == (10, 0), str(result)
    assert len(answered) == 10


async def test_our_ua_registers_at_kamailio_and_calls_through_it(
    sipp_tool: str, kamailio_tool: str, workdir: Path, stack: Stack
) -> None:
    """REGISTER with digest (401, qop=auth) at Kamailio; INVITE through Kamailio, challenged with 407;
    the call reaches a sipp UAS. Then sipp calls the AOR at Kamailio, which finds our contact in its
    location table: proof the registration was stored where Kamailio looks it up."""
    kport, uport = free_port(), free_port()
    config = registrar_config("127.0.0.1", kport, realm="kam.example", users={"alice": "wonderland"})
    with Kamailio(config, workdir, kport) as kamailio, uas(workdir, uport, extra=["-m", "3"]) as callee:
        ua, answered = answering_ua(
            stack, "sip:alice@kam.example", outbound=f"127.0.0.1:{kport}", password="wonderland"
        )
        # the password is given to register() too: UserAgent(password=...) alone is not used for REGISTER
        reg = await ua.register(f"sip:127.0.0.1:{kport}", expires=300, password="wonderland")
        assert reg.status == 200, f"{reg.status} {reg.reason}\n{kamailio.log_tail()}"
        await _place_calls(ua, f"sip:service@127.0.0.1:{uport}", 3)
        await _wait_sipp(callee, 20)

        caller = uac(
            workdir,
            f"127.0.0.1:{kport}",
            calls=3,
            rate=3,
            port=free_port(),
            scenario=UAC_DOMAIN,
            service="alice",
            extra=["-key", "domain", "kam.example"],
            timeout_s=40,
        )
        with caller:
            await _wait_sipp(caller, 60)
            result = caller.result()
        await ua.unregister()
        await ua.close()
    assert callee.proc is not None and callee.proc.returncode == 0, _uas_counts(callee)
    assert (result.successful, result.failed) == (3, 0), f"{result}\n{kamailio.log_tail()}"
    assert len(answered) == 3


async def test_wrong_password_is_refused_by_kamailio(kamailio_tool: str, workdir: Path, stack: Stack) -> None:
    kport = free_port()
    config = registrar_config("127.0.0.1", kport, realm="kam.example", users={"alice": "wonderland"})
    with Kamailio(config, workdir, kport):
        ua = UserAgent(stack, "sip:alice@kam.example", password="not-it")
        from p2psip.useragent import CallFailed

        with pytest.raises(CallFailed) as failure:
            await ua.register(f"sip:127.0.0.1:{kport}", expires=300, password="not-it", refresh=False)
        assert failure.value.status in (401, 403)
        await ua.close()
