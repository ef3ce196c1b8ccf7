"""Child processes of the interop tests and the proxy benchmark: readiness, CPU time, and clean ends.

Third-party peers (sipp, kamailio) and our own ``p2psip proxy`` run as children. Three things are needed
around them and are the same for all: know when a child listens (it gives no signal, so we watch the
kernel's socket tables for its port, bounded in time), read the CPU time it used (``/proc/PID/stat``,
including worker processes it forked), and end it by PID — SIGTERM, a bounded wait, then SIGKILL — so a
failed test never leaves a process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# /proc/net/tcp socket state 0A is LISTEN; a UDP socket shows state 07 (unconnected) once bound.
_TCP_LISTEN = "0A"


class ChildError(RuntimeError):
    """A child process did not start, did not become ready, or did not finish in time."""


def _bound_ports(kind: str) -> set[int]:
    ports: set[int] = set()
    for suffix in ("", "6"):
        path = Path(f"/proc/net/{kind}{suffix}")
        try:
            lines = path.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if kind == "tcp" and fields[3] != _TCP_LISTEN:
                continue
            ports.add(port)
    return ports


def port_is_bound(port: int, kind: str) -> bool:
    """Whether some socket on this host is bound to ``port`` (UDP) or listens on it (TCP)."""
    return port in _bound_ports(kind)


def wait_for_ports(
    proc: subprocess.Popen[bytes], ports: Iterable[tuple[int, str]], timeout: float = 15.0, what: str = ""
) -> None:
    """Return once every ``(port, "udp"|"tcp")`` is bound; raise if ``proc`` exits or ``timeout`` passes.

    A child has no readiness signal; polling the kernel's socket tables is the event we can wait on.
    """
    wanted = list(ports)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        missing = [(p, k) for p, k in wanted if not port_is_bound(p, k)]
        if not missing:
            return
        if proc.poll() is not None:
            raise ChildError(f"{what or proc.args!r} exited with {proc.returncode} before binding {missing}")
        if time.monotonic() > deadline:
            raise ChildError(f"{what or proc.args!r} did not bind {missing} within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def children_of(pid: int) -> list[int]:
    """Direct and indirect children of ``pid`` (kamailio forks its workers from the main process)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """User + system CPU time of ``pid`` (and of its live descendants), from ``/proc/PID/stat``."""
    total = 0
    pids = [pid, *children_of(pid)] if with_children else [pid]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state(0) ppid(1) ... utime is field 14 of the full line, index 11 here
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def stop(proc: subprocess.Popen[bytes], *, grace: float = 5.0, children: Iterable[int] = ()) -> None:
    """End ``proc`` by PID: SIGTERM, wait up to ``grace`` s, then SIGKILL; then SIGKILL ``children`` left.

    ``children`` should be collected (``children_of``) before the parent is signalled, because once the
    parent is gone orphans are re-parented and can no longer be found by their parent's PID.
    """
    leftover = list(children)
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
