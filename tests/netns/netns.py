"""Network namespaces for multi-host tests: N "hosts" on a private bridge, torn down whatever happens.

Each host is a namespace with a veth interface and a private 10.x address; the bridge lives in a namespace
of its own, so nothing (no address, no route, no interface) is added to the machine's own network and no
traffic can leave it. Processes started with ``Hosts.popen`` are ended by PID on ``close``, before the
namespaces are deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from typing import Any


class NetnsUnavailable(RuntimeError):
    """This machine cannot create namespaces (not root, no ``ip``, or no CAP_SYS_ADMIN)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, timeout=20)
    if done.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")


def why_unavailable() -> str | None:
    """None when namespaces can be made here, else the reason (for a clear skip message)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"p2pprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except NetnsUnavailable as exc:
        return f"ip netns does not work here: {exc}"
    with contextlib.suppress(NetnsUnavailable):
        _ip("netns", "del", name)
    return None


def teardown(procs: list[subprocess.Popen[Any]], namespaces: list[str]) -> None:
    """End ``procs`` by PID (SIGTERM, then SIGKILL after 10 s), then delete ``namespaces`` newest first.

    Shared by every lab here so that no test leaves a process or a namespace behind, pass or fail; both
    lists are emptied, so a second call does nothing.
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    procs.clear()
    for name in reversed(namespaces):
        with contextlib.suppress(NetnsUnavailable):
            _ip("netns", "del", name)
    namespaces.clear()


class Hosts:
    """``count`` namespaces named ``{prefix}-1..count`` with addresses ``{subnet}.1..count``."""

    def __init__(self, count: int, *, subnet: str = "10.77.0", prefix: str | None = None) -> None:
        self.prefix = prefix or f"p2p{os.getpid()}"
        self.subnet = subnet
        self.names = [f"{self.prefix}-{i}" for i in range(1, count + 1)]
        self.switch = f"{self.prefix}-sw"
        self.addresses = [f"{subnet}.{i}" for i in range(1, count + 1)]
        self.procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []

    def open(self) -> Hosts:
        try:
            for name in (self.switch, *self.names):
                _ip("netns", "add", name)
                self._made.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (name, address) in enumerate(zip(self.names, self.addresses, strict=True), start=1):
                port = f"port{i}"
                _ip("link", "add", "name", "eth0", "netns", name, "type", "veth", "peer", "name", port,
                    "netns", self.switch)  # fmt: skip
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def popen(self, host: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host ``host`` (0-based); it is ended by PID on close()."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[host], *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self, host: int, argv: Sequence[str], timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(["ip", "netns", "exec", self.names[host], *argv], timeout=timeout, **kwargs)

    def close(self) -> None:
        teardown(self.procs, self._made)

    def __enter__(self) -> Hosts:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
