"""UserAgent <-> UserAgent on real loopback sockets: calls over UDP, TCP, TLS and IPv6, reject, cancel,
MESSAGE, OPTIONS, REGISTER with digest and refresh."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from p2psip.auth import DigestServer
from p2psip.errors import ConfigError
from p2psip.message import Request, Response
from p2psip.stack import Source, Stack
from p2psip.timers import TimerConfig
from p2psip.transaction import ClientTransaction, ServerTransaction, Transaction
from p2psip.transport import TLSConfig
from p2psip.useragent import (
    RETRY_AFTER_MAX,
    CallFailed,
    IncomingCall,
    UserAgent,
    register_retry_delay,
)

SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def uri_of(stack: Stack, user: str, transport: str) -> str:
    host, port = stack.local_address(transport)
    host = f"[{host}]" if ":" in host else host
    scheme = "sips" if transport == "tls" else "sip"
    param = ";transport=tcp" if transport == "tcp" else ""
    return f"{scheme}:{user}@{host}:{port}{param}"


@pytest.fixture
async def pair(
    request: pytest.FixtureRequest, tmp_path: object
) -> AsyncIterator[tuple[UserAgent, UserAgent]]:
    transport, host = getattr(request, "param", ("udp", "127.0.0.1"))
    shown = f"[{host}]" if ":" in host else host
    tls = TLSConfig.self_signed(str(tmp_path)) if transport == "tls" else None
    try:
        a = await Stack.start([f"{transport}:{shown}:0", f"udp:{shown}:0"], tls=tls)
    except ConfigError:
        pytest.skip(f"cannot listen on {host}")
    b = await Stack.start([f"{transport}:{shown}:0", f"udp:{shown}:0"], tls=tls)
    alice = UserAgent(a, f"sip:alice@{shown}")
    bob = UserAgent(b, f"sip:bob@{shown}")
    try:
        yield alice, bob
    finally:
        await alice.close()
        await bob.close()
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "pair",
    [("udp", "127.0.0.1"), ("tcp", "127.0.0.1"), ("tls", "127.0.0.1"), ("udp", "::1")],
    indirect=True,
    ids=["udp", "tcp", "tls", "ipv6"],
)
async def test_call_answer_and_hang_up(pair: tuple[UserAgent, UserAgent]) -> None:
    alice, bob = pair
    listens = bob.stack.transport.listens_on
    transport = "tls" if listens("tls") else "tcp" if listens("tcp") else "udp"

    def on_call(call: IncomingCall) -> None:
        call.ring()
        call.accept(SDP)

    bob.on_call = on_call
    call = await alice.call(uri_of(bob.stack, "bob", transport), body=SDP, timeout=20)
    assert call.state == "confirmed" and call.response is not None and call.response.status == 200
    assert call.remote_body == SDP
    assert any(r.status == 180 for r in call.provisional)
    incoming = await asyncio.wait_for(bob.incoming.get(), 5)
    await asyncio.wait_for(incoming.confirmed.wait(), 10)  # our ACK arrived
    assert incoming.remote_body == SDP
    bye = await call.bye()
    assert bye.status == 200
    assert await incoming.wait_ended(10) == "bye received"
    if transport != "udp":
        assert bob.stack.stats["connections"] >= 1


async def test_reject_gives_the_status(pair: tuple[UserAgent, UserAgent]) -> None:
    alice, bob = pair
    bob.on_call = lambda call: call.reject(486)
    with pytest.raises(CallFailed) as failed:
        await alice.call(uri_of(bob.stack, "bob", "udp"), timeout=20)
    assert failed.value.status == 486


async def test_cancel_before_answer(pair: tuple[UserAgent, UserAgent]) -> None:
    alice, bob = pair
    bob.on_call = lambda call: call.ring()
    call = alice.invite(uri_of(bob.stack, "bob", "udp"))
    incoming = await asyncio.wait_for(bob.incoming.get(), 10)
    await asyncio.wait_for(call.early.wait(), 10)  # the 180 reached alice
    call.cancel()
    with pytest.raises(CallFailed) as failed:
        await call.answered(20)
    assert failed.value.status == 487
    assert await incoming.wait_ended(10) == "cancelled"


@pytest.mark.parametrize("audio", [False, True], ids=["plain", "with-audio"])
async def test_a_call_whose_task_is_cancelled_while_ringing_sends_cancel(
    pair: tuple[UserAgent, UserAgent], audio: bool
) -> None:
    """``asyncio.wait_for(ua.call(...), t)`` or cancelling the task must not leave the far end ringing:
    the INVITE is CANCELled (the callee sees its call end as cancelled) and the 487 is ACKed."""
    alice, bob = pair
    bob.on_call = lambda call: call.ring()
    options = {"media_options": {"ice": None}} if audio else {}
    task = asyncio.ensure_future(alice.call(uri_of(bob.stack, "bob", "udp"), **options))
    incoming = await asyncio.wait_for(bob.incoming.get(), 10)
    (placing,) = alice._placing  # the INVITE reached bob, so alice is placing it
    await asyncio.wait_for(placing.early.wait(), 10)  # ringing at alice: a CANCEL may go at once
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await incoming.wait_ended(10) == "cancelled"
    with pytest.raises(CallFailed) as failed:
        await placing.answered(10)
    assert failed.value.status == 487


async def test_message_and_options(pair: tuple[UserAgent, UserAgent]) -> None:
    alice, bob = pair
    target = uri_of(bob.stack, "bob", "udp")
    response = await alice.message(target, "hello bob")
    assert response.status == 200
    got = await asyncio.wait_for(bob.messages.get(), 5)
    assert got.body == b"hello bob" and got.from_.uri.user == "alice"
    options = await alice.options(target)
    assert options.status == 200 and "MESSAGE" in options.get_all("Allow")


async def test_in_dialog_info_and_reinvite(pair: tuple[UserAgent, UserAgent]) -> None:
    alice, bob = pair
    bob.on_call = lambda call: call.accept(SDP)
    call = await alice.call(uri_of(bob.stack, "bob", "udp"), body=SDP, timeout=20)
    info = await call.send("INFO", body=b"Signal=5\r\n", content_type="application/dtmf-relay")
    assert info.status == 200
    again = await call.send("INVITE", body=SDP, content_type="application/sdp")
    assert again.status == 200
    incoming = await asyncio.wait_for(bob.incoming.get(), 5)
    assert incoming.dialog is not None and incoming.dialog.remote_cseq == 3  # INVITE 1, INFO 2, INVITE 3
    assert (await call.bye()).status == 200


async def test_unknown_dialog_gets_481(pair: tuple[UserAgent, UserAgent]) -> None:
    alice, bob = pair
    response = await alice.request("BYE", uri_of(bob.stack, "bob", "udp"))
    assert response.status == 481


class Registrar:
    """A minimal registrar core for the test: digest (MD5 and SHA-256) and one binding per AOR."""

    stateful = True

    def __init__(self, stack: Stack, min_expires: int = 0) -> None:
        self.stack = stack
        self.min_expires = min_expires
        self.digest = DigestServer("test.realm", {"alice": "secret"}.get)
        self.bindings: dict[str, str] = {}
        self.registers: asyncio.Queue[Request] = asyncio.Queue()
        self.refusals: list[tuple[int, str]] = []
        """(status, Retry-After) to answer the next REGISTERs with, in turn, before accepting again."""
        self.refused: list[tuple[float, Request]] = []
        stack.attach(self)

    def on_request(self, request: Request, transaction: ServerTransaction | None, source: Source) -> None:
        if transaction is None or request.method != "REGISTER":
            return
        _result, challenge = self.digest.check(request, self.stack.loop.time())
        if challenge is not None:
            self.stack.respond(transaction, challenge)
            return
        if self.refusals:
            status, retry_after = self.refusals.pop(0)
            self.refused.append((self.stack.loop.time(), request))
            busy = Response.for_request(request, status)
            busy.add("Retry-After", retry_after)
            self.stack.respond(transaction, busy)
            return
        if (request.expires or 0) < self.min_expires:
            brief = Response.for_request(request, 423)
            brief.add("Min-Expires", str(self.min_expires))
            self.stack.respond(transaction, brief)
            return
        self.registers.put_nowait(request)
        response = Response.for_request(request, 200)
        contact = request.contacts[0]
        self.bindings[request.to.uri.aor()] = str(contact.uri)
        response.add("Contact", f"<{contact.uri}>;expires={min(request.expires or 3600, 2)}")
        self.stack.respond(transaction, response)

    def on_response(self, response: Response, transaction: ClientTransaction | None, source: object) -> None:
        pass

    def on_timeout(self, transaction: Transaction, timer: str) -> None:
        pass

    def on_transport_failure(self, transaction: Transaction, error: str) -> None:
        pass

    def on_terminated(self, transaction: Transaction) -> None:
        pass


async def test_register_with_digest_and_refresh() -> None:
    reg_stack = await Stack.start(["udp:127.0.0.1:0"])
    ua_stack = await Stack.start(["udp:127.0.0.1:0"], timers=TimerConfig(t1=0.1, t2=0.4, t4=0.5))
    registrar = Registrar(reg_stack)
    alice = UserAgent(ua_stack, "sip:alice@127.0.0.1")
    try:
        host, port = reg_stack.local_address("udp")
        response = await alice.register(f"sip:{host}:{port}", expires=60, password="secret")
        assert response.status == 200
        first = await asyncio.wait_for(registrar.registers.get(), 5)
        assert first.get("Authorization") is not None
        assert registrar.bindings["sip:alice@127.0.0.1"].startswith("sip:alice@127.0.0.1:")
        # The registrar granted 2 s: the UA refreshes after 1 s, answering a fresh challenge.
        second = await asyncio.wait_for(registrar.registers.get(), 10)
        assert second.call_id == first.call_id and second.cseq.number > first.cseq.number
        with pytest.raises(CallFailed) as failed:
            await alice.register(f"sip:{host}:{port}", password="wrong", refresh=False)
        assert failed.value.status == 401
    finally:
        await alice.close()
        await ua_stack.close()
        await reg_stack.close()


async def test_register_retries_after_423_interval_too_brief() -> None:
    reg_stack = await Stack.start(["udp:127.0.0.1:0"])
    ua_stack = await Stack.start(["udp:127.0.0.1:0"])
    registrar = Registrar(reg_stack, min_expires=30)
    alice = UserAgent(ua_stack, "sip:alice@127.0.0.1", password="secret")
    try:
        host, port = reg_stack.local_address("udp")
        response = await alice.register(f"sip:{host}:{port}", expires=5, refresh=False)
        assert response.status == 200
        accepted = await asyncio.wait_for(registrar.registers.get(), 5)
        assert accepted.expires == 30
    finally:
        await alice.close()
        await ua_stack.close()
        await reg_stack.close()


@contextlib.asynccontextmanager
async def alice_and_registrar() -> AsyncIterator[tuple[UserAgent, Registrar, str]]:
    """Alice's UA (password ``secret``) and a :class:`Registrar`, each on its own loopback stack, and the
    registrar's ``sip:HOST:PORT``; all closed on exit."""
    reg_stack = await Stack.start(["udp:127.0.0.1:0"])
    ua_stack = await Stack.start(["udp:127.0.0.1:0"])
    alice = UserAgent(ua_stack, "sip:alice@127.0.0.1", password="secret")
    try:
        host, port = reg_stack.local_address("udp")
        yield alice, Registrar(reg_stack), f"sip:{host}:{port}"
    finally:
        await alice.close()
        await ua_stack.close()
        await reg_stack.close()


async def test_register_waits_out_a_503_retry_after_then_registers() -> None:
    """RFC 3261 §21.5.4: a registrar that sheds load answers 503 with Retry-After; the UA asks again once
    that time is over (not before, and not much later), in the same call of ``register``."""
    async with alice_and_registrar() as (alice, registrar, where):
        registrar.refusals = [(503, "1")]
        response = await alice.register(where, expires=60, refresh=False)
        assert response.status == 200
        accepted = await asyncio.wait_for(registrar.registers.get(), 5)
        [(refused_at, refused)] = registrar.refused
        waited = registrar.stack.loop.time() - refused_at
        assert 1.0 <= waited < 1.25 + 0.5, waited  # Retry-After, jittered up by at most a quarter
        assert accepted.call_id == refused.call_id and accepted.cseq.number > refused.cseq.number
        with pytest.raises(CallFailed) as failed:  # a Retry-After beyond the timeout: not waited for
            registrar.refusals = [(503, "60")]
            await alice.register(where, expires=60, refresh=False, timeout=5)
        assert failed.value.status == 503


async def test_a_refused_refresh_is_asked_again_after_retry_after() -> None:
    """The refresh loop does not give up a binding on a failed refresh: a 500 with Retry-After: 1 (which
    ``register`` itself does not wait out) makes the loop try again about a second later."""
    async with alice_and_registrar() as (alice, registrar, where):
        await alice.register(where, expires=60)  # granted 2 s: refreshed after 1 s
        first = await asyncio.wait_for(registrar.registers.get(), 5)
        registrar.refusals = [(500, "1")]
        again = await asyncio.wait_for(registrar.registers.get(), 10)
        [(refused_at, refused)] = registrar.refused
        assert refused.call_id == again.call_id == first.call_id
        assert 1.0 <= registrar.stack.loop.time() - refused_at < 1.25 + 0.5
        assert again.cseq.number > refused.cseq.number


def test_register_retry_delay_honours_retry_after_and_backs_off() -> None:
    def top(low: float, high: float) -> float:
        return high

    def bottom(low: float, high: float) -> float:
        return low

    assert register_retry_delay(503, "1", 0, bottom) == 1.0 and register_retry_delay(503, "1", 0, top) == 1.25
    assert register_retry_delay(500, "120 (maintenance);duration=60", 3, bottom) == 120.0
    assert register_retry_delay(503, "999999", 0, bottom) == RETRY_AFTER_MAX  # bounded
    assert register_retry_delay(403, "10", 0, bottom) == 10.0  # the registrar said when: honoured
    # no Retry-After: RFC 5626 §4.5, between half and all of min(1800, 30 * 2**k)
    assert [register_retry_delay(503, None, k, top) for k in range(4)] == [30.0, 60.0, 120.0, 240.0]
    assert register_retry_delay(408, "soon", 0, bottom) == 15.0  # unreadable Retry-After: back-off
    assert register_retry_delay(500, None, 40, top) == 1800.0
    assert register_retry_delay(403, None, 0) is None and register_retry_delay(404, None, 2) is None


async def test_an_ignored_call_is_declined_after_answer_timeout(pair: tuple[UserAgent, UserAgent]) -> None:
    alice, bob = pair
    bob.answer_timeout = 0.5  # nobody looks at bob.incoming
    with pytest.raises(CallFailed) as failed:
        await alice.call(uri_of(bob.stack, "bob", "udp"), timeout=20)
    assert failed.value.status == 480


async def test_a_callback_ua_keeps_a_bounded_queue() -> None:
    """A UA that answers in callbacks and never reads ``incoming``/``messages`` does not keep every call and
    MESSAGE it ever had: the queues hold the latest ``queue_limit``."""
    a = await Stack.start(["udp:127.0.0.1:0"])
    b = await Stack.start(["udp:127.0.0.1:0"])
    seen: list[str] = []
    alice = UserAgent(a, "sip:alice@127.0.0.1")
    bob = UserAgent(
        b,
        "sip:bob@127.0.0.1",
        on_call=lambda incoming: incoming.accept(),
        on_message=lambda request: seen.append(request.body.decode()),
        queue_limit=3,
    )
    try:
        host, port = b.local_address("udp")
        for n in range(6):
            assert (await alice.message(f"sip:bob@{host}:{port}", f"m{n}")).status == 200
            call = await alice.call(f"sip:bob@{host}:{port}", timeout=5)
            await call.bye(timeout=5)
        assert seen == [f"m{n}" for n in range(6)]  # every one reached the callback
        assert bob.messages.qsize() == 3 and bob.incoming.qsize() == 3
        assert [bob.messages.get_nowait().body for _ in range(3)] == [b"m3", b"m4", b"m5"]  # the latest
    finally:
        await alice.close()
        await bob.close()
        await a.close()
        await b.close()
