"""The kernel steers each datagram to the worker that owns its Call-ID (p2psip.steering): real
``SO_REUSEPORT`` sockets on loopback, bound in worker order, the classic BPF program attached, datagrams
from one source (which the kernel's own hash would give to one socket) land where
:func:`p2psip.handoff.call_owner` says; a route sends a dead worker's share to a live one; what the
program cannot read is the kernel's choice, and the worker's own check still names the owner."""

from __future__ import annotations

import os
import select
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from p2psip.handoff import call_owner, owner
from p2psip.steering import SCAN_BYTES, attach, program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_ATTACH_REUSEPORT_CBPF is Linux's")


@contextmanager
def group(workers: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(workers):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", socks[0].getsockname()[1] if len(socks) > 1 else 0))
            sock.setblocking(False)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def arrivals(socks: list[socket.socket], datagrams: list[bytes]) -> list[int]:
    """The index of the socket each datagram (sent from one source, in turn) arrived at."""
    where = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as source:
        for data in datagrams:
            source.sendto(data, socks[0].getsockname())
            readable, _, _ = select.select(socks, [], [], 5.0)
            assert readable, "a datagram did not arrive"
            index = socks.index(readable[0])
            assert readable[0].recv(65535) == data
            where.append(index)
    return where


def request(call_id: str, method: str = "INVITE", pad: int = 0) -> bytes:
    return (
        f"{method} sip:bob@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{os.urandom(4).hex()}\r\n"
        f"X-Pad: {'p' * pad}\r\nFrom: <sip:a@h>;tag=1\r\nTo: <sip:b@h>\r\n{call_id}\r\n"
        f"CSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_each_request_arrives_at_the_owner_of_its_call_id(workers: int) -> None:
    datagrams = [
        request(f"Call-ID: {n}-4321@127.0.0.1", method) for n in range(60) for method in ("INVITE", "BYE")
    ]
    datagrams += [request(f"call-id:{n}x", pad=n * 9) for n in range(40)]  # any case, no space, deeper
    with group(workers) as socks:
        assert attach(socks[0], workers)
        where = arrivals(socks, datagrams)
    assert where == [call_owner(data, workers) for data in datagrams]
    assert len(set(where)) == workers  # spread over every worker, though from one source


def test_a_route_sends_a_dead_workers_share_to_a_live_one() -> None:
    datagrams = [request(f"Call-ID: r{n}") for n in range(40)]
    with group(3) as socks:
        assert attach(socks[0], 3, route=[0, 2, 2])
        where = arrivals(socks, datagrams)
    assert where == [{0: 0, 1: 2, 2: 2}[call_owner(data, 3) or 0] for data in datagrams]


def test_what_the_program_cannot_read_is_the_kernels_choice_and_the_worker_still_knows() -> None:
    """Two spaces, a Call-ID beyond the scanned bytes: the kernel hashes the 4-tuple (one source: one
    socket); a datagram shorter than the scan whose Call-ID it cannot read (the compact form), or a
    keep-alive, goes to worker 0. :func:`owner` still names the Call-ID's owner, to which the worker that
    read it hands it over."""
    odd = [
        request("i: compact1"),
        request("Call-ID:  two-spaces"),
        request("Call-ID: far-away", pad=SCAN_BYTES),
        b"\r\n\r\n",  # a keep-alive: too short to scan, socket 0
    ]
    with group(2) as socks:
        assert attach(socks[0], 2)
        where = arrivals(socks, odd)
    assert where[0] == where[3] == 0
    assert where[1] == where[2]  # one 4-tuple, one socket
    assert [owner(data, 2) for data in odd[:3]] == [call_owner(data, 2) for data in odd[:3]]
    assert call_owner(odd[0], 2) == int.from_bytes(b"compact1", "big") % 65521 % 2


def test_the_program_fits_the_kernels_limit_and_checks_its_route() -> None:
    assert len(program(64)) <= 4096  # BPF_MAXINSNS for a classic program
    with pytest.raises(ValueError):
        program(2, route=[0, 2])
