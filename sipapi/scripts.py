"""Layer 2: per-user scripts (CPL / SIP-CGI / LESS style), chosen by the Request-URI.

A peer with a scripts directory runs, for each incoming out-of-dialog request (not REGISTER, ACK or CANCEL),
the script of the callee: the Request-URI's canonical AOR ``sip:jones@example.com`` → the file
``DIR/jones@example.com.py``. No file: the peer's normal processing. The script sees ``URI``, ``Address``
and its own ``basic`` (nothing to import) and registers handlers::

    def proxy_then_voicemail(event):
        ...
    basic.addEventListener('incoming', proxy_then_voicemail)

Scripts run in worker processes (:mod:`sipapi.worker`): a script that raises, blocks or loops costs that
call a 500 (logged with the script's file and line), never the peer; an edited script is used from the
next call on. ``install(peer, scripts=DIR)`` turns a running :class:`~p2psip.peer.Peer` into a scripted one;
``script=FILE`` instead runs one script for every such request (``p2psip start --script FILE``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from p2psip.errors import ConfigError, ParseError
from p2psip.message import Request
from p2psip.peer import Peer

from .runtime import DEFAULT_DEADLINE, Runner, ScriptedPeerCore
from .worker import WorkerPool, WorkerRunner

log = logging.getLogger("sipapi")

__all__ = ["NOT_SCRIPTED", "ScriptDirectory", "Scripting", "SingleScript", "install", "script_name"]

NOT_SCRIPTED = frozenset({"REGISTER", "ACK", "CANCEL", "PRACK"})
"""Methods never handed to per-user scripts (registration and transaction-level requests)."""

_SAFE = re.compile(r"^[A-Za-z0-9._@+%!~*'()=&$,;?-]+$")


def script_name(request: Request) -> str | None:
    """The file name of the callee's script, ``user@host.py`` (None when the AOR has no user part or
    would not make a safe file name)."""
    aor = request.uri.aor()
    scheme, _, rest = aor.partition(":")
    if scheme != "sip" or "@" not in rest:
        return None
    if not _SAFE.match(rest) or rest.startswith(".") or "/" in rest or "\\" in rest:
        return None
    return f"{rest}.py"


def _scriptable(request: Request) -> bool:
    if request.method in NOT_SCRIPTED:
        return False
    try:
        return request.to.tag is None and request.get("Route") is None
    except ParseError:
        return False


class ScriptDirectory:
    """Dispatcher: the callee's script in ``directory``, looked up at every request (so a new or removed
    file takes effect at once)."""

    def __init__(self, directory: Path, pool: WorkerPool) -> None:
        self.directory = directory
        self.pool = pool

    def select(self, request: Request) -> Runner | None:
        if not _scriptable(request):
            return None
        name = script_name(request)
        if name is None:
            return None
        path = self.directory / name
        if not path.is_file():
            return None
        return WorkerRunner(self.pool, path.resolve(), per_user=True)


class SingleScript:
    """Dispatcher: one script for every scriptable request (``--script FILE``)."""

    def __init__(self, path: Path, pool: WorkerPool) -> None:
        self.path = path.resolve()
        self.pool = pool

    def select(self, request: Request) -> Runner | None:
        if not _scriptable(request) or not self.path.is_file():
            return None
        return WorkerRunner(self.pool, self.path)


class _Both:
    def __init__(self, first: ScriptDirectory, second: SingleScript) -> None:
        self.first = first
        self.second = second

    def select(self, request: Request) -> Runner | None:
        return self.first.select(request) or self.second.select(request)


class Scripting:
    """What :func:`install` returns: the scripted core and its worker pool (``await close()`` at the end)."""

    def __init__(self, core: ScriptedPeerCore, pool: WorkerPool) -> None:
        self.core = core
        self.pool = pool

    @property
    def stats(self) -> dict[str, int]:
        return {**self.core.script_stats, **self.pool.stats}

    async def close(self) -> None:
        await self.pool.close()


def install(
    peer: Peer,
    *,
    scripts: str | Path | None = None,
    script: str | Path | None = None,
    deadline: float = DEFAULT_DEADLINE,
    workers: int = 4,
    queue_timeout: float | None = None,
) -> Scripting:
    """Give ``peer`` per-user scripts from the directory ``scripts`` (and/or one ``script`` for every
    request). Must run on the peer's event loop; starts one worker process at once. ``workers`` bounds
    the processes (and so the scripted requests being decided at once); a request that finds them all
    busy for ``queue_timeout`` seconds (default: ``deadline``) is answered 503 with Retry-After."""
    if scripts is None and script is None:
        raise ConfigError("sipapi.install: give scripts=DIR and/or script=FILE")
    pool = WorkerPool(size=workers, deadline=deadline, queue_timeout=queue_timeout)
    directory = None
    single = None
    if scripts is not None:
        path = Path(scripts)
        if not path.is_dir():
            raise ConfigError(
                f"--scripts {path}: not a directory (create it, then put user@domain.py files in it)"
            )
        directory = ScriptDirectory(path, pool)
    if script is not None:
        file = Path(script)
        if not file.is_file():
            raise ConfigError(f"--script {file}: no such file")
        single = SingleScript(file, pool)
    if directory is not None and single is not None:
        dispatcher: ScriptDirectory | SingleScript | _Both = _Both(directory, single)
    else:
        dispatcher = directory or single  # type: ignore[assignment]
    core = ScriptedPeerCore.install(peer, dispatcher, deadline=deadline)
    pool.start()
    log.info("scripts installed (%s)", ", ".join(str(p) for p in (scripts, script) if p))
    return Scripting(core, pool)
