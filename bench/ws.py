"""WebSocket benchmark: REGISTER and MESSAGE throughput over WS vs UDP, a p2psip peer vs Kamailio.

One command::

    python bench/ws.py            # 2,000 REGISTERs and 2,000 MESSAGEs per target and transport
    python bench/ws.py --quick    # 500 of each

sipp has no WebSocket, so a bench client in this process drives every target: over WS it is a SIP
WebSocket client on ``wsproto`` (as a browser's JsSIP would be, with a ``.invalid`` Via host and Contact);
over UDP a plain socket. It keeps ``--window`` requests outstanding (no retransmissions: loopback), and
answers with 200 the MESSAGEs the target forwards back to it. Targets, each a fresh child process:

- ``p2psip`` — ``p2psip start`` (a one-peer overlay: the registrar writes signed entries into the DHT,
  MESSAGEs are looked up and proxied statefully to the registered contact, over the browser's connection
  for WS);
- ``kamailio`` — Kamailio 5.6 with its ``websocket`` module (``xhttp``, ``nathelper``), ``usrloc`` in memory,
  ``tm`` proxying the MESSAGEs to the contact (back over the connection for WS).

REGISTER: 100 AORs, each registered then refreshed (every request is a write). MESSAGE: to those AORs, so
each goes target → bench client (which answers 200) → target → bench client. Reported: requests per
second with every request answered, the target's CPU time (user+system of it and its children, from
/proc) per 1,000 requests, and the bench client's own CPU share of the wall time (a client near 100 %
limits what can be measured). The machine may be shared: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import free_port  # noqa: E402
from interop.kamailio import Kamailio, has_websocket_module, websocket_config  # noqa: E402
from interop.procs import ChildError, cpu_seconds, stop  # noqa: E402
from wsproto import ConnectionType, WSConnection  # noqa: E402
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage  # noqa: E402

from p2psip.message import Request as SipRequest  # noqa: E402
from p2psip.message import Response, parse  # noqa: E402

AORS = 100
DOMAIN = "bench.example"


# ------------------------------------------------------------------------------------------ client


class Client:
    """The bench client: sends requests with a window of outstanding ones, answers forwarded MESSAGEs."""

    def __init__(self, transport: str, host: str, port: int) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.pending: dict[str, asyncio.Future[int]] = {}
        self.via_host = "b3nch7cl13nt.invalid"
        self.local = ("127.0.0.1", 0)
        self.sock: socket.socket | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.answered = 0
        self.failures = 0
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.transport == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.sock = sock
            self.local = sock.getsockname()
            loop.add_reader(sock.fileno(), self._udp_readable)
            return
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.writer = writer
        writer.write(self.ws.send(Request(host=f"{self.host}:{self.port}", target="/", subprotocols=["sip"])))
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                raise ConnectionError("the target closed the WebSocket handshake")
            self.ws.receive_data(data)
            if any(isinstance(e, AcceptConnection) for e in self.ws.events()):
                break
        self._reader = asyncio.create_task(self._ws_read(reader))

    def _udp_readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            self._received(data, addr)

    async def _ws_read(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, TextMessage):
                    self._received(event.data.encode(), None)
                elif isinstance(event, BytesMessage):
                    self._received(bytes(event.data), None)

    def _received(self, data: bytes, addr: tuple[str, int] | None) -> None:
        try:
            message = parse(data, datagram=addr is not None)
        except Exception:
            self.failures += 1
            return
        if isinstance(message, SipRequest):  # a MESSAGE forwarded to our contact: answer it
            if message.method != "ACK":
                self._send(bytes(Response.for_request(message, 200)), addr)
            return
        if message.status < 200:
            return
        future = self.pending.pop(message.call_id, None)
        if future is not None and not future.done():
            future.set_result(message.status)

    def _send(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        if self.transport == "udp":
            assert self.sock is not None
            self.sock.sendto(data, addr or (self.host, self.port))
        else:
            assert self.writer is not None
            self.writer.write(self.ws.send(TextMessage(data=data.decode())))

    def contact(self, user: str) -> str:
        if self.transport == "udp":
            return f"sip:{user}@{self.local[0]}:{self.local[1]}"
        return f"sip:{user}@{self.via_host};transport=ws"

    def via(self, branch: str) -> str:
        if self.transport == "udp":
            return f"SIP/2.0/UDP {self.local[0]}:{self.local[1]};branch=z9hG4bK{branch};rport"
        return f"SIP/2.0/WS {self.via_host};branch=z9hG4bK{branch}"

    def request(self, method: str, n: int, cseq: int) -> tuple[str, bytes]:
        user = f"user{n % AORS}"
        aor = f"sip:{user}@{DOMAIN}"
        call_id = f"{method.lower()}-{n}-{cseq}@bench"
        ruri = f"sip:{DOMAIN}" if method == "REGISTER" else aor
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: {self.via(f'{method[:3]}{n}x{cseq}')}",
            "Max-Forwards: 70",
            f"From: <sip:bench@{DOMAIN}>;tag=b{n}" if method == "MESSAGE" else f"From: <{aor}>;tag=r{n}",
            f"To: <{aor}>",
            f"Call-ID: {call_id}",
            f"CSeq: {cseq} {method}",
        ]
        body = b""
        if method == "REGISTER":
            lines += [f"Contact: <{self.contact(user)}>", "Expires: 600"]
        else:
            body = b"hello from the bench"
            lines.append("Content-Type: text/plain")
        lines.append(f"Content-Length: {len(body)}")
        return call_id, ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def run(self, method: str, count: int, window: int, timeout: float) -> tuple[float, int]:
        """Send ``count`` requests with ``window`` outstanding; (seconds, how many got a 2xx)."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(window)
        ok = 0

        async def one(n: int) -> None:
            nonlocal ok
            async with slots:
                call_id, data = self.request(method, n, 1 + n // AORS)
                future: asyncio.Future[int] = loop.create_future()
                self.pending[call_id] = future
                self._send(data)
                try:
                    status = await asyncio.wait_for(future, timeout)
                except TimeoutError:
                    self.pending.pop(call_id, None)
                    return
                if 200 <= status < 300:
                    ok += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(count)))
        return time.perf_counter() - started, ok

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.writer is not None:
            self.writer.close()
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


# ------------------------------------------------------------------------------------------ targets


class PeerProcess:
    """``p2psip start`` as a child with UDP and WS listeners (a one-peer overlay)."""

    def __init__(self, workdir: Path) -> None:
        self.udp, self.ws, overlay = free_port(), free_port(), free_port()
        self.args = [
            sys.executable, "-m", "p2psip.cli", "start", "--listen", f"127.0.0.1:{self.udp}",
            "--listen", f"ws:127.0.0.1:{self.ws}", "--overlay", f"127.0.0.1:{overlay}",
            "--data-dir", str(workdir / "peer"),
        ]  # fmt: skip
        self.log = workdir / "peer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PeerProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        # Its event lines go to a file: a pipe nobody reads would fill and stop the peer.
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if re.search(r"\bjoined\b", self.log.read_text(errors="replace")):
                return self
            if self.proc.poll() is not None:
                raise ChildError(f"p2psip start ended before it was ready:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise ChildError("p2psip start was not ready within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc, grace=5.0)  # type: ignore[arg-type]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass
class Row:
    target: str
    transport: str
    results: dict[str, tuple[float, int, int, float, float]] = field(default_factory=dict)
    """method -> (requests/s, answered, sent, target CPU s per 1,000, client CPU share)."""
    note: str = ""


async def measure(name: str, transport: str, host: str, port: int, pid: int, count: int, window: int) -> Row:
    row = Row(name, transport)
    client = Client(transport, host, port)
    await client.open()
    try:
        for method in ("REGISTER", "MESSAGE"):
            cpu0 = cpu_seconds(pid)
            mine0 = resource.getrusage(resource.RUSAGE_SELF)
            seconds, ok = await client.run(method, count, window, timeout=10.0)
            mine1 = resource.getrusage(resource.RUSAGE_SELF)
            target_cpu = cpu_seconds(pid) - cpu0
            client_cpu = (mine1.ru_utime - mine0.ru_utime) + (mine1.ru_stime - mine0.ru_stime)
            rate = ok / seconds if seconds > 0 else 0.0
            row.results[method] = (rate, ok, count, target_cpu * 1000 / max(ok, 1), client_cpu / seconds)
    finally:
        await client.close()
    return row


def table(rows: list[Row]) -> str:
    head = ("| target | transport | REGISTER/s | MESSAGE/s | target CPU ms/request (REG, MSG) "
            "| bench client CPU (REG, MSG) |")  # fmt: skip
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if row.note:
            lines.append(f"| {row.target} | {row.transport} | {row.note} | | | |")
            continue
        reg, msg = row.results["REGISTER"], row.results["MESSAGE"]

        def rate(r: tuple[float, int, int, float, float]) -> str:
            lost = "" if r[1] == r[2] else f" ({r[2] - r[1]} unanswered)"
            return f"{r[0]:,.0f}{lost}"

        lines.append(
            f"| {row.target} | {row.transport} | {rate(reg)} | {rate(msg)} | {reg[3]:.2f}, {msg[3]:.2f} "
            f"| {reg[4]:.0%}, {msg[4]:.0%} |"
        )
    return "\n".join(lines)


async def run_all(count: int, window: int, workdir: Path) -> list[Row]:
    rows: list[Row] = []
    with PeerProcess(workdir) as peer:
        for transport, port in (("ws", peer.ws), ("udp", peer.udp)):
            rows.append(await measure("p2psip", transport, "127.0.0.1", port, peer.pid, count, window))
            print(f"  p2psip {transport} done", file=sys.stderr, flush=True)
    if not has_websocket_module():
        rows.append(Row("kamailio", "ws/udp", note="skipped: kamailio-websocket-modules not installed"))
        return rows
    port, ws_port = free_port(), free_port()
    config = websocket_config("127.0.0.1", port, ws_port, children=2)
    with Kamailio(config, workdir, port, transports=("udp",), tls_port=ws_port) as kamailio:
        for transport, p in (("ws", ws_port), ("udp", port)):
            rows.append(await measure("kamailio", transport, "127.0.0.1", p, kamailio.pid, count, window))
            print(f"  kamailio {transport} done", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 requests of each kind instead of 2,000")
    parser.add_argument("--window", type=int, default=32, help="requests outstanding at once (default 32)")
    args = parser.parse_args(argv)
    count = 500 if args.quick else 2000
    with tempfile.TemporaryDirectory(prefix="p2psip-bench-ws-") as tmp:
        rows = asyncio.run(run_all(count, args.window, Path(tmp)))
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"WebSocket bench, {when}, {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{count} requests per kind, window {args.window}")  # fmt: skip
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
