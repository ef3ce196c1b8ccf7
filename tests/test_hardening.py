"""Hostile input at the SIP stack (issue 17 "State that never goes away", issue 11's oversize edge).

Every probe here is bounded in count and time and runs on loopback. Each test failed before its fix.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from p2psip.message import Request, Response, parse
from p2psip.proxy import Proxy
from p2psip.stack import Source, Stack
from p2psip.timers import TimerConfig
from p2psip.transaction import ServerTransaction

FAST = TimerConfig(t1=0.01, t2=0.04, t4=0.05)  # Timer J = 64*T1 = 0.64 s


def options(port: int, n: int, *, extra: str = "", method: str = "OPTIONS") -> bytes:
    return (
        f"{method} sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKh{n}\r\n"
        f"{extra}"
        f"From: <sip:a@127.0.0.1>;tag={n}\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: h{n}\r\n"
        f"CSeq: 1 {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.fixture
async def udp_client() -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


async def recv_all(sock: socket.socket, count: int, timeout: float = 10.0) -> list[Response]:
    """Read ``count`` responses (or fewer, when the deadline passes first)."""
    loop = asyncio.get_running_loop()
    out: list[Response] = []
    deadline = loop.time() + timeout
    while len(out) < count and loop.time() < deadline:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65535), deadline - loop.time())
        except TimeoutError:
            break
        msg = parse(data)
        assert isinstance(msg, Response)
        out.append(msg)
    return out


async def wait_for(condition: object, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if condition():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


# ------------------------------------------------------------------------------------ the core raises


async def test_a_malformed_second_via_is_answered_400_and_leaves_no_transaction(
    udp_client: socket.socket,
) -> None:
    # The proxy's loop detection parses every Via: a malformed second one raised out of the core, which
    # never answered, and the server transaction stayed alive for ever (1,000 OPTIONS -> 1,000 leaked).
    stack = await Stack.start(["udp:127.0.0.1:0"], timers=FAST)
    try:
        Proxy(stack)
        host, port = stack.local_address("udp")
        me = udp_client.getsockname()[1]
        bad = "Via: SIP/2.0/UDP 127.0.0.1;branch=\r\n"
        n = 1000
        answers: list[Response] = []
        for start in range(0, n, 100):  # bounded bursts so the kernel buffer holds the answers
            for i in range(start, start + 100):
                udp_client.sendto(options(me, i, extra=bad), (host, port))
            answers += await recv_all(udp_client, 100)
        assert len(answers) == n
        assert {a.status for a in answers} == {400}
        assert await wait_for(lambda: len(stack.transactions) == 0, 10.0), len(stack.transactions)
        # The proxy's checks raise the ParseError as the SIPStatusError it is and answer it themselves;
        # the stack's answer_failure (for a core that raises anything else) is not needed on this path.
        assert stack.stats["handler_errors"] == 0
    finally:
        await stack.close()


class _Raising(Proxy):
    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        raise RuntimeError("a bug in the core")

    def on_terminated(self, transaction: object) -> None:
        # Raised from the stack's timer callback, this stopped the timer from being armed again: every
        # transaction after it lived for ever.
        raise RuntimeError("another bug in the core")


async def test_any_exception_in_the_core_is_a_500(udp_client: socket.socket) -> None:
    stack = await Stack.start(["udp:127.0.0.1:0"], timers=FAST)
    try:
        _Raising(stack)
        host, port = stack.local_address("udp")
        me = udp_client.getsockname()[1]
        udp_client.sendto(options(me, 1), (host, port))
        udp_client.sendto(options(me, 2, method="INVITE"), (host, port))
        answers = await recv_all(udp_client, 3)
        await asyncio.sleep(0.3)  # a third transaction whose timer comes after the first ones fired
        udp_client.sendto(options(me, 3), (host, port))
        answers += await recv_all(udp_client, 1)
        finals = sorted(a.status for a in answers if a.status >= 200)
        assert finals[:3] == [500, 500, 500]
        assert all("a bug" not in a.reason for a in answers)  # no internals to the remote side
        assert await wait_for(lambda: len(stack.transactions) == 0, 10.0), len(stack.transactions)
    finally:
        await stack.close()


# ------------------------------------------------------------------------------------ oversized input


class _Answer200:
    """A core that answers every request 200 (ACK aside): what reaches it was framed and parsed."""

    stateful = True

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.seen: list[Request] = []
        stack.attach(self)  # type: ignore[arg-type]

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        self.seen.append(request)
        if transaction is not None and request.method != "ACK":
            self.stack.respond(transaction, Response.for_request(request, 200))

    def on_response(self, *args: object) -> None: ...

    def on_timeout(self, *args: object) -> None: ...

    def on_transport_failure(self, *args: object) -> None: ...

    def on_terminated(self, *args: object) -> None: ...


@pytest.fixture
async def answering() -> AsyncIterator[tuple[Stack, _Answer200]]:
    stack = await Stack.start(["127.0.0.1:0"], timers=FAST)
    core = _Answer200(stack)
    yield stack, core
    await stack.close()


def big(
    via_port: int,
    n: int,
    *,
    transport: str = "UDP",
    headers: str = "",
    body: bytes = b"",
    length: int | None = None,
) -> bytes:
    head = (
        f"MESSAGE sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} 127.0.0.1:{via_port};branch=z9hG4bKbig{n}\r\n"
        f"From: <sip:a@127.0.0.1>;tag={n}\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: big{n}\r\n"
        f"CSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\n{headers}"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


OVERSIZED_UDP = {
    "a 9,000-byte header line": ("X-Long: " + "y" * 9000 + "\r\n", b"", None, 513),
    "a 60 KB header": ("X-Huge: " + "y" * 60_000 + "\r\n", b"", None, 513),
    "300 headers": ("".join(f"X-H{i}: v\r\n" for i in range(300)), b"", None, 513),
    "Content-Length 10^7": ("", b"hello", 10_000_000, 400),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED_UDP))
async def test_oversized_datagrams_are_answered_not_dropped(
    case: str, answering: tuple[Stack, _Answer200], udp_client: socket.socket
) -> None:
    stack, core = answering
    headers, body, length, status = OVERSIZED_UDP[case]
    me = udp_client.getsockname()[1]
    udp_client.sendto(big(me, 1, headers=headers, body=body, length=length), stack.local_address("udp"))
    [answer] = await recv_all(udp_client, 1)
    assert answer.status == status, answer.reason
    assert answer.call_id == "big1"
    assert not core.seen  # the stack answered; the core never saw it


def tcp_exchange(addr: tuple[str, int], data: bytes, *, until_closed: bool = True) -> tuple[bytes, bool]:
    """Send ``data`` (in chunks, ignoring a reset once the peer gave up) and read one response, then (with
    ``until_closed``) on until the peer closes; 5 s at most. Returns (what was read, whether it closed)."""
    with socket.create_connection(addr, timeout=5) as sock:
        try:
            for i in range(0, len(data), 65536):
                sock.sendall(data[i : i + 65536])
        except OSError:
            pass
        got = b""
        try:
            while until_closed or b"\r\n\r\n" not in got:
                part = sock.recv(65536)
                if not part:
                    return got, True
                got += part
        except (TimeoutError, OSError):
            pass
        return got, False


def statuses(data: bytes) -> list[int]:
    return [int(line.split(b" ")[1]) for line in data.split(b"\r\n") if line.startswith(b"SIP/2.0 ")]


OVERSIZED_TCP = {
    "a 70 KB body": big(1, 1, transport="TCP", body=b"x" * 70_000),
    "Content-Length 10^7": big(1, 1, transport="TCP", body=b"x" * 100, length=10_000_000),
    "1 MiB without a blank line": big(1, 1, transport="TCP")[:-4] + b"\r\nX-More: " + b"y" * (1 << 20),
}


FRAMED_TCP = {
    "a 9,000-byte header line": big(1, 1, transport="TCP", headers="X-Long: " + "y" * 9000 + "\r\n"),
    "300 headers": big(1, 1, transport="TCP", headers="".join(f"X-H{i}: v\r\n" for i in range(300))),
}


@pytest.mark.parametrize("case", sorted(FRAMED_TCP))
async def test_a_framed_message_over_a_limit_gets_513_and_the_connection_stays(
    case: str, answering: tuple[Stack, _Answer200]
) -> None:
    stack, core = answering
    got, closed = await asyncio.to_thread(
        tcp_exchange, stack.local_address("tcp"), FRAMED_TCP[case], until_closed=False
    )
    assert statuses(got) == [513], got[:200]
    assert not closed and not core.seen


@pytest.mark.parametrize("case", sorted(OVERSIZED_TCP))
async def test_oversized_stream_messages_get_513_then_the_connection_closes(
    case: str, answering: tuple[Stack, _Answer200]
) -> None:
    stack, core = answering
    addr = stack.local_address("tcp")
    got, closed = await asyncio.to_thread(tcp_exchange, addr, OVERSIZED_TCP[case])
    assert statuses(got) == [513], got[:200]
    assert closed
    assert not core.seen
    assert await wait_for(lambda: stack.stats["connections"] == 0)


async def test_a_framed_message_is_delivered_before_the_garbage_after_it(
    answering: tuple[Stack, _Answer200],
) -> None:
    # Before: StreamFramer.feed raised on the garbage and the valid message cut in the same read was lost.
    stack, core = answering
    good = big(1, 7, transport="TCP", body=b"hello")
    garbage = b"NOT SIP\r\nContent-Length: banana\r\n\r\n"
    got, closed = await asyncio.to_thread(tcp_exchange, stack.local_address("tcp"), good + garbage)
    assert statuses(got)[:1] == [200]
    assert [r.call_id for r in core.seen] == ["big7"]
    assert closed


# ------------------------------------------------------------------------------------------ slowloris


def _trickle(
    addr: tuple[str, int], wrap: object = None, *, seconds: float, source: str = "127.0.0.1"
) -> float:
    """Open a connection and send one byte of a never-ending header every 50 ms; return how long the
    server kept it open (``seconds`` at most)."""
    import ssl
    import time

    raw = socket.create_connection(addr, timeout=5, source_address=(source, 0))
    sock: socket.socket = raw
    if wrap == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(raw)
    data = b"OPTIONS sip:bob@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKslow\r\nX: "
    started = time.monotonic()
    sock.settimeout(0.05)
    try:
        i = 0
        while time.monotonic() - started < seconds:
            sock.sendall(data[i : i + 1] if i < len(data) else b"y")
            i += 1
            try:
                if sock.recv(100) == b"":
                    break
            except TimeoutError:
                pass
    except OSError:
        pass
    finally:
        sock.close()
    return time.monotonic() - started


@pytest.mark.parametrize("transport", ["tcp", "tls", "ws"])
async def test_a_trickled_message_is_cut_at_the_deadline(transport: str) -> None:
    from p2psip.streamguard import StreamLimits

    # Before: only silence counted; a byte every 20 s kept a connection (and its buffer) for ever.
    stack = await Stack.start(
        [f"{transport}:127.0.0.1:0"], streams=StreamLimits(message_timeout=0.5), idle_timeout=300
    )
    try:
        _Answer200(stack)
        addr = stack.local_address(transport)
        kept = await asyncio.to_thread(_trickle, addr, "tls" if transport == "tls" else None, seconds=6)
        assert kept < 3.0, kept
        assert stack.stats["slow_closed"] == 1
        assert await wait_for(lambda: stack.stats["connections"] == 0)
    finally:
        await stack.close()


async def test_a_busy_connection_is_not_mistaken_for_a_slow_one() -> None:
    from p2psip.streamguard import StreamLimits

    stack = await Stack.start(["tcp:127.0.0.1:0"], streams=StreamLimits(message_timeout=0.3))
    try:
        core = _Answer200(stack)
        _reader, writer = await asyncio.open_connection(*stack.local_address("tcp"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        n = 0
        rest = b""
        while loop.time() - started < 1.5:  # every write ends mid-message, but messages keep completing
            message = big(1, n, transport="TCP", body=b"x" * 50)
            cut = len(message) // 2
            writer.write(rest + message[:cut])
            rest = message[cut:]
            await writer.drain()
            await asyncio.sleep(0.1)
            n += 1
        writer.write(rest)
        await writer.drain()
        assert await wait_for(lambda: len(core.seen) == n)
        assert stack.stats["slow_closed"] == 0 and stack.stats["connections"] == 1
        writer.close()
    finally:
        await stack.close()


async def test_connections_are_capped_per_source_and_in_all() -> None:
    from p2psip.streamguard import StreamLimits

    stack = await Stack.start(["tcp:127.0.0.1:0"], streams=StreamLimits(max_connections=5, max_per_source=3))
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        _Answer200(stack)
        addr = stack.local_address("tcp")

        async def connect(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            pair = await asyncio.open_connection(*addr, local_addr=(source, 0))
            opened.append(pair)
            return pair

        async def refused(pair: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
            try:
                return await asyncio.wait_for(pair[0].read(1), 5) == b""
            except (ConnectionError, OSError):
                return True

        for _ in range(3):
            await connect("127.0.0.1")
        assert await refused(await connect("127.0.0.1"))  # the 4th from one address
        assert stack.transport.guard.refused_per_source == 1
        for _ in range(2):
            await connect("127.0.0.2")
        assert await refused(await connect("127.0.0.3"))  # the 6th in all
        assert stack.transport.guard.refused_total == 1
        assert stack.stats["connections_refused"] == 2 and stack.stats["connections"] == 5
        for _, writer in opened[:3]:
            writer.close()
        assert await wait_for(lambda: stack.transport.guard.per_source.get("127.0.0.1", 0) == 0)
        reader, writer = await connect("127.0.0.1")  # freed slots are free again
        writer.write(big(1, 1, transport="TCP"))
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"SIP/2.0 200")
    finally:
        for _, writer in opened:
            writer.close()
        await stack.close()


# ------------------------------------------------------------------------------------------ Server header


async def test_responses_made_here_carry_a_configurable_server_header(udp_client: socket.socket) -> None:
    from p2psip.transport import SERVER

    me = udp_client.getsockname()[1]
    named = await Stack.start(["udp:127.0.0.1:0"], server="acme-peer/2")
    default = await Stack.start(["udp:127.0.0.1:0"])
    silent = await Stack.start(["udp:127.0.0.1:0"], server=None)
    try:
        for stack, expected in ((named, "acme-peer/2"), (default, SERVER), (silent, None)):
            _Answer200(stack)
            udp_client.sendto(options(me, id(stack)), stack.local_address("udp"))
            [answer] = await recv_all(udp_client, 1)
            assert answer.get("Server") == expected
        assert SERVER.startswith("p2psip/")
        # A proxy forwards other elements' responses as they are: it never stamps them with its own name.
        proxy = Proxy(silent)
        host, port = named.local_address("udp")
        udp_client.sendto(
            options(me, 99).replace(b"sip:bob@127.0.0.1 ", f"sip:bob@{host}:{port} ".encode()),
            silent.local_address("udp"),
        )
        [forwarded] = await recv_all(udp_client, 1)
        assert forwarded.status == 200 and forwarded.get_all("Server") == ["acme-peer/2"]
        assert proxy.stats["forwarded_responses"] == 1
    finally:
        for stack in (named, default, silent):
            await stack.close()


async def test_the_user_agent_header_is_configurable_or_absent() -> None:
    from p2psip.useragent import UserAgent

    server = await Stack.start(["udp:127.0.0.1:0"])
    client = await Stack.start(["udp:127.0.0.1:0"])
    try:
        core = _Answer200(server)
        host, port = server.local_address("udp")
        for name, expected in (("acme-phone/1", "acme-phone/1"), (None, None)):
            ua = UserAgent(client, "sip:alice@127.0.0.1", user_agent=name)
            assert (await ua.message(f"sip:bob@{host}:{port}", "hi")).status == 200
            assert core.seen[-1].get("User-Agent") == expected
    finally:
        await client.close()
        await server.close()
