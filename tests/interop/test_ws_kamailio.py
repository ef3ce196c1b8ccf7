"""SIP over WebSocket against a third-party server: Kamailio's ``websocket`` module (RFC 7118).

Kamailio only accepts WebSocket connections, so here we are the WebSocket client, as a browser would be,
but with our own stack and UserAgent:

- our UA registers at Kamailio over ``;transport=ws`` (we open the connection: handshake with the ``sip``
  sub-protocol, one SIP message per frame) and Kamailio answers 200;
- a UDP UA calls our AOR through Kamailio: Kamailio finds our binding and sends the INVITE back over the
  *same* WebSocket connection we opened (we have no listener of our own on WS); we answer and the call
  completes both ways (ACK and BYE come over the connection too);
- our UA sends a MESSAGE through Kamailio (outbound over WS) to the UDP UA;
- ``p2psip proxy``, and a peer, forward a MESSAGE to a ``;transport=ws`` target (Kamailio), opening their
  own outgoing WebSocket connection.

Kamailio's websocket module is Debian's ``kamailio-websocket-modules``: without it these tests skip on a
laptop and fail under ``CI=true``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import free_port, in_ci

from overlay.localring import quick_node_config
from p2psip.address import Target
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.message import Request
from p2psip.peer import Peer
from p2psip.stack import Stack
from p2psip.useragent import UserAgent

from .kamailio import WS_MODULE, Kamailio, has_websocket_module, websocket_config
from .ourproxy import OurProxy
from .ua import answering_ua

pytestmark = pytest.mark.interop

TIMEOUT = 20.0


@pytest.fixture
def kamailio_ws(kamailio_tool: str) -> str:
    if not has_websocket_module():
        message = f"Kamailio's websocket module {WS_MODULE} is missing (Debian kamailio-websocket-modules)"
        if in_ci():
            pytest.fail(f"{message}: required under CI=true")
        pytest.skip(message)
    return kamailio_tool


def _kamailio(workdir: Path) -> Kamailio:
    port, ws_port = free_port(), free_port()
    # Ready once the WS (TCP) listener is bound too: the runner's "TLS port" is any extra TCP listener.
    kamailio = Kamailio(
        websocket_config("127.0.0.1", port, ws_port), workdir, port, transports=("udp",), tls_port=ws_port
    )
    kamailio.check()
    return kamailio


async def test_our_ua_registers_over_ws_and_is_called_back_on_that_connection(
    kamailio_ws: str, workdir: Path
) -> None:
    kamailio = _kamailio(workdir)
    ws_port = kamailio.tls_port
    ours = await Stack.start(["udp:127.0.0.1:0"])
    theirs = await Stack.start(["udp:127.0.0.1:0"])
    third = await Stack.start(["udp:127.0.0.1:0"])  # one UserAgent per stack: it is the stack's core
    seen: list[tuple[str, str, str]] = []
    arrived = asyncio.Event()

    def observe(direction: str, data: bytes, to: Target) -> None:
        seen.append((direction, to.transport, data.split(b" ", 1)[0].decode()))
        arrived.set()

    async def wait_seen(item: tuple[str, str, str]) -> None:
        """Until our stack has sent or received ``item`` (Kamailio's two workers may reorder ACK/BYE)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while item not in seen:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), max(0.0, deadline - loop.time()))

    ours.add_observer(observe)
    try:
        with kamailio:
            ws_uri = f"sip:127.0.0.1:{ws_port};transport=ws"
            alice, answered = answering_ua(
                ours, "sip:alice@kam.example", outbound=Target("ws", "127.0.0.1", ws_port),
            )  # fmt: skip
            reg = await alice.register(ws_uri, expires=300, refresh=False, timeout=TIMEOUT)
            assert reg.status == 200, f"{reg.status} {reg.reason}\n{kamailio.log_tail()}"
            assert ours.stats["connections_opened"] == 1
            assert ("out", "ws", "REGISTER") in seen

            # A UDP caller reaches us through Kamailio, over the connection we opened.
            got: asyncio.Queue[Request] = asyncio.Queue()
            bob = UserAgent(
                theirs, "sip:bob@kam.example", outbound=Target("udp", "127.0.0.1", kamailio.port),
                on_message=got.put_nowait,
            )  # fmt: skip
            call = await bob.call("sip:alice@kam.example", timeout=TIMEOUT)
            assert answered, kamailio.log_tail()
            await wait_seen(("in", "ws", "INVITE"))
            bye = await call.bye(timeout=TIMEOUT)
            assert bye.status == 200
            await wait_seen(("in", "ws", "ACK"))
            await wait_seen(("in", "ws", "BYE"))
            assert ours.stats["connections_opened"] == 1  # never another connection: we have no listener

            # We send through Kamailio over WS; bob (UDP) gets it.
            bob_reg = await bob.register(f"sip:127.0.0.1:{kamailio.port}", expires=300, refresh=False)
            assert bob_reg.status == 200
            response = await alice.message("sip:bob@kam.example", "hello over WebSocket", timeout=TIMEOUT)
            assert response.status == 200
            message = await asyncio.wait_for(got.get(), TIMEOUT)
            assert message.body == b"hello over WebSocket"

            # p2psip proxy forwards to a ;transport=ws target over its own outgoing WebSocket connection.
            with OurProxy(workdir, ["udp:127.0.0.1:0"]) as proxy:
                host, port = proxy.addresses["udp"]
                carol = UserAgent(third, "sip:carol@kam.example", outbound=Target("udp", host, port))
                target = f"sip:bob@127.0.0.1:{ws_port};transport=ws"  # usrloc finds bob by user name
                response = await carol.message(target, "through p2psip proxy over WS", timeout=TIMEOUT)
                assert response.status == 200, proxy.output()
                message = await asyncio.wait_for(got.get(), TIMEOUT)
                assert message.body == b"through p2psip proxy over WS"
                assert message.top_via is not None and message.get_all("Via")[1].startswith("SIP/2.0/WS ")
                await carol.close()

            # A peer does the same for an IP-literal ;transport=ws Request-URI (forwarded as addressed).
            config = PeerConfig(
                listen=[ListenSpec("udp", "127.0.0.1", 0)], overlay=HostPort("127.0.0.1", 0),
                data_dir=workdir / "peer", cache_ttl=0.0,
            )  # fmt: skip
            peer = await Peer.start(config, node_config=quick_node_config())
            try:
                host, port = peer.sip_address()
                dave = UserAgent(third, "sip:dave@kam.example", outbound=Target("udp", host, port))
                target = f"sip:bob@127.0.0.1:{ws_port};transport=ws"
                response = await dave.message(target, "through a peer over WS", timeout=TIMEOUT)
                assert response.status == 200
                message = await asyncio.wait_for(got.get(), TIMEOUT)
                assert message.body == b"through a peer over WS"
                assert peer.stack.stats["connections_opened"] == 1
                await dave.close()
            finally:
                await peer.close(leave=False)
            await alice.close()
            await bob.close()
    finally:
        await ours.close()
        await theirs.close()
        await third.close()
