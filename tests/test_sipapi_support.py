"""Helpers shared by the sipapi tests (no tests here): a blocking SIP client over loopback sockets, and
script servers run as child processes that are always ended by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from p2psip.message import Request, Response, new_branch, new_call_id, new_tag, parse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


def make_request(
    method: str,
    uri: str,
    *,
    local: tuple[str, int],
    from_: str = "sip:carol@example.com",
    to: str | None = None,
    max_forwards: int = 70,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    transport: str = "UDP",
) -> Request:
    request = Request.create(
        method,
        uri,
        from_=f"<{from_}>;tag={new_tag()}",
        to=f"<{to or uri}>",
        call_id=new_call_id(),
        via=f"SIP/2.0/{transport} {local[0]}:{local[1]};branch={new_branch()};rport",
        max_forwards=max_forwards,
        contact=f"<sip:{local[0]}:{local[1]}>",
        body=body,
        content_type="application/sdp" if body else None,
        headers=headers,
    )
    return request


class UdpClient:
    """A blocking UDP SIP client bound to a loopback port; ``send`` returns the final response."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.local = self.sock.getsockname()

    def request(self, method: str, uri: str, **kwargs: object) -> Request:
        return make_request(method, uri, local=self.local, **kwargs)  # type: ignore[arg-type]

    def send(self, request: Request, to: tuple[str, int], timeout: float = 10.0) -> Response:
        self.sock.sendto(bytes(request), to)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no final response to {request.method} within {timeout} s")
            self.sock.settimeout(left)
            data, _ = self.sock.recvfrom(65535)
            message = parse(data)
            if isinstance(message, Response) and message.status >= 200:
                if message.status >= 300 and request.method == "INVITE":
                    self.ack(request, message, to)
                return message

    def ack(self, invite: Request, response: Response, to: tuple[str, int]) -> None:
        ack = Request("ACK", invite.uri)
        for name in ("Via", "From", "Call-ID"):
            value = invite.get(name)
            assert value is not None
            ack.add(name, value)
        ack.add("To", response.get("To") or "")
        ack.add("CSeq", f"{invite.cseq.number} ACK")
        ack.add("Max-Forwards", "70")
        self.sock.sendto(bytes(ack), to)

    def close(self) -> None:
        self.sock.close()


class ScriptProcess:
    """``python script.py`` as a child; ready once it printed ``sipapi: listening on ...``."""

    def __init__(
        self,
        script: Path,
        *args: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=cwd or script.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=full_env,
            text=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.ready_line: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith(("sipapi: listening on", "b2bua ready")):
                self.ready_line = line.rstrip("\n")
                self._ready.set()
        self._ready.set()  # stdout closed: the script ended (wait_ready reports it with its output)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.errors.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 20.0) -> str:
        if not self._ready.wait(timeout) or self.ready_line is None or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"script did not start:\n{self.output()}")
        return self.ready_line

    def output(self) -> str:
        return "\n".join([*self.lines, "--- stderr", *self.errors])

    def stop(self, grace: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@contextlib.contextmanager
def script_process(script: Path, *args: str, **kwargs: object) -> Iterator[ScriptProcess]:
    child = ScriptProcess(script, *args, **kwargs)  # type: ignore[arg-type]
    try:
        yield child
    finally:
        child.stop()


def article_text(path: Path, host: str, port: int) -> str:
    """An example script with its listen address replaced (the only change the issue allows)."""
    return path.read_text().replace("('127.0.0.1', 5060)", f"('{host}', {port})")
