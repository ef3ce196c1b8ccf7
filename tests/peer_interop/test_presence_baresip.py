"""baresip 1.0 (its `presence` and `contact` modules) with our UserAgent through a 3-peer overlay whose
presence agents (p2psip/presenceagent.py) serve every SUBSCRIBE and PUBLISH for ``presence``:
baresip watches our UA and sees it go Offline when it unregisters and Online when it is back, and sees
our UA's PUBLISHed "away" (as Offline: baresip 1.0 has no Away label) and "busy" (Busy); our UA watches
baresip and sees its `/presence_offline` and `/presence_online` (baresip PUBLISHes them to its
peer, the agent); one baresip watches the other across two peers, and sees it go Offline when it
unregisters; instant messages both ways, between our
UA and baresip and between two baresips two peers apart; a call from our UA to one baresip transferred
(REFER) by our UA to the other, and one transferred by that baresip (`/transfer`, an in-call command).

The phones are registered at other peers than the AORs they watch: each watcher's SUBSCRIBE enters its
own home peer, which vouches for it with a signed assertion the agent checks (else it would be politely
blocked and see Offline)."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import free_port, free_sip_port, require_tool
from interop.procs import stop

from p2psip import pidf, sdp
from p2psip.peer import Peer
from p2psip.stack import Stack
from p2psip.uaevents import Notification
from p2psip.useragent import UserAgent

from .helpers import baresip_config, start_overlay, stop_overlay

pytestmark = pytest.mark.interop

BOB = "sip:bob@p2p.example"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Phone:
    """One headless baresip with presence; commands go to its `cons` port and their output comes back."""

    def __init__(
        self, workdir: Path, user: str, peer: Peer, watches: list[str], *, apps: tuple[str, ...] = ()
    ) -> None:
        self.user = user
        self.dir = workdir / f"baresip-{user}"
        self.dir.mkdir(parents=True)
        self.cons_port = free_port()
        host, port = peer.sip_address()
        (self.dir / "config").write_text(
            baresip_config(
                f"127.0.0.1:{free_sip_port()}", self.cons_port, apps=("contact", "presence", *apps)
            )
        )
        (self.dir / "accounts").write_text(
            f'<sip:{user}@p2p.example>;outbound="sip:{host}:{port}";regint=300;pubint=300;'
            "audio_codecs=PCMU;answermode=auto\n"
        )
        (self.dir / "contacts").write_text("".join(f'"{aor}" <{aor}>;presence=p2p\n' for aor in watches))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.3)
        self.heard = ""
        self.log = (self.dir / "baresip.log").open("wb")
        self.proc = subprocess.Popen(
            [require_tool("baresip"), "-f", str(self.dir), "-t", "120"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def _command(self, text: str | None) -> str:
        """Send ``text`` (None: nothing) from the one socket `cons` answers to, and read what comes back
        for a moment; everything read is also kept in ``heard`` (`cons` shows an incoming MESSAGE there,
        not in the log)."""
        sock = self.sock
        if text is not None:
            sock.sendto(text.encode() + b"\n", ("127.0.0.1", self.cons_port))
        out = b""
        try:
            while True:
                out += sock.recv(65535)
        except OSError:
            pass
        heard = ANSI.sub("", out.decode(errors="replace"))
        self.heard += heard
        return heard

    async def command(self, text: str) -> str:
        return await asyncio.to_thread(self._command, text)

    async def sees(self, aor: str, status: str, timeout: float = 20.0) -> None:
        """Wait until `/contacts` shows ``aor`` with ``status`` (Online / Offline)."""
        pattern = re.compile(rf"\b{status}\b[^\n]*<{re.escape(aor)}>")
        deadline = asyncio.get_running_loop().time() + timeout
        listing = ""
        while asyncio.get_running_loop().time() < deadline:
            listing = await self.command("/contacts")
            if pattern.search(listing):
                return
        raise AssertionError(f"{self.user} does not see {aor} {status}:\n{listing}\n{self.log_tail()}")

    async def received(self, text: str, timeout: float = 15.0) -> None:
        """Wait until this baresip showed an incoming MESSAGE with ``text`` on its console."""
        deadline = asyncio.get_running_loop().time() + timeout
        while text not in self.heard:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{self.user} got no MESSAGE {text!r}:\n{self.heard[-2000:]}")
            await asyncio.to_thread(self._command, None)

    def log_text(self) -> str:
        self.log.flush()
        return (self.dir / "baresip.log").read_text(errors="replace")

    def log_tail(self) -> str:
        return self.log_text()[-3000:]

    def stop(self) -> None:
        stop(self.proc, grace=2)
        self.log.close()
        self.sock.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[list[Peer], UserAgent]]:
    require_tool("baresip")
    peers = await start_overlay(3, tmp_path)
    for peer in peers:
        peer.presence.poll = 0.5
    stack = await Stack.start(["udp:127.0.0.1:0"])
    host, port = peers[2].sip_address()
    bob = UserAgent(stack, BOB, outbound=f"{host}:{port}")
    try:
        assert (await bob.register(f"sip:{host}:{port}", expires=300, refresh=False)).status == 200
        yield peers, bob
    finally:
        await bob.close()
        await stack.close()
        await stop_overlay(peers)


async def next_basic(notes: asyncio.Queue[Notification], want: str, timeout: float = 15) -> None:
    async def wait() -> None:
        while True:
            note = await notes.get()
            if pidf.parse(note.body).basic == want:
                return

    await asyncio.wait_for(wait(), timeout)


async def test_presence_messages_and_transfer_with_baresip(
    world: tuple[list[Peer], UserAgent], tmp_path: Path
) -> None:
    peers, bob = world
    alice = Phone(tmp_path, "alice", peers[1], watches=[BOB, "sip:carol@p2p.example"])
    carol = Phone(tmp_path, "carol", peers[0], watches=["sip:alice@p2p.example"])
    try:
        # baresip alice (peer 1) watches our UA (registered at peer 2, its agent): Online; it unregisters:
        # Offline; it registers again: Online
        await alice.sees(BOB, "Online")
        assert peers[2].presence.watches
        await bob.unregister()
        await alice.sees(BOB, "Offline")
        host, port = peers[2].sip_address()
        assert (await bob.register(f"sip:{host}:{port}", expires=300, refresh=False)).status == 200
        await alice.sees(BOB, "Online")

        # our UA PUBLISHes "away" (RPID; baresip 1.0 cannot publish it, and shows a contact whose PIDF
        # has <rpid:away/> as Offline: it has no Away label), then "busy" (Busy), then withdraws it
        async def publish(activity: str | None, etag: str | None = None) -> str:
            headers = [("Event", "presence"), ("Expires", "600" if activity else "0")]
            if etag is not None:
                headers.append(("SIP-If-Match", etag))
            doc = pidf.Presence(BOB, [pidf.PresenceTuple("desk", "open")], [], [activity] if activity else [])
            response = await bob.request(
                "PUBLISH", BOB, body=doc.compose() if activity else b"", content_type=pidf.CONTENT_TYPE,
                headers=headers,
            )  # fmt: skip
            assert response.status == 200, response
            return response.get("SIP-ETag") or ""

        etag = await publish("away")
        await alice.sees(BOB, "Offline")
        etag = await publish("busy", etag)
        await alice.sees(BOB, "Busy")
        await publish(None, etag)
        await alice.sees(BOB, "Online")

        # our UA watches baresip alice (her agent is peer 1): she sets herself offline (a PUBLISH), then
        # online again
        notes: asyncio.Queue[Notification] = asyncio.Queue()
        sub = await bob.subscribe(
            "sip:alice@p2p.example", "presence", body_check=lambda r: None, on_notify=notes.put_nowait
        )
        await alice.command("/presence_offline")
        await next_basic(notes, "closed")
        await carol.sees("sip:alice@p2p.example", "Offline")  # baresip watching baresip, two peers apart
        await alice.command("/presence_online")
        await next_basic(notes, "open")
        await carol.sees("sip:alice@p2p.example", "Online")
        await sub.unsubscribe()

        # messages both ways
        assert (await bob.message("sip:alice@p2p.example", "hello from p2psip")).status == 200
        await alice.command("/message hello from baresip")  # alice's current contact is bob
        got = await asyncio.wait_for(bob.messages.get(), 15)
        assert got.body == b"hello from baresip" and got.from_.uri.user == "alice"

        # our UA calls alice, then transfers her to carol: alice follows the REFER, carol answers
        offer = bytes(sdp.make_offer("127.0.0.1", free_port()))
        call = await bob.call("sip:alice@p2p.example", body=offer, timeout=20)
        frag = await call.transfer("sip:carol@p2p.example", timeout=30)
        assert frag is not None and frag.status == 200 and call.state == "terminated"
        listing = await carol.command("/listcalls")
        assert "sip:alice@p2p.example" in listing, listing + carol.log_tail()
        await carol.command("/hangup")

        # baresip to baresip, two peers apart: messages both ways
        await carol.command("/message hello alice, from carol")  # carol's current contact is alice
        await alice.received("hello alice, from carol")
        await alice.command("/contact_next")  # from bob to carol
        await alice.command("/message hello carol, from alice")
        await carol.received("hello carol, from alice")

        # baresip alice transfers a call from our UA to baresip carol (/transfer, an in-call command)
        call = await bob.call("sip:alice@p2p.example", body=offer, timeout=20)
        await alice.command("/transfer sip:carol@p2p.example")
        referred = await asyncio.wait_for(bob.events.referred.get(), 20)
        assert (await referred.answered(20)).status == 200
        listing = await carol.command("/listcalls")
        assert "sip:bob@p2p.example" in listing, listing + carol.log_tail()
        await referred.bye()
        assert call.state == "terminated"  # alice hung up her leg once the transfer worked

        # baresip carol watches baresip alice unregister: alice quits (REGISTER Expires 0; baresip 1.0's
        # /uadel does not unregister while its presence module holds the account): Offline
        await alice.command("/quit")
        await carol.sees("sip:alice@p2p.example", "Offline")
    except (AssertionError, TimeoutError) as exc:
        agents = [(p.presence.stats, len(p.presence.watches)) for p in peers]
        raise AssertionError(
            f"{exc!r} {agents}\n--- alice\n{alice.log_tail()}\n--- carol\n{carol.log_tail()}"
        ) from None
    finally:
        alice.stop()
        carol.stop()
