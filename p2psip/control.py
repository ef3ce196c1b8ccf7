"""The control socket: a running peer answers ``status`` and ``lookup`` over a Unix socket in its data dir.

Why a Unix socket: it needs no port, its permissions are the data directory's, and ``p2psip status`` finds
it from ``--data-dir`` alone. The protocol is JSON lines: the client writes one object
``{"cmd": "status"}`` or ``{"cmd": "lookup", "uri": "sip:bob@example.net"}`` and reads one object back,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. A bad request gets an error reply; it
never stops the server.

This module knows nothing of the overlay or the SIP stack: the peer passes in the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from p2psip.errors import P2PSIPError

SOCKET_NAME = "control.sock"
MAX_LINE = 64 * 1024
#: A control connection that sends no complete request for this long is closed (it holds a task).
IDLE_TIMEOUT = 30.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(P2PSIPError):
    """The control socket could not be reached or answered with an error."""


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


class ControlServer:
    """Serves JSON-line requests on ``DATA_DIR/control.sock`` with ``handler(request) -> result``."""

    def __init__(self, data_dir: Path, handler: Handler, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.path = socket_path(data_dir)
        self._handler = handler
        self.idle_timeout = idle_timeout
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if len(os.fsencode(self.path)) >= 104:
            raise ControlError(
                f"control socket path {self.path} is too long for a Unix socket; use a shorter --data-dir"
            )
        if self.path.exists():
            if await _is_alive(self.path):
                raise ControlError(
                    f"another peer already runs with data dir {self.path.parent} (its control socket answers)"
                )
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_LINE)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except TimeoutError:
                    break  # idle (or trickling): a control client sends a request at once
                except (ValueError, asyncio.LimitOverrunError):
                    await _send(writer, {"ok": False, "error": "request line too long"})
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                        raise ValueError('expected {"cmd": ...}')
                except (ValueError, RecursionError) as exc:
                    # json raises ValueError (UnicodeDecodeError, JSONDecodeError) for bad text and
                    # RecursionError for deep nesting ("[" * 50000): both are a bad request, not a crash.
                    why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                    await _send(writer, {"ok": False, "error": f"bad request: {why}"})
                    continue
                try:
                    result = await self._handler(request)
                    reply: dict[str, Any] = {"ok": True, "result": result}
                except Exception as exc:  # the server must survive any handler failure
                    reply = {"ok": False, "error": str(exc) or type(exc).__name__}
                await _send(writer, reply)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, default=str).encode() + b"\n")
    await writer.drain()


async def _is_alive(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


def running_data_dirs(proc_net_unix: Path = Path("/proc/net/unix")) -> list[Path]:
    """The data dirs of the peers running on this machine, as far as it is cheap to know: the listening Unix
    sockets named ``control.sock`` that the kernel lists (Linux; elsewhere, none). Only live sockets are
    listed there, so a stale socket file left by a killed peer does not count."""
    try:
        lines = proc_net_unix.read_text(errors="replace").splitlines()[1:]
    except OSError:
        return []
    found: list[Path] = []
    for line in lines:
        fields = line.split(None, 7)  # the path, the last field, may hold spaces
        if len(fields) == 8 and fields[-1].endswith("/" + SOCKET_NAME):
            folder = Path(fields[-1]).parent
            if folder not in found and (folder / SOCKET_NAME).exists():
                found.append(folder)
    return sorted(found)


def _no_peer(data_dir: Path) -> str:
    """Why ``status``/``lookup`` found nobody at ``data_dir``, and where peers do run."""
    elsewhere = [d for d in running_data_dirs() if d.resolve() != data_dir.expanduser().resolve()]
    if elsewhere:
        shown = ", ".join(f"--data-dir {d}" for d in elsewhere[:5])
        more = f" (and {len(elsewhere) - 5} more)" if len(elsewhere) > 5 else ""
        return f"no peer is running with data dir {data_dir}; peers running here: {shown}{more}"
    return (
        f"no peer is running with data dir {data_dir} (no {SOCKET_NAME}); give the peer's --data-dir, "
        "or start one with p2psip start"
    )


async def request(data_dir: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Ask the peer running with ``data_dir``; returns its result or raises ControlError."""
    path = socket_path(data_dir)
    if not path.exists():
        raise ControlError(_no_peer(Path(data_dir)))
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=16 * MAX_LINE), timeout
        )
    except (TimeoutError, OSError):
        raise ControlError(
            f"the peer with data dir {data_dir} does not answer on {path} (is it running?)"
        ) from None
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (TimeoutError, OSError, ValueError):
        raise ControlError(
            f"the peer with data dir {data_dir} did not answer {cmd!r} in {timeout:g} s"
        ) from None
    finally:
        writer.close()
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError("the peer sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise ControlError("the peer sent a malformed reply")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply.get("result")
