"""UserAgent <-> UserAgent on loopback: SUBSCRIBE/NOTIFY (presence with PIDF, fetch, 489, 481, a bad
body gets 400 without harm, refresh and expiry) and transfer (REFER blind and attended with Replaces,
norefersub, a failing target, a bad REFER)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from p2psip import pidf, sipfrag
from p2psip.message import Request
from p2psip.refer import Replaces
from p2psip.stack import Stack
from p2psip.subscription import SubscribePolicy, SubState
from p2psip.uaevents import IncomingSubscription, OutgoingSubscription
from p2psip.useragent import CallFailed, IncomingCall, UserAgent

SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def uri_of(ua: UserAgent) -> str:
    host, port = ua.stack.local_address("udp")
    return f"sip:{ua.aor.user}@{host}:{port}"


def doc(ua: UserAgent, basic: str, note: str = "") -> bytes:
    return pidf.Presence(str(ua.aor), [pidf.PresenceTuple("t1", basic)], [note] if note else []).compose()


def check_pidf(request: Request) -> None:
    pidf.parse(request.body)


@pytest.fixture
async def trio() -> AsyncIterator[tuple[UserAgent, UserAgent, UserAgent]]:
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(3)]
    uas = [
        UserAgent(s, f"sip:{name}@127.0.0.1")
        for s, name in zip(stacks, ("alice", "bob", "carol"), strict=True)
    ]
    try:
        yield uas[0], uas[1], uas[2]
    finally:
        for ua in uas:
            await ua.close()
        for s in stacks:
            await s.close()


def serve_presence(ua: UserAgent, watchers: list[IncomingSubscription], basic: str = "open") -> None:
    ua.events.policy = SubscribePolicy(frozenset({"presence"}), min_expires=1)

    def on_subscribe(sub: IncomingSubscription) -> None:
        watchers.append(sub)
        sub.accept(doc(ua, basic), pidf.CONTENT_TYPE)

    ua.events.on_subscribe = on_subscribe


async def test_presence_subscribe_notify_unsubscribe(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, _ = trio
    watchers: list[IncomingSubscription] = []
    serve_presence(bob, watchers)
    sub = await alice.subscribe(uri_of(bob), "presence", accept=pidf.CONTENT_TYPE, body_check=check_pidf)
    first = await sub.next(5)
    assert first.state.state is SubState.ACTIVE and pidf.parse(first.body).basic == "open"
    assert len(watchers) == 1 and watchers[0].watcher.user == "alice"
    response = await watchers[0].notify(doc(bob, "closed", "gone fishing"), pidf.CONTENT_TYPE)
    assert response is not None and response.status == 200
    second = await sub.next(5)
    assert pidf.parse(second.body).basic == "closed" and pidf.parse(second.body).notes == ["gone fishing"]
    await sub.unsubscribe()
    last = await sub.next(5)
    assert last.state.state is SubState.TERMINATED and last.state.reason == "timeout"
    await asyncio.wait_for(watchers[0].ended.wait(), 5)
    await asyncio.wait_for(sub.ended.wait(), 5)
    assert not alice.events.subscribers and not bob.events.notifiers


async def test_unknown_package_is_489_and_fetch_is_one_notify(
    trio: tuple[UserAgent, UserAgent, UserAgent],
) -> None:
    alice, bob, _ = trio
    with pytest.raises(CallFailed) as info:
        await alice.subscribe(uri_of(bob), "presence")  # bob serves no package at all
    assert info.value.status == 489
    watchers: list[IncomingSubscription] = []
    serve_presence(bob, watchers)
    with pytest.raises(CallFailed) as info:
        await alice.subscribe(uri_of(bob), "dialog")
    assert info.value.status == 489 and info.value.response is not None
    assert info.value.response.get("Allow-Events") == "presence"
    fetch = await alice.subscribe(uri_of(bob), "presence", expires=0, body_check=check_pidf)
    note = await fetch.next(5)
    assert note.state.state is SubState.TERMINATED and pidf.parse(note.body).basic == "open"
    await asyncio.wait_for(fetch.ended.wait(), 5)


async def test_malformed_pidf_gets_400_and_kills_no_subscription(
    trio: tuple[UserAgent, UserAgent, UserAgent],
) -> None:
    alice, bob, carol = trio
    watchers: list[IncomingSubscription] = []
    serve_presence(bob, watchers)
    sub_a = await alice.subscribe(uri_of(bob), "presence", body_check=check_pidf)
    sub_c = await carol.subscribe(uri_of(bob), "presence", body_check=check_pidf)
    await sub_a.next(5)
    await sub_c.next(5)
    bad = b'<!DOCTYPE x [<!ENTITY a "b">]><presence xmlns="urn:ietf:params:xml:ns:pidf" entity="&a;"/>'
    for watcher in watchers:
        response = await watcher.notify(bad, pidf.CONTENT_TYPE)
        assert response is not None and response.status == 400
    for watcher in watchers:
        response = await watcher.notify(doc(bob, "closed"), pidf.CONTENT_TYPE)
        assert response is not None and response.status == 200
    for sub in (sub_a, sub_c):
        note = await sub.next(5)
        assert pidf.parse(note.body).basic == "closed" and not sub.ended.is_set()
        assert sub.active and sub.active[0].state is SubState.ACTIVE


async def test_notify_for_no_subscription_is_481(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, _ = trio
    response = await alice.request(
        "NOTIFY", uri_of(bob), headers=[("Event", "presence"), ("Subscription-State", "active")]
    )
    assert response.status == 481
    watchers: list[IncomingSubscription] = []
    serve_presence(bob, watchers)
    sub = await alice.subscribe(uri_of(bob), "presence")
    await sub.next(5)
    # a NOTIFY in the subscription's dialog but for another package: 489, and the subscription stays
    live = sub.active[0]
    stray = live.dialog.create_request(
        "NOTIFY", headers=[("Event", "dialog"), ("Subscription-State", "active")]
    )
    stray.set("From", str(watchers[0].core.dialog.local_uri) + f";tag={live.dialog.remote_tag}")
    stray.set("To", str(watchers[0].core.dialog.remote_uri) + f";tag={live.dialog.local_tag}")
    stray.uri = alice.stack.local_uri("udp", user="alice")
    response = await bob._request(stray)
    assert response.status == 489 and not live.terminated


async def test_refresh_keeps_it_and_a_silent_watcher_times_out(
    trio: tuple[UserAgent, UserAgent, UserAgent],
) -> None:
    alice, bob, carol = trio
    watchers: list[IncomingSubscription] = []
    serve_presence(bob, watchers)
    kept = await alice.subscribe(uri_of(bob), "presence", expires=2)
    silent = await carol.subscribe(uri_of(bob), "presence", expires=2)
    await kept.next(5)
    await silent.next(5)
    assert silent._timer is not None
    silent._timer.cancel()  # carol never refreshes
    silent._timer = None
    ended = await silent.next(6)
    assert ended.state.state is SubState.TERMINATED and ended.state.reason == "timeout"
    # alice refreshed before the 2 s ran out: each refresh brings a NOTIFY, and she is still active
    refreshed = await kept.next(5)
    assert refreshed.state.state is SubState.ACTIVE and not kept.ended.is_set()


def answering(ua: UserAgent, status: int = 200) -> list[IncomingCall]:
    calls: list[IncomingCall] = []

    def on_call(call: IncomingCall) -> None:
        calls.append(call)
        if status == 200:
            call.accept(SDP)
        else:
            call.reject(status)

    ua.on_call = on_call
    return calls


async def test_blind_transfer(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, carol = trio
    bob_calls = answering(bob)
    carol_calls = answering(carol)
    call = await alice.call(uri_of(bob), body=SDP, timeout=10)
    frag = await call.transfer(uri_of(carol), timeout=20)
    assert frag is not None and frag.status == 200
    assert call.state == "terminated" and call.end_reason == "bye sent"
    assert await bob_calls[0].wait_ended(5) == "bye received"
    new = await asyncio.wait_for(bob.events.referred.get(), 5)
    assert new.state == "confirmed" and new.pending.request.get("Referred-By") is not None
    assert len(carol_calls) == 1 and carol_calls[0].request.body == SDP  # bob offered his session again
    await new.bye()


async def test_transfer_without_subscription_norefersub(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, carol = trio
    answering(bob)
    carol_calls = answering(carol)
    call = await alice.call(uri_of(bob), body=SDP, timeout=10)
    assert await call.transfer(uri_of(carol), refer_sub=False) is None
    new = await asyncio.wait_for(bob.events.referred.get(), 5)
    await new.answered(10)
    assert len(carol_calls) == 1 and call.state == "terminated"
    assert not alice.events.refer_subscribers  # nothing to watch


async def test_transfer_to_a_busy_target_keeps_the_call(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, carol = trio
    answering(bob)
    answering(carol, 486)
    call = await alice.call(uri_of(bob), body=SDP, timeout=10)
    frag = await call.transfer(uri_of(carol), timeout=20)
    assert frag is not None and frag.status == 486 and not frag.success
    assert call.state == "confirmed"
    assert (await call.bye()).status == 200


async def test_attended_transfer_with_replaces(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, carol = trio
    answering(bob)
    carol_calls = answering(carol)
    to_bob = await alice.call(uri_of(bob), body=SDP, timeout=10)
    to_carol = await alice.call(uri_of(carol), body=SDP, timeout=10)
    frag = await to_bob.transfer(to_carol, timeout=20)
    assert frag is not None and frag.status == 200
    assert len(carol_calls) == 2
    replacing = carol_calls[1]
    assert replacing.replaces is carol_calls[0]
    assert to_carol.dialog is not None
    assert Replaces.parse(replacing.request.get("Replaces") or "").call_id == to_carol.dialog.call_id
    # carol hung up the call she had with alice once bob's call replaced it; alice hung up bob
    assert await to_carol.wait_ended(5) == "bye received"
    assert to_bob.state == "terminated"
    new = await asyncio.wait_for(bob.events.referred.get(), 5)
    assert new.state == "confirmed"


async def test_bad_replaces_and_bad_refer(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, carol = trio
    answering(bob)
    answering(carol)
    with pytest.raises(CallFailed) as info:
        await alice.call(
            uri_of(carol), body=SDP, headers=[("Replaces", "nosuch@x;to-tag=a;from-tag=b")], timeout=10
        )
    assert info.value.status == 481
    call = await alice.call(uri_of(bob), body=SDP, timeout=10)
    assert (await call.send("REFER")).status == 400  # no Refer-To
    assert (await call.send("REFER", headers=[("Refer-To", "<tel:+123>")])).status == 403
    assert (await call.send("REFER", headers=[("Refer-To", "<sip:x@y?Replaces=junk>")])).status == 400
    response = await alice.request("REFER", uri_of(bob), headers=[("Refer-To", f"<{uri_of(carol)}>")])
    assert response.status == 403  # REFER outside a call
    bob.accept_transfers = False
    assert (await call.send("REFER", headers=[("Refer-To", f"<{uri_of(carol)}>")])).status == 603
    assert call.state == "confirmed"
    await call.bye()


async def test_sipfrag_content_type_on_refer_notifies(trio: tuple[UserAgent, UserAgent, UserAgent]) -> None:
    alice, bob, carol = trio
    answering(bob)
    answering(carol)
    call = await alice.call(uri_of(bob), body=SDP, timeout=10)
    seen: list[Request] = []
    original = alice.events.expect_refer

    def spy(refer: Request) -> OutgoingSubscription:
        sub = original(refer)
        sub.on_notify = lambda note: seen.append(note.request)
        return sub

    alice.events.expect_refer = spy  # type: ignore[method-assign]
    await call.transfer(uri_of(carol), timeout=20)
    assert [sipfrag.parse_status(r.body).status for r in seen] == [100, 200]
    assert all(r.get("Content-Type") == sipfrag.CONTENT_TYPE for r in seen)
    assert (seen[0].get("Subscription-State") or "").startswith("active")
    assert seen[-1].get("Subscription-State") == "terminated;reason=noresource"
