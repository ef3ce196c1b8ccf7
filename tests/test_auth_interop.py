"""Digest against real third-party peers: our client answers Kamailio's registrar challenges (MD5 and
SHA-256), and sipp's digest implementation passes our DigestServer. Loopback only; children end by PID."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from interop.kamailio import Kamailio, registrar_config
from interop.sipp import Sipp

from p2psip.auth import DigestServer, answer_challenge
from p2psip.message import Request, Response, new_branch, parse, parse_auth

pytestmark = pytest.mark.interop

REALM = "example.com"
USERS = {"alice": "wonderland"}


def exchange(sock: socket.socket, request: Request, dest: tuple[str, int], timeout: float = 10.0) -> Response:
    """Send ``request`` (retransmitting like Timer E) and return its final response."""
    sock.sendto(bytes(request), dest)
    deadline = time.monotonic() + timeout
    interval = 0.5
    sock.settimeout(interval)
    while time.monotonic() < deadline:
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            sock.sendto(bytes(request), dest)
            interval = min(2 * interval, 4.0)
            sock.settimeout(interval)
            continue
        message = parse(data)
        if isinstance(message, Response) and message.status >= 200 and message.call_id == request.call_id:
            return message
    raise AssertionError(f"no final response to {request.method} from {dest}")


def register(port: int) -> Request:
    return Request.create(
        "REGISTER",
        f"sip:{REALM}",
        from_=f"<sip:alice@{REALM}>",
        to=f"<sip:alice@{REALM}>",
        via=f"SIP/2.0/UDP 127.0.0.1:{port};rport;branch={new_branch()}",
        contact=f"<sip:alice@127.0.0.1:{port}>",
        headers=[("Expires", "60")],
    )


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_our_client_registers_with_kamailio(tmp_path: Path, algorithm: str) -> None:
    require_tool("kamailio")
    kport = free_port()
    config = registrar_config("127.0.0.1", kport, realm=REALM, users=USERS, challenge_invites=False)
    config = config.replace(
        'modparam("auth", "nonce_expire", 60)',
        f'modparam("auth", "nonce_expire", 60)\nmodparam("auth", "algorithm", "{algorithm}")',
    )
    with (
        Kamailio(config, tmp_path, kport, transports=("udp",)),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        first = register(port)
        challenge = exchange(sock, first, ("127.0.0.1", kport))
        assert challenge.status == 401, challenge
        offered = parse_auth(challenge.get("WWW-Authenticate") or "")[1]
        assert offered.get("algorithm", "MD5").upper() == algorithm.upper()

        wrong = answer_challenge(challenge, first, "alice", "not-the-password")
        assert exchange(sock, wrong, ("127.0.0.1", kport)).status in (401, 403)

        retry = answer_challenge(challenge, first, "alice", "wonderland")
        retry.set("CSeq", f"{wrong.cseq.number + 1} REGISTER")
        ok = exchange(sock, retry, ("127.0.0.1", kport))
        assert ok.status == 200, ok
        assert any(str(c.uri) == f"sip:alice@127.0.0.1:{port}" for c in ok.contacts)


SIPP_REGISTER = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="REGISTER with digest">
  <send retrans="500">
    <![CDATA[
      REGISTER sip:example.com SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:alice@example.com>;tag=[pid]SIPpTag[call_number]
      To: <sip:alice@example.com>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:alice@[local_ip]:[local_port]>
      Max-Forwards: 70
      Expires: 60
      Content-Length: 0

    ]]>
  </send>
  <recv response="401" auth="true"/>
  <send retrans="500">
    <![CDATA[
      REGISTER sip:example.com SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:alice@example.com>;tag=[pid]SIPpTag[call_number]
      To: <sip:alice@example.com>
      Call-ID: [call_id]
      CSeq: 2 REGISTER
      Contact: <sip:alice@[local_ip]:[local_port]>
      [authentication username=alice password=wonderland]
      Max-Forwards: 70
      Expires: 60
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""


class DigestRegistrar:
    """A minimal UDP registrar on loopback around DigestServer: 401 until the credentials verify, then
    200. A thread with a blocking socket, ended by ``close``."""

    def __init__(self, server: DigestServer) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.verified: list[str] = []
        self.failures: list[str] = []
        self.closing = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return  # closed
            if self.closing:
                return
            request = parse(data)
            if not isinstance(request, Request):
                continue
            result, challenge = self.server.check(request, time.monotonic())
            if challenge is not None:
                if "Authorization" in request:
                    self.failures.append(result.reason)
                self.sock.sendto(bytes(challenge), peer)
            else:
                self.verified.append(result.username or "")
                self.sock.sendto(bytes(Response.for_request(request, 200)), peer)

    def close(self) -> None:
        # Closing a socket does not wake a thread blocked in recvfrom on Linux: a datagram to itself does.
        self.closing = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(b"", ("127.0.0.1", self.port))
        self.thread.join(timeout=5)
        self.sock.close()
        assert not self.thread.is_alive(), "the registrar thread did not end"


@pytest.mark.parametrize("algorithms", [("MD5",)])
def test_sipp_client_passes_our_digest_server(tmp_path: Path, algorithms: tuple[str, ...]) -> None:
    """sipp 3.6 reads only the first challenge and knows only MD5 ("authentication must use MD5 or
    AKAv1-MD5" when SHA-256 comes first), so a DigestServer facing sipp is configured MD5-only."""
    require_tool("sipp")
    scenario = tmp_path / "register_auth.xml"
    scenario.write_text(SIPP_REGISTER)
    registrar = DigestRegistrar(DigestServer(REALM, USERS.get, algorithms=algorithms))
    try:
        cport = free_port()
        args = [
            "-sf", str(scenario), "-m", "1", "-p", str(cport), "-i", "127.0.0.1",
            "-timeout", "20s", "-trace_stat", "-stf", "stat.csv", "-trace_err",
            f"127.0.0.1:{registrar.port}",
        ]  # fmt: skip
        with Sipp(args, tmp_path, "sipp-register") as sipp:
            result = sipp.start().wait(timeout=30)
    finally:
        registrar.close()
    assert result.successful == 1 and result.failed == 0, f"{result}\nserver: {registrar.failures}"
    assert registrar.verified == ["alice"]
