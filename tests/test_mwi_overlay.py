# ruff: noqa: F401, F811  (three, the fixture of 3 scripted peers from test_sipapi_transfer, is a parameter here)
"""Message-waiting indication for a phone's *own* AOR through a 3-peer overlay (p2psip/mailbox.py).

jones has two phones (our UserAgents) registered at two peers; each SUBSCRIBEs to ``message-summary`` for
``sip:jones@example.com`` at its own peer. The peers' ``[voicemail]`` table names jones's voicemail, the
docs' voicemail example (docs/examples/media_voicemail.py, a process of its own) registered as
``sip:jones@voicemail.example.com`` at the third peer; the AOR's agent (its primary home peer) retargets
the SUBSCRIBEs there. A caller from another domain reaches the voicemail by the article's per-user script
(``transfer_to_voicemail`` written as a transfer), leaves a message, and both phones get
``Messages-Waiting: yes`` with the count; the message deleted, both get ``no``. Others may not subscribe
to jones's messages: a user registered at a peer (vouched as itself) and someone registered nowhere who
says it is jones both get 403; a user with no voicemail gets 404. The table is read from the config file.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from conftest import free_port
from test_call_audio_docs import Voicemail, check_summary
from test_sipapi_peer_scripts import register
from test_sipapi_support import EXAMPLES
from test_sipapi_transfer import TRANSFER, three

from p2psip import mwi, sdp
from p2psip.config import load_config
from p2psip.mailbox import Forbidden, MailboxPolicy, NoMailbox, Proxy, Retarget
from p2psip.media import ToneSource
from p2psip.media.sources import write_wav
from p2psip.peer import Peer
from p2psip.stack import Stack
from p2psip.subscription import SubState
from p2psip.uaevents import OutgoingSubscription
from p2psip.useragent import CallFailed, UserAgent

JONES = "sip:jones@example.com"
MAILBOX = "sip:jones@voicemail.example.com"
def test_policy_owner_retarget_and_refusals() -> None:
    policy = MailboxPolicy({JONES: MAILBOX})
    assert policy.decide(JONES, JONES, vouched=True) == Retarget(MAILBOX)
    assert policy.decide(JONES, JONES, vouched=False) == Forbidden(JONES)  # a From proves nothing
    assert policy.decide(JONES, "sip:carol@example.com", vouched=True) == Forbidden(JONES)
    # the voicemail's own address belongs to jones: his devices are proxied to it, nobody else
    assert policy.decide(MAILBOX, JONES, vouched=True) == Proxy()
    assert policy.decide(MAILBOX, MAILBOX, vouched=True) == Forbidden(JONES)
    assert policy.decide("sip:carol@example.com", "sip:carol@example.com", vouched=True) == NoMailbox()
    assert MailboxPolicy({JONES: JONES}).decide(JONES, JONES, vouched=True) == Proxy()  # no loop


def test_voicemail_table_in_the_config_file(tmp_path: Path) -> None:
    from p2psip.errors import ConfigError

    path = tmp_path / "peer.toml"
    path.write_text('[voicemail]\n"sip:Jones@Example.com;x=1" = "sip:jones@voicemail.example.com"\n')
    assert load_config(path).voicemail == {"sip:Jones@example.com": MAILBOX}
    for text, error in (
        ('[voicemail]\n"jones" = "sip:vm@x"', "not an address of record"),
        ('[voicemail]\n"sip:jones@x" = ["sip:vm@x"]', "a SIP URI string"),
        ('[voicemail]\n"sip:jones@x" = "tel:+1"', "not an address of record"),
        ("voicemail = 3", "a table AOR"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=error):
            load_config(path)


def test_presence_md_shows_a_working_voicemail_table(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "presence.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    path = tmp_path / "peer.toml"
    path.write_text(block)
    assert load_config(path).voicemail == {JONES: MAILBOX}


def via(peer: Peer) -> str:
    host, port = peer.sip_address()
    return f"{host}:{port}"


async def summary_of(sub: OutgoingSubscription) -> mwi.Summary:
    note = await sub.next(15)
    assert note.request.get("Content-Type") == mwi.CONTENT_TYPE
    return mwi.parse(note.body)


async def wait_for_file(folder: Path, timeout: float = 20.0) -> Path:
    """The voicemail's WAV file once it records (it opens the file at the beep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := list(folder.rglob("*.wav"))):
        if loop.time() > deadline:
            raise AssertionError(f"the voicemail recorded nothing in {folder}")
        await asyncio.sleep(0.05)
    return found[0]


async def test_phones_subscribed_to_their_own_aor_hear_of_voicemail(
    three: tuple[list[Peer], Path], tmp_path: Path
) -> None:
    (a, b, c), scripts = three
    for peer in (a, b, c):
        peer.mailboxes = MailboxPolicy({JONES: MAILBOX})  # what [voicemail] in each config says
    (scripts / "jones@example.com.py").write_text(
        TRANSFER + (EXAMPLES / "scripting_proxy_then_voicemail.py").read_text()
    )
    folder = tmp_path / "messages"
    folder.mkdir()
    port = free_port()
    box = Voicemail(port, write_wav(tmp_path / "greeting.wav", ToneSource(440, duration=0.4)), folder)
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(5)]
    desk, mobile = (UserAgent(stacks[i], JONES, outbound=via(p)) for i, p in ((0, a), (1, b)))
    carol = UserAgent(stacks[2], "sip:carol@example.com", outbound=via(b))
    dave = UserAgent(stacks[3], "sip:dave@other.org", outbound=via(c))
    impostor = UserAgent(stacks[4], JONES, outbound=via(c))  # says it is jones, registered nowhere
    uas = (desk, mobile, carol, dave, impostor)
    try:
        assert await box.line() == "voicemail ready"
        assert await register(c, MAILBOX, f"sip:jones@127.0.0.1:{port}") == 200
        assert (await desk.register(f"sip:{via(a)}", expires=300, refresh=False)).status == 200
        shared = b.users.path_for(JONES)  # jones's second home peer holds his user key too
        shared.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(a.users.export(JONES), shared)
        for ua, peer in ((mobile, b), (carol, b)):
            assert (await ua.register(f"sip:{via(peer)}", expires=300, refresh=False)).status == 200

        # both of jones's phones subscribe to their own AOR, each at its own peer: "no messages"
        subs = [
            await ua.subscribe(JONES, mwi.EVENT, accept=mwi.CONTENT_TYPE, body_check=check_summary)
            for ua in (desk, mobile)
        ]
        for sub in subs:
            first = await summary_of(sub)
            assert not first.waiting and first.counts["voice-message"] == (0, 0, 0, 0)
            assert sub.active and sub.active[0].state is SubState.ACTIVE
        assert sum(p.counters["mwi_retargeted"] for p in (a, b, c)) == 2

        # nobody else may: carol (vouched, as herself) and the impostor (no peer vouches for it): 403;
        # carol's own AOR has no voicemail: 404
        refusals = ((carol, JONES, 403), (impostor, JONES, 403), (carol, "sip:carol@example.com", 404))
        for ua, aor, status in refusals:
            with pytest.raises(CallFailed) as refused:
                await ua.subscribe(aor, mwi.EVENT, accept=mwi.CONTENT_TYPE, resubscribe=False)
            assert refused.value.status == status, (aor, refused.value)
        assert sum(p.counters["mwi_refused"] for p in (a, b, c)) == 2

        # dave (another domain) calls jones: the article's script transfers him to voicemail, where he
        # leaves a message; both phones hear "1 message waiting"
        offer = bytes(sdp.make_offer("127.0.0.1", free_port()))  # the voicemail's RTP goes nowhere
        call = await dave.call(JONES, body=offer, timeout=20)
        to_voicemail = await asyncio.wait_for(dave.events.referred.get(), 20)
        await to_voicemail.answered(20)
        assert await call.wait_ended(20) == "bye received"
        message = await wait_for_file(folder)
        assert message.parent == folder / "jones"  # the mailbox is the user part called
        assert (await to_voicemail.bye()).status == 200
        assert (await box.line()) == f"message {message}"
        for sub in subs:
            news = await summary_of(sub)
            assert news.waiting and news.counts["voice-message"] == (1, 0, 0, 0)

        # the message is deleted: both phones hear "no" again
        message.unlink()
        for sub in subs:
            gone = await summary_of(sub)
            assert not gone.waiting and gone.counts["voice-message"] == (0, 0, 0, 0)
        for sub in subs:
            await sub.unsubscribe()
    finally:
        box.stop()
        for ua in uas:
            await ua.close()
        for stack in stacks:
            await stack.close()
