"""Layer 3: the article's SER-like server script, run as written with ``python script.py`` (listen address
replaced by a loopback one), answers like the SER config it mirrors: 483 for Max-Forwards 0, 513 for a
message over 8 KiB, 200 for sipsak's OPTIONS ping, and the script server's default 501 for the rest."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import free_port
from test_sipapi_support import EXAMPLES, UdpClient, article_text, script_process


@pytest.fixture
def article_server(tmp_path: Path):
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(article_text(EXAMPLES / "ser_article_server.py", "127.0.0.1", port))
    with script_process(script) as child:
        line = child.wait_ready()
        assert f"udp:127.0.0.1:{port}" in line and f"tcp:127.0.0.1:{port}" in line, line
        client = UdpClient()
        try:
            yield client, ("127.0.0.1", port), child
        finally:
            client.close()


def test_article_server_script_behaves_like_the_ser_config(article_server) -> None:
    client, server, child = article_server
    target = f"sip:{server[0]}:{server[1]}"

    hops = client.send(client.request("INVITE", "sip:bob@example.com", max_forwards=0), server)
    assert (hops.status, hops.reason) == (483, "Too many hops")

    big = client.request("MESSAGE", "sip:bob@example.com", body=b"x" * 9000)
    overflow = client.send(big, server)
    assert (overflow.status, overflow.reason) == (513, "Message overflow")

    ping = client.send(client.request("OPTIONS", target, from_="sip:sipsak@127.0.0.1"), server)
    assert ping.status == 200
    assert ping.get("To") is not None and ";tag=" in (ping.get("To") or "")

    # not sipsak, or not for the server itself: the script falls through, the default is 501
    other = client.send(client.request("OPTIONS", target, from_="sip:alice@127.0.0.1"), server)
    assert other.status == 501
    to_user = client.send(client.request("OPTIONS", "sip:bob@127.0.0.1", from_="sip:sipsak@x"), server)
    assert to_user.status == 501
    invite = client.send(client.request("INVITE", "sip:bob@example.com"), server)
    assert invite.status == 501

    # a message just under the limit passes the size check
    small = client.send(client.request("MESSAGE", "sip:bob@example.com", body=b"x" * 7000), server)
    assert small.status == 501

    assert child.stop() == 0, child.output()
    # SIGTERM ends it cleanly: exit 0 and no traceback
    assert "Traceback" not in child.output()
    # _debug = True in the script: one log line per decision on stderr
    assert "sipapi: INVITE sip:bob@example.com -> 483 Too many hops" in child.errors, child.output()


def test_the_scripts_own_513_reaches_the_sender_for_8_to_64_kb(article_server) -> None:
    """Issue 11: a message of 8-64 KB with short lines reaches the script, whose ``len(str(event)) > 8192``
    check answers 513 itself; that answer must reach the sender, over UDP and over TCP. Past the stack's
    own limits (more than 256 header lines, a line over 8 KiB) the stack answers 513 before the script."""
    from test_sipapi_support import make_request

    from p2psip.message import Response, parse

    client, server, child = article_server

    def tcp(request_of: object) -> Response:
        with socket.create_connection(server, timeout=10) as sock:
            request = request_of(sock.getsockname(), "TCP")  # type: ignore[operator]
            sock.sendall(bytes(request))
            data = b""
            while b"\r\n\r\n" not in data:
                part = sock.recv(65536)
                assert part, "the server closed without answering"
                data += part
            answer = parse(data[: data.index(b"\r\n\r\n") + 4])
            assert isinstance(answer, Response)
            return answer

    def with_body(size: int) -> object:
        return lambda local, t: make_request(
            "MESSAGE", "sip:bob@example.com", local=local, body=b"x" * size, transport=t
        )

    def with_headers(n: int) -> object:
        headers = [(f"X-Line-{i}", "y" * 90) for i in range(n)]
        return lambda local, t: make_request(
            "MESSAGE", "sip:bob@example.com", local=local, headers=headers, transport=t
        )

    for make in (with_body(9000), with_body(20_000), with_body(60_000), with_headers(200)):
        over_udp = client.send(make(client.local, "UDP"), server)  # type: ignore[operator]
        assert (over_udp.status, over_udp.reason) == (513, "Message overflow")
        over_tcp = tcp(make)
        assert (over_tcp.status, over_tcp.reason) == (513, "Message overflow")
    for make in (with_headers(300),):
        assert client.send(make(client.local, "UDP"), server).status == 513  # type: ignore[operator]
        assert tcp(make).status == 513
    assert child.stop() == 0, child.output()


def test_open_with_a_file_name_is_the_builtin_open(tmp_path: Path) -> None:
    import sipapi

    path = tmp_path / "note.txt"
    with sipapi.open(path, "w") as f:
        f.write("written by a script")
    assert path.read_text() == "written by a script"
    with pytest.raises(ValueError):
        sipapi.open(("127.0.0.1", 70000))


def test_a_server_script_with_a_mistake_says_so(tmp_path: Path) -> None:
    """No listening point, or an address already taken: one line on stderr and exit 1, no traceback."""
    import socket
    import subprocess
    import sys

    from test_sipapi_support import ROOT

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}

    def run(script: Path) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(script)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)

    nothing = tmp_path / "nothing.py"
    nothing.write_text("from sipapi import *\nbasic.addEventListener('incoming', print)\nrun()\n")
    done = run(nothing)
    assert done.returncode == 1 and "open((" in done.stderr and "Traceback" not in done.stderr

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        busy = tmp_path / "busy.py"
        busy.write_text(f"from sipapi import *\nopen(('127.0.0.1', {port}))\nrun()\n")
        done = run(busy)
    assert done.returncode == 1 and "sipapi: error:" in done.stderr and "Traceback" not in done.stderr
