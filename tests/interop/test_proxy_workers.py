"""``p2psip proxy --workers 2`` on loopback with sipp: calls go through both workers (the kernel steers
each request to the worker that owns its Call-ID; what reaches the wrong worker is handed to the one
keeping its transaction), and a worker killed with
SIGKILL in the middle of the load loses no call: the parent starts it again, established calls follow
Record-Route to the shared port, in-flight INVITEs recover through the caller's retransmissions."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port

from .ourproxy import OurProxy, package_root
from .procs import children_of
from .sipp import SCENARIOS, run_calls, uas

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def _workers(proxy: OurProxy, count: int, timeout: float = 10.0) -> list[int]:
    """The worker PIDs once there are ``count`` of them (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = children_of(proxy.pid)
        if len(pids) == count or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def test_calls_through_two_workers(sipp_tool: str, workdir: Path) -> None:
    uport, cport = free_port(), free_port()
    with OurProxy(workdir, ["udp:127.0.0.1:0"], extra=["--workers", "2"]) as proxy, uas(workdir, uport):
        assert len(_workers(proxy, 2)) == 2
        result = run_calls(
            workdir, f"127.0.0.1:{uport}", calls=400, rate=200, port=cport, proxy=proxy.address(), timeout=60
        )
    assert (result.successful, result.failed) == (400, 0), f"{result}\nproxy output:\n{proxy.output()}"
    stats = proxy.final_stats()  # the parent sums its workers' counters
    assert stats.get("forwarded_requests", 0) >= 800, stats
    # the kernel gives each request to the worker that owns its Call-ID (p2psip.steering), though all
    # come from one sipp source: the INVITE, its ACK and the BYE arrive at the worker that forwards them;
    # the responses come to that worker's own port: nothing is handed over
    assert stats.get("kernel_steering") == 1, stats
    assert stats.get("handed_off", 0) == 0 and stats.get("acks_here", 0) == 0, stats
    # every ACK of a 200 forwarded without a transaction (on a loaded machine a retransmitted INVITE
    # forwarded twice can leave a few to another path: not an exact count)
    assert stats.get("stateless_acks", 0) >= 0.95 * 400, stats


def _own_ports(proxy: OurProxy, tag: str, count: int = 6) -> set[int]:
    """Send ``count`` INVITEs through the proxy to a callee socket: each forwarded one must name in its Via
    the port it left from (its worker's own), and a 180 sent there (to the Via's address, §18.2.2) must
    come back to the caller. Returns the ports seen."""
    host, port = proxy.address().rsplit(":", 1)
    sources = set()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as callee,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller,
    ):
        callee.bind(("127.0.0.1", 0))
        caller.bind(("127.0.0.1", 0))
        callee.settimeout(10)
        caller.settimeout(10)
        for n in range(count):  # both workers forward some (the owner is named by the Call-ID)
            invite = (
                f"INVITE sip:bob@127.0.0.1:{callee.getsockname()[1]} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{caller.getsockname()[1]};branch=z9hG4bK-{tag}{n};rport\r\n"
                f"From: <sip:a@h>;tag=1\r\nTo: <sip:bob@h>\r\nCall-ID: {tag}{n}\r\nCSeq: 1 INVITE\r\n"
                "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
            caller.sendto(invite.encode(), (host, int(port)))
            data, source = callee.recvfrom(65535)
            head, _, _ = data.decode().partition("\r\n\r\n")
            lines = head.split("\r\n")
            top = next(line for line in lines if line.startswith("Via:"))
            assert top.startswith(f"Via: SIP/2.0/UDP 127.0.0.1:{source[1]};"), (top, source)
            assert source[1] != int(port)
            sources.add(source[1])
            fields = [line for line in lines if line.split(":")[0] in ("Via", "From", "Call-ID", "CSeq")]
            ringing = "SIP/2.0 180 Ringing\r\n" + "\r\n".join(fields) + "\r\nTo: <sip:bob@h>;tag=2\r\n"
            callee.sendto((ringing + "Content-Length: 0\r\n\r\n").encode(), source)
            while True:  # the proxy may send 100 Trying first
                answer = caller.recvfrom(65535)[0].decode()
                if not answer.startswith("SIP/2.0 100 "):
                    break
            assert answer.startswith("SIP/2.0 180 Ringing") and f"Call-ID: {tag}{n}" in answer, answer
    return sources


def test_a_worker_sends_from_its_own_port_and_reads_the_responses_there(workdir: Path) -> None:
    """The Via of a forwarded request names the worker's own port, the request leaves from it, and a
    response sent there (as §18.2.2 says: to the Via's address) comes back through the proxy."""
    with OurProxy(workdir, ["udp:127.0.0.1:0"], extra=["--workers", "2"]) as proxy:
        sources = _own_ports(proxy, "own")
    assert len(sources) == 2, sources  # each worker its own port
    assert proxy.final_stats().get("handed_off", 0) <= 6, proxy.output()  # INVITEs only, no response


def test_the_ack_of_a_refusal_reaches_its_transaction(sipp_tool: str, workdir: Path) -> None:
    """Every INVITE is answered 486: the caller's ACK (same branch as its INVITE) is absorbed by the
    server transaction of whichever worker refused it, told by that worker before the 486 went out;
    none is forwarded to the callee (who gets the proxy's own ACK) and no 486 is retransmitted."""
    uport, cport = free_port(), free_port()
    calls = 200
    with (
        OurProxy(workdir, ["udp:127.0.0.1:0"], extra=["--workers", "2"]) as proxy,
        uas(workdir, uport, scenario=SCENARIOS / "uas_busy.xml"),
    ):
        assert len(_workers(proxy, 2)) == 2
        result = run_calls(
            workdir,
            f"127.0.0.1:{uport}",
            calls=calls,
            rate=100,
            port=cport,
            proxy=proxy.address(),
            scenario=SCENARIOS / "uac_busy.xml",
            timeout=60,
        )
    assert (result.successful, result.failed) == (calls, 0), f"{result}\nproxy output:\n{proxy.output()}"
    stats = proxy.final_stats()
    assert stats.get("transaction_absorbed", 0) >= calls, stats  # every ACK met its INVITE's transaction
    assert stats.get("stateless_acks", 0) == 0 and stats.get("transaction_stray_acks", 0) == 0, stats
    assert stats.get("transaction_retransmissions", 0) == 0, stats


def test_a_killed_worker_loses_no_call(sipp_tool: str, workdir: Path) -> None:
    uport, cport = free_port(), free_port()
    calls, rate = 600, 100
    killed: list[int] = []
    with OurProxy(workdir, ["udp:127.0.0.1:0"], extra=["--workers", "2"]) as proxy, uas(workdir, uport):
        workers = _workers(proxy, 2)
        assert len(workers) == 2
        ports = _own_ports(proxy, "before")

        def kill() -> None:  # a third of the way into the load: calls in every state
            killed.append(workers[0])
            os.kill(workers[0], signal.SIGKILL)

        timer = threading.Timer(calls / rate / 3, kill)
        timer.start()
        try:
            result = run_calls(
                workdir,
                f"127.0.0.1:{uport}",
                calls=calls,
                rate=rate,
                port=cport,
                proxy=proxy.address(),
                timeout=90,
            )
        finally:
            timer.cancel()
        after = _workers(proxy, 2)
        # the restarted worker has the same own port (the parent holds it): responses to the Via of what
        # its predecessor forwarded still reach a worker
        assert _own_ports(proxy, "after") == ports
    assert killed, "the kill did not happen during the load"
    assert len(after) == 2 and killed[0] not in after, (workers, after, proxy.output())
    assert (result.successful, result.failed) == (calls, 0), f"{result}\nproxy output:\n{proxy.output()}"
    assert proxy.final_stats().get("worker_restarts") == 1, proxy.output()


def test_a_taken_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A worker that cannot listen (the port is bound without SO_REUSEPORT by another program): the
    parent says why in one line and exits 2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(package_root()))
        args = [
            sys.executable,
            "-m",
            "p2psip.cli",
            "proxy",
            "--workers",
            "2",
            "--listen",
            f"udp:127.0.0.1:{port}",
        ]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "Address already in use" in done.stderr, done.stderr
    assert done.stdout == ""
