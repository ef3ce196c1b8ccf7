"""Transport layer on real loopback sockets: receipt (rport/received), 400 for malformed input, framing,
connection reuse, the UDP->TCP switch, TLS with a generated certificate, IPv6."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from p2psip.address import Target
from p2psip.errors import ConfigError, TransportError
from p2psip.message import Request, Response, parse
from p2psip.transport import Source, StreamConnection, TLSConfig, TransportLayer

OPTIONS = (
    "OPTIONS sip:x@127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/{t} {via};branch=z9hG4bK{branch}{rport}\r\n"
    "From: <sip:a@example.org>;tag=1\r\nTo: <sip:x@example.org>\r\nCall-ID: {branch}@test\r\n"
    "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
)


def options(branch: str, via: str = "127.0.0.1:1", rport: bool = True, transport: str = "UDP") -> bytes:
    return OPTIONS.format(t=transport, via=via, branch=branch, rport=";rport" if rport else "").encode()


class Echo:
    """A message handler that answers every request 200 (through the layer) and records what came in."""

    def __init__(self) -> None:
        self.layer: TransportLayer | None = None
        self.got: asyncio.Queue[tuple[Request | Response, Source]] = asyncio.Queue()

    def __call__(self, msg: Request | Response, source: Source) -> None:
        self.got.put_nowait((msg, source))
        if isinstance(msg, Request) and self.layer is not None:
            self.layer.send_response(Response.for_request(msg, 200), source)


async def make_layer(*specs: str, **kw: object) -> tuple[TransportLayer, Echo]:
    echo = Echo()
    layer = TransportLayer(echo, **kw)  # type: ignore[arg-type]
    echo.layer = layer
    for spec in specs:
        await layer.listen(spec)
    return layer, echo


class UdpClient:
    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes, addr: tuple[str, int]) -> None:
        await self.loop.sock_sendto(self.sock, data, addr)

    async def recv(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.loop.sock_recv(self.sock, 65535), timeout)

    def close(self) -> None:
        self.sock.close()


async def test_udp_rport_and_received_are_stamped_and_used() -> None:
    layer, echo = await make_layer("udp:127.0.0.1:0")
    client = UdpClient()
    try:
        addr = layer.listening["udp"][0]
        # The Via names another address and asks for rport: the answer must come back to our socket.
        await client.send(options("a1", via="192.0.2.7:5999"), addr)
        msg, source = await asyncio.wait_for(echo.got.get(), 5)
        via = msg.top_via
        assert via is not None
        assert via.received == "127.0.0.1" and via.rport == client.sock.getsockname()[1]
        assert source.transport == "udp" and source.port == client.sock.getsockname()[1]
        answer = parse(await client.recv())
        assert isinstance(answer, Response) and answer.status == 200
    finally:
        client.close()
        await layer.close()


async def test_malformed_request_gets_400_naming_the_problem_and_listener_survives() -> None:
    layer, echo = await make_layer("udp:127.0.0.1:0")
    client = UdpClient()
    try:
        addr = layer.listening["udp"][0]
        bad = options("b1").replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
        await client.send(bad, addr)
        answer = parse(await client.recv())
        assert isinstance(answer, Response) and answer.status == 400
        assert "CSeq" in answer.reason
        # Garbage that cannot be answered is dropped and counted; the listener keeps working.
        await client.send(b"\x00\xff not sip at all\r\n\r\n", addr)
        await client.send(options("b2"), addr)
        good = parse(await client.recv())
        assert isinstance(good, Response) and good.status == 200
        assert layer.stats["parse_errors"] == 2
        assert layer.stats["bad_request_answers"] == 1
        assert layer.stats["dropped"] == 1
        assert echo.got.qsize() == 1
    finally:
        client.close()
        await layer.close()


async def test_tcp_framing_split_and_coalesced_messages() -> None:
    layer, echo = await make_layer("tcp:127.0.0.1:0")
    try:
        host, port = layer.listening["tcp"][0]
        reader, writer = await asyncio.open_connection(host, port)
        one, two = options("t1", transport="TCP"), options("t2", transport="TCP")
        writer.write(one[:40])
        await writer.drain()
        writer.write(one[40:] + two)  # the rest of one, and all of two, in one segment
        await writer.drain()
        for expected in ("z9hG4bKt1", "z9hG4bKt2"):
            msg, source = await asyncio.wait_for(echo.got.get(), 5)
            assert msg.top_via is not None and msg.top_via.branch == expected
            assert source.connection is not None
        # Both answers come back on the same connection (§18.2.2).
        data = b""
        while data.count(b"SIP/2.0 200") < 2:
            data += await asyncio.wait_for(reader.read(65535), 5)
        writer.close()
    finally:
        await layer.close()


async def test_tcp_oversized_message_closes_only_that_connection() -> None:
    from p2psip.message import Limits

    layer, _echo = await make_layer("tcp:127.0.0.1:0", limits=Limits(max_size=2000))
    try:
        host, port = layer.listening["tcp"][0]
        reader, writer = await asyncio.open_connection(host, port)
        huge = options("h1", transport="TCP").replace(b"Content-Length: 0", b"Content-Length: 50000")
        writer.write(huge)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # answered 513, then closed by the server
        assert answer.startswith(b"SIP/2.0 513 "), answer[:80]
        assert layer.stats["framing_errors"] == 1
        reader2, writer2 = await asyncio.open_connection(host, port)
        writer2.write(options("h2", transport="TCP"))
        await writer2.drain()
        assert b"SIP/2.0 200" in await asyncio.wait_for(reader2.read(65535), 5)
        writer2.close()
    finally:
        await layer.close()


async def test_connection_reuse_and_udp_to_tcp_switch() -> None:
    server, echo = await make_layer("udp:127.0.0.1:0", "tcp:127.0.0.1:0")
    client, _ = await make_layer("udp:127.0.0.1:0", "tcp:127.0.0.1:0")
    try:
        host, port = server.listening["tcp"][0]
        target = Target("tcp", host, port)
        client.send(options("r1", transport="TCP"), target)
        client.send(options("r2", transport="TCP"), target)
        for _ in range(2):
            _msg, source = await asyncio.wait_for(echo.got.get(), 5)
            assert source.transport == "tcp"
        assert client.stats["connections_opened"] == 1  # the second request reused the connection
        # §18.1.1: over 1300 bytes, a UDP target is reached over TCP instead.
        big = Target("udp", host, port)
        assert client.select(big, 1400) == Target("tcp", host, port)
        assert client.select(big, 1000) == big
        assert client.stats["udp_to_tcp"] == 1
        # ... but not when it is a phone's UDP flow (RFC 5626): only its NAT mapping reaches it
        from p2psip.flows import FlowTable

        client.flows = FlowTable(secret=b"k" * 32)
        client.flows.bind("udp", host, port, 0.0, aor="sip:a@x", entry_id=b"1")
        assert client.select(big, 1400) == big
    finally:
        await client.close()
        await server.close()


async def test_idle_connections_are_closed() -> None:
    server, echo = await make_layer("tcp:127.0.0.1:0")
    client, _ = await make_layer("udp:127.0.0.1:0", idle_timeout=1.0)
    try:
        host, port = server.listening["tcp"][0]
        client.send(options("i1", transport="TCP"), Target("tcp", host, port))
        await asyncio.wait_for(echo.got.get(), 5)
        assert client.connection_count() == 1
        for _ in range(100):  # the sweeper runs every 0.5 s here; give it up to 10 s on a busy machine
            if client.connection_count() == 0:
                break
            await asyncio.sleep(0.1)
        assert client.connection_count() == 0
        assert client.stats["connections_closed"] == 1
    finally:
        await client.close()
        await server.close()


@pytest.mark.parametrize("answer_first", [False, True])
async def test_a_peer_that_drops_the_connection_unanswered_fails_the_send(answer_first: bool) -> None:
    """A peer that closes a TCP connection without sending anything back after our request (a server
    refusing it, a TLS server rejecting our certificate after the handshake): the sender's error handler
    hears at once. A peer that answered first and then closed is not an error."""
    got_request = asyncio.Event()

    async def server_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readuntil(b"\r\n\r\n")
        if answer_first:
            request = parse(data)
            assert isinstance(request, Request)
            writer.write(bytes(Response.for_request(request, 200)))
            await writer.drain()
        got_request.set()
        writer.close()

    server = await asyncio.start_server(server_side, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client, replies = await make_layer("udp:127.0.0.1:0")
    errors: asyncio.Queue[Exception] = asyncio.Queue()
    try:
        client.send(options("d1", transport="TCP"), Target("tcp", "127.0.0.1", port), errors.put_nowait)
        await asyncio.wait_for(got_request.wait(), 10)
        if answer_first:
            answer, _ = await asyncio.wait_for(replies.got.get(), 10)
            assert isinstance(answer, Response) and answer.status == 200
            for _ in range(200):  # until the client has seen the close (bounded)
                if client.connection_count() == 0:
                    break
                await asyncio.sleep(0.01)
            assert client.connection_count() == 0 and errors.empty()
        else:
            err = await asyncio.wait_for(errors.get(), 10)
            assert isinstance(err, TransportError) and "closed by the peer before it answered" in str(err)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_write_after_the_peer_closed_says_the_peer_closed_it() -> None:
    """The layer writes its first request once the connection is up; on a loaded machine the peer's close
    (a TLS server refusing our certificate) may be read first. The error then names the peer's close,
    not just "is closed"."""
    closed = asyncio.Event()

    async def server_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(server_side, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    layer, _ = await make_layer("udp:127.0.0.1:0")
    loop = asyncio.get_running_loop()
    try:

        class Watched(asyncio.Protocol):
            """A StreamConnection whose connection_lost sets ``closed`` (by delegation: the compiled
            build's classes take no Python subclasses)."""

            def __init__(self) -> None:
                self.conn = StreamConnection(layer, "tcp", outgoing=True)

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.conn.connection_made(transport)

            def data_received(self, data: bytes) -> None:
                self.conn.data_received(data)

            def eof_received(self) -> bool | None:
                return self.conn.eof_received()

            def connection_lost(self, exc: Exception | None) -> None:
                self.conn.connection_lost(exc)
                closed.set()

        _, watched = await loop.create_connection(Watched, "127.0.0.1", port)
        conn = watched.conn
        await asyncio.wait_for(closed.wait(), 10)
        with pytest.raises(TransportError, match="closed by the peer"):
            conn.write(bytes(options("w1", transport="TCP")))
        # The window before connection_lost runs: the transport is closing under the connection (as
        # asyncio's TLS transport is at once on a fatal alert), which the connection did not ask for.
        closed.clear()
        _, watched = await loop.create_connection(Watched, "127.0.0.1", port)
        conn = watched.conn
        assert conn.transport is not None
        conn.transport.abort()  # connection_lost comes on a later loop iteration
        with pytest.raises(TransportError, match="closed by the peer or on a transport error"):
            conn.write(bytes(options("w2", transport="TCP")))
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        await layer.close()
        server.close()
        await server.wait_closed()


async def tls_round_trip(
    client: TransportLayer, replies: Echo, server: TransportLayer, echo: Echo, call_id: str
) -> None:
    """An OPTIONS from ``client`` to ``server``'s TLS listener arrives over TLS and is answered 200."""
    host, port = server.listening["tls"][0]
    client.send(options(call_id, transport="TLS"), Target("tls", host, port))
    msg, source = await asyncio.wait_for(echo.got.get(), 10)
    assert source.transport == "tls" and isinstance(msg, Request)
    answer, _ = await asyncio.wait_for(replies.got.get(), 10)
    assert isinstance(answer, Response) and answer.status == 200


async def test_tls_with_a_generated_certificate(tmp_path: object) -> None:
    tls = TLSConfig.self_signed(str(tmp_path))
    server, echo = await make_layer("tls:127.0.0.1:0", tls=tls)
    client, replies = await make_layer("udp:127.0.0.1:0", tls=tls)
    try:
        await tls_round_trip(client, replies, server, echo, "s1")
    finally:
        await client.close()
        await server.close()


async def test_tls_connection_between_two_peers_is_reused_both_ways(tmp_path: object) -> None:
    """RFC 5923-style reuse: peer A opens one TLS connection to B; B's own requests to A's TLS sent-by
    (the Via of A's request names A's listener) and A's later requests all go over that connection."""
    tls = TLSConfig.self_signed(str(tmp_path))
    a, a_got = await make_layer("tls:127.0.0.1:0", tls=tls)
    b, b_got = await make_layer("tls:127.0.0.1:0", tls=tls)
    a_host, a_port = a.listening["tls"][0]
    b_host, b_port = b.listening["tls"][0]
    try:
        via = f"{a_host}:{a_port}"
        a.send(options("r1", via=via, rport=False, transport="TLS"), Target("tls", b_host, b_port))
        first, first_src = await asyncio.wait_for(b_got.got.get(), 10)
        assert isinstance(first, Request)
        assert isinstance((await asyncio.wait_for(a_got.got.get(), 10))[0], Response)
        # B asks A something of its own: to A's listening address, yet over A's connection
        b.send(
            options("r2", via=f"{b_host}:{b_port}", rport=False, transport="TLS"),
            Target("tls", a_host, a_port),
        )
        back, back_src = await asyncio.wait_for(a_got.got.get(), 10)
        assert isinstance(back, Request) and back.call_id == "r2@test"
        assert isinstance((await asyncio.wait_for(b_got.got.get(), 10))[0], Response)
        # and A's second request goes over the same connection again
        a.send(options("r3", via=via, rport=False, transport="TLS"), Target("tls", b_host, b_port))
        again, again_src = await asyncio.wait_for(b_got.got.get(), 10)
        assert isinstance(again, Request) and again.call_id == "r3@test"
        assert again_src.connection is first_src.connection is not None
        assert back_src.connection is not None and back_src.connection.remote.port == b_port
        assert a.connection_count() == b.connection_count() == 1
        assert a.stats["connections_opened"] == b.stats["connections_opened"] == 1
    finally:
        await a.close()
        await b.close()


async def test_tls_listener_without_a_config_keeps_the_system_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``tls:`` listener without a TLSConfig presents a certificate made at start, but still trusts the
    system's store when connecting out — not only its own new certificate, which would refuse every
    other TLS server. (OpenSSL reads ``SSL_CERT_FILE`` as the system store: here, the server's cert.)"""
    server_tls = TLSConfig.self_signed(str(tmp_path))
    assert server_tls.certfile is not None
    server, echo = await make_layer("tls:127.0.0.1:0", tls=server_tls)
    monkeypatch.setenv("SSL_CERT_FILE", server_tls.certfile)
    client, replies = await make_layer("tls:127.0.0.1:0")
    try:
        assert client.tls is not None and client.tls.certfile and client.tls.cafile is None
        await tls_round_trip(client, replies, server, echo, "s3")
    finally:
        await client.close()
        await server.close()


async def test_tls_refuses_an_untrusted_certificate(tmp_path: object) -> None:
    server, _ = await make_layer("tls:127.0.0.1:0", tls=TLSConfig.self_signed(str(tmp_path)))
    client, _ = await make_layer("udp:127.0.0.1:0", tls=TLSConfig(verify=True, cafile=None))
    errors: asyncio.Queue[Exception] = asyncio.Queue()
    try:
        host, port = server.listening["tls"][0]
        client.send(options("s2", transport="TLS"), Target("tls", host, port), errors.put_nowait)
        err = await asyncio.wait_for(errors.get(), 10)
        assert isinstance(err, TransportError)
    finally:
        await client.close()
        await server.close()


async def test_ipv6_udp() -> None:
    try:
        layer, echo = await make_layer("udp:[::1]:0")
    except ConfigError:
        pytest.skip("no IPv6 loopback on this machine")
    client = UdpClient("::1")
    try:
        addr = layer.listening["udp"][0]
        await client.send(options("v6", via="[::1]:1"), addr)
        answer = parse(await client.recv())
        assert isinstance(answer, Response) and answer.status == 200
        _msg, source = await asyncio.wait_for(echo.got.get(), 5)
        assert source.host == "::1"
    finally:
        client.close()
        await layer.close()


async def test_malformed_request_over_tcp_gets_400_on_its_connection() -> None:
    layer, echo = await make_layer("tcp:127.0.0.1:0")
    try:
        host, port = layer.listening["tcp"][0]
        reader, writer = await asyncio.open_connection(host, port)
        bad = options("tb", transport="TCP").replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
        writer.write(bad + options("tg", transport="TCP"))  # a bad one, then a good one on the same stream
        await writer.drain()
        data = b""
        while data.count(b"\r\n\r\n") < 2:
            data += await asyncio.wait_for(reader.read(65535), 5)
        assert data.startswith(b"SIP/2.0 400 Bad Request (") and b"SIP/2.0 200" in data
        assert echo.got.qsize() == 1 and layer.stats["bad_request_answers"] == 1
        writer.close()
    finally:
        await layer.close()
