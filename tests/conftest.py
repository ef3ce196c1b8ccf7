"""Shared test helpers: third-party tools and loopback ports.

A test that needs a real third-party peer (sipp, kamailio, baresip) calls ``require_tool``: on a laptop
without it the test skips; under ``CI=true`` a missing tool is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


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


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now (for tools that need a fixed port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            try:
                with socket.socket(family, socket.SOCK_STREAM) as tcp:
                    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    tcp.bind((host, port))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port pair found on loopback")
