"""Media: how many concurrent calls with bidirectional G.711 audio one process sustains on one core.

    python bench/media.py                      # steps 250, 500, 750, 1000, 1250 calls; 5 s each
    python bench/media.py --calls 500 1000 --seconds 3 --loop asyncio --far all
    python bench/media.py --relayed 25 50 100 200     # relayed calls through a full peer's TURN server

A call here is a MediaSession sending a 1 kHz PCMU tone and receiving audio back (50 packets/s each way,
20 ms frames, RTCP every second): the measured process holds our N sessions (encode, send, receive, jitter
buffer, decode, sink). The far ends are, by ``--far``:

- ``batch`` (default): our own far end written to keep up with 1,000+ calls (:func:`batch_far_end`): one
  timer for all calls, a tone encoded once and sent in pre-built packets, one epoll set for all its sockets,
  RFC 3550 reception statistics and an RTCP SR with a report block per call every second; in one process
  per 800 calls (``--far-processes``), so that the figure is about the measured process, not the far end;
- ``ours``: N MediaSessions in a second process (a fully symmetric call, as costly as the measured side, so
  on 2 shared cores the far end gives out first);
- ``sipp``: sipp's RTP echo (``sipp -rtp_echo``, C, one port for every call; it reflects, sends no RTCP).

Everything runs on 127.0.0.1.

A step passes when, over its window: no packet is lost in either direction (RFC 3550 at our receivers; the
far end's RTCP reports for ours); every call ran at 99 % of its rate or more each way (49.5 packets/s: a step
that ran slower is no pass); and the RFC 3550 interarrival jitter of the worst stream (as our receivers
compute it, and as the far end reports it in RTCP), sampled every 250 ms and averaged over the window, is
under 20 ms. The worst single sample is shown too (on a shared machine one scheduling hiccup of another
process shows up there). A failing step is run again (``--retries``, default once) before the count stops;
every attempt is printed. CPU is the measured process's CPU time over the window's wall time: asyncio runs
on one thread, so 100% means one core saturated. The count steps up until a step fails (bounded by --calls).
Each configuration (the standard asyncio loop and, if installed, uvloop) is measured in the same run; the
ratio column compares the largest passing step with the target of 1,000 calls per core (issue 19).

Why a step fails below the CPU limit is printed with it: the run-queue time of our process and of the far
end's (``/proc/PID/schedstat``: runnable, waiting for a core that another process holds), the far end's worst
timer lateness (it then sends in bursts, which our receivers see as jitter), and the kernel's UDP
``RcvbufErrors`` (datagrams dropped at a full socket buffer; each call has its own sockets, whose default
buffer holds a few seconds of one call's packets, so these mean a stall of seconds, not a small buffer).

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
import contextlib
import multiprocessing
import os
import random
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from aioice import stun
from build_compiled import use_if_asked
from conditions import Conditions

COMPILED = use_if_asked()  # --compiled: the mypyc build of tools/build_compiled.py (media path included)

from p2psip.media import CallbackSink, MediaSession, ToneSource  # noqa: E402
from p2psip.media.codecs import PCMU  # noqa: E402
from p2psip.media.rtcp import (  # noqa: E402
    ReceptionStats,
    SenderReport,
    SourceDescription,
    build_compound,
    ntp_timestamp,
)
from p2psip.turn import TurnLimits, issue_credentials  # noqa: E402

TARGET = 1000  # issue 19, target 8: concurrent calls per core
CALLS_PER_FAR_PROCESS = 800  # the batched far end's share per process (about half a core at 800 calls)
JITTER_LIMIT_MS = 20.0
MIN_RATE = 49.5  # packets per call per second, each way: 99 % of 50 (a step that ran slower is no pass)


def _own_session() -> None:
    """Put this far-end process in a session of its own. With the kernel's autogroup scheduling (on by
    default here: ``/proc/sys/kernel/sched_autogroup_enabled``) CPU is shared fairly between sessions first,
    so a far end left in the bench's session takes its CPU out of the measured process's share, as no far
    end on another machine would: at 1,000 calls the far end needs about half a core."""
    with contextlib.suppress(OSError):
        os.setsid()


def _use_loop(kind: str) -> None:
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def far_end(addresses: list[tuple[str, int]], seconds: float, loop_kind: str, ready: object) -> None:
    """The other ends of the calls, in their own process, for ``seconds``."""
    _own_session()
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


class _FarCall:
    """One call's far end in :func:`batch_far_end`: an RTP/RTCP socket pair, a pre-built packet whose
    sequence number and timestamp are patched in place, and RFC 3550 reception statistics for its RTCP."""

    def __init__(self, near: tuple[str, int], near_rtcp: tuple[str, int], ssrc: int) -> None:
        self.near, self.near_rtcp, self.ssrc = near, near_rtcp, ssrc
        for _ in range(64):
            self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.rtp.bind(("127.0.0.1", 0))
            port = self.rtp.getsockname()[1]
            self.rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                self.rtcp.bind(("127.0.0.1", port + 1))
                break
            except OSError:
                self.rtp.close()
                self.rtcp.close()
        else:
            raise RuntimeError("no free RTP/RTCP port pair")
        self.rtp.setblocking(False)
        self.rtcp.setblocking(False)
        self.packet = bytearray(12 + 160)
        self.sequence = random.getrandbits(16)
        self.timestamp = random.getrandbits(32)
        self.sent = 0
        self.reception: ReceptionStats | None = None

    def on_rtp(self, now: float) -> None:
        """One datagram (the epoll set is level-triggered: a backlog is named again on the next poll)."""
        try:
            data = self.rtp.recv(2048)
        except OSError:  # EAGAIN, or an ICMP error from before the near end bound: not fatal
            return
        if len(data) < 12:
            return
        sequence, timestamp, ssrc = _FAR_HEADER.unpack_from(data)
        reception = self.reception
        if reception is None or reception.ssrc != ssrc:
            reception = self.reception = ReceptionStats(ssrc, 8000)
        reception.update(sequence, timestamp, now)

    def on_rtcp(self, now: float) -> None:
        with contextlib.suppress(OSError):
            self.rtcp.recv(2048)  # our sessions' SR/RR: the far end only needs to take them in

    def report(self, now: float) -> None:
        blocks = [self.reception.report_block(now)] if self.reception is not None else []
        sr = SenderReport(self.ssrc, ntp_timestamp(time.time()), self.timestamp, self.sent, 160 * self.sent, blocks)
        with contextlib.suppress(OSError):
            self.rtcp.sendto(build_compound([sr, SourceDescription({self.ssrc: f"far-{self.ssrc:08x}"})]), self.near_rtcp)


_FAR_HEADER = struct.Struct("!xxHII")
_FAR_PATCH = struct.Struct("!BBHII")


def batch_far_end(
    addresses: list[tuple[tuple[str, int], tuple[str, int]]],
    seconds: float,
    loop_kind: str,
    ready: object,
    lateness: object = None,
) -> None:
    """The far ends of many calls in one process, batched so that it keeps up with 1,000+ calls: one timer
    for all of them (on the ``start + k * 20 ms`` grid), a 1 kHz PCMU tone encoded once (50 frames, one
    second, cycled) and sent in a pre-built packet patched in place on a connected socket, one epoll set for
    all its sockets (one datagram read per ready socket per poll), and an RTCP SR with a reception report (RFC 3550 jitter and loss of what our session sent) every
    second per call, which is how the measured side learns the far end's view. The far end runs no jitter
    buffer and decodes nothing: the measured side does, and the figure is about it.

    ``lateness`` (a shared array of doubles, optional): the far end keeps the worst lateness of its timer in
    ``[0]`` (seconds; the measuring process zeroes it when its window opens), so that a step that fails
    because the far end sent late (its packets then arrive in bursts) is told from one where we were late."""
    _own_session()
    _use_loop(loop_kind)
    tone = ToneSource(1000)
    frames = [PCMU.encode(tone.read(160) or b"") for _ in range(50)]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        calls = [_FarCall(near, near_rtcp, random.getrandbits(32)) for near, near_rtcp in addresses]
        # one epoll set for every socket, read one datagram per ready socket per poll (the way our sessions
        # read: asyncio's per-socket readers and a read until EAGAIN cost the far end twice as much CPU)
        epoll = select.epoll()
        handlers: dict[int, Callable[[float], None]] = {}
        for call in calls:
            call.rtp.connect(call.near)  # send/recv: no address to convert, one route lookup
            for sock, handler in ((call.rtp, call.on_rtp), (call.rtcp, call.on_rtcp)):
                epoll.register(sock.fileno(), select.EPOLLIN)
                handlers[sock.fileno()] = handler

        def readable() -> None:
            for _ in range(4):
                events = epoll.poll(0, 2048)
                if not events:
                    return
                now = loop.time()
                for fd, _ in events:
                    handlers[fd](now)

        loop.add_reader(epoll.fileno(), readable)
        start = loop.time()
        index = 0
        next_report = start + random.uniform(0.2, 0.8)
        done = loop.create_future()

        def tick() -> None:
            nonlocal index, next_report
            now = loop.time()
            if lateness is not None:
                late = now - (start + (index + 1) * 0.02)
                if late > lateness[0]:  # type: ignore[index]
                    lateness[0] = late  # type: ignore[index]
            while start + (index + 1) * 0.02 <= now:  # every interval that is due, late ones included
                index += 1
                payload = frames[index % 50]
                for call in calls:
                    packet = call.packet
                    _FAR_PATCH.pack_into(packet, 0, 0x80, 0, call.sequence, call.timestamp, call.ssrc)
                    packet[12:] = payload
                    call.sequence = (call.sequence + 1) & 0xFFFF
                    call.timestamp = (call.timestamp + 160) & 0xFFFFFFFF
                    try:
                        call.rtp.send(packet)
                    except (BlockingIOError, InterruptedError):
                        continue  # a full socket buffer: the near end sees a loss
                    except OSError:
                        continue
                    call.sent += 1
            if now >= next_report:
                next_report = now + 1.0
                for call in calls:
                    call.report(now)
            if now - start < seconds:
                loop.call_at(start + (index + 1) * 0.02, tick)
            elif not done.done():
                done.set_result(None)

        loop.call_at(start + 0.02, tick)
        ready.set()  # type: ignore[attr-defined]
        await done
        loop.remove_reader(epoll.fileno())
        epoll.close()
        for call in calls:
            call.rtp.close()
            call.rtcp.close()

    asyncio.run(run())


_NOISE = random.Random(19).randbytes(2 * 8000 * 10)  # 10 s of 16-bit noise, shared by the calls


class NoiseSource:
    """``--source noise``: frames that never repeat (each call reads the shared 10 s of noise from its own
    sample offset), so no frame is served from :func:`p2psip.media.codecs.encode_frame`'s memory: the cost of
    a call carrying speech. The default tone repeats every second and is encoded once per process."""

    def __init__(self) -> None:
        self.position = 2 * random.randrange(8000 * 10)

    def read(self, samples: int) -> bytes:
        start = self.position
        self.position = (start + 2 * samples) % (len(_NOISE) - 2 * samples)
        return _NOISE[start : start + 2 * samples]

    def close(self) -> None:
        pass


def _source(kind: str) -> ToneSource | NoiseSource:
    return NoiseSource() if kind == "noise" else ToneSource(1000)


def _free_pair() -> int:
    """An even port with the next one free too (sipp's echo uses the media port and the one above)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port % 2 == 0 and port < 65000:
            return int(port)
    raise RuntimeError("no free port pair")


def _switches() -> int:
    """Voluntary context switches of this process so far: how often the loop slept and was woken."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])
    return 0


def _wait_seconds(pid: int | str = "self") -> float:
    """Time the process's main thread spent runnable but waiting for a core (/proc/PID/schedstat, field 2):
    on a shared machine, the reason a step fails with the CPU to spare."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _udp_receive_errors() -> int:
    """The kernel's UDP RcvbufErrors (whole machine): datagrams dropped because a socket's buffer was full."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return 0


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
    packets_out: int = 0
    cpu_seconds: float = 0.0
    wakeups: int = 0  # voluntary context switches of the measured process over the window
    wait_percent: float = 0.0  # of the window, the measured process waited for a core (run queue)
    far_wait_percent: float = 0.0  # the same for the far end's busiest process
    far_late_ms: float = 0.0  # the far end's worst timer lateness in the window (batch far end only)
    rcvbuf_errors: int = 0  # UDP datagrams the kernel dropped at full socket buffers (whole machine)
    concealed: int = 0  # frames our jitter buffers concealed in the window (a packet missing at its slot)
    late: int = 0  # packets that reached our jitter buffers after their slot had been played

    @property
    def us_per_call_tick(self) -> float:
        """CPU per call per 20 ms (one packet out, one in, its share of RTCP): what a call costs whatever rate
        the far end managed on a loaded machine."""
        return 1e6 * self.cpu_seconds / max(1, (self.packets + self.packets_out) / 2)

    def rate(self, packets: int) -> float:
        return packets / self.calls / self.window_s

    @property
    def failures(self) -> list[str]:
        """Why the step failed, by the pass criteria (see the module docstring); empty: it passed."""
        out = []
        if self.lost or self.remote_lost:
            out.append(f"lost {self.lost} in / {self.remote_lost} out")
        if self.rate(self.packets) < MIN_RATE or self.rate(self.packets_out) < MIN_RATE:
            out.append(f"rate {self.rate(self.packets):.1f} in / {self.rate(self.packets_out):.1f} out per call per s")
        if self.jitter_max_ms >= JITTER_LIMIT_MS or self.remote_jitter_max_ms >= JITTER_LIMIT_MS:
            out.append(f"jitter {self.jitter_max_ms:.1f} ours / {self.remote_jitter_max_ms:.1f} far end ms")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def why(self) -> str:
        """What the conditions say about a failure: whose clock was late, and why."""
        hints = []
        if self.wait_percent >= 10:
            hints.append(f"ours waited for a core {self.wait_percent:.0f}% of the time")
        if self.far_late_ms >= JITTER_LIMIT_MS:
            hints.append(f"far end's timer up to {self.far_late_ms:.0f} ms late")
        if self.far_wait_percent >= 10:
            hints.append(f"far end waited for a core {self.far_wait_percent:.0f}%")
        if self.rcvbuf_errors:
            hints.append(f"{self.rcvbuf_errors} kernel drops at full socket buffers")
        if self.cpu_percent >= 90:
            hints.append("ours used a whole core")
        return "; ".join(hints)


async def measure(
    calls: int, seconds: float, loop_kind: str, far: str, far_processes: int = 1, source: str = "tone"
) -> Step:
    """``far`` is "batch" (:func:`batch_far_end` in ``far_processes`` processes: our own far end, batched so
    that it keeps up), "ours" (N MediaSessions in a second process: as costly as the measured side) or
    "sipp" (sipp -rtp_echo reflects every packet back on one port)."""
    loop = asyncio.get_running_loop()
    warmup = 1.5
    echo: subprocess.Popen[bytes] | None = None
    children: list[multiprocessing.process.BaseProcess] = []
    lateness: list[Any] = []  # the batch far ends' worst timer lateness, one shared double each
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
            start_new_session=True,  # its own scheduling group, as _own_session() gives our far ends
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
            await MediaSession.start(source=_source(source), sink=CallbackSink(lambda pcm: None), rtcp_interval=1.0)
            for _ in range(calls)
        ]
        context = multiprocessing.get_context("spawn")
        ready_events = []
        children = []
        lifetime = warmup + seconds + 1.5
        if far == "batch":
            pairs = [(s.local_address, s.local_rtcp_address or s.local_address) for s in ours]
            shares = [pairs[i::far_processes] for i in range(far_processes)]
            for share in shares:
                ready = context.Event()
                ready_events.append(ready)
                lateness.append(context.RawArray("d", 1))
                children.append(
                    context.Process(target=batch_far_end, args=(share, lifetime, loop_kind, ready, lateness[-1]))
                )
        else:
            ready = context.Event()
            ready_events.append(ready)
            children.append(
                context.Process(target=far_end, args=([s.local_address for s in ours], lifetime, loop_kind, ready))
            )
        for child in children:
            child.start()
        while not all(ready.is_set() for ready in ready_events):
            await asyncio.sleep(0.05)
            if not all(child.is_alive() for child in children):
                raise RuntimeError("a far-end process died")
    await asyncio.sleep(warmup)  # latch symmetric RTP, fill jitter buffers, first RTCP
    before = [(s.stats.packets_received, s.stats.lost, s.stats.packets_sent) for s in ours]
    far_pids = [echo.pid] if echo is not None else [c.pid for c in children if c.pid is not None]
    far_cpu0 = sum(_cpu_seconds(pid) for pid in far_pids)
    far_wait0 = [_wait_seconds(pid) for pid in far_pids]
    for shared in lateness:
        shared[0] = 0.0
    switches0, wait0, drops0 = _switches(), _wait_seconds(), _udp_receive_errors()
    jb0 = [(s.jitter.stats.concealed, s.jitter.stats.late) for s in ours]
    cpu0, wall0 = time.process_time(), loop.time()
    samples: list[float] = []  # max jitter over our streams, sampled through the window
    remote_samples: list[float] = []
    for _ in range(int(seconds / 0.25)):
        await asyncio.sleep(0.25)
        now = [s.stats for s in ours]
        samples.append(max(s.jitter_ms for s in now))
        remote_samples.append(max(s.remote_jitter_ms or 0.0 for s in now))
    cpu1, wall1 = time.process_time(), loop.time()
    wakeups = _switches() - switches0
    waited, drops = _wait_seconds() - wait0, _udp_receive_errors() - drops0
    far_waited = max((_wait_seconds(pid) - w for pid, w in zip(far_pids, far_wait0, strict=True)), default=0.0)
    far_late = max((shared[0] for shared in lateness), default=0.0)
    concealed = sum(s.jitter.stats.concealed - b[0] for s, b in zip(ours, jb0, strict=True))
    late = sum(s.jitter.stats.late - b[1] for s, b in zip(ours, jb0, strict=True))
    far_cpu1 = sum(_cpu_seconds(pid) for pid in far_pids)
    stats = [s.stats for s in ours]
    for session in ours:
        await session.close(drain=False)
    for child in children:
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
        packets_out=sum(s.packets_sent - b[2] for s, b in zip(stats, before, strict=True)),
        cpu_seconds=cpu1 - cpu0,
        wakeups=wakeups,
        wait_percent=100 * waited / (wall1 - wall0),
        far_wait_percent=100 * far_waited / (wall1 - wall0),
        far_late_ms=1000 * far_late,
        rcvbuf_errors=drops,
        concealed=concealed,
        late=late,
        window_s=wall1 - wall0,
        max_lateness_ms=max(s.max_tick_lateness_ms for s in stats),
    )


def run_config(
    loop_kind: str,
    far: str,
    steps: list[int],
    seconds: float,
    far_processes: int | None = None,
    source: str = "tone",
    retries: int = 1,
) -> list[Step]:
    """Step the call count up until a step fails ``1 + retries`` times in a row (every attempt is kept)."""
    results = []
    for calls in steps:
        for _ in range(1 + retries):
            _use_loop(loop_kind)
            processes = far_processes or max(1, -(-calls // CALLS_PER_FAR_PROCESS))
            step = asyncio.run(measure(calls, seconds, loop_kind, far, processes, source))
            asyncio.set_event_loop_policy(None)
            results.append(step)
            print(
                f"  {loop_kind:8} {far:5} {calls:5} calls: cpu {step.cpu_percent:5.1f}%"
                f"  jitter {step.jitter_max_ms:6.2f}/{step.remote_jitter_max_ms:.2f} ms"
                f"  lost {step.lost}/{step.remote_lost}  {step.us_per_call_tick:.1f} us/call-tick"
                f"  waited {step.wait_percent:.0f}%  far late {step.far_late_ms:.0f} ms"
                f"  {'ok' if step.passed else 'FAIL: ' + ', '.join(step.failures) + ' (' + step.why + ')'}",
                file=sys.stderr,
            )
            if step.passed:
                break
        if not results[-1].passed:
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
    conditions = Conditions()
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
    print(f"\n({conditions})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, nargs="+", default=[250, 500, 750, 1000, 1250])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument("--far", choices=["batch", "ours", "sipp", "all"], default="batch")
    parser.add_argument(
        "--source",
        choices=["tone", "noise"],
        default="tone",
        help="what our sessions send: a 1 kHz tone (repeats: encoded once) or noise (every frame encoded)",
    )
    parser.add_argument(
        "--far-processes", type=int, help=f"processes for the batched far end (default: one per {CALLS_PER_FAR_PROCESS} calls)"
    )
    parser.add_argument(
        "--relayed", type=int, nargs="+", metavar="CALLS", help="measure relayed calls instead"
    )
    parser.add_argument("--compiled", action="store_true", help="the compiled build (tools/build_compiled.py)")
    parser.add_argument(
        "--retries", type=int, default=1, help="run a failing step again this many times before stopping (default 1)"
    )
    args = parser.parse_args()
    if args.relayed:
        run_relayed(sorted(set(args.relayed)), args.seconds)
        return
    fars = ["batch", "sipp", "ours"] if args.far == "all" else [args.far]
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
    conditions = Conditions()
    all_steps: list[Step] = []
    configs = [(kind, far) for far in fars for kind in kinds]
    for kind, far in configs:
        all_steps += run_config(kind, far, steps, args.seconds, args.far_processes, args.source, args.retries)
    print(
        f"\nMedia: bidirectional PCMU calls in one process, {args.seconds:.0f} s window, loopback, sending {args.source}, "
        f"p2psip {'compiled build' if COMPILED else 'pure Python'}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print(
        "| far end | loop | calls | CPU of one core (far end's) | CPU per call per 20 ms | jitter, worst stream, window mean (ours / far end via RTCP) | jitter, worst sample | lost (in / out) | packets per call per s (in / out) | concealed / late frames | worst tick late (ours / far end) | waited for a core (ours / far end) | result |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in all_steps:
        far_mean = "n/a" if s.far == "sipp" else f"{s.remote_jitter_max_ms:.2f}"  # the echo sends no RTCP
        far_worst = "n/a" if s.far == "sipp" else f"{s.remote_jitter_worst_ms:.1f}"
        far_late = f"{s.far_late_ms:.0f}" if s.far == "batch" else "n/a"
        verdict = "pass" if s.passed else f"FAIL: {', '.join(s.failures)}" + (f" ({s.why})" if s.why else "")
        print(
            f"| {s.far} | {s.loop} | {s.calls} | {s.cpu_percent:.0f}% ({s.far_cpu_percent:.0f}%) | {s.us_per_call_tick:.1f} µs"
            f" | {s.jitter_max_ms:.2f} / {far_mean} ms"
            f" | {s.jitter_worst_ms:.1f} / {far_worst} ms | {s.lost} / {s.remote_lost}"
            f" | {s.rate(s.packets):.1f} / {s.rate(s.packets_out):.1f} | {s.concealed} / {s.late}"
            f" | {s.max_lateness_ms:.0f} / {far_late} ms | {s.wait_percent:.0f}% / {s.far_wait_percent:.0f}%"
            f" | {verdict} |"
        )
    print(
        f"\nA step passes when, over its window: no packet is lost either way (RFC 3550 at our receivers; the far"
        f" end's RTCP for ours), every call ran at >= {MIN_RATE} packets/s each way, and the worst stream's"
        f" interarrival jitter (window mean of 250 ms samples) is under {JITTER_LIMIT_MS:.0f} ms both as we measure"
        f" it and as the far end reports it. A failing step is run again ({args.retries} more time(s)) before the"
        f" count stops. 'waited for a core' is run-queue time (/proc/PID/schedstat) over the window: a failure"
        f" with it high, or with the far end's timer late, is the machine's load, not the media path's CPU."
    )
    print()
    print(
        "| far end | loop | most calls passing | ratio to target (1,000) | CPU per call per 20 ms (spread over steps) | calls one full core could carry (from CPU) | ratio to target |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, far in configs:
        mine = [s for s in all_steps if s.loop == kind and s.far == far]
        passing = [s for s in mine if s.passed]
        best = max((s.calls for s in passing), default=0)
        # the CPU per call is read from steps where the far end kept up (packets in >= 90 % of 50/s): with
        # fewer packets in, the receive side's share would be under-counted
        fed = [s for s in mine if s.packets / s.calls / s.window_s >= 45]
        basis = fed or passing or mine
        costs = [s.us_per_call_tick for s in basis]
        per_tick = statistics.fmean(costs) if costs else float("nan")
        capacity = 20_000 / per_tick if per_tick else float("nan")
        print(
            f"| {far} | {kind} | {best} | {best / TARGET:.2f}x | {per_tick:.1f} µs ({min(costs):.1f}-{max(costs):.1f})"
            f"{'' if fed else ' (far end starved)'}"
            f" | {capacity:.0f} | {capacity / TARGET:.2f}x |"
        )
    print(
        "\nCPU per call per 20 ms is the measured process's CPU time divided by the packets it handled (one out and"
        " one in per call and interval): it holds whatever rate a starved far end managed. The CPU-derived column"
        " divides 20 ms of one core by it: what the process would carry with a core to itself (on a shared"
        " machine the passing count is limited by scheduling delays, which show as 'worst tick late')."
    )
    print(f"\n({conditions})")


if __name__ == "__main__":
    main()
