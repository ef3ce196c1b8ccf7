"""The torture corpus against a live p2psip Stack over UDP and TCP on loopback.

Each case is sent from a plain socket, as a hostile or sloppy peer would. Rules:

- a valid request is answered, and the answer is *correct* for that request (RFC 3261 §8.2.6: same Call-ID,
  CSeq, From tag and top Via branch; a To tag on a final answer), and it is not a 400;
- a valid response is not answered (no transaction wants it);
- an invalid message is answered 400 (or the case's status, e.g. 505) or dropped; on TCP the connection
  may be closed;
- after every case the listener still answers an OPTIONS, and at the end its counters show the
  malformed messages were seen.

To know when "no answer" is final without sleeping, each UDP case is followed by an OPTIONS probe on the
same socket: the stack handles datagrams in order, so once the probe's answer is back, any answer to the
case would have arrived before it. On TCP a malformed stream may leave the server waiting for bytes that
never come; there the client half-closes and waits (bounded) for the server to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from p2psip.address import numeric_host
from p2psip.errors import ParseError
from p2psip.message import Request, Response, new_branch, parse
from p2psip.proxy import Proxy
from p2psip.stack import Source, Stack
from p2psip.transaction import ClientTransaction, ServerTransaction, Transaction
from p2psip.useragent import UserAgent

from .corpus import Case, load_all
from .test_parse import KNOWN_PARSER_GAPS

CASES = load_all()

# (role, case) pairs whose live answer is known to be wrong, reported to the owners; still sent (the
# listener must survive them) but not judged. Remove an entry when it is fixed.
KNOWN_LIVE_GAPS: dict[tuple[str, str], str] = {}
WAIT = 10.0  # generous: the machine is shared


class AnsweringCore:
    """A minimal transaction user: answers every request with a fixed, method-dependent status."""

    stateful = True
    STATUS = {"OPTIONS": 200, "INVITE": 486, "BYE": 481, "MESSAGE": 200, "REGISTER": 200}

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.requests = 0

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        self.requests += 1
        _ = request.max_forwards  # as any proxy or UA would: a malformed value raises ParseError here
        if transaction is None or request.method == "ACK":
            return
        status = self.STATUS.get(request.method, 501)
        self.stack.respond(transaction, Response.for_request(request, status))

    def on_response(
        self, response: Response, transaction: ClientTransaction | None, source: Source | None
    ) -> None:
        pass

    def on_timeout(self, transaction: Transaction, timer: str) -> None:
        pass

    def on_transport_failure(self, transaction: Transaction, error: str) -> None:
        pass

    def on_terminated(self, transaction: Transaction) -> None:
        pass


@dataclass
class Live:
    """The stack under test and which core answers on it (``core``, ``useragent`` or ``proxy``)."""

    stack: Stack
    role: str

    def probe_uri(self, transport: str) -> str:
        # the probe names the listener itself, so a proxy answers it instead of forwarding it
        host, port = self.stack.local_address(transport)
        return f"sip:probe@{host}:{port}"


@pytest.fixture(params=["core", "useragent", "proxy"])
async def live(request: pytest.FixtureRequest) -> AsyncIterator[Live]:
    st = await Stack.start(listen=["udp:127.0.0.1:0", "tcp:127.0.0.1:0"])
    role = str(request.param)
    if role == "core":
        st.attach(AnsweringCore(st))
    elif role == "useragent":
        UserAgent(st, "sip:bob@example.com", on_call=lambda call: call.reject(486))
    else:
        Proxy(st)
    try:
        yield Live(st, role)
    finally:
        await st.close()


def _loopback_only(case: Case) -> bool:
    """Whether a proxy may forward this case without sending anything off loopback: a valid request
    whose Request-URI, Route or maddr names a numeric non-loopback address is not sent to a proxy."""
    if not (case.valid and case.is_request):
        return True
    request = parse(case.data)
    assert isinstance(request, Request)
    uris = [request.uri, *(a.uri for a in request.route)]
    for uri in uris:
        for host in (uri.host, uri.maddr or ""):
            bare = host.strip("[]")
            if bare and numeric_host(bare) is not None and not bare.startswith(("127.", "::1")):
                return False
    return True


def _cases_for(live: Live) -> list[Case]:
    return [c for c in CASES if live.role != "proxy" or _loopback_only(c)]


_TOP_VIA = re.compile(rb"(?im)^(via|v)([ \t]*:[ \t]*SIP/2\.0/)(\w+)([ \t]+)([^;,\s]+)")


def localize(case: Case, host: str, port: int, transport: str) -> bytes:
    """The case's bytes with the test-net sender address replaced by our socket's, so every answer
    stays on loopback and reaches us. For a valid request the top Via's sent-by and transport are
    rewritten too (a valid message stays valid; an invalid one is left exactly as written)."""
    data = case.data.replace(b"192.0.2.1:5060", f"{host}:{port}".encode())
    if case.valid and case.is_request:
        data = _TOP_VIA.sub(
            lambda m: (
                m.group(1) + m.group(2) + transport.upper().encode() + m.group(4) + f"{host}:{port}".encode()
            ),
            data,
            count=1,
        )
    return data


def probe(host: str, port: int, transport: str, call_id: str, uri: str) -> bytes:
    branch = new_branch()
    return (
        f"OPTIONS {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport.upper()} {host}:{port};branch={branch};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:t@{host}>;tag=probe\r\nTo: <sip:probe@{host}>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@dataclass
class Outcome:
    answers: list[Response]
    closed: bool = False
    unparsable: list[bytes] = dataclasses.field(default_factory=list)
    """Answers our parser refuses, e.g. a 400 that repeats both Call-IDs of the bad request it answers."""


def read_answer(data: bytes, outcome: Outcome, *, datagram: bool = True) -> Response | None:
    try:
        msg = parse(data, datagram=datagram)
    except ParseError:
        outcome.unparsable.append(data)
        return None
    assert isinstance(msg, Response), "the stack sent a request to a test client"
    outcome.answers.append(msg)
    return msg


def check(case: Case, sent: bytes, outcome: Outcome, role: str) -> None:
    answers = outcome.answers
    if case.name in KNOWN_PARSER_GAPS or (role, case.name) in KNOWN_LIVE_GAPS:
        return  # still sent, to show the listener survives it; its answer is a known gap
    if case.valid and case.is_request:
        request = parse(sent)
        assert isinstance(request, Request)
        finals = [r for r in answers if r.status >= 200]
        assert finals, f"{case.name}: a valid request got no final answer ({case.about})"
        for resp in answers:
            assert resp.status != 400, f"{case.name}: valid request answered {resp.status} {resp.reason}"
            assert resp.call_id == request.call_id
            assert resp.cseq == request.cseq
            assert resp.from_.tag == request.from_.tag
            assert resp.top_via is not None and request.top_via is not None
            assert resp.top_via.branch == request.top_via.branch
            if resp.status > 100:
                assert resp.to.tag, f"{case.name}: a {resp.status} without To tag"
        expected = case.extra.get(role) or case.live
        if expected is not None and expected.isdigit():
            assert finals[0].status == int(expected), f"{case.name}: {finals[0].status}, want {expected}"
    elif case.valid:
        assert not answers, f"{case.name}: a stray response was answered: {answers[0].status}"
    else:
        allowed = set(case.status) | {400}
        for resp in answers:
            assert resp.status in allowed, (
                f"{case.name}: invalid message answered {resp.status} {resp.reason}"
            )


class UDPClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


async def _udp_case(case: Case, live: Live, index: int) -> None:
    server = live.stack.local_address("udp")
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(UDPClient, local_addr=("127.0.0.1", 0))
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        sent = localize(case, host, port, "udp")
        probe_id = f"probe-udp-{index}@test"
        transport.sendto(sent, server)
        transport.sendto(probe(host, port, "udp", probe_id, live.probe_uri("udp")), server)
        outcome = Outcome([])
        probed = False
        async with asyncio.timeout(WAIT):
            while True:
                msg = read_answer(await client.queue.get(), outcome)
                if msg is not None and msg.call_id == probe_id:
                    outcome.answers.remove(msg)
                    assert msg.status == 200
                    probed = True
                wants_final = case.valid and case.is_request
                if probed and (not wants_final or any(a.status >= 200 for a in outcome.answers)):
                    break
        check(case, sent, outcome, live.role)
    finally:
        transport.close()


async def _tcp_exchange(server: tuple[str, int], payload: bytes, until_call_id: str | None) -> Outcome:
    """Send ``payload`` on a fresh connection; read answers until one with ``until_call_id`` arrives, or
    the server closes; if neither happens in a while, half-close and wait for the close (bounded)."""
    from p2psip.message import StreamFramer

    reader, writer = await asyncio.open_connection(*server)
    framer = StreamFramer()
    outcome = Outcome([])
    half_closed = False
    try:
        writer.write(payload)
        await writer.drain()
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError("the server neither answered nor closed the connection")
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=min(remaining, 2.0))
            except TimeoutError:
                if not half_closed:
                    half_closed = True
                    writer.write_eof()
                continue
            except ConnectionResetError:
                outcome.closed = True
                return outcome
            if not chunk:
                outcome.closed = True
                return outcome
            for frame in framer.feed(chunk):
                read_answer(frame, outcome, datagram=False)
            if until_call_id and any(a.call_id == until_call_id for a in outcome.answers):
                outcome.answers = [a for a in outcome.answers if a.call_id != until_call_id]
                return outcome
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def _tcp_case(case: Case, live: Live, index: int) -> None:
    # A sent-by that is not the connection's address is fine on TCP: answers go back on the connection.
    server = live.stack.local_address("tcp")
    sent = localize(case, "127.0.0.1", 9, "tcp")
    probe_id = f"probe-tcp-{index}@test"
    payload = sent + probe("127.0.0.1", 9, "tcp", probe_id, live.probe_uri("tcp"))
    outcome = await _tcp_exchange(server, payload, probe_id)
    stream_case = dataclasses.replace(case, valid=bool(case.stream_valid))
    check(stream_case, sent, outcome, live.role)
    if stream_case.valid and stream_case.is_request:
        assert not outcome.closed or outcome.answers


async def _alive(live: Live) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(UDPClient, local_addr=("127.0.0.1", 0))
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        uri = live.probe_uri("udp")
        transport.sendto(probe(host, port, "udp", "alive-udp@test", uri), live.stack.local_address("udp"))
        async with asyncio.timeout(WAIT):
            answer = parse(await client.queue.get())
        assert isinstance(answer, Response) and answer.status == 200
    finally:
        transport.close()
    payload = probe("127.0.0.1", 9, "tcp", "alive-tcp@test", live.probe_uri("tcp"))
    outcome = await _tcp_exchange(live.stack.local_address("tcp"), payload, "alive-tcp@test")
    assert not outcome.closed, "the TCP listener closed a fresh connection carrying a valid OPTIONS"


async def test_corpus_over_udp(live: Live) -> None:
    cases = _cases_for(live)
    for index, case in enumerate(cases):
        await _udp_case(case, live, index)
    await _alive(live)
    rejected_by_parser = [
        c for c in cases if not c.valid and "lazy" not in c.extra and c.name not in KNOWN_PARSER_GAPS
    ]
    assert live.stack.stats["parse_errors"] >= len(rejected_by_parser)


async def test_corpus_over_tcp(live: Live) -> None:
    for index, case in enumerate(_cases_for(live)):
        await _tcp_case(case, live, index)
    await _alive(live)


def _named(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


async def _read_answers(reader: asyncio.StreamReader, call_ids: set[str]) -> dict[str, Response]:
    """Read framed answers until one final answer per Call-ID in ``call_ids`` arrived (bounded)."""
    from p2psip.message import StreamFramer

    framer = StreamFramer()
    finals: dict[str, Response] = {}
    async with asyncio.timeout(WAIT):
        while set(finals) != call_ids:
            chunk = await reader.read(65536)
            assert chunk, f"connection closed with answers missing for {call_ids - set(finals)}"
            for frame in framer.feed(chunk):
                msg = parse(frame, datagram=False)
                assert isinstance(msg, Response)
                if msg.status >= 200:
                    finals[msg.call_id] = msg
    return finals


async def test_stream_pipelining_split_writes_and_keepalives(live: Live) -> None:
    """On one TCP connection: two valid requests in a single write, a CRLFCRLF keep-alive (RFC 5626) between
    them, then a third request written one byte at a time. All three answered, in any order."""
    first, second, third = (
        localize(_named(n), "127.0.0.1", 9, "tcp")
        for n in ("v02_header_name_case", "v06_unknown_method", "v09_register_wildcard")
    )
    ids = {parse(m).call_id for m in (first, second, third)}
    reader, writer = await asyncio.open_connection(*live.stack.local_address("tcp"))
    try:
        writer.write(first + b"\r\n\r\n" + second)
        for byte in third:
            writer.write(bytes([byte]))
            await writer.drain()
        finals = await _read_answers(reader, ids)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    assert all(resp.status != 400 for resp in finals.values()), {k: v.status for k, v in finals.items()}
    await _alive(live)
