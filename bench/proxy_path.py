"""The proxy's own work per call, without the kernel: CPU time and CPU instructions (callgrind).

One command::

    python bench/proxy_path.py                 # CPU µs per call (best of 5 rounds of 2,000 calls)
    python bench/proxy_path.py --instructions  # + instructions per call (valgrind callgrind; ~1 minute)

``bench/proxy.py`` measures the shipped program under sipp load: the right figure, but on a shared machine
it moves with everyone else's load by more than most changes weigh. This replays the same call
(``uac_rr.xml`` → stateful proxy with Record-Route → ``uas_rr.xml``: INVITE, 180, 200, ACK, BYE, 200) through
the real :class:`~p2psip.stack.Stack` and :class:`~p2psip.proxy.Proxy` in one process: each datagram
enters where a received one does (the transport's datagram handler), each one the proxy sends is captured
at the socket instead of written; the far ends' answers are built from what the proxy forwarded (its
Via, Record-Route and branch). After every batch the transactions' timers are run to their end (Timer
J/K/L/M), so the per-call figure includes a transaction's whole life. What it leaves out: the syscalls,
the event loop's wake-ups and the collector's clock passes of ``p2psip proxy`` (the kernel's part is
``bench/proxy.py``'s sys time). Instruction counts are load-independent: use them to decide.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from build_compiled import use_if_asked  # noqa: E402

COMPILED = use_if_asked()  # --compiled: run the mypyc build of tools/build_compiled.py instead
BUILD = ", compiled build" if COMPILED else ", pure Python"

from p2psip.proxy import Proxy  # noqa: E402
from p2psip.stack import Stack  # noqa: E402

UAC = ("127.0.0.1", 5080)
UAS = ("127.0.0.1", 5070)
SDP = (
    "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)
_COPIED = (b"via:", b"record-route:", b"from:", b"to:", b"call-id:", b"cseq:")


def _request(
    method: str, uri: str, i: int, cseq: int, branch: str, to_tag: str = "", route: str = ""
) -> bytes:
    body = SDP if method == "INVITE" else ""
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK-{i}-{branch}",
        f"From: sipp <sip:sipp@127.0.0.1:5080>;tag={i}SIPpTag00",
        f"To: service <sip:service@127.0.0.1:5070>{to_tag}",
        f"Call-ID: {i}-bench@127.0.0.1",
        f"CSeq: {cseq} {method}",
        "Contact: sip:sipp@127.0.0.1:5080",
        "Max-Forwards: 70",
        *([f"Route: {route}"] if route else []),
        "Subject: Performance Test",
        *(["Content-Type: application/sdp"] if body else []),
        f"Content-Length: {len(body)}",
        "",
        body,
    ]
    return "\r\n".join(lines).encode()


def _response(forwarded: bytes, status: str, i: int, sdp: bool) -> bytes:
    """What sipp's uas_rr.xml answers to ``forwarded``: its Via, Record-Route, From, To (with our tag),
    Call-ID and CSeq lines, a Contact, and an SDP body on the 200 to the INVITE."""
    head = forwarded.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    copied = [line for line in head if line.lower().startswith(_COPIED)]
    out = [f"SIP/2.0 {status}".encode()]
    for line in copied:
        if line.lower().startswith(b"to:") and b"tag=" not in line:
            line += f";tag={i}SIPpTag01".encode()
        out.append(line)
    body = SDP.encode() if sdp else b""
    out += [b"Contact: <sip:127.0.0.1:5070;transport=UDP>"]
    out += [b"Content-Type: application/sdp"] if sdp else []
    out += [f"Content-Length: {len(body)}".encode(), b"", body]
    return b"\r\n".join(out)


class _Capture:
    """Stands in for the UDP endpoint's socket: what the proxy sends is recorded, not written. (The
    socket, not the endpoint's method, is replaced: the compiled build's methods cannot be.)"""

    def __init__(self, sock: socket.socket, sent: list[tuple[bytes, tuple[str, int]]]) -> None:
        self.sock = sock
        self.sent = sent

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class Path_:
    """One stack + proxy with the UDP socket's send replaced by a capture."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.proxy = Proxy(stack)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        endpoint = stack.transport._udp[next(iter(stack.transport._udp))]
        endpoint.sock = _Capture(endpoint.sock, self.sent)  # type: ignore[assignment]
        self.endpoint = endpoint
        self.deliver = stack.transport._on_datagram
        self.rr = ""

    def _in(self, data: bytes, source: tuple[str, int]) -> list[tuple[bytes, tuple[str, int]]]:
        self.sent.clear()
        self.deliver(data, source, self.endpoint)
        return list(self.sent)

    def call(self, i: int) -> None:
        ((fwd, to),) = self._in(_request("INVITE", "sip:service@127.0.0.1:5070", i, 1, "1-0"), UAC)
        assert to[1] == UAS[1], to
        if not self.rr:
            m = re.search(rb"Record-Route: (<[^>]+>)", fwd)
            assert m is not None
            self.rr = m.group(1).decode()
        relayed = self._in(_response(fwd, "180 Ringing", i, False), UAS)
        relayed += self._in(_response(fwd, "200 OK", i, True), UAS)
        assert len(relayed) == 2 and relayed[1][0].startswith(b"SIP/2.0 200"), relayed
        tag = f";tag={i}SIPpTag01"
        uas_uri = "sip:127.0.0.1:5070;transport=UDP"
        ((ack, to),) = self._in(_request("ACK", uas_uri, i, 1, "5-0", tag, self.rr), UAC)
        assert ack.startswith(b"ACK") and to[1] == UAS[1], ack
        ((bye, _),) = self._in(_request("BYE", uas_uri, i, 2, "7-0", tag, self.rr), UAC)
        ((ok, to),) = self._in(_response(bye, "200 OK", i, False), UAS)
        assert ok.startswith(b"SIP/2.0 200") and to[1] == UAC[1], ok

    def end_transactions(self) -> None:
        """Run every transaction's timers to their end (as if 64 s had passed)."""
        stack = self.stack
        stack._run(stack.transactions.handle_timers(stack.loop.time() + 64 * stack.timers.t1 + 10))
        assert len(stack.transactions) == 0, len(stack.transactions)


async def run(calls: int, rounds: int) -> float:
    """Best CPU µs per call over ``rounds`` batches of ``calls`` calls."""
    stack = await Stack.start(["udp:127.0.0.1:0"], trying_delay=0.2)
    path = Path_(stack)
    try:
        path.call(0)  # warm-up: caches, the Record-Route value
        path.end_transactions()
        best = float("inf")
        n = 1
        for _ in range(rounds):
            gc.collect()
            start = time.process_time()
            for _ in range(calls):
                path.call(n)
                n += 1
            path.end_transactions()
            best = min(best, (time.process_time() - start) / calls * 1e6)
        return best
    finally:
        await stack.close()


def instructions(calls: int) -> float:
    """Instructions per call: two runs under callgrind (``calls`` and ``5 * calls`` calls, one round each),
    the difference over the difference in calls (start-up and imports cancel out)."""
    counts = []
    for n in (calls, 5 * calls):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
             "--calls", str(n), "--rounds", "1", "--quiet"],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        )  # fmt: skip
        m = re.search(r"Collected : (\d+)", out.stderr)
        if m is None:
            raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
        counts.append(int(m.group(1)))
    return (counts[1] - counts[0]) / (4 * calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (default 2,000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best counts (default 5)")
    parser.add_argument("--instructions", action="store_true", help="also count instructions (valgrind)")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help="the compiled build (tools/build_compiled.py)")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        print("bench/proxy_path.py: --calls and --rounds must be at least 1", file=sys.stderr)
        return 2
    gc.set_threshold(2000, 5, 100_000)  # p2psip proxy's (p2psip.run.tune_gc_for_proxy), without its clock
    us = asyncio.run(run(args.calls, args.rounds))
    if args.quiet:
        return 0
    load = os.getloadavg()
    print(f"proxy path: {us:.1f} µs CPU per call (best of {args.rounds} x {args.calls} calls; "
          f"load average {load[0]:.1f}; {sys.implementation.cache_tag}{BUILD})")  # fmt: skip
    if args.instructions:
        if shutil.which("valgrind") is None:
            print("instructions: valgrind is not installed; skipped")
        else:
            print(f"proxy path: {instructions(400):,.0f} instructions per call (valgrind callgrind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
