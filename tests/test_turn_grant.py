"""Relayed candidates by default (docs/nat.md): a home peer with a TURN server hands time-limited TURN
credentials (``P-P2PSIP-TURN``, p2psip.turngrant) in the 200 to a REGISTER that passed digest auth, and
only to such a one; our UserAgent then gathers a relayed candidate on that peer on its calls, with nothing
in ``media_options``. Credentials past their expiry are refused by the TURN server (401)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_peer import ALICE, BOB, PeerFactory

from p2psip.config import HostPort, UserAccount
from p2psip.media import CallMedia, ToneSource
from p2psip.media.ice import IceSettings
from p2psip.peer import TURN_CREDENTIAL_TTL, TURN_SECRET, flow_secret
from p2psip.sdp import SessionDescription
from p2psip.stack import Stack
from p2psip.turn import issue_credentials
from p2psip.turngrant import TURN_HEADER, TurnGrant
from p2psip.useragent import IncomingCall, UserAgent


def documented_header() -> str:
    """docs/nat.md's example of the header, as a pattern (its placeholders as what a peer fills in)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "nat.md").read_text()
    [line] = [x for x in text.splitlines() if x.startswith(f"{TURN_HEADER}: ")]
    pattern = re.escape(line.removeprefix(f"{TURN_HEADER}: "))
    for placeholder, value in (
        ("HOST:PORT", r"127\.0\.0\.1:\d+"),
        ("EXPIRY", r"\d+"),
        ("AOR", re.escape(ALICE)),
    ):
        pattern = pattern.replace(re.escape(placeholder), value)
    return pattern.replace(re.escape('"..."'), '"[^"]+"')


def candidates(sdp: bytes) -> list[list[str]]:
    return [c.split() for c in SessionDescription.parse(sdp).media[0].attribute_values("candidate")]


async def test_an_authenticated_ua_gets_turn_credentials_and_offers_a_relayed_candidate(
    make_peer: PeerFactory, tmp_path: Path
) -> None:
    peer = await make_peer(
        users={ALICE: UserAccount(ALICE, "wonderland", "alice")}, turn=HostPort("127.0.0.1", 0)
    )
    assert peer.turn is not None
    host, port = peer.sip_address()
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(2)]
    alice = UserAgent(
        stacks[0], ALICE, outbound=f"{host}:{port}", instance=f"<urn:uuid:{uuid.uuid4()}>",
        username="alice", password="wonderland",
    )  # fmt: skip
    bob = UserAgent(stacks[1], BOB, outbound=f"{host}:{port}", instance=f"<urn:uuid:{uuid.uuid4()}>")
    answered: asyncio.Queue[IncomingCall] = asyncio.Queue()

    async def answer(incoming: IncomingCall) -> None:
        await incoming.accept_with_media(play=ToneSource(1000))
        answered.put_nowait(incoming)

    bob.on_call = lambda incoming: asyncio.ensure_future(answer(incoming)) and None
    try:
        ok = await alice.register("sip:p2p.example", expires=600)
        grant = alice.turn_grant
        assert grant is not None and (grant.host, grant.port) == peer.turn.address
        header = ok.get(TURN_HEADER)
        assert header is not None and header.startswith(
            f"<turn:127.0.0.1:{peer.turn.address[1]}?transport=udp>"
        )
        assert re.fullmatch(documented_header(), header), header
        expiry, _, user = grant.username.partition(":")
        assert user == ALICE and abs(int(expiry) - time.time() - TURN_CREDENTIAL_TTL) < 5

        # bob registered without digest auth (no account: first use): no credentials
        ok = await bob.register("sip:p2p.example", expires=600)
        assert ok.get(TURN_HEADER) is None and bob.turn_grant is None

        granted = peer.turn.core.stats()["allocations_granted"]
        call = await alice.call(BOB, play=ToneSource(440), timeout=20)
        incoming = await asyncio.wait_for(answered.get(), 20)
        relayed = [c for c in candidates(incoming.request.body) if c[7] == "relay"]
        assert relayed and relayed[0][4] == "127.0.0.1", incoming.request.body  # on the peer's relay
        assert peer.turn.core.stats()["allocations_granted"] == granted + 1
        assert not [c for c in candidates(call.response.body) if c[7] == "relay"]  # bob has no grant
        assert call.media is not None and call.media.ice is not None
        assert call.media.ice.settings.turn == peer.turn.address
        assert (await call.bye()).status == 200

        # a re-REGISTER brings a fresh grant; an unregistration drops it
        ok = await alice.register("sip:p2p.example", expires=600)
        assert ok.get(TURN_HEADER) is not None and alice.turn_grant is not None
        assert alice.turn_grant.until >= grant.until
        await alice.register("sip:p2p.example", expires=0)
        assert alice.turn_grant is None
    finally:
        for ua in (alice, bob):
            await ua.close()
        for stack in stacks:
            await stack.close()


async def test_expired_turn_credentials_are_refused(make_peer: PeerFactory) -> None:
    peer = await make_peer(turn=HostPort("127.0.0.1", 0))
    assert peer.turn is not None
    secret = flow_secret(Path(peer.config.data_dir), TURN_SECRET)
    assert secret is not None
    username, password = issue_credentials(secret, ALICE, time.time() - 2 * TURN_CREDENTIAL_TTL)
    expired = IceSettings(
        turn=peer.turn.address, turn_username=username, turn_password=password, relay_only=True
    )
    with pytest.raises(ConnectionError, match="TURN server refused"):
        await CallMedia.open("127.0.0.1", ice=expired)
    assert peer.turn.core.stats()["refused_auth"] >= 1
    # the same user's current credentials are taken
    username, password = issue_credentials(secret, ALICE, time.time(), TURN_CREDENTIAL_TTL)
    media = await CallMedia.open(
        "127.0.0.1",
        ice=IceSettings(
            turn=peer.turn.address, turn_username=username, turn_password=password, relay_only=True
        ),
    )
    await media.close()


def test_turn_grant_header_round_trip_and_garbage() -> None:
    grant = TurnGrant("::1", 3478, f"1900000000:{ALICE}", "a+b/c=", 1000.0 + 3600)
    value = grant.header(1000.0)
    assert (
        value
        == f'<turn:[::1]:3478?transport=udp>;username="1900000000:{ALICE}";password="a+b/c=";expires=3600'
    )
    assert TurnGrant.parse(value, 1000.0) == grant
    for bad in (
        "",
        "<<",
        "<sip:127.0.0.1:3478>;username=a;password=b;expires=1",
        "<turn:127.0.0.1:3478?transport=tcp>;username=a;password=b;expires=1",
        "<turn:127.0.0.1:70000>;username=a;password=b;expires=1",
        "<turn:127.0.0.1:3478>;password=b;expires=1",
        "<turn:127.0.0.1:3478>;username=a;password=b;expires=-1",
        "<turn:example.org:3478>;username=a;password=b;expires=1",
    ):
        assert TurnGrant.parse(bad, 0.0) is None, bad


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('<>;="[]:?/ turnsip0123456789.abcxyz\\,@'), max_size=120))
def test_any_header_value_is_a_grant_or_none(value: str) -> None:
    """A registrar's header is input: garbage means no relayed candidate, never an exception."""
    grant = TurnGrant.parse(value, 0.0)
    assert grant is None or (grant.port > 0 and grant.username and grant.password)
