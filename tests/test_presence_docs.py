"""docs/presence.md runs as written: its python blocks are executed (a watcher against the documented
presence server, a blind and an attended transfer between our UAs on loopback), and the module table names
modules that exist."""

from __future__ import annotations

import asyncio
import importlib
import re
from pathlib import Path
from typing import Any

from p2psip.stack import Stack
from p2psip.useragent import IncomingCall, UserAgent

DOC = (Path(__file__).resolve().parent.parent / "docs" / "presence.md").read_text()
SDP = b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def namespace() -> dict[str, Any]:
    names: dict[str, Any] = {}
    for block in re.findall(r"```python\n(.*?)```", DOC, flags=re.S):
        if "basic.addEventListener" in block:
            continue  # a per-user script: tests/test_presence_agent.py runs it (checked below)
        exec(compile(block, "docs/presence.md", "exec"), names)  # the documentation's own code
    return names


def test_the_module_table_names_real_modules() -> None:
    modules = re.findall(r"^\| `(p2psip\.[a-z_]+)` \|", DOC, flags=re.M)
    assert len(modules) == 13
    for name in modules:
        importlib.import_module(name)


def uri_of(ua: UserAgent) -> str:
    host, port = ua.stack.local_address("udp")
    return f"sip:{ua.aor.user}@{host}:{port}"


async def test_the_examples_run() -> None:
    names = namespace()
    stacks = [await Stack.start(["udp:127.0.0.1:0"]) for _ in range(4)]
    try:
        bob = names["presence_server"](stacks[0], "sip:bob@127.0.0.1")
        alice = UserAgent(stacks[1], "sip:alice@127.0.0.1")
        assert await names["watch"](alice, uri_of(bob)) == "open"

        carol = UserAgent(stacks[2], "sip:carol@127.0.0.1")
        dave = UserAgent(stacks[3], "sip:dave@127.0.0.1")

        def answer(call: IncomingCall) -> None:
            call.accept(SDP)

        for ua in (bob, carol, dave):
            ua.on_call = answer
        call = await alice.call(uri_of(bob), body=SDP, timeout=10)
        assert await names["blind"](call, uri_of(carol)) == 200
        to_bob = await alice.call(uri_of(bob), body=SDP, timeout=10)
        to_dave = await alice.call(uri_of(dave), body=SDP, timeout=10)
        assert await names["attended"](to_bob, to_dave) == 200
        assert await to_dave.wait_ended(5) == "bye received"
        for ua in (alice, bob, carol, dave):
            await ua.close()
    finally:
        await asyncio.gather(*(s.close() for s in stacks))


def test_the_subscribe_script_is_the_tested_one() -> None:
    from test_presence_agent import SUBSCRIBE_SCRIPT

    (script,) = [b for b in re.findall(r"```python\n(.*?)```", DOC, flags=re.S) if "addEventListener" in b]
    assert script == SUBSCRIBE_SCRIPT
