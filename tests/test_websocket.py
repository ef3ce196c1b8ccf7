"""SIP over WebSocket (RFC 7118): the sans-IO endpoint with a fake clock, and ws:/wss: listeners and outgoing
connections on real loopback sockets, driven by a WebSocket client written on wsproto directly (not on our
endpoint), so both sides of every handshake are checked against an independent implementation."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

from p2psip.address import ListenSpec, Target, target_from_uri
from p2psip.message import Request as SipRequest
from p2psip.message import Response, parse
from p2psip.streamguard import StreamLimits
from p2psip.transport import TLSConfig
from p2psip.uri import URI
from p2psip.websocket import OriginPolicy, WSEndpoint
from tests.test_transport import make_layer, options


class WSClient:
    """A SIP WebSocket client over asyncio streams, on wsproto: what a browser's SIP library does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pings = 0
        self._reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        origin: str | None = "http://127.0.0.1:8080",
        subprotocols: tuple[str, ...] = ("sip",),
        tls: bool = False,
    ) -> tuple[WSClient, AcceptConnection | RejectConnection]:
        ctx = None
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        client = cls(reader, writer)
        headers = [(b"origin", origin.encode())] if origin else []
        writer.write(
            client.ws.send(
                Request(
                    host=f"127.0.0.1:{port}", target="/", subprotocols=[*subprotocols], extra_headers=headers
                )
            )
        )
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            client.ws.receive_data(data or None)
            for event in client.ws.events():
                if isinstance(event, AcceptConnection | RejectConnection):
                    if isinstance(event, AcceptConnection):
                        client._reader_task = asyncio.create_task(client._read())
                    return client, event

    async def _read(self) -> None:
        while True:
            data = await self.reader.read(65536)
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self.messages.put_nowait(event.data.encode())
                elif isinstance(event, BytesMessage):
                    self.messages.put_nowait(bytes(event.data))
                elif isinstance(event, Ping):
                    self.pings += 1
                    self.writer.write(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if not self.closed.done():
                        self.closed.set_result(event.code)
                    return
            if not data:
                return

    def send_text(self, text: str | bytes) -> None:
        self.writer.write(self.ws.send(TextMessage(data=text if isinstance(text, str) else text.decode())))

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(self.ws.send(BytesMessage(data=data)))

    async def recv(self, timeout: float = 5.0) -> SipRequest | Response:
        return parse(await asyncio.wait_for(self.messages.get(), timeout), datagram=False)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def browser_options(branch: str, host: str = "df7jal23ls0d.invalid", transport: str = "WS") -> bytes:
    """An OPTIONS as JsSIP writes it: a ``.invalid`` sent-by without a port (RFC 7118 §5.2)."""
    return options(branch, via=host, rport=False, transport=transport)


# ------------------------------------------------------------------------------------- sans-IO endpoint


def handshake() -> tuple[WSEndpoint, WSEndpoint]:
    server = WSEndpoint(client=False, max_message=1000)
    client = WSEndpoint(client=True, host="127.0.0.1:80", origin="http://127.0.0.1:8080")
    result = server.feed(client.start())
    assert result.opened and not result.close
    answer = client.feed(result.out)
    assert answer.opened and answer.error is None
    return server, client


def test_endpoint_handshake_and_one_message_per_frame() -> None:
    server, client = handshake()
    one, two = b"OPTIONS sip:a SIP/2.0\r\n\r\n", b"\xff\xfebinary"
    got = server.feed(client.message(one) + client.message(two))
    assert got.messages == [one, two]  # text frame, then binary (not UTF-8)


def test_endpoint_refuses_foreign_origin_and_missing_subprotocol() -> None:
    server = WSEndpoint(client=False, origins=OriginPolicy(["https://phone.example"], loopback=True))
    evil = WSEndpoint(client=True, host="127.0.0.1:80", origin="https://evil.example")
    result = server.feed(evil.start())
    assert result.rejected and result.close and b"403" in result.out.split(b"\r\n")[0]
    allowed = WSEndpoint(client=True, host="127.0.0.1:80", origin="https://phone.example")
    assert WSEndpoint(client=False, origins=OriginPolicy(["https://phone.example"])).feed(allowed.start()).opened
    plain = WSConnection(ConnectionType.CLIENT).send(Request(host="x", target="/", subprotocols=["chat"]))
    refused = WSEndpoint(client=False).feed(plain)
    assert refused.rejected and b"400" in refused.out.split(b"\r\n")[0]
    assert not WSEndpoint(client=False).feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").opened


def test_endpoint_closes_on_oversized_and_malformed_frames() -> None:
    server, client = handshake()
    big = server.feed(client.message(b"x" * 1001))
    assert big.close and big.error and struct.unpack("!H", big.out[2:4])[0] == 1009
    server, _ = handshake()
    bad = server.feed(b"\x8f\x80\x00\x00\x00\x00")  # opcode 0xF is reserved
    assert bad.close and bad.error and struct.unpack("!H", bad.out[2:4])[0] == 1002


def test_endpoint_keepalive_pings_then_closes_without_pong() -> None:
    server, client = handshake()
    assert server.tick(0.0, 30).out == b""  # starts the clock
    assert server.tick(10.0, 30).out == b""  # not idle long enough
    ping = server.tick(30.0, 30)
    assert ping.out and not ping.close
    server.feed(client.feed(ping.out).out)  # the client pongs
    assert not server.tick(60.0, 30).close  # answered: a new ping, no close
    dead = server.tick(90.0, 30)  # this one unanswered
    assert dead.close and dead.error == "keep-alive ping unanswered"


# ----------------------------------------------------------------------------------------- loopback


async def test_ws_listener_answers_with_received_on_the_invalid_via() -> None:
    layer, echo = await make_layer("ws:127.0.0.1:0")
    port = layer.listening["ws"][0][1]
    try:
        client, event = await WSClient.connect(port)
        assert isinstance(event, AcceptConnection) and event.subprotocol == "sip"
        client.send_text(browser_options("ws1"))
        _request, source = await asyncio.wait_for(echo.got.get(), 5)
        assert source.transport == "ws" and source.connection is not None
        response = await client.recv()
        assert isinstance(response, Response) and response.status == 200
        via = response.top_via
        assert via is not None and via.host == "df7jal23ls0d.invalid" and via.received == "127.0.0.1"
        # The browser's .invalid host now reaches it over its own connection, and only there.
        target = target_from_uri(URI("sip:alice@df7jal23ls0d.invalid;transport=ws"))
        assert target == Target("ws", "df7jal23ls0d.invalid", 80)
        layer.send(options("back", via="127.0.0.1:9", transport="WS"), target)
        back = await client.recv()
        assert isinstance(back, SipRequest) and back.method == "OPTIONS"
        await client.close()
    finally:
        await layer.close()


async def test_non_sip_payload_closes_that_connection_only() -> None:
    layer, _echo = await make_layer("ws:127.0.0.1:0")
    port = layer.listening["ws"][0][1]
    try:
        good, _ = await WSClient.connect(port)
        bad, _ = await WSClient.connect(port)
        bad.send_bytes(b"\x00\x01 hello, this is not SIP")
        assert await asyncio.wait_for(bad.closed, 5) == 1008
        assert layer.stats["ws_errors"] == 1
        good.send_text(browser_options("still-alive", host="good.invalid"))
        response = await good.recv()
        assert isinstance(response, Response) and response.status == 200
        # A malformed frame (reserved opcode) also closes, with 1002.
        bad2, _ = await WSClient.connect(port)
        bad2.writer.write(b"\x8f\x80\x00\x00\x00\x00")
        assert await asyncio.wait_for(bad2.closed, 5) == 1002
        assert layer.stats["ws_errors"] == 2
        for c in (good, bad, bad2):
            await c.close()
    finally:
        await layer.close()


async def test_handshake_checks_origin_and_subprotocol() -> None:
    layer, _ = await make_layer("ws:127.0.0.1:0")
    port = layer.listening["ws"][0][1]
    try:
        client, event = await WSClient.connect(port, origin="https://evil.example")
        assert isinstance(event, RejectConnection) and event.status_code == 403
        await client.close()
        client, event = await WSClient.connect(port, subprotocols=("chat",))
        assert isinstance(event, RejectConnection) and event.status_code == 400
        await client.close()
        layer.ws_origins.add("https://evil.example")  # what --ws-origin / the peer's --http origin do
        client, event = await WSClient.connect(port, origin="https://evil.example")
        assert isinstance(event, AcceptConnection)
        await client.close()
        assert layer.stats["ws_errors"] >= 2
    finally:
        await layer.close()


async def test_connections_per_source_are_bounded() -> None:
    layer, _ = await make_layer("ws:127.0.0.1:0", streams=StreamLimits(max_per_source=2))
    port = layer.listening["ws"][0][1]
    try:
        first, _ = await WSClient.connect(port)
        second, _ = await WSClient.connect(port)
        with pytest.raises((ConnectionError, TimeoutError, OSError, ProtocolError)):
            _third, event = await WSClient.connect(port)
            raise ConnectionError(f"third connection answered {event!r}")
        assert layer.stats["ws_refused"] == 1
        await first.close()
        for _ in range(100):  # the server sees the close, then frees the slot
            if layer.guard.per_source == {"127.0.0.1": 1}:
                break
            await asyncio.sleep(0.02)
        again, event = await WSClient.connect(port)
        assert isinstance(event, AcceptConnection)
        await second.close()
        await again.close()
    finally:
        await layer.close()


async def test_keepalive_pings_the_client() -> None:
    layer, _ = await make_layer("ws:127.0.0.1:0", ws_ping_interval=0.3)
    port = layer.listening["ws"][0][1]
    try:
        client, _ = await WSClient.connect(port)
        for _ in range(100):
            if client.pings >= 2:
                break
            await asyncio.sleep(0.05)
        assert client.pings >= 2 and not client.closed.done()  # we pong, so it stays open
        await client.close()
    finally:
        await layer.close()


@pytest.mark.parametrize("transport", ["ws", "wss"])
async def test_outgoing_connection_to_a_transport_ws_target(transport: str) -> None:
    tls = TLSConfig.self_signed()
    server, server_echo = await make_layer(f"{transport}:127.0.0.1:0", tls=tls)
    client_layer, client_echo = await make_layer("udp:127.0.0.1:0", tls=tls)
    port = server.listening[transport][0][1]
    scheme = "sips" if transport == "wss" else "sip"
    try:
        target = target_from_uri(URI(f"{scheme}:bob@127.0.0.1:{port};transport=ws"))
        assert target == Target(transport, "127.0.0.1", port)
        client_layer.send(options("out", via="127.0.0.1:5", transport=transport.upper()), target)
        request, source = await asyncio.wait_for(server_echo.got.get(), 5)
        assert isinstance(request, SipRequest) and source.transport == transport
        response, _ = await asyncio.wait_for(client_echo.got.get(), 5)
        assert isinstance(response, Response) and response.status == 200
        assert client_layer.stats["connections_opened"] == 1
    finally:
        await client_layer.close()
        await server.close()


def test_listen_spec_knows_ws() -> None:
    assert ListenSpec.parse("ws:127.0.0.1:8080") == ListenSpec("ws", "127.0.0.1", 8080)
    assert ListenSpec.parse("wss:[::1]:8443") == ListenSpec("wss", "::1", 8443)
    assert ListenSpec.parse("wss:[::1]") == ListenSpec("wss", "::1", 443)  # RFC 7118 §5.2: HTTP's ports


# ------------------------------------------------------------------------------------ peers and browsers


def browser_register(aor: str, host: str, instance: str) -> str:
    """A REGISTER as JsSIP writes it (RFC 7118 §8.1 + RFC 5626: instance, reg-id, ob)."""
    user = aor.split(":")[1].split("@")[0]
    return (
        f"REGISTER sip:p2p.example SIP/2.0\r\n"
        f"Via: SIP/2.0/WS {host};branch=z9hG4bKreg{instance}\r\n"
        f"Max-Forwards: 69\r\nTo: <{aor}>\r\nFrom: <{aor}>;tag=reg{instance}\r\n"
        f"Call-ID: reg-{instance}\r\nCSeq: 1 REGISTER\r\nSupported: path, outbound, gruu\r\n"
        f'Contact: <sip:{user}@{host};transport=ws;ob>;+sip.instance="<urn:uuid:{instance}>";reg-id=1'
        f";expires=600\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
    )


@pytest.mark.parametrize("home_routing", [True, False])
async def test_browser_registered_over_ws_at_one_peer_is_called_from_another(tmp_path, home_routing) -> None:
    """A browser-like client registers over WS at peer 0; a UDP phone calls it through peer 1; the INVITE
    reaches the browser over its connection (Path to its home peer, then the .invalid host's connection)
    with a Record-Route for the WS side; the 200 gets back to the caller. With home routing off too: a
    browser is reached only through the peer its Path names."""
    from peer_phone import Phone
    from peer_support import wait_until_settled

    from overlay.localring import quick_node_config
    from p2psip.config import HostPort, PeerConfig
    from p2psip.peer import Peer

    peers: list[Peer] = []
    phone = None
    client = None
    try:
        for i in range(2):
            config = PeerConfig(
                listen=[ListenSpec("udp", "127.0.0.1", 0), ListenSpec("ws", "127.0.0.1", 0)],
                overlay=HostPort("127.0.0.1", 0),
                join=HostPort(*peers[0].overlay_address) if peers else None,
                data_dir=tmp_path / f"p{i}",
                cache_ttl=0.0,
                home_routing=home_routing,
            )
            peers.append(await Peer.start(config, node_config=quick_node_config()))
        await wait_until_settled(peers, timeout=20)
        ws_port = peers[0].stack.transport.listening["ws"][0][1]
        client, _ = await WSClient.connect(ws_port)
        client.send_text(browser_register("sip:carol@p2p.example", "k3j2h1.invalid", "c1"))
        ok = await client.recv(timeout=10)
        assert isinstance(ok, Response) and ok.status == 200, ok
        assert any("k3j2h1.invalid" in str(c.uri) for c in ok.contacts)

        phone = await Phone.open("alice")
        call = asyncio.create_task(phone.call("sip:carol@p2p.example", peers[1].sip_address(), hold=0.1))
        invite = await client.recv(timeout=10)
        assert isinstance(invite, SipRequest) and invite.method == "INVITE"
        assert str(invite.uri) == "sip:carol@k3j2h1.invalid;transport=ws;ob"
        record_route = invite.get_all("Record-Route")
        assert any("transport=ws" in rr for rr in record_route), record_route
        answer = Response.for_request(invite, 200)
        answer.to.params["tag"] = "browser"
        answer.set("To", str(answer.to))
        for rr in record_route:
            answer.add("Record-Route", rr)
        answer.add("Contact", "<sip:carol@k3j2h1.invalid;transport=ws>")
        client.send_text(bytes(answer))
        # The ACK and BYE come back to the browser along the route set, over the same connection.
        methods = []
        while len(methods) < 2:
            msg = await client.recv(timeout=10)
            if isinstance(msg, SipRequest):
                methods.append(msg.method)
                if msg.method == "BYE":
                    client.send_text(bytes(Response.for_request(msg, 200)))
        assert methods == ["ACK", "BYE"]
        result = await asyncio.wait_for(call, 15)
        assert result.answered and result.bye_status == 200
    finally:
        if client is not None:
            await client.close()
        if phone is not None:
            phone.close()
        for peer in peers:
            await peer.close(leave=False)


async def test_sipapi_script_listens_on_ws(tmp_path) -> None:
    """A sipapi script with ``open(('ws', host, port))`` serves SIP over WebSocket."""
    from conftest import free_port
    from test_sipapi_support import script_process

    port = free_port()
    script = tmp_path / "ws_server.py"
    script.write_text(f"from sipapi import *\nopen(('ws', '127.0.0.1', {port}))\nrun()\n")
    with script_process(script) as child:
        line = await asyncio.to_thread(child.wait_ready)
        assert f"ws:127.0.0.1:{port}" in line, line
        client, event = await WSClient.connect(port)
        assert isinstance(event, AcceptConnection)
        ping = browser_options("script").replace(b"sip:x@127.0.0.1 ", f"sip:127.0.0.1:{port} ".encode(), 1)
        client.send_text(ping)  # an OPTIONS ping of the server itself, answered over the WS connection
        response = await client.recv()
        assert isinstance(response, Response) and response.status == 200, response
        await client.close()
        assert child.stop() == 0, child.output()


async def test_p2psip_proxy_listens_on_ws(tmp_path) -> None:
    """``p2psip proxy --listen ws:...`` (the command, in its own process) takes SIP over WebSocket and
    forwards it: a browser-like client's MESSAGE reaches a UDP UA through it, and the answer comes back."""
    import sys

    from conftest import free_port

    from p2psip.stack import Stack
    from p2psip.useragent import UserAgent

    ws_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "p2psip.cli", "proxy", "--listen", f"ws:127.0.0.1:{ws_port}",
        "--listen", "udp:127.0.0.1:0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    far = await Stack.start(["udp:127.0.0.1:0"])
    got: asyncio.Queue[SipRequest] = asyncio.Queue()
    ua = UserAgent(far, "sip:far@127.0.0.1", on_message=got.put_nowait)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert f"ws:127.0.0.1:{ws_port}" in line, line
        client, _ = await WSClient.connect(ws_port)
        host, port = far.local_address("udp")
        first = f"MESSAGE sip:far@{host}:{port} ".encode()
        message = browser_options("proxied").replace(b"OPTIONS sip:x@127.0.0.1 ", first, 1)
        message = message.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 MESSAGE")
        client.send_text(message)
        response = await client.recv(timeout=10)
        assert isinstance(response, Response) and response.status == 200, response
        forwarded = await asyncio.wait_for(got.get(), 5)
        assert forwarded.get_all("Via")[1].startswith("SIP/2.0/WS df7jal23ls0d.invalid")
        await client.close()
    finally:
        await ua.close()
        await far.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
