"""The control socket: JSON lines over a Unix socket in the data dir; bad requests never kill it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from p2psip import control


async def handler(req: dict[str, Any]) -> Any:
    if req["cmd"] == "status":
        return {"peers": 3}
    if req["cmd"] == "lookup":
        return {"uri": req.get("uri")}
    raise ValueError(f"unknown command {req['cmd']!r}")


async def test_status_lookup_and_errors(tmp_path: Path) -> None:
    server = control.ControlServer(tmp_path, handler)
    await server.start()
    try:
        assert await control.request(tmp_path, "status") == {"peers": 3}
        assert await control.request(tmp_path, "lookup", uri="sip:bob@x") == {"uri": "sip:bob@x"}
        with pytest.raises(control.ControlError, match="unknown command"):
            await control.request(tmp_path, "nope")
        # garbage on the wire gets an error reply and the server keeps serving
        reader, writer = await asyncio.open_unix_connection(str(control.socket_path(tmp_path)))
        writer.write(b"this is not json\n[1,2]\n")
        await writer.drain()
        first = json.loads(await asyncio.wait_for(reader.readline(), 5))
        second = json.loads(await asyncio.wait_for(reader.readline(), 5))
        writer.close()
        assert first["ok"] is False and "bad request" in first["error"]
        assert second["ok"] is False
        assert await control.request(tmp_path, "status") == {"peers": 3}
        # a second server on the same data dir is refused while the first answers
        with pytest.raises(control.ControlError, match="already runs"):
            await control.ControlServer(tmp_path, handler).start()
    finally:
        await server.close()
    assert not control.socket_path(tmp_path).exists()
    with pytest.raises(control.ControlError, match="no peer is running"):
        await control.request(tmp_path, "status")


async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    control.socket_path(tmp_path).write_text("")  # left over by a killed peer
    server = control.ControlServer(tmp_path, handler)
    await server.start()
    try:
        assert await control.request(tmp_path, "status") == {"peers": 3}
    finally:
        await server.close()


async def test_deep_nesting_and_bad_bytes_are_bad_requests(tmp_path: Path) -> None:
    # Before: 50,000 '[' raised RecursionError out of json (only ValueError was caught).
    server = control.ControlServer(tmp_path, handler)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(control.socket_path(tmp_path)))
        writer.write(b"[" * 50_000 + b"\n" + b"\xff\xfe\n" + b'{"cmd": "status"}\n')
        await writer.drain()
        replies = [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(3)]
        writer.close()
        assert replies[0] == {"ok": False, "error": "bad request: nested too deeply"}
        assert replies[1]["ok"] is False and "bad request" in replies[1]["error"]
        assert replies[2] == {"ok": True, "result": {"peers": 3}}  # the same connection still serves
    finally:
        await server.close()


async def test_idle_control_connections_time_out(tmp_path: Path) -> None:
    server = control.ControlServer(tmp_path, handler, idle_timeout=0.3)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(control.socket_path(tmp_path)))
        writer.write(b'{"cmd": ')  # half a request, then nothing
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        assert await control.request(tmp_path, "status") == {"peers": 3}
    finally:
        await server.close()


async def test_asking_the_wrong_data_dir_names_the_running_peers(tmp_path: Path) -> None:
    """The README starts peers with --data-dir /tmp/peer1; a bare `p2psip status` must say where peers run
    (the live control sockets the kernel lists), and a stale socket file is not a running peer."""
    running, stale, empty = tmp_path / "peer1", tmp_path / "stale", tmp_path / "nobody"
    for folder in (running, stale, empty):
        folder.mkdir()
    control.socket_path(stale).write_text("")  # left by a killed peer: not listed
    server = control.ControlServer(running, handler)
    await server.start()
    try:
        assert running in control.running_data_dirs() and stale not in control.running_data_dirs()
        with pytest.raises(control.ControlError) as failure:
            await control.request(empty, "status")
        message = str(failure.value)
        assert message.startswith(f"no peer is running with data dir {empty}; peers running here:")
        assert f"--data-dir {running}" in message and str(stale) not in message
    finally:
        await server.close()
    assert running not in control.running_data_dirs()  # (other peers of this machine may still be listed)
    listing = tmp_path / "unix"
    listing.write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        f"0000: 00000002 00000000 00010000 0001 01 191583 {running}/control.sock\n"
        "0000: 00000003 00000000 00000000 0001 03 191612\n"
    )
    assert control.running_data_dirs(listing) == []  # listed, but its socket file is gone
    assert control.running_data_dirs(tmp_path / "no-such-file") == []
