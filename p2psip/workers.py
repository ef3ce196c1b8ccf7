"""Worker processes: one program on every core, like Kamailio's children, supervised by a parent.

``p2psip proxy --workers N`` forks N workers before any event loop exists. Each runs the usual proxy on
the same UDP port (``SO_REUSEPORT``) and hands each datagram to the worker that keeps its transaction
(:mod:`p2psip.handoff`). The parent only supervises:

- it resolves port 0 once (a placeholder socket holds the port until every worker listens), waits until
  every worker says it is ready, then prints the ready line;
- a worker that dies is started again (same index, so the branches it will tag name it again), at most
  :data:`MAX_RESTARTS` times a minute; established calls do not depend on it (in-dialog requests follow
  Record-Route to the shared address) and in-flight INVITEs recover through the caller's retransmissions;
- SIGTERM/SIGINT stop every worker gracefully (then SIGKILL after ``grace`` seconds); the workers'
  counters are summed and returned.

The parent forks, so it must be called before any thread or event loop starts (the CLI does).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from p2psip.address import ListenSpec
from p2psip.errors import ConfigError
from p2psip.handoff import Alive, Link, open_links

#: restarts allowed within a minute before the parent gives up (a worker that dies at start would loop)
MAX_RESTARTS = 10
MAX_WORKERS = 64


@dataclass(frozen=True)
class WorkerSlot:
    """Who a worker is: ``index`` among the workers whose hand-off links are ``links`` (opened and held by
    the parent: :func:`p2psip.handoff.open_links`)."""

    index: int
    links: tuple[Link, ...]
    alive: Alive | None = None
    """Non-zero per worker index while that worker listens (shared with the parent, which keeps it)."""
    own: tuple[socket.socket, ...] = ()
    """This worker's own UDP sockets (one per address family of the listeners, held by the parent so a
    restarted worker reads what came meanwhile): its client transactions send from them and name them
    in their Via, so their responses come straight back to it instead of being handed over."""

    @property
    def workers(self) -> int:
        return len(self.links)


Ready = Callable[[Sequence[str]], None]
"""What a worker calls once it listens, with its addresses (``udp:HOST:PORT``)."""
RunWorker = Callable[[WorkerSlot, Sequence[str], Ready], dict[str, int]]
"""``run(slot, listen, ready)`` runs one worker on ``listen`` until it is told to stop (SIGTERM/SIGINT);
returns its counters."""


def check_workers(workers: int, listen: Sequence[str]) -> list[ListenSpec]:
    """The listeners of a proxy of ``workers`` processes: UDP only (a TCP connection belongs to one
    process, and its messages could not be handed to another worker's transaction). Raises ConfigError
    naming what is wrong (also for a worker count out of range)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be 1 to {MAX_WORKERS}, got {workers}")
    specs = [ListenSpec.parse(spec) for spec in listen]
    for spec in specs:
        if spec.transport != "udp":
            raise ConfigError(
                f"--workers takes udp: listeners only (got {spec}): write udp:{spec.host}:{spec.port}"
            )
    return specs


def _reserve_ports(specs: list[ListenSpec]) -> tuple[list[str], list[socket.socket]]:
    """Port 0 becomes a port the system picks, held by a ``SO_REUSEPORT`` placeholder until the workers
    have bound it too."""
    resolved: list[str] = []
    held: list[socket.socket] = []
    for spec in specs:
        if spec.port != 0:
            resolved.append(str(spec))
            continue
        family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((spec.host, 0))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {spec}: {exc.strerror or exc}") from exc
        held.append(sock)
        resolved.append(str(ListenSpec("udp", spec.host, sock.getsockname()[1])))
    return resolved, held


def _open_own(specs: list[ListenSpec], workers: int) -> list[tuple[socket.socket, ...]]:
    """Per worker, a UDP socket on the host of the first listener of each address family (port 0)."""
    hosts = list({(":" in spec.host): spec.host for spec in reversed(specs)}.values())
    opened: list[tuple[socket.socket, ...]] = []
    try:
        for _ in range(workers):
            mine: list[socket.socket] = []
            opened.append(())
            for host in hosts:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
                mine.append(sock)
                opened[-1] = tuple(mine)
                sock.bind((host, 0))
    except OSError as exc:
        for socks in opened:
            for sock in socks:
                sock.close()
        raise ConfigError(f"cannot open the workers' own UDP sockets: {exc.strerror or exc}") from exc
    return opened


def _end_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the parent dies (PR_SET_PDEATHSIG): a supervisor killed
    with SIGKILL must not leave its workers serving the port on their own."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class Supervisor:
    """The parent of ``workers`` processes, each running ``run(slot, listen, ready)`` (:data:`RunWorker`)."""

    def __init__(
        self,
        workers: int,
        listen: Sequence[str],
        run: RunWorker,
        *,
        grace: float = 10.0,
        start_timeout: float = 60.0,
    ) -> None:
        self.specs = check_workers(workers, listen)
        self.workers = workers
        self.run = run
        self.grace = grace
        self.start_timeout = start_timeout
        self.pids: dict[int, int] = {}  # pid -> index
        self.links: list[Link] = []
        self.own: list[tuple[socket.socket, ...]] = []
        self.alive = memoryview(mmap.mmap(-1, workers))  # shared with the children: 1 = listening
        self.restarts: list[float] = []
        self.stats: dict[str, int] = {}
        self._stopping = False
        self._buffer = b""

    # ----------------------------------------------------------------------------- the children

    def _fork(self, index: int, listen: list[str], held: list[socket.socket], report: int) -> int:
        links = self.links
        pid = os.fork()
        if pid:
            self.pids[pid] = index
            return pid
        code = 1
        try:  # the child: never returns into the parent's code
            signal.set_wakeup_fd(-1)
            _end_with_parent()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            for sock in held:
                sock.close()
            slot = WorkerSlot(index, tuple(links), self.alive, self.own[index])

            def ready(addresses: Sequence[str]) -> None:
                os.write(report, (json.dumps({"ready": index, "addresses": list(addresses)}) + "\n").encode())

            stats = self.run(slot, listen, ready)
            os.write(report, (json.dumps({"stats": stats}) + "\n").encode())
            code = 0
        except KeyboardInterrupt:
            code = 0
        except ConfigError as exc:  # e.g. the port is taken: the parent says it, in one line
            with contextlib.suppress(OSError):
                os.write(report, (json.dumps({"error": str(exc)}) + "\n").encode())
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _read_reports(self, fd: int) -> list[dict[str, object]]:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        out: list[dict[str, object]] = []
        for line in lines:
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
                    stats = item.get("stats")
                    if isinstance(stats, dict):
                        for key, value in stats.items():
                            if isinstance(value, int):
                                self.stats[key] = self.stats.get(key, 0) + value
        return out

    def _reap(self) -> list[tuple[int, int, int]]:
        """(pid, index, wait status) of the children that ended."""
        ended = []
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.pids.pop(pid, None)
            if index is not None:
                ended.append((pid, index, status))
        return ended

    # ------------------------------------------------------------------------------- the parent

    def serve(self, announce: Callable[[list[str]], None]) -> dict[str, int]:
        """Start the workers, ``announce(addresses)`` once all are ready, restart those that die, and
        stop them all on SIGTERM/SIGINT; returns their summed counters."""
        listen, held = _reserve_ports(self.specs)
        try:
            self.links = open_links(self.workers)
            self.own = _open_own(self.specs, self.workers)
        except (OSError, ConfigError) as exc:
            for sock in held:
                sock.close()
            for pair in self.links:
                for sock in pair:
                    sock.close()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot open the workers' hand-off sockets: {exc}") from exc
        report_r, report_w = os.pipe()
        wake_r, wake_w = os.pipe()
        os.set_blocking(report_r, False)
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)

        def on_stop(signum: int, frame: object) -> None:
            self._stopping = True

        previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        try:
            for index in range(self.workers):
                self._fork(index, listen, held, report_w)
            ready: dict[int, list[str]] = {}
            deadline = time.monotonic() + self.start_timeout
            while len(ready) < self.workers:
                if self._stopping or time.monotonic() > deadline:
                    raise ConfigError(f"only {len(ready)} of {self.workers} workers started")
                self._wait(report_r, wake_r, 0.5)
                ended = self._reap()
                reports = self._read_reports(report_r)  # after reaping: an ended worker's last words
                errors = [str(item["error"]) for item in reports if "error" in item]
                if errors:
                    raise ConfigError(errors[0])
                if ended:
                    raise ConfigError("a worker ended while starting (see its error above)")
                for item in reports:
                    who = item.get("ready")
                    addresses = item.get("addresses")
                    if isinstance(who, int) and isinstance(addresses, list):
                        ready[who] = [str(a) for a in addresses]
                        self.alive[who] = 1
            for sock in held:
                sock.close()
            held = []
            announce(ready[0])
            while not self._stopping:
                self._wait(report_r, wake_r, 5.0)
                for item in self._read_reports(report_r):
                    who = item.get("ready")
                    if isinstance(who, int) and who in self.pids.values():
                        self.alive[who] = 1  # a restarted worker listens again
                for pid, index, status in self._reap():
                    self.alive[index] = 0
                    if self._stopping:
                        break
                    self._restart(pid, index, status, listen, report_w)
        finally:
            self._stop_all(report_r)
            for sock in held:
                sock.close()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (report_r, report_w, wake_r, wake_w):
                os.close(fd)
            for pair in self.links:
                for sock in pair:
                    sock.close()
            for socks in self.own:
                for sock in socks:
                    sock.close()
        return self.stats

    def _wait(self, report_r: int, wake_r: int, timeout: float) -> None:
        readable, _, _ = select.select([report_r, wake_r], [], [], timeout)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)

    def _restart(self, pid: int, index: int, status: int, listen: list[str], report_w: int) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60.0]
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        if len(self.restarts) >= MAX_RESTARTS:
            print(
                f"p2psip proxy: worker {index} (pid {pid}) ended ({how}); too many restarts: stopping",
                file=sys.stderr,
                flush=True,
            )
            self._stopping = True
            return
        self.restarts.append(now)
        self.stats["worker_restarts"] = self.stats.get("worker_restarts", 0) + 1
        new = self._fork(index, listen, [], report_w)
        print(
            f"p2psip proxy: worker {index} (pid {pid}) ended ({how}); restarted as pid {new}",
            file=sys.stderr,
            flush=True,
        )

    def _stop_all(self, report_r: int) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while self.pids and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                select.select([report_r], [], [], 0.1)
            self._read_reports(report_r)
            self._reap()
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.pids:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.pids.pop(pid, None)
        self._read_reports(report_r)
