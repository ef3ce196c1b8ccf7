"""Our UserAgent against real peers: sipp as callee and as caller, with and without seeded packet loss
(the lossy relay stands between them), and Kamailio as registrar (digest auth) and proxy.

A call passes only when both sides say so: our UA sees the 200 and the BYE's 200, and sipp counts the call
successful (its UAS: INVITE answered, ACK and BYE received; its UAC: the whole exchange as scripted).
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port

from p2psip.stack import Stack
from p2psip.useragent import UserAgent

from .kamailio import Kamailio, registrar_config
from .relay import LossyRelay
from .sipp import UAC_DOMAIN, Sipp, uac, uas
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


@pytest.mark.slow
async def test_our_ua_calls_sipp_uas_through_loss(sipp_tool: str, workdir: Path, stack: Stack) -> None:
    """20 % loss both ways, plus the first copy of every INVITE and every 200 lost: the INVITE client
    transaction's retransmissions (Timer A) and sipp's 200 retransmissions must get every call through."""
    uport = free_port()
    with uas(workdir, uport, scenario=None, extra=["-m", "5"]) as callee:
        drop = lambda data: data.startswith((b"INVITE ", b"SIP/2.0 200"))  # noqa: E731
        async with LossyRelay(("127.0.0.1", uport), loss=0.2, seed=4475, drop_first=drop) as relay:
            ua = UserAgent(stack, "sip:alice@127.0.0.1")
            host, port = relay.address
            await _place_calls(ua, f"sip:service@{host}:{port}", 5)
            await ua.close()
        await _wait_sipp(callee, 20)
    assert relay.stats.dropped >= 10, relay.stats
    assert any(line.startswith("up INVITE") for line in relay.stats.dropped_lines)
    assert any(line.startswith("down SIP/2.0 200") for line in relay.stats.dropped_lines)
    assert callee.proc is not None and callee.proc.returncode == 0, _uas_counts(callee)


@pytest.mark.parametrize("loss", [0.0, pytest.param(0.2, marks=pytest.mark.slow)])
async def test_sipp_uac_calls_our_ua(sipp_tool: str, workdir: Path, stack: Stack, loss: float) -> None:
    """sipp's UAC calls our UA 10 times (directly, or through the lossy relay: the first copy of every
    INVITE, 200 and BYE is lost too, so both sides' retransmissions are exercised)."""
    ua, answered = answering_ua(stack, "sip:service@127.0.0.1")
    host, port = stack.local_address("udp")
    drop = lambda data: data.startswith((b"INVITE ", b"SIP/2.0 200", b"BYE "))  # noqa: E731
    async with LossyRelay((host, port), loss=loss, seed=3261, drop_first=drop if loss else None) as relay:
        rhost, rport = relay.address if loss else (host, port)
        caller = uac(workdir, f"{rhost}:{rport}", calls=10, rate=5, port=free_port(), timeout_s=60)
        with caller:
            await _wait_sipp(caller, 90)
            result = caller.result()
    await ua.close()
    assert (result.successful, result.failed) == (10, 0), str(result)
    assert len(answered) == 10
    if loss:
        assert relay.stats.dropped >= 30, relay.stats


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
