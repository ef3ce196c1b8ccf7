"""Our own ``p2psip proxy`` as a child process, the way an operator runs it.

Interop tests and the benchmark drive the proxy through its command line (not in-process) so that sipp
measures the shipped program, in its own process, with its own event loop — and so its CPU time can be read
from ``/proc``. The proxy prints ``p2psip proxy (MODE) listening on udp:HOST:PORT, tcp:HOST:PORT`` once its
listeners are open: that line is the readiness event we wait for (bounded), and it tells the ports when
the proxy was asked for port 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .procs import ChildError, children_of, cpu_seconds, stop

_LISTENING = re.compile(r"listening on (.*)$")
_ADDR = re.compile(r"(udp|tcp|tls):(\[[^\]]+\]|[^:,\s]+):(\d+)")


def package_root() -> Path:
    """The directory the ``p2psip`` this process runs comes from (the checkout, or the compiled build of
    tools/build_compiled.py): the proxy child runs the same one."""
    import p2psip

    return Path(p2psip.__file__).resolve().parents[1]


class OurProxy:
    """``python -m p2psip.cli proxy --listen ...`` as a child; a context manager that always ends it."""

    def __init__(
        self,
        workdir: Path,
        listen: Sequence[str] = ("127.0.0.1:0",),
        *,
        stateless: bool = False,
        loop: str = "asyncio",
        extra: Sequence[str] = (),
        name: str = "p2psip-proxy",
    ) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "proxy.log"
        self.args = [sys.executable, "-m", "p2psip.cli", "proxy", "--loop", loop]
        for spec in listen:
            self.args += ["--listen", spec]
        if stateless:
            self.args.append("--stateless")
        self.args += list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.addresses: dict[str, tuple[str, int]] = {}
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> OurProxy:
        repo = package_root()
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{repo}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(repo)
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read_output, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not self.addresses:
            self.stop()
            raise ChildError(
                f"p2psip proxy did not report its listeners within {timeout:.0f} s:\n{self.output()}"
            )
        return self

    def _read_output(self, ready: threading.Event) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log.open("w") as log:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self._lines.append(line)
                del self._lines[:-200]
                log.write(line + "\n")
                log.flush()
                match = _LISTENING.search(line)
                if match and not ready.is_set():
                    for transport, host, port in _ADDR.findall(match.group(1)):
                        self.addresses.setdefault(transport, (host.strip("[]"), int(port)))
                    ready.set()
        ready.set()  # the child ended: wake the waiter, which then reports the failure

    def address(self, transport: str = "udp") -> str:
        host, port = self.addresses[transport]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def output(self) -> str:
        return "\n".join(self._lines[-40:])

    def stop(self) -> None:
        if self.proc is not None:
            # with --workers, the worker processes too (collected first: orphans cannot be found)
            stop(self.proc, grace=5.0, children=children_of(self.proc.pid))
        if self._reader is not None:
            self._reader.join(timeout=5.0)

    def final_stats(self) -> dict[str, int]:
        """The counters the proxy printed when it stopped (``p2psip proxy stopped: key=value ...``)."""
        for line in reversed(self._lines):
            if "proxy stopped:" in line:
                pairs = (item.split("=", 1) for item in line.split("stopped:", 1)[1].split())
                return {key: int(value) for key, value in pairs if value.lstrip("-").isdigit()}
        return {}

    def __enter__(self) -> OurProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
