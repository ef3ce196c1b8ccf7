"""``p2psip proxy --workers 2`` on loopback with sipp: calls go through both workers (the datagrams the
kernel gives the wrong worker are handed to the one keeping their transaction), and a worker killed with
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

from .ourproxy import OurProxy
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
    # one sipp source reaches one worker: about half the transactions are the other's, handed over
    assert stats.get("handed_off", 0) >= 200 and stats.get("handed_in") == stats.get("handed_off"), stats
    # but not the ACKs of the 200s: forwarded by whichever worker reads them (half were another's)
    assert stats.get("acks_here", 0) >= 100 and stats.get("stateless_acks") == 400, stats


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
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
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
