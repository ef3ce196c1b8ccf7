"""The proxy core on real loopback sockets: Record-Route and loose routing, parallel and sequential forking,
best-response selection, CANCEL, Timer C, Max-Forwards, no-DNS rejection, stateless mode."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from p2psip.message import Request, Response, parse
from p2psip.proxy import MAX_BRANCHES, Proxy, choose_best
from p2psip.stack import Stack
from p2psip.timers import TimerConfig
from p2psip.uri import URI, Address
from p2psip.useragent import CallFailed, IncomingCall, UserAgent

Factory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def new_stack() -> AsyncIterator[Factory]:
    made: list[Stack] = []

    async def make(**options: object) -> Stack:
        stack = await Stack.start(["udp:127.0.0.1:0"], **options)
        made.append(stack)
        return stack

    yield make
    for stack in made:
        await stack.close()


def addr(stack: Stack) -> str:
    host, port = stack.local_address("udp")
    return f"{host}:{port}"


async def parties(new_stack: Factory, n_callees: int, **proxy_options: object) -> tuple[
    Proxy, UserAgent, list[UserAgent]
]:
    proxy_stack = await new_stack(**proxy_options.pop("stack_options", {}))  # type: ignore[arg-type]
    proxy = Proxy(proxy_stack, **proxy_options)  # type: ignore[arg-type]
    alice = UserAgent(await new_stack(), "sip:alice@127.0.0.1", outbound=addr(proxy_stack))
    callees = [UserAgent(await new_stack(), f"sip:bob{i}@127.0.0.1") for i in range(n_callees)]
    return proxy, alice, callees


def contact(ua: UserAgent) -> URI:
    return URI(f"sip:{ua.aor.user}@{addr(ua.stack)}")


async def test_call_through_the_proxy_record_routes_and_bye_comes_back_through_it(new_stack: Factory) -> None:
    proxy, alice, (bob,) = await parties(new_stack, 1)
    bob.on_call = lambda call: call.accept()
    call = await alice.call(contact(bob), timeout=20)
    incoming = await asyncio.wait_for(bob.incoming.get(), 5)
    assert incoming.request.get("Record-Route") == f"<sip:{addr(proxy.stack)};lr>"
    assert incoming.request.max_forwards == 69
    assert call.dialog is not None and [str(r.uri) for r in call.dialog.route_set] == [
        f"sip:{addr(proxy.stack)};lr"
    ]
    await asyncio.wait_for(incoming.confirmed.wait(), 10)  # the ACK went alice -> proxy -> bob
    assert proxy.stats["stateless_acks"] >= 1  # (more if a 2xx was retransmitted on a busy machine)
    before = proxy.stats["forwarded_requests"]
    assert (await incoming.bye()).status == 200  # callee hangs up, through the proxy
    assert await call.wait_ended(10) == "bye received"
    assert proxy.stats["forwarded_requests"] == before + 1


async def test_parallel_forking_first_answer_wins_others_cancelled(new_stack: Factory) -> None:
    proxy, alice, (bob0, bob1) = await parties(new_stack, 2)
    proxy.locate = lambda request: [contact(bob0), contact(bob1)]
    bob0.on_call = lambda call: call.ring()
    answered = asyncio.Event()

    def answer_later(call: IncomingCall) -> None:
        call.ring()
        call.accept()
        answered.set()

    bob1.on_call = answer_later
    call = await alice.call("sip:bob@p2p.example", timeout=20)
    assert call.response is not None and call.response.status == 200
    ringing = await asyncio.wait_for(bob0.incoming.get(), 5)
    assert await ringing.wait_ended(10) == "cancelled"  # §16.7 step 10: the pending branch is CANCELled
    assert proxy.stats["cancelled_branches"] == 1
    await call.bye()


async def test_sequential_forking_by_q(new_stack: Factory) -> None:
    proxy, alice, (bob0, bob1) = await parties(new_stack, 2)
    proxy.locate = lambda request: [
        Address(f"<{contact(bob1)}>;q=0.5"),
        Address(f"<{contact(bob0)}>;q=1.0"),
    ]
    order: list[str] = []

    def reject(call: IncomingCall) -> None:
        order.append("bob0")
        call.reject(480)

    def accept(call: IncomingCall) -> None:
        order.append("bob1")
        call.accept()

    bob0.on_call = reject
    bob1.on_call = accept
    call = await alice.call("sip:bob@p2p.example", timeout=20)
    assert order == ["bob0", "bob1"]  # higher q first, the next tier only after the first failed
    await call.bye()


async def test_best_response_when_all_branches_fail(new_stack: Factory) -> None:
    proxy, alice, (bob0, bob1) = await parties(new_stack, 2)
    proxy.locate = lambda request: [contact(bob0), contact(bob1)]
    bob0.on_call = lambda call: call.reject(503)
    bob1.on_call = lambda call: call.reject(486)
    with pytest.raises(CallFailed) as failed:
        await alice.call("sip:bob@p2p.example", timeout=20)
    assert failed.value.status == 486


async def test_6xx_cancels_the_other_branches(new_stack: Factory) -> None:
    proxy, alice, (bob0, bob1) = await parties(new_stack, 2)
    proxy.locate = lambda request: [contact(bob0), contact(bob1)]
    rung = asyncio.Event()

    async def decline_after_ring() -> None:
        incoming = await bob1.incoming.get()
        await rung.wait()
        incoming.reject(603)

    bob0_calls: list[IncomingCall] = []

    def ring(call: IncomingCall) -> None:
        call.ring()
        bob0_calls.append(call)
        rung.set()

    bob0.on_call = ring
    task = asyncio.ensure_future(decline_after_ring())
    with pytest.raises(CallFailed) as failed:
        await alice.call("sip:bob@p2p.example", timeout=20)
    assert failed.value.status == 603
    assert await bob0_calls[0].wait_ended(10) == "cancelled"
    await task


def test_choose_best_rules() -> None:
    def r(status: int) -> Response:
        return Response(status)

    assert choose_best([r(486), r(603), r(404)]).status == 603  # type: ignore[union-attr]
    assert choose_best([r(404), r(401), r(486)]).status == 401  # type: ignore[union-attr]
    assert choose_best([r(503), r(302)]).status == 302  # type: ignore[union-attr]
    assert choose_best([r(503), r(500)]).status == 500  # type: ignore[union-attr]
    assert choose_best([]) is None


async def test_caller_cancel_through_the_proxy(new_stack: Factory) -> None:
    _proxy, alice, (bob,) = await parties(new_stack, 1)
    bob.on_call = lambda call: call.ring()
    call = alice.invite(contact(bob))
    incoming = await asyncio.wait_for(bob.incoming.get(), 10)
    await asyncio.wait_for(call.early.wait(), 10)
    call.cancel()
    with pytest.raises(CallFailed) as failed:
        await call.answered(20)
    assert failed.value.status == 487
    assert await incoming.wait_ended(10) == "cancelled"


async def test_timer_c_cancels_a_branch_that_only_rings(new_stack: Factory) -> None:
    _proxy, alice, (bob,) = await parties(
        new_stack, 1, stack_options={"timers": TimerConfig(timer_c=1.0)}
    )
    bob.on_call = lambda call: call.ring()
    with pytest.raises(CallFailed) as failed:
        await alice.call(contact(bob), timeout=20)
    assert failed.value.status == 487
    incoming = await asyncio.wait_for(bob.incoming.get(), 5)
    assert await incoming.wait_ended(10) == "cancelled"


async def test_loose_route_to_us_is_popped_and_strict_route_fixed(new_stack: Factory) -> None:
    proxy, alice, (bob,) = await parties(new_stack, 1)
    me = addr(proxy.stack)
    # A strict-routing previous hop: the Request-URI is our Record-Route URI, the real target the last Route.
    response = await alice.request("MESSAGE", f"sip:{me};lr", headers=[("Route", f"<{contact(bob)}>")])
    assert response.status == 200
    got = await asyncio.wait_for(bob.messages.get(), 5)
    assert got.uri == contact(bob) and got.get("Route") is None
    # A loose route naming us is removed; the Request-URI is kept.
    response = await alice.request("MESSAGE", contact(bob), headers=[("Route", f"<sip:{me};lr>")])
    assert response.status == 200
    got = await asyncio.wait_for(bob.messages.get(), 5)
    assert got.get("Route") is None


async def raw_request(stack: Stack, text: str) -> Response:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        data = text.replace("PORT", str(sock.getsockname()[1])).encode()
        await loop.sock_sendto(sock, data, stack.local_address("udp"))
        while True:
            answer = parse(await asyncio.wait_for(loop.sock_recv(sock, 65535), 10))
            assert isinstance(answer, Response)
            if answer.status >= 200:
                return answer


REQUEST = (
    "MESSAGE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bK{branch};rport\r\n"
    "Max-Forwards: {mf}\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <{uri}>\r\nCall-ID: {branch}\r\n"
    "CSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
)


async def test_max_forwards_zero_and_unroutable_names(new_stack: Factory) -> None:
    stack = await new_stack()
    proxy = Proxy(stack)
    answer = await raw_request(stack, REQUEST.format(uri="sip:b@127.0.0.1:9", branch="mf0", mf=0))
    assert answer.status == 483
    answer = await raw_request(stack, REQUEST.format(uri="sip:b@example.com", branch="dns", mf=70))
    assert answer.status == 404 and "DNS" in answer.reason
    assert proxy.stats["rejected"] == 2


async def test_stateless_proxy_call(new_stack: Factory) -> None:
    proxy, alice, (bob,) = await parties(new_stack, 1, stateless=True)
    assert not proxy.stateful
    bob.on_call = lambda call: call.accept()
    call = await alice.call(contact(bob), timeout=20)
    incoming = await asyncio.wait_for(bob.incoming.get(), 5)
    via = incoming.request.top_via
    assert via is not None and (via.branch or "").startswith("z9hG4bK-sl-")
    await asyncio.wait_for(incoming.confirmed.wait(), 10)
    before = proxy.stats["forwarded_requests"]
    assert (await call.bye()).status == 200
    assert proxy.stats["forwarded_requests"] >= before + 1  # the BYE (and its retransmissions, if any)
    assert proxy.stack.stats["transactions"] == 0


async def test_request_for_the_proxy_itself(new_stack: Factory) -> None:
    stack = await new_stack()
    Proxy(stack)
    me = addr(stack)
    answer = await raw_request(
        stack, REQUEST.replace("MESSAGE", "OPTIONS").format(uri=f"sip:{me}", branch="opt", mf=70)
    )
    assert answer.status == 200
    answer = await raw_request(stack, REQUEST.format(uri=f"sip:x@{me}", branch="self", mf=70))
    assert answer.status == 404


async def test_sequential_tier_timeout_moves_on(new_stack: Factory) -> None:
    proxy, alice, (bob0, bob1) = await parties(new_stack, 2, tier_timeout=0.5)
    proxy.locate = lambda request: [
        Address(f"<{contact(bob0)}>;q=1.0"),
        Address(f"<{contact(bob1)}>;q=0.5"),
    ]
    bob0.on_call = lambda call: call.ring()  # never answers: its tier times out
    bob1.on_call = lambda call: call.accept()
    call = await alice.call("sip:bob@p2p.example", timeout=20)
    ringing = await asyncio.wait_for(bob0.incoming.get(), 5)
    assert await ringing.wait_ended(10) == "cancelled"
    await call.bye()


async def test_asynchronous_locate(new_stack: Factory) -> None:
    proxy, alice, (bob,) = await parties(new_stack, 1)

    async def lookup(request: object) -> list[URI]:
        await asyncio.sleep(0)  # stands for a DHT round trip
        return [contact(bob)]

    proxy.locate = lookup
    bob.on_call = lambda call: call.accept()
    call = await alice.call("sip:bob@p2p.example", timeout=20)
    assert call.state == "confirmed"
    await call.bye()


async def test_asynchronous_locate_for_non_invite_requests(new_stack: Factory) -> None:
    """Regression: a non-INVITE server transaction is in Trying (not Proceeding) while an async locate
    runs; the proxy must still forward MESSAGE and OPTIONS once the lookup completes."""
    proxy, alice, (bob,) = await parties(new_stack, 1)
    looked_up: list[str] = []

    async def lookup(request: object) -> list[URI]:
        await asyncio.sleep(0)  # stands for a DHT round trip
        looked_up.append(getattr(request, "method", "?"))
        return [contact(bob)]

    proxy.locate = lookup
    reply = await asyncio.wait_for(alice.message("sip:bob@p2p.example", "hello"), 20)
    assert reply.status == 200
    got = await asyncio.wait_for(bob.messages.get(), 5)
    assert got.body == b"hello"
    options = await asyncio.wait_for(alice.options("sip:bob@p2p.example"), 20)
    assert options.status == 200 and options.get("Allow") is not None
    assert looked_up == ["MESSAGE", "OPTIONS"]


async def test_tcp_caller_udp_callee_double_record_route() -> None:
    proxy_stack = await Stack.start(["127.0.0.1:0"])  # UDP and TCP on one port
    alice_stack = await Stack.start(["127.0.0.1:0"])
    bob_stack = await Stack.start(["udp:127.0.0.1:0"])
    try:
        proxy = Proxy(proxy_stack)
        me = addr(proxy_stack)
        alice = UserAgent(alice_stack, "sip:alice@127.0.0.1", outbound=f"tcp:{me}")
        bob = UserAgent(bob_stack, "sip:bob@127.0.0.1", on_call=lambda call: call.accept())
        call = await alice.call(contact(bob), timeout=20)
        incoming = await asyncio.wait_for(bob.incoming.get(), 5)
        # RFC 5658: one Record-Route per side, the UDP one (bob's side) on top.
        assert incoming.request.get_all("Record-Route") == [f"<sip:{me};lr>", f"<sip:{me};transport=tcp;lr>"]
        await asyncio.wait_for(incoming.confirmed.wait(), 10)
        before = proxy.stats["forwarded_requests"]
        assert (await incoming.bye()).status == 200  # bob -> proxy (UDP) -> alice (TCP)
        assert await call.wait_ended(10) == "bye received"
        assert proxy.stats["forwarded_requests"] == before + 1
        assert alice_stack.stats["connections"] == 1
    finally:
        for stack in (proxy_stack, alice_stack, bob_stack):
            await stack.close()


async def test_loop_is_482_but_a_spiral_is_forwarded(new_stack: Factory) -> None:
    """§16.3 step 4: a request that comes back unchanged under our own Via looped (482); one that comes
    back retargeted (a different Request-URI) is spiralling and is forwarded."""
    proxy, alice, (bob,) = await parties(new_stack, 1)
    me = addr(proxy.stack)

    def locate(request: Request) -> list[URI]:
        user = request.uri.user
        if user in ("loop", "first"):  # back to ourselves, unchanged or retargeted to "second"
            request.add("Route", f"<sip:{me};lr>", first=True)
            return [request.uri if user == "loop" else URI("sip:second@p2p.example")]
        return [contact(bob)]

    proxy.locate = locate
    reply = await asyncio.wait_for(alice.message("sip:loop@p2p.example", "round and round"), 20)
    assert reply.status == 482
    reply = await asyncio.wait_for(alice.message("sip:first@p2p.example", "spiral"), 20)
    assert reply.status == 200
    got = await asyncio.wait_for(bob.messages.get(), 5)
    assert got.body == b"spiral"
    assert len(got.via) == 3  # the proxy forwarded it twice (the spiral), then alice's own Via
    assert all((v.branch or "").startswith("z9hG4bK-lp") for v in got.via[:2])


async def test_proxy_require_gets_420_with_unsupported(new_stack: Factory) -> None:
    stack = await new_stack()
    proxy = Proxy(stack)
    text = REQUEST.format(uri="sip:b@127.0.0.1:9", branch="pr", mf=70).replace(
        "Max-Forwards", "Proxy-Require: foo, bar\r\nMax-Forwards"
    )
    answer = await raw_request(stack, text)
    assert answer.status == 420 and answer.reason == "Bad Extension"
    assert answer.get_all("Unsupported") == ["foo", "bar"]
    assert proxy.stats["rejected"] == 1


class Redirector:
    """A redirect server (a minimal transaction user): 302 to ``contacts`` for every request."""

    stateful = True

    def __init__(self, stack: Stack, contacts: list[str], *, fresh: bool = False) -> None:
        self.stack = stack
        self.contacts = contacts
        self.fresh = fresh  # also a never-seen name each time (an endless redirect chain)
        self.requests = 0
        stack.attach(self)  # type: ignore[arg-type]

    def on_request(self, request: Request, transaction: object, source: object) -> None:
        if transaction is not None and request.method != "ACK":
            self.requests += 1
            response = Response.for_request(request, 302)
            contacts = self.contacts + ([f"sip:n{self.requests}@{addr(self.stack)}"] if self.fresh else [])
            response.set("Contact", [f"<{c}>" for c in contacts])
            self.stack.respond(transaction, response)  # type: ignore[arg-type]

    def on_response(self, *args: object) -> None: ...
    def on_timeout(self, *args: object) -> None: ...
    def on_transport_failure(self, *args: object) -> None: ...
    def on_terminated(self, *args: object) -> None: ...


async def test_3xx_recursion_forks_to_the_contacts(new_stack: Factory) -> None:
    proxy, alice, (bob,) = await parties(new_stack, 1, recurse=True)
    redirect_stack = await new_stack()
    redirector = Redirector(redirect_stack, [str(contact(bob)), f"sip:redirector@{addr(redirect_stack)}"])
    proxy.locate = lambda request: [URI(f"sip:x@{addr(redirect_stack)}")]
    bob.on_call = lambda call: call.accept()
    call = await alice.call("sip:bob@p2p.example", timeout=20)
    assert call.state == "confirmed"
    incoming = await asyncio.wait_for(bob.incoming.get(), 5)
    assert incoming.request.uri == contact(bob)
    await call.bye()
    # The redirector's own second contact was tried too (and redirected again, to nothing new).
    assert redirector.requests >= 1
    # Without recursion the 302 goes up to the caller.
    proxy.recurse = False
    with pytest.raises(CallFailed) as failed:
        await alice.call("sip:bob@p2p.example", timeout=20)
    assert failed.value.status == 302


async def test_3xx_redirect_loop_is_bounded(new_stack: Factory) -> None:
    proxy, alice, _ = await parties(new_stack, 0, recurse=True)
    redirect_stack = await new_stack()
    me = addr(redirect_stack)
    # Redirected to two fixed names: each is tried once (no branch for an address twice).
    redirector = Redirector(redirect_stack, [f"sip:a@{me}", f"sip:b@{me}"])
    proxy.locate = lambda request: [URI(f"sip:x@{me}")]
    reply = await asyncio.wait_for(alice.message("sip:x@p2p.example", "hi"), 30)
    assert reply.status == 302  # nothing answered: the redirect (with what was not tried) goes up
    assert redirector.requests == 3  # x, a, b
    # An endless chain of new names stops at MAX_BRANCHES branches.
    redirector.contacts, redirector.fresh, redirector.requests = [], True, 0
    reply = await asyncio.wait_for(alice.message("sip:y@p2p.example", "hi"), 30)
    assert reply.status == 302
    assert redirector.requests == MAX_BRANCHES


class Challenger(Redirector):
    """A server that answers every request with ``status`` and the given headers (a registrar-less
    authenticating UAS: 401 with WWW-Authenticate, or a next proxy's 407 with Proxy-Authenticate)."""

    def __init__(self, stack: Stack, status: int, headers: list[tuple[str, str]]) -> None:
        super().__init__(stack, [])
        self.status = status
        self.headers = headers

    def on_request(self, request: Request, transaction: object, source: object) -> None:
        if transaction is not None and request.method != "ACK":
            response = Response.for_request(request, self.status)
            for name, value in self.headers:
                response.add(name, value)
            self.stack.respond(transaction, response)  # type: ignore[arg-type]


async def test_challenges_of_every_branch_are_merged_into_the_401(new_stack: Factory) -> None:
    """§16.7 step 7: forked to a UAS that wants 401 (realm a), a proxy that wants 407 (realm b, two
    algorithms) and a busy phone, the caller gets one 401 carrying all three challenges."""
    proxy, alice, _ = await parties(new_stack, 0)
    busy = Challenger(await new_stack(), 486, [])
    www = 'Digest realm="a", nonce="n1", qop="auth", algorithm=MD5'
    proxy_md5 = 'Digest realm="b", nonce="n2", qop="auth", algorithm=MD5'
    proxy_sha = 'Digest realm="b", nonce="n2", qop="auth", algorithm=SHA-256'
    uas = Challenger(await new_stack(), 401, [("WWW-Authenticate", www)])
    next_proxy = Challenger(
        await new_stack(), 407, [("Proxy-Authenticate", proxy_sha), ("Proxy-Authenticate", proxy_md5)]
    )
    proxy.locate = lambda request: [
        URI(f"sip:u@{addr(uas.stack)}"),
        URI(f"sip:p@{addr(next_proxy.stack)}"),
        URI(f"sip:b@{addr(busy.stack)}"),
    ]
    reply = await asyncio.wait_for(alice.message("sip:bob@p2p.example", "hi"), 30)
    assert reply.status == 401  # preferred over 486 (§16.7 step 6), and over 407 by the order of the list
    assert reply.get_all("WWW-Authenticate") == [www]
    assert reply.get_all("Proxy-Authenticate") == [proxy_sha, proxy_md5]  # unmodified, in their order
    # A single challenging branch goes up as it came (nothing to merge).
    proxy.locate = lambda request: [URI(f"sip:p@{addr(next_proxy.stack)}"), URI(f"sip:b@{addr(busy.stack)}")]
    reply = await asyncio.wait_for(alice.message("sip:bob@p2p.example", "hi"), 30)
    assert reply.status == 407 and "WWW-Authenticate" not in reply
    assert reply.get_all("Proxy-Authenticate") == [proxy_sha, proxy_md5]


async def test_a_finished_call_leaves_no_reference_cycles(new_stack: Factory) -> None:
    """Once a call's transactions have ended, reference counting frees every object the proxy made for it:
    the cyclic collector has nothing to find. (The response context and its branches pointed at each
    other: ~28 objects per call waited for a full pass — 319,000 of them after a minute at 500 calls/s,
    and a 1.4 s pass.) The collector is off during the calls, so a cycle would still be there."""
    import gc

    fast = TimerConfig(t1=0.005, t2=0.04, t4=0.01)  # Timers L, M, J, K end within 0.32 s
    proxy, alice, (bob,) = await parties(new_stack, 1, stack_options={"timers": fast})
    bob.on_call = lambda call: call.accept()
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            call = await alice.call(contact(bob), timeout=20)
            assert (await call.bye()).status == 200
        assert proxy.stats["forwarded_requests"] >= 6  # three INVITEs and three BYEs (and ACKs) went through
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(proxy.stack.transactions) and loop.time() < deadline:  # bounded wait for the timers
            await asyncio.sleep(0.05)
        assert len(proxy.stack.transactions) == 0
        left = [o for o in gc.get_objects() if type(o).__name__ in ("ProxyContext", "_Branch")]
        assert left == []
    finally:
        gc.enable()
