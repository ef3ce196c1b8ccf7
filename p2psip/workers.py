"""Worker processes: one program on every core, like Kamailio's children, supervised by a parent.

``p2psip proxy --workers N`` forks N workers before any event loop exists. Each runs the usual proxy on
the same UDP port (``SO_REUSEPORT``) and hands each datagram to the worker that keeps its transaction
(:mod:`p2psip.handoff`). The parent binds the workers' sockets on that port itself, in worker order, so
that a socket's index in the kernel's reuseport group is its worker's index, and attaches the steering
program (:mod:`p2psip.steering`): the kernel then delivers each request to the worker that owns its
Call-ID, and little is left to hand over. Otherwise the parent only supervises:

- it waits until every worker says it is ready, then prints the ready line (port 0 resolved);
- a worker that dies is started again (same index, so the branches it will tag name it again; same
  sockets, held by the parent), at most :data:`MAX_RESTARTS` times a minute; meanwhile the steering
  sends its share to a live worker; established calls do not depend on it (in-dialog requests follow
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
from p2psip.handoff import Alive, Link, open_links, relay
from p2psip.steering import attach

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
    shared: tuple[socket.socket, ...] = ()
    """This worker's sockets on the shared port, one per listener, bound by the parent in worker order
    (held by it, like ``own``): what the worker listens on."""

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


def _bind_shared(specs: list[ListenSpec], workers: int) -> tuple[list[str], list[tuple[socket.socket, ...]]]:
    """Per worker, a ``SO_REUSEPORT`` socket bound on each listener's address, bound in worker order so
    each socket's index in its reuseport group is its worker's (what the steering program returns: the
    socket order of a group is the order they joined it, and the parent keeps them all open, so it never
    changes). Port 0 becomes the port the system picks for the first. Returns the resolved listeners
    and the sockets by worker."""
    resolved: list[str] = []
    by_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for spec in specs:
            port = spec.port
            family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
            for mine in by_worker:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                mine.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                try:
                    sock.bind((spec.host, port))
                except OSError as exc:
                    raise ConfigError(f"cannot listen on {spec}: {exc.strerror or exc}") from exc
                port = sock.getsockname()[1]
            resolved.append(str(ListenSpec("udp", spec.host, port)))
    except BaseException:
        for mine in by_worker:
            for sock in mine:
                sock.close()
        raise
    return resolved, [tuple(mine) for mine in by_worker]


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
        self.shared: list[tuple[socket.socket, ...]] = []
        self.steered = False
        """Whether the kernel steers requests to their owner (:mod:`p2psip.steering`)."""
        self.alive = memoryview(mmap.mmap(-1, workers))  # shared with the children: 1 = listening
        self.restarts: list[float] = []
        self.stats: dict[str, int] = {}
        self._stopping = False
        self._buffer = b""

    # ----------------------------------------------------------------------------- the children

    def _fork(self, index: int, listen: list[str], report: int) -> int:
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
            slot = WorkerSlot(index, tuple(links), self.alive, self.own[index], self.shared[index])

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
        listen, self.shared = _bind_shared(self.specs, self.workers)
        try:
            self.links = open_links(self.workers)
            self.own = _open_own(self.specs, self.workers)
        except (OSError, ConfigError) as exc:
            for socks in self.shared:
                for sock in socks:
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
                self._fork(index, listen, report_w)
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
            self.steered = self._steer()
            if self.steered:
                self.stats["kernel_steering"] = 1
            announce(ready[0])
            while not self._stopping:
                self._wait(report_r, wake_r, 5.0)
                for item in self._read_reports(report_r):
                    who = item.get("ready")
                    if isinstance(who, int) and who in self.pids.values():
                        self.alive[who] = 1  # a restarted worker listens again: its share goes to it
                        self._steer()
                for pid, index, status in self._reap():
                    self.alive[index] = 0
                    self._relay(index)
                    self._steer()  # its share to a live worker until its successor listens
                    self._relay(index)  # and what came meanwhile
                    if self._stopping:
                        break
                    self._restart(pid, index, status, listen, report_w)
        finally:
            self._stop_all(report_r)
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (report_r, report_w, wake_r, wake_w):
                os.close(fd)
            for pair in self.links:
                for sock in pair:
                    sock.close()
            for socks in (*self.own, *self.shared):
                for sock in socks:
                    sock.close()
        return self.stats

    def _relay(self, index: int) -> None:
        """Hand what waits on a dead worker's sockets on the shared port to the next live worker (not its
        own socket's: the responses there name its port in their Via, which only its successor, on the
        same socket a few milliseconds later, takes as its own)."""
        live = [i for i in range(self.workers) if self.alive[i]]
        if not live:
            return
        to = min(live, key=lambda i: (i - index) % self.workers)
        for sock in self.shared[index]:
            relayed = relay(sock, self.links[to][1])
            self.stats["relayed"] = self.stats.get("relayed", 0) + relayed

    def _steer(self) -> bool:
        """Attach the steering program to each listener's group, the share of a worker that is not
        listening routed to the next one that is; False when the system cannot steer."""
        alive = [index for index in range(self.workers) if self.alive[index]]
        if not self.shared or not alive:
            return False
        route = [
            index if self.alive[index] else min(alive, key=lambda live: (live - index) % self.workers)
            for index in range(self.workers)
        ]
        # every listener's group (a list, not a generator: all() would stop at the first refusal)
        return all([attach(group[0], self.workers, route) for group in zip(*self.shared, strict=True)])

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
        new = self._fork(index, listen, report_w)
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
