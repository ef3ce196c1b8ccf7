"""``event.action.transfer``: the article's per-user script in its complete form, with
``transfer_to_voicemail`` written as a transfer, through a 3-peer overlay with sipp UASes as jones and his
voicemail. A caller from example.com is proxied to jones; a caller from another domain takes the ``else``:
the peer answers (SDP ``a=inactive``), REFERs the caller to voicemail, the caller (our UserAgent) calls
it and reports 200 in a sipfrag NOTIFY, and the peer hangs up. A caller whose Allow lacks REFER gets a 302
to voicemail instead. baresip 1.0 as the caller follows the REFER too. Also the stand-alone script server
(no overlay) with our UAs at both ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from peer_support import wait_until_settled
from test_media_call import until
from test_sipapi_peer_scripts import register, start_peer
from test_sipapi_support import EXAMPLES

from p2psip import sdp
from p2psip.peer import Peer
from p2psip.stack import Stack
from p2psip.useragent import CallFailed, IncomingCall, UserAgent
from sipapi.scripts import Scripting, install

pytestmark = [pytest.mark.interop, pytest.mark.slow]

TRANSFER = """def transfer_to_voicemail(event):
    event.location = URI('sip:jones@voicemail.example.com')
    event.action.transfer()

"""


@pytest.fixture
async def three(tmp_path: Path) -> AsyncIterator[tuple[list[Peer], Path]]:
    a = await start_peer(tmp_path, "a")
    b = await start_peer(tmp_path, "b", join=a)
    c = await start_peer(tmp_path, "c", join=a)
    peers = [a, b, c]
    await wait_until_settled(peers, timeout=30)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    installed: list[Scripting] = [install(p, scripts=scripts, deadline=2.0, workers=2) for p in peers]
    try:
        yield peers, scripts
    finally:
        for scripting in installed:
            await scripting.close()
        for peer in peers:
            await peer.close(leave=False)


async def test_article_example_with_transfer_through_three_peers(
    three: tuple[list[Peer], Path], tmp_path: Path
) -> None:
    require_tool("sipp")
    from interop.sipp import uas

    (a, b, c), scripts = three
    (scripts / "jones@example.com.py").write_text(
        TRANSFER + (EXAMPLES / "scripting_proxy_then_voicemail.py").read_text()
    )
    ports = {name: free_port() for name in ("jones", "voicemail")}
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(3)]
    host, port = b.sip_address()
    carol, dave, erin = (
        UserAgent(stack, aor, outbound=f"{host}:{port}")
        for stack, aor in zip(
            stacks, ("sip:carol@example.com", "sip:dave@other.org", "sip:erin@other.org"), strict=True
        )
    )
    try:
        with uas(tmp_path, ports["jones"], name="jones"), uas(tmp_path, ports["voicemail"], name="voicemail"):
            vm = f"sip:jones@127.0.0.1:{ports['voicemail']}"
            assert await register(c, "sip:jones@voicemail.example.com", vm) == 200
            assert await register(a, "sip:jones@example.com", f"sip:jones@127.0.0.1:{ports['jones']}") == 200

            # a caller from example.com: proxied to jones
            call = await carol.call("sip:jones@example.com", timeout=20)
            assert call.response is not None and f":{ports['jones']}" in (call.response.get("Contact") or "")
            assert (await call.bye()).status == 200

            # a caller from elsewhere: transfer_to_voicemail -> the peer answers, then REFERs dave
            call = await dave.call("sip:jones@example.com", body=offer(), timeout=20)
            assert call.response is not None and call.response.status == 200
            answer = sdp.SessionDescription.parse(call.response.body)
            assert answer.media_direction(answer.media[0]) == "inactive"
            to_voicemail = await asyncio.wait_for(dave.events.referred.get(), 20)
            await to_voicemail.answered(20)
            assert to_voicemail.response is not None
            assert f":{ports['voicemail']}" in (to_voicemail.response.get("Contact") or "")
            assert to_voicemail.pending.request.get("Referred-By") is not None
            # dave reported 200 in a NOTIFY and the peer hung up the call it had answered
            assert await call.wait_ended(20) == "bye received"
            assert (await to_voicemail.bye()).status == 200

            # a SUBSCRIBE whose Event does not parse is the peer's to refuse (400), not a request for jones's
            # script (sent straight to jones's home peer, where the script runs)
            stacks.append(await Stack.start(["udp:127.0.0.1:0"]))
            home_host, home_port = a.sip_address()
            direct = UserAgent(stacks[-1], "sip:dave@other.org", outbound=f"{home_host}:{home_port}")
            bad = await direct.request(
                "SUBSCRIBE", "sip:jones@example.com", headers=[("Event", "pres ence"), ("Expires", "600")]
            )
            assert bad.status == 400 and "Event" in bad.reason, bad
            await direct.close()

            # a caller that takes no REFER: 302 to voicemail
            with pytest.raises(CallFailed) as failed:
                await erin.call(
                    "sip:jones@example.com", headers=[("Allow", "INVITE, ACK, CANCEL, BYE")], timeout=20
                )
            assert failed.value.status == 302 and failed.value.response is not None
            contacts = [str(x.uri) for x in failed.value.response.contacts]
            assert contacts == ["sip:jones@voicemail.example.com"]
    finally:
        for ua in (carol, dave, erin):
            await ua.close()
        for stack in stacks:
            await stack.close()


def offer() -> bytes:
    return bytes(sdp.make_offer("127.0.0.1", 40000))


async def test_script_server_transfer_between_our_uas(tmp_path: Path) -> None:
    """The stand-alone script server (sipapi.run's core) transfers too; the new call reaches our UA."""
    from sipapi.events import Event, EventTarget
    from sipapi.runtime import InProcessRunner, ScriptServerCore

    server_stack = await Stack.start(["udp:127.0.0.1:0"])
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    caller = UserAgent(stacks[0], "sip:caller@127.0.0.1")
    target = UserAgent(stacks[1], "sip:target@127.0.0.1")
    answered: list[IncomingCall] = []

    def on_call(incoming: IncomingCall) -> None:
        answered.append(incoming)
        incoming.accept(offer())

    target.on_call = on_call
    thost, tport = stacks[1].local_address("udp")
    basic = EventTarget()

    async def handler(event: Event) -> None:
        await event.action.transfer(f"sip:target@{thost}:{tport}")

    basic.addEventListener("incoming", handler)
    runner = InProcessRunner(basic)

    class Everything:
        def select(self, request: object) -> InProcessRunner:
            return runner

    core = ScriptServerCore(server_stack, Everything())
    shost, sport = server_stack.local_address("udp")
    try:
        call = await caller.call(f"sip:someone@{shost}:{sport}", body=offer(), timeout=10)
        new = await asyncio.wait_for(caller.events.referred.get(), 10)
        await new.answered(10)
        assert len(answered) == 1 and answered[0].caller.uri.user == "caller"
        assert await call.wait_ended(10) == "bye received"
        await until(lambda: not core.transfer_legs, 5)  # the server forgets the leg once its BYE is answered
        await new.bye()
    finally:
        await caller.close()
        await target.close()
        for stack in (server_stack, *stacks):
            await stack.close()


async def test_baresip_caller_follows_the_scripts_transfer(
    three: tuple[list[Peer], Path], tmp_path: Path
) -> None:
    """baresip 1.0 as the caller from another domain: the peer answers it, REFERs it to voicemail (our UA
    here, so the test sees the INVITE baresip sends), and hangs up its own leg."""
    require_tool("baresip")
    from peer_interop.test_presence_baresip import Phone

    (a, b, c), scripts = three
    (scripts / "jones@example.com.py").write_text(
        TRANSFER + (EXAMPLES / "scripting_proxy_then_voicemail.py").read_text()
    )
    stack = await Stack.start(["udp:127.0.0.1:0"])
    host, port = c.sip_address()
    voicemail = UserAgent(stack, "sip:jones@voicemail.example.com", outbound=f"{host}:{port}")
    reached: list[IncomingCall] = []

    def on_call(incoming: IncomingCall) -> None:
        reached.append(incoming)
        incoming.accept(offer())

    voicemail.on_call = on_call
    dave = None
    try:
        assert (await voicemail.register(f"sip:{host}:{port}", expires=300, refresh=False)).status == 200
        dave = Phone(tmp_path, "dave", b, watches=[])
        dave_aor = "sip:dave@p2p.example"  # not example.com: the script's else branch transfers him

        async def registered() -> None:
            while not await b.lookup_bindings(dave_aor):
                await asyncio.sleep(0.1)

        await asyncio.wait_for(registered(), 20)
        await dave.command("/dial sip:jones@example.com")

        async def called() -> None:
            while not reached:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(called(), 30)
        incoming = reached[0]
        assert incoming.caller.uri.user == "dave"
        # baresip 1.0 puts no Referred-By in the new INVITE; its log says it followed our REFER
        assert "transferring call" in dave.log_text() and "jones@voicemail.example.com" in dave.log_text()
        await asyncio.wait_for(incoming.confirmed.wait(), 10)
        await until(lambda: not any(p.core.transfer_legs for p in (a, b, c)), 20)  # the peer hung up
        await incoming.bye()
    except (AssertionError, TimeoutError) as exc:
        raise AssertionError(f"{exc!r}\n{dave.log_tail() if dave else ''}") from None
    finally:
        if dave is not None:
            dave.stop()
        await voicemail.close()
        await stack.close()
