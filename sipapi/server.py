"""Layer 3: a whole SIP server written as a script (the SER-config style of the article).

::

    from sipapi import *

    open(('127.0.0.1', 5060))          # listen here (UDP and TCP); open(anything else) is the built-in open

    def route(event):
        if event['Max-Forwards'] and int(event['Max-Forwards'].value) <= 0:
            return event.action.reject(code=483, reason='Too many hops')
        ...

    basic.addEventListener('incoming', route)
    run()                              # serve until SIGINT/SIGTERM

``open`` only records listening points and ``run`` starts them, so a script reads top to bottom like a
config file. ``overlay(...)`` before ``run()`` makes the server a full peer (it joins or creates an overlay):
then ``event.action.save()`` writes registrations into the DHT, ``event.lookup()`` reads them, and
``default()`` is the peer's registrar/proxy; without it the server keeps registrations in memory and
``default()`` answers 501, as the original sipapi did.

Every request except ACK and CANCEL (which the proxy core handles itself: ACK for a 2xx is routed on,
CANCEL cancels the branches) goes to the ``incoming`` handlers. When it starts listening, ``run`` prints
one line ``sipapi: listening on udp:HOST:PORT, tcp:HOST:PORT`` on standard output so another program
can wait for it.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overlay.localring import quick_node_config
from p2psip.address import bracket
from p2psip.config import HostPort, ListenSpec, PeerConfig
from p2psip.errors import P2PSIPError
from p2psip.message import Request
from p2psip.peer import Peer
from p2psip.run import until_stopped
from p2psip.stack import Stack

from .events import EventTarget
from .runtime import (
    DEFAULT_DEADLINE,
    InProcessRunner,
    Runner,
    ScriptedPeerCore,
    ScriptingCore,
    ScriptServerCore,
)

__all__ = ["ListenPoint", "Server", "basic", "open", "overlay", "run", "serve"]

log = logging.getLogger("sipapi")

basic = EventTarget()
"""The event target of a script server: ``basic.addEventListener('incoming', route)``."""


class ListenPoint:
    """What ``open((host, port))`` returns: the listening point (UDP and TCP on that address)."""

    def __init__(self, host: str, port: int, transport: str | None = None) -> None:
        self.host = host
        self.port = port
        self.transport = transport

    def specs(self) -> list[str]:
        host = bracket(self.host)
        # No prefix: UDP and TCP on one port (the same one, even for port 0).
        return [f"{self.transport}:{host}:{self.port}" if self.transport else f"{host}:{self.port}"]

    def __repr__(self) -> str:
        return f"<ListenPoint {', '.join(self.specs())}>"


class _Settings:
    def __init__(self) -> None:
        self.listen: list[ListenPoint] = []
        self.overlay: dict[str, Any] | None = None


_settings = _Settings()


def _is_address(value: object) -> bool:
    if not isinstance(value, tuple) or len(value) not in (2, 3):
        return False
    *head, port = value
    return all(isinstance(x, str) for x in head) and isinstance(port, int) and not isinstance(port, bool)


def open(*args: Any, **kwargs: Any) -> Any:
    """``open((host, port))`` or ``open(('tcp', host, port))`` (``udp``, ``tcp``, ``tls``, ``ws``, ``wss``):
    listen there when ``run()`` starts.
    Anything else is the built-in :func:`open`, so a script can still write its files."""
    if len(args) == 1 and not kwargs and _is_address(args[0]):
        address = args[0]
        if len(address) == 3:
            transport, host, port = address
            if transport not in ("udp", "tcp", "tls", "ws", "wss"):
                raise ValueError(f"open: transport {transport!r} is not udp, tcp, tls, ws or wss")
            point = ListenPoint(host, port, transport)
        else:
            host, port = address
            point = ListenPoint(host, port)
        if not 0 <= point.port <= 65535:
            raise ValueError(f"open: port {point.port} out of range 0-65535")
        _settings.listen.append(point)
        return point
    return builtins.open(*args, **kwargs)


def overlay(
    bind: tuple[str, int] = ("127.0.0.1", 7060),
    join: tuple[str, int] | None = None,
    *,
    data_dir: str | Path | None = None,
    name: str | None = None,
    quick: bool = False,
) -> None:
    """Make the script server a peer: bind the overlay node at ``bind`` and join through ``join`` (None
    creates a new overlay). ``quick`` runs ring maintenance every 0.2 s (one machine, tests, demos).
    ``data_dir`` keeps the node's identity and user keys (default: a new temporary directory)."""
    _settings.overlay = {"bind": bind, "join": join, "data_dir": data_dir, "name": name, "quick": quick}


class _TargetDispatcher:
    """Every request (but ACK/CANCEL) goes to the script's handlers, when it has any."""

    def __init__(self, target: EventTarget, deadline: float) -> None:
        self.runner = InProcessRunner(target, deadline=deadline)
        self.target = target

    def select(self, request: Request) -> Runner | None:
        return self.runner if self.target.handlers("incoming") else None


class Server:
    """A running script server (what ``run`` drives): a Stack or a Peer with a scripting core."""

    def __init__(self, core: ScriptingCore, stack: Stack, peer: Peer | None) -> None:
        self.core = core
        self.stack = stack
        self.peer = peer

    @classmethod
    async def start(
        cls,
        target: EventTarget,
        listen: list[ListenPoint],
        *,
        overlay: dict[str, Any] | None = None,
        deadline: float = DEFAULT_DEADLINE,
        stack_options: dict[str, Any] | None = None,
    ) -> Server:
        if not listen:
            raise P2PSIPError("nothing to listen on: call open(('127.0.0.1', 5060)) before run()")
        dispatcher = _TargetDispatcher(target, deadline)
        if overlay is None:
            specs = [spec for point in listen for spec in point.specs()]
            stack = await Stack.start(specs, **(stack_options or {}))
            return cls(ScriptServerCore(stack, dispatcher, deadline=deadline), stack, None)
        bind = overlay["bind"]
        join = overlay["join"]
        config = PeerConfig(
            listen=[ListenSpec(p.transport, p.host, p.port) for p in listen],
            overlay=HostPort(bind[0], bind[1]),
            join=HostPort(join[0], join[1]) if join else None,
        )
        # Without a data dir the peer gets a fresh identity in a temporary one (a script server is often
        # started for a test or a demo; give data_dir= to keep the node and user keys across restarts).
        config.data_dir = Path(overlay.get("data_dir") or tempfile.mkdtemp(prefix="sipapi-peer-"))
        if overlay.get("name"):
            config.overlay_name = overlay["name"]
        config.cache_ttl = 0.0
        node_config = quick_node_config() if overlay.get("quick") else None
        peer = await Peer.start(config, node_config=node_config, stack_options=stack_options)
        core = ScriptedPeerCore.install(peer, dispatcher, deadline=deadline)
        return cls(core, peer.stack, peer)

    def addresses(self) -> list[str]:
        return self.stack.addresses()

    async def close(self) -> None:
        if self.peer is not None:
            await self.peer.close(leave=True)
        else:
            await self.stack.close()


async def serve(
    target: EventTarget | None = None,
    listen: list[ListenPoint] | None = None,
    *,
    overlay: dict[str, Any] | None = None,
    deadline: float = DEFAULT_DEADLINE,
    ready: Callable[[Server], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Server:
    """Run a script server until ``stop`` is set (SIGINT/SIGTERM when None); returns it (closed)."""
    server = await Server.start(
        target if target is not None else basic,
        listen if listen is not None else list(_settings.listen),
        overlay=overlay if overlay is not None else _settings.overlay,
        deadline=deadline,
    )
    try:
        await until_stopped((lambda: ready(server)) if ready is not None else None, stop)
    finally:
        await server.close()
    return server


def run(*, deadline: float = DEFAULT_DEADLINE) -> None:
    """The loop that processes the listening points: serve until SIGINT/SIGTERM, then exit 0.

    A script that sets ``_debug = True`` gets a log line per decision and per script error on stderr.
    """
    main = sys.modules.get("__main__")
    debug = bool(getattr(main, "_debug", False))
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s"
    )

    def announce(server: Server) -> None:
        print(f"sipapi: listening on {', '.join(server.addresses())}", flush=True)

    try:
        asyncio.run(serve(deadline=deadline, ready=announce))
    except (P2PSIPError, OSError) as exc:
        print(f"sipapi: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass
