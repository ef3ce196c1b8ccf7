"""Three hosts (network namespaces on a private bridge), one `p2psip start` peer each, a call across them.

Nothing here touches the machine's own network: the bridge and the 10.77.0.x addresses exist only inside
namespaces this test creates and deletes. Skips with the reason where namespaces cannot be made (not root,
no iproute2); under CI=true that is a failure instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import in_ci

from .netns import Hosts, why_unavailable

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "p2psip.cli"]

CALLEE = """
import asyncio, sys
from p2psip.stack import Stack
from p2psip.useragent import UserAgent

def answer(incoming):
    incoming.ring()
    incoming.accept()

async def main():
    stack = await Stack.start([f"udp:{sys.argv[1]}:5080"])
    UserAgent(stack, "sip:bob@p2p.example", on_call=answer)
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = why_unavailable()
    if reason is not None:
        if in_ci():
            pytest.fail(f"network namespaces are required under CI=true: {reason}")
        pytest.skip(reason)
    with Hosts(3) as made:
        yield made


def _wait_line(proc: subprocess.Popen[str], marker: str, what: str) -> None:
    assert proc.stdout is not None
    for _ in range(50):
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"{what} exited ({proc.wait(5)}): {err}")
        if marker in line:
            return
    raise AssertionError(f"{what} never printed {marker!r}")


@pytest.mark.netns
def test_call_across_three_hosts(hosts: Hosts, tmp_path: Path) -> None:
    peers = []
    for i, address in enumerate(hosts.addresses):
        args = [
            *CLI, "start", "--listen", f"udp:{address}:5060", "--overlay", f"{address}:7060",
            "--data-dir", str(tmp_path / f"host{i + 1}"),
        ]  # fmt: skip
        if i:
            args += ["--join", f"{hosts.addresses[0]}:7060"]
        proc = hosts.popen(i, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        _wait_line(proc, " ready ", f"peer on {address}")
        peers.append(proc)
    callee = hosts.popen(
        2, [sys.executable, "-c", CALLEE, hosts.addresses[2]], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    _wait_line(callee, "ready", "bob's phone")

    register = hosts.run(
        2,
        [*CLI, "register", "sip:bob@p2p.example", "--via", f"{hosts.addresses[2]}:5060",
         "--contact", f"sip:bob@{hosts.addresses[2]}:5080", "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert register.returncode == 0, register.stdout + register.stderr

    # host 2 sees the registration through the overlay (its control socket)
    lookup = hosts.run(
        1, [*CLI, "lookup", "sip:bob@p2p.example", "--data-dir", str(tmp_path / "host2"), "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert lookup.returncode == 0, lookup.stderr
    found = json.loads(lookup.stdout)
    assert [b["contact"] for b in found["bindings"]] == [f"sip:bob@{hosts.addresses[2]}:5080"]
    assert {h["addr"].rsplit(":", 1)[0] for h in found["holders"]} == set(hosts.addresses)

    # alice on host 1 calls bob's AOR through the peer on host 1; the call crosses the bridge
    call = hosts.run(
        0,
        [*CLI, "call", "sip:bob@p2p.example", "--via", f"{hosts.addresses[0]}:5060", "--from",
         "sip:alice@p2p.example", "--duration", "0", "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert call.returncode == 0, call.stdout + call.stderr
    result = json.loads(call.stdout)
    assert result["answered"] and result["bye_status"] == 200
