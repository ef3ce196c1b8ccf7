"""sipp against our UserAgent for SUBSCRIBE/NOTIFY and REFER (scenarios in tests/interop/scenarios/):
a presence watcher (200, NOTIFY with PIDF, unsubscribe, final NOTIFY), the refusals (489 with
Allow-Events, 423 with Min-Expires, 481 for a NOTIFY of no subscription), a watcher that never refreshes
(NOTIFY terminated;reason=timeout at expiry), REFER errors in a call (400, 403, 481) and a REFER our UA
follows (202, sipfrag NOTIFYs 100 then 200). Each scenario counts as one successful sipp call only when
every message came in order with the checked contents (sipp's ``check_it`` regexps)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port, require_tool

from p2psip import pidf
from p2psip.stack import Stack
from p2psip.subscription import SubscribePolicy
from p2psip.uaevents import IncomingSubscription
from p2psip.useragent import IncomingCall, UserAgent

from .sipp import SCENARIOS, Sipp, uac
from .ua import SDP

pytestmark = pytest.mark.interop


@pytest.fixture
async def bob() -> AsyncIterator[UserAgent]:
    stack = await Stack.start(["udp:127.0.0.1:0"])
    ua = UserAgent(stack, "sip:bob@127.0.0.1", events=("presence",))
    ua.events.policy = SubscribePolicy(frozenset({"presence"}), min_expires=2)

    def on_subscribe(sub: IncomingSubscription) -> None:
        doc = pidf.Presence("sip:bob@127.0.0.1", [pidf.PresenceTuple("t1", "open")])
        sub.accept(doc.compose(), pidf.CONTENT_TYPE)

    def on_call(call: IncomingCall) -> None:
        call.accept(SDP)

    ua.events.on_subscribe = on_subscribe
    ua.on_call = on_call
    try:
        yield ua
    finally:
        await ua.close()
        await stack.close()


async def run_scenario(tmp_path: Path, ua: UserAgent, name: str, *extra: str) -> Sipp:
    require_tool("sipp")
    host, port = ua.stack.local_address("udp")
    sipp = uac(
        tmp_path,
        f"{host}:{port}",
        calls=1,
        rate=1,
        port=free_port(),
        scenario=SCENARIOS / f"{name}.xml",
        service="bob",
        name=name,
        timeout_s=30,
        extra=extra,
    )
    assert sipp.proc is not None
    try:
        await asyncio.to_thread(sipp.proc.wait, 40)
    except subprocess.TimeoutExpired:
        sipp.stop()
    return sipp


@pytest.mark.parametrize(
    "name", ["subscribe_presence", "subscribe_errors", "subscribe_expiry", "refer_errors"]
)
async def test_scenario(tmp_path: Path, bob: UserAgent, name: str) -> None:
    sipp = await run_scenario(tmp_path, bob, name)
    result = sipp.result()
    assert result.successful == 1 and result.failed == 0, result
    assert not bob.events.notifiers  # every subscription we served has ended


async def test_sipp_transfers_a_call_to_our_ua(tmp_path: Path, bob: UserAgent) -> None:
    stack = await Stack.start(["udp:127.0.0.1:0"])
    carol = UserAgent(stack, "sip:carol@127.0.0.1")
    answered: list[IncomingCall] = []

    def on_call(call: IncomingCall) -> None:
        answered.append(call)
        call.accept(SDP)

    carol.on_call = on_call
    host, port = stack.local_address("udp")
    try:
        sipp = await run_scenario(tmp_path, bob, "refer_follow", "-key", "target", f"sip:carol@{host}:{port}")
        result = sipp.result()
        assert result.successful == 1 and result.failed == 0, result
        new = await asyncio.wait_for(bob.events.referred.get(), 5)
        assert new.state == "confirmed" and len(answered) == 1
        assert answered[0].request.get("Referred-By") is not None
        await new.bye()
    finally:
        await carol.close()
        await stack.close()
