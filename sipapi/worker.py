"""Per-user scripts run isolated: in worker processes, with a deadline, reloaded when edited.

A user's script is arbitrary Python (the article: "because of the un-safe nature of Python, we will lose a
number of features provided by CPL"). So it never runs inside the peer: a pool of worker processes
(``python -m sipapi.worker``) executes the handlers, and the peer only exchanges small messages with them
over a socket pair. What a misbehaving script costs is one call:

- it raises: the worker reports ``file:line: Error`` (the innermost frame of the script), the peer logs it
  and answers 500 unless the script had already answered;
- it loops or sleeps: the worker's own alarm (``SIGALRM``, paused while the worker waits for the peer in
  ``proxy()``) raises inside the script after ``deadline`` seconds, so the log says where it was; if even
  that does not end it (blocked in C code, signals ignored), the peer kills the worker process after a
  grace period and answers 500; a new worker takes its place;
- it crashes the interpreter (``os._exit``): the peer sees the pipe close and answers 500.

Workers keep each script compiled with the file's modification time and size and re-run it when they change,
so editing a script takes effect at the next call, with no restart.

Messages (pickled, over :class:`multiprocessing.connection.Connection` on a socket pair): the peer sends
``("run", path, request_bytes, source, deadline)``; the worker sends the actions (``respond``, ``redirect``,
``challenge``, ``default``, ``save``), the questions it needs answered (``proxy``, ``lookup``,
``authenticate`` → ``("result", value)``), and finally ``("done", error_or_None)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .errors import ScriptTimeout

log = logging.getLogger("sipapi.worker")

__all__ = ["ScriptTimeout", "Worker", "WorkerPool", "WorkerRunner"]

GRACE = 2.0
"""Seconds the peer waits past a script's deadline before it kills the worker."""


# ==================================================================================== the peer's side


class Worker:
    """One worker process and its connection; messages arrive on an asyncio queue (a reader thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sipapi.worker", str(child.fileno())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        child.close()
        # The connection gets its own descriptor of the socket; ``self.sock`` is kept to shut it down,
        # which (unlike close) wakes the reader thread blocked in recv and gives the worker its EOF.
        self.sock = parent
        self.conn = Connection(os.dup(parent.fileno()))
        self.loop = loop
        self.messages: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.alive = True
        self.ready = False
        threading.Thread(target=self._read, name=f"sipapi-worker-{self.proc.pid}", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                message = ("dead",)
            except Exception as exc:  # an unpicklable message: treat the worker as broken
                message = ("dead", f"bad message from worker: {exc}")
            try:
                self.loop.call_soon_threadsafe(self.messages.put_nowait, message)
            except RuntimeError:  # the loop is closed
                return
            if message[0] == "dead":
                return

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def _hang_up(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            self.conn.close()

    def kill(self) -> None:
        """End the process by its PID (SIGKILL: it may be stuck), and close the connection."""
        self.alive = False
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._hang_up()

    def stop(self) -> None:
        """Ask it to exit (its connection ends), then make sure it did."""
        self.alive = False
        self._hang_up()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.kill()


class WorkerPool:
    """Up to ``size`` worker processes, started on demand (one at once by :meth:`start`)."""

    def __init__(
        self,
        *,
        size: int = 4,
        deadline: float = 5.0,
        grace: float = GRACE,
        queue_timeout: float | None = None,
    ) -> None:
        self.size = size
        self.deadline = deadline
        self.grace = grace
        self.queue_timeout = deadline if queue_timeout is None else queue_timeout
        """How long a request waits for a free worker before it is refused with 503 (a worker is held
        while its script waits in proxy(), so a burst of long calls can take them all)."""
        self.idle: list[Worker] = []
        self.count = 0
        self._waiters: list[asyncio.Future[Worker]] = []
        self._all: set[Worker] = set()
        self.stats: dict[str, int] = dict.fromkeys(
            ("runs", "errors", "timeouts", "killed", "workers_started", "busy_refusals"), 0
        )

    def start(self) -> None:
        """Start one worker now, so the first call does not wait for an interpreter to start."""
        if self.count < self.size:
            self.idle.append(self._spawn())

    def _spawn(self) -> Worker:
        worker = Worker(asyncio.get_running_loop())
        self.count += 1
        self.stats["workers_started"] += 1
        self._all.add(worker)
        return worker

    async def acquire(self) -> Worker:
        while self.idle:
            worker = self.idle.pop()
            if worker.alive and worker.proc.poll() is None:
                return worker
            self._discard(worker)
        if self.count < self.size:
            return self._spawn()
        waiter: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def release(self, worker: Worker) -> None:
        if not worker.alive:
            self._discard(worker)
            if self._waiters and self.count < self.size:
                self._waiters.pop(0).set_result(self._spawn())
            return
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(worker)
                return
        self.idle.append(worker)

    def _discard(self, worker: Worker) -> None:
        if worker in self._all:
            self._all.discard(worker)
            self.count -= 1

    async def close(self) -> None:
        workers = list(self._all)
        self._all.clear()
        self.idle.clear()
        self.count = 0
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, w.stop) for w in workers))


class WorkerRunner:
    """Runs one script file for one request in a worker of ``pool`` (a :class:`sipapi.runtime.Runner`)."""

    def __init__(self, pool: WorkerPool, path: Path, *, per_user: bool = False) -> None:
        self.pool = pool
        self.path = path
        self.per_user = per_user
        """A callee's own script (``--scripts DIR``): in a peer it runs on the callee's home peer only."""

    async def run(self, control: Any) -> None:
        from .runtime import CallControl

        assert isinstance(control, CallControl)
        pool = self.pool
        pool.stats["runs"] += 1
        try:
            worker = await asyncio.wait_for(pool.acquire(), pool.queue_timeout)
        except TimeoutError:
            pool.stats["busy_refusals"] += 1
            log.warning("%s: every script worker is busy; refused with 503", self.path.name)
            if not control.decided:
                control.respond(
                    503, "Service Unavailable (every script worker is busy)", [("Retry-After", "5")], b""
                )
            return
        try:
            await self._run(worker, control)
        finally:
            pool.release(worker)

    async def _run(self, worker: Worker, control: Any) -> None:
        pool = self.pool
        loop = asyncio.get_running_loop()
        script = str(self.path)
        try:
            kind = getattr(control, "event_type", "incoming")
            worker.send("run", script, bytes(control.request), control.source_tuple, pool.deadline, kind)
        except OSError:
            worker.kill()
            control.fail("script worker unavailable")
            return
        budget = pool.deadline + pool.grace + 30.0 * (not worker.ready)  # a fresh worker starts first
        while True:
            began = loop.time()
            try:
                message = await asyncio.wait_for(worker.messages.get(), max(budget, 0.01))
            except TimeoutError:
                pool.stats["timeouts"] += 1
                pool.stats["killed"] += 1
                log.warning("%s: killed after %.1f s (the script did not return)", script, pool.deadline)
                worker.kill()
                control.fail(f"script {self.path.name} did not return")
                return
            budget -= loop.time() - began
            kind = message[0]
            if kind == "ready":
                worker.ready = True
                budget = pool.deadline + pool.grace
                continue
            if kind == "dead":
                worker.alive = False
                pool.stats["errors"] += 1
                why = message[1] if len(message) > 1 else "the worker process ended"
                log.warning("%s: %s", script, why)
                control.fail(f"script {self.path.name} crashed")
                return
            if kind == "done":
                error = message[1]
                if error:
                    pool.stats["errors"] += 1
                    if "ScriptTimeout" in error:
                        pool.stats["timeouts"] += 1
                    log.warning("script error: %s", error)
                    control.fail(f"script error: {error.rsplit('/', 1)[-1]}")
                return
            await self._serve(worker, control, kind, message[1:])

    async def _serve(self, worker: Worker, control: Any, kind: str, args: tuple[Any, ...]) -> None:
        """Carry out one action of the script (answering the ones it waits for)."""
        try:
            if kind == "respond":
                control.respond(*args)
            elif kind == "redirect":
                control.redirect(*args)
            elif kind == "challenge":
                control.challenge(*args)
            elif kind == "default":
                control.default()
            elif kind == "transfer":
                control.transfer(*args)
            elif kind == "save":
                control.save()
            elif kind == "proxy":
                try:
                    outcome = await control.proxy(*args)
                except Exception as exc:
                    log.warning("proxy for %s failed: %s", self.path.name, exc)
                    outcome = "failure"
                worker.send("result", outcome)
            elif kind == "lookup":
                try:
                    found = await control.lookup(*args)
                except Exception as exc:
                    log.warning("lookup for %s failed: %s", self.path.name, exc)
                    found = []
                worker.send("result", found)
            elif kind == "authenticate":
                worker.send("result", control.authenticate(*args))
            else:
                log.warning("%s: unknown message %r from the worker", self.path.name, kind)
        except OSError:
            worker.kill()
        except Exception as exc:  # e.g. ScriptError (answered twice): the worker's Action prevents most
            log.warning("%s: %s", self.path.name, exc)


# ================================================================================== the worker's side


class _Alarm:
    """The script's deadline, as a pausable SIGALRM timer (paused while the peer works for the script)."""

    def __init__(self) -> None:
        self.remaining = 0.0
        signal.signal(signal.SIGALRM, self._fire)

    @staticmethod
    def _fire(signum: int, frame: Any) -> None:
        raise ScriptTimeout("the script overran its deadline")

    def start(self, seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))

    def pause(self) -> None:
        self.remaining = signal.setitimer(signal.ITIMER_REAL, 0)[0]

    def resume(self) -> None:
        if self.remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, self.remaining)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)


class _PipeController:
    """The Controller of an event in a worker: actions become messages to the peer."""

    def __init__(self, conn: Connection, alarm: _Alarm) -> None:
        self.conn = conn
        self.alarm = alarm
        self.lock = threading.Lock()

    def in_loop(self) -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _tell(self, *message: Any) -> None:
        with self.lock:
            self.conn.send(message)

    def _ask(self, *message: Any) -> Any:
        """Send a question and wait for its result, with the script's clock stopped meanwhile."""
        main = threading.current_thread() is threading.main_thread()
        if main:
            self.alarm.pause()
        try:
            with self.lock:
                self.conn.send(message)
                reply = self.conn.recv()
        finally:
            if main:
                self.alarm.resume()
        return reply[1]

    async def _ask_async(self, *message: Any) -> Any:
        self.alarm.pause()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._ask_unpaused, message)
        finally:
            self.alarm.resume()

    def _ask_unpaused(self, message: tuple[Any, ...]) -> Any:
        with self.lock:
            self.conn.send(message)
            return self.conn.recv()[1]

    def respond(self, status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes) -> None:
        self._tell("respond", status, reason, headers, body)

    def redirect(self, locations: list[str], status: int) -> None:
        self._tell("redirect", locations, status)

    def challenge(self, realm: str, proxy: bool) -> None:
        self._tell("challenge", realm, proxy)

    def default(self) -> None:
        self._tell("default")

    def transfer(self, location: str) -> None:
        self._tell("transfer", location)

    def save(self) -> None:
        self._tell("save")

    def proxy(self, locations: list[str], timeout: float | None) -> str:
        outcome: str = self._ask("proxy", locations, timeout)
        return outcome

    def proxy_async(self, locations: list[str], timeout: float | None) -> Awaitable[str]:
        return self._ask_async("proxy", locations, timeout)

    def lookup(self, aor: str) -> list[str]:
        found: list[str] = self._ask("lookup", aor)
        return found

    def lookup_async(self, aor: str) -> Awaitable[list[str]]:
        return self._ask_async("lookup", aor)

    def authenticate(self, realm: str, users: dict[str, str]) -> str | None:
        name: str | None = self._ask("authenticate", realm, users)
        return name


class _Scripts:
    """Compiled scripts by path, re-run when the file's mtime or size changes."""

    def __init__(self) -> None:
        self.cache: dict[str, tuple[tuple[int, int], Any]] = {}

    def get(self, path: str) -> Any:
        from p2psip.uri import URI, Address

        from .events import EventTarget

        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self.cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        source = Path(path).read_text(encoding="utf-8")
        code = compile(source, path, "exec")
        basic = EventTarget()
        namespace: dict[str, Any] = {
            "__name__": "sipapi_user_script",
            "__file__": path,
            "URI": URI,
            "Address": Address,
            "basic": basic,
        }
        exec(code, namespace)
        self.cache[path] = (stamp, basic)
        return basic


def _run_one(conn: Connection, scripts: _Scripts, alarm: _Alarm, args: tuple[Any, ...]) -> None:
    from p2psip.message import Request, parse

    from .events import Event
    from .runtime import describe_error

    path, data, source, deadline, *rest = args
    kind = str(rest[0]) if rest else "incoming"  # the event type: incoming, or subscribe (presence)
    controller = _PipeController(conn, alarm)
    error: str | None = None
    alarm.start(deadline)
    try:
        basic = scripts.get(path)
        request = parse(data)
        assert isinstance(request, Request)
        for handler in basic.handlers(kind):
            event = Event(request, controller, source=tuple(source))
            event.type = kind
            if inspect.iscoroutinefunction(handler):
                asyncio.run(handler(event))
            else:
                result = handler(event)
                if inspect.isawaitable(result):
                    asyncio.run(_await(result))
            if event.action.decided or event.action.outcome is not None:
                break
    except (Exception, ScriptTimeout) as exc:
        error = describe_error(exc, path)
    finally:
        alarm.stop()
    conn.send(("done", error))


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def main(argv: list[str] | None = None) -> int:
    """``python -m sipapi.worker FD``: serve runs on the connection at file descriptor FD until it closes."""
    args = sys.argv[1:] if argv is None else argv
    conn = Connection(int(args[0]))
    alarm = _Alarm()
    scripts = _Scripts()
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return 0
        if message[0] == "run":
            try:
                _run_one(conn, scripts, alarm, message[1:])
            except (EOFError, OSError):
                return 0
            except ScriptTimeout:  # fired between the script's end and alarm.stop()
                conn.send(("done", "the script overran its deadline"))
        time.sleep(0)


if __name__ == "__main__":
    sys.exit(main())
