"""Media: how many concurrent calls with bidirectional G.711 audio one process sustains on one core.

    python bench/media.py                      # steps 25, 50, 100, 150, 200, 300 calls; 5 s each
    python bench/media.py --calls 50 100 --seconds 3 --loop asyncio
    python bench/media.py --relayed 25 50 100 200     # relayed calls through a full peer's TURN server

A call here is a MediaSession sending a 1 kHz PCMU tone and receiving audio back (50 packets/s each way,
20 ms frames, RTCP every second): the measured process holds our N sessions (encode, send, receive, jitter
buffer, decode, sink). The far ends are either sipp's RTP echo (``sipp -rtp_echo``, a C peer that reflects
every packet: cheap, so our process is what is measured) or N MediaSessions of our own in a second process
(a fully symmetric call, but then two Python processes share the cores). Everything runs on 127.0.0.1.

A step passes when no packet is lost in either direction and the RFC 3550 interarrival jitter of the
worst stream (as our receivers compute it, and as the far end reports it in RTCP), sampled every 250 ms and
averaged over the window, is under 20 ms; the worst single sample is shown too (on a shared machine one
scheduling hiccup of another process shows up there). CPU is the measured process's CPU time over the window's wall time: asyncio runs on one
thread, so 100% means one core saturated. The count steps up until a step fails (bounded by --calls).
Each configuration (the standard asyncio loop and, if installed, uvloop) is measured in the same run; the
ratio column compares the largest passing step with the target of 100 calls from the issue.

``--relayed``: concurrent *relayed* calls per core on a full peer. The measured process is a TURN server
(:class:`p2psip.turnserver.TurnServer`, as ``p2psip start --turn`` runs it); a call is two allocations with
a channel bound to each other's relayed address, each sending a 172-byte frame (RTP header + 20 ms of
G.711) every 20 ms as ChannelData: 100 packets/s into the server and 100 out per call. The clients are
plain sockets in the bench process (they only send pre-built frames and count what arrives). A step passes
with under 0.1 % of the frames lost.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aioice import stun

from p2psip.media import CallbackSink, MediaSession, ToneSource
from p2psip.turn import TurnLimits, issue_credentials

TARGET = 100
JITTER_LIMIT_MS = 20.0


def _use_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def far_end(addresses: list[tuple[str, int]], seconds: float, loop_kind: str, ready: object) -> None:
    """The other ends of the calls, in their own process, for ``seconds``."""
    _use_loop(loop_kind)

    async def run() -> None:
        sessions = [
            await MediaSession.start(
                remote=address,
                source=ToneSource(1000),
                sink=CallbackSink(lambda pcm: None),
                rtcp_interval=1.0,
            )
            for address in addresses
        ]
        ready.set()  # type: ignore[attr-defined]
        await asyncio.sleep(seconds)
        for session in sessions:
            await session.close(drain=False)

    asyncio.run(run())


def _free_pair() -> int:
    """An even port with the next one free too (sipp's echo uses the media port and the one above)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port % 2 == 0 and port < 65000:
            return int(port)
    raise RuntimeError("no free port pair")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Step:
    loop: str
    far: str
    calls: int
    cpu_percent: float
    jitter_max_ms: float  # time-average over the window of the worst stream's jitter
    jitter_worst_ms: float  # the worst sample
    remote_jitter_max_ms: float
    remote_jitter_worst_ms: float
    lost: int
    remote_lost: int
    packets: int
    window_s: float
    max_lateness_ms: float
    far_cpu_percent: float

    @property
    def passed(self) -> bool:
        return (
            self.jitter_max_ms < JITTER_LIMIT_MS
            and self.remote_jitter_max_ms < JITTER_LIMIT_MS
            and self.lost == 0
            and self.remote_lost == 0
        )


async def measure(calls: int, seconds: float, loop_kind: str, far: str) -> Step:
    """``far`` is "ours" (N MediaSessions in a second process) or "sipp" (sipp -rtp_echo reflects every
    packet back on one port: a C peer that costs little, so our process is the one under test)."""
    loop = asyncio.get_running_loop()
    warmup = 1.5
    echo: subprocess.Popen[bytes] | None = None
    child = None
    if far == "sipp":
        media_port = _free_pair()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            sip_port = probe.getsockname()[1]
        echo = subprocess.Popen(
            [
                "sipp",
                "-sn",
                "uas",
                "-i",
                "127.0.0.1",
                "-p",
                str(sip_port),
                "-mi",
                "127.0.0.1",
                "-mp",
                str(media_port),
                "-rtp_echo",
                "-nostdin",
                "-timeout",
                f"{int(warmup + seconds + 30)}s",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)  # let it bind (a bench, not a test)
        ours = [
            await MediaSession.start(
                remote=("127.0.0.1", media_port),
                source=ToneSource(1000),
                sink=CallbackSink(lambda pcm: None),
                rtcp_interval=1.0,
            )
            for _ in range(calls)
        ]
    else:
        ours = [
            await MediaSession.start(
                source=ToneSource(1000), sink=CallbackSink(lambda pcm: None), rtcp_interval=1.0
            )
            for _ in range(calls)
        ]
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        child = context.Process(
            target=far_end, args=([s.local_address for s in ours], warmup + seconds + 1.5, loop_kind, ready)
        )
        child.start()
        while not ready.is_set():
            await asyncio.sleep(0.05)
            if not child.is_alive():
                raise RuntimeError("the far-end process died")
    await asyncio.sleep(warmup)  # latch symmetric RTP, fill jitter buffers, first RTCP
    before = [(s.stats.packets_received, s.stats.lost) for s in ours]
    far_pid = echo.pid if echo is not None else child.pid if child is not None else None
    far_cpu0 = _cpu_seconds(far_pid) if far_pid else 0.0
    cpu0, wall0 = time.process_time(), loop.time()
    samples: list[float] = []  # max jitter over our streams, sampled through the window
    remote_samples: list[float] = []
    for _ in range(int(seconds / 0.25)):
        await asyncio.sleep(0.25)
        now = [s.stats for s in ours]
        samples.append(max(s.jitter_ms for s in now))
        remote_samples.append(max(s.remote_jitter_ms or 0.0 for s in now))
    cpu1, wall1 = time.process_time(), loop.time()
    far_cpu1 = _cpu_seconds(far_pid) if far_pid else 0.0
    stats = [s.stats for s in ours]
    for session in ours:
        await session.close(drain=False)
    if child is not None:
        await loop.run_in_executor(None, child.join, 30)
        if child.is_alive():
            child.kill()
    if echo is not None:
        echo.terminate()
        try:
            echo.wait(timeout=5)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait(timeout=5)
    return Step(
        loop=loop_kind,
        far=far,
        far_cpu_percent=100 * (far_cpu1 - far_cpu0) / (wall1 - wall0),
        calls=calls,
        cpu_percent=100 * (cpu1 - cpu0) / (wall1 - wall0),
        jitter_max_ms=statistics.fmean(samples),
        jitter_worst_ms=max(samples),
        remote_jitter_max_ms=statistics.fmean(remote_samples),
        remote_jitter_worst_ms=max(remote_samples),
        lost=sum(s.lost - b[1] for s, b in zip(stats, before, strict=True)),
        remote_lost=sum(max(0, s.remote_lost or 0) for s in stats),
        packets=sum(s.packets_received - b[0] for s, b in zip(stats, before, strict=True)),
        window_s=wall1 - wall0,
        max_lateness_ms=max(s.max_tick_lateness_ms for s in stats),
    )


def run_config(loop_kind: str, far: str, steps: list[int], seconds: float) -> list[Step]:
    results = []
    for calls in steps:
        _use_loop(loop_kind)
        step = asyncio.run(measure(calls, seconds, loop_kind, far))
        asyncio.set_event_loop_policy(None)
        results.append(step)
        print(
            f"  {loop_kind:8} {far:5} {calls:5} calls: cpu {step.cpu_percent:5.1f}%  jitter max {step.jitter_max_ms:6.2f} ms"
            f"  lost {step.lost}/{step.remote_lost}  {'ok' if step.passed else 'FAIL'}",
            file=sys.stderr,
        )
        if not step.passed:
            break
    return results


# ---------------------------------------------------------------------------------------------- relayed calls
RELAY_SECRET = b"bench-relay-secret"
FRAME = bytes(172)


def turn_server(port: int, seconds: float, ready: object) -> None:
    """The measured process: one TURN server, as a full peer runs it."""
    from p2psip.turnserver import TurnServer

    async def run() -> None:
        limits = TurnLimits(max_allocations=10_000, per_user=10_000, per_source=10_000)
        async with TurnServer(RELAY_SECRET, port=port, limits=limits):
            ready.set()  # type: ignore[attr-defined]
            await asyncio.sleep(seconds)

    asyncio.run(run())


class _Client:
    """One TURN client socket (allocation set up with blocking requests; then non-blocking frames)."""

    def __init__(self, server: tuple[str, int], user: str) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.username, password = issue_credentials(RELAY_SECRET, user, time.time())
        challenge = self._ask(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000})
        self.realm, self.nonce = challenge.attributes["REALM"], challenge.attributes["NONCE"]
        import hashlib

        self.key = hashlib.md5(f"{self.username}:{self.realm}:{password}".encode()).digest()
        response = self._ask(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, signed=True)
        self.relay: tuple[str, int] = response.attributes["XOR-RELAYED-ADDRESS"]
        self.received = 0

    def _ask(self, method: stun.Method, attrs: dict[str, object], signed: bool = False) -> stun.Message:
        request = stun.Message(method, stun.Class.REQUEST)
        request.attributes.update(attrs)
        if signed:
            request.attributes.update(USERNAME=self.username, REALM=self.realm, NONCE=self.nonce)
            request.add_message_integrity(self.key)
        self.sock.sendto(bytes(request), self.server)
        return stun.parse_message(self.sock.recv(2048))

    def bind(self, peer: tuple[str, int]) -> None:
        attrs = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": peer}
        response = self._ask(stun.Method.CHANNEL_BIND, attrs, signed=True)
        if response.message_class != stun.Class.RESPONSE:
            raise RuntimeError(f"ChannelBind refused: {response.attributes.get('ERROR-CODE')}")
        self.sock.setblocking(False)

    def on_readable(self) -> None:
        while True:
            try:
                self.sock.recv(2048)
            except BlockingIOError:
                return
            self.received += 1


@dataclass
class RelayStep:
    calls: int
    cpu_percent: float
    sent: int
    received: int
    window_s: float

    @property
    def lost_percent(self) -> float:
        return 100 * (self.sent - self.received) / self.sent if self.sent else 100.0

    @property
    def passed(self) -> bool:
        return self.lost_percent < 0.1


async def measure_relayed(calls: int, seconds: float) -> RelayStep:
    port = _free_pair()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=turn_server, args=(port, seconds + 30, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(20):
            raise RuntimeError("the TURN server did not start")
        address = ("127.0.0.1", port)
        clients: list[_Client] = []
        for i in range(calls):
            a, b = _Client(address, f"a{i}"), _Client(address, f"b{i}")
            a.bind(b.relay)
            b.bind(a.relay)
            clients += [a, b]
        loop = asyncio.get_running_loop()
        for client in clients:
            loop.add_reader(client.sock.fileno(), client.on_readable)
        frame = struct.pack("!HH", 0x4000, len(FRAME)) + FRAME
        sent = 0
        assert server.pid is not None
        cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
        next_tick = t0
        while time.monotonic() - t0 < seconds:
            for client in clients:
                client.sock.sendto(frame, address)
            sent += len(clients)
            next_tick += 0.02
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        window = time.monotonic() - t0
        cpu = _cpu_seconds(server.pid) - cpu0
        await asyncio.sleep(0.5)  # the last frames in flight
        for client in clients:
            loop.remove_reader(client.sock.fileno())
            client.sock.close()
        received = sum(client.received for client in clients)
        return RelayStep(calls, 100 * cpu / window, sent, received, window)
    finally:
        server.terminate()
        server.join(5)


def run_relayed(steps: list[int], seconds: float) -> None:
    results: list[RelayStep] = []
    for calls in steps:
        step = asyncio.run(measure_relayed(calls, seconds))
        results.append(step)
        print(
            f"  relayed {calls:5} calls: TURN cpu {step.cpu_percent:5.1f}%  lost {step.lost_percent:.3f}%"
            f"  {'ok' if step.passed else 'FAIL'}",
            file=sys.stderr,
        )
        if not step.passed:
            break
    print(
        f"\nRelayed calls through one TURN server (a full peer's), {seconds:.0f} s window, loopback, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print("| calls | TURN server CPU of one core | frames lost | frames relayed per s | result |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for s in results:
        print(
            f"| {s.calls} | {s.cpu_percent:.0f}% | {s.lost_percent:.3f}% | {s.received / s.window_s:.0f}"
            f" | {'pass' if s.passed else 'FAIL'} |"
        )
    passing = [s for s in results if s.passed] or results
    per_call = statistics.fmean(s.cpu_percent / s.calls for s in passing)
    best = max((s.calls for s in results if s.passed), default=0)
    print(
        f"\n| most relayed calls passing | CPU per relayed call | relayed calls one full core could carry |\n"
        f"| ---: | ---: | ---: |\n| {best} | {per_call:.2f}% | {100 / per_call:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, nargs="+", default=[25, 50, 100, 150, 200, 300])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument("--far", choices=["ours", "sipp", "both"], default="both")
    parser.add_argument(
        "--relayed", type=int, nargs="+", metavar="CALLS", help="measure relayed calls instead"
    )
    args = parser.parse_args()
    if args.relayed:
        run_relayed(sorted(set(args.relayed)), args.seconds)
        return
    fars = ["sipp", "ours"] if args.far == "both" else [args.far]
    if "sipp" in fars and shutil.which("sipp") is None:
        fars.remove("sipp")
        print("sipp is not installed: the far end is our own sessions only", file=sys.stderr)
    kinds = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    if "uvloop" in kinds:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            kinds.remove("uvloop")
            print("uvloop is not installed: measuring the asyncio loop only", file=sys.stderr)
    steps = sorted(set(args.calls))
    all_steps: list[Step] = []
    configs = [(kind, far) for far in fars for kind in kinds]
    for kind, far in configs:
        all_steps += run_config(kind, far, steps, args.seconds)
    print(
        f"\nMedia: bidirectional PCMU calls in one process, {args.seconds:.0f} s window, loopback, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print(
        "| far end | loop | calls | CPU of one core (far end's) | jitter, worst stream, window mean (ours / far end via RTCP) | jitter, worst sample | lost (in / out) | packets in per stream per s | worst tick late | result |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in all_steps:
        far_mean = "n/a" if s.far == "sipp" else f"{s.remote_jitter_max_ms:.2f}"  # the echo sends no RTCP
        far_worst = "n/a" if s.far == "sipp" else f"{s.remote_jitter_worst_ms:.1f}"
        print(
            f"| {s.far} | {s.loop} | {s.calls} | {s.cpu_percent:.0f}% ({s.far_cpu_percent:.0f}%) | {s.jitter_max_ms:.2f} / {far_mean} ms"
            f" | {s.jitter_worst_ms:.1f} / {far_worst} ms | {s.lost} / {s.remote_lost} | {s.packets / s.calls / s.window_s:.1f} | {s.max_lateness_ms:.1f} ms"
            f" | {'pass' if s.passed else 'FAIL'} |"
        )
    print()
    print(
        "| far end | loop | most calls passing | ratio to target (100) | CPU per call | calls one full core could carry (from CPU) | ratio to target |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, far in configs:
        mine = [s for s in all_steps if s.loop == kind and s.far == far]
        passing = [s for s in mine if s.passed]
        best = max((s.calls for s in passing), default=0)
        basis = passing or mine
        per_call = statistics.fmean(s.cpu_percent / s.calls for s in basis) if basis else float("nan")
        capacity = 100 / per_call if per_call else float("nan")
        print(
            f"| {far} | {kind} | {best} | {best / TARGET:.2f}x | {per_call:.2f}% | {capacity:.0f} | {capacity / TARGET:.2f}x |"
        )
    print(
        "\nThe CPU-derived column divides one core by the CPU each passing call used; it is what the process would"
        " carry if it had a core to itself (on a shared machine the passing count is limited by scheduling"
        " delays, which show as 'worst tick late')."
    )


if __name__ == "__main__":
    main()
