"""Shared test helpers: third-party tools, loopback ports, and the peers and phones of the peer tests.

A test that needs a real third-party peer (sipp, kamailio, baresip) calls ``require_tool``: on a laptop
without it the test skips; under ``CI=true`` a missing tool is a failure, never a skip.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from peer_phone import Phone
    from peer_support import PeerFactory

# No per-example wall-clock deadline (hypothesis's default is 200 ms): on a shared 2-core machine a pure
# function's example can wait that long for a core, and the test then fails for the load, not the code
# (the property tests that set their own settings already said deadline=None).
settings.register_profile("p2psip", deadline=None)
settings.load_profile("p2psip")


def pytest_configure(config: pytest.Config) -> None:
    """``P2PSIP_COMPILED=1``: the run is meant for the compiled build (tools/build_compiled.py, put first
    on the path by ``PYTHONPATH``): stop at once if any compiled module would be imported from its ``.py``
    instead, rather than pass while testing pure Python."""
    if os.environ.get("P2PSIP_COMPILED") != "1":
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from build_compiled import not_compiled

    missing = not_compiled()
    if missing:
        raise pytest.UsageError(f"P2PSIP_COMPILED=1 but these modules are not compiled: {', '.join(missing)}")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    """The path of an external program, or skip (fail under CI=true) when it is not installed."""
    path = shutil.which(name)
    if path:
        return path
    if in_ci():
        pytest.fail(f"{name} is required under CI=true but is not installed")
    pytest.skip(f"{name} is not installed")


# Ports handed to third-party tools come from below the kernel's ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): the kernel never picks these for a
# bind to port 0 or for an outgoing connection, so a port we probed free cannot be taken by one of our own
# peers' sockets between the probe and the tool's bind (CI once saw baresip fail with "Address already in
# use" so). Ports handed out are remembered, so two calls before either port is bound never collide.
_FIXED_PORTS = range(20000, 32000)
_handed_out: set[tuple[str, int]] = set()
_port_rng = random.Random()


def _bindable(family: int, kind: int, host: str, port: int) -> bool:
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", *, span: int = 1) -> int:
    """A port p free for both UDP and TCP on ``host`` right now, with p+1 .. p+span-1 free for TCP too (for
    tools that need fixed ports; baresip, say, listens for TLS at p+1), never one handed out before."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(500):
        port = _port_rng.choice(_FIXED_PORTS)
        wanted = [(host, port + i) for i in range(span)]
        if any(key in _handed_out for key in wanted):
            continue
        if not _bindable(family, socket.SOCK_DGRAM, host, port):
            continue
        if all(_bindable(family, socket.SOCK_STREAM, host, p) for _, p in wanted):
            _handed_out.update(wanted)
            return port
    raise RuntimeError("no free port found on loopback")


def free_sip_port() -> int:
    """A port p for baresip's SIP: UDP and TCP at p and TLS at p + 1 must all be free."""
    return free_port(span=2)


@pytest.fixture
async def make_peer(tmp_path: Path) -> AsyncIterator[PeerFactory]:
    """Test peers on loopback (:func:`peer_support.peer_factory`), all closed when the test ends. A test
    file that needs other defaults (client-peer keep-alives, the web server) defines its own."""
    from peer_support import peer_factory  # imported here: most tests start no peer

    async with peer_factory(tmp_path) as make:
        yield make


@pytest.fixture
async def phones() -> AsyncIterator[Callable[..., Awaitable[Phone]]]:
    """``make(user="alice", answer="auto", host="127.0.0.1")`` opens a test phone
    (:class:`peer_phone.Phone`); every phone opened is closed when the test ends."""
    from peer_phone import Phone

    opened: list[Phone] = []

    async def make(user: str = "alice", answer: str | int = "auto", host: str = "127.0.0.1") -> Phone:
        phone = await Phone.open(user, answer, host=host)
        opened.append(phone)
        return phone

    yield make
    for phone in opened:
        phone.close()
