"""TLS against a third-party SIP stack: Kamailio's TLS module (OpenSSL) and our transport (Python's ssl).

The Debian sipp here has no TLS, so Kamailio is the only independent TLS peer. Both directions of TLS are
exercised, with certificate verification on at both ends (self-signed certificates made for the test by
``p2psip.transport.generate_self_signed``: one for Kamailio, one for us, and a stranger's):

- us as TLS client: our UserAgent registers at Kamailio over ``sips:`` (digest: 401, then 200), trusting
  only Kamailio's certificate; a UA that trusts another certificate cannot connect at all;
- us as TLS server: Kamailio, trusting only our certificate, opens TLS connections to our UA's listener
  (the ``sips:`` contact stored by that REGISTER, found by ``lookup``) and to ``p2psip proxy --listen
  tls:`` (a static route with ``;transport=tls``); a Kamailio that trusts another certificate cannot reach
  our UA;
- our proxy as TLS client: it forwards a MESSAGE to Kamailio's TLS port, verifying Kamailio's certificate
  (``--tls-ca``), and refuses a Kamailio it does not trust.

Kamailio's TLS module is a separate Debian package (``kamailio-tls-modules``): without it these tests skip
on a laptop and fail under ``CI=true``, like ``require_tool``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, in_ci

from p2psip.address import Target
from p2psip.message import Request, parse
from p2psip.stack import Stack
from p2psip.transport import TLSConfig, generate_self_signed
from p2psip.useragent import CallFailed, IncomingCall, UserAgent

from .kamailio import TLS_MODULE, DomainRoute, Kamailio, KamailioTLS, has_tls_module, registrar_config
from .ourproxy import OurProxy
from .ua import SDP, answering_ua

pytestmark = pytest.mark.interop

REALM = "kam.example"
PASSWORD = "wonderland"
TIMEOUT = 30.0  # generous: the machine is shared; every wait is on an event, bounded by this


@pytest.fixture
def kamailio_tls(kamailio_tool: str) -> str:
    """Kamailio with its TLS module: skip on a laptop without ``kamailio-tls-modules``, fail under CI."""
    if not has_tls_module():
        message = f"Kamailio's TLS module {TLS_MODULE} is missing (Debian package kamailio-tls-modules)"
        if in_ci():
            pytest.fail(f"{message}: required under CI=true")
        pytest.skip(message)
    return kamailio_tool


@dataclass(frozen=True)
class Certs:
    """Three independent self-signed certificates (cert, key): Kamailio's, ours, and a stranger's."""

    kamailio: tuple[str, str]
    ours: tuple[str, str]
    stranger: tuple[str, str]


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    made = {}
    for name in ("kamailio", "ours", "stranger"):
        directory = tmp_path / f"cert-{name}"
        directory.mkdir()
        made[name] = generate_self_signed(str(directory))
    return Certs(**made)


@dataclass
class Trace:
    """Every message one of our stacks sent and received: (direction, remote, first line, message bytes)."""

    seen: list[tuple[str, Target, str, bytes]] = field(default_factory=list)

    def __call__(self, direction: str, data: bytes, remote: Target) -> None:
        self.seen.append((direction, remote, data.split(b"\r\n", 1)[0].decode(errors="replace"), data))

    def dump(self) -> str:
        return "\n".join(f"{d} {r.transport}:{r.host}:{r.port} {line}" for d, r, line, _ in self.seen)

    def lines(self, direction: str) -> list[str]:
        return [line for d, _, line, _ in self.seen if d == direction]

    def transports(self) -> set[str]:
        return {remote.transport for _, remote, _, _ in self.seen}

    def received(self, method: str) -> list[tuple[Target, Request]]:
        found = []
        for direction, remote, line, data in self.seen:
            if direction == "in" and line.startswith(f"{method} "):
                message = parse(data)
                assert isinstance(message, Request)
                found.append((remote, message))
        return found


async def _wait(event: asyncio.Event, what: str, kamailio: Kamailio, *traces: Trace) -> None:
    """Wait (bounded) for ``event``; on timeout fail with what each side saw and Kamailio's log."""
    try:
        await asyncio.wait_for(event.wait(), TIMEOUT)
    except TimeoutError:
        seen = "\n--\n".join(trace.dump() for trace in traces)
        pytest.fail(f"{what} did not happen within {TIMEOUT:.0f} s\n{seen}\nkamailio:\n{kamailio.log_tail()}")


async def _stack(listen: str, tls: TLSConfig | None = None) -> Stack:
    return await Stack.start([listen], tls=tls)


@pytest.fixture
async def stacks() -> AsyncIterator[list[Stack]]:
    """Stacks a test opens (append to the list); all closed at the end, whatever happened."""
    opened: list[Stack] = []
    try:
        yield opened
    finally:
        for stack in opened:
            await stack.close()


def _kamailio(
    workdir: Path,
    certs: Certs,
    *,
    trust: str,
    domain_routes: dict[str, DomainRoute] | None = None,
    branch_timeout_ms: int | None = None,
    verify_clients: bool = False,
) -> Kamailio:
    """Kamailio as registrar (alice's password) and proxy on UDP, with a TLS listener presenting its
    certificate; as a TLS client it trusts only ``trust`` (a certificate file) and verifies the server;
    with ``verify_clients`` its TLS server also demands a client certificate that ``trust`` vouches for."""
    kport, tport = free_port(), free_port()
    cert, key = certs.kamailio
    config = registrar_config(
        "127.0.0.1",
        kport,
        realm=REALM,
        users={"alice": PASSWORD},
        domain_routes=domain_routes,
        challenge_invites=False,
        transports=("udp",),
        tls=KamailioTLS(
            tport,
            certificate=cert,
            private_key=key,
            ca_list=trust,
            verify=True,
            verify_clients=verify_clients,
        ),
        branch_timeout_ms=branch_timeout_ms,
    )
    return Kamailio(config, workdir, kport, transports=("udp",), tls_port=tport)


def _our_tls(certs: Certs, *, trust: str) -> TLSConfig:
    """Our side's TLS: our certificate for our listener, and ``trust`` the only certificate we accept."""
    cert, key = certs.ours
    return TLSConfig(certfile=cert, keyfile=key, cafile=trust, verify=True)


async def _register_alice(
    stacks: list[Stack], kamailio: Kamailio, certs: Certs
) -> tuple[UserAgent, list[IncomingCall], Trace]:
    """alice on a stack that listens on TLS only, registered at Kamailio's ``sips:`` address."""
    stack = await _stack("tls:127.0.0.1:0", _our_tls(certs, trust=certs.kamailio[0]))
    stacks.append(stack)
    trace = Trace()
    stack.add_observer(trace)
    ua, answered = answering_ua(stack, f"sip:alice@{REALM}")
    reg = await ua.register(
        f"sips:127.0.0.1:{kamailio.tls_port}", expires=300, password=PASSWORD, refresh=False, timeout=TIMEOUT
    )
    assert reg.status == 200, f"{reg.status} {reg.reason}\n{kamailio.log_tail()}"
    return ua, answered, trace


async def _refused_registration(stack: Stack, kamailio: Kamailio) -> CallFailed:
    """alice's REGISTER from ``stack`` to Kamailio's ``sips:`` address, which must fail: the failure."""
    ua = UserAgent(stack, f"sip:alice@{REALM}", password=PASSWORD)
    with pytest.raises(CallFailed) as failure:
        await ua.register(f"sips:127.0.0.1:{kamailio.tls_port}", expires=300, refresh=False, timeout=TIMEOUT)
    await ua.close()
    return failure.value


async def test_our_ua_registers_at_kamailio_over_tls(
    kamailio_tls: str, workdir: Path, certs: Certs, stacks: list[Stack]
) -> None:
    """Us as TLS client, verifying Kamailio's certificate: REGISTER, 401 with a digest challenge, REGISTER
    with credentials, 200 listing our ``sips:`` contact — every message over TLS."""
    with _kamailio(workdir, certs, trust=certs.ours[0]) as kamailio:
        ua, _, trace = await _register_alice(stacks, kamailio, certs)
        our_host, our_port = ua.stack.local_address("tls")
        await ua.close()
    assert trace.lines("out")[:2] == [f"REGISTER sips:127.0.0.1:{kamailio.tls_port} SIP/2.0"] * 2
    assert trace.lines("in")[:2] == ["SIP/2.0 401 Unauthorized", "SIP/2.0 200 OK"], trace.lines("in")
    assert trace.transports() == {"tls"}
    ok = next(data for d, _, line, data in trace.seen if d == "in" and line == "SIP/2.0 200 OK")
    assert f"sips:alice@{our_host}:{our_port}".encode() in ok, ok.decode(errors="replace")


async def test_mutual_tls_our_ua_presents_its_certificate(
    kamailio_tls: str, workdir: Path, certs: Certs, stacks: list[Stack]
) -> None:
    """Mutual TLS: Kamailio's TLS server requires a client certificate (``require_certificate``) and
    verifies it against ours; our TLS client presents its certificate when asked, so the REGISTER goes
    through (without it Kamailio ends the handshake: "peer did not return a certificate")."""
    with _kamailio(workdir, certs, trust=certs.ours[0], verify_clients=True) as kamailio:
        ua, _, trace = await _register_alice(stacks, kamailio, certs)
        await ua.close()
        log = kamailio.log.read_text(errors="replace")
    assert trace.lines("in")[:2] == ["SIP/2.0 401 Unauthorized", "SIP/2.0 200 OK"], trace.lines("in")
    assert trace.transports() == {"tls"}
    assert "did not return a certificate" not in log


async def test_mutual_tls_refused_certificate_fails_the_request_at_once(
    kamailio_tls: str, workdir: Path, certs: Certs, stacks: list[Stack]
) -> None:
    """Kamailio demands a client certificate it trusts (a stranger's): under TLS 1.3 our side finishes
    the handshake and sends the REGISTER before Kamailio's refusal arrives, and Kamailio then drops the
    connection without a word. The REGISTER fails at once with 503 naming the closed connection, not
    after its transaction timeout (the transport reports a connection dropped before any answer)."""
    with _kamailio(workdir, certs, trust=certs.stranger[0], verify_clients=True) as kamailio:
        stack = await _stack("tls:127.0.0.1:0", _our_tls(certs, trust=certs.kamailio[0]))
        stacks.append(stack)
        failure = await _refused_registration(stack, kamailio)
    # (Kamailio's own log line about the refused certificate may be written after we get here: not read.)
    assert failure.status == 503, failure
    # Whether our REGISTER was written just before Kamailio's close was read or just after (a loaded
    # machine may read it first), the failure names the peer's close.
    assert "closed by the peer" in str(failure), failure


async def test_our_ua_refuses_a_kamailio_it_does_not_trust(
    kamailio_tls: str, workdir: Path, certs: Certs, stacks: list[Stack]
) -> None:
    """Our TLS client really verifies: trusting only a stranger's certificate, the REGISTER cannot be
    sent (the handshake fails on Kamailio's certificate) and the UA reports 503, not a hang."""
    with _kamailio(workdir, certs, trust=certs.ours[0]) as kamailio:
        stack = await _stack("tls:127.0.0.1:0", _our_tls(certs, trust=certs.stranger[0]))
        stacks.append(stack)
        trace = Trace()
        stack.add_observer(trace)
        failure = await _refused_registration(stack, kamailio)
    assert failure.status == 503, failure
    assert trace.lines("in") == []
    assert stack.stats["send_errors"] >= 1


async def test_kamailio_calls_our_ua_over_tls(
    kamailio_tls: str, workdir: Path, certs: Certs, stacks: list[Stack]
) -> None:
    """Us as TLS server: bob (UDP) calls alice's AOR at Kamailio; Kamailio finds her ``sips:`` contact,
    opens a TLS connection to her listener (verifying our certificate), and the call completes: INVITE,
    200, ACK, and bob's BYE, all reaching alice over TLS on the connection Kamailio opened."""
    with _kamailio(workdir, certs, trust=certs.ours[0]) as kamailio:
        alice, answered, trace = await _register_alice(stacks, kamailio, certs)

        bob_stack = await _stack("udp:127.0.0.1:0")
        stacks.append(bob_stack)
        bob_trace = Trace()
        bob_stack.add_observer(bob_trace)
        bob = UserAgent(bob_stack, "sip:bob@elsewhere.example", outbound=f"127.0.0.1:{kamailio.port}")
        call = await bob.call(f"sip:alice@{REALM}", body=SDP, timeout=TIMEOUT)
        assert call.response is not None and call.response.status == 200
        assert len(answered) == 1
        await _wait(answered[0].confirmed, "the ACK reaching alice", kamailio, trace, bob_trace)
        bye = await call.bye(timeout=TIMEOUT)
        assert bye.status == 200, f"BYE answered {bye.status} {bye.reason}\n{kamailio.log_tail()}"
        await _wait(answered[0].ended, "the BYE reaching alice", kamailio, trace, bob_trace)
        await alice.close()
        await bob.close()

    assert trace.transports() == {"tls"}
    invites = trace.received("INVITE")
    assert len(invites) == 1
    remote, invite = invites[0]
    # Kamailio connected to us: the INVITE did not come back on alice's own connection to Kamailio's
    # TLS port, and Kamailio's Via says it sent over TLS
    assert remote.transport == "tls" and remote.port != kamailio.tls_port, remote
    top = invite.via[0]
    assert (top.transport, top.port) == ("TLS", kamailio.tls_port), str(invite.via)
    for method in ("ACK", "BYE"):
        ((remote, _),) = trace.received(method)
        assert remote.transport == "tls" and remote.port != kamailio.tls_port, (method, remote)


async def test_kamailio_that_distrusts_us_cannot_reach_our_ua(
    kamailio_tls: str, workdir: Path, certs: Certs, stacks: list[Stack]
) -> None:
    """Kamailio's TLS client really verifies: trusting only a stranger's certificate, it refuses our
    certificate during the handshake, so the INVITE never reaches alice's TLS listener and bob's call
    fails (Kamailio's 408 once its branch timer runs out)."""
    with _kamailio(workdir, certs, trust=certs.stranger[0], branch_timeout_ms=2000) as kamailio:
        alice, _, trace = await _register_alice(stacks, kamailio, certs)
        bob_stack = await _stack("udp:127.0.0.1:0")
        stacks.append(bob_stack)
        bob = UserAgent(bob_stack, "sip:bob@elsewhere.example", outbound=f"127.0.0.1:{kamailio.port}")
        with pytest.raises(CallFailed) as failure:
            await bob.call(f"sip:alice@{REALM}", body=SDP, timeout=TIMEOUT)
        await alice.close()
        await bob.close()
    # Kamailio's branch got no response (fr_timer, 2 s): its 408, and its log says why
    assert failure.value.status == 408, failure.value
    assert trace.received("INVITE") == []
    log = kamailio.log.read_text(errors="replace")
    assert "certificate verify failed" in log, kamailio.log_tail()


async def test_kamailio_routes_a_domain_over_tls_through_our_proxy(
    kamailio_tls: str, workdir: Path, certs: Certs, stacks: list[Stack]
) -> None:
    """Kamailio's static route sends ``p2p.example`` over TLS (``;transport=tls``, verifying our
    certificate) to ``p2psip proxy --listen tls:`` (a child process, presenting our certificate), which
    forwards over UDP to carol. Two calls from bob (UDP, at Kamailio): the first ended by bob (his BYE
    goes Kamailio → TLS → our proxy), the second by carol (her BYE goes our proxy → Kamailio's TLS port:
    our transport sends it on the connection Kamailio opened, known by the sent-by of Kamailio's Via)."""
    carol_stack = await _stack("udp:127.0.0.1:0")
    stacks.append(carol_stack)
    carol_trace = Trace()
    carol_stack.add_observer(carol_trace)
    carol, answered = answering_ua(carol_stack, "sip:carol@p2p.example")
    cert, key = certs.ours
    proxy = OurProxy(
        workdir, ["tls:127.0.0.1:0", "udp:127.0.0.1:0"], extra=["--tls-cert", cert, "--tls-key", key]
    )
    proxy.start()
    try:
        route = DomainRoute(
            next_hop=proxy.addresses["tls"], target=carol_stack.local_address("udp"), transport="tls"
        )
        with _kamailio(workdir, certs, trust=certs.ours[0], domain_routes={"p2p.example": route}) as kamailio:
            bob_stack = await _stack("udp:127.0.0.1:0")
            stacks.append(bob_stack)
            bob_trace = Trace()
            bob_stack.add_observer(bob_trace)
            bob = UserAgent(bob_stack, "sip:bob@elsewhere.example", outbound=f"127.0.0.1:{kamailio.port}")
            traces = (kamailio, bob_trace, carol_trace)

            first = await bob.call("sip:carol@p2p.example", body=SDP, timeout=TIMEOUT)
            await _wait(answered[0].confirmed, "the ACK reaching carol", *traces)
            bye = await first.bye(timeout=TIMEOUT)
            assert bye.status == 200, f"bob's BYE answered {bye.status} {bye.reason}"
            await _wait(answered[0].ended, "bob's BYE reaching carol", *traces)

            second = await bob.call("sip:carol@p2p.example", body=SDP, timeout=TIMEOUT)
            await _wait(answered[1].confirmed, "the second ACK reaching carol", *traces)
            bye = await answered[1].bye(timeout=TIMEOUT)
            assert bye.status == 200, f"carol's BYE answered {bye.status} {bye.reason}\n{proxy.output()}"
            await _wait(second.ended, "carol's BYE reaching bob", *traces)
            await bob.close()
            await carol.close()
    finally:
        proxy.stop()

    assert len(answered) == 2
    invites = carol_trace.received("INVITE")
    assert len(invites) == 2
    for _, invite in invites:
        # top: our proxy's Via (it forwarded over UDP); then Kamailio's, sent over TLS from its TLS port
        vias = [(via.transport, via.port) for via in invite.via]
        assert vias[0] == ("UDP", proxy.addresses["udp"][1]), vias
        assert vias[1] == ("TLS", kamailio.tls_port), vias
    stats = proxy.final_stats()
    # INVITE and BYE of each call were forwarded statefully, each 2xx's ACK statelessly
    assert stats.get("forwarded_requests", 0) >= 4 and stats.get("stateless_acks", 0) >= 2, stats
    # one TLS connection carried everything between Kamailio and our proxy: the one Kamailio opened
    assert stats.get("connections_opened") == 1, stats


@pytest.mark.parametrize("proxy_trusts_kamailio", [True, False], ids=["trusted", "untrusted"])
async def test_our_proxy_forwards_over_tls_to_kamailio(
    kamailio_tls: str,
    workdir: Path,
    certs: Certs,
    stacks: list[Stack],
    proxy_trusts_kamailio: bool,
) -> None:
    """Our proxy as TLS client: bob (UDP) sends a MESSAGE through ``p2psip proxy`` with a preloaded Route
    to Kamailio's TLS port; the proxy opens a TLS connection to Kamailio (verifying its certificate), and
    Kamailio delivers the MESSAGE to alice's registered ``sips:`` contact. When the proxy does not trust
    Kamailio's certificate, the connection is refused and bob gets a 500 at once, not silence.

    ``--tls-ca`` names the certificates the proxy trusts as a TLS client: Kamailio's, or a stranger's."""
    with _kamailio(workdir, certs, trust=certs.ours[0]) as kamailio:
        alice, _, alice_trace = await _register_alice(stacks, kamailio, certs)
        cert, key = certs.ours
        trusted = certs.kamailio[0] if proxy_trusts_kamailio else certs.stranger[0]
        proxy = OurProxy(
            workdir,
            ["udp:127.0.0.1:0", "tls:127.0.0.1:0"],
            extra=["--tls-cert", cert, "--tls-key", key, "--tls-ca", trusted],
        )
        proxy.start()
        try:
            bob_stack = await _stack("udp:127.0.0.1:0")
            stacks.append(bob_stack)
            bob = UserAgent(bob_stack, "sip:bob@elsewhere.example", outbound=proxy.address("udp"))
            route = f"<sip:127.0.0.1:{kamailio.tls_port};transport=tls;lr>"
            response = await bob.request(
                "MESSAGE",
                f"sip:alice@{REALM}",
                body=b"over TLS, twice",
                content_type="text/plain",
                headers=[("Route", route)],
                timeout=TIMEOUT,
            )
            await bob.close()
            await alice.close()
        finally:
            proxy.stop()
    stats = proxy.final_stats()
    messages = alice_trace.received("MESSAGE")
    if not proxy_trusts_kamailio:
        # the handshake failed on Kamailio's certificate: a transport error, that is a 503 for the branch,
        # which a proxy turns into 500 upstream (RFC 3261 §16.9, §16.7 step 6)
        assert response.status == 500, f"{response.status} {response.reason}\n{proxy.output()}"
        assert stats.get("send_errors") == 1 and "connections_opened" not in stats, stats
        assert messages == []
        return
    assert response.status == 200, f"{response.status} {response.reason}\n{proxy.output()}"
    ((_, message),) = messages
    assert message.body == b"over TLS, twice"
    vias = [(via.transport, via.port) for via in message.via]
    # Kamailio (sent from its TLS port) ← our proxy (over TLS, from its TLS listener's port) ← bob (UDP)
    assert vias[:2] == [("TLS", kamailio.tls_port), ("TLS", proxy.addresses["tls"][1])], vias
    assert vias[2][0] == "UDP", vias
    assert stats.get("forwarded_requests") == 1 and stats.get("connections_opened") == 1, stats
