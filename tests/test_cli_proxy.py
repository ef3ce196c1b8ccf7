"""``p2psip proxy``: argument errors, a real process answering on loopback and stopping on SIGTERM, and
sipp's built-in UAC -> our proxy -> sipp's UAS (UDP, and TCP with the Record-Route scenarios)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import free_port, require_tool
from interop.procs import wait_for_ports

from p2psip.cli import main
from p2psip.message import Request, Response, parse

SCENARIOS = Path(__file__).parent / "interop" / "scenarios"


def test_bad_arguments_print_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["proxy", "--listen", "example.com:5060"],
        ["proxy", "--listen", "udp:127.0.0.1:70000"],
        ["proxy", "--bogus"],
        ["proxy", "--tls-key", "k.pem"],
        ["proxy", "--stateless", "--recurse"],
        ["proxy", "--workers", "0"],
        ["proxy", "--workers", "2", "--listen", "127.0.0.1:5060"],  # UDP and TCP: workers take UDP only
        ["proxy", "--workers", "2", "--listen", "tcp:127.0.0.1:5060"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("p2psip: error:") and err.count("\n") == 1, err


class ProxyProcess:
    """``python -m p2psip.cli proxy`` as a child process, stopped by PID."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2psip.cli", "proxy", "--listen", f"127.0.0.1:{self.port}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the listeners are open (or the process died)
        assert "listening on" in line, (line, self.proc.stderr.read() if self.proc.stderr else "")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def proxy_process(request: pytest.FixtureRequest) -> Iterator[ProxyProcess]:
    args = getattr(request, "param", ())
    proc = ProxyProcess(*args)
    try:
        yield proc
    finally:
        proc.stop()


def test_proxy_process_answers_and_stops_cleanly(proxy_process: ProxyProcess) -> None:
    port = proxy_process.port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(10)
        me = sock.getsockname()[1]
        sock.sendto(
            (
                f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKcli;rport\r\n"
                "From: <sip:t@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: cli-1\r\n"
                "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode(),
            ("127.0.0.1", port),
        )
        answer = parse(sock.recv(65535))
        assert isinstance(answer, Response) and answer.status == 200
        sock.sendto(b"garbage\r\n\r\n", ("127.0.0.1", port))
    code, err = proxy_process.stop()
    assert code == 0
    assert "p2psip proxy stopped" in err and "parse_errors=1" in err


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)
    return sock


def _answer(sock: socket.socket, status: int, headers: Sequence[tuple[str, str]] = ()) -> Request:
    """Receive one request on ``sock`` and answer it (a minimal UAS)."""
    data, peer = sock.recvfrom(65535)
    request = parse(data)
    assert isinstance(request, Request)
    response = Response.for_request(request, status)
    for name, value in headers:
        response.add(name, value)
    sock.sendto(bytes(response), peer)
    return request


@pytest.mark.parametrize("recurse", [True, False])
def test_recurse_flag_follows_a_302(recurse: bool) -> None:
    """With --recurse the proxy tries the 302's Contact itself and the caller gets its 200; without, the
    302 goes up to the caller."""
    proxy = ProxyProcess(*(["--recurse"] if recurse else []))
    try:
        with _udp_socket() as caller, _udp_socket() as redirector, _udp_socket() as callee:
            me, r, c = (s.getsockname()[1] for s in (caller, redirector, callee))
            caller.sendto(
                (
                    f"MESSAGE sip:x@127.0.0.1:{r} SIP/2.0\r\n"
                    f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bKrec{int(recurse)};rport\r\n"
                    "From: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: rec-1\r\n"
                    "CSeq: 1 MESSAGE\r\nMax-Forwards: 70\r\nContent-Length: 2\r\n\r\nhi"
                ).encode(),
                ("127.0.0.1", proxy.port),
            )
            _answer(redirector, 302, [("Contact", f"<sip:y@127.0.0.1:{c}>")])
            if recurse:
                forwarded = _answer(callee, 200)
                assert str(forwarded.uri) == f"sip:y@127.0.0.1:{c}" and forwarded.body == b"hi"
            final = parse(caller.recv(65535))
            assert isinstance(final, Response)
            assert final.status == (200 if recurse else 302)
    finally:
        code, err = proxy.stop()
    assert code == 0, err


def run_sipp_calls(
    proxy_port: int, *, transport: str, calls: int, rate: int, record_route: bool
) -> dict[str, str]:
    """sipp UAS and UAC (through the proxy); returns the UAC's final statistics row."""
    sipp = require_tool("sipp")
    uas_port = free_port()
    flag = "t1" if transport == "tcp" else "u1"
    with tempfile.TemporaryDirectory() as work:
        uas_scn = ["-sf", str(SCENARIOS / "uas_rr.xml")] if record_route else ["-sn", "uas"]
        uac_scn = ["-sf", str(SCENARIOS / "uac_rr.xml"), "-s", "service"] if record_route else ["-sn", "uac"]
        uas = subprocess.Popen(
            [sipp, *uas_scn, "-i", "127.0.0.1", "-p", str(uas_port), "-t", flag, "-nostdin"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=work,
        )
        try:
            wait_for_ports(uas, [(uas_port, transport)], timeout=30, what="sipp uas")  # type: ignore[arg-type]
            stat = os.path.join(work, "uac.csv")
            uac = subprocess.run(
                [
                    sipp, f"127.0.0.1:{uas_port}", *uac_scn, "-rsa", f"127.0.0.1:{proxy_port}",
                    "-i", "127.0.0.1", "-p", str(free_port()), "-t", flag, "-m", str(calls), "-r", str(rate),
                    "-nostdin", "-timeout", "60s", "-trace_stat", "-stf", stat,
                    # A retransmitted 180 arriving after the 200 is legal UDP reordering, not a failure.
                    "-default_behaviors", "all,-abortunexp",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=work,
                timeout=90,
                check=False,
            )
            with open(stat, newline="") as f:
                rows = list(csv.reader(f, delimiter=";"))
            stats = dict(zip(rows[0], rows[-1], strict=False))
            stats["returncode"] = str(uac.returncode)
            return stats
        finally:
            uas.terminate()
            try:
                uas.wait(10)
            except subprocess.TimeoutExpired:
                uas.kill()
                uas.wait()


@pytest.mark.interop
def test_sipp_uac_through_the_proxy_over_udp(proxy_process: ProxyProcess) -> None:
    stats = run_sipp_calls(proxy_process.port, transport="udp", calls=200, rate=100, record_route=False)
    assert stats["SuccessfulCall(C)"] == "200" and stats["FailedCall(C)"] == "0", stats
    code, err = proxy_process.stop()
    assert code == 0 and "forwarded_requests=" in err


@pytest.mark.interop
def test_sipp_record_route_scenarios_through_the_proxy_over_tcp(proxy_process: ProxyProcess) -> None:
    stats = run_sipp_calls(proxy_process.port, transport="tcp", calls=100, rate=50, record_route=True)
    assert stats["SuccessfulCall(C)"] == "100" and stats["FailedCall(C)"] == "0", stats


@pytest.mark.interop
@pytest.mark.parametrize("proxy_process", [("--stateless",)], indirect=True)
def test_sipp_uac_through_the_stateless_proxy(proxy_process: ProxyProcess) -> None:
    stats = run_sipp_calls(proxy_process.port, transport="udp", calls=100, rate=50, record_route=False)
    assert stats["SuccessfulCall(C)"] == "100" and stats["FailedCall(C)"] == "0", stats
