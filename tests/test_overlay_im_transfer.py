"""Instant messages and transfer between our UserAgents through a 3-peer overlay: MESSAGE forks to every
registered device (also from ``p2psip message``), 404 when nobody is registered, a failure when nobody
answers (480); offline messages (stored sealed in the DHT under H('inbox:' + AOR) while nobody is
registered: 202, delivered and removed on the next registration); a blind and an attended transfer of a
call placed through the overlay, also from ``p2psip call --transfer-to``; a SUBSCRIBE forked to two
devices makes two subscriptions. (Presence through the overlay: tests/test_presence_agent.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from peer_interop.helpers import start_overlay, stop_overlay

from overlay.storage import DROP_PREFIX, INBOX_KEY_ID
from p2psip.inbox import SENDER_HEADER, UNVERIFIED, inbox_name
from p2psip.peer import Peer, add_account
from p2psip.stack import Stack
from p2psip.subscription import SubscribePolicy, SubState
from p2psip.uaevents import IncomingSubscription
from p2psip.useragent import IncomingCall, UserAgent

ROOT = Path(__file__).resolve().parents[1]
BOB = "sip:bob@p2p.example"
SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def via(peer: Peer) -> str:
    host, port = peer.sip_address()
    return f"{host}:{port}"


@pytest.fixture
async def overlay(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_overlay(3, tmp_path, settle_timeout=30)
    try:
        yield peers
    finally:
        await stop_overlay(peers)


@pytest.fixture
async def phones(overlay: list[Peer]) -> AsyncIterator[dict[str, UserAgent]]:
    """alice at peer 0, bob's desk at peer 1 and his mobile at peer 2 (his user key copied there),
    carol at peer 2; everyone but alice registered."""
    made: dict[str, UserAgent] = {}
    stacks: list[Stack] = []
    try:
        for name, aor, peer in (
            ("alice", "sip:alice@p2p.example", 0),
            ("desk", BOB, 1),
            ("mobile", BOB, 2),
            ("carol", "sip:carol@p2p.example", 2),
        ):
            stack = await Stack.start(["udp:127.0.0.1:0"])
            stacks.append(stack)
            made[name] = UserAgent(stack, aor, outbound=via(overlay[peer]))
        for name, peer in (("desk", 1), ("mobile", 2), ("carol", 2)):
            if name == "mobile":  # a second device of bob at another peer: his user key goes there too
                target = overlay[2].users.path_for(BOB)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(overlay[1].users.export(BOB), target)
            response = await made[name].register(f"sip:{via(overlay[peer])}", expires=300, refresh=False)
            assert response.status == 200
        yield made
    finally:
        for ua in made.values():
            await ua.close()
        for stack in stacks:
            await stack.close()


async def test_message_forks_to_every_device(overlay: list[Peer], phones: dict[str, UserAgent]) -> None:
    response = await phones["alice"].message(BOB, "lunch?")
    assert response.status == 200
    for device in ("desk", "mobile"):
        got = await asyncio.wait_for(phones[device].messages.get(), 10)
        assert got.body == b"lunch?" and got.from_.uri.user == "alice"
    assert (await phones["alice"].message("sip:nobody@p2p.example", "hello?")).status == 404


async def test_a_subscribe_forks_to_every_device(overlay: list[Peer], phones: dict[str, UserAgent]) -> None:
    """RFC 6665 forking through the overlay: a SUBSCRIBE for a package no peer serves itself (RFC 4235
    ``dialog`` here; ``presence`` and ``message-summary`` go to the AOR's agent instead) is proxied to both
    of bob's devices, at two peers; the watcher gets one final response but a NOTIFY from each, and holds
    one subscription per device (its own dialog); unsubscribing ends both."""

    def serve(name: str) -> Callable[[IncomingSubscription], None]:
        return lambda incoming: incoming.accept(name.encode(), "text/plain")

    for device in ("desk", "mobile"):
        phones[device].events.policy = SubscribePolicy(frozenset({"dialog"}))
        phones[device].events.on_subscribe = serve(device)
    sub = await phones["alice"].subscribe(BOB, "dialog", body_check=lambda r: None)
    notes = [await sub.next(10) for _ in range(2)]
    assert {n.body for n in notes} == {b"desk", b"mobile"}
    assert len({n.request.from_.tag for n in notes}) == 2 and len(sub.active) == 2
    await sub.unsubscribe()
    finals = [await sub.next(10) for _ in range(2)]  # each device's final NOTIFY
    assert {n.request.from_.tag for n in finals} == {n.request.from_.tag for n in notes}
    assert all(n.state.state is SubState.TERMINATED for n in finals)
    await asyncio.wait_for(sub.ended.wait(), 10)


async def test_message_nobody_answers_gets_480(overlay: list[Peer], phones: dict[str, UserAgent]) -> None:
    for device in ("desk", "mobile"):
        await phones[device].stack.close()  # registered, but gone without a word
    # the peers give up on their silent branches at 3/4 of Timer F and answer 480 before alice's own
    # Timer F would turn the silence into a 408
    response = await phones["alice"].message(BOB, "anyone?", timeout=60)
    assert response.status == 480


async def test_cli_message(overlay: list[Peer], phones: dict[str, UserAgent]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "p2psip.cli", "message", BOB, "from the shell", "--via", via(overlay[0])]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(": 200 OK")
    for device in ("desk", "mobile"):
        assert (await asyncio.wait_for(phones[device].messages.get(), 10)).body == b"from the shell"
    cmd[4] = "sip:nobody@p2p.example"
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and ": 404 " in done.stdout


def answer_all(ua: UserAgent) -> list[IncomingCall]:
    calls: list[IncomingCall] = []

    def on_call(call: IncomingCall) -> None:
        calls.append(call)
        call.accept(SDP)

    ua.on_call = on_call
    return calls


async def test_blind_and_attended_transfer_through_the_overlay(
    overlay: list[Peer], phones: dict[str, UserAgent]
) -> None:
    alice, carol = phones["alice"], phones["carol"]
    await phones["mobile"].unregister()
    desk_calls = answer_all(phones["desk"])
    carol_calls = answer_all(carol)
    call = await alice.call(BOB, body=SDP, timeout=20)
    assert call.response is not None and call.response.get_all("Record-Route")
    frag = await call.transfer("sip:carol@p2p.example", timeout=30)
    assert frag is not None and frag.status == 200 and call.state == "terminated"
    assert await desk_calls[0].wait_ended(10) == "bye received"
    bob_to_carol = await asyncio.wait_for(phones["desk"].events.referred.get(), 10)
    assert bob_to_carol.state == "confirmed" and len(carol_calls) == 1
    await bob_to_carol.bye()
    # attended: alice talks to bob and to carol, then joins them (INVITE with Replaces via the overlay)
    to_bob = await alice.call(BOB, body=SDP, timeout=20)
    to_carol = await alice.call("sip:carol@p2p.example", body=SDP, timeout=20)
    frag = await to_bob.transfer(to_carol, timeout=30)
    assert frag is not None and frag.status == 200
    assert carol_calls[-1].replaces is carol_calls[1]
    assert await to_carol.wait_ended(10) == "bye received"


async def test_cli_call_transfer_to(overlay: list[Peer], phones: dict[str, UserAgent]) -> None:
    await phones["mobile"].unregister()
    desk_calls = answer_all(phones["desk"])
    carol_calls = answer_all(phones["carol"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "p2psip.cli", "call", BOB, "--via", via(overlay[0]), "--duration", "0.2"]
    cmd += ["--transfer-to", "sip:carol@p2p.example", "--json", "--timeout", "30"]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["answered"] and result["transfer_status"] == 200 and "bye_status" not in result
    assert await desk_calls[0].wait_ended(10) == "bye received"  # the CLI hung up after the transfer
    bob_to_carol = await asyncio.wait_for(phones["desk"].events.referred.get(), 10)
    await bob_to_carol.answered(10)
    assert len(carol_calls) == 1 and carol_calls[0].caller.uri.user == "bob"
    await bob_to_carol.bye()


async def until(check: object, timeout: float = 15.0) -> None:
    """Wait (bounded) for ``check()`` (a coroutine function) to be true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_message_for_nobody_registered_is_stored_and_delivered_on_registration(
    overlay: list[Peer],
) -> None:
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    alice = UserAgent(stacks[0], "sip:alice@p2p.example", outbound=via(overlay[0]))
    bob = UserAgent(stacks[1], BOB, outbound=via(overlay[1]))
    # offline messages are for accounts (p2psip user add): an AOR anyone registers on first use gets none
    password = add_account(overlay[1].config.data_dir, BOB)
    try:
        registrar = f"sip:{via(overlay[1])}"
        carol = UserAgent(stacks[0], "sip:carol@p2p.example")  # on first use, no account
        assert (await carol.register(registrar, expires=300, refresh=False)).status == 200
        assert (await carol.register(registrar, expires=0, refresh=False)).status == 200
        assert (await alice.message("sip:carol@p2p.example", "hello?")).status == 404
        # no inbox yet (bob never registered): 404 as before
        assert (await alice.message(BOB, "hello?")).status == 404

        async def register(expires: int) -> int:
            response = await bob.register(
                registrar, expires=expires, refresh=False, username="bob", password=password
            )
            return response.status

        assert await register(300) == 200

        async def published() -> bool:
            entries = await overlay[2].node.get(inbox_name(BOB))
            return any(e.entry_id == INBOX_KEY_ID and len(e.value) == 32 for e in entries)

        await until(published)
        assert await register(0) == 200

        # alice is registered nowhere: her From proves nothing, the letter says "unverified"; she writes a
        # P-P2PSIP-Sender of her own too, which the peer removes
        forged = [(SENDER_HEADER, f"vouched;node={overlay[0].node.identity.node_id:032x}")]
        response = await alice.request(
            "MESSAGE", BOB, body=b"are you there?", content_type="text/plain", headers=forged
        )
        assert response.status == 202
        assert overlay[0].counters["messages_stored"] == 1
        drops = [e for e in await overlay[2].node.get(inbox_name(BOB)) if e.entry_id[:1] == DROP_PREFIX]
        assert len(drops) == 1 and b"are you there?" not in drops[0].value  # sealed, not readable
        # registered at overlay[0], alice is vouched for by it: the letter names its NodeId
        assert (await alice.register(f"sip:{via(overlay[0])}", expires=300, refresh=False)).status == 200
        assert (await alice.message(BOB, "it's really me")).status == 202
        assert bob.messages.empty()
        # the key sweep keeps an account's user key and inbox key (else the next registration could
        # neither open nor remove what waits for him)
        overlay[1].sweep_user_keys(time.time() + 10 * 86400)
        assert overlay[1].users.exists(BOB) and overlay[1].users.claim(BOB) is not None

        assert await register(300) == 200
        got = await asyncio.wait_for(bob.messages.get(), 15)
        assert got.body == b"are you there?" and got.from_.uri.user == "alice"
        assert got.get("Date") is not None
        assert got.get(SENDER_HEADER) == "unverified" and got.from_.display == UNVERIFIED
        vouched = await asyncio.wait_for(bob.messages.get(), 15)
        assert vouched.body == b"it's really me" and vouched.from_.display is None
        assert vouched.get(SENDER_HEADER) == f"vouched;node={overlay[0].node.identity.node_id:032x}"

        async def emptied() -> bool:
            entries = await overlay[2].node.get(inbox_name(BOB))
            return not any(e.entry_id[:1] == DROP_PREFIX for e in entries)

        await until(emptied)  # removed by the owner once delivered
        assert overlay[1].counters["messages_delivered"] == 2
        # bob is registered again: messages go straight to him (a P-P2PSIP-Sender written by the sender
        # does not reach him)
        response = await alice.request(
            "MESSAGE", BOB, body=b"lunch?", content_type="text/plain", headers=forged
        )
        assert response.status == 200
        live = await asyncio.wait_for(bob.messages.get(), 10)
        assert live.body == b"lunch?" and live.get(SENDER_HEADER) is None
    finally:
        for ua in (alice, bob):
            await ua.close()
        for stack in stacks:
            await stack.close()
